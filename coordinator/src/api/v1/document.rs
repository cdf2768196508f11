//! Completes the generated OpenAPI document with what every operation shares:
//! the security schemes, and each error status the layers around the
//! handlers can answer (bad input, authentication, size limits, the Host
//! allowlist), so the document names every status an operation returns.

use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, ResponseBuilder};

/// The document with security schemes and every operation's error answers.
pub fn complete(mut doc: OpenApi) -> OpenApi {
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
    for item in doc.paths.paths.values_mut() {
        for op in
            [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch].into_iter().flatten()
        {
            add_errors(op);
        }
    }
    doc
}

fn add_errors(op: &mut Operation) {
    // `security(())` on an operation marks it open.
    let open = op.security.as_ref().is_some_and(|s| s.iter().all(|r| *r == SecurityRequirement::default()));
    let params = op.parameters.as_deref().unwrap_or_default();
    let has_input = !params.is_empty() || op.request_body.is_some();
    let has_path = params.iter().any(|p| p.parameter_in == ParameterIn::Path);
    let mut add = |status: &str, what: &str| {
        op.responses.responses.entry(status.into()).or_insert_with(|| error(what));
    };
    if has_input {
        add("400", "The input is malformed or out of range; the message says what to fix");
    }
    if !open {
        add("401", "No valid token or session");
        add("403", "The token's role does not allow this, or a session request lacks its CSRF token");
    }
    if has_path {
        add("404", "No such resource");
    }
    if op.request_body.is_some() {
        add("413", "The body is over the size limit");
    }
    add("421", "The Host header names no host this coordinator serves (see --api-host)");
}

fn error(what: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(what)
            .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build())
            .build(),
    )
}
