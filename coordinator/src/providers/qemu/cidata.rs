//! The NoCloud seed on a read-only drive labelled `CIDATA`: `user-data`,
//! `meta-data`, `vendor-data` and `network-config` in a FAT file system, the
//! one seed every cloud-init version reads in its local stage, and the first
//! source of kiln's boot hook. No listener serves the one-time token.
//!
//! The FAT image is written in memory by the `fatfs` crate into a sealed
//! memfd that QEMU receives as an inherited fd (`-add-fd`), so the token is
//! never in a file on any disk and nothing is left to clean up: the drive
//! lives exactly as long as the QEMU process that holds it.

use std::ffi::CStr;
use std::io::{Cursor, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use kiln_protocol::TargetId;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};

use super::{ProviderError, failed};

/// The volume label cloud-init and the boot hook look for (cloud-init
/// accepts `cidata` in either case; FAT labels are upper case).
const LABEL: [u8; 11] = *b"CIDATA     ";
/// The smallest drive made: FAT12 with room to spare for any user-data.
const MIN_BYTES: usize = 1024 * 1024;

/// cloud-init's network configuration: DHCP on every Ethernet interface.
pub const NETWORK_CONFIG: &str = "version: 2\nethernets:\n  all:\n    match:\n      name: \"e*\"\n    dhcp4: true\n";

/// The four files of a target's seed.
pub fn files(target: TargetId, user_data: &str) -> [(&'static str, String); 4] {
    let short = &target.to_string()[..8];
    [
        ("user-data", user_data.to_owned()),
        ("meta-data", format!("instance-id: kiln-{target}\nlocal-hostname: kiln-{short}\n")),
        ("vendor-data", String::new()),
        ("network-config", NETWORK_CONFIG.to_owned()),
    ]
}

/// A FAT file system labelled `CIDATA` holding `files` at its root.
pub fn image(files: &[(&str, String)]) -> Result<Vec<u8>, ProviderError> {
    let fat = |e: std::io::Error| failed(format!("cannot write the cidata drive: {e}"));
    let content: usize = files.iter().map(|(_, body)| body.len()).sum();
    let size = (content * 2 + 256 * 1024).max(MIN_BYTES).next_multiple_of(512);
    let mut disk = Cursor::new(vec![0u8; size]);
    fatfs::format_volume(&mut disk, fatfs::FormatVolumeOptions::new().volume_label(LABEL)).map_err(fat)?;
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).map_err(fat)?;
        for (name, body) in files {
            fs.root_dir().create_file(name).and_then(|mut f| f.write_all(body.as_bytes())).map_err(fat)?;
        }
        fs.unmount().map_err(fat)?;
    }
    Ok(disk.into_inner())
}

/// `bytes` in a sealed memfd, returned as a read-only descriptor (QEMU takes
/// a read-only drive only from a descriptor opened read-only).
pub fn memfd(bytes: &[u8]) -> Result<OwnedFd, ProviderError> {
    let err = |what: &str, e: &dyn std::fmt::Display| failed(format!("cannot make the cidata drive: {what}: {e}"));
    const NAME: &CStr = c"kiln-cidata";
    let fd =
        memfd_create(NAME, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).map_err(|e| err("memfd_create", &e))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes).map_err(|e| err("write", &e))?;
    let seals = SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL;
    fcntl(file.as_fd(), FcntlArg::F_ADD_SEALS(seals)).map_err(|e| err("seal", &e))?;
    let read_only =
        std::fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(|e| err("reopen read-only", &e))?;
    Ok(read_only.into())
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    // The drive reads back, through an independent FAT reader, with the label
    // cloud-init looks for and the four files byte for byte.
    #[test]
    fn drive_holds_the_seed_under_the_cidata_label() {
        let target = TargetId::generate();
        let seed = files(target, "#!/bin/sh\necho hi\n");
        let bytes = image(&seed).unwrap();
        let fs = fatfs::FileSystem::new(Cursor::new(bytes), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "CIDATA");
        for (name, body) in &seed {
            let mut read = String::new();
            fs.root_dir().open_file(name).unwrap().read_to_string(&mut read).unwrap();
            assert_eq!(&read, body, "{name}");
        }
        assert!(seed[1].1.contains(&format!("instance-id: kiln-{target}")));
    }

    // The descriptor QEMU gets is read-only and the memfd is sealed, so
    // nothing (the coordinator included) can change the drive afterwards.
    #[test]
    fn memfd_is_read_only_and_sealed() {
        let fd = memfd(b"seed bytes").unwrap();
        let mut file = std::fs::File::from(fd);
        assert!(file.write_all(b"x").is_err(), "the descriptor is read-only");
        let mut back = Vec::new();
        file.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"seed bytes");
        let writable = std::fs::OpenOptions::new().write(true).open(format!("/proc/self/fd/{}", file.as_raw_fd()));
        assert!(writable.and_then(|mut w| w.write_all(b"x")).is_err(), "the memfd is sealed against writes");
    }
}
