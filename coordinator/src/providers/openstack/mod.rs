//! OpenStack clouds through the native API: Keystone v3, Nova and Glance v2.
//!
//! A cloud's `endpoint` is its Keystone v3 URL; Nova and Glance come from the
//! service catalog for the cloud's region. The password is stored with the
//! cloud, or, with `ask_password=true`, given with each build and held in
//! memory for that build only. A server carries the provenance as metadata,
//! the image as properties; createImage uses compute microversion 2.47.

mod session;
mod settings;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use kiln_protocol::api::{Cloud, Provenance, TargetSpec};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use self::session::{Service, Session};
use self::settings::Settings;
use super::{
    ImageId, ImageInfo, ImageProgress, InstanceId, InstanceState, Launch, Provider, ProviderError, ProviderErrorKind,
};

/// Runs targets on OpenStack clouds.
#[derive(Debug)]
pub struct OpenstackProvider {
    http: reqwest::Client,
    /// Sessions by cloud, user and a hash of the password (never the password).
    sessions: Mutex<HashMap<String, Arc<Session>>>,
}

impl Default for OpenstackProvider {
    fn default() -> Self {
        Self::new()
    }
}

fn failed(message: impl Into<String>) -> ProviderError {
    ProviderError::new(ProviderErrorKind::Failed, message)
}

/// The provenance as string key-values, for server metadata and image properties.
fn provenance_metadata(p: &Provenance) -> Value {
    json!({
        "kiln_build": p.build.to_string(),
        "kiln_target": p.target.to_string(),
        "kiln_generator": p.generator.to_string(),
        "kiln_revision": p.revision.to_string(),
        "kiln_script_sha256": p.script_sha256,
        "kiln_base_image": p.base_image,
        "kiln_cloud": p.cloud.to_string(),
    })
}

