//! Messages between the agent inside a VM and the coordinator's agent listener.
//!
//! Every path but [`paths::ENROLL`] needs the client certificate issued at
//! enrollment; the coordinator takes the target's identity from it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{TargetId, Timestamp};

/// The agent listener's routes. The constants are route templates; build the
/// concrete path with the function of the same name. The target in the path
/// must be the one named in the client certificate, else `403`.
pub mod paths {
    use crate::TargetId;

    pub const ENROLL: &str = "/agent/v1/enroll";
    pub const JOB: &str = "/agent/v1/targets/{target}/job";
    /// `PUT` with `?offset=N` and the raw bytes as body.
    pub const LOG: &str = "/agent/v1/targets/{target}/log";
    pub const EXIT: &str = "/agent/v1/targets/{target}/exit";
    /// Long poll: answers when there is an instruction or after `?wait_secs=`.
    pub const INSTRUCTION: &str = "/agent/v1/targets/{target}/instruction";
    /// The agent says it has begun to seal.
    pub const SEALING: &str = "/agent/v1/targets/{target}/sealing";
    /// `POST` with a [`super::SealReport`]: the seal is done (file systems
    /// scrubbed and read-only) and the agent powers off next. No image is
    /// made of a sealed target without it.
    pub const SEALED: &str = "/agent/v1/targets/{target}/sealed";
    /// The bootstrap listener's route for the agent binary (plain HTTP).
    pub const AGENT_BINARY: &str = "/bootstrap/v1/kiln-agent";

    fn fill(template: &str, target: TargetId) -> String {
        template.replace("{target}", &target.to_string())
    }
    pub fn job(target: TargetId) -> String {
        fill(JOB, target)
    }
    pub fn log(target: TargetId) -> String {
        fill(LOG, target)
    }
    pub fn exit(target: TargetId) -> String {
        fill(EXIT, target)
    }
    pub fn instruction(target: TargetId) -> String {
        fill(INSTRUCTION, target)
    }
    pub fn sealing(target: TargetId) -> String {
        fill(SEALING, target)
    }
    pub fn sealed(target: TargetId) -> String {
        fill(SEALED, target)
    }
}

/// Sent once with the one-time token from user-data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub target: TargetId,
    pub token: String,
    /// A PKCS#10 request for a key the agent generated and never sends.
    pub csr_pem: String,
    /// What the cloud's metadata service says this machine is, signed by the
    /// cloud; sent where the user-data asks for it (EC2 with
    /// `identity_certificate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<InstanceIdentity>,
}

/// A cloud-signed statement of which instance the agent runs on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum InstanceIdentity {
    /// EC2's instance identity document, as IMDS serves it.
    Ec2 {
        /// `/latest/dynamic/instance-identity/document`: the JSON document.
        document: String,
        /// `/latest/dynamic/instance-identity/rsa2048`: base64 PKCS#7
        /// SignedData over the document (SHA-256, RSA-2048).
        rsa2048: String,
    },
}

/// The certificate the agent uses for every later request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EnrollResponse {
    pub certificate_pem: String,
    pub not_after: Timestamp,
}

/// What the agent runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub target: TargetId,
    pub script: String,
    pub env: BTreeMap<String, String>,
    pub timeout_secs: u64,
    /// The VM's only way out (local cloud): an HTTP proxy URL that the agent
    /// gives the script as `http_proxy`/`https_proxy` and writes where tools
    /// that reset the environment read it (apt, `/etc/environment` for sudo),
    /// removing it all again when the script ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<String>,
    /// Hosts the script reaches without the proxy (`no_proxy`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub no_proxy: Vec<String>,
    /// Whether the seal generalizes the machine (see `GeneratorSpec::generalize`).
    #[serde(default = "yes")]
    pub generalize: bool,
}

fn yes() -> bool {
    true
}

/// Query of a log `PUT`: where the body's bytes start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogOffset {
    pub offset: u64,
}

/// The coordinator's answer to a log chunk: how many bytes are durable.
/// Also the body of a `409` when the chunk did not fit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LogAck {
    pub committed: u64,
}

/// How the script ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ScriptOutcome {
    Exited {
        code: i32,
    },
    Signaled {
        signal: i32,
    },
    TimedOut {
        after_secs: u64,
    },
    /// The script could not be started (bad interpreter, no such file).
    SpawnFailed {
        message: String,
    },
}

impl ScriptOutcome {
    pub fn succeeded(&self) -> bool {
        matches!(self, ScriptOutcome::Exited { code: 0 })
    }
}

impl std::fmt::Display for ScriptOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScriptOutcome::Exited { code } => write!(f, "exit code {code}"),
            ScriptOutcome::Signaled { signal } => write!(f, "killed by signal {signal}"),
            ScriptOutcome::TimedOut { after_secs } => write!(f, "timeout after {after_secs}s"),
            ScriptOutcome::SpawnFailed { message } => write!(f, "could not start: {message}"),
        }
    }
}

/// Sent once every byte of output is committed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExitReport {
    pub outcome: ScriptOutcome,
    /// The length of the whole output; must equal the committed offset.
    pub total_bytes: u64,
}

/// Query of the instruction long poll.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstructionWait {
    pub wait_secs: Option<u64>,
}

/// What the agent does after reporting its exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Instruction {
    /// Nothing yet: ask again.
    Wait,
    /// Remove the agent and every secret, sync, trim, power off.
    Seal,
    /// Remove the agent's own files and exit, leaving the machine running.
    Finish,
}

/// What the seal did, sent when it is done and just before power-off.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SealReport {
    /// The machine was generalized (cloud-init state, machine-id, host keys…).
    pub generalized: bool,
    /// Every writable block-backed file system, with how its free space was scrubbed.
    pub scrubbed: Vec<Scrubbed>,
    /// The file systems were remounted read-only before power-off.
    pub read_only: bool,
}

impl SealReport {
    /// The file systems whose free space may still hold what was removed.
    pub fn unscrubbed(&self) -> impl Iterator<Item = &Scrubbed> {
        self.scrubbed.iter().filter(|s| s.error.is_some())
    }
}

/// One file system's scrub.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Scrubbed {
    pub mount: String,
    pub fs_type: String,
    pub method: ScrubMethod,
    /// Bytes of free space zeroed.
    pub bytes: u64,
    pub millis: u64,
    /// Why the free space could not be scrubbed; the image must not be made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why a faster method was not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
}

/// How free space was zeroed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScrubMethod {
    /// Free blocks allocated to fillers (`fallocate`), located (`FIEMAP`)
    /// and zeroed on the device (write-zeroes): no data written through the
    /// file system, and a virtual disk stores no zeros.
    ZeroOut,
    /// Zeros written through the file system until it was full (twice).
    Fill,
    /// Nothing worked: see `error`.
    None,
}
