//! `/v1/clouds`

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use kiln_protocol::CloudName;
use kiln_protocol::api::Cloud;
use kiln_protocol::error::ErrorBody;

use crate::api::ApiError;
use crate::api::extract::{ApiJson, ApiPath};
use crate::app::App;

/// List the configured clouds.
#[utoipa::path(get, operation_id = "list_clouds", path = "/v1/clouds", tag = "clouds", responses((status = 200, body = [Cloud])))]
pub async fn list(State(app): State<App>) -> Result<Json<Vec<Cloud>>, ApiError> {
    Ok(Json(app.clouds()?))
}

/// Add a cloud.
#[utoipa::path(post, operation_id = "add_cloud", path = "/v1/clouds", tag = "clouds", request_body = Cloud, responses(
    (status = 201, body = Cloud),
    (status = 400, body = ErrorBody),
    (status = 409, description = "A cloud of that name exists", body = ErrorBody),
))]
pub async fn add(
    State(app): State<App>,
    ApiJson(cloud): ApiJson<Cloud>,
) -> Result<(StatusCode, Json<Cloud>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.add_cloud(cloud).await?)))
}

/// Show one cloud.
#[utoipa::path(get, operation_id = "show_cloud", path = "/v1/clouds/{name}", tag = "clouds",
    params(("name" = CloudName, Path, description = "Cloud name")),
    responses((status = 200, body = Cloud), (status = 404, body = ErrorBody)))]
pub async fn show(State(app): State<App>, ApiPath(name): ApiPath<CloudName>) -> Result<Json<Cloud>, ApiError> {
    Ok(Json(app.cloud(&name)?))
}

/// Remove a cloud. Running builds keep the configuration they started with.
#[utoipa::path(delete, operation_id = "remove_cloud", path = "/v1/clouds/{name}", tag = "clouds",
    params(("name" = CloudName, Path, description = "Cloud name")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn remove(State(app): State<App>, ApiPath(name): ApiPath<CloudName>) -> Result<StatusCode, ApiError> {
    app.remove_cloud(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
