//! Local base images are confined: a base image, what it leads to (backing
//! files, data files) and a kernel or initrd must lie in the allowed image
//! directories and never in kiln's own state, or `POST /v1/builds` refuses
//! the build (400) before anything starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_protocol::api::{Build, Cloud, CloudKind, TargetSpec};
use kiln_tests::bed::{Bed, Options};
use serde_json::json;

/// A bed with the real QEMU provider as cloud `local`.
async fn bed() -> Bed {
    let bed = Bed::with(Options::qemu()).await;
    let cloud = json!({"name": "local", "kind": "qemu"});
    let _: serde_json::Value = bed.client.post("/v1/clouds", &cloud).await.expect("add cloud");
    bed
}

fn text(path: &Path) -> String {
    path.display().to_string()
}

/// The spec of a target on `local` with `base` and target options.
fn target(base: &str, options: &[(&str, String)]) -> TargetSpec {
    TargetSpec {
        base_image: base.into(),
        instance_type: None,
        network: None,
        options: options.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
    }
}

/// Asks for a build of a new generator `name` on `spec`, which must be
/// refused (400) promptly; returns the error's message.
async fn refused(bed: &Bed, name: &str, spec: TargetSpec) -> String {
    let mut generator = Bed::spec(name, "true\n", &["local"]);
    generator.targets.insert("local".parse().unwrap(), spec);
    bed.create_generator(&generator).await;
    tokio::time::timeout(Duration::from_secs(60), bed.refused_build(name)).await.expect("refused in time")
}

/// Nothing started: no build, no target, no instance directory.
async fn nothing_started(bed: &Bed) {
    let builds: Vec<Build> = bed.client.get("/v1/builds").await.unwrap();
    assert!(builds.is_empty(), "no build was stored: {builds:#?}");
    let instances = bed.data_dir().join("qemu/instances");
    let left = std::fs::read_dir(&instances).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "nothing under {}", instances.display());
}

