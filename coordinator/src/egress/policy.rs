//! What a guest may reach through the egress proxy: the `egress` and
//! `egress_allow` options parsed into a [`Policy`], and [`Policy::decide`],
//! which judges one destination address. Pure: no I/O, no name resolution.

use kiln_protocol::quote::quote;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Whether a target's guest reaches the internet at large.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Only what `egress_allow` lists.
    None,
    /// Any global unicast address, plus what `egress_allow` lists.
    #[default]
    Internet,
}

/// An IP network: an address and a prefix length no longer than the address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `None` when `prefix` is longer than the address (32 bits for IPv4, 128 for IPv6).
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        (prefix <= max_prefix(addr)).then_some(Self { addr, prefix })
    }

    /// The network holding only `addr`.
    pub fn host(addr: IpAddr) -> Self {
        Self { addr, prefix: max_prefix(addr) }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

/// One entry of `egress_allow`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowEntry {
    /// Any port on any address in the network.
    Cidr(Cidr),
    /// One port on one host, by name or by address.
    HostPort {
        /// Lowercased, without a trailing dot; an IPv6 literal without brackets.
        host: String,
        port: u16,
    },
}

impl AllowEntry {
    fn parse(entry: &str) -> Result<Self, PolicyError> {
        let bad = || PolicyError::BadEntry { entry: entry.to_owned() };
        if let Some((addr, prefix)) = entry.split_once('/') {
            let addr: IpAddr = addr.parse().map_err(|_| bad())?;
            let prefix: u8 = prefix.parse().map_err(|_| bad())?;
            let cidr = Cidr::new(addr, prefix)
                .ok_or_else(|| PolicyError::BadPrefix { entry: entry.to_owned(), max: max_prefix(addr) })?;
            return Ok(Self::Cidr(cidr));
        }
        if let Ok(addr) = entry.parse::<IpAddr>() {
            return Ok(Self::Cidr(Cidr::host(addr)));
        }
        let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
            let (host, port) = rest.split_once("]:").ok_or_else(bad)?;
            host.parse::<Ipv6Addr>().map_err(|_| bad())?;
            (host, port)
        } else {
            let (host, port) = entry.rsplit_once(':').ok_or_else(bad)?;
            let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
            if !host.chars().all(name_char) {
                return Err(bad());
            }
            (host, port)
        };
        let host = normalize_host(host);
        if host.is_empty() {
            return Err(PolicyError::EmptyHost { entry: entry.to_owned() });
        }
        match port.parse::<u16>() {
            Ok(port) if port != 0 => Ok(Self::HostPort { host, port }),
            _ => Err(PolicyError::BadPort { entry: entry.to_owned(), port: port.to_owned() }),
        }
    }

    fn allows(&self, host: &str, port: u16, addr: IpAddr) -> bool {
        match self {
            Self::Cidr(cidr) => cidr.contains(addr),
            Self::HostPort { host: allowed, port: allowed_port } => {
                let same_host = match allowed.parse::<IpAddr>() {
                    Ok(ip) => ip.to_canonical() == addr,
                    Err(_) => *allowed == normalize_host(host),
                };
                same_host && port == *allowed_port
            }
        }
    }
}

fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// `host:port`, with brackets around an IPv6 literal.
pub(crate) fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("egress is {}; it must be \"none\" or \"internet\"", quote(value))]
    BadMode { value: String },
    #[error(
        "egress_allow entry {} is neither a CIDR (10.0.0.0/8, fd00::/8) nor host:port (example.com:443)",
        quote(entry)
    )]
    BadEntry { entry: String },
    #[error("egress_allow entry {} has a prefix length longer than its address's {max} bits", quote(entry))]
    BadPrefix { entry: String, max: u8 },
    #[error("egress_allow entry {} has port {}; a port is a number from 1 to 65535", quote(entry), quote(port))]
    BadPort { entry: String, port: String },
    #[error("egress_allow entry {} has an empty host", quote(entry))]
    EmptyHost { entry: String },
}

