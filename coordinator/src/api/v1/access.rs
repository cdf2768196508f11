//! `/v1/tokens`, `/v1/session` (the page's login) and `/v1/health`.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_protocol::access::{ApiToken, CreatedToken, Health, LoginRequest, Session, TokenRequest};
use kiln_protocol::error::ErrorBody;

use crate::api::ApiError;
use crate::api::auth::{SESSION_COOKIE, session_cookie};
use crate::api::extract::{ApiJson, ApiPath};
use crate::app::App;
use crate::app::access::{Principal, SESSION_TTL};

/// Whether the coordinator answers. Open: no token needed.
#[utoipa::path(get, operation_id = "health", path = "/v1/health", tag = "access", security(()),
    responses((status = 200, body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health { status: "ok".into() })
}

/// List API tokens (never their secrets).
#[utoipa::path(get, operation_id = "list_tokens", path = "/v1/tokens", tag = "access",
    responses((status = 200, body = [ApiToken])))]
pub async fn list(State(app): State<App>) -> Result<Json<Vec<ApiToken>>, ApiError> {
    Ok(Json(app.tokens()?))
}

/// Make an API token; its secret is shown in this answer only.
#[utoipa::path(post, operation_id = "create_token", path = "/v1/tokens", tag = "access", request_body = TokenRequest,
    responses((status = 201, body = CreatedToken), (status = 400, body = ErrorBody)))]
pub async fn create(
    State(app): State<App>,
    ApiJson(req): ApiJson<TokenRequest>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.create_token(req)?)))
}

/// Revoke an API token; the page sessions made with it end too.
#[utoipa::path(delete, operation_id = "revoke_token", path = "/v1/tokens/{id}", tag = "access",
    params(("id" = String, Path, description = "Token id (16 hex digits)", pattern = "^[0-9a-f]{16}$")),
    responses((status = 204), (status = 404, body = ErrorBody),
        (status = 409, description = "A token cannot revoke itself", body = ErrorBody)))]
pub async fn revoke(
    State(app): State<App>,
    Extension(principal): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    app.revoke_token(&id, &principal)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Who the caller is; for the page's session also its CSRF token.
#[utoipa::path(get, operation_id = "show_session", path = "/v1/session", tag = "access",
    responses((status = 200, body = Session)))]
pub async fn show(Extension(principal): Extension<Principal>) -> Json<Session> {
    Json(Session { name: principal.name, role: principal.role, csrf: principal.csrf })
}

/// Log in the page: exchanges a token for an HttpOnly, SameSite=Strict session cookie.
#[utoipa::path(post, operation_id = "login", path = "/v1/session", tag = "access", request_body = LoginRequest, security(()),
    responses((status = 200, body = Session, headers(("set-cookie" = String, description = "The session cookie"))),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn login(State(app): State<App>, ApiJson(req): ApiJson<LoginRequest>) -> Result<Response, ApiError> {
    let (cookie, session) = app.login(&req.token)?;
    let secure = if app.config().api_tls.is_some() { "; Secure" } else { "" };
    let set = format!(
        "{SESSION_COOKIE}={cookie}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_TTL.as_secs()
    );
    let mut resp = Json(session).into_response();
    resp.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&set).expect("cookie is ASCII"));
    Ok(resp)
}

/// Log out the page: ends the session and clears its cookie.
#[utoipa::path(delete, operation_id = "logout", path = "/v1/session", tag = "access", security(()),
    responses((status = 204)))]
pub async fn logout(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Some(cookie) = session_cookie(&headers) {
        app.logout(cookie);
    }
    let clear = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&clear).expect("cookie is ASCII"));
    resp
}
