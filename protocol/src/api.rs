//! The public `/v1` HTTP API: what the CLI and the web page send and receive.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::agent::ScriptOutcome;
use crate::{BuildId, CloudName, GeneratorName, TargetId, Timestamp};

/// Which provider drives a cloud.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CloudKind {
    /// Local VMs under QEMU on the coordinator's machine.
    Qemu,
    /// Amazon EC2, or an EC2-compatible cloud (Nimbus, Eucalyptus) at `endpoint`.
    Ec2,
    /// An OpenStack cloud: Keystone v3 at `endpoint`, Nova and Glance from its catalog.
    Openstack,
}

impl CloudKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            CloudKind::Qemu => "qemu",
            CloudKind::Ec2 => "ec2",
            CloudKind::Openstack => "openstack",
        }
    }
}

/// A secret kiln keeps for a cloud's API. Write-only: the API never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged, deny_unknown_fields)]
pub enum CloudCredentials {
    /// EC2: an access key.
    AccessKey { access_key_id: String, secret_access_key: String },
    /// OpenStack: the password of the cloud's `user`.
    Password { password: String },
}

impl std::fmt::Debug for CloudCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::AccessKey { access_key_id, .. } => {
                write!(f, "AccessKey {{ access_key_id: {access_key_id:?}, secret_access_key: <redacted> }}")
            }
            Self::Password { .. } => f.write_str("Password { <redacted> }"),
        }
    }
}

/// A secret value, kept out of `Debug` output: a password given with one
/// build for a cloud that asks every time (in the coordinator's memory for
/// that build only), or a value of a generator's `secret_env`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A configured target cloud.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Cloud {
    pub name: CloudName,
    pub kind: CloudKind,
    /// The region, for kinds that have regions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "\\S")]
    pub region: Option<String>,
    /// The API endpoint, for kinds reached over an API (EC2-compatible, OpenStack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Kind-specific settings; the provider rejects keys it does not know.
    #[serde(default, deserialize_with = "crate::unique::map", skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    /// An access key kiln keeps for this cloud (else the provider's standard
    /// credential chain is used). Accepted on create, never returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CloudCredentials>,
}

/// A generator as the user writes it: one script, and per cloud where to start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GeneratorSpec {
    pub name: GeneratorName,
    #[serde(default)]
    pub description: String,
    /// The customization script; a `#!` line picks its interpreter, else `/bin/sh`.
    /// Not blank, no NUL.
    #[schema(pattern = "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$")]
    pub script: String,
    /// Hard limit for the script's run; the agent kills its whole process group after it.
    #[serde(default, deserialize_with = "crate::whole::optional", skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 86400)]
    pub timeout_secs: Option<u64>,
    /// Environment variables given to the script.
    #[serde(default, deserialize_with = "crate::unique::map", skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(schema_with = env_schema)]
    pub env: BTreeMap<String, String>,
    /// Secret environment variables given to the script, write-only: stored
    /// sealed, given only to the agent's job over mutual TLS, masked as `***`
    /// in the log, and never returned (a revision lists only their names in
    /// `secret_env_names`). Absent: the new revision keeps the previous
    /// revision's secrets; given (even `{}`): it has exactly these. Values
    /// have at least 4 bytes and no NUL; names are not also in `env`.
    #[serde(default, deserialize_with = "crate::unique::optional_map", skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = secret_env_schema)]
    pub secret_env: Option<BTreeMap<String, Secret>>,
    /// Whether the seal generalizes the image so each instance booted from it
    /// is a fresh machine: cloud-init's state and logs, the machine-id, SSH
    /// host keys, apt lists and the hostname go (default `true`). The seal
    /// always removes kiln's own files and zero-fills free space.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generalize: Option<bool>,
    /// Per cloud: the base image and launch options.
    #[serde(deserialize_with = "crate::unique::map")]
    pub targets: BTreeMap<CloudName, TargetSpec>,
}

/// Where a generator starts on one cloud.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    /// An AMI id, a Glance image id, or a local disk file.
    #[schema(pattern = "\\S")]
    pub base_image: String,
    /// Instance type (EC2) or flavor (OpenStack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// Subnet (EC2) or network (OpenStack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Provider-specific launch options.
    #[serde(default, deserialize_with = "crate::unique::map", skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
}

/// An immutable saved version of a generator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Revision {
    pub generator: GeneratorName,
    /// 1 for the first save, then one more for each save.
    pub number: u32,
    pub created_at: Timestamp,
    /// Hex sha256 of the script's bytes.
    pub script_sha256: String,
    /// The spec as saved, without `secret_env` (never returned).
    pub spec: GeneratorSpec,
    /// The names of the revision's secret environment variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_env_names: Vec<String>,
}

