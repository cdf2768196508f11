//! Who may read the data directory: its owner alone.
//!
//! kiln sets its umask to 077 before it creates anything, so the data
//! directory is 0700 and every file in it 0600 (sockets and executables keep
//! only their owner's bits). At start it refuses a data directory in which
//! anything is open to the group or others, and says which `chmod` fixes it:
//! a CA key, a sealed store or a build log readable by other users would
//! undo everything else.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The error at start when something in the data directory is too open.
#[derive(Debug, thiserror::Error)]
pub enum ModeError {
    #[error(
        "{path} has mode {mode:o}, open to other users than its owner; fix it with: chmod {fix:o} '{path}'{more}",
        path = path.display(),
        fix = mode & 0o700,
        more = more_hint(*more, root)
    )]
    TooOpen { path: PathBuf, mode: u32, more: usize, root: PathBuf },
    #[error("cannot read the data directory {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn more_hint(more: usize, root: &Path) -> String {
    if more == 0 {
        String::new()
    } else {
        format!(" ({more} more entries are too open; `chmod -R go= '{}'` fixes them all)", root.display())
    }
}

/// Sets the process umask to 077: nothing kiln creates is readable by others.
pub fn restrict_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// Creates `dir` (and its parents) with mode 0700 when missing.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Refuses `dir` when it, or anything under it, grants the group or others
/// any permission. Symbolic links are not followed (their own mode means nothing).
pub fn check(dir: &Path) -> Result<(), ModeError> {
    let mut too_open: Vec<(PathBuf, u32)> = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(path) = stack.pop() {
        let io = |source| ModeError::Io { path: path.clone(), source };
        let meta = std::fs::symlink_metadata(&path).map_err(io)?;
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            too_open.push((path.clone(), mode));
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(io)? {
                stack.push(entry.map_err(io)?.path());
            }
        }
    }
    // The shallowest path first: the data directory itself when it is one of them.
    too_open.sort_by_key(|(p, _)| (p.components().count(), p.clone()));
    match too_open.first() {
        None => Ok(()),
        Some((path, mode)) => {
            Err(ModeError::TooOpen { path: path.clone(), mode: *mode, more: too_open.len() - 1, root: dir.to_owned() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    // A private tree passes; a file or directory open to others is named with the chmod that fixes it.
    #[test]
    fn refuses_what_others_can_read() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        create_private_dir(&data.join("logs")).unwrap();
        std::fs::write(data.join("logs/t.log"), "x").unwrap();
        chmod(&data.join("logs/t.log"), 0o600);
        check(&data).unwrap();

        chmod(&data.join("logs/t.log"), 0o644);
        let err = check(&data).unwrap_err().to_string();
        assert!(err.contains(&format!("chmod 600 '{}'", data.join("logs/t.log").display())), "{err}");

        chmod(&data, 0o755);
        let err = check(&data).unwrap_err().to_string();
        assert!(err.contains(&format!("chmod 700 '{}'", data.display())), "{err}");
        assert!(err.contains(&format!("chmod -R go= '{}'", data.display())), "{err}");
    }
}
