//! Secrets at rest and in logs: a generator's secret env reaches the script
//! and nothing else; stored secrets are sealed; the data directory is private.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kiln_protocol::api::{Build, Cloud, CloudCredentials, CloudKind, Revision, Secret, Status};
use kiln_tests::bed::Bed;
use sha2::{Digest, Sha256};

/// The secret the scripts are given; long and unlike anything else in a log.
const TOKEN: &str = "tok-3f9a1c7e-not-for-logs";

/// A script that prints the secret whole, then its first half, waits until
/// `$GO_FILE` exists (the test creates it once it has seen the first half
/// arrive, so the halves travel in different chunks), then the second half,
/// then the secret's sha256 (proof that the script got it).
const SPLIT_SCRIPT: &str = r#"echo "whole: $API_TOKEN."
printf 'first half follows\n%s' "$(printf %s "$API_TOKEN" | cut -c1-12)"
i=0
while [ ! -e "$GO_FILE" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
printf '%s|\n' "$(printf %s "$API_TOKEN" | cut -c13-)"
echo "sha256=$(printf %s "$API_TOKEN" | sha256sum | cut -d' ' -f1)"
"#;

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Every file under `dir` (not following links), with its bytes.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else if meta.is_file() {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

async fn secret_generator(bed: &Bed, name: &str, script: &str, go_file: &Path) -> Revision {
    let mut spec = Bed::spec(name, script, &["local"]);
    spec.env.insert("GO_FILE".into(), go_file.display().to_string());
    spec.secret_env = Some(BTreeMap::from([("API_TOKEN".to_owned(), Secret(TOKEN.into()))]));
    bed.create_generator(&spec).await
}

/// Every GET answer of the API about `build`, its generator and the catalog.
async fn all_get_answers(bed: &Bed, build: &Build) -> Vec<(String, Vec<u8>)> {
    let g = &build.generator;
    let mut paths = vec![
        "/v1/clouds".to_owned(),
        "/v1/clouds/local".to_owned(),
        "/v1/generators".to_owned(),
        format!("/v1/generators/{g}"),
        format!("/v1/generators/{g}/revisions"),
        format!("/v1/generators/{g}/revisions/{}", build.revision),
        "/v1/builds".to_owned(),
        format!("/v1/builds/{}", build.id),
        "/v1/images".to_owned(),
        "/v1/openapi.json".to_owned(),
        "/".to_owned(),
    ];
    for t in &build.targets {
        paths.push(format!("/v1/targets/{}/log", t.id));
        paths.push(format!("/v1/targets/{}/log/follow", t.id));
        if let Some(image) = &t.image {
            paths.push(format!("/v1/images/{}", image.name));
        }
    }
    let mut out = Vec::new();
    for path in paths {
        let resp = bed.client.request(reqwest::Method::GET, &path).send().await.expect(&path);
        assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
        out.push((path, resp.bytes().await.unwrap().to_vec()));
    }
    out
}

// A secret printed by the script, whole and split across two log chunks,
// reaches the script but never the stored log, the live follow, `build
// show`, user-data or any GET answer.
#[tokio::test]
async fn secret_env_reaches_the_script_and_nothing_else() {
    let bed = Bed::start().await;
    bed.add_cloud("local").await;
    let go = bed.dir.path().join("go");
    let rev = secret_generator(&bed, "secretive", SPLIT_SCRIPT, &go).await;
    assert_eq!(rev.secret_env_names, ["API_TOKEN"]);
    assert_eq!(rev.spec.secret_env, None, "a saved revision never carries secret values");

    let build = bed.start_build("secretive").await;
    let target = build.targets[0].id;
    // Everything before the held-back half is visible; then the script may go on.
    let early = bed.follow_until(target, |log| contains(log, "first half follows\n")).await;
    assert!(!contains(&early, &TOKEN[..12]), "a possible start of the secret is held back: {early:?}");
    let running: Build = bed.client.get(&format!("/v1/builds/{}", build.id)).await.unwrap();
    let instance = running.targets[0].instance.as_deref().expect("an instance");
    let user_data = bed.provider.user_data(instance).expect("the instance's user-data");
    assert!(!user_data.contains(TOKEN), "user-data never carries a secret");
    std::fs::write(&go, "").unwrap();
    let live = bed.follow(target).await;
    let build = bed.wait(&build).await;
    assert_eq!(build.status, Status::Successful, "{build:#?}");

    let stored = bed.log(target).await;
    let sha = hex::encode(Sha256::digest(TOKEN));
    let want = format!("whole: ***.\nfirst half follows\n***|\nsha256={sha}\n");
    assert_eq!(String::from_utf8_lossy(&stored), want, "the stored log is masked, and the script got the secret");
    assert_eq!(live, stored, "the live follow is the stored log");
    assert_eq!(build.targets[0].log_bytes, stored.len() as u64);

    for (path, body) in all_get_answers(&bed, &build).await {
        assert!(!contains(&body, TOKEN), "GET {path} shows the secret");
        assert!(!contains(&body, &TOKEN[..12]) || path == "/v1/openapi.json", "GET {path} shows half the secret");
    }
}

// A new revision without secret_env keeps the previous revision's secrets;
// one with secret_env has exactly those (an empty table removes them).
// Secrets shorter than 4 bytes, or named like a plain env variable, are refused.
#[tokio::test]
async fn revisions_keep_or_replace_their_secrets() {
    let bed = Bed::start().await;
    bed.add_cloud("local").await;
    let go = bed.dir.path().join("unused");
    secret_generator(&bed, "keeper", "echo hi\n", &go).await;

    let mut spec = Bed::spec("keeper", "echo changed\n", &["local"]);
    spec.env.insert("GO_FILE".into(), go.display().to_string());
    let kept: Revision = bed.client.put("/v1/generators/keeper", &spec).await.unwrap();
    assert_eq!((kept.number, kept.secret_env_names.clone()), (2, vec!["API_TOKEN".to_owned()]));

    spec.secret_env = Some(BTreeMap::from([("OTHER".to_owned(), Secret("another-secret".into()))]));
    let replaced: Revision = bed.client.put("/v1/generators/keeper", &spec).await.unwrap();
    assert_eq!(replaced.secret_env_names, ["OTHER"]);

    spec.secret_env = Some(BTreeMap::new());
    let cleared: Revision = bed.client.put("/v1/generators/keeper", &spec).await.unwrap();
    assert!(cleared.secret_env_names.is_empty());
    let first: Revision = bed.client.get("/v1/generators/keeper/revisions/1").await.unwrap();
    assert_eq!(first.secret_env_names, ["API_TOKEN"], "revisions are immutable");

    for (secrets, says) in [
        (serde_json::json!({"SHORT": "abc"}), "at least 4"),
        (serde_json::json!({"GO_FILE": "long enough"}), "in both env and secret_env"),
        (serde_json::json!({"9BAD": "long enough"}), "is invalid"),
    ] {
        let mut body = serde_json::to_value(&spec).unwrap();
        body["secret_env"] = secrets;
        let resp = bed.client.request(reqwest::Method::PUT, "/v1/generators/keeper").json(&body).send().await.unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::BAD_REQUEST);
        let err: kiln_protocol::error::ErrorBody = resp.json().await.unwrap();
        assert!(err.message.contains(says), "{}", err.message);
    }
}

// The database files alone, copied away, contain no stored cloud secret and
// no secret env value; only the key file beside them opens them.
#[tokio::test]
async fn sled_files_alone_reveal_no_secret() {
    let bed = Bed::start().await;
    bed.add_cloud("local").await;
    let access = "AKIAKILNTESTACCESS01";
    let secret_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYKILNTESTKEY";
    let password = "openstack-pa55word-kiln";
    for (name, kind, credentials) in [
        (
            "aws",
            CloudKind::Ec2,
            CloudCredentials::AccessKey { access_key_id: access.into(), secret_access_key: secret_key.into() },
        ),
        ("stack", CloudKind::Openstack, CloudCredentials::Password { password: password.into() }),
    ] {
        let cloud = Cloud {
            name: name.parse().unwrap(),
            kind,
            region: Some("us-east-1".into()),
            endpoint: Some("http://127.0.0.1:1/".into()),
            options: BTreeMap::new(),
            credentials: Some(credentials),
        };
        let _: Cloud = bed.client.post("/v1/clouds", &cloud).await.expect("add cloud");
    }
    let go = bed.dir.path().join("go");
    std::fs::write(&go, "").unwrap();
    secret_generator(&bed, "sealed", SPLIT_SCRIPT, &go).await;
    let build = bed.start_build("sealed").await;
    assert_eq!(bed.wait(&build).await.status, Status::Successful);

    let copy = tempfile::tempdir().unwrap();
    let db = bed.data_dir().join("db");
    let files = files_under(&db);
    assert!(!files.is_empty());
    for (path, bytes) in &files {
        let to = copy.path().join(path.strip_prefix(&db).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::write(&to, bytes).unwrap();
    }
    for (path, bytes) in files_under(copy.path()) {
        for value in [secret_key, password, TOKEN, &TOKEN[..12]] {
            assert!(!contains(&bytes, value), "{} holds {value:?}", path.display());
        }
    }
    // Nor does anything else in the data directory but the key itself.
    for (path, bytes) in files_under(&bed.data_dir()) {
        assert!(!contains(&bytes, TOKEN) && !contains(&bytes, secret_key), "{} holds a secret", path.display());
    }
    // The clouds are listed without their credentials, as before.
    let aws: Cloud = bed.client.get("/v1/clouds/aws").await.unwrap();
    assert_eq!(aws.credentials, None);
}

// After a build the data directory is 0700 and every file in it 0600
// (sockets: owner only); a file or directory opened up is refused at start
// with the chmod that fixes it, and the start works again once it is run.
#[tokio::test]
async fn data_dir_is_private_and_a_wider_mode_is_refused() {
    let mut bed = Bed::start().await;
    bed.add_cloud("local").await;
    let build = bed.build_script("private", "echo private\n", None).await;
    assert_eq!(bed.wait(&build).await.status, Status::Successful);

    let data = bed.data_dir();
    let mut stack = vec![data.clone()];
    let mut seen = 0;
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        seen += 1;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{} has mode {mode:o}", path.display());
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else if meta.is_file() {
            assert_eq!(mode, 0o600, "{} has mode {mode:o}", path.display());
        } else if !meta.file_type().is_symlink() {
            assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", path.display());
        }
    }
    assert!(seen > 10, "the data directory holds the store, keys and logs ({seen} entries)");

    let log = data.join("logs").join(format!("{}.log", build.targets[0].id));
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = bed.try_restart().await.expect_err("a log readable by others is refused");
    assert!(err.contains(&format!("chmod 600 '{}'", log.display())), "{err}");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = bed.try_restart().await.expect_err("a data directory readable by others is refused");
    assert!(err.contains(&format!("chmod 700 '{}'", data.display())), "{err}");
    assert!(err.contains(&format!("chmod -R go= '{}'", data.display())), "{err}");

    std::process::Command::new("chmod").arg("-R").arg("go=").arg(&data).status().unwrap();
    bed.try_restart().await.expect("the start works once the modes are fixed");
    let again: Build = bed.client.get(&format!("/v1/builds/{}", build.id)).await.unwrap();
    assert_eq!(again.status, Status::Successful);
}

// In a real VM (the tiny image under QEMU), the agent in the guest ships the
// secret's halves in two chunks (the script pauses between them, longer than
// the agent's flush interval); the stored log and the live follow show `***`,
// and the script did get the value.
#[tokio::test]
async fn a_real_vm_prints_its_secret_masked() {
    let bed = Bed::with(kiln_tests::bed::Options::qemu()).await;
    let cloud = serde_json::json!({"name": "local", "kind": "qemu", "options": {}});
    let _: serde_json::Value = bed.client.post("/v1/clouds", &cloud).await.expect("add cloud");
    let script = r#"echo "whole: $API_TOKEN."
printf 'first half follows\n%s' "$(printf %s "$API_TOKEN" | cut -c1-12)"
sleep 2
printf '%s|\n' "$(printf %s "$API_TOKEN" | cut -c13-)"
echo "length=$(printf %s "$API_TOKEN" | wc -c | tr -d ' ')"
"#;
    let mut spec = Bed::spec("vmsecret", script, &["local"]);
    for t in spec.targets.values_mut() {
        t.base_image = kiln_tests::tiny_image().display().to_string();
    }
    spec.secret_env = Some(BTreeMap::from([("API_TOKEN".to_owned(), Secret(TOKEN.into()))]));
    bed.create_generator(&spec).await;
    let build = bed.start_build("vmsecret").await;
    let live = bed.follow(build.targets[0].id).await;
    let build = bed.wait(&build).await;
    assert_eq!(build.status, Status::Successful, "{build:#?}");
    let stored = bed.log(build.targets[0].id).await;
    let want = format!("whole: ***.\nfirst half follows\n***|\nlength={}\n", TOKEN.len());
    assert_eq!(String::from_utf8_lossy(&stored), want, "the stored log is masked, and the script got the secret");
    assert_eq!(live, stored);
    for (path, body) in all_get_answers(&bed, &build).await {
        assert!(!contains(&body, TOKEN), "GET {path} shows the secret");
    }
}
