//! One-time enrollment tokens.
//!
//! A token is `HMAC-SHA256(token key, target id)`: 256 bits no one can guess
//! without the key, and the same every time it is derived, so re-rendering a
//! target's user-data after a restart gives the same bytes (and a cloud's
//! idempotent launch sees the same request). The store keeps only its
//! SHA-256, consumes it atomically on first use, and it expires.

use std::path::Path;

use hmac::{Hmac, Mac};
use kiln_protocol::TargetId;
use sha2::{Digest, Sha256};

use super::{PkiError, io, read_secret, write_secret};

/// The secret from which enrollment tokens are derived (mode 0600 on disk).
pub struct TokenKey([u8; 32]);

/// The hex SHA-256 of a token: all the store ever keeps.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenHash(pub String);

impl TokenKey {
    pub(super) fn load_or_create(path: &Path) -> Result<Self, PkiError> {
        if path.exists() {
            let hex_key = read_secret(path)?;
            let bytes = hex::decode(hex_key.trim()).ok().and_then(|b| <[u8; 32]>::try_from(b).ok());
            return bytes.map(Self).ok_or_else(|| {
                io(path, std::io::Error::new(std::io::ErrorKind::InvalidData, "not a 32-byte hex key"))
            });
        }
        let key: [u8; 32] = rand::random();
        write_secret(path, hex::encode(key).as_bytes())?;
        Ok(Self(key))
    }

    /// The enrollment token of `target`.
    pub fn token(&self, target: TargetId) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(b"kiln enrollment token v1\0");
        mac.update(target.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

impl TokenHash {
    pub fn of(token: &str) -> Self {
        Self(hex::encode(Sha256::digest(token.as_bytes())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Tokens are stable per target, differ across targets, and carry 256 bits.
    #[test]
    fn tokens_are_derived_per_target() {
        let dir = tempfile::tempdir().unwrap();
        let key = TokenKey::load_or_create(&dir.path().join("k")).unwrap();
        let (a, b) = (TargetId::generate(), TargetId::generate());
        assert_eq!(key.token(a), key.token(a));
        assert_ne!(key.token(a), key.token(b));
        assert_eq!(key.token(a).len(), 64);
        let again = TokenKey::load_or_create(&dir.path().join("k")).unwrap();
        assert_eq!(key.token(a), again.token(a));
        assert_ne!(TokenHash::of(&key.token(a)).0, key.token(a));
    }
}
