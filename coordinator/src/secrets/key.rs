//! The sealing key beside the store, and sealed values.
//!
//! `<data_dir>/secrets.key` holds 32 random bytes (mode 0600), created at
//! first start. Every stored secret (cloud credentials, a revision's secret
//! env, log bytes held back while they may be the start of a secret) is
//! sealed with XChaCha20-Poly1305 under it: a fresh random 192-bit nonce per
//! value (so nonces never repeat, however many values are sealed), and the
//! record's tree and key as associated data (so a sealed value moved to
//! another record does not open). A copy of the sled database alone reveals
//! nothing; a backup of the data directory needs the key file too.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// The key file's name in the data directory.
pub const KEY_FILE: &str = "secrets.key";
const KEY_LEN: usize = 32;
/// The first byte of every sealed value: its format. Plaintext JSON records
/// from older data directories start with `{`, so the two never mix up.
const FORMAT_V1: u8 = 1;
const NONCE_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("cannot read or write the key file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the key file {path} has {len} bytes, not {KEY_LEN}: restore it from the backup made with this data directory"
    )]
    BadKey { path: PathBuf, len: usize },
    #[error("the key file {path} has mode {mode:o}; others must not read it: chmod 600 {path}")]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "a sealed value does not open with this data directory's key (wrong secrets.key, or the record was altered)"
    )]
    Open,
}

/// The data directory's sealing key.
#[derive(Clone)]
pub struct SecretKey(XChaCha20Poly1305);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl SecretKey {
    /// Reads `<dir>/secrets.key`, creating it (0600) when there is none.
    pub fn load_or_create(dir: &Path) -> Result<Self, SealError> {
        let path = dir.join(KEY_FILE);
        let io = |source| SealError::Io { path: path.clone(), source };
        match std::fs::read(&path) {
            Ok(bytes) => {
                let mode = std::fs::metadata(&path).map_err(io)?.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(SealError::Permissions { path, mode });
                }
                if bytes.len() != KEY_LEN {
                    return Err(SealError::BadKey { path, len: bytes.len() });
                }
                Ok(Self(XChaCha20Poly1305::new_from_slice(&bytes).expect("32-byte key")))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = XChaCha20Poly1305::generate_key(&mut OsRng);
                // create_new: two starts never both write a key; 0600 from the first byte.
                let mut file =
                    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(io)?;
                file.write_all(&key).and_then(|()| file.sync_all()).map_err(io)?;
                tracing::info!(path = %path.display(), "created the key that seals stored secrets; back it up with the data directory");
                Ok(Self(XChaCha20Poly1305::new(&key)))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// A key for tests only, random and never written.
    pub fn ephemeral() -> Self {
        Self(XChaCha20Poly1305::new(&XChaCha20Poly1305::generate_key(&mut OsRng)))
    }

    /// Seals `plain`, bound to `context` (the record's tree and key).
    pub fn seal(&self, context: &[u8], plain: &[u8]) -> Vec<u8> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = self.0.encrypt(&nonce, Payload { msg: plain, aad: context }).expect("sealing cannot fail");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens a value made by [`SecretKey::seal`] with the same `context`.
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if !is_sealed(sealed) || sealed.len() < 1 + NONCE_LEN {
            return Err(SealError::Open);
        }
        let nonce = XNonce::from_slice(&sealed[1..1 + NONCE_LEN]);
        self.0.decrypt(nonce, Payload { msg: &sealed[1 + NONCE_LEN..], aad: context }).map_err(|_| SealError::Open)
    }
}

/// Whether `value` is in the sealed format (else it is an older plaintext record).
pub fn is_sealed(value: &[u8]) -> bool {
    value.first() == Some(&FORMAT_V1)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A sealed value opens only with its own key and context, and does not contain the plaintext.
    #[test]
    fn seals_and_binds_the_context() {
        let key = SecretKey::ephemeral();
        let sealed = key.seal(b"secrets\0aws", b"hunter2-password");
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(key.open(b"secrets\0aws", &sealed).unwrap(), b"hunter2-password");
        assert!(key.open(b"secrets\0gcp", &sealed).is_err());
        assert!(SecretKey::ephemeral().open(b"secrets\0aws", &sealed).is_err());
        assert_ne!(key.seal(b"c", b"same"), key.seal(b"c", b"same"), "a fresh nonce per value");
    }

    // The key file is made once with mode 0600, read back the same, and refused when others can read it.
    #[test]
    fn key_file_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let first = SecretKey::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let again = SecretKey::load_or_create(dir.path()).unwrap();
        assert_eq!(again.open(b"c", &first.seal(b"c", b"v")).unwrap(), b"v");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = SecretKey::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&format!("chmod 600 {}", path.display())), "{err}");
    }
}
