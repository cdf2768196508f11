//! A fake OpenStack cloud whose servers are real QEMU VMs.
//!
//! [`FakeOpenStack`] serves, on one loopback port, the slice of Keystone v3,
//! Nova v2.1 and Glance v2 that kiln's provider uses, following the API
//! reference (status codes, error bodies, microversions, image states):
//!
//! - `/identity/v3`: password authentication, project-scoped tokens with a catalog;
//! - `/compute/v2.1`: servers (create, show, list, delete, stop, start, console
//!   output, createImage) and flavors;
//! - `/image/v2`: images (show, list, update, delete).
//!
//! Every created server boots as a QEMU (TCG) VM from its Glance image, with a
//! per-server OpenStack metadata service at 169.254.169.254 (EC2 paths answer
//! 404, so kiln's boot hook falls through to `/openstack/latest/user_data`).
//! createImage turns the stopped server's disk into a standalone qcow2 that
//! later servers boot from. Tests inject faults per operation and inspect
//! servers, images, calls and where request bytes went.

mod actions;
mod api;
mod glance;
mod keystone;
mod metadata;
mod nova;
mod state;
mod vm;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ec2::http;
use state::{Backing, Image, Shared, State};

/// How often [`FakeOpenStack::wait_until`] checks its condition when nothing changed.
const RECHECK: Duration = Duration::from_millis(200);

/// The network every default configuration knows, as `networks: [{"uuid": DEFAULT_NETWORK}]` wants it.
pub const DEFAULT_NETWORK: &str = "4d0f3c5e-8a51-4b7e-9c36-2f1d7a9e6b10";

/// One Nova flavor.
#[derive(Clone, Debug)]
pub struct Flavor {
    pub id: String,
    pub name: String,
    pub vcpus: u32,
    pub ram_mb: u32,
    pub disk_gb: u32,
}

impl Flavor {
    pub fn new(id: &str, name: &str, vcpus: u32, ram_mb: u32, disk_gb: u32) -> Self {
        Self { id: id.into(), name: name.into(), vcpus, ram_mb, disk_gb }
    }
}

/// What the fake cloud knows and how it behaves.
#[derive(Clone, Debug)]
pub struct FakeConfig {
    /// (user name, user domain name, password); every user is a member of every project.
    pub users: Vec<(String, String, String)>,
    /// (project name, project domain name).
    pub projects: Vec<(String, String)>,
    /// The one region of every catalog endpoint.
    pub region: String,
    /// How long a token lives.
    pub token_ttl: Duration,
    /// `Some("image")`, `Some("compute")` or `Some("identity")`: that service is left out of the catalog.
    pub omit_service: Option<&'static str>,
    pub flavors: Vec<Flavor>,
    /// (uuid, name) of the networks servers may be attached to.
    pub networks: Vec<(String, String)>,
    /// Instances quota of every project (servers not deleted).
    pub max_servers: usize,
    /// How many `GET /servers/{id}` answer `BUILD` before the server shows its VM's state.
    pub build_gets: usize,
    /// How long a createImage image stays `saving` (at least; converting may take longer).
    pub image_saving: Duration,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            users: vec![("kiln".into(), "Default".into(), "kiln-secret".into())],
            projects: vec![("kiln".into(), "Default".into())],
            region: "RegionOne".into(),
            token_ttl: Duration::from_secs(3600),
            omit_service: None,
            flavors: vec![Flavor::new("1", "m1.tiny", 1, 512, 1), Flavor::new("2", "m1.small", 1, 2048, 20)],
            networks: vec![(DEFAULT_NETWORK.into(), "private".into())],
            max_servers: 10,
            build_gets: 2,
            image_saving: Duration::from_secs(1),
        }
    }
}

