//! Watching a share for changes: inotify (through `notify`) turns file events into
//! [`ChangeHints`] for the controller. Events are hints, never facts (security.md rule 17): they
//! are coalesced into a bounded set of paths, and whatever cannot be described that way (an
//! overflowed event queue, too many paths, a directory that could not be watched) becomes
//! "rescan everything".
//!
//! The inotify watch limit (`fs.inotify.max_user_watches`) can be hit while a share is watched:
//! a new directory then gets no watch, and nothing inside it would ever be heard of again.
//! From then on the watcher keeps the directories that may lack a watch (the one `notify`
//! names, those created shortly before, which its failed batch skipped, and every one created
//! since) and hands them out every [`UNWATCHED_RESCAN`] for a targeted rescan, and `status`
//! says so ([`ShareWatcher::limit_problem`]).
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
use notify::event::{CreateKind, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher as _};
use std::collections::{BTreeSet, HashSet, VecDeque};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use vmsync_core::endpoint::{ChangeHints, ScanScope};
use vmsync_core::limits::MAX_SCAN_IGNORED;
use vmsync_core::path::RESERVED_NAME;
use vmsync_core::RelPath;

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

/// Shared between the notify callback thread and the consumer.
#[derive(Default)]
struct Shared {
    hints: Mutex<HintSet>,
    wake: tokio::sync::Notify,
    /// When the first half of a rename (its old name) was seen with no second half yet.
    half_move: Mutex<Option<Instant>>,
    unwatched: Mutex<Unwatched>,
}

/// How often directories that may lack a watch are rescanned, once the watch limit was hit.
pub const UNWATCHED_RESCAN: Duration = Duration::from_secs(10);

/// How long a new directory counts as "just created": `notify` adds the watches of one batch
/// of events in a row and stops at the first that hits the limit, so the directories created
/// just before the one it names may have none either.
const RECENT_DIR_WINDOW: Duration = Duration::from_secs(2);
/// At most this many recent directories are remembered (beyond, the oldest go).
const RECENT_DIRS_MAX: usize = 4096;

/// What the watcher knows about directories without a watch.
#[derive(Default)]
struct Unwatched {
    /// Why (set when the watch limit was first hit): shown in `status`.
    problem: Option<String>,
    /// Directories that may have no watch, coalesced; "everything" when there are too many.
    dirs: HintSet,
    /// Directories created in the last [`RECENT_DIR_WINDOW`], oldest first.
    recent: VecDeque<(Instant, RelPath)>,
}

impl Unwatched {
    /// A directory appeared (created, or moved in).
    fn dir_created(&mut self, path: RelPath, now: Instant) {
        if self.problem.is_some() {
            self.dirs.add(path);
            return;
        }
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RECENT_DIR_WINDOW)
            || self.recent.len() >= RECENT_DIRS_MAX
        {
            self.recent.pop_front();
        }
        self.recent.push_back((now, path));
    }

    /// What to rescan periodically; `None` before the watch limit was hit.
    fn hints(&self) -> Option<ChangeHints> {
        self.problem.as_ref()?;
        Some(ChangeHints {
            paths: self.dirs.paths.iter().cloned().collect(),
            rescan: self.dirs.rescan,
        })
    }

    /// The watch limit was hit at `failed` (where `notify` says; `None` when it does not).
    fn limit_hit(&mut self, failed: Option<RelPath>, why: String) {
        if self.problem.is_none() {
            self.problem = Some(format!(
                "inotify watch limit reached (fs.inotify.max_user_watches): directories created \
                 since are rescanned every {} s; raise the limit and restart the agent ({why})",
                UNWATCHED_RESCAN.as_secs()
            ));
        }
        match failed {
            Some(path) => self.dirs.add(path),
            None => self.dirs.add_rescan(),
        }
        for (_, path) in self.recent.drain(..) {
            self.dirs.add(path);
        }
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
    /// Shared with the thread that keeps the reserved directory unwatched
    /// ([`unwatch_reserved`]); dropping it stops that thread too.
    _watcher: Arc<Mutex<notify::RecommendedWatcher>>,
    /// The inotify descriptor `notify` opened for this watch, when it could be told apart:
    /// the kernel lists its watches in `/proc/self/fdinfo/<fd>` ([`ShareWatcher::watched_dirs`]).
    inotify_fd: Option<i32>,
    /// The last count read from there, and when.
    watched: Mutex<Option<(Instant, u64)>>,
    #[cfg(test)]
    root: PathBuf,
    #[cfg(test)]
    rules: SharedRules,
}

