//! Generalization: what the seal removes so that every instance booted from
//! the image is a fresh machine rather than a copy of the build VM.
//!
//! - cloud-init's state and logs (`cloud-init clean --logs`, and the same by
//!   hand, so it also happens where the command is missing): the next boot is
//!   a new instance, which runs its own user-data and regenerates host keys;
//! - the machine-id (emptied, as Debian's images ship it), the D-Bus copy,
//!   systemd's random seed and credential secret;
//! - SSH host keys (on images without cloud-init, a oneshot systemd unit
//!   generates new ones before sshd starts);
//! - apt's package lists and downloaded archives;
//! - the hostname (back to `localhost`), DHCP leases, the journal.
//!
//! Every function works under a root directory, so it is tested on a tree;
//! commands (cloud-init, systemctl) run only on the real root.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::warn;

use super::{expand, remove};

/// How long one command of the generalization may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// Paths removed from every generalized machine (`*` matches within a component).
const VOLATILE: &[&str] = &[
    // cloud-init's instance state, but not a seed baked into the base image.
    "/var/lib/cloud/data",
    "/var/lib/cloud/handlers",
    "/var/lib/cloud/instance",
    "/var/lib/cloud/instances",
    "/var/lib/cloud/scripts",
    "/var/lib/cloud/sem",
    "/var/log/cloud-init.log",
    "/var/log/cloud-init-output.log",
    // This machine's identity.
    "/etc/ssh/ssh_host_*",
    "/var/lib/systemd/random-seed",
    "/var/lib/systemd/credential.secret",
    "/var/lib/dhcp/*.leases",
    "/var/lib/NetworkManager/*.lease",
    "/root/.bash_history",
    // apt's lists and downloads: stale for the image's users, and large.
    "/var/lib/apt/lists/*_*",
    "/var/lib/apt/lists/partial/*",
    "/var/cache/apt/*.bin",
    "/var/cache/apt/archives/*.deb",
    "/var/cache/apt/archives/partial/*",
    // The build VM's journal (once journald has let go of it).
    JOURNAL,
];
const JOURNAL: &str = "/var/log/journal/*";

/// Where a oneshot unit regenerates SSH host keys on images without cloud-init.
const SSH_KEYGEN_UNIT: &str = "etc/systemd/system/kiln-ssh-host-keys.service";
const SSH_KEYGEN_WANTS: &str = "etc/systemd/system/ssh.service.wants/kiln-ssh-host-keys.service";
const SSH_KEYGEN_UNIT_TEXT: &str = "\
# Written by kiln's seal: this image was generalized, so its SSH host keys
# were removed; make new ones on first boot, before sshd starts.
[Unit]
Description=Generate the SSH host keys of a generalized image
Before=ssh.service sshd.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=ssh.service
";

/// What a generalization did, for the agent's log.
#[derive(Debug, Default, PartialEq)]
pub struct Report {
    pub removed: usize,
    pub cloud_init: bool,
    pub ssh_keygen_unit: bool,
}

