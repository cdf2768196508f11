//! `kiln guest-relay SOCKET`: what QEMU runs for each guest connection to one
//! of kiln's guest-side addresses (`guestfwd=…-cmd:`). QEMU hands the guest's
//! connection over as stdin and stdout; the relay joins it to a Unix socket in
//! the data directory, so a restarted coordinator is reached at the same place.
//! For the egress proxy it first names the target, which the guest cannot forge:
//! the command line is QEMU's, not the guest's.
//!
//! QEMU starts one relay per guest connection, so a hostile guest could make
//! the host run any number of them: each relay first takes one of
//! [`MAX_RELAYS`] lock slots in its instance's directory and exits at once
//! (closing the guest's connection) when none is free.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_protocol::TargetId;

/// How many connections one VM may have open through relays at a time.
pub const MAX_RELAYS: usize = 64;

/// The first line the egress proxy reads on each relayed connection.
pub fn egress_preamble(target: TargetId) -> String {
    format!("{}{target}\n", crate::egress::PREAMBLE_PREFIX)
}

/// Relays stdin/stdout to `socket` until both directions have ended, holding
/// a slot in `slots` meanwhile.
pub fn run(socket: &Path, target: Option<TargetId>, slots: Option<&Path>) -> anyhow::Result<()> {
    let _slot = match slots {
        Some(dir) => Some(take_slot(dir)?),
        None => None,
    };
    let mut stream = UnixStream::connect(socket).with_context(|| format!("cannot connect to {}", socket.display()))?;
    if let Some(target) = target {
        stream.write_all(egress_preamble(target).as_bytes())?;
    }
    // Unbuffered files on the standard fds: std's stdout buffers by line, which
    // would hold back a TLS record that has no newline in it.
    let mut input = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let mut output = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    let mut upstream = stream.try_clone()?;
    let guest_to_kiln = std::thread::spawn(move || {
        let _ = std::io::copy(&mut input, &mut upstream);
        let _ = upstream.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut stream, &mut output);
    drop(output);
    // The guest side may still be sending; the relay ends when kiln has closed
    // its side and the guest's input has ended (QEMU closes it with the connection).
    let _ = guest_to_kiln.join();
    Ok(())
}

/// Locks the first free slot file in `dir`; the lock ends with the process.
fn take_slot(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for i in 0..MAX_RELAYS {
        let path: PathBuf = dir.join(format!("slot-{i}"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            return Ok(lock);
        }
    }
    anyhow::bail!("all {MAX_RELAYS} connection slots of this VM are in use; refusing another")
}

#[cfg(test)]
mod tests {
    use super::*;

    // A VM gets at most MAX_RELAYS relays at once; a slot frees when its holder ends.
    #[test]
    fn relays_per_vm_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let held: Vec<_> = (0..MAX_RELAYS).map(|_| take_slot(dir.path()).unwrap()).collect();
        let refused = take_slot(dir.path()).unwrap_err().to_string();
        assert!(refused.contains("connection slots"), "{refused}");
        drop(held);
        assert!(take_slot(dir.path()).is_ok());
    }
}
