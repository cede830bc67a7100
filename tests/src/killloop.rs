//! The kill loop's parts: writers that keep making complete new versions of files on one side
//! of a share, the record of every version and path they ever made, and the checks that every
//! file visible on either side is one of those versions.
//!
//! Invariants checked (`tests/soak/README.md`):
//! - every regular file outside `.vmsync/` is at a path some writer used and holds, byte for
//!   byte, a version some writer wrote (BLAKE3 of the whole file in the recorded set: a 100 MB
//!   file mixed from two versions has a digest no writer ever wrote);
//! - every directory is one a writer made, with the mode the writer gave it (a directory
//!   visible before its mode is set shows another mode);
//! - nothing else (a symlink, a FIFO, a stray temp under an unknown name) appears.
//!
//! A writer never writes in place: each version is written beside the share (same
//! filesystem) and renamed in, so the writer's own side never shows a torn file either, and a
//! torn file anywhere is vmsync's.

use crate::fixture::random_bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The mode every writer gives its directories (the test sets umask 022, so `mkdir` makes it
/// exactly this in one step).
pub const DIR_MODE: u32 = 0o755;
/// The modes writers give files, in turn.
const FILE_MODES: [u32; 3] = [0o644, 0o600, 0o755];
/// Each small file is 0..=SMALL_MAX_BYTES long.
const SMALL_MAX_BYTES: usize = 48 * 1024;
/// A big file's edit replaces this many bytes at a random offset.
const BIG_EDIT_BYTES: usize = 1 << 20;

/// Every version and path any writer ever made, shared by the writers and the checkers.
#[derive(Default)]
pub struct Known {
    digests: Mutex<HashSet<[u8; 32]>>,
    files: Mutex<HashSet<Vec<u8>>>,
    dirs: Mutex<HashSet<Vec<u8>>>,
    /// Versions written (new files, rewrites, big-file edits).
    pub versions: AtomicU64,
    /// Files whose digest a check computed or found cached.
    pub files_checked: AtomicU64,
}

impl Known {
    fn add_version(&self, digest: [u8; 32]) {
        self.digests.lock().unwrap().insert(digest);
        self.versions.fetch_add(1, Ordering::Relaxed);
    }
    fn add_file(&self, rel: &str) {
        self.files.lock().unwrap().insert(rel.as_bytes().to_vec());
    }
    fn add_dir(&self, rel: &str) {
        self.dirs.lock().unwrap().insert(rel.as_bytes().to_vec());
    }
}

/// What a writer last left at a path: the expected end state of the share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub digest: [u8; 32],
    pub mode: u32,
    pub mtime: (i64, i64),
}

/// One side's writer: owns the paths under `prefix/` in `root` (the other side's writer owns
/// another prefix, so the two never touch the same path and the end state is the union).
pub struct Writer {
    pub root: PathBuf,
    prefix: String,
    /// Beside the share, same filesystem: where versions are written before the rename.
    scratch: PathBuf,
    rng: StdRng,
    seed_base: u64,
    counter: u64,
    known: Arc<Known>,
    pub model: BTreeMap<String, Version>,
    small: Vec<String>,
    big: Vec<(String, Vec<u8>)>,
    dirs: Vec<String>,
    target_files: usize,
}

impl Writer {
    pub fn new(root: &Path, prefix: &str, scratch: PathBuf, seed: u64, known: Arc<Known>) -> Self {
        std::fs::create_dir_all(&scratch).expect("scratch dir");
        Writer {
            root: root.to_path_buf(),
            prefix: prefix.to_string(),
            scratch,
            rng: StdRng::seed_from_u64(seed),
            seed_base: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            counter: 0,
            known,
            model: BTreeMap::new(),
            small: Vec::new(),
            big: Vec::new(),
            dirs: Vec::new(),
            target_files: 0,
        }
    }

    /// `files` small files in a tree of directories, and one big file per size in `big_mib`.
    pub fn populate(&mut self, files: usize, big_mib: &[usize]) {
        self.target_files = files;
        let top = (files / 60).max(1);
        for i in 0..files {
            let dir = format!("{}/d{}/e{}", self.prefix, i % top, i % 3);
            let rel = format!("{dir}/f{i}.dat");
            self.write_small(&rel);
        }
        for (i, mib) in big_mib.iter().enumerate() {
            let rel = format!("{}/big{i}.img", self.prefix);
            let seed = self.next_seed();
            let data = random_bytes(seed, mib << 20);
            self.put(&rel, &data);
            self.big.push((rel, data));
        }
    }

