//! Bounded resources: a target's log quota, the agent listener's checks
//! before any body, and what idle and slow connections may cost a real
//! `kiln serve` on each of its listeners.

use std::time::{Duration, Instant};

use kiln_protocol::agent::paths;
use kiln_protocol::api::{FailureReason, Status};
use kiln_protocol::error::ErrorBody;
use kiln_tests::bed::{Bed, Options};
use kiln_tests::kiln_process::{KilnProcess, free_port};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connections held idle on each listener.
const IDLE: usize = 1000;
/// The most the coordinator's memory may grow while they are held.
const IDLE_BUDGET_KB: u64 = 50 * 1024;

// A script that writes past its target's log quota fails the target with
// reason log_quota; the log committed before the quota stays readable.
#[tokio::test]
async fn a_log_past_its_quota_fails_the_target_and_keeps_the_log() {
    let quota = 64 * 1024;
    let bed = Bed::with(Options { log_quota: quota, ..Options::default() }).await;
    bed.add_cloud("local").await;
    let script = "echo first line\nsleep 1\nhead -c 2000000 /dev/zero | tr '\\0' x\necho never\n";
    let build = bed.build_script("flood", script, Some(120)).await;
    let build = bed.wait(&build).await;
    let target = &build.targets[0];
    assert_eq!(target.status, Status::Failed);
    let err = target.error.as_ref().expect("a failed target has an error");
    assert_eq!(err.reason, FailureReason::LogQuota, "{}", err.message);
    assert!(err.message.contains("--log-quota-bytes"), "{}", err.message);
    let log = bed.log(target.id).await;
    assert!(log.starts_with(b"first line\n"), "{:?}", String::from_utf8_lossy(&log[..log.len().min(100)]));
    assert!(log.len() as u64 <= quota, "{} bytes stored past a quota of {quota}", log.len());
    assert!(bed.provider.live_instances().is_empty(), "the failed target's instance was not removed");
}

// The agent listener refuses a request without the target's certificate
// before reading its body: a body over the size limit gets 401, not 413.
// Enrollment bodies are limited to 16 KiB.
#[tokio::test]
async fn the_agent_listener_checks_the_certificate_before_the_body() {
    let bed = Bed::start().await;
    let anonymous = bed.agent_client_without_certificate();
    let target = "0190a5d2-0000-7000-8000-000000000000";
    let log = paths::LOG.replace("{target}", target);
    let resp = anonymous
        .put(format!("{}{log}?offset=0", bed.agent_url()))
        .body(vec![b'x'; 5 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let err: ErrorBody = resp.json().await.unwrap();
    assert!(err.message.contains("client certificate"), "{}", err.message);

    let big = serde_json::json!({"target": target, "token": "x".repeat(17 * 1024), "csr": ""});
    let resp = anonymous.post(format!("{}{}", bed.agent_url(), paths::ENROLL)).json(&big).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let err: ErrorBody = resp.json().await.unwrap();
    assert!(err.message.contains("too large"), "{}", err.message);
}

/// The resident memory of process `pid`, in KiB.
fn rss_kb(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// How many file descriptors process `pid` has open.
fn fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// Waits (bounded, 60 s) until `done()` holds; whether it did.
async fn until(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..600 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Opens `n` TCP connections to `addr` that send nothing.
async fn hold_idle(addr: &str, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    held
}

/// Sends a request's headers one byte at a time, a byte every 500 ms, and
/// returns how long the server took to close the connection (bounded).
async fn slowloris(addr: &str, limit: Duration) -> Option<Duration> {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let start = Instant::now();
    let request = b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".repeat(4);
    let mut buf = [0u8; 1024];
    for byte in request.iter().cycle() {
        if start.elapsed() > limit {
            return None;
        }
        if conn.write_all(&[*byte]).await.is_err() {
            return Some(start.elapsed());
        }
        // Any answer or end of the connection within the pause: it was cut.
        if tokio::time::timeout(Duration::from_millis(500), conn.read(&mut buf)).await.is_ok() {
            return Some(start.elapsed());
        }
    }
    None
}

// 1,000 idle connections held on each listener of a real `kiln serve`: a
// normal request still answers, the coordinator grows by at most 50 MB, and
// closing them gives the memory back.
// A slowloris connection is closed within the header timeout.
#[tokio::test]
async fn idle_and_slow_connections_are_bounded_on_every_listener() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (api, agent, bootstrap) = (free_port(), free_port(), free_port());
    let addr = |port: u16| format!("127.0.0.1:{port}");
    let header_timeout = Duration::from_secs(3);
    let mut kiln = KilnProcess::spawn(
        [
            "serve",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            &addr(api),
            "--agent-listen",
            &addr(agent),
            "--bootstrap-listen",
            &addr(bootstrap),
            "--header-timeout-secs",
            "3",
        ],
        dir.path(),
    );
    assert!(kiln.wait_for_stderr("kiln coordinator listening", Duration::from_secs(30)).await, "{}", kiln.stderr());
    let pid = kiln.pid().as_raw();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(data.join("pki/ca.crt")).unwrap()).unwrap();
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .build()
        .unwrap();
    // A normal request on each listener, answered with its documented status.
    let normal = || async {
        let health = http.get(format!("http://{}/v1/health", addr(api))).send().await.unwrap();
        assert_eq!(health.status(), StatusCode::OK);
        let agent = http.get(format!("https://localhost:{agent}/nowhere")).send().await.unwrap();
        assert_eq!(agent.status(), StatusCode::NOT_FOUND);
        let boot = http.get(format!("http://{}/nowhere", addr(bootstrap))).send().await.unwrap();
        assert_eq!(boot.status(), StatusCode::NOT_FOUND);
    };
    normal().await;
    let before = rss_kb(pid);
    let open_before = fds(pid);

    for port in [api, agent, bootstrap] {
        let start = rss_kb(pid);
        let held = hold_idle(&addr(port), IDLE).await;
        normal().await;
        let grown = rss_kb(pid).saturating_sub(before);
        let took = rss_kb(pid).saturating_sub(start);
        eprintln!("{IDLE} idle connections on port {port}: {took} KiB more, {grown} KiB above the start");
        assert!(grown <= IDLE_BUDGET_KB, "{IDLE} idle connections on port {port} cost {grown} KiB");
        drop(held);
        assert!(until(|| fds(pid) <= open_before + 16).await, "the coordinator kept the closed connections open");
        // Closing them gives back at least half of what they took (jemalloc
        // purges freed pages in the background within seconds).
        let returned = until(|| rss_kb(pid) <= start + took / 2).await;
        eprintln!("closed again: {} KiB above where the round started", rss_kb(pid).saturating_sub(start));
        assert!(returned, "closing {IDLE} connections gave back less than half of their {took} KiB");
    }

    for port in [api, bootstrap] {
        let closed = slowloris(&addr(port), header_timeout * 4).await;
        eprintln!("a slowloris connection on port {port} was closed after {closed:?}");
        let closed = closed.expect("a slowloris connection was never closed");
        assert!(closed < header_timeout + Duration::from_secs(2), "closed after {closed:?}");
    }
}
