//! `kiln serve` and one-shot `kiln build start` as real processes with real
//! VMs: killed with SIGKILL or interrupted mid-script, they leave nothing
//! running and lose nothing; the VMs reach the restarted coordinator.

use std::path::Path;
use std::time::Duration;

use kiln_coordinator::cli::Client;
use kiln_protocol::api::{Build, Status};
use kiln_tests::bed::{BUILD_LIMIT, follow_until};
use kiln_tests::kiln_process::{KilnProcess, free_port, qemu_processes_in, wait_for_log_file};
use nix::sys::signal::Signal;
use serde_json::json;

/// How long a kiln process gets to start listening.
const START_LIMIT: Duration = Duration::from_secs(30);

fn tiny() -> String {
    kiln_tests::tiny_image().display().to_string()
}

/// The tiny image's directory, which kiln must be told it may take images from.
fn tiny_dir() -> String {
    kiln_tests::tiny_image().parent().unwrap().display().to_string()
}

/// `kiln serve` on `data` with its API on `port` (agents and bootstrap on
/// ephemeral ports: local VMs never use them), once it listens.
async fn serve(data: &Path, port: u16) -> (KilnProcess, Client) {
    let listen = format!("127.0.0.1:{port}");
    let tiny_dir = tiny_dir();
    let args = ["serve", "--data-dir", data.to_str().unwrap(), "--listen", &listen, "--image-dir", &tiny_dir];
    let kiln = KilnProcess::spawn(
        args.iter().copied().chain(["--agent-listen", "127.0.0.1:0", "--bootstrap-listen", "127.0.0.1:0"]),
        data.parent().unwrap(),
    );
    kiln_tests::crash_bed::listening(kiln, data, &listen).await
}

/// A generator file for the local cloud running `script` on the tiny image.
fn generator_file(dir: &Path, name: &str, script: &str) -> String {
    std::fs::write(dir.join(format!("{name}.sh")), script).unwrap();
    let toml = dir.join(format!("{name}.toml"));
    std::fs::write(
        &toml,
        format!("name = \"{name}\"\nscript = \"{name}.sh\"\n[targets.local]\nbase_image = \"{}\"\n", tiny()),
    )
    .unwrap();
    toml.display().to_string()
}

// `kiln serve` is killed with SIGKILL while a VM's script runs and started
// again on another API port: the same VM's agent reconnects (through the data
// directory's socket, not a port), and the build succeeds with its whole log.
#[tokio::test]
async fn a_killed_serve_is_reached_again_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (first, client) = serve(&data, free_port()).await;
    let _: serde_json::Value = client.post("/v1/clouds", &json!({"name": "local", "kind": "qemu"})).await.unwrap();
    let spec = json!({"name": "slow", "script": "echo before\nsleep 12\necho after\n",
        "targets": {"local": {"base_image": tiny()}}});
    let _: serde_json::Value = client.post("/v1/generators", &spec).await.unwrap();
    let build: Build = client.post("/v1/builds", &json!({"generator": "slow"})).await.unwrap();
    let target = build.targets[0].id;
    follow_until(&client, target, |log| log.ends_with(b"before\n")).await;
    first.kill9().await;
    assert_eq!(qemu_processes_in(&data).len(), 1, "the VM outlives the coordinator");

    let (mut second, client) = serve(&data, free_port()).await;
    let log = follow_until(&client, target, |_| false).await;
    assert_eq!(log, b"before\nafter\n", "the log is complete, nothing lost or doubled");
    let done: Build = client.get(&format!("/v1/builds/{}", build.id)).await.unwrap();
    assert_eq!(done.status, Status::Successful, "{done:#?}");
    assert!(done.targets[0].image.is_some());
    second.signal(Signal::SIGTERM);
    assert_eq!(second.exit_code(START_LIMIT).await, Some(0), "{}", second.stderr());
    assert!(qemu_processes_in(&data).is_empty(), "no QEMU is left running");
}

