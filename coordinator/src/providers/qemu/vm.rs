//! One QEMU process per instance, daemonized, so VMs outlive a coordinator
//! restart; the pid file and the instance directory are its handle.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};

use nix::sys::signal::{Signal, kill as send};
use nix::unistd::Pid;

use super::accel::Accel;
use super::image::BaseImage;
use super::{ProviderError, failed};
use crate::providers::ProviderErrorKind;

pub const OVERLAY: &str = "overlay.qcow2";
const PIDFILE: &str = "qemu.pid";
const CONSOLE: &str = "console.log";
/// The base image an instance was started from, for the image step.
pub const BASE: &str = "base.json";
/// How much of the console an error message quotes.
const TAIL_BYTES: u64 = 8 * 1024;

pub fn qemu_binary() -> String {
    std::env::var("KILN_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

pub fn qemu_img_binary() -> String {
    std::env::var("KILN_QEMU_IMG").unwrap_or_else(|_| "qemu-img".into())
}

/// Fails with what to install when QEMU is missing.
pub fn check_installed() -> Result<(), ProviderError> {
    check_tools(&[qemu_binary(), qemu_img_binary()])
}

fn check_tools(tools: &[String]) -> Result<(), ProviderError> {
    for tool in tools {
        if which(tool).is_none() {
            return Err(ProviderError::new(
                ProviderErrorKind::Invalid,
                format!(
                    "{tool} is not installed: run `apt-get install qemu-system-x86 qemu-utils` (or scripts/install-deps)"
                ),
            ));
        }
    }
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    if tool.contains('/') {
        return Path::new(tool).exists().then(|| PathBuf::from(tool));
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(tool)).find(|p| p.exists())
}

/// The fd the cidata drive has in QEMU.
const CIDATA_FD: i32 = 3;

/// What one VM runs.
pub struct VmSpec<'a> {
    pub dir: &'a Path,
    pub base: &'a BaseImage,
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    /// The `-netdev` argument (id `net0`): restricted, with kiln's forwards.
    pub netdev: String,
    pub name: &'a str,
}

/// Creates the overlay and starts QEMU in the background with the read-only
/// `cidata` drive `cidata` (a descriptor QEMU inherits) as its second disk.
pub async fn start(spec: &VmSpec<'_>, cidata: OwnedFd) -> Result<(), ProviderError> {
    let dir = spec.dir;
    std::fs::create_dir_all(dir).map_err(|e| failed(format!("cannot create {}: {e}", dir.display())))?;
    let overlay = dir.join(OVERLAY);
    let _ = std::fs::remove_file(&overlay);
    run(tokio::process::Command::new(qemu_img_binary())
        .args(["create", "-q", "-f", "qcow2", "-F", spec.base.format.as_str(), "-b"])
        .arg(&spec.base.disk)
        .arg(&overlay))
    .await?;
    spec.base.save(&dir.join(BASE))?;
    // A daemonized QEMU sets its own umask (027): the console log it would
    // create is made here first, 0600, and QEMU only appends to it.
    let console = dir.join(CONSOLE);
    std::os::unix::fs::OpenOptionsExt::mode(std::fs::OpenOptions::new().append(true).create(true), 0o600)
        .open(&console)
        .map_err(|e| failed(format!("cannot create {}: {e}", console.display())))?;

    // Absolute paths throughout: a daemonized QEMU changes to `/`.
    let path = |name: &str| dir.join(name).display().to_string();
    let mut cmd = tokio::process::Command::new(qemu_binary());
    cmd.current_dir(dir)
        .args(["-name", spec.name, "-machine", "q35"])
        .args(spec.accel.qemu_args())
        .args(["-m", &spec.memory_mib.to_string(), "-smp", &spec.cpus.to_string()])
        .args(["-nodefaults", "-display", "none", "-no-reboot", "-daemonize"])
        .args(["-pidfile", &path(PIDFILE)])
        // Appended (O_APPEND), so cap_console can cut its head while QEMU writes.
        .args(["-chardev", &format!("file,id=console,append=on,path={}", path(CONSOLE)), "-serial", "chardev:console"])
        .args(["-drive", &format!("file={},format=qcow2,if=virtio,discard=unmap,detect-zeroes=unmap", path(OVERLAY))])
        // The seed: /dev/vdb, read-only, from the inherited memfd.
        .args(["-add-fd", &format!("fd={CIDATA_FD},set=1,opaque=cidata")])
        .args(["-drive", "file=/dev/fdset/1,format=raw,if=virtio,readonly=on"])
        // Restricted user-mode networking: nothing reaches in, and out only kiln's forwards.
        .args(["-netdev", &spec.netdev, "-device", "virtio-net-pci,netdev=net0"])
        // Tells cloud-init's ds-identify to look for the NoCloud drive.
        .args(["-smbios", "type=1,serial=ds=nocloud"]);
    cmd.fd_mappings(vec![FdMapping { parent_fd: cidata, child_fd: CIDATA_FD }])
        .map_err(|e| failed(format!("cannot hand the cidata drive to QEMU: {e}")))?;
    if let Some(kernel) = &spec.base.kernel {
        cmd.arg("-kernel").arg(kernel);
        if let Some(initrd) = &spec.base.initrd {
            cmd.arg("-initrd").arg(initrd);
        }
        cmd.args(["-append", spec.base.append.as_deref().unwrap_or("console=ttyS0")]);
    }
    run(&mut cmd).await
}

async fn run(cmd: &mut tokio::process::Command) -> Result<(), ProviderError> {
    let out = cmd.kill_on_drop(true).output().await.map_err(|e| failed(format!("cannot run {cmd:?}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(failed(format!(
            "{} failed: {}",
            cmd.as_std().get_program().to_string_lossy(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The pid of the instance's QEMU, if it is running.
pub fn pid(dir: &Path) -> Option<Pid> {
    let pid: i32 = std::fs::read_to_string(dir.join(PIDFILE)).ok()?.trim().parse().ok()?;
    // Guard against a recycled pid: it must be QEMU started for this directory.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let ours = String::from_utf8_lossy(&cmdline).contains(&dir.join(PIDFILE).display().to_string());
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')));
    (ours && !zombie).then(|| Pid::from_raw(pid))
}

/// Signals the instance's QEMU and waits (bounded) until it is gone.
pub async fn kill(dir: &Path, signal: Signal) {
    let Some(pid) = pid(dir) else { return };
    let _ = send(pid, signal);
    for _ in 0..100 {
        if self::pid(dir).is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = send(pid, Signal::SIGKILL);
}

/// Keeps the serial console to about its newest `max` bytes: once it is
/// larger, the oldest part is cut so that about half of `max` stays. The cut
/// collapses whole blocks at the start of the file in place, which QEMU's
/// appends survive; where the filesystem cannot (tmpfs), the newest half is
/// rewritten instead, losing what the guest printed during the rewrite.
pub fn cap_console(dir: &Path, max: u64) {
    use nix::fcntl::{FallocateFlags, fallocate};
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;
    let path = dir.join(CONSOLE);
    let Ok(mut file) = std::fs::OpenOptions::new().read(true).append(true).open(&path) else { return };
    let Ok(meta) = file.metadata() else { return };
    if meta.len() <= max {
        return;
    }
    let block = meta.blksize().max(1);
    let cut = (meta.len() - max / 2) / block * block;
    if cut > 0 && fallocate(&file, FallocateFlags::FALLOC_FL_COLLAPSE_RANGE, 0, cut as i64).is_ok() {
        return;
    }
    let mut tail = Vec::with_capacity((max / 2) as usize);
    let rewritten = file
        .seek(SeekFrom::Start(meta.len() - max / 2))
        .and_then(|_| file.read_to_end(&mut tail))
        .and_then(|_| file.set_len(0))
        .and_then(|()| file.write_all(&tail));
    if let Err(e) = rewritten {
        tracing::warn!(path = %path.display(), error = %e, "cannot cut the console log");
    }
}

/// The last lines of the serial console.
pub fn console_tail(dir: &Path) -> Result<String, ProviderError> {
    use std::io::{Read, Seek, SeekFrom};
    let path = dir.join(CONSOLE);
    let mut file = std::fs::File::open(&path).map_err(|e| {
        ProviderError::new(ProviderErrorKind::NotFound, format!("no console at {}: {e}", path.display()))
    })?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    Ok(strip_escapes(&String::from_utf8_lossy(&bytes)).replace('\r', ""))
}

/// `text` without terminal control sequences (colours, cursor moves) that
/// guests' programs print on their console: an error quotes plain text.
fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        // CSI: ESC [ parameters, then one final byte in @..~; a charset
        // designation: ESC ( B and the like; other escapes: one more char.
        match chars.next() {
            Some('[') => while chars.next().is_some_and(|c| !('@'..='~').contains(&c)) {},
            Some('(' | ')' | '*' | '+') => {
                chars.next();
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Colours and cursor controls from a guest's console are not quoted.
    #[test]
    fn console_escapes_are_stripped() {
        let cases = [
            ("\u{1b}[2m2026-01-01\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m ran", "2026-01-01  INFO ran"),
            ("plain\n", "plain\n"),
            ("\u{1b}[1;31mred\u{1b}[m and \u{1b}(Bcharset", "red and charset"),
            ("cut off \u{1b}[3", "cut off "),
        ];
        for (input, want) in cases {
            assert_eq!(strip_escapes(input), want, "{input:?}");
        }
    }

    // A missing QEMU is one line saying what to install.
    #[test]
    fn missing_qemu_says_what_to_install() {
        let err = check_tools(&["kiln-no-such-qemu".into()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kiln-no-such-qemu is not installed: run `apt-get install qemu-system-x86 qemu-utils` (or scripts/install-deps)"
        );
        assert!(check_tools(&["sh".into()]).is_ok());
    }
}
