//! [`LocalEndpoint`]: the [`Endpoint`] over a [`LocalShare`]. Each call runs the share's
//! blocking work on tokio's blocking pool (or on the calling thread, see
//! [`LocalEndpoint::on_calling_thread`]); [`Endpoint::changes`] runs the share's watcher and
//! turns what it hears into change hints.

use super::LocalShare;
use crate::echoes::Echoes;
use crate::filter::Filter;
use crate::gitignore::RulesCache;
use crate::index::FileIndex;
use crate::links::LinkMap;
use crate::reuse::ZeroChunks;
use crate::seal::Sealer;
use crate::state::StateDb;
use crate::trash::{KeptLog, Pruner, Retention, TrashTotals};
use crate::watch::{ShareWatcher, SharedRules, WatchRules};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vmsync_core::endpoint::{
    Change, ChangeHints, ChunkData, ChunkRead, DeltaRead, Endpoint, EndpointError, MissingChunk,
    NotStaged, Outcome, Problem, ScanOptions, ScanReport, ScanScope, StageRequest,
};
use vmsync_core::progress::SyncState;
use vmsync_core::reserve::MinFree;
use vmsync_core::{Entry, FileMeta, Hash, Manifest, RelPath};

/// A cloneable handle on a [`LocalShare`] that implements [`Endpoint`].
#[derive(Clone)]
pub struct LocalEndpoint {
    pub(super) inner: Arc<Mutex<LocalShare>>,
    watch: Arc<WatchState>,
    /// Run share work on the calling thread; see [`LocalEndpoint::on_calling_thread`].
    inline: bool,
    /// Told what the host says of the share's sync ([`Endpoint::note_sync`]).
    sync_observer: Arc<Mutex<Option<SyncObserver>>>,
}

/// Hears the share's sync state as the host tells it (see [`LocalEndpoint::observe_sync`]).
pub type SyncObserver = Arc<dyn Fn(SyncState) + Send + Sync>;

/// The share's watcher, started by the first [`Endpoint::changes`] call.
struct WatchState {
    /// The running watch; replaced when the share's root is (see [`ShareWatcher::root_replaced`]).
    watcher: Mutex<Option<Arc<ShareWatcher>>>,
    /// The share's ignore rules, as the watcher reads them.
    rules: SharedRules,
    /// Why watching is not possible (shown in status); changes then come as periodic rescans.
    failed: Mutex<Option<String>>,
    /// When the watched root is next checked for having been replaced.
    root_check_next: Mutex<Option<std::time::Instant>>,
    /// When the directories that may lack a watch are rescanned next (past the watch limit).
    unwatched_next: Mutex<Option<std::time::Instant>>,
    /// How often that is: [`crate::watch::UNWATCHED_RESCAN`] (tests shorten it).
    unwatched_every: std::time::Duration,
}

