//! The coordinator's settings, with the defaults a user gets from `kiln serve`.

use std::path::PathBuf;
use std::time::Duration;

/// Everything the coordinator needs to know besides its listeners.
#[derive(Clone, Debug)]
pub struct Config {
    /// Holds the sled database, the CA, and the log files.
    pub data_dir: PathBuf,
    /// The host instances use to reach the coordinator unless a cloud says
    /// otherwise (QEMU's user network sees the host as 10.0.2.2).
    pub public_host: String,
    /// Extra DNS names and addresses for the agent listener's certificate.
    pub server_names: Vec<String>,
    /// The static agent binary served to instances.
    pub agent_binary: PathBuf,
    pub limits: Limits,
    pub timeouts: Timeouts,
}

/// Sizes the API refuses to exceed.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_script_bytes: usize,
    /// Largest script timeout a generator may ask for.
    pub max_script_timeout: Duration,
}

/// How long each waiting step waits.
#[derive(Clone, Debug)]
pub struct Timeouts {
    /// From launch until the agent must have enrolled.
    pub agent_contact: Duration,
    /// A script's timeout when its generator names none.
    pub default_script: Duration,
    /// From the seal instruction until the instance must have stopped.
    pub seal: Duration,
    /// How long an enrollment token stays valid after launch.
    pub token_ttl: Duration,
    /// How often waiting steps ask the cloud about the instance.
    pub poll_interval: Duration,
    /// The longest an agent's instruction long poll is held open.
    pub instruction_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_script_bytes: 1024 * 1024, max_script_timeout: Duration::from_secs(24 * 3600) }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            agent_contact: Duration::from_secs(600),
            default_script: Duration::from_secs(3600),
            seal: Duration::from_secs(300),
            token_ttl: Duration::from_secs(15 * 60),
            poll_interval: Duration::from_secs(1),
            instruction_wait: Duration::from_secs(30),
        }
    }
}

impl Config {
    /// Defaults for a data directory.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            public_host: "10.0.2.2".into(),
            server_names: Vec::new(),
            agent_binary: default_agent_binary(),
            limits: Limits::default(),
            timeouts: Timeouts::default(),
        }
    }

    /// The names in the agent listener's certificate: the public host, the
    /// loopback names, and any extra ones.
    pub fn certificate_names(&self) -> Vec<String> {
        let mut names = vec![self.public_host.clone(), "localhost".into(), "127.0.0.1".into(), "::1".into()];
        names.extend(self.server_names.iter().cloned());
        names.sort();
        names.dedup();
        names
    }
}

/// `kiln-agent` next to the running `kiln` executable.
fn default_agent_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("kiln-agent")))
        .unwrap_or_else(|| PathBuf::from("kiln-agent"))
}