/// What [`Policy::decide`] concluded about one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Why not, as a sentence fragment that follows "refused CONNECT host:port: ".
    Deny(String),
}

/// A target's egress policy: its mode, and the destinations allowed whatever the mode.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    pub mode: Mode,
    pub allow: Vec<AllowEntry>,
}

impl Policy {
    /// Reads `egress` ("none" or "internet", default "internet") and
    /// `egress_allow` (entries separated by commas and/or whitespace); other keys are ignored.
    pub fn from_options(options: &BTreeMap<String, String>) -> Result<Self, PolicyError> {
        let mode = match options.get("egress").map(|v| v.trim()) {
            None => Mode::default(),
            Some(v) if v.eq_ignore_ascii_case("none") => Mode::None,
            Some(v) if v.eq_ignore_ascii_case("internet") => Mode::Internet,
            Some(v) => return Err(PolicyError::BadMode { value: v.to_owned() }),
        };
        let allow = options
            .get("egress_allow")
            .map(String::as_str)
            .unwrap_or_default()
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|entry| !entry.is_empty())
            .map(AllowEntry::parse)
            .collect::<Result<_, _>>()?;
        Ok(Self { mode, allow })
    }

    /// The cloud's options overridden key by key by the target's.
    pub fn from_layers(
        cloud: &BTreeMap<String, String>,
        target: &BTreeMap<String, String>,
    ) -> Result<Self, PolicyError> {
        let merged = ["egress", "egress_allow"]
            .into_iter()
            .filter_map(|key| target.get(key).or_else(|| cloud.get(key)).map(|v| (key.to_owned(), v.clone())))
            .collect();
        Self::from_options(&merged)
    }

    /// Judges a connection to `host:port` at `addr`, one of the addresses
    /// `host` resolved to (or `host` itself when it is an IP literal).
    /// `host_addrs` are this machine's own addresses, never reachable unless allowed.
    pub fn decide(&self, host: &str, port: u16, addr: IpAddr, host_addrs: &[IpAddr]) -> Verdict {
        let addr = addr.to_canonical();
        if self.allow.iter().any(|entry| entry.allows(host, port, addr)) {
            return Verdict::Allow;
        }
        let suggestion = host_port(host, port);
        if self.mode == Mode::None {
            return Verdict::Deny(format!(
                "egress is none for this target; add \"{suggestion}\" to egress_allow to allow it"
            ));
        }
        let class = if addr.is_unspecified() {
            Some("the unspecified address")
        } else {
            BLOCKED.iter().find(|(net, _)| net.contains(addr)).map(|(_, class)| *class)
        };
        let class = class.or_else(|| host_addrs.iter().any(|a| a.to_canonical() == addr).then_some(OWN));
        match class {
            None => Verdict::Allow,
            Some(class) => {
                let what = match host.parse::<IpAddr>() {
                    Ok(_) => format!("{addr} is {class}"),
                    Err(_) => format!("{host} resolves to {addr}, which is {class}"),
                };
                Verdict::Deny(format!("{what}; add \"{suggestion}\" or a CIDR to the cloud's egress_allow to allow it"))
            }
        }
    }
}

const PRIVATE: &str = "a private address";
const LINK_LOCAL: &str = "link-local (cloud metadata services live here)";
const LOOPBACK: &str = "host loopback";
const DOCS: &str = "a documentation address";
const MULTICAST: &str = "multicast";
const NAT64: &str = "NAT64, which could reach any IPv4 address behind this check";
const OWN: &str = "one of this host's own addresses";

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Cidr {
    Cidr { addr: IpAddr::V4(Ipv4Addr::new(a, b, c, d)), prefix }
}

const fn v6(segments: [u16; 8], prefix: u8) -> Cidr {
    let [a, b, c, d, e, f, g, h] = segments;
    Cidr { addr: IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)), prefix }
}

