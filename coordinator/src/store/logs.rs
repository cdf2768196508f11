//! Per-target append-only log files.
//!
//! Why files and not sled: logs are large, written sequentially and read by
//! byte range; sled would keep them in its page cache and log-structured
//! segments twice over. A file's length *is* the committed offset: a chunk is
//! acknowledged only after `fdatasync`, so what was acknowledged survives a
//! crash, and bytes written but not acknowledged are simply confirmed again
//! when the agent resends them.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_protocol::TargetId;

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
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

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
