//! kiln's test bed: everything the integration tests need that is not kiln.
//!
//! - [`process`]: a provider that "boots" an instance by running the real
//!   user-data, and so the real static agent, as a local process.
//! - [`bed`]: an in-process coordinator on loopback ports, restartable on
//!   the same data directory, with a client and helpers.
//! - [`browser`]: a headless Chromium over WebDriver, for the web page's tests.
//! - [`proxy`]: a TCP proxy that can cut every connection through it.
//! - [`kiln_process`]: `kiln serve` and one-shot builds as real processes.
//! - [`crash_bed`]: `kiln serve` killed and restarted on one data directory,
//!   on the local cloud or the EC2 bed, and what the cloud still holds.
//! - [`disk`]: an image's raw bytes, searched for secrets.
//! - [`smallfs`]: a small tmpfs of a test's own, for a data directory that fills up.
//! - [`agent_binary`]: where the static agent binary is.

pub mod bed;
pub mod browser;
pub mod crash_bed;
pub mod disk;
pub mod ec2;
pub mod kiln_process;
pub mod openstack;
pub mod process;
pub mod proxy;
pub mod smallfs;

use std::path::PathBuf;

/// The static `kiln-agent` the tests serve to instances. `scripts/test` builds
/// it; `KILN_AGENT_BINARY` overrides the path.
pub fn agent_binary() -> PathBuf {
    if let Ok(p) = std::env::var("KILN_AGENT_BINARY") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join("target/x86_64-unknown-linux-gnu/test-agent/kiln-agent");
    assert!(
        path.exists(),
        "the static agent is missing at {}: run the tests with `scripts/test`, which builds it first",
        path.display()
    );
    path
}

/// The `kiln` executable: QEMU runs it as the relay for guest connections,
/// and the process tests run it as `kiln serve` and one-shot `kiln build
/// start`. `scripts/test` builds it; `KILN_BINARY` overrides the path.
pub fn kiln_binary() -> PathBuf {
    if let Ok(p) = std::env::var("KILN_BINARY") {
        return PathBuf::from(p);
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/kiln");
    assert!(
        path.exists(),
        "kiln is missing at {}: run the tests with `scripts/test`, which builds it first",
        path.display()
    );
    std::path::absolute(path).expect("absolute path")
}

/// `kiln` built with the `failpoints` feature (scripts/test builds it as
/// target/debug/kiln-failpoints); `KILN_FAILPOINT_BINARY` overrides the path.
pub fn failpoint_kiln_binary() -> PathBuf {
    if let Ok(p) = std::env::var("KILN_FAILPOINT_BINARY") {
        return PathBuf::from(p);
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/kiln-failpoints");
    assert!(
        path.exists(),
        "kiln-failpoints is missing at {}: run the tests with `scripts/test`, which builds it first",
        path.display()
    );
    std::path::absolute(path).expect("absolute path")
}

/// kiln's tiny base image (its `image.json`), built once per test run by the
/// recipe in bootstrap/image and cached under target/kiln-cache by the hash of
/// its inputs. `KILN_TINY_IMAGE` overrides the path.
pub fn tiny_image() -> PathBuf {
    static IMAGE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| cached_image("KILN_TINY_IMAGE", "bootstrap/image/build-tiny-image.sh")).clone()
}

/// A stock Debian 12 cloud image (its `disk.qcow2`: GPT, grub-pc, cloud-init
/// with Debian's datasource list; it boots by itself under SeaBIOS), built once
/// by tests/images/build-debian-cloud.sh (as root, about 75 s on a quiet
/// machine) and cached under target/kiln-cache by the hash of its inputs.
/// `KILN_DEBIAN_IMAGE` overrides the path.
pub fn debian_cloud_image() -> PathBuf {
    static IMAGE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| cached_image("KILN_DEBIAN_IMAGE", "tests/images/build-debian-cloud.sh")).clone()
}

/// `$override_var`, or what the image recipe `recipe` (relative to the
/// workspace) prints last after building into target/kiln-cache.
fn cached_image(override_var: &str, recipe: &str) -> PathBuf {
    if let Ok(p) = std::env::var(override_var) {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("bash")
        .arg(root.join(recipe))
        .arg(root.join("target/kiln-cache"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {recipe}: {e}"));
    assert!(out.status.success(), "{recipe} failed (is scripts/install-deps done? it needs root)");
    let stdout = String::from_utf8(out.stdout).expect("utf-8 path");
    PathBuf::from(stdout.lines().last().expect("the recipe prints the image's path").trim())
}

/// Logs of the code under test, shown for failing tests (`KILN_LOG` filters).
/// Everything logged is also kept in memory, so a test can search the logs
/// (for a secret that must never appear in them).
pub fn init_tracing() {
    use tracing_subscriber::fmt::writer::MakeWriterExt;
    let filter = std::env::var("KILN_LOG").unwrap_or_else(|_| "info,kiln_coordinator=debug".into());
    let writer = tracing_subscriber::fmt::TestWriter::new().and(|| CapturedLogs);
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_writer(writer).try_init();
}

static LOGS: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// The bytes every test of this process has logged so far.
pub fn captured_logs() -> Vec<u8> {
    LOGS.lock().unwrap().clone()
}

struct CapturedLogs;

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
