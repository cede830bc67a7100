//! Scanning: walks a share (or given paths within it) through [`crate::root`] and produces the
//! entries sync sees, hashing only files whose identity changed since the index last saw them.
//! Hashing runs on a few threads; the walk itself is one thread of cheap `fstatat` calls.
//!
//! A file is reported only from a consistent read (security.md rule 20): its identity must be the
//! same before and after chunking, else it is retried a few times and then reported as a
//! problem for a later cycle, never sent torn.
//!
//! With `respect_gitignore`, each directory's `.gitignore` and `.ignore` are read as the walk
//! enters it (see [`crate::gitignore`]), and what they exclude is neither descended into nor
//! reported as an entry, but listed in [`ScanOutput::ignored`]. A targeted scan of `a/b/c`
//! reads the rules of the root, `a` and `a/b` first, so it decides exactly as a full scan
//! would: an ignored `a` or `a/b` is listed (and nothing beneath it scanned) whether or not
//! `a/b/c` exists. Every scan looks at the ignore files again (a compiled file is reused only
//! while its identity is unchanged, see [`RulesCache`]), so an edited one takes effect at the
//! next scan of its directory.

use crate::chunk::chunk_reader_then;
use crate::faults::{self, Moment};
use crate::filter::Filter;
use crate::gitignore::{read_dir_rules, Rules, RulesCache};
use crate::index::{Identity, IndexReader, IndexRecord};
use crate::root::{
    symlink_target_is_contained, DirHandle, FileKind, FsError, FsErrorKind, ShareRoot, Stat,
};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use vmsync_core::endpoint::{Problem, ScanScope};
use vmsync_core::entry::PERM_MASK;
use vmsync_core::limits::MAX_SCAN_IGNORED;
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
    /// What the tree's ignore files exclude (see `ScanReport::ignored`): sorted, none beneath
    /// another, at most [`MAX_SCAN_IGNORED`].
    pub ignored: Vec<RelPath>,
    /// The directories among `ignored` (not those a coarsened list stands in for): nothing
    /// beneath them can sync until the rules above them change.
    pub ignored_dirs: Vec<RelPath>,
    /// The regular files in scope with more than one link, and their inode (see
    /// [`crate::links`]).
    pub linked: Vec<(RelPath, crate::links::Inode)>,
}

struct HashJob {
    path: RelPath,
}