/// An API operation, for [`FakeOpenStack::fail_next`] and [`FakeOpenStack::calls`] (keyed by its `Debug` name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// `POST /identity/v3/auth/tokens`
    Auth,
    /// `POST /compute/v2.1/servers`
    CreateServer,
    /// `GET /compute/v2.1/servers/{id}`
    GetServer,
    /// `GET /compute/v2.1/servers` and `/servers/detail`
    ListServers,
    /// `DELETE /compute/v2.1/servers/{id}`
    DeleteServer,
    /// action `os-stop`
    StopServer,
    /// action `os-start`
    StartServer,
    /// action `createImage`
    CreateImage,
    /// action `os-getConsoleOutput`
    ConsoleOutput,
    /// `GET /compute/v2.1/flavors`, `/flavors/detail`
    ListFlavors,
    /// `GET /compute/v2.1/flavors/{id}`
    GetFlavor,
    /// `GET /image/v2/images/{id}`
    GetImage,
    /// `GET /image/v2/images`
    ListImages,
    /// `PATCH /image/v2/images/{id}`
    UpdateImage,
    /// `DELETE /image/v2/images/{id}`
    DeleteImage,
}

/// A server as the fake sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerView {
    pub id: String,
    pub name: String,
    /// Nova's status from the VM's real state: BUILD, ACTIVE, SHUTOFF or ERROR (DELETED once
    /// deleted); `GET /servers/{id}` says BUILD for its first `build_gets` answers.
    pub status: String,
    pub image_id: String,
    pub metadata: BTreeMap<String, String>,
    pub deleted: bool,
}

/// An image as the fake sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageView {
    pub id: String,
    pub name: String,
    /// Glance's status: queued, saving, active, killed (deleted once deleted).
    pub status: String,
    pub properties: BTreeMap<String, String>,
    /// The qcow2 file createImage made, while it exists.
    pub file: Option<PathBuf>,
    pub deleted: bool,
}

/// A running fake cloud; dropped, it stops serving and kills every VM.
#[must_use = "dropping the fake cloud stops it"]
pub struct FakeOpenStack {
    shared: Arc<Shared>,
    _work: tempfile::TempDir,
}

