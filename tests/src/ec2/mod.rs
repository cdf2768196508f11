//! The EC2 test bed: moto is the EC2 API, and a runner makes its instances real.
//!
//! - [`Moto`]: `moto_server` on a loopback port, plus SDK clients for it.
//! - [`Runner`]: watches moto and boots every `running` instance as a QEMU VM
//!   whose metadata service (IMDSv2, or Nimbus's) serves that instance's
//!   user-data; keeps moto's instance state in step with the VM.
//! - [`IdentitySigner`]: plays AWS's signer of the instance identity
//!   documents the metadata service serves.
//! - [`FaultProxy`]: an HTTP proxy in front of moto that counts API calls,
//!   injects throttling, errors and pending states, and can answer
//!   GetConsoleOutput with the VMs' real consoles.
//!
//! The guest's network is restricted (QEMU `restrict=on`): it reaches its
//! metadata service at 169.254.169.254 and the coordinator under test at
//! [`GUEST_HOST`] on the ports its user-data names, each forwarded to the
//! host's loopback, and nothing else. A coordinator under test advertises
//! that host (`coordinator_host`).

mod faults;
pub(crate) mod http;
mod identity;
mod imds;
mod moto;
mod runner;
pub(crate) mod vm;

pub use faults::{Fault, FaultProxy};
pub use identity::IdentitySigner;
pub use imds::ImdsStats;
pub use moto::Moto;
pub use runner::{Consoles, Metadata, Runner, RunnerConfig};

use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::types::{ArchitectureValues, BlockDeviceMapping, EbsBlockDevice};

/// Where the guest reaches the coordinator under test (a `guestfwd` address).
pub const GUEST_HOST: &str = "169.254.169.100";
/// QEMU user networking's own host address on the guest's network; with
/// `restrict=on` the guest reaches nothing there.
pub const SLIRP_HOST: &str = "169.254.169.2";

/// An EC2 client for `region` at `endpoint` (moto or a [`FaultProxy`]), with
/// credentials test/test and the SDK's standard retries.
pub fn client(endpoint: &str, region: &str) -> aws_sdk_ec2::Client {
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    let http = aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https();
    let config = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("test", "test", None, None, "kiln-tests"))
        .retry_config(aws_sdk_ec2::config::retry::RetryConfig::standard())
        .http_client(http)
        .build();
    aws_sdk_ec2::Client::from_conf(config)
}

/// Registers an AMI named `name` (root /dev/xvda on EBS) and returns its id: a
/// base image for [`RunnerConfig::images`] to map to a local disk.
pub async fn register_ami(client: &aws_sdk_ec2::Client, name: &str) -> anyhow::Result<String> {
    let root = BlockDeviceMapping::builder()
        .device_name("/dev/xvda")
        .ebs(EbsBlockDevice::builder().volume_size(8).delete_on_termination(true).build())
        .build();
    let out = client
        .register_image()
        .name(name)
        .architecture(ArchitectureValues::X8664)
        .virtualization_type("hvm")
        .root_device_name("/dev/xvda")
        .block_device_mappings(root)
        .send()
        .await?;
    out.image_id.ok_or_else(|| anyhow::anyhow!("RegisterImage returned no image id"))
}
