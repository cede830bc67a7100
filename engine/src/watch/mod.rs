//! Watching a share for changes: inotify (a watch on every directory, kept by [`tree`]) turns
//! file events into [`ChangeHints`] for the controller. Events are hints, never facts
//! (security.md rule 17): they are coalesced into a bounded set of paths, and whatever cannot
//! be described that way (an overflowed event queue, too many paths) becomes "rescan
//! everything".
//!
//! A directory can fail to get its watch: the inotify watch limit
//! (`fs.inotify.max_user_watches`) was hit, or its path is too long for the kernel. Nothing
//! inside it would ever be heard of, so the watcher keeps such directories and hands them out
//! every [`UNWATCHED_RESCAN`] for a targeted rescan, and `status` says why when it is the limit
//! ([`ShareWatcher::limit_problem`]).
//!
//! Coalescing needs no timer: hints accumulate while the controller is busy with a cycle and
//! are taken all at once when it asks again, so a burst of thousands of events costs one
//! targeted cycle, and a single edit is handed over the moment it happens.
//!
//! On a share that honours the tree's ignore files, a change to a `.gitignore` or `.ignore`
//! becomes a hint for its directory: its rules decide about everything beneath, so all of it is
//! rescanned (newly un-ignored entries are then synced; newly ignored ones left alone). And
//! events strictly beneath a directory the latest scans found excluded by those files are
//! dropped, as those beneath a directory the configured patterns exclude always were: a build
//! writing thousands of files into an ignored `target/` would otherwise cost a cycle after
//! cycle. Such a directory stays excluded until an ignore file above it changes, which is an
//! event outside it whose hint rescans it; and a scan forgets, before it starts, what it is
//! about to decide again, so no event is lost while it runs.

use crate::filter::Filter;
use crate::gitignore::is_ignore_file_name;
use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use vmsync_core::endpoint::{ChangeHints, ScanScope};
use vmsync_core::limits::MAX_SCAN_IGNORED;
use vmsync_core::RelPath;

mod tree;

pub use tree::Heard;
use tree::TreeWatch;

/// What the watcher knows of a share's ignore rules: its filter, and the directories the
/// latest scans found excluded by the tree's ignore files. Shared with the share's endpoint,
/// which keeps it current: new rules (a host that reconnects with another configuration) and
/// what each scan finds reach a running watch.
#[derive(Debug)]
pub struct WatchRules {
    filter: Filter,
    ignored_dirs: HashSet<RelPath>,
}

/// [`WatchRules`] behind the lock the watcher and the endpoint share.
pub type SharedRules = Arc<RwLock<WatchRules>>;

impl WatchRules {
    pub fn new(filter: Filter) -> WatchRules {
        WatchRules {
            filter,
            ignored_dirs: HashSet::new(),
        }
    }

    /// New rules: nothing learnt under the old ones holds any more.
    pub fn set_filter(&mut self, filter: Filter) {
        self.filter = filter;
        self.ignored_dirs.clear();
    }

    /// A scan of `scope` starts: forget what it will decide again (the scope paths and what
    /// lies beneath them), so events there are not dropped while it runs.
    pub fn rescanning(&mut self, scope: &ScanScope) {
        match scope {
            ScanScope::Full => self.ignored_dirs.clear(),
            ScanScope::Paths(paths) => {
                if self.ignored_dirs.is_empty() {
                    return;
                }
                let scope: HashSet<&RelPath> = paths.iter().collect();
                self.ignored_dirs
                    .retain(|d| !scope.contains(d) && !d.ancestors().any(|a| scope.contains(&a)));
            }
        }
    }

    /// A scan found these directories excluded by the tree's ignore files.
    pub fn ignored_dirs_found(&mut self, dirs: &[RelPath]) {
        for d in dirs {
            if self.ignored_dirs.len() >= MAX_SCAN_IGNORED {
                return;
            }
            self.ignored_dirs.insert(d.clone());
        }
    }

