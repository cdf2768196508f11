//! Base images in, images out.
//!
//! An image manifest (`image.json`) names a disk and, for direct boot, a
//! kernel, an initrd and a command line; paths are relative to the manifest.
//! kiln's tiny image is one; every image a build makes is another, with its
//! provenance, so an output image can be the base of the next generator.
//!
//! Every local path a base image leads to is confined ([`confine`]: only the
//! allowed directories, never kiln's own state) and every disk is probed
//! with the format kiln decided, its backing chain followed link by link
//! ([`probe`]), in preflight and again at launch.

mod confine;
mod probe;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kiln_protocol::api::{Provenance, TargetSpec};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use self::confine::Sources;
use self::confine::Want;
pub use self::probe::Format;
use super::vm::{BASE, qemu_img_binary};
use super::{ProviderError, failed, invalid};
use crate::providers::ImageInfo;

pub const MANIFEST: &str = "image.json";
const PENDING: &str = "pending.json";
const DISK: &str = "disk.qcow2";
/// The largest manifest kiln reads.
const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;

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

/// A resolved base image: canonical paths, checked to be allowed and to exist.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseImage {
    pub disk: PathBuf,
    pub format: Format,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
}

fn read_manifest(path: &Path) -> Result<Manifest, ProviderError> {
    let mut text = String::new();
    confine::open(path)
        .and_then(|f| f.take(MAX_MANIFEST_BYTES).read_to_string(&mut text))
        .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| invalid(format!("{} is not an image manifest: {e}", path.display())))
}

impl BaseImage {
    /// Resolves a target's base image: a disk, a manifest, or a directory
    /// holding `image.json`; the target's kernel, initrd and append options
    /// win. Refuses, before anything starts, every path outside `sources`.
    pub async fn resolve(spec: &TargetSpec, sources: &Sources) -> Result<Self, ProviderError> {
        let given = Path::new(&spec.base_image);
        if !given.is_absolute() {
            return Err(invalid(format!(
                "the base image {} must be an absolute path to a disk file or an image.json",
                spec.base_image
            )));
        }
        let found = sources.check(&format!("the base image {}", given.display()), given, Want::FileOrDir)?;
        let manifest = if found.is_dir() {
            let what = format!("the {MANIFEST} of the base image {}", given.display());
            Some(sources.check(&what, &found.join(MANIFEST), Want::File)?)
        } else {
            found.extension().is_some_and(|e| e == "json").then(|| found.clone())
        };
        let option = |key: &str| -> Result<Option<PathBuf>, ProviderError> {
            let Some(path) = spec.options.get(key) else { return Ok(None) };
            sources.check(&format!("the {key} {path}"), Path::new(path), Want::File).map(Some)
        };
        let (kernel, initrd) = (option("kernel")?, option("initrd")?);
        let mut base = match manifest {
            None => {
                let format = probe::sniff(&found)?;
                BaseImage { disk: found, format, kernel, initrd, append: None }
            }
            Some(path) => {
                let m = read_manifest(&path)?;
                let dir = path.parent().unwrap_or(Path::new("/"));
                let named = |entry: &Path, what: &str| -> Result<PathBuf, ProviderError> {
                    let Some(joined) = confine::join(dir, entry) else {
                        return Err(invalid(format!(
                            "the {what} {} of {} has `..` after a name: name the file directly",
                            entry.display(),
                            path.display()
                        )));
                    };
                    sources.check(
                        &format!("the {what} {} of {}", joined.display(), path.display()),
                        &joined,
                        Want::File,
                    )
                };
                let format = Format::parse(&m.format).ok_or_else(|| {
                    invalid(format!("{} says format {:?}: kiln boots qcow2 or raw", path.display(), m.format))
                })?;
                let disk = named(&m.disk, "disk")?;
                if format == Format::Raw && probe::sniff(&disk)? == Format::Qcow2 {
                    return Err(invalid(format!(
                        "{} says the disk {} is raw, but it is a qcow2: correct the manifest's format",
                        path.display(),
                        disk.display()
                    )));
                }
                BaseImage {
                    disk,
                    format,
                    kernel: kernel.map(Ok).or_else(|| m.kernel.map(|k| named(&k, "kernel"))).transpose()?,
                    initrd: initrd.map(Ok).or_else(|| m.initrd.map(|i| named(&i, "initrd"))).transpose()?,
                    append: m.append,
                }
            }
        };
        if let Some(a) = spec.options.get("append") {
            base.append = Some(a.clone());
        }
        let info = probe::chain(sources, &base.disk, base.format).await?;
        // qemu-img calls any file raw: a raw disk is at least 1 MiB of whole sectors.
        let size = info.virtual_size;
        if base.format == Format::Raw && (size < 1024 * 1024 || size % 512 != 0) {
            return Err(invalid(format!(
                "{} is not a disk image kiln can boot (a raw file of {size} bytes; a raw disk is whole 512-byte sectors, at least 1 MiB): give a qcow2 or raw disk",
                base.disk.display(),
            )));
        }
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

/// The target an image directory kiln made was made for, from its manifest
/// or, while it is being made, its pending record; `None` for anything else.
pub fn target_of(out: &Path) -> Option<kiln_protocol::TargetId> {
    let read = |name: &str| std::fs::read(out.join(name)).ok();
    if let Some(bytes) = read(MANIFEST) {
        return serde_json::from_slice::<Manifest>(&bytes).ok()?.provenance.map(|p| p.target);
    }
    serde_json::from_slice::<Pending>(&read(PENDING)?).ok().map(|p| p.provenance.target)
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
            // A copy, not a hard link: a link would share the base image's
            // inode and its mode, and the data directory holds only private
            // files. Copied aside and renamed, so a crash leaves no torn copy.
            if !dest.exists() {
                let part = out.join(format!("{to}.part"));
                std::fs::copy(from, &part).map_err(|e| failed(format!("cannot copy {}: {e}", from.display())))?;
                std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| failed(format!("cannot make {} private: {e}", part.display())))?;
                std::fs::rename(&part, &dest).map_err(|e| failed(format!("cannot move {to} into place: {e}")))?;
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
    let info = probe::info(&disk, Format::Qcow2).await?;
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
