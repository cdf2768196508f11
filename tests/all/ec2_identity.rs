//! EC2's signed instance identity document at enrollment: with the cloud's
//! `identity_certificate`, only the target's own instance enrolls.
//!
//! The refusals are played by hand through the agent listener against moto
//! (no VM boots, so the test is the only one holding the token); one real-VM
//! build shows the agent reading the document over IMDSv2 and enrolling.

use std::time::Duration;

use kiln_protocol::TargetId;
use kiln_protocol::agent::{EnrollRequest, InstanceIdentity, paths};
use kiln_protocol::api::{Build, FailureReason, Status, Step};
use kiln_protocol::error::ErrorBody;
use kiln_tests::bed::{Bed, Options};
use kiln_tests::ec2::{GUEST_HOST, IdentitySigner, Metadata, Moto, Runner, RunnerConfig, register_ami};
use reqwest::StatusCode;
use serde_json::json;

const REGION: &str = "us-east-1";
const ACCOUNT: &str = "123456789012";

/// A coordinator with an `ec2` cloud on moto whose instances never boot.
struct HandBed {
    bed: Bed,
    _moto: Moto,
}

impl HandBed {
    async fn start(options: serde_json::Value) -> Self {
        // The built-in providers (EC2 among them); no runner, so nothing boots.
        let bed = Bed::with(Options::qemu()).await;
        let moto = Moto::start().await.expect("moto");
        let ami = register_ami(&moto.client(REGION), "kiln-idle").await.expect("register AMI");
        let mut opts = json!({"poll_secs": "0.5"});
        opts.as_object_mut().unwrap().extend(options.as_object().unwrap().clone());
        let cloud = json!({
            "name": "aws", "kind": "ec2", "region": REGION, "endpoint": moto.url, "options": opts,
            "credentials": {"access_key_id": "test", "secret_access_key": "test"},
        });
        let _: serde_json::Value = bed.client.post("/v1/clouds", &cloud).await.expect("add cloud");
        let mut spec = Bed::spec("idle", "echo job\n", &["aws"]);
        spec.targets.values_mut().for_each(|t| t.base_image = ami.clone());
        bed.create_generator(&spec).await;
        Self { bed, _moto: moto }
    }

    /// A new build's target, launched: (build, target, instance id, token).
    async fn launched(&self) -> (Build, TargetId, String, String) {
        let build = self.bed.start_build("idle").await;
        let target = build.targets[0].id;
        let wait = async {
            let mut changes = self.bed.app().subscribe_changes();
            loop {
                let b: Build = self.bed.client.get(&format!("/v1/builds/{}", build.id)).await.unwrap();
                if let Some(instance) = b.targets[0].instance.clone().filter(|_| b.targets[0].step >= Step::AwaitAgent)
                {
                    return instance;
                }
                changes.changed().await.unwrap();
            }
        };
        let instance = tokio::time::timeout(Duration::from_secs(60), wait).await.expect("the target was launched");
        (build, target, instance, self.bed.app().pki().tokens().token(target))
    }

    async fn enroll(&self, target: TargetId, token: &str, identity: Option<InstanceIdentity>) -> reqwest::Response {
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let req = EnrollRequest { target, token: token.into(), csr_pem: csr, identity };
        let ca = reqwest::Certificate::from_pem(self.bed.app().pki().ca_pem().as_bytes()).unwrap();
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .build()
            .unwrap();
        client.post(format!("{}{}", self.bed.agent_url(), paths::ENROLL)).json(&req).send().await.unwrap()
    }
}

fn identity(document: String, rsa2048: String) -> Option<InstanceIdentity> {
    Some(InstanceIdentity::Ec2 { document, rsa2048 })
}