impl WatchState {
    fn current(&self) -> Option<Arc<ShareWatcher>> {
        self.watcher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn root_check_due(&self) -> std::time::Instant {
        *self
            .root_check_next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert_with(|| std::time::Instant::now() + ROOT_CHECK_EVERY)
    }

    fn root_checked(&self) {
        *self
            .root_check_next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(std::time::Instant::now() + ROOT_CHECK_EVERY);
    }

    fn set(&self, watcher: Option<Arc<ShareWatcher>>) {
        *self
            .watcher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = watcher;
    }

    fn unwatched_due(&self) -> std::time::Instant {
        let mut next = self
            .unwatched_next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *next.get_or_insert_with(|| std::time::Instant::now() + self.unwatched_every)
    }

    fn unwatched_done(&self) {
        let mut next = self
            .unwatched_next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *next = Some(std::time::Instant::now() + self.unwatched_every);
    }
}

/// Most staged files held open at once until [`LocalEndpoint::set_max_staged`] says
/// otherwise: a quarter of the usual soft fd limit (1024).
const DEFAULT_MAX_STAGED: usize = 256;

/// With no watch (inotify limit reached), how often the whole share is rescanned instead.
const UNWATCHED_RESCAN_MS: u64 = 10_000;

/// How often a watched share's root is checked for having been replaced.
const ROOT_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl LocalEndpoint {
    /// Opens the share `name` at `path`, loading its index from `db`. The root itself is
    /// opened at each scan, so a root that is missing now is reported then, not here.
    pub fn new(
        name: &str,
        path: PathBuf,
        filter: Filter,
        db: Arc<StateDb>,
    ) -> Result<LocalEndpoint, crate::state::StateError> {
        let index = FileIndex::open(db.clone(), name)?;
        let watch_rules = Arc::new(std::sync::RwLock::new(WatchRules::new(filter.clone())));
        let watch = WatchState {
            watcher: Mutex::new(None),
            rules: watch_rules.clone(),
            failed: Mutex::new(None),
            root_check_next: Mutex::new(None),
            unwatched_next: Mutex::new(None),
            unwatched_every: crate::watch::UNWATCHED_RESCAN,
        };
        let share = LocalShare {
            name: name.to_string(),
            path,
            root: None,
            lock: None,
            filter,
            rules: RulesCache::default(),
            watch_rules,
            index,
            links: LinkMap::default(),
            to_link: Vec::new(),
            staged: HashMap::new(),
            wanted: HashMap::new(),
            bases: HashMap::new(),
            echoes: Echoes::default(),
            dir_echoes: Echoes::default(),
            files_hashed: 0,
            sealer: Sealer::new(),
            kept: KeptLog::default(),
            trashed: Vec::new(),
            pruner: None,
            share_bytes: Arc::new(AtomicU64::new(0)),
            trash_totals: Arc::new(TrashTotals::default()),
            faulted: HashMap::new(),
            min_free: MinFree::default(),
            zeros: ZeroChunks::default(),
            max_staged: DEFAULT_MAX_STAGED,
        };
        Ok(LocalEndpoint {
            inner: Arc::new(Mutex::new(share)),
            watch: Arc::new(watch),
            inline: false,
            sync_observer: Arc::new(Mutex::new(None)),
        })
    }

    /// Does the share's (blocking) work on the thread that awaits it, where tokio allows that
    /// (a multi-threaded runtime; it hands the thread's other tasks to another one), instead of
    /// on a blocking-pool thread. That saves two thread switches a call, most of a live edit's
    /// round trip on a VM. Only for a caller that awaits one call at a time, like the guest's
    /// request loop: the host's controller overlaps a local call with a remote one (`join!`),
    /// and a call that blocks while being polled would hold the remote one back.
    pub fn on_calling_thread(mut self) -> Self {
        self.inline = true;
        self
    }

    /// Calls `observer` with every sync state the host tells this share (the guest's
    /// readiness, see docs/cli.md, "Readiness"). Replaces an earlier observer.
    pub fn observe_sync(&self, observer: SyncObserver) {
        if let Ok(mut o) = self.sync_observer.lock() {
            *o = Some(observer);
        }
    }

    /// Regular files and their total size, as the index last saw them.
    pub fn indexed_totals(&self) -> (u64, u64) {
        self.inner
            .lock()
            .map_or((0, 0), |s| (s.index.len(), s.index.bytes()))
    }

    /// Starts pruning this share's trash in the background with `retention` (once; later
    /// calls do nothing).
    pub fn set_retention(&self, retention: Retention) {
        let Ok(mut s) = self.inner.lock() else {
            return;
        };
        if s.pruner.is_some() {
            return;
        }
        s.share_bytes.store(s.index.bytes(), Ordering::Relaxed);
        match Pruner::spawn(
            s.name.clone(),
            s.path.clone(),
            retention,
            s.share_bytes.clone(),
            s.trash_totals.clone(),
        ) {
            Ok(p) => s.pruner = Some(p),
            Err(e) => tracing::warn!(share = %s.name, "cannot start the trash pruner: {e}"),
        }
    }

    /// Files and bytes in the share's trash, as the pruner last measured them.
    pub fn trash_totals(&self) -> (u64, u64) {
        self.inner.lock().map_or((0, 0), |s| s.trash_totals.get())
    }

    /// Files read and hashed by scans since this endpoint was opened.
    pub fn files_hashed(&self) -> u64 {
        self.inner.lock().map_or(0, |s| s.files_hashed)
    }

    /// True once the watcher runs.
    pub fn is_watching(&self) -> bool {
        self.watch.current().is_some()
    }

    /// Directories the running watch covers, as the kernel counts them (0 when not watching).
    pub fn watched_dirs(&self) -> u64 {
        self.watch
            .current()
            .and_then(|w| w.watched_dirs())
            .unwrap_or(0)
    }

    /// Why this share cannot be watched (it is then rescanned every
    /// [`UNWATCHED_RESCAN_MS`]), or not all of it (the watch limit was hit while watching:
    /// what may lack a watch is rescanned every [`crate::watch::UNWATCHED_RESCAN`]); `None`
    /// while watching works or has not started.
    pub fn watch_problem(&self) -> Option<String> {
        if let Some(problem) = self.watch.current().and_then(|w| w.limit_problem()) {
            return Some(problem);
        }
        self.watch.failed.lock().ok().and_then(|f| f.clone())
    }

    /// Sets the free space to keep on the share's filesystem: below it, `stage` and `supply`
    /// refuse with [`EndpointError::DiskFull`] (see `docs/safety.md`).
    /// Most files the share holds staged (each an open descriptor) at once; past it, `stage`
    /// answers "no room" and the controller commits what waits first.
    pub fn set_max_staged(&self, max: usize) {
        if let Ok(mut s) = self.inner.lock() {
            s.max_staged = max.max(1);
        }
    }

    pub fn set_min_free(&self, min_free: MinFree) {
        if let Ok(mut s) = self.inner.lock() {
            s.min_free = min_free;
        }
    }

    /// Replaces the ignore rules (the guest learns the host's at handshake), for scans and
    /// for a running watch alike.
    pub fn set_filter(&self, filter: Filter) {
        if let Ok(mut w) = self.watch.rules.write() {
            w.set_filter(filter.clone());
        }
        if let Ok(mut s) = self.inner.lock() {
            s.filter = filter;
        }
    }

    async fn run<T, F>(&self, f: F) -> Result<T, EndpointError>
    where
        T: Send + 'static,
        F: FnOnce(&mut LocalShare) -> Result<T, EndpointError> + Send + 'static,
    {
        let inner = self.inner.clone();
        let work = move || {
            let mut share = inner.lock().map_err(|_| {
                EndpointError::Io("share state poisoned by an earlier panic".into())
            })?;
            f(&mut share)
        };
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if self.inline && multi_thread {
            return tokio::task::block_in_place(work);
        }
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| EndpointError::Io(format!("share worker failed: {e}")))?
    }
}

