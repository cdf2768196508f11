//! `/v1/builds`

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use kiln_protocol::BuildId;
use kiln_protocol::api::{Build, BuildListQuery, BuildRequest};
use kiln_protocol::error::ErrorBody;

use crate::api::ApiError;
use crate::api::extract::{ApiJson, ApiPath, ApiQuery};
use crate::app::App;

/// List builds, newest first.
#[utoipa::path(get, operation_id = "list_builds", path = "/v1/builds", tag = "builds", params(BuildListQuery), responses((status = 200, body = [Build])))]
pub async fn list(
    State(app): State<App>,
    ApiQuery(query): ApiQuery<BuildListQuery>,
) -> Result<Json<Vec<Build>>, ApiError> {
    Ok(Json(app.builds(query).await?))
}

/// Start a build of a generator revision on a set of clouds.
#[utoipa::path(post, operation_id = "start_build", path = "/v1/builds", tag = "builds", request_body = BuildRequest, responses(
    (status = 201, body = Build),
    (status = 400, description = "A base image or launch option the cloud refuses, a password missing", body = ErrorBody),
    (status = 404, description = "Unknown generator, revision or cloud, or a cloud the revision has no target for", body = ErrorBody),
    (status = 409, description = "The revision names no cloud", body = ErrorBody),
    (status = 503, description = "The coordinator cannot build now: it has no agent binary", body = ErrorBody),
))]
pub async fn start(
    State(app): State<App>,
    ApiJson(req): ApiJson<BuildRequest>,
) -> Result<(StatusCode, Json<Build>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.start_build(req).await?)))
}

/// A build with each target's state, timings, image and error.
#[utoipa::path(get, operation_id = "show_build", path = "/v1/builds/{id}", tag = "builds",
    params(("id" = BuildId, Path, description = "Build id")),
    responses((status = 200, body = Build), (status = 404, body = ErrorBody)))]
pub async fn show(State(app): State<App>, ApiPath(id): ApiPath<BuildId>) -> Result<Json<Build>, ApiError> {
    Ok(Json(app.build(id).await?))
}

/// Cancel a build: every unfinished target unwinds and ends cancelled.
#[utoipa::path(post, operation_id = "cancel_build", path = "/v1/builds/{id}/cancel", tag = "builds",
    params(("id" = BuildId, Path, description = "Build id")),
    responses((status = 200, body = Build), (status = 404, body = ErrorBody), (status = 409, description = "The build has ended", body = ErrorBody)))]
pub async fn cancel(State(app): State<App>, ApiPath(id): ApiPath<BuildId>) -> Result<Json<Build>, ApiError> {
    Ok(Json(app.cancel_build(id).await?))
}
