//! The local cloud: VMs under QEMU on the coordinator's machine.
//!
//! A base image is a disk file (qcow2 or raw) or an image manifest
//! (`image.json`: disk plus optional kernel, initrd and command line for direct
//! boot), such as kiln's tiny image or any image a previous build made. Launch
//! puts a qcow2 overlay on the base and starts QEMU with the NoCloud seed on a
//! read-only `cidata` drive ([`cidata`]) and restricted user-mode networking
//! ([`net`]): nothing connects into the VM, and the VM reaches only kiln's
//! endpoints and, through the egress proxy, what its policy allows. The image
//! is the overlay converted into a standalone qcow2 after the agent sealed the
//! VM and QEMU exited.

mod accel;
mod cidata;
mod image;
mod net;
mod vm;

use kiln_protocol::quote::quote;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use kiln_protocol::api::{Cloud, Provenance, TargetSpec};

pub use image::Manifest;

use self::accel::Accel;
use self::image::{BaseImage, Sources};
use self::net::GuestNetwork;
use super::{
    AgentEndpoints, ImageId, ImageProgress, InstanceId, InstanceState, Launch, Provider, ProviderError,
    ProviderErrorKind, ScriptNetwork, Served,
};
use crate::config::Config;
use crate::egress::Policy;

/// The cloud options a `qemu` cloud understands.
const CLOUD_OPTIONS: &[&str] =
    &["memory_mib", "cpus", "accel", "coordinator_host", "egress", "egress_allow", "console_max_mib"];
/// The launch options a `qemu` target understands (direct boot overrides, egress).
const TARGET_OPTIONS: &[&str] = &["kernel", "initrd", "append", "egress", "egress_allow"];

/// Runs VMs under `root/instances` and keeps images in `images`.
#[derive(Debug)]
pub struct QemuProvider {
    root: PathBuf,
    images: PathBuf,
    /// Where base images, kernels and initrds may come from.
    sources: Sources,
    net: GuestNetwork,
    accel: tokio::sync::OnceCell<Accel>,
}

/// What a cloud's options ask for.
#[derive(Debug, Clone)]
struct Settings {
    memory_mib: u32,
    cpus: u32,
    accel: Option<Accel>,
    /// How much of a VM's serial console is kept (its newest part).
    console_max_mib: u32,
}

fn invalid(message: impl Into<String>) -> ProviderError {
    ProviderError::new(ProviderErrorKind::Invalid, message)
}

fn failed(message: impl Into<String>) -> ProviderError {
    ProviderError::new(ProviderErrorKind::Failed, message)
}

impl Settings {
    fn of(cloud: &Cloud) -> Result<Self, ProviderError> {
        if let Some(key) = cloud.options.keys().find(|k| !CLOUD_OPTIONS.contains(&k.as_str())) {
            return Err(invalid(format!(
                "qemu clouds have no option {}; they know {}",
                quote(key),
                CLOUD_OPTIONS.join(", ")
            )));
        }
        let number = |key: &str, default: u32, max: u32| -> Result<u32, ProviderError> {
            match cloud.options.get(key) {
                None => Ok(default),
                Some(v) => v.parse().ok().filter(|n| (1..=max).contains(n)).ok_or_else(|| {
                    invalid(format!("option {key} is {}; give a whole number from 1 to {max}", quote(v)))
                }),
            }
        };
        let accel = match cloud.options.get("accel").map(String::as_str) {
            None | Some("auto") => None,
            Some("kvm") => Some(Accel::Kvm),
            Some("tcg") => Some(Accel::Tcg),
            Some(other) => return Err(invalid(format!("option accel is {}; use auto, kvm or tcg", quote(other)))),
        };
        Policy::from_options(&cloud.options).map_err(|e| invalid(e.to_string()))?;
        Ok(Self {
            memory_mib: number("memory_mib", 512, 65536)?,
            cpus: number("cpus", 1, 64)?,
            accel,
            console_max_mib: number("console_max_mib", 8, 1024)?,
        })
    }
}

/// Checks a `qemu` cloud at `cloud add`: its options, and that it names no
/// region or endpoint (its VMs run on this machine).
pub fn check_cloud(cloud: &Cloud) -> Result<(), ProviderError> {
    if cloud.region.is_some() || cloud.endpoint.is_some() {
        return Err(invalid(
            "qemu clouds take neither a region nor an endpoint: their VMs run on this machine; leave both out",
        ));
    }
    Settings::of(cloud).map(drop)
}

impl QemuProvider {
    /// A provider keeping its VMs under `<data>/qemu` and images under
    /// `<data>/images`, whose VMs reach the coordinator through its guest sockets.
    pub fn new(config: &Config) -> Self {
        let data = &config.data_dir;
        Self {
            root: data.join("qemu"),
            images: config.images_dir(),
            sources: Sources::new(config),
            net: GuestNetwork::new(config),
            accel: tokio::sync::OnceCell::new(),
        }
    }

    fn instance_dir(&self, instance: &InstanceId) -> PathBuf {
        self.root.join("instances").join(&instance.0)
    }

    async fn accel(&self, settings: &Settings) -> Result<Accel, ProviderError> {
        if let Some(a) = settings.accel {
            return Ok(a);
        }
        let cache = self.root.join("accel");
        Ok(*self.accel.get_or_init(|| accel::probe(cache)).await)
    }

