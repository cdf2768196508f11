//! HTTPS clients for the coordinator, and the retry policy every phase shares.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use kiln_protocol::TargetId;
use kiln_protocol::error::ErrorBody;
use reqwest::{Certificate, Client, Identity, RequestBuilder, Response, StatusCode, Url};
use tracing::warn;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const MIN_BACKOFF: Duration = Duration::from_millis(200);

/// The coordinator's agent listener as seen by one target, reached through a
/// client that trusts only the pinned CA.
#[derive(Clone, Debug)]
pub struct Api {
    http: Client,
    base: Url,
    pub target: TargetId,
    pub retry: RetryPolicy,
}

impl Api {
    /// A client with no certificate of its own: enough to enroll.
    pub fn anonymous(base: Url, target: TargetId, ca_pem: &[u8], retry: RetryPolicy) -> anyhow::Result<Api> {
        Self::build(base, target, ca_pem, None, retry)
    }

    /// A client that presents `cert_pem` (and its key) on every request.
    pub fn authenticated(
        base: Url,
        target: TargetId,
        ca_pem: &[u8],
        cert_pem: &str,
        key_pem: &str,
        retry: RetryPolicy,
    ) -> anyhow::Result<Api> {
        let identity = Identity::from_pem(format!("{cert_pem}\n{key_pem}").as_bytes())
            .context("loading the issued certificate")?;
        Self::build(base, target, ca_pem, Some(identity), retry)
    }

    fn build(
        base: Url,
        target: TargetId,
        ca_pem: &[u8],
        identity: Option<Identity>,
        retry: RetryPolicy,
    ) -> anyhow::Result<Api> {
        let ca = Certificate::from_pem(ca_pem).context("reading the CA certificate")?;
        let mut builder = Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .https_only(true)
            // The coordinator is reached directly, whatever proxy the VM's environment names.
            .no_proxy()
            // A static glibc binary cannot resolve names through NSS.
            .hickory_dns(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT);
        if let Some(identity) = identity {
            builder = builder.identity(identity);
        }
        let http = builder.build().context("building the HTTPS client")?;
        Ok(Api { http, base, target, retry })
    }

    pub fn http(&self) -> &Client {
        &self.http
    }

    /// The URL of an absolute `path` on the coordinator.
    pub fn url(&self, path: &str) -> Url {
        let mut url = self.base.clone();
        url.set_path(path);
        url
    }
}

/// Why one attempt failed, and whether another may succeed.
#[derive(Debug)]
pub enum Failure {
    /// The network or the coordinator is unavailable for now.
    Transient(anyhow::Error),
    /// Retrying cannot help.
    Fatal(anyhow::Error),
}

impl From<reqwest::Error> for Failure {
    fn from(err: reqwest::Error) -> Failure {
        if err.is_builder() || err.is_decode() { Failure::Fatal(err.into()) } else { Failure::Transient(err.into()) }
    }
}

/// Sends `request`. Network errors and 408, 429 and 5xx answers are
/// transient; any other answer is returned for the caller to read.
pub async fn send(request: RequestBuilder) -> Result<Response, Failure> {
    let response = request.send().await?;
    let status = response.status();
    if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS {
        let (_, message) = error_body(response).await;
        return Err(Failure::Transient(anyhow!("the coordinator answered {status}: {message}")));
    }
    Ok(response)
}

/// Reads an error answer: its [`ErrorBody`] if it has one, and a message.
pub async fn error_body(response: Response) -> (Option<ErrorBody>, String) {
    let text = response.text().await.unwrap_or_default();
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => {
            let message = body.message.clone();
            (Some(body), message)
        }
        Err(_) => (None, text.chars().take(500).collect()),
    }
}

/// An answer the caller does not expect: retrying cannot help.
pub async fn unexpected(response: Response) -> Failure {
    let status = response.status();
    let (_, message) = error_body(response).await;
    Failure::Fatal(anyhow!("the coordinator answered {status}: {message}"))
}

/// How long to wait between attempts, and when to stop trying.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub max_backoff: Duration,
    /// How long a streak of failures may last before giving up.
    pub give_up: Duration,
}

impl RetryPolicy {
    fn delays(&self) -> ExponentialBackoff {
        ExponentialBuilder::new()
            .with_min_delay(MIN_BACKOFF.min(self.max_backoff))
            .with_max_delay(self.max_backoff)
            .with_jitter()
            .without_max_times()
            .build()
    }
}

/// The state of one phase's retries: exponential backoff with jitter, and
/// the start of the current streak of failures.
pub struct Retry {
    policy: RetryPolicy,
    what: &'static str,
    delays: ExponentialBackoff,
    failing_since: Option<Instant>,
}

impl Retry {
    pub fn new(policy: RetryPolicy, what: &'static str) -> Retry {
        Retry { policy, what, delays: policy.delays(), failing_since: None }
    }

    /// Ends the streak of failures: the next one starts from the shortest delay.
    pub fn succeeded(&mut self) {
        if self.failing_since.take().is_some() {
            self.delays = self.policy.delays();
        }
    }

    /// Waits before the next attempt, or gives up with `err` once the streak
    /// of failures would outlast the policy's limit.
    pub async fn after(&mut self, err: anyhow::Error) -> anyhow::Result<()> {
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        let delay = self.delays.next().unwrap_or(self.policy.max_backoff).min(self.policy.max_backoff);
        if since.elapsed() + delay > self.policy.give_up {
            return Err(err.context(format!(
                "{}: gave up after {}s of failures",
                self.what,
                since.elapsed().as_secs()
            )));
        }
        warn!(retry_in_ms = delay.as_millis() as u64, "{} failed: {err:#}", self.what);
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

/// Runs `attempt` until it succeeds, fails fatally, or transient failures
/// have lasted longer than `policy` allows.
pub async fn retry<T, F, Fut>(policy: RetryPolicy, what: &'static str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let mut retry = Retry::new(policy, what);
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(Failure::Fatal(err)) => return Err(err.context(what)),
            Err(Failure::Transient(err)) => retry.after(err).await?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(give_up_ms: u64) -> RetryPolicy {
        RetryPolicy { max_backoff: Duration::from_millis(10), give_up: Duration::from_millis(give_up_ms) }
    }

    #[tokio::test]
    async fn retries_transient_failures_until_success() {
        let mut calls = 0;
        let value = retry(policy(10_000), "testing", || {
            calls += 1;
            let n = calls;
            async move { if n < 3 { Err(Failure::Transient(anyhow!("down"))) } else { Ok(n) } }
        })
        .await
        .unwrap();
        assert_eq!(value, 3);
    }

    #[tokio::test]
    async fn stops_at_a_fatal_failure() {
        let mut calls = 0;
        let err = retry(policy(10_000), "testing", || {
            calls += 1;
            async { Err::<(), _>(Failure::Fatal(anyhow!("no"))) }
        })
        .await
        .unwrap_err();
        assert_eq!(calls, 1);
        assert_eq!(format!("{err:#}"), "testing: no");
    }

    #[tokio::test]
    async fn gives_up_after_the_limit() {
        let err = retry(policy(0), "testing", || async { Err::<(), _>(Failure::Transient(anyhow!("down"))) })
            .await
            .unwrap_err();
        assert_eq!(format!("{err:#}"), "testing: gave up after 0s of failures: down");
    }
}
