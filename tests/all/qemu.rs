//! The local cloud: real VMs under QEMU booting kiln's tiny image.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_protocol::api::{Build, FailureReason, Image, Status, Step, Target};
use kiln_tests::bed::{Bed, Options};
use serde_json::json;

fn tiny() -> String {
    kiln_tests::tiny_image().display().to_string()
}

async fn add_qemu_cloud(bed: &Bed, name: &str, options: serde_json::Value) {
    let cloud = json!({"name": name, "kind": "qemu", "options": options});
    let _: serde_json::Value = bed.client.post("/v1/clouds", &cloud).await.expect("add cloud");
}

/// A generator running `script` on the tiny image (or `base`) on `clouds`.
async fn generator(bed: &Bed, name: &str, script: &str, clouds: &[&str], base: &str) {
    let mut spec = Bed::spec(name, script, clouds);
    for t in spec.targets.values_mut() {
        t.base_image = base.to_owned();
    }
    bed.create_generator(&spec).await;
}

fn data(bed: &Bed) -> PathBuf {
    bed.dir.path().join("data")
}

/// Entries of a directory (none if it does not exist).
fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map(|d| d.map(|e| e.unwrap().path()).collect()).unwrap_or_default()
}

/// Processes whose command line names a path inside `dir` (QEMU names its instance directory).
fn processes_in(dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    entries(Path::new("/proc"))
        .into_iter()
        .filter_map(|p| std::fs::read(p.join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&dir))
        .collect()
}

fn overlapped(a: &Target, b: &Target) -> bool {
    let (a0, a1) = (a.timings.launched_at.unwrap(), a.timings.script_finished_at.unwrap());
    let (b0, b1) = (b.timings.launched_at.unwrap(), b.timings.script_finished_at.unwrap());
    a0 < b1 && b0 < a1
}

// A build on two local clouds boots two real VMs at once; each image keeps
// what the script wrote, holds neither the token nor a private key, can be
// the base image of the next generator (whose script reads the value back),
// and can be deleted.
#[tokio::test]
async fn local_build_bakes_the_script_into_a_bootable_image() {
    let bed = Bed::with(Options::qemu()).await;
    add_qemu_cloud(&bed, "local-a", json!({})).await;
    add_qemu_cloud(&bed, "local-b", json!({})).await;
    let proof = format!("proof-{:016x}", rand::random::<u64>());
    let script = format!("echo {proof} > /etc/kiln-proof\necho wrote the proof\n");
    generator(&bed, "proof", &script, &["local-a", "local-b"], &tiny()).await;
    let build = bed.wait(&bed.start_build("proof").await).await;

    assert_eq!(build.status, Status::Successful, "{build:#?}");
    let (a, b) = (&build.targets[0], &build.targets[1]);
    assert!(overlapped(a, b), "the two VMs ran at the same time: {:#?} {:#?}", a.timings, b.timings);
    for t in [a, b] {
        assert_eq!(bed.log(t.id).await, b"wrote the proof\n");
        assert!(t.timings.sealed_at.is_some() && t.timings.image_ready_at.is_some());
    }
    let image = a.image.clone().expect("an image");
    assert_eq!(image.provenance.script_sha256, build.script_sha256);
    assert_eq!(image.provenance.base_image, tiny());
    assert!(image.sha256.as_ref().is_some_and(|s| s.len() == 64));
    let images: Vec<Image> = bed.client.get("/v1/images").await.unwrap();
    assert_eq!(images.len(), 2);
    assert!(entries(&data(&bed).join("qemu/instances")).is_empty(), "overlays were removed");
    assert!(processes_in(&data(&bed).join("qemu")).is_empty(), "no QEMU is left running");

    let bytes = kiln_tests::disk::raw_bytes(&Path::new(&image.id).join("disk.qcow2"));
    let token = bed.app().pki().tokens().token(a.id);
    assert!(memchr::memmem::find(&bytes, token.as_bytes()).is_none(), "the enrollment token is in the image");
    assert!(kiln_tests::disk::pem_private_keys(&bytes).is_empty(), "a private key is in the image");
    assert!(memchr::memmem::find(&bytes, proof.as_bytes()).is_some(), "the script's file is in the image");

    generator(&bed, "check", "cat /etc/kiln-proof\n", &["local-a"], &image.id).await;
    let check = bed.wait(&bed.start_build("check").await).await;
    assert_eq!(check.status, Status::Successful, "{check:#?}");
    assert_eq!(bed.log(check.targets[0].id).await, format!("{proof}\n").as_bytes());

    // Images are first-class: deleting one removes it from the store and the disk.
    bed.client.delete(&format!("/v1/images/{}", image.name)).await.unwrap();
    assert!(!Path::new(&image.id).exists(), "the image directory was deleted");
    let images: Vec<Image> = bed.client.get("/v1/images").await.unwrap();
    assert_eq!(images.len(), 2, "b's image and the check's image remain");
    assert!(images.iter().all(|i| i.name != image.name));
}

