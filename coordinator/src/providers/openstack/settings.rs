//! What an `openstack` cloud's options and a target's launch options ask for.

use kiln_protocol::quote::quote;
use std::time::Duration;

use kiln_protocol::api::{Cloud, CloudCredentials, TargetSpec};

use crate::providers::{ProviderError, ProviderErrorKind};

/// Cloud options an `openstack` cloud understands.
const CLOUD_OPTIONS: &[&str] = &[
    "user",
    "user_domain",
    "project",
    "project_domain",
    "ask_password",
    "flavor",
    "network",
    "poll_secs",
    "image_timeout_secs",
    "coordinator_host",
];
/// Launch options an `openstack` target understands.
const TARGET_OPTIONS: &[&str] = &["security_groups"];

#[derive(Clone)]
pub struct Settings {
    /// Keystone v3, e.g. `https://keystone.example:5000/v3`.
    pub auth_url: String,
    pub region: String,
    pub user: String,
    pub user_domain: String,
    pub project: String,
    pub project_domain: String,
    pub password: String,
    pub flavor: Option<String>,
    pub network: Option<String>,
    pub image_timeout: Duration,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("auth_url", &self.auth_url)
            .field("region", &self.region)
            .field("user", &self.user)
            .field("project", &self.project)
            .finish_non_exhaustive()
    }
}

fn invalid(message: impl Into<String>) -> ProviderError {
    ProviderError::new(ProviderErrorKind::Invalid, message)
}

impl Settings {
    /// Checks a cloud at `cloud add`: everything [`Settings::of`] checks,
    /// except a password when the cloud asks for it at every build.
    pub fn check(cloud: &Cloud) -> Result<(), ProviderError> {
        match &cloud.credentials {
            None if crate::app::catalog::asks_password(cloud) => Self::with_password(cloud, String::new()).map(drop),
            _ => Self::of(cloud).map(drop),
        }
    }

    pub fn of(cloud: &Cloud) -> Result<Self, ProviderError> {
        let password = match &cloud.credentials {
            Some(CloudCredentials::Password { password }) => password.clone(),
            _ => {
                return Err(invalid(format!(
                    "cloud {} has no password: store one (kiln cloud add --store-password) or set ask_password=true",
                    cloud.name
                )));
            }
        };
        Self::with_password(cloud, password)
    }

    fn with_password(cloud: &Cloud, password: String) -> Result<Self, ProviderError> {
        let o = &cloud.options;
        if let Some(key) = o.keys().find(|k| !CLOUD_OPTIONS.contains(&k.as_str())) {
            return Err(invalid(format!(
                "openstack clouds have no option {}; they know {}",
                quote(key),
                CLOUD_OPTIONS.join(", ")
            )));
        }
        let auth_url = cloud
            .endpoint
            .clone()
            .ok_or_else(|| invalid(format!("cloud {} needs its Keystone v3 URL as --endpoint", cloud.name)))?;
        crate::providers::check_endpoint(&auth_url)?;
        let region = cloud.region.clone().ok_or_else(|| invalid(format!("cloud {} has no region", cloud.name)))?;
        if let Some(v) = o.get("ask_password").filter(|v| !matches!(v.as_str(), "true" | "false")) {
            return Err(invalid(format!("option ask_password is {}; use true or false", quote(v))));
        }
        let required = |key: &str| {
            o.get(key)
                .filter(|v| !v.trim().is_empty())
                .cloned()
                .ok_or_else(|| invalid(format!("cloud {} has no {key}: give it with --option {key}=...", cloud.name)))
        };
        let secs = |key: &str, default: f64| crate::providers::seconds_option(o, key, default);
        // Checked here; `poll_interval` reads it without needing a password.
        secs("poll_secs", 5.0)?;
        Ok(Self {
            auth_url: auth_url.trim_end_matches('/').to_owned(),
            region,
            user: required("user")?,
            user_domain: o.get("user_domain").cloned().unwrap_or_else(|| "Default".into()),
            project: required("project")?,
            project_domain: o.get("project_domain").cloned().unwrap_or_else(|| "Default".into()),
            password,
            flavor: o.get("flavor").cloned(),
            network: o.get("network").cloned(),
            image_timeout: secs("image_timeout_secs", 3600.0)?,
        })
    }
}

/// Checks a target's launch options; returns its security groups.
pub fn security_groups(spec: &TargetSpec) -> Result<Vec<String>, ProviderError> {
    if let Some(key) = spec.options.keys().find(|k| !TARGET_OPTIONS.contains(&k.as_str())) {
        return Err(invalid(format!(
            "openstack targets have no launch option {}; they know {}",
            quote(key),
            TARGET_OPTIONS.join(", ")
        )));
    }
    Ok(spec
        .options
        .get("security_groups")
        .map(|v| v.split(',').map(str::trim).filter(|g| !g.is_empty()).map(String::from).collect())
        .unwrap_or_default())
}
