//! Scanning: walks a share (or given paths within it) through [`crate::root`] and produces the
//! entries sync sees, hashing only files whose identity changed since the index last saw them.
//! Hashing runs on a few threads; the walk itself is one thread of cheap `fstatat` calls.
//!
//! A file is reported only from a consistent read (HOSTILE rule 20): its identity must be the
//! same before and after chunking, else it is retried a few times and then reported as a
//! problem for a later cycle, never sent torn.

use crate::chunk::chunk_reader;
use crate::filter::Filter;
use crate::index::{FileIndex, Identity, IndexRecord};
use crate::root::{symlink_target_is_contained, DirHandle, FileKind, FsError, ShareRoot, Stat};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use vmsync_core::endpoint::{Problem, ScanScope};
use vmsync_core::entry::PERM_MASK;
use vmsync_core::{Entry, FileMeta, Manifest, RelPath, Timestamp};

/// Attempts at a consistent read of a file that changes while we hash it.
const HASH_ATTEMPTS: usize = 3;
/// Hashing threads at most (the disk, not the CPU, is usually the limit beyond this).
const MAX_HASH_THREADS: usize = 4;

/// What a scan found.
#[derive(Debug, Default)]
pub struct ScanOutput {
    /// Every syncable, non-ignored entry in scope, sorted by path.
    pub entries: Vec<(RelPath, Entry)>,
    pub problems: Vec<Problem>,
    /// Files hashed in this scan: index records to insert.
    pub hashed: Vec<(RelPath, IndexRecord)>,
    /// Indexed files in scope that are no longer regular files there: records to remove.
    pub gone: Vec<RelPath>,
}

struct HashJob {
    path: RelPath,
}

/// Scans `scope`. Fails only if the scope's starting points cannot be read at all.
pub fn scan(
    root: &ShareRoot,
    filter: &Filter,
    index: &FileIndex,
    scope: &ScanScope,
) -> Result<ScanOutput, FsError> {
    let mut walk = Walk {
        root,
        filter,
        index,
        out: ScanOutput::default(),
        jobs: Vec::new(),
    };
    match scope {
        ScanScope::Full => {
            let dir = root.open_dir(&RelPath::root())?;
            walk.dir(dir, RelPath::root());
        }
        ScanScope::Paths(paths) => {
            for path in paths {
                walk.path(root, path);
            }
        }
    }
    let Walk { mut out, jobs, .. } = walk;
    hash_all(root, jobs, &mut out);

    out.entries.sort_by(|a, b| a.0.cmp(&b.0));
    out.entries.dedup_by(|a, b| a.0 == b.0);
    out.gone = gone_paths(index, scope, &out.entries);
    Ok(out)
}

struct Walk<'a> {
    root: &'a ShareRoot,
    filter: &'a Filter,
    index: &'a FileIndex,
    out: ScanOutput,
    jobs: Vec<HashJob>,
}

impl Walk<'_> {
    /// One scope path: whatever it is, and everything beneath it if it is a directory.
    fn path(&mut self, root: &ShareRoot, path: &RelPath) {
        if path.is_root() {
            match root.open_dir(path) {
                Ok(dir) => self.dir(dir, RelPath::root()),
                Err(e) => self.problem(path, format!("cannot read: {e}")),
            }
            return;
        }
        let stat = match root.stat(path) {
            Ok(Some(stat)) => stat,
            Ok(None) => return,
            Err(e) => return self.problem(path, format!("cannot stat: {e}")),
        };
        if self.filter.is_ignored(path, stat.kind == FileKind::Dir) {
            return;
        }
        match stat.kind {
            FileKind::Dir => match root.open_dir(path) {
                Ok(dir) => {
                    self.out.entries.push((
                        path.clone(),
                        Entry::Dir {
                            mode: stat.mode & PERM_MASK,
                        },
                    ));
                    self.dir(dir, path.clone());
                }
                Err(e) => self.problem(path, format!("cannot open directory: {e}")),
            },
            FileKind::Symlink => match root.read_link(path) {
                Ok(target) => self.symlink(path, target),
                Err(e) => self.problem(path, format!("cannot read symlink: {e}")),
            },
            FileKind::File => self.file(path.clone(), stat),
            FileKind::Other => self.special(path),
        }
    }

    /// Everything beneath `dir` (already reported itself), depth first. Subdirectories wait
    /// on the stack as paths and are opened when their turn comes, so a wide tree never holds
    /// more than one directory fd open.
    fn dir(&mut self, dir: DirHandle, path: RelPath) {
        let mut stack: Vec<RelPath> = Vec::new();
        self.list(&dir, &path, &mut stack);
        drop(dir);
        while let Some(dir_path) = stack.pop() {
            match self.root.open_dir(&dir_path) {
                Ok(dir) => self.list(&dir, &dir_path, &mut stack),
                Err(e) => self.problem(&dir_path, format!("cannot open directory: {e}")),
            }
        }
    }

    /// Reports one directory's entries; pushes its subdirectories onto `stack`.
    fn list(&mut self, dir: &DirHandle, dir_path: &RelPath, stack: &mut Vec<RelPath>) {
        let entries = match dir.entries() {
            Ok(e) => e,
            Err(e) => return self.problem(dir_path, format!("cannot list directory: {e}")),
        };
        for (name, stat) in entries {
            let path = match dir_path.join(&name) {
                Ok(p) => p,
                Err(e) => {
                    let shown = vmsync_core::path::escape_bytes(&name);
                    self.problem(dir_path, format!("entry `{shown}` skipped: {e}"));
                    continue;
                }
            };
            if self.filter.is_ignored(&path, stat.kind == FileKind::Dir) {
                continue;
            }
            match stat.kind {
                FileKind::Dir => {
                    self.out.entries.push((
                        path.clone(),
                        Entry::Dir {
                            mode: stat.mode & PERM_MASK,
                        },
                    ));
                    stack.push(path);
                }
                FileKind::Symlink => match dir.read_link(&name) {
                    Ok(target) => self.symlink(&path, target),
                    Err(e) => self.problem(&path, format!("cannot read symlink: {e}")),
                },
                FileKind::File => self.file(path, stat),
                FileKind::Other => self.special(&path),
            }
        }
    }

    fn file(&mut self, path: RelPath, stat: Stat) {
        if let Some(rec) = self.index.get(&path) {
            if rec.identity == Identity::of(&stat) {
                let meta = FileMeta {
                    mode: stat.mode & PERM_MASK,
                    ..rec.meta
                };
                self.out.entries.push((path, Entry::File(meta)));
                return;
            }
        }
        self.jobs.push(HashJob { path });
    }

    fn symlink(&mut self, path: &RelPath, target: Vec<u8>) {
        if symlink_target_is_contained(path, &target) {
            self.out
                .entries
                .push((path.clone(), Entry::Symlink { target }));
        } else {
            self.problem(
                path,
                "symlink is absolute or points outside the share; not synced".into(),
            );
        }
    }

    fn special(&mut self, path: &RelPath) {
        self.problem(
            path,
            "not a regular file, directory or symlink (fifo, socket or device); not synced".into(),
        );
    }

    fn problem(&mut self, path: &RelPath, reason: String) {
        self.out.problems.push(Problem {
            path: path.clone(),
            reason,
        });
    }
}

