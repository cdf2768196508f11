//! The egress proxy: HTTP/1.1 on a Unix socket, one relayed guest connection
//! at a time. Each connection starts with the relay's preamble naming the
//! target; after that it is plain HTTP proxying: `CONNECT host:port` tunnels
//! and absolute-form requests (`GET http://host/path`) are forwarded, each only
//! after the target's [`Policy`] has allowed the address it connects to.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::PREAMBLE_PREFIX;
use super::policy::{Policy, Verdict, host_port};

/// The longest preamble line, newline included.
const PREAMBLE_MAX: usize = 256;
const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(5);
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

type Body = BoxBody<Bytes, hyper::Error>;

/// Headers that belong to one hop, never forwarded (besides those `Connection` lists).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Serves relayed guest connections from `listener` until `shutdown` is
/// cancelled, then aborts those still open and returns. `resolver` maps the
/// target id of a connection's preamble to its policy, or to the reason it
/// reaches nothing, which every request on that connection is answered with.
pub async fn serve<R>(listener: UnixListener, resolver: R, shutdown: CancellationToken)
where
    R: Fn(&str) -> Result<Policy, String> + Send + Sync + 'static,
{
    let resolver = Arc::new(resolver);
    let tasks = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Typically out of file descriptors: pause rather than spin.
                    tracing::warn!(error = %e, "egress proxy cannot accept a connection");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        let (resolver, conn_tasks, conn_shutdown) = (resolver.clone(), tasks.clone(), shutdown.clone());
        spawn(&tasks, &shutdown, async move { connection(stream, &*resolver, conn_tasks, conn_shutdown).await });
    }
    tasks.close();
    tasks.wait().await;
}

/// Runs `work` on `tasks` until it ends or `shutdown` is cancelled.
fn spawn(tasks: &TaskTracker, shutdown: &CancellationToken, work: impl Future<Output = ()> + Send + 'static) {
    tasks.spawn(shutdown.clone().run_until_cancelled_owned(work));
}

/// Reads the preamble, then serves HTTP on the rest of the connection.
async fn connection<R>(mut stream: UnixStream, resolver: &R, tasks: TaskTracker, shutdown: CancellationToken)
where
    R: Fn(&str) -> Result<Policy, String>,
{
    let Some(target) = read_preamble(&mut stream).await else {
        tracing::warn!("egress connection without a valid preamble; closing it");
        return;
    };
    let policy = resolver(&target);
    let conn = Arc::new(Conn { target, policy, host_addrs: host_addresses(), tasks, shutdown });
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.handle(req).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "egress connection ended with an error");
    }
}

/// The target id from `kiln-egress target=<id>\n`, read byte by byte so that
/// nothing after the newline is consumed; `None` for anything else.
async fn read_preamble(stream: &mut UnixStream) -> Option<String> {
    let mut line = Vec::with_capacity(64);
    let read = async {
        for _ in 0..PREAMBLE_MAX {
            match stream.read_u8().await.ok()? {
                b'\n' => return Some(()),
                byte => line.push(byte),
            }
        }
        None
    };
    timeout(PREAMBLE_TIMEOUT, read).await.ok()??;
    let id = std::str::from_utf8(&line).ok()?.strip_prefix(PREAMBLE_PREFIX)?;
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_graphic())).then(|| id.to_owned())
}

/// This machine's interface addresses, which guests may not reach unless allowed.
fn host_addresses() -> Vec<IpAddr> {
    let interfaces = match nix::ifaddrs::getifaddrs() {
        Ok(interfaces) => interfaces,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list this host's addresses; only the address classes guard them");
            return Vec::new();
        }
    };
    let mut addrs: Vec<IpAddr> = interfaces
        .filter_map(|interface| interface.address)
        .filter_map(|a| {
            a.as_sockaddr_in().map(|a| IpAddr::V4(a.ip())).or_else(|| a.as_sockaddr_in6().map(|a| IpAddr::V6(a.ip())))
        })
        .collect();
    addrs.sort_unstable();
    addrs.dedup();
    addrs
}

