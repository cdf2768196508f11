//! `kiln serve`: the application plus its listeners: three TCP listeners
//! (the public API, agents, bootstrap) and, in the data directory, the Unix
//! sockets that local VMs are relayed to (agents, bootstrap, egress).

use std::net::SocketAddr;
use std::path::Path;

use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api;
use crate::app::{App, AppError};
use crate::config::{Config, GuestSocket};
use crate::providers::{Providers, Served};

/// Already-bound listeners, so callers (and tests) can bind port 0.
#[derive(Debug)]
pub struct Listeners {
    /// The public API and web page (plain HTTP; keep it on a trusted network).
    pub api: TcpListener,
    /// Agents, over mutual TLS.
    pub agent: TcpListener,
    /// The agent binary, over plain HTTP.
    pub bootstrap: TcpListener,
}

impl Listeners {
    pub async fn bind(api: SocketAddr, agent: SocketAddr, bootstrap: SocketAddr) -> std::io::Result<Self> {
        Ok(Self {
            api: TcpListener::bind(api).await?,
            agent: TcpListener::bind(agent).await?,
            bootstrap: TcpListener::bind(bootstrap).await?,
        })
    }
}

/// Where a running server listens.
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub api: SocketAddr,
    pub agent: SocketAddr,
    pub bootstrap: SocketAddr,
}

/// A running coordinator.
#[derive(Debug)]
pub struct Server {
    app: App,
    addrs: Addrs,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Server {
    /// Opens the data directory, resumes unfinished targets and starts serving.
    pub async fn start(config: Config, providers: Providers, listeners: Listeners) -> Result<Self, AppError> {
        config.check().map_err(AppError::BadRequest)?;
        let addrs = Addrs {
            api: listeners.api.local_addr()?,
            agent: listeners.agent.local_addr()?,
            bootstrap: listeners.bootstrap.local_addr()?,
        };
        let served = Served {
            public_host: config.public_host.clone(),
            agent_port: addrs.agent.port(),
            bootstrap_port: addrs.bootstrap.port(),
        };
        let app = App::open(config, providers, served)?;
        // Only now: the open store holds the data directory's lock, so no other
        // kiln owns the sockets this replaces.
        let guest = GuestListeners::bind(app.config())?;
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        // The public listener serves the API and, at `/`, the web page that uses it.
        let public = api::public(app.clone());
        tasks.spawn(plain(listeners.api, public, shutdown.clone()));
        tasks.spawn(plain(listeners.bootstrap, api::bootstrap::router(app.clone()), shutdown.clone()));
        tasks.spawn(plain(guest.bootstrap, api::bootstrap::router(app.clone()), shutdown.clone()));
        let agents = || api::agent::router(app.clone());
        tasks.spawn(api::tls::serve(listeners.agent, app.pki().agent_tls(), agents(), shutdown.clone()));
        tasks.spawn(api::tls::serve(guest.agent, app.pki().agent_tls(), agents(), shutdown.clone()));
        let policies = app.clone();
        tasks.spawn(crate::egress::serve(
            guest.egress,
            move |target: &str| policies.egress_policy(target).map_err(|e| e.to_string()),
            shutdown.clone(),
        ));
        tracing::info!(api = %addrs.api, agent = %addrs.agent, bootstrap = %addrs.bootstrap, "kiln coordinator listening");
        Ok(Self { app, addrs, shutdown, tasks })
    }

    pub fn app(&self) -> &App {
        &self.app
    }

    pub fn addrs(&self) -> Addrs {
        self.addrs
    }

    /// Stops the listeners and the workflows (which resume at the next start)
    /// and closes the store.
    pub async fn stop(mut self) {
        self.app.shutdown().await;
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
        // Connection tasks may hold the app a moment longer; the store (and its
        // file lock) closes when the last one lets go.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        tracing::debug!(handles = std::sync::Arc::strong_count(&self.app.0), "waiting for the app's last handles");
        while std::sync::Arc::strong_count(&self.app.0) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

/// Serves `router` over plain HTTP until `stop`.
async fn plain<L>(listener: L, router: axum::Router, stop: CancellationToken)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await {
        tracing::error!(error = %e, "listener failed");
    }
}

/// The Unix sockets in `<data>/run/` that guest connections are relayed to.
struct GuestListeners {
    agent: UnixListener,
    bootstrap: UnixListener,
    egress: UnixListener,
}

impl GuestListeners {
    fn bind(config: &Config) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = config.run_dir();
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        let bind = |socket: GuestSocket| -> std::io::Result<UnixListener> {
            let path = config.guest_socket(socket);
            remove_stale(&path)?;
            UnixListener::bind(&path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", path.display())))
        };
        Ok(Self {
            agent: bind(GuestSocket::Agent)?,
            bootstrap: bind(GuestSocket::Bootstrap)?,
            egress: bind(GuestSocket::Egress)?,
        })
    }
}

/// Removes the socket a previous coordinator on this data directory left.
fn remove_stale(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
