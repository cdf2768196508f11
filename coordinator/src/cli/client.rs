//! A small typed client of the `/v1` API, shared by the CLI and the tests.

use anyhow::{Context, anyhow};
use kiln_protocol::error::ErrorBody;
use reqwest::{Method, RequestBuilder, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    /// Sent as `Authorization: Bearer …` with every request.
    token: Option<String>,
}

/// An error answer from the coordinator, with its status.
#[derive(Debug, thiserror::Error)]
#[error("{} ({status})", body.message)]
pub struct ApiFailure {
    pub status: reqwest::StatusCode,
    pub body: ErrorBody,
}

impl Client {
    pub fn new(base: &str) -> anyhow::Result<Self> {
        Self::build(base, reqwest::Client::builder())
    }

    /// A client that trusts kiln's CA (PEM) for an `https://` coordinator.
    pub fn with_ca(base: &str, ca_pem: &[u8]) -> anyhow::Result<Self> {
        let ca = reqwest::Certificate::from_pem(ca_pem).context("the CA certificate is not PEM")?;
        Self::build(base, reqwest::Client::builder().add_root_certificate(ca))
    }

    fn build(base: &str, http: reqwest::ClientBuilder) -> anyhow::Result<Self> {
        let http =
            http.connect_timeout(std::time::Duration::from_secs(10)).build().context("cannot build an HTTP client")?;
        Ok(Self { base: base.trim_end_matches('/').to_owned(), http, token: None })
    }

    /// The same client, sending `token` with every request.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into().trim().to_owned());
        self
    }

    /// The token this client sends, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// A request to `path`, with the client's token.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    /// Sends and turns a non-2xx answer into an [`ApiFailure`].
    pub async fn send(&self, req: RequestBuilder) -> anyhow::Result<Response> {
        let resp = req.send().await.map_err(|e| {
            anyhow!("cannot reach the coordinator at {}: {e}; start it with `kiln serve` or pass --server", self.base)
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str::<ErrorBody>(&text).unwrap_or(ErrorBody {
            code: kiln_protocol::error::ErrorCode::Internal,
            message: text,
            committed: None,
        });
        Err(ApiFailure { status, body }.into())
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        Ok(self.send(self.request(Method::GET, path)).await?.json().await?)
    }

    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        Ok(self.send(self.request(Method::POST, path).json(body)).await?.json().await?)
    }

    pub async fn put<B: Serialize + ?Sized, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        Ok(self.send(self.request(Method::PUT, path).json(body)).await?.json().await?)
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.send(self.request(Method::DELETE, path)).await?;
        Ok(())
    }
}