/// Scans `scope`. Fails only if the scope's starting points cannot be read at all. `rules`
/// keeps the tree's compiled ignore files from one scan to the next.
pub fn scan(
    root: &ShareRoot,
    filter: &Filter,
    index: &IndexReader,
    rules: &RulesCache,
    scope: &ScanScope,
) -> Result<ScanOutput, FsError> {
    let mut walk = Walk {
        root,
        filter,
        gitignore: filter.respects_gitignore(),
        rules,
        index,
        out: ScanOutput::default(),
        jobs: Vec::new(),
        above: HashMap::new(),
    };
    match scope {
        ScanScope::Full => {
            let dir = root.open_dir(&RelPath::root())?;
            walk.dir(dir, RelPath::root(), Rules::default());
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
    let (ignored, coarsened) = bound_ignored(std::mem::take(&mut out.ignored), MAX_SCAN_IGNORED);
    out.ignored = ignored;
    out.ignored_dirs.sort();
    out.ignored_dirs.dedup();
    out.ignored_dirs
        .retain(|d| out.ignored.binary_search(d).is_ok());
    if let Some(problem) = coarsened {
        tracing::warn!("{}: {}", problem.path.escaped(), problem.reason);
        out.problems.push(problem);
    }
    Ok(out)
}

struct Walk<'a> {
    root: &'a ShareRoot,
    filter: &'a Filter,
    /// Honour the tree's ignore files.
    gitignore: bool,
    rules: &'a RulesCache,
    index: &'a IndexReader,
    out: ScanOutput,
    jobs: Vec<HashJob>,
    /// For targeted scans: what the directories above the scope paths turned out to be.
    above: HashMap<RelPath, Above>,
}

/// A directory above a targeted scan's path, as far as ignore rules go.
#[derive(Clone)]
enum Above {
    /// It can be entered; these rules are in force inside it.
    Rules(Rules),
    /// Nothing beneath it is scanned: it is ignored, or its ignore files are unusable (both
    /// already reported), or it does not exist (nothing to report).
    Covered,
}

impl Walk<'_> {
    /// One scope path: whatever it is, and everything beneath it if it is a directory.
    fn path(&mut self, root: &ShareRoot, path: &RelPath) {
        if path.is_root() {
            match root.open_dir(path) {
                Ok(dir) => self.dir(dir, RelPath::root(), Rules::default()),
                Err(e) => self.problem(path, format!("cannot read: {e}")),
            }
            return;
        }
        let rules = match path.parent() {
            Some(parent) if self.gitignore => match self.rules_above(&parent) {
                Ok(Above::Rules(rules)) => rules,
                Ok(Above::Covered) => return,
                Err(reason) => return self.problem(path, reason),
            },
            _ => Rules::default(),
        };
        if let Some(parent) = path.parent().filter(|p| !p.is_root()) {
            self.parent_dir(root, parent);
        }
        let stat = match root.stat(path) {
            Ok(Some(stat)) => stat,
            Ok(None) => return,
            Err(e) => return self.problem(path, format!("cannot stat: {e}")),
        };
        let is_dir = stat.kind == FileKind::Dir;
        if self.filter.is_ignored(path, is_dir) {
            return;
        }
        if rules.is_ignored(path, is_dir) {
            self.ignored(path.clone(), is_dir);
            return;
        }
        match stat.kind {
            FileKind::Dir => match root.open_dir(path) {
                Ok(dir) => {
                    self.out.entries.push((
                        path.clone(),
                        Entry::Dir {
                            mode: stat.mode & PERM_MASK,
                            mtime: stat.mtime,
                        },
                    ));
                    self.dir(dir, path.clone(), rules);
                }
                Err(e) => self.problem(path, format!("cannot open directory: {e}")),
            },
            FileKind::Symlink => match root.read_link(path) {
                Ok(target) => self.symlink(path, target, stat.mtime),
                Err(e) => self.problem(path, format!("cannot read symlink: {e}")),
            },
            FileKind::File => self.file(path.clone(), stat),
            FileKind::Other => self.special(path),
        }
    }

    /// A targeted scan also reports the directory its path is in, on its own (not what else
    /// it holds): a change at the path moved that directory's mtime, which must travel too.
    /// The controller reconciles such a directory only as a directory on both sides.
    fn parent_dir(&mut self, root: &ShareRoot, parent: RelPath) {
        if self.out.entries.last().is_some_and(|(p, _)| *p == parent)
            || self.filter.is_ignored(&parent, true)
        {
            return;
        }
        if let Ok(Some(stat)) = root.stat(&parent) {
            if stat.kind == FileKind::Dir {
                self.out.entries.push((
                    parent,
                    Entry::Dir {
                        mode: stat.mode & PERM_MASK,
                        mtime: stat.mtime,
                    },
                ));
            }
        }
    }

    /// The ignore rules in force inside `dir`, an ancestor of a targeted scan's path: the
    /// rules of every directory from the root down to it, each read once per scan. `Covered`
    /// when `dir` or a directory above it is ignored (listed as such) or has unusable ignore
    /// files (listed as a problem), or does not exist. `Err` when `dir` cannot be read (the
    /// reason, for a problem on the scan's path).
    fn rules_above(&mut self, dir: &RelPath) -> Result<Above, String> {
        let mut chain: Vec<RelPath> = dir.ancestors().collect();
        chain.reverse();
        chain.push(dir.clone());
        let mut outer = Rules::default();
        for d in chain {
            let here = match self.above.get(&d) {
                Some(known) => known.clone(),
                None => {
                    let found = self.enter(&d, &outer)?;
                    self.above.insert(d, found.clone());
                    found
                }
            };
            match here {
                Above::Rules(rules) => outer = rules,
                Above::Covered => return Ok(Above::Covered),
            }
        }
        Ok(Above::Rules(outer))
    }

    /// What the directory `dir` is for a targeted scan below it; `outer`: the rules in force
    /// in its parent.
    fn enter(&mut self, dir: &RelPath, outer: &Rules) -> Result<Above, String> {
        // As a full scan would see it: only what exists is ignored, a directory as one.
        let (handle, is_dir) = match self.root.open_dir(dir) {
            Ok(h) => (Some(h), true),
            Err(e) if e.kind() == FsErrorKind::NotFound => return Ok(Above::Covered),
            // Something else is there (the path below it cannot exist), maybe ignored itself.
            Err(e) if e.kind() == FsErrorKind::NotADirectory => (None, false),
            Err(e) => return Err(format!("cannot read the ignore files above it: {e}")),
        };
        if self.filter.is_ignored(dir, is_dir) {
            return Ok(Above::Covered);
        }
        if outer.is_ignored(dir, is_dir) {
            self.ignored(dir.clone(), is_dir);
            return Ok(Above::Covered);
        }
        let Some(handle) = handle else {
            return Ok(Above::Covered);
        };
        match read_dir_rules(&handle, dir, |name| handle.stat_entry(name), self.rules) {
            Ok(own) => Ok(Above::Rules(outer.within(dir, own))),
            Err(reason) => {
                self.problem(dir, unusable(&reason));
                Ok(Above::Covered)
            }
        }
    }

    /// Everything beneath `dir` (already reported itself), depth first; `rules` are those in
    /// force in its parent. Subdirectories wait on the stack as paths (with the rules in force
    /// where they are) and are opened when their turn comes, so a wide tree never holds more
    /// than one directory fd open.
    fn dir(&mut self, dir: DirHandle, path: RelPath, rules: Rules) {
        let mut stack: Vec<(RelPath, Rules)> = Vec::new();
        self.list(&dir, &path, &rules, &mut stack);
        drop(dir);
        while let Some((dir_path, rules)) = stack.pop() {
            match self.root.open_dir(&dir_path) {
                Ok(dir) => self.list(&dir, &dir_path, &rules, &mut stack),
                Err(e) => self.problem(&dir_path, format!("cannot open directory: {e}")),
            }
        }
    }

    /// Reports one directory's entries; pushes its subdirectories onto `stack`. `outer`: the
    /// ignore rules in force in its parent.
    fn list(
        &mut self,
        dir: &DirHandle,
        dir_path: &RelPath,
        outer: &Rules,
        stack: &mut Vec<(RelPath, Rules)>,
    ) {
        let entries = match dir.entries() {
            Ok(e) => e,
            Err(e) => return self.problem(dir_path, format!("cannot list directory: {e}")),
        };
        let rules = if self.gitignore {
            let listed = |name: &[u8]| {
                Ok(entries
                    .binary_search_by(|(n, _)| n.as_slice().cmp(name))
                    .ok()
                    .and_then(|i| entries.get(i))
                    .map(|(_, stat)| *stat))
            };
            let own = read_dir_rules(dir, dir_path, listed, self.rules);
            match own {
                Ok(own) => outer.within(dir_path, own),
                // Nothing here can be told apart as ignored or not: leave all of it alone.
                Err(reason) => return self.problem(dir_path, unusable(&reason)),
            }
        } else {
            Rules::default()
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
            let is_dir = stat.kind == FileKind::Dir;
            if self.filter.is_ignored(&path, is_dir) {
                continue;
            }
            if rules.is_ignored(&path, is_dir) {
                self.ignored(path, is_dir);
                continue;
            }
            match stat.kind {
                FileKind::Dir => {
                    self.out.entries.push((
                        path.clone(),
                        Entry::Dir {
                            mode: stat.mode & PERM_MASK,
                            mtime: stat.mtime,
                        },
                    ));
                    stack.push((path, rules.clone()));
                }
                FileKind::Symlink => match dir.read_link(&name) {
                    Ok(target) => self.symlink(&path, target, stat.mtime),
                    Err(e) => self.problem(&path, format!("cannot read symlink: {e}")),
                },
                FileKind::File => self.file(path, stat),
                FileKind::Other => self.special(&path),
            }
        }
    }

    fn file(&mut self, path: RelPath, stat: Stat) {
        if stat.nlink > 1 {
            self.out.linked.push((path.clone(), (stat.dev, stat.ino)));
        }
        if let Some((identity, meta)) = self.index.identity(&path) {
            if identity == Identity::of(&stat) {
                let meta = FileMeta {
                    mode: stat.mode & PERM_MASK,
                    ..meta
                };
                self.out.entries.push((path, Entry::File(meta)));
                return;
            }
        }
        self.jobs.push(HashJob { path });
    }

    fn symlink(&mut self, path: &RelPath, target: Vec<u8>, mtime: Timestamp) {
        if symlink_target_is_contained(path, &target) {
            self.out
                .entries
                .push((path.clone(), Entry::Symlink { target, mtime }));
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

    fn ignored(&mut self, path: RelPath, is_dir: bool) {
        if is_dir {
            self.out.ignored_dirs.push(path.clone());
        }
        self.out.ignored.push(path);
    }

    fn problem(&mut self, path: &RelPath, reason: String) {
        self.out.problems.push(Problem {
            path: path.clone(),
            reason,
        });
    }
}

/// The problem text for a directory whose ignore files cannot be used.
fn unusable(reason: &str) -> String {
    format!(
        "ignore file unusable, so nothing in this directory is synced until it is fixed: {reason}"
    )
}

/// Sorts `ignored`, drops duplicates and paths beneath others, and brings it within `max`: if
/// there are more, each path is replaced by its ancestor at the deepest depth at which they
/// fit (at worst the root). Those ancestors are frozen whole by the controller, which is safe
/// but also holds back whatever else they contain, so a coarsened list also comes with a
/// problem saying so.
fn bound_ignored(mut ignored: Vec<RelPath>, max: usize) -> (Vec<RelPath>, Option<Problem>) {
    ignored.sort();
    ignored.dedup();
    let ignored = outermost(ignored);
    if ignored.len() <= max {
        return (ignored, None);
    }
    let total = ignored.len();
    let deepest = ignored.iter().map(RelPath::depth).max().unwrap_or(0);
    for depth in (0..deepest).rev() {
        let mut cut: Vec<RelPath> = ignored.iter().map(|p| ancestor_at(p, depth)).collect();
        cut.dedup();
        let cut = outermost(cut);
        if cut.len() <= max {
            let first = cut
                .iter()
                .find(|p| ignored.binary_search(p).is_err())
                .cloned();
            let problem = first.map(|path| Problem {
                path,
                reason: format!(
                    "{total} paths are excluded by ignore files, more than a scan lists \
                     ({max}); the directories that hold them are not synced (this one and \
                     others); list such paths in the share's `ignore` patterns instead"
                ),
            });
            return (cut, problem);
        }
    }
    (vec![RelPath::root()], None)
}

/// `path`, or its ancestor `depth` components deep if it is deeper.
fn ancestor_at(path: &RelPath, depth: usize) -> RelPath {
    if path.depth() <= depth {
        return path.clone();
    }
    RelPath::from_components(path.components().take(depth)).unwrap_or_else(|_| RelPath::root())
}

/// A sorted list without the paths that lie beneath another path in it.
fn outermost(sorted: Vec<RelPath>) -> Vec<RelPath> {
    // Sorted order puts an ancestor before its descendants, but not always right before them
    // ("a", "a-b", "a/c"), so look each path's ancestors up among those kept.
    let mut kept: std::collections::HashSet<RelPath> = std::collections::HashSet::new();
    let mut out: Vec<RelPath> = Vec::with_capacity(sorted.len());
    for p in sorted {
        if p.ancestors().any(|a| kept.contains(&a)) {
            continue;
        }
        kept.insert(p.clone());
        out.push(p);
    }
    out
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
        let first_cut = || faults::reached(root.dev_ino(), Moment::FirstChunkCut, path);
        let chunks =
            chunk_reader_then(&file, first_cut).map_err(|e| format!("cannot read: {e}"))?;
        let after = file.metadata().map_err(|e| format!("cannot stat: {e}"))?;
        let manifest = Manifest {
            chunks,
            links: Vec::new(),
        };
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
fn gone_paths(
    index: &IndexReader,
    scope: &ScanScope,
    entries: &[(RelPath, Entry)],
) -> Vec<RelPath> {
    // A targeted scan looks at the index entries beneath its paths only.
    let indexed: Box<dyn Iterator<Item = RelPath>> = match scope {
        ScanScope::Full => Box::new(index.paths()),
        ScanScope::Paths(paths) => Box::new(paths.iter().flat_map(|s| index.paths_under(s))),
    };
    let mut gone: Vec<RelPath> = indexed
        .filter(|p| {
            entries
                .binary_search_by(|(q, _)| q.cmp(p))
                .map_or(true, |i| entries[i].1.as_file().is_none())
        })
        .collect();
    gone.sort();
    gone.dedup();
    gone
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn p(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes()).unwrap()
    }

    fn write(root: &Path, rel: &str, data: &[u8]) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }

    /// A file rewritten all the while it is read never settles: after its attempts its scan
    /// reports it as a problem (and the file is neither synced nor taken for deleted); once the
    /// writer stops, the next read succeeds.
    #[test]
    fn a_file_that_never_settles_is_a_problem_then_hashes_once_it_does() {
        use std::io::Write;
        use std::sync::atomic::AtomicBool;
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "busy.log", &vec![b'x'; 32 << 20]);
        let root = ShareRoot::open(tmp.path()).unwrap();
        let stop = AtomicBool::new(false);
        let writing = AtomicBool::new(false);
        let result = std::thread::scope(|s| {
            s.spawn(|| {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(tmp.path().join("busy.log"))
                    .unwrap();
                while !stop.load(Ordering::Relaxed) {
                    f.write_all(b"y").unwrap();
                    writing.store(true, Ordering::Relaxed);
                }
            });
            while !writing.load(Ordering::Relaxed) {
                std::thread::yield_now();
            }
            let result = hash_file(&root, &p("busy.log"));
            stop.store(true, Ordering::Relaxed);
            result
        });
        let reason = result.expect_err("a moving file hashed");
        assert!(reason.contains("kept changing"), "{reason}");
        let settled = hash_file(&root, &p("busy.log")).unwrap();
        let size = std::fs::metadata(tmp.path().join("busy.log"))
            .unwrap()
            .len();
        assert_eq!(settled.meta.size, size);
    }

    fn git_filter() -> Filter {
        Filter::none().with_gitignore(true)
    }

    fn run(dir: &Path, filter: &Filter, scope: &ScanScope) -> ScanOutput {
        let root = ShareRoot::open(dir).unwrap();
        scan(
            &root,
            filter,
            &IndexReader::default(),
            &RulesCache::default(),
            scope,
        )
        .unwrap()
    }

    fn entries(out: &ScanOutput) -> Vec<String> {
        out.entries.iter().map(|(p, _)| p.escaped()).collect()
    }

    fn ignored(out: &ScanOutput) -> Vec<String> {
        out.ignored.iter().map(|p| p.escaped()).collect()
    }

    fn problems(out: &ScanOutput) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = out
            .problems
            .iter()
            .map(|p| (p.path.escaped(), p.reason.clone()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn nested_gitignore_with_negation() {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), ".gitignore", b"*.log\n/top-only\n");
        write(t.path(), "a.log", b"x");
        write(t.path(), "top-only", b"x");
        write(t.path(), "sub/.gitignore", b"!keep.log\n");
        write(t.path(), "sub/keep.log", b"x");
        write(t.path(), "sub/drop.log", b"x");
        write(t.path(), "sub/top-only", b"x");
        write(t.path(), "sub/deeper/keep.log", b"x");
        let out = run(t.path(), &git_filter(), &ScanScope::Full);
        assert_eq!(
            entries(&out),
            [
                ".gitignore",
                "sub",
                "sub/.gitignore",
                "sub/deeper",
                "sub/deeper/keep.log",
                "sub/keep.log",
                "sub/top-only",
            ]
        );
        assert_eq!(ignored(&out), ["a.log", "sub/drop.log", "top-only"]);
        assert!(out.problems.is_empty(), "{:?}", out.problems);
    }

    #[test]
    fn dot_ignore_overrides_gitignore_in_the_same_directory() {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), ".gitignore", b"gen/\n*.tmp\n");
        write(t.path(), ".ignore", b"!gen/\n");
        write(t.path(), "gen/out.rs", b"x");
        write(t.path(), "a.tmp", b"x");
        let out = run(t.path(), &git_filter(), &ScanScope::Full);
        assert_eq!(
            entries(&out),
            [".gitignore", ".ignore", "gen", "gen/out.rs"]
        );
        assert_eq!(ignored(&out), ["a.tmp"]);
    }

    #[test]
    fn an_ignored_directory_is_not_descended() {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), ".gitignore", b"build/\n");
        write(t.path(), "build/a/b/c.o", b"x");
        // Reported as a problem if the walk went in.
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            t.path().join("build/a/fifo"),
            rustix::fs::Mode::from_raw_mode(0o644),
        )
        .unwrap();
        write(t.path(), "build/.gitignore", b"!c.o\n");
        let out = run(t.path(), &git_filter(), &ScanScope::Full);
        assert_eq!(entries(&out), [".gitignore"]);
        assert_eq!(ignored(&out), ["build"]);
        assert_eq!(out.ignored_dirs, [p("build")]);
        assert!(out.problems.is_empty(), "{:?}", out.problems);
    }

    #[test]
    fn a_targeted_scan_decides_as_a_full_scan_does() {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), ".gitignore", b"build/\n*.log\n");
        write(t.path(), "build/x/y.o", b"x");
        write(t.path(), "src/.gitignore", b"!important.log\ngen\n");
        write(t.path(), "src/important.log", b"x");
        write(t.path(), "src/debug.log", b"x");
        write(t.path(), "src/gen/a.rs", b"x");
        write(t.path(), "src/lib.rs", b"x");
        write(t.path(), "file-not-dir", b"x");
        let filter = git_filter();
        let full = run(t.path(), &filter, &ScanScope::Full);
        let targeted = |paths: &[&str]| {
            run(
                t.path(),
                &filter,
                &ScanScope::Paths(paths.iter().map(|s| p(s)).collect()),
            )
        };
        // Beneath an ignored directory: the directory is reported, whether or not the path
        // exists, and nothing beneath it is scanned.
        let out = targeted(&["build/x/y.o", "build/x/missing", "build/x"]);
        assert!(out.entries.is_empty());
        assert_eq!(ignored(&out), ["build"]);
        let out = targeted(&["src/gen/a.rs"]);
        assert!(out.entries.is_empty());
        assert_eq!(ignored(&out), ["src/gen"]);
        // The path itself, by the rules of every directory above it, and the directory it
        // is in (its mtime).
        let out = targeted(&["src/debug.log", "src/important.log", "src/lib.rs"]);
        assert_eq!(entries(&out), ["src", "src/important.log", "src/lib.rs"]);
        assert_eq!(ignored(&out), ["src/debug.log"]);
        // A missing path that would be ignored is not reported (a full scan does not see it);
        // its directory is, and a file where a directory would be is not.
        let out = targeted(&["src/missing.log", "file-not-dir/x"]);
        assert_eq!(entries(&out), ["src"]);
        assert!(out.ignored.is_empty() && out.problems.is_empty());
        // A directory scope gives the full scan's answer for that subtree.
        let out = targeted(&["src"]);
        let within = |o: &ScanOutput| -> (Vec<String>, Vec<String>) {
            let keep = |s: &String| s == "src" || s.starts_with("src/");
            (
                entries(o).into_iter().filter(keep).collect(),
                ignored(o).into_iter().filter(keep).collect(),
            )
        };
        assert_eq!(within(&out), within(&full));
    }

    #[test]
    fn a_symlinked_ignore_file_is_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let share = t.path().join("share");
        write(t.path(), "outside/rules", b"*\n");
        write(&share, "sub/secret", b"x");
        std::os::unix::fs::symlink("../../outside/rules", share.join("sub/.gitignore")).unwrap();
        write(&share, "other/file", b"x");
        for scope in [ScanScope::Full, ScanScope::Paths(vec![p("sub/secret")])] {
            let out = run(&share, &git_filter(), &scope);
            // Had it been followed, `*` would have ignored everything in `sub`.
            assert!(out.ignored.is_empty(), "{scope:?}: {:?}", out.ignored);
            assert!(
                !entries(&out).contains(&"sub/secret".to_string()),
                "{scope:?}: the directory must be frozen, not synced by default"
            );
            let problems = problems(&out);
            assert_eq!(problems.len(), 1, "{scope:?}: {problems:?}");
            assert_eq!(problems[0].0, "sub");
            assert!(problems[0].1.contains("symlink"), "{problems:?}");
        }
        assert_eq!(
            std::fs::read(t.path().join("outside/rules")).unwrap(),
            b"*\n"
        );
        // At the root, the whole share is the problem.
        std::os::unix::fs::symlink("../outside/rules", share.join(".ignore")).unwrap();
        let out = run(&share, &git_filter(), &ScanScope::Full);
        assert_eq!(problems(&out).len(), 1);
        assert_eq!(problems(&out)[0].0, "");
        assert!(out.entries.is_empty());
    }

    #[test]
    fn an_oversized_or_broken_ignore_file_is_a_problem_for_its_directory() {
        let t = tempfile::tempdir().unwrap();
        let mut big = b"*.o\n".to_vec();
        big.resize(MAX_IGNORE + 1, b'#');
        write(t.path(), "big/.gitignore", &big);
        write(t.path(), "big/x.o", b"x");
        write(t.path(), "bad/.ignore", b"ok\na{b\n");
        write(t.path(), "bad/x", b"x");
        write(t.path(), "fine/.gitignore", &big[..MAX_IGNORE]);
        write(t.path(), "fine/x.o", b"x");
        let out = run(t.path(), &git_filter(), &ScanScope::Full);
        let problems = problems(&out);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(problems[0].0, "bad");
        assert!(problems[0].1.contains(".ignore line 2"), "{problems:?}");
        assert_eq!(problems[1].0, "big");
        assert!(problems[1].1.contains("larger than"), "{problems:?}");
        assert_eq!(entries(&out), ["bad", "big", "fine", "fine/.gitignore"]);
        assert_eq!(ignored(&out), ["fine/x.o"]);
    }

    const MAX_IGNORE: usize = crate::gitignore::MAX_IGNORE_FILE_BYTES as usize;

    #[test]
    fn without_respect_gitignore_ignore_files_are_plain_files() {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), ".gitignore", b"*\n");
        write(t.path(), "a", b"x");
        let out = run(t.path(), &Filter::none(), &ScanScope::Full);
        assert_eq!(entries(&out), [".gitignore", "a"]);
        assert!(out.ignored.is_empty());
    }

    #[test]
    fn an_edited_ignore_file_applies_at_the_next_scan() {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), "d/.gitignore", b"x\n");
        write(t.path(), "d/x", b"x");
        let scope = ScanScope::Paths(vec![p("d")]);
        assert_eq!(ignored(&run(t.path(), &git_filter(), &scope)), ["d/x"]);
        write(t.path(), "d/.gitignore", b"");
        let out = run(t.path(), &git_filter(), &scope);
        assert!(out.ignored.is_empty());
        assert_eq!(entries(&out), ["d", "d/.gitignore", "d/x"]);
    }

    #[test]
    fn cached_rules_follow_every_edit_of_an_ignore_file() {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), "d/.gitignore", b"a\n");
        write(t.path(), "d/a", b"x");
        write(t.path(), "d/b", b"x");
        // Old enough to be cached (see gitignore::SETTLE_SECS).
        std::thread::sleep(std::time::Duration::from_millis(2100));
        let root = ShareRoot::open(t.path()).unwrap();
        let (index, cache) = (IndexReader::default(), RulesCache::default());
        let filter = git_filter();
        let run = |scope: &ScanScope| scan(&root, &filter, &index, &cache, scope).unwrap();
        let scope = ScanScope::Paths(vec![p("d")]);
        assert_eq!(ignored(&run(&scope)), ["d/a"]);
        assert_eq!(cache.len(), 1, "a settled ignore file is kept");
        assert_eq!(ignored(&run(&ScanScope::Full)), ["d/a"]);
        // Same size, rewritten at once, twice: each scan sees what is there now.
        write(t.path(), "d/.gitignore", b"b\n");
        assert_eq!(ignored(&run(&scope)), ["d/b"]);
        write(t.path(), "d/.gitignore", b"a\n");
        assert_eq!(ignored(&run(&ScanScope::Paths(vec![p("d/a")]))), ["d/a"]);
        std::fs::remove_file(t.path().join("d/.gitignore")).unwrap();
        assert!(run(&scope).ignored.is_empty());
    }

    #[test]
    fn too_many_ignored_paths_become_their_directories() {
        let paths: Vec<RelPath> = (0..10)
            .flat_map(|d| (0..10).map(move |f| p(&format!("top/d{d}/f{f}"))))
            .chain([p("a"), p("a/b"), p("z/y/x")])
            .collect();
        let (kept, problem) = bound_ignored(paths.clone(), 1000);
        assert_eq!(kept.len(), 102, "a/b lies beneath a");
        assert!(problem.is_none());
        let (kept, problem) = bound_ignored(paths.clone(), 12);
        let kept: Vec<String> = kept.iter().map(|p| p.escaped()).collect();
        let mut want = vec!["a".to_string()];
        want.extend((0..10).map(|d| format!("top/d{d}")));
        want.push("z/y".into());
        assert_eq!(kept, want);
        let problem = problem.unwrap();
        assert_eq!(problem.path.escaped(), "top/d0");
        assert!(problem.reason.contains("102 paths"), "{}", problem.reason);
        let (kept, _) = bound_ignored(paths.clone(), 3);
        assert_eq!(kept, [p("a"), p("top"), p("z")]);
        let (kept, problem) = bound_ignored(paths, 2);
        assert_eq!(kept, [RelPath::root()]);
        assert_eq!(problem.unwrap().path, RelPath::root());
    }
}
