//! The agent listener's TLS: accept, handshake, read the client certificate,
//! and serve HTTP with the caller's identity attached to every request.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use kiln_protocol::TargetId;
use rustls::pki_types::CertificateDer;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use x509_parser::extensions::GeneralName;

use super::agent::Peer;
use crate::app::PeerIdentity;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` over TLS on `listener` (TCP, or the Unix socket guests are
/// relayed to) until `shutdown`.
pub async fn serve<L>(mut listener: L, tls: Arc<rustls::ServerConfig>, router: Router, shutdown: CancellationToken)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let acceptor = TlsAcceptor::from(tls);
    let connections = TaskTracker::new();
    loop {
        // The listener retries failed accepts itself.
        let (tcp, remote) = tokio::select! {
            c = listener.accept() => c,
            () = shutdown.cancelled() => break,
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let shutdown = shutdown.clone();
        let executor = Tracked { tasks: connections.clone(), shutdown: shutdown.clone() };
        connections.spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(?remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let peer = Peer(stream.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(identity));
            let service = router.map_request(move |mut req: http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(peer.clone());
                req
            });
            let builder = auto::Builder::new(executor);
            let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
            tokio::select! {
                r = conn => if let Err(e) = r { tracing::debug!(?remote, error = %e, "agent connection ended") },
                () = shutdown.cancelled() => {}
            }
        });
    }
    connections.close();
    connections.wait().await;
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
