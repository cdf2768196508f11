//! Free space scrubbed before the snapshot, on every writable local file
//! system: zeroed on the device where the file system suits ([`zeroout`]),
//! else filled with zeros through the file system until it is full; then the
//! fillers are removed and the file system trimmed.
//!
//! Removing a file frees its blocks but keeps their bytes, and trimming does
//! not clear them either: a qcow2 cluster (64 KiB) that still holds one live
//! 4 KiB block keeps the other fifteen as they were. Zeros written over every
//! free block reach the bytes themselves; QEMU turns whole zero clusters into
//! holes (`detect-zeroes=unmap`) and the conversion into the image drops them,
//! so the image is also as small as it can be.

use std::collections::HashSet;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln_protocol::agent::{ScrubMethod, Scrubbed};
use tracing::{info, warn};

use super::zeroout;

/// File systems whose free space is scrubbed (block-backed, overwrite in place).
const SCRUBBED: &[&str] = &["ext2", "ext3", "ext4", "xfs", "vfat", "f2fs", "jfs", "reiserfs", "btrfs"];
const FILLER: &str = ".kiln-zero-fill";
const CHUNK: usize = 1 << 20;
const ENOSPC: i32 = nix::errno::Errno::ENOSPC as i32;
const EFBIG: i32 = nix::errno::Errno::EFBIG as i32;

/// One file system to scrub.
#[derive(Debug, PartialEq)]
pub struct Mount {
    pub dir: PathBuf,
    pub fs_type: String,
}

/// The writable, block-backed mounts in `/proc/self/mounts` text, one per
/// device (the first mount point of each).
pub fn scrubbed_mounts(mounts: &str) -> Vec<Mount> {
    let mut found = Vec::new();
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [device, dir, fs_type, options, ..] = fields[..] else { continue };
        let read_only = options.split(',').any(|o| o == "ro");
        if device.starts_with("/dev/") && SCRUBBED.contains(&fs_type) && !read_only {
            found.push(Mount { dir: PathBuf::from(unescape(dir)), fs_type: fs_type.to_owned() });
        }
    }
    let mut devices = HashSet::new();
    found.retain(|m| std::fs::metadata(&m.dir).map(|meta| devices.insert(meta.dev())).unwrap_or(false));
    found
}

/// `/proc/mounts` writes space, tab, newline and backslash as octal escapes.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Fills `dir`'s file system with zeros, syncs, and removes the filler.
/// Returns how many bytes were written. Files that hit a size limit (FAT's
/// 4 GiB) are continued in a next file.
pub fn zero_fill(dir: &Path) -> io::Result<u64> {
    let zeros = vec![0u8; CHUNK];
    let mut written = 0u64;
    let mut fillers = Vec::new();
    let result = (|| {
        loop {
            let path = dir.join(format!("{FILLER}.{}", fillers.len()));
            let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
            fillers.push(path);
            // Blocks freed in a journal transaction that has not committed yet
            // cannot be allocated, and ext4 answers ENOSPC early while its
            // estimate for the dirty pages' metadata is high: after a sync
            // there may be room again. Full means a round after a sync of
            // the whole file system wrote nothing.
            let mut synced = false;
            let full = loop {
                let before = written;
                let full = loop {
                    match file.write(&zeros) {
                        Ok(0) => break true,
                        Ok(n) => written += n as u64,
                        Err(e) if e.raw_os_error() == Some(ENOSPC) => break true,
                        Err(e) if e.raw_os_error() == Some(EFBIG) => break false,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                };
                // Dirty pages reach the disk before the filler goes.
                match file.sync_all() {
                    Err(e) if e.raw_os_error() != Some(ENOSPC) => return Err(e),
                    _ => {}
                }
                if !full || (written == before && synced) {
                    break full;
                }
                synced = written == before;
                if synced {
                    nix::unistd::syncfs(&file).map_err(io::Error::from)?;
                }
            };
            if full {
                return Ok(());
            }
        }
    })();
    for path in &fillers {
        if let Err(err) = std::fs::remove_file(path) {
            warn!("could not remove the filler {}: {err}", path.display());
        }
    }
    result.map(|()| written)
}

/// Scrubs the free space of every scrubbed mount of this machine: zeroed on
/// the device where the file system suits ([`zeroout`]), else zero-filled.
pub fn scrub_free_space() -> Vec<Scrubbed> {
    // Commits what the seal removed, so its blocks can be allocated again.
    nix::unistd::sync();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    scrubbed_mounts(&mounts).iter().map(scrub).collect()
}

fn scrub(mount: &Mount) -> Scrubbed {
    let started = Instant::now();
    // ext4 keeps some clusters (up to 16 MiB) from everyone, root too, so
    // that delayed allocation never runs out: free blocks a filler would
    // never reach. Lend them to it.
    let reserve = (mount.fs_type == "ext4").then(|| Ext4Reserve::release(&mount.dir)).flatten();
    let mut done = None;
    let mut fallback = None;
    if zeroout::SUITED.contains(&mount.fs_type.as_str()) {
        match zeroout::zero_out(&mount.dir) {
            Ok(z) => {
                if z.written > 0 {
                    fallback = Some(format!("{} MiB were busy on the device and written as zeros", z.written >> 20));
                }
                done = Some((ScrubMethod::ZeroOut, Ok(z.bytes)));
            }
            Err(err) => {
                warn!("could not zero free blocks of {} on its device, so writing zeros: {err}", mount.dir.display());
                fallback = Some(format!("zeroing on the device failed: {err}"));
            }
        }
    }
    // Twice: blocks freed while the first fill ran (and space the file
    // system held back for other files) are free only after it.
    let (method, result) = done.unwrap_or_else(|| {
        let filled = zero_fill(&mount.dir).and_then(|a| {
            nix::unistd::sync();
            zero_fill(&mount.dir).map(|b| a + b)
        });
        (ScrubMethod::Fill, filled)
    });
    drop(reserve);
    let millis = started.elapsed().as_millis() as u64;
    let (dir, fs) = (mount.dir.display().to_string(), mount.fs_type.clone());
    match result {
        Ok(bytes) => {
            info!(mount = dir, fs, ?method, mib = bytes >> 20, millis, "scrubbed free space");
            Scrubbed { mount: dir, fs_type: fs, method, bytes, millis, error: None, fallback }
        }
        Err(err) => {
            warn!("could not scrub the free space of {dir}: {err}");
            let error = Some(err.to_string());
            Scrubbed { mount: dir, fs_type: fs, method: ScrubMethod::None, bytes: 0, millis, error, fallback }
        }
    }
}

/// An ext4 file system's reserved clusters, set to 0 until dropped.
struct Ext4Reserve {
    knob: PathBuf,
    old: String,
}

impl Ext4Reserve {
    /// The file system mounted at `dir`, found by its device number (the
    /// device in the mount table may be a name such as `/dev/root`).
    fn release(dir: &Path) -> Option<Self> {
        let dev = std::fs::metadata(dir).ok()?.dev();
        let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
        let node = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}"));
        let Some(name) = node.ok().and_then(|n| n.file_name().map(ToOwned::to_owned)) else {
            warn!("cannot find the block device {major}:{minor} of {} in /sys", dir.display());
            return None;
        };
        let knob = Path::new("/sys/fs/ext4").join(name).join("reserved_clusters");
        let old = match std::fs::read_to_string(&knob) {
            Ok(old) => old.trim().to_owned(),
            Err(err) => {
                warn!("cannot read {}: {err}", knob.display());
                return None;
            }
        };
        match std::fs::write(&knob, "0") {
            Ok(()) => Some(Self { knob, old }),
            Err(err) => {
                warn!("could not lend ext4's reserved clusters to the zero fill ({}): {err}", knob.display());
                None
            }
        }
    }
}

