//! Where local images may come from.
//!
//! A base image, every disk, backing file and data file it leads to, and a
//! kernel or initrd must resolve, symlinks and all, into an allowed directory
//! (kiln's image store, the tiny-image cache, each `--image-dir`), and never
//! into the rest of kiln's data directory (its CA key, database, logs,
//! instances and sockets), even when an allowed directory contains it: a
//! script's log handed back as a qcow2 backing file must not give the next VM
//! the CA key.
//!
//! A path is judged by where it *would* lead ([`would_be`]): every symlink
//! followed, dangling ones too, and missing components appended as written.
//! So a path outside the allowed directories gets the same answer whether or
//! not it exists; only inside them does kiln say that something is missing.
//! The rules are pure functions over a [`Lookup`]; [`Sources`] applies them
//! to the real file system.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use super::super::{ProviderError, invalid};
use crate::config::Config;

/// What one path is, as far as resolving it is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// Nothing there, or nothing kiln may look at.
    Missing,
    /// A file or directory that is not a symlink.
    Present,
    /// A symlink and its target.
    Link(PathBuf),
}

/// Looks up one absolute path without following a final symlink.
pub trait Lookup {
    fn node(&self, path: &Path) -> Node;
}

/// The host's file system.
#[derive(Debug, Clone, Copy)]
pub struct RealFs;

impl Lookup for RealFs {
    fn node(&self, path: &Path) -> Node {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => std::fs::read_link(path).map_or(Node::Missing, Node::Link),
            Ok(_) => Node::Present,
            Err(_) => Node::Missing,
        }
    }
}

/// How many symlinks one resolution follows (Linux's own limit).
const MAX_LINKS: usize = 40;

/// Where the absolute path `path` would lead: each existing symlink replaced
/// by its target, dangling ones included; from the first missing component
/// on the rest is appended as written (a `..` there going back lexically, as
/// it would if the component were a directory).
pub fn would_be(path: &Path, fs: &impl Lookup) -> PathBuf {
    let mut todo: VecDeque<OsString> = VecDeque::new();
    push_front(&mut todo, path);
    let mut out = PathBuf::from("/");
    let (mut missing, mut links) = (false, 0);
    while let Some(part) = todo.pop_front() {
        if part == "/" {
            out = PathBuf::from("/");
            continue;
        }
        if part == ".." {
            out.pop();
            continue;
        }
        out.push(&part);
        if missing {
            continue;
        }
        match fs.node(&out) {
            Node::Present => {}
            Node::Missing => missing = true,
            Node::Link(_) if links == MAX_LINKS => missing = true,
            Node::Link(target) => {
                links += 1;
                out.pop();
                push_front(&mut todo, &target);
            }
        }
    }
    out
}

/// Puts `path`'s components in front of `todo`: `/` for its root, `..` as is.
fn push_front(todo: &mut VecDeque<OsString>, path: &Path) {
    for c in path.components().rev() {
        match c {
            Component::RootDir => todo.push_front("/".into()),
            Component::ParentDir => todo.push_front("..".into()),
            Component::Normal(n) => todo.push_front(n.to_owned()),
            Component::CurDir | Component::Prefix(_) => {}
        }
    }
}

