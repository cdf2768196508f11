//! Amazon EC2 and EC2-compatible clouds (Nimbus, Eucalyptus), through aws-sdk-ec2.
//!
//! A cloud names its region and, for a compatible cloud, its endpoint. Launch
//! is RunInstances with the base64 user-data, IMDSv2 required, no key pair,
//! and a ClientToken derived from the target id; before it, the provider looks
//! for an instance already tagged with the target, so a retried launch never
//! starts a second VM even where ClientToken is not honoured. The image is
//! CreateImage of the stopped instance, tagged with its provenance; undo
//! deregisters a half-made image and deletes its snapshots.

mod client;
mod errors;
pub mod identity;
mod settings;

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_ec2::Client;

use aws_sdk_ec2::types::{
    Filter, HttpTokensState, IamInstanceProfileSpecification, ImageState, InstanceMetadataEndpointState,
    InstanceMetadataOptionsRequest, InstanceStateName, InstanceType, ResourceType, Tag, TagSpecification,
};
use base64::Engine;
use kiln_protocol::agent::InstanceIdentity;
use kiln_protocol::api::{Cloud, Provenance, TargetSpec};

use self::client::Clients;
use self::settings::{IdentityCheck, Settings};
use super::{
    IdentityRefused, ImageId, ImageInfo, ImageProgress, InstanceId, InstanceState, Launch, Provider, ProviderError,
    ProviderErrorKind,
};

/// Runs targets on EC2-compatible clouds.
#[derive(Debug, Default)]
pub struct Ec2Provider {
    clients: Clients,
    /// Clouds already logged as enrolling agents without an identity check.
    unchecked: Mutex<HashSet<String>>,
}

impl Ec2Provider {
    pub fn new() -> Self {
        Self::default()
    }

    async fn client(&self, cloud: &Cloud) -> Result<(Client, Settings), ProviderError> {
        let settings = Settings::of(cloud)?;
        Ok((self.clients.get(cloud, &settings.region).await, settings))
    }
}

