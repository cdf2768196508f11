//! Who may use the public API: API tokens with roles, and the page's login session.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Timestamp;

/// What a token (and the session made from it) may do. Each role includes
/// the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads clouds, generators, builds, logs and images.
    Viewer,
    /// Also saves generators and starts and cancels builds.
    Builder,
    /// Also manages clouds, their secrets, images and tokens.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Builder => "builder",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "builder" => Ok(Role::Builder),
            "admin" => Ok(Role::Admin),
            _ => {
                Err(format!("unknown role {:?}: use viewer, builder or admin", s.chars().take(40).collect::<String>()))
            }
        }
    }
}

/// An API token as listed: never its secret, which only its creator saw.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApiToken {
    /// Names the token for `kiln token revoke` (16 hex digits).
    #[schema(pattern = "^[0-9a-f]{16}$")]
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_at: Timestamp,
}

/// Asks for a new token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Says whose or what the token is (1 to 64 characters, no control characters).
    #[schema(min_length = 1, max_length = 64, pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$")]
    pub name: String,
    pub role: Role,
}

/// A new token: `secret` is shown this once and kept only as a hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    pub token: ApiToken,
    /// Send it as `Authorization: Bearer <secret>`.
    pub secret: String,
}

/// The page's login: a token exchanged for a session cookie.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub token: String,
}

/// Who the caller is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Session {
    /// The token's name.
    pub name: String,
    pub role: Role,
    /// With a session cookie: send this in the `X-Kiln-Csrf` header of every
    /// request that changes something. Absent for bearer tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csrf: Option<String>,
}

/// The answer of the open health endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok` when the coordinator answers.
    pub status: String,
}
