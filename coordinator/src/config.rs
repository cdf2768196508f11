//! The coordinator's settings, with the defaults a user gets from `kiln serve`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Everything the coordinator needs to know besides its listeners.
#[derive(Clone, Debug)]
pub struct Config {
    /// Holds the sled database, the CA, and the log files.
    pub data_dir: PathBuf,
    /// The host EC2 and OpenStack instances use to reach the coordinator
    /// unless a cloud says otherwise (`coordinator_host`); local VMs use
    /// [`GuestNet::address`] instead.
    pub public_host: String,
    /// Extra DNS names and addresses for the agent listener's certificate.
    pub server_names: Vec<String>,
    /// The static agent binary served to instances.
    pub agent_binary: PathBuf,
    /// How local VMs reach the coordinator.
    pub guest: GuestNet,
    /// Directories local base images, kernels and initrds may come from
    /// (`--image-dir`), absolute; kiln's image store and [`Self::image_cache`]
    /// are allowed besides them.
    pub image_dirs: Vec<PathBuf>,
    /// Where kiln's tiny image is cached (scripts/quickstart builds it there):
    /// `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else `$HOME/.cache/kiln`.
    pub image_cache: Option<PathBuf>,
    /// TLS for the public API and page; required off loopback unless
    /// [`Self::insecure_http`].
    pub api_tls: Option<ApiTls>,
    /// Serve the public API in plain HTTP on a non-loopback address anyway.
    pub insecure_http: bool,
    /// Names the public listener answers to besides the loopback names and
    /// its own address (`--api-host`): the `Host` allowlist.
    pub api_hosts: Vec<String>,
    pub limits: Limits,
    pub timeouts: Timeouts,
    /// How often the janitor runs after its run at start; `None`: only at start.
    pub janitor_interval: Option<Duration>,
}

/// Where the public listener's TLS certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiTls {
    /// PEM files: the certificate chain and its private key.
    Files { cert: PathBuf, key: PathBuf },
    /// A certificate from kiln's own CA (`<data>/pki/ca.crt`) for the API's names.
    FromCa,
}

/// How a local VM reaches kiln: QEMU forwards a fixed guest-side address
/// (`restrict=on`, one `guestfwd` per port) to a relay process that connects
/// to a Unix socket in the data directory. The guest never sees a host port,
/// so a coordinator restarted on any host port is reached again by the VMs it
/// launched before.
#[derive(Clone, Debug)]
pub struct GuestNet {
    /// The guest-side address of kiln's endpoints, inside QEMU's 10.0.2.0/24.
    pub address: Ipv4Addr,
    /// The program QEMU runs for each guest connection (`kiln guest-relay`).
    pub relay_program: PathBuf,
}

/// The guest-side ports of kiln's endpoints on [`GuestNet::address`].
pub mod guest_ports {
    /// The mTLS agent listener.
    pub const AGENT: u16 = 443;
    /// The plain-HTTP bootstrap listener (the agent binary).
    pub const BOOTSTRAP: u16 = 80;
    /// The egress proxy.
    pub const EGRESS: u16 = 3128;
}

/// The Unix sockets in `<data>/run/` that guest connections are relayed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestSocket {
    Agent,
    Bootstrap,
    Egress,
}

impl GuestSocket {
    pub const ALL: [GuestSocket; 3] = [GuestSocket::Agent, GuestSocket::Bootstrap, GuestSocket::Egress];

    pub fn file_name(self) -> &'static str {
        match self {
            GuestSocket::Agent => "agent.sock",
            GuestSocket::Bootstrap => "bootstrap.sock",
            GuestSocket::Egress => "egress.sock",
        }
    }

    pub fn guest_port(self) -> u16 {
        match self {
            GuestSocket::Agent => guest_ports::AGENT,
            GuestSocket::Bootstrap => guest_ports::BOOTSTRAP,
            GuestSocket::Egress => guest_ports::EGRESS,
        }
    }
}

/// The longest path a Unix socket address can hold (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