/// The ranges a guest may not reach unless an allow entry names them, each
/// with the phrase that completes "ADDR is …". The first match wins, so the
/// broadcast address comes before the reserved range that holds it.
const BLOCKED: &[(Cidr, &str)] = &[
    (v4(0, 0, 0, 0, 8), "in 0.0.0.0/8 (\"this network\")"),
    (v4(10, 0, 0, 0, 8), PRIVATE),
    (v4(100, 64, 0, 0, 10), "shared address space (100.64.0.0/10, carrier-grade NAT)"),
    (v4(127, 0, 0, 0, 8), LOOPBACK),
    (v4(169, 254, 0, 0, 16), LINK_LOCAL),
    (v4(172, 16, 0, 0, 12), PRIVATE),
    (v4(192, 0, 0, 0, 24), "IETF protocol assignment space (192.0.0.0/24)"),
    (v4(192, 0, 2, 0, 24), DOCS),
    (v4(192, 88, 99, 0, 24), "the 6to4 relay anycast range (192.88.99.0/24)"),
    (v4(192, 168, 0, 0, 16), PRIVATE),
    (v4(198, 18, 0, 0, 15), "benchmarking space (198.18.0.0/15)"),
    (v4(198, 51, 100, 0, 24), DOCS),
    (v4(203, 0, 113, 0, 24), DOCS),
    (v4(224, 0, 0, 0, 4), MULTICAST),
    (v4(255, 255, 255, 255, 32), "the broadcast address"),
    (v4(240, 0, 0, 0, 4), "reserved (240.0.0.0/4)"),
    (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), LOOPBACK),
    (v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96), NAT64),
    (v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), NAT64),
    (v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), DOCS),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), "a unique-local address (fc00::/7)"),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), LINK_LOCAL),
    (v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), "a deprecated site-local address (fec0::/10)"),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), MULTICAST),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// The machine's own (global) address in these tests.
    const OWN_ADDR: &str = "93.184.216.34";

    /// Decides `host:port` at `addr` under `egress=mode` (empty: unset) and
    /// `egress_allow=allow`; `want` is "allow" or a piece of the deny reason.
    fn check(mode: &str, allow: &str, host: &str, port: u16, addr: &str, want: &str) {
        let mut opts = options(&[("egress_allow", allow)]);
        if !mode.is_empty() {
            opts.insert("egress".into(), mode.into());
        }
        let policy = Policy::from_options(&opts).unwrap();
        let got = policy.decide(host, port, addr.parse().unwrap(), &[OWN_ADDR.parse().unwrap()]);
        let ok = match &got {
            Verdict::Allow => want == "allow",
            Verdict::Deny(reason) => want != "allow" && reason.contains(want),
        };
        assert!(ok, "{host}:{port} at {addr}, egress={mode:?} egress_allow={allow:?}: want {want:?}, got {got:?}");
    }

    #[test]
    fn classes() {
        check("", "", "1.1.1.1", 443, "1.1.1.1", "allow");
        check("", "", "example.com", 80, "2606:2800:220:1:248:1893:25c8:1946", "allow");
        check("", "", "0.0.0.0", 80, "0.0.0.0", "unspecified");
        check("", "", "::", 80, "::", "unspecified");
        check("", "", "127.0.0.1", 80, "127.0.0.1", "127.0.0.1 is host loopback");
        check("", "", "127.8.9.10", 80, "127.8.9.10", "host loopback");
        check("", "", "::1", 80, "::1", "host loopback");
        check("", "", "169.254.169.254", 80, "169.254.169.254", "link-local (cloud metadata");
        check("", "", "fe80::1", 80, "fe80::1", "link-local");
        check("", "", "10.1.2.3", 80, "10.1.2.3", "a private address");
        check("", "", "172.16.0.1", 80, "172.16.0.1", "a private address");
        check("", "", "172.31.255.255", 80, "172.31.255.255", "a private address");
        check("", "", "172.32.0.1", 80, "172.32.0.1", "allow");
        check("", "", "192.168.1.1", 80, "192.168.1.1", "a private address");
        check("", "", "100.64.0.1", 80, "100.64.0.1", "carrier-grade NAT");
        check("", "", "100.127.255.255", 80, "100.127.255.255", "carrier-grade NAT");
        check("", "", "100.128.0.1", 80, "100.128.0.1", "allow");
        check("", "", "fd12::1", 80, "fd12::1", "unique-local");
        check("", "", "fc00::1", 80, "fc00::1", "unique-local");
        check("", "", "fec0::1", 80, "fec0::1", "site-local");
        check("", "", "224.0.0.251", 80, "224.0.0.251", "multicast");
        check("", "", "ff02::1", 80, "ff02::1", "multicast");
        check("", "", "255.255.255.255", 80, "255.255.255.255", "the broadcast address");
        check("", "", "0.1.2.3", 80, "0.1.2.3", "this network");
        check("", "", "240.0.0.1", 80, "240.0.0.1", "reserved");
        check("", "", "192.0.2.1", 80, "192.0.2.1", "documentation");
        check("", "", "198.51.100.1", 80, "198.51.100.1", "documentation");
        check("", "", "203.0.113.1", 80, "203.0.113.1", "documentation");
        check("", "", "2001:db8::1", 80, "2001:db8::1", "documentation");
        check("", "", "198.18.0.1", 80, "198.18.0.1", "benchmarking");
        check("", "", "198.19.255.255", 80, "198.19.255.255", "benchmarking");
        check("", "", "192.0.0.8", 80, "192.0.0.8", "IETF");
        check("", "", "192.88.99.1", 80, "192.88.99.1", "6to4");
        check("", "", "64:ff9b::a9fe:a9fe", 80, "64:ff9b::a9fe:a9fe", "NAT64");
        check("", "", OWN_ADDR, 22, OWN_ADDR, "one of this host's own addresses");
    }

    #[test]
    fn ipv4_mapped_addresses_are_judged_as_ipv4() {
        check("", "", "::ffff:127.0.0.1", 80, "::ffff:127.0.0.1", "127.0.0.1 is host loopback");
        check("", "", "::ffff:169.254.169.254", 80, "::ffff:169.254.169.254", "link-local");
        check("", "", "::ffff:1.1.1.1", 80, "::ffff:1.1.1.1", "allow");
        check("", "10.0.0.0/8", "::ffff:10.0.0.1", 80, "::ffff:10.0.0.1", "allow");
        check("", "", "x", 80, "::ffff:93.184.216.34", "own addresses");
    }

    #[test]
    fn names_are_judged_by_the_address_they_resolve_to() {
        check("", "", "metadata.internal", 80, "169.254.169.254", "metadata.internal resolves to 169.254.169.254");
        check("", "", "example.com", 443, "93.184.215.14", "allow");
    }

    #[test]
    fn allow_entries() {
        check("", "10.1.0.0/16", "10.1.2.3", 5432, "10.1.2.3", "allow");
        check("", "10.1.0.0/16", "10.2.0.1", 5432, "10.2.0.1", "private");
        check("", "127.0.0.1", "127.0.0.1", 1, "127.0.0.1", "allow");
        check("", "::1", "::1", 8080, "::1", "allow");
        check("", "fd00::/8", "fd00::5", 80, "fd00::5", "allow");
        check("", "0.0.0.0/0", "10.0.0.1", 80, "10.0.0.1", "allow");
        check("", "127.0.0.1:7700", "127.0.0.1", 7700, "127.0.0.1", "allow");
        check("", "127.0.0.1:7700", "127.0.0.1", 7701, "127.0.0.1", "host loopback");
        check("", "127.0.0.1:7700", "localhost", 7700, "127.0.0.1", "allow");
        check("", "[::1]:8080", "::1", 8080, "::1", "allow");
        check("", "[::1]:8080", "::1", 8081, "::1", "host loopback");
        check("", "Mirror.Internal:80", "mirror.internal", 80, "10.0.0.9", "allow");
        check("", "mirror.internal:80", "MIRROR.internal.", 80, "10.0.0.9", "allow");
        check("", "mirror.internal:80", "mirror.internal", 443, "10.0.0.9", "which is a private address");
        check("", "mirror.internal:80", "other.internal", 80, "10.0.0.9", "private");
        check("", "a.example:1, 10.0.0.0/8\n 127.0.0.1:2", "127.0.0.1", 2, "127.0.0.1", "allow");
    }

    #[test]
    fn mode_none_allows_only_the_allow_list() {
        check("none", "", "1.1.1.1", 443, "1.1.1.1", "egress is none for this target");
        check("none", "", "127.0.0.1", 80, "127.0.0.1", "egress is none");
        check("none", "deb.debian.org:80", "deb.debian.org", 80, "151.101.2.132", "allow");
        check("none", "deb.debian.org:80", "deb.debian.org", 443, "151.101.2.132", "egress is none");
        check("none", "10.0.0.0/8", "10.9.9.9", 22, "10.9.9.9", "allow");
        check("NONE", "", "1.1.1.1", 443, "1.1.1.1", "egress is none");
        check("internet", "", "1.1.1.1", 443, "1.1.1.1", "allow");
        check(" Internet ", "", "1.1.1.1", 443, "1.1.1.1", "allow");
    }

    #[test]
    fn deny_reasons_read_as_sentences() {
        let policy = Policy::default();
        let deny = |host: &str, port, addr: &str| match policy.decide(host, port, addr.parse().unwrap(), &[]) {
            Verdict::Deny(reason) => format!("kiln egress: refused CONNECT {}: {reason}", host_port(host, port)),
            Verdict::Allow => panic!("{host} allowed"),
        };
        assert_eq!(
            deny("127.0.0.1", 7700, "127.0.0.1"),
            "kiln egress: refused CONNECT 127.0.0.1:7700: 127.0.0.1 is host loopback; \
             add \"127.0.0.1:7700\" or a CIDR to the cloud's egress_allow to allow it"
        );
        assert_eq!(
            deny("::1", 80, "::1"),
            "kiln egress: refused CONNECT [::1]:80: ::1 is host loopback; \
             add \"[::1]:80\" or a CIDR to the cloud's egress_allow to allow it"
        );
        let none = Policy { mode: Mode::None, allow: vec![] };
        assert_eq!(
            none.decide("example.com", 443, "93.184.215.14".parse().unwrap(), &[]),
            Verdict::Deny("egress is none for this target; add \"example.com:443\" to egress_allow to allow it".into())
        );
    }

    #[test]
    fn parses_entries() {
        let allow = |text: &str| Policy::from_options(&options(&[("egress_allow", text)])).unwrap().allow;
        let cidr = |addr: &str, prefix| AllowEntry::Cidr(Cidr::new(addr.parse().unwrap(), prefix).unwrap());
        let hp = |host: &str, port| AllowEntry::HostPort { host: host.into(), port };
        assert_eq!(allow(""), vec![]);
        assert_eq!(allow(" ,, \n"), vec![]);
        assert_eq!(allow("10.1.0.0/16"), vec![cidr("10.1.0.0", 16)]);
        assert_eq!(allow("fd00::/8"), vec![cidr("fd00::", 8)]);
        assert_eq!(allow("127.0.0.1 ::1"), vec![cidr("127.0.0.1", 32), cidr("::1", 128)]);
        assert_eq!(allow("Example.COM:443"), vec![hp("example.com", 443)]);
        assert_eq!(allow("127.0.0.1:8080,[::1]:8080"), vec![hp("127.0.0.1", 8080), hp("::1", 8080)]);
        assert_eq!(allow("0.0.0.0/0,::/0"), vec![cidr("0.0.0.0", 0), cidr("::", 0)]);
        assert_eq!(Cidr::new("10.0.0.0".parse().unwrap(), 8).unwrap().to_string(), "10.0.0.0/8");
    }

    #[test]
    fn parse_errors_name_the_entry() {
        let err = |key: &str, text: &str| Policy::from_options(&options(&[(key, text)])).unwrap_err().to_string();
        let neither = |entry: &str| {
            format!(
                "egress_allow entry \"{entry}\" is neither a CIDR (10.0.0.0/8, fd00::/8) nor host:port (example.com:443)"
            )
        };
        assert_eq!(err("egress_allow", "foo"), neither("foo"));
        assert_eq!(err("egress_allow", "ok.example:1 foo"), neither("foo"));
        assert_eq!(err("egress_allow", "10.0.0.0/x"), neither("10.0.0.0/x"));
        assert_eq!(err("egress_allow", "example.com/8"), neither("example.com/8"));
        assert_eq!(err("egress_allow", "[::1]"), neither("[::1]"));
        assert_eq!(err("egress_allow", "[nothost]:80"), neither("[nothost]:80"));
        assert_eq!(err("egress_allow", "http://x:80"), neither("http://x:80"));
        assert_eq!(err("egress_allow", "*.example.com:443"), neither("*.example.com:443"));
        assert_eq!(
            err("egress_allow", "10.0.0.0/33"),
            "egress_allow entry \"10.0.0.0/33\" has a prefix length longer than its address's 32 bits"
        );
        assert_eq!(
            err("egress_allow", "fd00::/129"),
            "egress_allow entry \"fd00::/129\" has a prefix length longer than its address's 128 bits"
        );
        assert_eq!(
            err("egress_allow", "example.com:0"),
            "egress_allow entry \"example.com:0\" has port \"0\"; a port is a number from 1 to 65535"
        );
        assert_eq!(
            err("egress_allow", "example.com:65536"),
            "egress_allow entry \"example.com:65536\" has port \"65536\"; a port is a number from 1 to 65535"
        );
        assert_eq!(
            err("egress_allow", "example.com:"),
            "egress_allow entry \"example.com:\" has port \"\"; a port is a number from 1 to 65535"
        );
        assert_eq!(err("egress_allow", ":80"), "egress_allow entry \":80\" has an empty host");
        assert_eq!(err("egress", "open"), "egress is \"open\"; it must be \"none\" or \"internet\"");
        assert_eq!(err("egress", ""), "egress is \"\"; it must be \"none\" or \"internet\"");
    }

    #[test]
    fn target_options_override_the_cloud_per_key() {
        let cloud = options(&[("egress", "none"), ("egress_allow", "10.0.0.0/8"), ("region", "x")]);
        let layers = |target: &[(&str, &str)]| Policy::from_layers(&cloud, &options(target)).unwrap();
        let ten = AllowEntry::Cidr(Cidr::new("10.0.0.0".parse().unwrap(), 8).unwrap());
        assert_eq!(layers(&[]), Policy { mode: Mode::None, allow: vec![ten.clone()] });
        assert_eq!(layers(&[("egress", "internet")]), Policy { mode: Mode::Internet, allow: vec![ten] });
        assert_eq!(layers(&[("egress_allow", "")]), Policy { mode: Mode::None, allow: vec![] });
        assert_eq!(Policy::from_layers(&BTreeMap::new(), &BTreeMap::new()).unwrap(), Policy::default());
        let bad = Policy::from_layers(&cloud, &options(&[("egress_allow", "nope")])).unwrap_err();
        assert_eq!(bad, PolicyError::BadEntry { entry: "nope".into() });
    }
}
