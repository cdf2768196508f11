//! The crash bed: a real `kiln serve` child process on a data directory and
//! fixed ports (so a restart is the same coordinator to the VMs), and the
//! cloud it builds on (the local cloud, the EC2 bed: moto with the runner
//! that boots each instance as a VM, or the fake OpenStack, whose servers are
//! VMs too), with what that cloud still holds,
//! checked in the cloud itself. The crash matrix and the janitor's tests use it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_ec2::types::InstanceStateName;
use kiln_coordinator::cli::Client;
use kiln_protocol::api::Build;
use serde_json::json;

use crate::bed::follow_until;
use crate::ec2::{GUEST_HOST, Metadata, Moto, Runner, RunnerConfig, register_ami};
use crate::kiln_process::{KilnProcess, free_port, qemu_processes_in};
use crate::openstack::{DEFAULT_NETWORK, FakeConfig, FakeOpenStack};

/// How long a kiln process gets to start listening.
pub const START_LIMIT: Duration = Duration::from_secs(30);

/// The ports a coordinator listens on; kept across the restart so that a
/// VM's agent (which has them in its user-data) reaches the second one.
pub struct Ports {
    pub api: u16,
    pub agent: u16,
    pub bootstrap: u16,
}

impl Ports {
    pub fn free() -> Self {
        Self { api: free_port(), agent: free_port(), bootstrap: free_port() }
    }
}

pub fn tiny() -> String {
    crate::tiny_image().display().to_string()
}

/// `kiln serve` on `data`, the failpoints build with `env` when it is given.
pub async fn serve(data: &Path, ports: &Ports, env: Option<&[(&str, &str)]>) -> (KilnProcess, Client) {
    let listen = format!("127.0.0.1:{}", ports.api);
    let agent = format!("127.0.0.1:{}", ports.agent);
    let bootstrap = format!("127.0.0.1:{}", ports.bootstrap);
    let tiny_dir = crate::tiny_image().parent().unwrap().display().to_string();
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
        // The address the EC2 and OpenStack beds' VMs reach the coordinator at.
        "--server-name",
        GUEST_HOST,
    ];
    let (binary, env): (PathBuf, &[(&str, &str)]) = match env {
        Some(env) => (crate::failpoint_kiln_binary(), env),
        None => (crate::kiln_binary(), &[]),
    };
    let kiln = KilnProcess::spawn_with(&binary, args, data.parent().unwrap(), env);
    listening(kiln, data, &listen).await
}

/// Waits until a started `kiln serve` on `data` listens on `listen`, and
/// gives a client with the admin token it wrote.
pub async fn listening(mut kiln: KilnProcess, data: &Path, listen: &str) -> (KilnProcess, Client) {
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
pub fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// The cloud a crash test builds on, and what it checks the cloud for.
pub enum Bed {
    Local,
    Ec2(Ec2),
    Openstack(FakeOpenStack),
}

/// moto, with the runner booting its instances as VMs, and the tiny image's AMI.
pub struct Ec2 {
    pub moto: Moto,
    pub runner: Runner,
    pub ami: String,
    _dir: tempfile::TempDir,
}

pub const REGION: &str = "us-east-1";

impl Bed {
    pub async fn ec2() -> Self {
        let moto = Moto::start().await.expect("moto");
        let ami = register_ami(&moto.client(REGION), "kiln-tiny").await.expect("register AMI");
        let dir = tempfile::tempdir().unwrap();
        let runner = Runner::start(RunnerConfig {
            moto: moto.url.clone(),
            regions: vec![REGION.into()],
            images: HashMap::from([(ami.clone(), crate::tiny_image())]),
            work_dir: dir.path().join("runner"),
            metadata: Metadata::Imds,
            console_tail_lines: 40,
            identity: None,
        })
        .await
        .expect("runner");
        Self::Ec2(Ec2 { moto, runner, ami, _dir: dir })
    }

    pub async fn openstack() -> Self {
        let fake = FakeOpenStack::start(FakeConfig::default()).await.expect("fake OpenStack");
        fake.add_image("tiny", crate::tiny_image()).expect("tiny image");
        Self::Openstack(fake)
    }

    /// Adds the cloud and a generator running `script` on it, and starts a build.
    pub async fn build(&self, client: &Client, script: &str) -> Build {
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
    pub async fn leftovers(&self, data: &Path, recorded: Option<&str>) -> Vec<String> {
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
pub async fn finished(client: &Client, build: &Build) -> (Build, Vec<u8>) {
    let log = follow_until(client, build.targets[0].id, |_| false).await;
    (client.get(&format!("/v1/builds/{}", build.id)).await.unwrap(), log)
}
