//! An in-process coordinator on loopback, driven through its HTTP API.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use futures::StreamExt;
use kiln_coordinator::cli::Client;
use kiln_coordinator::server::Addrs;
use kiln_coordinator::{App, Config, Listeners, Providers, Server};
use kiln_protocol::TargetId;
use kiln_protocol::access::{CreatedToken, Role, TokenRequest};
use kiln_protocol::api::{
    Build, BuildRequest, Cloud, CloudKind, GeneratorSpec, LogChunk, LogEnd, Revision, TargetSpec,
};
use tempfile::TempDir;

use crate::process::ProcessProvider;

/// The longest any test waits for a build to end (a stock cloud image under
/// TCG boots in about 70 s, twice that under load).
pub const BUILD_LIMIT: Duration = Duration::from_secs(480);

/// Knobs a test may turn.
#[derive(Clone, Debug)]
pub struct Options {
    pub token_ttl: Duration,
    pub agent_contact: Duration,
    /// Serve `qemu` clouds with the real QEMU provider instead of the process provider.
    pub real_qemu: bool,
    /// From the script's end until the sealed instance must have stopped.
    pub seal: Duration,
    /// The most log bytes one target may store.
    pub log_quota: u64,
    /// The coordinator's data directory, e.g. on a small file system the
    /// test mounted (default: `data` in the bed's temporary directory).
    pub data_dir: Option<PathBuf>,
    /// Free space the coordinator keeps on its data directory's file system
    /// (default: kiln's own, 64 MiB).
    pub disk_reserve: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            token_ttl: Duration::from_secs(900),
            agent_contact: Duration::from_secs(60),
            real_qemu: false,
            seal: Duration::from_secs(120),
            log_quota: 1 << 30,
            data_dir: None,
            disk_reserve: None,
        }
    }
}

impl Options {
    /// Real VMs under QEMU; TCG boots are slow, so the agent gets longer to call.
    pub fn qemu() -> Self {
        Self { real_qemu: true, agent_contact: Duration::from_secs(300), ..Self::default() }
    }
}

/// A coordinator with the process provider as its `qemu` cloud kind.
pub struct Bed {
    pub dir: TempDir,
    pub provider: Arc<ProcessProvider>,
    pub client: Client,
    server: Option<Server>,
    addrs: Addrs,
    opts: Options,
}

impl Bed {
    pub async fn start() -> Self {
        Self::with(Options::default()).await
    }

