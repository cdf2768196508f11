//! Base images in, images out.
//!
//! An image manifest (`image.json`) names a disk and, for direct boot, a
//! kernel, an initrd and a command line; paths are relative to the manifest.
//! kiln's tiny image is one; every image a build makes is another, with its
//! provenance, so an output image can be the base of the next generator.

use std::path::{Path, PathBuf};

use kiln_protocol::api::{Provenance, TargetSpec};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::vm::{BASE, qemu_img_binary};
use super::{ProviderError, failed, invalid};
use crate::providers::ImageInfo;

pub const MANIFEST: &str = "image.json";
const PENDING: &str = "pending.json";
const DISK: &str = "disk.qcow2";

/// The on-disk description of a local image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// `qcow2` or `raw`.
    pub format: String,
    pub disk: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Hex sha256 of the disk file, for images kiln made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// What went into the image, for images kiln made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
}

/// A resolved base image: absolute paths, checked to exist.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseImage {
    pub disk: PathBuf,
    pub format: String,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ImgInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
}

async fn img_info(disk: &Path) -> Result<ImgInfo, ProviderError> {
    let out = tokio::process::Command::new(qemu_img_binary())
        .args(["info", "--output=json", "-U"])
        .arg(disk)
        .output()
        .await
        .map_err(|e| failed(format!("cannot run qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(invalid(format!(
            "{} is not a disk image: {}",
            disk.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| failed(format!("qemu-img info said something unexpected: {e}")))
}

fn read_manifest(path: &Path) -> Result<Manifest, ProviderError> {
    let text = std::fs::read_to_string(path).map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| invalid(format!("{} is not an image manifest: {e}", path.display())))
}

fn existing(path: PathBuf, what: &str) -> Result<PathBuf, ProviderError> {
    if path.is_file() { Ok(path) } else { Err(invalid(format!("the {what} {} does not exist", path.display()))) }
}

impl BaseImage {
    /// Resolves a target's base image: a disk, a manifest, or a directory
    /// holding `image.json`; the target's kernel, initrd and append options win.
    pub async fn resolve(spec: &TargetSpec) -> Result<Self, ProviderError> {
        let given = PathBuf::from(&spec.base_image);
        if !given.is_absolute() {
            return Err(invalid(format!(
                "the base image {} must be an absolute path to a disk file or an image.json",
                spec.base_image
            )));
        }
        if !given.exists() {
            return Err(
                invalid(format!("the base image {} does not exist", given.display())).with_code("ImageNotFound")
            );
        }
        let manifest_path = if given.is_dir() { given.join(MANIFEST) } else { given.clone() };
        let mut base = if manifest_path.extension().is_some_and(|e| e == "json") {
            let m = read_manifest(&manifest_path)?;
            let dir = manifest_path.parent().unwrap_or(Path::new("/"));
            BaseImage {
                disk: existing(dir.join(&m.disk), "disk")?,
                format: m.format,
                kernel: m.kernel.map(|k| existing(dir.join(k), "kernel")).transpose()?,
                initrd: m.initrd.map(|i| existing(dir.join(i), "initrd")).transpose()?,
                append: m.append,
            }
        } else {
            BaseImage { disk: given, format: String::new(), kernel: None, initrd: None, append: None }
        };
        if let Some(k) = spec.options.get("kernel") {
            base.kernel = Some(existing(PathBuf::from(k), "kernel")?);
        }
        if let Some(i) = spec.options.get("initrd") {
            base.initrd = Some(existing(PathBuf::from(i), "initrd")?);
        }
        if let Some(a) = spec.options.get("append") {
            base.append = Some(a.clone());
        }
        let info = img_info(&base.disk).await?;
        let size = std::fs::metadata(&base.disk).map(|m| m.len()).unwrap_or(0);
        let is_disk = match info.format.as_str() {
            "qcow2" => true,
            // qemu-img calls any file raw: a raw disk is at least 1 MiB of whole sectors.
            "raw" => size >= 1024 * 1024 && size % 512 == 0,
            _ => false,
        };
        if !is_disk || (!base.format.is_empty() && base.format != info.format) {
            return Err(invalid(format!(
                "{} is not a disk image kiln can boot (qemu-img sees {} of {} bytes); give a qcow2 or raw disk",
                base.disk.display(),
                info.format,
                size
            )));
        }
        base.format = info.format;
        Ok(base)
    }

    /// The base an instance was started from.
    pub fn from_instance(dir: &Path) -> Result<Self, ProviderError> {
        let path = dir.join(BASE);
        let text =
            std::fs::read_to_string(&path).map_err(|e| failed(format!("cannot read {}: {e}", path.display())))?;
        serde_json::from_str(&text).map_err(|e| failed(format!("{} is corrupt: {e}", path.display())))
    }

    pub fn save(&self, path: &Path) -> Result<(), ProviderError> {
        std::fs::write(path, serde_json::to_vec_pretty(self).expect("serializes"))
            .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))
    }
}