/// One relayed guest connection.
struct Conn {
    target: String,
    /// The target's policy, or why the target reaches nothing.
    policy: Result<Policy, String>,
    host_addrs: Vec<IpAddr>,
    /// Where tunnels and origin connections run, so that shutdown ends them.
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Conn {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        match &self.policy {
            Err(reason) => {
                let (method, uri) = (req.method(), req.uri());
                tracing::warn!(target_id = %self.target, %method, %uri, verdict = "deny", reason, "egress refused");
                text(StatusCode::FORBIDDEN, format!("kiln egress: {reason}"))
            }
            Ok(policy) if req.method() == Method::CONNECT => self.tunnel(policy, req).await,
            Ok(policy) => self.forward(policy, req).await,
        }
    }

    /// `CONNECT host:port`: answers 200, then joins the upgraded connection to the origin.
    async fn tunnel(&self, policy: &Policy, req: Request<Incoming>) -> Response<Body> {
        let Some((host, port)) = req.uri().authority().and_then(|a| Some((unbracket(a.host()), a.port_u16()?))) else {
            return text(StatusCode::BAD_REQUEST, "kiln egress: CONNECT needs host:port");
        };
        let mut upstream = match self.open(policy, "CONNECT", &host, port).await {
            Ok(upstream) => upstream,
            Err(refusal) => return refusal,
        };
        spawn(&self.tasks, &self.shutdown, async move {
            match hyper::upgrade::on(req).await {
                Ok(upgraded) => {
                    let copied = tokio::io::copy_bidirectional(&mut TokioIo::new(upgraded), &mut upstream).await;
                    tracing::debug!(?copied, "egress tunnel closed");
                }
                Err(e) => tracing::debug!(error = %e, "egress tunnel never upgraded"),
            }
        });
        Response::new(Empty::new().map_err(|never| match never {}).boxed())
    }

    /// An absolute-form request: forwarded in origin form on a new origin
    /// connection, the response streamed back as it arrives.
    async fn forward(&self, policy: &Policy, req: Request<Incoming>) -> Response<Body> {
        match req.uri().scheme_str() {
            Some("http") => {}
            Some("https") => return text(StatusCode::BAD_REQUEST, "kiln egress: use CONNECT for https (https_proxy)"),
            Some(other) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("kiln egress: cannot proxy {other}:// URIs, only http://"),
                );
            }
            None => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "kiln egress: this is an HTTP proxy; set http_proxy/https_proxy to use it",
                );
            }
        }
        let Some(authority) = req.uri().authority() else {
            return text(StatusCode::BAD_REQUEST, "kiln egress: the URI has no host");
        };
        let (host, port) = (unbracket(authority.host()), authority.port_u16().unwrap_or(80));
        let host_header = match authority.port() {
            Some(port) => format!("{}:{port}", authority.host()),
            None => authority.host().to_owned(),
        };
        let Ok(host_header) = HeaderValue::from_str(&host_header) else {
            return text(StatusCode::BAD_REQUEST, "kiln egress: the URI's host is not a valid Host header");
        };
        let method = req.method().clone();
        let upstream = match self.open(policy, method.as_str(), &host, port).await {
            Ok(upstream) => upstream,
            Err(refusal) => return refusal,
        };
        let dest = host_port(&host, port);
        let (mut sender, origin) = match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
            Ok(handshake) => handshake,
            Err(e) => return text(StatusCode::BAD_GATEWAY, format!("kiln egress: {method} {dest}: {e}")),
        };
        spawn(&self.tasks, &self.shutdown, async move {
            if let Err(e) = origin.await {
                tracing::debug!(error = %e, "egress origin connection ended with an error");
            }
        });
        let (mut parts, body) = req.into_parts();
        parts.uri = parts.uri.path_and_query().cloned().map_or_else(|| Uri::from_static("/"), Uri::from);
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.insert(header::HOST, host_header);
        match sender.send_request(Request::from_parts(parts, body)).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body.boxed())
            }
            Err(e) => text(StatusCode::BAD_GATEWAY, format!("kiln egress: {method} {dest}: the origin failed: {e}")),
        }
    }

    /// Resolves `host` (unless it is an IP literal), keeps the addresses the
    /// policy allows and connects to the first that answers; or returns the
    /// response that says why not. The policy is applied before any connection.
    async fn open(&self, policy: &Policy, method: &str, host: &str, port: u16) -> Result<TcpStream, Response<Body>> {
        let dest = host_port(host, port);
        let target_id = self.target.as_str();
        let fail = |status, message: String| {
            tracing::warn!(target_id, method, dest, error = message, "egress connection failed");
            text(status, format!("kiln egress: {method} {dest}: {message}"))
        };
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => match timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port))).await {
                Ok(Ok(addrs)) => addrs.collect(),
                Ok(Err(e)) => return Err(fail(StatusCode::BAD_GATEWAY, format!("cannot resolve {host}: {e}"))),
                Err(_) => return Err(fail(StatusCode::BAD_GATEWAY, format!("resolving {host} timed out"))),
            },
        };
        if addrs.is_empty() {
            return Err(fail(StatusCode::BAD_GATEWAY, format!("{host} resolves to no address")));
        }
        let mut denial = None;
        let allowed: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|addr| match policy.decide(host, port, addr.ip(), &self.host_addrs) {
                Verdict::Allow => true,
                Verdict::Deny(reason) => {
                    denial.get_or_insert(reason);
                    false
                }
            })
            .collect();
        if let Some(reason) = denial.filter(|_| allowed.is_empty()) {
            tracing::warn!(target_id, method, dest, verdict = "deny", reason, "egress refused");
            return Err(text(StatusCode::FORBIDDEN, format!("kiln egress: refused {method} {dest}: {reason}")));
        }
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let mut error = String::new();
        for addr in allowed {
            match timeout_at(deadline, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    tracing::info!(target_id, method, dest, %addr, verdict = "allow", "egress allowed");
                    return Ok(stream);
                }
                Ok(Err(e)) => error = format!("cannot connect to {addr}: {e}"),
                Err(_) => {
                    error = format!("connecting to {addr} timed out");
                    break;
                }
            }
        }
        Err(fail(StatusCode::BAD_GATEWAY, error))
    }
}

