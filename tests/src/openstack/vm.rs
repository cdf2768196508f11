//! Servers' VMs and createImage's conversions, using the EC2 bed's disk and QEMU pieces.
//!
//! A server boots from its image: a base image's manifest (kernel, initrd,
//! append, disk) or a createImage qcow2 with the kernel, initrd and append of
//! the image it came from; its own disk is a qcow2 overlay in
//! `work/servers/<id>/`. QEMU exiting makes the server SHUTOFF (ERROR when QEMU
//! failed); os-stop ends QEMU with SIGTERM, a delete with SIGKILL.

use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use jiff::Timestamp;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::metadata::{self, Info};
use super::state::{Backing, Power, Server, Shared, VmHandle};
use crate::ec2::vm::{self as ec2vm, BaseDisk};

/// How long QEMU may take to end after SIGTERM before it gets SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a createImage image stays `queued` before it starts `saving`.
const QUEUED: Duration = Duration::from_millis(300);

enum End {
    /// QEMU exited by itself: the guest powered off, or QEMU failed.
    Exited(ExitStatus),
    /// Ended by os-stop, a delete or the fake going away.
    Ended,
}

/// Starts the server's VM task (its state lock is held by the caller).
pub(super) fn boot(shared: &Arc<Shared>, server: &mut Server) {
    let cancel = shared.stop.child_token();
    server.vm = Some(VmHandle { cancel: cancel.clone(), pid: None });
    tokio::spawn(run(shared.clone(), server.id.clone(), cancel));
}

async fn run(shared: Arc<Shared>, id: String, cancel: CancellationToken) {
    let end = life(&shared, &id, &cancel).await;
    let mut state = shared.state.lock().unwrap();
    let Some(s) = state.servers.get_mut(&id) else { return };
    s.vm = None;
    s.updated = Timestamp::now();
    if matches!(s.task, Some("spawning" | "powering-on" | "powering-off")) {
        s.task = None;
    }
    if s.deleted {
        // A createImage in progress has the overlay open already, or fails (its image is killed).
        let _ = std::fs::remove_dir_all(&s.dir);
        s.power = Power::Off;
        s.task = None;
    } else {
        s.power = match end {
            Ok(End::Exited(status)) if !status.success() && s.power != Power::Stopping => {
                let qemu = std::fs::read_to_string(s.dir.join("qemu.log")).unwrap_or_default();
                Power::Error(format!("QEMU exited with {status}: {}", qemu.trim()))
            }
            Ok(_) => Power::Off,
            Err(e) => Power::Error(format!("{e:#}")),
        };
    }
    tracing::info!(target: "kiln_tests::openstack", server = %id, power = ?s.power, "VM ended");
    shared.bump();
}

/// Prepares the server's disk and metadata service, runs QEMU and waits until it ends.
async fn life(shared: &Shared, id: &str, cancel: &CancellationToken) -> anyhow::Result<End> {
    let (disk, dir, image_id, info, log) = {
        let state = shared.state.lock().unwrap();
        let s = state.servers.get(id).context("the server is gone")?;
        let info = Info {
            uuid: s.id.clone(),
            name: s.name.clone(),
            project_id: s.tenant_id.clone(),
            meta: s.metadata.clone(),
            user_data: s.user_data.clone(),
        };
        (s.disk.clone(), s.dir.clone(), s.image_id.clone(), info, s.metadata_log.clone())
    };
    let disk = match disk {
        Some(disk) => disk,
        None => {
            let base = {
                let state = shared.state.lock().unwrap();
                match state.images.get(&image_id).map(|i| &i.backing) {
                    Some(Backing::Base(disk) | Backing::Snapshot(disk)) => disk.clone(),
                    _ => bail!("image {image_id} has no data"),
                }
            };
            std::fs::create_dir_all(&dir)?;
            let own = tokio::select! {
                r = ec2vm::prepare_disk(&base, &dir, false) => r?,
                () = cancel.cancelled() => return Ok(End::Ended),
            };
            if let Some(s) = shared.state.lock().unwrap().servers.get_mut(id) {
                s.disk = Some(own.clone());
            }
            own
        }
    };
    let ports = ec2vm::coordinator_ports(info.user_data.as_deref().unwrap_or_default());
    let service = metadata::Service::start(info, log, cancel.child_token()).await?;
    let mut child = ec2vm::qemu(&disk, &dir, service.port, &ports)?.spawn().context("spawn qemu-system-x86_64")?;
    {
        let mut state = shared.state.lock().unwrap();
        if let Some(s) = state.servers.get_mut(id) {
            if let Some(vm) = &mut s.vm {
                vm.pid = child.id();
            }
            if !s.deleted && s.power != Power::Stopping {
                s.power = Power::Running;
                s.task = None;
            }
            s.launched.get_or_insert_with(Timestamp::now);
            s.updated = Timestamp::now();
        }
        shared.bump();
    }
    tracing::info!(target: "kiln_tests::openstack", server = %id, "VM started");
    tokio::select! {
        status = child.wait() => Ok(End::Exited(status?)),
        () = cancel.cancelled() => {
            end(shared, id, &mut child).await;
            Ok(End::Ended)
        }
    }
}

