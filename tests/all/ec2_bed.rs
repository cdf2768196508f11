//! The EC2 test bed on its own, without kiln's coordinator: moto as the API,
//! the runner booting its instances as QEMU VMs, the fault proxy in between.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{HttpTokensState, InstanceMetadataOptionsRequest, InstanceType};
use base64::Engine;
use kiln_tests::ec2::{self, Fault, FaultProxy, Metadata, Moto, Runner, RunnerConfig};
use tempfile::TempDir;

/// The longest an instance may take to boot, run its user-data and power off (TCG).
const BOOT_LIMIT: Duration = Duration::from_secs(120);
const REGION: &str = "eu-west-1";

struct Ec2Bed {
    /// Through the fault proxy, as a provider under test would talk to EC2.
    client: aws_sdk_ec2::Client,
    proxy: FaultProxy,
    runner: Runner,
    /// The AMI the runner boots as kiln's tiny image.
    ami: String,
    moto: Moto,
    _dir: TempDir,
}

impl Ec2Bed {
    async fn start(metadata: Metadata) -> anyhow::Result<Self> {
        let moto = Moto::start().await?;
        let ami = ec2::register_ami(&moto.client(REGION), "kiln-tiny").await?;
        let dir = tempfile::tempdir()?;
        let runner = Runner::start(RunnerConfig {
            moto: moto.url.clone(),
            regions: vec![REGION.into(), "us-east-1".into()],
            images: HashMap::from([(ami.clone(), kiln_tests::tiny_image())]),
            work_dir: dir.path().join("runner"),
            metadata,
            console_tail_lines: 20,
            identity: None,
        })
        .await?;
        let proxy = FaultProxy::start(&moto.url).await?;
        proxy.serve_consoles(runner.consoles());
        let client = ec2::client(&proxy.url, REGION);
        Ok(Self { client, proxy, runner, ami, moto, _dir: dir })
    }

    /// RunInstances of `ami` with IMDSv2 required and `script` as base64 user-data.
    async fn launch(&self, ami: &str, script: &str) -> anyhow::Result<String> {
        let out = self
            .client
            .run_instances()
            .image_id(ami)
            .instance_type(InstanceType::T3Micro)
            .min_count(1)
            .max_count(1)
            .metadata_options(InstanceMetadataOptionsRequest::builder().http_tokens(HttpTokensState::Required).build())
            .user_data(base64::engine::general_purpose::STANDARD.encode(script))
            .send()
            .await?;
        Ok(out.instances()[0].instance_id().unwrap().to_owned())
    }

    async fn state(&self, id: &str) -> anyhow::Result<String> {
        let out = self.client.describe_instances().instance_ids(id).send().await?;
        let instance = &out.reservations()[0].instances()[0];
        Ok(instance.state().and_then(|s| s.name()).unwrap().as_str().to_owned())
    }

