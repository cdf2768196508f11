//! `/v1/targets/{id}/log`: byte ranges, and a live follow as server-sent events.

use std::convert::Infallible;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use base64::Engine;
use futures::{Stream, StreamExt};
use kiln_protocol::TargetId;
use kiln_protocol::api::{LogChunk, LogEnd, LogRange};
use kiln_protocol::error::ErrorBody;

use crate::api::ApiError;
use crate::api::extract::{ApiPath, ApiQuery};
use crate::app::App;
use crate::app::builds::{FollowEvent, MAX_LOG_READ};

/// Read a byte range of a target's log (the merged stdout and stderr of its script).
#[utoipa::path(get, operation_id = "read_log", path = "/v1/targets/{id}/log", tag = "builds", params(("id" = TargetId, Path, description = "Target id"), LogRange),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>,
        headers(("x-kiln-log-committed" = u64, description = "Bytes committed so far"))),
        (status = 404, body = ErrorBody), (status = 416, description = "The offset is past the bytes committed", body = ErrorBody)))]
pub async fn read(
    State(app): State<App>,
    ApiPath(id): ApiPath<TargetId>,
    ApiQuery(range): ApiQuery<LogRange>,
) -> Result<impl IntoResponse, ApiError> {
    let offset = range.offset.unwrap_or(0);
    let bytes = app.read_log(id, offset, range.limit.unwrap_or(MAX_LOG_READ)).await?;
    let committed = app.target_view(app.target_record(id)?).await?.log_bytes;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::HeaderName::from_static("x-kiln-log-committed"), committed.to_string()),
        ],
        bytes,
    ))
}

/// Follow a target's log as server-sent events: `log` events carry a
/// [`LogChunk`], the last event, `end`, a [`LogEnd`].
#[utoipa::path(get, operation_id = "follow_log", path = "/v1/targets/{id}/log/follow", tag = "builds", params(("id" = TargetId, Path, description = "Target id"), LogRange),
    responses((status = 200, content_type = "text/event-stream", description = "`log` events with a LogChunk, then one `end` event with a LogEnd"),
        (status = 404, body = ErrorBody), (status = 416, description = "The offset is past the bytes committed", body = ErrorBody)))]
pub async fn follow(
    State(app): State<App>,
    ApiPath(id): ApiPath<TargetId>,
    ApiQuery(range): ApiQuery<LogRange>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let events = app.follow_log(id, range.offset.unwrap_or(0)).await?;
    let events = events.map(|e| {
        Ok(match e {
            Ok(FollowEvent::Chunk { offset, bytes }) => {
                let data = base64::engine::general_purpose::STANDARD.encode(bytes);
                Event::default()
                    .event("log")
                    .id(offset.to_string())
                    .json_data(LogChunk { offset, data })
                    .unwrap_or_default()
            }
            Ok(FollowEvent::End { total, status }) => {
                Event::default().event("end").json_data(LogEnd { total, status }).unwrap_or_default()
            }
            Err(e) => {
                let e = ApiError::from(e);
                Event::default().event("error").json_data(e.body).unwrap_or_default()
            }
        })
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}