/// `name` joined to the canonical directory `dir`, as QEMU joins a relative
/// backing file: leading `..` go up from `dir` (which has no symlinks, so
/// that is exact); a `..` after a name is refused (`None`), because where it
/// leads depends on whether that name is a symlink. An absolute `name` must
/// have no `..` at all.
pub fn join(dir: &Path, name: &Path) -> Option<PathBuf> {
    let mut out = if name.is_absolute() { PathBuf::from("/") } else { dir.to_owned() };
    let mut named = name.is_absolute();
    for c in name.components() {
        match c {
            Component::ParentDir if named => return None,
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => {
                named = true;
                out.push(n);
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Some(out)
}

/// Whether QEMU would open `name` as a file: not empty, no `json:` and no
/// other protocol prefix (QEMU's rule: a `:` before the first `/`).
pub fn plain(name: &str) -> bool {
    !name.is_empty() && !name.split('/').next().unwrap_or_default().contains(':')
}

/// A path the user gave: absolute, and without `..`.
fn lexical(path: &Path) -> bool {
    path.is_absolute() && !path.components().any(|c| c == Component::ParentDir)
}

/// Where images may come from, as resolved paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roots {
    /// The allowed directories.
    pub allowed: Vec<PathBuf>,
    /// kiln's data directory: nothing in it is an image but under `store`.
    pub data: PathBuf,
    /// kiln's image store, `<data>/images`.
    pub store: PathBuf,
}

/// Why a path is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("must be an absolute path without `..`")]
    NotPlain,
    #[error("is outside the directories kiln takes local images from")]
    Outside,
    #[error(
        "leads into kiln's data directory {}, whose CA key, database, logs, instances and sockets are never images (only its images/ directory holds images)", .0.display()
    )]
    KilnState(PathBuf),
}

/// The resolved path of `path` when the rules allow it: absolute, without
/// `..`, leading neither into kiln's own state nor outside the allowed
/// directories. Whether it exists is not decided here.
pub fn judge(path: &Path, roots: &Roots, fs: &impl Lookup) -> Result<PathBuf, Refusal> {
    if !lexical(path) {
        return Err(Refusal::NotPlain);
    }
    let at = would_be(path, fs);
    if at.starts_with(&roots.data) && !at.starts_with(&roots.store) {
        Err(Refusal::KilnState(roots.data.clone()))
    } else if roots.allowed.iter().any(|d| at.starts_with(d)) {
        Ok(at)
    } else {
        Err(Refusal::Outside)
    }
}

/// One allowed directory and what it is, for messages.
#[derive(Debug, Clone)]
struct Source {
    dir: PathBuf,
    what: &'static str,
}

/// What may be given where a path is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// A regular file.
    File,
    /// A regular file or a directory (one holding `image.json`).
    FileOrDir,
}

/// The allowed directories of one coordinator, applied to the real file system.
#[derive(Debug, Clone)]
pub struct Sources {
    allowed: Vec<Source>,
    data: PathBuf,
    store: PathBuf,
}

impl Sources {
    /// kiln's image store, the tiny-image cache and the `--image-dir`s.
    pub fn new(config: &Config) -> Self {
        let mut allowed = vec![Source { dir: config.images_dir(), what: "kiln's image store" }];
        if let Some(cache) = &config.image_cache {
            allowed.push(Source { dir: cache.clone(), what: "the tiny-image cache" });
        }
        allowed.extend(config.image_dirs.iter().map(|d| Source { dir: d.clone(), what: "--image-dir" }));
        Self { allowed, data: config.data_dir.clone(), store: config.images_dir() }
    }

    /// The roots resolved now, so a directory made or relinked since start counts as it is.
    fn roots(&self) -> Roots {
        let resolve = |p: &Path| would_be(p, &RealFs);
        Roots {
            allowed: self.allowed.iter().map(|s| resolve(&s.dir)).collect(),
            data: resolve(&self.data),
            store: resolve(&self.store),
        }
    }

    /// What to do about a refused path.
    fn advice(&self) -> String {
        let dirs: Vec<String> = self.allowed.iter().map(|s| format!("{} ({})", s.dir.display(), s.what)).collect();
        format!(
            "local images, kernels and initrds come only from {}: put the file in one of them, or add its directory with --image-dir DIR (on kiln serve or a one-shot kiln build start)",
            dirs.join(", ")
        )
    }

