//! A crash at every failpoint, for real: `kiln serve` built with failpoints
//! stops dead at one and is killed with SIGKILL; a plain `kiln serve` started
//! on the same data directory and ports finishes the build. Whatever the
//! point, the target ends terminal (successful where the crash allows it), no
//! VM, instance dir or half-made image is left, a recorded image stays, and
//! the log is complete. On the local cloud and on the EC2 bed (moto, with a
//! real VM as each instance). A second helper runs every step twice.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_coordinator::cli::Client;
use kiln_coordinator::failpoint;
use kiln_protocol::api::{Build, FailureReason, Status};
use kiln_tests::bed::{BUILD_LIMIT, follow_until};
use aws_sdk_ec2::types::InstanceStateName;
use kiln_tests::ec2::{GUEST_HOST, Metadata, Moto, Runner, RunnerConfig, register_ami};
use kiln_tests::kiln_process::{KilnProcess, free_port, qemu_processes_in};
use serde_json::json;

/// How long a kiln process gets to start listening.
const START_LIMIT: Duration = Duration::from_secs(30);
const SCRIPT: &str = "echo before\necho after\n";
const FAILING: &str = "echo before\nexit 3\n";

/// One crash: the points armed (the test waits for the last), whether the
/// build is cancelled at the first, and the outcome a restart must reach.
struct Crash {
    armed: Vec<&'static str>,
    cancel_at_first: bool,
    script: &'static str,
    expect: Status,
    log: &'static [u8],
}

impl Crash {
    fn of(point: &'static str) -> Self {
        match point {
            // A half-made image exists only once the image step has begun:
            // the build is cancelled while it waits there.
            "unwind:after-delete-image" => Self {
                armed: vec!["wait-image:ready", point],
                cancel_at_first: true,
                script: SCRIPT,
                expect: Status::Cancelled,
                log: b"before\nafter\n",
            },
            p if failpoint::UNWIND.contains(&p) => Self {
                armed: vec![point],
                cancel_at_first: false,
                script: FAILING,
                expect: Status::Failed,
                log: b"before\n",
            },
            _ => Self { armed: vec![point], cancel_at_first: false, script: SCRIPT, expect: Status::Successful, log: b"before\nafter\n" },
        }
    }
}

/// The ports a coordinator listens on; kept across the restart so that a
/// VM's agent (which has them in its user-data) reaches the second one.
struct Ports {
    api: u16,
    agent: u16,
    bootstrap: u16,
}

impl Ports {
    fn free() -> Self {
        Self { api: free_port(), agent: free_port(), bootstrap: free_port() }
    }
}

fn tiny() -> String {
    kiln_tests::tiny_image().display().to_string()
}

/// `kiln serve` on `data`, the failpoints build with `env` when it is given.
async fn serve(data: &Path, ports: &Ports, env: Option<&[(&str, &str)]>) -> (KilnProcess, Client) {
    let listen = format!("127.0.0.1:{}", ports.api);
    let agent = format!("127.0.0.1:{}", ports.agent);
    let bootstrap = format!("127.0.0.1:{}", ports.bootstrap);
    let tiny_dir = kiln_tests::tiny_image().parent().unwrap().display().to_string();
    let args = [
        "serve",
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        &listen,
        "--agent-listen",
        &agent,
        "--bootstrap-listen",
        &bootstrap,
        "--image-dir",
        &tiny_dir,
        // The EC2 bed's guests reach the agent listener at this address, so
        // its certificate must name it (the in-process bed does the same).
        "--server-name",
        GUEST_HOST,
    ];
    let (binary, env): (PathBuf, &[(&str, &str)]) = match env {
        Some(env) => (kiln_tests::failpoint_kiln_binary(), env),
        None => (kiln_tests::kiln_binary(), &[]),
    };
    let mut kiln = KilnProcess::spawn_with(&binary, args, data.parent().unwrap(), env);
    assert!(
        kiln.wait_for_stderr("kiln coordinator listening", START_LIMIT).await,
        "serve did not start: {}",
        kiln.stderr()
    );
    let token = std::fs::read_to_string(data.join(kiln_coordinator::app::access::ADMIN_TOKEN_FILE))
        .expect("serve wrote the admin token");
    (kiln, Client::new(&format!("http://{listen}")).unwrap().with_token(token))
}

/// Entries of a directory (none when it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// The cloud a crash test builds on, and what it checks the cloud for.
enum Bed {
    Local,
    Ec2(Ec2),
}

/// moto, with the runner booting its instances as VMs, and the tiny image's AMI.
struct Ec2 {
    moto: Moto,
    runner: Runner,
    ami: String,
    _dir: tempfile::TempDir,
}