impl GuestNet {
    /// The default guest-side address: free in QEMU's user network (its
    /// gateway is .2, DNS .3, DHCP hands out .15 to .30).
    pub const DEFAULT_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);

    /// Refuses a guest-side address that collides with QEMU's user network.
    pub fn check_address(address: Ipv4Addr) -> Result<(), String> {
        let [a, b, c, d] = address.octets();
        let why = if (a, b, c) != (10, 0, 2) {
            Some("is outside QEMU's user network 10.0.2.0/24")
        } else {
            match d {
                0 => Some("is the network address"),
                2 => Some("is QEMU's gateway (the host)"),
                3 => Some("is QEMU's DNS server"),
                4 => Some("is QEMU's SMB server"),
                15..=30 => Some("is in QEMU's DHCP range (10.0.2.15 to 10.0.2.30), so a guest may get it"),
                255 => Some("is the broadcast address"),
                _ => None,
            }
        };
        match why {
            Some(why) => {
                Err(format!("the guest address {address} {why}; pick another in 10.0.2.0/24, e.g. 10.0.2.100"))
            }
            None => Ok(()),
        }
    }
}

/// The default of [`Limits::disk_reserve_bytes`]: room for sled's segments
/// (512 KiB each) and a snapshot, many times over.
pub const DEFAULT_DISK_RESERVE: u64 = 64 << 20;

/// Sizes the API refuses to exceed.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_script_bytes: usize,
    /// Largest script timeout a generator may ask for.
    pub max_script_timeout: Duration,
    /// The most log bytes one target may store; past it the target fails
    /// (`log_quota`) and what was committed stays readable.
    pub log_quota_bytes: u64,
    /// Free space kept on the data directory's file system for the store: a
    /// log chunk that would leave less is refused (507) and its target fails
    /// (`disk_full`), so sled can still record that and everything after.
    pub disk_reserve_bytes: u64,
    /// What each listener allows.
    pub listen: ListenLimits,
}

/// What one listener allows (every listener has the same).
#[derive(Clone, Copy, Debug)]
pub struct ListenLimits {
    /// Connections at once; one more is closed at accept.
    pub max_connections: usize,
    /// For an HTTP/1 request's headers, and for an idle keep-alive connection.
    pub header_timeout: Duration,
    /// Concurrent HTTP/2 streams per connection.
    pub max_streams: u32,
}

impl Default for ListenLimits {
    fn default() -> Self {
        Self { max_connections: 2048, header_timeout: Duration::from_secs(10), max_streams: 64 }
    }
}

/// How long each waiting step waits.
#[derive(Clone, Debug)]
pub struct Timeouts {
    /// From launch until the agent must have enrolled.
    pub agent_contact: Duration,
    /// A script's timeout when its generator names none.
    pub default_script: Duration,
    /// From the seal instruction until the instance must have stopped.
    pub seal: Duration,
    /// How long an enrollment token stays valid after launch.
    pub token_ttl: Duration,
    /// How often waiting steps ask the cloud about the instance.
    pub poll_interval: Duration,
    /// The longest an agent's instruction long poll is held open.
    pub instruction_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_script_bytes: 1024 * 1024,
            max_script_timeout: Duration::from_secs(24 * 3600),
            log_quota_bytes: 1 << 30,
            disk_reserve_bytes: DEFAULT_DISK_RESERVE,
            listen: ListenLimits::default(),
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            agent_contact: Duration::from_secs(600),
            default_script: Duration::from_secs(3600),
            seal: Duration::from_secs(300),
            token_ttl: Duration::from_secs(15 * 60),
            poll_interval: Duration::from_secs(1),
            instruction_wait: Duration::from_secs(30),
        }
    }
}

impl Config {
    /// Defaults for a data directory, made absolute: QEMU, daemonized, runs in `/`.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir: std::path::absolute(&data_dir).unwrap_or(data_dir),
            public_host: "10.0.2.2".into(),
            server_names: Vec::new(),
            agent_binary: default_agent_binary(),
            guest: GuestNet { address: GuestNet::DEFAULT_ADDRESS, relay_program: default_relay_program() },
            image_dirs: Vec::new(),
            image_cache: image_cache(|key| std::env::var_os(key)),
            api_tls: None,
            insecure_http: false,
            api_hosts: Vec::new(),
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            janitor_interval: Some(Duration::from_secs(600)),
        }
    }

    /// kiln's image store: where output images go, so each can be the next base.
    pub fn images_dir(&self) -> PathBuf {
        self.data_dir.join("images")
    }

    /// Where the sockets guest connections are relayed to live.
    pub fn run_dir(&self) -> PathBuf {
        self.data_dir.join("run")
    }

    /// The socket of one guest endpoint.
    pub fn guest_socket(&self, socket: GuestSocket) -> PathBuf {
        self.run_dir().join(socket.file_name())
    }

    /// Checks what can be wrong before anything is opened: the guest address,
    /// the length of the socket paths and the image directories.
    pub fn check(&self) -> Result<(), String> {
        GuestNet::check_address(self.guest.address)?;
        if let Some(dir) = self.image_dirs.iter().find(|d| !d.is_dir()) {
            return Err(format!(
                "the image directory {} (--image-dir) is not a directory: create it or give another",
                dir.display()
            ));
        }
        let longest = self.guest_socket(GuestSocket::Bootstrap);
        if longest.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(format!(
                "the data directory {} is too deep: its socket {} is longer than the {MAX_SOCKET_PATH} bytes a Unix socket path may have; use a shorter --data-dir",
                self.data_dir.display(),
                longest.display()
            ));
        }
        Ok(())
    }

    /// The names in the agent listener's certificate: the public host, the
    /// guest-side address, the loopback names, and any extra ones.
    pub fn certificate_names(&self) -> Vec<String> {
        let mut names = vec![
            self.public_host.clone(),
            self.guest.address.to_string(),
            "localhost".into(),
            "127.0.0.1".into(),
            "::1".into(),
        ];
        names.extend(self.server_names.iter().cloned());
        names.sort();
        names.dedup();
        names
    }
}