    /// Checks `path`, called `what` in messages, and returns its canonical
    /// form: allowed by the rules, existing, and a regular file (or, for
    /// [`Want::FileOrDir`], a directory). A missing one is `ImageNotFound`.
    pub fn check(&self, what: &str, path: &Path, want: Want) -> Result<PathBuf, ProviderError> {
        let at = judge(path, &self.roots(), &RealFs).map_err(|r| match r {
            Refusal::NotPlain => invalid(format!("{what} {r}")),
            _ => invalid(format!("{what} {r}; {}", self.advice())),
        })?;
        let meta = match std::fs::symlink_metadata(&at) {
            Ok(m) => m,
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => {
                return Err(invalid(format!("{what} does not exist")).with_code("ImageNotFound"));
            }
            Err(e) => return Err(invalid(format!("{what} cannot be read: {e}"))),
        };
        // Everything exists now, so the resolved path must be the kernel's;
        // if not, something changed while kiln looked.
        if std::fs::canonicalize(&at).ok().as_deref() != Some(at.as_path()) {
            return Err(invalid(format!("{what} changed while kiln checked it; try again")));
        }
        let kind = meta.file_type();
        match kind_name(&kind) {
            None => Ok(at),
            Some("a directory") if want == Want::FileOrDir => Ok(at),
            Some(name) => Err(invalid(format!("{what} is {name}, not a regular file: kiln reads only regular files"))),
        }
    }
}

/// `None` for a regular file, else what it is.
fn kind_name(kind: &std::fs::FileType) -> Option<&'static str> {
    if kind.is_file() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_socket() {
        Some("a socket")
    } else if kind.is_block_device() || kind.is_char_device() {
        Some("a device")
    } else {
        Some("a symlink")
    }
}

