//! One error contract on every listener: the answers the HTTP framework makes
//! itself (no such route, a method the route lacks, a body over the limit, a
//! missing extension) leave as kiln's JSON error like every other, with their
//! status and headers (a 405 keeps its `Allow`).
//!
//! What hyper refuses before a request exists (a malformed request line, a
//! URI or headers over its limits: 400, 414, 431) never reaches a router;
//! hyper answers those itself with an empty body.

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kiln_protocol::error::ErrorCode;
use kiln_protocol::quote::{clip, quote};

use super::ApiError;

/// Most bytes of a framework error's text body that are read to explain it.
const MAX_DETAIL: usize = 4096;

/// `router` with a JSON 404 for unknown paths and every non-JSON error
/// rewritten as JSON. `hint` ends the 404 message (where the routes are listed).
pub fn contract<S: Clone + Send + Sync + 'static>(router: Router<S>, hint: &'static str) -> Router<S> {
    router
        .fallback(move |method: Method, uri: axum::http::Uri| async move {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                format!("there is no route {method} {}{hint}", quote(uri.path())),
            )
        })
        .layer(axum::middleware::from_fn(as_json))
}

async fn as_json(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(resp.headers()) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let detail = match axum::body::to_bytes(body, MAX_DETAIL).await {
        Ok(bytes) => clip(String::from_utf8_lossy(&bytes).trim()),
        Err(_) => String::new(),
    };
    let allow = parts.headers.get(header::ALLOW).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let err = explain(status, &method, &path, &allow, &detail);
    parts.headers.remove(header::CONTENT_LENGTH);
    let (json, body) = err.into_response().into_parts();
    parts.headers.extend(json.headers);
    Response::from_parts(parts, body)
}

fn is_json(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| ct.starts_with("application/json"))
}

/// The JSON error for a framework answer of `status`.
fn explain(status: StatusCode, method: &Method, path: &str, allow: &str, detail: &str) -> ApiError {
    use ErrorCode as C;
    let path = quote(path);
    let said = |fallback: &str| if detail.is_empty() { fallback.to_owned() } else { detail.to_owned() };
    let (code, message) = match status {
        StatusCode::NOT_FOUND => (C::NotFound, format!("there is no route {method} {path}")),
        StatusCode::METHOD_NOT_ALLOWED => {
            // axum adds `Allow` after this layer: the header is in the answer all the same.
            let allowed =
                if allow.is_empty() { "a method the Allow header lists".to_owned() } else { allow.to_owned() };
            (C::MethodNotAllowed, format!("{path} does not take {method}; use {allowed}"))
        }
        StatusCode::PAYLOAD_TOO_LARGE => {
            (C::PayloadTooLarge, format!("the body is too large: {}", said("over the limit")))
        }
        StatusCode::UNAUTHORIZED => (C::Unauthorized, said("authenticate first")),
        StatusCode::FORBIDDEN => (C::Forbidden, said("not allowed")),
        StatusCode::CONFLICT => (C::Conflict, said("the request conflicts with the resource's state")),
        StatusCode::RANGE_NOT_SATISFIABLE => (C::RangeNotSatisfiable, said("the range starts past the end")),
        StatusCode::SERVICE_UNAVAILABLE => (C::Unavailable, said("try again later")),
        s if s.is_client_error() => (C::BadRequest, said(s.canonical_reason().unwrap_or("bad request"))),
        _ => {
            tracing::error!(%status, %method, %path, %detail, "internal error from the HTTP layer");
            (C::Internal, "internal error".to_owned())
        }
    };
    ApiError::new(status, code, message)
}
