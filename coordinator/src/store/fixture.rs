//! The checked-in version 1 database (`tests/fixtures/store-v1`): its
//! generator and the test that migrates it and reads every record back.
//! The `secrets.key` there is a test fixture key and seals nothing real.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kiln_protocol::access::{ApiToken, Role};
use kiln_protocol::api::{
    Cloud, CloudCredentials, CloudKind, FailureReason, GeneratorSpec, Secret, Status, Step, TargetError,
};
use kiln_protocol::{BuildId, TargetId, Timestamp};

use super::records::{CertRecord, MaskCursor, TokenRecord};
use super::tests::{sample_build, sample_image, sample_target};
use super::{SCHEMA_VERSION, Store, migrate};
use crate::secrets::SecretKey;

const BUILD: &str = "0190a0a0-0000-7000-8000-0000000000b1";
const DONE: &str = "0190a0a0-0000-7000-8000-0000000000a1";
const FAILED: &str = "0190a0a0-0000-7000-8000-0000000000a2";
const RUNNING: &str = "0190a0a0-0000-7000-8000-0000000000a3";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/store-v1")
}

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn spec(script: &str, secret: Option<&str>) -> GeneratorSpec {
    GeneratorSpec {
        name: "dstat".parse().unwrap(),
        description: "fixture".into(),
        script: script.into(),
        timeout_secs: Some(600),
        env: BTreeMap::from([("MODE".into(), "fast".into())]),
        secret_env: secret.map(|s| BTreeMap::from([("TOKEN".into(), Secret(s.into()))])),
        generalize: None,
        targets: BTreeMap::new(),
    }
}

/// Writes the fixture with this code: `KILN_WRITE_STORE_FIXTURE=DIR cargo
/// test -p kiln-coordinator write_store_fixture`. Run only at schema version 1.
#[test]
fn write_store_fixture() {
    let Some(dir) = std::env::var_os("KILN_WRITE_STORE_FIXTURE") else { return };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = SecretKey::load_or_create(&dir).unwrap();
    let store = Store::open(&dir.join("db"), key).unwrap();
    let local = Cloud {
        name: "local".parse().unwrap(),
        kind: CloudKind::Qemu,
        region: None,
        endpoint: None,
        options: BTreeMap::from([("egress".into(), "none".into())]),
        credentials: None,
    };
    let ec2 = Cloud {
        name: "aws".parse().unwrap(),
        kind: CloudKind::Ec2,
        region: Some("us-east-1".into()),
        endpoint: None,
        options: BTreeMap::new(),
        credentials: None,
    };
    store.insert_cloud(&local).unwrap();
    store.insert_cloud(&ec2).unwrap();
    let creds =
        CloudCredentials::AccessKey { access_key_id: "AKIAFIXTURE".into(), secret_access_key: "fixture-secret".into() };
    store.put_credentials(&ec2.name, &creds).unwrap();
    store
        .save_revision(spec("echo one", Some("s3cret-one")), "11".repeat(32), at("2026-01-01T00:00:00Z"), true)
        .unwrap();
    store.save_revision(spec("echo two", None), "22".repeat(32), at("2026-01-02T00:00:00Z"), false).unwrap();

    let mut done = sample_target();
    done.id = DONE.parse().unwrap();
    done.build = BUILD.parse().unwrap();
    done.generator = "dstat".parse().unwrap();
    done.cloud = local.clone();
    let image = sample_image(&done);
    done.image = Some(image.clone());
    done.status = Status::Successful;
    done.step = Step::CleanUp;
    let mut failed = done.clone();
    failed.id = FAILED.parse().unwrap();
    failed.cloud = ec2.clone();
    failed.image = None;
    failed.status = Status::Failed;
    failed.error = Some(TargetError { step: Step::Run, reason: FailureReason::ScriptFailed, message: "exit 3".into() });
    let mut running = failed.clone();
    running.id = RUNNING.parse().unwrap();
    running.status = Status::Running;
    running.step = Step::Run;
    running.error = None;
    let mut build = sample_build(&done);
    build.generator = "dstat".parse().unwrap();
    build.targets = vec![done.id, failed.id, running.id];
    store.insert_build(&build, &[done.clone(), failed, running.clone()]).unwrap();
    store.insert_image(&image).unwrap();
    running.enrolled = false;
    store.update_target(running.id, |t| t.enrolled = false).unwrap();
    let token = TokenRecord { target: running.id, expires_at: at("2030-01-01T00:00:00Z") };
    assert!(store.offer_token("ab".repeat(32).as_str(), &token).unwrap());
    store.record_cert("0a1b", &CertRecord { target: running.id, not_after: at("2030-01-01T00:00:00Z") }).unwrap();
    let api = ApiToken {
        id: "0123456789abcdef".into(),
        name: "ci".into(),
        role: Role::Builder,
        created_at: at("2026-01-03T00:00:00Z"),
    };
    store.insert_api_token(&"cd".repeat(32), &api).unwrap();
    let cursor = MaskCursor { raw: 10, stored: 8, pending: b"s3c".to_vec(), ended: false };
    store.put_mask_cursor(running.id, &cursor).unwrap();
    store.db.flush().unwrap();
}