// With identity_certificate, an enrollment whose document is missing, signed
// by another key, altered, or names another instance, region or account is
// refused (403) and fails the target at once (identity_refused), with no
// image; the instance's own signed document enrolls. One case a line.
#[tokio::test]
async fn only_the_targets_instance_enrolls() {
    let aws = IdentitySigner::generate();
    let forger = IdentitySigner::generate();
    let env = HandBed::start(json!({"identity_certificate": aws.certificate_pem(), "identity_account": ACCOUNT})).await;
    type Forge = fn(&IdentitySigner, &IdentitySigner, &str) -> Option<InstanceIdentity>;
    let cases: &[(&str, Forge, &str)] = &[
        ("no document", |_, _, _| None, "sent no instance identity document"),
        (
            "another key",
            |_, forger, id| {
                let doc = IdentitySigner::document(id, REGION, ACCOUNT);
                identity(doc.clone(), forger.sign(&doc))
            },
            "not from the identity_certificate's key",
        ),
        (
            "altered document",
            |aws, _, id| {
                let doc = IdentitySigner::document(id, REGION, ACCOUNT);
                identity(doc.replace("t3.micro", "x1.32xlarge"), aws.sign(&doc))
            },
            "not the document sent",
        ),
        (
            "another instance",
            |aws, _, _| {
                let doc = IdentitySigner::document("i-0000000000000dead", REGION, ACCOUNT);
                identity(doc.clone(), aws.sign(&doc))
            },
            "names instance \"i-0000000000000dead\"",
        ),
        (
            "another region",
            |aws, _, id| {
                let doc = IdentitySigner::document(id, "eu-west-1", ACCOUNT);
                identity(doc.clone(), aws.sign(&doc))
            },
            "names region \"eu-west-1\"",
        ),
        (
            "another account",
            |aws, _, id| {
                let doc = IdentitySigner::document(id, REGION, "210987654321");
                identity(doc.clone(), aws.sign(&doc))
            },
            "names account \"210987654321\"",
        ),
        (
            "garbage signature",
            |_, _, id| identity(IdentitySigner::document(id, REGION, ACCOUNT), "AAAA".into()),
            "not PKCS#7",
        ),
    ];
    for (name, forge, needle) in cases {
        let (build, target, instance, token) = env.launched().await;
        let resp = env.enroll(target, &token, forge(&aws, &forger, &instance)).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{name}");
        let body: ErrorBody = resp.json().await.unwrap();
        assert!(body.message.contains(needle), "{name}: {}", body.message);
        let b = env.bed.wait(&build).await;
        assert_eq!(b.status, Status::Failed, "{name}: {b:#?}");
        let err = b.targets[0].error.as_ref().expect("an error");
        assert_eq!(err.reason, FailureReason::IdentityRefused, "{name}: {err:#?}");
        assert!(err.message.contains(needle), "{name}: {}", err.message);
        assert!(b.targets[0].image.is_none(), "{name}");
        // The token is spent: the real agent cannot enroll after the forger either.
        let doc = IdentitySigner::document(&instance, REGION, ACCOUNT);
        let resp = env.enroll(target, &token, identity(doc.clone(), aws.sign(&doc))).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{name}");
    }

    let (build, target, instance, token) = env.launched().await;
    let doc = IdentitySigner::document(&instance, REGION, ACCOUNT);
    let resp = env.enroll(target, &token, identity(doc.clone(), aws.sign(&doc))).await;
    assert_eq!(resp.status(), StatusCode::OK, "the instance's own document enrolls");
    let b: Build = env.bed.client.get(&format!("/v1/builds/{}", build.id)).await.unwrap();
    assert!(b.targets[0].timings.agent_contact_at.is_some());
    assert!(b.targets[0].error.is_none(), "{b:#?}");
    let _: Build = env.bed.client.post(&format!("/v1/builds/{}/cancel", build.id), &()).await.unwrap();
}

