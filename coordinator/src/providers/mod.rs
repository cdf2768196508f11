//! Clouds behind one trait: one module per cloud kind implements [`Provider`].
//!
//! The workflow calls these; nothing else in the coordinator knows a cloud's
//! API. Every method is safe to call again after a crash: `launch` for the same
//! target returns the same instance, and `terminate` / `delete_image` treat
//! "not found" as success.

pub mod ec2;
pub mod openstack;
pub mod owner;
pub mod qemu;

pub use kiln_protocol::api::ResourceKind;
pub use owner::CoordinatorId;

use kiln_protocol::quote::quote;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kiln_protocol::agent::{InstanceIdentity, Instruction};
use kiln_protocol::api::{Cloud, CloudKind, Provenance, TargetSpec};
use kiln_protocol::{BuildId, TargetId};

/// A cloud's id for an instance (an EC2 instance id, a Nova server id, a pid).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct InstanceId(pub String);

/// A cloud's id for an image (an AMI id, a Glance image id, a file path).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageId(pub String);

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a provider needs to start one target's instance.
#[derive(Debug)]
pub struct Launch<'a> {
    pub target: TargetId,
    pub build: BuildId,
    pub cloud: &'a Cloud,
    pub spec: &'a TargetSpec,
    /// The rendered user-data: a shell script that fetches and starts the agent.
    pub user_data: String,
    /// How the instance reaches the coordinator.
    pub endpoints: AgentEndpoints,
    /// A human-readable instance name.
    pub name: String,
    pub provenance: &'a Provenance,
}

/// What the coordinator's listeners look like from where kiln runs.
#[derive(Clone, Debug)]
pub struct Served {
    /// The host name or address instances should use by default.
    pub public_host: String,
    pub agent_port: u16,
    pub bootstrap_port: u16,
}

/// The URLs an instance uses to reach the coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentEndpoints {
    /// Base URL of the mTLS agent listener.
    pub agent_url: String,
    /// Base URL of the plain-HTTP bootstrap listener.
    pub bootstrap_url: String,
}

impl AgentEndpoints {
    /// The endpoints at `host` on the served ports.
    pub fn at(host: &str, served: &Served) -> Self {
        let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_owned() };
        Self {
            agent_url: format!("https://{host}:{}", served.agent_port),
            bootstrap_url: format!("http://{host}:{}", served.bootstrap_port),
        }
    }

    /// Where the agent binary is downloaded from.
    pub fn agent_binary_url(&self) -> String {
        format!("{}{}", self.bootstrap_url, kiln_protocol::agent::paths::AGENT_BINARY)
    }
}

/// How a script reaches the network when its VM has no route of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScriptNetwork {
    /// The egress proxy's URL as the guest sees it.
    pub proxy: String,
    /// Hosts reached without it.
    pub no_proxy: Vec<String>,
}

/// The state of an instance as the cloud reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstanceState {
    Pending,
    Running,
    Stopped,
    /// Terminated, or never existed.
    Gone,
}

/// What a provider learned about a finished image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageInfo {
    /// Bytes the image takes up.
    pub size_bytes: Option<u64>,
    /// Bytes of the disk the image boots as.
    pub virtual_size_bytes: Option<u64>,
    pub sha256: Option<String>,
}

/// Where an image being made stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageProgress {
    /// Still being made (or copied).
    Pending,
    /// Usable, with what the cloud says about it.
    Ready(ImageInfo),
}

/// How a cloud call failed, which decides what the workflow does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderErrorKind {
    /// The thing does not exist.
    NotFound,
    /// The request was wrong: the user must change the cloud or the generator.
    Invalid,
    /// Throttling, timeouts, 5xx: worth retrying with backoff.
    Transient,
    /// Anything else.
    Failed,
}

/// A failed cloud call, with the cloud's own error code when it has one.
#[derive(Debug, thiserror::Error)]
#[error("{}{message}", code.as_ref().map(|c| format!("{c}: ")).unwrap_or_default())]
pub struct ProviderError {
    pub kind: ProviderErrorKind,
    pub code: Option<String>,
    /// What happened and what to fix.
    pub message: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ProviderError {
    pub fn new(kind: ProviderErrorKind, message: impl Into<String>) -> Self {
        Self { kind, code: None, message: message.into(), source: None }
    }

    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    pub fn is_transient(&self) -> bool {
        self.kind == ProviderErrorKind::Transient
    }
}

/// A resource this coordinator made, as its cloud lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedResource {
    pub kind: ResourceKind,
    /// The cloud's id for it (an instance id, an AMI id, a snapshot id, a path).
    pub id: String,
    /// The target it was made for, from its `kiln:target` tag; `None` when
    /// the tag is missing or unreadable.
    pub target: Option<TargetId>,
    /// For a regional copy or a snapshot: the image it copies or backs.
    pub source_image: Option<String>,
    /// Where it lives when that is not the cloud's own region (a copy's region).
    pub region: Option<String>,
}

/// Why an enrolling agent's instance identity was refused: the message says
/// what was wrong and what to check.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct IdentityRefused(pub String);

