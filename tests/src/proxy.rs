//! A TCP proxy on loopback that can cut every connection through it at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A running proxy; dropped, it stops accepting.
pub struct ChaosProxy {
    pub addr: SocketAddr,
    generation: watch::Sender<u64>,
    severed: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl ChaosProxy {
    /// Proxies 127.0.0.1:<random port> to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let generation = watch::Sender::new(0u64);
        let severed = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (gen_tx, sev, stop2) = (generation.clone(), severed.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                    () = stop2.cancelled() => return,
                };
                let mut cut = gen_tx.subscribe();
                let sev = sev.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => { sev.fetch_add(1, Ordering::SeqCst); }
                    }
                    // Dropping both ends closes them.
                });
            }
        });
        Self { addr, generation, severed, stop }
    }

    /// Closes every connection open now.
    pub fn cut_all(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// How many live connections cuts have closed so far.
    pub fn severed(&self) -> usize {
        self.severed.load(Ordering::SeqCst)
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
