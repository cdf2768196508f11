//! The application layer: the API handlers and the one-shot CLI call this; it
//! owns the store, the log files, the PKI, the providers and the workflows.
//!
//! - [`access`]: API tokens, roles and the page's sessions.
//! - [`catalog`]: clouds and generators with their revisions.
//! - [`builds`]: starting, listing, showing and cancelling builds; logs.
//! - [`agents`]: what an enrolled agent may do, authorized by its certificate.
//! - [`images`]: what builds made.
//! - [`janitor`]: removes what a crash left on a cloud (resources no live target owns).
//! - `workflow_host`: the application as the workflows' [`Host`](crate::workflow::Host).

pub mod access;
pub mod agents;
pub mod builds;
pub mod catalog;
mod error;
pub mod images;
pub mod janitor;
mod workflow_host;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kiln_protocol::api::Secret;
use kiln_protocol::{BuildId, CloudName};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use agents::PeerIdentity;
pub use error::AppError;

use crate::config::Config;
use crate::pki::Pki;
use crate::providers::{Providers, Served};
use crate::secrets::SecretKey;
use crate::store::Store;
use crate::store::logs::LogFiles;
use crate::workflow::{self, Runner};

/// The agent binary as served to instances, with its digest for user-data.
#[derive(Clone)]
pub struct AgentBinary {
    pub bytes: bytes::Bytes,
    pub sha256: String,
}

/// A handle on the running application; cheap to clone.
#[derive(Clone)]
pub struct App(Arc<Inner>);

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

/// The application's state; its fields are private to this module and its
/// children (the API and the server go through `App`'s methods).
struct Inner {
    store: Store,
    logs: LogFiles,
    pki: Pki,
    providers: Providers,
    config: Config,
    served: Served,
    agent_binary: Option<AgentBinary>,
    /// Bumped on every change a waiter may care about (target state, logs).
    changes: watch::Sender<()>,
    /// Cancelled at shutdown: workflows and long polls stop where they are.
    shutdown: CancellationToken,
    /// The targets' workflows (their tasks and interrupts).
    workflows: Runner,
    /// Passwords of ask-every-time clouds, per running build; memory only,
    /// dropped when the build ends.
    build_secrets: Mutex<HashMap<BuildId, HashMap<CloudName, Secret>>>,
    /// In-process tokens and the page's sessions.
    access: access::Access,
    /// Held by the janitor's run, so two runs never race on a cloud.
    janitor: tokio::sync::Mutex<()>,
}

impl App {
    /// Opens the data directory (store, CA, logs) and resumes every unfinished
    /// target. `served` says where instances reach the listeners.
    pub fn open(config: Config, providers: Providers, served: Served) -> Result<Self, AppError> {
        let dir = &config.data_dir;
        // Before anything is created: nothing kiln makes is readable by others.
        crate::secrets::modes::restrict_umask();
        crate::secrets::modes::create_private_dir(dir)?;
        crate::secrets::modes::check(dir)?;
        let key = SecretKey::load_or_create(dir)?;
        let store = Store::open(&dir.join("db"), key)?;
        let logs = LogFiles::open(&dir.join("logs"), config.limits.disk_reserve_bytes)?;
        let pki = Pki::load_or_create(&dir.join("pki"), &config.certificate_names())?;
        let agent_binary = load_agent_binary(&config.agent_binary);
        let shutdown = CancellationToken::new();
        let app = App(Arc::new(Inner {
            store,
            logs,
            pki,
            providers,
            config,
            served,
            agent_binary,
            changes: watch::Sender::new(()),
            workflows: Runner::new(shutdown.clone()),
            shutdown,
            build_secrets: Mutex::default(),
            access: access::Access::default(),
            janitor: tokio::sync::Mutex::default(),
        }));
        app.ensure_admin_token()?;
        workflow::resume_all(&app.host()).map_err(AppError::Store)?;
        Ok(app)
    }

    /// The application as the workflows see it.
    fn host(&self) -> Arc<dyn workflow::Host> {
        Arc::new(self.clone())
    }

    /// How many handles on the application are alive (shutdown waits for 1).
    pub(crate) fn handles(&self) -> usize {
        Arc::strong_count(&self.0)
    }

    pub fn config(&self) -> &Config {
        &self.0.config
    }

    pub fn pki(&self) -> &Pki {
        &self.0.pki
    }

    pub fn agent_binary(&self) -> Option<&AgentBinary> {
        self.0.agent_binary.as_ref()
    }

    /// A receiver that wakes on every change of a target or a log.
    pub fn subscribe_changes(&self) -> watch::Receiver<()> {
        self.0.changes.subscribe()
    }

    /// Tells every waiter that something changed.
    pub(crate) fn notify(&self) {
        self.0.changes.send_replace(());
    }

    /// Waits until no target's workflow is running (every unwind done), at
    /// most `limit`; true when none is left.
    pub async fn wait_for_workflows(&self, limit: std::time::Duration) -> bool {
        let mut changes = self.subscribe_changes();
        let settled = async {
            while !self.0.workflows.is_idle() {
                // A workflow can end without a change notice: look again now and then.
                let _ = tokio::time::timeout(std::time::Duration::from_millis(200), changes.changed()).await;
            }
        };
        tokio::time::timeout(limit, settled).await.is_ok()
    }

    /// Stops every workflow where it is (each resumes at the next start) and
    /// waits for them, so the store can be closed.
    pub async fn shutdown(&self) {
        self.0.workflows.shutdown().await;
        tracing::debug!("workflows stopped; flushing the store");
        if let Err(e) = self.0.store.flush().await {
            tracing::error!(error = ?crate::error_chain(&e), "cannot flush the store at shutdown");
        }
    }
}

fn load_agent_binary(path: &Path) -> Option<AgentBinary> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let sha256 = hex::encode(Sha256::digest(&bytes));
            tracing::info!(path = %path.display(), %sha256, "serving agent binary");
            Some(AgentBinary { bytes: bytes.into(), sha256 })
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no agent binary: builds will be refused until one is given with --agent-binary");
            None
        }
    }
}

/// Hex SHA-256 of a script, as recorded in every revision.
pub fn script_sha256(script: &str) -> String {
    hex::encode(Sha256::digest(script.as_bytes()))
}
