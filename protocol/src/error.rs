//! The JSON error body of every kiln endpoint.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A machine-readable error kind; the HTTP status follows from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    NotFound,
    AlreadyExists,
    PayloadTooLarge,
    Unauthorized,
    Forbidden,
    /// A log chunk did not start at, or did not agree with, the committed log.
    LogOffsetMismatch,
    /// The request conflicts with the resource's state (e.g. the build has ended).
    Conflict,
    Unavailable,
    Internal,
    /// The route exists, but not for this method; the `Allow` header lists those it has.
    MethodNotAllowed,
    /// A byte range that starts past what the resource holds.
    RangeNotSatisfiable,
    /// The coordinator's data directory has no room for what was sent (507).
    InsufficientStorage,
}

/// What every error response carries: a code and a sentence saying what to fix.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// With [`ErrorCode::LogOffsetMismatch`]: the bytes committed so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed: Option<u64>,
}