    pub async fn with(opts: Options) -> Self {
        crate::init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join(IMAGE_DIR)).expect("create the bed's image directory");
        let provider = Arc::new(ProcessProvider::new(&dir.path().join("provider")));
        let any = "127.0.0.1:0".parse().unwrap();
        let listeners = Listeners::bind(any, any, any).await.expect("bind");
        let config = config(&dir, &opts);
        let server = Server::start(config.clone(), providers(&provider, &config, &opts), listeners)
            .await
            .expect("start coordinator");
        let addrs = server.addrs();
        let client = Client::new(&format!("http://{}", addrs.api)).unwrap().with_token(admin_token(&config));
        Self { dir, provider, client, server: Some(server), addrs, opts }
    }

    /// A client of this coordinator with no token.
    pub fn anonymous(&self) -> Client {
        Client::new(&format!("http://{}", self.addrs.api)).unwrap()
    }

    /// A client with a new token of `role`.
    pub async fn client_with_role(&self, role: Role) -> Client {
        let created: CreatedToken = self
            .client
            .post("/v1/tokens", &TokenRequest { name: format!("test {role}"), role })
            .await
            .expect("create a token");
        self.anonymous().with_token(created.secret)
    }

    pub fn app(&self) -> &App {
        self.server.as_ref().expect("running").app()
    }

    pub fn addrs(&self) -> Addrs {
        self.addrs
    }

    /// The bed's own image directory, one of the coordinator's `--image-dir`s
    /// (base images a test makes go here).
    pub fn image_dir(&self) -> PathBuf {
        self.dir.path().join(IMAGE_DIR)
    }

    /// The coordinator's data directory.
    pub fn data_dir(&self) -> PathBuf {
        data_dir(&self.dir, &self.opts)
    }

    /// Stops the coordinator mid-flight and starts it again on the same data
    /// directory and ports.
    pub async fn restart(&mut self) {
        self.server.take().expect("running").stop().await;
        let listeners = Listeners::bind(self.addrs.api, self.addrs.agent, self.addrs.bootstrap).await.expect("rebind");
        let config = config(&self.dir, &self.opts);
        let providers = providers(&self.provider, &config, &self.opts);
        let server = Server::start(config, providers, listeners).await.expect("restart coordinator");
        self.server = Some(server);
    }

    /// Stops the coordinator and starts it again on the same data directory,
    /// returning the start's error (with its causes) instead of panicking.
    pub async fn try_restart(&mut self) -> Result<(), String> {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
        let listeners = Listeners::bind(self.addrs.api, self.addrs.agent, self.addrs.bootstrap).await.expect("rebind");
        let config = config(&self.dir, &self.opts);
        let providers = providers(&self.provider, &config, &self.opts);
        let server =
            Server::start(config, providers, listeners).await.map_err(|e| kiln_coordinator::error_chain(&e))?;
        self.server = Some(server);
        Ok(())
    }

    /// Adds a cloud named `name` served by the process provider.
    pub async fn add_cloud(&self, name: &str) {
        let cloud = Cloud {
            name: name.parse().unwrap(),
            kind: CloudKind::Qemu,
            region: None,
            endpoint: None,
            options: BTreeMap::new(),
            credentials: None,
        };
        let _: Cloud = self.client.post("/v1/clouds", &cloud).await.expect("add cloud");
    }

    /// A generator with `script` on each of `clouds` (base image "process").
    pub fn spec(name: &str, script: &str, clouds: &[&str]) -> GeneratorSpec {
        GeneratorSpec {
            name: name.parse().unwrap(),
            description: String::new(),
            script: script.into(),
            timeout_secs: None,
            env: BTreeMap::new(),
            secret_env: None,
            generalize: None,
            targets: clouds
                .iter()
                .map(|c| {
                    let t = TargetSpec {
                        base_image: "process".into(),
                        instance_type: None,
                        network: None,
                        options: BTreeMap::new(),
                    };
                    (c.parse().unwrap(), t)
                })
                .collect(),
        }
    }

    pub async fn create_generator(&self, spec: &GeneratorSpec) -> Revision {
        self.client.post("/v1/generators", spec).await.expect("create generator")
    }

    pub async fn start_build(&self, generator: &str) -> Build {
        let req = BuildRequest {
            generator: generator.parse().unwrap(),
            revision: None,
            clouds: vec![],
            passwords: BTreeMap::new(),
        };
        self.client.post("/v1/builds", &req).await.expect("start build")
    }

    /// Asks for a build of `generator` that must be refused before anything
    /// starts (400); returns the error's message.
    pub async fn refused_build(&self, generator: &str) -> String {
        let body = serde_json::json!({"generator": generator});
        let resp = self.client.request(reqwest::Method::POST, "/v1/builds").json(&body).send().await.expect("send");
        assert_eq!(resp.status(), reqwest::StatusCode::BAD_REQUEST, "a build of {generator} was not refused");
        resp.json::<kiln_protocol::error::ErrorBody>().await.expect("a JSON error").message
    }

    /// Creates a generator on cloud `local` and builds it.
    pub async fn build_script(&self, name: &str, script: &str, timeout_secs: Option<u64>) -> Build {
        let mut spec = Self::spec(name, script, &["local"]);
        spec.timeout_secs = timeout_secs;
        self.create_generator(&spec).await;
        self.start_build(name).await
    }

    /// Follows every target's log to its end, then returns the final build.
    pub async fn wait(&self, build: &Build) -> Build {
        for t in &build.targets {
            self.follow(t.id).await;
        }
        self.client.get(&format!("/v1/builds/{}", build.id)).await.expect("get build")
    }

    /// The whole log as the live follow delivers it (waits for the target to end).
    pub async fn follow(&self, target: TargetId) -> Vec<u8> {
        self.follow_until(target, |_| false).await
    }

    /// Follows a target's log until `stop(log so far)` or the target's end.
    pub async fn follow_until(&self, target: TargetId, stop: impl FnMut(&[u8]) -> bool) -> Vec<u8> {
        follow_until(&self.client, target, stop).await
    }

    /// The whole log through the byte-range endpoint.
    pub async fn log(&self, target: TargetId) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let resp = self
                .client
                .send(
                    self.client
                        .request(reqwest::Method::GET, &format!("/v1/targets/{target}/log?offset={}", out.len())),
                )
                .await
                .expect("read log");
            let bytes = resp.bytes().await.unwrap();
            if bytes.is_empty() {
                return out;
            }
            out.extend_from_slice(&bytes);
        }
    }

    /// A client of the agent listener that trusts kiln's CA and shows no
    /// client certificate.
    pub fn agent_client_without_certificate(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.app().pki().ca_pem().as_bytes()).unwrap();
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .build()
            .unwrap()
    }

    /// The agent listener's URL and the CA that signs it.
    pub fn agent_url(&self) -> String {
        format!("https://{}", self.addrs.agent)
    }
}