/// What `finish` needs, written by `prepare`.
#[derive(Debug, Serialize, Deserialize)]
struct Pending {
    overlay: PathBuf,
    base: BaseImage,
    name: String,
    provenance: Provenance,
}

/// Records what the image will be made of; the image dir is the image's id.
pub fn prepare(
    out: &Path,
    overlay: &Path,
    base: &BaseImage,
    name: &str,
    provenance: &Provenance,
) -> Result<(), ProviderError> {
    std::fs::create_dir_all(out).map_err(|e| failed(format!("cannot create {}: {e}", out.display())))?;
    if out.join(MANIFEST).exists() {
        return Ok(());
    }
    let pending = Pending {
        overlay: overlay.to_owned(),
        base: base.clone(),
        name: name.to_owned(),
        provenance: provenance.clone(),
    };
    std::fs::write(out.join(PENDING), serde_json::to_vec_pretty(&pending).expect("serializes"))
        .map_err(|e| failed(format!("cannot write into {}: {e}", out.display())))
}

/// Converts the overlay into a standalone qcow2 (once), and describes it.
pub async fn finish(out: &Path) -> Result<ImageInfo, ProviderError> {
    let manifest_path = out.join(MANIFEST);
    if !manifest_path.exists() {
        let pending: Pending = {
            let path = out.join(PENDING);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| failed(format!("the image {} was never started: {e}", out.display())))?;
            serde_json::from_str(&text).map_err(|e| failed(format!("{} is corrupt: {e}", path.display())))?
        };
        let part = out.join("disk.qcow2.part");
        let status = tokio::process::Command::new(qemu_img_binary())
            .args(["convert", "-q", "-O", "qcow2", "-f", "qcow2"])
            .arg(&pending.overlay)
            .arg(&part)
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| failed(format!("cannot run qemu-img: {e}")))?;
        if !status.status.success() {
            let _ = std::fs::remove_file(&part);
            return Err(failed(format!("qemu-img convert failed: {}", String::from_utf8_lossy(&status.stderr).trim())));
        }
        std::fs::rename(&part, out.join(DISK)).map_err(|e| failed(format!("cannot move the disk into place: {e}")))?;
        let copy = |from: &Option<PathBuf>, to: &str| -> Result<Option<PathBuf>, ProviderError> {
            let Some(from) = from else { return Ok(None) };
            let dest = out.join(to);
            if !dest.exists() && std::fs::hard_link(from, &dest).is_err() {
                std::fs::copy(from, &dest).map_err(|e| failed(format!("cannot copy {}: {e}", from.display())))?;
            }
            Ok(Some(PathBuf::from(to)))
        };
        let manifest = Manifest {
            format: "qcow2".into(),
            disk: PathBuf::from(DISK),
            kernel: copy(&pending.base.kernel, "vmlinuz")?,
            initrd: copy(&pending.base.initrd, "initrd.img")?,
            append: pending.base.append.clone(),
            name: Some(pending.name),
            sha256: Some(sha256_file(&out.join(DISK)).await?),
            provenance: Some(pending.provenance),
        };
        let tmp = out.join("image.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&manifest).expect("serializes"))
            .and_then(|()| std::fs::rename(&tmp, &manifest_path))
            .map_err(|e| failed(format!("cannot write {}: {e}", manifest_path.display())))?;
        let _ = std::fs::remove_file(out.join(PENDING));
    }
    let manifest = read_manifest(&manifest_path)?;
    let disk = out.join(&manifest.disk);
    let info = img_info(&disk).await?;
    Ok(ImageInfo {
        size_bytes: std::fs::metadata(&disk).ok().map(|m| m.len()),
        virtual_size_bytes: Some(info.virtual_size),
        sha256: manifest.sha256,
    })
}

async fn sha256_file(path: &Path) -> Result<String, ProviderError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path)?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut hasher)?;
        Ok::<_, std::io::Error>(hex::encode(hasher.finalize()))
    })
    .await
    .map_err(|e| failed(e.to_string()))?
    .map_err(|e| failed(format!("cannot hash the image: {e}")))
}
