//! `kiln serve`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use std::sync::Arc;

use kiln_protocol::api::CloudKind;

use crate::config::Config;
use crate::providers::Providers;
use crate::providers::ec2::Ec2Provider;
use crate::providers::openstack::OpenstackProvider;
use crate::providers::owner::{CoordinatorId, OwnerError};
use crate::providers::qemu::QemuProvider;
use crate::server::{Listeners, Server};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where the database, CA and logs live.
    #[arg(long, env = "KILN_DATA_DIR", default_value = ".kiln-data")]
    pub data_dir: PathBuf,
    /// The public API and web page. Off loopback it needs TLS (--tls-cert and
    /// --tls-key, or --tls-from-ca) or --insecure-http.
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// The public listener's certificate chain (PEM).
    #[arg(long, requires = "tls_key", conflicts_with = "tls_from_ca")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve the public listener with a certificate from kiln's CA
    /// (clients trust `<data-dir>/pki/ca.crt`).
    #[arg(long)]
    pub tls_from_ca: bool,
    /// Serve the public API in plain HTTP off loopback (a trusted network only).
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_from_ca"])]
    pub insecure_http: bool,
    /// Another name the public listener answers to (repeatable): requests with
    /// any other Host are refused, which defeats DNS rebinding.
    #[arg(long = "api-host", value_name = "NAME")]
    pub api_hosts: Vec<String>,
    /// The mTLS listener agents call.
    #[arg(long, default_value = "0.0.0.0:7701")]
    pub agent_listen: SocketAddr,
    /// The plain-HTTP listener that serves the agent binary.
    #[arg(long, default_value = "0.0.0.0:7702")]
    pub bootstrap_listen: SocketAddr,
    /// The host other clouds' instances use to reach this coordinator (a cloud's
    /// coordinator_host option overrides it; local VMs use --guest-address).
    #[arg(long, default_value = "10.0.2.2")]
    pub public_host: String,
    /// The address local VMs reach kiln at, in QEMU's 10.0.2.0/24 (forwarded
    /// to sockets in the data directory, so it survives a restart on other ports).
    #[arg(long, default_value_t = crate::config::GuestNet::DEFAULT_ADDRESS)]
    pub guest_address: std::net::Ipv4Addr,
    /// A directory local base images, kernels and initrds may come from
    /// (repeatable); kiln's image store and the tiny-image cache always are.
    #[arg(long = "image-dir", value_name = "DIR")]
    pub image_dirs: Vec<PathBuf>,
    /// Another DNS name or address for the agent listener's certificate (repeatable).
    #[arg(long = "server-name")]
    pub server_names: Vec<String>,
    /// The static agent binary (default: kiln-agent next to this executable).
    #[arg(long, env = "KILN_AGENT_BINARY")]
    pub agent_binary: Option<PathBuf>,
    /// Largest script a generator may hold, in bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_script_bytes: usize,
    /// Seconds from launch until the agent must have phoned home.
    #[arg(long, default_value_t = 600)]
    pub agent_timeout_secs: u64,
    /// Seconds between janitor runs (it also runs once at start); 0: only at start.
    #[arg(long, default_value_t = 600)]
    pub janitor_interval_secs: u64,
    /// The most log bytes one target may store; past it the target fails
    /// (`log_quota`) and its log up to there stays readable.
    #[arg(long, default_value_t = 1 << 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub log_quota_bytes: u64,
    /// Free space to keep on the data directory's file system for kiln's
    /// database: a log chunk that would leave less is refused and its target
    /// fails (`disk_full`).
    #[arg(long, default_value_t = crate::config::DEFAULT_DISK_RESERVE)]
    pub disk_reserve_bytes: u64,
    /// Connections each listener holds at once; one more is closed at once.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_connections: u64,
    /// Seconds a client has to send a request's headers; an idle keep-alive
    /// connection is closed after as long.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout_secs: u64,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = Config::new(args.data_dir);
    config.public_host = args.public_host;
    config.server_names = args.server_names;
    config.guest.address = args.guest_address;
    config.image_dirs = absolute(args.image_dirs);
    if let Some(bin) = args.agent_binary {
        config.agent_binary = bin;
    }
    config.api_tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => Some(crate::config::ApiTls::Files { cert, key }),
        _ if args.tls_from_ca => Some(crate::config::ApiTls::FromCa),
        _ => None,
    };
    config.insecure_http = args.insecure_http;
    config.api_hosts = args.api_hosts;
    config.limits.max_script_bytes = args.max_script_bytes;
    config.limits.log_quota_bytes = args.log_quota_bytes;
    config.limits.disk_reserve_bytes = args.disk_reserve_bytes;
    config.limits.listen.max_connections = args.max_connections as usize;
    config.limits.listen.header_timeout = Duration::from_secs(args.header_timeout_secs);
    config.timeouts.agent_contact = Duration::from_secs(args.agent_timeout_secs);
    config.janitor_interval = (args.janitor_interval_secs > 0).then(|| Duration::from_secs(args.janitor_interval_secs));
    config.check().map_err(anyhow::Error::msg)?;
    let listeners = Listeners::bind(args.listen, args.agent_listen, args.bootstrap_listen)
        .await
        .context("cannot bind the listeners; is another kiln running? pick other ports with --listen, --agent-listen, --bootstrap-listen")?;
    let providers = builtin_providers(&config).context("cannot start the coordinator")?;
    let server = Server::start(config, providers, listeners).await.context("cannot start the coordinator")?;
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("cannot watch SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot wait for Ctrl-C")?,
        _ = terminate.recv() => {}
    }
    tracing::info!("stopping; unfinished targets resume at the next start");
    server.stop().await;
    Ok(())
}

/// Paths made absolute against the current directory (QEMU runs in `/`).
pub fn absolute(paths: Vec<PathBuf>) -> Vec<PathBuf> {
    paths.into_iter().map(|p| std::path::absolute(&p).unwrap_or(p)).collect()
}

/// The providers compiled into kiln, tagging what they create with the data
/// directory's coordinator id (made at its first start).
pub fn builtin_providers(config: &Config) -> Result<Providers, OwnerError> {
    let owner = CoordinatorId::load_or_create(&config.data_dir)?;
    Ok(Providers::new()
        .with(CloudKind::Qemu, Arc::new(QemuProvider::new(config)))
        .with(CloudKind::Ec2, Arc::new(Ec2Provider::new(owner.clone())))
        .with(CloudKind::Openstack, Arc::new(OpenstackProvider::new(owner))))
}
