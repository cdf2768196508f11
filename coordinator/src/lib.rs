//! kiln's coordinator: it launches base VMs on many clouds, lets their agents
//! phone home over mutual TLS, and turns each customized VM into an image.
//!
//! # Layout
//! - [`api`]: HTTP only: the public `/v1` API, the mTLS agent listener, bootstrap.
//! - [`app`]: the application layer the handlers call; owns everything below.
//! - [`workflow`]: each target's saga of persisted steps with undo, resumed at start-up.
//! - [`providers`]: the cloud trait and one module per cloud kind.
//! - [`store`]: sled trees and the append-only log files.
//! - [`pki`]: the CA, the agent listener's certificate, enrollment tokens.
//! - [`cli`]: the `kiln` command line, a client of the HTTP API.
//! - [`server`]: `kiln serve`, the app plus its listeners.
//! - [`egress`]: the filtering HTTP proxy that is local VMs' only way out.
//! - [`secrets`]: the sealing key, log masking, the data directory's modes.
//! - [`config`]: settings and their defaults.
//! - [`failpoint`]: where crash tests stop the coordinator (a test-only feature).

pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod egress;
pub mod failpoint;
pub mod pki;
pub mod providers;
pub mod secrets;
pub mod server;
pub mod store;
pub mod workflow;

pub use app::App;
pub use config::Config;
pub use providers::{Provider, Providers};
pub use server::{Listeners, Server};

/// An error and all its sources on one line, for logs and messages.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
