//! The egress path: how a local (QEMU) guest reaches the network, if at all.
//!
//! Guests run with `restrict=on`, so they reach only the addresses kiln
//! forwards with `guestfwd`; one of them is relayed to this HTTP forward proxy,
//! which is the guest's only way out. The relay names the target in a preamble
//! line the guest cannot forge, and the proxy applies that target's [`Policy`]
//! host-side. It resolves names itself and connects to the very address it
//! checked, so DNS rebinding cannot slip a guest past the policy.

pub mod policy;
mod proxy;

pub use policy::{AllowEntry, Mode, Policy, PolicyError, Verdict};
pub use proxy::serve;

/// The start of the line the relay writes before the guest's bytes; the target id follows, then `\n`.
pub const PREAMBLE_PREFIX: &str = "kiln-egress target=";
