//! The application layer's errors; the API turns each into a status code.

use crate::store::StoreError;
use crate::store::logs::LogError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the chunk does not continue the committed log; resend from byte {committed}")]
    LogMismatch { committed: u64 },
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    RangeNotSatisfiable(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The data directory has no room for what was sent; nothing of it was
    /// kept. Holds why (the file system's free space and the reserve).
    #[error("the coordinator's data directory is full: {0}")]
    DiskFull(String),
    #[error("internal error")]
    Store(#[source] StoreError),
    #[error("internal error")]
    Io(#[from] std::io::Error),
    #[error("internal error")]
    Pki(#[from] crate::pki::PkiError),
    /// The data directory is open to other users (at start only).
    #[error(transparent)]
    DataDirModes(#[from] crate::secrets::modes::ModeError),
    /// The sealing key cannot be read or made (at start only).
    #[error(transparent)]
    SecretKey(#[from] crate::secrets::SealError),
}

impl AppError {
    pub(crate) fn not_found(what: impl std::fmt::Display, hint: &str) -> Self {
        Self::NotFound(format!("{what} does not exist; {hint}"))
    }
}

impl From<LogError> for AppError {
    fn from(e: LogError) -> Self {
        match e {
            full @ LogError::Full { .. } => Self::DiskFull(full.to_string()),
            LogError::Io(e) => Self::Io(e),
        }
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => Self::NotFound(format!("{what} not found")),
            StoreError::AlreadyExists(what) => {
                Self::AlreadyExists(format!("{what} already exists; pick another name, or update it instead"))
            }
            other => Self::Store(other),
        }
    }
}
