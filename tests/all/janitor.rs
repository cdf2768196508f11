//! The janitor finds and removes what a crash left: an instance launched just
//! before a SIGKILL, whose id the target never stored. A real `kiln serve`
//! stops at `launch:after-call` and is killed; restarted on the same data
//! directory it stops before the resumed launch would adopt the instance, and
//! the build is cancelled. The real `kiln janitor --dry-run` then lists the
//! instance and changes nothing, `kiln janitor` removes it, the cloud itself
//! holds nothing afterwards, and a second dry run lists nothing. On the local
//! cloud and on the EC2 bed. Besides: a recorded output image and an
//! unfinished target's instance are never listed.

use std::path::Path;

use kiln_coordinator::cli::Client;
use kiln_protocol::api::{Build, JanitorReport, ResourceKind, Status};
use kiln_tests::bed::BUILD_LIMIT;
use kiln_tests::crash_bed::{Bed, Ports, REGION, finished, serve};
use serde_json::json;

const SCRIPT: &str = "echo hello\n";

/// Runs the real `kiln` CLI against the coordinator on `ports` and parses its
/// JSON report; `dry_run` adds `--dry-run`.
async fn kiln_janitor(data: &Path, ports: &Ports, dry_run: bool) -> JanitorReport {
    let token = std::fs::read_to_string(data.join(kiln_coordinator::app::access::ADMIN_TOKEN_FILE)).unwrap();
    let server = format!("http://127.0.0.1:{}", ports.api);
    let mut args = vec!["--server", &server, "--token", token.trim(), "--output", "json", "janitor"];
    if dry_run {
        args.push("--dry-run");
    }
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        tokio::process::Command::new(kiln_tests::kiln_binary()).args(&args).kill_on_drop(true).output(),
    )
    .await
    .expect("kiln janitor finished in time")
    .expect("kiln janitor ran");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kiln janitor failed: {stderr}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("kiln janitor printed no report ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// Whether the instance the crash left still exists, asked of the cloud itself.
async fn instance_exists(bed: &Bed, data: &Path, id: &str) -> bool {
    match bed {
        Bed::Local => data.join("qemu/instances").join(id).exists(),
        Bed::Ec2(e) => {
            let out = e.moto.client(REGION).describe_instances().instance_ids(id).send().await.unwrap();
            out.reservations()
                .iter()
                .flat_map(|r| r.instances())
                .any(|i| i.state().and_then(|s| s.name()) != Some(&aws_sdk_ec2::types::InstanceStateName::Terminated))
        }
        Bed::Openstack(fake) => fake.servers().iter().any(|s| s.id == id && !s.deleted),
    }
}

async fn janitor_after_a_crash(bed: Bed) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ports = Ports::free();
    let (mut first, client) = serve(&data, &ports, Some(&[("KILN_FAILPOINT", "launch:after-call")])).await;
    let build: Build = bed.build(&client, SCRIPT).await;
    let target = build.targets[0].id;
    let marker = "kiln failpoint reached: launch:after-call";
    assert!(first.wait_for_stderr(marker, BUILD_LIMIT).await, "launch never returned: {}", first.stderr());
    first.kill9().await;

    // The resumed launch stops before it would find the instance again.
    let (mut second, client) = serve(&data, &ports, Some(&[("KILN_FAILPOINT", "launch:before-call")])).await;
    let marker = "kiln failpoint reached: launch:before-call";
    assert!(second.wait_for_stderr(marker, BUILD_LIMIT).await, "launch never resumed: {}", second.stderr());
    // The janitor's run at start saw the target unfinished and left its
    // instance; once the target has ended, the next run would remove it.
    let started = "janitor run done removed=0";
    assert!(second.wait_for_stderr(started, BUILD_LIMIT).await, "no janitor run at start: {}", second.stderr());
    let _: serde_json::Value = client.post(&format!("/v1/builds/{}/cancel", build.id), &json!({})).await.unwrap();
    let (done, _) = finished(&client, &build).await;
    assert_eq!(done.targets[0].status, Status::Cancelled, "{done:#?}");
    assert_eq!(done.targets[0].instance, None, "the target never stored its instance: {done:#?}");

    let dry = kiln_janitor(&data, &ports, true).await;
    assert!(dry.dry_run && dry.failed.is_empty() && dry.skipped.is_empty(), "{dry:#?}");
    assert_eq!(dry.found.len(), 1, "the dry run lists the one instance the crash left: {dry:#?}");
    let found = &dry.found[0];
    assert_eq!((found.kind, found.target), (ResourceKind::Instance, Some(target)), "{found:#?}");
    assert!(found.why.contains("ended (cancelled)"), "{found:#?}");
    assert!(instance_exists(&bed, &data, &found.id).await, "the dry run removed nothing");

    let run = kiln_janitor(&data, &ports, false).await;
    assert!(!run.dry_run && run.failed.is_empty(), "{run:#?}");
    assert_eq!(run.found, dry.found, "the run removes what the dry run listed");
    assert!(!instance_exists(&bed, &data, &found.id).await, "the janitor removed the instance");
    let left = bed.leftovers(&data, None).await;
    assert!(left.is_empty(), "after the janitor the cloud still holds {left:?}");
    assert!(second.stderr().contains("janitor removed a leftover"), "each removal is logged");

    let again = kiln_janitor(&data, &ports, true).await;
    assert!(again.found.is_empty() && again.failed.is_empty(), "nothing is left to remove: {again:#?}");
}