/// Generalizes the machine whose root is `root`; runs commands only when
/// `root` is `/`. Failures are logged and skipped: a seal goes on.
pub async fn generalize(root: &Path) -> Report {
    let live = root == Path::new("/");
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    let mut report = Report::default();

    let cloud_init = live && which("cloud-init").is_some();
    report.cloud_init = cloud_init || at("/var/lib/cloud").exists();
    // Open log files are emptied first: unlinking a file a process still
    // holds open would keep its blocks, and their bytes, on the disk.
    for log in ["/var/log/cloud-init.log", "/var/log/cloud-init-output.log"] {
        truncate(&at(log));
    }
    if cloud_init {
        run(&["cloud-init", "clean", "--logs"]).await;
    }
    // journald writes to /run from here on and closes its files in /var
    // (stopping it instead would cut the console off from cloud-init's
    // output, the agent's own log). Where it cannot, the journal stays: a
    // file journald has mapped must not be truncated under it.
    let journal_closed = !live || !at("/var/log/journal").is_dir() || run(&["journalctl", "--relinquish-var"]).await;
    let ssh_installed = at("/usr/sbin/sshd").exists();
    let had_host_keys = !expand(&at("/etc/ssh/ssh_host_*_key")).is_empty();

    for pattern in VOLATILE {
        if *pattern == JOURNAL && !journal_closed {
            continue;
        }
        for path in expand(&at(pattern)) {
            match remove(&path) {
                Ok(()) => report.removed += 1,
                Err(err) => warn!("could not remove {}: {err}", path.display()),
            }
        }
    }
    empty(&at("/etc/machine-id"));
    // Debian links it to /etc/machine-id; a real file is a second copy.
    let dbus = at("/var/lib/dbus/machine-id");
    if dbus.symlink_metadata().is_ok_and(|m| m.is_file()) && remove(&dbus).is_ok() {
        report.removed += 1;
    }
    if at("/etc/hostname").exists() {
        write(&at("/etc/hostname"), "localhost\n");
    }
    if ssh_installed && had_host_keys && !report.cloud_init && at("/etc/systemd/system").is_dir() {
        report.ssh_keygen_unit = install_ssh_keygen_unit(root).is_ok();
    }
    report
}

/// Installs and enables the unit that makes new host keys at first boot.
fn install_ssh_keygen_unit(root: &Path) -> io::Result<()> {
    let unit = root.join(SSH_KEYGEN_UNIT);
    std::fs::write(&unit, SSH_KEYGEN_UNIT_TEXT)?;
    let wants = root.join(SSH_KEYGEN_WANTS);
    std::fs::create_dir_all(wants.parent().expect("has a parent"))?;
    let _ = std::fs::remove_file(&wants);
    std::os::unix::fs::symlink(Path::new("/").join(SSH_KEYGEN_UNIT), &wants)
        .inspect_err(|err| warn!("could not enable {}: {err}", unit.display()))
}

/// Empties a file in place, keeping its mode; a missing file is fine.
fn truncate(path: &Path) {
    if path.is_file()
        && let Err(err) = std::fs::OpenOptions::new().write(true).open(path).and_then(|f| f.set_len(0))
    {
        warn!("could not empty {}: {err}", path.display());
    }
}

/// Empties a file if it exists (a 0-byte machine-id means "first boot").
fn empty(path: &Path) {
    if path.symlink_metadata().is_ok() {
        truncate(path);
    }
}

fn write(path: &Path, text: &str) {
    if let Err(err) = std::fs::write(path, text) {
        warn!("could not write {}: {err}", path.display());
    }
}