    /// What to rescan for a change at `rel`: its directory when it is an ignore file the share
    /// honours, else itself; `None` when nothing there can sync (the configured patterns
    /// exclude it, or it lies beneath a directory the ignore files exclude).
    fn hint_for(&self, rel: RelPath) -> Option<RelPath> {
        let hint = match rel.name() {
            Some(name) if self.filter.respects_gitignore() && is_ignore_file_name(name) => {
                rel.parent()?
            }
            _ => rel,
        };
        if self.filter.is_ignored(&hint, false) {
            return None;
        }
        if !self.ignored_dirs.is_empty() && hint.ancestors().any(|a| self.ignored_dirs.contains(&a))
        {
            return None;
        }
        Some(hint)
    }
}

/// More pending paths than this and the hint becomes "rescan everything": a rescan is cheaper
/// than a scope list that long, and memory stays bounded whatever the event storm.
pub const MAX_HINT_PATHS: usize = 4096;

/// A peer's hints longer than this in bytes (or than [`MAX_HINT_PATHS`] paths) are taken as
/// "rescan everything" the moment they arrive, so a queue of them holds little whatever the
/// peer sends: its largest message could otherwise sit in the queue many times over.
pub const MAX_HINT_BYTES: usize = 1 << 20;

/// `hints` as the host keeps them until their cycle: a rescan when they name more than
/// [`MAX_HINT_PATHS`] paths or [`MAX_HINT_BYTES`] bytes of them (a `HintSet` would turn so many
/// into a rescan anyway).
pub fn bounded_hints(hints: ChangeHints) -> ChangeHints {
    let bytes: usize = hints.paths.iter().map(|p| p.as_bytes().len()).sum();
    if hints.paths.len() > MAX_HINT_PATHS || bytes > MAX_HINT_BYTES {
        return ChangeHints {
            paths: Vec::new(),
            rescan: true,
        };
    }
    hints
}

/// The hints gathered since they were last taken.
#[derive(Debug, Default, Clone)]
pub struct HintSet {
    paths: BTreeSet<RelPath>,
    rescan: bool,
    /// Paths whose own attributes changed (a directory whose time was set), kept apart from
    /// `paths` and not standing for anything beneath them: only these can be the echo of a
    /// directory time this side put back (see `LocalShare::drop_echoes`). None lies at or
    /// beneath a path in `paths`.
    attrs: BTreeSet<RelPath>,
}

impl HintSet {
    /// Adds a changed path, keeping the set free of paths beneath other paths in it.
    pub fn add(&mut self, path: RelPath) {
        if self.rescan {
            return;
        }
        if path.is_root() {
            return self.add_rescan();
        }
        if path.ancestors().any(|a| self.paths.contains(&a)) || self.paths.contains(&path) {
            return;
        }
        let beneath: Vec<RelPath> = self
            .paths
            .range(path.clone()..)
            .take_while(|p| p.as_bytes().starts_with(path.as_bytes()))
            .filter(|p| path.is_ancestor_of(p))
            .cloned()
            .collect();
        for p in beneath {
            self.paths.remove(&p);
        }
        if !self.attrs.is_empty() {
            let covered: Vec<RelPath> = self
                .attrs
                .iter()
                .filter(|a| **a == path || path.is_ancestor_of(a))
                .cloned()
                .collect();
            for a in covered {
                self.attrs.remove(&a);
            }
        }
        self.paths.insert(path);
        if self.paths.len() > MAX_HINT_PATHS {
            self.add_rescan();
        }
    }

    /// Adds a path whose own attributes changed (mode, times), nothing else known about it.
    pub fn add_attrs(&mut self, path: RelPath) {
        if self.rescan
            || self.paths.contains(&path)
            || path.ancestors().any(|a| self.paths.contains(&a))
        {
            return;
        }
        self.attrs.insert(path);
        if self.attrs.len() > MAX_HINT_PATHS {
            self.add_rescan();
        }
    }

    pub fn add_rescan(&mut self) {
        self.rescan = true;
        self.paths.clear();
        self.attrs.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty() && self.attrs.is_empty() && !self.rescan
    }

    /// True when the hints say: rescan everything.
    pub fn is_rescan(&self) -> bool {
        self.rescan
    }

    /// Keeps only the paths `keep` accepts (see [`crate::pace`]).
    pub fn retain_paths(&mut self, keep: impl FnMut(&RelPath) -> bool) {
        self.paths.retain(keep);
    }

