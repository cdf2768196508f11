//! The process provider: an "instance" is the real user-data run by `sh` on
//! this machine, which downloads, checks and runs the real static agent.
//!
//! It is confined: the agent directory is a temporary directory
//! (`KILN_AGENT_DIR`), the agent is told never to power off
//! (`KILN_AGENT_NEVER_POWEROFF=1`), and the provider asks the coordinator to
//! send `Finish`, never `Seal`. An "image" is a file holding a digest of what
//! the instance left in its directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;

use async_trait::async_trait;
use kiln_coordinator::providers::{
    AgentEndpoints, ImageId, ImageInfo, ImageProgress, InstanceId, InstanceState, Launch, Provider, ProviderError,
    ProviderErrorKind, Served,
};
use kiln_protocol::agent::Instruction;
use kiln_protocol::api::{Cloud, Provenance, TargetSpec};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

/// Base image name that launches an instance which never runs its user-data
/// (an image without cloud-init or boot hook).
pub const IDLE_IMAGE: &str = "idle";
/// Base image name that preflight refuses, as a cloud refuses a missing image.
pub const MISSING_IMAGE: &str = "missing";

struct Instance {
    child: tokio::process::Child,
    dir: PathBuf,
    user_data: String,
}

/// Runs instances as local processes under `root`.
pub struct ProcessProvider {
    root: PathBuf,
    /// When set, instances reach the agent listener here (e.g. through a proxy).
    agent_url: Mutex<Option<String>>,
    instances: Mutex<HashMap<String, Instance>>,
}

impl ProcessProvider {
    pub fn new(root: &Path) -> Self {
        std::fs::create_dir_all(root.join("images")).expect("create provider root");
        Self { root: root.to_owned(), agent_url: Mutex::default(), instances: Mutex::default() }
    }

    /// Sends agents to `url` instead of the agent listener itself.
    pub fn route_agents_through(&self, url: String) {
        *self.agent_url.lock().unwrap() = Some(url);
    }

    /// Instances launched and not terminated.
    pub fn live_instances(&self) -> Vec<String> {
        self.instances.lock().unwrap().keys().cloned().collect()
    }

    /// The process id of an instance (after the user-data execs the agent, the agent's).
    pub fn pid(&self, instance: &str) -> Option<u32> {
        self.instances.lock().unwrap().get(instance).and_then(|i| i.child.id())
    }

    /// The user-data an instance was launched with.
    pub fn user_data(&self, instance: &str) -> Option<String> {
        self.instances.lock().unwrap().get(instance).map(|i| i.user_data.clone())
    }

    /// Image files present in the image store.
    pub fn images(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> =
            std::fs::read_dir(self.root.join("images")).unwrap().map(|e| e.unwrap().path()).collect();
        out.sort();
        out
    }

    fn instance_dir(&self, id: &str) -> PathBuf {
        self.root.join("instances").join(id)
    }
}

fn not_found(what: String) -> ProviderError {
    ProviderError::new(ProviderErrorKind::NotFound, what)
}