    fn check_target(spec: &TargetSpec) -> Result<(), ProviderError> {
        if let Some(key) = spec.options.keys().find(|k| !TARGET_OPTIONS.contains(&k.as_str())) {
            return Err(invalid(format!(
                "qemu targets have no launch option {}; they know {}",
                quote(key),
                TARGET_OPTIONS.join(", ")
            )));
        }
        if spec.instance_type.is_some() || spec.network.is_some() {
            return Err(invalid(
                "qemu targets take no instance type or network: size VMs with the cloud's memory_mib and cpus options",
            ));
        }
        Policy::from_options(&spec.options).map_err(|e| invalid(e.to_string()))?;
        Ok(())
    }
}

#[async_trait]
impl Provider for QemuProvider {
    fn check_cloud(&self, cloud: &Cloud) -> Result<(), ProviderError> {
        check_cloud(cloud)
    }

    fn endpoints(&self, cloud: &Cloud, _served: &Served) -> AgentEndpoints {
        self.net.endpoints(cloud.options.get("coordinator_host").map(String::as_str))
    }

    fn script_network(&self, _cloud: &Cloud) -> Option<ScriptNetwork> {
        Some(self.net.script_network())
    }

    async fn preflight(&self, cloud: &Cloud, spec: &TargetSpec) -> Result<(), ProviderError> {
        vm::check_installed()?;
        if !self.net.relay().exists() {
            return Err(invalid(format!(
                "the relay QEMU runs for guest connections, {}, does not exist: run kiln from its build directory or install it next to kiln-agent",
                self.net.relay().display()
            )));
        }
        Settings::of(cloud)?;
        Self::check_target(spec)?;
        BaseImage::resolve(spec, &self.sources).await?;
        Ok(())
    }

    async fn launch(&self, launch: &Launch<'_>) -> Result<InstanceId, ProviderError> {
        let instance = InstanceId(format!("qemu-{}", launch.target));
        let dir = self.instance_dir(&instance);
        if vm::pid(&dir).is_some() {
            return Ok(instance);
        }
        let settings = Settings::of(launch.cloud)?;
        // Checked again: the files may have changed since preflight.
        let base = BaseImage::resolve(launch.spec, &self.sources).await?;
        let accel = self.accel(&settings).await?;
        let seed = cidata::image(&cidata::files(launch.target, &launch.user_data))?;
        let spec = vm::VmSpec {
            dir: &dir,
            base: &base,
            accel,
            memory_mib: settings.memory_mib,
            cpus: settings.cpus,
            netdev: self.net.netdev("net0", launch.target, &dir.join("relays")),
            name: &launch.name,
        };
        vm::start(&spec, cidata::memfd(&seed)?).await?;
        Ok(instance)
    }

    async fn state(&self, cloud: &Cloud, instance: &InstanceId) -> Result<InstanceState, ProviderError> {
        let dir = self.instance_dir(instance);
        Ok(if vm::pid(&dir).is_some() {
            // Each poll of a running VM keeps its console within bounds.
            let max = Settings::of(cloud).map_or(8, |s| s.console_max_mib);
            vm::cap_console(&dir, u64::from(max) << 20);
            InstanceState::Running
        } else if dir.join(vm::OVERLAY).exists() {
            InstanceState::Stopped
        } else {
            InstanceState::Gone
        })
    }

    async fn console_tail(&self, _cloud: &Cloud, instance: &InstanceId) -> Result<String, ProviderError> {
        vm::console_tail(&self.instance_dir(instance))
    }

    async fn stop(&self, _cloud: &Cloud, instance: &InstanceId) -> Result<(), ProviderError> {
        vm::kill(&self.instance_dir(instance), nix::sys::signal::Signal::SIGTERM).await;
        Ok(())
    }

    async fn start_image(
        &self,
        _cloud: &Cloud,
        instance: &InstanceId,
        name: &str,
        provenance: &Provenance,
    ) -> Result<ImageId, ProviderError> {
        let dir = self.instance_dir(instance);
        let base = BaseImage::from_instance(&dir)?;
        let out = self.images.join(name);
        image::prepare(&out, &dir.join(vm::OVERLAY), &base, name, provenance)?;
        Ok(ImageId(out.display().to_string()))
    }

    async fn image_state(&self, _cloud: &Cloud, image: &ImageId) -> Result<ImageProgress, ProviderError> {
        image::finish(Path::new(&image.0)).await.map(ImageProgress::Ready)
    }

    async fn terminate(&self, _cloud: &Cloud, instance: &InstanceId) -> Result<(), ProviderError> {
        let dir = self.instance_dir(instance);
        vm::kill(&dir, nix::sys::signal::Signal::SIGKILL).await;
        remove_dir(&dir)
    }

    async fn delete_image(&self, _cloud: &Cloud, image: &ImageId) -> Result<(), ProviderError> {
        let dir = Path::new(&image.0);
        if !dir.starts_with(&self.images) {
            return Err(invalid(format!("{} is not in kiln's image store", dir.display())));
        }
        remove_dir(dir)
    }
}

/// Removes a directory tree; one that is already gone counts as removed.
fn remove_dir(dir: &Path) -> Result<(), ProviderError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(failed(format!("cannot remove {}: {e}", dir.display()))),
    }
}
