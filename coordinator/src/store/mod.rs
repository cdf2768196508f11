//! The sled database: typed trees, JSON values, one schema version.
//!
//! Every write that something outside will rely on is followed by
//! [`Store::flush`] before the acknowledgement leaves the process. Log bytes
//! are not here: they live in append-only files ([`logs`]).
//!
//! Secrets (cloud credentials, revisions' secret env, log bytes held back
//! while they may begin a secret) are sealed with the data directory's
//! [`SecretKey`], bound to their tree and key; no other tree holds any.

#[cfg(test)]
mod fixture;
pub mod logs;
mod migrate;
pub mod records;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kiln_protocol::access::ApiToken;
use kiln_protocol::api::{Cloud, CloudCredentials, GeneratorSpec, Image, Revision, Secret};
use kiln_protocol::{BuildId, CloudName, GeneratorName, TargetId, Timestamp};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::{Transactional, Tree};

use records::{BuildRecord, CertRecord, GeneratorRecord, MaskCursor, TargetRecord, TokenRecord};

use crate::secrets::{SealError, SecretKey, key::is_sealed};

/// The longest a flush may take before it is reported as failed.
const FLUSH_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The layout version this code reads and writes.
pub const SCHEMA_VERSION: u32 = 2;
const SCHEMA_KEY: &[u8] = b"schema_version";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the data directory {0} is in use by another kiln process; stop it or use another --data-dir")]
    Locked(String),
    #[error("database error")]
    Sled(#[from] sled::Error),
    #[error("the record {key} in tree {tree} cannot be read; it is left as it is")]
    Corrupt {
        tree: &'static str,
        /// The record's key, printable: ASCII as it is, other bytes escaped.
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the data directory has schema version {found}, written by a newer kiln; this kiln knows versions up to {known}: run the kiln that wrote it (or a newer one)"
    )]
    SchemaNewer { found: u32, known: u32 },
    #[error(
        "the data directory has schema version {found}, which this kiln (schema {known}) cannot migrate; upgrade through an intermediate kiln release"
    )]
    SchemaTooOld { found: u32, known: u32 },
    #[error("the data directory's schema version cannot be read")]
    SchemaUnreadable,
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("a sealed record in tree {tree} cannot be opened")]
    Sealed {
        tree: &'static str,
        #[source]
        source: SealError,
    },
}

/// Why a token did not enroll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// Never issued, already used, or issued to another target.
    Unknown,
    Expired,
}

/// The trees of one kiln data directory.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    clouds: Tree,
    generators: Tree,
    revisions: Tree,
    builds: Tree,
    targets: Tree,
    tokens: Tree,
    certs: Tree,
    images: Tree,
    /// Cloud access keys, apart from the clouds so no view can carry them; sealed.
    secrets: Tree,
    /// API tokens by the hex SHA-256 of their secret.
    api_tokens: Tree,
    /// Each revision's secret env, under the revision's key; sealed.
    secret_env: Tree,
    /// Per target whose log is masked: how far it is committed; sealed.
    log_masks: Tree,
    key: SecretKey,
    /// Set once a flush has failed: sled then refuses every write until the
    /// database is reopened, and a later `flush_async` may never finish, so
    /// later flushes fail at once with this error's kind.
    failed: Arc<Mutex<Option<std::io::ErrorKind>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records always serialize")
}

/// A key as it can be printed: store ids are ASCII, anything else is escaped
/// (a UUID key is shown as its hyphenated form).
pub fn printable_key(key: &[u8]) -> String {
    if let Ok(bytes) = <[u8; 16]>::try_from(key)
        && key.iter().any(|b| !b.is_ascii_graphic())
    {
        return uuid::Uuid::from_bytes(bytes).hyphenated().to_string();
    }
    key.escape_ascii().to_string()
}

fn decode<T: DeserializeOwned>(tree: &'static str, key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt { tree, key: printable_key(key), source })
}

/// Decodes one record of a listing. A record that does not decode is logged
/// with its tree and key and skipped (`None`): one bad record must not stop
/// the server from listing, resuming or serving the others. It stays in its
/// tree untouched, and reading it by its key reports [`StoreError::Corrupt`].
fn decode_listed<T: DeserializeOwned>(tree: &'static str, key: &[u8], bytes: &[u8]) -> Option<T> {
    match decode(tree, key, bytes) {
        Ok(record) => Some(record),
        Err(e) => {
            tracing::error!(error = %e, cause = %std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default(), "skipping a record in a listing");
            None
        }
    }
}

