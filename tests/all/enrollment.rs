//! The trust model: one-time tokens, certificates bound to one target, the pinned CA.

use std::time::Duration;

use kiln_protocol::TargetId;
use kiln_protocol::agent::{EnrollRequest, EnrollResponse, ExitReport, Job, LogAck, ScriptOutcome, paths};
use kiln_protocol::api::{Build, FailureReason, Status, Step};
use kiln_protocol::error::ErrorBody;
use kiln_tests::bed::{Bed, Options};
use kiln_tests::process::IDLE_IMAGE;
use rcgen::{CertificateParams, KeyPair};
use reqwest::StatusCode;

/// A build whose instances never run their user-data, so the test plays the agent.
async fn idle_build(bed: &Bed, clouds: &[&str]) -> Build {
    for c in clouds {
        bed.add_cloud(c).await;
    }
    let mut spec = Bed::spec("idle", "echo job\n", clouds);
    for t in spec.targets.values_mut() {
        t.base_image = IDLE_IMAGE.into();
    }
    bed.create_generator(&spec).await;
    let build = bed.start_build("idle").await;
    // The token exists once the target is launched.
    for t in &build.targets {
        wait_step(bed, build.id, t.id, Step::AwaitAgent).await;
    }
    build
}

async fn wait_step(bed: &Bed, build: kiln_protocol::BuildId, target: TargetId, step: Step) {
    let wait = async {
        let mut changes = bed.app().subscribe_changes();
        loop {
            let b: Build = bed.client.get(&format!("/v1/builds/{build}")).await.unwrap();
            if b.targets.iter().any(|t| t.id == target && t.step >= step) {
                return;
            }
            changes.changed().await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(30), wait).await.expect("target reached its step");
}

fn csr() -> (KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap().pem().unwrap();
    (key, csr)
}

fn anonymous(bed: &Bed) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(bed.app().pki().ca_pem().as_bytes()).unwrap();
    reqwest::Client::builder().use_rustls_tls().tls_built_in_root_certs(false).add_root_certificate(ca).build().unwrap()
}

fn with_identity(bed: &Bed, cert_pem: &str, key: &KeyPair) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(bed.app().pki().ca_pem().as_bytes()).unwrap();
    let identity = reqwest::Identity::from_pem(format!("{cert_pem}{}", key.serialize_pem()).as_bytes()).unwrap();
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .identity(identity)
        .build()
        .unwrap()
}

async fn enroll(bed: &Bed, target: TargetId, token: &str, csr: &str) -> reqwest::Response {
    let req = EnrollRequest { target, token: token.into(), csr_pem: csr.into(), identity: None };
    anonymous(bed).post(format!("{}{}", bed.agent_url(), paths::ENROLL)).json(&req).send().await.unwrap()
}

async fn status_and_message(resp: reqwest::Response) -> (StatusCode, String) {
    let status = resp.status();
    let body: ErrorBody = resp.json().await.unwrap();
    (status, body.message)
}

