//! The fast scrub of an ext2/3/4 or XFS file system: every free block is
//! allocated to filler files with `fallocate` (no data written), located on
//! the device with `FIEMAP`, and zeroed there (`fallocate` on the block
//! device: `PUNCH_HOLE`, else `ZERO_RANGE`, as `blkdiscard -z` does).
//!
//! A virtual disk gets write-zeroes requests instead of data: QEMU turns whole
//! clusters into zero clusters and overwrites the rest of each, so a cluster
//! that also holds live blocks keeps nothing of what was freed. The blocks
//! belong to the fillers while they are zeroed, so nothing else can use them
//! meanwhile, and the file system never reads them (they are unwritten
//! extents). Rounds repeat after a sync until no block is left to allocate:
//! blocks freed in an uncommitted journal transaction become free only then.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use fiemap::{Fiemap, FiemapExtentFlags, FiemapFlags};
use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};

/// File systems whose `FIEMAP` gives byte offsets on their one block device.
pub const SUITED: &[&str] = &["ext2", "ext3", "ext4", "xfs"];
const FILLER: &str = ".kiln-zero-out";
/// At most this many rounds of allocate, zero, sync.
const ROUNDS: usize = 8;
/// The first allocation step; halved on ENOSPC down to one block.
const FIRST_STEP: i64 = 1 << 30;

/// Extents whose `fe_physical` is not a plain device offset of their own
/// blocks: unknown or delayed location, encoded, unaligned, inline, shared.
const UNFIT: FiemapExtentFlags = FiemapExtentFlags::UNKNOWN
    .union(FiemapExtentFlags::DELALLOC)
    .union(FiemapExtentFlags::ENCODED)
    .union(FiemapExtentFlags::DATA_ENCRYPTED)
    .union(FiemapExtentFlags::NOT_ALIGNED)
    .union(FiemapExtentFlags::DATA_INLINE)
    .union(FiemapExtentFlags::DATA_TAIL)
    .union(FiemapExtentFlags::SHARED);

