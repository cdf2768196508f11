//! OpenStack clouds: kiln's OpenStack provider against a fake Keystone, Nova
//! and Glance that boots every server as a real VM, whose user-data comes
//! from the OpenStack metadata service.

use std::path::Path;
use std::time::Duration;

use kiln_protocol::api::{Build, FailureReason, Image, Status, Step};
use kiln_tests::bed::{Bed, Options};
use kiln_tests::openstack::{DEFAULT_NETWORK, FakeConfig, FakeOpenStack, Op};
use serde_json::json;

const PASSWORD: &str = "kiln-secret";

/// Starts a fake cloud with the tiny image as `tiny` and adds it to kiln as `name`.
async fn openstack(bed: &Bed, name: &str, config: FakeConfig, password: Option<&str>) -> FakeOpenStack {
    let fake = FakeOpenStack::start(config).await.expect("fake OpenStack");
    fake.add_image("tiny", kiln_tests::tiny_image()).expect("tiny image");
    let mut options = json!({
        "user": "kiln", "project": "kiln", "flavor": "m1.small", "network": DEFAULT_NETWORK,
        "coordinator_host": kiln_tests::ec2::GUEST_HOST, "poll_secs": "0.5",
    });
    let mut cloud = json!({"name": name, "kind": "openstack", "region": "RegionOne", "endpoint": fake.auth_url()});
    match password {
        Some(p) => cloud["credentials"] = json!({"password": p}),
        None => options["ask_password"] = json!("true"),
    }
    cloud["options"] = options;
    let _: serde_json::Value = bed.client.post("/v1/clouds", &cloud).await.expect("add cloud");
    fake
}

async fn generator(bed: &Bed, name: &str, script: &str, targets: &[(&str, String)]) {
    let clouds: Vec<&str> = targets.iter().map(|(c, _)| *c).collect();
    let mut spec = Bed::spec(name, script, &clouds);
    for (cloud, base) in targets {
        spec.targets.get_mut(&cloud.parse().unwrap()).unwrap().base_image = base.clone();
    }
    bed.create_generator(&spec).await;
}

fn tiny() -> String {
    kiln_tests::tiny_image().display().to_string()
}

// One build on two OpenStack clouds and the local cloud at once: three
// images, each with its provenance; a token that expires mid-build is
// renewed; every server is deleted.
#[tokio::test]
async fn build_on_two_openstack_clouds_and_local() {
    let bed = Bed::with(Options::qemu()).await;
    let a = openstack(&bed, "os-a", FakeConfig::default(), Some(PASSWORD)).await;
    let b = openstack(&bed, "os-b", FakeConfig::default(), Some(PASSWORD)).await;
    let _: serde_json::Value = bed.client.post("/v1/clouds", &json!({"name": "local", "kind": "qemu"})).await.unwrap();
    let targets = [("os-a", "tiny".to_owned()), ("os-b", "tiny".to_owned()), ("local", tiny())];
    generator(&bed, "tri", "echo built on $KILN_CLOUD\n", &targets).await;
    let build = bed.start_build("tri").await;
    // Once os-a's server exists, every token it issued expires.
    a.wait_until(Duration::from_secs(60), "a server on os-a", |f| !f.servers().is_empty()).await.unwrap();
    a.expire_tokens();
    let build = bed.wait(&build).await;

    assert_eq!(build.status, Status::Successful, "{build:#?}");
    assert!(a.tokens_issued() >= 2, "the expired token was renewed");
    for t in &build.targets {
        assert_eq!(bed.log(t.id).await, format!("built on {}\n", t.cloud).as_bytes());
        let image = t.image.as_ref().expect("an image");
        assert_eq!(image.provenance.target, t.id);
        assert_eq!(image.provenance.script_sha256, build.script_sha256);
    }
    for (fake, cloud) in [(&a, "os-a"), (&b, "os-b")] {
        let t = build.targets.iter().find(|t| t.cloud.as_str() == cloud).unwrap();
        let images: Vec<_> = fake.images().into_iter().filter(|i| i.id != "tiny" && !i.deleted).collect();
        assert_eq!(images.len(), 1, "{cloud}: one image");
        assert_eq!(images[0].id, t.image.as_ref().unwrap().id);
        assert_eq!(images[0].status, "active");
        let props = &images[0].properties;
        assert_eq!(props.get("kiln_target").map(String::as_str), Some(t.id.to_string().as_str()), "{props:?}");
        assert_eq!(props.get("kiln_script_sha256").map(String::as_str), Some(build.script_sha256.as_str()));
        assert!(props.get("kiln_coordinator").is_some_and(|c| c.starts_with("kc-")), "{props:?}");
        assert!(fake.servers().iter().all(|s| s.deleted), "{cloud}: servers deleted");
        let server = fake.servers().into_iter().next().unwrap();
        assert_eq!(server.metadata.get("kiln_build").map(String::as_str), Some(build.id.to_string().as_str()));
        assert_eq!(server.metadata.get("kiln_coordinator"), props.get("kiln_coordinator"));
        assert!(
            fake.metadata_requests(&server.id).iter().any(|r| r.contains("/openstack/latest/user_data 200")),
            "{cloud}: user-data came from the OpenStack metadata service"
        );
    }
    a.wait_no_vms(Duration::from_secs(30)).await.unwrap();
    b.wait_no_vms(Duration::from_secs(30)).await.unwrap();
}