/// Hashes every job on a few threads, adding entries, index records and problems to `out`.
fn hash_all(root: &ShareRoot, jobs: Vec<HashJob>, out: &mut ScanOutput) {
    if jobs.is_empty() {
        return;
    }
    let threads = hash_threads().min(jobs.len());
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(jobs.len()));
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(job) = jobs.get(i) else { break };
        let result = hash_file(root, &job.path);
        if let Ok(mut r) = results.lock() {
            r.push((job.path.clone(), result));
        }
    };
    // The calling thread is one of the workers: a live edit's single file is hashed with no
    // thread to start (that costs more than hashing a small file).
    std::thread::scope(|s| {
        for _ in 1..threads {
            s.spawn(work);
        }
        work();
    });
    let results = results
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for (path, result) in results {
        match result {
            Ok(record) => {
                out.entries.push((path.clone(), Entry::File(record.meta)));
                out.hashed.push((path, record));
            }
            Err(reason) => out.problems.push(Problem { path, reason }),
        }
    }
}

/// Threads that hash, at most: the machine's parallelism (looked up once: it reads cgroup
/// files) up to [`MAX_HASH_THREADS`].
fn hash_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, MAX_HASH_THREADS)
    })
}

/// Reads and chunks one file, insisting on a consistent read.
pub fn hash_file(root: &ShareRoot, path: &RelPath) -> Result<IndexRecord, String> {
    for _ in 0..HASH_ATTEMPTS {
        let (file, before) = root
            .open_file(path)
            .map_err(|e| format!("cannot open: {e}"))?;
        let before_id = Identity::of(&before);
        let chunks = chunk_reader(&file).map_err(|e| format!("cannot read: {e}"))?;
        let after = file.metadata().map_err(|e| format!("cannot stat: {e}"))?;
        let manifest = Manifest { chunks };
        if before_id == identity_of_metadata(&after, before.dev) && manifest.size() == before.size {
            let meta = FileMeta {
                size: before.size,
                mode: before.mode & PERM_MASK,
                mtime: before.mtime,
                digest: manifest.digest(),
            };
            return Ok(IndexRecord::new(before_id, meta, &manifest));
        }
    }
    Err("file kept changing while it was read; it will be retried".into())
}

fn identity_of_metadata(m: &std::fs::Metadata, dev: u64) -> Identity {
    Identity {
        dev,
        ino: m.ino(),
        size: m.size(),
        mtime: Timestamp::new(m.mtime(), u32::try_from(m.mtime_nsec()).unwrap_or(0)),
        ctime: Timestamp::new(m.ctime(), u32::try_from(m.ctime_nsec()).unwrap_or(0)),
    }
}

/// Indexed files within `scope` that the scan did not find as regular files.
fn gone_paths(index: &FileIndex, scope: &ScanScope, entries: &[(RelPath, Entry)]) -> Vec<RelPath> {
    let in_scope = |p: &RelPath| match scope {
        ScanScope::Full => true,
        ScanScope::Paths(paths) => paths.iter().any(|s| s == p || s.is_ancestor_of(p)),
    };
    let mut gone: Vec<RelPath> = index
        .paths()
        .filter(|p| in_scope(p))
        .filter(|p| {
            entries
                .binary_search_by(|(q, _)| q.cmp(p))
                .map_or(true, |i| entries[i].1.as_file().is_none())
        })
        .cloned()
        .collect();
    gone.sort();
    gone
}
