//! The agent listener's routes (behind mTLS, see [`super::listen`]).
//!
//! Each handler gets the caller's identity from its certificate as a
//! [`Peer`] extension and lets the application layer authorize it.

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use kiln_protocol::TargetId;
use kiln_protocol::agent::{
    EnrollRequest, EnrollResponse, ExitReport, Instruction, InstructionWait, Job, LogAck, LogOffset, SealReport, paths,
};

use super::ApiError;
use super::extract::{ApiJson, ApiPath, ApiQuery};
use crate::app::{App, PeerIdentity};

/// The identity of the connection's client certificate, if it sent one.
#[derive(Clone, Debug)]
pub struct Peer(pub Option<PeerIdentity>);

/// Largest log chunk accepted (the agent sends at most 1 MiB).
const MAX_CHUNK: usize = 4 * 1024 * 1024;

/// Largest enrollment request (a CSR, a token, an identity document).
const MAX_ENROLL: usize = 16 * 1024;

pub fn router(app: App) -> Router {
    // Every route but enrollment needs the certificate of the target its path
    // names: checked before any body is read.
    let certified = Router::new()
        .route(paths::JOB, get(job))
        .route(paths::LOG, put(log))
        .route(paths::EXIT, post(exit))
        .route(paths::INSTRUCTION, get(instruction))
        .route(paths::SEALING, post(sealing))
        .route(paths::SEALED, post(sealed))
        .route_layer(axum::middleware::from_fn_with_state(app.clone(), certified))
        .layer(DefaultBodyLimit::max(MAX_CHUNK));
    let routes =
        Router::new().route(paths::ENROLL, post(enroll).layer(DefaultBodyLimit::max(MAX_ENROLL))).merge(certified);
    super::json_errors::contract(routes, "; agents call only the routes of kiln's agent protocol").with_state(app)
}

/// Refuses a request whose client certificate is missing or is not the
/// current one of the target in its path, before its body is read.
async fn certified(
    State(app): State<App>,
    Extension(peer): Extension<Peer>,
    ApiPath(target): ApiPath<TargetId>,
    req: Request,
    next: Next,
) -> Response {
    match app.authorize(peer.0.as_ref(), target) {
        Ok(_) => next.run(req).await,
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn enroll(
    State(app): State<App>,
    ApiJson(req): ApiJson<EnrollRequest>,
) -> Result<Json<EnrollResponse>, ApiError> {
    Ok(Json(app.enroll(req).await?))
}

async fn job(
    State(app): State<App>,
    Extension(peer): Extension<Peer>,
    ApiPath(target): ApiPath<TargetId>,
) -> Result<Json<Job>, ApiError> {
    Ok(Json(app.job(peer.0.as_ref(), target).await?))
}

async fn log(
    State(app): State<App>,
    Extension(peer): Extension<Peer>,
    ApiPath(target): ApiPath<TargetId>,
    ApiQuery(LogOffset { offset }): ApiQuery<LogOffset>,
    body: Bytes,
) -> Result<Json<LogAck>, ApiError> {
    Ok(Json(app.append_log(peer.0.as_ref(), target, offset, body).await?))
}

async fn exit(
    State(app): State<App>,
    Extension(peer): Extension<Peer>,
    ApiPath(target): ApiPath<TargetId>,
    ApiJson(report): ApiJson<ExitReport>,
) -> Result<Json<LogAck>, ApiError> {
    Ok(Json(app.report_exit(peer.0.as_ref(), target, report).await?))
}

async fn instruction(
    State(app): State<App>,
    Extension(peer): Extension<Peer>,
    ApiPath(target): ApiPath<TargetId>,
    ApiQuery(wait): ApiQuery<InstructionWait>,
) -> Result<Json<Instruction>, ApiError> {
    let wait = Duration::from_secs(wait.wait_secs.unwrap_or(0));
    Ok(Json(app.instruction(peer.0.as_ref(), target, wait).await?))
}

async fn sealed(
    State(app): State<App>,
    Extension(peer): Extension<Peer>,
    ApiPath(target): ApiPath<TargetId>,
    ApiJson(report): ApiJson<SealReport>,
) -> Result<Json<()>, ApiError> {
    app.sealed(peer.0.as_ref(), target, report).await?;
    Ok(Json(()))
}

async fn sealing(
    State(app): State<App>,
    Extension(peer): Extension<Peer>,
    ApiPath(target): ApiPath<TargetId>,
) -> Result<Json<()>, ApiError> {
    app.sealing(peer.0.as_ref(), target).await?;
    Ok(Json(()))
}
