//! `/v1/images`

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use kiln_protocol::api::Image;
use kiln_protocol::error::ErrorBody;

use crate::api::ApiError;
use crate::api::extract::ApiPath;
use crate::app::App;

/// List the images builds made, oldest first.
#[utoipa::path(get, operation_id = "list_images", path = "/v1/images", tag = "images", responses((status = 200, body = [Image])))]
pub async fn list(State(app): State<App>) -> Result<Json<Vec<Image>>, ApiError> {
    Ok(Json(app.images()?))
}

/// One image with its provenance.
#[utoipa::path(get, operation_id = "show_image", path = "/v1/images/{name}", tag = "images",
    params(("name" = String, Path, description = "Image name")),
    responses((status = 200, body = Image), (status = 404, body = ErrorBody)))]
pub async fn show(State(app): State<App>, ApiPath(name): ApiPath<String>) -> Result<Json<Image>, ApiError> {
    Ok(Json(app.image(&name)?))
}

/// Delete an image from its cloud and forget it.
#[utoipa::path(delete, operation_id = "remove_image", path = "/v1/images/{name}", tag = "images",
    params(("name" = String, Path, description = "Image name")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, description = "The cloud refused", body = ErrorBody)))]
pub async fn remove(State(app): State<App>, ApiPath(name): ApiPath<String>) -> Result<StatusCode, ApiError> {
    app.remove_image(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
