//! EC2 and EC2-compatible clouds: kiln's EC2 provider against moto, with every
//! instance booted as a real VM that fetches its user-data over IMDSv2 (or
//! through the Nimbus metadata-URL file).

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_ec2::types::{Filter, InstanceStateName};
use kiln_protocol::api::{Build, FailureReason, Status, Step};
use kiln_tests::bed::{Bed, Options};
use kiln_tests::ec2::{Fault, FaultProxy, GUEST_HOST, Metadata, Moto, Runner, RunnerConfig, register_ami};
use serde_json::json;

/// A coordinator, moto, the VM runner, and one AMI of the tiny image per region.
struct Ec2Bed {
    bed: Bed,
    moto: Moto,
    runner: Runner,
    amis: HashMap<String, String>,
}

impl Ec2Bed {
    async fn start(regions: &[&str], metadata: Metadata) -> Self {
        let bed = Bed::with(Options::qemu()).await;
        let moto = Moto::start().await.expect("moto");
        let mut amis = HashMap::new();
        let mut images = HashMap::new();
        for region in regions {
            let ami = register_ami(&moto.client(region), "kiln-tiny").await.expect("register AMI");
            images.insert(ami.clone(), kiln_tests::tiny_image());
            amis.insert(region.to_string(), ami);
        }
        let runner = Runner::start(RunnerConfig {
            moto: moto.url.clone(),
            regions: regions.iter().map(|r| r.to_string()).collect(),
            images,
            work_dir: bed.dir.path().join("runner"),
            metadata,
            console_tail_lines: 40,
            identity: None,
        })
        .await
        .expect("runner");
        Self { bed, moto, runner, amis }
    }

    /// Adds an `ec2` cloud named `name` in `region`, through its own fault proxy.
    async fn cloud(&self, name: &str, region: &str, options: serde_json::Value) -> FaultProxy {
        let proxy = FaultProxy::start(&self.moto.url).await.expect("proxy");
        proxy.serve_consoles(self.runner.consoles());
        let mut opts = json!({"coordinator_host": GUEST_HOST, "poll_secs": "0.5"});
        opts.as_object_mut().unwrap().extend(options.as_object().unwrap().clone());
        let cloud = json!({
            "name": name, "kind": "ec2", "region": region, "endpoint": proxy.url, "options": opts,
            "credentials": {"access_key_id": "test", "secret_access_key": "kiln-test-secret"},
        });
        let _: serde_json::Value = self.bed.client.post("/v1/clouds", &cloud).await.expect("add cloud");
        proxy
    }

    async fn generator(&self, name: &str, script: &str, targets: &[(&str, &str)]) {
        let clouds: Vec<&str> = targets.iter().map(|(c, _)| *c).collect();
        let mut spec = Bed::spec(name, script, &clouds);
        for (cloud, region) in targets {
            spec.targets.get_mut(&cloud.parse().unwrap()).unwrap().base_image = self.amis[*region].clone();
        }
        self.bed.create_generator(&spec).await;
    }

    /// Instances moto knows in `region` that are not terminated.
    async fn live_instances(&self, region: &str) -> Vec<String> {
        let out = self.moto.client(region).describe_instances().send().await.unwrap();
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter(|i| i.state().and_then(|s| s.name()) != Some(&InstanceStateName::Terminated))
            .filter_map(|i| i.instance_id().map(String::from))
            .collect()
    }

    /// Images in `region` other than the base AMI.
    async fn made_images(&self, region: &str) -> Vec<aws_sdk_ec2::types::Image> {
        let out = self.moto.client(region).describe_images().owners("self").send().await.unwrap();
        out.images().iter().filter(|i| i.image_id() != Some(self.amis[region].as_str())).cloned().collect()
    }
}

fn tag<'a>(image: &'a aws_sdk_ec2::types::Image, key: &str) -> Option<&'a str> {
    image.tags().iter().find(|t| t.key() == Some(key)).and_then(|t| t.value())
}

