//! The agent's last acts: finish (remove the job's files) or seal: remove
//! itself and every secret, generalize the machine ([`generalize`]), scrub
//! free space ([`scrub`]), sync, trim, power off.

mod generalize;
mod scrub;
mod zeroout;

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::bail;
use tracing::{info, warn};

use kiln_protocol::agent::SealReport;

use crate::cli::ENROLL_TOKEN_ENV;
use crate::client::Api;
use crate::coordinator;
use crate::layout::Layout;

/// Where copies of the user-data (with its one-time token) may be: what
/// cloud-init keeps of the instance's user-data, its cached datasource and
/// the scripts it extracted, and the copies kiln's boot hook makes. A `*`
/// matches within one path component.
const USER_DATA_COPIES: &[&str] = &[
    "/var/lib/cloud/instance/user-data.txt",
    "/var/lib/cloud/instance/user-data.txt.i",
    "/var/lib/cloud/instance/obj.pkl",
    "/var/lib/cloud/instance/scripts/*",
    "/var/lib/cloud/instances/*/user-data.txt*",
    "/var/lib/cloud/instances/*/obj.pkl",
    "/var/lib/cloud/instances/*/scripts/*",
    "/run/kiln/user-data",
    "/var/lib/kiln/user-data",
];

/// Ways to power off, tried in order.
const POWER_OFF: &[&[&str]] =
    &[&["poweroff", "-f"], &["busybox", "poweroff", "-f"], &["systemctl", "poweroff", "--force", "--force"]];

/// How long a power-off command that returned success gets to take effect.
const POWER_OFF_GRACE: Duration = Duration::from_secs(30);

/// Removes the job and its spooled output, leaving the machine as it is.
pub fn finish(layout: &Layout) -> anyhow::Result<()> {
    for dir in [&layout.spool_dir, &layout.job_dir] {
        remove(dir)?;
    }
    info!("finished: removed the job and its output");
    Ok(())
}

/// Removes the agent and every secret it knows of, then powers off. Returns
/// only if no way to power off worked.
pub async fn seal(api: &Api, layout: &Layout, generalize: bool) -> anyhow::Result<()> {
    coordinator::announce_sealing(api).await;
    if layout.dir.parent().is_none() {
        bail!("refusing to seal: the agent directory is the root directory");
    }
    let mut doomed = vec![layout.dir.clone()];
    match std::env::current_exe() {
        Ok(exe) => doomed.push(exe),
        Err(err) => warn!("cannot find the agent's own binary to remove it: {err}"),
    }
    doomed.extend(USER_DATA_COPIES.iter().flat_map(|pattern| expand(Path::new(pattern))));
    for path in &doomed {
        if let Err(err) = remove(path) {
            warn!("could not remove {}: {err}", path.display());
        }
    }
    info!("removed kiln's files: {} paths", doomed.len());
    if generalize {
        let report = generalize::generalize(Path::new("/")).await;
        info!(
            removed = report.removed,
            cloud_init = report.cloud_init,
            ssh_keygen_unit = report.ssh_keygen_unit,
            "generalized"
        );
    }
    let scrubbed = tokio::task::spawn_blocking(scrub::scrub_free_space).await?;

    nix::unistd::sync();
    match command(&["fstrim", "-a"]).status() {
        Ok(status) if !status.success() => warn!("fstrim -a failed: {status}"),
        Err(err) if err.kind() != io::ErrorKind::NotFound => warn!("fstrim -a failed: {err}"),
        _ => {}
    }
    nix::unistd::sync();
    let read_only = tokio::task::spawn_blocking(scrub::remount_read_only).await?;
    let report = SealReport { generalized: generalize, scrubbed, read_only };
    // The coordinator makes no image without this report: an unscrubbed
    // disk may still hold the token and what the script removed.
    coordinator::report_sealed(api, &report).await;
    info!("sealed; powering off");
    for argv in POWER_OFF {
        match command(argv).status() {
            Ok(status) if status.success() => {
                tokio::time::sleep(POWER_OFF_GRACE).await;
                warn!("`{}` succeeded but the machine is still up", argv.join(" "));
            }
            Ok(status) => warn!("`{}` failed: {status}", argv.join(" ")),
            Err(err) => warn!("`{}` failed: {err}", argv.join(" ")),
        }
    }
    bail!("could not power off: every way failed")
}

