//! Typed identifiers: never a bare string across a module boundary.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
        #[serde(transparent)]
        #[schema(value_type = String, format = Uuid)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh, time-ordered id (UUIDv7), so keys sort by creation.
            pub fn generate() -> Self {
                Self(Uuid::now_v7())
            }

            /// The 16 bytes of the id, big-endian: a sortable store key.
            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }

            /// Rebuilds an id from the bytes returned by [`Self::as_bytes`].
            pub fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(Uuid::from_bytes(bytes))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_id!(
    /// One run of one generator revision on a set of clouds.
    BuildId
);
uuid_id!(
    /// The part of a build on one cloud; named in the agent's certificate.
    TargetId
);

impl TargetId {
    /// The URI put in the SAN of the agent certificate issued to this target.
    pub fn san_uri(&self) -> String {
        format!("kiln://target/{}", self.0)
    }

    /// Parses the SAN URI written by [`TargetId::san_uri`].
    pub fn from_san_uri(uri: &str) -> Option<Self> {
        uri.strip_prefix("kiln://target/")?.parse().ok()
    }
}

/// A name a user chose that is not a valid kiln name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid name {}: use 1 to 63 characters from a-z, 0-9, '-', '_' and '.', starting with a letter or digit",
    crate::quote::quote(name)
)]
pub struct InvalidName {
    pub name: String,
}

fn check_name(name: &str) -> Result<(), InvalidName> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if ok { Ok(()) } else { Err(InvalidName { name: name.to_owned() }) }
}

macro_rules! name_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
        #[serde(try_from = "String", into = "String")]
        #[schema(value_type = String, pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidName;
            fn try_from(s: String) -> Result<Self, InvalidName> {
                check_name(&s)?;
                Ok(Self(s))
            }
        }

        impl FromStr for $name {
            type Err = InvalidName;
            fn from_str(s: &str) -> Result<Self, InvalidName> {
                Self::try_from(s.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
    };
}

name_id!(
    /// The user's name for a configured cloud, e.g. `local` or `us-east-1`.
    CloudName
);
name_id!(
    /// The user's name for a generator, e.g. `dstat`.
    GeneratorName
);

#[cfg(test)]
mod tests {
    use super::*;

    // Names are checked at the boundary, so a bad one never reaches the store.
    #[test]
    fn names_are_validated() {
        for good in ["local", "us-east-1", "a", "web_2.0"] {
            assert!(good.parse::<CloudName>().is_ok(), "{good}");
        }
        for bad in ["", "Local", "-x", "a/b", "a b", &"x".repeat(64)] {
            assert!(bad.parse::<GeneratorName>().is_err(), "{bad}");
        }
        let err = serde_json::from_str::<CloudName>("\"Bad Name\"").unwrap_err();
        assert!(err.to_string().contains("invalid name"), "{err}");
    }

    // The certificate's SAN URI round-trips to the same target.
    #[test]
    fn san_uri_round_trips() {
        let id = TargetId::generate();
        assert_eq!(TargetId::from_san_uri(&id.san_uri()), Some(id));
        assert_eq!(TargetId::from_san_uri("kiln://build/x"), None);
    }
}