const REGION: &str = "us-east-1";

impl Bed {
    async fn ec2() -> Self {
        let moto = Moto::start().await.expect("moto");
        let ami = register_ami(&moto.client(REGION), "kiln-tiny").await.expect("register AMI");
        let dir = tempfile::tempdir().unwrap();
        let runner = Runner::start(RunnerConfig {
            moto: moto.url.clone(),
            regions: vec![REGION.into()],
            images: HashMap::from([(ami.clone(), kiln_tests::tiny_image())]),
            work_dir: dir.path().join("runner"),
            metadata: Metadata::Imds,
            console_tail_lines: 40,
            identity: None,
        })
        .await
        .expect("runner");
        Self::Ec2(Ec2 { moto, runner, ami, _dir: dir })
    }

    /// Adds the cloud and a generator running `script` on it, and starts a build.
    async fn build(&self, client: &Client, script: &str) -> Build {
        let (cloud, base) = match self {
            Self::Local => (json!({"name": "c", "kind": "qemu"}), tiny()),
            Self::Ec2(e) => (
                json!({"name": "c", "kind": "ec2", "region": REGION, "endpoint": e.moto.url,
                    "options": {"coordinator_host": GUEST_HOST, "poll_secs": "0.5"},
                    "credentials": {"access_key_id": "test", "secret_access_key": "kiln-test-secret"}}),
                e.ami.clone(),
            ),
        };
        let _: serde_json::Value = client.post("/v1/clouds", &cloud).await.unwrap();
        let spec = json!({"name": "crash", "script": script, "targets": {"c": {"base_image": base}}});
        let _: serde_json::Value = client.post("/v1/generators", &spec).await.unwrap();
        client.post("/v1/builds", &json!({"generator": "crash"})).await.unwrap()
    }

    /// What the cloud still holds besides the base image and `recorded`: VMs,
    /// instance dirs, instances, images and snapshots, checked in the cloud itself.
    async fn leftovers(&self, data: &Path, recorded: Option<&str>) -> Vec<String> {
        let mut left = Vec::new();
        match self {
            Self::Local => {
                left.extend(qemu_processes_in(data).into_iter().map(|p| format!("QEMU process {p}")));
                left.extend(entries(&data.join("qemu/instances")).into_iter().map(|d| format!("instance dir {d}")));
                let images = data.join("images");
                left.extend(
                    entries(&images)
                        .into_iter()
                        .filter(|i| Some(images.join(i).display().to_string().as_str()) != recorded)
                        .map(|i| format!("image {i}")),
                );
            }
            Self::Ec2(e) => {
                let ec2 = e.moto.client(REGION);
                let out = ec2.describe_instances().send().await.unwrap();
                left.extend(
                    out.reservations()
                        .iter()
                        .flat_map(|r| r.instances())
                        .filter(|i| i.state().and_then(|s| s.name()) != Some(&InstanceStateName::Terminated))
                        .filter_map(|i| i.instance_id().map(|id| format!("instance {id}"))),
                );
                let images = ec2.describe_images().owners("self").send().await.unwrap();
                let mut kept_snapshots = Vec::new();
                for image in images.images() {
                    let id = image.image_id().unwrap_or_default();
                    if id == e.ami || Some(id) == recorded {
                        kept_snapshots.extend(
                            image
                                .block_device_mappings()
                                .iter()
                                .filter_map(|m| m.ebs().and_then(|b| b.snapshot_id()).map(String::from)),
                        );
                    } else {
                        left.push(format!("AMI {id}"));
                    }
                }
                let snapshots = ec2.describe_snapshots().owner_ids("self").send().await.unwrap();
                left.extend(
                    snapshots
                        .snapshots()
                        .iter()
                        .filter_map(|s| s.snapshot_id())
                        .filter(|s| !kept_snapshots.iter().any(|k| k == s))
                        .map(|s| format!("snapshot {s}")),
                );
                if e.runner.wait_no_vms(Duration::from_secs(30)).await.is_err() {
                    left.push(format!("{} runner VMs", e.runner.live_vms()));
                }
            }
        }
        left
    }
}

/// Follows the target's log to its end (the target has ended), then returns
/// the build with that log.
async fn finished(client: &Client, build: &Build) -> (Build, Vec<u8>) {
    let log = follow_until(client, build.targets[0].id, |_| false).await;
    (client.get(&format!("/v1/builds/{}", build.id)).await.unwrap(), log)
}