// One build on two EC2 regions: two images with the provenance tags, the
// instances terminated, and the logs from real VMs that fetched their
// user-data over IMDSv2.
#[tokio::test]
async fn build_on_two_regions_makes_tagged_images() {
    let env = Ec2Bed::start(&["us-east-1", "eu-west-1"], Metadata::Imds).await;
    let east = env.cloud("east", "us-east-1", json!({})).await;
    let _west = env.cloud("west", "eu-west-1", json!({"copy_to_regions": "us-west-2"})).await;
    // East is throttled and slow: kiln retries with backoff and polls through pending states.
    east.inject("RunInstances", Fault::Throttle { times: 2 });
    east.inject("DescribeInstances", Fault::Pending { times: 4 });
    east.inject("DescribeImages", Fault::Pending { times: 3 });
    env.generator("web", "echo customised on $KILN_CLOUD\n", &[("east", "us-east-1"), ("west", "eu-west-1")]).await;
    let build = env.bed.wait(&env.bed.start_build("web").await).await;

    assert_eq!(build.status, Status::Successful, "{build:#?}");
    for (t, region) in build.targets.iter().zip(["us-east-1", "eu-west-1"]) {
        assert_eq!(env.bed.log(t.id).await, format!("customised on {}\n", t.cloud).as_bytes());
        let image = t.image.as_ref().unwrap();
        assert!(image.id.starts_with("ami-"), "{}", image.id);
        let made = env.made_images(region).await;
        assert_eq!(made.len(), 1, "one image in {region}");
        let ami = &made[0];
        assert_eq!(ami.image_id(), Some(image.id.as_str()));
        assert_eq!(tag(ami, "kiln:target"), Some(t.id.to_string().as_str()));
        assert_eq!(tag(ami, "kiln:build"), Some(build.id.to_string().as_str()));
        assert_eq!(tag(ami, "kiln:script-sha256"), Some(build.script_sha256.as_str()));
        assert_eq!(tag(ami, "kiln:base-image"), Some(env.amis[region].as_str()));
        assert!(tag(ami, "kiln:coordinator").is_some_and(|c| c.starts_with("kc-")), "the janitor finds it by this tag");
        let snapshots: Vec<String> = ami
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(String::from))
            .collect();
        assert!(!snapshots.is_empty(), "the image has a snapshot");
        let described =
            env.moto.client(region).describe_snapshots().set_snapshot_ids(Some(snapshots)).send().await.unwrap();
        for snapshot in described.snapshots() {
            let tag = |key: &str| snapshot.tags().iter().find(|t| t.key() == Some(key)).and_then(|t| t.value());
            assert_eq!(tag("kiln:coordinator"), self::tag(ami, "kiln:coordinator"), "{snapshot:?}");
            assert_eq!(tag("kiln:source-image"), Some(image.id.as_str()), "{snapshot:?}");
        }
        assert!(ami.description().unwrap_or_default().contains(&build.script_sha256));
        assert!(env.live_instances(region).await.is_empty(), "the instance in {region} was terminated");
        let phases = kiln_coordinator::cli::phases(&t.timings);
        eprintln!("{} phases: {phases:?}", t.cloud);
        let instance = t.instance.as_deref().unwrap();
        let console = env.runner.console(instance).unwrap_or_default();
        assert!(console.contains("ec2-imdsv2"), "user-data came over IMDSv2: {console}");
    }
    // West's image was copied to us-west-2 with its tags.
    let west = build.targets.iter().find(|t| t.cloud.as_str() == "west").unwrap();
    let copies = env.moto.client("us-west-2").describe_images().owners("self").send().await.unwrap();
    let copy = copies.images().first().expect("a copy in us-west-2");
    assert_eq!(tag(copy, "kiln:source-image"), west.image.as_ref().map(|i| i.id.as_str()));
    assert_eq!(tag(copy, "kiln:target"), Some(west.id.to_string().as_str()));
    assert!(tag(copy, "kiln:coordinator").is_some(), "the copy carries the coordinator's tag");
    let calls = east.calls();
    eprintln!("EC2 API calls of one target: {calls:?} = {}", calls.values().sum::<usize>());
    assert_eq!(calls["RunInstances"], 3, "two throttled attempts, then the launch");
    assert!(env.bed.client.get::<serde_json::Value>("/v1/clouds/east").await.unwrap().get("credentials").is_none());
}

// A Nimbus-style cloud (kind ec2 with a custom endpoint) whose instance gets
// its user-data through the Nimbus metadata-URL file.
#[tokio::test]
async fn nimbus_cloud_gets_user_data_from_its_metadata_file() {
    let env = Ec2Bed::start(&["us-west-1"], Metadata::Nimbus).await;
    // Nimbus ignores regions; moto wants a real one.
    let _proxy = env.cloud("hotel", "us-west-1", json!({})).await;
    env.generator("sci", "echo ready for science\n", &[("hotel", "us-west-1")]).await;
    let build = env.bed.wait(&env.bed.start_build("sci").await).await;

    assert_eq!(build.status, Status::Successful, "{build:#?}");
    let t = &build.targets[0];
    assert_eq!(env.bed.log(t.id).await, b"ready for science\n");
    let console = env.runner.console(t.instance.as_deref().unwrap()).unwrap_or_default();
    assert!(console.contains("nimbus"), "user-data came through the Nimbus file: {console}");
    assert!(env.live_instances("us-west-1").await.is_empty());
    assert_eq!(env.made_images("us-west-1").await.len(), 1);
}

