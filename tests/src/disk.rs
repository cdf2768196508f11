//! What is in an image's bytes: the disk converted to raw, and searches for
//! secrets in it.

use std::path::Path;

/// The raw bytes of the qcow2 or raw disk at `disk` (converted by `qemu-img`).
pub fn raw_bytes(disk: &Path) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(disk)
        .arg(&raw)
        .output()
        .expect("run qemu-img");
    assert!(out.status.success(), "qemu-img convert: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(&raw).unwrap()
}

/// How often `needle` occurs in `bytes`.
pub fn count(bytes: &[u8], needle: &[u8]) -> usize {
    memchr::memmem::find_iter(bytes, needle).count()
}

/// Where `needle` occurs in `bytes`, each with what surrounds it (the needle
/// itself shown as `<needle>`), to tell which file left it there.
pub fn contexts(bytes: &[u8], needle: &[u8]) -> Vec<String> {
    memchr::memmem::find_iter(bytes, needle)
        .take(8)
        .map(|at| {
            let before = &bytes[at.saturating_sub(300)..at];
            let after = &bytes[at + needle.len()..(at + needle.len() + 300).min(bytes.len())];
            format!("at {at:#x}: {}<needle>{}", String::from_utf8_lossy(before), String::from_utf8_lossy(after))
        })
        .collect()
}

/// PEM private key blocks (a header followed by base64 lines) in `bytes`,
/// each told by the first 64 characters of its body.
pub fn pem_private_keys(bytes: &[u8]) -> std::collections::BTreeSet<Vec<u8>> {
    memchr::memmem::find_iter(bytes, b"PRIVATE KEY-----\n")
        .filter_map(|at| {
            let body = &bytes[at + 17..(at + 17 + 64).min(bytes.len())];
            let base64 = body.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/');
            (body.len() == 64 && base64).then(|| body.to_vec())
        })
        .collect()
}

/// A random marker that occurs nowhere else: `kind-` and 32 hex digits.
pub fn marker(kind: &str) -> String {
    format!("{kind}-{:032x}", rand::random::<u128>())
}