#[tokio::test]
async fn local_janitor_removes_what_a_crash_left() {
    janitor_after_a_crash(Bed::Local).await;
}

#[tokio::test]
async fn ec2_janitor_removes_what_a_crash_left() {
    janitor_after_a_crash(Bed::ec2().await).await;
}

/// A successful build's recorded image is never listed or removed, nor is
/// the instance of a target that is still running.
#[tokio::test]
async fn openstack_janitor_removes_what_a_crash_left() {
    janitor_after_a_crash(Bed::openstack().await).await;
}

#[tokio::test]
async fn recorded_images_and_running_targets_are_never_listed() {
    let bed = kiln_tests::bed::Bed::start().await;
    bed.add_cloud("local").await;
    let ok = bed.wait(&bed.build_script("ok", "echo fine\n", None).await).await;
    assert_eq!(ok.status, Status::Successful, "{ok:#?}");
    let image = ok.targets[0].image.clone().expect("a recorded image");
    assert!(Path::new(&image.id).exists(), "the process bed keeps the image file");

    let mut spec = kiln_tests::bed::Bed::spec("idle", "echo job\n", &["local"]);
    for t in spec.targets.values_mut() {
        t.base_image = kiln_tests::process::IDLE_IMAGE.into();
    }
    bed.create_generator(&spec).await;
    let idle = bed.start_build("idle").await;
    let client: &Client = &bed.client;
    let launched = async {
        let mut changes = bed.app().subscribe_changes();
        loop {
            let b: Build = client.get(&format!("/v1/builds/{}", idle.id)).await.unwrap();
            if let Some(instance) = b.targets[0].instance.clone() {
                return instance;
            }
            changes.changed().await.unwrap();
        }
    };
    let instance = tokio::time::timeout(std::time::Duration::from_secs(30), launched).await.expect("launched");

    let report: JanitorReport = client.get("/v1/janitor").await.unwrap();
    assert!(report.found.is_empty(), "a recorded image and a running target's instance stay: {report:#?}");
    let run: JanitorReport = client.post("/v1/janitor", &json!(null)).await.unwrap();
    assert!(run.found.is_empty() && run.failed.is_empty(), "{run:#?}");
    assert!(Path::new(&image.id).exists(), "the recorded image is still there");
    assert!(bed.provider.live_instances().contains(&instance), "the running target's instance is still there");
    let _: serde_json::Value = client.post(&format!("/v1/builds/{}/cancel", idle.id), &json!({})).await.unwrap();
    bed.wait(&idle).await;
}