impl FakeOpenStack {
    /// Serves a fresh cloud on a random loopback port.
    pub async fn start(config: FakeConfig) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let work = tempfile::Builder::new().prefix("kiln-fake-openstack-").tempdir()?;
        let shared = Arc::new(Shared {
            base,
            work: work.path().to_owned(),
            state: Mutex::new(State::new(&config)),
            config,
            changed: watch::Sender::new(0),
            stop: CancellationToken::new(),
        });
        let s = shared.clone();
        http::serve(listener, shared.stop.clone(), move |req| {
            let s = s.clone();
            async move { api::handle(&s, req) }
        });
        Ok(Self { shared, _work: work })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.shared.base.clone()
    }

    /// Keystone's v3 URL: `http://127.0.0.1:PORT/identity/v3`.
    pub fn auth_url(&self) -> String {
        format!("{}/identity/v3", self.shared.base)
    }

    /// Registers an active public image, `id_or_name` as both its id and name, backed by a
    /// kiln image manifest (`image.json`: kernel, initrd, append and disk). Returns its id.
    pub fn add_image(&self, id_or_name: &str, manifest: PathBuf) -> anyhow::Result<String> {
        let base = crate::ec2::vm::BaseDisk::from_manifest(&manifest)?;
        let size = std::fs::metadata(&base.disk)?.len();
        let checksum = sum_sync("md5sum", &base.disk)?;
        let sha512 = sum_sync("sha512sum", &base.disk)?;
        let mut state = self.shared.state.lock().unwrap();
        if state.images.get(id_or_name).is_some_and(|i| !i.deleted) {
            bail!("image {id_or_name} exists");
        }
        let mut image = Image::new(id_or_name, id_or_name, &base.format, "public", "");
        image.status = "active";
        image.size = Some(size);
        image.checksum = Some(checksum);
        image.sha512 = Some(sha512);
        image.backing = Backing::Base(base);
        state.images.insert(id_or_name.to_owned(), image);
        Ok(id_or_name.to_owned())
    }

    /// The next `times` calls of `op` answer `status` with `body` (JSON) instead of doing anything.
    pub fn fail_next(&self, op: Op, times: usize, status: u16, body: serde_json::Value) {
        let mut state = self.shared.state.lock().unwrap();
        state.faults.entry(op).or_default().extend(std::iter::repeat_n((status, body), times));
    }

    /// Makes every token issued so far expire now.
    pub fn expire_tokens(&self) {
        let now = jiff::Timestamp::now();
        for token in self.shared.state.lock().unwrap().tokens.values_mut() {
            token.expires = token.expires.min(now);
        }
    }

    pub fn servers(&self) -> Vec<ServerView> {
        let state = self.shared.state.lock().unwrap();
        let mut servers: Vec<_> = state.servers.values().collect();
        servers.sort_by_key(|s| s.created);
        servers
            .into_iter()
            .map(|s| ServerView {
                id: s.id.clone(),
                name: s.name.clone(),
                status: if s.deleted { "DELETED".into() } else { s.status().status.into() },
                image_id: s.image_id.clone(),
                metadata: s.metadata.clone(),
                deleted: s.deleted,
            })
            .collect()
    }

    pub fn images(&self) -> Vec<ImageView> {
        let state = self.shared.state.lock().unwrap();
        let mut images: Vec<_> = state.images.values().collect();
        images.sort_by_key(|i| i.created);
        images
            .into_iter()
            .map(|i| ImageView {
                id: i.id.clone(),
                name: i.name.clone(),
                status: if i.deleted { "deleted".into() } else { i.status.into() },
                properties: i.properties.clone(),
                file: match &i.backing {
                    Backing::Snapshot(disk) if !i.deleted => Some(disk.disk.clone()),
                    _ => None,
                },
                deleted: i.deleted,
            })
            .collect()
    }

    /// Calls per operation (`Debug` name of [`Op`]), faulted ones included.
    pub fn calls(&self) -> BTreeMap<String, usize> {
        self.shared.state.lock().unwrap().calls.clone()
    }

    /// Tokens Keystone has issued.
    pub fn tokens_issued(&self) -> usize {
        self.shared.state.lock().unwrap().tokens.len()
    }

    /// The server's serial console so far (`None` before its VM started or once it is deleted).
    pub fn console(&self, server_id: &str) -> Option<String> {
        let dir = self.shared.state.lock().unwrap().servers.get(server_id)?.dir.clone();
        let bytes = std::fs::read(dir.join("console.log")).ok()?;
        Some(String::from_utf8_lossy(&bytes).replace('\r', ""))
    }

    /// What the server's metadata service answered, as `"<METHOD> <path> <status>"`.
    pub fn metadata_requests(&self, server_id: &str) -> Vec<String> {
        let state = self.shared.state.lock().unwrap();
        state.servers.get(server_id).map(|s| s.metadata_log.lock().unwrap().clone()).unwrap_or_default()
    }

    /// VMs being prepared, booting, running or stopping.
    pub fn live_vms(&self) -> usize {
        self.shared.state.lock().unwrap().servers.values().filter(|s| s.vm.is_some()).count()
    }

    /// API requests whose request line, headers or body (with a CreateServer's user_data decoded)
    /// contained `needle`.
    pub fn requests_with_body_containing(&self, needle: &str) -> usize {
        let state = self.shared.state.lock().unwrap();
        state.requests.iter().filter(|r| r.contains(needle)).count()
    }

    /// Waits until `cond` holds, checking it whenever a server or image changes state, and every
    /// 200 ms (for what changes no state, like a console).
    pub async fn wait_until(&self, within: Duration, what: &str, cond: impl Fn(&Self) -> bool) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        let mut changed = self.shared.changed.subscribe();
        loop {
            changed.borrow_and_update();
            if cond(self) {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                bail!("not within {within:?}: {what} (live VMs: {})", self.live_vms());
            }
            let _ = tokio::time::timeout_at(deadline.min(now + RECHECK), changed.changed()).await;
        }
    }

    /// Waits until no VM is live.
    pub async fn wait_no_vms(&self, within: Duration) -> anyhow::Result<()> {
        self.wait_until(within, "no VM is live", |c| c.live_vms() == 0).await
    }
}

impl Drop for FakeOpenStack {
    fn drop(&mut self) {
        self.shared.stop.cancel();
        // Kill now rather than when the VM tasks next run: the runtime may be going away.
        for server in self.shared.state.lock().unwrap().servers.values() {
            if let Some(pid) = server.vm.as_ref().and_then(|vm| vm.pid) {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }
}

/// The hex digest `tool` (md5sum, sha512sum) prints for `file`.
fn sum_sync(tool: &str, file: &std::path::Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(tool).arg(file).output()?;
    if !out.status.success() {
        bail!("{tool} {}: {}", file.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned())
}
