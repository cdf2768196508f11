//! The local cloud's VM boundary, measured from inside real VMs: the tiny
//! image's boot-to-agent and total times (with the cidata drive and the
//! restricted network), and the egress proxy's throughput for a download of
//! `KILN_BENCH_MB` (default 100) MB from a loopback server, timed by the
//! guest and by the server.
//!
//! Run with `scripts/bench-egress`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Instant;

use kiln_coordinator::cli::phases;
use kiln_protocol::api::{Build, Status};
use kiln_tests::bed::{Bed, Options};
use serde_json::json;

#[tokio::main]
async fn main() {
    let mb: usize = std::env::var("KILN_BENCH_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0u8; 4096];
        let _ = stream.read(&mut request);
        let started = Instant::now();
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", mb << 20);
        stream.write_all(head.as_bytes()).unwrap();
        let block = vec![b'k'; 1 << 20];
        for _ in 0..mb {
            stream.write_all(&block).unwrap();
        }
        drop(stream);
        started.elapsed()
    });

    let bed = Bed::with(Options::qemu()).await;
    let allow = format!("127.0.0.1:{port}");
    let cloud = json!({"name": "local", "kind": "qemu", "options": {"egress_allow": allow}});
    let _: serde_json::Value = bed.client.post("/v1/clouds", &cloud).await.unwrap();
    let script = format!(
        "read s _ </proc/uptime\nwget -q -O /dev/null http://127.0.0.1:{port}/blob || exit 1\nread e _ </proc/uptime\necho \"$s $e\"\n"
    );
    let mut spec = Bed::spec("egress", &script, &["local"]);
    for t in spec.targets.values_mut() {
        t.base_image = kiln_tests::tiny_image().display().to_string();
    }
    bed.create_generator(&spec).await;
    let build: Build = bed.wait(&bed.start_build("egress").await).await;
    assert_eq!(build.status, Status::Successful, "{build:#?}");
    let t = &build.targets[0];
    let log = String::from_utf8(bed.log(t.id).await).unwrap();
    let server = served.join().unwrap();

    println!("tiny image, cidata drive, restricted network, TCG:");
    for (phase, secs) in phases(&t.timings) {
        println!("  {phase:<14} {secs:6.1} s");
    }
    let guest: Option<f64> = log
        .split_whitespace()
        .map(|n| n.parse::<f64>().ok())
        .collect::<Option<Vec<_>>>()
        .and_then(|v| (v.len() == 2).then(|| v[1] - v[0]));
    println!("egress proxy, {mb} MB from a loopback server into the VM:");
    if let Some(secs) = guest {
        println!("  guest-timed    {:6.1} MB/s ({secs:.1} s)", mb as f64 * 1.048_576 / secs);
    }
    println!(
        "  server-timed   {:6.1} MB/s ({:.1} s)",
        mb as f64 * 1.048_576 / server.as_secs_f64(),
        server.as_secs_f64()
    );
}
