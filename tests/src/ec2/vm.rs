//! One instance's disk and QEMU command line.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use serde::Deserialize;
use tokio::process::Command;

/// What the runner boots an AMI from: a kiln image manifest, or the disk an
/// instance left behind (for AMIs made by CreateImage).
#[derive(Clone, Debug)]
pub struct BaseDisk {
    pub disk: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: String,
}

#[derive(Deserialize)]
struct Manifest {
    format: String,
    disk: PathBuf,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    append: Option<String>,
}

impl BaseDisk {
    /// Reads an `image.json` manifest; its paths are relative to it.
    pub fn from_manifest(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("read manifest {}", path.display()))?;
        let m: Manifest = serde_json::from_str(&text).with_context(|| format!("parse manifest {}", path.display()))?;
        let dir = std::path::absolute(path)?.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(Self {
            disk: dir.join(m.disk),
            format: m.format,
            kernel: m.kernel.map(|k| dir.join(k)),
            initrd: m.initrd.map(|i| dir.join(i)),
            append: m.append.unwrap_or_else(|| "console=ttyS0 root=/dev/vda rw".into()),
        })
    }
}

/// The base of the Nimbus file, as the guest reaches the metadata service.
const NIMBUS_URL: &str = "http://169.254.169.254";

/// Makes the instance's own disk in `dir`: a qcow2 overlay on the base, or for
/// Nimbus a raw copy holding `/var/nimbus-metadata-server-url`. Returns it as
/// a [`BaseDisk`] (the instance's disk, which CreateImage turns into an AMI).
pub async fn prepare_disk(base: &BaseDisk, dir: &Path, nimbus: bool) -> anyhow::Result<BaseDisk> {
    let mut own = base.clone();
    if nimbus {
        own.disk = dir.join("disk.raw");
        own.format = "raw".into();
        run(Command::new("qemu-img").args(["convert", "-O", "raw", "-f", &base.format]).arg(&base.disk).arg(&own.disk))
            .await?;
        let url_file = dir.join("nimbus-url");
        std::fs::write(&url_file, format!("{NIMBUS_URL}\n"))?;
        let script = dir.join("debugfs.cmds");
        // mkdir and rm may fail (exists / absent); debugfs goes on, and the read-back below checks the result.
        let cmds = format!(
            "mkdir /var\ncd /var\nrm nimbus-metadata-server-url\nwrite \"{}\" nimbus-metadata-server-url\n",
            url_file.display()
        );
        std::fs::write(&script, cmds)?;
        run(Command::new("debugfs").arg("-w").arg("-f").arg(&script).arg(&own.disk)).await?;
        let back =
            run(Command::new("debugfs").args(["-R", "cat /var/nimbus-metadata-server-url"]).arg(&own.disk)).await?;
        if back.trim() != NIMBUS_URL {
            bail!("debugfs did not write /var/nimbus-metadata-server-url into {}: {back:?}", own.disk.display());
        }
    } else {
        own.disk = dir.join("overlay.qcow2");
        own.format = "qcow2".into();
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", &base.format, "-b"])
            .arg(std::path::absolute(&base.disk)?)
            .arg(&own.disk))
        .await?;
    }
    Ok(own)
}

fn netdev(imds_port: u16, coordinator_ports: &[u16]) -> String {
    let mut arg = format!(
        "user,id=n0,net=169.254.169.0/24,host={},restrict=on,guestfwd=tcp:169.254.169.254:80-cmd:busybox nc 127.0.0.1 {imds_port}",
        super::SLIRP_HOST
    );
    for port in coordinator_ports {
        arg.push_str(&format!(",guestfwd=tcp:{}:{port}-cmd:busybox nc 127.0.0.1 {port}", super::GUEST_HOST));
    }
    arg
}

/// Runs a tool to completion; its stdout, or an error with its stderr.
pub(crate) async fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.stdin(Stdio::null()).kill_on_drop(true).output().await.with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The coordinator ports `user_data` names at [`super::GUEST_HOST`]: the
/// ones the VM's network forwards, and no others.
pub fn coordinator_ports(user_data: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(user_data);
    let prefix = format!("{}:", super::GUEST_HOST);
    let mut ports: Vec<u16> = text
        .match_indices(&prefix)
        .filter_map(|(at, _)| {
            let digits: String = text[at + prefix.len()..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// QEMU (TCG) booting `disk`, console to `dir/console.log`, stderr to
/// `dir/qemu.log`, on a restricted network (`restrict=on`): the guest reaches
/// 169.254.169.254:80, forwarded to `imds_port` on the host's loopback, and
/// [`super::GUEST_HOST`] at each of `coordinator_ports`, forwarded to the same
/// port on the host's loopback; nothing else, so a test guest never reaches
/// anything but the test's own servers. Its own process group, so its `nc`
/// children die with it.
pub fn qemu(disk: &BaseDisk, dir: &Path, imds_port: u16, coordinator_ports: &[u16]) -> anyhow::Result<Command> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.current_dir(dir)
        .args(["-accel", "tcg", "-machine", "q35", "-m", "512", "-smp", "1"])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", dir.join("console.log").display()));
    if let Some(kernel) = &disk.kernel {
        cmd.arg("-kernel").arg(kernel);
        if let Some(initrd) = &disk.initrd {
            cmd.arg("-initrd").arg(initrd);
        }
        cmd.args(["-append", &disk.append]);
    }
    cmd.arg("-drive")
        .arg(format!("file={},format={},if=virtio,discard=unmap", disk.disk.display(), disk.format))
        .arg("-netdev")
        .arg(netdev(imds_port, coordinator_ports))
        .args(["-device", "virtio-net-pci,netdev=n0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("qemu.log"))?)
        .kill_on_drop(true)
        .process_group(0);
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    // Only the ports the user-data names at the guest host are forwarded.
    #[test]
    fn forwards_the_coordinator_ports_user_data_names() {
        let user_data = b"agent_url='https://169.254.169.100:7701'\nagent_binary_url='http://169.254.169.100:7702/bootstrap/v1/kiln-agent'\nx=169.254.169.1000\n";
        assert_eq!(super::coordinator_ports(user_data), [7701, 7702]);
    }
}
