//! moto's EC2 API as a child process on a free loopback port.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// How long moto may take to answer after it is spawned (it imports a lot of Python).
const START_LIMIT: Duration = Duration::from_secs(30);

/// A running `moto_server`; dropped, it is killed with its process group.
pub struct Moto {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    child: Child,
    http: reqwest::Client,
    /// moto's request log (its stderr).
    log: tempfile::NamedTempFile,
}

impl Moto {
    /// Spawns moto on a free port (retrying on a port collision) and waits until it answers.
    pub async fn start() -> anyhow::Result<Self> {
        crate::init_tracing();
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build()?;
        let mut last = None;
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let log = tempfile::NamedTempFile::new()?;
            let mut child = Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .env("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log.reopen()?)
                .kill_on_drop(true)
                .process_group(0)
                .spawn()
                .context("spawn moto_server (pip install 'moto[server]')")?;
            let url = format!("http://127.0.0.1:{port}");
            match wait_ready(&http, &url, &mut child, &log).await {
                Ok(()) => {
                    tracing::info!(%url, "moto is up");
                    return Ok(Self { url, child, http, log });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap()).context("moto_server did not start")
    }

    /// Forgets every resource (POST /moto-api/reset).
    pub async fn reset(&self) -> anyhow::Result<()> {
        let resp = self.http.post(format!("{}/moto-api/reset", self.url)).send().await?;
        if !resp.status().is_success() {
            bail!("moto reset: HTTP {}", resp.status());
        }
        Ok(())
    }

    /// moto's request log so far (one line per API call).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// An EC2 client for `region` talking to this moto.
    pub fn client(&self, region: &str) -> aws_sdk_ec2::Client {
        super::client(&self.url, region)
    }
}

/// Polls until moto answers; fails early if it exits (a port taken in the meantime).
async fn wait_ready(
    http: &reqwest::Client,
    url: &str,
    child: &mut Child,
    log: &tempfile::NamedTempFile,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + START_LIMIT;
    while tokio::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            let err = std::fs::read_to_string(log.path()).unwrap_or_default();
            bail!("moto_server exited with {status}: {}", err.trim());
        }
        if http.get(format!("{url}/moto-api/")).send().await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("moto_server did not answer on {url} within {START_LIMIT:?}")
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let _ = self.child.start_kill();
    }
}
