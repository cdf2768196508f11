//! The public `/v1` API. Handlers parse, call the application layer, and
//! answer; the OpenAPI document is generated from these very handlers.

mod access;
mod builds;
mod clouds;
mod document;
mod generators;
mod images;
mod janitor;
mod logs;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::App;

#[derive(OpenApi)]
#[openapi(
    info(title = "kiln", description = "Build consistent VM images on many clouds at once, without SSH.\n\nEvery operation but `health`, `login`, `logout` and this document needs an API token with a role (viewer reads; builder also saves generators and starts and cancels builds; admin also manages clouds, images and tokens, and runs the janitor), sent as `Authorization: Bearer <token>`, or the page's session cookie plus its CSRF token in `X-Kiln-Csrf` for changes."),
    tags(
        (name = "access", description = "API tokens, the page's login, health"),
        (name = "clouds", description = "Configured target clouds"),
        (name = "generators", description = "Scripts and per-cloud base images, with immutable revisions"),
        (name = "builds", description = "Runs of a revision on a set of clouds, and their logs"),
        (name = "images", description = "What builds made, with provenance"),
        (name = "janitor", description = "Resources a crash left on a cloud: listed, and removed"),
    )
)]
struct ApiDoc;

fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(access::health))
        .routes(routes!(access::list, access::create))
        .routes(routes!(access::revoke))
        .routes(routes!(access::show, access::login, access::logout))
        .routes(routes!(clouds::list, clouds::add))
        .routes(routes!(clouds::show, clouds::remove))
        .routes(routes!(generators::list, generators::create))
        .routes(routes!(generators::show, generators::update))
        .routes(routes!(generators::revisions))
        .routes(routes!(generators::revision))
        .routes(routes!(builds::list, builds::start))
        .routes(routes!(builds::show))
        .routes(routes!(builds::cancel))
        .routes(routes!(logs::read))
        .routes(routes!(logs::follow))
        .routes(routes!(images::list))
        .routes(routes!(images::show, images::remove))
        .routes(routes!(janitor::dry_run, janitor::run))
}

/// The OpenAPI document of the public API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    document::complete(routes().split_for_parts().1)
}

/// The public router, with `/v1/openapi.json`. Every route goes through
/// [`auth::guard`](crate::api::auth::guard) before its body is read.
pub fn router(app: App) -> Router {
    let body_limit = app.config().limits.max_script_bytes + 1024 * 1024;
    let (router, api) = routes().split_for_parts();
    let api = document::complete(api);
    router
        .route("/v1/openapi.json", get(move || async move { axum::Json(api) }))
        .route_layer(axum::middleware::from_fn_with_state(app.clone(), crate::api::auth::guard))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(app)
}