/// One line of the generator list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GeneratorSummary {
    pub name: GeneratorName,
    pub description: String,
    pub latest_revision: u32,
    pub updated_at: Timestamp,
    pub clouds: Vec<CloudName>,
}

/// Starts a build of one generator revision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildRequest {
    pub generator: GeneratorName,
    /// The revision to build; the latest when absent.
    #[serde(default, deserialize_with = "crate::whole::optional", skip_serializing_if = "Option::is_none")]
    #[schema(format = Int64, minimum = 1, maximum = 4294967295_i64)]
    pub revision: Option<u32>,
    /// The clouds to build on; all of the generator's clouds when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clouds: Vec<CloudName>,
    /// Passwords of the clouds that ask for theirs at every build. Kept in
    /// memory for this build only: never stored, logged or shown.
    #[serde(default, deserialize_with = "crate::unique::map", skip_serializing_if = "BTreeMap::is_empty")]
    pub passwords: BTreeMap<CloudName, Secret>,
}

/// The state of a build or of one of its targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Submitted,
    Running,
    Successful,
    Failed,
    Cancelled,
}

impl Status {
    /// True once nothing more will happen.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Successful | Status::Failed | Status::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Submitted => "submitted",
            Status::Running => "running",
            Status::Successful => "successful",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }
}

/// The steps of a target's workflow, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Launch,
    AwaitAgent,
    Run,
    Seal,
    Snapshot,
    Record,
    CleanUp,
    Done,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Launch => "launch",
            Step::AwaitAgent => "await_agent",
            Step::Run => "run",
            Step::Seal => "seal",
            Step::Snapshot => "snapshot",
            Step::Record => "record",
            Step::CleanUp => "clean_up",
            Step::Done => "done",
        }
    }
}

/// Why a target did not succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// The script exited non-zero or was killed by a signal.
    ScriptFailed,
    /// The script outlived its timeout and was killed with its children.
    Timeout,
    /// The agent did not phone home in time.
    AgentUnreachable,
    /// The cloud refused or failed a call.
    Provider,
    /// A user cancelled the build.
    Cancelled,
    /// The agent broke the protocol or the coordinator hit an internal error.
    Internal,
    /// The target's spent token came back with a key other than the enrolled
    /// agent's: its user-data has leaked, so nothing is made of the machine.
    EnrollmentConflict,
    /// The VM stopped (or was stopped at the seal limit) before the agent
    /// reported a finished seal, or free space could not be scrubbed: the
    /// disk may still hold secrets, so no image was made.
    SealIncomplete,
    /// The cloud checks instance identity (EC2 `identity_certificate`) and the
    /// enrolling agent's document was missing, not signed by the configured
    /// certificate, or named another instance, region or account.
    IdentityRefused,
    /// The script's output passed the target's log quota (the coordinator's
    /// `--log-quota-bytes`, 1 GiB by default); the log up to it is kept.
    LogQuota,
    /// The coordinator's data directory is full (less free than its
    /// `--disk-reserve-bytes`): the log stops where it was, and is kept.
    DiskFull,
}

/// The failure of one target: where, why, and what to do about it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TargetError {
    pub step: Step,
    pub reason: FailureReason,
    pub message: String,
}

/// When each phase of a target happened.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Timings {
    pub created_at: Option<Timestamp>,
    pub launched_at: Option<Timestamp>,
    pub agent_contact_at: Option<Timestamp>,
    pub script_started_at: Option<Timestamp>,
    pub script_finished_at: Option<Timestamp>,
    pub sealed_at: Option<Timestamp>,
    pub image_ready_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
}

/// What went into an image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Provenance {
    pub build: BuildId,
    pub target: TargetId,
    pub generator: GeneratorName,
    pub revision: u32,
    pub script_sha256: String,
    pub cloud: CloudName,
    pub base_image: String,
}

/// A build's output on one cloud.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Image {
    /// The cloud's id for the image (AMI id, Glance id, file path).
    pub id: String,
    pub name: String,
    pub cloud: CloudName,
    pub created_at: Timestamp,
    /// Bytes the image takes up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Bytes of the disk the image boots as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_size_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub provenance: Provenance,
}

/// One target of a build, as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Target {
    pub id: TargetId,
    pub build: BuildId,
    pub cloud: CloudName,
    pub base_image: String,
    pub status: Status,
    /// The step running now, or the last one when the target has ended.
    pub step: Step,
    /// The cloud's id of the instance, once launched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<Image>,
    /// How the script ended, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<ScriptOutcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TargetError>,
    pub timings: Timings,
    /// Bytes of log committed so far.
    pub log_bytes: u64,
    /// Set while the target unwinds and the cloud keeps refusing to remove
    /// what it made: what is left and the cloud's last answer. Removal is
    /// retried with backoff; the target ends only once it is clean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup_pending: Option<String>,
}

