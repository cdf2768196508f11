//! The public `/v1` API. Handlers parse, call the application layer, and
//! answer; the OpenAPI document is generated from these very handlers.

mod access;
mod builds;
mod clouds;
mod generators;
mod images;
mod logs;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::{Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::App;

#[derive(OpenApi)]
#[openapi(
    info(title = "kiln", description = "Build consistent VM images on many clouds at once, without SSH.\n\nEvery operation but `health`, `login`, `logout` and this document needs an API token with a role (viewer reads; builder also saves generators and starts and cancels builds; admin also manages clouds, images and tokens), sent as `Authorization: Bearer <token>`, or the page's session cookie plus its CSRF token in `X-Kiln-Csrf` for changes."),
    modifiers(&Security),
    tags(
        (name = "access", description = "API tokens, the page's login, health"),
        (name = "clouds", description = "Configured target clouds"),
        (name = "generators", description = "Scripts and per-cloud base images, with immutable revisions"),
        (name = "builds", description = "Runs of a revision on a set of clouds, and their logs"),
        (name = "images", description = "What builds made, with provenance"),
    )
)]
struct ApiDoc;

/// Declares the bearer token and the session cookie, and the 401 and 403
/// answers of every operation that needs one.
struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API token (`kiln token create`)"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                crate::api::auth::SESSION_COOKIE,
                "The page's session (POST /v1/session); changes also need X-Kiln-Csrf",
            ))),
        );
        doc.security = Some(vec![
            SecurityRequirement::new("token", Vec::<String>::new()),
            SecurityRequirement::new("session", Vec::<String>::new()),
        ]);
        let error = |what: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(what)
                    .content(
                        "application/json",
                        utoipa::openapi::ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build(),
                    )
                    .build(),
            )
        };
        for item in doc.paths.paths.values_mut() {
            for op in
                [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch].into_iter().flatten()
            {
                // `security(())` on an operation marks it open.
                if op.security.as_ref().is_some_and(|s| s.iter().all(|r| *r == SecurityRequirement::default())) {
                    continue;
                }
                op.responses.responses.entry("401".into()).or_insert_with(|| error("No valid token or session"));
                op.responses.responses.entry("403".into()).or_insert_with(|| {
                    error("The token's role does not allow this, or a session request lacks its CSRF token")
                });
            }
        }
    }
}

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
}

/// The OpenAPI document of the public API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().split_for_parts().1
}

/// The public router, with `/v1/openapi.json`. Every route goes through
/// [`auth::guard`](crate::api::auth::guard) before its body is read.
pub fn router(app: App) -> Router {
    let body_limit = app.config().limits.max_script_bytes + 1024 * 1024;
    let (router, api) = routes().split_for_parts();
    router
        .route("/v1/openapi.json", get(move || async move { axum::Json(api) }))
        .route_layer(axum::middleware::from_fn_with_state(app.clone(), crate::api::auth::guard))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(app)
}
