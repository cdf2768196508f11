//! Runs rendered user-data against a local HTTP server: it must retry,
//! download, verify and exec the agent under every shell and download tool.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kiln_bootstrap::UserData;
use sha2::{Digest, Sha256};

const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBfzCCASWgAwIBAgIU\n-----END CERTIFICATE-----\n";
const TARGET: &str = "0191e5b4-7c3a-7d2e-9b1f-3a4c5d6e7f80";
const TOKEN: &str = "it's $(not) `run`\nsecond line";

/// Serves `body` to every request after answering the first `failures` with 503.
fn serve(body: Vec<u8>, failures: usize) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/bootstrap/v1/kiln-agent", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line.trim_end() != "" {
                line.clear();
            }
            let response = if counter.fetch_add(1, Ordering::SeqCst) < failures {
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
            } else {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                [head.as_bytes(), &body].concat()
            };
            let _ = stream.write_all(&response);
        }
    });
    (url, hits)
}

/// A stand-in agent that records its arguments and token in `out`.
fn fake_agent(out: &Path) -> Vec<u8> {
    format!(
        "#!/bin/sh\n{{ for a in \"$@\"; do printf '<%s>\\n' \"$a\"; done; printf 'token=<%s>\\n' \"$KILN_ENROLL_TOKEN\"; }} >'{}'\n",
        out.display()
    )
    .into_bytes()
}

struct Bed {
    tmp: tempfile::TempDir,
    hits: Arc<AtomicUsize>,
    script: PathBuf,
}

impl Bed {
    /// Renders user-data for a server that fails once, then serves `agent`;
    /// `claimed` overrides the sha256 written into the user-data.
    fn new(agent: impl FnOnce(&Path) -> Vec<u8>, claimed: Option<&str>, fetch_timeout_secs: u64) -> Bed {
        let tmp = tempfile::tempdir().unwrap();
        let body = agent(&tmp.path().join("out"));
        let sha256 = claimed.map_or_else(|| hex::encode(Sha256::digest(&body)), str::to_owned);
        let (url, hits) = serve(body, 1);
        let user_data = UserData {
            agent_url: "https://127.0.0.1:7701",
            agent_binary_url: &url,
            ca_pem: CA,
            agent_sha256: &sha256,
            target: TARGET.parse().unwrap(),
            token: TOKEN,
            fetch_timeout_secs,
            ec2_identity: false,
        }
        .render()
        .unwrap();
        let script = tmp.path().join("user-data");
        std::fs::write(&script, user_data).unwrap();
        Bed { tmp, hits, script }
    }

    fn agent_dir(&self) -> PathBuf {
        self.tmp.path().join("agent")
    }

    /// Runs the user-data with `shell` (argv prefix), `PATH` replaced when given.
    fn run(&self, shell: &[&str], path: Option<&Path>) -> Output {
        let mut cmd = Command::new(shell[0]);
        cmd.args(&shell[1..]).arg(&self.script).env("KILN_AGENT_DIR", self.agent_dir());
        if let Some(path) = path {
            cmd.env("PATH", path);
        }
        cmd.output().unwrap()
    }

    /// Asserts that the verified agent was started with the right arguments and token.
    fn assert_agent_ran(&self, output: &Output) {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{output:?}");
        assert!(stderr.contains("kiln-bootstrap: attempt 1: download failed"), "{stderr}");
        assert!(stderr.contains("kiln-bootstrap: sha256 verified"), "{stderr}");
        assert_eq!(self.hits.load(Ordering::SeqCst), 2, "{stderr}");
        let dir = self.agent_dir();
        let expected = format!(
            "<--coordinator>\n<https://127.0.0.1:7701>\n<--ca>\n<{dir}/ca.pem>\n<--target>\n<{TARGET}>\n<--dir>\n<{dir}>\ntoken=<{TOKEN}>\n",
            dir = dir.display()
        );
        assert_eq!(std::fs::read_to_string(self.tmp.path().join("out")).unwrap(), expected);
        assert_eq!(std::fs::read_to_string(dir.join("ca.pem")).unwrap(), CA);
        assert!(!dir.join("kiln-agent.part").exists());
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.join("kiln-agent")).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o700);
    }
}

/// The absolute path of `program` on `PATH`, if any.
fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(program)).find(|p| p.is_file())
}