// A one-shot build on the default relative data directory is killed with
// SIGKILL mid-script. The next one-shot in the same directory says it resumes
// the earlier build, finishes it (its VM reconnects), builds its own, and
// exits only when no QEMU of its own runs.
#[tokio::test]
async fn a_killed_one_shot_is_finished_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join(".kiln-data");
    let slow = generator_file(dir.path(), "slow", "echo started\nsleep 12\necho finished\n");
    let tiny_dir = tiny_dir();
    let first = KilnProcess::spawn(["build", "start", "--file", &slow, "--image-dir", &tiny_dir], dir.path());
    let log = wait_for_log_file(&data, "started\n", BUILD_LIMIT).await.expect("the script started");
    first.kill9().await;
    assert_eq!(qemu_processes_in(&data).len(), 1, "the VM outlives the killed one-shot");

    let quick = generator_file(dir.path(), "quick", "echo quick\n");
    let mut second = KilnProcess::spawn(["build", "start", "--file", &quick, "--image-dir", &tiny_dir], dir.path());
    assert_eq!(second.exit_code(BUILD_LIMIT).await, Some(0), "{}", second.stderr());
    let stderr = second.stderr();
    assert!(stderr.contains("resuming build") && stderr.contains("of slow"), "{stderr}");
    assert!(stderr.contains("earlier build ended") && stderr.contains("local successful"), "{stderr}");
    assert_eq!(std::fs::read_to_string(log).unwrap(), "started\nfinished\n");
    assert!(qemu_processes_in(&data).is_empty(), "no QEMU is left running");
    let images: Vec<_> = std::fs::read_dir(data.join("images")).unwrap().collect();
    assert_eq!(images.len(), 2, "both builds made their image");
}

// SIGINT mid-script unwinds the one-shot's target within seconds: exit code
// 130, no QEMU, no overlay, no image.
#[tokio::test]
async fn an_interrupted_one_shot_unwinds() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let long = generator_file(dir.path(), "long", "echo started\nsleep 600\n");
    let tiny_dir = tiny_dir();
    let args = ["build", "start", "--file", &long, "--data-dir", "data", "--image-dir", &tiny_dir];
    let mut kiln = KilnProcess::spawn(args, dir.path());
    wait_for_log_file(&data, "started\n", BUILD_LIMIT).await.expect("the script started");
    kiln.signal(Signal::SIGINT);
    assert_eq!(kiln.exit_code(Duration::from_secs(60)).await, Some(130), "{}", kiln.stderr());
    assert!(kiln.stderr().contains("SIGINT: cancelling 1 build"), "{}", kiln.stderr());
    assert!(kiln.stderr().contains("local cancelled"), "{}", kiln.stderr());
    assert!(qemu_processes_in(&data).is_empty(), "no QEMU is left running");
    let left = |sub: &str| std::fs::read_dir(data.join(sub)).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left("qemu/instances"), 0, "no overlay is left");
    assert_eq!(left("images"), 0, "no image is left");
}

// A guest-side address that collides with QEMU's user network is refused at
// start, by `kiln serve` and by a one-shot, with the reason.
#[tokio::test]
async fn a_colliding_guest_address_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let listen = format!("127.0.0.1:{}", free_port());
    let ephemeral = ["--agent-listen", "127.0.0.1:0", "--bootstrap-listen", "127.0.0.1:0"];
    let args = ["serve", "--data-dir", data.to_str().unwrap(), "--listen", &listen, "--guest-address", "10.0.2.2"];
    let args = args.into_iter().chain(ephemeral);
    let mut serve = KilnProcess::spawn(args, dir.path());
    assert_eq!(serve.exit_code(START_LIMIT).await, Some(1), "{}", serve.stderr());
    assert!(serve.stderr().contains("10.0.2.2 is QEMU's gateway"), "{}", serve.stderr());

    let quick = generator_file(dir.path(), "quick", "true\n");
    let args = ["build", "start", "--file", &quick, "--data-dir", "data", "--guest-address", "10.0.2.20"];
    let mut oneshot = KilnProcess::spawn(args, dir.path());
    assert_eq!(oneshot.exit_code(START_LIMIT).await, Some(1), "{}", oneshot.stderr());
    assert!(oneshot.stderr().contains("DHCP range"), "{}", oneshot.stderr());
}
