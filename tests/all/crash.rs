//! A crash at every failpoint, for real: `kiln serve` built with failpoints
//! stops dead at one and is killed with SIGKILL; a plain `kiln serve` started
//! on the same data directory and ports finishes the build. Whatever the
//! point, the target ends terminal (successful where the crash allows it), no
//! VM, instance dir or half-made image is left, a recorded image stays, and
//! the log is complete. On the local cloud, the EC2 bed (moto, with a real VM
//! as each instance) and the fake OpenStack (Keystone, Nova and Glance, each
//! server a real VM). A second helper runs every step twice.

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
use kiln_tests::openstack::{DEFAULT_NETWORK, FakeConfig, FakeOpenStack};
use serde_json::json;

/// How long a kiln process gets to start listening.
const START_LIMIT: Duration = Duration::from_secs(30);
const SCRIPT: &str = "echo before\necho after\n";
const FAILING: &str = "echo before\nexit 3\n";

/// One life of the failpoints kiln: the points armed (the test waits for
/// the last one, then kills the process), and whether the build is
/// cancelled when the first is reached.
#[derive(Clone, Copy)]
struct Stop {
    armed: &'static [&'static str],
    cancel_at_first: bool,
}

const fn at(point: &'static [&'static str]) -> Stop {
    Stop { armed: point, cancel_at_first: false }
}

/// One build crashed again and again: killed at each stop in turn, each
/// restart armed at the next, then finished by a plain kiln. One VM serves
/// every crash of a chain, which keeps the matrix within CI's time.
struct Chain {
    stops: &'static [Stop],
    script: &'static str,
    expect: Status,
    log: &'static [u8],
}

/// A build that succeeds, killed at every forward failpoint in the order a
/// build reaches them.
const FORWARD: Chain = Chain {
    stops: &[
        at(&["launch:before-call"]),
        at(&["launch:after-call"]),
        at(&["step-done:launch"]),
        at(&["step-done:await_agent"]),
        at(&["step-done:run"]),
        at(&["step-done:seal"]),
        at(&["start-image:before-call"]),
        at(&["start-image:after-call"]),
        at(&["wait-image:ready"]),
        at(&["step-done:snapshot"]),
        at(&["step-done:record"]),
        at(&["terminate:after-call"]),
    ],
    script: SCRIPT,
    expect: Status::Successful,
    log: b"before\nafter\n",
};

/// A failing script: killed while it runs, then in its unwind, once the
/// instance is terminated.
const FAILED: Chain = Chain {
    stops: &[at(&["step-done:await_agent"]), at(&["unwind:after-terminate"])],
    script: FAILING,
    expect: Status::Failed,
    log: b"before\n",
};

/// A half-made image exists only once the image step has begun: the build
/// is cancelled while it waits there, and killed once the image is deleted.
const CANCELLED: Chain = Chain {
    stops: &[
        at(&["start-image:after-call"]),
        Stop { armed: &["wait-image:ready", "unwind:after-delete-image"], cancel_at_first: true },
    ],
    script: SCRIPT,
    expect: Status::Cancelled,
    log: b"before\nafter\n",
};