    /// Polls moto (bounded) until the instance is in state `want`.
    async fn wait_state(&self, id: &str, want: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + BOOT_LIMIT;
        loop {
            let state = self.state(id).await?;
            if state == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                let console = self.runner.console(id).unwrap_or_default();
                anyhow::bail!("{id} is {state}, not {want}, after {BOOT_LIMIT:?}; console:\n{console}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

// SDK-launched instances boot as real VMs running their IMDSv2 user-data, in step with moto and the fault proxy.
#[tokio::test]
async fn ec2_bed_boots_instances_that_fetch_user_data_over_imdsv2() -> anyhow::Result<()> {
    let bed = Ec2Bed::start(Metadata::Imds).await?;
    // One throttled RunInstances: the SDK retries it.
    bed.proxy.inject("RunInstances", Fault::Throttle { times: 1 });
    let script = "#!/bin/sh\necho KILN-EC2-BED-OK\necho proof >/etc/kiln-proof\nsync\npoweroff -f\n";
    let id = bed.launch(&bed.ami, script).await?;
    assert_eq!(bed.proxy.calls().get("RunInstances"), Some(&2), "the SDK retried the throttled call once");

    // The VM fetches its user-data over IMDSv2, runs it and powers off; moto then says stopped.
    bed.wait_state(&id, "stopped").await?;
    let console = bed.runner.console(&id).unwrap();
    assert!(console.contains("\nKILN-EC2-BED-OK\n"), "the user-data ran:\n{console}");
    assert!(console.contains("user-data from ec2-imdsv2"), "found through IMDSv2:\n{console}");
    let imds = bed.runner.imds(&id).unwrap();
    assert!(imds.requests.iter().any(|r| r == "PUT /latest/api/token 200"), "{:?}", imds.requests);
    assert!(imds.requests.iter().any(|r| r == "GET /latest/user-data 200"), "{:?}", imds.requests);
    assert_eq!(bed.runner.live_vms(), 0, "the VM is gone once moto says stopped");
    let output = bed.client.get_console_output().instance_id(&id).send().await?;
    let output = base64::engine::general_purpose::STANDARD.decode(output.output().unwrap())?;
    assert!(String::from_utf8(output)?.contains("KILN-EC2-BED-OK"), "GetConsoleOutput gives the real console");
    println!("boot to user-data under TCG: {:?}", bed.runner.user_data_after(&id).unwrap());

    // An AMI made from the stopped instance boots from its disk.
    let image = bed.client.create_image().instance_id(&id).name("from-first").send().await?.image_id.unwrap();
    let child = bed.launch(&image, "#!/bin/sh\necho \"found $(cat /etc/kiln-proof)\"\npoweroff -f\n").await?;
    bed.wait_state(&child, "stopped").await?;
    let console = bed.runner.console(&child).unwrap();
    assert!(console.contains("\nfound proof\n"), "the first instance's file is on its image:\n{console}");

    // Pending and error faults reach the SDK.
    bed.proxy.inject("DescribeInstances", Fault::Pending { times: 1 });
    assert_eq!(bed.state(&id).await?, "stopping", "pending fault");
    assert_eq!(bed.state(&id).await?, "stopped", "then moto's own answer");
    let denied = Fault::Error { times: 1, status: 400, code: "UnauthorizedOperation".into(), message: "no".into() };
    bed.proxy.inject("TerminateInstances", denied);
    let err = bed.client.terminate_instances().instance_ids(&id).send().await.unwrap_err();
    assert_eq!(err.code(), Some("UnauthorizedOperation"), "{err:?}");
    bed.client.terminate_instances().instance_ids(&id).send().await?;
    bed.wait_state(&id, "terminated").await?;
    assert_eq!(bed.runner.live_vms(), 0);

    // A running VM dies when its instance is terminated.
    let sleeper = bed.launch(&bed.ami, "#!/bin/sh\nsleep 600\n").await?;
    bed.runner
        .wait_until(Duration::from_secs(30), "the sleeper's QEMU started", |r| r.booted().contains(&sleeper))
        .await?;
    bed.client.terminate_instances().instance_ids(&sleeper).send().await?;
    bed.runner.wait_no_vms(Duration::from_secs(30)).await?;
    assert_eq!(bed.state(&sleeper).await?, "terminated", "the runner did not resurrect it");

    // An AMI the runner cannot boot: the instance ends stopped, the provider's cue that it failed.
    let unknown = ec2::register_ami(&bed.client, "not-mapped").await?;
    let orphan = bed.launch(&unknown, "#!/bin/sh\necho never\n").await?;
    bed.wait_state(&orphan, "stopped").await?;
    assert!(bed.runner.problems().iter().any(|p| p.contains(&orphan) && p.contains("RunnerConfig::images")));
    assert_eq!(bed.runner.problems().len(), 1, "{:?}", bed.runner.problems());
    assert_eq!(bed.runner.booted(), [id, child, sleeper]);
    Ok(())
}

// In Nimbus mode the instance gets its user-data from the tokenless server its disk's Nimbus file names.
#[tokio::test]
async fn ec2_bed_serves_user_data_the_nimbus_way() -> anyhow::Result<()> {
    let bed = Ec2Bed::start(Metadata::Nimbus).await?;
    let id = bed.launch(&bed.ami, "#!/bin/sh\necho KILN-NIMBUS-OK\npoweroff -f\n").await?;
    bed.wait_state(&id, "stopped").await?;
    let console = bed.runner.console(&id).unwrap();
    assert!(console.contains("\nKILN-NIMBUS-OK\n"), "the user-data ran:\n{console}");
    assert!(console.contains("user-data from nimbus"), "found through Nimbus:\n{console}");
    let imds = bed.runner.imds(&id).unwrap();
    assert_eq!(imds.requests, ["GET /latest/user-data 200"], "one tokenless GET");
    println!("boot to user-data under TCG (Nimbus): {:?}", bed.runner.user_data_after(&id).unwrap());
    bed.client.terminate_instances().instance_ids(&id).send().await?;
    bed.runner.wait_no_vms(Duration::from_secs(10)).await?;
    assert!(bed.runner.problems().is_empty(), "{:?}", bed.runner.problems());
    bed.moto.reset().await?;
    assert!(bed.client.describe_instances().send().await?.reservations().is_empty(), "moto forgot everything");
    Ok(())
}