/// Opens a file [`Sources::check`] passed for reading: never blocks on a FIFO
/// that took its place, follows no symlink, and refuses all but a regular file.
pub fn open(path: &Path) -> io::Result<File> {
    use nix::fcntl::OFlag;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW).bits())
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A file system of existing paths and symlinks.
    struct Fake(BTreeMap<PathBuf, Node>);

    impl Fake {
        fn new(present: &[&str], links: &[(&str, &str)]) -> Self {
            let mut map = BTreeMap::new();
            let parents = links.iter().filter_map(|(link, _)| Path::new(link).parent());
            for p in present.iter().map(Path::new).chain(parents) {
                let mut at = PathBuf::from("/");
                for c in p.components().skip(1) {
                    at.push(c);
                    map.entry(at.clone()).or_insert(Node::Present);
                }
            }
            for (link, target) in links {
                map.insert(PathBuf::from(link), Node::Link(PathBuf::from(target)));
            }
            Self(map)
        }
    }

    impl Lookup for Fake {
        fn node(&self, path: &Path) -> Node {
            self.0.get(path).cloned().unwrap_or(Node::Missing)
        }
    }

    fn fs() -> Fake {
        Fake::new(
            &[
                "/imgs/tiny/image.json",
                "/imgs/disk.raw",
                "/data/pki/ca.key",
                "/data/images/out/image.json",
                "/etc/shadow",
            ],
            &[
                ("/imgs/key", "/data/pki/ca.key"),
                ("/imgs/rel", "../data/pki/ca.key"),
                ("/imgs/dangling", "/etc/nonexistent"),
                ("/imgs/alias", "tiny"),
                ("/imgs/loop", "/imgs/loop"),
                ("/outside/link", "/imgs/disk.raw"),
                ("/cache", "/real/cache"),
            ],
        )
    }

    fn roots(allowed: &[&str]) -> Roots {
        Roots {
            allowed: allowed.iter().map(PathBuf::from).chain([PathBuf::from("/data/images")]).collect(),
            data: "/data".into(),
            store: "/data/images".into(),
        }
    }

    // Each path is judged by where it would lead; outside paths get the same
    // answer whether or not they exist, and kiln's own state is refused even
    // when an allowed directory holds it.
    #[test]
    fn paths_are_judged_by_where_they_lead() {
        let kiln = Err(Refusal::KilnState("/data".into()));
        let cases: [(&[&str], &str, Result<&str, Refusal>); 19] = [
            (&["/imgs"], "/imgs/disk.raw", Ok("/imgs/disk.raw")),
            (&["/imgs"], "/imgs/tiny", Ok("/imgs/tiny")),
            (&["/imgs"], "/imgs/alias/image.json", Ok("/imgs/tiny/image.json")),
            (&["/imgs"], "/imgs/missing.qcow2", Ok("/imgs/missing.qcow2")),
            (&["/imgs"], "/data/images/out/image.json", Ok("/data/images/out/image.json")),
            (&["/imgs"], "/data/pki/ca.key", kiln.clone()),
            (&["/imgs"], "/imgs/key", kiln.clone()),
            (&["/imgs"], "/imgs/rel", kiln.clone()),
            (&["/data"], "/data/pki/ca.key", kiln.clone()),
            (&["/data"], "/data/logs/not-yet", kiln.clone()),
            (&["/"], "/data/db/conf", kiln.clone()),
            (&["/imgs"], "/etc/shadow", Err(Refusal::Outside)),
            (&["/imgs"], "/etc/no-such-file", Err(Refusal::Outside)),
            (&["/imgs"], "/no/such/dir/x", Err(Refusal::Outside)),
            (&["/imgs"], "/imgs/dangling", Err(Refusal::Outside)),
            (&["/imgs"], "/outside/link", Ok("/imgs/disk.raw")),
            (&["/imgs"], "/imgs/../etc/shadow", Err(Refusal::NotPlain)),
            (&["/imgs"], "imgs/disk.raw", Err(Refusal::NotPlain)),
            (&["/real/cache"], "/cache/tiny", Ok("/real/cache/tiny")),
        ];
        let fs = fs();
        for (allowed, path, want) in cases {
            let got = judge(Path::new(path), &roots(allowed), &fs);
            assert_eq!(got, want.map(PathBuf::from), "{path} with {allowed:?}");
        }
    }

    // A symlink loop ends; a missing component's `..` goes back lexically.
    #[test]
    fn would_be_ends_and_appends_what_is_missing() {
        let fs = fs();
        let cases = [
            ("/imgs/loop", "/imgs/loop"),
            ("/imgs/nothing/../disk.raw", "/imgs/disk.raw"),
            ("/imgs/key/more", "/data/pki/ca.key/more"),
            ("/", "/"),
        ];
        for (path, want) in cases {
            assert_eq!(would_be(Path::new(path), &fs), PathBuf::from(want), "{path}");
        }
    }

    // Relative backing names and manifest entries join like QEMU joins them,
    // with `..` only before the first name.
    #[test]
    fn names_join_to_their_directory() {
        let cases = [
            ("disk.qcow2", Some("/imgs/a/disk.qcow2")),
            ("../base/disk.qcow2", Some("/imgs/base/disk.qcow2")),
            ("./sub/disk.qcow2", Some("/imgs/a/sub/disk.qcow2")),
            ("/abs/disk.qcow2", Some("/abs/disk.qcow2")),
            ("sub/../disk.qcow2", None),
            ("/abs/../disk.qcow2", None),
        ];
        for (name, want) in cases {
            assert_eq!(join(Path::new("/imgs/a"), Path::new(name)), want.map(PathBuf::from), "{name}");
        }
    }

    // Only names QEMU opens as plain files pass.
    #[test]
    fn only_plain_names_pass() {
        let cases = [
            ("/imgs/base.qcow2", true),
            ("base.qcow2", true),
            ("../dir:with:colons/base.qcow2", true),
            ("/a:b", true),
            ("json:{\"driver\":\"file\",\"filename\":\"/data/pki/ca.key\"}", false),
            ("nbd://host/export", false),
            ("file:/imgs/base.qcow2", false),
            ("a:b", false),
            ("", false),
        ];
        for (name, want) in cases {
            assert_eq!(plain(name), want, "{name}");
        }
    }
}
