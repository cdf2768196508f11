//! Authentication and authorization of the public listener.
//!
//! - [`host_guard`]: the `Host` must be one of the coordinator's names, so a
//!   DNS-rebound page in a browser cannot talk to it.
//! - [`guard`]: every `/v1` route but the open ones ([`required_role`]) needs a
//!   bearer token or the page's session cookie with the role the route asks;
//!   with the cookie, a request that changes state must also carry the
//!   session's CSRF token in `X-Kiln-Csrf`. It runs before any body is read.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kiln_protocol::access::Role;
use kiln_protocol::error::ErrorCode;

use super::ApiError;
use crate::app::access::{Principal, missing_credentials, same_secret};
use crate::app::{App, AppError};

/// The page's session cookie.
pub const SESSION_COOKIE: &str = "kiln_session";
/// The header that carries the session's CSRF token.
pub const CSRF_HEADER: &str = "x-kiln-csrf";

/// The role a route needs; `None` for the open ones.
pub fn required_role(method: &Method, path: &str) -> Option<Role> {
    let read = matches!(*method, Method::GET | Method::HEAD);
    match path {
        "/v1/openapi.json" | "/v1/health" => None,
        // Logging in and out: the handlers check the token or cookie themselves.
        "/v1/session" if !read => None,
        // The janitor's dry run lists cloud resources; its run removes them.
        p if p.starts_with("/v1/tokens") || p.starts_with("/v1/janitor") => Some(Role::Admin),
        _ if read => Some(Role::Viewer),
        p if p.starts_with("/v1/clouds") || p.starts_with("/v1/images") => Some(Role::Admin),
        _ => Some(Role::Builder),
    }
}

/// Authenticates and authorizes a `/v1` request (a `route_layer`, so only
/// matched routes get here and the body is still unread).
pub async fn guard(State(app): State<App>, mut req: Request, next: Next) -> Response {
    let path = match req.extensions().get::<MatchedPath>() {
        Some(m) => m.as_str().to_owned(),
        None => req.uri().path().to_owned(),
    };
    let Some(needed) = required_role(req.method(), &path) else {
        return next.run(req).await;
    };
    match authorize(&app, req.method(), req.headers(), needed) {
        Ok(principal) => {
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        Err(e) => {
            let unauthorized = matches!(e, AppError::Unauthorized(_));
            let mut resp = ApiError::from(e).into_response();
            if unauthorized {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer realm=\"kiln\""));
            }
            resp
        }
    }
}

fn authorize(app: &App, method: &Method, headers: &HeaderMap, needed: Role) -> Result<Principal, AppError> {
    let principal = if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.to_str().unwrap_or_default();
        let Some(token) = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")) else {
            return Err(AppError::Unauthorized("the Authorization header must be `Bearer <token>`".into()));
        };
        app.authenticate(token)?
    } else if let Some(cookie) = session_cookie(headers) {
        let principal = app.authenticate_session(cookie)?;
        let changes = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        let csrf = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default();
        if changes && !principal.csrf.as_deref().is_some_and(|want| same_secret(want, csrf)) {
            return Err(AppError::Forbidden(format!(
                "a request that changes something must carry the session's CSRF token in {CSRF_HEADER} (GET /v1/session gives it)"
            )));
        }
        principal
    } else {
        return Err(missing_credentials());
    };
    if principal.role < needed {
        return Err(AppError::Forbidden(format!(
            "this needs the {needed} role and the token {:?} is a {}: ask an admin for a {needed} token (`kiln token create --role {needed}`)",
            principal.name, principal.role
        )));
    }
    Ok(principal)
}

/// The value of the session cookie, if the request has one.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value)
        .filter(|v| !v.is_empty())
}

/// The names a request's `Host` may carry (lowercase, without a port).
#[derive(Clone, Debug)]
pub struct HostAllowlist(Arc<Vec<String>>);

impl HostAllowlist {
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        let mut names: Vec<String> =
            names.into_iter().map(|n| n.trim_matches(['[', ']']).to_ascii_lowercase()).collect();
        names.sort();
        names.dedup();
        Self(Arc::new(names))
    }

    /// True when `authority` (`host[:port]`) names this coordinator.
    pub fn allows(&self, authority: &str) -> bool {
        let host = host_of(authority).trim_end_matches('.').to_ascii_lowercase();
        self.0.contains(&host)
    }
}

/// The host of an authority `host[:port]`, without an IPv6 address's brackets.
pub fn host_of(authority: &str) -> &str {
    match authority.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => authority
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(authority, |(h, _)| h),
    }
}

/// Refuses a request whose `Host` is not one of the coordinator's names.
pub async fn host_guard(State(hosts): State<HostAllowlist>, req: Request, next: Next) -> Response {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned));
    match authority {
        Some(a) if hosts.allows(&a) => next.run(req).await,
        Some(a) => {
            let shown: String = a.chars().take(200).collect();
            ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                ErrorCode::Forbidden,
                format!(
                    "the Host {shown:?} is not one of this coordinator's names; if it is, start `kiln serve` with --api-host {}",
                    shown.split(':').next().unwrap_or_default()
                ),
            )
            .into_response()
        }
        None => ApiError::bad_request("the request has no Host header").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reads are for viewers, writes for builders, clouds, images, tokens and
    // the janitor for admins; only the document, health and login are open.
    #[test]
    fn each_route_needs_its_role() {
        let cases = [
            (Method::GET, "/v1/openapi.json", None),
            (Method::GET, "/v1/health", None),
            (Method::POST, "/v1/session", None),
            (Method::GET, "/v1/session", Some(Role::Viewer)),
            (Method::GET, "/v1/builds/{id}", Some(Role::Viewer)),
            (Method::POST, "/v1/builds", Some(Role::Builder)),
            (Method::POST, "/v1/builds/{id}/cancel", Some(Role::Builder)),
            (Method::PUT, "/v1/generators/{name}", Some(Role::Builder)),
            (Method::POST, "/v1/clouds", Some(Role::Admin)),
            (Method::DELETE, "/v1/images/{name}", Some(Role::Admin)),
            (Method::GET, "/v1/tokens", Some(Role::Admin)),
            (Method::GET, "/v1/clouds", Some(Role::Viewer)),
            (Method::GET, "/v1/janitor", Some(Role::Admin)),
            (Method::POST, "/v1/janitor", Some(Role::Admin)),
        ];
        for (method, path, want) in cases {
            assert_eq!(required_role(&method, path), want, "{method} {path}");
        }
    }

    // A Host matches with or without a port, in any case, IPv6 in brackets;
    // anything else (a rebinding name) does not.
    #[test]
    fn hosts_match_by_name_only() {
        let hosts = HostAllowlist::new(["localhost".into(), "127.0.0.1".into(), "::1".into(), "Kiln.Example".into()]);
        for ok in ["localhost", "localhost:7700", "127.0.0.1:80", "[::1]:7700", "kiln.example", "KILN.example.:443"] {
            assert!(hosts.allows(ok), "{ok}");
        }
        for bad in ["evil.example", "127.0.0.2:7700", "localhost.evil.example", "[::2]", ""] {
            assert!(!hosts.allows(bad), "{bad}");
        }
    }
}
