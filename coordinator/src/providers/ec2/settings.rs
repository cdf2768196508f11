//! What an `ec2` cloud's options and a target's launch options ask for.

use kiln_protocol::quote::quote;
use std::time::Duration;

use kiln_protocol::api::{Cloud, TargetSpec};

use crate::providers::{ProviderError, ProviderErrorKind};

/// Cloud options an `ec2` cloud understands.
const CLOUD_OPTIONS: &[&str] = &[
    "instance_type",
    "poll_secs",
    "image_timeout_secs",
    "copy_to_regions",
    "coordinator_host",
    "identity_certificate",
    "identity_account",
];
/// Launch options an `ec2` target understands.
const TARGET_OPTIONS: &[&str] = &["security_groups", "instance_profile"];

/// The instance type when neither the target nor the cloud names one.
pub const DEFAULT_INSTANCE_TYPE: &str = "t3.micro";

#[derive(Debug, Clone)]
pub struct Settings {
    pub region: String,
    pub instance_type: String,
    /// How often instance and image states are polled (each poll is one API call).
    pub poll: Duration,
    pub image_timeout: Duration,
    pub copy_to_regions: Vec<String>,
}

fn invalid(message: impl Into<String>) -> ProviderError {
    ProviderError::new(ProviderErrorKind::Invalid, message)
}

impl Settings {
    pub fn of(cloud: &Cloud) -> Result<Self, ProviderError> {
        if let Some(key) = cloud.options.keys().find(|k| !CLOUD_OPTIONS.contains(&k.as_str())) {
            return Err(invalid(format!(
                "ec2 clouds have no option {}; they know {}",
                quote(key),
                CLOUD_OPTIONS.join(", ")
            )));
        }
        let region =
            cloud.region.clone().filter(|r| !r.trim().is_empty()).ok_or_else(|| {
                invalid(format!("cloud {} has no region: give one, e.g. --region us-east-1", cloud.name))
            })?;
        if let Some(ep) = &cloud.endpoint {
            crate::providers::check_endpoint(ep)?;
        }
        let secs = |key: &str, default: f64| crate::providers::seconds_option(&cloud.options, key, default);
        Ok(Self {
            region,
            instance_type: cloud.options.get("instance_type").cloned().unwrap_or_else(|| DEFAULT_INSTANCE_TYPE.into()),
            poll: secs("poll_secs", 10.0)?,
            image_timeout: secs("image_timeout_secs", 3600.0)?,
            copy_to_regions: cloud
                .options
                .get("copy_to_regions")
                .map(|v| v.split(',').map(str::trim).filter(|r| !r.is_empty()).map(String::from).collect())
                .unwrap_or_default(),
        })
    }
}

/// What an enrolling agent's instance identity document must show, from the
/// `identity_certificate` (AWS's RSA-2048 certificate of the region: PEM, or
/// the path of a PEM file) and `identity_account` options.
#[derive(Debug, Clone)]
pub struct IdentityCheck {
    pub signer: super::identity::Signer,
    pub region: String,
    /// The 12-digit AWS account the instance must belong to, if given.
    pub account: Option<String>,
}

impl IdentityCheck {
    /// `None` if the cloud has no `identity_certificate`.
    pub fn of(cloud: &Cloud) -> Result<Option<Self>, ProviderError> {
        let Some(cert) = cloud.options.get("identity_certificate") else {
            if cloud.options.contains_key("identity_account") {
                return Err(invalid("identity_account needs identity_certificate: the document is checked with it"));
            }
            return Ok(None);
        };
        let signer = super::identity::Signer::from_option(cert).map_err(invalid)?;
        let account = cloud.options.get("identity_account").cloned();
        if let Some(a) = account.as_ref().filter(|a| a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit())) {
            return Err(invalid(format!("identity_account {a:?} is not a 12-digit AWS account id")));
        }
        let region = Settings::of(cloud)?.region;
        Ok(Some(Self { signer, region, account }))
    }
}

/// A target's launch options, checked.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    pub security_groups: Vec<String>,
    pub instance_profile: Option<String>,
}

impl Launch {
    pub fn of(spec: &TargetSpec) -> Result<Self, ProviderError> {
        if let Some(key) = spec.options.keys().find(|k| !TARGET_OPTIONS.contains(&k.as_str())) {
            return Err(invalid(format!(
                "ec2 targets have no launch option {}; they know {}",
                quote(key),
                TARGET_OPTIONS.join(", ")
            )));
        }
        Ok(Self {
            security_groups: spec
                .options
                .get("security_groups")
                .map(|v| v.split(',').map(str::trim).filter(|g| !g.is_empty()).map(String::from).collect())
                .unwrap_or_default(),
            instance_profile: spec.options.get("instance_profile").cloned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cloud(region: Option<&str>, endpoint: Option<&str>, options: &[(&str, &str)]) -> Cloud {
        Cloud {
            name: "c".parse().unwrap(),
            kind: kiln_protocol::api::CloudKind::Ec2,
            region: region.map(String::from),
            endpoint: endpoint.map(String::from),
            options: options.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            credentials: None,
        }
    }

    // Each bad cloud gets an error saying what to fix, one case per line.
    #[test]
    fn cloud_settings_are_checked() {
        let cases: &[(Cloud, Option<&str>)] = &[
            (cloud(Some("us-east-1"), None, &[]), None),
            (cloud(Some("nimbus"), Some("https://nimbus.example:8444"), &[("poll_secs", "0.5")]), None),
            (cloud(None, None, &[]), Some("has no region")),
            (cloud(Some("r"), Some("ftp://x"), &[]), Some("not an http(s) URL")),
            (cloud(Some("r"), None, &[("colour", "red")]), Some("no option \"colour\"")),
            (cloud(Some("r"), None, &[("poll_secs", "soon")]), Some("option poll_secs is \"soon\"")),
        ];
        for (c, want) in cases {
            match (Settings::of(c), want) {
                (Ok(_), None) => {}
                (Err(e), Some(w)) => assert!(e.to_string().contains(w), "{e}"),
                (got, want) => panic!("{c:?}: got {got:?}, want {want:?}"),
            }
        }
        let s = Settings::of(&cloud(Some("r"), None, &[("copy_to_regions", "a, b,,")])).unwrap();
        assert_eq!(s.copy_to_regions, ["a", "b"]);
        assert_eq!(s.instance_type, DEFAULT_INSTANCE_TYPE);
    }
}