/// One kind of cloud.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Checks what can be checked before a build starts (the base image
    /// exists, the options are known), so a bad build is refused up front.
    async fn preflight(&self, cloud: &Cloud, spec: &TargetSpec) -> Result<(), ProviderError>;

    /// The URLs the instance uses to reach the coordinator. By default the
    /// cloud's `coordinator_host` option, else the coordinator's public host.
    fn endpoints(&self, cloud: &Cloud, served: &Served) -> AgentEndpoints {
        let host = cloud.options.get("coordinator_host").unwrap_or(&served.public_host);
        AgentEndpoints::at(host, served)
    }

    /// Checks a cloud's settings when it is added, so a bad option is a 400
    /// at `cloud add` rather than a failed build later.
    fn check_cloud(&self, _cloud: &Cloud) -> Result<(), ProviderError> {
        Ok(())
    }

    /// Whether this cloud checks the instance identity an agent sends at
    /// enrollment; if so the user-data asks the agent to send it.
    fn checks_identity(&self, _cloud: &Cloud) -> bool {
        false
    }

    /// Checks the cloud-signed identity an enrolling agent sent against the
    /// instance launched for its target. `Ok(None)`: this cloud checks none.
    fn check_identity(
        &self,
        _cloud: &Cloud,
        _instance: Option<&InstanceId>,
        _identity: Option<&InstanceIdentity>,
    ) -> Result<Option<String>, IdentityRefused> {
        Ok(None)
    }

    /// The egress proxy the script must use, on clouds whose VMs reach the
    /// network only through kiln.
    fn script_network(&self, _cloud: &Cloud) -> Option<ScriptNetwork> {
        None
    }

    /// How often the workflow asks this cloud about an instance; `None` for
    /// the coordinator's default. Each ask may be an API call.
    fn poll_interval(&self, _cloud: &Cloud) -> Option<Duration> {
        None
    }

    /// What the agent is told after a successful script: `Seal` on real
    /// clouds; test beds that run the agent on the host say `Finish`.
    fn after_script(&self) -> Instruction {
        Instruction::Seal
    }

    /// Starts an instance for `launch.target`; idempotent per target.
    async fn launch(&self, launch: &Launch<'_>) -> Result<InstanceId, ProviderError>;

    async fn state(&self, cloud: &Cloud, instance: &InstanceId) -> Result<InstanceState, ProviderError>;

    /// The last lines of the instance's console, for error messages.
    async fn console_tail(&self, cloud: &Cloud, instance: &InstanceId) -> Result<String, ProviderError>;

    /// Stops an instance that did not power itself off.
    async fn stop(&self, cloud: &Cloud, instance: &InstanceId) -> Result<(), ProviderError>;

    /// Starts turning a stopped instance into an image and returns its id at
    /// once, so the id is recorded before the wait and can be undone.
    async fn start_image(
        &self,
        cloud: &Cloud,
        instance: &InstanceId,
        name: &str,
        provenance: &Provenance,
    ) -> Result<ImageId, ProviderError>;

    /// One look at an image being made (one API call where the cloud allows;
    /// on EC2 also one step of each regional copy). The workflow polls this,
    /// so a transient error costs one poll, not the whole wait. A failed
    /// image is an error.
    async fn image_state(&self, cloud: &Cloud, image: &ImageId) -> Result<ImageProgress, ProviderError>;

    /// The longest an image may take to become usable after `start_image`.
    fn image_timeout(&self, _cloud: &Cloud) -> Duration {
        Duration::from_secs(3600)
    }

    /// Terminates an instance; "not found" is success.
    async fn terminate(&self, cloud: &Cloud, instance: &InstanceId) -> Result<(), ProviderError>;

    /// Deletes an image and what backs it; "not found" is success.
    async fn delete_image(&self, cloud: &Cloud, image: &ImageId) -> Result<(), ProviderError>;

    /// Everything this coordinator made on `cloud` that still exists:
    /// instances, images (with their regional copies) and snapshots, found by
    /// the coordinator's tag (or, on the local cloud, under its data directory).
    async fn owned(&self, cloud: &Cloud) -> Result<Vec<OwnedResource>, ProviderError>;

    /// Removes one resource [`Provider::owned`] listed; "not found" is success.
    async fn remove(&self, cloud: &Cloud, resource: &OwnedResource) -> Result<(), ProviderError>;
}

/// The providers this coordinator has, by cloud kind.
#[derive(Clone, Default)]
pub struct Providers {
    by_kind: HashMap<CloudKind, Arc<dyn Provider>>,
}

impl fmt::Debug for Providers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.by_kind.keys()).finish()
    }
}

impl Providers {
    /// No providers; add them with [`Providers::with`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Uses `provider` for clouds of `kind`.
    pub fn with(mut self, kind: CloudKind, provider: Arc<dyn Provider>) -> Self {
        self.by_kind.insert(kind, provider);
        self
    }

    pub fn get(&self, kind: CloudKind) -> Option<Arc<dyn Provider>> {
        self.by_kind.get(&kind).cloned()
    }
}

/// Checks a cloud's API endpoint: an absolute http(s) URL with a host.
pub fn check_endpoint(endpoint: &str) -> Result<(), ProviderError> {
    let bad = |why: &str| {
        ProviderError::new(
            ProviderErrorKind::Invalid,
            format!("the endpoint {} {why}; give an http(s) URL, e.g. https://api.example:8443", quote(endpoint)),
        )
    };
    let url = reqwest::Url::parse(endpoint).map_err(|e| bad(&format!("is not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("is not an http(s) URL"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("carries credentials; give them as the cloud's credentials instead"));
    }
    Ok(())
}

/// A cloud option given in seconds (fractions allowed), or `default`.
pub fn seconds_option(
    options: &std::collections::BTreeMap<String, String>,
    key: &str,
    default: f64,
) -> Result<Duration, ProviderError> {
    match options.get(key) {
        None => Ok(Duration::from_secs_f64(default)),
        Some(v) => {
            v.parse::<f64>().ok().filter(|s| *s > 0.0 && *s <= 86_400.0).map(Duration::from_secs_f64).ok_or_else(|| {
                ProviderError::new(
                    ProviderErrorKind::Invalid,
                    format!("option {key} is {}; give seconds, e.g. 10", quote(v)),
                )
            })
        }
    }
}
