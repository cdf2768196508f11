//! The boot hook (`bootstrap/boot-hook/kiln-boot-hook`) against stub metadata
//! services on loopback and directories standing for the cidata and config
//! drives: every source, their order, retries, giving up, and the
//! download tools of curl-less and busybox-only images, under dash, busybox sh
//! and bash. Plus shellcheck over every shell script in `bootstrap/`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

const HOOK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../bootstrap/boot-hook/kiln-boot-hook");
const BOOTSTRAP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../bootstrap");
/// Every test runs the hook under each of these (argv before the script).
const SHELLS: [&[&str]; 3] = [&["dash"], &["busybox", "sh"], &["bash"]];
/// The IMDSv2 session token the stub hands out and then requires.
const TOKEN: &str = "AQAEAKiLn-t0ken_==";
const CLOUD_CONFIG: &str = "#cloud-config\nruncmd: [touch, /nowhere]\n";
/// A whole run of the hook, however it goes, ends well within this.
const RUN_LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// A stub HTTP/1.x server

/// What the stub saw of one request.
struct Request {
    method: String,
    path: String,
    version: String,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

enum Answer {
    Status(u16, Vec<u8>),
    /// Accept the request and never answer (until the client goes away).
    Silent,
}

type Route = Box<dyn Fn(&Request) -> Answer + Send + Sync>;

/// A one-thread-per-connection HTTP server on 127.0.0.1; it answers each
/// request by `route`, closes every connection after one answer and records
/// `METHOD PATH VERSION` of every request. Stops when dropped.
struct Stub {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<Stop>,
    acceptor: Option<JoinHandle<()>>,
}

/// Set when a stub is dropped; silent connections wait for it.
#[derive(Default)]
struct Stop {
    stopped: Mutex<bool>,
    changed: Condvar,
}

impl Stop {
    fn is_set(&self) -> bool {
        *self.stopped.lock().unwrap()
    }

    fn set(&self) {
        *self.stopped.lock().unwrap() = true;
        self.changed.notify_all();
    }