/// Removes the hop-by-hop headers, including those `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
}

/// A URI's host without the brackets of an IPv6 literal.
fn unbracket(host: &str) -> String {
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host).to_owned()
}

/// A text/plain response whose body is `message` and a newline, for a person running curl in the guest.
fn text(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let mut body = message.into();
    body.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use hyper::client::conn::http1::SendRequest;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::egress::Mode;

    /// Fails the test instead of hanging it.
    async fn bounded<T>(work: impl Future<Output = T>) -> T {
        timeout(Duration::from_secs(20), work).await.expect("timed out")
    }

    fn payload() -> Bytes {
        (0..5_000_000u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into()
    }

    /// An HTTP origin on loopback: `/big` is [`payload`], `/echo` echoes the
    /// request body, anything else describes the request it received.
    async fn origin() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let big = payload();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let big = big.clone();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let big = big.clone();
                    async move {
                        let body = match req.uri().path() {
                            "/big" => big,
                            "/echo" => req.into_body().collect().await?.to_bytes(),
                            _ => {
                                let header = |name| req.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
                                let (host, auth) = (header(header::HOST), header(header::PROXY_AUTHORIZATION));
                                format!(
                                    "{} {} {:?} host={host:?} auth={auth:?}",
                                    req.method(),
                                    req.uri(),
                                    req.version()
                                )
                                .into()
                            }
                        };
                        Ok::<_, hyper::Error>(Response::new(Full::new(body)))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        addr
    }

    struct Proxy {
        _dir: tempfile::TempDir,
        socket: PathBuf,
        origin: SocketAddr,
        shutdown: CancellationToken,
        served: JoinHandle<()>,
    }

    /// The proxy on a fresh socket. Target "open" may reach the origin's port
    /// on 127.0.0.1, "closed" has egress none, and any other target has ended.
    async fn start() -> Proxy {
        let origin = origin().await;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("egress.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let allow = format!("127.0.0.1:{}", origin.port());
        let resolver = move |target: &str| match target {
            "open" => Policy::from_options(&[("egress_allow".into(), allow.clone())].into()).map_err(|e| e.to_string()),
            "closed" => Ok(Policy { mode: Mode::None, allow: vec![] }),
            other => Err(format!("target {other} has ended; its VM reaches nothing")),
        };
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(serve(listener, resolver, shutdown.clone()));
        Proxy { _dir: dir, socket, origin, shutdown, served }
    }

    async fn client(socket: &Path, target: &str) -> SendRequest<Full<Bytes>> {
        let mut stream = UnixStream::connect(socket).await.unwrap();
        stream.write_all(format!("{PREAMBLE_PREFIX}{target}\n").as_bytes()).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn.with_upgrades());
        sender
    }

    fn request(method: Method, uri: &str, body: &str) -> Request<Full<Bytes>> {
        let host = uri.parse::<Uri>().unwrap().authority().map_or("proxy".into(), |a| a.to_string());
        Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, host)
            .header(header::PROXY_AUTHORIZATION, "Basic Z3Vlc3Q6c2VjcmV0")
            .header("proxy-connection", "keep-alive")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap()
    }

    async fn send(sender: &mut SendRequest<Full<Bytes>>, req: Request<Full<Bytes>>) -> (StatusCode, String, Bytes) {
        bounded(async {
            sender.ready().await.unwrap();
            let response = sender.send_request(req).await.unwrap();
            let status = response.status();
            let kind = response.headers().get(header::CONTENT_TYPE).map_or("", |v| v.to_str().unwrap()).to_owned();
            (status, kind, response.into_body().collect().await.unwrap().to_bytes())
        })
        .await
    }

    async fn get(socket: &Path, target: &str, method: Method, uri: &str) -> (StatusCode, String) {
        let (status, _, body) = send(&mut client(socket, target).await, request(method, uri, "")).await;
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    /// Writes `bytes` on a fresh connection and reads until the proxy closes it.
    async fn raw(socket: &Path, bytes: &[u8]) -> String {
        let mut stream = UnixStream::connect(socket).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        let mut out = Vec::new();
        // A close with unread input resets the connection; what was read before still counts.
        let _ = bounded(stream.read_to_end(&mut out)).await;
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn forwards_absolute_form_requests_in_origin_form() {
        let proxy = start().await;
        let port = proxy.origin.port();
        let mut sender = client(&proxy.socket, "open").await;
        let (status, _, body) =
            send(&mut sender, request(Method::GET, &format!("http://127.0.0.1:{port}/big"), "")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body == payload(), "got {} bytes, not the payload", body.len());
        // The same client connection again: keep-alive.
        let uri = format!("http://127.0.0.1:{port}/info?q=1");
        let (status, _, body) = send(&mut sender, request(Method::GET, &uri, "")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, format!("GET /info?q=1 HTTP/1.1 host=Some(\"127.0.0.1:{port}\") auth=None"));
        let uri = format!("http://127.0.0.1:{port}/echo");
        let (status, _, body) = send(&mut sender, request(Method::POST, &uri, "posted")).await;
        assert_eq!((status, body), (StatusCode::OK, Bytes::from("posted")));
        // By a name that resolves to the allowed address (and perhaps to ::1 first, which is refused).
        let (status, body) = get(&proxy.socket, "open", Method::GET, &format!("http://localhost:{port}/x")).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, &*format!("GET /x HTTP/1.1 host=Some(\"localhost:{port}\") auth=None"))
        );
    }

    #[tokio::test]
    async fn serves_pipelined_requests() {
        let proxy = start().await;
        let port = proxy.origin.port();
        let one = format!("GET http://127.0.0.1:{port}/a HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
        let two =
            format!("GET http://127.0.0.1:{port}/b HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        let answer = raw(&proxy.socket, format!("{PREAMBLE_PREFIX}open\n{one}{two}").as_bytes()).await;
        assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
        assert!(answer.contains("GET /a HTTP/1.1") && answer.contains("GET /b HTTP/1.1"), "{answer}");
    }

    #[tokio::test]
    async fn tunnels_connect_both_ways() {
        let proxy = start().await;
        let mut sender = client(&proxy.socket, "open").await;
        let authority = proxy.origin.to_string();
        let req = Request::connect(&authority).header(header::HOST, &authority).body(Full::default()).unwrap();
        let upgraded = bounded(async {
            let response = sender.send_request(req).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            hyper::upgrade::on(response).await.unwrap()
        })
        .await;
        let (mut inner, conn) = hyper::client::conn::http1::handshake(upgraded).await.unwrap();
        tokio::spawn(conn);
        let echo = request(Method::POST, "/echo", "through the tunnel");
        let (status, _, body) = send(&mut inner, echo).await;
        assert_eq!((status, body), (StatusCode::OK, Bytes::from("through the tunnel")));
    }

    #[tokio::test]
    async fn refuses_what_the_policy_denies_before_connecting() {
        let proxy = start().await;
        let (status, kind, body) =
            send(&mut client(&proxy.socket, "open").await, request(Method::CONNECT, "127.0.0.1:1", "")).await;
        assert_eq!((status, kind.as_str()), (StatusCode::FORBIDDEN, "text/plain; charset=utf-8"));
        assert_eq!(
            body,
            "kiln egress: refused CONNECT 127.0.0.1:1: 127.0.0.1 is host loopback; \
             add \"127.0.0.1:1\" or a CIDR to the cloud's egress_allow to allow it\n"
        );
        let metadata = "http://169.254.169.254/latest/meta-data/";
        let (status, body) = get(&proxy.socket, "open", Method::GET, metadata).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(
            body.starts_with("kiln egress: refused GET 169.254.169.254:80: 169.254.169.254 is link-local"),
            "{body}"
        );
        let (status, body) = get(&proxy.socket, "open", Method::GET, "http://[::1]:8080/").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(body.contains("refused GET [::1]:8080: ::1 is host loopback; add \"[::1]:8080\""), "{body}");
    }

    #[tokio::test]
    async fn mode_none_refuses_even_loopback_origins() {
        let proxy = start().await;
        let uri = format!("http://{}/info", proxy.origin);
        let (status, body) = get(&proxy.socket, "closed", Method::GET, &uri).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(body.contains("egress is none for this target"), "{body}");
    }

    #[tokio::test]
    async fn a_target_without_a_policy_is_refused_on_every_request() {
        let proxy = start().await;
        let expected = "kiln egress: target t-9 has ended; its VM reaches nothing\n";
        let mut sender = client(&proxy.socket, "t-9").await;
        let uri = format!("http://{}/info", proxy.origin);
        let (status, _, body) = send(&mut sender, request(Method::GET, &uri, "")).await;
        assert_eq!((status, body), (StatusCode::FORBIDDEN, Bytes::from(expected)));
        let (status, _, body) = send(&mut sender, request(Method::CONNECT, &proxy.origin.to_string(), "")).await;
        assert_eq!((status, body), (StatusCode::FORBIDDEN, Bytes::from(expected)));
    }

    #[tokio::test]
    async fn answers_what_it_does_not_proxy_with_400() {
        let proxy = start().await;
        let (status, body) = get(&proxy.socket, "open", Method::GET, "/x").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body, "kiln egress: this is an HTTP proxy; set http_proxy/https_proxy to use it\n");
        let (status, body) = get(&proxy.socket, "open", Method::GET, "https://example.com/").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::BAD_REQUEST, "kiln egress: use CONNECT for https (https_proxy)\n")
        );
    }

    #[tokio::test]
    async fn closes_connections_without_a_valid_preamble() {
        let proxy = start().await;
        let long = format!("{PREAMBLE_PREFIX}{}\n", "a".repeat(PREAMBLE_MAX));
        let http = format!("GET http://{}/info HTTP/1.1\r\nHost: x\r\n\r\n", proxy.origin);
        for preamble in ["hello\n", "kiln-egress target=\n", "kiln-egress target=a b\n", &long, &http] {
            assert_eq!(raw(&proxy.socket, preamble.as_bytes()).await, "", "after {preamble:?}");
        }
        // A valid preamble on the same listener still works afterwards.
        assert_eq!(get(&proxy.socket, "open", Method::GET, "/x").await.0, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn shutdown_stops_serving_and_ends_open_tunnels() {
        let proxy = start().await;
        let mut sender = client(&proxy.socket, "open").await;
        let authority = proxy.origin.to_string();
        let req = Request::connect(&authority).body(Full::default()).unwrap();
        let mut tunnel = bounded(async {
            let response = sender.send_request(req).await.unwrap();
            TokioIo::new(hyper::upgrade::on(response).await.unwrap())
        })
        .await;
        proxy.shutdown.cancel();
        bounded(proxy.served).await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(bounded(tunnel.read_to_end(&mut rest)).await.unwrap(), 0);
        assert!(UnixStream::connect(&proxy.socket).await.is_err());
    }
}