    fn next_seed(&mut self) -> u64 {
        self.counter += 1;
        self.seed_base ^ self.counter.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Makes every missing directory on the way to `rel`'s parent, recording each first.
    fn make_parents(&mut self, rel: &str) {
        let mut at = String::new();
        let parts: Vec<&str> = rel.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            let p = self.root.join(&at);
            if p.is_dir() {
                continue;
            }
            self.known.add_dir(&at);
            match std::fs::DirBuilder::new().mode(DIR_MODE).create(&p) {
                Ok(()) => self.dirs.push(at.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => panic!("mkdir {}: {e}", p.display()),
            }
        }
    }

    /// Writes `data` as the new version of `rel`: recorded, written and synced beside the
    /// share, renamed in.
    fn put(&mut self, rel: &str, data: &[u8]) {
        let digest = *blake3::hash(data).as_bytes();
        self.known.add_version(digest);
        self.known.add_file(rel);
        self.make_parents(rel);
        let mode = FILE_MODES[(self.counter % 3) as usize];
        let tmp = self.scratch.join(format!("v{}", self.counter));
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .expect("scratch file");
            f.write_all(data).expect("write version");
            f.set_permissions(std::fs::Permissions::from_mode(mode))
                .expect("chmod version");
        }
        let dest = self.root.join(rel);
        std::fs::rename(&tmp, &dest).expect("rename version in");
        let meta = std::fs::symlink_metadata(&dest).expect("stat new version");
        self.model.insert(
            rel.to_string(),
            Version {
                digest,
                mode,
                mtime: (meta.mtime(), meta.mtime_nsec()),
            },
        );
    }

    fn write_small(&mut self, rel: &str) {
        let seed = self.next_seed();
        let len = self.rng.random_range(0..=SMALL_MAX_BYTES);
        let data = random_bytes(seed, len);
        self.put(rel, &data);
        if !self.small.iter().any(|s| s == rel) {
            self.small.push(rel.to_string());
        }
    }

    /// One change: a new file (sometimes in a new directory), a rewrite, a rename, a deletion,
    /// or (with probability `big_p`) a 1 MiB edit of a big file.
    pub fn step(&mut self, big_p: f64) {
        if !self.big.is_empty() && self.rng.random_bool(big_p) {
            let i = self.rng.random_range(0..self.big.len());
            let seed = self.next_seed();
            let patch = random_bytes(seed, BIG_EDIT_BYTES);
            let (rel, mut data) = std::mem::take(&mut self.big[i]);
            let at = self.rng.random_range(0..=data.len() - BIG_EDIT_BYTES);
            data[at..at + BIG_EDIT_BYTES].copy_from_slice(&patch);
            self.put(&rel, &data);
            self.big[i] = (rel, data);
            return;
        }
        let roll = self.rng.random_range(0..100);
        let n = self.small.len();
        if n == 0 || roll < 25 || (roll < 35 && n < self.target_files) {
            // A new file, in a new directory one time in five.
            let id = self.next_seed() % 1_000_000_000;
            let dir = if self.dirs.is_empty() || self.rng.random_bool(0.2) {
                format!("{}/n{}", self.prefix, id % 997)
            } else {
                self.dirs[self.rng.random_range(0..self.dirs.len())].clone()
            };
            self.write_small(&format!("{dir}/new{id}.dat"));
        } else if roll < 70 {
            let rel = self.small[self.rng.random_range(0..n)].clone();
            self.write_small(&rel);
        } else if roll < 85 {
            let i = self.rng.random_range(0..n);
            let from = self.small.swap_remove(i);
            let id = self.next_seed() % 1_000_000_000;
            let to = format!("{}/m{}/moved{id}.dat", self.prefix, id % 31);
            self.known.add_file(&to);
            self.make_parents(&to);
            std::fs::rename(self.root.join(&from), self.root.join(&to)).expect("rename");
            let v = self.model.remove(&from).expect("modelled file");
            self.model.insert(to.clone(), v);
            self.small.push(to);
        } else {
            let i = self.rng.random_range(0..n);
            let rel = self.small.swap_remove(i);
            std::fs::remove_file(self.root.join(&rel)).expect("delete");
            self.model.remove(&rel);
        }
    }
}

/// Why a visible entry breaks the invariant, with the evidence.
pub fn describe(side: &str, rel: &[u8], what: &str) -> String {
    format!("{side}: {}: {what}", String::from_utf8_lossy(rel))
}

