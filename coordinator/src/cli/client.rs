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
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .context("cannot build an HTTP client")?;
        Ok(Self { base: base.trim_end_matches('/').to_owned(), http })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base))
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