/// Runs one command for at most [`COMMAND_LIMIT`]; failures are logged.
/// Whether it succeeded.
async fn run(argv: &[&str]) -> bool {
    let mut command = super::command(argv);
    command.stdin(std::process::Stdio::null());
    let child = tokio::process::Command::from(command).kill_on_drop(true).status();
    match tokio::time::timeout(COMMAND_LIMIT, child).await {
        Ok(Ok(status)) if status.success() => return true,
        Ok(Ok(status)) => warn!("`{}` failed: {status}", argv.join(" ")),
        Ok(Err(err)) => warn!("`{}` failed: {err}", argv.join(" ")),
        Err(_) => warn!("`{}` took longer than {COMMAND_LIMIT:?}; killed", argv.join(" ")),
    }
    false
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .as_deref()
        .map(std::env::split_paths)
        .into_iter()
        .flatten()
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(root: &Path, path: &str, text: &str) {
        let path = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn exists(root: &Path, path: &str) -> bool {
        root.join(path.trim_start_matches('/')).symlink_metadata().is_ok()
    }

    fn read(root: &Path, path: &str) -> String {
        std::fs::read_to_string(root.join(path.trim_start_matches('/'))).unwrap()
    }

    // A cloud-init machine loses its instance, identity, lists and logs,
    // and keeps its seed, its packages' state and the user's files.
    #[tokio::test]
    async fn a_cloud_init_machine_becomes_a_fresh_instance() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for path in [
            "/var/lib/cloud/instances/i-1/user-data.txt",
            "/var/lib/cloud/instance/obj.pkl",
            "/var/lib/cloud/data/instance-id",
            "/var/lib/cloud/sem/config_scripts_per_once.once",
            "/var/log/cloud-init.log",
            "/var/log/cloud-init-output.log",
            "/etc/ssh/ssh_host_ed25519_key",
            "/etc/ssh/ssh_host_ed25519_key.pub",
            "/var/lib/systemd/random-seed",
            "/var/lib/dhcp/dhclient.eth0.leases",
            "/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease",
            "/var/cache/apt/pkgcache.bin",
            "/var/cache/apt/archives/hello_2.10_amd64.deb",
            "/var/log/journal/0123/system.journal",
            "/var/lib/dbus/machine-id",
        ] {
            touch(root, path, "build vm");
        }
        for (path, text) in [
            ("/var/lib/cloud/seed/nocloud/meta-data", "baked"),
            ("/var/lib/apt/lists/lock", ""),
            ("/etc/machine-id", "0123456789abcdef0123456789abcdef\n"),
            ("/etc/hostname", "kiln-build-1\n"),
            ("/etc/kept", "the script's work"),
            ("/usr/sbin/sshd", ""),
        ] {
            touch(root, path, text);
        }
        std::fs::create_dir_all(root.join("etc/systemd/system")).unwrap();

        let report = generalize(root).await;

        assert!(report.cloud_init && !report.ssh_keygen_unit, "{report:?}");
        for gone in [
            "/var/lib/cloud/instances",
            "/var/lib/cloud/instance",
            "/var/lib/cloud/data",
            "/var/lib/cloud/sem",
            "/var/log/cloud-init.log",
            "/etc/ssh/ssh_host_ed25519_key",
            "/etc/ssh/ssh_host_ed25519_key.pub",
            "/var/lib/systemd/random-seed",
            "/var/lib/dhcp/dhclient.eth0.leases",
            "/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease",
            "/var/cache/apt/pkgcache.bin",
            "/var/cache/apt/archives/hello_2.10_amd64.deb",
            "/var/log/journal/0123",
            "/var/lib/dbus/machine-id",
            SSH_KEYGEN_UNIT,
        ] {
            assert!(!exists(root, gone), "{gone} is still there");
        }
        assert_eq!(read(root, "/etc/machine-id"), "");
        assert_eq!(read(root, "/etc/hostname"), "localhost\n");
        assert_eq!(read(root, "/var/lib/cloud/seed/nocloud/meta-data"), "baked");
        assert_eq!(read(root, "/etc/kept"), "the script's work");
        assert!(exists(root, "/var/lib/apt/lists/lock"));
        assert_eq!(report.removed, 15);
    }

    // Without cloud-init nothing would make new host keys: a unit does.
    #[tokio::test]
    async fn without_cloud_init_new_host_keys_come_from_a_unit() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        touch(root, "/usr/sbin/sshd", "");
        touch(root, "/etc/ssh/ssh_host_ed25519_key", "secret");
        std::fs::create_dir_all(root.join("etc/systemd/system")).unwrap();

        let report = generalize(root).await;

        assert!(report.ssh_keygen_unit && !report.cloud_init, "{report:?}");
        assert!(!exists(root, "/etc/ssh/ssh_host_ed25519_key"));
        assert!(read(root, SSH_KEYGEN_UNIT).contains("ExecStart=/usr/bin/ssh-keygen -A"));
        let link = std::fs::read_link(root.join(SSH_KEYGEN_WANTS)).unwrap();
        assert_eq!(link, Path::new("/").join(SSH_KEYGEN_UNIT));
        // A machine with no machine-id or hostname file gets none.
        assert!(!exists(root, "/etc/machine-id") && !exists(root, "/etc/hostname"));
    }
}