#[derive(Debug, thiserror::Error)]
#[error("watching {path}: {source}")]
pub struct WatchError {
    pub path: PathBuf,
    #[source]
    pub source: notify::Error,
}

impl WatchError {
    /// The inotify watch limit (`fs.inotify.max_user_watches`) was reached.
    pub fn is_watch_limit(&self) -> bool {
        is_limit(&self.source)
    }
}

impl ShareWatcher {
    /// Starts watching `root` recursively. Paths the rules say cannot sync are dropped.
    pub fn start(root: &Path, rules: SharedRules) -> Result<ShareWatcher, WatchError> {
        let shared = Arc::new(Shared::default());
        let cb_shared = shared.clone();
        let cb_root = root.to_path_buf();
        #[cfg(test)]
        let test_rules = rules.clone();
        // One watcher starts at a time, so the inotify descriptor that appears is this one's.
        let starting = STARTING
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let before = inotify_fds();
        let (reserved_seen, reserved_rx) = std::sync::mpsc::sync_channel::<()>(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(e) = &event {
                    if e.paths.iter().any(|p| in_reserved(&cb_root, p)) {
                        // Full: a drop of the watches is already due.
                        let _ = reserved_seen.try_send(());
                    }
                }
                on_event(&cb_shared, &cb_root, &rules, event);
            })
            .map_err(|source| WatchError {
                path: root.to_path_buf(),
                source,
            })?;
        let mut new_fds = inotify_fds()
            .difference(&before)
            .copied()
            .collect::<Vec<_>>();
        drop(starting);
        let inotify_fd = match new_fds.len() {
            1 => new_fds.pop(),
            _ => None,
        };
        watcher
            .watch(root, RecursiveMode::Recursive)
            .map_err(|source| WatchError {
                path: root.to_path_buf(),
                source,
            })?;
        let reserved = root.join(OsStr::from_bytes(RESERVED_NAME));
        // Not found: the share has no reserved directory yet.
        let _ = watcher.unwatch(&reserved);
        let watcher = Arc::new(Mutex::new(watcher));
        let weak = Arc::downgrade(&watcher);
        std::thread::Builder::new()
            .name("vmsync-unwatch".into())
            .spawn(move || unwatch_reserved(&weak, &reserved, &reserved_rx))
            .map_err(|e| WatchError {
                path: root.to_path_buf(),
                source: notify::Error::io(e),
            })?;
        Ok(ShareWatcher {
            shared,
            root_path: root.to_path_buf(),
            root_id: dir_id(root),
            _watcher: watcher,
            inotify_fd,
            watched: Mutex::new(None),
            #[cfg(test)]
            root: root.to_path_buf(),
            #[cfg(test)]
            rules: test_rules,
        })
    }

    /// Whether the root path names another directory than the one this watch started on (or
    /// none): the watch then hears nothing more of the share.
    pub fn root_replaced(&self) -> bool {
        dir_id(&self.root_path) != self.root_id
    }

    /// How many directories this watch covers now, as the kernel counts its inotify watches
    /// (the share's directories, ignored ones included: `notify` watches the whole tree but
    /// the reserved directory, see [`unwatch_reserved`]). Read at most every [`WATCHED_DIRS_EVERY`]: `wait` asks for the status
    /// every few milliseconds, and a big share's list is long. `None` when not known.
    pub fn watched_dirs(&self) -> Option<u64> {
        let fd = self.inotify_fd?;
        let mut cached = self.watched.lock().ok()?;
        if let Some((at, n)) = *cached {
            if at.elapsed() < WATCHED_DIRS_EVERY {
                return Some(n);
            }
        }
        let info = std::fs::read(format!("/proc/self/fdinfo/{fd}")).ok()?;
        let n = info
            .split(|&b| b == b'\n')
            .filter(|line| line.starts_with(b"inotify wd:"))
            .count() as u64;
        *cached = Some((Instant::now(), n));
        Some(n)
    }

    /// Why part of the share may be unwatched (the watch limit was hit while watching); `None`
    /// while every directory has its watch.
    pub fn limit_problem(&self) -> Option<String> {
        self.shared
            .unwatched
            .lock()
            .ok()
            .and_then(|u| u.problem.clone())
    }

    /// The directories that may lack a watch, for a periodic rescan (see the module docs);
    /// `None` while the watch limit has not been hit.
    pub fn unwatched(&self) -> Option<ChangeHints> {
        self.shared.unwatched.lock().ok()?.hints()
    }

    /// Feeds an event as if `notify` had sent it (tests: the watch limit cannot be reached on
    /// purpose without starving every other inotify user on the machine).
    #[cfg(test)]
    pub(crate) fn inject(&self, event: notify::Result<notify::Event>) {
        on_event(&self.shared, &self.root, &self.rules, event);
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

/// Keeps `notify` out of the share's reserved directory, for as long as the watcher lives.
/// Its recursive watch covers every directory beneath the root, and the trash gains
/// directories with every batch that keeps something: watched, each would cost an inotify
/// watch (the kernel's per-user limit, and memory in both the kernel and `notify`) and every
/// trash move an event, growing with the trash for as long as the agent runs. An event inside
/// the reserved directory (or for it, when it is made) means `notify` watches it: its watch
/// and every one beneath it are dropped here, since `notify` cannot be called from its own
/// callback.
fn unwatch_reserved(
    watcher: &std::sync::Weak<Mutex<notify::RecommendedWatcher>>,
    reserved: &Path,
    seen: &std::sync::mpsc::Receiver<()>,
) {
    while seen.recv().is_ok() {
        let Some(watcher) = watcher.upgrade() else {
            return;
        };
        let mut watcher = match watcher.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Not found: an event from before the last drop.
        let _ = watcher.unwatch(reserved);
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

/// Whether `path` is the root's reserved directory or inside it.
fn in_reserved(root: &Path, path: &Path) -> bool {
    path.strip_prefix(root)
        .ok()
        .and_then(|rel| rel.as_os_str().as_bytes().split(|&b| b == b'/').next())
        .is_some_and(|first| first == RESERVED_NAME)
}

/// Held while a watcher starts (see [`ShareWatcher::start`]).
static STARTING: Mutex<()> = Mutex::new(());

/// How long a count of [`ShareWatcher::watched_dirs`] is reused.
pub const WATCHED_DIRS_EVERY: Duration = Duration::from_millis(500);

/// This process's open inotify descriptors.
fn inotify_fds() -> HashSet<i32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return HashSet::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|target| target.as_os_str() == "anon_inode:inotify")
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Turns one `notify` event (or error) into hints, on the callback thread.
fn on_event(
    shared: &Shared,
    root: &Path,
    rules: &SharedRules,
    event: notify::Result<notify::Event>,
) {
    let mut hints = match shared.hints.lock() {
        Ok(h) => h,
        Err(poisoned) => poisoned.into_inner(),
    };
    let unwatched = || match shared.unwatched.lock() {
        Ok(u) => u,
        Err(poisoned) => poisoned.into_inner(),
    };
    match event {
        Ok(event) => {
            if let Ok(mut half) = shared.half_move.lock() {
                match event.kind {
                    EventKind::Modify(ModifyKind::Name(RenameMode::From)) => {
                        half.get_or_insert_with(Instant::now);
                    }
                    EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both)) => {
                        *half = None
                    }
                    _ => {}
                }
            }
            // Where `notify` places a new watch: a created directory, or anything moved in
            // (a file there costs a needless rescan at worst).
            let new_dir = matches!(
                event.kind,
                EventKind::Create(CreateKind::Folder)
                    | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
            );
            if new_dir {
                let now = Instant::now();
                let mut u = unwatched();
                // For a rename with both names, the new one is the last.
                if let Some(rel) = event.paths.last().and_then(|p| relative(root, p)) {
                    u.dir_created(rel, now);
                }
            }
            if event.need_rescan() {
                tracing::info!(root = %root.display(), "the kernel's event queue overflowed: the whole share is rescanned");
                hints.add_rescan();
            } else if !matches!(event.kind, EventKind::Access(_)) {
                let rules = match rules.read() {
                    Ok(r) => r,
                    Err(poisoned) => poisoned.into_inner(),
                };
                let attrs_only = matches!(event.kind, EventKind::Modify(ModifyKind::Metadata(_)));
                for path in &event.paths {
                    let rel = relative(root, path);
                    let Some(hint) = rel.clone().and_then(|rel| rules.hint_for(rel)) else {
                        continue;
                    };
                    // An ignore file's hint is its directory: never attributes only.
                    if attrs_only && rel.as_ref() == Some(&hint) {
                        hints.add_attrs(hint);
                    } else {
                        hints.add(hint);
                    }
                }
            }
        }
        // A watch that failed (a new directory past the watch limit, a queue overflow): rescan
        // everything now; past the watch limit, also keep rescanning what may lack a watch.
        Err(e) => {
            tracing::warn!(root = %root.display(), "watch error: {e}");
            if is_limit(&e) {
                let failed = e.paths.first().and_then(|p| relative(root, p));
                unwatched().limit_hit(failed, e.to_string());
            }
            hints.add_rescan();
        }
    }
    if !hints.is_empty() {
        shared.wake.notify_one();
    }
}