// A failing script, a killed VM and an agent that never phones home each end
// failed with a useful error, leaving no QEMU process, overlay or image.
#[tokio::test]
async fn failed_local_targets_leave_nothing_behind() {
    let bed = Bed::with(Options { agent_contact: Duration::from_secs(60), ..Options::qemu() }).await;
    add_qemu_cloud(&bed, "local", json!({})).await;
    add_qemu_cloud(&bed, "nowhere", json!({"coordinator_host": "10.0.2.99"})).await;
    generator(&bed, "fails", "echo about to fail\nexit 3\n", &["local"], &tiny()).await;
    generator(&bed, "killed", "echo started\nsleep 600\n", &["local"], &tiny()).await;
    generator(&bed, "lost", "echo never runs\n", &["nowhere"], &tiny()).await;
    let fails = bed.start_build("fails").await;
    let killed = bed.start_build("killed").await;
    let lost = bed.start_build("lost").await;

    let victim = killed.targets[0].id;
    bed.follow_until(victim, |log| log.ends_with(b"started\n")).await;
    let pidfile = data(&bed).join(format!("qemu/instances/qemu-{victim}/qemu.pid"));
    let pid: i32 = std::fs::read_to_string(pidfile).unwrap().trim().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();

    let fails: Build = bed.wait(&fails).await;
    let t = &fails.targets[0];
    let err = t.error.as_ref().unwrap();
    assert_eq!((err.reason, err.step), (FailureReason::ScriptFailed, Step::Run), "{err:#?}");
    assert!(err.message.contains("exit code 3") && err.message.contains("about to fail"), "{}", err.message);

    let killed: Build = bed.wait(&killed).await;
    let err = killed.targets[0].error.as_ref().unwrap();
    assert_eq!(err.step, Step::Run, "{err:#?}");
    assert!(err.message.contains("the instance stopped while the script ran"), "{}", err.message);

    let lost: Build = bed.wait(&lost).await;
    let err = lost.targets[0].error.as_ref().unwrap();
    assert_eq!((err.reason, err.step), (FailureReason::AgentUnreachable, Step::AwaitAgent), "{err:#?}");
    assert!(err.message.contains("did not phone home within 60s"), "{}", err.message);
    assert!(err.message.contains("kiln-bootstrap: attempt"), "the error quotes the console: {}", err.message);

    for b in [&fails, &killed, &lost] {
        let message = &b.targets[0].error.as_ref().unwrap().message;
        assert!(!message.contains('\u{1b}'), "console text is quoted without terminal escapes: {message:?}");
        assert_eq!(b.status, Status::Failed);
        assert!(b.targets[0].image.is_none());
    }
    assert!(entries(&data(&bed).join("qemu/instances")).is_empty(), "no overlay is left");
    assert!(entries(&data(&bed).join("images")).is_empty(), "no partial image is left");
    assert!(processes_in(&data(&bed).join("qemu")).is_empty(), "no QEMU is left running");
}

// A base image that does not exist or is not a disk is refused before anything starts
// (tests/all/confinement.rs has the paths that are refused for where they lead).
#[tokio::test]
async fn bad_base_images_are_refused_up_front() {
    let bed = Bed::with(Options::qemu()).await;
    add_qemu_cloud(&bed, "local", json!({})).await;
    let text = bed.image_dir().join("notes.txt");
    std::fs::write(&text, "not a disk\n").unwrap();
    let missing = bed.image_dir().join("base.qcow2");
    let cases = [
        (missing.to_str().unwrap(), "does not exist"),
        ("relative.qcow2", "must be an absolute path"),
        (text.to_str().unwrap(), "is not a disk image"),
    ];
    for (i, (base, needle)) in cases.iter().enumerate() {
        let name = format!("bad{i}");
        generator(&bed, &name, "true\n", &["local"], base).await;
        let message = bed.refused_build(&name).await;
        assert!(message.contains(needle), "{base}: {message}");
    }
    let builds: Vec<Build> = bed.client.get("/v1/builds").await.unwrap();
    assert!(builds.is_empty(), "nothing started");
}

