//! A stock Debian 12 cloud image (its own bootloader, Debian's cloud-init
//! with its datasource list untouched): kiln builds from it unmodified, and
//! the image it makes boots as a fresh instance with no secret in its bytes.

use std::collections::BTreeSet;
use std::path::Path;

use kiln_protocol::api::{Image, Status};
use kiln_tests::bed::{Bed, Options};
use kiln_tests::disk;
use serde_json::json;

/// What a build VM says about itself, one `key=value` per line.
const IDENTITY: &str = r#"
echo "machine-id=$(cat /etc/machine-id)"
echo "host-key=$(cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub)"
echo "instance-id=$(cat /var/lib/cloud/data/instance-id)"
echo "instances=$(ls /var/lib/cloud/instances | tr '\n' ' ')"
echo "value=$(cat /etc/kiln-value 2>/dev/null)"
for key in /etc/ssh/ssh_host_*_key; do echo "private-key=$(sed -n 3p "$key")"; done
"#;

fn field(log: &str, key: &str) -> String {
    let prefix = format!("{key}=");
    log.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("the log says nothing about {key}:\n{log}"))
        .trim()
        .to_owned()
}

async fn build_on(bed: &Bed, name: &str, script: &str, base: &str) -> (kiln_protocol::api::Build, String) {
    let mut spec = Bed::spec(name, script, &["debian"]);
    spec.targets.values_mut().for_each(|t| t.base_image = base.to_owned());
    bed.create_generator(&spec).await;
    let build = bed.wait(&bed.start_build(name).await).await;
    assert_eq!(build.status, Status::Successful, "{build:#?}");
    let log = String::from_utf8(bed.log(build.targets[0].id).await).unwrap();
    (build, log)
}

/// The build VM's SSH host private keys, a line of each, as the script saw them.
fn private_keys(log: &str) -> Vec<String> {
    let keys: Vec<String> = log.lines().filter_map(|l| l.strip_prefix("private-key=")).map(str::to_owned).collect();
    assert!(keys.len() >= 2 && keys.iter().all(|k| k.len() >= 64), "the script read the host keys: {log}");
    keys
}

/// None of `secrets` (the token, what only the job script or the spool held,
/// the build VM's host private keys) is anywhere in the image's bytes, and
/// the image holds no PEM private key that its base image lacks (the base
/// image's own free blocks may hold some from the making of it).
fn assert_no_secrets(image: &Image, base_keys: &BTreeSet<Vec<u8>>, secrets: &[(&str, &str)]) {
    let bytes = disk::raw_bytes(&Path::new(&image.id).join("disk.qcow2"));
    for (what, secret) in secrets {
        let found = disk::contexts(&bytes, secret.as_bytes());
        assert!(found.is_empty(), "{what} is in the bytes of {}:\n{}", image.name, found.join("\n---\n"));
    }
    let new: Vec<_> =
        disk::pem_private_keys(&bytes).difference(base_keys).map(|k| String::from_utf8_lossy(k).into_owned()).collect();
    assert!(new.is_empty(), "PEM private keys in {} that its base image lacks: {new:?}", image.name);
}

// The stock image builds a script that writes a random value to /etc. A
// second build from the output image sees the value, a new cloud-init
// instance, a new machine-id and new SSH host keys; neither image holds the
// token, a marker only the job script held, the spool's contents, or the
// host private keys of the VM that made it.
#[tokio::test]
async fn a_stock_debian_image_builds_and_its_image_boots_fresh() {
    let bed = Bed::with(Options::qemu()).await;
    let cloud = json!({"name": "debian", "kind": "qemu", "options": {"memory_mib": "1024"}});
    let _: serde_json::Value = bed.client.post("/v1/clouds", &cloud).await.expect("add cloud");
    let stock = kiln_tests::debian_cloud_image().display().to_string();
    let base_keys = disk::pem_private_keys(&disk::raw_bytes(Path::new(&stock)));

    let value = disk::marker("value");
    let script_only = disk::marker("script-only");
    let spooled = disk::marker("spooled");
    let script =
        format!("#!/bin/sh\nset -eu\n# {script_only}\necho {value} > /etc/kiln-value\n{IDENTITY}\necho {spooled}\n");
    let (first, log) = build_on(&bed, "stock", &script, &stock).await;
    assert!(log.contains(&spooled), "{log}");
    let build_vm = (field(&log, "machine-id"), field(&log, "host-key"), field(&log, "instance-id"));
    assert!(build_vm.0.len() == 32 && !build_vm.1.is_empty(), "{log}");
    assert_eq!(build_vm.2, format!("kiln-{}", first.targets[0].id), "cloud-init ran from kiln's cidata drive");
    let image = first.targets[0].image.clone().expect("an image");
    let token = bed.app().pki().tokens().token(first.targets[0].id);
    let keys = private_keys(&log);
    let mut secrets = vec![("the token", token.as_str()), ("the job script", &script_only), ("the spool", &spooled)];
    secrets.extend(keys.iter().map(|k| ("a host private key of the build VM", k.as_str())));
    assert_no_secrets(&image, &base_keys, &secrets);
    let bytes = disk::raw_bytes(&Path::new(&image.id).join("disk.qcow2"));
    assert!(disk::count(&bytes, value.as_bytes()) > 0, "the script's file is in the image");
    drop(bytes);

    let spooled_again = disk::marker("spooled");
    let check = format!("#!/bin/sh\nset -eu\n{IDENTITY}\necho {spooled_again}\n");
    let (second, log) = build_on(&bed, "check", &check, &image.id).await;
    assert_eq!(field(&log, "value"), value, "the value survived: {log}");
    let fresh = (field(&log, "machine-id"), field(&log, "host-key"), field(&log, "instance-id"));
    assert_eq!(fresh.0.len(), 32, "{log}");
    assert_ne!(fresh.0, build_vm.0, "a new machine-id");
    assert_ne!(fresh.1, build_vm.1, "new SSH host keys");
    assert_eq!(fresh.2, format!("kiln-{}", second.targets[0].id), "a new cloud-init instance");
    assert_eq!(field(&log, "instances"), fresh.2, "no trace of the build VM's instance: {log}");
    let image = second.targets[0].image.clone().expect("an image");
    let token = bed.app().pki().tokens().token(second.targets[0].id);
    let keys = private_keys(&log);
    let mut secrets = vec![("the token", token.as_str()), ("the spool", &spooled_again), ("the first spool", &spooled)];
    secrets.extend(keys.iter().map(|k| ("a host private key of the second build VM", k.as_str())));
    assert_no_secrets(&image, &base_keys, &secrets);
}