    /// Blocks until the stub stops, for at most `limit`.
    fn wait(&self, limit: Duration) {
        let stopped = self.stopped.lock().unwrap();
        let _ = self.changed.wait_timeout_while(stopped, limit, |stopped| !*stopped);
    }
}

impl Stub {
    fn start(route: Route) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(Stop::default());
        let route = Arc::new(route);
        let acceptor = {
            let (requests, stop) = (requests.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.is_set() {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (route, requests, stop) = (route.clone(), requests.clone(), stop.clone());
                    std::thread::spawn(move || serve(stream, &route, &requests, &stop));
                }
            })
        };
        Stub { addr, requests, stop, acceptor: Some(acceptor) }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.stop.set();
        // Wakes the acceptor so that it sees `stop`.
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Handles one connection: one request, one answer, close.
fn serve(stream: TcpStream, route: &Route, requests: &Mutex<Vec<String>>, stop: &Stop) {
    // Bounds every read, also on a connection the route keeps silent.
    stream.set_read_timeout(Some(RUN_LIMIT)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return; // the acceptor's wake-up call, or a client that gave up
    }
    let mut words = line.split_whitespace();
    let (method, path, version) = (
        words.next().unwrap_or_default().to_owned(),
        words.next().unwrap_or_default().to_owned(),
        words.next().unwrap_or("HTTP/1.0").to_owned(),
    );
    let mut headers = Vec::new();
    for _ in 0..100 {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim_end().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    let request = Request { method, path, version, headers };
    requests.lock().unwrap().push(format!("{} {} {}", request.method, request.path, request.version));
    let length = request.header("Content-Length").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let _ = std::io::copy(&mut (&mut reader).take(length), &mut std::io::sink());
    let mut stream = reader.into_inner();
    match route(&request) {
        Answer::Status(code, body) => {
            let reason = match code {
                200 => "OK",
                400 => "Bad Request",
                401 => "Unauthorized",
                404 => "Not Found",
                405 => "Method Not Allowed",
                503 => "Service Unavailable",
                _ => "Whatever",
            };
            let head = format!(
                "{} {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                request.version,
                body.len()
            );
            let _ = stream.write_all(&[head.as_bytes(), &body].concat());
            let _ = stream.shutdown(std::net::Shutdown::Write);
        }
        // Holds the connection open, also after the client has shut down its
        // side (busybox nc does at the end of its input), until the stub stops.
        Answer::Silent => stop.wait(RUN_LIMIT),
    }
}

/// An `http://` URL on which nothing listens.
fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

// ---------------------------------------------------------------------------
// The cases

/// What a source answers with.
#[derive(Clone, Copy)]
enum Reply {
    /// A `#!/bin/sh` user-data that writes `ran-from-NAME` to `$OUT`; NAME is
    /// the source name the hook is expected to log.
    Script(&'static str),
    CloudConfig,
    /// 503 to the first N requests, then `Script(NAME)`.
    FailFirst(usize, &'static str),
    /// 200 with nothing in it (an empty file on a drive).
    Empty,
}

/// One metadata source the test machine offers.
#[derive(Clone, Copy)]
enum Offer {
    /// `user-data` (and `meta-data`) in the directory standing for the cidata drive.
    Cidata(Reply),
    /// The directory standing for the cidata drive, with `meta-data` and no `user-data`.
    CidataWithoutUserData,
    /// `/var/nimbus-metadata-server-url` → `<stub>/nimbus/`.
    Nimbus(Reply),
    /// `ds=nocloud;s=<stub>/nocloud/` on `/proc/cmdline`.
    NocloudCmdline(Reply),
    /// `ds=nocloud-net;seedfrom=<stub>/nocloud` (no trailing slash) as SMBIOS serial.
    NocloudSerial(Reply),
    /// `openstack/latest/user_data` in the directory standing for the config drive.
    ConfigDrive(Reply),
    /// IMDS answering the token PUT and requiring the token on GET.
    ImdsV2(Reply),
    /// IMDS answering the token PUT with this status and GET without a token.
    ImdsV1(u16, Reply),
    /// The OpenStack metadata service at the IMDS address.
    Openstack(Reply),
    /// Something at the IMDS address accepting connections and never answering.
    SilentImds,
}

/// The download tools on `PATH`.
#[derive(Clone, Copy, PartialEq)]
enum Tools {
    /// This machine's `PATH`: curl is there.
    Host,
    /// This machine's tools without curl: GNU wget, no nc.
    NoCurl,
    /// Nothing but busybox applets: its wget (cannot PUT) and nc.
    Busybox,
    /// Busybox applets without `timeout`: the hook's own watchdog bounds requests.
    BusyboxNoTimeout,
}

enum Expect {
    /// Exit 0 after the user-data from this source ran.
    Ran(&'static str),
    /// Exit 0, the cloud-config from this source saved and not run.
    Saved(&'static str),
    /// Exit non-zero after all attempts.
    GaveUp,
}

struct Case {
    offers: &'static [Offer],
    tools: Tools,
    attempts: u32,
    /// `KILN_HOOK_TIMEOUT`: 1 where a request must time out; 5 elsewhere,
    /// where it costs nothing (stubs answer at once, closed ports refuse).
    timeout: u32,
    expect: Expect,
    /// Each must match one line of stderr; `*` stands for any text.
    stderr: &'static [&'static str],
    /// Each must be a prefix of a request the stub saw (`METHOD PATH VERSION`).
    requests: &'static [&'static str],
    /// None may be a prefix of a request the stub saw.
    no_requests: &'static [&'static str],
}

const CASE: Case = Case {
    offers: &[],
    tools: Tools::Host,
    attempts: 5,
    timeout: 5,
    expect: Expect::GaveUp,
    stderr: &[],
    requests: &[],
    no_requests: &[],
};

macro_rules! cases {
    ($($name:ident: $case:expr;)*) => {
        $(
            #[tokio::test]
            async fn $name() {
                check(&$case).await;
            }
        )*
    };
}

cases! {
    // user-data at the root of the cidata drive runs, with no HTTP at all.
    cidata_drive: Case {
        offers: &[Offer::Cidata(Reply::Script("cidata"))],
        expect: Expect::Ran("cidata"),
        stderr: &["attempt 1: cidata: */cidata user-data (40 bytes)"],
        no_requests: &["GET ", "PUT "],
        ..CASE
    };
    // The cidata drive comes first: with user-data at every source, the drive's runs and no stub is asked anything.
    cidata_beats_every_other_source: Case {
        offers: &[
            Offer::ImdsV2(Reply::Script("ec2-imdsv2")),
            Offer::Openstack(Reply::Script("openstack")),
            Offer::ConfigDrive(Reply::Script("config-drive")),
            Offer::NocloudCmdline(Reply::Script("nocloud")),
            Offer::Nimbus(Reply::Script("nimbus")),
            Offer::Cidata(Reply::Script("cidata")),
        ],
        expect: Expect::Ran("cidata"),
        stderr: &["attempt 1: cidata: */cidata user-data (40 bytes)"],
        no_requests: &["GET ", "PUT "],
        ..CASE
    };
    // No cidata drive: the attempt says so and goes on to the next source.
    no_cidata_drive_falls_through: Case {
        offers: &[Offer::Nimbus(Reply::Script("nimbus"))],
        expect: Expect::Ran("nimbus"),
        stderr: &["attempt 1: cidata: no drive labelled cidata", "attempt 1: nimbus: GET * via curl: HTTP 200"],
        requests: &["GET /nimbus/latest/user-data "],
        ..CASE
    };
    // A cidata drive without user-data (meta-data only) is not a source: the NoCloud network seed is next.
    cidata_drive_without_user_data_falls_through: Case {
        offers: &[Offer::CidataWithoutUserData, Offer::NocloudCmdline(Reply::Script("nocloud"))],
        expect: Expect::Ran("nocloud"),
        stderr: &["attempt 1: cidata: */cidata has no user-data", "attempt 1: nocloud: GET * via curl: HTTP 200"],
        requests: &["GET /nocloud/user-data "],
        ..CASE
    };
    // An empty user-data on the cidata drive is skipped like an empty answer, and IMDS is asked.
    empty_cidata_user_data_is_skipped: Case {
        offers: &[Offer::Cidata(Reply::Empty), Offer::ImdsV2(Reply::Script("ec2-imdsv2"))],
        expect: Expect::Ran("ec2-imdsv2"),
        stderr: &["attempt 1: cidata: */cidata user-data (0 bytes), empty"],
        requests: &["PUT /latest/api/token ", "GET /latest/user-data "],
        ..CASE
    };
    // A cidata drive whose user-data stays empty: looked at in every attempt, then the hook gives up.
    gives_up_on_an_empty_cidata_user_data: Case {
        offers: &[Offer::Cidata(Reply::Empty)],
        attempts: 2,
        expect: Expect::GaveUp,
        stderr: &["attempt 2: cidata: */cidata user-data (0 bytes), empty"],
        ..CASE
    };
    // A #cloud-config on the cidata drive is saved but not run.
    cidata_cloud_config_is_saved_not_run: Case {
        offers: &[Offer::Cidata(Reply::CloudConfig)],
        expect: Expect::Saved("cidata"),
        ..CASE
    };
    // An empty 200 answer is skipped, and the next source's user-data runs.
    empty_answer_is_skipped: Case {
        offers: &[Offer::Nimbus(Reply::Empty), Offer::NocloudCmdline(Reply::Script("nocloud"))],
        expect: Expect::Ran("nocloud"),
        stderr: &["attempt 1: nimbus: GET * via curl: HTTP 200, empty"],
        requests: &["GET /nimbus/latest/user-data ", "GET /nocloud/user-data "],
        ..CASE
    };
    // The Nimbus URL file (padded, trailing slash) leads to <URL>/latest/user-data, which runs.
    nimbus_url_file: Case {
        offers: &[Offer::Nimbus(Reply::Script("nimbus"))],
        expect: Expect::Ran("nimbus"),
        stderr: &["attempt 1: nimbus: GET http://127.0.0.1:*/nimbus/latest/user-data via curl: HTTP 200"],
        requests: &["GET /nimbus/latest/user-data "],
        ..CASE
    };
    // ds=nocloud;s=URL/ among other words on the kernel command line leads to ${URL}user-data.
    nocloud_on_kernel_command_line: Case {
        offers: &[Offer::NocloudCmdline(Reply::Script("nocloud"))],
        expect: Expect::Ran("nocloud"),
        stderr: &["attempt 1: nocloud: GET http://127.0.0.1:*/nocloud/user-data via curl: HTTP 200"],
        requests: &["GET /nocloud/user-data "],
        ..CASE
    };
    // ds=nocloud-net;seedfrom=URL (no trailing slash) as SMBIOS serial leads to ${URL}/user-data.
    nocloud_in_smbios_serial: Case {
        offers: &[Offer::NocloudSerial(Reply::Script("nocloud"))],
        expect: Expect::Ran("nocloud"),
        requests: &["GET /nocloud/user-data "],
        ..CASE
    };
    // openstack/latest/user_data on the config drive runs, with no HTTP at all.
    config_drive: Case {
        offers: &[Offer::ConfigDrive(Reply::Script("config-drive"))],
        expect: Expect::Ran("config-drive"),
        stderr: &["attempt 1: config-drive: read openstack/latest/user_data from *"],
        ..CASE
    };
    // IMDSv2: the token from the PUT is sent with the GET (the stub refuses the GET without it).
    ec2_imdsv2_with_token: Case {
        offers: &[Offer::ImdsV2(Reply::Script("ec2-imdsv2"))],
        expect: Expect::Ran("ec2-imdsv2"),
        stderr: &["attempt 1: ec2: PUT http://127.0.0.1:*/latest/api/token via curl: HTTP 200, got a token"],
        requests: &["PUT /latest/api/token ", "GET /latest/user-data "],
        ..CASE
    };
    // A 405 to the token PUT makes the hook fall back to a plain IMDSv1 GET.
    ec2_imdsv1_when_put_is_405: Case {
        offers: &[Offer::ImdsV1(405, Reply::Script("ec2-imdsv1"))],
        expect: Expect::Ran("ec2-imdsv1"),
        stderr: &["attempt 1: ec2: PUT * via curl: HTTP 405, no token: trying IMDSv1"],
        requests: &["PUT /latest/api/token ", "GET /latest/user-data "],
        ..CASE
    };
    // A 404 to the token PUT makes the hook fall back to a plain IMDSv1 GET.
    ec2_imdsv1_when_put_is_404: Case {
        offers: &[Offer::ImdsV1(404, Reply::Script("ec2-imdsv1"))],
        expect: Expect::Ran("ec2-imdsv1"),
        stderr: &["attempt 1: ec2: PUT * HTTP 404, no token: trying IMDSv1"],
        ..CASE
    };
    // When EC2's paths are 404, the OpenStack metadata service's user_data runs.
    openstack_metadata_service: Case {
        offers: &[Offer::Openstack(Reply::Script("openstack"))],
        expect: Expect::Ran("openstack"),
        stderr: &[
            "attempt 1: ec2-imdsv1: GET */latest/user-data via curl: HTTP 404",
            "attempt 1: openstack: GET http://127.0.0.1:*/openstack/latest/user_data via curl: HTTP 200",
        ],
        requests: &["GET /openstack/latest/user_data "],
        ..CASE
    };
    // With user-data at both Nimbus and IMDS, Nimbus wins and IMDS is never asked.
    nimbus_beats_imds: Case {
        offers: &[Offer::ImdsV2(Reply::Script("ec2-imdsv2")), Offer::Nimbus(Reply::Script("nimbus"))],
        expect: Expect::Ran("nimbus"),
        no_requests: &["PUT /latest/api/token", "GET /latest/user-data"],
        ..CASE
    };
    // With user-data at both NoCloud and IMDS, NoCloud wins and IMDS is never asked.
    nocloud_beats_imds: Case {
        offers: &[Offer::ImdsV2(Reply::Script("ec2-imdsv2")), Offer::NocloudCmdline(Reply::Script("nocloud"))],
        expect: Expect::Ran("nocloud"),
        no_requests: &["PUT /latest/api/token", "GET /latest/user-data"],
        ..CASE
    };
    // A source answering 503 three times is retried, one request per attempt, and found on attempt 4.
    retries_until_the_source_answers: Case {
        offers: &[Offer::Nimbus(Reply::FailFirst(3, "nimbus"))],
        attempts: 10,
        expect: Expect::Ran("nimbus"),
        stderr: &[
            "attempt 1 of 10",
            "attempt 1: nimbus: GET * via curl: HTTP 503",
            "attempt 2: nimbus: GET * via curl: HTTP 503",
            "attempt 3: nimbus: GET * via curl: HTTP 503",
            "attempt 4: nimbus: GET * via curl: HTTP 200",
        ],
        ..CASE
    };
    // A metadata service that accepts connections and never answers cannot hang the hook: it gives up and says so.
    gives_up_on_a_silent_server: Case {
        offers: &[Offer::SilentImds],
        attempts: 2,
        timeout: 1,
        expect: Expect::GaveUp,
        stderr: &[
            "attempt 2 of 2",
            "attempt 2: ec2: PUT * no answer (curl exit *), no token: trying IMDSv1",
            "attempt 2: openstack: GET * no answer (curl exit *",
        ],
        ..CASE
    };
    // Nothing anywhere: every attempt is logged, then the hook exits non-zero.
    gives_up_when_there_is_no_source: Case {
        attempts: 3,
        expect: Expect::GaveUp,
        stderr: &["attempt 3 of 3", "attempt 3: ec2-imdsv1: GET * no answer*"],
        ..CASE
    };
    // A #cloud-config user-data is saved but not run, and the hook exits 0.
    cloud_config_is_saved_not_run: Case {
        offers: &[Offer::ImdsV2(Reply::CloudConfig)],
        expect: Expect::Saved("ec2-imdsv2"),
        ..CASE
    };
    // On a busybox-only image the IMDSv2 token PUT goes through nc (HTTP/1.0) and the GET through busybox wget.
    busybox_only_puts_with_nc: Case {
        offers: &[Offer::ImdsV2(Reply::Script("ec2-imdsv2"))],
        tools: Tools::Busybox,
        expect: Expect::Ran("ec2-imdsv2"),
        stderr: &[
            "attempt 1: ec2: PUT * via nc: HTTP 200, got a token",
            "attempt 1: ec2-imdsv2: GET * via wget: HTTP 200",
        ],
        requests: &["PUT /latest/api/token HTTP/1.0", "GET /latest/user-data "],
        ..CASE
    };
    // On a busybox-only image the cidata drive's user-data is read with busybox's tools alone.
    busybox_only_reads_cidata: Case {
        offers: &[Offer::Cidata(Reply::Script("cidata")), Offer::ImdsV2(Reply::Script("ec2-imdsv2"))],
        tools: Tools::Busybox,
        expect: Expect::Ran("cidata"),
        stderr: &["attempt 1: cidata: */cidata user-data (40 bytes)"],
        no_requests: &["GET ", "PUT "],
        ..CASE
    };
    // Busybox wget's failures are read as HTTP statuses and retried like curl's.
    busybox_only_retries_503: Case {
        offers: &[Offer::NocloudSerial(Reply::FailFirst(3, "nocloud"))],
        tools: Tools::Busybox,
        attempts: 10,
        expect: Expect::Ran("nocloud"),
        stderr: &[
            "attempt 3: nocloud: GET * via wget: HTTP 503",
            "attempt 4: nocloud: GET * via wget: HTTP 200",
        ],
        ..CASE
    };
    // On a busybox image without timeout(1), the hook's own watchdog ends requests to a silent server.
    busybox_without_timeout_gives_up_on_a_silent_server: Case {
        offers: &[Offer::SilentImds],
        tools: Tools::BusyboxNoTimeout,
        attempts: 2,
        timeout: 1,
        expect: Expect::GaveUp,
        stderr: &[
            "attempt 2: ec2: PUT * via nc: no answer (nc exit *), no token: trying IMDSv1",
            "attempt 2: ec2-imdsv1: GET * via wget: no answer*",
        ],
        ..CASE
    };
    // Without curl, GNU wget fetches; it cannot PUT (and there is no nc), so EC2 falls back to IMDSv1.
    no_curl_uses_wget: Case {
        offers: &[Offer::ImdsV1(405, Reply::Script("ec2-imdsv1"))],
        tools: Tools::NoCurl,
        expect: Expect::Ran("ec2-imdsv1"),
        stderr: &[
            "attempt 1: ec2: PUT * no curl, wget or nc that can PUT, no token: trying IMDSv1",
            "attempt 1: ec2-imdsv1: GET * via wget: HTTP 200",
        ],
        requests: &["GET /latest/user-data "],
        no_requests: &["PUT "],
        ..CASE
    };
}

// ---------------------------------------------------------------------------
// Running a case

fn body(reply: Reply, served: &AtomicUsize) -> Answer {
    let script = |name: &str| Answer::Status(200, format!("#!/bin/sh\necho ran-from-{name} > \"$OUT\"\n").into_bytes());
    match reply {
        Reply::Script(name) => script(name),
        Reply::CloudConfig => Answer::Status(200, CLOUD_CONFIG.into()),
        Reply::Empty => Answer::Status(200, Vec::new()),
        Reply::FailFirst(n, name) => {
            if served.fetch_add(1, Ordering::SeqCst) < n {
                Answer::Status(503, b"try later\n".to_vec())
            } else {
                script(name)
            }
        }
    }
}

/// The stub's routes for `offers`: Nimbus under /nimbus/, NoCloud under
/// /nocloud/, EC2 and OpenStack at their real paths; anything else is 404.
fn router(offers: &'static [Offer]) -> Route {
    let served: Vec<AtomicUsize> = offers.iter().map(|_| AtomicUsize::new(0)).collect();
    Box::new(move |req: &Request| {
        let get = req.method == "GET";
        for (offer, served) in offers.iter().zip(&served) {
            match (*offer, req.path.as_str()) {
                (Offer::SilentImds, _) => return Answer::Silent,
                (Offer::Nimbus(reply), "/nimbus/latest/user-data")
                | (Offer::NocloudCmdline(reply) | Offer::NocloudSerial(reply), "/nocloud/user-data")
                | (Offer::Openstack(reply), "/openstack/latest/user_data")
                | (Offer::ImdsV1(_, reply), "/latest/user-data")
                    if get =>
                {
                    return body(reply, served);
                }
                (Offer::ImdsV1(status, _), "/latest/api/token") => {
                    return Answer::Status(status, Vec::new());
                }
                (Offer::ImdsV2(_), "/latest/api/token") => {
                    return match (req.method.as_str(), req.header("X-aws-ec2-metadata-token-ttl-seconds")) {
                        ("PUT", Some("21600")) => Answer::Status(200, TOKEN.into()),
                        ("PUT", _) => Answer::Status(400, b"bad ttl\n".to_vec()),
                        _ => Answer::Status(405, Vec::new()),
                    };
                }
                (Offer::ImdsV2(reply), "/latest/user-data") if get => {
                    return if req.header("X-aws-ec2-metadata-token") == Some(TOKEN) {
                        body(reply, served)
                    } else {
                        Answer::Status(401, b"token required\n".to_vec())
                    };
                }
                _ => {}
            }
        }
        Answer::Status(404, b"not found\n".to_vec())
    })
}

/// The absolute path of `program` on this process's `PATH`.
fn which(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{program} is not installed, and the boot hook tests need it"))
}

/// A directory of symlinks to serve as the hook's whole `PATH` for `tools`.
fn tool_dir(tools: Tools, dir: &Path) -> Option<PathBuf> {
    // Everything the hook calls besides shell builtins, plus what curl/wget/nc replace.
    const BASICS: &[&str] = &["cat", "mkdir", "rm", "mv", "chmod", "sed", "tr", "wc", "dd", "sleep", "timeout"];
    let links: Vec<(&str, PathBuf)> = match tools {
        Tools::Host => return None,
        Tools::NoCurl => BASICS.iter().chain(&["wget"]).map(|&name| (name, which(name))).collect(),
        Tools::Busybox | Tools::BusyboxNoTimeout => {
            let busybox = which("busybox");
            BASICS
                .iter()
                .chain(&["sh", "wget", "nc", "head", "kill", "mount", "umount", "findfs"])
                .filter(|&&name| !(name == "timeout" && tools == Tools::BusyboxNoTimeout))
                .map(|&name| (name, busybox.clone()))
                .collect()
        }
    };
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    for (name, target) in links {
        symlink(target, bin.join(name)).unwrap();
    }
    Some(bin)
}

fn write(path: &Path, contents: impl AsRef<[u8]>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, contents).unwrap();
}

/// Whether some line of `text` holds the `*`-separated parts of `pattern` in order.
fn has_line(text: &str, pattern: &str) -> bool {
    text.lines().any(|line| {
        let mut rest = line;
        pattern.split('*').all(|part| match rest.find(part) {
            Some(i) => {
                rest = &rest[i + part.len()..];
                true
            }
            None => false,
        })
    })
}

/// Runs the hook for `case` under `shell` on a fresh test machine; returns
/// a failure description, if any.
async fn run(case: &'static Case, shell: &'static [&'static str]) -> Result<(), String> {
    let tmp = tempfile::tempdir().unwrap();
    let stub = Stub::start(router(case.offers));
    let url = stub.url();
    let root = tmp.path().join("root");
    let mut cmdline = "BOOT_IMAGE=/vmlinuz-6.1.0-13-amd64 root=/dev/vda1 ro console=ttyS0 quiet".to_owned();
    let mut serial = "ec2a3fd2-8ba1-d1bb-3e27-9b5c8a3e2e51".to_owned();
    let mut imds = closed_port_url();
    let config_drive = tmp.path().join("config-drive");
    let cidata = tmp.path().join("cidata");
    for offer in case.offers {
        match *offer {
            Offer::Cidata(reply) => {
                let Answer::Status(200, user_data) = body(reply, &AtomicUsize::new(0)) else {
                    unreachable!("a cidata drive holds a file")
                };
                write(&cidata.join("user-data"), user_data);
                write(&cidata.join("meta-data"), "instance-id: kiln-test\n");
            }
            Offer::CidataWithoutUserData => write(&cidata.join("meta-data"), "instance-id: kiln-test\n"),
            Offer::Nimbus(_) => write(&root.join("var/nimbus-metadata-server-url"), format!("  {url}/nimbus/ \n")),
            Offer::NocloudCmdline(_) => cmdline.push_str(&format!(" ds=nocloud;s={url}/nocloud/ splash")),
            Offer::NocloudSerial(_) => serial = format!("ds=nocloud-net;seedfrom={url}/nocloud"),
            Offer::ConfigDrive(reply) => {
                let Answer::Status(200, user_data) = body(reply, &AtomicUsize::new(0)) else {
                    unreachable!("a config drive holds a file")
                };
                write(&config_drive.join("openstack/latest/user_data"), user_data);
            }
            Offer::ImdsV2(_) | Offer::ImdsV1(..) | Offer::Openstack(_) | Offer::SilentImds => {
                imds.clone_from(&url);
            }
        }
    }
    write(&root.join("proc/cmdline"), cmdline + "\n");
    write(&root.join("sys/class/dmi/id/product_serial"), serial + "\n");

    let user_data_dir = tmp.path().join("run/kiln");
    let user_data = user_data_dir.join("user-data");
    let out = tmp.path().join("out");
    let mut cmd = tokio::process::Command::new(which(shell[0]));
    cmd.args(&shell[1..])
        .arg(HOOK)
        .env("KILN_HOOK_ROOT", &root)
        .env("KILN_HOOK_USER_DATA", &user_data)
        .env("KILN_HOOK_IMDS", &imds)
        .env("KILN_HOOK_CIDATA", &cidata)
        .env("KILN_HOOK_CONFIG_DRIVE", &config_drive)
        .env("KILN_HOOK_ATTEMPTS", case.attempts.to_string())
        .env("KILN_HOOK_DELAY", "0")
        .env("KILN_HOOK_TIMEOUT", case.timeout.to_string())
        .env("OUT", &out)
        // Metadata requests must ignore proxies: this one would swallow them.
        .env("http_proxy", closed_port_url())
        .env("HTTP_PROXY", closed_port_url())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(bin) = tool_dir(case.tools, tmp.path()) {
        cmd.env("PATH", bin);
    }
    let Output { status, stderr, .. } = tokio::time::timeout(RUN_LIMIT, cmd.output())
        .await
        .map_err(|_| format!("still running after {RUN_LIMIT:?}"))?
        .map_err(|e| format!("cannot start {}: {e}", shell[0]))?;
    let stderr = String::from_utf8_lossy(&stderr);
    let requests = stub.requests();
    let fail = |what: String| Err(format!("{what}\nexit: {status}\nstderr:\n{stderr}\nrequests: {requests:#?}"));

    let marker = std::fs::read_to_string(&out).ok();
    let saved = std::fs::read_to_string(&user_data).ok();
    let mode = std::fs::metadata(&user_data).ok().map(|m| m.permissions().mode() & 0o777);
    match case.expect {
        Expect::Ran(source) => {
            let ran = format!("ran-from-{source}\n");
            if !status.success() || marker.as_ref() != Some(&ran) {
                return fail(format!("expected the user-data from {source} to run, OUT holds {marker:?}"));
            }
            if saved.as_deref().is_none_or(|s| !s.contains(&ran[..ran.len() - 1])) || mode != Some(0o700) {
                return fail(format!("expected the script saved with mode 700, got {saved:?}, {mode:?}"));
            }
            let running = format!("kiln-boot-hook: running user-data from {source} with /bin/sh");
            if !has_line(&stderr, &running) {
                return fail(format!("expected the line {running:?}"));
            }
        }
        Expect::Saved(source) => {
            if !status.success() || marker.is_some() {
                return fail("expected exit 0 and nothing run".into());
            }
            if saved.as_deref() != Some(CLOUD_CONFIG) || mode != Some(0o600) {
                return fail(format!("expected the cloud-config saved with mode 600, got {saved:?}, {mode:?}"));
            }
            let line = format!("kiln-boot-hook: user-data from {source} is not a script; nothing to run");
            if !has_line(&stderr, &line) {
                return fail(format!("expected the line {line:?}"));
            }
        }
        Expect::GaveUp => {
            if status.success() || marker.is_some() || saved.is_some() {
                return fail("expected a failure, nothing saved and nothing run".into());
            }
            let line = format!("kiln-boot-hook: no user-data after {} attempts", case.attempts);
            if !has_line(&stderr, &line) {
                return fail(format!("expected the line {line:?}"));
            }
        }
    }
    for pattern in case.stderr {
        if !has_line(&stderr, &format!("kiln-boot-hook: {pattern}")) {
            return fail(format!("expected a line like {pattern:?}"));
        }
    }
    if let Some(line) = stderr.lines().find(|l| !l.starts_with("kiln-boot-hook: ")) {
        return fail(format!("unexpected stderr line {line:?}"));
    }
    for prefix in case.requests {
        if !requests.iter().any(|r| r.starts_with(prefix)) {
            return fail(format!("expected a request {prefix:?}"));
        }
    }
    for prefix in case.no_requests {
        if requests.iter().any(|r| r.starts_with(prefix)) {
            return fail(format!("expected no request {prefix:?}"));
        }
    }
    // The scratch directory (IMDS token, responses) is gone, run or not.
    let leftovers: Vec<_> =
        std::fs::read_dir(&user_data_dir).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    if leftovers.iter().any(|n| n.to_string_lossy().starts_with(".kiln-boot-hook")) {
        return fail(format!("left behind in {}: {leftovers:?}", user_data_dir.display()));
    }
    Ok(())
}

/// Runs `case` under every shell at once; fails with every shell's failure.
async fn check(case: &'static Case) {
    let results = futures::future::join_all(SHELLS.map(|shell| run(case, shell))).await;
    let failures: Vec<String> = SHELLS
        .iter()
        .zip(results)
        .filter_map(|(shell, result)| result.err().map(|e| format!("under {}: {e}", shell.join(" "))))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

// ---------------------------------------------------------------------------

// Every shell script in bootstrap/ passes shellcheck, the ones images run as POSIX sh.
#[test]
fn bootstrap_is_shellcheck_clean() {
    let root = Path::new(BOOTSTRAP);
    let posix =
        ["boot-hook/kiln-boot-hook", "boot-hook/kiln-boot-hook.init", "templates/user-data.sh"].map(|p| root.join(p));
    let mut others = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "sh") && !posix.contains(&path) {
                others.push(path);
            }
        }
    }
    others.sort();
    let mut runs = vec![(vec!["-s", "sh"], posix.to_vec())];
    if !others.is_empty() {
        runs.push((vec![], others));
    }
    for (args, files) in runs {
        let output = Command::new("shellcheck").args(args).args(&files).output().expect("shellcheck is not installed");
        assert!(
            output.status.success(),
            "shellcheck {files:?}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
