//! Keystone v3 password authentication scoped to a project, the service
//! catalog, and authenticated calls that re-authenticate when the token
//! expires or is refused.

use jiff::Timestamp;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::settings::Settings;
use crate::providers::{ProviderError, ProviderErrorKind};

/// The compute API version kiln speaks: createImage answers `{"image_id"}` from 2.45.
pub const COMPUTE_MICROVERSION: &str = "2.47";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Compute,
    Image,
}

impl Service {
    fn catalog_type(self) -> &'static str {
        match self {
            Service::Compute => "compute",
            Service::Image => "image",
        }
    }
}

#[derive(Clone)]
struct Token {
    value: String,
    expires_at: Timestamp,
    compute: String,
    image: String,
}

/// One authenticated session with one cloud.
pub struct Session {
    http: reqwest::Client,
    settings: Settings,
    token: Mutex<Option<Token>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("settings", &self.settings).finish_non_exhaustive()
    }
}

/// A failed OpenStack call as a provider error, with the service's own message.
pub fn error(what: &str, status: StatusCode, body: &str) -> ProviderError {
    // Nova: {"badRequest": {"code", "message"}}; Keystone: {"error": {"message"}}; Glance: text.
    let parsed: Option<(String, String)> = serde_json::from_str::<Value>(body).ok().and_then(|v| {
        let (key, inner) = v.as_object()?.iter().next()?;
        let message = inner.get("message")?.as_str()?.to_owned();
        Some((key.clone(), message))
    });
    let (code, message) = parsed.unwrap_or_else(|| {
        let text: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
        (
            status.as_u16().to_string(),
            if text.is_empty() { status.to_string() } else { text.chars().take(300).collect() },
        )
    });
    let (kind, hint) = match status {
        StatusCode::NOT_FOUND => (ProviderErrorKind::NotFound, ""),
        StatusCode::UNAUTHORIZED => {
            (ProviderErrorKind::Invalid, "; check the cloud's user, user_domain, project, project_domain and password")
        }
        StatusCode::FORBIDDEN => (ProviderErrorKind::Invalid, "; free quota in the project or ask its administrator"),
        StatusCode::CONFLICT | StatusCode::TOO_MANY_REQUESTS => (ProviderErrorKind::Transient, ""),
        s if s.is_server_error() => (ProviderErrorKind::Transient, ""),
        _ => (ProviderErrorKind::Invalid, ""),
    };
    ProviderError::new(kind, format!("{what}: {message} ({}){hint}", status.as_u16())).with_code(code)
}

fn unreachable(what: &str, e: reqwest::Error) -> ProviderError {
    let kind = if e.is_timeout() || e.is_connect() { ProviderErrorKind::Transient } else { ProviderErrorKind::Failed };
    let text = crate::error_chain(&e);
    ProviderError::new(kind, format!("{what}: cannot reach OpenStack ({text}); check the cloud's endpoint"))
}

