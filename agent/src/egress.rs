//! The script's way out on clouds whose VMs reach the network only through
//! kiln's egress proxy (the local cloud). The proxy goes into the script's
//! environment and, because `sudo` resets the environment and apt reads its
//! own configuration, also where those tools look: an apt drop-in, a sudoers
//! drop-in that keeps the proxy variables, and a marked block in
//! `/etc/environment` (pam_env). Everything is removed when the script ends,
//! so the image never points at a proxy that only existed during the build.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kiln_protocol::agent::Job;
use tracing::{info, warn};

const BEGIN: &str = "# kiln-egress begin: removed when the build's script ends";
const END: &str = "# kiln-egress end";

/// Where the configuration goes; a directory in tests, `/` in a VM.
#[derive(Clone, Debug)]
pub struct Egress {
    root: PathBuf,
    /// Files this agent created and removes again.
    created: Vec<PathBuf>,
    /// `/etc/environment` got a block (and whether the file existed before).
    environment: Option<bool>,
}

/// The proxy variables for the script, in both spellings tools read.
pub fn env(job: &Job) -> Vec<(String, String)> {
    let Some(proxy) = &job.egress_proxy else { return Vec::new() };
    let no_proxy = job.no_proxy.join(",");
    let mut vars = Vec::new();
    for (name, value) in [("http_proxy", proxy), ("https_proxy", proxy), ("no_proxy", &no_proxy)] {
        vars.push((name.to_owned(), value.clone()));
        vars.push((name.to_uppercase(), value.clone()));
    }
    vars
}

impl Egress {
    /// Writes the proxy where tools read it, under `root`; nothing without a proxy.
    pub fn configure(job: &Job, root: &Path) -> Egress {
        let mut egress = Egress { root: root.to_owned(), created: Vec::new(), environment: None };
        let Some(proxy) = &job.egress_proxy else { return egress };
        let apt = root.join("etc/apt/apt.conf.d");
        if apt.is_dir() {
            let conf = format!("Acquire::http::Proxy \"{proxy}\";\nAcquire::https::Proxy \"{proxy}\";\n");
            egress.create(apt.join("90kiln-egress"), &conf, 0o644);
        }
        let sudoers = root.join("etc/sudoers.d");
        if sudoers.is_dir() {
            let keep = "Defaults env_keep += \"http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY\"\n";
            egress.create(sudoers.join("90-kiln-egress"), keep, 0o440);
        }
        let environment = root.join("etc/environment");
        let existed = environment.exists();
        let block: String = env(job).iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        let mut text = fs::read_to_string(&environment).unwrap_or_default();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("{BEGIN}\n{block}{END}\n"));
        match fs::write(&environment, text) {
            Ok(()) => egress.environment = Some(existed),
            Err(e) => warn!("cannot write the proxy into {}: {e}", environment.display()),
        }
        info!(%proxy, "egress through kiln's proxy");
        egress
    }

    fn create(&mut self, path: PathBuf, text: &str, mode: u32) {
        let written =
            fs::write(&path, text).and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(mode)));
        match written {
            Ok(()) => self.created.push(path),
            Err(e) => warn!("cannot write {}: {e}", path.display()),
        }
    }

    /// Removes everything [`Egress::configure`] wrote.
    pub fn remove(self) -> io::Result<()> {
        for path in &self.created {
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        if let Some(existed) = self.environment {
            let path = self.root.join("etc/environment");
            let text = fs::read_to_string(&path).unwrap_or_default();
            let kept = strip_block(&text);
            if kept.is_empty() && !existed { fs::remove_file(&path) } else { fs::write(&path, kept) }?;
        }
        Ok(())
    }
}

/// `text` without kiln's marked block (a script may have edited around it).
fn strip_block(text: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in text.split_inclusive('\n') {
        match line.trim_end() {
            BEGIN => inside = true,
            END if inside => inside = false,
            _ if !inside => out.push_str(line),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kiln_protocol::TargetId;

    use super::*;

    fn job(proxy: Option<&str>) -> Job {
        Job {
            target: TargetId::generate(),
            script: String::new(),
            env: BTreeMap::new(),
            timeout_secs: 60,
            egress_proxy: proxy.map(str::to_owned),
            no_proxy: vec!["10.0.2.100".into(), "localhost".into()],
            generalize: true,
        }
    }

    // With a proxy, apt, sudo and pam_env learn it, and removing it restores
    // every file exactly (a file that did not exist is gone again).
    #[test]
    fn configures_where_tools_read_and_restores_exactly() {
        let root = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc");
        fs::create_dir_all(etc.join("apt/apt.conf.d")).unwrap();
        fs::create_dir_all(etc.join("sudoers.d")).unwrap();
        fs::write(etc.join("environment"), "LANG=C.UTF-8").unwrap();
        let egress = Egress::configure(&job(Some("http://10.0.2.100:3128")), root.path());
        let apt = fs::read_to_string(etc.join("apt/apt.conf.d/90kiln-egress")).unwrap();
        assert!(apt.contains("Acquire::http::Proxy \"http://10.0.2.100:3128\";"), "{apt}");
        let sudo = fs::metadata(etc.join("sudoers.d/90-kiln-egress")).unwrap();
        assert_eq!(sudo.permissions().mode() & 0o777, 0o440, "sudo ignores sudoers files with other modes");
        let environment = fs::read_to_string(etc.join("environment")).unwrap();
        assert!(environment.starts_with("LANG=C.UTF-8\n# kiln-egress begin"), "{environment}");
        assert!(environment.contains("\nhttps_proxy=http://10.0.2.100:3128\n"), "{environment}");
        assert!(environment.contains("\nNO_PROXY=10.0.2.100,localhost\n"), "{environment}");

        egress.remove().unwrap();
        assert!(!etc.join("apt/apt.conf.d/90kiln-egress").exists());
        assert!(!etc.join("sudoers.d/90-kiln-egress").exists());
        assert_eq!(fs::read_to_string(etc.join("environment")).unwrap(), "LANG=C.UTF-8\n");
    }

    // Without a proxy (other clouds, test beds on the host) nothing is written.
    #[test]
    fn no_proxy_writes_nothing() {
        let root = tempfile::tempdir().unwrap();
        let egress = Egress::configure(&job(None), root.path());
        assert!(env(&job(None)).is_empty());
        egress.remove().unwrap();
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 0);
    }

    // A missing /etc/environment is created for the script and removed after.
    #[test]
    fn created_environment_is_removed() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("etc")).unwrap();
        let egress = Egress::configure(&job(Some("http://p:1")), root.path());
        assert!(root.path().join("etc/environment").exists());
        egress.remove().unwrap();
        assert!(!root.path().join("etc/environment").exists());
    }
}
