//! A local VM's network: QEMU user networking with `restrict=on`, so the guest
//! reaches nothing (not the host's loopback at 10.0.2.2, not 169.254.169.254,
//! not the host's network) except one `guestfwd` per kiln endpoint at a fixed
//! guest-side address. QEMU runs `kiln guest-relay` for each connection, which
//! joins it to a Unix socket in the data directory: agents (mTLS), bootstrap
//! (the agent binary) and the egress proxy, which applies the cloud's egress
//! policy and is the only way to anything else.

use std::path::{Path, PathBuf};

use kiln_protocol::TargetId;

use crate::config::{Config, GuestSocket};
use crate::providers::{AgentEndpoints, ScriptNetwork};

/// Where a VM of this coordinator reaches kiln.
#[derive(Clone, Debug)]
pub struct GuestNetwork {
    address: std::net::Ipv4Addr,
    relay: PathBuf,
    sockets: Vec<(GuestSocket, PathBuf)>,
}

impl GuestNetwork {
    pub fn new(config: &Config) -> Self {
        Self {
            address: config.guest.address,
            relay: config.guest.relay_program.clone(),
            sockets: GuestSocket::ALL.iter().map(|&s| (s, config.guest_socket(s))).collect(),
        }
    }

    pub fn relay(&self) -> &Path {
        &self.relay
    }

    /// The endpoints' URLs as the guest sees them; `host` overrides the address.
    pub fn endpoints(&self, host: Option<&str>) -> AgentEndpoints {
        let host = host.map(str::to_owned).unwrap_or_else(|| self.address.to_string());
        AgentEndpoints {
            agent_url: format!("https://{host}:{}", GuestSocket::Agent.guest_port()),
            bootstrap_url: format!("http://{host}:{}", GuestSocket::Bootstrap.guest_port()),
        }
    }

    /// The proxy the agent gives the script.
    pub fn script_network(&self) -> ScriptNetwork {
        ScriptNetwork {
            proxy: format!("http://{}:{}", self.address, GuestSocket::Egress.guest_port()),
            no_proxy: vec![self.address.to_string(), "localhost".into(), "127.0.0.1".into(), "::1".into()],
        }
    }

    /// The `-netdev` argument for `target`'s VM; its relays take their
    /// slots in `slots` (the instance's own directory).
    pub fn netdev(&self, id: &str, target: TargetId, slots: &Path) -> String {
        let mut arg = format!("user,id={id},restrict=on");
        for (socket, path) in &self.sockets {
            let mut cmd =
                format!("{} guest-relay {} --slots {}", shell_word(&self.relay), shell_word(path), shell_word(slots));
            if *socket == GuestSocket::Egress {
                cmd.push_str(&format!(" --target {target}"));
            }
            // QEMU's option syntax: a literal comma is written twice.
            let cmd = cmd.replace(',', ",,");
            arg.push_str(&format!(",guestfwd=tcp:{}:{}-cmd:{cmd}", self.address, socket.guest_port()));
        }
        arg
    }
}

/// `path` as one single-quoted word for `/bin/sh -c` (how QEMU runs `cmd:`).
fn shell_word(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Every endpoint is forwarded at the guest address, through the relay, to
    // its socket; only the egress relay names the target; commas and quotes in
    // paths survive QEMU's and the shell's parsing.
    #[test]
    fn netdev_restricts_and_forwards_each_endpoint() {
        let mut config = Config::new("/d,a'ta".into());
        config.guest.relay_program = "/bin/kiln".into();
        let net = GuestNetwork::new(&config);
        let target: TargetId = "0190a4b2-0000-7000-8000-000000000001".parse().unwrap();
        expect_test::expect![[r#"user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:443-cmd:'/bin/kiln' guest-relay '/d,,a'\''ta/run/agent.sock' --slots '/i',guestfwd=tcp:10.0.2.100:80-cmd:'/bin/kiln' guest-relay '/d,,a'\''ta/run/bootstrap.sock' --slots '/i',guestfwd=tcp:10.0.2.100:3128-cmd:'/bin/kiln' guest-relay '/d,,a'\''ta/run/egress.sock' --slots '/i' --target 0190a4b2-0000-7000-8000-000000000001"#]]
        .assert_eq(&net.netdev("n0", target, Path::new("/i")));
        assert_eq!(net.endpoints(None).agent_url, "https://10.0.2.100:443");
        assert_eq!(net.endpoints(Some("10.0.2.99")).bootstrap_url, "http://10.0.2.99:80");
        assert_eq!(net.script_network().proxy, "http://10.0.2.100:3128");
    }
}