/// Zeroes every free block of the file system mounted at `dir`. An error means the file system is not (or not wholly)
/// scrubbed this way; the fillers are removed either way.
pub fn zero_out(dir: &Path) -> io::Result<Zeroed> {
    let device = block_device(dir)?;
    let mut fillers = Vec::new();
    let result = (|| {
        let mut zeroed = Zeroed::default();
        for round in 0..ROUNDS {
            let path = dir.join(format!("{FILLER}.{round}"));
            let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
            fillers.push(path.clone());
            let allocated = allocate_all(&file)?;
            let round = zero_extents(&file, &path, &device)?;
            zeroed.bytes += round.bytes;
            zeroed.written += round.written;
            nix::unistd::syncfs(&file).map_err(io::Error::from)?;
            if allocated == 0 {
                return Ok(zeroed);
            }
        }
        Err(io::Error::other(format!("free blocks were still appearing after {ROUNDS} rounds")))
    })();
    for path in &fillers {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Allocates as much of the file system as this process may to `file`.
fn allocate_all(file: &File) -> io::Result<u64> {
    let block = i64::try_from(file.metadata()?.blksize()).unwrap_or(4096).max(512);
    let mut offset = 0i64;
    let mut step = FIRST_STEP;
    loop {
        match fallocate(file, FallocateFlags::empty(), offset, step) {
            Ok(()) => offset += step,
            // Full, or this file is as large as it may be (the next round's file goes on).
            Err(Errno::ENOSPC) if step > block => step = (step / 2 / block).max(1) * block,
            Err(Errno::ENOSPC | Errno::EFBIG) => break,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(io::Error::from(e)),
        }
    }
    // A step that failed part way may still have allocated blocks.
    Ok(file.metadata()?.blocks() * 512)
}

/// Bytes zeroed, and of those how many were written as zeros through the
/// file system because the device range was busy.
#[derive(Clone, Copy, Debug, Default)]
pub struct Zeroed {
    pub bytes: u64,
    pub written: u64,
}

/// Zeroes the device ranges of `file`'s extents. A range the kernel will not
/// zero under the mounted file system (`EBUSY`: a page of its cache there is
/// still held, say by the journal) is retried in smaller pieces, and a piece
/// still busy gets zeros written into the filler with direct I/O, which
/// reaches the same blocks.
fn zero_extents(file: &File, path: &Path, device: &File) -> io::Result<Zeroed> {
    let mut zeroed = Zeroed::default();
    let mut direct = None;
    for extent in Fiemap::with_flags(file, FiemapFlags::SYNC) {
        let extent = extent?;
        if extent.fe_flags.intersects(UNFIT) {
            return Err(io::Error::other(format!("an extent of the filler has flags {:?}", extent.fe_flags)));
        }
        let (logical, physical, length) = (extent.fe_logical, extent.fe_physical, extent.fe_length);
        match zero_range(device, physical, length) {
            Err(e) if e.raw_os_error() == Some(Errno::EBUSY as i32) => {}
            other => {
                other?;
                zeroed.bytes += length;
                continue;
            }
        }
        let mut at = 0;
        while at < length {
            let n = PIECE.min(length - at);
            match zero_range(device, physical + at, n) {
                Err(e) if e.raw_os_error() == Some(Errno::EBUSY as i32) => {
                    let direct = match &mut direct {
                        Some(d) => d,
                        None => direct.insert(DirectZeros::open(path)?),
                    };
                    direct.write(logical + at, n)?;
                    zeroed.written += n;
                }
                other => other?,
            }
            zeroed.bytes += n;
            at += n;
        }
    }
    if let Some(direct) = direct {
        direct.file.sync_all()?;
    }
    Ok(zeroed)
}

/// A busy range is retried in pieces of this size.
const PIECE: u64 = 1 << 20;

/// The filler opened for direct I/O, with an aligned buffer of zeros.
struct DirectZeros {
    file: File,
    buffer: Vec<u8>,
    start: usize,
}

impl DirectZeros {
    const ALIGN: usize = 4096;

    fn open(path: &Path) -> io::Result<Self> {
        let file =
            std::fs::OpenOptions::new().write(true).custom_flags(nix::fcntl::OFlag::O_DIRECT.bits()).open(path)?;
        let buffer = vec![0u8; PIECE as usize + Self::ALIGN];
        let start = buffer.as_ptr().align_offset(Self::ALIGN);
        Ok(Self { file, buffer, start })
    }

    fn write(&self, mut offset: u64, mut length: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        while length > 0 {
            let n = length.min(PIECE) as usize;
            let written = self.file.write_at(&self.buffer[self.start..self.start + n], offset)?;
            if written == 0 {
                return Err(io::Error::other("a direct write of zeros wrote nothing"));
            }
            offset += written as u64;
            length -= written as u64;
        }
        Ok(())
    }
}

/// Zeroes a range of a block device: as a write-zeroes request that may
/// unmap (punch a hole), else as zeros the kernel writes itself.
fn zero_range(device: &File, start: u64, length: u64) -> io::Result<()> {
    let (start, length) = (to_off(start)?, to_off(length)?);
    let keep = FallocateFlags::FALLOC_FL_KEEP_SIZE;
    match fallocate(device, keep | FallocateFlags::FALLOC_FL_PUNCH_HOLE, start, length) {
        Err(Errno::EOPNOTSUPP | Errno::EINVAL) => {
            fallocate(device, keep | FallocateFlags::FALLOC_FL_ZERO_RANGE, start, length).map_err(io::Error::from)
        }
        other => other.map_err(io::Error::from),
    }
}

fn to_off(n: u64) -> io::Result<i64> {
    i64::try_from(n).map_err(|_| io::Error::other(format!("offset {n} out of range")))
}

/// The block device under the mount at `dir`, opened for writing: found by
/// the mount's device number, at its node in `/dev` (named by sysfs), else
/// through a node made for the purpose and removed once open.
fn block_device(dir: &Path) -> io::Result<File> {
    use nix::sys::stat::{Mode, SFlag, major, minor, mknod};
    let dev = std::fs::metadata(dir)?.dev();
    let (major, minor) = (major(dev), minor(dev));
    let uevent = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent")).unwrap_or_default();
    let named = uevent.lines().find_map(|l| l.strip_prefix("DEVNAME=")).map(|n| Path::new("/dev").join(n));
    if let Some(node) = named.filter(|n| is_node_of(n, dev)) {
        return open_device(&node);
    }
    let node = PathBuf::from(format!("/dev/.kiln-zero-out-{major}-{minor}"));
    let _ = std::fs::remove_file(&node);
    mknod(&node, SFlag::S_IFBLK, Mode::S_IRUSR | Mode::S_IWUSR, dev)
        .map_err(|e| io::Error::other(format!("no device node for {major}:{minor}, and mknod failed: {e}")))?;
    let file = open_device(&node);
    let _ = std::fs::remove_file(&node);
    file
}

fn is_node_of(node: &Path, dev: u64) -> bool {
    std::fs::metadata(node).is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == dev)
}

fn open_device(node: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(node)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open {} for writing: {e}", node.display())))
}
