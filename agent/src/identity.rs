//! The machine's cloud-signed identity, sent at enrollment where the
//! user-data asks for it: EC2's instance identity document and its `rsa2048`
//! PKCS#7 signature, read from IMDS (IMDSv2: a session token first).

use std::time::Duration;

use anyhow::anyhow;
use clap::ValueEnum;
use kiln_protocol::agent::InstanceIdentity;
use reqwest::{Client, StatusCode, Url};
use tracing::{info, warn};

use crate::client::{Failure, RetryPolicy, retry};

/// Where the agent reads its identity from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Source {
    /// EC2's IMDS: `/latest/dynamic/instance-identity/{document,rsa2048}`.
    Ec2,
}

/// IMDS answers within milliseconds; a streak of failures this long means it is not there.
const POLICY: RetryPolicy = RetryPolicy { max_backoff: Duration::from_secs(2), give_up: Duration::from_secs(30) };
const TOKEN_TTL_SECS: &str = "60";

/// Reads the identity, or says why not and returns `None`: the coordinator
/// decides whether an agent without one may enroll.
pub async fn read(source: Source, imds: &Url) -> Option<InstanceIdentity> {
    let Source::Ec2 = source;
    match ec2(imds).await {
        Ok(identity) => {
            info!("read the instance identity document from IMDS");
            Some(identity)
        }
        Err(err) => {
            warn!("enrolling without an instance identity document: {err:#}");
            None
        }
    }
}

async fn ec2(imds: &Url) -> anyhow::Result<InstanceIdentity> {
    let http = Client::builder()
        // IMDS is link-local: never through a proxy.
        .no_proxy()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .build()?;
    let url = |path: &str| {
        let mut url = imds.clone();
        url.set_path(path);
        url
    };
    let token = retry(POLICY, "getting an IMDSv2 token", || async {
        let request = http.put(url("/latest/api/token")).header("X-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL_SECS);
        answer(request).await
    })
    .await?;
    let get = |path: &'static str, what: &'static str| {
        let (http, token, url) = (&http, &token, url(path));
        retry(POLICY, what, move || {
            let request = http.get(url.clone()).header("X-aws-ec2-metadata-token", token);
            answer(request)
        })
    };
    let document = get("/latest/dynamic/instance-identity/document", "reading the instance identity document").await?;
    let rsa2048 = get("/latest/dynamic/instance-identity/rsa2048", "reading its rsa2048 signature").await?;
    Ok(InstanceIdentity::Ec2 { document, rsa2048: rsa2048.trim().to_owned() })
}

/// One IMDS request: the body of a 200; network errors, 429 and 5xx are transient.
async fn answer(request: reqwest::RequestBuilder) -> Result<String, Failure> {
    let response = request.send().await?;
    let status = response.status();
    if status == StatusCode::OK {
        return Ok(response.text().await?);
    }
    let err = anyhow!("IMDS answered {status} for {}", response.url().path());
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        Err(Failure::Transient(err))
    } else {
        Err(Failure::Fatal(err))
    }
}
