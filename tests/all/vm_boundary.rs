//! The VM boundary on the local cloud, proven from inside real VMs: the guest
//! reaches kiln's endpoints and what its egress policy allows, nothing else,
//! and no listener hands out a target's token or user-data.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use std::net::{IpAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln_coordinator::config::GuestSocket;
use kiln_protocol::api::{Build, Status};
use kiln_tests::bed::{Bed, Options};
use serde_json::json;

/// A loopback HTTP server answering every request with `body`, counting connections.
struct HostServer {
    port: u16,
    connections: Arc<AtomicUsize>,
}

impl HostServer {
    fn start(body: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                counter.fetch_add(1, Ordering::SeqCst);
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                let answer =
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                let _ = stream.write_all(answer.as_bytes());
            }
        });
        Self { port, connections }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// This machine's own non-loopback IPv4 addresses.
fn host_addresses() -> Vec<String> {
    nix::ifaddrs::getifaddrs()
        .unwrap()
        .filter_map(|i| i.address?.as_sockaddr_in().map(|a| IpAddr::V4(a.ip())))
        .filter(|ip| !ip.is_loopback())
        .map(|ip| ip.to_string())
        .collect()
}

/// Tries every way out a script can find, direct and through the proxy, and
/// prints one `reached NAME: …` or `refused NAME: …` line per try.
const PROBES: &str = r#"
probe() {
    if body=$(timeout 4 wget -q -O - "$@" 2>&1); then echo "reached $name: $body"; else echo "refused $name: $(echo "$body" | tail -n 1)"; fi
}
gateway=$(ip route | awk '/^default/ {print $3}')
dns=$(awk '/^nameserver/ {print $2; exit}' /etc/resolv.conf 2>/dev/null)
for host in 10.0.2.2 $gateway $dns $HOST_ADDRS; do
    name="direct $host:$API_PORT" probe -Y off "http://$host:$API_PORT/v1/clouds" &
    name="direct $host:$SECRET_PORT" probe -Y off "http://$host:$SECRET_PORT/" &
done
name="direct 169.254.169.254:80" probe -Y off "http://169.254.169.254/latest/meta-data/" &
name="direct 10.0.2.100:7700" probe -Y off "http://10.0.2.100:7700/v1/clouds" &
wait
for host in 127.0.0.1 localhost 10.0.2.2 169.254.169.254 $HOST_ADDRS; do
    name="proxied $host:$API_PORT" probe "http://$host:$API_PORT/v1/clouds" &
    name="proxied $host:$SECRET_PORT" probe "http://$host:$SECRET_PORT/" &
done
name="proxied 169.254.169.254:80" probe "http://169.254.169.254/latest/meta-data/" &
wait
name="allowed" probe "http://127.0.0.1:$ALLOWED_PORT/"
# A name lookup through QEMU's DNS forwarder would leave the machine too.
out=$(timeout 4 nslookup kiln-probe.invalid 10.0.2.3 2>&1)
case $out in
    *NXDOMAIN* | *SERVFAIL* | *REFUSED* | *Name:*) echo "reached dns: $out" ;;
    *) echo "refused dns: $(echo "$out" | tail -n 1)" ;;
esac
echo "probes done"
"#;

