//! A crash at every failpoint, for real: `kiln serve` built with failpoints
//! stops dead at one and is killed with SIGKILL; a plain `kiln serve` started
//! on the same data directory and ports finishes the build. Whatever the
//! point, the target ends terminal (successful where the crash allows it), no
//! VM, instance dir or half-made image is left, a recorded image stays, and
//! the log is complete. On the local cloud and on the EC2 bed (moto, with a
//! real VM as each instance). A second helper runs every step twice.

use std::path::Path;

use kiln_coordinator::failpoint;
use kiln_protocol::api::{FailureReason, Status};
use kiln_tests::bed::BUILD_LIMIT;
use kiln_tests::crash_bed::{Bed, Ports, REGION, finished, serve};
use serde_json::json;
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
            _ => Self {
                armed: vec![point],
                cancel_at_first: false,
                script: SCRIPT,
                expect: Status::Successful,
                log: b"before\nafter\n",
            },
        }
    }
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
                assert!(
                    Path::new(image).join("disk.qcow2").exists(),
                    "the recorded image is kept after a crash at {point}"
                );
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
