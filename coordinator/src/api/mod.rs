//! HTTP: the only module that knows it. Three listeners, three routers:
//!
//! - [`v1`]: the public JSON API (and its OpenAPI document), for the CLI and the
//!   page, behind [`auth`] (tokens, roles, the page's session, the Host allowlist).
//! - [`agent`]: the mTLS listener agents call; [`listen`] accepts its
//!   connections and hands each request the identity from its client
//!   certificate, and holds every listener to the same connection limits.
//! - [`bootstrap`]: plain HTTP for what an instance fetches before it has a
//!   certificate (the agent binary; its sha256 in user-data makes it safe).

pub mod agent;
pub mod auth;
pub mod bootstrap;
mod error;
mod extract;
mod json_errors;
pub mod listen;
pub mod v1;
pub mod web;

pub use error::ApiError;
pub use v1::openapi;

/// The public listener's router: the `/v1` API and, at `/`, the page.
pub fn public(app: crate::app::App) -> axum::Router {
    json_errors::contract(v1::router(app).merge(web::router()), "; the API's routes are listed at /v1/openapi.json")
}