    /// All the hints, attribute changes among them.
    pub fn take(&mut self) -> ChangeHints {
        let (mut hints, attrs) = self.take_with_attrs();
        merge_attrs(&mut hints, attrs);
        hints
    }

    /// The hints, and apart from them the paths whose own attributes only changed (see
    /// `HintSet::attrs`); [`merge_attrs`] puts them together.
    pub fn take_with_attrs(&mut self) -> (ChangeHints, BTreeSet<RelPath>) {
        let taken = std::mem::take(self);
        let hints = ChangeHints {
            paths: taken.paths.into_iter().collect(),
            rescan: taken.rescan,
        };
        (hints, taken.attrs)
    }
}

/// Adds attribute hints to `hints`, coalesced (none beneath another).
pub fn merge_attrs(hints: &mut ChangeHints, attrs: BTreeSet<RelPath>) {
    if attrs.is_empty() || hints.rescan {
        return;
    }
    let mut set = HintSet::default();
    for p in hints.paths.drain(..).chain(attrs) {
        set.add(p);
    }
    *hints = set.take();
}

/// Shared between the watch's thread and the consumer.
#[derive(Default)]
struct Shared {
    hints: Mutex<HintSet>,
    wake: tokio::sync::Notify,
    /// When the first half of a rename (its old name) was seen with no second half yet.
    half_move: Mutex<Option<Instant>>,
    unwatched: Mutex<Unwatched>,
}

/// How often directories without a watch are rescanned.
pub const UNWATCHED_RESCAN: Duration = Duration::from_secs(10);

/// The directories that have no watch (so nothing inside them is heard of), and why.
#[derive(Default)]
struct Unwatched {
    /// Why, when the watch limit was hit: shown in `status`.
    problem: Option<String>,
    /// The directories, coalesced; "everything" when there are too many.
    dirs: HintSet,
}

impl Unwatched {
    /// `dir` could not be watched; `limit`: because of the inotify watch limit.
    fn add(&mut self, dir: RelPath, limit: bool, why: &str) {
        if limit && self.problem.is_none() {
            self.problem = Some(format!(
                "inotify watch limit reached (fs.inotify.max_user_watches): directories without \
                 a watch are rescanned every {} s; raise the limit and restart the agent ({why})",
                UNWATCHED_RESCAN.as_secs()
            ));
        }
        self.dirs.add(dir);
    }

    /// What to rescan periodically; `None` while every directory has its watch.
    fn hints(&self) -> Option<ChangeHints> {
        if self.dirs.is_empty() {
            return None;
        }
        Some(ChangeHints {
            paths: self.dirs.paths.iter().cloned().collect(),
            rescan: self.dirs.rescan,
        })
    }
}

/// How long hints wait for a rename's second half (inotify queues both halves together, so
/// it normally follows within microseconds; only a move out of the share never completes).
/// Handed over alone, the old name would look deleted: the other side would delete its copy,
/// and the content would then have to cross the wire again for the new name.
const HALF_MOVE_WAIT: Duration = Duration::from_millis(5);

/// A running watch on one share root. Dropping it stops watching.
pub struct ShareWatcher {
    shared: Arc<Shared>,
    /// The watched root and its (device, inode) when the watch started.
    root_path: PathBuf,
    root_id: Option<(u64, u64)>,
    tree: TreeWatch,
    #[cfg(test)]
    rules: SharedRules,
}

pub use tree::StartError as WatchError;

impl ShareWatcher {
    /// Starts watching `root` recursively. Paths the rules say cannot sync are dropped.
    pub fn start(root: &Path, rules: SharedRules) -> Result<ShareWatcher, WatchError> {
        let shared = Arc::new(Shared::default());
        let cb_shared = shared.clone();
        #[cfg(test)]
        let test_rules = rules.clone();
        let tree = TreeWatch::start(root, move |batch| on_heard(&cb_shared, &rules, batch))?;
        Ok(ShareWatcher {
            shared,
            root_path: root.to_path_buf(),
            root_id: dir_id(root),
            tree,
            #[cfg(test)]
            rules: test_rules,
        })
    }

    /// Whether the root path names another directory than the one this watch started on (or
    /// none): the watch then hears nothing more of the share.
    pub fn root_replaced(&self) -> bool {
        dir_id(&self.root_path) != self.root_id
    }

