//! Plain HTTP for instances that have no certificate yet: the agent binary,
//! and nothing else. Its integrity comes from the sha256 pinned in user-data,
//! not from transport. No route here serves anything secret: user-data reaches
//! local VMs on a read-only drive, and other clouds' VMs from their metadata.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kiln_protocol::agent::paths;
use kiln_protocol::error::ErrorCode;

use super::ApiError;
use crate::app::App;

pub fn router(app: App) -> Router {
    let routes = Router::new().route(paths::AGENT_BINARY, get(agent_binary));
    super::json_errors::contract(routes, "; this listener serves only the agent binary").with_state(app)
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