// A script on a cloud with egress "none" and one with egress "internet" plus
// an allowlisted test server tries kiln's API through every host address it
// can find, a host-loopback port, the metadata address and the host's own
// addresses, directly and through the proxy. Every try fails (the log says
// so), only the allowlisted server answers and only on "internet", the host's
// other server sees no connection at all, and both builds still succeed.
#[tokio::test]
async fn guest_reaches_only_kiln_and_its_allowlist() {
    let bed = Bed::with(Options::qemu()).await;
    let secret = HostServer::start("host-secret");
    let allowed = HostServer::start("allowed-content");
    let api_port = bed.addrs().api.port();
    let allow = format!("127.0.0.1:{}", allowed.port);
    let sealed = json!({"name": "sealed", "kind": "qemu", "options": {"egress": "none"}});
    let open = json!({"name": "open", "kind": "qemu", "options": {"egress": "internet", "egress_allow": allow}});
    for cloud in [sealed, open] {
        let _: serde_json::Value = bed.client.post("/v1/clouds", &cloud).await.expect("add cloud");
    }
    let mut spec = Bed::spec("probe", PROBES, &["sealed", "open"]);
    for t in spec.targets.values_mut() {
        t.base_image = kiln_tests::tiny_image().display().to_string();
    }
    let addrs = host_addresses().join(" ");
    spec.env = BTreeMap::from([
        ("API_PORT".into(), api_port.to_string()),
        ("SECRET_PORT".into(), secret.port.to_string()),
        ("ALLOWED_PORT".into(), allowed.port.to_string()),
        ("HOST_ADDRS".into(), addrs.clone()),
    ]);
    bed.create_generator(&spec).await;
    let build: Build = bed.wait(&bed.start_build("probe").await).await;
    assert_eq!(build.status, Status::Successful, "{build:#?}");

    for t in &build.targets {
        let log = String::from_utf8(bed.log(t.id).await).unwrap();
        assert!(log.ends_with("probes done\n"), "{}: {log}", t.cloud);
        let reached: Vec<&str> = log.lines().filter(|l| l.starts_with("reached ")).collect();
        let refused = |name: &str| log.lines().any(|l| l.starts_with(&format!("refused {name}:")));
        let mut hosts = vec!["10.0.2.2".to_owned()];
        hosts.extend(addrs.split_whitespace().map(str::to_owned));
        for host in &hosts {
            for port in [api_port, secret.port] {
                assert!(refused(&format!("direct {host}:{port}")), "{}: direct {host}:{port}: {log}", t.cloud);
                assert!(refused(&format!("proxied {host}:{port}")), "{}: proxied {host}:{port}: {log}", t.cloud);
            }
        }
        for name in ["direct 169.254.169.254:80", "direct 10.0.2.100:7700", "proxied 169.254.169.254:80", "dns"] {
            assert!(refused(name), "{}: {name}: {log}", t.cloud);
        }
        for name in [format!("proxied 127.0.0.1:{api_port}"), format!("proxied localhost:{api_port}")] {
            assert!(refused(&name), "{}: {name}: {log}", t.cloud);
        }
        // The proxy's refusals are answers (403), not time-outs.
        let proxied_refusal = log.lines().find(|l| l.starts_with(&format!("refused proxied 127.0.0.1:{api_port}")));
        assert!(proxied_refusal.is_some_and(|l| l.contains("403")), "{}: {log}", t.cloud);
        match t.cloud.as_str() {
            "open" => assert_eq!(reached, ["reached allowed: allowed-content"], "{log}"),
            _ => {
                assert!(reached.is_empty(), "egress none reached something: {log}");
                assert!(refused("allowed"), "{log}");
            }
        }
    }
    assert_eq!(secret.connections(), 0, "a guest connected to a host-loopback server");
    assert_eq!(allowed.connections(), 1, "only the open cloud's proxied fetch reached the allowlisted server");
}

/// The first line of rendered user-data after its shebang.
const USER_DATA_MARK: &[u8] = b"# kiln user-data: download kiln's agent";

/// The raw answer to `GET path` sent over a Unix socket (plain HTTP/1.0).
async fn get_over_socket(socket: &std::path::Path, path: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let _ = stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: kiln\r\n\r\n").as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    answer
}