/// Copies the fixture into a fresh directory the way a data directory is kept.
fn copy_fixture(to: &Path) {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let dest = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &dest);
            } else {
                std::fs::copy(entry.path(), &dest).unwrap();
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
        }
    }
    copy(&fixture_dir(), to);
}

// A version 1 data directory is migrated at open and every record reads back.
#[test]
fn the_v1_fixture_migrates_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    let key = SecretKey::load_or_create(dir.path()).unwrap();
    {
        let db = sled::open(dir.path().join("db")).unwrap();
        assert_eq!(migrate::stored_version(&db).unwrap(), Some(1));
    }
    let store = Store::open(&dir.path().join("db"), key).unwrap();
    assert_eq!(migrate::stored_version(&store.db).unwrap(), Some(SCHEMA_VERSION));

    let clouds: Vec<String> = store.clouds().unwrap().iter().map(|c| c.name.to_string()).collect();
    assert_eq!(clouds, ["aws", "local"]);
    let local = store.cloud(&"local".parse().unwrap()).unwrap().unwrap();
    assert_eq!(local.options.get("egress").map(String::as_str), Some("none"));
    match store.credentials(&"aws".parse().unwrap()).unwrap() {
        Some(CloudCredentials::AccessKey { access_key_id, secret_access_key }) => {
            assert_eq!((access_key_id.as_str(), secret_access_key.as_str()), ("AKIAFIXTURE", "fixture-secret"));
        }
        other => panic!("{other:?}"),
    }

    let generator = store.generator(&"dstat".parse().unwrap()).unwrap().unwrap();
    assert_eq!(generator.latest, 2);
    let revisions = store.revisions(&"dstat".parse().unwrap()).unwrap();
    assert_eq!(revisions.len(), 2);
    assert_eq!(revisions[0].spec.script, "echo one");
    assert_eq!(revisions[1].spec.script, "echo two");
    let secret = store.secret_env(&"dstat".parse().unwrap(), 1).unwrap();
    assert_eq!(secret.get("TOKEN").map(|s| s.0.as_str()), Some("s3cret-one"));
    let inherited = store.secret_env(&"dstat".parse().unwrap(), 2).unwrap();
    assert_eq!(inherited.get("TOKEN").map(|s| s.0.as_str()), Some("s3cret-one"));

    let build = store.build(BUILD.parse::<BuildId>().unwrap()).unwrap().unwrap();
    assert_eq!(build.targets.len(), 3);
    assert_eq!(store.builds(10, |_| true).unwrap().len(), 1);
    let done = store.target(DONE.parse::<TargetId>().unwrap()).unwrap().unwrap();
    assert_eq!((done.status, done.cloud.name.to_string()), (Status::Successful, "local".to_string()));
    let image = done.image.clone().unwrap();
    assert_eq!(image.id, "ami-1");
    assert_eq!(store.image(&image.name).unwrap(), Some(image.clone()));
    assert_eq!(store.images().unwrap(), vec![image]);
    let failed = store.target(FAILED.parse::<TargetId>().unwrap()).unwrap().unwrap();
    assert_eq!(failed.status, Status::Failed);
    let error = failed.error.unwrap();
    assert_eq!((error.step, error.reason, error.message.as_str()), (Step::Run, FailureReason::ScriptFailed, "exit 3"));
    let running = RUNNING.parse::<TargetId>().unwrap();
    let unfinished: Vec<TargetId> = store.unfinished_targets().unwrap().iter().map(|t| t.id).collect();
    assert_eq!(unfinished, vec![running]);
    assert_eq!(store.cert("0a1b").unwrap().unwrap().target, running);
    let api = store.api_tokens().unwrap();
    assert_eq!((api.len(), api[0].name.as_str(), api[0].role), (1, "ci", Role::Builder));
    assert!(store.api_token(&"cd".repeat(32)).unwrap().is_some());
    assert_eq!(
        store.mask_cursor(running).unwrap(),
        MaskCursor { raw: 10, stored: 8, pending: b"s3c".to_vec(), ended: false }
    );
    // The token is still outstanding: it enrolls the running target.
    let now = at("2026-06-01T00:00:00Z");
    let enrolled = store.consume_token(&"ab".repeat(32), running, now, "key").unwrap().unwrap();
    assert!(enrolled.enrolled);
}
