//! kiln's wire types: everything that crosses a process boundary.
//!
//! # Layout
//! - [`access`]: API tokens, roles and the page's login session.
//! - [`ids`]: typed identifiers (`BuildId`, `TargetId`, validated names).
//! - [`api`]: the public `/v1` HTTP API's requests and views.
//! - [`agent`]: the messages between the agent in a VM and the coordinator.
//! - [`error`]: the JSON error body every endpoint returns.
//! - [`quote`]: input quoted in error messages, at most 200 characters of it.
//! - [`unique`]: request maps that refuse a key given twice.
//! - [`whole`]: whole numbers that may be written `7.0`.
//!
//! This crate knows nothing of tokio, axum or sled: it is serde types only, so
//! the agent, the CLI and the coordinator agree on one definition.

pub mod access;
pub mod agent;
pub mod api;
pub mod error;
pub mod ids;
pub mod quote;
pub mod unique;
pub mod whole;

pub use ids::{BuildId, CloudName, GeneratorName, InvalidName, TargetId};

/// A point in time, serialized as RFC 3339 in UTC.
pub type Timestamp = jiff::Timestamp;