/// Every file under `dir`, recursively.
/// Every regular file under `dir` (the guests' sockets in `run/` hold no bytes).
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p))
        } else if p.is_file() {
            out.push(p)
        }
    }
    out
}

// A cloud whose password is asked at every build: without it the build is
// refused; with it the build succeeds; afterwards the password is nowhere in
// the data directory, the logs or any API response.
#[tokio::test]
async fn ask_every_time_password_is_used_and_forgotten() {
    let password = format!("pw-{:016x}", rand::random::<u64>());
    let mut bed = Bed::with(Options::qemu()).await;
    let config =
        FakeConfig { users: vec![("kiln".into(), "Default".into(), password.clone())], ..FakeConfig::default() };
    let fake = openstack(&bed, "asks", config, None).await;
    generator(&bed, "secretive", "echo no secrets here\n", &[("asks", "tiny".to_owned())]).await;

    let refused = bed
        .client
        .request(reqwest::Method::POST, "/v1/builds")
        .json(&json!({"generator": "secretive"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), reqwest::StatusCode::BAD_REQUEST);
    let body: kiln_protocol::error::ErrorBody = refused.json().await.unwrap();
    assert!(body.message.contains("asks for its password at every build"), "{}", body.message);
    let wrong = bed
        .client
        .request(reqwest::Method::POST, "/v1/builds")
        .json(&json!({"generator": "secretive", "passwords": {"asks": "not-it"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), reqwest::StatusCode::BAD_REQUEST, "a wrong password is refused up front");
    assert!(fake.servers().is_empty(), "nothing started");

    let build: Build = bed
        .client
        .post("/v1/builds", &json!({"generator": "secretive", "passwords": {"asks": password}}))
        .await
        .unwrap();
    let build = bed.wait(&build).await;
    assert_eq!(build.status, Status::Successful, "{build:#?}");
    bed.restart().await; // everything the coordinator wrote is on disk now

    let needle = password.as_bytes();
    for file in files(&bed.dir.path().join("data")) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(memchr::memmem::find(&bytes, needle).is_none(), "the password is in {}", file.display());
    }
    assert!(memchr::memmem::find(&kiln_tests::captured_logs(), needle).is_none(), "the password is in the logs");
    let mut responses = Vec::new();
    for path in [
        "/v1/builds",
        "/v1/clouds",
        "/v1/clouds/asks",
        "/v1/generators",
        "/v1/images",
        &format!("/v1/builds/{}", build.id),
    ] {
        let resp = bed.client.request(reqwest::Method::GET, path).send().await.unwrap();
        responses.extend(resp.bytes().await.unwrap());
    }
    responses.extend(bed.log(build.targets[0].id).await);
    assert!(memchr::memmem::find(&responses, needle).is_none(), "the password is in an API response");
    assert_eq!(fake.requests_with_body_containing(&password), fake.tokens_issued(), "only Keystone saw the password");
}

// A failure injected at each step (create server, await agent, create image,
// wait for the image) fails the target at that step with OpenStack's message
// and leaves no server and no image behind.
#[tokio::test]
async fn failure_at_each_step_leaves_nothing_behind() {
    let bed = Bed::with(Options::qemu()).await;
    let cases = [
        ("create", Step::Launch, "No valid host was found", Op::CreateServer, 1, 400),
        ("await", Step::AwaitAgent, "Unexpected API Error", Op::GetServer, 1000, 500),
        ("image", Step::Snapshot, "Quota exceeded for images", Op::CreateImage, 1, 403),
        ("wait", Step::Snapshot, "Service Unavailable", Op::GetImage, 1000, 503),
    ];
    let mut fakes = Vec::new();
    let mut builds = Vec::new();
    for (name, _, message, op, times, status) in cases {
        let fake = openstack(&bed, name, FakeConfig::default(), Some(PASSWORD)).await;
        let body = match status {
            400 => json!({"badRequest": {"code": 400, "message": message}}),
            403 => json!({"forbidden": {"code": 403, "message": message}}),
            500 => json!({"computeFault": {"code": 500, "message": message}}),
            _ => json!(message),
        };
        generator(&bed, name, "echo step\n", &[(name, "tiny".to_owned())]).await;
        builds.push(bed.start_build(name).await);
        // Faults on the way out wait until the server exists; the others apply at once.
        if matches!(op, Op::GetServer | Op::GetImage) {
            fake.wait_until(Duration::from_secs(60), "a server", |f| !f.servers().is_empty()).await.unwrap();
        }
        if op == Op::GetImage {
            fake.wait_until(Duration::from_secs(120), "an image", |f| f.images().len() > 1).await.unwrap();
        }
        fake.fail_next(op, times, status, body);
        fakes.push(fake);
    }
    for ((name, step, message, ..), build) in cases.iter().zip(&builds) {
        let done: Build = bed.wait(build).await;
        let err = done.targets[0].error.as_ref().unwrap_or_else(|| panic!("{name}: {done:#?}"));
        assert_eq!(err.step, *step, "{name}: {err:#?}");
        assert!(err.message.contains(message), "{name}: {}", err.message);
        assert_eq!(err.reason, FailureReason::Provider, "{name}: {err:#?}");
    }
    for (fake, (name, ..)) in fakes.iter().zip(&cases) {
        fake.wait_no_vms(Duration::from_secs(30)).await.unwrap();
        assert!(fake.servers().iter().all(|s| s.deleted), "{name}: a server was left");
        let left: Vec<_> = fake.images().into_iter().filter(|i| i.id != "tiny" && !i.deleted).collect();
        assert!(left.is_empty(), "{name}: an image was left: {left:?}");
    }
    let images: Vec<Image> = bed.client.get("/v1/images").await.unwrap();
    assert!(images.is_empty());
}

// Bad OpenStack input is refused with OpenStack's own message and what to
// fix: before anything starts where kiln can check it, at launch otherwise.
#[tokio::test]
async fn bad_openstack_input_gets_openstacks_message() {
    let bed = Bed::with(Options::qemu()).await;
    let good = openstack(&bed, "good", FakeConfig::default(), Some(PASSWORD)).await;
    let wrong = openstack(&bed, "wrong-password", FakeConfig::default(), Some("not-the-password")).await;
    let no_image = openstack(
        &bed,
        "no-glance",
        FakeConfig { omit_service: Some("image"), ..FakeConfig::default() },
        Some(PASSWORD),
    )
    .await;
    let full = openstack(&bed, "full", FakeConfig { max_servers: 0, ..FakeConfig::default() }, Some(PASSWORD)).await;
    let nowhere = json!({"name": "unknown-project", "kind": "openstack", "region": "RegionOne", "endpoint": good.auth_url(),
        "options": {"user": "kiln", "project": "nope", "flavor": "m1.small", "network": DEFAULT_NETWORK},
        "credentials": {"password": PASSWORD}});
    let _: serde_json::Value = bed.client.post("/v1/clouds", &nowhere).await.unwrap();
    let cases = [
        ("wrong-password", "tiny", None, "requires authentication"),
        ("unknown-project", "tiny", None, "check the cloud's user, user_domain, project"),
        ("no-glance", "tiny", None, "no public image endpoint in region RegionOne"),
        ("good", "no-such-image", None, "the base image no-such-image does not exist in Glance"),
        ("good", "tiny", Some("m9.huge"), "flavor m9.huge does not exist; this cloud has: m1.tiny, m1.small"),
    ];
    for (i, (cloud, image, flavor, needle)) in cases.iter().enumerate() {
        let name = format!("bad{i}");
        let mut spec = Bed::spec(&name, "true\n", &[cloud]);
        spec.targets.values_mut().for_each(|t| {
            t.base_image = image.to_string();
            t.instance_type = flavor.map(String::from);
        });
        bed.create_generator(&spec).await;
        let message = bed.refused_build(&name).await;
        assert!(message.contains(needle), "{cloud}: {message}");
    }
    // A quota error comes at launch: the target fails with Nova's message.
    generator(&bed, "quota", "true\n", &[("full", "tiny".to_owned())]).await;
    let build = bed.wait(&bed.start_build("quota").await).await;
    let err = build.targets[0].error.as_ref().unwrap();
    assert_eq!(err.step, Step::Launch, "{err:#?}");
    assert!(
        err.message.contains("Quota exceeded for instances") && err.message.contains("free quota"),
        "{}",
        err.message
    );
    for fake in [&good, &wrong, &no_image, &full] {
        assert!(fake.servers().is_empty(), "nothing was launched");
    }
}
