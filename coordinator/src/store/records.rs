//! What the store keeps that the API does not show as is.

use kiln_protocol::agent::{Instruction, ScriptOutcome, SealReport};
use kiln_protocol::api::{Cloud, FailureReason, Image, Status, Step, TargetError, TargetSpec, Timings};
use kiln_protocol::{BuildId, CloudName, GeneratorName, TargetId, Timestamp};
use serde::{Deserialize, Serialize};

/// A generator's head: its name and how many revisions it has.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GeneratorRecord {
    pub name: GeneratorName,
    pub latest: u32,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// A build: which revision, which targets, and whether a user cancelled it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BuildRecord {
    pub id: BuildId,
    pub generator: GeneratorName,
    pub revision: u32,
    pub script_sha256: String,
    pub created_at: Timestamp,
    pub targets: Vec<TargetId>,
    pub cancel_requested: bool,
}

/// One target's workflow state: everything needed to resume or unwind it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetRecord {
    pub id: TargetId,
    pub build: BuildId,
    /// The cloud as configured when the build started (later edits do not apply).
    pub cloud: Cloud,
    pub spec: TargetSpec,
    pub generator: GeneratorName,
    pub revision: u32,
    pub status: Status,
    /// The step to run next (or running now).
    pub step: Step,
    /// Set when the target failed or was cancelled: the workflow now unwinds.
    pub error: Option<TargetError>,
    /// The cloud's instance id, recorded as soon as launch returns.
    pub instance: Option<String>,
    /// The cloud's id of the image being made, recorded before waiting on it,
    /// so a crash mid-snapshot can still delete a half-made image.
    pub image_id: Option<String>,
    /// The finished image, once recorded.
    pub image: Option<Image>,
    /// True once the agent enrolled: the token must never be reissued.
    pub enrolled: bool,
    /// Hex sha256 of the enrolled agent's public key. A retried enrollment
    /// with this same key (its answer was lost on the way) gets a certificate
    /// again; a replay with any other key is refused.
    #[serde(default)]
    pub enrolled_key: Option<String>,
    /// The serial of the certificate issued at enrollment.
    pub cert_serial: Option<String>,
    pub outcome: Option<ScriptOutcome>,
    /// The byte count the agent reported with its exit.
    pub reported_total: Option<u64>,
    /// What the agent is told when it asks.
    pub instruction: Instruction,
    pub timings: Timings,
    /// What the agent reported when it had sealed the machine; no image is
    /// made of a sealed target without it.
    #[serde(default)]
    pub seal: Option<SealReport>,
    /// What an unwind could not remove yet (a transient cloud error); retried.
    #[serde(default)]
    pub cleanup_pending: Option<String>,
}

impl TargetRecord {
    /// Marks the target failed at its current step; the workflow will unwind.
    pub fn fail(&mut self, reason: FailureReason, message: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some(TargetError { step: self.step, reason, message: message.into() });
        }
    }

    pub fn cloud_name(&self) -> &CloudName {
        &self.cloud.name
    }
}

/// An outstanding enrollment token, keyed by its hash.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRecord {
    pub target: TargetId,
    pub expires_at: Timestamp,
}

/// A certificate issued to an agent, keyed by its serial.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CertRecord {
    pub target: TargetId,
    pub not_after: Timestamp,
}

/// How far a target's masked log is committed. The agent's offsets count the
/// script's raw output; the log file holds it masked, so the two differ.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskCursor {
    /// Raw bytes taken from the agent: its committed offset.
    pub raw: u64,
    /// The log file's length: the masked form of `raw` minus `pending`.
    pub stored: u64,
    /// The last raw bytes, held back because they may begin a secret; only
    /// ever stored sealed.
    pub pending: Vec<u8>,
    /// Set once the exit was reported and the held-back bytes were written.
    #[serde(default)]
    pub ended: bool,
}
