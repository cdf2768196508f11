//! The `kiln` command line against a running coordinator.

use clap::Parser;
use kiln_coordinator::cli::{Cli, run};
use kiln_protocol::api::{Build, Cloud, Revision, Status};
use kiln_tests::bed::Bed;

async fn kiln(bed: &Bed, args: &[&str]) -> i32 {
    let server = bed.client.base().to_owned();
    let token = bed.client.token().expect("the bed's client has a token").to_owned();
    let mut argv = vec!["kiln", "--server", &server, "--token", &token, "--output", "json"];
    argv.extend_from_slice(args);
    run(Cli::try_parse_from(argv).expect("valid command line")).await.expect("command ran")
}

// A generator file and its script create a generator; `build start --wait`
// exits 0 when every target succeeded and 1 when one failed.
#[tokio::test]
async fn cli_creates_builds_and_reports_failure() {
    let bed = Bed::start().await;
    assert_eq!(kiln(&bed, &["cloud", "add", "local", "--kind", "qemu"]).await, 0);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("s.sh"), "echo from the file\n").unwrap();
    let toml = dir.path().join("g.toml");
    std::fs::write(&toml, "name = \"fromfile\"\nscript = \"s.sh\"\n[targets.local]\nbase_image = \"process\"\n")
        .unwrap();
    assert_eq!(kiln(&bed, &["generator", "create", "--file", toml.to_str().unwrap()]).await, 0);
    assert_eq!(kiln(&bed, &["build", "start", "fromfile", "--wait"]).await, 0);

    std::fs::write(dir.path().join("s.sh"), "echo failing\nexit 7\n").unwrap();
    assert_eq!(kiln(&bed, &["generator", "update", "--file", toml.to_str().unwrap()]).await, 0);
    assert_eq!(kiln(&bed, &["build", "start", "fromfile", "--wait"]).await, 1);

    let clouds: Vec<Cloud> = bed.client.get("/v1/clouds").await.unwrap();
    assert_eq!(clouds.len(), 1);
    let revs: Vec<Revision> = bed.client.get("/v1/generators/fromfile/revisions").await.unwrap();
    assert_eq!(
        revs.iter().map(|r| r.spec.script.as_str()).collect::<Vec<_>>(),
        ["echo from the file\n", "echo failing\nexit 7\n"]
    );
    let builds: Vec<Build> = bed.client.get("/v1/builds?generator=fromfile").await.unwrap();
    let statuses: Vec<Status> = builds.iter().map(|b| b.status).collect();
    assert_eq!(statuses, [Status::Failed, Status::Successful], "newest first");
    assert_eq!(builds[0].revision, 2);
    assert_eq!(bed.log(builds[1].targets[0].id).await, b"from the file\n");
}
