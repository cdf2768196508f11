//! Who may call the public API.
//!
//! - API tokens: `kiln_` and 43 characters of base64url (256 random bits),
//!   stored only as their SHA-256, each with a [`Role`].
//! - The admin token made at first start, written to `<data>/admin-token` (0600).
//! - In-process tokens (one-shot runs): in memory only, gone with the process.
//! - The page's sessions: a login exchanges a token for a random cookie and a
//!   CSRF token, both in memory only; a session lasts [`SESSION_TTL`] and ends
//!   with its token.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kiln_protocol::Timestamp;
use kiln_protocol::access::{ApiToken, CreatedToken, Role, Session, TokenRequest};
use sha2::{Digest, Sha256};

use super::{App, AppError};

/// The file in the data directory that holds the first admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// How long a page login lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The most page sessions kept at once; the oldest go first.
const MAX_SESSIONS: usize = 10_000;
const TOKEN_PREFIX: &str = "kiln_";

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The token's name.
    pub name: String,
    pub role: Role,
    /// The stored token's id (none for an in-process token).
    pub token_id: Option<String>,
    /// The page's session, when the caller came with its cookie.
    pub csrf: Option<String>,
}

/// Tokens that live only in this process, and the page's sessions.
#[derive(Default)]
pub(crate) struct Access {
    ephemeral: Mutex<HashMap<String, Principal>>,
    sessions: Mutex<HashMap<String, SessionEntry>>,
}

struct SessionEntry {
    /// The hash of the token that logged in (checked at every use, so a
    /// revoked token's sessions end with it).
    token_hash: String,
    csrf: String,
    expires: Instant,
}

/// A fresh random secret with `prefix`.
fn random_secret(prefix: &str) -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The 401 for a request without (valid) credentials.
pub fn missing_credentials() -> AppError {
    AppError::Unauthorized(
        "this needs an API token: send `Authorization: Bearer <token>` (`kiln token create` makes one; the first admin token is in the data directory's admin-token file), or log in on the page".into(),
    )
}

/// Checks a token name: 1 to 64 characters, none of them control characters.
fn check_name(name: &str) -> Result<(), AppError> {
    let len = name.chars().count();
    if len == 0 || len > 64 || name.chars().any(char::is_control) {
        return Err(AppError::BadRequest(
            "a token's name must be 1 to 64 characters without control characters".into(),
        ));
    }
    Ok(())
}

impl App {
    /// Makes a token; its secret is in the answer only.
    pub fn create_token(&self, req: TokenRequest) -> Result<CreatedToken, AppError> {
        check_name(&req.name)?;
        let secret = random_secret(TOKEN_PREFIX);
        let hash = hash(&secret);
        let token =
            ApiToken { id: hash[..16].to_owned(), name: req.name, role: req.role, created_at: Timestamp::now() };
        self.0.store.insert_api_token(&hash, &token)?;
        tracing::info!(token = %token.id, name = %token.name, role = %token.role, "API token created");
        Ok(CreatedToken { token, secret })
    }

    pub fn tokens(&self) -> Result<Vec<ApiToken>, AppError> {
        Ok(self.0.store.api_tokens()?)
    }

    /// Revokes a token; its sessions end with it.
    /// Revokes token `id`; `by` is the caller, who may not revoke its own
    /// token (so the API can never lock out its last admin).
    pub fn revoke_token(&self, id: &str, by: &Principal) -> Result<(), AppError> {
        if by.token_id.as_deref() == Some(id) {
            return Err(AppError::Conflict(
                "a token cannot revoke itself: revoke it with another admin token (`kiln token create --role admin` makes one)".into(),
            ));
        }
        if !self.0.store.remove_api_token(id)? {
            return Err(AppError::not_found(
                format!("token {}", id.chars().take(40).collect::<String>()),
                "`kiln token list` shows the tokens",
            ));
        }
        tracing::info!(token = %id, "API token revoked");
        Ok(())
    }

    /// A token valid only while this process runs (one-shot mode's own client).
    pub fn ephemeral_token(&self, name: &str, role: Role) -> String {
        let secret = random_secret(TOKEN_PREFIX);
        let principal = Principal { name: name.to_owned(), role, token_id: None, csrf: None };
        self.0.access.ephemeral.lock().expect("access lock").insert(hash(&secret), principal);
        secret
    }

    /// At first start (no token stored yet): makes an admin token and writes
    /// it to `<data>/admin-token`, mode 0600.
    pub(crate) fn ensure_admin_token(&self) -> Result<(), AppError> {
        if self.0.store.has_api_tokens() {
            return Ok(());
        }
        let created = self.create_token(TokenRequest { name: "admin".into(), role: Role::Admin })?;
        let path = self.config().data_dir.join(ADMIN_TOKEN_FILE);
        crate::pki::write_secret(&path, format!("{}\n", created.secret).as_bytes())?;
        tracing::info!(path = %path.display(), "first start: wrote an admin API token; `kiln token create` makes more");
        Ok(())
    }

    /// The caller whose token hashes to `hash`: an in-process token or a stored one.
    fn principal_of(&self, hash: &str) -> Result<Option<Principal>, AppError> {
        if let Some(p) = self.0.access.ephemeral.lock().expect("access lock").get(hash) {
            return Ok(Some(p.clone()));
        }
        Ok(self.0.store.api_token(hash)?.map(|t| Principal {
            name: t.name,
            role: t.role,
            token_id: Some(t.id),
            csrf: None,
        }))
    }

    /// The caller behind a bearer token.
    pub fn authenticate(&self, secret: &str) -> Result<Principal, AppError> {
        self.principal_of(&hash(secret.trim()))?.ok_or_else(|| {
            AppError::Unauthorized(
                "the API token is not valid (revoked, mistyped, or from another coordinator); ask an admin for one (`kiln token create`)".into(),
            )
        })
    }

    /// Exchanges a token for a page session: the cookie's value and who it is.
    pub fn login(&self, token: &str) -> Result<(String, Session), AppError> {
        let principal = self.authenticate(token)?;
        let cookie = random_secret("");
        let csrf = random_secret("");
        let entry =
            SessionEntry { token_hash: hash(token.trim()), csrf: csrf.clone(), expires: Instant::now() + SESSION_TTL };
        let mut sessions = self.0.access.sessions.lock().expect("access lock");
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(hash(&cookie), entry);
        tracing::info!(name = %principal.name, role = %principal.role, "page login");
        Ok((cookie, Session { name: principal.name, role: principal.role, csrf: Some(csrf) }))
    }

    /// The caller behind a session cookie.
    pub fn authenticate_session(&self, cookie: &str) -> Result<Principal, AppError> {
        let (token_hash, csrf) = {
            let sessions = self.0.access.sessions.lock().expect("access lock");
            match sessions.get(&hash(cookie)) {
                Some(s) if s.expires > Instant::now() => (s.token_hash.clone(), s.csrf.clone()),
                _ => {
                    return Err(AppError::Unauthorized(
                        "the page's session has ended (expired, logged out, or the coordinator restarted): log in again"
                            .into(),
                    ));
                }
            }
        };
        let Some(principal) = self.principal_of(&token_hash)? else {
            self.logout(cookie);
            return Err(missing_credentials());
        };
        Ok(Principal { csrf: Some(csrf), ..principal })
    }

    /// Ends a page session (nothing when there is none).
    pub fn logout(&self, cookie: &str) {
        self.0.access.sessions.lock().expect("access lock").remove(&hash(cookie));
    }
}

/// Compares two secrets in time that does not depend on where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
