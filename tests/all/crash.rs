//! A crash at every failpoint, for real: `kiln serve` built with failpoints
//! stops dead at one and is killed with SIGKILL; a plain `kiln serve` started
//! on the same data directory and ports finishes the build. Whatever the
//! point, the target ends terminal (successful where the crash allows it), no
//! VM, instance dir or half-made image is left, a recorded image stays, and
//! the log is complete. On the local cloud, the EC2 bed (moto, with a real VM
//! as each instance) and the fake OpenStack (Keystone, Nova and Glance, each
//! server a real VM). A second helper runs every step twice.

use std::path::Path;

use kiln_coordinator::failpoint;
use kiln_protocol::api::{FailureReason, JanitorReport, Status};
use kiln_tests::bed::BUILD_LIMIT;
use kiln_tests::crash_bed::{Bed, Ports, REGION, finished, serve};
use serde_json::json;

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

/// Crashes one build at every stop of `chain` in turn and checks what the
/// last restart makes of it.
async fn crash(bed: Bed, chain: &Chain) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ports = Ports::free();
    let mut build = None;
    // Every life's log, to check the janitor never had to remove what an
    // undo should have.
    let mut logs = Vec::new();
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
        logs.push(kiln.stderr());
        kiln.kill9().await;
    }
    let build = build.expect("a chain has a stop");
    let point = chain.stops.iter().map(|s| s.armed.join("+")).collect::<Vec<_>>().join(", ");

    let (last, client) = serve(&data, &ports, None).await;
    let (done, log) = finished(&client, &build).await;
    let target = &done.targets[0];
    assert_eq!(target.status, chain.expect, "after crashes at {point}: {done:#?}");
    assert_eq!(log, chain.log, "after crashes at {point} the log is complete, nothing lost or doubled");
    let recorded = target.image.as_ref().map(|i| i.id.clone());
    match chain.expect {
        Status::Successful => {
            let image = recorded.as_deref().expect("a successful target has its image");
            if let Bed::Local = bed {
                assert!(
                    Path::new(image).join("disk.qcow2").exists(),
                    "the recorded image is kept after crashes at {point}"
                );
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
            assert!(
                !kept.deleted && kept.status == "active",
                "the recorded image is kept after crashes at {point}: {kept:?}"
            );
        }
        _ => {}
    }
    // What the janitor finds is what the workflow's undo missed: nothing.
    let report: JanitorReport = client.get("/v1/janitor").await.unwrap();
    assert!(report.found.is_empty() && report.skipped.is_empty(), "the janitor found leftovers: {report:#?}");
    logs.push(last.stderr());
    let swept: Vec<&str> =
        logs.iter().flat_map(|l| l.lines()).filter(|l| l.contains("janitor removed a leftover")).collect();
    assert!(swept.is_empty(), "after crashes at {point} the janitor had to remove {swept:#?}");
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
