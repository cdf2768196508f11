//! `kiln build start` without `--server`: a coordinator in this process, on
//! a data directory, for one build, like `packer build`.
//!
//! It owns what it starts. SIGINT or SIGTERM cancels its build and every
//! other unfinished target, waits until each has unwound (VM, overlay and
//! half-made image gone) and exits non-zero. Targets an earlier run left
//! unfinished (after a `kill -9`) are resumed at start: their VMs reach the
//! coordinator again through the data directory's sockets. It says so, and it
//! does not exit while any of them still runs.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use kiln_protocol::api::{Build, Cloud, CloudKind};
use tokio::signal::unix::{SignalKind, signal};

use super::commands::{StartArgs, start_build};
use super::{Client, Output};
use crate::App;
use crate::config::Config;
use crate::server::{Listeners, Server};

#[derive(Debug, Args)]
pub struct OneShotArgs {
    /// One-shot only: where the database, CA, logs and images live.
    #[arg(long, env = "KILN_DATA_DIR", default_value = ".kiln-data")]
    pub data_dir: PathBuf,
    /// One-shot only: the static agent binary (default: kiln-agent next to this executable).
    #[arg(long, env = "KILN_AGENT_BINARY")]
    pub agent_binary: Option<PathBuf>,
    /// One-shot only: the address local VMs reach kiln at, in QEMU's 10.0.2.0/24.
    #[arg(long, default_value_t = crate::config::GuestNet::DEFAULT_ADDRESS)]
    pub guest_address: Ipv4Addr,
    /// One-shot only: a directory local base images, kernels and initrds may
    /// come from (repeatable); kiln's image store and the tiny-image cache always are.
    #[arg(long = "image-dir", value_name = "DIR")]
    pub image_dirs: Vec<PathBuf>,
}

/// The cloud one-shot builds use when the generator names no other.
pub const LOCAL_CLOUD: &str = "local";
/// The longest a one-shot waits for its targets to unwind after a signal.
const UNWIND_LIMIT: Duration = Duration::from_secs(120);

pub async fn run(args: OneShotArgs, output: Output, mut start: StartArgs) -> anyhow::Result<i32> {
    let mut config = Config::new(args.data_dir);
    if let Some(bin) = args.agent_binary {
        config.agent_binary = std::path::absolute(&bin).unwrap_or(bin);
    }
    config.guest.address = args.guest_address;
    config.image_dirs = super::serve::absolute(args.image_dirs);
    anyhow::ensure!(
        config.agent_binary.exists(),
        "the agent binary {} does not exist: build it (scripts/quickstart does) or pass --agent-binary",
        config.agent_binary.display()
    );
    absolute_paths(&mut start);
    // Local VMs reach this process through the data directory's sockets; the
    // TCP listeners only serve this process's own client.
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let listeners = Listeners::bind(loopback, loopback, loopback).await.context("cannot bind loopback ports")?;
    let providers = super::serve::builtin_providers(&config).context("cannot start the coordinator")?;
    let server = Server::start(config, providers, listeners).await.context("cannot start the coordinator")?;
    let app = server.app().clone();
    // This process's own client: a token that lives as long as it does.
    let token = app.ephemeral_token("one-shot", kiln_protocol::access::Role::Admin);
    let client = Client::new(&format!("http://{}", server.addrs().api))?.with_token(token);
    let earlier = app.unfinished_builds()?;
    for id in &earlier {
        eprintln!("resuming {}", describe(&app.build(*id).await?));
    }

    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let work = async {
        let code = build(&client, output, start).await?;
        let mut worst = code;
        for id in &earlier {
            let done = super::wait::until_done(&client, *id).await?;
            eprintln!("earlier build ended: {}", describe(&done));
            if done.status != kiln_protocol::api::Status::Successful {
                worst = worst.max(1);
            }
        }
        anyhow::Ok(worst)
    };
    let result = tokio::select! {
        r = work => r,
        _ = interrupt.recv() => Ok(unwind(&app, "SIGINT", 130).await),
        _ = terminate.recv() => Ok(unwind(&app, "SIGTERM", 143).await),
    };
    // Every target has ended; let the last unwinds and clean-ups finish too.
    if !app.wait_for_workflows(UNWIND_LIMIT).await {
        eprintln!(
            "some targets are still unwinding; the next `kiln build start` or `kiln serve` on this data directory finishes them"
        );
    }
    // The server closes the store once it holds the last handle on the app.
    drop(app);
    server.stop().await;
    result
}

/// Creates the `local` cloud when missing, then starts and watches the build.
async fn build(client: &Client, output: Output, start: StartArgs) -> anyhow::Result<i32> {
    let local: anyhow::Result<Cloud> = client.get(&format!("/v1/clouds/{LOCAL_CLOUD}")).await;
    if local.is_err() {
        let cloud = Cloud {
            name: LOCAL_CLOUD.parse()?,
            kind: CloudKind::Qemu,
            region: None,
            endpoint: None,
            options: Default::default(),
            credentials: None,
        };
        let _: Cloud = client.post("/v1/clouds", &cloud).await?;
    }
    start_build(client, output, start).await
}

/// Cancels every unfinished build after `signal` and waits until each has
/// unwound; returns the exit code.
async fn unwind(app: &App, signal: &str, code: i32) -> i32 {
    let builds = app.unfinished_builds().unwrap_or_default();
    eprintln!("{signal}: cancelling {} build(s); their targets unwind", builds.len());
    for id in &builds {
        if let Err(e) = app.cancel_build(*id).await {
            eprintln!("cannot cancel build {id}: {e}");
        }
    }
    let unwound = app.wait_for_workflows(UNWIND_LIMIT).await;
    for id in &builds {
        if let Ok(b) = app.build(*id).await {
            eprintln!("{}", describe(&b));
        }
    }
    if !unwound {
        eprintln!("some targets did not finish unwinding within {}s", UNWIND_LIMIT.as_secs());
    }
    code
}

/// One line per build: id, generator, and each target's cloud, status and step.
fn describe(b: &Build) -> String {
    let targets: Vec<String> =
        b.targets.iter().map(|t| format!("{} {} ({})", t.cloud, t.status.as_str(), t.step.as_str())).collect();
    format!("build {} of {} revision {}: {}", b.id, b.generator, b.revision, targets.join(", "))
}

/// Paths on the command line are relative to where kiln was started; the
/// coordinator and QEMU (which runs in `/`) need them absolute.
fn absolute_paths(start: &mut StartArgs) {
    if let Some(file) = &start.file {
        start.file = std::path::absolute(file).ok().or(start.file.take());
    }
    for o in &mut start.base_images {
        if let Some((cloud, image)) = o.split_once('=') {
            let path = Path::new(image);
            if let Ok(abs) = std::path::absolute(path)
                && path.is_relative()
                && path.exists()
            {
                *o = format!("{cloud}={}", abs.display());
            }
        }
    }
}