impl Endpoint for LocalEndpoint {
    async fn scan(
        &mut self,
        scope: ScanScope,
        options: ScanOptions,
    ) -> Result<ScanReport, EndpointError> {
        self.run(move |s| s.scan(&scope, &options)).await
    }

    async fn manifests(
        &mut self,
        files: Vec<(RelPath, FileMeta)>,
    ) -> Result<Vec<Result<Manifest, Problem>>, EndpointError> {
        self.run(move |s| Ok(s.manifests(files))).await
    }

    async fn read_chunks(
        &mut self,
        reads: Vec<ChunkRead>,
    ) -> Result<Vec<Option<Vec<u8>>>, EndpointError> {
        self.run(move |s| s.read_chunks(reads)).await
    }

    async fn read_deltas(
        &mut self,
        reads: Vec<DeltaRead>,
    ) -> Result<Vec<Option<ChunkData>>, EndpointError> {
        self.run(move |s| s.read_deltas(reads)).await
    }

    async fn stage(
        &mut self,
        files: Vec<StageRequest>,
    ) -> Result<Vec<Result<Vec<MissingChunk>, NotStaged>>, EndpointError> {
        self.run(move |s| s.stage(files)).await
    }

    async fn supply(&mut self, chunks: Vec<(Hash, ChunkData)>) -> Result<Vec<Hash>, EndpointError> {
        self.run(move |s| s.supply(chunks)).await
    }

    async fn transition(&mut self, changes: Vec<Change>) -> Result<Vec<Outcome>, EndpointError> {
        self.run(move |s| s.transition(changes)).await
    }

    async fn put_back(
        &mut self,
        items: Vec<(RelPath, Entry)>,
    ) -> Result<Vec<Outcome>, EndpointError> {
        self.run(move |s| s.put_back(items)).await
    }

    async fn mark(&mut self, generation: u64) -> Result<(), EndpointError> {
        self.run(move |s| s.mark(generation)).await
    }

    async fn note_sync(&mut self, state: SyncState) -> Result<(), EndpointError> {
        let observer = self.sync_observer.lock().ok().and_then(|o| o.clone());
        if let Some(observer) = observer {
            observer(state);
        }
        Ok(())
    }

