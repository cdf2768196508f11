//! Schema migrations: an ordered list, version N to N+1, run by
//! [`Store::open`](super::Store::open) before anything else reads the trees.
//!
//! Crash safety: a migration is idempotent and the new version is written
//! (and flushed) only after its migration has finished and been flushed, so a
//! crash mid-migration leaves the old version number and the next open runs
//! the same migration again from the start. A record a migration cannot read
//! stops it with [`StoreError::Corrupt`] naming the tree and key: the data
//! directory stays at the old version and nothing is dropped.

use kiln_protocol::access::ApiToken;
use kiln_protocol::api::{Cloud, Image, Revision};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::records::{BuildRecord, CertRecord, GeneratorRecord, TargetRecord, TokenRecord};
use super::{SCHEMA_KEY, SCHEMA_VERSION, StoreError, decode, encode};

/// One step from `from` to `from + 1`.
pub(super) struct Migration {
    pub from: u32,
    /// What it changes, for the log.
    pub what: &'static str,
    pub run: fn(&sled::Db) -> Result<(), StoreError>,
}

/// Every migration, in order; the last one ends at [`SCHEMA_VERSION`].
pub(super) const MIGRATIONS: &[Migration] =
    &[Migration { from: 1, what: "rewrite every record through the store's record types", run: v1_to_v2 }];

/// The schema version stored in `db`, if any.
pub(super) fn stored_version(db: &sled::Db) -> Result<Option<u32>, StoreError> {
    match db.get(SCHEMA_KEY)? {
        None => Ok(None),
        Some(v) => match <[u8; 4]>::try_from(v.as_ref()) {
            Ok(bytes) => Ok(Some(u32::from_be_bytes(bytes))),
            Err(_) => Err(StoreError::SchemaUnreadable),
        },
    }
}

fn set_version(db: &sled::Db, version: u32) -> Result<(), StoreError> {
    db.insert(SCHEMA_KEY, &version.to_be_bytes())?;
    db.flush()?;
    Ok(())
}

/// Brings `db` to [`SCHEMA_VERSION`]: a new database is stamped, an older one
/// migrated step by step, a newer one refused.
pub(super) fn migrate(db: &sled::Db) -> Result<(), StoreError> {
    let Some(mut version) = stored_version(db)? else {
        return set_version(db, SCHEMA_VERSION);
    };
    if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaNewer { found: version, known: SCHEMA_VERSION });
    }
    while version < SCHEMA_VERSION {
        let Some(m) = MIGRATIONS.iter().find(|m| m.from == version) else {
            return Err(StoreError::SchemaTooOld { found: version, known: SCHEMA_VERSION });
        };
        tracing::info!(from = version, to = version + 1, what = m.what, "migrating the data directory");
        (m.run)(db)?;
        db.flush()?;
        version += 1;
        set_version(db, version)?;
    }
    Ok(())
}

/// Decodes every record of `tree` as `T` and writes it back encoded by `T`,
/// so each record is validated and stored in the current form. Idempotent.
fn rewrite<T: Serialize + DeserializeOwned>(db: &sled::Db, name: &'static str) -> Result<usize, StoreError> {
    let tree = db.open_tree(name)?;
    let mut count = 0;
    for kv in tree.iter() {
        let (key, value) = kv?;
        let record: T = decode(name, &key, &value)?;
        let new = encode(&record);
        if new != value.as_ref() {
            tree.insert(&key, new)?;
        }
        count += 1;
    }
    Ok(count)
}

/// Version 2: every plaintext record is read through the store's types and
/// written back; sealed trees (`secrets`, `secret_env`, `log_masks`) are
/// left as they are.
fn v1_to_v2(db: &sled::Db) -> Result<(), StoreError> {
    let counts = [
        ("clouds", rewrite::<Cloud>(db, "clouds")?),
        ("generators", rewrite::<GeneratorRecord>(db, "generators")?),
        ("revisions", rewrite::<Revision>(db, "revisions")?),
        ("builds", rewrite::<BuildRecord>(db, "builds")?),
        ("targets", rewrite::<TargetRecord>(db, "targets")?),
        ("tokens", rewrite::<TokenRecord>(db, "tokens")?),
        ("certs", rewrite::<CertRecord>(db, "certs")?),
        ("images", rewrite::<Image>(db, "images")?),
        ("api_tokens", rewrite::<ApiToken>(db, "api_tokens")?),
    ];
    tracing::info!(?counts, "records rewritten for schema version 2");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db_at(version: u32) -> (tempfile::TempDir, sled::Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        db.insert(SCHEMA_KEY, &version.to_be_bytes()).unwrap();
        (dir, db)
    }

    // The migrations form one chain from version 1 to the current one.
    #[test]
    fn migrations_form_a_chain() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.from, 1 + i as u32);
        }
        assert_eq!(MIGRATIONS.last().unwrap().from + 1, SCHEMA_VERSION);
    }

    // A version 1 database is migrated, and migrating again (a crash before
    // the version was written) gives the same records.
    #[test]
    fn v1_is_migrated_and_a_rerun_is_harmless() {
        let (_dir, db) = db_at(1);
        let certs = db.open_tree("certs").unwrap();
        let cert = br#"{"target":"0190a0a0-0000-7000-8000-000000000001","not_after":"2026-01-01T00:00:00Z"}"#;
        certs.insert(b"01", &cert[..]).unwrap();
        v1_to_v2(&db).unwrap();
        let once = certs.get(b"01").unwrap().unwrap();
        migrate(&db).unwrap();
        assert_eq!(stored_version(&db).unwrap(), Some(SCHEMA_VERSION));
        assert_eq!(certs.get(b"01").unwrap().unwrap(), once);
        let back: CertRecord = serde_json::from_slice(&once).unwrap();
        assert_eq!(back.target.to_string(), "0190a0a0-0000-7000-8000-000000000001");
    }

    // A record the migration cannot read stops it: the version stays, the record stays.
    #[test]
    fn a_corrupt_record_stops_the_migration() {
        let (_dir, db) = db_at(1);
        db.open_tree("builds").unwrap().insert(b"bad", &b"{}"[..]).unwrap();
        let err = migrate(&db).unwrap_err();
        assert!(matches!(&err, StoreError::Corrupt { tree: "builds", key, .. } if key == "bad"), "{err:?}");
        assert_eq!(stored_version(&db).unwrap(), Some(1));
        assert_eq!(db.open_tree("builds").unwrap().get(b"bad").unwrap().as_deref(), Some(&b"{}"[..]));
    }

    // A newer data directory is refused with the versions in the message.
    #[test]
    fn a_newer_schema_is_refused() {
        let (_dir, db) = db_at(SCHEMA_VERSION + 1);
        let err = migrate(&db).unwrap_err();
        let message = err.to_string();
        assert!(message.contains(&format!("schema version {}", SCHEMA_VERSION + 1)), "{message}");
        assert!(message.contains("newer kiln"), "{message}");
        assert_eq!(stored_version(&db).unwrap(), Some(SCHEMA_VERSION + 1));
    }
}
