//! Runs the job's script: its own process group, output straight into the
//! spool, a hard timeout, and nothing of it left running afterwards.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use kiln_protocol::agent::{Job, ScriptOutcome};
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::cli::ENROLL_TOKEN_ENV;
use crate::layout::Layout;

/// How long to wait for the killed group's members to be reaped.
const REAP_LIMIT: Duration = Duration::from_secs(10);

/// Runs `job`'s script to its end, its timeout, or `abort`. `layout` must be
/// prepared. Nothing of the script's process group survives the return.
pub async fn run(job: &Job, layout: &Layout, abort: oneshot::Receiver<()>) -> ScriptOutcome {
    match spawn(job, layout).await {
        Ok(child) => supervise(child, Duration::from_secs(job.timeout_secs), abort).await,
        Err(err) => {
            let message = format!("{err:#}");
            warn!("could not start the script: {message}");
            let note = format!("kiln-agent: could not start the script: {message}\n");
            if let Err(err) = append(layout, note.as_bytes()) {
                warn!("could not note the failure in the spool: {err}");
            }
            ScriptOutcome::SpawnFailed { message }
        }
    }
}

fn append(layout: &Layout, bytes: &[u8]) -> io::Result<()> {
    OpenOptions::new().append(true).open(&layout.spool_file)?.write_all(bytes)
}

