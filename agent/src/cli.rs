//! The command line and the environment the agent reads.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use kiln_protocol::TargetId;
use reqwest::Url;

/// Holds the one-time enrollment token; never accepted on the command line.
pub const ENROLL_TOKEN_ENV: &str = "KILN_ENROLL_TOKEN";

/// Set to `1` on machines that must never be powered off (test beds that run
/// the agent on a developer's machine): a seal instruction is then refused.
pub const NEVER_POWEROFF_ENV: &str = "KILN_AGENT_NEVER_POWEROFF";

/// kiln's in-VM agent: enroll, run the job, stream its output, seal.
///
/// The one-time enrollment token is read from KILN_ENROLL_TOKEN.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Args {
    /// The https base URL of the coordinator's agent listener.
    #[arg(long, value_name = "URL", value_parser = parse_https_url)]
    pub coordinator: Url,
    /// The coordinator's CA certificate (PEM): the only root trusted.
    #[arg(long, value_name = "PEM_FILE")]
    pub ca: PathBuf,
    /// This VM's target id.
    #[arg(long, value_name = "UUID")]
    pub target: TargetId,
    /// The agent's own directory: the job, its work directory and the spooled output.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// The longest pause between retries of a failed request.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub max_backoff_ms: u64,
    /// How long any one phase keeps retrying an unreachable coordinator before the agent gives up.
    #[arg(long, value_name = "SECS", default_value_t = 900)]
    pub give_up_secs: u64,
    /// How long the coordinator may hold each instruction long poll.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub instruction_wait_secs: u64,
    /// Send this machine's cloud-signed identity at enrollment (the user-data says so where the cloud checks it).
    #[arg(long, value_enum, value_name = "SOURCE")]
    pub identity: Option<crate::identity::Source>,
    /// The metadata service the identity is read from.
    #[arg(long, value_name = "URL", default_value = "http://169.254.169.254")]
    pub imds: Url,
}

fn parse_https_url(s: &str) -> anyhow::Result<Url> {
    let url = Url::parse(s)?;
    if url.scheme() != "https" {
        bail!("the coordinator URL must use https, not {}", url.scheme());
    }
    if url.host().is_none() {
        bail!("the coordinator URL has no host");
    }
    Ok(url)
}

/// Reads the enrollment token. The process environment cannot be changed
/// safely, so every child the agent starts gets it removed instead.
pub fn take_enroll_token() -> anyhow::Result<String> {
    let token = std::env::var(ENROLL_TOKEN_ENV)
        .with_context(|| format!("{ENROLL_TOKEN_ENV} must hold the one-time enrollment token"))?;
    if token.is_empty() {
        bail!("{ENROLL_TOKEN_ENV} is empty");
    }
    Ok(token)
}