    /// How many directories this watch covers now (the share's directories, ignored ones
    /// included, but the reserved directory and what cannot be watched).
    pub fn watched_dirs(&self) -> Option<u64> {
        Some(self.tree.watched())
    }

    /// Why part of the share is unwatched (the watch limit was hit while watching); `None`
    /// otherwise.
    pub fn limit_problem(&self) -> Option<String> {
        self.shared
            .unwatched
            .lock()
            .ok()
            .and_then(|u| u.problem.clone())
    }

    /// The directories without a watch, for a periodic rescan (see the module docs); `None`
    /// while every directory has its watch.
    pub fn unwatched(&self) -> Option<ChangeHints> {
        self.shared.unwatched.lock().ok()?.hints()
    }

    /// Feeds what the watch might have heard (tests: the watch limit cannot be reached on
    /// purpose without starving every other inotify user on the machine).
    #[cfg(test)]
    pub(crate) fn inject(&self, heard: Heard) {
        on_heard(&self.shared, &self.rules, vec![heard]);
    }

    /// Puts hints taken with [`ShareWatcher::next`] back, for a consumer that could not finish
    /// handling them (it was cancelled): they come out again, merged with newer ones.
    pub fn requeue(&self, taken: ChangeHints) {
        let mut hints = match self.shared.hints.lock() {
            Ok(h) => h,
            Err(poisoned) => poisoned.into_inner(),
        };
        if taken.rescan {
            hints.add_rescan();
        }
        for path in taken.paths {
            hints.add(path);
        }
        if !hints.is_empty() {
            self.shared.wake.notify_one();
        }
    }

    /// Waits until there are hints, then takes them all; while a rename is half seen, up to
    /// [`HALF_MOVE_WAIT`] longer, so both its names travel together.
    pub async fn next(&self) -> ChangeHints {
        self.next_with_attrs().await.0
    }

    /// [`ShareWatcher::next`], with the paths among the hints that only changed attributes.
    pub async fn next_with_attrs(&self) -> (ChangeHints, BTreeSet<RelPath>) {
        loop {
            let notified = self.shared.wake.notified();
            let has_hints = self.shared.hints.lock().is_ok_and(|h| !h.is_empty());
            if has_hints {
                let half_move = self.shared.half_move.lock().ok().and_then(|h| *h);
                let wait = half_move.map_or(Duration::ZERO, |since| {
                    HALF_MOVE_WAIT.saturating_sub(since.elapsed())
                });
                if wait.is_zero() {
                    if let Ok(mut half) = self.shared.half_move.lock() {
                        *half = None;
                    }
                    if let Ok(mut hints) = self.shared.hints.lock() {
                        return hints.take_with_attrs();
                    }
                } else {
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
            }
            notified.await;
        }
    }
}

/// The (device, inode) of the directory at `path`; `None` if there is none.
fn dir_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .filter(std::fs::Metadata::is_dir)
        .map(|m| (m.dev(), m.ino()))
}

