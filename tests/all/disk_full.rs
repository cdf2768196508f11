//! A full data directory: the coordinator's disk fills up mid-build. The
//! target fails saying so, the log stays a prefix of what the script
//! printed, a database write that fails answers 503, and the coordinator
//! keeps serving.

use std::io::Write;

use kiln_protocol::api::{Build, FailureReason, Status};
use kiln_protocol::error::{ErrorBody, ErrorCode};
use kiln_tests::bed::{Bed, Options};
use kiln_tests::smallfs::SmallFs;
use reqwest::{Method, StatusCode};

/// The data directory's file system.
const FS_SIZE: u64 = 16 << 20;
/// What the coordinator keeps free there for its database.
const RESERVE: u64 = 4 << 20;
/// The script prints `seq 1 LINES`: 21.9 MB, more than the file system holds.
const LINES: u64 = 3_000_000;

fn seq(to: u64) -> Vec<u8> {
    (1..=to).flat_map(|i| format!("{i}\n").into_bytes()).collect()
}

/// GET /v1/builds and /v1/health both answer 200.
async fn still_serving(bed: &Bed) {
    let builds: Vec<Build> = bed.client.get("/v1/builds").await.expect("GET /v1/builds");
    assert!(!builds.is_empty());
    let health = bed.anonymous().request(Method::GET, "/v1/health").send().await.expect("GET /v1/health");
    assert_eq!(health.status(), StatusCode::OK);
}

// The data directory on a 16 MiB tmpfs; the script prints 22 MB.
#[tokio::test]
async fn a_full_data_directory_fails_the_target_and_keeps_serving() {
    let fs = SmallFs::mount(FS_SIZE);
    let data_dir = fs.path().join("data");
    let bed =
        Bed::with(Options { data_dir: Some(data_dir.clone()), disk_reserve: Some(RESERVE), ..Options::default() })
            .await;
    bed.add_cloud("local").await;
    let build = bed.build_script("flood", &format!("seq 1 {LINES}\n"), Some(300)).await;
    let build = bed.wait(&build).await;
    let target = &build.targets[0];

    // The target failed and says why and what to do.
    assert_eq!(target.status, Status::Failed, "{build:#?}");
    let err = target.error.as_ref().expect("a failed target has an error");
    assert_eq!(err.reason, FailureReason::DiskFull, "{}", err.message);
    for words in ["data directory", "is full", "Free space", "kiln image rm"] {
        assert!(err.message.contains(words), "{words:?} is not in: {}", err.message);
    }
    assert!(err.message.contains(&data_dir.display().to_string()), "{}", err.message);
    assert!(bed.provider.live_instances().is_empty(), "the failed target's instance was not removed");

    // What was committed is exactly the start of what the script printed,
    // and the reserve was kept.
    let expected = seq(LINES);
    let log = bed.log(target.id).await;
    assert!(log.len() > 1 << 20, "only {} bytes were committed", log.len());
    assert!(expected.starts_with(&log), "the stored log is not a prefix of the script's output");
    assert!(fs.available() >= RESERVE / 2, "only {} bytes left free", fs.available());
    still_serving(&bed).await;

    // Now fill the disk to the last byte (as another program might): a
    // database write fails with a JSON 503, and reads still answer.
    let mut filler = std::fs::File::create(fs.path().join("filler")).unwrap();
    let block = vec![0u8; 64 * 1024];
    let mut filled = false;
    for _ in 0..(FS_SIZE / block.len() as u64 + 1) {
        if let Err(e) = filler.write_all(&block) {
            assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}");
            filled = true;
            break;
        }
    }
    assert!(filled, "the file system did not fill");
    let mut spec = Bed::spec("after", &format!("# {}\necho after\n", "x".repeat(256 * 1024)), &["local"]);
    spec.description = "written to a full disk".into();
    let resp = bed.client.request(Method::POST, "/v1/generators").json(&spec).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: ErrorBody = resp.json().await.expect("a JSON error");
    assert_eq!(body.code, ErrorCode::Unavailable);
    assert!(body.message.contains("disk of its data directory is full"), "{}", body.message);
    still_serving(&bed).await;
    assert_eq!(bed.log(target.id).await, log, "the log changed after the disk filled");

    // sled 0.34 takes no more writes after a failed one, and its flush (and
    // its drop) then waits without end: the coordinator answers 503 until it
    // is restarted (killed). Dropping this bed would wait forever on that.
    std::mem::forget(bed);
    drop(fs);
}
