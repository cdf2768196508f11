//! Why user-data could not be rendered.

/// A value that cannot go into user-data; each message says what to fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("the {field} contains a NUL byte, which a shell script cannot carry")]
    NulByte { field: &'static str },
    #[error("the {field} {url:?} is not usable: {reason}")]
    BadUrl { field: &'static str, url: String, reason: &'static str },
    #[error("the agent sha256 must be 64 lowercase hex characters, got {value:?}")]
    BadSha256 { value: String },
    #[error("the CA certificate must be a single PEM CERTIFICATE block, but {reason}")]
    BadCaPem { reason: &'static str },
    #[error("the enrollment token is empty")]
    EmptyToken,
    #[error("the fetch timeout must be at least one second")]
    ZeroFetchTimeout,
}
