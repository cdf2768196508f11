//! `kiln build start` without `--server`: a coordinator in this process, on
//! a data directory, for one build, like `packer build`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use kiln_protocol::api::{Cloud, CloudKind};

use super::commands::{StartArgs, start_build};
use super::{Client, Output};
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
}

/// The cloud one-shot builds use when the generator names no other.
pub const LOCAL_CLOUD: &str = "local";

pub async fn run(args: OneShotArgs, output: Output, start: StartArgs) -> anyhow::Result<i32> {
    let mut config = Config::new(args.data_dir);
    if let Some(bin) = args.agent_binary {
        config.agent_binary = bin;
    }
    anyhow::ensure!(
        config.agent_binary.exists(),
        "the agent binary {} does not exist: build it (scripts/quickstart does) or pass --agent-binary",
        config.agent_binary.display()
    );
    // QEMU guests reach the host's loopback at 10.0.2.2, so loopback suffices.
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let listeners = Listeners::bind(loopback, loopback, loopback).await.context("cannot bind loopback ports")?;
    let providers = super::serve::builtin_providers(&config);
    let server = Server::start(config, providers, listeners).await.context("cannot open the data directory")?;
    let client = Client::new(&format!("http://{}", server.addrs().api))?;
    let result = async {
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
        start_build(&client, output, start).await
    }
    .await;
    server.stop().await;
    result
}