fn error(times: usize, status: u16, code: &str) -> Fault {
    Fault::Error { times, status, code: code.into(), message: format!("injected {code}") }
}

// A failure injected at each step in turn (launch, await agent, stop, create
// image, wait available) fails the target at that step with EC2's reason and
// leaves no running instance and no image in moto.
#[tokio::test]
async fn failure_at_each_step_leaves_nothing_behind() {
    let env = Ec2Bed::start(&["us-east-1"], Metadata::Imds).await;
    // Each case has its own cloud and proxy, so the faults stay apart.
    let cases: Vec<(&str, Step, &str, serde_json::Value)> = vec![
        ("launch", Step::Launch, "InvalidParameterValue", json!({})),
        ("await", Step::AwaitAgent, "the instance stopped before its agent phoned home", json!({})),
        ("stop", Step::Seal, "UnauthorizedOperation", json!({})),
        ("create", Step::Snapshot, "InvalidParameterValue", json!({})),
        ("available", Step::Snapshot, "was not usable within", json!({"image_timeout_secs": "3"})),
    ];
    // An AMI moto knows but the runner cannot boot: the instance stops unseen.
    let unbootable = register_ami(&env.moto.client("us-east-1"), "no-boot-hook").await.unwrap();
    let mut builds = Vec::new();
    let mut proxies = Vec::new();
    for (name, _, _, options) in &cases {
        let proxy = env.cloud(name, "us-east-1", options.clone()).await;
        match *name {
            "launch" => proxy.inject("RunInstances", error(1, 400, "InvalidParameterValue")),
            "stop" => {
                // The instance never looks stopped, so kiln must stop it, and may not.
                proxy.inject("DescribeInstances", Fault::Pending { times: 100_000 });
                proxy.inject("StopInstances", error(1, 403, "UnauthorizedOperation"));
            }
            "create" => proxy.inject("CreateImage", error(1, 400, "InvalidParameterValue")),
            "available" => proxy.inject("DescribeImages", Fault::Pending { times: 100_000 }),
            _ => {}
        }
        let base = if *name == "await" { unbootable.clone() } else { env.amis["us-east-1"].clone() };
        let mut spec = Bed::spec(name, "echo step\n", &[name]);
        spec.targets.values_mut().for_each(|t| t.base_image = base.clone());
        env.bed.create_generator(&spec).await;
        proxies.push(proxy);
        builds.push(env.bed.start_build(name).await);
    }
    for ((name, step, needle, _), build) in cases.iter().zip(&builds) {
        let done: Build = env.bed.wait(build).await;
        let t = &done.targets[0];
        let err = t.error.as_ref().unwrap_or_else(|| panic!("{name}: {done:#?}"));
        assert_eq!(err.step, *step, "{name}: {err:#?}");
        assert!(err.message.contains(needle), "{name}: {}", err.message);
        assert_ne!(err.reason, FailureReason::Internal, "{name}: {err:#?}");
        assert_eq!(done.status, Status::Failed, "{name}");
    }
    assert!(env.live_instances("us-east-1").await.is_empty(), "an instance was left");
    let left: Vec<_> =
        env.made_images("us-east-1").await.into_iter().filter(|i| i.image_id() != Some(&unbootable)).collect();
    assert!(left.is_empty(), "an image was left: {left:?}");
    env.runner.wait_no_vms(Duration::from_secs(30)).await.expect("every VM stopped");
}

// EC2 keeps throttling TerminateInstances while a failed target unwinds: the
// target shows `cleanup_pending` with EC2's answer and does not end; once
// EC2 answers, the instance is terminated and the target ends failed, clean.
#[tokio::test]
async fn a_refused_terminate_is_retried_and_shown_as_cleanup_pending() {
    let env = Ec2Bed::start(&["us-east-1"], Metadata::Imds).await;
    let proxy = env.cloud("flaky", "us-east-1", json!({})).await;
    // Three SDK attempts per try: three tries are refused, the fourth passes.
    proxy.inject("TerminateInstances", Fault::Throttle { times: 9 });
    env.generator("fails", "echo failing\nexit 3\n", &[("flaky", "us-east-1")]).await;
    let build = env.bed.start_build("fails").await;
    let target = build.targets[0].id;
    let pending = async {
        let mut changes = env.bed.app().subscribe_changes();
        loop {
            changes.mark_unchanged();
            let b: Build = env.bed.client.get(&format!("/v1/builds/{}", build.id)).await.unwrap();
            let t = b.targets.into_iter().find(|t| t.id == target).unwrap();
            if let Some(pending) = t.cleanup_pending {
                return (t.status, pending);
            }
            assert!(!t.status.is_terminal(), "the target ended without a pending clean-up: {t:#?}");
            let _ = changes.changed().await;
        }
    };
    let (status, pending) = tokio::time::timeout(Duration::from_secs(120), pending).await.expect("cleanup pending");
    assert!(!status.is_terminal(), "a target is not reported ended while its clean-up is pending");
    assert!(pending.contains("could not be terminated") && pending.contains("RequestLimitExceeded"), "{pending}");

    let done = env.bed.wait(&build).await;
    let t = &done.targets[0];
    assert_eq!(done.status, Status::Failed, "{done:#?}");
    assert_eq!(t.error.as_ref().unwrap().reason, FailureReason::ScriptFailed);
    assert_eq!(t.cleanup_pending, None, "{t:#?}");
    assert!(!t.error.as_ref().unwrap().message.contains("by hand"), "{t:#?}");
    assert!(env.live_instances("us-east-1").await.is_empty(), "the instance was terminated");
    assert_eq!(proxy.calls()["TerminateInstances"], 10, "three refused tries of three attempts, then one");
    env.runner.wait_no_vms(Duration::from_secs(30)).await.expect("every VM stopped");
}

