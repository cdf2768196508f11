//! Per-target append-only log files.
//!
//! Why files and not sled: logs are large, written sequentially and read by
//! byte range; sled would keep them in its page cache and log-structured
//! segments twice over. A file's length *is* the committed offset: a chunk is
//! acknowledged only after `fdatasync`, so what was acknowledged survives a
//! crash, and bytes written but not acknowledged are simply confirmed again
//! when the agent resends them.
//!
//! A target whose script has secrets gets a masked log: the file holds the
//! output with every secret value replaced by `***`, so its length is no
//! longer the agent's offset. A [`MaskCursor`] (sealed in the store) then
//! says how many raw bytes were taken and holds the last few back while they
//! may begin a secret; [`masked_append`] is the pure step from one cursor to
//! the next, and the cursor is stored before the chunk is acknowledged.
//!
//! A full disk: a chunk that would leave the file system with less free than
//! the reserve is refused whole ([`LogError::Full`]) before a byte of it is
//! written, so the store keeps room to record what happened. Should the disk
//! fill all the same (another process, a write racing this one), a failed
//! write or sync is cut back to the committed length: nothing of a refused
//! chunk stays in the file to be counted later.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_protocol::TargetId;

use super::records::MaskCursor;
use crate::secrets::Masker;

/// The result of offering a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Append {
    /// The chunk fits: this many bytes are now durable.
    Committed(u64),
    /// The chunk starts past the end or disagrees with committed bytes.
    Mismatch { committed: u64 },
}

/// Why a chunk was not written.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The file system has no room for the chunk above the reserve; the
    /// file is as it was.
    #[error(
        "the file system of {} has {free} bytes free; {needed} more would leave less than the {reserve} bytes kept for the store",
        dir.display()
    )]
    Full { dir: PathBuf, free: u64, needed: u64, reserve: u64 },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The directory of log files, with one writer at a time per target.
#[derive(Debug)]
pub struct LogFiles {
    dir: PathBuf,
    /// Free bytes a write must leave on the file system.
    reserve: u64,
    locks: Mutex<HashMap<TargetId, Arc<tokio::sync::Mutex<()>>>>,
}

