//! A minimal HTTP/1.x server on tokio for the bed's stubs: requests with a
//! `Content-Length` or chunked body, answers with a `Content-Length`, keep-alive
//! unless the client asks to close. Enough for the AWS SDK, busybox `wget` and
//! raw HTTP/1.0 through `nc`; nothing more.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const MAX_LINE: usize = 16 * 1024;
const MAX_HEADERS: usize = 128;
const MAX_BODY: usize = 64 * 1024 * 1024;
/// How long a connection may sit idle between two requests.
const IDLE: Duration = Duration::from_secs(120);

#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    fn keep_alive(&self) -> bool {
        let conn = self.header("connection").unwrap_or("").to_ascii_lowercase();
        if self.version == "HTTP/1.0" { conn.contains("keep-alive") } else { !conn.contains("close") }
    }
}

#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Self { status, headers: vec![("Content-Type".into(), content_type.into())], body: body.into() }
    }

    pub fn text(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self::new(status, "text/plain", body)
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

async fn line<R: AsyncBufRead + Unpin>(r: &mut R) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = r.take(MAX_LINE as u64).read_until(b'\n', &mut buf).await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(invalid("line too long or cut off"));
    }
    let s = String::from_utf8(buf).map_err(|_| invalid("not UTF-8"))?;
    Ok(Some(s.trim_end_matches(['\r', '\n']).to_owned()))
}

/// Reads one request; `None` when the peer closed the connection between requests.
pub async fn read_request<S: AsyncBufRead + AsyncWrite + Unpin>(s: &mut S) -> io::Result<Option<Request>> {
    let first = loop {
        match line(s).await? {
            None => return Ok(None),
            Some(l) if l.is_empty() => continue, // a stray CRLF between requests
            Some(l) => break l,
        }
    };
    let mut parts = first.split_whitespace();
    let (Some(method), Some(target), version) = (parts.next(), parts.next(), parts.next()) else {
        return Err(invalid("bad request line"));
    };
    let mut req = Request {
        method: method.to_owned(),
        target: target.to_owned(),
        version: version.unwrap_or("HTTP/1.0").to_owned(),
        headers: Vec::new(),
        body: Vec::new(),
    };
    loop {
        let l = line(s).await?.ok_or_else(|| invalid("cut off in the headers"))?;
        if l.is_empty() {
            break;
        }
        if req.headers.len() == MAX_HEADERS {
            return Err(invalid("too many headers"));
        }
        let (k, v) = l.split_once(':').ok_or_else(|| invalid("bad header"))?;
        req.headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    if req.header("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue")) {
        s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        s.flush().await?;
    }
    if req.header("transfer-encoding").is_some_and(|t| t.to_ascii_lowercase().contains("chunked")) {
        loop {
            let size = line(s).await?.ok_or_else(|| invalid("cut off in a chunk"))?;
            let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| invalid("bad chunk size"))?;
            if size == 0 {
                while line(s).await?.is_some_and(|l| !l.is_empty()) {} // trailers
                break;
            }
            if req.body.len() + size > MAX_BODY {
                return Err(invalid("body too large"));
            }
            let at = req.body.len();
            req.body.resize(at + size, 0);
            s.read_exact(&mut req.body[at..]).await?;
            line(s).await?;
        }
    } else if let Some(len) = req.header("content-length") {
        let len: usize = len.parse().map_err(|_| invalid("bad content-length"))?;
        if len > MAX_BODY {
            return Err(invalid("body too large"));
        }
        req.body.resize(len, 0);
        s.read_exact(&mut req.body).await?;
    }
    Ok(Some(req))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

pub async fn write_response<W: AsyncWrite + Unpin>(w: &mut W, resp: &Response, keep_alive: bool) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    for (k, v) in &resp.headers {
        let skip = ["content-length", "transfer-encoding", "connection"].iter().any(|h| k.eq_ignore_ascii_case(h));
        if !skip {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    let conn = if keep_alive { "keep-alive" } else { "close" };
    head.push_str(&format!("Content-Length: {}\r\nConnection: {conn}\r\n\r\n", resp.body.len()));
    w.write_all(head.as_bytes()).await?;
    w.write_all(&resp.body).await?;
    w.flush().await
}

/// Serves `listener` with `handler` until `stop` is cancelled.
pub fn serve<F, Fut>(listener: TcpListener, stop: CancellationToken, handler: F)
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(_) => {
                        // Out of file descriptors, say: give it a moment rather than spin.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
                () = stop.cancelled() => return,
            };
            let (handler, stop) = (handler.clone(), stop.clone());
            tokio::spawn(async move {
                let mut s = BufReader::new(stream);
                loop {
                    let req = tokio::select! {
                        r = tokio::time::timeout(IDLE, read_request(&mut s)) => match r {
                            Ok(Ok(Some(req))) => req,
                            Ok(Err(e)) => {
                                let _ = write_response(&mut s, &Response::text(400, e.to_string()), false).await;
                                return;
                            }
                            _ => return,
                        },
                        () = stop.cancelled() => return,
                    };
                    let keep_alive = req.keep_alive();
                    let resp = tokio::select! {
                        r = handler(req) => r,
                        () = stop.cancelled() => return,
                    };
                    if write_response(&mut s, &resp, keep_alive).await.is_err() || !keep_alive {
                        return;
                    }
                }
            });
        }
    });
}