impl OpenstackProvider {
    pub fn new() -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .expect("a plain reqwest client builds");
        Self { http, sessions: Mutex::default() }
    }

    async fn session(&self, cloud: &Cloud) -> Result<Arc<Session>, ProviderError> {
        let settings = Settings::of(cloud)?;
        let key = format!(
            "{}|{}|{}|{}|{}",
            cloud.name,
            settings.auth_url,
            settings.user,
            settings.project,
            hex::encode(Sha256::digest(settings.password.as_bytes()))
        );
        let mut sessions = self.sessions.lock().await;
        Ok(sessions.entry(key).or_insert_with(|| Arc::new(Session::new(self.http.clone(), settings))).clone())
    }

    /// A flavor id from a flavor name or id.
    async fn flavor(&self, s: &Session, wanted: &str) -> Result<String, ProviderError> {
        let (_, flavors) = s.call("listing flavors", Service::Compute, Method::GET, "/flavors/detail", None).await?;
        let all = flavors["flavors"].as_array().cloned().unwrap_or_default();
        all.iter()
            .find(|f| f["id"] == wanted || f["name"] == wanted)
            .and_then(|f| f["id"].as_str())
            .map(String::from)
            .ok_or_else(|| {
                let known: Vec<&str> = all.iter().filter_map(|f| f["name"].as_str()).collect();
                ProviderError::new(
                    ProviderErrorKind::Invalid,
                    format!("flavor {wanted} does not exist; this cloud has: {}", known.join(", ")),
                )
                .with_code("FlavorNotFound")
            })
    }

    fn flavor_of(spec: &TargetSpec, s: &Settings) -> Result<String, ProviderError> {
        spec.instance_type.clone().or_else(|| s.flavor.clone()).ok_or_else(|| {
            ProviderError::new(
                ProviderErrorKind::Invalid,
                "no flavor: give the target an instance_type or the cloud a flavor option",
            )
        })
    }

    async fn server(&self, s: &Session, id: &str) -> Result<Option<Value>, ProviderError> {
        match s.call("showing the server", Service::Compute, Method::GET, &format!("/servers/{id}"), None).await {
            Ok((_, v)) => Ok(Some(v["server"].clone())),
            Err(e) if e.kind == ProviderErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn find_image(&self, s: &Session, name: &str) -> Result<Option<String>, ProviderError> {
        let (_, v) =
            s.call("listing images", Service::Image, Method::GET, &format!("/v2/images?name={name}"), None).await?;
        Ok(v["images"].as_array().into_iter().flatten().find_map(|i| i["id"].as_str().map(String::from)))
    }
}

#[async_trait]
impl Provider for OpenstackProvider {
    fn check_cloud(&self, cloud: &Cloud) -> Result<(), ProviderError> {
        settings::Settings::check(cloud)
    }

    async fn preflight(&self, cloud: &Cloud, spec: &TargetSpec) -> Result<(), ProviderError> {
        settings::security_groups(spec)?;
        let s = self.session(cloud).await?;
        s.check().await?;
        let image = &spec.base_image;
        s.call(
            &format!("checking the base image {image}"),
            Service::Image,
            Method::GET,
            &format!("/v2/images/{image}"),
            None,
        )
        .await
        .map_err(|e| {
            if e.kind == ProviderErrorKind::NotFound {
                ProviderError::new(
                    ProviderErrorKind::Invalid,
                    format!("the base image {image} does not exist in Glance"),
                )
                .with_code("ImageNotFound")
            } else {
                e
            }
        })?;
        self.flavor(&s, &Self::flavor_of(spec, s.settings())?).await?;
        Ok(())
    }

    fn poll_interval(&self, cloud: &Cloud) -> Option<Duration> {
        cloud
            .options
            .get("poll_secs")
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|s| *s > 0.0)
            .map(Duration::from_secs_f64)
    }

    async fn launch(&self, launch: &Launch<'_>) -> Result<InstanceId, ProviderError> {
        let s = self.session(launch.cloud).await?;
        // A launch that ran before a crash left a server of this unique name.
        let (_, found) = s
            .call(
                "looking for an earlier launch",
                Service::Compute,
                Method::GET,
                &format!("/servers?name={}", launch.name),
                None,
            )
            .await?;
        if let Some(id) = found["servers"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|v| (v["name"] == launch.name.as_str()).then(|| v["id"].as_str().map(String::from)).flatten())
        {
            tracing::info!(server = %id, "reusing the server of an earlier launch");
            return Ok(InstanceId(id));
        }
        let flavor = self.flavor(&s, &Self::flavor_of(launch.spec, s.settings())?).await?;
        let network = launch.spec.network.clone().or_else(|| s.settings().network.clone());
        let networks = match network {
            Some(uuid) => json!([{"uuid": uuid}]),
            None => json!("auto"),
        };
        let groups: Vec<Value> =
            settings::security_groups(launch.spec)?.into_iter().map(|g| json!({"name": g})).collect();
        let mut server = json!({
            "name": launch.name,
            "imageRef": launch.spec.base_image,
            "flavorRef": flavor,
            "networks": networks,
            "metadata": provenance_metadata(launch.provenance),
            "user_data": base64::engine::general_purpose::STANDARD.encode(&launch.user_data),
        });
        if !groups.is_empty() {
            server["security_groups"] = json!(groups);
        }
        let (_, created) = s
            .call("creating the server", Service::Compute, Method::POST, "/servers", Some(&json!({"server": server})))
            .await?;
        created["server"]["id"]
            .as_str()
            .map(|id| InstanceId(id.to_owned()))
            .ok_or_else(|| failed("Nova created a server but returned no id"))
    }

    async fn state(&self, cloud: &Cloud, instance: &InstanceId) -> Result<InstanceState, ProviderError> {
        let s = self.session(cloud).await?;
        let Some(server) = self.server(&s, &instance.0).await? else { return Ok(InstanceState::Gone) };
        Ok(match server["status"].as_str().unwrap_or("") {
            "BUILD" | "REBUILD" | "HARD_REBOOT" | "REBOOT" => InstanceState::Pending,
            "ACTIVE" => InstanceState::Running,
            "SHUTOFF" | "STOPPED" => InstanceState::Stopped,
            _ => InstanceState::Gone,
        })
    }

    async fn console_tail(&self, cloud: &Cloud, instance: &InstanceId) -> Result<String, ProviderError> {
        let s = self.session(cloud).await?;
        let (_, v) = s
            .call(
                "reading the console",
                Service::Compute,
                Method::POST,
                &format!("/servers/{}/action", instance.0),
                Some(&json!({"os-getConsoleOutput": {"length": 50}})),
            )
            .await?;
        Ok(v["output"].as_str().unwrap_or_default().to_owned())
    }

    async fn stop(&self, cloud: &Cloud, instance: &InstanceId) -> Result<(), ProviderError> {
        let s = self.session(cloud).await?;
        let path = format!("/servers/{}/action", instance.0);
        match s
            .call("stopping the server", Service::Compute, Method::POST, &path, Some(&json!({"os-stop": null})))
            .await
        {
            Ok(_) => Ok(()),
            // Nova answers 409 when the server is already stopped.
            Err(e) if e.code.as_deref() == Some("conflictingRequest") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn start_image(
        &self,
        cloud: &Cloud,
        instance: &InstanceId,
        name: &str,
        provenance: &Provenance,
    ) -> Result<ImageId, ProviderError> {
        let s = self.session(cloud).await?;
        if let Some(id) = self.find_image(&s, name).await? {
            return Ok(ImageId(id));
        }
        let body = json!({"createImage": {"name": name, "metadata": provenance_metadata(provenance)}});
        let path = format!("/servers/{}/action", instance.0);
        let (_, v) = s.call("creating the image", Service::Compute, Method::POST, &path, Some(&body)).await?;
        v["image_id"]
            .as_str()
            .map(|id| ImageId(id.to_owned()))
            .ok_or_else(|| failed("Nova's createImage returned no image_id"))
    }

    async fn image_state(&self, cloud: &Cloud, image: &ImageId) -> Result<ImageProgress, ProviderError> {
        let s = self.session(cloud).await?;
        let (_, v) =
            s.call("showing the image", Service::Image, Method::GET, &format!("/v2/images/{}", image.0), None).await?;
        match v["status"].as_str().unwrap_or("") {
            "active" => Ok(ImageProgress::Ready(ImageInfo {
                size_bytes: v["size"].as_u64(),
                virtual_size_bytes: v["virtual_size"].as_u64(),
                sha256: (v["os_hash_algo"] == "sha256")
                    .then(|| v["os_hash_value"].as_str().map(String::from))
                    .flatten(),
            })),
            "killed" | "deleted" | "pending_delete" | "deactivated" => {
                Err(failed(format!("Glance reports image {} as {}", image.0, v["status"])))
            }
            _ => Ok(ImageProgress::Pending),
        }
    }

    fn image_timeout(&self, cloud: &Cloud) -> Duration {
        Settings::of(cloud).map(|s| s.image_timeout).unwrap_or(Duration::from_secs(3600))
    }

    async fn terminate(&self, cloud: &Cloud, instance: &InstanceId) -> Result<(), ProviderError> {
        let s = self.session(cloud).await?;
        match s
            .call("deleting the server", Service::Compute, Method::DELETE, &format!("/servers/{}", instance.0), None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind == ProviderErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn delete_image(&self, cloud: &Cloud, image: &ImageId) -> Result<(), ProviderError> {
        let s = self.session(cloud).await?;
        match s
            .call("deleting the image", Service::Image, Method::DELETE, &format!("/v2/images/{}", image.0), None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind == ProviderErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}