/// Applies `f` to the record under `key` atomically; `None` when there is
/// none. A record that does not decode is left exactly as it is and reported
/// as [`StoreError::Corrupt`] (sled would delete the key if the update gave
/// nothing back).
fn update<T: Serialize + DeserializeOwned>(
    tree: &Tree,
    name: &'static str,
    key: &[u8],
    f: impl Fn(&mut T),
) -> Result<Option<T>, StoreError> {
    let mut last = None;
    tree.update_and_fetch(key, |old| {
        let old = old?;
        match serde_json::from_slice::<T>(old) {
            Ok(mut record) => {
                f(&mut record);
                let bytes = encode(&record);
                last = Some(Ok(record));
                Some(bytes)
            }
            Err(e) => {
                last = Some(Err(e));
                Some(old.to_vec())
            }
        }
    })?;
    last.transpose().map_err(|source| StoreError::Corrupt { tree: name, key: printable_key(key), source })
}

fn revision_key(name: &GeneratorName, number: u32) -> Vec<u8> {
    let mut key = name.as_str().as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&number.to_be_bytes());
    key
}

fn prefix(name: &str) -> Vec<u8> {
    let mut key = name.as_bytes().to_vec();
    key.push(0);
    key
}

/// Unwraps a transaction's result into a store error.
fn tx<T>(r: Result<T, TransactionError<StoreError>>) -> Result<T, StoreError> {
    r.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Sled(e),
    })
}

fn abort<T>(e: StoreError) -> Result<T, ConflictableTransactionError<StoreError>> {
    Err(ConflictableTransactionError::Abort(e))
}

/// The associated data of a sealed record: its tree and key.
fn context(tree: &str, key: &[u8]) -> Vec<u8> {
    let mut c = tree.as_bytes().to_vec();
    c.push(0);
    c.extend_from_slice(key);
    c
}

impl Store {
    /// Opens (or creates) the database under `dir`; `key` seals its secrets.
    /// Plaintext credentials an older kiln stored are sealed on the way.
    pub fn open(dir: &Path, key: SecretKey) -> Result<Self, StoreError> {
        let db = sled::Config::new().path(dir).open().map_err(|e| match e {
            sled::Error::Io(ref io)
                if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock") =>
            {
                StoreError::Locked(dir.display().to_string())
            }
            other => StoreError::Sled(other),
        })?;
        migrate::migrate(&db)?;
        let store = Self {
            clouds: db.open_tree("clouds")?,
            generators: db.open_tree("generators")?,
            revisions: db.open_tree("revisions")?,
            builds: db.open_tree("builds")?,
            targets: db.open_tree("targets")?,
            tokens: db.open_tree("tokens")?,
            certs: db.open_tree("certs")?,
            images: db.open_tree("images")?,
            secrets: db.open_tree("secrets")?,
            api_tokens: db.open_tree("api_tokens")?,
            secret_env: db.open_tree("secret_env")?,
            log_masks: db.open_tree("log_masks")?,
            key,
            db,
            failed: Arc::default(),
        };
        store.seal_plaintext_credentials()?;
        Ok(store)
    }

    fn seal_value<T: Serialize>(&self, tree: &'static str, key: &[u8], value: &T) -> Vec<u8> {
        self.key.seal(&context(tree, key), &encode(value))
    }

    fn open_value<T: DeserializeOwned>(&self, tree: &'static str, key: &[u8], sealed: &[u8]) -> Result<T, StoreError> {
        let plain = self.key.open(&context(tree, key), sealed).map_err(|source| StoreError::Sealed { tree, source })?;
        decode(tree, key, &plain)
    }

    /// Seals the credentials a kiln before sealing stored in plaintext. (sled
    /// may keep the old bytes in a log segment until it reuses it: rotate
    /// credentials that were stored in the clear.)
    fn seal_plaintext_credentials(&self) -> Result<(), StoreError> {
        let mut sealed = 0;
        for entry in self.secrets.iter() {
            let (name, value) = entry?;
            if is_sealed(&value) {
                continue;
            }
            let credentials: CloudCredentials = decode("secrets", &name, &value)?;
            let new = self.seal_value("secrets", &name, &credentials);
            if self.secrets.compare_and_swap(&name, Some(&value), Some(new))?.is_ok() {
                sealed += 1;
            }
        }
        if sealed > 0 {
            self.db.flush()?;
            tracing::warn!(
                clouds = sealed,
                "sealed cloud credentials stored in plaintext by an older kiln; rotate them if copies of the old database exist"
            );
        }
        Ok(())
    }