fn kill_group(child: &tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

#[async_trait]
impl Provider for ProcessProvider {
    /// The qemu kind's rules, which this provider stands in for, plus
    /// `ask_password` (tests use it for a cloud that asks at every build).
    fn check_cloud(&self, cloud: &Cloud) -> Result<(), ProviderError> {
        let mut qemu = cloud.clone();
        qemu.options.remove("ask_password");
        kiln_coordinator::providers::qemu::check_cloud(&qemu)
    }

    async fn preflight(&self, _cloud: &Cloud, spec: &TargetSpec) -> Result<(), ProviderError> {
        if spec.base_image == MISSING_IMAGE {
            return Err(ProviderError::new(
                ProviderErrorKind::Invalid,
                format!("base image {} does not exist", spec.base_image),
            )
            .with_code("ImageNotFound"));
        }
        Ok(())
    }

    fn endpoints(&self, _cloud: &Cloud, served: &Served) -> AgentEndpoints {
        let mut e = AgentEndpoints::at("127.0.0.1", served);
        if let Some(url) = self.agent_url.lock().unwrap().clone() {
            e.agent_url = url;
        }
        e
    }

    fn after_script(&self) -> Instruction {
        Instruction::Finish
    }

    async fn launch(&self, launch: &Launch<'_>) -> Result<InstanceId, ProviderError> {
        let id = format!("proc-{}", launch.target);
        if self.instances.lock().unwrap().contains_key(&id) {
            return Ok(InstanceId(id));
        }
        let dir = self.instance_dir(&id);
        std::fs::create_dir_all(&dir).map_err(|e| ProviderError::new(ProviderErrorKind::Failed, e.to_string()))?;
        std::fs::write(dir.join("user-data"), &launch.user_data)
            .map_err(|e| ProviderError::new(ProviderErrorKind::Failed, e.to_string()))?;
        let console = std::fs::File::create(dir.join("console.log"))
            .map_err(|e| ProviderError::new(ProviderErrorKind::Failed, e.to_string()))?;
        let mut cmd = if launch.spec.base_image == IDLE_IMAGE {
            let mut c = tokio::process::Command::new("sleep");
            c.arg("3600");
            c
        } else {
            let mut c = tokio::process::Command::new("sh");
            c.arg(dir.join("user-data"));
            c
        };
        cmd.current_dir(&dir)
            .env("KILN_AGENT_DIR", dir.join("agent"))
            .env("KILN_AGENT_NEVER_POWEROFF", "1")
            .stdin(Stdio::null())
            .stdout(console.try_clone().expect("clone console"))
            .stderr(console)
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|e| ProviderError::new(ProviderErrorKind::Failed, e.to_string()))?;
        self.instances.lock().unwrap().insert(id.clone(), Instance { child, dir, user_data: launch.user_data.clone() });
        Ok(InstanceId(id))
    }

    async fn state(&self, _cloud: &Cloud, instance: &InstanceId) -> Result<InstanceState, ProviderError> {
        let mut instances = self.instances.lock().unwrap();
        let Some(i) = instances.get_mut(&instance.0) else {
            return Ok(InstanceState::Gone);
        };
        Ok(match i.child.try_wait() {
            Ok(None) => InstanceState::Running,
            _ => InstanceState::Stopped,
        })
    }

    async fn console_tail(&self, _cloud: &Cloud, instance: &InstanceId) -> Result<String, ProviderError> {
        std::fs::read_to_string(self.instance_dir(&instance.0).join("console.log"))
            .map_err(|_| not_found(format!("instance {instance}")))
    }

    async fn stop(&self, _cloud: &Cloud, instance: &InstanceId) -> Result<(), ProviderError> {
        let instances = self.instances.lock().unwrap();
        let i = instances.get(&instance.0).ok_or_else(|| not_found(format!("instance {instance}")))?;
        kill_group(&i.child);
        Ok(())
    }

    async fn start_image(
        &self,
        _cloud: &Cloud,
        instance: &InstanceId,
        name: &str,
        provenance: &Provenance,
    ) -> Result<ImageId, ProviderError> {
        let dir = self.instances.lock().unwrap().get(&instance.0).map(|i| i.dir.clone());
        let dir = dir.ok_or_else(|| not_found(format!("instance {instance}")))?;
        let mut listing = format!("image {name} of {instance}\nprovenance {provenance:?}\n");
        for entry in walk(&dir) {
            listing.push_str(&format!("{}\n", entry.strip_prefix(&dir).unwrap().display()));
        }
        let path = self.root.join("images").join(format!("{name}.img"));
        std::fs::write(&path, listing).map_err(|e| ProviderError::new(ProviderErrorKind::Failed, e.to_string()))?;
        Ok(ImageId(path.display().to_string()))
    }

    async fn image_state(&self, _cloud: &Cloud, image: &ImageId) -> Result<ImageProgress, ProviderError> {
        let bytes = std::fs::read(&image.0).map_err(|_| not_found(format!("image {image}")))?;
        Ok(ImageProgress::Ready(ImageInfo {
            size_bytes: Some(bytes.len() as u64),
            virtual_size_bytes: None,
            sha256: Some(hex::encode(Sha256::digest(&bytes))),
        }))
    }

    async fn terminate(&self, _cloud: &Cloud, instance: &InstanceId) -> Result<(), ProviderError> {
        let removed = self.instances.lock().unwrap().remove(&instance.0);
        if let Some(mut i) = removed {
            kill_group(&i.child);
            let _ = i.child.wait().await;
            let _ = std::fs::remove_dir_all(&i.dir);
        }
        Ok(())
    }

    async fn delete_image(&self, _cloud: &Cloud, image: &ImageId) -> Result<(), ProviderError> {
        match std::fs::remove_file(&image.0) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ProviderError::new(ProviderErrorKind::Failed, e.to_string())),
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out.sort();
    out
}