// A bad identity_certificate or identity_account is a 400 at `cloud add`
// that says what to give instead; without identity_certificate agents enroll
// with no document, as before. One case a line.
#[tokio::test]
async fn identity_options_are_checked_at_cloud_add() {
    let aws = IdentitySigner::generate();
    let env = HandBed::start(json!({})).await;
    let cases = [
        (
            json!({"identity_certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}),
            "certificate",
        ),
        (json!({"identity_certificate": "/nonexistent/aws-rsa2048.pem"}), "cannot read the certificate file"),
        (json!({"identity_account": ACCOUNT}), "identity_account needs identity_certificate"),
        (json!({"identity_certificate": aws.certificate_pem(), "identity_account": "12"}), "not a 12-digit"),
    ];
    for (i, (options, needle)) in cases.iter().enumerate() {
        let cloud = json!({"name": format!("bad{i}"), "kind": "ec2", "region": REGION, "options": options});
        let resp = env.bed.client.request(reqwest::Method::POST, "/v1/clouds").json(&cloud).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{options}");
        let body: ErrorBody = resp.json().await.unwrap();
        assert!(body.message.contains(needle), "{options}: {}", body.message);
    }
    // A certificate file works as well as the PEM inline.
    let file = env.bed.dir.path().join("aws-rsa2048.pem");
    std::fs::write(&file, aws.certificate_pem()).unwrap();
    let cloud = json!({"name": "byfile", "kind": "ec2", "region": REGION,
        "options": {"identity_certificate": file.to_str().unwrap()}});
    let _: serde_json::Value = env.bed.client.post("/v1/clouds", &cloud).await.expect("a certificate file");

    let (_, target, _, token) = env.launched().await;
    let resp = env.enroll(target, &token, None).await;
    assert_eq!(resp.status(), StatusCode::OK, "no identity_certificate: no document needed");
}

// A real VM on EC2 (moto, IMDSv2) with identity_certificate: the agent reads
// its signed document from IMDS, the coordinator verifies it, and the build
// makes its image.
#[tokio::test]
async fn a_real_instance_enrolls_with_its_signed_document() {
    let aws = std::sync::Arc::new(IdentitySigner::generate());
    let bed = Bed::with(Options::qemu()).await;
    let moto = Moto::start().await.expect("moto");
    let ami = register_ami(&moto.client(REGION), "kiln-tiny").await.expect("register AMI");
    let runner = Runner::start(RunnerConfig {
        moto: moto.url.clone(),
        regions: vec![REGION.into()],
        images: [(ami.clone(), kiln_tests::tiny_image())].into(),
        work_dir: bed.dir.path().join("runner"),
        metadata: Metadata::Imds,
        console_tail_lines: 40,
        identity: Some(aws.clone()),
    })
    .await
    .expect("runner");
    let cloud = json!({
        "name": "aws", "kind": "ec2", "region": REGION, "endpoint": moto.url,
        "options": {"coordinator_host": GUEST_HOST, "poll_secs": "0.5",
            "identity_certificate": aws.certificate_pem(), "identity_account": ACCOUNT},
        "credentials": {"access_key_id": "test", "secret_access_key": "test"},
    });
    let _: serde_json::Value = bed.client.post("/v1/clouds", &cloud).await.expect("add cloud");
    let mut spec = Bed::spec("web", "echo enrolled as the instance\n", &["aws"]);
    spec.targets.values_mut().for_each(|t| t.base_image = ami.clone());
    bed.create_generator(&spec).await;
    let build = bed.wait(&bed.start_build("web").await).await;

    assert_eq!(build.status, Status::Successful, "{build:#?}");
    let t = &build.targets[0];
    assert_eq!(bed.log(t.id).await, b"enrolled as the instance\n");
    let instance = t.instance.as_deref().unwrap();
    let asked = runner.imds(instance).expect("the instance's IMDS").requests;
    for path in ["document", "rsa2048"] {
        let line = format!("GET /latest/dynamic/instance-identity/{path} 200");
        assert!(asked.contains(&line), "the agent read {path}: {asked:?}");
    }
}
