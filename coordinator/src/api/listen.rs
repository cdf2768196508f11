//! Serving a router on one listener, plain or TLS, with the limits every
//! listener shares:
//! - at most [`Limits::max_connections`] connections at once (one more is
//!   closed at accept);
//! - HTTP/1 request headers must arrive within [`Limits::header_timeout`],
//!   and the same timer closes a keep-alive connection idle that long;
//! - a TLS handshake must finish within [`HANDSHAKE_TIMEOUT`];
//! - HTTP/2 (agents, through ALPN) gets at most [`Limits::max_streams`]
//!   streams, and keep-alive pings that close a dead peer's connection.
//!
//! With TLS, the verified client certificate's target is attached to every
//! request as [`Peer`] (the agent listener's identity).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use kiln_protocol::TargetId;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use x509_parser::extensions::GeneralName;

use super::agent::Peer;
use crate::app::PeerIdentity;
use crate::config::ListenLimits as Limits;

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` (TCP, or a Unix socket guests are relayed
/// to), over TLS when `tls` is given, until `shutdown`.
pub async fn serve<L>(
    mut listener: L,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let acceptor = tls.map(TlsAcceptor::from);
    let connections = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        // The listener retries failed accepts itself.
        let (io, remote) = tokio::select! {
            c = listener.accept() => c,
            () = shutdown.cancelled() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                ?remote,
                max = limits.max_connections,
                "connection refused: the listener is at its connection cap"
            );
            drop(io);
            continue;
        };
        let remote = format!("{remote:?}");
        let acceptor = acceptor.clone();
        let router = router.clone();
        let shutdown = shutdown.clone();
        let executor = Tracked { tasks: connections.clone(), shutdown: shutdown.clone() };
        connections.spawn(async move {
            let _slot = slot;
            let conn = async {
                match acceptor {
                    None => connection(io, false, Peer(None), router, limits, executor).await,
                    Some(acceptor) => {
                        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%remote, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                        let (_, session) = stream.get_ref();
                        let h2 = session.alpn_protocol() == Some(b"h2");
                        let peer = Peer(session.peer_certificates().and_then(|c| c.first()).and_then(identity));
                        connection(stream, h2, peer, router, limits, executor).await
                    }
                }
            };
            tokio::select! {
                () = conn => {}
                () = shutdown.cancelled() => {}
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// Serves one connection: HTTP/2 when ALPN chose it, else HTTP/1.
async fn connection<I>(io: I, h2: bool, peer: Peer, router: Router, limits: Limits, executor: Tracked)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = router.map_request(move |mut req: http::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer.clone());
        req
    });
    let service = TowerToHyperService::new(service);
    let io = TokioIo::new(io);
    let result = if h2 {
        hyper::server::conn::http2::Builder::new(executor)
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_streams)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20))
            .serve_connection(io, service)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(io, service)
            .with_upgrades()
            .await
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended");
    }
}

/// Runs HTTP/2 streams as tasks of the listener, stopped at shutdown, so no
/// request handler (an instruction long poll) outlives the listener.
#[derive(Clone)]
struct Tracked {
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl<F> hyper::rt::Executor<F> for Tracked
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        self.tasks.spawn(self.shutdown.clone().run_until_cancelled_owned(future));
    }
}

/// The target and serial named in a verified client certificate.
fn identity(cert: &CertificateDer<'_>) -> Option<PeerIdentity> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    let san = x509.subject_alternative_name().ok()??;
    let target = san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(uri) => TargetId::from_san_uri(uri),
        _ => None,
    })?;
    Some(PeerIdentity { target, serial: hex::encode(x509.raw_serial()) })
}