impl Drop for Ext4Reserve {
    fn drop(&mut self) {
        if let Err(err) = std::fs::write(&self.knob, &self.old) {
            warn!("could not restore {}: {err}", self.knob.display());
        }
    }
}

/// Remounts every file system read-only (sysrq `u`) and waits, bounded,
/// until the root is: the image's file systems are then clean, with no
/// journal to replay and no stale bitmap, even though power-off is forced.
/// Returns whether the root became read-only.
pub fn remount_read_only() -> bool {
    if let Err(err) = std::fs::write("/proc/sysrq-trigger", "u") {
        warn!("could not remount read-only: {err}");
        return false;
    }
    for _ in 0..100 {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let root_ro = mounts.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == "/" && f[0] != "rootfs" && f[3].split(',').any(|o| o == "ro")
        });
        if root_ro {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    warn!("the root file system is still writable after an emergency remount");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    // Read-only, virtual and network file systems are skipped; a device
    // mounted twice is scrubbed once; escaped mount points are decoded.
    #[test]
    fn picks_writable_block_file_systems() {
        let tmp = tempfile::tempdir().unwrap();
        let spaced = tmp.path().join("with space");
        std::fs::create_dir(&spaced).unwrap();
        let escaped = spaced.display().to_string().replace(' ', "\\040");
        let mounts = format!(
            "/dev/vda1 / ext4 rw,relatime 0 0\n\
             proc /proc proc rw 0 0\n\
             tmpfs /run tmpfs rw 0 0\n\
             /dev/vdb /mnt/cidata vfat ro,relatime 0 0\n\
             /dev/vda1 /var/lib/docker ext4 rw 0 0\n\
             server:/x /net nfs4 rw 0 0\n\
             /dev/vdc {escaped} ext4 rw 0 0\n\
             broken line\n"
        );
        let found = scrubbed_mounts(&mounts);
        let dirs: Vec<_> = found.iter().map(|m| m.dir.clone()).collect();
        // `/` and the temp dir may share a device here; the first one wins.
        assert_eq!(dirs[0], PathBuf::from("/"));
        assert!(!dirs.iter().any(|d| d.starts_with("/proc") || d.starts_with("/run") || d.starts_with("/mnt")));
        assert!(!dirs.contains(&PathBuf::from("/var/lib/docker")));
        assert_eq!(unescape(&escaped), spaced.display().to_string());
    }
}