/// Runs `qemu-img ARGS`, which must succeed.
async fn qemu_img(args: &[&str]) {
    let out = tokio::process::Command::new("qemu-img").args(args).output().await.expect("run qemu-img");
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A 1 MiB raw disk at `path`.
async fn raw_disk(path: &Path) -> String {
    tokio::fs::write(path, vec![0u8; 1024 * 1024]).await.unwrap();
    text(path)
}

/// The message says which directories images come from and how to add one.
fn says_what_to_fix(bed: &Bed, message: &str) {
    assert!(message.contains("--image-dir DIR"), "{message}");
    assert!(message.contains(&text(&bed.image_dir())), "names the allowed directories: {message}");
    assert!(message.contains(&text(&bed.data_dir().join("images"))), "names kiln's image store: {message}");
}

// The CA key, a qcow2 whose backing file is the CA key, a symlink to it and
// a kernel option naming it: each leads into kiln's data directory and is
// refused before anything starts, with what to do instead.
#[tokio::test]
async fn paths_into_kiln_state_are_refused() {
    let bed = bed().await;
    let data = bed.data_dir();
    let key = text(&data.join("pki/ca.key"));
    let images = bed.image_dir();
    let backed = text(&images.join("backed.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", &key, "-F", "raw", &backed, "1M"]).await;
    let relative = text(&images.join("relative.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", "../data/pki/ca.key", "-F", "raw", &relative, "1M"]).await;
    let link = images.join("key.qcow2");
    tokio::fs::symlink(&key, &link).await.unwrap();
    let data_link = images.join("data");
    tokio::fs::symlink(&data, &data_link).await.unwrap();
    let manifest = images.join("manifest.json");
    let body = json!({"format": "raw", "disk": "disk.raw", "kernel": key});
    tokio::fs::write(&manifest, body.to_string()).await.unwrap();
    let disk = raw_disk(&images.join("disk.raw")).await;

    let cases = [
        ("ca-key", target(&key, &[]), "the base image"),
        ("backed", target(&backed, &[]), "the backing file"),
        ("relative", target(&relative, &[]), "the backing file"),
        ("symlink", target(&text(&link), &[]), "the base image"),
        ("via-data-link", target(&text(&data_link.join("pki/ca.key")), &[]), "the base image"),
        ("logs", target(&text(&data.join("logs")), &[]), "the base image"),
        ("kernel", target(&disk, &[("kernel", key.clone())]), "the kernel"),
        ("initrd", target(&disk, &[("initrd", key.clone())]), "the initrd"),
        ("manifest-kernel", target(&text(&manifest), &[]), "the kernel"),
    ];
    for (name, spec, what) in cases {
        let message = refused(&bed, name, spec).await;
        assert!(message.contains(what), "{name}: {message}");
        assert!(message.contains(&format!("leads into kiln's data directory {}", data.display())), "{name}: {message}");
        says_what_to_fix(&bed, &message);
    }
    nothing_started(&bed).await;
}

// A FIFO, given as a disk, as a manifest or as a directory's image.json, is
// refused at once (it would hang qemu-img); so is a link to a device, and a
// qcow2 whose backing file is a json: name or whose data file is outside.
#[tokio::test]
async fn what_is_not_a_plain_image_file_is_refused() {
    let bed = bed().await;
    let images = bed.image_dir();
    for fifo in ["fifo.qcow2", "fifo.json"] {
        nix::unistd::mkfifo(&images.join(fifo), nix::sys::stat::Mode::S_IRWXU).unwrap();
    }
    let holder = images.join("holder");
    tokio::fs::create_dir(&holder).await.unwrap();
    nix::unistd::mkfifo(&holder.join("image.json"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let null = images.join("null");
    tokio::fs::symlink("/dev/null", &null).await.unwrap();
    let json_backed = text(&images.join("json.qcow2"));
    let key = text(&bed.data_dir().join("pki/ca.key"));
    let name = format!(r#"json:{{"driver":"raw","file":{{"driver":"file","filename":"{key}"}}}}"#);
    qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", &name, "-F", "raw", &json_backed, "1M"]).await;
    let outside = bed.dir.path().join("outside.raw");
    let data_file = text(&images.join("data-file.qcow2"));
    let option = format!("data_file={}", text(&outside));
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &option, &data_file, "1M"]).await;

    let cases = [
        ("fifo-disk", text(&images.join("fifo.qcow2")), "is a FIFO, not a regular file"),
        ("fifo-manifest", text(&images.join("fifo.json")), "is a FIFO, not a regular file"),
        ("fifo-in-dir", text(&holder), "is a FIFO, not a regular file"),
        ("link-to-device", text(&null), "is outside the directories"),
        ("json-backing", json_backed, "is not a plain file path"),
        ("data-file", data_file, "the data file"),
    ];
    for (name, base, needle) in cases {
        let message = refused(&bed, name, target(&base, &[])).await;
        assert!(message.contains(needle), "{name}: {message}");
    }
    nothing_started(&bed).await;
}

// A path outside the allowed directories gets the same answer whether it
// exists or not, as a base image and as a kernel: the refusal reveals
// nothing about the host's files.
#[tokio::test]
async fn outside_paths_get_one_answer_whether_or_not_they_exist() {
    let bed = bed().await;
    let disk = raw_disk(&bed.image_dir().join("disk.raw")).await;
    let existing = raw_disk(&bed.dir.path().join("elsewhere.raw")).await;
    let paths =
        [existing, text(&bed.dir.path().join("nothing.raw")), "/etc/passwd".into(), "/no/such/dir/x.qcow2".into()];
    for option in [None, Some("kernel")] {
        let mut answers = Vec::new();
        for (i, path) in paths.iter().enumerate() {
            let spec = match option {
                None => target(path, &[]),
                Some(key) => target(&disk, &[(key, path.clone())]),
            };
            let message = refused(&bed, &format!("outside-{}-{i}", option.unwrap_or("base")), spec).await;
            says_what_to_fix(&bed, &message);
            answers.push(message.replace(path.as_str(), "PATH"));
        }
        assert!(answers.iter().all(|a| *a == answers[0]), "one answer: {answers:#?}");
        assert!(answers[0].contains("PATH is outside the directories kiln takes local images from"), "{}", answers[0]);
    }
    nothing_started(&bed).await;
}

/// The QEMU provider's preflight for `base` with the bed's configuration
/// changed by `adjust`.
async fn preflight(bed: &Bed, base: &str, adjust: impl FnOnce(&mut kiln_coordinator::Config)) -> Result<(), String> {
    let mut config = bed.app().config().clone();
    adjust(&mut config);
    let provider = kiln_coordinator::cli::builtin_providers(&config).unwrap().get(CloudKind::Qemu).unwrap();
    let cloud = Cloud {
        name: "local".parse().unwrap(),
        kind: CloudKind::Qemu,
        region: None,
        endpoint: None,
        options: BTreeMap::new(),
        credentials: None,
    };
    provider.preflight(&cloud, &target(base, &[])).await.map_err(|e| e.to_string())
}

// kiln's tiny image, an image laid out as a build's output in kiln's image
// store (what a next build starts from), a qcow2 chain inside an image
// directory and a symlink to the tiny image all pass preflight; the CA key
// stays refused even when the data directory itself is an image directory.
// (tests/all/qemu.rs builds from a real output image.)
#[tokio::test]
async fn allowed_images_pass_preflight() {
    let bed = bed().await;
    let tiny = kiln_tests::tiny_image();
    let tiny_dir = tiny.parent().unwrap();
    let out = bed.data_dir().join("images/kiln-made");
    tokio::fs::create_dir_all(&out).await.unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", &text(&out.join("disk.qcow2")), "1M"]).await;
    for file in ["vmlinuz", "initrd.img"] {
        tokio::fs::copy(tiny_dir.join(file), out.join(file)).await.unwrap();
    }
    let manifest = json!({"format": "qcow2", "disk": "disk.qcow2", "kernel": "vmlinuz", "initrd": "initrd.img"});
    tokio::fs::write(out.join("image.json"), manifest.to_string()).await.unwrap();
    let images = bed.image_dir();
    let base = raw_disk(&images.join("base.raw")).await;
    let top = text(&images.join("chain/top.qcow2"));
    tokio::fs::create_dir(images.join("chain")).await.unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", "../base.raw", "-F", "raw", &top, "1M"]).await;
    let link = images.join("tiny");
    tokio::fs::symlink(tiny_dir, &link).await.unwrap();

    let fine: [PathBuf; 5] = [tiny.clone(), tiny_dir.to_owned(), out.clone(), top.into(), link];
    for base in fine.iter().map(|p| text(p)).chain([base]) {
        let got = preflight(&bed, &base, |_| {}).await;
        assert!(got.is_ok(), "{base}: {got:?}");
    }
    let data = bed.data_dir();
    let key = text(&data.join("pki/ca.key"));
    let got = preflight(&bed, &key, |c| c.image_dirs.push(data.clone())).await.unwrap_err();
    assert!(got.contains("leads into kiln's data directory"), "{got}");
    let got = preflight(&bed, &text(&out), |c| c.image_dirs.push(data.clone())).await;
    assert!(got.is_ok(), "the image store stays allowed: {got:?}");
}
