//! Clouds and generators: what a build is made from.

use kiln_protocol::api::{Cloud, CloudCredentials, GeneratorSpec, GeneratorSummary, Revision};
use kiln_protocol::quote::quote;
use kiln_protocol::{BuildId, CloudName, GeneratorName, Timestamp};

use super::{App, AppError, script_sha256};
use crate::secrets::mask::MIN_SECRET_LEN;

impl App {
    pub async fn add_cloud(&self, cloud: Cloud) -> Result<Cloud, AppError> {
        for (what, value) in [("region", &cloud.region), ("endpoint", &cloud.endpoint)] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(AppError::BadRequest(format!("{what} is empty: give a value or leave it out")));
            }
        }
        if let Some(provider) = self.0.providers.get(cloud.kind) {
            provider.check_cloud(&cloud).map_err(|e| AppError::BadRequest(format!("cloud {}: {e}", cloud.name)))?;
        }
        let mut cloud = cloud;
        let credentials = cloud.credentials.take();
        let empty = match &credentials {
            Some(CloudCredentials::AccessKey { access_key_id, secret_access_key }) => {
                access_key_id.trim().is_empty() || secret_access_key.is_empty()
            }
            Some(CloudCredentials::Password { password }) => password.is_empty(),
            None => false,
        };
        if empty {
            return Err(AppError::BadRequest("the credentials have an empty field: give every value".into()));
        }
        self.0.store.insert_cloud(&cloud)?;
        if let Some(c) = &credentials {
            self.0.store.put_credentials(&cloud.name, c)?;
        }
        self.0.store.flush().await?;
        Ok(cloud)
    }

    pub fn clouds(&self) -> Result<Vec<Cloud>, AppError> {
        Ok(self.0.store.clouds()?)
    }

    pub fn cloud(&self, name: &CloudName) -> Result<Cloud, AppError> {
        self.0
            .store
            .cloud(name)?
            .ok_or_else(|| AppError::not_found(format!("cloud {name}"), "list them with `kiln cloud list`"))
    }

    /// `cloud` with its credentials, for the provider's calls only: the
    /// password given with `build` for a cloud that asks every time, else the
    /// stored credentials.
    pub(crate) fn with_credentials(&self, cloud: &Cloud, build: Option<BuildId>) -> Result<Cloud, AppError> {
        let mut cloud = cloud.clone();
        cloud.credentials = if asks_password(&cloud) {
            let secrets = self.0.build_secrets.lock().expect("secrets poisoned");
            let password = build.and_then(|b| secrets.get(&b)?.get(&cloud.name).cloned()).ok_or_else(|| {
                AppError::Unavailable(format!(
                    "cloud {} asks for its password at every build, and this build's password is gone (the coordinator restarted)",
                    cloud.name
                ))
            })?;
            Some(CloudCredentials::Password { password: password.0 })
        } else {
            self.0.store.credentials(&cloud.name)?
        };
        Ok(cloud)
    }

    /// Forgets a build's passwords once all its targets have ended.
    pub(crate) fn forget_secrets_if_done(&self, build: BuildId) {
        let done = self.0.store.build(build).ok().flatten().is_none_or(|b| {
            b.targets.iter().all(|t| self.0.store.target(*t).ok().flatten().is_none_or(|t| t.status.is_terminal()))
        });
        if done && self.0.build_secrets.lock().expect("secrets poisoned").remove(&build).is_some() {
            tracing::info!(%build, "build ended: its passwords are forgotten");
        }
    }

    pub async fn remove_cloud(&self, name: &CloudName) -> Result<(), AppError> {
        if !self.0.store.remove_cloud(name)? {
            return Err(AppError::not_found(format!("cloud {name}"), "list them with `kiln cloud list`"));
        }
        self.0.store.flush().await?;
        Ok(())
    }

    /// Creates a generator with its first revision.
    pub async fn create_generator(&self, spec: GeneratorSpec) -> Result<Revision, AppError> {
        self.check_spec(&spec)?;
        let sha = script_sha256(&spec.script);
        let rev = self.0.store.save_revision(spec, sha, Timestamp::now(), true)?;
        self.0.store.flush().await?;
        Ok(rev)
    }

    /// Saves a new revision of an existing generator.
    pub async fn update_generator(&self, name: &GeneratorName, spec: GeneratorSpec) -> Result<Revision, AppError> {
        if &spec.name != name {
            return Err(AppError::BadRequest(format!(
                "the body names generator {} but the URL names {name}; generators cannot be renamed",
                spec.name
            )));
        }
        self.check_spec(&spec)?;
        let sha = script_sha256(&spec.script);
        let rev = self.0.store.save_revision(spec, sha, Timestamp::now(), false)?;
        self.0.store.flush().await?;
        Ok(rev)
    }

    pub fn generators(&self) -> Result<Vec<GeneratorSummary>, AppError> {
        let mut out = Vec::new();
        for g in self.0.store.generators()? {
            let latest = self.revision(&g.name, Some(g.latest))?;
            out.push(GeneratorSummary {
                name: g.name,
                description: latest.spec.description.clone(),
                latest_revision: g.latest,
                updated_at: g.updated_at,
                clouds: latest.spec.targets.keys().cloned().collect(),
            });
        }
        Ok(out)
    }

    /// A revision, the latest when `number` is `None`.
    pub fn revision(&self, name: &GeneratorName, number: Option<u32>) -> Result<Revision, AppError> {
        let head =
            self.0.store.generator(name)?.ok_or_else(|| {
                AppError::not_found(format!("generator {name}"), "list them with `kiln generator list`")
            })?;
        let number = number.unwrap_or(head.latest);
        self.0.store.revision(name, number)?.ok_or_else(|| {
            AppError::NotFound(format!(
                "generator {name} has no revision {number}; it has revisions 1 to {}",
                head.latest
            ))
        })
    }

    pub fn revisions(&self, name: &GeneratorName) -> Result<Vec<Revision>, AppError> {
        self.revision(name, None)?;
        Ok(self.0.store.revisions(name)?)
    }

    fn check_spec(&self, spec: &GeneratorSpec) -> Result<(), AppError> {
        let limits = &self.0.config.limits;
        if spec.script.trim().is_empty() {
            return Err(AppError::BadRequest("the script is empty: give the commands to run".into()));
        }
        if spec.script.len() > limits.max_script_bytes {
            return Err(AppError::BadRequest(format!(
                "the script is {} bytes; the limit is {} bytes ({} KiB): move large files into the base image or fetch them from the script",
                spec.script.len(),
                limits.max_script_bytes,
                limits.max_script_bytes / 1024
            )));
        }
        if spec.script.contains('\0') {
            return Err(AppError::BadRequest("the script contains a NUL byte".into()));
        }
        if let Some(t) = spec.timeout_secs {
            let max = limits.max_script_timeout.as_secs();
            if t == 0 || t > max {
                return Err(AppError::BadRequest(format!("timeout_secs is {t}; give a value from 1 to {max}")));
            }
        }
        let secret_names = spec.secret_env.iter().flat_map(|s| s.keys());
        for key in spec.env.keys().chain(secret_names) {
            let valid = key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(AppError::BadRequest(format!(
                    "environment variable name {} is invalid: use letters, digits and '_', not starting with a digit",
                    quote(key)
                )));
            }
        }
        // A NUL cannot cross execve, so it would fail the build late; other
        // control characters (a newline in a multi-line value) are fine in env.
        if let Some(key) = spec.env.iter().find(|(k, v)| k.contains('\0') || v.contains('\0')).map(|(k, _)| k) {
            return Err(AppError::BadRequest(format!(
                "environment variable {} has a NUL byte in its value: remove it",
                quote(key)
            )));
        }
        for (name, value) in spec.secret_env.iter().flatten() {
            if spec.env.contains_key(name) {
                return Err(AppError::BadRequest(format!(
                    "{} is in both env and secret_env: keep it in one of them",
                    quote(name)
                )));
            }
            if value.0.len() < MIN_SECRET_LEN {
                return Err(AppError::BadRequest(format!(
                    "secret_env {} has {} bytes; a secret needs at least {MIN_SECRET_LEN} (shorter values cannot be masked in logs without mangling them)",
                    quote(name),
                    value.0.len()
                )));
            }
            if value.0.contains('\0') {
                return Err(AppError::BadRequest(format!("secret_env {} contains a NUL byte", quote(name))));
            }
        }
        for (cloud, target) in &spec.targets {
            if target.base_image.trim().is_empty() {
                return Err(AppError::BadRequest(format!("the base image for cloud {cloud} is empty")));
            }
        }
        Ok(())
    }
}

/// Whether a cloud's password must be given with every build (never stored).
pub fn asks_password(cloud: &Cloud) -> bool {
    cloud.options.get("ask_password").is_some_and(|v| v == "true")
}
