//! `kiln guest-relay SOCKET`: what QEMU runs for each guest connection to one
//! of kiln's guest-side addresses (`guestfwd=…-cmd:`). QEMU hands the guest's
//! connection over as stdin and stdout; the relay joins it to a Unix socket in
//! the data directory, so a restarted coordinator is reached at the same place.
//! For the egress proxy it first names the target, which the guest cannot forge:
//! the command line is QEMU's, not the guest's.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::Context;
use kiln_protocol::TargetId;

/// The first line the egress proxy reads on each relayed connection.
pub fn egress_preamble(target: TargetId) -> String {
    format!("{}{target}\n", crate::egress::PREAMBLE_PREFIX)
}

/// Relays stdin/stdout to `socket` until both directions have ended.
pub fn run(socket: &Path, target: Option<TargetId>) -> anyhow::Result<()> {
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