/// Crashes a build at `point` and checks what the restart makes of it.
async fn crash(bed: Bed, point: &'static str) {
    let crash = Crash::of(point);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ports = Ports::free();
    let armed = crash.armed.join(",");
    let (mut first, client) = serve(&data, &ports, Some(&[("KILN_FAILPOINT", &armed)])).await;
    let build = bed.build(&client, crash.script).await;
    for (i, p) in crash.armed.iter().enumerate() {
        let marker = format!("kiln failpoint reached: {p}");
        assert!(first.wait_for_stderr(&marker, BUILD_LIMIT).await, "{p} was never reached: {}", first.stderr());
        if i == 0 && crash.cancel_at_first {
            let _: serde_json::Value =
                client.post(&format!("/v1/builds/{}/cancel", build.id), &json!({})).await.unwrap();
        }
    }
    first.kill9().await;

    let (_second, client) = serve(&data, &ports, None).await;
    let (done, log) = finished(&client, &build).await;
    let target = &done.targets[0];
    assert_eq!(target.status, crash.expect, "after a crash at {point}: {done:#?}");
    assert_eq!(log, crash.log, "after a crash at {point} the log is complete, nothing lost or doubled");
    let recorded = target.image.as_ref().map(|i| i.id.clone());
    match crash.expect {
        Status::Successful => {
            let image = recorded.as_deref().expect("a successful target has its image");
            if let Bed::Local = bed {
                assert!(Path::new(image).join("disk.qcow2").exists(), "the recorded image is kept after a crash at {point}");
            }
        }
        Status::Failed => {
            let error = target.error.as_ref().expect("a failed target says why");
            assert_eq!(error.reason, FailureReason::ScriptFailed, "{error:?}");
        }
        _ => {}
    }
    if let (Bed::Ec2(e), Some(image)) = (&bed, &recorded) {
        let out = e.moto.client(REGION).describe_images().image_ids(image).send().await.unwrap();
        assert_eq!(out.images().len(), 1, "the recorded AMI is kept after a crash at {point}");
    }
    let left = bed.leftovers(&data, recorded.as_deref()).await;
    assert!(left.is_empty(), "after a crash at {point} the cloud still holds {left:?}");
}

macro_rules! crash_tests {
    ($($test:ident => $point:literal,)*) => {
        mod local {
            $(
                #[tokio::test]
                async fn $test() {
                    super::crash(super::Bed::Local, $point).await;
                }
            )*
        }

        mod ec2 {
            $(
                #[tokio::test]
                async fn $test() {
                    super::crash(super::Bed::ec2().await, $point).await;
                }
            )*
        }

        // Every failpoint the coordinator has is crashed at by a test here.
        #[test]
        fn every_failpoint_has_a_crash_test() {
            let tested = [$($point),*];
            for point in failpoint::ALL {
                assert!(tested.contains(point), "no crash test for the failpoint {point}");
            }
        }
    };
}

crash_tests! {
    launch_before_call => "launch:before-call",
    launch_after_call => "launch:after-call",
    after_launch => "step-done:launch",
    after_await_agent => "step-done:await_agent",
    after_run => "step-done:run",
    after_seal => "step-done:seal",
    start_image_before_call => "start-image:before-call",
    start_image_after_call => "start-image:after-call",
    image_ready => "wait-image:ready",
    after_snapshot => "step-done:snapshot",
    after_record => "step-done:record",
    terminate_after_call => "terminate:after-call",
    unwind_after_delete_image => "unwind:after-delete-image",
    unwind_after_terminate => "unwind:after-terminate",
}

/// Runs every step twice on `bed`, the second time from the record as it was
/// before the first (omicron's saga test): the build still succeeds with one
/// instance, one image and the log once.
async fn every_step_twice(bed: Bed) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ports = Ports::free();
    let (kiln, client) = serve(&data, &ports, Some(&[("KILN_REPEAT_STEPS", "1")])).await;
    let build = bed.build(&client, SCRIPT).await;
    let (done, log) = finished(&client, &build).await;
    assert_eq!(done.status, Status::Successful, "{done:#?}");
    assert_eq!(log, b"before\nafter\n");
    let repeated = kiln.stderr().matches("step run again from its stale record").count();
    assert_eq!(repeated, 7, "each of the 7 steps ran twice: {}", kiln.stderr());
    let image = done.targets[0].image.as_ref().unwrap();
    let left = bed.leftovers(&data, Some(&image.id)).await;
    assert!(left.is_empty(), "after every step ran twice the cloud still holds {left:?}");
    if let Bed::Ec2(e) = &bed {
        assert_eq!(e.runner.booted().len(), 1, "one instance was launched");
    }
}

#[tokio::test]
async fn local_every_step_twice() {
    every_step_twice(Bed::Local).await;
}

#[tokio::test]
async fn ec2_every_step_twice() {
    every_step_twice(Bed::ec2().await).await;
}
