//! A small file system of its own for a test: a size-limited tmpfs mounted
//! on a fresh temporary directory (tests run as root), private so the mount
//! propagates nowhere else, and unmounted when dropped.

use std::path::Path;
use std::process::Command;

use tempfile::TempDir;

/// A tmpfs of a fixed size, mounted while this lives.
pub struct SmallFs {
    dir: TempDir,
}

impl SmallFs {
    /// Mounts a tmpfs of `bytes` (mode 0700, like a kiln data directory) on
    /// a new temporary directory.
    pub fn mount(bytes: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = format!("size={bytes},mode=0700,nosuid,nodev");
        run(Command::new("mount").args(["-t", "tmpfs", "-o", &options, "kiln-test"]).arg(dir.path()));
        // Private: a mount or unmount under it stays here, whatever the parent's propagation.
        let fs = Self { dir };
        run(Command::new("mount").arg("--make-private").arg(fs.path()));
        fs
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes an unprivileged writer may still use on it.
    pub fn available(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(self.path()).expect("statvfs");
        st.blocks_available() * st.fragment_size()
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazily: a process that still holds a file open (a failed test's
        // coordinator) must not keep the mount, or the directory, behind.
        let out = Command::new("umount").arg("--lazy").arg(self.path()).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("umount {}: {}", self.path().display(), String::from_utf8_lossy(&o.stderr)),
            Err(e) => eprintln!("umount {}: {e}", self.path().display()),
        }
    }
}
