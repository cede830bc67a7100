//! Shared test fixtures: building trees, describing them for byte-for-byte comparison, a
//! counting `Endpoint` wrapper, and an in-process host/guest pair over local endpoints.

use crate::intercept::{Hooks, Intercept};
use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vmsync_core::endpoint::{ChunkData, EndpointError, MissingChunk, NotStaged, ScanScope};
use vmsync_core::reconcile::{ConflictPolicy, SyncMode};
use vmsync_core::safety::DeletionLimit;
use vmsync_core::{Hash, RelPath};
use vmsync_engine::controller::{Controller, CycleReport, ShareSettings};
use vmsync_engine::filter::Filter;
use vmsync_engine::local::LocalEndpoint;
use vmsync_engine::state::StateDb;

/// What a path is, for comparing trees: kind, content (or link target), permission bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File { data: Vec<u8>, mode: u32 },
    Dir { mode: u32 },
    Symlink(Vec<u8>),
    Other,
}

/// Every entry under `root` except the reserved `.vmsync`, keyed by relative path bytes.
pub fn tree(root: &Path) -> BTreeMap<Vec<u8>, Node> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<Vec<u8>, Node>) {
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
            continue;
        };
        let mode = meta.permissions().mode() & 0o7777;
        let node = if meta.file_type().is_symlink() {
            Node::Symlink(
                std::fs::read_link(&path)
                    .map(|t| t.as_os_str().as_bytes().to_vec())
                    .unwrap_or_default(),
            )
        } else if meta.is_dir() {
            walk(root, &path, out);
            Node::Dir { mode }
        } else if meta.is_file() {
            Node::File {
                data: std::fs::read(&path).unwrap_or_default(),
                mode,
            }
        } else {
            Node::Other
        };
        out.insert(rel, node);
    }
}

/// Asserts two trees are identical, naming the first few differences.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let (ta, tb) = (tree(a), tree(b));
    if ta == tb {
        return;
    }
    let mut diffs = Vec::new();
    for k in ta.keys().chain(tb.keys()) {
        if ta.get(k) != tb.get(k) && diffs.len() < 10 {
            let show = |n: Option<&Node>| match n {
                Some(Node::File { data, mode }) => {
                    format!("file {} bytes mode {mode:o}", data.len())
                }
                other => format!("{other:?}"),
            };
            diffs.push(format!(
                "{}: {} vs {}",
                String::from_utf8_lossy(k),
                show(ta.get(k)),
                show(tb.get(k))
            ));
        }
    }
    diffs.dedup();
    panic!("trees differ:\n  {}", diffs.join("\n  "));
}

/// Writes `data` at `root/rel`, creating parent directories.
pub fn write(root: &Path, rel: &str, data: impl AsRef<[u8]>) {
    let p = root.join(rel);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).expect("create parent dirs");
    }
    std::fs::write(&p, data).expect("write file");
}

