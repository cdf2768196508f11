//! Plain HTTP for instances that have no certificate yet: the agent binary
//! and each target's NoCloud seed. Integrity of the agent comes from the
//! sha256 pinned in user-data, not from transport; the seed's user-data holds
//! only what the trust model allows anyone who can read user-data to see.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kiln_protocol::agent::paths;
use kiln_protocol::error::ErrorCode;

use kiln_protocol::TargetId;

use super::ApiError;
use super::extract::ApiPath;
use crate::app::App;

pub fn router(app: App) -> Router {
    Router::new().route(paths::AGENT_BINARY, get(agent_binary)).route(paths::SEED, get(seed)).with_state(app)
}

/// A NoCloud seed file of a running target.
async fn seed(State(app): State<App>, ApiPath((target, file)): ApiPath<(TargetId, String)>) -> Response {
    match app.seed_file(target, &file) {
        Ok(body) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn agent_binary(State(app): State<App>) -> Response {
    match app.agent_binary() {
        Some(bin) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                (header::HeaderName::from_static("x-kiln-sha256"), bin.sha256.clone()),
            ],
            bin.bytes.clone(),
        )
            .into_response(),
        None => ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "this coordinator has no agent binary")
            .into_response(),
    }
}