/// A build and its targets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Build {
    pub id: BuildId,
    pub generator: GeneratorName,
    pub revision: u32,
    pub script_sha256: String,
    pub created_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// Derived from the targets: failed if any failed, successful when all did.
    pub status: Status,
    pub cancel_requested: bool,
    pub targets: Vec<Target>,
}

/// Filters for the build list.
#[derive(Clone, Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BuildListQuery {
    /// Only builds of this generator.
    pub generator: Option<GeneratorName>,
    /// At most this many builds, newest first (default 50, from 1 to
    /// [`MAX_BUILD_LIST`]; other values are refused).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// A byte range of a target's log.
#[derive(Clone, Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogRange {
    /// First byte to return (default 0); at most the bytes committed, else 416.
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    pub offset: Option<u64>,
    /// At most this many bytes (default and maximum 8 MiB, [`MAX_LOG_READ`]).
    #[param(minimum = 1, maximum = 8388608)]
    pub limit: Option<u64>,
}

/// The most builds one list returns.
pub const MAX_BUILD_LIST: u32 = 1000;
/// The most log bytes one read returns.
pub const MAX_LOG_READ: u64 = 8 * 1024 * 1024;

/// One server-sent `log` event: bytes of the log from `offset`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LogChunk {
    pub offset: u64,
    /// The bytes, base64 (standard alphabet, padded).
    pub data: String,
}

/// The last server-sent event of a follow: the log is complete.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LogEnd {
    pub total: u64,
    pub status: Status,
}

/// A variable name: letters, digits and `_`, not starting with a digit.
const ENV_NAME: &str = "^[A-Za-z_][A-Za-z0-9_]*$";
/// No NUL (it cannot cross `execve`).
const NO_NUL: &str = "^[^\\u0000]*$";

/// `env`'s schema: names as [`ENV_NAME`], values without NUL.
fn env_schema() -> utoipa::openapi::Object {
    env_map(0)
}

/// `secret_env`'s schema: like `env`, values of at least 4 characters; may be null.
fn secret_env_schema() -> utoipa::openapi::Object {
    let mut o = env_map(4);
    o.schema_type = utoipa::openapi::schema::SchemaType::from_iter([
        utoipa::openapi::schema::Type::Object,
        utoipa::openapi::schema::Type::Null,
    ]);
    o
}

fn env_map(min_value: usize) -> utoipa::openapi::Object {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    let name = ObjectBuilder::new().schema_type(Type::String).pattern(Some(ENV_NAME));
    let mut value = ObjectBuilder::new().schema_type(Type::String).pattern(Some(NO_NUL));
    if min_value > 0 {
        value = value.min_length(Some(min_value));
    }
    ObjectBuilder::new().schema_type(Type::Object).property_names(Some(name)).additional_properties(Some(value)).build()
}

/// What kind of cloud resource the janitor found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    /// A VM: an EC2 instance, a Nova server, a local QEMU instance directory (with its QEMU).
    Instance,
    /// An image: an AMI or its regional copy, a Glance image, a local image directory.
    Image,
    /// An EBS snapshot backing an image.
    Snapshot,
}

impl ResourceKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ResourceKind::Instance => "instance",
            ResourceKind::Image => "image",
            ResourceKind::Snapshot => "snapshot",
        }
    }
}

/// A cloud resource this coordinator made that nothing needs any more.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Garbage {
    /// The configured cloud it was found through.
    pub cloud: CloudName,
    pub kind: ResourceKind,
    /// The cloud's id for it (an instance id, an AMI id, a snapshot id, a path).
    pub id: String,
    /// Its region when that is not the cloud's own (a regional copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The target it was made for, when its tags name one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetId>,
    /// Why it is garbage: its target ended, or this coordinator does not know it.
    pub why: String,
}

/// A removal the cloud refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JanitorFailure {
    pub garbage: Garbage,
    /// The cloud's error.
    pub error: String,
}

/// A cloud the janitor did not look at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JanitorSkip {
    pub cloud: CloudName,
    /// Why, and what to do about it.
    pub why: String,
}

/// One janitor run: what it found (and, unless a dry run, removed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JanitorReport {
    /// True when nothing was removed: `found` is what a run would remove.
    pub dry_run: bool,
    /// A dry run: what would be removed. Otherwise: what was removed.
    pub found: Vec<Garbage>,
    /// What the clouds refused to remove (not a dry run).
    pub failed: Vec<JanitorFailure>,
    /// Clouds not looked at, and clouds that could not be listed.
    pub skipped: Vec<JanitorSkip>,
}