/// Checks trees against [`Known`]; caches the digests of files already verified (by inode,
/// size, mtime and ctime: vmsync never writes in place, so a changed file is a new inode or a
/// new ctime and is read again).
#[derive(Default)]
pub struct Checker {
    cache: HashMap<FileKey, [u8; 32]>,
}

/// Device, inode, size, mtime and ctime (seconds, nanoseconds) of a file read.
type FileKey = (u64, u64, u64, i64, i64, i64, i64);

impl Checker {
    /// Every entry of `root` (`.vmsync/` left out) against `known`; the violations found.
    pub fn check(&mut self, side: &str, root: &Path, known: &Known) -> Vec<String> {
        let mut bad = Vec::new();
        self.walk(side, root, root, known, &mut bad);
        bad
    }

    fn walk(&mut self, side: &str, root: &Path, dir: &Path, known: &Known, bad: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .as_os_str()
                .as_bytes()
                .to_vec();
            if rel == b".vmsync" {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue; // gone since the listing
            };
            if meta.is_dir() {
                let mode = meta.permissions().mode() & 0o7777;
                if !known.dirs.lock().unwrap().contains(&rel) {
                    bad.push(describe(side, &rel, "a directory no writer made"));
                } else if mode != DIR_MODE {
                    // Read again: a writer's own mkdir is exact, so any other mode is vmsync's.
                    bad.push(describe(
                        side,
                        &rel,
                        &format!("directory at mode {mode:o}, made with {DIR_MODE:o}"),
                    ));
                }
                self.walk(side, root, &path, known, bad);
            } else if meta.is_file() {
                if !known.files.lock().unwrap().contains(&rel) {
                    bad.push(describe(
                        side,
                        &rel,
                        &format!("a file at a path no writer used ({} bytes)", meta.len()),
                    ));
                    continue;
                }
                match self.digest(&path) {
                    Some((digest, len)) => {
                        known.files_checked.fetch_add(1, Ordering::Relaxed);
                        if !known.digests.lock().unwrap().contains(&digest) {
                            bad.push(describe(
                                side,
                                &rel,
                                &format!(
                                    "{len} bytes with BLAKE3 {} is no version any writer wrote",
                                    hex(&digest)
                                ),
                            ));
                        }
                    }
                    None => continue, // replaced or removed since the listing
                }
            } else {
                bad.push(describe(
                    side,
                    &rel,
                    &format!("unexpected file type {:?}", meta.file_type()),
                ));
            }
        }
    }

    /// The file's digest and length, read through one open fd (`None`: it is gone).
    fn digest(&mut self, path: &Path) -> Option<([u8; 32], u64)> {
        let mut f = std::fs::File::open(path).ok()?;
        let m = f.metadata().ok()?;
        let key = (
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        );
        if let Some(d) = self.cache.get(&key) {
            return Some((*d, m.size()));
        }
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut len = 0u64;
        loop {
            let n = f.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            len += n as u64;
        }
        let d = *hasher.finalize().as_bytes();
        self.cache.insert(key, d);
        Some((d, len))
    }
}

pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a tree holds at the end, for the byte-for-byte comparison: files by digest, mode
/// and mtime (to the nanosecond), directories by mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Snap {
    File(Version),
    Dir(u32),
    Other,
}

pub fn snapshot(root: &Path) -> BTreeMap<String, Snap> {
    let mut out = BTreeMap::new();
    snap_walk(root, root, &mut out);
    out
}

fn snap_walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Snap>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .to_string_lossy()
            .into_owned();
        if rel == ".vmsync" {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o7777;
        let snap = if meta.is_dir() {
            snap_walk(root, &path, out);
            Snap::Dir(mode)
        } else if meta.is_file() {
            let data = std::fs::read(&path).unwrap_or_default();
            Snap::File(Version {
                digest: *blake3::hash(&data).as_bytes(),
                mode,
                mtime: (meta.mtime(), meta.mtime_nsec()),
            })
        } else {
            Snap::Other
        };
        out.insert(rel, snap);
    }
}

/// A writer making one change every `pause` on its own thread until [`Running::finish`].
pub struct Running {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Writer>,
}

impl Running {
    pub fn spawn(mut w: Writer, pause: Duration, big_p: f64) -> Running {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                w.step(big_p);
                std::thread::sleep(pause);
            }
            w
        });
        Running { stop, handle }
    }

    /// Stops the writer after its current change and hands it back, with its model.
    pub fn finish(self) -> Writer {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("writer thread")
    }
}
