//! Every error leaves as JSON with a code and a sentence saying what to fix.

use std::io::ErrorKind;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_protocol::error::{ErrorBody, ErrorCode};

use crate::app::AppError;
use crate::store::StoreError;

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self { status, body: ErrorBody { code, message: message.into(), committed: None } }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }
}

impl From<AppError> for ApiError {
    fn from(e: AppError) -> Self {
        use ErrorCode as C;
        use StatusCode as S;
        let message = e.to_string();
        let (status, code) = match &e {
            AppError::BadRequest(_) => (S::BAD_REQUEST, C::BadRequest),
            AppError::NotFound(_) => (S::NOT_FOUND, C::NotFound),
            AppError::AlreadyExists(_) => (S::CONFLICT, C::AlreadyExists),
            AppError::Unauthorized(_) => (S::UNAUTHORIZED, C::Unauthorized),
            AppError::Forbidden(_) => (S::FORBIDDEN, C::Forbidden),
            AppError::Conflict(_) => (S::CONFLICT, C::Conflict),
            AppError::LogMismatch { committed } => {
                let mut err = ApiError::new(S::CONFLICT, C::LogOffsetMismatch, message);
                err.body.committed = Some(*committed);
                return err;
            }
            AppError::Unavailable(_) => (S::SERVICE_UNAVAILABLE, C::Unavailable),
            AppError::RangeNotSatisfiable(_) => (S::RANGE_NOT_SATISFIABLE, C::RangeNotSatisfiable),
            AppError::PayloadTooLarge(_) => (S::PAYLOAD_TOO_LARGE, C::PayloadTooLarge),
            AppError::DiskFull(_) => (S::INSUFFICIENT_STORAGE, C::InsufficientStorage),
            AppError::Store(StoreError::Sled(db)) => {
                // The database could not be read or written (most often: its
                // disk is full). A retry may succeed, and nothing changed.
                tracing::error!(error = ?crate::error_chain(&e), "database error");
                return ApiError::new(S::SERVICE_UNAVAILABLE, C::Unavailable, database_message(db));
            }
            AppError::Store(_)
            | AppError::Io(_)
            | AppError::Pki(_)
            | AppError::DataDirModes(_)
            | AppError::SecretKey(_) => {
                tracing::error!(error = ?crate::error_chain(&e), "internal error");
                (S::INTERNAL_SERVER_ERROR, C::Internal)
            }
        };
        ApiError::new(status, code, message)
    }
}

/// What a client is told when the database fails.
fn database_message(e: &sled::Error) -> String {
    let full =
        matches!(e, sled::Error::Io(io) if matches!(io.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded));
    if full {
        "the coordinator's database cannot be written: the disk of its data directory is full. \
         Free space there, then restart kiln (its database refuses writes until it is reopened)"
            .to_owned()
    } else {
        "the coordinator's database cannot be read or written just now; try again, and if this persists \
         see the coordinator's log and restart it"
            .to_owned()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}