fn command(argv: &[&str]) -> Command {
    let mut command = Command::new(argv[0]);
    command.args(&argv[1..]).env_remove(ENROLL_TOKEN_ENV);
    command
}

/// Removes a file, symlink or directory tree; a missing path is fine. A
/// regular file is emptied first, so its blocks are freed (and then
/// scrubbed) even when some process still holds it open.
fn remove(path: &Path) -> io::Result<()> {
    let removed = match path.symlink_metadata() {
        Ok(meta) if meta.is_dir() => {
            empty_tree(path);
            std::fs::remove_dir_all(path)
        }
        Ok(meta) if meta.is_file() => {
            let _ = std::fs::OpenOptions::new().write(true).open(path).and_then(|f| f.set_len(0));
            std::fs::remove_file(path)
        }
        Ok(_) => std::fs::remove_file(path),
        Err(err) => Err(err),
    };
    match removed {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Empties every regular file under `dir` (not following symlinks).
fn empty_tree(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        match entry.file_type() {
            Ok(t) if t.is_dir() => empty_tree(&entry.path()),
            Ok(t) if t.is_file() => {
                let _ = std::fs::OpenOptions::new().write(true).open(entry.path()).and_then(|f| f.set_len(0));
            }
            _ => {}
        }
    }
}

/// The existing paths matching `pattern`, where `*` in a component matches
/// any run of characters (hidden names included).
fn expand(pattern: &Path) -> Vec<PathBuf> {
    let mut found = vec![PathBuf::new()];
    for component in pattern.components() {
        let part = component.as_os_str().to_string_lossy();
        if !part.contains('*') {
            found = found.into_iter().map(|base| base.join(&*part)).filter(|p| p.symlink_metadata().is_ok()).collect();
            continue;
        }
        found = found
            .iter()
            .filter_map(|base| std::fs::read_dir(base).ok())
            .flatten()
            .flatten()
            .filter(|entry| wildcard_match(&part, &entry.file_name().to_string_lossy()))
            .map(|entry| entry.path())
            .collect();
    }
    found.sort();
    found
}

fn wildcard_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((prefix, rest)) => {
            let Some(tail) = name.strip_prefix(prefix) else {
                return false;
            };
            (0..=tail.len()).filter(|&i| tail.is_char_boundary(i)).any(|i| wildcard_match(rest, &tail[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_within_a_component() {
        assert!(wildcard_match("user-data.txt*", "user-data.txt"));
        assert!(wildcard_match("user-data.txt*", "user-data.txt.i"));
        assert!(wildcard_match("*", "part-001"));
        assert!(wildcard_match("a*b*c", "aXXbYc"));
        assert!(!wildcard_match("user-data.txt*", "vendor-data.txt"));
        assert!(!wildcard_match("a*b", "ab-c"));
    }

    #[test]
    fn expands_patterns_to_existing_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for file in ["instances/i-1/user-data.txt", "instances/i-1/user-data.txt.i", "instances/i-2/user-data.txt"] {
            std::fs::create_dir_all(root.join(file).parent().unwrap()).unwrap();
            std::fs::write(root.join(file), "x").unwrap();
        }
        std::fs::write(root.join("instances/i-2/vendor-data.txt"), "x").unwrap();
        let found = expand(&root.join("instances/*/user-data.txt*"));
        let expected: Vec<PathBuf> = ["i-1/user-data.txt", "i-1/user-data.txt.i", "i-2/user-data.txt"]
            .iter()
            .map(|p| root.join("instances").join(p))
            .collect();
        assert_eq!(found, expected);
        assert_eq!(expand(&root.join("instances/i-1/user-data.txt")), expected[..1]);
        assert!(expand(&root.join("missing/*")).is_empty());
    }

    #[test]
    fn finish_removes_only_the_job_files() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path());
        layout.prepare().unwrap();
        std::fs::write(tmp.path().join("ca.pem"), "ca").unwrap();
        finish(&layout).unwrap();
        assert!(!layout.spool_dir.exists() && !layout.job_dir.exists());
        assert!(tmp.path().join("ca.pem").exists());
        finish(&layout).unwrap();
    }
}