// The coordinator killed right after RunInstances and started again: no
// second instance is launched, and the build finishes.
#[tokio::test]
async fn restart_after_run_instances_launches_no_second_instance() {
    let mut env = Ec2Bed::start(&["us-east-1"], Metadata::Imds).await;
    let proxy = env.cloud("east", "us-east-1", json!({})).await;
    env.generator("once", "echo only once\n", &[("east", "us-east-1")]).await;
    let build = env.bed.start_build("once").await;
    let launched = async {
        let mut changes = env.bed.app().subscribe_changes();
        while proxy.calls().get("RunInstances").copied().unwrap_or(0) == 0 {
            let _ = tokio::time::timeout(Duration::from_millis(50), changes.changed()).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), launched).await.expect("RunInstances was called");
    env.bed.restart().await;
    let done = env.bed.wait(&build).await;

    assert_eq!(done.status, Status::Successful, "{done:#?}");
    let target = done.targets[0].id.to_string();
    let all = env
        .moto
        .client("us-east-1")
        .describe_instances()
        .filters(Filter::builder().name("tag:kiln:target").values(&target).build())
        .send()
        .await
        .unwrap();
    let count = all.reservations().iter().flat_map(|r| r.instances()).count();
    assert_eq!(count, 1, "exactly one instance was launched for the target");
    assert_eq!(env.runner.booted().len(), 1);
}

// A cloud or base image EC2 refuses stops the build before anything starts,
// with EC2's own code and what to fix, one case per line; a cloud without a
// region is refused at `cloud add`.
#[tokio::test]
async fn bad_ec2_input_is_refused_with_the_clouds_code() {
    let env = Ec2Bed::start(&["us-east-1"], Metadata::Imds).await;
    let good = env.cloud("good", "us-east-1", json!({})).await;
    let denied = env.cloud("denied", "us-east-1", json!({})).await;
    denied.inject("DescribeImages", error(1, 401, "AuthFailure"));
    let nowhere = json!({"name": "nowhere", "kind": "ec2", "region": "us-east-1", "endpoint": "http://127.0.0.1:1",
        "credentials": {"access_key_id": "test", "secret_access_key": "x"}});
    let _: serde_json::Value = env.bed.client.post("/v1/clouds", &nowhere).await.unwrap();
    // A cloud EC2 could not serve is refused when it is added.
    let regionless = json!({"name": "regionless", "kind": "ec2", "endpoint": good.url});
    let resp = env.bed.client.request(reqwest::Method::POST, "/v1/clouds").json(&regionless).send().await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::BAD_REQUEST);
    let err: kiln_protocol::error::ErrorBody = resp.json().await.unwrap();
    assert!(err.message.contains("has no region"), "{}", err.message);
    let ami = env.amis["us-east-1"].clone();
    let cases = [
        ("good", "ami-0123456789abcdef0", "InvalidAMIID.NotFound"),
        (
            "denied",
            ami.as_str(),
            "AuthFailure: checking the base image: injected AuthFailure; check the cloud's access key",
        ),
        ("nowhere", ami.as_str(), "cannot reach the EC2 endpoint"),
    ];
    for (i, (cloud, base, needle)) in cases.iter().enumerate() {
        let name = format!("bad{i}");
        let mut spec = Bed::spec(&name, "true\n", &[cloud]);
        spec.targets.values_mut().for_each(|t| t.base_image = base.to_string());
        env.bed.create_generator(&spec).await;
        let message = env.bed.refused_build(&name).await;
        assert!(message.contains(needle), "{cloud}: {message}");
    }
    assert!(env.live_instances("us-east-1").await.is_empty(), "nothing was launched");
}
