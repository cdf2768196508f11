//! Makes moto's instances real: every instance moto reports `running` boots as
//! a QEMU VM whose metadata service serves that instance's user-data.
//!
//! In step with moto: a VM that powers off makes the instance `stopped`
//! (StopInstances); an instance that moto reports stopping, stopped,
//! shutting-down or terminated (or no longer reports) has its VM killed. An
//! AMI made by CreateImage from an instance boots from that instance's disk.
//! An instance started again after it stopped is not booted again.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::InstanceAttributeName;
use base64::Engine;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::imds::{Imds, ImdsStats, SignedIdentity};
use super::vm::{self, BaseDisk};

/// How often moto is asked for its instances.
const POLL: Duration = Duration::from_millis(200);
/// The longest one moto call may take.
const CALL_LIMIT: Duration = Duration::from_secs(10);

/// Where a VM finds its user-data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metadata {
    /// EC2's metadata service, IMDSv2 only.
    Imds,
    /// Nimbus: `/var/nimbus-metadata-server-url` on the disk names a tokenless server.
    Nimbus,
}

#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// moto's URL (not a fault proxy's: the runner must see the truth).
    pub moto: String,
    pub regions: Vec<String>,
    /// AMI id → the `image.json` manifest of a local disk image.
    pub images: HashMap<String, PathBuf>,
    /// Each instance gets `work_dir/<instance-id>/` (disk, console.log, qemu.log).
    pub work_dir: PathBuf,
    pub metadata: Metadata,
    /// When a VM ends, this many of its last console lines go to the log.
    pub console_tail_lines: usize,
    /// Signs each instance's identity document for IMDS to serve; without
    /// it IMDS has none (404).
    pub identity: Option<Arc<super::IdentitySigner>>,
}

/// Looks up an instance's serial console text.
pub type Consoles = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// A running runner; dropped, it stops watching and kills every VM.
pub struct Runner {
    shared: Arc<Shared>,
    stop: CancellationToken,
}

struct Shared {
    config: RunnerConfig,
    /// AMI id → manifest: the configured images plus those added later.
    images: Mutex<HashMap<String, PathBuf>>,
    clients: HashMap<String, Client>,
    state: Mutex<State>,
    /// Bumped on every change a test may wait for (VMs starting and ending, problems).
    changed: watch::Sender<u64>,
}