/// Ends QEMU (and its `nc` children): SIGTERM first for os-stop, SIGKILL for a delete or a shutdown.
async fn end(shared: &Shared, id: &str, child: &mut Child) {
    let Some(pid) = child.id().map(|p| Pid::from_raw(p as i32)) else { return };
    let graceful = !shared.stop.is_cancelled()
        && shared.state.lock().unwrap().servers.get(id).is_some_and(|s| !s.deleted && s.power == Power::Stopping);
    if graceful {
        let _ = killpg(pid, Signal::SIGTERM);
        if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok() {
            let _ = killpg(pid, Signal::SIGKILL); // leftover nc
            return;
        }
    }
    let _ = killpg(pid, Signal::SIGKILL);
    let _ = tokio::time::timeout(STOP_GRACE, child.wait()).await;
}

/// createImage's work: queued, then saving while `qemu-img convert` makes the stopped
/// server's disk a standalone qcow2 (for at least `image_saving`), then active (or killed).
pub(super) async fn snapshot(shared: Arc<Shared>, image_id: String, server_id: String) {
    let result = tokio::select! {
        r = convert(&shared, &image_id, &server_id) => r,
        () = shared.stop.cancelled() => return,
    };
    let mut guard = shared.state.lock().unwrap();
    let state = &mut *guard;
    if let Some(s) = state.servers.get_mut(&server_id) {
        s.task = None;
        s.updated = Timestamp::now();
    }
    let Some(image) = state.images.get_mut(&image_id) else { return };
    image.updated = Timestamp::now();
    match result {
        Ok(done) if image.deleted => {
            let _ = std::fs::remove_file(&done.disk.disk);
        }
        Ok(done) => {
            image.status = "active";
            image.size = Some(done.size);
            image.virtual_size = Some(done.virtual_size);
            image.checksum = Some(done.md5);
            image.sha512 = Some(done.sha512);
            image.backing = Backing::Snapshot(done.disk);
            tracing::info!(target: "kiln_tests::openstack", image = %image_id, "image active");
        }
        Err(e) => {
            tracing::warn!(target: "kiln_tests::openstack", image = %image_id, "createImage failed: {e:#}");
            image.status = "killed";
            let _ = std::fs::remove_file(image_file(&shared, &image_id));
        }
    }
    shared.bump();
}

struct Converted {
    disk: BaseDisk,
    size: u64,
    virtual_size: u64,
    md5: String,
    sha512: String,
}

fn image_file(shared: &Shared, image_id: &str) -> std::path::PathBuf {
    shared.work.join("images").join(format!("{image_id}.qcow2"))
}

async fn convert(shared: &Shared, image_id: &str, server_id: &str) -> anyhow::Result<Converted> {
    tokio::time::sleep(QUEUED).await;
    let source = {
        let mut guard = shared.state.lock().unwrap();
        let state = &mut *guard;
        let server = state.servers.get_mut(server_id).context("the server is gone")?;
        server.task = Some("image_uploading");
        let source = server.disk.clone().context("the server has no disk")?;
        if let Some(image) = state.images.get_mut(image_id) {
            image.status = "saving";
            image.updated = Timestamp::now();
        }
        shared.bump();
        source
    };
    let started = Instant::now();
    let dest = image_file(shared, image_id);
    std::fs::create_dir_all(dest.parent().unwrap())?;
    ec2vm::run(
        Command::new("qemu-img").args(["convert", "-O", "qcow2", "-f", &source.format]).arg(&source.disk).arg(&dest),
    )
    .await?;
    tokio::time::sleep_until(started + shared.config.image_saving).await;
    let info: serde_json::Value =
        serde_json::from_str(&ec2vm::run(Command::new("qemu-img").args(["info", "--output=json"]).arg(&dest)).await?)?;
    let digest = |tool: &'static str| {
        let dest = dest.clone();
        async move {
            let out = ec2vm::run(Command::new(tool).arg(&dest)).await?;
            anyhow::Ok(out.split_whitespace().next().unwrap_or_default().to_owned())
        }
    };
    Ok(Converted {
        size: std::fs::metadata(&dest)?.len(),
        virtual_size: info["virtual-size"].as_u64().context("qemu-img info gave no virtual-size")?,
        md5: digest("md5sum").await?,
        sha512: digest("sha512sum").await?,
        disk: BaseDisk { disk: dest, format: "qcow2".into(), ..source },
    })
}
