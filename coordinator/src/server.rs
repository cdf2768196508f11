//! `kiln serve`: the application plus its listeners: three TCP listeners
//! (the public API, agents, bootstrap) and, in the data directory, the Unix
//! sockets that local VMs are relayed to (agents, bootstrap, egress).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api;
use crate::app::{App, AppError};
use crate::config::{ApiTls, Config, GuestSocket};
use crate::providers::{Providers, Served};

/// Already-bound listeners, so callers (and tests) can bind port 0.
#[derive(Debug)]
pub struct Listeners {
    /// The public API and web page (TLS off loopback, see [`Config::api_tls`]).
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
        let api_tls = api_tls_needed(&config, addrs.api)?;
        let hosts = host_allowlist(&config, addrs.api);
        let app = App::open(config, providers, served)?;
        // Only now: the open store holds the data directory's lock, so no other
        // kiln owns the sockets this replaces.
        let guest = GuestListeners::bind(app.config())?;
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        // The public listener serves the API and, at `/`, the web page that uses it.
        let public = api::public(app.clone()).layer(axum::middleware::from_fn_with_state(hosts, api::auth::host_guard));
        let limits = app.config().limits.listen;
        let api_tls = match api_tls {
            None => None,
            Some(source) => Some(api_tls_config(&app, &source, addrs.api)?),
        };
        tasks.spawn(api::listen::serve(listeners.api, api_tls, public, limits, shutdown.clone()));
        let bootstrap = || api::bootstrap::router(app.clone());
        tasks.spawn(api::listen::serve(listeners.bootstrap, None, bootstrap(), limits, shutdown.clone()));
        tasks.spawn(api::listen::serve(guest.bootstrap, None, bootstrap(), limits, shutdown.clone()));
        let agents = || api::agent::router(app.clone());
        let agent_tls = || Some(app.pki().agent_tls());
        tasks.spawn(api::listen::serve(listeners.agent, agent_tls(), agents(), limits, shutdown.clone()));
        tasks.spawn(api::listen::serve(guest.agent, agent_tls(), agents(), limits, shutdown.clone()));
        let policies = app.clone();
        tasks.spawn(crate::egress::serve(
            guest.egress,
            move |target: &str| policies.egress_policy(target).map_err(|e| e.to_string()),
            shutdown.clone(),
        ));
        tasks.spawn(crate::app::janitor::run_periodically(
            app.clone(),
            app.config().janitor_interval,
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
        tracing::debug!(handles = self.app.handles(), "waiting for the app's last handles");
        while self.app.handles() > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

/// The public listener's TLS source; refuses plain HTTP off loopback unless
/// the user said `--insecure-http`.
fn api_tls_needed(config: &Config, api: SocketAddr) -> Result<Option<ApiTls>, AppError> {
    match &config.api_tls {
        Some(tls) => Ok(Some(tls.clone())),
        None if api.ip().is_loopback() || config.insecure_http => Ok(None),
        None => Err(AppError::BadRequest(format!(
            "the API would listen on {api}, off loopback, in plain HTTP: tokens would cross the network in the clear; \
             give --tls-cert and --tls-key, or --tls-from-ca for a certificate from kiln's CA, \
             or --insecure-http if the network is trusted"
        ))),
    }
}

/// The rustls configuration of the public listener.
fn api_tls_config(app: &App, source: &ApiTls, api: SocketAddr) -> Result<Arc<rustls::ServerConfig>, AppError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    match source {
        ApiTls::FromCa => {
            let mut names = app.config().certificate_names();
            names.extend(app.config().api_hosts.iter().cloned());
            if !api.ip().is_unspecified() {
                names.push(api.ip().to_string());
            }
            names.sort();
            names.dedup();
            Ok(app.pki().api_tls(&names)?)
        }
        ApiTls::Files { cert, key } => {
            let bad = |path: &Path, e: &dyn std::fmt::Display| {
                AppError::BadRequest(format!("cannot use {} for the API's TLS: {e}", path.display()))
            };
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| bad(cert, &e))?;
            if chain.is_empty() {
                return Err(bad(cert, &"it holds no PEM certificate"));
            }
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut tls = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key_der))
                .map_err(|e| bad(cert, &e))?;
            tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Ok(Arc::new(tls))
        }
    }
}

/// The names the public listener answers to: loopback, its own address,
/// and `--api-host`.
fn host_allowlist(config: &Config, api: SocketAddr) -> api::auth::HostAllowlist {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    if !api.ip().is_unspecified() {
        names.push(api.ip().to_string());
    }
    names.extend(config.api_hosts.iter().cloned());
    api::auth::HostAllowlist::new(names)
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