impl LogFiles {
    /// Opens the log directory; every write leaves at least `reserve` bytes
    /// free on its file system.
    pub fn open(dir: &Path, reserve: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self { dir: dir.to_owned(), reserve, locks: Mutex::default() })
    }

    fn path(&self, target: TargetId) -> PathBuf {
        self.dir.join(format!("{target}.log"))
    }

    fn lock(&self, target: TargetId) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().expect("lock map poisoned").entry(target).or_default().clone()
    }

    /// The one writer of `target`'s log, for a masked append (load the
    /// cursor, write, store the cursor) that must not interleave with another.
    pub async fn writer(&self, target: TargetId) -> tokio::sync::OwnedMutexGuard<()> {
        self.lock(target).lock_owned().await
    }

    /// Writes masked bytes after the first `stored` bytes of the file, first
    /// cutting off anything past `stored` (written before a crash, never
    /// acknowledged, and about to be written again the same). Hold
    /// [`LogFiles::writer`].
    pub async fn write_masked(&self, target: TargetId, stored: u64, bytes: Vec<u8>) -> Result<(), LogError> {
        let path = self.path(target);
        let room = self.room();
        tokio::task::spawn_blocking(move || {
            let mut file = OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(&path)?;
            let len = file.metadata()?.len();
            if len < stored {
                return Err(io::Error::other(format!(
                    "{} has {len} bytes but {stored} were committed",
                    path.display()
                ))
                .into());
            }
            if len > stored {
                file.set_len(stored)?;
            }
            if !bytes.is_empty() || len > stored {
                if !bytes.is_empty() {
                    room.check(bytes.len() as u64)?;
                }
                write_at_end(&mut file, stored, &bytes).map_err(|e| room.explain(e))?;
            }
            Ok(())
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Appends `bytes` that start at `offset`, idempotently: bytes that are
    /// already committed must match and are not written again.
    pub async fn append(&self, target: TargetId, offset: u64, bytes: bytes::Bytes) -> Result<Append, LogError> {
        let lock = self.lock(target);
        let _guard = lock.lock().await;
        let path = self.path(target);
        let room = self.room();
        tokio::task::spawn_blocking(move || append_blocking(&path, offset, &bytes, &room))
            .await
            .map_err(io::Error::other)?
    }

    fn room(&self) -> Room {
        Room { dir: self.dir.clone(), reserve: self.reserve }
    }

    /// Bytes committed so far (0 before the first chunk).
    pub async fn len(&self, target: TargetId) -> io::Result<u64> {
        match tokio::fs::metadata(self.path(target)).await {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Reads at most `limit` bytes from `offset`.
    pub async fn read(&self, target: TargetId, offset: u64, limit: u64) -> io::Result<Vec<u8>> {
        let path = self.path(target);
        tokio::task::spawn_blocking(move || {
            let mut file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(e),
            };
            file.seek(SeekFrom::Start(offset))?;
            let mut out = Vec::new();
            file.take(limit).read_to_end(&mut out)?;
            Ok(out)
        })
        .await
        .map_err(io::Error::other)?
    }
}

/// The log directory's file system and the free space it must keep.
struct Room {
    dir: PathBuf,
    reserve: u64,
}

impl Room {
    /// Bytes an unprivileged writer may still use there.
    fn free(&self) -> io::Result<u64> {
        let st = nix::sys::statvfs::statvfs(&self.dir).map_err(io::Error::from)?;
        Ok(st.blocks_available().saturating_mul(st.fragment_size()))
    }

    /// Refuses `needed` bytes that would leave less than the reserve free.
    fn check(&self, needed: u64) -> Result<(), LogError> {
        let free = self.free()?;
        if free.saturating_sub(needed) < self.reserve || free < needed {
            return Err(self.full(free, needed));
        }
        Ok(())
    }

    fn full(&self, free: u64, needed: u64) -> LogError {
        LogError::Full { dir: self.dir.clone(), free, needed, reserve: self.reserve }
    }

    /// A write that ran out of space anyway is [`LogError::Full`].
    fn explain(&self, e: io::Error) -> LogError {
        if matches!(e.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded) {
            self.full(self.free().unwrap_or(0), 0)
        } else {
            LogError::Io(e)
        }
    }
}

/// Writes `bytes` at `len`, the file's committed length, and makes them
/// durable; on any failure the file is cut back to `len` (which frees, so
/// it works on a full disk), and no byte of the chunk is left to be counted.
fn write_at_end(file: &mut std::fs::File, len: u64, bytes: &[u8]) -> io::Result<()> {
    let written = file.seek(SeekFrom::Start(len)).and_then(|_| file.write_all(bytes)).and_then(|()| file.sync_data());
    if let Err(e) = written {
        if let Err(cut) = file.set_len(len).and_then(|()| file.sync_data()) {
            tracing::error!(error = %cut, len, "cannot cut a failed log write back to the committed length");
        }
        return Err(e);
    }
    Ok(())
}

fn append_blocking(path: &Path, offset: u64, bytes: &[u8], room: &Room) -> Result<Append, LogError> {
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path)?;
    let len = file.metadata()?.len();
    if offset > len {
        return Ok(Append::Mismatch { committed: len });
    }
    let overlap = usize::try_from(len - offset).unwrap_or(usize::MAX).min(bytes.len());
    if overlap > 0 {
        let mut existing = vec![0; overlap];
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(&mut existing)?;
        if existing != bytes[..overlap] {
            return Ok(Append::Mismatch { committed: len });
        }
    }
    let rest = &bytes[overlap..];
    if rest.is_empty() {
        return Ok(Append::Committed(len));
    }
    room.check(rest.len() as u64)?;
    write_at_end(&mut file, len, rest).map_err(|e| room.explain(e))?;
    Ok(Append::Committed(len + rest.len() as u64))
}

/// What to do with a chunk of a masked log.
#[derive(Debug, PartialEq, Eq)]
pub enum MaskedAppend {
    /// Nothing new: these raw bytes are committed.
    Committed(u64),
    /// Append `bytes` to the file, then store `cursor`, then acknowledge.
    Write { bytes: Vec<u8>, cursor: MaskCursor },
    /// The chunk starts past the end or disagrees with held-back bytes.
    Mismatch { committed: u64 },
}

/// The step of a masked log from `cursor` for the raw `bytes` at `offset`
/// (in the agent's raw offsets). As for plain logs, a resent chunk is taken
/// once; its overlap with committed bytes is checked against the held-back
/// bytes, the only raw bytes kept (the rest exist only masked). With `end`
/// the stream is complete: the held-back bytes are written out too.
pub fn masked_append(cursor: &MaskCursor, offset: u64, bytes: &[u8], masker: &Masker, end: bool) -> MaskedAppend {
    let raw = cursor.raw;
    if offset > raw {
        return MaskedAppend::Mismatch { committed: raw };
    }
    let held_from = raw - cursor.pending.len() as u64;
    let overlap = usize::try_from(raw - offset).unwrap_or(usize::MAX).min(bytes.len());
    for (i, b) in bytes[..overlap].iter().enumerate() {
        let at = offset + i as u64;
        if at >= held_from && cursor.pending[(at - held_from) as usize] != *b {
            return MaskedAppend::Mismatch { committed: raw };
        }
    }
    let new = &bytes[overlap..];
    // Nothing new, and no end to write the held-back bytes out for.
    if new.is_empty() && (!end || cursor.ended) {
        return MaskedAppend::Committed(raw);
    }
    let mut data = cursor.pending.clone();
    data.extend_from_slice(new);
    let (out, covered) = masker.mask(&data, end);
    let next = MaskCursor {
        raw: raw + new.len() as u64,
        stored: cursor.stored + out.len() as u64,
        pending: data[covered..].to_vec(),
        ended: end,
    };
    MaskedAppend::Write { bytes: out, cursor: next }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    // One case a line: (offset, bytes) offered in order → what the file
    // holds after it and the answer, for the secret "s3cr3t".
    #[test]
    fn masked_appends_are_idempotent_across_chunks() {
        let masker = Masker::new(["s3cr3t"]);
        let cases: &[(u64, &str, &str, Option<u64>)] = &[
            (0, "pw=s3c", "pw=", Some(6)),
            (0, "pw=s3c", "pw=", Some(6)),        // resent: nothing doubled
            (3, "s3x", "pw=", None),              // disagrees with the held-back bytes
            (9, "gap", "pw=", None),              // past the end
            (4, "3cr3t\n", "pw=***\n", Some(10)), // the rest of the secret, overlapping
            (10, "", "pw=***\n", Some(10)),
            (10, "bye s3", "pw=***\nbye ", Some(16)),
        ];
        let mut cursor = MaskCursor::default();
        let mut file = Vec::new();
        for (offset, data, want_file, want) in cases {
            match masked_append(&cursor, *offset, data.as_bytes(), &masker, false) {
                MaskedAppend::Committed(n) => assert_eq!(Some(n), *want, "offset {offset} data {data:?}"),
                MaskedAppend::Mismatch { committed } => {
                    assert_eq!(*want, None, "offset {offset} data {data:?}");
                    assert_eq!(committed, cursor.raw);
                }
                MaskedAppend::Write { bytes, cursor: next } => {
                    assert_eq!(Some(next.raw), *want, "offset {offset} data {data:?}");
                    file.extend_from_slice(&bytes);
                    assert_eq!(next.stored, file.len() as u64);
                    cursor = next;
                }
            }
            assert_eq!(String::from_utf8_lossy(&file), *want_file, "offset {offset} data {data:?}");
        }
        // The exit: the held-back "s3" was no secret after all, and is written out.
        let MaskedAppend::Write { bytes, cursor } = masked_append(&cursor, 16, b"", &masker, true) else {
            panic!("the end writes the held-back bytes")
        };
        file.extend_from_slice(&bytes);
        assert_eq!(String::from_utf8_lossy(&file), "pw=***\nbye s3");
        assert!(cursor.pending.is_empty() && cursor.ended);
        assert_eq!(masked_append(&cursor, 16, b"", &masker, true), MaskedAppend::Committed(16));
    }

    // One case per line: (offset, bytes) offered in order → expected answer.
    #[tokio::test]
    async fn appends_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogFiles::open(dir.path(), 0).unwrap();
        let t = TargetId::generate();
        let cases: &[(u64, &str, Append)] = &[
            (0, "hello ", Append::Committed(6)),
            (0, "hello ", Append::Committed(6)),    // resent: nothing doubled
            (3, "lo world", Append::Committed(11)), // overlap then new bytes
            (20, "gap", Append::Mismatch { committed: 11 }),
            (6, "WORLD", Append::Mismatch { committed: 11 }), // disagrees with committed bytes
            (11, "", Append::Committed(11)),
            (11, "!", Append::Committed(12)),
        ];
        for (offset, data, want) in cases {
            let got = logs.append(t, *offset, Bytes::from(data.to_string())).await.unwrap();
            assert_eq!(got, *want, "offset {offset} data {data:?}");
        }
        assert_eq!(logs.read(t, 0, 100).await.unwrap(), b"hello world!");
        assert_eq!(logs.read(t, 6, 5).await.unwrap(), b"world");
        assert_eq!(logs.len(TargetId::generate()).await.unwrap(), 0);
    }

    // A chunk that would eat into the reserve is refused whole, plain or
    // masked; a resend of committed bytes still answers.
    #[tokio::test]
    async fn a_chunk_past_the_reserve_is_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let t = TargetId::generate();
        LogFiles::open(dir.path(), 0).unwrap().append(t, 0, Bytes::from_static(b"kept\n")).await.unwrap();
        let logs = LogFiles::open(dir.path(), u64::MAX).unwrap();
        let err = logs.append(t, 5, Bytes::from_static(b"refused\n")).await.unwrap_err();
        assert!(matches!(err, LogError::Full { needed: 8, .. }), "{err}");
        assert!(err.to_string().contains("kept for the store"), "{err}");
        assert_eq!(logs.append(t, 0, Bytes::from_static(b"kept\n")).await.unwrap(), Append::Committed(5));
        let err = logs.write_masked(t, 5, b"masked".to_vec()).await.unwrap_err();
        assert!(matches!(err, LogError::Full { .. }), "{err}");
        assert_eq!(logs.read(t, 0, 100).await.unwrap(), b"kept\n");
    }
}
