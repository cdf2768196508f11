//! Routing by URL prefix, and what the three services share: request recording,
//! token checks (as keystonemiddleware does them), call counting and injected faults.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use jiff::Timestamp;
use serde_json::{Value, json};

use super::Op;
use super::http::{Request, Response};
use super::state::Shared;
use super::{glance, keystone, nova};

pub(super) fn handle(shared: &Arc<Shared>, req: Request) -> Response {
    record(shared, &req);
    let path = req.path().to_owned();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let resp = match segments.as_slice() {
        ["identity", "v3", rest @ ..] => keystone::handle(shared, &req, rest),
        ["compute", "v2.1", rest @ ..] => nova::handle(shared, &req, rest),
        ["image", rest @ ..] => glance::handle(shared, &req, rest),
        _ => Response::text(404, "404 Not Found\n\nThe resource could not be found.\n"),
    };
    tracing::debug!(target: "kiln_tests::openstack", "{} {} -> {}", req.method, req.target, resp.status);
    resp
}

/// Keeps the request as text for [`super::FakeOpenStack::requests_with_body_containing`].
fn record(shared: &Shared, req: &Request) {
    let mut text = format!("{} {} {}\r\n", req.method, req.target, req.version);
    for (k, v) in &req.headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str("\r\n");
    text.push_str(&String::from_utf8_lossy(&req.body));
    // user_data travels base64-encoded: make what it says findable too.
    let user_data = serde_json::from_slice::<Value>(&req.body)
        .ok()
        .and_then(|v| v.pointer("/server/user_data").and_then(Value::as_str).map(str::to_owned));
    if let Some(decoded) = user_data.and_then(|u| base64::engine::general_purpose::STANDARD.decode(u).ok()) {
        text.push_str("\r\n");
        text.push_str(&String::from_utf8_lossy(&decoded));
    }
    shared.state.lock().unwrap().requests.push(text);
}

pub(super) fn json(status: u16, body: &Value) -> Response {
    Response::new(status, "application/json", serde_json::to_vec(body).unwrap())
}

/// keystonemiddleware's (and Keystone's) answer to a missing, unknown or expired token.
pub(super) fn unauthorized(shared: &Shared) -> Response {
    let body = json!({"error": {
        "code": 401,
        "title": "Unauthorized",
        "message": "The request you have made requires authentication.",
    }});
    let mut resp = json(401, &body);
    resp.headers.push(("WWW-Authenticate".into(), format!("Keystone uri=\"{}/identity\"", shared.base)));
    resp
}

/// The caller's (user index, project index) when `X-Auth-Token` is a live project-scoped token.
pub(super) fn authenticate(shared: &Shared, req: &Request) -> Result<(usize, usize), Response> {
    let state = shared.state.lock().unwrap();
    req.header("x-auth-token")
        .and_then(|t| state.tokens.get(t))
        .filter(|t| Timestamp::now() < t.expires)
        .and_then(|t| Some((t.user, t.project?)))
        .ok_or_else(|| unauthorized(shared))
}

/// Counts a call of `op`; the injected answer if one is waiting for it.
pub(super) fn call(shared: &Shared, op: Op) -> Option<Response> {
    let mut state = shared.state.lock().unwrap();
    *state.calls.entry(format!("{op:?}")).or_default() += 1;
    let (status, body) = state.faults.get_mut(&op)?.pop_front()?;
    tracing::info!(target: "kiln_tests::openstack", ?op, status, "injected fault");
    Some(json(status, &body))
}

/// Decodes the query string (`a=1&b=x%20y`).
pub(super) fn query(req: &Request) -> BTreeMap<String, String> {
    let Some((_, q)) = req.target.split_once('?') else {
        return BTreeMap::new();
    };
    let Ok(url) = reqwest::Url::parse(&format!("http://x/?{q}")) else {
        return BTreeMap::new();
    };
    url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}