impl Shared {
    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

#[derive(Default)]
struct State {
    /// Instances the runner has taken on (booted or failed).
    seen: HashSet<String>,
    /// VMs booting or running.
    live: HashMap<String, Live>,
    /// Instances whose QEMU started, in order.
    booted: Vec<String>,
    vms: HashMap<String, Vm>,
    problems: Vec<String>,
}

struct Live {
    region: String,
    cancel: CancellationToken,
    /// QEMU's pid (and process group), once started.
    pid: Option<u32>,
}

/// What stays known of a VM, running or ended.
struct Vm {
    dir: PathBuf,
    /// The instance's own disk, as a base for AMIs made from it.
    disk: BaseDisk,
    started: Instant,
    imds: Arc<Imds>,
}

enum End {
    /// QEMU exited by itself (the guest powered off, or QEMU failed).
    Exited(std::process::ExitStatus),
    /// Killed because moto says the instance is no longer running (or the runner stopped).
    Killed,
}

impl Runner {
    pub async fn start(config: RunnerConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.work_dir)?;
        let clients = config.regions.iter().map(|r| (r.clone(), super::client(&config.moto, r))).collect();
        let changed = watch::Sender::new(0);
        let images = Mutex::new(config.images.clone());
        let shared = Arc::new(Shared { config, images, clients, state: Mutex::new(State::default()), changed });
        let stop = CancellationToken::new();
        let (s, st) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(POLL);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = async { interval.tick().await; tick(&s, &st).await } => {}
                    () = st.cancelled() => return,
                }
            }
        });
        Ok(Self { shared, stop })
    }

    /// Maps one more AMI (e.g. one made by CopyImage, which the runner cannot trace) to a manifest.
    pub fn add_image(&self, ami: &str, manifest: PathBuf) {
        self.shared.images.lock().unwrap().insert(ami.to_owned(), manifest);
    }

    /// The instance's serial console so far.
    pub fn console(&self, instance_id: &str) -> Option<String> {
        console(&self.shared, instance_id)
    }

    /// A handle on every instance's console, for [`super::FaultProxy::serve_consoles`].
    pub fn consoles(&self) -> Consoles {
        let shared = self.shared.clone();
        Arc::new(move |id: &str| console(&shared, id))
    }

    /// VMs booting or running now.
    pub fn live_vms(&self) -> usize {
        self.shared.state.lock().unwrap().live.len()
    }

    /// Waits until no VM is booting or running.
    pub async fn wait_no_vms(&self, within: Duration) -> anyhow::Result<()> {
        self.wait_until(within, "no VM is live", |r| r.live_vms() == 0).await
    }

    /// Waits until `cond` holds, checking it whenever a VM starts or ends or a problem is noted.
    pub async fn wait_until(&self, within: Duration, what: &str, cond: impl Fn(&Self) -> bool) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        let mut changed = self.shared.changed.subscribe();
        loop {
            changed.borrow_and_update();
            if cond(self) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
                bail!("not within {within:?}: {what} (live VMs: {}, problems: {:?})", self.live_vms(), self.problems());
            }
        }
    }

    /// Instance ids whose QEMU was started, in order.
    pub fn booted(&self) -> Vec<String> {
        self.shared.state.lock().unwrap().booted.clone()
    }

    /// What the instance's metadata service was asked, and when it first served user-data.
    pub fn imds(&self, instance_id: &str) -> Option<ImdsStats> {
        Some(self.shared.state.lock().unwrap().vms.get(instance_id)?.imds.stats())
    }

    /// Time from QEMU's start to the guest fetching its user-data.
    pub fn user_data_after(&self, instance_id: &str) -> Option<Duration> {
        let state = self.shared.state.lock().unwrap();
        let vm = state.vms.get(instance_id)?;
        Some(vm.imds.stats().user_data_served?.duration_since(vm.started))
    }

    /// What went wrong on the runner's side (unknown AMI, bad user-data, QEMU failures).
    pub fn problems(&self) -> Vec<String> {
        self.shared.state.lock().unwrap().problems.clone()
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.stop.cancel();
        // Kill now rather than when the VM tasks next run: the runtime may be going away.
        for live in self.shared.state.lock().unwrap().live.values() {
            if let Some(pid) = live.pid {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }
}

/// One look at moto: boots new running instances, kills VMs whose instance went away.
async fn tick(shared: &Arc<Shared>, stop: &CancellationToken) {
    let described = futures::future::join_all(shared.clients.iter().map(|(region, client)| async move {
        (region.clone(), describe(client).await.map_err(|e| tracing::warn!(region, "DescribeInstances: {e:#}")))
    }))
    .await;
    let answered: HashSet<String> = described.iter().filter(|(_, r)| r.is_ok()).map(|(r, _)| r.clone()).collect();
    let instances: HashMap<String, (String, String, String)> = described
        .into_iter()
        .filter_map(|(region, r)| r.ok().map(|list| (region, list)))
        .flat_map(|(region, list)| list.into_iter().map(move |(id, st, ami)| (id, (region.clone(), st, ami))))
        .collect();

    let mut state = shared.state.lock().unwrap();
    for (id, live) in &state.live {
        let gone = match instances.get(id) {
            Some((_, st, _)) => !matches!(st.as_str(), "pending" | "running"),
            None => answered.contains(&live.region),
        };
        if gone && !live.cancel.is_cancelled() {
            tracing::info!(instance = %id, state = ?instances.get(id).map(|i| &i.1), "instance left running: killing its VM");
            live.cancel.cancel();
        }
    }
    for (id, (region, st, ami)) in instances {
        if st != "running" || !state.seen.insert(id.clone()) {
            continue;
        }
        let cancel = stop.child_token();
        state.live.insert(id.clone(), Live { region: region.clone(), cancel: cancel.clone(), pid: None });
        shared.bump();
        tokio::spawn(vm_task(shared.clone(), id, region, ami, cancel));
    }
}

/// (instance id, state name, image id) of every instance in the region.
async fn describe(client: &Client) -> anyhow::Result<Vec<(String, String, String)>> {
    let mut out = Vec::new();
    let mut token = None;
    for _ in 0..50 {
        let page = tokio::time::timeout(CALL_LIMIT, client.describe_instances().set_next_token(token).send())
            .await
            .context("timed out")??;
        for i in page.reservations().iter().flat_map(|r| r.instances()) {
            let st = i.state().and_then(|s| s.name()).map(|n| n.as_str().to_owned()).unwrap_or_default();
            out.push((i.instance_id().unwrap_or("").to_owned(), st, i.image_id().unwrap_or("").to_owned()));
        }
        token = page.next_token;
        if token.is_none() {
            return Ok(out);
        }
    }
    bail!("more than 50 pages of instances")
}

async fn vm_task(shared: Arc<Shared>, id: String, region: String, ami: String, cancel: CancellationToken) {
    let client = shared.clients[&region].clone();
    let end = vm_life(&shared, &id, &region, &client, &ami, &cancel).await;
    {
        let mut state = shared.state.lock().unwrap();
        state.live.remove(&id);
        shared.bump();
        if let Some(vm) = state.vms.get(&id) {
            vm.imds.stop();
        }
    }
    let tail = |shared: &Shared| console_tail(shared, &id);
    match end {
        Ok(End::Killed) => tracing::info!(instance = %id, "VM killed{}", tail(&shared)),
        Ok(End::Exited(status)) => {
            if !status.success() {
                let log = shared.state.lock().unwrap().vms.get(&id).map(|vm| vm.dir.join("qemu.log"));
                let qemu = log.and_then(|l| std::fs::read_to_string(l).ok()).unwrap_or_default();
                problem(&shared, format!("{id}: QEMU exited with {status}: {}", qemu.trim()));
            }
            tracing::info!(instance = %id, %status, "VM powered off{}", tail(&shared));
            stop_if_running(&shared, &client, &id).await;
        }
        Err(e) => {
            problem(&shared, format!("{id}: cannot boot: {e:#}"));
            stop_if_running(&shared, &client, &id).await;
        }
    }
}

/// Boots the instance and waits until its VM ends.
async fn vm_life(
    shared: &Shared,
    id: &str,
    region: &str,
    client: &Client,
    ami: &str,
    cancel: &CancellationToken,
) -> anyhow::Result<End> {
    let prepared = tokio::select! {
        r = prepare(shared, id, region, client, ami) => r?,
        () = cancel.cancelled() => return Ok(End::Killed),
    };
    let (disk, dir, imds, ports) = prepared;
    let mut child = vm::qemu(&disk, &dir, imds.addr.port(), &ports)?.spawn().context("spawn qemu-system-x86_64")?;
    {
        let mut state = shared.state.lock().unwrap();
        state.booted.push(id.to_owned());
        state.vms.insert(id.to_owned(), Vm { dir, disk, started: Instant::now(), imds });
        if let Some(live) = state.live.get_mut(id) {
            live.pid = child.id();
        }
        shared.bump();
    }
    tracing::info!(instance = %id, ami, "VM started");
    tokio::select! {
        status = child.wait() => Ok(End::Exited(status?)),
        () = cancel.cancelled() => {
            if let Some(pid) = child.id() {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            let _ = tokio::time::timeout(CALL_LIMIT, child.wait()).await;
            Ok(End::Killed)
        }
    }
}

/// The instance's user-data, base disk, own disk, metadata service and the
/// coordinator ports its network forwards.
async fn prepare(
    shared: &Shared,
    id: &str,
    region: &str,
    client: &Client,
    ami: &str,
) -> anyhow::Result<(BaseDisk, PathBuf, Arc<Imds>, Vec<u16>)> {
    let user_data = user_data(client, id).await?;
    let ports = vm::coordinator_ports(&user_data);
    let base = base_disk(shared, client, ami).await?;
    let dir = shared.config.work_dir.join(id);
    std::fs::create_dir_all(&dir)?;
    let nimbus = shared.config.metadata == Metadata::Nimbus;
    let disk = vm::prepare_disk(&base, &dir, nimbus).await?;
    let identity = shared.config.identity.as_ref().map(|signer| {
        let document = super::IdentitySigner::document(id, region, super::identity::ACCOUNT);
        SignedIdentity { rsa2048: signer.sign(&document), document }
    });
    let imds = Arc::new(Imds::start(id, user_data, !nimbus, identity).await?);
    Ok((disk, dir, imds, ports))
}

/// The user-data moto holds, decoded (RunInstances takes it base64-encoded).
async fn user_data(client: &Client, id: &str) -> anyhow::Result<Vec<u8>> {
    let call = client.describe_instance_attribute().instance_id(id).attribute(InstanceAttributeName::UserData).send();
    let out = tokio::time::timeout(CALL_LIMIT, call).await.context("DescribeInstanceAttribute timed out")??;
    let Some(encoded) = out.user_data().and_then(|v| v.value()) else {
        return Ok(Vec::new());
    };
    let compact: String = encoded.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(compact).map_err(|e| {
        anyhow!("its user-data is not base64 ({e}): RunInstances wants it encoded and the SDK does not encode it")
    })
}

/// The configured disk of `ami`, or the disk of the instance CreateImage made it from.
async fn base_disk(shared: &Shared, client: &Client, ami: &str) -> anyhow::Result<BaseDisk> {
    let manifest = shared.images.lock().unwrap().get(ami).cloned();
    if let Some(manifest) = manifest {
        return BaseDisk::from_manifest(&manifest);
    }
    let call = client.describe_images().image_ids(ami).send();
    let images = tokio::time::timeout(CALL_LIMIT, call).await.context("DescribeImages timed out")??;
    let source = images.images().first().and_then(|i| i.source_instance_id()).map(str::to_owned);
    let state = shared.state.lock().unwrap();
    match source.as_deref().and_then(|s| state.vms.get(s)) {
        Some(vm) => Ok(vm.disk.clone()),
        None => bail!("AMI {ami} is neither in RunnerConfig::images nor made by CreateImage from a VM of this runner"),
    }
}

/// StopInstances, unless moto no longer reports the instance running: moto
/// turns even a terminated instance `stopped` when asked to stop it.
async fn stop_if_running(shared: &Shared, client: &Client, id: &str) {
    let result = async {
        let call = client.describe_instances().instance_ids(id).send();
        let out = tokio::time::timeout(CALL_LIMIT, call).await.context("timed out")??;
        let running = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(|i| i.state().and_then(|s| s.name()))
            .any(|n| matches!(n.as_str(), "pending" | "running"));
        if running {
            tokio::time::timeout(CALL_LIMIT, client.stop_instances().instance_ids(id).send())
                .await
                .context("timed out")??;
            tracing::info!(instance = %id, "stopped in moto");
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        problem(shared, format!("{id}: cannot stop it in moto: {e:#}"));
    }
}

fn problem(shared: &Shared, msg: String) {
    tracing::warn!("ec2 runner: {msg}");
    shared.state.lock().unwrap().problems.push(msg);
    shared.bump();
}

fn console(shared: &Shared, id: &str) -> Option<String> {
    let dir = shared.state.lock().unwrap().vms.get(id)?.dir.clone();
    let bytes = std::fs::read(dir.join("console.log")).ok()?;
    Some(String::from_utf8_lossy(&bytes).replace('\r', ""))
}

/// The last `console_tail_lines` console lines, for a log message.
fn console_tail(shared: &Shared, id: &str) -> String {
    let n = shared.config.console_tail_lines;
    let dir = shared.state.lock().unwrap().vms.get(id).map(|vm| vm.dir.clone());
    let Some(text) = (n > 0).then_some(dir).flatten().and_then(|d| std::fs::read(d.join("console.log")).ok()) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&text).replace('\r', "");
    let lines: Vec<&str> = text.lines().collect();
    format!("; console:\n{}", lines[lines.len().saturating_sub(n)..].join("\n"))
}