pub fn read(root: &Path, rel: &str) -> Vec<u8> {
    std::fs::read(root.join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Deterministic pseudo-random bytes (the workspace's one test noise generator).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    vmsync_core::testing::noise(len, seed)
}

/// Sets a file's mtime (seconds and nanoseconds since the epoch).
pub fn set_mtime(path: &Path, secs: i64, nanos: u32) {
    let t = std::time::UNIX_EPOCH + std::time::Duration::new(secs as u64, nanos);
    let f = std::fs::File::options()
        .write(true)
        .open(path)
        .expect("open for mtime");
    f.set_modified(t).expect("set mtime");
}

pub fn mtime_ns(path: &Path) -> (i64, i64) {
    let m = std::fs::symlink_metadata(path).expect("stat");
    (m.mtime(), m.mtime_nsec())
}

/// Counts the chunk bytes that an endpoint is asked to store (`supply`) or serve
/// (`read_chunks`, `read_deltas`): the content that would cross the wire (a delta counts its
/// own length, not its chunk's), and the signature bytes of the delta bases it offers
/// (`stage`), which would cross the other way.
#[derive(Clone, Default)]
pub struct Counters {
    pub supplied: Arc<AtomicU64>,
    pub served: Arc<AtomicU64>,
    pub signatures: Arc<AtomicU64>,
    /// Chunks supplied as deltas.
    pub deltas: Arc<AtomicU64>,
    /// While set, `mark` fails as if the connection dropped (the rest goes through).
    pub refuse_marks: Arc<std::sync::atomic::AtomicBool>,
}

impl Counters {
    pub fn supplied(&self) -> u64 {
        self.supplied.load(Ordering::Relaxed)
    }
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
    pub fn signatures(&self) -> u64 {
        self.signatures.load(Ordering::Relaxed)
    }
    pub fn deltas(&self) -> u64 {
        self.deltas.load(Ordering::Relaxed)
    }
    pub fn reset(&self) {
        self.supplied.store(0, Ordering::Relaxed);
        self.served.store(0, Ordering::Relaxed);
        self.signatures.store(0, Ordering::Relaxed);
        self.deltas.store(0, Ordering::Relaxed);
    }
}

/// An `Endpoint` that forwards to `E` and counts chunk bytes.
pub type Counting<E> = Intercept<E, Counters>;

impl Hooks for Counters {
    fn chunks_read(&mut self, chunks: Vec<Option<Vec<u8>>>) -> Vec<Option<Vec<u8>>> {
        let n: usize = chunks.iter().flatten().map(Vec::len).sum();
        self.served.fetch_add(n as u64, Ordering::Relaxed);
        chunks
    }
    fn deltas_read(&mut self, chunks: Vec<Option<ChunkData>>) -> Vec<Option<ChunkData>> {
        let n: usize = chunks.iter().flatten().map(ChunkData::len).sum();
        self.served.fetch_add(n as u64, Ordering::Relaxed);
        chunks
    }
    fn staged(&mut self, answers: &[Result<Vec<MissingChunk>, NotStaged>]) {
        let n: usize = answers
            .iter()
            .flatten()
            .flatten()
            .filter_map(|m| m.base.as_ref())
            .map(Vec::len)
            .sum();
        self.signatures.fetch_add(n as u64, Ordering::Relaxed);
    }
    fn supply(&mut self, chunks: &[(Hash, ChunkData)]) {
        let n: usize = chunks.iter().map(|c| c.1.len()).sum();
        let deltas = chunks
            .iter()
            .filter(|c| matches!(c.1, ChunkData::Delta(_)))
            .count();
        self.supplied.fetch_add(n as u64, Ordering::Relaxed);
        self.deltas.fetch_add(deltas as u64, Ordering::Relaxed);
    }
    fn mark(&mut self, _generation: u64) -> Option<EndpointError> {
        self.refuse_marks
            .load(Ordering::Relaxed)
            .then(|| EndpointError::Disconnected("mark refused by the test".into()))
    }
}

/// Settings for an in-process pair.
#[derive(Clone)]
pub struct PairOptions {
    pub mode: SyncMode,
    pub policy: ConflictPolicy,
    pub ignore: Vec<String>,
    /// Both sides also honour the tree's `.gitignore` and `.ignore` files.
    pub respect_gitignore: bool,
    pub deletion_limit: DeletionLimit,
    /// Patterns whose deletions never count toward `deletion_limit` (default: none).
    pub deletion_exempt: Vec<String>,
}

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions {
            mode: SyncMode::TwoWay,
            policy: ConflictPolicy::Keep,
            ignore: Vec::new(),
            respect_gitignore: false,
            deletion_limit: DeletionLimit::default(),
            deletion_exempt: Vec::new(),
        }
    }
}

/// Share `s` between `dir/host` and `dir/guest` (both must exist), each side with its own
/// state database (`dir/host-state`, `dir/guest-state`) like the two agents, and the host's
/// controller: what a [`Pair`] and the tests that wrap the endpoints their own way start from.
pub fn local_pair(dir: &Path, options: &PairOptions) -> (LocalEndpoint, LocalEndpoint, Controller) {
    let host_state = dir.join("host-state");
    let host_db = Arc::new(StateDb::open(&host_state, "host.redb").expect("host db"));
    let guest_db =
        Arc::new(StateDb::open(&dir.join("guest-state"), "guest.redb").expect("guest db"));
    let filter = Filter::new(&options.ignore)
        .expect("filter")
        .with_gitignore(options.respect_gitignore);
    let host = LocalEndpoint::new("s", dir.join("host"), filter.clone(), host_db.clone())
        .expect("host endpoint");
    let guest = LocalEndpoint::new("s", dir.join("guest"), filter.clone(), guest_db)
        .expect("guest endpoint");
    let settings = ShareSettings {
        name: "s".into(),
        mode: options.mode,
        policy: options.policy,
        filter,
        deletion_limit: options.deletion_limit,
        deletion_exempt: Filter::new(&options.deletion_exempt).expect("exempt patterns"),
    };
    let controller = Controller::new(settings, host_db, &host_state).expect("controller");
    (host, guest, controller)
}

/// The live half of a [`Pair`]: both endpoints and the controller (dropped on restart).
pub struct Sides {
    pub host: Counting<LocalEndpoint>,
    pub guest: Counting<LocalEndpoint>,
    pub controller: Controller,
}

