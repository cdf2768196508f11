//! An HTTP reverse proxy in front of moto that counts EC2 API calls by action
//! and injects faults: throttling, error answers, pending states.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use base64::Engine;

use super::http::{self, Request, Response};
use super::runner::Consoles;

/// What the next calls of one action get instead of (or on top of) moto's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 503 `RequestLimitExceeded`, `times` times.
    Throttle { times: usize },
    /// An EC2 error answer (`status`, `code`, `message`), `times` times.
    Error { times: usize, status: u16, code: String, message: String },
    /// Passed through, but the next `times` answers show running instances as
    /// `pending`, stopped ones as `stopping` and available images as `pending`
    /// (moto itself has no pending states).
    Pending { times: usize },
}

impl Fault {
    fn times(&mut self) -> &mut usize {
        match self {
            Self::Throttle { times } | Self::Error { times, .. } | Self::Pending { times } => times,
        }
    }
}

struct Shared {
    upstream: String,
    http: reqwest::Client,
    calls: Mutex<BTreeMap<String, usize>>,
    faults: Mutex<HashMap<String, VecDeque<Fault>>>,
    consoles: Mutex<Option<Consoles>>,
}

/// A running proxy; dropped, it stops.
#[must_use = "dropping the proxy stops it"]
pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`: the endpoint to give the code under test.
    pub url: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl FaultProxy {
    /// Proxies a random loopback port to `upstream` (moto's URL).
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build()?,
            calls: Mutex::new(BTreeMap::new()),
            faults: Mutex::new(HashMap::new()),
            consoles: Mutex::new(None),
        });
        let stop = CancellationToken::new();
        let s = shared.clone();
        http::serve(listener, stop.clone(), move |req| {
            let s = s.clone();
            async move { handle(&s, req).await }
        });
        Ok(Self { url, shared, stop })
    }

    /// Calls so far by action (`Action=` of the query or form body; `?` if none).
    pub fn calls(&self) -> BTreeMap<String, usize> {
        self.shared.calls.lock().unwrap().clone()
    }

    pub fn reset_calls(&self) {
        self.shared.calls.lock().unwrap().clear();
    }

    /// Answers GetConsoleOutput with the VMs' real consoles (moto's is canned
    /// text) for the instances `consoles` knows; the others go to moto.
    pub fn serve_consoles(&self, consoles: Consoles) {
        *self.shared.consoles.lock().unwrap() = Some(consoles);
    }

    /// Queues `fault` for the next calls of `action` (after faults queued before).
    pub fn inject(&self, action: &str, fault: Fault) {
        self.shared.faults.lock().unwrap().entry(action.to_owned()).or_default().push_back(fault);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A parameter of an EC2 query API request (form body or query string), not
/// percent-decoded: enough for actions and ids.
fn param(req: &Request, name: &str) -> Option<String> {
    let query = req.target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let body = std::str::from_utf8(&req.body).unwrap_or("");
    [body, query]
        .iter()
        .flat_map(|s| s.split('&'))
        .find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v.to_owned()))
}

async fn handle(s: &Shared, req: Request) -> Response {
    let action = param(&req, "Action").unwrap_or_else(|| "?".into());
    *s.calls.lock().unwrap().entry(action.clone()).or_default() += 1;
    let fault = {
        let mut faults = s.faults.lock().unwrap();
        let queue = faults.entry(action.clone()).or_default();
        while queue.front_mut().is_some_and(|f| *f.times() == 0) {
            queue.pop_front();
        }
        queue.front_mut().map(|f| {
            *f.times() -= 1;
            f.clone()
        })
    };
    match fault {
        Some(Fault::Throttle { .. }) => {
            tracing::info!(action, "fault proxy: throttled");
            ec2_error(503, "RequestLimitExceeded", "Request limit exceeded.")
        }
        Some(Fault::Error { status, code, message, .. }) => {
            tracing::info!(action, code, "fault proxy: error");
            ec2_error(status, &code, &message)
        }
        Some(Fault::Pending { .. }) => {
            let mut resp = forward(s, req).await;
            if let Ok(body) = String::from_utf8(resp.body.clone()) {
                resp.body = pending(&body).into_bytes();
            }
            resp
        }
        None => {
            let consoles = s.consoles.lock().unwrap().clone();
            let id = param(&req, "InstanceId");
            match (action.as_str(), consoles, id) {
                ("GetConsoleOutput", Some(consoles), Some(id)) => match consoles(&id) {
                    Some(text) => console_output(&id, &text),
                    None => forward(s, req).await,
                },
                _ => forward(s, req).await,
            }
        }
    }
}

/// A GetConsoleOutput answer: like EC2, the last 64 KiB, base64-encoded.
fn console_output(id: &str, text: &str) -> Response {
    let bytes = text.as_bytes();
    let tail = &bytes[bytes.len().saturating_sub(64 * 1024)..];
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<GetConsoleOutputResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">\
         <requestId>{:032x}</requestId><instanceId>{}</instanceId><timestamp>{}</timestamp><output>{}</output>\
         </GetConsoleOutputResponse>",
        rand::random::<u128>(),
        xml_escape(id),
        jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        base64::engine::general_purpose::STANDARD.encode(tail)
    );
    Response::new(200, "text/xml;charset=UTF-8", body)
}

/// Shows moto's settled states as the in-between states real EC2 goes through.
fn pending(body: &str) -> String {
    body.replace("<code>16</code><name>running</name>", "<code>0</code><name>pending</name>")
        .replace("<code>80</code><name>stopped</name>", "<code>64</code><name>stopping</name>")
        .replace("<imageState>available</imageState>", "<imageState>pending</imageState>")
}

/// An error answer in EC2's format, which the SDK parses for code and message.
fn ec2_error(status: u16, code: &str, message: &str) -> Response {
    let request_id = format!("{:032x}", rand::random::<u128>());
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{}</Code><Message>{}</Message>\
         </Error></Errors><RequestID>{request_id}</RequestID></Response>",
        xml_escape(code),
        xml_escape(message)
    );
    Response::new(status, "text/xml;charset=UTF-8", body)
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Sends the request on to moto and returns its answer as is.
async fn forward(s: &Shared, req: Request) -> Response {
    const HOP: [&str; 7] =
        ["host", "content-length", "connection", "transfer-encoding", "keep-alive", "expect", "accept-encoding"];
    let Ok(method) = reqwest::Method::from_bytes(req.method.as_bytes()) else {
        return Response::text(400, "bad method\n");
    };
    let mut out = s.http.request(method, format!("{}{}", s.upstream, req.target));
    for (k, v) in &req.headers {
        if !HOP.iter().any(|h| k.eq_ignore_ascii_case(h)) {
            out = out.header(k, v);
        }
    }
    let result = async {
        let resp = out.body(req.body).send().await?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        let body = resp.bytes().await?.to_vec();
        anyhow::Ok(Response { status, headers, body })
    }
    .await;
    result.unwrap_or_else(|e| Response::text(502, format!("fault proxy: upstream: {e:#}\n")))
}