    /// Makes every write so far durable. Call before acknowledging anything.
    /// After a failed flush (a full disk, an I/O error) every later flush
    /// fails at once, and a flush that takes longer than [`FLUSH_LIMIT`]
    /// is reported as failed: a caller gets an error, never a wait without end.
    pub async fn flush(&self) -> Result<(), StoreError> {
        if let Some(kind) = *self.failed.lock().expect("store flag poisoned") {
            return Err(StoreError::Sled(sled::Error::Io(std::io::Error::new(
                kind,
                "an earlier write to the database failed; it takes no writes until kiln is restarted",
            ))));
        }
        let result = match tokio::time::timeout(FLUSH_LIMIT, self.db.flush_async()).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => {
                return Err(StoreError::Sled(sled::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the database did not finish a flush in {} s", FLUSH_LIMIT.as_secs()),
                ))));
            }
        };
        let kind = match &result {
            sled::Error::Io(e) => e.kind(),
            _ => std::io::ErrorKind::Other,
        };
        self.failed.lock().expect("store flag poisoned").get_or_insert(kind);
        Err(StoreError::Sled(result))
    }

    // ---- clouds

    pub fn insert_cloud(&self, cloud: &Cloud) -> Result<(), StoreError> {
        let key = cloud.name.as_str().as_bytes();
        match self.clouds.compare_and_swap(key, None::<&[u8]>, Some(encode(cloud)))? {
            Ok(()) => Ok(()),
            Err(_) => Err(StoreError::AlreadyExists(format!("cloud {}", cloud.name))),
        }
    }

    pub fn cloud(&self, name: &CloudName) -> Result<Option<Cloud>, StoreError> {
        self.clouds.get(name.as_str())?.map(|v| decode("clouds", name.as_str().as_bytes(), &v)).transpose()
    }

    pub fn clouds(&self) -> Result<Vec<Cloud>, StoreError> {
        let mut out = Vec::new();
        for kv in self.clouds.iter() {
            let (k, v) = kv?;
            out.extend(decode_listed("clouds", &k, &v));
        }
        Ok(out)
    }

    /// Removes a cloud and its credentials; false when there was none.
    pub fn remove_cloud(&self, name: &CloudName) -> Result<bool, StoreError> {
        self.secrets.remove(name.as_str())?;
        Ok(self.clouds.remove(name.as_str())?.is_some())
    }

    pub fn put_credentials(&self, name: &CloudName, credentials: &CloudCredentials) -> Result<(), StoreError> {
        let key = name.as_str().as_bytes();
        self.secrets.insert(key, self.seal_value("secrets", key, credentials))?;
        Ok(())
    }

    pub fn credentials(&self, name: &CloudName) -> Result<Option<CloudCredentials>, StoreError> {
        let key = name.as_str().as_bytes();
        self.secrets.get(key)?.map(|v| self.open_value("secrets", key, &v)).transpose()
    }

    // ---- generators and revisions

    /// Saves `spec` as a new revision. `create` asks for the first revision of a
    /// new generator (refused if it exists); otherwise the generator must exist.
    /// The spec's `secret_env` is stored sealed apart from the revision; when
    /// it is `None` the new revision keeps the previous revision's secrets.
    pub fn save_revision(
        &self,
        mut spec: GeneratorSpec,
        script_sha256: String,
        now: Timestamp,
        create: bool,
    ) -> Result<Revision, StoreError> {
        let name = spec.name.clone();
        let given = spec.secret_env.take();
        let trees = (&self.generators, &self.revisions, &self.secret_env);
        let result = trees.transaction(|(generators, revisions, secret_env)| {
            let head: Option<GeneratorRecord> = generators
                .get(name.as_str())?
                .map(|v| decode("generators", name.as_str().as_bytes(), &v))
                .transpose()
                .or_else(abort)?;
            let head = match (head, create) {
                (Some(_), true) => {
                    return abort(StoreError::AlreadyExists(format!("generator {name}")));
                }
                (None, false) => return abort(StoreError::NotFound(format!("generator {name}"))),
                (None, true) => GeneratorRecord { name: name.clone(), latest: 1, created_at: now, updated_at: now },
                (Some(h), false) => GeneratorRecord { latest: h.latest + 1, updated_at: now, ..h },
            };
            let secrets: BTreeMap<String, Secret> = match &given {
                Some(s) => s.clone(),
                None if head.latest > 1 => {
                    let previous = revision_key(&name, head.latest - 1);
                    match secret_env.get(&previous)? {
                        Some(v) => self.open_value("secret_env", &previous, &v).or_else(abort)?,
                        None => BTreeMap::new(),
                    }
                }
                None => BTreeMap::new(),
            };
            let revision = Revision {
                generator: name.clone(),
                number: head.latest,
                created_at: now,
                script_sha256: script_sha256.clone(),
                spec: spec.clone(),
                secret_env_names: secrets.keys().cloned().collect(),
            };
            let key = revision_key(&name, head.latest);
            generators.insert(name.as_str(), encode(&head))?;
            revisions.insert(key.clone(), encode(&revision))?;
            if !secrets.is_empty() {
                secret_env.insert(key.clone(), self.seal_value("secret_env", &key, &secrets))?;
            }
            Ok(revision)
        });
        tx(result)
    }

    pub fn generator(&self, name: &GeneratorName) -> Result<Option<GeneratorRecord>, StoreError> {
        self.generators.get(name.as_str())?.map(|v| decode("generators", name.as_str().as_bytes(), &v)).transpose()
    }

    pub fn generators(&self) -> Result<Vec<GeneratorRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.generators.iter() {
            let (k, v) = kv?;
            out.extend(decode_listed("generators", &k, &v));
        }
        Ok(out)
    }

    pub fn revision(&self, name: &GeneratorName, number: u32) -> Result<Option<Revision>, StoreError> {
        let key = revision_key(name, number);
        self.revisions.get(&key)?.map(|v| decode("revisions", &key, &v)).transpose()
    }

    /// A revision's secret env (empty when it has none).
    pub fn secret_env(&self, name: &GeneratorName, number: u32) -> Result<BTreeMap<String, Secret>, StoreError> {
        let key = revision_key(name, number);
        Ok(self.secret_env.get(&key)?.map(|v| self.open_value("secret_env", &key, &v)).transpose()?.unwrap_or_default())
    }

    /// All revisions of a generator, oldest first.
    pub fn revisions(&self, name: &GeneratorName) -> Result<Vec<Revision>, StoreError> {
        let mut out = Vec::new();
        for kv in self.revisions.scan_prefix(prefix(name.as_str())) {
            let (k, v) = kv?;
            out.extend(decode_listed("revisions", &k, &v));
        }
        Ok(out)
    }

    // ---- builds and targets

    /// Stores a new build and all its targets at once.
    pub fn insert_build(&self, build: &BuildRecord, targets: &[TargetRecord]) -> Result<(), StoreError> {
        let result = (&self.builds, &self.targets).transaction(|(builds, tree)| {
            builds.insert(build.id.as_bytes(), encode(build))?;
            for t in targets {
                tree.insert(t.id.as_bytes(), encode(t))?;
            }
            Ok(())
        });
        tx(result)
    }

    pub fn build(&self, id: BuildId) -> Result<Option<BuildRecord>, StoreError> {
        self.builds.get(id.as_bytes())?.map(|v| decode("builds", id.as_bytes(), &v)).transpose()
    }

    /// Builds, newest first (ids are time-ordered), that pass `keep`, at most `limit`.
    pub fn builds(&self, limit: usize, keep: impl Fn(&BuildRecord) -> bool) -> Result<Vec<BuildRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.builds.iter().rev() {
            let (k, v) = kv?;
            let Some(b) = decode_listed::<BuildRecord>("builds", &k, &v) else { continue };
            if keep(&b) {
                out.push(b);
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Applies `f` to a build record atomically.
    pub fn update_build(&self, id: BuildId, f: impl Fn(&mut BuildRecord)) -> Result<BuildRecord, StoreError> {
        update(&self.builds, "builds", id.as_bytes(), f)?.ok_or_else(|| StoreError::NotFound(format!("build {id}")))
    }

    pub fn target(&self, id: TargetId) -> Result<Option<TargetRecord>, StoreError> {
        self.targets.get(id.as_bytes())?.map(|v| decode("targets", id.as_bytes(), &v)).transpose()
    }

    /// Applies `f` to a target record atomically and returns the new record.
    pub fn update_target(&self, id: TargetId, f: impl Fn(&mut TargetRecord)) -> Result<TargetRecord, StoreError> {
        update(&self.targets, "targets", id.as_bytes(), f)?.ok_or_else(|| StoreError::NotFound(format!("target {id}")))
    }

    /// Every target whose workflow has not ended.
    pub fn unfinished_targets(&self) -> Result<Vec<TargetRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.targets.iter() {
            let (k, v) = kv?;
            let Some(t) = decode_listed::<TargetRecord>("targets", &k, &v) else { continue };
            if !t.status.is_terminal() {
                out.push(t);
            }
        }
        Ok(out)
    }

    // ---- enrollment tokens and certificates

    /// Records the hash of `target`'s token, unless the agent already enrolled
    /// (so a re-run launch step never revives a used token). Returns whether
    /// the token is now outstanding.
    pub fn offer_token(&self, hash: &str, record: &TokenRecord) -> Result<bool, StoreError> {
        let result = (&self.tokens, &self.targets).transaction(|(tokens, targets)| {
            let target: Option<TargetRecord> = targets
                .get(record.target.as_bytes())?
                .map(|v| decode("targets", record.target.as_bytes(), &v))
                .transpose()
                .or_else(abort)?;
            match target {
                Some(t) if !t.enrolled && !t.status.is_terminal() => {
                    tokens.insert(hash.as_bytes(), encode(record))?;
                    Ok(true)
                }
                _ => Ok(false),
            }
        });
        tx(result)
    }

    /// Consumes a token for `target` in one atomic step and marks the target
    /// enrolled. A token is consumed even when it turns out expired.
    pub fn consume_token(
        &self,
        hash: &str,
        target: TargetId,
        now: Timestamp,
        key: &str,
    ) -> Result<Result<TargetRecord, TokenRefusal>, StoreError> {
        let result = (&self.tokens, &self.targets).transaction(|(tokens, targets)| {
            let Some(bytes) = tokens.get(hash.as_bytes())? else {
                return Ok(Err(TokenRefusal::Unknown));
            };
            let record: TokenRecord = decode("tokens", hash.as_bytes(), &bytes).or_else(abort)?;
            if record.target != target {
                return Ok(Err(TokenRefusal::Unknown));
            }
            tokens.remove(hash.as_bytes())?;
            if record.expires_at < now {
                return Ok(Err(TokenRefusal::Expired));
            }
            let Some(tb) = targets.get(target.as_bytes())? else {
                return Ok(Err(TokenRefusal::Unknown));
            };
            let mut t: TargetRecord = decode("targets", target.as_bytes(), &tb).or_else(abort)?;
            if t.enrolled || t.status.is_terminal() {
                return Ok(Err(TokenRefusal::Unknown));
            }
            t.enrolled = true;
            t.enrolled_key = Some(key.to_owned());
            t.timings.agent_contact_at = Some(now);
            targets.insert(target.as_bytes(), encode(&t))?;
            Ok(Ok(t))
        });
        tx(result)
    }

    /// Forgets an outstanding token (its target ended without enrolling).
    pub fn remove_token(&self, hash: &str) -> Result<(), StoreError> {
        self.tokens.remove(hash.as_bytes())?;
        Ok(())
    }

    /// Records a certificate issued to `record.target`.
    pub fn record_cert(&self, serial: &str, record: &CertRecord) -> Result<(), StoreError> {
        self.certs.insert(serial.as_bytes(), encode(record))?;
        self.update_target(record.target, |t| t.cert_serial = Some(serial.to_owned()))?;
        Ok(())
    }

    pub fn cert(&self, serial: &str) -> Result<Option<CertRecord>, StoreError> {
        self.certs.get(serial.as_bytes())?.map(|v| decode("certs", serial.as_bytes(), &v)).transpose()
    }

    // ---- masked logs

    /// How far a masked log is committed (all zero before its first chunk).
    pub fn mask_cursor(&self, target: TargetId) -> Result<MaskCursor, StoreError> {
        let key = target.as_bytes();
        Ok(self.log_masks.get(key)?.map(|v| self.open_value("log_masks", key, &v)).transpose()?.unwrap_or_default())
    }

    /// Whether a target's log is masked (it has taken a masked chunk).
    pub fn has_mask_cursor(&self, target: TargetId) -> Result<bool, StoreError> {
        Ok(self.log_masks.contains_key(target.as_bytes())?)
    }

    pub fn put_mask_cursor(&self, target: TargetId, cursor: &MaskCursor) -> Result<(), StoreError> {
        let key = target.as_bytes();
        self.log_masks.insert(key, self.seal_value("log_masks", key, cursor))?;
        Ok(())
    }

    // ---- images

    /// Records an image under its (unique) name.
    /// Keeps a new API token under the hash of its secret.
    pub fn insert_api_token(&self, hash: &str, token: &ApiToken) -> Result<(), StoreError> {
        self.api_tokens.insert(hash, encode(token))?;
        Ok(())
    }

    /// The token whose secret hashes to `hash`.
    pub fn api_token(&self, hash: &str) -> Result<Option<ApiToken>, StoreError> {
        self.api_tokens.get(hash)?.map(|v| decode("api_tokens", hash.as_bytes(), &v)).transpose()
    }

    /// Whether any API token exists.
    pub fn has_api_tokens(&self) -> bool {
        !self.api_tokens.is_empty()
    }

    /// Every API token, oldest first.
    pub fn api_tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        let mut all = Vec::new();
        for kv in self.api_tokens.iter() {
            let (k, v) = kv?;
            all.extend(decode_listed::<ApiToken>("api_tokens", &k, &v));
        }
        all.sort_by_key(|t| t.created_at);
        Ok(all)
    }

    /// Removes the token with this id; false when there is none.
    pub fn remove_api_token(&self, id: &str) -> Result<bool, StoreError> {
        for kv in self.api_tokens.iter() {
            let (key, value) = kv?;
            if decode_listed::<ApiToken>("api_tokens", &key, &value).is_some_and(|t| t.id == id) {
                self.api_tokens.remove(key)?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The record step in one transaction across `images` and `targets`: the
    /// image is stored and `f` applied to the target (the caller moves it on
    /// to clean-up), or neither is. A crash can never leave an image recorded
    /// in one tree and not the other, so undo never deletes a recorded image.
    /// A target that does not decode is reported as [`StoreError::Corrupt`]
    /// and nothing is written.
    pub fn record_output(
        &self,
        target: TargetId,
        image: &Image,
        f: impl Fn(&mut TargetRecord),
    ) -> Result<TargetRecord, StoreError> {
        let result = (&self.images, &self.targets).transaction(|(images, targets)| {
            let Some(bytes) = targets.get(target.as_bytes())? else {
                return abort(StoreError::NotFound(format!("target {target}")));
            };
            let mut t: TargetRecord = decode("targets", target.as_bytes(), &bytes).or_else(abort)?;
            f(&mut t);
            images.insert(image.name.as_bytes(), encode(image))?;
            targets.insert(target.as_bytes(), encode(&t))?;
            Ok(t)
        });
        tx(result)
    }

    pub fn insert_image(&self, image: &Image) -> Result<(), StoreError> {
        self.images.insert(image.name.as_bytes(), encode(image))?;
        Ok(())
    }

    pub fn image(&self, name: &str) -> Result<Option<Image>, StoreError> {
        self.images.get(name.as_bytes())?.map(|v| decode("images", name.as_bytes(), &v)).transpose()
    }

    /// Images, oldest first.
    pub fn images(&self) -> Result<Vec<Image>, StoreError> {
        let mut all = Vec::new();
        for kv in self.images.iter() {
            let (k, v) = kv?;
            all.extend(decode_listed::<Image>("images", &k, &v));
        }
        all.sort_by_key(|i| i.created_at);
        Ok(all)
    }

    pub fn remove_image(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.images.remove(name.as_bytes())?.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn spec(name: &str) -> GeneratorSpec {
        GeneratorSpec {
            name: name.parse().unwrap(),
            description: String::new(),
            script: "echo hi".into(),
            timeout_secs: None,
            env: BTreeMap::new(),
            secret_env: None,
            generalize: None,
            targets: BTreeMap::new(),
        }
    }

    // Every save makes a new immutable revision; creating twice is refused.
    #[test]
    fn revisions_accumulate() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SecretKey::ephemeral()).unwrap();
        let now = Timestamp::now();
        let r1 = store.save_revision(spec("g"), "a".into(), now, true).unwrap();
        let r2 = store.save_revision(spec("g"), "b".into(), now, false).unwrap();
        assert_eq!((r1.number, r2.number), (1, 2));
        assert!(matches!(store.save_revision(spec("g"), "c".into(), now, true), Err(StoreError::AlreadyExists(_))));
        assert!(matches!(store.save_revision(spec("h"), "c".into(), now, false), Err(StoreError::NotFound(_))));
        let all = store.revisions(&"g".parse().unwrap()).unwrap();
        assert_eq!(all.iter().map(|r| r.script_sha256.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    }

    // A target record that does not decode is reported as corrupt and left
    // byte for byte as it was (an update must never delete it); a missing one
    // is not found and stays missing.
    #[test]
    fn an_undecodable_record_is_kept_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SecretKey::ephemeral()).unwrap();
        let id = TargetId::generate();
        let garbage = br#"{"written_by":"a newer kiln"}"#;
        store.targets.insert(id.as_bytes(), &garbage[..]).unwrap();
        let err = store.update_target(id, |t| t.enrolled = true).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { tree: "targets", .. }), "{err:?}");
        assert_eq!(store.targets.get(id.as_bytes()).unwrap().as_deref(), Some(&garbage[..]));
        let missing = TargetId::generate();
        assert!(matches!(store.update_target(missing, |t| t.enrolled = true), Err(StoreError::NotFound(_))));
        assert!(store.targets.get(missing.as_bytes()).unwrap().is_none());
        let build = BuildId::generate();
        store.builds.insert(build.as_bytes(), &garbage[..]).unwrap();
        assert!(matches!(store.update_build(build, |b| b.cancel_requested = true), Err(StoreError::Corrupt { .. })));
        assert_eq!(store.builds.get(build.as_bytes()).unwrap().as_deref(), Some(&garbage[..]));
        // The error names the tree and the key, so the operator can find the record.
        let message = StoreError::Corrupt {
            tree: "targets",
            key: printable_key(id.as_bytes()),
            source: serde_json::from_slice::<TargetRecord>(garbage).unwrap_err(),
        }
        .to_string();
        assert!(message.contains("targets") && message.contains(&id.to_string()), "{message}");
        match store.target(id).unwrap_err() {
            StoreError::Corrupt { tree, key, .. } => assert_eq!((tree, key), ("targets", id.to_string())),
            other => panic!("{other:?}"),
        }
        // Listings log the bad record and serve the rest; the bad one stays as it was.
        let good = sample_target();
        store.insert_build(&sample_build(&good), std::slice::from_ref(&good)).unwrap();
        let unfinished: Vec<TargetId> = store.unfinished_targets().unwrap().iter().map(|t| t.id).collect();
        assert_eq!(unfinished, vec![good.id]);
        let builds: Vec<BuildId> = store.builds(10, |_| true).unwrap().iter().map(|b| b.id).collect();
        assert_eq!(builds, vec![good.build]);
        store.images.insert(b"bad-image", &garbage[..]).unwrap();
        assert!(store.images().unwrap().is_empty());
        assert!(matches!(store.image("bad-image"), Err(StoreError::Corrupt { tree: "images", .. })));
        assert_eq!(store.targets.get(id.as_bytes()).unwrap().as_deref(), Some(&garbage[..]));
    }

    // Keys print as they are when ASCII, as a UUID when they are one, escaped otherwise.
    #[test]
    fn keys_print_readably() {
        let id = TargetId::generate();
        let cases: [(&[u8], String); 3] = [
            (b"my-cloud", "my-cloud".into()),
            (id.as_bytes(), id.to_string()),
            (b"gen\x00\x00\x00\x00\x02", "gen\\x00\\x00\\x00\\x00\\x02".into()),
        ];
        for (key, printed) in cases {
            assert_eq!(printable_key(key), printed);
        }
    }

    pub(super) fn sample_target() -> TargetRecord {
        use kiln_protocol::agent::Instruction;
        use kiln_protocol::api::{CloudKind, Status, Step, TargetSpec, Timings};
        TargetRecord {
            id: TargetId::generate(),
            build: BuildId::generate(),
            cloud: Cloud {
                name: "local".parse().unwrap(),
                kind: CloudKind::Qemu,
                region: None,
                endpoint: None,
                options: Default::default(),
                credentials: None,
            },
            spec: TargetSpec {
                base_image: "base".into(),
                instance_type: None,
                network: None,
                options: Default::default(),
            },
            generator: "g".parse().unwrap(),
            revision: 1,
            status: Status::Running,
            step: Step::Record,
            error: None,
            instance: Some("i-1".into()),
            image_id: Some("ami-1".into()),
            image: None,
            enrolled: true,
            enrolled_key: None,
            cert_serial: None,
            outcome: None,
            reported_total: None,
            instruction: Instruction::Wait,
            seal: None,
            cleanup_pending: None,
            timings: Timings::default(),
        }
    }

    pub(super) fn sample_build(target: &TargetRecord) -> BuildRecord {
        BuildRecord {
            id: target.build,
            generator: target.generator.clone(),
            revision: 1,
            script_sha256: "00".repeat(32),
            created_at: Timestamp::now(),
            targets: vec![target.id],
            cancel_requested: false,
        }
    }

    pub(super) fn sample_image(target: &TargetRecord) -> Image {
        use kiln_protocol::api::Provenance;
        Image {
            id: "ami-1".into(),
            name: format!("kiln-{}", target.id),
            cloud: target.cloud.name.clone(),
            created_at: Timestamp::now(),
            size_bytes: Some(1),
            virtual_size_bytes: None,
            sha256: None,
            provenance: Provenance {
                build: target.build,
                target: target.id,
                generator: target.generator.clone(),
                revision: 1,
                script_sha256: "00".repeat(32),
                cloud: target.cloud.name.clone(),
                base_image: "base".into(),
            },
        }
    }

    // The record step writes the image and moves the target on together, or
    // writes nothing: a missing or corrupt target leaves no image behind.
    #[test]
    fn record_output_is_one_transaction() {
        use kiln_protocol::api::Step;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SecretKey::ephemeral()).unwrap();
        let t = sample_target();
        store.insert_build(&sample_build(&t), std::slice::from_ref(&t)).unwrap();
        let image = sample_image(&t);
        let recorded = store
            .record_output(t.id, &image, |r| {
                r.image = Some(image.clone());
                r.step = Step::CleanUp;
            })
            .unwrap();
        assert_eq!(recorded.step, Step::CleanUp);
        assert_eq!(store.target(t.id).unwrap().unwrap().image, Some(image.clone()));
        assert_eq!(store.image(&image.name).unwrap(), Some(image.clone()));

        let missing = sample_target();
        let other = sample_image(&missing);
        assert!(matches!(store.record_output(missing.id, &other, |_| {}), Err(StoreError::NotFound(_))));
        assert_eq!(store.image(&other.name).unwrap(), None);

        let corrupt = TargetId::generate();
        store.targets.insert(corrupt.as_bytes(), &b"{}"[..]).unwrap();
        let mut third = sample_image(&missing);
        third.name = "third".into();
        assert!(matches!(
            store.record_output(corrupt, &third, |_| {}),
            Err(StoreError::Corrupt { tree: "targets", .. })
        ));
        assert_eq!(store.image("third").unwrap(), None);
        assert_eq!(store.targets.get(corrupt.as_bytes()).unwrap().as_deref(), Some(&b"{}"[..]));
    }

    // Credentials an older kiln stored in plaintext are sealed at open and still read back.
    #[test]
    fn plaintext_credentials_are_sealed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let creds = CloudCredentials::Password { password: "old-plaintext-pw".into() };
        {
            let db = sled::open(dir.path()).unwrap();
            db.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes()).unwrap();
            db.open_tree("secrets").unwrap().insert("os", encode(&creds)).unwrap();
            db.flush().unwrap();
        }
        let store = Store::open(dir.path(), SecretKey::ephemeral()).unwrap();
        let raw = store.secrets.get("os").unwrap().unwrap();
        assert!(is_sealed(&raw) && !raw.windows(16).any(|w| w == b"old-plaintext-pw"));
        assert_eq!(store.credentials(&"os".parse().unwrap()).unwrap(), Some(creds));
    }

    // A revision saved without secret_env keeps the previous one's; given, it replaces them.
    #[test]
    fn secret_env_is_inherited_or_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SecretKey::ephemeral()).unwrap();
        let now = Timestamp::now();
        let g: GeneratorName = "g".parse().unwrap();
        let mut with = spec("g");
        with.secret_env = Some(BTreeMap::from([("K".to_owned(), Secret("value-1".into()))]));
        let r1 = store.save_revision(with, "a".into(), now, true).unwrap();
        let r2 = store.save_revision(spec("g"), "a".into(), now, false).unwrap();
        let r3 = store
            .save_revision(GeneratorSpec { secret_env: Some(BTreeMap::new()), ..spec("g") }, "a".into(), now, false)
            .unwrap();
        assert_eq!((r1.secret_env_names.len(), r2.secret_env_names.len(), r3.secret_env_names.len()), (1, 1, 0));
        assert_eq!(store.secret_env(&g, 2).unwrap()["K"], Secret("value-1".into()));
        assert!(store.secret_env(&g, 3).unwrap().is_empty());
        assert_eq!(store.revision(&g, 1).unwrap().unwrap().spec.secret_env, None);
    }

    // A data directory written by another schema version is refused.
    #[test]
    fn schema_version_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            db.insert(SCHEMA_KEY, &99u32.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let err = Store::open(dir.path(), SecretKey::ephemeral()).unwrap_err();
        assert!(matches!(err, StoreError::SchemaNewer { found: 99, .. }), "{err}");
    }

    // A second coordinator on the same data directory is told what to do.
    #[test]
    fn a_data_dir_in_use_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path(), SecretKey::ephemeral()).unwrap();
        let err = Store::open(dir.path(), SecretKey::ephemeral()).unwrap_err();
        assert!(err.to_string().contains("in use by another kiln process"), "{err}");
    }
}
