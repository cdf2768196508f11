//! Every error leaves as JSON with a code and a sentence saying what to fix.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_protocol::error::{ErrorBody, ErrorCode};

use crate::app::AppError;

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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}