    async fn changes(&mut self) -> Result<ChangeHints, EndpointError> {
        while let Some(watcher) = self.watch.current() {
            loop {
                let (hints, attrs) = match watcher.unwatched() {
                    // Every ROOT_CHECK_EVERY (on a clock of its own, so a stream of hints
                    // cannot put it off), whether the root is still the one watched: a root
                    // removed (or moved away) and made again is a new directory, which the old
                    // watch never hears of.
                    None => tokio::select! {
                        taken = watcher.next_with_attrs() => taken,
                        () = tokio::time::sleep_until(self.watch.root_check_due().into()) => {
                            self.watch.root_checked();
                            if watcher.root_replaced() {
                                tracing::info!("the share's root was replaced: watching it anew");
                                self.watch.set(None);
                                break;
                            }
                            continue;
                        }
                    },
                    // Past the watch limit: hints as they come, and every so often a rescan of
                    // what may lack a watch (on a clock of its own, so a stream of hints
                    // cannot put it off).
                    Some(dirs) => {
                        let due = self.watch.unwatched_due();
                        tokio::select! {
                            taken = watcher.next_with_attrs() => taken,
                            () = tokio::time::sleep_until(due.into()) => {
                                self.watch.unwatched_done();
                                return Ok(dirs);
                            }
                        }
                    }
                };
                // Filtering waits for the share (a transition may hold it). Cancelled meanwhile
                // (a long-poll's timeout), the hints go back to the watcher, not astray.
                let mut all = hints.clone();
                crate::watch::merge_attrs(&mut all, attrs.clone());
                let mut pending = Requeue {
                    watcher: &watcher,
                    hints: Some(all),
                };
                let hints = self
                    .run(move |s| {
                        let hints = s.drop_echoes(hints, attrs);
                        Ok(s.with_other_names(hints))
                    })
                    .await?;
                pending.hints = None;
                if !hints.is_empty() {
                    return Ok(hints);
                }
            }
        }
        let unwatched = self
            .watch
            .failed
            .lock()
            .map(|f| f.is_some())
            .unwrap_or(true);
        let mut failed_before = None;
        if unwatched {
            tokio::time::sleep(std::time::Duration::from_millis(UNWATCHED_RESCAN_MS)).await;
            // Try again at every periodic rescan: a share root missing at start may be there
            // now, or the watch limit raised. What fails the same way is not logged again.
            failed_before = self.watch.failed.lock().ok().and_then(|f| f.clone());
        }
        let path =
            self.inner.lock().map(|s| s.path.clone()).map_err(|_| {
                EndpointError::Io("share state poisoned by an earlier panic".into())
            })?;
        let rules = self.watch.rules.clone();
        let started = tokio::task::spawn_blocking(move || ShareWatcher::start(&path, rules))
            .await
            .map_err(|e| EndpointError::Io(format!("starting the watcher: {e}")))?;
        match started {
            Ok(w) => {
                self.watch.set(Some(Arc::new(w)));
                if let Ok(mut f) = self.watch.failed.lock() {
                    if f.take().is_some() {
                        tracing::info!("watching the share live again");
                    }
                }
            }
            Err(e) => {
                let why = if e.is_watch_limit() {
                    format!("inotify watch limit reached (fs.inotify.max_user_watches); rescanning every {} s instead: {e}", UNWATCHED_RESCAN_MS / 1000)
                } else {
                    format!(
                        "cannot watch; rescanning every {} s instead: {e}",
                        UNWATCHED_RESCAN_MS / 1000
                    )
                };
                if failed_before.as_deref() != Some(why.as_str()) {
                    tracing::warn!("{why}");
                }
                if let Ok(mut f) = self.watch.failed.lock() {
                    *f = Some(why);
                }
            }
        }
        // Whatever happened before the watch began is unknown: rescan everything once.
        Ok(ChangeHints {
            paths: Vec::new(),
            rescan: true,
        })
    }
}

/// Hands hints back to the watcher if dropped while still holding them.
struct Requeue<'a> {
    watcher: &'a ShareWatcher,
    hints: Option<ChangeHints>,
}

impl Drop for Requeue<'_> {
    fn drop(&mut self) {
        if let Some(hints) = self.hints.take() {
            self.watcher.requeue(hints);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Past the watch limit, `changes` keeps coming back, every so often, with the directories
    /// that may lack a watch, even when nothing is heard; and `status` says why.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn past_the_watch_limit_unwatched_directories_are_rescanned_periodically() {
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir_all(share.join("b")).unwrap();
        let db = Arc::new(StateDb::open(dir.path(), "state.redb").unwrap());
        let mut ep = LocalEndpoint::new("s", share.clone(), Filter::none(), db).unwrap();
        Arc::get_mut(&mut ep.watch).unwrap().unwatched_every = Duration::from_millis(200);
        assert!(
            ep.changes().await.unwrap().rescan,
            "the first call starts the watch"
        );
        assert_eq!(ep.watch_problem(), None);
        let watcher = ep.watch.current().unwrap();
        watcher.inject(crate::watch::Heard::Unwatched {
            dir: RelPath::from_bytes(b"b").unwrap(),
            limit: true,
            why: "No space left on device".into(),
        });
        let first = ep.changes().await.unwrap();
        assert_eq!(
            first.paths,
            [RelPath::from_bytes(b"b").unwrap()],
            "rescanned now"
        );
        assert!(ep.watch_problem().unwrap().contains("max_user_watches"));
        let b = RelPath::from_bytes(b"b").unwrap();
        for _ in 0..2 {
            let hints = tokio::time::timeout(Duration::from_secs(5), ep.changes())
                .await
                .expect("a periodic rescan with nothing heard")
                .unwrap();
            assert_eq!(hints.paths, vec![b.clone()]);
            assert!(!hints.rescan);
        }
    }
}
