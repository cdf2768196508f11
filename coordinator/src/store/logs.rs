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

/// The directory of log files, with one writer at a time per target.
#[derive(Debug)]
pub struct LogFiles {
    dir: PathBuf,
    locks: Mutex<HashMap<TargetId, Arc<tokio::sync::Mutex<()>>>>,
}

impl LogFiles {
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self { dir: dir.to_owned(), locks: Mutex::default() })
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
    pub async fn write_masked(&self, target: TargetId, stored: u64, bytes: Vec<u8>) -> io::Result<()> {
        let path = self.path(target);
        tokio::task::spawn_blocking(move || {
            let mut file = OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(&path)?;
            let len = file.metadata()?.len();
            if len < stored {
                return Err(io::Error::other(format!(
                    "{} has {len} bytes but {stored} were committed",
                    path.display()
                )));
            }
            if len > stored {
                file.set_len(stored)?;
            }
            if !bytes.is_empty() || len > stored {
                file.seek(SeekFrom::Start(stored))?;
                file.write_all(&bytes)?;
                file.sync_data()?;
            }
            Ok(())
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Appends `bytes` that start at `offset`, idempotently: bytes that are
    /// already committed must match and are not written again.
    pub async fn append(&self, target: TargetId, offset: u64, bytes: bytes::Bytes) -> io::Result<Append> {
        let lock = self.lock(target);
        let _guard = lock.lock().await;
        let path = self.path(target);
        tokio::task::spawn_blocking(move || append_blocking(&path, offset, &bytes)).await.map_err(io::Error::other)?
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

fn append_blocking(path: &Path, offset: u64, bytes: &[u8]) -> io::Result<Append> {
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
    file.seek(SeekFrom::Start(len))?;
    file.write_all(rest)?;
    file.sync_data()?;
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
        let logs = LogFiles::open(dir.path()).unwrap();
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
}