const CHAINS: [&Chain; 3] = [&FORWARD, &FAILED, &CANCELLED];

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
    Openstack(FakeOpenStack),
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

    async fn openstack() -> Self {
        let fake = FakeOpenStack::start(FakeConfig::default()).await.expect("fake OpenStack");
        fake.add_image("tiny", kiln_tests::tiny_image()).expect("tiny image");
        Self::Openstack(fake)
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
            Self::Openstack(fake) => (
                json!({"name": "c", "kind": "openstack", "region": "RegionOne", "endpoint": fake.auth_url(),
                    "options": {"user": "kiln", "project": "kiln", "flavor": "m1.small", "network": DEFAULT_NETWORK,
                        "coordinator_host": GUEST_HOST, "poll_secs": "0.5"},
                    "credentials": {"password": "kiln-secret"}}),
                "tiny".to_owned(),
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
            Self::Openstack(fake) => {
                left.extend(fake.servers().into_iter().filter(|s| !s.deleted).map(|s| format!("server {}", s.id)));
                left.extend(
                    fake.images()
                        .into_iter()
                        .filter(|i| i.id != "tiny" && !i.deleted && Some(i.id.as_str()) != recorded)
                        .map(|i| format!("Glance image {} ({})", i.id, i.status)),
                );
                if fake.wait_no_vms(Duration::from_secs(30)).await.is_err() {
                    left.push(format!("{} fake OpenStack VMs", fake.live_vms()));
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

/// Crashes one build at every stop of `chain` in turn and checks what the
/// last restart makes of it.
async fn crash(bed: Bed, chain: &Chain) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ports = Ports::free();
    let mut build = None;
    for stop in chain.stops {
        let armed = stop.armed.join(",");
        let (mut kiln, client) = serve(&data, &ports, Some(&[("KILN_FAILPOINT", &armed)])).await;
        let build = match &build {
            Some(b) => b,
            None => build.insert(bed.build(&client, chain.script).await),
        };
        for (i, p) in stop.armed.iter().enumerate() {
            let marker = format!("kiln failpoint reached: {p}");
            assert!(kiln.wait_for_stderr(&marker, BUILD_LIMIT).await, "{p} was never reached: {}", kiln.stderr());
            if i == 0 && stop.cancel_at_first {
                let _: serde_json::Value =
                    client.post(&format!("/v1/builds/{}/cancel", build.id), &json!({})).await.unwrap();
            }
        }
        kiln.kill9().await;
    }
    let build = build.expect("a chain has a stop");
    let point = chain.stops.iter().map(|s| s.armed.join("+")).collect::<Vec<_>>().join(", ");

    let (_second, client) = serve(&data, &ports, None).await;
    let (done, log) = finished(&client, &build).await;
    let target = &done.targets[0];
    assert_eq!(target.status, chain.expect, "after crashes at {point}: {done:#?}");
    assert_eq!(log, chain.log, "after crashes at {point} the log is complete, nothing lost or doubled");
    let recorded = target.image.as_ref().map(|i| i.id.clone());
    match chain.expect {
        Status::Successful => {
            let image = recorded.as_deref().expect("a successful target has its image");
            if let Bed::Local = bed {
                assert!(Path::new(image).join("disk.qcow2").exists(), "the recorded image is kept after crashes at {point}");
            }
        }
        Status::Failed => {
            let error = target.error.as_ref().expect("a failed target says why");
            assert_eq!(error.reason, FailureReason::ScriptFailed, "{error:?}");
        }
        _ => {}
    }
    match (&bed, &recorded) {
        (Bed::Ec2(e), Some(image)) => {
            let out = e.moto.client(REGION).describe_images().image_ids(image).send().await.unwrap();
            assert_eq!(out.images().len(), 1, "the recorded AMI is kept after crashes at {point}");
        }
        (Bed::Openstack(fake), Some(image)) => {
            let kept = fake.images().into_iter().find(|i| &i.id == image).expect("the recorded image is in Glance");
            assert!(!kept.deleted && kept.status == "active", "the recorded image is kept after crashes at {point}: {kept:?}");
        }
        _ => {}
    }
    let left = bed.leftovers(&data, recorded.as_deref()).await;
    assert!(left.is_empty(), "after crashes at {point} the cloud still holds {left:?}");
}

// One build per cloud and chain, the clouds' chains run concurrently by the
// test harness.
macro_rules! crash_tests {
    ($($test:ident => $chain:ident,)*) => {
        mod local {
            $(
                #[tokio::test]
                async fn $test() {
                    super::crash(super::Bed::Local, &super::$chain).await;
                }
            )*
        }

        mod ec2 {
            $(
                #[tokio::test]
                async fn $test() {
                    super::crash(super::Bed::ec2().await, &super::$chain).await;
                }
            )*
        }

        mod openstack {
            $(
                #[tokio::test]
                async fn $test() {
                    super::crash(super::Bed::openstack().await, &super::$chain).await;
                }
            )*
        }
    };
}

crash_tests! {
    at_every_forward_step => FORWARD,
    while_a_failed_target_unwinds => FAILED,
    while_a_cancelled_target_unwinds => CANCELLED,
}

// Every failpoint the coordinator has is crashed at by a chain.
#[test]
fn every_failpoint_has_a_crash_test() {
    for point in failpoint::ALL {
        let tested = CHAINS.iter().flat_map(|c| c.stops).any(|s| s.armed.last() == Some(point));
        assert!(tested, "no crash test stops at the failpoint {point}");
    }
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
    match &bed {
        Bed::Ec2(e) => assert_eq!(e.runner.booted().len(), 1, "one instance was launched"),
        Bed::Openstack(fake) => assert_eq!(fake.servers().len(), 1, "one server was created"),
        Bed::Local => {}
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

#[tokio::test]
async fn openstack_every_step_twice() {
    every_step_twice(Bed::openstack().await).await;
}
