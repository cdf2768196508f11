//! `/v1/generators`

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use kiln_protocol::GeneratorName;
use kiln_protocol::api::{GeneratorSpec, GeneratorSummary, Revision};
use kiln_protocol::error::ErrorBody;

use crate::api::ApiError;
use crate::api::extract::{ApiJson, ApiPath};
use crate::app::App;

/// List generators with their latest revision.
#[utoipa::path(get, operation_id = "list_generators", path = "/v1/generators", tag = "generators", responses((status = 200, body = [GeneratorSummary])))]
pub async fn list(State(app): State<App>) -> Result<Json<Vec<GeneratorSummary>>, ApiError> {
    Ok(Json(app.generators()?))
}

/// Create a generator; its first revision is returned.
#[utoipa::path(post, operation_id = "create_generator", path = "/v1/generators", tag = "generators", request_body = GeneratorSpec, responses(
    (status = 201, body = Revision),
    (status = 400, description = "Empty or oversized script, bad fields", body = ErrorBody),
    (status = 409, description = "A generator of that name exists", body = ErrorBody),
))]
pub async fn create(
    State(app): State<App>,
    ApiJson(spec): ApiJson<GeneratorSpec>,
) -> Result<(StatusCode, Json<Revision>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.create_generator(spec).await?)))
}

/// The latest revision of a generator.
#[utoipa::path(get, operation_id = "show_generator", path = "/v1/generators/{name}", tag = "generators",
    params(("name" = GeneratorName, Path, description = "Generator name")),
    responses((status = 200, body = Revision), (status = 404, body = ErrorBody)))]
pub async fn show(State(app): State<App>, ApiPath(name): ApiPath<GeneratorName>) -> Result<Json<Revision>, ApiError> {
    Ok(Json(app.revision(&name, None)?))
}

/// Save a new revision of a generator.
#[utoipa::path(put, operation_id = "update_generator", path = "/v1/generators/{name}", tag = "generators", request_body = GeneratorSpec,
    params(("name" = GeneratorName, Path, description = "Generator name")),
    responses((status = 201, body = Revision), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn update(
    State(app): State<App>,
    ApiPath(name): ApiPath<GeneratorName>,
    ApiJson(spec): ApiJson<GeneratorSpec>,
) -> Result<(StatusCode, Json<Revision>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.update_generator(&name, spec).await?)))
}

/// Every revision of a generator, oldest first.
#[utoipa::path(get, operation_id = "list_revisions", path = "/v1/generators/{name}/revisions", tag = "generators",
    params(("name" = GeneratorName, Path, description = "Generator name")),
    responses((status = 200, body = [Revision]), (status = 404, body = ErrorBody)))]
pub async fn revisions(
    State(app): State<App>,
    ApiPath(name): ApiPath<GeneratorName>,
) -> Result<Json<Vec<Revision>>, ApiError> {
    Ok(Json(app.revisions(&name)?))
}

/// One revision of a generator.
#[utoipa::path(get, operation_id = "show_revision", path = "/v1/generators/{name}/revisions/{number}", tag = "generators",
    params(("name" = GeneratorName, Path, description = "Generator name"), ("number" = i64, Path, description = "Revision number", minimum = 1, maximum = 4294967295_i64)),
    responses((status = 200, body = Revision), (status = 404, body = ErrorBody)))]
pub async fn revision(
    State(app): State<App>,
    ApiPath((name, number)): ApiPath<(GeneratorName, u32)>,
) -> Result<Json<Revision>, ApiError> {
    Ok(Json(app.revision(&name, Some(number))?))
}