/// Turns one batch of what the watch heard into hints, on the watch's thread.
fn on_heard(shared: &Shared, rules: &SharedRules, batch: Vec<Heard>) {
    let mut hints = match shared.hints.lock() {
        Ok(h) => h,
        Err(poisoned) => poisoned.into_inner(),
    };
    for heard in batch {
        let (path, attrs_only) = match heard {
            Heard::Overflow => {
                tracing::info!("the kernel's event queue overflowed: the whole share is rescanned");
                hints.add_rescan();
                continue;
            }
            // Nothing inside it is heard of: it is rescanned now, and every so often from
            // now on.
            Heard::Unwatched { dir, limit, why } => {
                let mut u = match shared.unwatched.lock() {
                    Ok(u) => u,
                    Err(poisoned) => poisoned.into_inner(),
                };
                if u.dirs.is_empty() {
                    tracing::warn!(dir = %dir.escaped(), "cannot watch a directory (it and what is beneath it are rescanned every {} s instead): {why}", UNWATCHED_RESCAN.as_secs());
                } else {
                    tracing::debug!(dir = %dir.escaped(), "cannot watch a directory: {why}");
                }
                u.add(dir.clone(), limit, &why);
                (dir, false)
            }
            Heard::MovedFrom(path) => {
                if let Ok(mut half) = shared.half_move.lock() {
                    half.get_or_insert_with(Instant::now);
                }
                (path, false)
            }
            Heard::MovedTo(path) => {
                if let Ok(mut half) = shared.half_move.lock() {
                    *half = None;
                }
                (path, false)
            }
            Heard::Changed(path) => (path, false),
            Heard::Attrs(path) => (path, true),
        };
        let rules = match rules.read() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        let Some(hint) = rules.hint_for(path.clone()) else {
            continue;
        };
        // An ignore file's hint is its directory: never attributes only.
        if attrs_only && path == hint {
            hints.add_attrs(hint);
        } else {
            hints.add(hint);
        }
    }
    if !hints.is_empty() {
        shared.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes()).unwrap()
    }

    #[test]
    fn a_peers_hints_past_their_bounds_become_a_rescan() {
        // `n` paths of three 199-byte names: 599 bytes each.
        let hints = |n: usize| ChangeHints {
            paths: (0..n)
                .map(|i| p(&format!("{i:0>199}/{i:0>199}/{i:0>199}")))
                .collect(),
            rescan: false,
        };
        let kept = |h: &ChangeHints| (h.paths.len(), h.rescan);
        let short = |n: usize| ChangeHints {
            paths: (0..n).map(|i| p(&format!("{i}"))).collect(),
            rescan: false,
        };
        assert_eq!(
            kept(&bounded_hints(short(MAX_HINT_PATHS))),
            (MAX_HINT_PATHS, false)
        );
        assert_eq!(kept(&bounded_hints(short(MAX_HINT_PATHS + 1))), (0, true));
        let fits = MAX_HINT_BYTES / 599;
        assert_eq!(kept(&bounded_hints(hints(fits))), (fits, false));
        assert_eq!(kept(&bounded_hints(hints(fits + 1))), (0, true));
        let rescan = ChangeHints {
            paths: vec![],
            rescan: true,
        };
        assert_eq!(bounded_hints(rescan.clone()), rescan);
    }

    fn unwatched(dir: &str, limit: bool) -> Heard {
        Heard::Unwatched {
            dir: p(dir),
            limit,
            why: "no".into(),
        }
    }

    /// A directory that could not be watched is rescanned now and kept for periodic rescans,
    /// with every other one that could not; only the watch limit shows as a problem.
    #[test]
    fn directories_without_a_watch_are_kept_for_periodic_rescans() {
        let shared = Shared::default();
        let rules: SharedRules = Arc::new(RwLock::new(WatchRules::new(Filter::none())));
        assert_eq!(shared.unwatched.lock().unwrap().hints(), None);
        on_heard(&shared, &rules, vec![unwatched("a/too-long", false)]);
        assert_eq!(shared.unwatched.lock().unwrap().problem, None);
        on_heard(
            &shared,
            &rules,
            vec![unwatched("b", true), unwatched("b/c", true)],
        );
        let taken = shared.hints.lock().unwrap().take();
        assert_eq!(taken.paths, vec![p("a/too-long"), p("b")], "rescanned now");
        assert!(!taken.rescan, "only what lacks a watch");
        let u = shared.unwatched.lock().unwrap();
        assert!(u.problem.as_deref().unwrap().contains("max_user_watches"));
        let got: Vec<String> = u
            .hints()
            .unwrap()
            .paths
            .iter()
            .map(|p| p.escaped())
            .collect();
        assert_eq!(got, ["a/too-long", "b"]);
    }

    /// The kernel's event queue overflowed: what changed meanwhile is unknown, so the whole
    /// share is rescanned, and nothing is taken to lack a watch.
    #[test]
    fn a_queue_overflow_asks_for_a_full_rescan() {
        let shared = Shared::default();
        let rules: SharedRules = Arc::new(RwLock::new(WatchRules::new(Filter::none())));
        on_heard(
            &shared,
            &rules,
            vec![Heard::Changed(p("x")), Heard::Overflow],
        );
        let taken = shared.hints.lock().unwrap().take();
        assert!(taken.rescan);
        assert!(taken.paths.is_empty());
        let u = shared.unwatched.lock().unwrap();
        assert_eq!(u.hints(), None);
        assert!(u.problem.is_none());
    }

    #[test]
    fn attribute_hints_are_kept_apart_until_merged() {
        let p = |s: &str| RelPath::from_bytes(s.as_bytes()).unwrap();
        let mut h = HintSet::default();
        h.add(p("d/f"));
        h.add_attrs(p("d"));
        h.add_attrs(p("e"));
        h.add_attrs(p("g/x"));
        // A change at or above an attribute hint covers it.
        h.add(p("g"));
        let (hints, attrs) = h.clone().take_with_attrs();
        assert_eq!(hints.paths, vec![p("d/f"), p("g")]);
        assert_eq!(attrs.into_iter().collect::<Vec<_>>(), vec![p("d"), p("e")]);
        // Merged: d stands for d/f too.
        assert_eq!(h.take().paths, vec![p("d"), p("e"), p("g")]);
    }

    #[test]
    fn coalesces_paths_beneath_others() {
        let mut h = HintSet::default();
        for s in ["a/b/c", "a/b/d", "x", "a/b", "a/bc", "x/y"] {
            h.add(p(s));
        }
        let got: Vec<String> = h.take().paths.iter().map(|p| p.escaped()).collect();
        assert_eq!(got, ["a/b", "a/bc", "x"]);
        assert!(h.is_empty());
    }

    #[test]
    fn too_many_paths_become_a_rescan() {
        let mut h = HintSet::default();
        for i in 0..=MAX_HINT_PATHS {
            h.add(p(&format!("f{i}")));
        }
        let taken = h.take();
        assert!(taken.rescan);
        assert!(taken.paths.is_empty());
    }

    #[test]
    fn the_root_is_a_rescan() {
        let mut h = HintSet::default();
        h.add(RelPath::root());
        assert!(h.take().rescan);
    }

    #[test]
    fn an_ignore_file_hints_its_directory_when_honoured() {
        let plain = WatchRules::new(Filter::new(&["*.swp".into()]).unwrap());
        let git = WatchRules::new(plain.filter.clone().with_gitignore(true));
        let cases = [
            (&plain, "a/b/.gitignore", Some("a/b/.gitignore")),
            (&git, "a/b/.gitignore", Some("a/b")),
            (&git, "a/.ignore", Some("a")),
            (&git, ".gitignore", Some("")),
            (&git, "a/gitignore", Some("a/gitignore")),
            (&git, "a/x.swp", None),
        ];
        for (rules, changed, want) in cases {
            let got = rules.hint_for(p(changed)).map(|h| h.escaped());
            assert_eq!(got.as_deref(), want, "{changed}");
        }
        let mut h = HintSet::default();
        h.add(git.hint_for(p(".gitignore")).unwrap());
        assert!(
            h.take().rescan,
            "the root's ignore files cover the whole share"
        );
    }

    #[test]
    fn events_beneath_an_ignored_directory_are_dropped_until_it_is_rescanned() {
        let mut rules = WatchRules::new(Filter::none().with_gitignore(true));
        rules.ignored_dirs_found(&[p("target"), p("web/node_modules")]);
        let hint = |r: &WatchRules, s: &str| r.hint_for(p(s)).map(|h| h.escaped());
        assert_eq!(hint(&rules, "target/debug/x.o"), None);
        assert_eq!(hint(&rules, "web/node_modules/a/b.js"), None);
        assert_eq!(hint(&rules, "target/.gitignore"), Some("target".into()));
        // The directory itself may become something that syncs (a file named `target`).
        assert_eq!(hint(&rules, "target"), Some("target".into()));
        assert_eq!(hint(&rules, "targets/x"), Some("targets/x".into()));
        // An ignore file above it changed: the scan of that directory decides again, and
        // meanwhile nothing beneath is dropped.
        rules.rescanning(&ScanScope::Paths(vec![p("web")]));
        assert_eq!(
            hint(&rules, "web/node_modules/a/b.js"),
            Some("web/node_modules/a/b.js".into())
        );
        assert_eq!(hint(&rules, "target/debug/x.o"), None);
        rules.rescanning(&ScanScope::Paths(vec![p("target/debug")]));
        assert_eq!(
            hint(&rules, "target/debug/x.o"),
            None,
            "a scope beneath decides nothing above"
        );
        rules.rescanning(&ScanScope::Full);
        assert_eq!(
            hint(&rules, "target/debug/x.o"),
            Some("target/debug/x.o".into())
        );
        rules.ignored_dirs_found(&[p("target")]);
        rules.set_filter(Filter::none());
        assert_eq!(
            hint(&rules, "target/debug/x.o"),
            Some("target/debug/x.o".into())
        );
    }

    #[tokio::test]
    async fn real_events_become_hints() {
        let dir = tempfile::tempdir().unwrap();
        let filter = Filter::new(&["*.swp".into()]).unwrap();
        let w = ShareWatcher::start(dir.path(), Arc::new(RwLock::new(WatchRules::new(filter))))
            .unwrap();
        std::fs::write(dir.path().join("x.swp"), "ignored").unwrap();
        std::fs::create_dir_all(dir.path().join("new/deeper")).unwrap();
        std::fs::write(dir.path().join("file"), "data").unwrap();
        let mut seen = BTreeSet::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while !(seen.contains("file") && seen.contains("new")) {
            let hints = tokio::time::timeout_at(deadline, w.next())
                .await
                .expect("hints in time");
            assert!(!hints.rescan);
            seen.extend(hints.paths.iter().map(|p| p.escaped()));
        }
        assert!(!seen.contains("x.swp"), "{seen:?}");
    }

    /// The reserved directory costs no inotify watch, whether it was there when the watch
    /// started or is made later, however many directories the trash gains.
    #[tokio::test]
    async fn the_reserved_directory_is_never_watched() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(root.join(".vmsync/trash/batch-0/a/b")).unwrap();
        let w = ShareWatcher::start(
            root,
            Arc::new(RwLock::new(WatchRules::new(Filter::new(&[]).unwrap()))),
        )
        .unwrap();
        // The root, a and a/b.
        let w = &w;
        let settled = |want: u64| async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let n = w.watched_dirs().expect("counted");
                let kernel = w.tree.kernel_watches();
                if (n == want && kernel == want) || Instant::now() > deadline {
                    assert_eq!(kernel, n, "the kernel's count and the watch's");
                    return n;
                }
            }
        };
        assert_eq!(settled(3).await, 3);
        for i in 1..=40 {
            std::fs::create_dir_all(root.join(format!(".vmsync/trash/batch-{i}/a/b"))).unwrap();
        }
        std::fs::create_dir(root.join("c")).unwrap();
        assert_eq!(settled(4).await, 4);

        // Made anew while watched: dropped again.
        std::fs::remove_dir_all(root.join(".vmsync")).unwrap();
        std::fs::create_dir_all(root.join(".vmsync/trash/x/y")).unwrap();
        std::fs::create_dir_all(root.join(".vmsync/trash/z")).unwrap();
        assert_eq!(settled(4).await, 4);
    }

    /// A rename hands over both names in one go, even when the consumer is already waiting
    /// (it is woken by the first half): the other side must see a move, not a deletion.
    #[tokio::test]
    async fn a_rename_arrives_with_both_names_at_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/old"), "data").unwrap();
        let w = ShareWatcher::start(
            dir.path(),
            Arc::new(RwLock::new(WatchRules::new(Filter::new(&[]).unwrap()))),
        )
        .unwrap();
        for round in 0..20 {
            let (from, to) = if round % 2 == 0 {
                ("old", "new")
            } else {
                ("new", "old")
            };
            let waiting = w.next();
            let renamer = async {
                tokio::task::yield_now().await;
                std::fs::rename(
                    dir.path().join("d").join(from),
                    dir.path().join("d").join(to),
                )
                .unwrap();
            };
            let (hints, ()) = tokio::time::timeout(Duration::from_secs(5), async {
                tokio::join!(waiting, renamer)
            })
            .await
            .expect("hints in time");
            let seen: BTreeSet<String> = hints.paths.iter().map(|p| p.escaped()).collect();
            assert!(
                seen.contains(&format!("d/{from}")) && seen.contains(&format!("d/{to}")),
                "round {round}: {seen:?}"
            );
        }
    }
}