/// `notify`'s way of saying the inotify watch limit was reached.
fn is_limit(e: &notify::Error) -> bool {
    matches!(e.kind, notify::ErrorKind::MaxFilesWatch)
        || matches!(&e.kind, notify::ErrorKind::Io(io) if io.raw_os_error() == Some(28))
}

/// `path` relative to `root` as a `RelPath`; `None` outside the root, inside the reserved
/// directory, or not a valid share path.
fn relative(root: &Path, path: &Path) -> Option<RelPath> {
    let rel = path.strip_prefix(root).ok()?;
    let bytes = rel.as_os_str().as_bytes();
    if bytes.is_empty() {
        return Some(RelPath::root());
    }
    let first = bytes.split(|&b| b == b'/').next()?;
    if first == RESERVED_NAME {
        return None;
    }
    RelPath::from_bytes(OsStr::from_bytes(bytes).as_bytes()).ok()
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

    fn limit_error(path: &str) -> notify::Error {
        notify::Error::new(notify::ErrorKind::MaxFilesWatch).add_path(PathBuf::from(path))
    }

    fn created_dir(path: &str) -> notify::Event {
        notify::Event::new(EventKind::Create(CreateKind::Folder)).add_path(PathBuf::from(path))
    }

    /// Past the watch limit: the directory `notify` names, those created just before it (its
    /// batch skipped them) and every one created since are kept for periodic rescans; a
    /// directory created long before keeps its watch and is left out.
    #[test]
    fn the_watch_limit_keeps_what_may_lack_a_watch() {
        let shared = Shared::default();
        let rules: SharedRules = Arc::new(RwLock::new(WatchRules::new(Filter::none())));
        let root = Path::new("/s");
        let t0 = Instant::now();
        {
            let mut u = shared.unwatched.lock().unwrap();
            u.dir_created(p("old"), t0);
            assert_eq!(u.hints(), None, "nothing is unwatched before the limit");
        }
        // "old" is now outside the recent window.
        shared.unwatched.lock().unwrap().recent[0].0 = t0 - RECENT_DIR_WINDOW * 2;
        on_event(&shared, root, &rules, Ok(created_dir("/s/a/just-made")));
        on_event(&shared, root, &rules, Err(limit_error("/s/b")));
        let taken = shared.hints.lock().unwrap().take();
        assert!(taken.rescan, "the limit also asks for one full rescan now");
        on_event(&shared, root, &rules, Ok(created_dir("/s/c/later")));
        on_event(
            &shared,
            root,
            &rules,
            Ok(created_dir("/s/a/just-made/deeper")),
        );
        let u = shared.unwatched.lock().unwrap();
        assert!(u.problem.as_deref().unwrap().contains("max_user_watches"));
        let got: Vec<String> = u
            .hints()
            .unwrap()
            .paths
            .iter()
            .map(|p| p.escaped())
            .collect();
        assert_eq!(got, ["a/just-made", "b", "c/later"]);
    }

    /// The kernel's event queue overflowed (IN_Q_OVERFLOW: `notify` sends an event flagged
    /// `Rescan`), or the watch failed otherwise: what changed meanwhile is unknown, so the whole
    /// share is rescanned, and nothing is taken to lack a watch for good.
    #[test]
    fn a_queue_overflow_or_a_watch_error_asks_for_a_full_rescan() {
        let shared = Shared::default();
        let rules: SharedRules = Arc::new(RwLock::new(WatchRules::new(Filter::none())));
        let root = Path::new("/s");
        let overflow = notify::Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        on_event(&shared, root, &rules, Ok(overflow));
        let taken = shared.hints.lock().unwrap().take();
        assert!(taken.rescan);
        assert!(taken.paths.is_empty());
        let failed = notify::Error::generic("inotify read failed").add_path(PathBuf::from("/s/d"));
        on_event(&shared, root, &rules, Err(failed));
        assert!(shared.hints.lock().unwrap().take().rescan);
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
    fn the_root_or_the_reserved_dir() {
        let mut h = HintSet::default();
        h.add(RelPath::root());
        assert!(h.take().rescan);
        let root = Path::new("/s");
        assert_eq!(relative(root, Path::new("/s/.vmsync/tmp/t.1")), None);
        assert_eq!(relative(root, Path::new("/other/x")), None);
        assert_eq!(relative(root, Path::new("/s/a/b")), Some(p("a/b")));
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
                tokio::time::sleep(WATCHED_DIRS_EVERY + Duration::from_millis(50)).await;
                let n = w.watched_dirs().expect("the watch's inotify descriptor");
                if n == want || Instant::now() > deadline {
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