// A token works once: a malformed CSR is refused without using it, the first
// real enrollment succeeds, only the enrolled key may retry (after a lost
// answer), and a replay of the token with another key is refused and fails
// the target (enrollment_conflict).
#[tokio::test]
async fn tokens_are_single_use() {
    let bed = Bed::start().await;
    let build = idle_build(&bed, &["local"]).await;
    let target = build.targets[0].id;
    let token = bed.app().pki().tokens().token(target);
    let (_, good_csr) = csr();

    let (status, msg) = status_and_message(
        enroll(&bed, target, &token, "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(msg.contains("malformed"), "{msg}");

    let resp = enroll(&bed, target, &token, &good_csr).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let _: EnrollResponse = resp.json().await.unwrap();

    // The agent retrying with its own key, after a lost answer, gets a certificate again.
    let resp = enroll(&bed, target, &token, &good_csr).await;
    assert_eq!(resp.status(), StatusCode::OK, "a retry with the enrolled key is answered");

    // A replay with another key (anyone who read the user-data) gets nothing,
    // and trips the wire: the target fails and nothing is made of it.
    let (_, other_csr) = csr();
    let (status, msg) = status_and_message(enroll(&bed, target, &token, &other_csr).await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(msg.contains("already used"), "{msg}");
    let b = bed.wait(&build).await;
    assert_eq!(b.status, Status::Failed, "{b:#?}");
    let err = b.targets[0].error.as_ref().expect("an error");
    assert_eq!(err.reason, FailureReason::EnrollmentConflict, "{err:#?}");
    assert!(err.message.contains("user-data has leaked"), "{}", err.message);
    assert!(b.targets[0].image.is_none());
    let (status, _) = status_and_message(enroll(&bed, target, &token, &good_csr).await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "an ended target enrolls nobody, its own agent included");
}

// An expired token is refused and nothing is issued; the agent never phones
// home, so the target fails after its timeout with the console in the error.
#[tokio::test]
async fn expired_token_is_refused() {
    let bed =
        Bed::with(Options { token_ttl: Duration::ZERO, agent_contact: Duration::from_secs(3), ..Options::default() })
            .await;
    let build = idle_build(&bed, &["local"]).await;
    let target = build.targets[0].id;
    let token = bed.app().pki().tokens().token(target);
    let (_, csr) = csr();
    let (status, msg) = status_and_message(enroll(&bed, target, &token, &csr).await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(msg.contains("expired"), "{msg}");

    let build = bed.wait(&build).await;
    let t = &build.targets[0];
    assert!(t.timings.agent_contact_at.is_none(), "no enrollment was recorded");
    let err = t.error.as_ref().unwrap();
    assert_eq!(err.reason, FailureReason::AgentUnreachable);
    assert!(err.message.contains("did not phone home within 3s"), "{}", err.message);
    assert!(bed.provider.live_instances().is_empty(), "the instance was terminated");
}

// A certificate opens only its own target, only while the target runs; log
// chunks must continue the committed log and stop at the reported total.
#[tokio::test]
async fn certificates_are_bound_to_their_target() {
    let bed = Bed::start().await;
    let build = idle_build(&bed, &["a", "b"]).await;
    let (a, b) = (build.targets[0].id, build.targets[1].id);
    let (key, csr) = csr();
    let token = bed.app().pki().tokens().token(a);
    let cert: EnrollResponse = enroll(&bed, a, &token, &csr).await.json().await.unwrap();
    let agent = with_identity(&bed, &cert.certificate_pem, &key);
    let url = |p: String| format!("{}{p}", bed.agent_url());

    let job: Job = agent.get(url(paths::job(a))).send().await.unwrap().json().await.unwrap();
    assert_eq!(job.script, "echo job\n");

    let (status, msg) = status_and_message(agent.get(url(paths::job(b))).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(msg.contains(&format!("belongs to target {a}")), "{msg}");
    let resp = agent.put(url(paths::log(b))).query(&[("offset", 0)]).body("x").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    let (status, _) = status_and_message(anonymous(&bed).get(url(paths::job(a))).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no certificate, no job");

    let resp = agent.put(url(paths::log(a))).query(&[("offset", 5)]).body("gap").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    let err: ErrorBody = resp.json().await.unwrap();
    assert_eq!(err.committed, Some(0));
    let ack: LogAck = agent
        .put(url(paths::log(a)))
        .query(&[("offset", 0)])
        .body("hello\n")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ack.committed, 6);

    // After the exit report, output past the reported total is refused; a
    // chunk sent again within it is still answered.
    let report = ExitReport { outcome: ScriptOutcome::Exited { code: 0 }, total_bytes: 6 };
    let resp = agent.post(url(paths::exit(a))).json(&report).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (status, msg) =
        status_and_message(agent.put(url(paths::log(a))).query(&[("offset", 6)]).body("late\n").send().await.unwrap())
            .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(msg.contains("reported with 6 bytes"), "{msg}");
    let resp = agent.put(url(paths::log(a))).query(&[("offset", 0)]).body("hello\n").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "a resent chunk within the total");
    assert_eq!(bed.log(a).await, b"hello\n");

    let done: Build = bed.client.post(&format!("/v1/builds/{}/cancel", build.id), &()).await.unwrap();
    bed.wait(&done).await;
    let (status, msg) = status_and_message(agent.get(url(paths::job(a))).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(msg.contains("has ended"), "{msg}");
}

// The agent trusts only the pinned CA: against a coordinator whose certificate
// comes from another CA it refuses to talk and gives up. And the coordinator
// refuses a client certificate from another CA.
#[tokio::test]
async fn foreign_certificates_are_rejected() {
    let bed = Bed::start().await;
    let build = idle_build(&bed, &["local"]).await;
    let target = build.targets[0].id;

    let other_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_ca = params.self_signed(&other_key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), other_ca.pem()).unwrap();

    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(kiln_tests::agent_binary())
            .args(["--coordinator", &bed.agent_url(), "--ca"])
            .arg(dir.path().join("ca.pem"))
            .args(["--target", &target.to_string(), "--dir"])
            .arg(dir.path().join("agent"))
            .args(["--give-up-secs", "2", "--max-backoff-ms", "200"])
            .env("KILN_ENROLL_TOKEN", bed.app().pki().tokens().token(target))
            .output(),
    )
    .await
    .expect("the agent gave up in time")
    .unwrap();
    assert!(!out.status.success(), "the agent must not accept a foreign server certificate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");

    // A client certificate signed by another CA, naming this target.
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.subject_alt_names = vec![rcgen::SanType::URI(target.san_uri().try_into().unwrap())];
    let issuer = rcgen::Issuer::new(params, other_key);
    let forged = leaf.signed_by(&key, &issuer).unwrap();
    let client = with_identity(&bed, &forged.pem(), &key);
    let result = client.get(format!("{}{}", bed.agent_url(), paths::job(target))).send().await;
    match result {
        Err(_) => {}
        Ok(resp) => assert_ne!(resp.status(), StatusCode::OK, "a forged certificate opened the job"),
    }

    let b: Build = bed.client.get(&format!("/v1/builds/{}", build.id)).await.unwrap();
    assert!(b.targets[0].timings.agent_contact_at.is_none(), "nothing enrolled");
    let done: Build = bed.client.post(&format!("/v1/builds/{}/cancel", build.id), &()).await.unwrap();
    bed.wait(&done).await;
}
