//! Nothing lost, nothing twice: through a flaky network and a coordinator restart.

use std::time::Duration;

use kiln_protocol::api::Status;
use kiln_tests::bed::Bed;
use kiln_tests::proxy::ChaosProxy;
use rand::Rng;

fn seq(from: u64, to: u64) -> String {
    (from..=to).map(|i| format!("{i}\n")).collect()
}

// A proxy between agent and coordinator cuts every connection at 100 random
// moments while the script writes 5 MB: the log is byte-identical.
#[tokio::test]
async fn log_survives_a_hundred_connection_cuts() {
    let bed = Bed::start().await;
    let proxy = ChaosProxy::start(bed.addrs().agent).await;
    bed.provider.route_agents_through(format!("https://{}", proxy.addr));
    bed.add_cloud("local").await;
    // 100 batches of 7,500 numbers, paced so the cuts land mid-stream: 5.1 MB.
    let script = "i=0\nwhile [ $i -lt 100 ]; do seq $((i*7500+1)) $(((i+1)*7500)); i=$((i+1)); sleep 0.25; done\n";
    let build = bed.build_script("chaos", script, None).await;
    let target = build.targets[0].id;

    let chaos = async {
        for _ in 0..100 {
            let wait = rand::rng().random_range(50..300);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            proxy.cut_all();
        }
    };
    let (log, ()) = tokio::join!(bed.follow(target), chaos);
    let build = bed.wait(&build).await;

    let expected = seq(1, 750_000);
    assert!(expected.len() > 5_000_000);
    assert_eq!(build.status, Status::Successful, "{build:#?}");
    assert!(log == expected.as_bytes(), "the live log differs from the script's output");
    assert!(bed.log(target).await == expected.as_bytes(), "the stored log differs from the script's output");
    eprintln!("{} of 100 cuts hit a live connection", proxy.severed());
    assert!(proxy.severed() >= 25, "only {} cuts hit a live connection", proxy.severed());
}

// The coordinator stopped mid-script and started again on the same data
// directory: the build still finishes, with the complete log.
#[tokio::test]
async fn build_survives_coordinator_restart() {
    let mut bed = Bed::start().await;
    bed.add_cloud("local").await;
    let gate = bed.dir.path().join("gate");
    let mut spec = Bed::spec(
        "restart",
        "seq 1 20000\nwhile [ ! -e \"$GATE\" ]; do sleep 0.05; done\nseq 20001 40000\n",
        &["local"],
    );
    spec.env.insert("GATE".into(), gate.display().to_string());
    bed.create_generator(&spec).await;
    let build = bed.start_build("restart").await;
    let target = build.targets[0].id;
    let first = seq(1, 20000);
    bed.follow_until(target, |log| log.len() >= first.len()).await;

    bed.restart().await;
    std::fs::write(&gate, "open").unwrap();
    let log = bed.follow(target).await;
    let build = bed.wait(&build).await;

    assert_eq!(build.status, Status::Successful, "{build:#?}");
    assert!(log == seq(1, 40000).as_bytes(), "the log after the restart is not the script's output");
    assert!(bed.provider.live_instances().is_empty());
}