/// A host directory and a guest directory synced in-process by a real `Controller` over two
/// `LocalEndpoint`s, each side with its own state database, like the two agents.
pub struct Pair {
    pub tmp: tempfile::TempDir,
    pub host_dir: PathBuf,
    pub guest_dir: PathBuf,
    pub host_state: PathBuf,
    pub guest_state: PathBuf,
    pub options: PairOptions,
    sides: Option<Sides>,
    /// Counters survive restarts.
    pub host_counters: Counters,
    pub guest_counters: Counters,
}

impl Pair {
    pub fn new(options: PairOptions) -> Pair {
        let tmp = tempfile::tempdir().expect("tempdir");
        let host_dir = tmp.path().join("host");
        let guest_dir = tmp.path().join("guest");
        std::fs::create_dir_all(&host_dir).expect("mkdir host");
        std::fs::create_dir_all(&guest_dir).expect("mkdir guest");
        let mut pair = Pair {
            host_state: tmp.path().join("host-state"),
            guest_state: tmp.path().join("guest-state"),
            tmp,
            host_dir,
            guest_dir,
            options,
            sides: None,
            host_counters: Counters::default(),
            guest_counters: Counters::default(),
        };
        pair.sides = Some(pair.open());
        pair
    }

    fn open(&self) -> Sides {
        let (host, guest, controller) = local_pair(self.tmp.path(), &self.options);
        Sides {
            host: Intercept {
                inner: host,
                hooks: self.host_counters.clone(),
            },
            guest: Intercept {
                inner: guest,
                hooks: self.guest_counters.clone(),
            },
            controller,
        }
    }

    pub fn sides(&mut self) -> &mut Sides {
        self.sides.as_mut().expect("pair is open")
    }

    /// Drops and reopens both sides and the controller, as an agent restart does.
    pub fn restart(&mut self) {
        // Drop first: redb allows one opener per database file.
        self.sides = None;
        self.sides = Some(self.open());
    }

    /// One full cycle.
    pub async fn cycle(&mut self) -> CycleReport {
        let s = self.sides();
        s.controller
            .cycle(&mut s.host, &mut s.guest, ScanScope::Full)
            .await
            .expect("cycle")
    }

    /// One targeted cycle over `paths` (relative, `""` for the root), as live hints trigger.
    pub async fn cycle_paths(&mut self, paths: &[&str]) -> CycleReport {
        let scope = ScanScope::Paths(
            paths
                .iter()
                .map(|p| RelPath::from_bytes(p.as_bytes()).expect("valid path"))
                .collect(),
        );
        let s = self.sides();
        s.controller
            .cycle(&mut s.host, &mut s.guest, scope)
            .await
            .expect("cycle")
    }

    /// Cycles until nothing is left to retry (at most a few times).
    pub async fn sync(&mut self) -> CycleReport {
        let mut report = self.cycle().await;
        for _ in 0..3 {
            if !report.retry {
                break;
            }
            report = self.cycle().await;
        }
        report
    }

    pub fn status(&mut self) -> vmsync_engine::status::ShareStatus {
        self.sides()
            .controller
            .status()
            .lock()
            .expect("status lock")
            .clone()
    }

    /// Files kept in the host's trash, as (`<batch>/<relative path>`, content), by batch
    /// name (that is, by time).
    pub fn host_trash(&self) -> Vec<(String, Vec<u8>)> {
        trash_files(&self.host_dir)
    }

    /// Files kept in the guest's trash, as [`Pair::host_trash`].
    pub fn guest_trash(&self) -> Vec<(String, Vec<u8>)> {
        trash_files(&self.guest_dir)
    }
}

/// [`tree`] without the entries at or beneath any of `skip` (relative paths such as `.git`):
/// for comparing a share with its replica when one side holds something the share ignores.
pub fn tree_except(root: &Path, skip: &[&str]) -> BTreeMap<Vec<u8>, Node> {
    let mut out = tree(root);
    out.retain(|rel, _| {
        !skip.iter().any(|s| {
            let s = s.as_bytes();
            rel.as_slice() == s || (rel.starts_with(s) && rel.get(s.len()) == Some(&b'/'))
        })
    });
    out
}

/// The first `limit` differences between two tree descriptions, one line each
/// (`path: left vs right`), for failure messages.
pub fn tree_diff(
    a: &BTreeMap<Vec<u8>, Node>,
    b: &BTreeMap<Vec<u8>, Node>,
    limit: usize,
) -> Vec<String> {
    let show = |n: Option<&Node>| match n {
        Some(Node::File { data, mode }) => format!("file {} bytes mode {mode:o}", data.len()),
        other => format!("{other:?}"),
    };
    let keys: std::collections::BTreeSet<&Vec<u8>> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .take(limit)
        .map(|k| {
            format!(
                "{}: {} vs {}",
                String::from_utf8_lossy(k),
                show(a.get(k)),
                show(b.get(k))
            )
        })
        .collect()
}

