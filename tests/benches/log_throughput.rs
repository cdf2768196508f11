//! Log streaming figures: throughput from one agent to the coordinator, the
//! agent's peak RSS while streaming, and the static agent's size.
//!
//! Run with `scripts/bench` (release agent) or
//! `cargo bench -p kiln-tests --bench log_throughput` (whatever agent
//! `KILN_AGENT_BINARY` or the test build names). `KILN_BENCH_MB` sets the size.

use std::time::Duration;

use kiln_protocol::api::{Build, Status};
use kiln_tests::bed::Bed;

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
}

#[tokio::main]
async fn main() {
    let mb: u64 = std::env::var("KILN_BENCH_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let agent = kiln_tests::agent_binary();
    let size = std::fs::metadata(&agent).expect("agent binary").len();
    println!("agent binary: {} ({:.1} MB)", agent.display(), size as f64 / 1e6);

    let bed = Bed::start().await;
    bed.add_cloud("local").await;
    // 1 MiB blocks of printable bytes, written as fast as the pipe allows.
    let script = format!("head -c {} /dev/zero | tr '\\0' 'k'\n", mb * 1024 * 1024);
    let build = bed.build_script("throughput", &script, Some(3600)).await;
    let target = build.targets[0].id;

    // Sample the agent's peak RSS while it streams.
    let provider = bed.provider.clone();
    let instance = format!("proc-{target}");
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        for _ in 0..(30 * 60 * 20) {
            match provider.pid(&instance).and_then(vm_hwm_kib) {
                Some(kib) => peak = peak.max(kib),
                None if peak > 0 => break,
                None => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        peak
    });
    let done: Build = bed.wait(&build).await;
    let peak = sampler.await.unwrap();
    assert_eq!(done.status, Status::Successful, "{done:#?}");
    let t = &done.targets[0];
    let bytes = t.log_bytes;
    assert_eq!(bytes, mb * 1024 * 1024);
    let secs = t.timings.script_finished_at.unwrap().duration_since(t.timings.script_started_at.unwrap()).as_secs_f64();
    println!(
        "log streamed: {:.1} MB in {secs:.2} s = {:.1} MB/s (script start to last byte committed)",
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / secs
    );
    println!("agent peak RSS while streaming: {:.1} MB", peak as f64 / 1024.0);
}
