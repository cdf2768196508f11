//! `/v1/janitor`

use axum::Json;
use axum::extract::State;
use kiln_protocol::api::JanitorReport;

use crate::api::ApiError;
use crate::app::App;

/// What the janitor would remove now: resources this coordinator made whose
/// target has ended or is unknown (a dry run; nothing changes).
#[utoipa::path(get, operation_id = "janitor_dry_run", path = "/v1/janitor", tag = "janitor",
    responses((status = 200, body = JanitorReport)))]
pub async fn dry_run(State(app): State<App>) -> Result<Json<JanitorReport>, ApiError> {
    Ok(Json(app.janitor(true).await?))
}

/// Run the janitor now: remove what it finds, and say what was removed and
/// what the clouds refused.
#[utoipa::path(post, operation_id = "janitor_run", path = "/v1/janitor", tag = "janitor",
    responses((status = 200, body = JanitorReport)))]
pub async fn run(State(app): State<App>) -> Result<Json<JanitorReport>, ApiError> {
    Ok(Json(app.janitor(false).await?))
}
