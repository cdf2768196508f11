//! `kiln serve`: the application plus its three listeners.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api;
use crate::app::{App, AppError};
use crate::config::Config;
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
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let plain = |listener: TcpListener, router: axum::Router, stop: CancellationToken| async move {
            if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await {
                tracing::error!(error = %e, "listener failed");
            }
        };
        // The public listener serves the API and, at `/`, the web page that uses it.
        let public = api::v1::router(app.clone()).merge(api::web::router());
        tasks.spawn(plain(listeners.api, public, shutdown.clone()));
        tasks.spawn(plain(listeners.bootstrap, api::bootstrap::router(app.clone()), shutdown.clone()));
        tasks.spawn(api::tls::serve(
            listeners.agent,
            app.pki().agent_tls(),
            api::agent::router(app.clone()),
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
        while std::sync::Arc::strong_count(&self.app.0) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