async fn spawn(job: &Job, layout: &Layout) -> anyhow::Result<Child> {
    write_script(layout, &job.script).context("writing the script")?;
    let mut command = if job.script.starts_with("#!") {
        Command::new(&layout.script)
    } else {
        let mut sh = Command::new("/bin/sh");
        sh.arg(&layout.script);
        sh
    };
    let spool = OpenOptions::new().append(true).open(&layout.spool_file).context("opening the spool")?;
    let stderr = spool.try_clone().context("opening the spool")?;
    command
        .current_dir(&layout.work_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(spool))
        .stderr(Stdio::from(stderr))
        .envs(crate::egress::env(job))
        .envs(&job.env)
        .env("KILN_TARGET", job.target.to_string())
        .env_remove(ENROLL_TOKEN_ENV)
        .process_group(0);

    // Children left by the script's processes become ours, so the whole
    // group can be reaped after it is killed.
    if let Err(err) = nix::sys::prctl::set_child_subreaper(true) {
        warn!("cannot become a child subreaper: {err}");
    }
    // A thread forking elsewhere in this process may briefly hold the
    // script's write handle (ETXTBSY): try again a few times.
    let mut tries = 0;
    loop {
        match command.spawn() {
            Err(err) if err.kind() == io::ErrorKind::ExecutableFileBusy && tries < 10 => tries += 1,
            spawned => {
                return spawned.with_context(|| format!("running {}", layout.script.display()));
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn write_script(layout: &Layout, script: &str) -> io::Result<()> {
    let mut file: File = OpenOptions::new().write(true).create(true).truncate(true).mode(0o700).open(&layout.script)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o700))?;
    file.write_all(script.as_bytes())?;
    file.sync_all()
}

enum End {
    Exited(io::Result<ExitStatus>),
    TimedOut,
    Aborted,
}

async fn supervise(mut child: Child, limit: Duration, mut abort: oneshot::Receiver<()>) -> ScriptOutcome {
    let Some(pid) = child.id() else {
        return ScriptOutcome::SpawnFailed { message: "the script vanished at once".to_owned() };
    };
    let group = Pid::from_raw(pid as i32);
    info!(pid, timeout_secs = limit.as_secs(), "script started");
    let end = tokio::select! {
        status = child.wait() => End::Exited(status),
        () = tokio::time::sleep(limit) => End::TimedOut,
        Ok(()) = &mut abort => End::Aborted,
    };
    // Whatever happened, no process of the script may write on.
    kill_group(group);
    let (outcome, reaped) = match end {
        End::Exited(Ok(status)) => (outcome_of(status), true),
        End::Exited(Err(err)) => {
            (ScriptOutcome::SpawnFailed { message: format!("waiting for the script: {err}") }, true)
        }
        End::TimedOut => (ScriptOutcome::TimedOut { after_secs: limit.as_secs() }, false),
        End::Aborted => (ScriptOutcome::Signaled { signal: Signal::SIGKILL as i32 }, false),
    };
    if !reaped {
        let waited = child.wait().await;
        if let Err(err) = waited {
            warn!("waiting for the killed script: {err}");
        }
    }
    reap_group(group).await;
    outcome
}

fn outcome_of(status: ExitStatus) -> ScriptOutcome {
    match (status.code(), status.signal()) {
        (Some(code), _) => ScriptOutcome::Exited { code },
        (None, Some(signal)) => ScriptOutcome::Signaled { signal },
        (None, None) => ScriptOutcome::Exited { code: -1 },
    }
}

fn kill_group(group: Pid) {
    match killpg(group, Signal::SIGKILL) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(err) => warn!("could not kill the script's process group: {err}"),
    }
}

/// Waits for every member of the killed group that has become our child.
async fn reap_group(group: Pid) {
    let reaped = tokio::task::spawn_blocking(move || {
        let members = Pid::from_raw(-group.as_raw());
        loop {
            match waitpid(members, None) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(Errno::ECHILD) => return,
                Err(err) => {
                    warn!("waiting for the script's processes: {err}");
                    return;
                }
            }
        }
    });
    if tokio::time::timeout(REAP_LIMIT, reaped).await.is_err() {
        warn!("some of the script's processes are still there after being killed");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kiln_protocol::TargetId;

    use super::*;

    struct Bed {
        _tmp: tempfile::TempDir,
        layout: Layout,
    }

    fn bed() -> Bed {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path());
        layout.prepare().unwrap();
        Bed { _tmp: tmp, layout }
    }

    fn job(script: &str, timeout_secs: u64) -> Job {
        Job {
            target: TargetId::generate(),
            script: script.to_owned(),
            env: BTreeMap::from([("GREETING".to_owned(), "hello there".to_owned())]),
            timeout_secs,
            egress_proxy: None,
            no_proxy: Vec::new(),
            generalize: true,
        }
    }

    async fn run_job(bed: &Bed, job: &Job) -> (ScriptOutcome, String) {
        let (_abort, abort_rx) = oneshot::channel();
        let outcome = run(job, &bed.layout, abort_rx).await;
        (outcome, std::fs::read_to_string(&bed.layout.spool_file).unwrap())
    }

    // With `#!` the script is executed itself: `#!/bin/cat` prints it.
    #[tokio::test]
    async fn honours_the_shebang() {
        let bed = bed();
        let script = "#!/bin/cat\necho not run by sh\n";
        assert_eq!(run_job(&bed, &job(script, 10)).await, (ScriptOutcome::Exited { code: 0 }, script.to_owned()));
    }

    #[tokio::test]
    async fn runs_a_script_without_shebang_with_sh() {
        let bed = bed();
        let (outcome, log) = run_job(&bed, &job("echo hi\necho \"$0\"", 10)).await;
        assert_eq!(outcome, ScriptOutcome::Exited { code: 0 });
        assert_eq!(log, format!("hi\n{}\n", bed.layout.script.display()));
        assert_eq!(run_job(&bed, &job("#!/bin/sh\necho hi", 10)).await.0, ScriptOutcome::Exited { code: 0 });
    }

    #[tokio::test]
    async fn merges_stdout_and_stderr_in_order() {
        let bed = bed();
        let script = "echo out1\necho err1 >&2\necho out2\necho err2 >&2\nexit 3\n";
        let (outcome, log) = run_job(&bed, &job(script, 10)).await;
        assert_eq!(outcome, ScriptOutcome::Exited { code: 3 });
        assert_eq!(log, "out1\nerr1\nout2\nerr2\n");
    }

    #[tokio::test]
    async fn gives_env_and_work_dir() {
        let bed = bed();
        let script = "echo \"$GREETING|$KILN_TARGET|$(pwd)\"";
        let job = job(script, 10);
        let (_, log) = run_job(&bed, &job).await;
        let work = bed.layout.work_dir.canonicalize().unwrap();
        assert_eq!(log, format!("hello there|{}|{}\n", job.target, work.display()));
    }

    #[tokio::test]
    async fn reports_a_signal() {
        let bed = bed();
        let (outcome, _) = run_job(&bed, &job("kill -TERM $$", 10)).await;
        assert_eq!(outcome, ScriptOutcome::Signaled { signal: 15 });
    }

    #[tokio::test]
    async fn notes_a_failed_start_in_the_spool() {
        let bed = bed();
        let (outcome, log) = run_job(&bed, &job("#!/nonexistent/interpreter\n", 10)).await;
        let ScriptOutcome::SpawnFailed { message } = outcome else { panic!("{outcome:?}") };
        assert!(message.contains("No such file or directory"), "{message}");
        assert_eq!(log, format!("kiln-agent: could not start the script: {message}\n"));
    }

    fn is_gone(pid: &str) -> bool {
        !std::path::Path::new("/proc").join(pid).exists()
    }

    // The timeout kills the whole group, grandchildren included.
    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let bed = bed();
        let (outcome, log) = run_job(&bed, &job("sleep 1000 &\necho $!\nsleep 1000\n", 2)).await;
        assert_eq!(outcome, ScriptOutcome::TimedOut { after_secs: 2 });
        let grandchild = log.trim();
        assert!(!grandchild.is_empty() && is_gone(grandchild), "{log:?}");
    }

    // After a normal exit, children left behind are killed too.
    #[tokio::test]
    async fn exit_kills_children_left_behind() {
        let bed = bed();
        let (outcome, log) = run_job(&bed, &job("sleep 1000 &\necho $!\n", 10)).await;
        assert_eq!(outcome, ScriptOutcome::Exited { code: 0 });
        assert!(is_gone(log.trim()), "{log:?}");
    }

    #[tokio::test]
    async fn abort_kills_the_script() {
        let bed = bed();
        let (abort, abort_rx) = oneshot::channel();
        abort.send(()).unwrap();
        let outcome = run(&job("sleep 1000", 10), &bed.layout, abort_rx).await;
        assert_eq!(outcome, ScriptOutcome::Signaled { signal: 9 });
    }
}
