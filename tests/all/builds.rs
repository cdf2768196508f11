//! Whole builds through the real user-data and the real static agent.

use kiln_protocol::agent::ScriptOutcome;
use kiln_protocol::api::{FailureReason, Status, Step};
use kiln_tests::bed::Bed;

fn numbered_lines(n: usize) -> String {
    (1..=n).map(|i| format!("line {i} of the kiln log test\n")).collect()
}

// A script printing 10,000 numbered lines succeeds, and its log, read back
// through the API both live and afterwards, is byte-identical to its output.
#[tokio::test]
async fn ten_thousand_lines_arrive_intact() {
    let bed = Bed::start().await;
    bed.add_cloud("local").await;
    let script = "i=1\nwhile [ $i -le 10000 ]; do echo \"line $i of the kiln log test\"; i=$((i+1)); done\n";
    let build = bed.build_script("lines", script, None).await;
    let target = build.targets[0].id;
    let live = bed.follow(target).await;
    let build = bed.wait(&build).await;

    assert_eq!(build.status, Status::Successful, "{build:#?}");
    let t = &build.targets[0];
    assert_eq!(t.outcome, Some(ScriptOutcome::Exited { code: 0 }));
    let expected = numbered_lines(10_000);
    assert_eq!(live, expected.as_bytes(), "the live follow is the script's output");
    assert_eq!(bed.log(target).await, expected.as_bytes(), "the stored log is the script's output");
    assert_eq!(t.log_bytes, expected.len() as u64);
    let image = t.image.as_ref().expect("an image was recorded");
    assert_eq!(image.provenance.script_sha256, build.script_sha256);
    assert!(std::path::Path::new(&image.id).exists(), "the image exists");
    assert!(bed.provider.live_instances().is_empty(), "the instance was terminated");
    let timings = &t.timings;
    assert!(timings.launched_at <= timings.agent_contact_at && timings.agent_contact_at <= timings.finished_at);
}

// A script that exits 3 fails its target with exit code 3; the log is intact,
// no image is left, and the instance was cleaned up.
#[tokio::test]
async fn failing_script_fails_target_and_cleans_up() {
    let bed = Bed::start().await;
    bed.add_cloud("local").await;
    let build = bed.build_script("exit3", "echo before the failure\necho to stderr >&2\nexit 3\n", None).await;
    let build = bed.wait(&build).await;

    assert_eq!(build.status, Status::Failed);
    let t = &build.targets[0];
    assert_eq!(t.status, Status::Failed);
    assert_eq!(t.outcome, Some(ScriptOutcome::Exited { code: 3 }));
    let err = t.error.as_ref().unwrap();
    assert_eq!((err.reason, err.step), (FailureReason::ScriptFailed, Step::Run));
    assert!(err.message.contains("exit code 3") && err.message.contains("to stderr"), "{}", err.message);
    assert_eq!(bed.log(t.id).await, b"before the failure\nto stderr\n");
    assert!(t.image.is_none());
    assert!(bed.provider.images().is_empty(), "no image was made");
    assert!(bed.provider.live_instances().is_empty(), "clean-up terminated the instance");
}

// A script that outlives its timeout is killed with its children and the
// target fails with reason "timeout".
#[tokio::test]
async fn timeout_kills_the_script_and_its_children() {
    let bed = Bed::start().await;
    bed.add_cloud("local").await;
    let script = "sleep 1000 &\necho child $!\nsleep 1000\n";
    let build = bed.build_script("sleepy", script, Some(2)).await;
    let build = bed.wait(&build).await;

    let t = &build.targets[0];
    assert_eq!(t.status, Status::Failed);
    assert_eq!(t.outcome, Some(ScriptOutcome::TimedOut { after_secs: 2 }));
    assert_eq!(t.error.as_ref().unwrap().reason, FailureReason::Timeout);
    let log = String::from_utf8(bed.log(t.id).await).unwrap();
    let pid: i32 = log.trim().strip_prefix("child ").expect("the script printed its child").parse().unwrap();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "the background child {pid} was killed");
}

// Two targets of one build run concurrently, each with its own log and image.
#[tokio::test]
async fn targets_of_one_build_run_concurrently() {
    let bed = Bed::start().await;
    bed.add_cloud("one").await;
    bed.add_cloud("two").await;
    // Each target waits until the other has started: only concurrency lets both finish.
    let gate = bed.dir.path().join("gate");
    std::fs::create_dir_all(&gate).unwrap();
    let script = format!(
        "touch {g}/$KILN_CLOUD\nother=one; [ \"$KILN_CLOUD\" = one ] && other=two\nn=0\nwhile [ ! -e {g}/$other ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done\n[ -e {g}/$other ] && echo saw $other\n",
        g = gate.display()
    );
    let spec = Bed::spec("pair", &script, &["one", "two"]);
    bed.create_generator(&spec).await;
    let build = bed.start_build("pair").await;
    let build = bed.wait(&build).await;

    assert_eq!(build.status, Status::Successful, "{build:#?}");
    for t in &build.targets {
        let other = if t.cloud.as_str() == "one" { "two" } else { "one" };
        assert_eq!(bed.log(t.id).await, format!("saw {other}\n").as_bytes());
        assert!(t.image.is_some());
    }
}

// Cancelling a running build unwinds its target: cancelled, instance gone, no image.
#[tokio::test]
async fn cancel_unwinds_a_running_target() {
    let bed = Bed::start().await;
    bed.add_cloud("local").await;
    let build = bed.build_script("forever", "echo started\nsleep 1000\n", None).await;
    let target = build.targets[0].id;
    bed.follow_until(target, |log| log.ends_with(b"started\n")).await;
    let _: kiln_protocol::api::Build = bed.client.post(&format!("/v1/builds/{}/cancel", build.id), &()).await.unwrap();
    let build = bed.wait(&build).await;

    assert_eq!(build.status, Status::Cancelled);
    assert!(build.cancel_requested);
    assert_eq!(build.targets[0].error.as_ref().unwrap().reason, FailureReason::Cancelled);
    assert!(bed.provider.live_instances().is_empty(), "the instance was terminated");
    assert!(bed.provider.images().is_empty());
}