// A hostile script leaves a daemon (in its own session, so it outlives the
// script) that finds the agent's pid while the script runs and freezes it
// the moment the seal has removed the agent's directory (running at the
// highest priority and the agent at the lowest, with only shell builtins
// between the two, so the seal cannot win the race): the seal never finishes. The coordinator stops the VM at the seal limit and makes no image
// of a disk that may still hold the token; nothing is left behind.
#[tokio::test]
async fn an_unfinished_seal_makes_no_image() {
    let bed = Bed::with(Options { seal: Duration::from_secs(20), ..Options::qemu() }).await;
    add_qemu_cloud(&bed, "local", json!({})).await;
    let freeze = r#"
freeze() {
    pids=
    for p in /proc/[0-9]*; do
        [ "$(cat $p/comm 2>/dev/null)" = kiln-agent ] && pids="$pids ${p#/proc/}"
    done
    renice -n -20 -p $$
    renice -n 19 -p $pids
    : > /tmp/daemon-ready
    i=0
    while [ -e /var/lib/kiln-agent ] && [ $i -lt 5000000 ]; do i=$((i + 1)); done
    kill -STOP $pids
}
freeze </dev/null >/dev/null 2>&1 &
"#;
    // The script waits for the daemon to be in its own session: had it ended
    // first, the agent would have killed the daemon with the script's group.
    let script = format!(
        "setsid sh -c '{}' &\ni=0\nwhile [ ! -e /tmp/daemon-ready ] && [ $i -lt 1000000 ]; do i=$((i + 1)); done\necho left a daemon\n",
        freeze.replace('\'', r"'\''")
    );
    generator(&bed, "frozen", &script, &["local"], &tiny()).await;
    let build = bed.wait(&bed.start_build("frozen").await).await;
    let log = String::from_utf8_lossy(&bed.log(build.targets[0].id).await).into_owned();

    assert_eq!(build.status, Status::Failed, "the script printed {log:?}: {build:#?}");
    let t = &build.targets[0];
    let err = t.error.as_ref().expect("an error");
    assert_eq!((err.reason, err.step), (FailureReason::SealIncomplete, Step::Seal), "{err:#?}");
    assert!(err.message.contains("had not finished sealing 20s after the script ended"), "{}", err.message);
    assert!(err.message.contains("no image was made"), "{}", err.message);
    assert!(t.image.is_none());
    assert!(entries(&data(&bed).join("images")).is_empty(), "no image is left");
    assert!(entries(&data(&bed).join("qemu/instances")).is_empty(), "no overlay is left");
    assert!(processes_in(&data(&bed).join("qemu")).is_empty(), "no QEMU is left running");
}

// A script that floods the serial console: the console file keeps only about
// its newest `console_max_mib`, and what the guest printed last is in it.
#[tokio::test]
async fn the_console_keeps_only_its_newest_part() {
    let bed = Bed::with(Options::qemu()).await;
    add_qemu_cloud(&bed, "local", json!({"console_max_mib": "1"})).await;
    let script = "head -c 3000000 /dev/zero | tr '\\0' k > /dev/ttyS0\n\
                  echo console-end-marker > /dev/ttyS0\n\
                  echo flooded\n\
                  sleep 30\n";
    generator(&bed, "flood", script, &["local"], &tiny()).await;
    let build = bed.start_build("flood").await;
    let target = build.targets[0].id;
    let log = bed.follow_until(target, |log| log.windows(7).any(|w| w == b"flooded")).await;
    assert!(String::from_utf8_lossy(&log).contains("flooded"), "the script did not flood its console");
    let instances = data(&bed).join("qemu/instances");
    let console = entries(&instances).pop().expect("the VM's directory").join("console.log");
    // Each poll of the running VM cuts the console; wait (bounded) for the next one.
    let mut len = u64::MAX;
    for _ in 0..100 {
        len = std::fs::metadata(&console).unwrap().len();
        if len <= 1 << 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(len <= 1 << 20, "the console holds {len} bytes past its 1 MiB cap");
    let kept = std::fs::read(&console).unwrap();
    assert!(String::from_utf8_lossy(&kept).contains("console-end-marker"), "the newest console output was lost");
    let _: Build = bed.client.post(&format!("/v1/builds/{}/cancel", build.id), &()).await.unwrap();
    let build = bed.wait(&build).await;
    assert_eq!(build.status, Status::Cancelled);
    assert!(entries(&instances).is_empty(), "the cancelled VM was not removed");
}