/// Deterministic text-like bytes: words from a small vocabulary, spaces and line breaks. It
/// compresses a few times over, like source code, so tests see zstd at work on whole chunks.
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&[u8]; 16] = [
        b"fn",
        b"let",
        b"mut",
        b"self",
        b"return",
        b"match",
        b"impl",
        b"struct",
        b"value",
        b"index",
        b"buffer",
        b"length",
        b"offset",
        b"chunk",
        b"delta",
        b"signature",
    ];
    let noise = random_bytes(seed, len / 2 + 16);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        let r = noise[i % noise.len()];
        i += 1;
        out.extend_from_slice(WORDS[usize::from(r & 15)]);
        out.push(if r >> 4 == 0 { b'\n' } else { b' ' });
    }
    out.truncate(len);
    out
}

/// Writes 256 random bytes over `root/rel` at `offset` (clamped to fit), in place.
pub fn patch_in_place(root: &Path, rel: &str, seed: u64, offset: usize) {
    use std::io::{Seek, SeekFrom, Write};
    let path = root.join(rel);
    let size = std::fs::metadata(&path).expect("stat").len() as usize;
    let patch = random_bytes(seed, 256.min(size));
    let at = offset.min(size - patch.len());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open for patch");
    f.seek(SeekFrom::Start(at as u64)).expect("seek");
    f.write_all(&patch).expect("patch");
}

/// The bytes of the chunks of `new` that `old` does not have: what crosses whole when every
/// changed chunk is sent whole.
pub fn changed_chunk_bytes(old: &[u8], new: &[u8]) -> u64 {
    let cut = |d: &[u8]| vmsync_engine::chunk::chunk_reader(d).expect("chunk");
    let old: std::collections::HashSet<Hash> = cut(old).into_iter().map(|c| c.hash).collect();
    cut(new)
        .into_iter()
        .filter(|c| !old.contains(&c.hash))
        .map(|c| u64::from(c.len))
        .sum()
}

/// Regular files in the trash of the share at `root` (`.vmsync/trash/<batch>/<path>`), as
/// (`<batch>/<path>`, content), sorted (batches sort by time).
pub fn trash_files(root: &Path) -> Vec<(String, Vec<u8>)> {
    let dir = root.join(".vmsync/trash");
    let mut out = Vec::new();
    for batch in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        for (rel, node) in tree(&batch.path()) {
            if let Node::File { data, .. } = node {
                let name = batch.file_name().to_string_lossy().into_owned();
                out.push((format!("{name}/{}", String::from_utf8_lossy(&rel)), data));
            }
        }
    }
    out.sort();
    out
}

/// The mtime (seconds, nanoseconds; `lstat`, never following a symlink) of every entry under
/// `root` except the reserved `.vmsync` and the root itself, keyed by relative path.
pub fn times(root: &Path) -> BTreeMap<String, (i64, i64)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (i64, i64)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap_or(&path);
            if rel.as_os_str() == ".vmsync" {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                walk(root, &path, out);
            }
            out.insert(
                rel.to_string_lossy().into_owned(),
                (meta.mtime(), meta.mtime_nsec()),
            );
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The paths whose mtimes differ between two trees (or exist in one only), at most `max`.
pub fn time_differences(a: &Path, b: &Path, max: usize) -> Vec<String> {
    let (ta, tb) = (times(a), times(b));
    let keys: std::collections::BTreeSet<&String> = ta.keys().chain(tb.keys()).collect();
    keys.into_iter()
        .filter(|k| ta.get(*k) != tb.get(*k))
        .take(max)
        .map(|k| format!("{k}: {:?} vs {:?}", ta.get(k), tb.get(k)))
        .collect()
}

/// What `rsync -ani --delete` (plus `extra` flags, e.g. `-c`, `-H`) would change to make `dst`
/// equal `src`: its itemized lines, the reserved `.vmsync` excluded, and without the line for
/// the share root itself (whose own mtime is not synced). Empty when the trees are identical
/// in content, kinds, modes, times and link targets.
pub fn rsync_differences(src: &Path, dst: &Path, extra: &[&str]) -> Vec<String> {
    let out = std::process::Command::new("rsync")
        .arg("-ani")
        .args(extra)
        .args(["--delete", "--exclude=/.vmsync/"])
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", dst.display()))
        .output()
        .expect("run rsync (install it: apt-get install rsync)");
    assert!(
        out.status.success(),
        "rsync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty() && !l.ends_with(" ./"))
        .map(str::to_owned)
        .collect()
}

/// `cp -a` keeps mtimes and modes, as a disk snapshot does.
pub fn copy_contents(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .output()
        .expect("run cp");
    assert!(
        out.status.success(),
        "cp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Empties `dir` but keeps the directory itself (a revert restores the share root's inode).
pub fn empty(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if entry.file_type().unwrap().is_dir() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    }
}
