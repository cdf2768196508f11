//! Generators written as a TOML file next to their script:
//!
//! ```toml
//! name = "dstat"
//! description = "dstat installed"
//! script = "dstat.sh"          # relative to this file
//! timeout_secs = 900
//! [env]
//! DEBIAN_FRONTEND = "noninteractive"
//! [secrets]                    # write-only: never shown, masked in logs
//! APT_AUTH = "machine deb.example.com login u password p4ssw0rd"
//! [targets.local]
//! base_image = "/var/lib/kiln/images/debian.qcow2"
//! ```
//!
//! A file with a `[secrets]` table gives the new revision exactly those
//! secrets; a file without one keeps the previous revision's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_protocol::api::{GeneratorSpec, Secret, TargetSpec};
use kiln_protocol::{CloudName, GeneratorName};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorFile {
    pub name: GeneratorName,
    #[serde(default)]
    pub description: String,
    /// Path of the script, relative to the TOML file.
    pub script: PathBuf,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Secret environment variables (the API's `secret_env`).
    #[serde(default)]
    pub secrets: Option<BTreeMap<String, Secret>>,
    /// Generalize the sealed image (default on).
    #[serde(default)]
    pub generalize: Option<bool>,
    #[serde(default)]
    pub targets: BTreeMap<CloudName, TargetSpec>,
}

impl GeneratorFile {
    /// Reads the TOML file and the script it names into a spec.
    pub fn load(path: &Path) -> anyhow::Result<GeneratorSpec> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let file: GeneratorFile =
            toml::from_str(&text).with_context(|| format!("{} is not a valid generator file", path.display()))?;
        let script_path = path.parent().unwrap_or(Path::new(".")).join(&file.script);
        let script = std::fs::read_to_string(&script_path)
            .with_context(|| format!("cannot read the script {} named in {}", script_path.display(), path.display()))?;
        Ok(GeneratorSpec {
            name: file.name,
            description: file.description,
            script,
            timeout_secs: file.timeout_secs,
            env: file.env,
            secret_env: file.secrets,
            generalize: file.generalize,
            targets: file.targets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A generator file and its script become one spec; the script path is relative to the file.
    #[test]
    fn loads_file_and_script() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s.sh"), "echo hi\n").unwrap();
        std::fs::write(
            dir.path().join("g.toml"),
            "name = \"demo\"\nscript = \"s.sh\"\n[targets.local]\nbase_image = \"base.qcow2\"\n",
        )
        .unwrap();
        let spec = GeneratorFile::load(&dir.path().join("g.toml")).unwrap();
        assert_eq!(spec.script, "echo hi\n");
        assert_eq!(spec.targets[&"local".parse::<CloudName>().unwrap()].base_image, "base.qcow2");
        std::fs::write(dir.path().join("bad.toml"), "name = \"Bad Name\"\nscript = \"s.sh\"\n").unwrap();
        let err = format!("{:#}", GeneratorFile::load(&dir.path().join("bad.toml")).unwrap_err());
        assert!(err.contains("invalid name"), "{err}");
    }
}