/// Follows a target's log through `client` until `stop(log so far)` or the
/// target's end (any coordinator: in-process or a `kiln serve` process).
pub async fn follow_until(client: &Client, target: TargetId, mut stop: impl FnMut(&[u8]) -> bool) -> Vec<u8> {
    let follow = async {
        let resp = client
            .send(client.request(reqwest::Method::GET, &format!("/v1/targets/{target}/log/follow")))
            .await
            .expect("follow");
        let mut events = eventsource_stream::Eventsource::eventsource(resp.bytes_stream());
        let mut log = Vec::new();
        while let Some(event) = events.next().await {
            let event = event.expect("event stream");
            match event.event.as_str() {
                "log" => {
                    let chunk: LogChunk = serde_json::from_str(&event.data).unwrap();
                    assert_eq!(chunk.offset, log.len() as u64, "follow events are contiguous");
                    log.extend(base64::engine::general_purpose::STANDARD.decode(chunk.data).unwrap());
                    if stop(&log) {
                        return log;
                    }
                }
                "end" => {
                    let end: LogEnd = serde_json::from_str(&event.data).unwrap();
                    assert_eq!(end.total, log.len() as u64);
                    return log;
                }
                other => panic!("unexpected event {other}: {}", event.data),
            }
        }
        panic!("the follow stream ended without an end event");
    };
    tokio::time::timeout(BUILD_LIMIT, follow).await.expect("target did not end in time")
}

/// The bed's image directory, under its temporary directory.
const IMAGE_DIR: &str = "images";

/// Where local base images may come from: the bed's image directory and the
/// tiny image's cache (target/kiln-cache, or the directory of `KILN_TINY_IMAGE`).
fn image_dirs(dir: &TempDir) -> Vec<PathBuf> {
    let cache = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/kiln-cache");
    std::fs::create_dir_all(&cache).expect("create target/kiln-cache");
    let cache = cache.canonicalize().expect("canonical path");
    let given = std::env::var_os("KILN_TINY_IMAGE")
        .and_then(|p| std::path::absolute(PathBuf::from(p)).ok())
        .and_then(|p| p.parent().map(PathBuf::from));
    [dir.path().join(IMAGE_DIR), cache]
        .into_iter()
        .chain(given)
        .map(|d| std::path::absolute(d).expect("absolute path"))
        .collect()
}

/// The admin token the coordinator wrote at first start.
pub fn admin_token(config: &Config) -> String {
    let path = config.data_dir.join(kiln_coordinator::app::access::ADMIN_TOKEN_FILE);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())).trim().to_owned()
}

fn data_dir(dir: &TempDir, opts: &Options) -> PathBuf {
    opts.data_dir.clone().unwrap_or_else(|| dir.path().join("data"))
}

fn config(dir: &TempDir, opts: &Options) -> Config {
    let mut config = Config::new(data_dir(dir, opts));
    config.image_dirs = image_dirs(dir);
    // QEMU guests see the host's loopback at 10.0.2.2; the process provider uses 127.0.0.1.
    config.public_host = "10.0.2.2".into();
    // EC2 and OpenStack test-bed VMs reach the coordinator at this forwarded address.
    config.server_names = vec![crate::ec2::GUEST_HOST.into()];
    config.agent_binary = crate::agent_binary();
    if opts.real_qemu {
        config.guest.relay_program = crate::kiln_binary();
    }
    config.timeouts.poll_interval = Duration::from_millis(100);
    config.timeouts.token_ttl = opts.token_ttl;
    config.timeouts.agent_contact = opts.agent_contact;
    config.timeouts.seal = opts.seal;
    config.limits.log_quota_bytes = opts.log_quota;
    if let Some(reserve) = opts.disk_reserve {
        config.limits.disk_reserve_bytes = reserve;
    }
    config
}

fn providers(provider: &Arc<ProcessProvider>, config: &Config, opts: &Options) -> Providers {
    if opts.real_qemu {
        kiln_coordinator::cli::builtin_providers(config).expect("the coordinator id")
    } else {
        Providers::new().with(CloudKind::Qemu, provider.clone())
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        // A failed test must not leave VMs running: kill any QEMU started under this bed.
        let dir = self.dir.path().display().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.starts_with("qemu-system") && cmdline.contains(&dir) {
                tracing::warn!(pid, "killing a QEMU left running by a test");
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        for id in self.provider.live_instances() {
            tracing::warn!(instance = %id, "instance left running at the end of a test");
        }
    }
}
