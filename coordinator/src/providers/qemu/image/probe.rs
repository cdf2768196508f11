//! `qemu-img info`, told the format and bounded in time, and the backing
//! chain it reveals, each link confined before it is probed.
//!
//! kiln decides the format (a manifest's, or qcow2's magic bytes read by kiln
//! itself, else raw), so qemu-img never guesses one (a guessed vmdk or a
//! `json:` name could lead anywhere). `qemu-img info` opens no backing file;
//! kiln follows the chain itself.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::super::vm::qemu_img_binary;
use super::super::{ProviderError, failed, invalid};
use super::confine::{self, Sources, Want};

/// The longest `qemu-img info` may take (a FIFO that took a file's place
/// would otherwise hang the request).
const QEMU_IMG_LIMIT: Duration = Duration::from_secs(30);
/// The longest backing chain kiln follows.
const MAX_CHAIN: usize = 16;
/// qcow2's magic bytes.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// The disk formats kiln boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Qcow2,
    Raw,
}

impl Format {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "qcow2" => Some(Self::Qcow2),
            "raw" => Some(Self::Raw),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
        }
    }

    /// The format of a disk that starts with `head`: qcow2 by its magic, else raw.
    pub fn of(head: &[u8]) -> Self {
        if head.starts_with(QCOW2_MAGIC) { Self::Qcow2 } else { Self::Raw }
    }
}

/// Reads the first bytes of a checked file and tells its format.
pub fn sniff(path: &Path) -> Result<Format, ProviderError> {
    let mut head = Vec::with_capacity(QCOW2_MAGIC.len());
    confine::open(path)
        .and_then(|f| f.take(QCOW2_MAGIC.len() as u64).read_to_end(&mut head))
        .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
    Ok(Format::of(&head))
}

/// What `qemu-img info --output=json` says about one image.
#[derive(Debug, Deserialize)]
pub struct Info {
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    #[serde(rename = "backing-filename")]
    backing: Option<String>,
    #[serde(rename = "full-backing-filename")]
    full_backing: Option<String>,
    #[serde(rename = "backing-filename-format")]
    backing_format: Option<String>,
    #[serde(rename = "format-specific")]
    specific: Option<Specific>,
}

#[derive(Debug, Deserialize)]
struct Specific {
    data: Option<SpecificData>,
}

#[derive(Debug, Deserialize)]
struct SpecificData {
    /// A qcow2's external data file.
    #[serde(rename = "data-file")]
    data_file: Option<String>,
}

/// `qemu-img info` on `disk` as `format`, within [`QEMU_IMG_LIMIT`].
pub async fn info(disk: &Path, format: Format) -> Result<Info, ProviderError> {
    let run = tokio::process::Command::new(qemu_img_binary())
        .args(["info", "--output=json", "-U", "-f", format.as_str()])
        .arg(disk)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(QEMU_IMG_LIMIT, run)
        .await
        .map_err(|_| {
            invalid(format!(
                "qemu-img did not read {} within {}s: give a regular disk file",
                disk.display(),
                QEMU_IMG_LIMIT.as_secs()
            ))
        })?
        .map_err(|e| failed(format!("cannot run qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(invalid(format!(
            "{} is not a {} disk image: {}",
            disk.display(),
            format.as_str(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| failed(format!("qemu-img info said something unexpected: {e}")))
}

/// Probes `disk` (checked by `sources`) as `format`, then each backing file
/// in turn with its declared format, each one and each external data file
/// confined by `sources`; returns what qemu-img says about `disk`.
pub async fn chain(sources: &Sources, disk: &Path, format: Format) -> Result<Info, ProviderError> {
    let top = info(disk, format).await?;
    let mut next = link(sources, disk, &top)?;
    let mut depth = 0;
    while let Some((image, format)) = next {
        depth += 1;
        if depth > MAX_CHAIN {
            return Err(invalid(format!(
                "the backing chain of {} is longer than {MAX_CHAIN} images (or a loop): flatten it with qemu-img convert",
                disk.display()
            )));
        }
        let info = info(&image, format).await?;
        next = link(sources, &image, &info)?;
    }
    Ok(top)
}

/// Checks the data file `info` names for `image`, and returns its backing
/// file (checked) with its declared format.
fn link(sources: &Sources, image: &Path, info: &Info) -> Result<Option<(PathBuf, Format)>, ProviderError> {
    if let Some(data) = info.specific.as_ref().and_then(|s| s.data.as_ref()).and_then(|d| d.data_file.as_deref()) {
        if !confine::plain(data) || !Path::new(data).is_absolute() {
            return Err(invalid(format!(
                "the data file of {} is {data:?}, not an absolute file path: kiln follows only those; convert the image to one without an external data file (qemu-img convert -O qcow2)",
                image.display()
            )));
        }
        let what = format!("the data file {data} of {}", image.display());
        sources.check(&what, Path::new(data), Want::File)?;
    }
    let Some(backing) = info.backing.as_deref() else { return Ok(None) };
    let rebase = |why: &str| {
        invalid(format!(
            "the backing file {backing:?} of {} {why}: rebase it onto a plain file with its format declared (qemu-img rebase -u -b FILE -F qcow2|raw {})",
            image.display(),
            image.display()
        ))
    };
    if !confine::plain(backing) || info.full_backing.as_deref().is_some_and(|f| !confine::plain(f)) {
        return Err(rebase("is not a plain file path"));
    }
    let Some(format) = info.backing_format.as_deref() else { return Err(rebase("has no declared format")) };
    let Some(format) = Format::parse(format) else { return Err(rebase(&format!("is {format}, not qcow2 or raw"))) };
    let dir = image.parent().unwrap_or(Path::new("/"));
    let Some(path) = confine::join(dir, Path::new(backing)) else { return Err(rebase("has `..` after a name")) };
    let what = format!("the backing file {} of {}", path.display(), image.display());
    let path = sources.check(&what, &path, Want::File)?;
    Ok(Some((path, format)))
}

#[cfg(test)]
mod tests {
    use super::*;

    // kiln tells the format by qcow2's magic, never by asking qemu-img.
    #[test]
    fn qcow2_is_told_by_its_magic() {
        let cases: [(&[u8], Format); 4] = [
            (b"QFI\xfb\0\0\0\x03", Format::Qcow2),
            (b"QFI\xfb", Format::Qcow2),
            (b"QFI", Format::Raw),
            (b"KDMV\x01\0\0\0", Format::Raw),
        ];
        for (head, want) in cases {
            assert_eq!(Format::of(head), want, "{head:?}");
        }
    }

    // The fields kiln follows are read from qemu-img's JSON.
    #[test]
    fn info_reads_backing_and_data_file() {
        let json = r#"{"virtual-size": 1048576, "filename": "/imgs/x.qcow2", "format": "qcow2",
            "backing-filename": "../base.raw", "full-backing-filename": "/base.raw",
            "backing-filename-format": "raw",
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "data-file": "/d/x.raw"}}}"#;
        let info: Info = serde_json::from_str(json).unwrap();
        assert_eq!(info.virtual_size, 1048576);
        assert_eq!(info.backing.as_deref(), Some("../base.raw"));
        assert_eq!(info.full_backing.as_deref(), Some("/base.raw"));
        assert_eq!(info.backing_format.as_deref(), Some("raw"));
        assert_eq!(info.specific.and_then(|s| s.data).and_then(|d| d.data_file).as_deref(), Some("/d/x.raw"));
        let raw: Info = serde_json::from_str(r#"{"virtual-size": 512, "format": "raw"}"#).unwrap();
        assert!(raw.backing.is_none() && raw.specific.is_none());
    }
}
