//! KVM when it works, else TCG: decided once by a time-bounded probe and
//! remembered in the data directory.
//!
//! `/dev/kvm` existing proves little (on some hosts `-cpu host` dies on an MSR
//! assertion and `qemu64` hangs), so the probe starts a guest under KVM and
//! waits, for a bounded time, for SeaBIOS to write to the debug console.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::time::Instant;

/// How long the probe waits for the guest's firmware to speak.
const PROBE_LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn qemu_args(self) -> &'static [&'static str] {
        match self {
            Accel::Kvm => &["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => &["-accel", "tcg"],
        }
    }
}

/// The accelerator to use, from `cache` or from a fresh probe.
pub async fn probe(cache: PathBuf) -> Accel {
    match std::fs::read_to_string(&cache).as_deref().map(str::trim) {
        Ok("kvm") => return Accel::Kvm,
        Ok("tcg") => return Accel::Tcg,
        _ => {}
    }
    let accel = if std::path::Path::new("/dev/kvm").exists() && kvm_works().await { Accel::Kvm } else { Accel::Tcg };
    tracing::info!(?accel, "QEMU acceleration probed");
    if let Some(dir) = cache.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::write(&cache, if accel == Accel::Kvm { "kvm\n" } else { "tcg\n" });
    accel
}

async fn kvm_works() -> bool {
    let Ok(dir) = tempfile::tempdir() else { return false };
    let log = dir.path().join("firmware.log");
    let child = tokio::process::Command::new(super::vm::qemu_binary())
        .args(["-accel", "kvm", "-cpu", "host", "-machine", "q35", "-m", "64", "-nodefaults", "-display", "none"])
        .args(["-chardev", &format!("file,id=fw,path={}", log.display())])
        .args(["-device", "isa-debugcon,iobase=0x402,chardev=fw"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let Ok(mut child) = child else { return false };
    let deadline = Instant::now() + PROBE_LIMIT;
    let works = loop {
        if std::fs::read(&log).is_ok_and(|b| !b.is_empty()) {
            break matches!(child.try_wait(), Ok(None));
        }
        if Instant::now() >= deadline || !matches!(child.try_wait(), Ok(None)) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = child.kill().await;
    works
}
