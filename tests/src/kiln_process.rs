//! `kiln` as a real process: `kiln serve` and one-shot `kiln build start`,
//! for the tests that kill it (SIGKILL, SIGINT) and start it again.

use std::ffi::OsStr;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// A running `kiln` whose stderr is collected line by line.
pub struct KilnProcess {
    child: Child,
    stderr: Arc<Mutex<String>>,
    lines: watch::Receiver<usize>,
    /// Ends when stderr is closed: everything printed has been collected.
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl KilnProcess {
    /// Starts `kiln ARGS` in `cwd`.
    pub fn spawn<I, S>(args: I, cwd: &Path) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::spawn_with(&crate::kiln_binary(), args, cwd, &[])
    }

    /// Starts `binary ARGS` in `cwd` with `env` added, e.g. the failpoints
    /// build of kiln ([`crate::failpoint_kiln_binary`]) with `KILN_FAILPOINT`.
    pub fn spawn_with<I, S>(binary: &Path, args: I, cwd: &Path, env: &[(&str, &str)]) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut child = Command::new(binary)
            .args(args)
            .envs(env.iter().copied())
            .current_dir(cwd)
            .env("KILN_LOG", "info")
            .env("KILN_AGENT_BINARY", crate::agent_binary())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start kiln");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = watch::channel(0);
        let mut reader = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let sink = stderr.clone();
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = reader.next_line().await {
                eprintln!("kiln: {line}");
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
                tx.send_modify(|n| *n += 1);
            }
        });
        Self { child, stderr, lines, reader: Some(reader) }
    }

    /// What it printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits (at most `limit`) until stderr has a line containing `needle`.
    pub async fn wait_for_stderr(&mut self, needle: &str, limit: Duration) -> bool {
        let stderr = self.stderr.clone();
        let found = self.lines.wait_for(|_| stderr.lock().unwrap().contains(needle));
        tokio::time::timeout(limit, found).await.is_ok_and(|r| r.is_ok())
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id().expect("running") as i32)
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal kiln");
    }

    /// SIGKILL, and reap it.
    pub async fn kill9(mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait().await;
    }

    /// Its exit code, waiting at most `limit`.
    pub async fn exit_code(&mut self, limit: Duration) -> Option<i32> {
        let exited = async {
            let status = self.child.wait().await.ok()?;
            // The exit can be seen before the last lines are read.
            if let Some(reader) = self.reader.take() {
                let _ = reader.await;
            }
            Some(status)
        };
        tokio::time::timeout(limit, exited).await.ok()??.code()
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// QEMU processes whose command line names a path inside `dir` (QEMU names
/// its instance directory).
pub fn qemu_processes_in(dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|p| std::fs::read(p.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.starts_with("qemu-system") && c.contains(&dir))
        .collect()
}

/// The one log file under `<data>/logs` once it holds `needle`, polled at
/// most `limit` (the one-shot's own client is inside the process under test).
pub async fn wait_for_log_file(data: &Path, needle: &str, limit: Duration) -> Option<PathBuf> {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        for entry in std::fs::read_dir(data.join("logs")).into_iter().flatten().flatten() {
            if std::fs::read_to_string(entry.path()).is_ok_and(|t| t.contains(needle)) {
                return Some(entry.path());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}
