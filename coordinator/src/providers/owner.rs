//! The coordinator id: which coordinator made a cloud resource.
//!
//! Every resource kiln creates on a cloud carries it (the `kiln:coordinator`
//! tag on EC2, the `kiln_coordinator` property on OpenStack), so the janitor
//! lists what this coordinator made and nothing another coordinator, sharing
//! the same account, made. It is made once, at the first start of a data
//! directory, and kept in `<data>/coordinator-id` (mode 0600). A file rather
//! than a store key: the providers, which tag with it, are built before the
//! store is opened, and a copy of the data directory is the same coordinator.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The file under the data directory that holds the id.
pub const FILE: &str = "coordinator-id";

/// An id of one coordinator's data directory: `kc-` and 32 hex digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CoordinatorId(String);

impl fmt::Display for CoordinatorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why the id could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("cannot read or create the coordinator id in {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} does not hold a coordinator id ({found:?}); restore it from a backup of the data directory, or remove it to make a new one (resources tagged with the old one are then no longer swept)"
    )]
    Malformed { path: String, found: String },
}

impl CoordinatorId {
    /// The id as tagged on the cloud.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses a stored id.
    pub fn parse(text: &str) -> Option<Self> {
        let hex = text.strip_prefix("kc-")?;
        (hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
            .then(|| Self(text.to_owned()))
    }

    /// Reads the id of `data_dir`, making it (and the directory, mode 0700)
    /// at the first start.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, OwnerError> {
        let path = data_dir.join(FILE);
        let io = |source| OwnerError::Io { path: path.display().to_string(), source };
        crate::secrets::modes::create_private_dir(data_dir).map_err(io)?;
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(text.trim())
                .ok_or_else(|| OwnerError::Malformed { path: path.display().to_string(), found: text.trim().into() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Self(format!("kc-{}", hex::encode(rand::random::<[u8; 16]>())));
                // Written aside and renamed, so a crash never leaves half an id.
                let tmp = data_dir.join(format!("{FILE}.tmp"));
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(io)?;
                f.write_all(format!("{id}\n").as_bytes()).and_then(|()| f.sync_all()).map_err(io)?;
                std::fs::rename(&tmp, &path).map_err(io)?;
                Ok(id)
            }
            Err(e) => Err(io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The id is made once and read back the same at every later start.
    #[test]
    fn made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = CoordinatorId::load_or_create(&data).unwrap();
        assert_eq!(CoordinatorId::load_or_create(&data).unwrap(), first);
        assert!(CoordinatorId::parse(first.as_str()).is_some());
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(data.join(FILE)).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
    }

    // A damaged file is refused with what to do, never silently replaced.
    #[test]
    fn a_damaged_id_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "garbage\n").unwrap();
        let err = CoordinatorId::load_or_create(dir.path()).unwrap_err();
        assert!(err.to_string().contains("restore it from a backup"), "{err}");
    }
}