/// The provenance tags every instance, volume and image of a target carries.
pub fn provenance_tags(p: &Provenance, name: &str) -> Vec<Tag> {
    [
        ("Name", name.to_owned()),
        ("kiln:build", p.build.to_string()),
        ("kiln:target", p.target.to_string()),
        ("kiln:generator", p.generator.to_string()),
        ("kiln:revision", p.revision.to_string()),
        ("kiln:script-sha256", p.script_sha256.clone()),
        ("kiln:base-image", p.base_image.clone()),
        ("kiln:cloud", p.cloud.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| Tag::builder().key(k).value(v).build())
    .collect()
}

fn tags_for(kind: ResourceType, tags: &[Tag]) -> TagSpecification {
    TagSpecification::builder().resource_type(kind).set_tags(Some(tags.to_vec())).build()
}

fn describe_provenance(p: &Provenance) -> String {
    format!(
        "kiln build {} target {}: generator {} revision {} (script sha256 {}) on base image {}",
        p.build, p.target, p.generator, p.revision, p.script_sha256, p.base_image
    )
}

#[async_trait]
impl Provider for Ec2Provider {
    async fn preflight(&self, cloud: &Cloud, spec: &TargetSpec) -> Result<(), ProviderError> {
        settings::Launch::of(spec)?;
        let (ec2, settings) = self.client(cloud).await?;
        let images = ec2
            .describe_images()
            .image_ids(&spec.base_image)
            .send()
            .await
            .map_err(|e| errors::map("checking the base image", e))?;
        if images.images().is_empty() {
            return Err(ProviderError::new(
                ProviderErrorKind::Invalid,
                format!("the base image {} does not exist in region {}", spec.base_image, settings.region),
            )
            .with_code("InvalidAMIID.NotFound"));
        }
        Ok(())
    }

    fn poll_interval(&self, cloud: &Cloud) -> Option<Duration> {
        Settings::of(cloud).ok().map(|s| s.poll)
    }

    fn check_cloud(&self, cloud: &Cloud) -> Result<(), ProviderError> {
        settings::Settings::of(cloud)?;
        // The identity options; with them, the settings they depend on.
        IdentityCheck::of(cloud)?;
        Ok(())
    }

    fn checks_identity(&self, cloud: &Cloud) -> bool {
        cloud.options.contains_key("identity_certificate")
    }

    fn check_identity(
        &self,
        cloud: &Cloud,
        instance: Option<&InstanceId>,
        identity: Option<&InstanceIdentity>,
    ) -> Result<Option<String>, IdentityRefused> {
        let refused = |why: String| IdentityRefused(why);
        let Some(check) = IdentityCheck::of(cloud).map_err(|e| refused(format!("cloud {}: {e}", cloud.name)))? else {
            if self.unchecked.lock().unwrap().insert(cloud.name.to_string()) {
                tracing::warn!(
                    cloud = %cloud.name,
                    "agents on this cloud enroll without an instance identity check: give the cloud the \
                     identity_certificate option (AWS's RSA-2048 certificate of its region) to require one"
                );
            }
            return Ok(None);
        };
        let Some(instance) = instance else {
            return Err(refused("no instance is recorded for the target, so no identity can match it".into()));
        };
        let Some(InstanceIdentity::Ec2 { document, rsa2048 }) = identity else {
            return Err(refused(
                "the agent sent no instance identity document, and this cloud requires one (identity_certificate): \
                 its IMDS did not serve one (see the instance's console), or someone other than the instance \
                 enrolled with the target's token"
                    .into(),
            ));
        };
        let doc = check.signer.verify(document, rsa2048).map_err(|e| {
            refused(format!(
                "the instance identity document failed its check: {e}; either identity_certificate is not AWS's \
                 RSA-2048 certificate of region {}, or the document is forged",
                check.region
            ))
        })?;
        let mismatch = |what: &str, got: &str, want: &str| {
            refused(format!(
                "the signed instance identity document names {what} {got:?}, not the target's {want:?}: someone \
                 other than the instance enrolled with the target's token (its user-data has leaked)"
            ))
        };
        if doc.instance_id != instance.0 {
            return Err(mismatch("instance", &doc.instance_id, &instance.0));
        }
        if doc.region != check.region {
            return Err(mismatch("region", &doc.region, &check.region));
        }
        if let Some(account) = check.account.as_deref().filter(|a| *a != doc.account_id) {
            return Err(mismatch("account", &doc.account_id, account));
        }
        Ok(Some(format!("instance {} in {} (account {})", doc.instance_id, doc.region, doc.account_id)))
    }

    async fn launch(&self, launch: &Launch<'_>) -> Result<InstanceId, ProviderError> {
        let (ec2, settings) = self.client(launch.cloud).await?;
        let options = settings::Launch::of(launch.spec)?;
        let target = launch.target.to_string();
        // A launch that ran before a crash left its instance tagged: reuse it.
        let existing = ec2
            .describe_instances()
            .filters(Filter::builder().name("tag:kiln:target").values(&target).build())
            .send()
            .await
            .map_err(|e| errors::map("looking for an earlier launch", e))?;
        let alive = existing.reservations().iter().flat_map(|r| r.instances()).find(|i| {
            !matches!(
                i.state().and_then(|s| s.name()),
                Some(InstanceStateName::Terminated | InstanceStateName::ShuttingDown)
            )
        });
        if let Some(id) = alive.and_then(|i| i.instance_id()) {
            tracing::info!(instance = id, "reusing the instance of an earlier launch");
            return Ok(InstanceId(id.to_owned()));
        }
        let tags = provenance_tags(launch.provenance, &launch.name);
        let user_data = base64::engine::general_purpose::STANDARD.encode(&launch.user_data);
        let instance_type = launch.spec.instance_type.clone().unwrap_or(settings.instance_type);
        let mut req = ec2
            .run_instances()
            .image_id(&launch.spec.base_image)
            .instance_type(InstanceType::from(instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .user_data(user_data)
            .client_token(&target)
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .build(),
            )
            .tag_specifications(tags_for(ResourceType::Instance, &tags))
            .tag_specifications(tags_for(ResourceType::Volume, &tags));
        if let Some(subnet) = &launch.spec.network {
            req = req.subnet_id(subnet);
        }
        if !options.security_groups.is_empty() {
            req = req.set_security_group_ids(Some(options.security_groups.clone()));
        }
        if let Some(profile) = &options.instance_profile {
            let spec = IamInstanceProfileSpecification::builder();
            let spec = if profile.starts_with("arn:") { spec.arn(profile) } else { spec.name(profile) };
            req = req.iam_instance_profile(spec.build());
        }
        let out = req.send().await.map_err(|e| errors::map("RunInstances", e))?;
        out.instances()
            .first()
            .and_then(|i| i.instance_id())
            .map(|id| InstanceId(id.to_owned()))
            .ok_or_else(|| ProviderError::new(ProviderErrorKind::Failed, "RunInstances returned no instance"))
    }

    async fn state(&self, cloud: &Cloud, instance: &InstanceId) -> Result<InstanceState, ProviderError> {
        let (ec2, _) = self.client(cloud).await?;
        let out = match ec2.describe_instances().instance_ids(&instance.0).send().await {
            Ok(out) => out,
            Err(e) => {
                let e = errors::map("DescribeInstances", e);
                return if e.kind == ProviderErrorKind::NotFound { Ok(InstanceState::Gone) } else { Err(e) };
            }
        };
        let state =
            out.reservations().iter().flat_map(|r| r.instances()).next().and_then(|i| i.state()?.name().cloned());
        Ok(match state {
            Some(InstanceStateName::Pending) => InstanceState::Pending,
            Some(InstanceStateName::Running | InstanceStateName::Stopping) => InstanceState::Running,
            Some(InstanceStateName::Stopped) => InstanceState::Stopped,
            _ => InstanceState::Gone,
        })
    }

    async fn console_tail(&self, cloud: &Cloud, instance: &InstanceId) -> Result<String, ProviderError> {
        let (ec2, _) = self.client(cloud).await?;
        let out = ec2
            .get_console_output()
            .instance_id(&instance.0)
            .latest(true)
            .send()
            .await
            .map_err(|e| errors::map("GetConsoleOutput", e))?;
        let encoded = out.output().unwrap_or_default();
        let bytes = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).unwrap_or_else(|_| encoded.into());
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    async fn stop(&self, cloud: &Cloud, instance: &InstanceId) -> Result<(), ProviderError> {
        let (ec2, _) = self.client(cloud).await?;
        ec2.stop_instances().instance_ids(&instance.0).send().await.map_err(|e| errors::map("StopInstances", e))?;
        Ok(())
    }

    async fn start_image(
        &self,
        cloud: &Cloud,
        instance: &InstanceId,
        name: &str,
        provenance: &Provenance,
    ) -> Result<ImageId, ProviderError> {
        let (ec2, _) = self.client(cloud).await?;
        // A CreateImage that ran before a crash left an image of this unique name.
        let existing = ec2
            .describe_images()
            .owners("self")
            .filters(Filter::builder().name("name").values(name).build())
            .send()
            .await
            .map_err(|e| errors::map("looking for an earlier image", e))?;
        if let Some(id) = existing.images().first().and_then(|i| i.image_id()) {
            return Ok(ImageId(id.to_owned()));
        }
        let tags = provenance_tags(provenance, name);
        // Image tags only: a snapshot TagSpecification is not accepted everywhere.
        let out = ec2
            .create_image()
            .instance_id(&instance.0)
            .name(name)
            .description(describe_provenance(provenance))
            .no_reboot(true)
            .tag_specifications(tags_for(ResourceType::Image, &tags))
            .send()
            .await
            .map_err(|e| errors::map("CreateImage", e))?;
        out.image_id()
            .map(|id| ImageId(id.to_owned()))
            .ok_or_else(|| ProviderError::new(ProviderErrorKind::Failed, "CreateImage returned no image id"))
    }

    async fn image_state(&self, cloud: &Cloud, image: &ImageId) -> Result<ImageProgress, ProviderError> {
        let (ec2, settings) = self.client(cloud).await?;
        let ImageProgress::Ready(info) = look_at(&ec2, &image.0).await? else {
            return Ok(ImageProgress::Pending);
        };
        // Then each regional copy: started once, and looked at once per poll.
        let mut pending = false;
        for region in &settings.copy_to_regions {
            let dest = self.clients.get(cloud, region).await;
            match copies_of(&dest, &image.0).await?.first() {
                None => {
                    start_copy(&ec2, &dest, &image.0, region, &settings).await?;
                    pending = true;
                }
                Some(copy) => pending |= look_at(&dest, copy).await? == ImageProgress::Pending,
            }
        }
        Ok(if pending { ImageProgress::Pending } else { ImageProgress::Ready(info) })
    }

    fn image_timeout(&self, cloud: &Cloud) -> Duration {
        Settings::of(cloud).map(|s| s.image_timeout).unwrap_or(Duration::from_secs(3600))
    }

    async fn terminate(&self, cloud: &Cloud, instance: &InstanceId) -> Result<(), ProviderError> {
        let (ec2, _) = self.client(cloud).await?;
        match ec2.terminate_instances().instance_ids(&instance.0).send().await {
            Ok(_) => Ok(()),
            Err(e) => match errors::map("TerminateInstances", e) {
                e if e.kind == ProviderErrorKind::NotFound => Ok(()),
                e => Err(e),
            },
        }
    }

    async fn delete_image(&self, cloud: &Cloud, image: &ImageId) -> Result<(), ProviderError> {
        let (ec2, settings) = self.client(cloud).await?;
        delete_image_in(&ec2, &image.0).await?;
        // Copies carry the source image id in a tag.
        for region in &settings.copy_to_regions {
            let copy_client = self.clients.get(cloud, region).await;
            for id in copies_of(&copy_client, &image.0).await? {
                delete_image_in(&copy_client, &id).await?;
            }
        }
        Ok(())
    }
}

/// Starts copying an available image to `region`, with its tags (and a
/// `kiln:source-image` tag by which its copy is found again).
async fn start_copy(
    source: &Client,
    dest: &Client,
    image: &str,
    region: &str,
    settings: &Settings,
) -> Result<(), ProviderError> {
    let described =
        source.describe_images().image_ids(image).send().await.map_err(|e| errors::map("DescribeImages", e))?;
    let Some(src) = described.images().first() else {
        return Err(ProviderError::new(ProviderErrorKind::NotFound, format!("image {image} vanished before its copy")));
    };
    let out = dest
        .copy_image()
        .source_region(&settings.region)
        .source_image_id(image)
        .name(src.name().unwrap_or(image))
        .description(src.description().unwrap_or_default())
        .send()
        .await
        .map_err(|e| errors::map(&format!("CopyImage to {region}"), e))?;
    let copy = out.image_id().unwrap_or_default().to_owned();
    let mut tags = src.tags().to_vec();
    tags.push(Tag::builder().key("kiln:source-image").value(image).build());
    dest.create_tags()
        .resources(&copy)
        .set_tags(Some(tags))
        .send()
        .await
        .map_err(|e| errors::map("CreateTags on the copy", e))?;
    tracing::info!(%image, %copy, region, "image copy started");
    Ok(())
}

async fn copies_of(ec2: &Client, image: &str) -> Result<Vec<String>, ProviderError> {
    let out = ec2
        .describe_images()
        .owners("self")
        .filters(Filter::builder().name("tag:kiln:source-image").values(image).build())
        .send()
        .await
        .map_err(|e| errors::map("looking for copies", e))?;
    Ok(out.images().iter().filter_map(|i| i.image_id().map(String::from)).collect())
}

/// One DescribeImages of an image being made.
async fn look_at(ec2: &Client, image: &str) -> Result<ImageProgress, ProviderError> {
    let out = ec2.describe_images().image_ids(image).send().await.map_err(|e| errors::map("DescribeImages", e))?;
    let Some(found) = out.images().first() else {
        return Err(ProviderError::new(ProviderErrorKind::NotFound, format!("image {image} disappeared")));
    };
    match found.state() {
        Some(ImageState::Available) => {
            let gib: i64 = found
                .block_device_mappings()
                .iter()
                .filter_map(|m| m.ebs().and_then(|e| e.volume_size()))
                .map(i64::from)
                .sum();
            Ok(ImageProgress::Ready(ImageInfo {
                size_bytes: None,
                virtual_size_bytes: (gib > 0).then(|| gib as u64 * (1 << 30)),
                sha256: None,
            }))
        }
        Some(ImageState::Failed | ImageState::Invalid | ImageState::Error | ImageState::Deregistered) => {
            let reason = found.state_reason().and_then(|r| r.message()).unwrap_or("no reason given");
            Err(ProviderError::new(ProviderErrorKind::Failed, format!("image {image} failed: {reason}")))
        }
        _ => Ok(ImageProgress::Pending),
    }
}

/// Deregisters an image and deletes its snapshots; a missing one is fine.
async fn delete_image_in(ec2: &Client, image: &str) -> Result<(), ProviderError> {
    let out = match ec2.describe_images().image_ids(image).send().await {
        Ok(out) => out,
        Err(e) => {
            let e = errors::map("DescribeImages", e);
            return if e.kind == ProviderErrorKind::NotFound { Ok(()) } else { Err(e) };
        }
    };
    let snapshots: Vec<String> = out
        .images()
        .iter()
        .flat_map(|i| i.block_device_mappings())
        .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(String::from))
        .collect();
    if out.images().is_empty() {
        return Ok(());
    }
    if let Err(e) = ec2.deregister_image().image_id(image).send().await {
        let e = errors::map("DeregisterImage", e);
        if e.kind != ProviderErrorKind::NotFound {
            return Err(e);
        }
    }
    for snapshot in snapshots {
        if let Err(e) = ec2.delete_snapshot().snapshot_id(&snapshot).send().await {
            let e = errors::map("DeleteSnapshot", e);
            if e.kind != ProviderErrorKind::NotFound {
                return Err(e);
            }
        }
    }
    Ok(())
}