fn run_under(shell: &str, extra: &[&str]) {
    let Some(path) = which(shell) else {
        eprintln!("{shell} is not installed: skipped");
        return;
    };
    let bed = Bed::new(fake_agent, None, 60);
    let argv: Vec<&str> = [path.to_str().unwrap()].into_iter().chain(extra.iter().copied()).collect();
    bed.assert_agent_ran(&bed.run(&argv, None));
}

#[test]
fn downloads_verifies_and_execs_under_sh() {
    run_under("sh", &[]);
}

#[test]
fn downloads_verifies_and_execs_under_dash() {
    run_under("dash", &[]);
}

#[test]
fn downloads_verifies_and_execs_under_bash() {
    run_under("bash", &["--posix"]);
}

#[test]
fn downloads_verifies_and_execs_under_busybox_sh() {
    run_under("busybox", &["sh"]);
}

/// A `PATH` holding only the basic tools the script needs plus `extra`.
fn restricted_path(bed: &Bed, extra: &[(&str, PathBuf)]) -> PathBuf {
    let bin = bed.tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for tool in ["mkdir", "cat", "rm", "chmod", "mv", "date", "sleep", "timeout"] {
        symlink(which(tool).unwrap(), bin.join(tool)).unwrap();
    }
    for (name, real) in extra {
        symlink(real, bin.join(name)).unwrap();
    }
    bin
}

/// The real python3 executable (not a version manager's shim).
fn python3() -> Option<PathBuf> {
    let out = Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output().ok()?;
    out.status.success().then(|| PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
}

#[test]
fn downloads_with_wget_when_curl_is_missing() {
    let Some(wget) = which("wget") else {
        eprintln!("wget is not installed: skipped");
        return;
    };
    let bed = Bed::new(fake_agent, None, 60);
    let path = restricted_path(&bed, &[("wget", wget), ("sha256sum", which("sha256sum").unwrap())]);
    bed.assert_agent_ran(&bed.run(&[which("sh").unwrap().to_str().unwrap()], Some(&path)));
}

#[test]
fn downloads_and_hashes_with_python3_alone() {
    let Some(python3) = python3() else {
        eprintln!("python3 is not installed: skipped");
        return;
    };
    let bed = Bed::new(fake_agent, None, 60);
    let path = restricted_path(&bed, &[("python3", python3)]);
    bed.assert_agent_ran(&bed.run(&[which("sh").unwrap().to_str().unwrap()], Some(&path)));
}

// A busybox-only system: busybox wget (wrapped in `timeout`) and sha256sum.
#[test]
fn downloads_with_busybox_alone() {
    let Some(busybox) = which("busybox") else {
        eprintln!("busybox is not installed: skipped");
        return;
    };
    let bed = Bed::new(fake_agent, None, 60);
    let bin = bed.tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let applets = ["sh", "mkdir", "cat", "rm", "chmod", "mv", "date", "sleep", "timeout", "wget", "sha256sum"];
    for applet in applets {
        symlink(&busybox, bin.join(applet)).unwrap();
    }
    bed.assert_agent_ran(&bed.run(&[bin.join("sh").to_str().unwrap()], Some(&bin)));
}

#[test]
fn fails_at_once_without_a_download_tool() {
    let bed = Bed::new(fake_agent, None, 60);
    let path = restricted_path(&bed, &[]);
    let output = bed.run(&[which("sh").unwrap().to_str().unwrap()], Some(&path));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(stderr.contains("kiln-bootstrap: cannot download: none of curl, wget or python3 is installed"), "{stderr}");
    assert_eq!(bed.hits.load(Ordering::SeqCst), 0);
}

#[test]
fn wrong_sha256_is_never_run_and_gives_up() {
    let wrong = "0".repeat(64);
    let bed = Bed::new(fake_agent, Some(&wrong), 3);
    let started = Instant::now();
    let output = bed.run(&[which("sh").unwrap().to_str().unwrap()], None);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(20), "{stderr}");
    assert!(stderr.contains(&format!("sha256 mismatch: expected {wrong}, got ")), "{stderr}");
    assert!(stderr.contains("kiln-bootstrap: giving up after"), "{stderr}");
    assert!(!bed.tmp.path().join("out").exists(), "the unverified agent ran");
    assert!(!bed.agent_dir().join("kiln-agent").exists());
    assert!(!bed.agent_dir().join("kiln-agent.part").exists());
}
