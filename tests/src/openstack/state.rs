//! The fake cloud's state: users, tokens, servers, images, faults and counters, behind one mutex.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use jiff::Timestamp;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{FakeConfig, Op};
use crate::ec2::vm::BaseDisk;

pub(super) struct Shared {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Servers' directories (`servers/<id>/`) and createImage files (`images/<id>.qcow2`).
    pub work: PathBuf,
    pub config: FakeConfig,
    pub state: Mutex<State>,
    /// Bumped whenever a server or image changes state.
    pub changed: watch::Sender<u64>,
    /// Cancelled when the fake is dropped.
    pub stop: CancellationToken,
}

impl Shared {
    pub fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

pub(super) struct User {
    pub id: String,
    pub name: String,
    pub domain: String,
    pub password: String,
}

pub(super) struct Project {
    pub id: String,
    pub name: String,
    pub domain: String,
}

pub(super) struct Token {
    pub user: usize,
    /// Index into [`State::projects`]; `None` for an unscoped token.
    pub project: Option<usize>,
    pub expires: Timestamp,
}

pub(super) struct State {
    pub users: Vec<User>,
    pub projects: Vec<Project>,
    /// Every token issued, by its id.
    pub tokens: HashMap<String, Token>,
    pub servers: HashMap<String, Server>,
    pub images: HashMap<String, Image>,
    /// (status, body) answers waiting for the next calls of an operation.
    pub faults: HashMap<Op, VecDeque<(u16, serde_json::Value)>>,
    pub calls: BTreeMap<String, usize>,
    /// Each API request as text: request line, headers, body (and decoded user_data).
    pub requests: Vec<String>,
}

impl State {
    pub fn new(config: &FakeConfig) -> Self {
        let users = config
            .users
            .iter()
            .map(|(name, domain, password)| User {
                id: hex_id(),
                name: name.clone(),
                domain: domain.clone(),
                password: password.clone(),
            })
            .collect();
        let projects = config
            .projects
            .iter()
            .map(|(name, domain)| Project { id: hex_id(), name: name.clone(), domain: domain.clone() })
            .collect();
        Self {
            users,
            projects,
            tokens: HashMap::new(),
            servers: HashMap::new(),
            images: HashMap::new(),
            faults: HashMap::new(),
            calls: BTreeMap::new(),
            requests: Vec::new(),
        }
    }
}

/// Where a server's VM is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Power {
    /// Its disk is being prepared, or QEMU is starting.
    Building,
    Running,
    /// os-stop asked QEMU to end; it has not yet.
    Stopping,
    Off,
    /// Booting failed, or QEMU exited with an error: the fault message.
    Error(String),
}

/// A VM task's handle: cancelled to stop (or, for a deleted server, kill) the VM.
pub(super) struct VmHandle {
    pub cancel: CancellationToken,
    /// QEMU's pid (and process group), once spawned.
    pub pid: Option<u32>,
}

pub(super) struct Server {
    pub id: String,
    pub name: String,
    pub image_id: String,
    pub flavor_id: String,
    /// Index into [`State::projects`].
    pub project: usize,
    pub tenant_id: String,
    pub user_id: String,
    pub metadata: BTreeMap<String, String>,
    /// Decoded.
    pub user_data: Option<Vec<u8>>,
    pub security_groups: Vec<String>,
    /// (uuid, name) of the networks it is attached to.
    pub networks: Vec<(String, String)>,
    pub created: Timestamp,
    pub updated: Timestamp,
    pub launched: Option<Timestamp>,
    /// `GET /servers/{id}` answered so far.
    pub gets: usize,
    pub power: Power,
    pub task: Option<&'static str>,
    pub deleted: bool,
    /// `work/servers/<id>/`: overlay, console.log, qemu.log.
    pub dir: PathBuf,
    /// Its own disk (the overlay on its image), once made.
    pub disk: Option<BaseDisk>,
    pub vm: Option<VmHandle>,
    /// What its metadata service answered.
    pub metadata_log: Arc<Mutex<Vec<String>>>,
}

/// What Nova shows of a server's state.
pub(super) struct Shown {
    pub status: &'static str,
    pub vm_state: &'static str,
    /// 0 no state, 1 running, 4 shutdown.
    pub power_state: u8,
}

impl Server {
    /// Its real state.
    pub fn status(&self) -> Shown {
        self.shown(false)
    }

    /// What `GET /servers/{id}` shows: the first `build_gets` answers say BUILD whatever the VM does.
    pub fn shown_to_get(&self, config: &FakeConfig) -> Shown {
        self.shown(self.gets < config.build_gets)
    }

    fn shown(&self, pending: bool) -> Shown {
        let (status, vm_state, power_state) = match &self.power {
            Power::Error(_) => ("ERROR", "error", 0),
            Power::Building => ("BUILD", "building", 0),
            _ if pending => ("BUILD", "building", 0),
            Power::Running | Power::Stopping => ("ACTIVE", "active", 1),
            Power::Off => ("SHUTOFF", "stopped", 4),
        };
        Shown { status, vm_state, power_state }
    }
}

/// What an image's bits are.
#[derive(Clone, Debug)]
pub(super) enum Backing {
    /// Not uploaded yet (queued, saving) or never (killed).
    None,
    /// A registered base image: a kiln image manifest's disk, not ours to delete.
    Base(BaseDisk),
    /// A createImage qcow2 in the work dir, with the kernel, initrd and append of its lineage.
    Snapshot(BaseDisk),
}

pub(super) struct Image {
    pub id: String,
    pub name: String,
    /// queued, saving, active or killed.
    pub status: &'static str,
    pub visibility: &'static str,
    /// Project id; empty for the base images the test registers.
    pub owner: String,
    pub disk_format: String,
    pub properties: BTreeMap<String, String>,
    pub size: Option<u64>,
    pub virtual_size: Option<u64>,
    pub checksum: Option<String>,
    pub sha512: Option<String>,
    pub created: Timestamp,
    pub updated: Timestamp,
    pub deleted: bool,
    pub backing: Backing,
}

impl Image {
    pub fn new(id: &str, name: &str, disk_format: &str, visibility: &'static str, owner: &str) -> Self {
        let now = Timestamp::now();
        Self {
            id: id.into(),
            name: name.into(),
            status: "queued",
            visibility,
            owner: owner.into(),
            disk_format: disk_format.into(),
            properties: BTreeMap::new(),
            size: None,
            virtual_size: None,
            checksum: None,
            sha512: None,
            created: now,
            updated: now,
            deleted: false,
            backing: Backing::None,
        }
    }
}

/// A random UUID (version 4), as Nova and Glance name things.
pub(super) fn uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// 32 hex digits, as Keystone names users, projects and endpoints.
pub(super) fn hex_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// `2024-05-01T12:00:00Z`, as Nova and Glance write times.
pub(super) fn seconds(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// `2024-05-01T12:00:00.000000Z`, as Keystone writes times.
pub(super) fn micros(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%S.%6fZ").to_string()
}
