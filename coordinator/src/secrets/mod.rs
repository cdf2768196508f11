//! Secrets at rest and in logs.
//!
//! - [`key`]: the data directory's sealing key (`secrets.key`) and the AEAD
//!   that seals every stored secret with it.
//! - [`mask`]: replaces secret values in a script's output with `***`, across
//!   chunk boundaries, before anything is stored or streamed.
//! - [`modes`]: the process umask and the data directory's permission check.

pub mod key;
pub mod mask;
pub mod modes;

pub use key::{SealError, SecretKey};
pub use mask::Masker;
