//! One instance's metadata service on 127.0.0.1, reached by the guest at
//! 169.254.169.254:80 through QEMU's `guestfwd` (one `busybox nc` per connection).
//!
//! EC2 mode is IMDSv2 only (kiln launches with `HttpTokens=required`):
//! `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds` gives a
//! token, and `GET /latest/user-data` needs it. Nimbus mode is Nimbus's server:
//! no tokens, plain `GET /latest/user-data`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::http::{self, Request, Response};

/// What a guest has asked for, for the tests and the logs.
#[derive(Clone, Debug, Default)]
pub struct ImdsStats {
    /// When user-data was first served.
    pub user_data_served: Option<Instant>,
    /// Requests answered, as `"<METHOD> <path> <status>"`.
    pub requests: Vec<String>,
}

/// An instance identity document and its `rsa2048` signature.
#[derive(Clone, Debug)]
pub struct SignedIdentity {
    pub document: String,
    pub rsa2048: String,
}

struct State {
    instance_id: String,
    identity: Option<SignedIdentity>,
    user_data: Vec<u8>,
    tokens: bool,
    issued: Mutex<HashMap<String, Instant>>,
    stats: Mutex<ImdsStats>,
}

/// A running metadata service; dropped, it stops.
pub struct Imds {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
}

impl Imds {
    /// `tokens`: IMDSv2 (EC2) when true, tokenless (Nimbus) when false.
    /// `identity`: served at `/latest/dynamic/instance-identity/`; `None`, a 404 there.
    pub async fn start(
        instance_id: &str,
        user_data: Vec<u8>,
        tokens: bool,
        identity: Option<SignedIdentity>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            instance_id: instance_id.to_owned(),
            identity,
            user_data,
            tokens,
            issued: Mutex::new(HashMap::new()),
            stats: Mutex::new(ImdsStats::default()),
        });
        let stop = CancellationToken::new();
        let s = state.clone();
        http::serve(listener, stop.clone(), move |req| {
            let s = s.clone();
            async move {
                let resp = answer(&s, &req);
                s.stats.lock().unwrap().requests.push(format!("{} {} {}", req.method, req.path(), resp.status));
                resp
            }
        });
        Ok(Self { addr, state, stop })
    }

    /// Stops answering; the stats stay.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    pub fn stats(&self) -> ImdsStats {
        self.state.stats.lock().unwrap().clone()
    }
}

impl Drop for Imds {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn answer(s: &State, req: &Request) -> Response {
    match (req.method.as_str(), req.path()) {
        ("PUT", "/latest/api/token") if s.tokens => {
            let Some(ttl) = req.header("x-aws-ec2-metadata-token-ttl-seconds").and_then(|t| t.parse::<u64>().ok())
            else {
                return Response::text(400, "missing or bad X-aws-ec2-metadata-token-ttl-seconds\n");
            };
            if !(1..=21600).contains(&ttl) {
                return Response::text(400, "X-aws-ec2-metadata-token-ttl-seconds must be 1..=21600\n");
            }
            let token: String = rand::rng().sample_iter(rand::distr::Alphanumeric).take(56).map(char::from).collect();
            s.issued.lock().unwrap().insert(token.clone(), Instant::now() + Duration::from_secs(ttl));
            let mut resp = Response::text(200, token);
            resp.headers.push(("X-aws-ec2-metadata-token-ttl-seconds".into(), ttl.to_string()));
            resp
        }
        ("GET", path) => {
            if s.tokens {
                let valid = req
                    .header("x-aws-ec2-metadata-token")
                    .and_then(|t| s.issued.lock().unwrap().get(t).copied())
                    .is_some_and(|until| Instant::now() < until);
                if !valid {
                    return Response::text(401, "IMDSv2 token missing, unknown or expired\n");
                }
            }
            match path {
                "/latest/user-data" if !s.user_data.is_empty() => {
                    s.stats.lock().unwrap().user_data_served.get_or_insert_with(Instant::now);
                    Response::new(200, "application/octet-stream", s.user_data.clone())
                }
                "/latest/meta-data/instance-id" => Response::text(200, s.instance_id.clone()),
                "/latest/dynamic/instance-identity/document" if s.identity.is_some() => {
                    Response::text(200, s.identity.as_ref().unwrap().document.clone())
                }
                "/latest/dynamic/instance-identity/rsa2048" if s.identity.is_some() => {
                    Response::text(200, s.identity.as_ref().unwrap().rsa2048.clone())
                }
                _ => Response::text(404, "Not Found\n"),
            }
        }
        _ => Response::text(404, "Not Found\n"),
    }
}