// With a live target's id (and its build's) in hand, every route of every
// listener is asked, on TCP and on the guests' Unix sockets: the public API's
// documented paths, the agent routes and the bootstrap routes, the old seed
// route included. No answer holds the one-time token or the user-data.
#[tokio::test]
async fn no_listener_serves_the_token_or_user_data() {
    let bed = Bed::with(Options::qemu()).await;
    let _: serde_json::Value =
        bed.client.post("/v1/clouds", &json!({"name": "local", "kind": "qemu"})).await.expect("add cloud");
    let mut spec = Bed::spec("quiet", "echo done\n", &["local"]);
    for t in spec.targets.values_mut() {
        t.base_image = kiln_tests::tiny_image().display().to_string();
    }
    bed.create_generator(&spec).await;
    let build = bed.start_build("quiet").await;
    let target = build.targets[0].id;
    let token = bed.app().pki().tokens().token(target);

    let openapi: serde_json::Value =
        serde_json::from_str(include_str!("../../docs/openapi.json")).expect("the checked-in OpenAPI document");
    let mut paths: Vec<String> = openapi["paths"].as_object().unwrap().keys().cloned().collect();
    paths.extend(
        [
            "/bootstrap/v1/seed/{target}/user-data",
            "/bootstrap/v1/seed/{target}/meta-data",
            "/bootstrap/v1/seed/{target}/",
            "/bootstrap/v1/kiln-agent",
            "/agent/v1/targets/{target}/job",
            "/agent/v1/targets/{target}/instruction",
            "/user-data",
            "/latest/user-data",
            "/openstack/latest/user_data",
        ]
        .map(str::to_owned),
    );
    let fill = |p: &str| {
        let mut out = String::new();
        let mut rest = p;
        while let Some(open) = rest.find('{') {
            let close = rest[open..].find('}').map(|c| open + c).unwrap();
            let name = &rest[open + 1..close];
            out.push_str(&rest[..open]);
            out.push_str(&if name == "id" && p.starts_with("/v1/builds") {
                build.id.to_string()
            } else {
                target.to_string()
            });
            rest = &rest[close + 1..];
        }
        out + rest
    };
    let agent = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(bed.app().pki().ca_pem().as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .no_proxy()
        .build()
        .unwrap();
    let plain = reqwest::Client::builder().no_proxy().build().unwrap();
    let addrs = bed.addrs();
    let sockets =
        [GuestSocket::Agent, GuestSocket::Bootstrap, GuestSocket::Egress].map(|s| bed.app().config().guest_socket(s));
    let mut asked = 0;
    for path in paths.iter().map(|p| fill(p)) {
        let urls = [
            format!("http://{}{path}", addrs.api),
            format!("http://{}{path}", addrs.bootstrap),
            format!("https://127.0.0.1:{}{path}", addrs.agent.port()),
        ];
        for url in urls {
            // The public API is asked as its admin, who may see the most.
            let req = if url.starts_with(bed.client.base()) {
                bed.client.request(reqwest::Method::GET, &url[bed.client.base().len()..])
            } else if url.starts_with("https") {
                agent.get(&url)
            } else {
                plain.get(&url)
            };
            let body = match req.send().await {
                Ok(resp) => resp.bytes().await.unwrap_or_default().to_vec(),
                Err(_) => Vec::new(),
            };
            asked += 1;
            assert!(memchr::memmem::find(&body, token.as_bytes()).is_none(), "{url} served the token");
            assert!(memchr::memmem::find(&body, USER_DATA_MARK).is_none(), "{url} served the user-data");
        }
        for socket in &sockets {
            let body = get_over_socket(socket, &path).await;
            asked += 1;
            assert!(
                memchr::memmem::find(&body, token.as_bytes()).is_none(),
                "{} {path} served the token",
                socket.display()
            );
            assert!(memchr::memmem::find(&body, USER_DATA_MARK).is_none(), "{} {path}", socket.display());
        }
    }
    assert!(asked > 100, "every route was asked ({asked} requests)");
    let done: Build = bed.wait(&build).await;
    assert_eq!(done.status, Status::Successful, "the VM still got its user-data from the drive: {done:#?}");
    assert_eq!(bed.log(target).await, b"done\n");
}

// Egress options that cannot be understood are refused where they are given:
// at `cloud add` (400, naming the entry), and for a target's own options when
// its build is asked for; nothing starts.
#[tokio::test]
async fn bad_egress_options_are_refused_up_front() {
    let bed = Bed::with(Options::qemu()).await;
    let cases = [
        (json!({"egress_allow": "10.0.0.0/8, not-a-cidr"}), "\"not-a-cidr\""),
        (json!({"egress_allow": "example.com"}), "\"example.com\""),
        (json!({"egress_allow": "10.0.0.0/33"}), "10.0.0.0/33"),
        (json!({"egress_allow": "host:0"}), "host:0"),
        (json!({"egress": "everything"}), "\"everything\""),
    ];
    for (i, (options, needle)) in cases.iter().enumerate() {
        let cloud = json!({"name": format!("bad{i}"), "kind": "qemu", "options": options});
        let resp = bed.client.request(reqwest::Method::POST, "/v1/clouds").json(&cloud).send().await.unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::BAD_REQUEST, "{options}");
        let body: kiln_protocol::error::ErrorBody = resp.json().await.expect("a JSON error");
        assert!(body.message.contains(needle), "{options}: {}", body.message);
    }
    let clouds: Vec<serde_json::Value> = bed.client.get("/v1/clouds").await.unwrap();
    assert!(clouds.is_empty(), "no bad cloud was stored");

    let _: serde_json::Value =
        bed.client.post("/v1/clouds", &json!({"name": "local", "kind": "qemu"})).await.expect("add cloud");
    let mut spec = Bed::spec("badtarget", "true\n", &["local"]);
    for t in spec.targets.values_mut() {
        t.base_image = kiln_tests::tiny_image().display().to_string();
        t.options.insert("egress_allow".into(), "nonsense".into());
    }
    bed.create_generator(&spec).await;
    let message = bed.refused_build("badtarget").await;
    assert!(message.contains("\"nonsense\""), "{message}");
}