impl Session {
    pub fn new(http: reqwest::Client, settings: Settings) -> Self {
        Self { http, settings, token: Mutex::new(None) }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    async fn authenticate(&self) -> Result<Token, ProviderError> {
        let s = &self.settings;
        let body = json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": s.user, "domain": {"name": s.user_domain}, "password": s.password}}},
            "scope": {"project": {"name": s.project, "domain": {"name": s.project_domain}}},
        }});
        let resp = self
            .http
            .post(format!("{}/auth/tokens", s.auth_url))
            .json(&body)
            .send()
            .await
            .map_err(|e| unreachable("Keystone authentication", e))?;
        let status = resp.status();
        let value = resp.headers().get("x-subject-token").and_then(|v| v.to_str().ok()).map(String::from);
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(error(&format!("Keystone refused user {} in project {}", s.user, s.project), status, &text));
        }
        let value = value.ok_or_else(|| {
            ProviderError::new(ProviderErrorKind::Failed, "Keystone answered without an X-Subject-Token header")
        })?;
        let doc: Value = serde_json::from_str(&text)
            .map_err(|e| ProviderError::new(ProviderErrorKind::Failed, format!("Keystone's token is not JSON: {e}")))?;
        let token = &doc["token"];
        let expires_at = token["expires_at"].as_str().and_then(|t| t.parse().ok()).unwrap_or_else(Timestamp::now);
        let endpoint = |service: Service| -> Result<String, ProviderError> {
            token["catalog"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["type"] == service.catalog_type())
                .flat_map(|e| e["endpoints"].as_array().into_iter().flatten())
                .find(|ep| {
                    ep["interface"] == "public"
                        && (ep["region_id"] == s.region.as_str() || ep["region"] == s.region.as_str())
                })
                .and_then(|ep| ep["url"].as_str())
                .map(|u| u.trim_end_matches('/').to_owned())
                .ok_or_else(|| {
                    ProviderError::new(
                        ProviderErrorKind::Invalid,
                        format!(
                            "the service catalog has no public {} endpoint in region {}; check the cloud's region",
                            service.catalog_type(),
                            s.region
                        ),
                    )
                    .with_code("EndpointNotFound")
                })
        };
        Ok(Token { value, expires_at, compute: endpoint(Service::Compute)?, image: endpoint(Service::Image)? })
    }

    /// A token valid for at least another minute.
    async fn token(&self, renew: bool) -> Result<Token, ProviderError> {
        let mut slot = self.token.lock().await;
        let fresh =
            slot.as_ref().is_some_and(|t| t.expires_at > Timestamp::now() + jiff::SignedDuration::from_secs(60));
        if renew || !fresh {
            *slot = Some(self.authenticate().await?);
        }
        Ok(slot.clone().expect("just set"))
    }

    /// Checks the credentials and the catalog.
    pub async fn check(&self) -> Result<(), ProviderError> {
        self.token(false).await.map(|_| ())
    }

    /// Calls `service` at `path`; re-authenticates once if the token is refused.
    pub async fn call(
        &self,
        what: &str,
        service: Service,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), ProviderError> {
        let mut renew = false;
        loop {
            let token = self.token(renew).await?;
            let base = match service {
                Service::Compute => &token.compute,
                Service::Image => &token.image,
            };
            let mut req = self
                .http
                .request(method.clone(), format!("{base}{path}"))
                .header("X-Auth-Token", &token.value)
                .header("OpenStack-API-Version", format!("compute {COMPUTE_MICROVERSION}"))
                .header("X-OpenStack-Nova-API-Version", COMPUTE_MICROVERSION);
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req.send().await.map_err(|e| unreachable(what, e))?;
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            if status == StatusCode::UNAUTHORIZED && !renew {
                tracing::info!("OpenStack refused the token; authenticating again");
                renew = true;
                continue;
            }
            if !status.is_success() {
                return Err(error(what, status, &text));
            }
            let value =
                if text.trim().is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::Null) };
            return Ok((status, value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // OpenStack's error bodies become the cloud's code and message, one case per line.
    #[test]
    fn errors_carry_openstacks_message() {
        let cases = [
            (
                400,
                r#"{"badRequest": {"code": 400, "message": "Flavor 9 could not be found."}}"#,
                "badRequest",
                "Flavor 9 could not be found.",
                ProviderErrorKind::Invalid,
            ),
            (
                401,
                r#"{"error": {"code": 401, "title": "Unauthorized", "message": "The request you have made requires authentication."}}"#,
                "error",
                "requires authentication",
                ProviderErrorKind::Invalid,
            ),
            (
                403,
                r#"{"forbidden": {"code": 403, "message": "Quota exceeded for instances"}}"#,
                "forbidden",
                "free quota",
                ProviderErrorKind::Invalid,
            ),
            (
                404,
                r#"{"itemNotFound": {"code": 404, "message": "Instance x could not be found."}}"#,
                "itemNotFound",
                "could not be found",
                ProviderErrorKind::NotFound,
            ),
            (503, "<html>Service Unavailable</html>", "503", "Service Unavailable", ProviderErrorKind::Transient),
        ];
        for (status, body, code, needle, kind) in cases {
            let e = error("doing it", StatusCode::from_u16(status).unwrap(), body);
            assert_eq!(e.code.as_deref(), Some(code), "{body}");
            assert!(e.to_string().contains(needle), "{e}");
            assert_eq!(e.kind, kind, "{body}");
        }
    }
}