/// The running executable when it is `kiln`, else `kiln` next to it (a test
/// binary in `target/debug/deps` finds `target/debug/kiln`).
fn default_relay_program() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("kiln"));
    if exe.file_name().is_some_and(|n| n == "kiln") {
        return exe;
    }
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    [dir.join("kiln"), dir.join("../kiln")].into_iter().find(|p| p.exists()).unwrap_or_else(|| dir.join("kiln"))
}

/// The tiny-image cache from the environment (`env` reads a variable):
/// `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else `$HOME/.cache/kiln`;
/// empty and relative values count as unset.
fn image_cache(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    let var = |key: &str| env(key).map(PathBuf::from).filter(|p| p.is_absolute());
    var("KILN_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("kiln")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/kiln")))
}

/// `kiln-agent` next to the running `kiln` executable.
fn default_agent_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("kiln-agent")))
        .unwrap_or_else(|| PathBuf::from("kiln-agent"))
}

#[cfg(test)]
mod tests {
    use super::*;

    // A guest-side address that collides with QEMU's user network, or is
    // outside it, is refused with the reason; a free one is accepted.
    #[test]
    fn guest_address_must_be_free_in_the_user_network() {
        let cases = [
            ("10.0.2.100", None),
            ("10.0.2.200", None),
            ("10.0.2.2", Some("gateway")),
            ("10.0.2.3", Some("DNS")),
            ("10.0.2.15", Some("DHCP range")),
            ("10.0.2.30", Some("DHCP range")),
            ("10.0.2.255", Some("broadcast")),
            ("10.0.3.100", Some("outside")),
        ];
        for (address, why) in cases {
            let got = GuestNet::check_address(address.parse().unwrap());
            match why {
                None => assert!(got.is_ok(), "{address}: {got:?}"),
                Some(why) => assert!(got.as_ref().is_err_and(|e| e.contains(why)), "{address}: {got:?}"),
            }
        }
    }

    // A data directory whose sockets would not fit a Unix socket address is
    // refused before anything is opened.
    #[test]
    fn too_deep_a_data_dir_is_refused() {
        let deep = PathBuf::from(format!("/{}", "d".repeat(100)));
        let err = Config::new(deep).check().unwrap_err();
        assert!(err.contains("too deep") && err.contains("--data-dir"), "{err}");
        assert!(Config::new("/tmp/kiln".into()).check().is_ok());
    }

    // The tiny-image cache follows KILN_CACHE_DIR, then XDG_CACHE_HOME, then
    // HOME, ignoring empty and relative values.
    #[test]
    fn image_cache_follows_the_environment() {
        type Vars = &'static [(&'static str, &'static str)];
        let cases: [(Vars, Option<&str>); 6] = [
            (&[("KILN_CACHE_DIR", "/k"), ("XDG_CACHE_HOME", "/x"), ("HOME", "/h")], Some("/k")),
            (&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")], Some("/x/kiln")),
            (&[("HOME", "/h")], Some("/h/.cache/kiln")),
            (&[("KILN_CACHE_DIR", ""), ("XDG_CACHE_HOME", "rel"), ("HOME", "/h")], Some("/h/.cache/kiln")),
            (&[("HOME", "")], None),
            (&[], None),
        ];
        for (vars, want) in cases {
            let got = image_cache(|key| vars.iter().find(|(k, _)| *k == key).map(|(_, v)| v.into()));
            assert_eq!(got, want.map(PathBuf::from), "{vars:?}");
        }
    }
}
