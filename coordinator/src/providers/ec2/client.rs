//! One SDK client per cloud and region, built once.

use std::collections::HashMap;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_credential_types::Credentials;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::Region;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use kiln_protocol::api::{Cloud, CloudCredentials};
use tokio::sync::Mutex;

/// Clients by cloud, region, endpoint and access key.
#[derive(Debug, Default)]
pub struct Clients {
    by_key: Mutex<HashMap<String, Client>>,
}

impl Clients {
    /// The client for `cloud` in `region` (the cloud's own, or a copy target).
    pub async fn get(&self, cloud: &Cloud, region: &str) -> Client {
        let key = format!(
            "{}|{region}|{}|{}",
            cloud.name,
            cloud.endpoint.as_deref().unwrap_or(""),
            access_key(cloud).map(|(id, _)| id).unwrap_or("")
        );
        let mut clients = self.by_key.lock().await;
        if let Some(c) = clients.get(&key) {
            return c.clone();
        }
        let client = build(cloud, region).await;
        clients.insert(key, client.clone());
        client
    }
}

async fn build(cloud: &Cloud, region: &str) -> Client {
    let http =
        aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(CryptoMode::Ring)).build_https();
    let mut loader =
        aws_config::defaults(BehaviorVersion::latest()).http_client(http).region(Region::new(region.to_owned()));
    if let Some(endpoint) = &cloud.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    // Stored credentials win; else the standard chain (environment, profile, instance role).
    if let Some((id, secret)) = access_key(cloud) {
        loader = loader.credentials_provider(Credentials::new(id, secret, None, None, "kiln-cloud"));
    }
    let shared = loader.load().await;
    let config = aws_sdk_ec2::config::Builder::from(&shared)
        .retry_config(RetryConfig::standard().with_max_attempts(3).with_initial_backoff(Duration::from_millis(200)))
        .build();
    Client::from_conf(config)
}

/// The cloud's stored access key, if it has one.
fn access_key(cloud: &Cloud) -> Option<(&str, &str)> {
    match &cloud.credentials {
        Some(CloudCredentials::AccessKey { access_key_id, secret_access_key }) => {
            Some((access_key_id.as_str(), secret_access_key.as_str()))
        }
        _ => None,
    }
}
