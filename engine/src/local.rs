//! The local side of a share: implements [`Endpoint`] over a directory on this machine.
//! The host uses it for its own share; the guest serves it to the host over the wire.
//!
//! Staging: `stage` builds each incoming file in a temp file in the share's reserved directory
//! from chunks found locally (verified on read), `supply` writes the rest (verified against
//! their ids), and `transition` checks the target still is what the scan saw, then renames the
//! temp into place (see [`ShareRoot::commit_temp`]). A staged file's digest is verified by
//! construction: its manifest must hash to the file digest and every chunk to its id.
//!
//! Deltas: when a file being staged replaces one this side already has at that path, `stage`
//! offers, for each missing chunk where the old file probably holds similar bytes, a base: the
//! signature of those old bytes ([`vmsync_core::delta::base_windows`] picks them). As a source,
//! `read_deltas` answers such a read with a delta when that is smaller than the chunk. `supply`
//! re-reads the base (it is not kept in memory), applies the delta and verifies the result
//! against the chunk id; one that does not verify stays missing, for the controller to send
//! whole.
//!
//! Early sealing: the moment a staged file is complete (`stage` found every chunk locally, or
//! `supply` wrote its last missing one), its seal (mode, mtime, fsync) goes to the share's
//! background [`Sealer`], so the disk flush overlaps the rest of the transfer; except for a
//! lone file that completes the transfer (a live edit), which its transition seals without a
//! thread hand-off. `transition`
//! then only waits for seals still running (and runs itself those not yet started), and renames
//! a temp only once its seal succeeded. Dropping a staged file drops its [`SealHandle`], which
//! cancels the seal (or throws its result away).
//!
//! The trash: nothing a transition deletes or replaces is unlinked. A file or symlink being
//! deleted is moved into the share's trash, one being replaced is linked there first
//! ([`ShareRoot::trash_remove`], [`ShareRoot::trash_link`]); if it cannot be kept, the change
//! fails. Recent moves are remembered for `put_back`, and a background [`Pruner`] applies the
//! share's retention (see [`crate::trash`] and docs/safety.md).
//!
//! All filesystem work is blocking; each call runs on tokio's blocking pool.

use crate::chunk::hash_chunk;
use crate::echoes::Echoes;
use crate::faults::{fault_reason, io_reason, FaultOp};
use crate::filter::Filter;
use crate::gitignore::RulesCache;
use crate::index::{FileIndex, Identity, IndexRecord};
use crate::links::LinkMap;
use crate::reuse::{Plan, ZeroChunks};
use crate::root::{FileKind, FsError, FsErrorKind, SealJob, Sealed, ShareRoot, TempFile};
use crate::scan::{hash_file, scan};
use crate::seal::{SealHandle, Sealer};
use crate::state::StateDb;
use crate::trash::{KeptLog, Pruner, Retention, TrashTotals};
use crate::watch::{ShareWatcher, SharedRules, WatchRules};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vmsync_core::delta;
use vmsync_core::endpoint::{
    Change, ChangeHints, ChunkData, ChunkRead, DeltaRead, Endpoint, EndpointError, MissingChunk,
    NotStaged, Outcome, Problem, RootId, ScanOptions, ScanReport, ScanScope, StageRequest,
};
use vmsync_core::entry::PERM_MASK;
use vmsync_core::limits::CHUNK_MAX_BYTES;
use vmsync_core::reserve::MinFree;
use vmsync_core::{Entry, FileMeta, Hash, Manifest, RelPath, Timestamp};

/// A file being built for a later transition.
struct Staged {
    temp: TempFile,
    meta: FileMeta,
    manifest: Manifest,
    /// Chunk id → offsets in the temp file still waiting for data.
    missing: HashMap<Hash, Vec<u64>>,
    /// The seal submitted once `missing` became empty (`None` before, or if it could not be
    /// submitted: `transition` then seals the temp itself).
    seal: Option<SealHandle>,
    /// Staged as an append to the old version (see [`crate::reuse`]): the temp holds only
    /// `[from, size)`, and must never be renamed into place before its head is filled.
    append: Option<StagedAppend>,
}

/// What an append-staged file needs at its transition.
#[derive(Debug, Clone, Copy)]
struct StagedAppend {
    /// Where the staged bytes start (the old last chunk's offset).
    from: u64,
    old_size: u64,
    /// The digest of the old version the plan was made against.
    old_digest: Hash,
    /// The old last chunk, which the new bytes at `from` must be (unless known to be).
    verify: Option<(Hash, u32)>,
}

impl Staged {
    /// Hands this complete file's seal to `sealer`. A failure to hand it over (no descriptor
    /// for the job's `dup`) only means `transition` will seal it itself.
    fn seal_early(&mut self, sealer: &mut Sealer, path: &RelPath) {
        match self.temp.seal_job(self.meta.mode, self.meta.mtime) {
            Ok(job) => self.seal = Some(sealer.submit(job)),
            Err(e) => {
                tracing::debug!(path = %path.escaped(), "sealing at the transition instead: {e}");
            }
        }
    }
}

/// Old bytes offered as the base for a missing chunk: re-read when its delta arrives.
struct Base {
    path: RelPath,
    offset: u64,
    len: u64,
    /// The length of the chunk the delta must rebuild.
    chunk_len: u32,
}

/// Most signature bytes one `stage` call offers, summed over its files: bounds the answer
/// (and the source's work) when many big files were rewritten wholesale.
const MAX_STAGE_SIGNATURE_BYTES: usize = 8 << 20;
/// Whether [`Endpoint::mark`] fdatasyncs the generation file (and fsyncs `.vmsync/`): see
/// `docs/safety.md`, "Snapshot reverts", for what a guest crash does either way.
const MARK_FSYNC: bool = false;

/// One share directory on this machine.
pub struct LocalShare {
    name: String,
    path: PathBuf,
    root: Option<ShareRoot>,
    filter: Filter,
    /// The tree's compiled ignore files, kept between scans.
    rules: RulesCache,
    /// What the watcher knows of the ignore rules; scans keep it current.
    watch_rules: SharedRules,
    index: FileIndex,
    /// Which files here are hard links of each other, as scans and transitions saw them.
    links: LinkMap,
    /// Files the current transition committed whose source has other names for them: linked
    /// to those names here once the transition's changes are all in place.
    to_link: Vec<(RelPath, Vec<RelPath>)>,
    db: Arc<StateDb>,
    staged: HashMap<RelPath, Staged>,
    /// Chunk id → staged paths waiting for it.
    wanted: HashMap<Hash, Vec<RelPath>>,
    /// Chunk id → the base offered for it (only for wanted chunks).
    bases: HashMap<Hash, Base>,
    /// What this side's own transitions left at a path: a file of this identity, or (`None`)
    /// nothing. A watcher hint for such a path that still finds exactly that is our own echo,
    /// and is not passed on (see [`LocalShare::drop_echoes`]).
    /// Remembered for a short while only (see `engine/src/echoes.rs`).
    echoes: Echoes,
    /// Directories whose time this side's own transitions put back (see [`ParentTimes`]),
    /// with the identity they were left with: a watcher hint for only their attributes that
    /// still finds them so is an echo too.
    dir_echoes: HashMap<RelPath, Identity>,
    /// Files read and hashed by scans since start (a restart with nothing changed adds none).
    files_hashed: u64,
    /// Seals complete staged files in the background (see the module docs).
    sealer: Sealer,
    /// Recent trash moves, for `put_back`.
    kept: KeptLog,
    /// What the running transition kept in the trash, by batch (files, bytes): told to the
    /// pruner after it.
    trashed: Vec<(String, u64, u64)>,
    /// The share's trash pruner, once retention is set ([`LocalEndpoint::set_retention`]).
    pruner: Option<Pruner>,
    /// The bytes of the indexed files, for the pruner's percentage limit.
    share_bytes: Arc<AtomicU64>,
    /// What the trash holds, as the pruner last measured it.
    trash_totals: Arc<TrashTotals>,
    /// Staged files dropped by a filesystem fault (a failed write or fsync), and why: their
    /// transition fails with that reason, and their temp is already gone.
    faulted: HashMap<RelPath, String>,
    /// The free space this side keeps on the share's filesystem (`min_free`).
    min_free: MinFree,
    /// Ids of all-zero chunks, which are never written (they stay holes).
    zeros: ZeroChunks,
}

/// A cloneable handle on a [`LocalShare`] that implements [`Endpoint`].
#[derive(Clone)]
pub struct LocalEndpoint {
    inner: Arc<Mutex<LocalShare>>,
    watch: Arc<WatchState>,
    /// Run share work on the calling thread; see [`LocalEndpoint::on_calling_thread`].
    inline: bool,
}

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
        let index = FileIndex::from_records(db.load_index(name)?);
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
            filter,
            rules: RulesCache::default(),
            watch_rules,
            index,
            links: LinkMap::default(),
            to_link: Vec::new(),
            db,
            staged: HashMap::new(),
            wanted: HashMap::new(),
            bases: HashMap::new(),
            echoes: Echoes::default(),
            dir_echoes: HashMap::new(),
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
        };
        Ok(LocalEndpoint {
            inner: Arc::new(Mutex::new(share)),
            watch: Arc::new(watch),
            inline: false,
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

    /// Regular files and their total size, as the index last saw them.
    pub fn indexed_totals(&self) -> (u64, u64) {
        self.inner.lock().map_or((0, 0), |s| {
            s.index
                .records()
                .fold((0, 0), |(n, b), r| (n + 1, b + r.meta.size))
        })
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

fn io_err(e: impl std::fmt::Display) -> EndpointError {
    EndpointError::Io(e.to_string())
}

impl LocalShare {
    fn root(&self) -> Result<&ShareRoot, EndpointError> {
        self.root
            .as_ref()
            .ok_or_else(|| EndpointError::Protocol("share used before its first scan".into()))
    }

    fn open_root(&mut self) -> Result<(), EndpointError> {
        let shown = self.path.display().to_string();
        match ShareRoot::open(&self.path) {
            Ok(root) => {
                if let Err(e) = root.clean_temps() {
                    tracing::warn!(share = %self.name, "cleaning stale temp files: {e}");
                }
                self.root = Some(root);
                Ok(())
            }
            Err(e) => {
                self.root = None;
                Err(match e.kind() {
                    FsErrorKind::NotFound => EndpointError::RootMissing(shown),
                    FsErrorKind::Symlink | FsErrorKind::NotADirectory => {
                        EndpointError::RootNotDir(shown)
                    }
                    _ => EndpointError::Io(format!("{shown}: {e}")),
                })
            }
        }
    }

    fn scan(
        &mut self,
        scope: &ScanScope,
        options: &ScanOptions,
    ) -> Result<ScanReport, EndpointError> {
        // Re-open the root on every full scan: a root replaced or remounted since must be seen
        // as such, not through an old directory fd.
        if self.root.is_none() || *scope == ScanScope::Full {
            self.discard_staged();
            self.open_root()?;
        }
        let root = self.root()?;
        let (dev, ino) = root.dev_ino();
        let marker = match root.read_marker().map_err(io_err)? {
            Some(m) => Some(m),
            None if options.create_marker => {
                let mut id = [0u8; 16];
                rustix::rand::getrandom(&mut id, rustix::rand::GetRandomFlags::empty())
                    .map_err(io_err)?;
                root.write_marker(id).map_err(io_err)?;
                Some(id)
            }
            None => None,
        };
        let generation = root.read_generation().map_err(io_err)?;
        if let Ok(mut w) = self.watch_rules.write() {
            w.rescanning(scope);
        }
        let out = scan(root, &self.filter, &self.index, &self.rules, scope);
        let out = out.map_err(|e| match e.kind() {
            FsErrorKind::NotFound => EndpointError::RootMissing(self.path.display().to_string()),
            _ => io_err(e),
        })?;
        if let Ok(mut w) = self.watch_rules.write() {
            w.ignored_dirs_found(&out.ignored_dirs);
        }
        match scope {
            ScanScope::Full => self.links.clear(),
            ScanScope::Paths(paths) => paths.iter().for_each(|p| self.links.forget_under(p)),
        }
        for (path, inode) in &out.linked {
            self.links.set(path, Some(*inode));
        }
        for path in &out.gone {
            self.index.remove(path);
        }
        for (path, rec) in &out.hashed {
            self.index.insert(path.clone(), rec.clone());
        }
        self.find_other_names(&out.linked);
        self.files_hashed += out.hashed.len() as u64;
        let changes = out
            .gone
            .iter()
            .map(|p| (p, None))
            .chain(out.hashed.iter().map(|(p, r)| (p, Some(r))));
        self.db.update_index(&self.name, changes).map_err(io_err)?;
        Ok(ScanReport {
            root: Some(RootId {
                marker: marker.unwrap_or(RootId::NO_MARKER),
                dev,
                ino,
            }),
            entries: out.entries,
            problems: out.problems,
            ignored: out.ignored,
            generation,
        })
    }

    fn mark(&mut self, generation: u64) -> Result<(), EndpointError> {
        self.root()?
            .write_generation(generation, MARK_FSYNC)
            .map_err(io_err)
    }

    fn manifests(&mut self, files: Vec<(RelPath, FileMeta)>) -> Vec<Result<Manifest, Problem>> {
        files
            .into_iter()
            .map(|(path, meta)| match self.index.get(&path) {
                Some(rec) if rec.meta.digest == meta.digest && rec.meta.size == meta.size => {
                    let mut manifest = rec.manifest();
                    manifest.links = self.links.others(&path);
                    Ok(manifest)
                }
                _ => Err(Problem {
                    path,
                    reason: "changed since it was scanned".into(),
                }),
            })
            .collect()
    }

    fn read_chunks(
        &mut self,
        reads: Vec<ChunkRead>,
    ) -> Result<Vec<Option<Vec<u8>>>, EndpointError> {
        let root = self.root()?;
        let mut files = OpenFiles::default();
        Ok(reads
            .into_iter()
            .map(|r| files.read_verified(root, &r.path, r.chunk.offset, r.chunk.len, &r.chunk.hash))
            .collect())
    }

    fn read_deltas(
        &mut self,
        reads: Vec<DeltaRead>,
    ) -> Result<Vec<Option<ChunkData>>, EndpointError> {
        let root = self.root()?;
        let mut files = OpenFiles::default();
        Ok(reads
            .into_iter()
            .map(|DeltaRead { read: r, base }| {
                let data = files.read_verified(
                    root,
                    &r.path,
                    r.chunk.offset,
                    r.chunk.len,
                    &r.chunk.hash,
                )?;
                // A signature this side cannot use (malformed, hostile) just means "whole".
                let delta = base
                    .and_then(|b| delta::parse_signature(b).ok())
                    .and_then(|sig| delta::delta(&sig, &data));
                Some(match delta {
                    Some(d) => ChunkData::Delta(d),
                    None => ChunkData::Whole(data),
                })
            })
            .collect())
    }

    /// Refuses new content that would take the share's filesystem below its reserve.
    fn check_room(&self, incoming: u64) -> Result<(), EndpointError> {
        let root = self.root()?;
        let Ok((free, total)) = root.space() else {
            return Ok(());
        };
        let left = free.saturating_sub(incoming);
        match self.min_free.shortfall(left, total) {
            Some(reserve) => Err(EndpointError::DiskFull {
                free: left,
                reserve,
            }),
            None => Ok(()),
        }
    }

    fn stage(
        &mut self,
        files: Vec<StageRequest>,
    ) -> Result<Vec<Result<Vec<MissingChunk>, NotStaged>>, EndpointError> {
        // Sizes claimed by the peer: an upper bound of what this batch writes.
        let incoming = files
            .iter()
            .fold(0u64, |n, f| n.saturating_add(f.meta.size));
        self.check_room(incoming)?;
        // A file that completed a transfer alone was left for its transition to seal (see
        // `seal_early`); a new batch starting first means that transition is not next (the
        // controller commits a batch after filling the one after it): seal it meanwhile.
        let left: Vec<RelPath> = self
            .staged
            .iter()
            .filter(|(_, s)| {
                s.missing.is_empty()
                    && s.seal.is_none()
                    && !s.temp.is_sealed(s.meta.mode, s.meta.mtime)
            })
            .map(|(p, _)| p.clone())
            .collect();
        for path in left {
            if let Some(staged) = self.staged.get_mut(&path) {
                staged.seal_early(&mut self.sealer, &path);
            }
        }
        let mut results = Vec::with_capacity(files.len());
        let mut sources = OpenFiles::default();
        let mut budget = MAX_STAGE_SIGNATURE_BYTES;
        let mut completed = Vec::new();
        for req in files {
            let path = req.path.clone();
            if !self.staged.contains_key(&path) && self.staged.len() >= max_staged_files() {
                // Out of file descriptors to hold more temp files open: not an error, later.
                results.push(Err(NotStaged::NoRoom));
                continue;
            }
            let result = self.stage_one(req, &mut sources, &mut budget);
            if result.as_ref().is_ok_and(|missing| missing.is_empty()) {
                completed.push(path.clone());
            }
            results.push(result.map_err(|reason| NotStaged::Problem(Problem { path, reason })));
        }
        self.seal_early(completed);
        Ok(results)
    }

    /// Offers bases for the missing chunks of `req` (sorted, each once) from the file this
    /// side has at that path now, within `budget` signature bytes.
    fn offer_bases(
        &mut self,
        req: &StageRequest,
        want: Vec<Hash>,
        sources: &mut OpenFiles,
        budget: &mut usize,
    ) -> Vec<MissingChunk> {
        let mut out: Vec<MissingChunk> = want
            .into_iter()
            .map(|hash| MissingChunk { hash, base: None })
            .collect();
        let (Some(old), Some(root)) = (self.index.get(&req.path), self.root.as_ref()) else {
            return out;
        };
        let windows = delta::base_windows(&old.chunks, &req.manifest.chunks);
        for (c, window) in req.manifest.chunks.iter().zip(windows) {
            let Some(w) = window else { continue };
            if *budget == 0 || self.bases.contains_key(&c.hash) {
                continue;
            }
            let Ok(i) = out.binary_search_by(|m| m.hash.cmp(&c.hash)) else {
                continue;
            };
            if out[i].base.is_some() {
                continue;
            }
            let Some(bytes) = sources.read_range(root, &req.path, w.offset, w.len) else {
                continue;
            };
            let sig = delta::signature(&bytes, w.block);
            if sig.len() > *budget {
                *budget = 0;
                continue;
            }
            *budget -= sig.len();
            out[i].base = Some(sig);
            self.bases.insert(
                c.hash,
                Base {
                    path: req.path.clone(),
                    offset: w.offset,
                    len: w.len,
                    chunk_len: c.len,
                },
            );
        }
        out
    }

    fn stage_one(
        &mut self,
        req: StageRequest,
        sources: &mut OpenFiles,
        budget: &mut usize,
    ) -> Result<Vec<MissingChunk>, String> {
        req.manifest
            .validate(&req.meta, CHUNK_MAX_BYTES)
            .map_err(|e| format!("invalid manifest: {e}"))?;
        self.unstage(&req.path);
        self.faulted.remove(&req.path);
        let root = self.root().map_err(|e| e.to_string())?;
        let temp = root
            .create_temp_for(&req.path)
            .map_err(|e| format!("cannot create temp file: {e}"))?;
        let mut tmp_echo = None;
        // An unnamed (O_TMPFILE) temp in the file's directory shows up in watch events as
        // `#<inode>` there, gone by the time anyone looks: one more echo of our own.
        if temp.name().is_empty() {
            let tmp_name = rustix::fs::fstat(&temp.file)
                .ok()
                .map(|st| format!("#{}", st.st_ino));
            tmp_echo = tmp_name.and_then(|n| {
                req.path
                    .parent()
                    .and_then(|dir| dir.join(n.as_bytes()).ok())
            });
        }
        // What of the old version at this path can be reused in place: only if the file there
        // is still what the index hashed (else its chunk list says nothing of its bytes).
        let old = self.index.get(&req.path).filter(|rec| {
            root.stat(&req.path)
                .ok()
                .flatten()
                .is_some_and(|st| st.kind == FileKind::File && Identity::of(&st) == rec.identity)
        });
        let plan = old.map_or(Plan::Fresh, |rec| {
            crate::reuse::plan(&rec.chunks, &req.manifest)
        });
        let append = match &plan {
            Plan::Append {
                from,
                old_size,
                verify,
            } => old.map(|rec| StagedAppend {
                from: *from,
                old_size: *old_size,
                old_digest: rec.meta.digest,
                verify: *verify,
            }),
            _ => None,
        };
        // Offsets whose chunk the temp already holds, cloned from the old file; and how much
        // of the temp is the old file's (zero chunks inside it must be punched out).
        let (same, cloned_size) = match (&plan, old) {
            (Plan::Clone { same }, Some(rec)) => match root.clone_into_temp(&req.path, &temp) {
                Ok(Some((before, after)))
                    if Identity::of(&before) == rec.identity
                        && Identity::of(&after) == rec.identity =>
                {
                    (Some(same), rec.meta.size)
                }
                // Changed while cloned: start again from an empty temp.
                Ok(Some(_)) => match temp.file.set_len(0) {
                    Ok(()) => (None, 0),
                    Err(e) => {
                        root.discard_temp(temp);
                        return Err(io_reason(FaultOp::Write, &e));
                    }
                },
                Ok(None) | Err(_) => (None, 0),
            },
            _ => (None, 0),
        };
        let index = &self.index;
        let zeros = &self.zeros;
        let mut fill = || -> Result<HashMap<Hash, Vec<u64>>, String> {
            temp.file
                .set_len(req.meta.size)
                .map_err(|e| io_reason(FaultOp::Write, &e))?;
            let write = |data: &[u8], offset: u64| -> Result<(), String> {
                if let Some(e) = root.injected(FaultOp::Write, &req.path) {
                    return Err(io_reason(FaultOp::Write, &e.into()));
                }
                write_at(&temp.file, data, offset)
            };
            let mut missing: HashMap<Hash, Vec<u64>> = HashMap::new();
            // Bytes of chunks already placed in this temp file, so a repeated chunk is copied
            // once.
            let mut placed: HashMap<Hash, Vec<u8>> = HashMap::new();
            // A run of zero chunks still to punch out of the clone: [start, end).
            let mut punch: Option<(u64, u64)> = None;
            for c in &req.manifest.chunks {
                if append.is_some_and(|a| c.offset < a.from)
                    || same.is_some_and(|s| s.contains(&c.offset))
                {
                    continue;
                }
                if zeros.is_zero(c) {
                    // The sized temp is a hole there, unless the clone brought data: then the
                    // run is punched out, in one call (punches of single chunks would leave
                    // the blocks they share allocated).
                    if c.offset < cloned_size {
                        let end = c.offset + u64::from(c.len);
                        punch = match punch {
                            Some((start, last)) if last == c.offset => Some((start, end)),
                            Some((start, last)) => {
                                punch_hole(&temp.file, start, last - start)
                                    .map_err(|e| io_reason(FaultOp::Write, &e))?;
                                Some((c.offset, end))
                            }
                            None => Some((c.offset, end)),
                        };
                    }
                    continue;
                }
                if let Some(data) = placed.get(&c.hash) {
                    write(data, c.offset)?;
                    continue;
                }
                let local = index.locate(&c.hash).and_then(|loc| {
                    sources.read_verified(root, &loc.path, loc.offset, loc.len, &c.hash)
                });
                match local {
                    Some(data) => {
                        write(&data, c.offset)?;
                        // Keep only small repeated chunks in memory: a repeat costs one more
                        // read.
                        if placed.len() < 64 {
                            placed.insert(c.hash, data);
                        }
                    }
                    None => missing.entry(c.hash).or_default().push(c.offset),
                }
            }
            if let Some((start, end)) = punch {
                punch_hole(&temp.file, start, end - start)
                    .map_err(|e| io_reason(FaultOp::Write, &e))?;
            }
            Ok(missing)
        };
        let missing = match fill() {
            Ok(missing) => missing,
            Err(reason) => {
                // Half written: the temp goes now, not at the next start.
                root.discard_temp(temp);
                return Err(reason);
            }
        };
        let mut want: Vec<Hash> = missing.keys().copied().collect();
        want.sort();
        for h in &want {
            self.wanted.entry(*h).or_default().push(req.path.clone());
        }
        if let Some(path) = tmp_echo {
            self.echoes.insert(path, None);
        }
        let want = self.offer_bases(&req, want, sources, budget);
        let staged = Staged {
            temp,
            meta: req.meta,
            manifest: req.manifest,
            missing,
            seal: None,
            append,
        };
        self.staged.insert(req.path, staged);
        Ok(want)
    }

    fn supply(&mut self, chunks: Vec<(Hash, ChunkData)>) -> Result<Vec<Hash>, EndpointError> {
        let incoming = chunks
            .iter()
            .fold(0u64, |n, (_, d)| n.saturating_add(d.len() as u64));
        self.check_room(incoming)?;
        let mut still_missing = Vec::new();
        let mut bases = OpenFiles::default();
        // Every chunk is verified before anything is written; then each file's chunks are
        // written in offset order, neighbours in one `pwritev`.
        let mut datas: Vec<Vec<u8>> = Vec::with_capacity(chunks.len());
        let mut writes: HashMap<RelPath, FileWrites> = HashMap::new();
        for (hash, data) in chunks {
            // A chunk no staged file waits for any more (another supply filled them first, or
            // they were unstaged): nothing to write.
            if !self.wanted.contains_key(&hash) {
                tracing::debug!(share = %self.name, "chunk {hash} is no longer wanted");
                continue;
            }
            let data = match data {
                ChunkData::Whole(data) => {
                    if data.len() > CHUNK_MAX_BYTES as usize || hash_chunk(&data) != hash {
                        return Err(EndpointError::Protocol(format!(
                            "chunk {hash} does not match its id"
                        )));
                    }
                    data
                }
                ChunkData::Delta(d) => match self.rebuild(&hash, &d, &mut bases) {
                    Some(data) => data,
                    None => {
                        still_missing.push(hash);
                        continue;
                    }
                },
            };
            self.bases.remove(&hash);
            let Some(paths) = self.wanted.remove(&hash) else {
                continue;
            };
            let at = datas.len();
            datas.push(data);
            for path in paths {
                let Some(offsets) = self.staged.get(&path).and_then(|s| s.missing.get(&hash))
                else {
                    continue;
                };
                let (list, filled) = writes.entry(path).or_default();
                list.extend(offsets.iter().map(|&offset| (offset, at)));
                filled.push(hash);
            }
        }
        let mut completed = Vec::new();
        for (path, (mut list, filled)) in writes {
            let Some(staged) = self.staged.get_mut(&path) else {
                continue;
            };
            list.sort_unstable();
            let pieces: Vec<(u64, &[u8])> = list
                .iter()
                .filter_map(|&(offset, at)| datas.get(at).map(|d| (offset, d.as_slice())))
                .collect();
            let written = match self
                .root
                .as_ref()
                .and_then(|r| r.injected(FaultOp::Write, &path))
            {
                Some(e) => Err(e.into()),
                None => write_pieces(&staged.temp.file, &pieces),
            };
            if let Err(e) = written {
                // Half written: drop the temp, so nothing can take it for complete. The rest
                // of the supply goes on; this file's transition fails with the reason.
                tracing::warn!(path = %path.escaped(), "writing a staged file failed: {e}");
                self.unstage(&path);
                self.fault(path, io_reason(FaultOp::Write, &e));
                continue;
            }
            for hash in filled {
                staged.missing.remove(&hash);
            }
            if staged.missing.is_empty() {
                completed.push(path);
            }
        }
        self.seal_early(completed);
        Ok(still_missing)
    }

    /// Remembers why a staged file was dropped, for its transition to say.
    fn fault(&mut self, path: RelPath, reason: String) {
        if self.faulted.len() >= MAX_ECHOES {
            self.faulted.clear();
        }
        self.faulted.insert(path, reason);
    }

    /// Hands the seals of these just completed staged files to the background sealer, if
    /// other staged files still wait for chunks (the rest of the transfer then overlaps their
    /// fsyncs) or if there are several (the pool seals them with more concurrency than the
    /// transition would, and starts before it asks). One file completing the transfer is left
    /// to its transition, which follows at once: handing a live edit's one file to another
    /// thread would only add two thread wake-ups to its latency.
    fn seal_early(&mut self, completed: Vec<RelPath>) {
        if self.wanted.is_empty() && completed.len() <= 1 {
            return;
        }
        for path in completed {
            if let Some(staged) = self.staged.get_mut(&path) {
                if staged.missing.is_empty() && staged.seal.is_none() {
                    staged.seal_early(&mut self.sealer, &path);
                }
            }
        }
    }

    /// Rebuilds chunk `hash` from the base offered for it and `delta`: `None` unless the base
    /// can still be read and the result is exactly the chunk.
    fn rebuild(&self, hash: &Hash, delta: &[u8], files: &mut OpenFiles) -> Option<Vec<u8>> {
        let base = self.bases.get(hash)?;
        let root = self.root.as_ref()?;
        let bytes = files.read_range(root, &base.path, base.offset, base.len)?;
        delta::apply(&bytes, delta, base.chunk_len, hash)
    }

    fn unstage(&mut self, path: &RelPath) {
        if let Some(old) = self.staged.remove(path) {
            for h in old.missing.keys() {
                if let Some(paths) = self.wanted.get_mut(h) {
                    paths.retain(|p| p != path);
                    if paths.is_empty() {
                        self.wanted.remove(h);
                        self.bases.remove(h);
                    }
                }
            }
            if let Some(root) = &self.root {
                root.discard_temp(old.temp);
            }
        }
    }

    fn discard_staged(&mut self) {
        self.faulted.clear();
        let paths: Vec<RelPath> = self.staged.keys().cloned().collect();
        for p in paths {
            self.unstage(&p);
        }
        self.wanted.clear();
        self.bases.clear();
    }

    fn transition(&mut self, changes: Vec<Change>) -> Result<Vec<Outcome>, EndpointError> {
        // Below the reserve nothing new is made (removals, which free space, still go).
        if changes.iter().any(|c| c.new.is_some()) {
            self.check_room(0)?;
        }
        self.root()?.begin_batch();
        let clock = std::time::Instant::now();
        let seals = self.seal_staged(&changes);
        let sealed = clock.elapsed();
        let (mut checking, mut applying) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
        let count = changes.len();
        let mut outcomes = Vec::with_capacity(changes.len());
        let mut index_changes: Vec<(RelPath, Option<IndexRecord>)> = Vec::new();
        let mut paths = Vec::with_capacity(changes.len());
        let mut parents = ParentTimes::default();
        // Directories whose own time or mode this batch set: their watcher events are echoes.
        let mut attrs_set = Vec::new();
        for change in changes {
            paths.push(change.path.clone());
            let step = std::time::Instant::now();
            let current = self.current(&change.path);
            checking += step.elapsed();
            let step = std::time::Instant::now();
            let will_apply =
                matches!(&current, Ok(c) if still_expected(c.as_ref(), change.expected.as_ref()));
            if let (true, Some(root)) = (will_apply, self.root.as_ref()) {
                parents.before_write(root, &change.path);
            }
            let outcome = match current {
                Err(reason) => Outcome::Failed(reason),
                Ok(current) if !still_expected(current.as_ref(), change.expected.as_ref()) => {
                    Outcome::Changed(current)
                }
                Ok(current) => match self.apply(&change, current.as_ref()) {
                    Ok(record) => {
                        // Whatever the path is now, it has no other name until linked below.
                        self.links.set(&change.path, None);
                        if let Some(Entry::Dir { mtime, .. }) = &change.new {
                            parents.set(&change.path, *mtime);
                            if matches!(current, Some(Entry::Dir { .. })) {
                                attrs_set.push(change.path.clone());
                            }
                        }
                        match (&change.new, &record) {
                            (Some(Entry::File(_)), Some(r)) => {
                                self.echoes.insert(change.path.clone(), Some(r.identity));
                            }
                            (None, _) => {
                                self.echoes.insert(change.path.clone(), None);
                            }
                            _ => {}
                        }
                        index_changes.push((change.path.clone(), record));
                        Outcome::Applied
                    }
                    // Something appeared there since it was checked: decide again with it.
                    Err(ApplyError::Appeared) => match self.current(&change.path) {
                        Ok(now) => Outcome::Changed(now),
                        Err(reason) => Outcome::Failed(reason),
                    },
                    Err(ApplyError::Failed(reason)) => Outcome::Failed(reason),
                },
            };
            applying += step.elapsed();
            outcomes.push(outcome);
        }
        // Links go in before the parents' times are put back: they rename into those too.
        if !self.to_link.is_empty() {
            self.link_committed(&mut index_changes);
        }
        if self.dir_echoes.len() >= MAX_DIR_ECHOES {
            self.dir_echoes.clear();
        }
        let root = self.root()?;
        let set: Vec<(RelPath, Identity)> = attrs_set
            .into_iter()
            .filter_map(|dir| match root.stat(&dir) {
                Ok(Some(st)) if st.kind == FileKind::Dir => Some((dir, Identity::of(&st))),
                _ => None,
            })
            .collect();
        let restored = parents.restore(root, &self.name);
        self.dir_echoes.extend(set);
        self.dir_echoes.extend(restored);
        // Nothing is recorded or acknowledged before the directories are durable.
        let step = std::time::Instant::now();
        let unsynced = self.root()?.end_batch_each();
        if !unsynced.is_empty() {
            // In place but maybe not durable: not recorded, and failed, so that a later cycle
            // (which finds them done) records them once their directory is synced.
            let reasons: HashMap<RelPath, String> = unsynced
                .into_iter()
                .map(|(dir, e)| {
                    tracing::warn!(share = %self.name, dir = %dir.escaped(), "{e}");
                    (dir, fault_reason(FaultOp::DirFsync, &e))
                })
                .collect();
            for (path, outcome) in paths.iter().zip(outcomes.iter_mut()) {
                let dir = path.parent().unwrap_or_default();
                if let (Outcome::Applied, Some(reason)) = (&*outcome, reasons.get(&dir)) {
                    *outcome = Outcome::Failed(reason.clone());
                    index_changes.retain(|(p, _)| p != path);
                    self.echoes.remove(path);
                }
            }
        }
        let synced = step.elapsed();
        let step = std::time::Instant::now();
        for (path, rec) in &index_changes {
            match rec {
                Some(r) => self.index.insert(path.clone(), r.clone()),
                None => {
                    self.index.remove(path);
                }
            }
        }
        let changes = index_changes.iter().map(|(p, r)| (p, r.as_ref()));
        self.db.update_index(&self.name, changes).map_err(io_err)?;
        self.share_bytes
            .store(self.index.bytes(), Ordering::Relaxed);
        self.tell_pruner(false);
        tracing::debug!(
            share = %self.name,
            changes = count,
            early = seals.early,
            waited = seals.waited,
            claimed = seals.claimed,
            inline = seals.inline,
            "transition: staged files sealed in {} us, checked in {} us, applied in {} us, \
             directories synced in {} us, indexed in {} us",
            sealed.as_micros(),
            checking.as_micros(),
            applying.as_micros(),
            synced.as_micros(),
            step.elapsed().as_micros()
        );
        Ok(outcomes)
    }

    /// A targeted scan sees only the names it looked at: a file just linked to one scanned
    /// before (`ln old new`, as cargo does) shows up with more links than names known. Its
    /// other names are looked up in the index by inode (a hint only: the destination links
    /// nothing it has not checked).
    fn find_other_names(&mut self, linked: &[(RelPath, crate::links::Inode)]) {
        let lonely: std::collections::HashSet<crate::links::Inode> = linked
            .iter()
            .filter(|(path, _)| self.links.others(path).is_empty())
            .map(|(_, inode)| *inode)
            .collect();
        if lonely.is_empty() {
            return;
        }
        let found: Vec<(RelPath, crate::links::Inode)> = self
            .index
            .iter()
            .map(|(path, rec)| (path, (rec.identity.dev, rec.identity.ino)))
            .filter(|(_, inode)| lonely.contains(inode))
            .map(|(path, inode)| (path.clone(), inode))
            .collect();
        for (path, inode) in found {
            self.links.set(&path, Some(inode));
        }
    }

    /// Adds to watcher hints the other names of a hard-linked file among them: a write through
    /// one name changes them all, and inotify tells only of the one written through.
    fn with_other_names(&self, mut hints: ChangeHints) -> ChangeHints {
        if hints.rescan || self.links.is_empty() {
            return hints;
        }
        let others: Vec<RelPath> = hints
            .paths
            .iter()
            .flat_map(|p| self.links.others(p))
            .collect();
        if others.is_empty() {
            return hints;
        }
        hints.paths.extend(others);
        let all: std::collections::HashSet<RelPath> = hints.paths.drain(..).collect();
        // Coalesced again: none beneath another.
        hints.paths = all
            .iter()
            .filter(|p| !p.ancestors().any(|a| all.contains(&a)))
            .cloned()
            .collect();
        hints.paths.sort();
        hints
    }

    /// Drops from watcher hints the paths that hold exactly what this side's own transitions
    /// left there (a file of the identity it committed, or nothing where it deleted): the
    /// controller that asked for those changes knows them already, and a hint would only cost a
    /// round trip to rescan them. The identity test is the scan's own (inode, size, mtime,
    /// ctime), so any later write by someone else still gets through; so do directory hints,
    /// which may stand for many children.
    fn drop_echoes(
        &mut self,
        hints: ChangeHints,
        mut attrs: std::collections::BTreeSet<RelPath>,
    ) -> ChangeHints {
        self.echoes.expire(std::time::Instant::now());
        // The times this side put back, and nothing else: only a hint for a directory's own
        // attributes (a directory hint may stand for changes beneath it), while the directory
        // is exactly as this side left it; once.
        if let Some(root) = self.root.as_ref() {
            let dir_echoes = &mut self.dir_echoes;
            attrs.retain(|path| {
                let Some(left) = dir_echoes.remove(path) else {
                    return true;
                };
                let now = root.stat(path).ok().flatten();
                !now.is_some_and(|st| st.kind == FileKind::Dir && Identity::of(&st) == left)
            });
        }
        let mut hints = self.drop_file_echoes(hints);
        crate::watch::merge_attrs(&mut hints, attrs);
        hints
    }

    fn drop_file_echoes(&mut self, mut hints: ChangeHints) -> ChangeHints {
        if hints.rescan || self.echoes.is_empty() {
            return hints;
        }
        let Some(root) = self.root.as_ref() else {
            return hints;
        };
        let echoes = &mut self.echoes;
        hints.paths.retain(|path| {
            let Some(left) = echoes.get(path) else {
                return true;
            };
            let now = root.stat(path).ok();
            let echo = match (left, &now) {
                (Some(id), Some(Some(stat))) => {
                    stat.kind == FileKind::File && Identity::of(stat) == *id
                }
                (None, Some(None)) => true,
                _ => false,
            };
            if !echo {
                // Changed since: not ours any more.
                echoes.remove(path);
            }
            !echo
        });
        hints
    }

    /// Makes sure the complete staged files these changes will commit are sealed (mode, mtime,
    /// fsync). Most were handed to the background sealer as they completed: this takes the
    /// results of those that finished, waits for those still running, and runs those not
    /// started yet (or never handed over) itself, on a few threads: concurrent fsyncs let the
    /// filesystem and the disk merge their work. A temp whose seal fails is dropped; its change
    /// then fails. A temp whose seal result is missing (a worker gone) stays unsealed, and its
    /// commit seals it.
    fn seal_staged(&mut self, changes: &[Change]) -> SealCounts {
        let mut counts = SealCounts::default();
        let Some(root) = self.root.as_ref() else {
            return counts;
        };
        let wanted: HashMap<&RelPath, &FileMeta> = changes
            .iter()
            .filter_map(|c| match &c.new {
                Some(Entry::File(m)) => Some((&c.path, m)),
                _ => None,
            })
            .collect();
        let mut items: Vec<(&RelPath, &mut Staged)> = self
            .staged
            .iter_mut()
            .filter(|(p, s)| {
                s.missing.is_empty()
                    && wanted.get(p).is_some_and(|m| m.digest == s.meta.digest)
                    && !s.temp.is_sealed(s.meta.mode, s.meta.mtime)
            })
            .collect();
        if items.is_empty() {
            return counts;
        }
        // Which seals to run here (not started by a worker, or never submitted) and which to
        // wait for, by index into `items`. Claiming a queued job first keeps a worker from
        // starting it behind our back.
        let mut jobs: Vec<(usize, SealJob)> = Vec::new();
        let mut waits: Vec<(usize, SealHandle)> = Vec::new();
        let mut failed: Vec<(RelPath, String)> = Vec::new();
        for (i, (path, staged)) in items.iter_mut().enumerate() {
            let (mode, mtime) = (staged.meta.mode, staged.meta.mtime);
            match staged.seal.take() {
                Some(handle) => match handle.claim() {
                    Some(job) => {
                        counts.claimed += 1;
                        jobs.push((i, job));
                    }
                    None => {
                        if handle.is_done() {
                            counts.early += 1;
                        } else {
                            counts.waited += 1;
                        }
                        waits.push((i, handle));
                    }
                },
                None => {
                    counts.inline += 1;
                    match staged.temp.seal_job(mode, mtime) {
                        Ok(job) => jobs.push((i, job)),
                        // No descriptor to spare for a dup: seal through the temp's own.
                        Err(_) => {
                            if let Err(e) = root.seal_temp(&mut staged.temp, mode, mtime) {
                                tracing::warn!(path = %path.escaped(), "fsync of staged file failed: {e}");
                                failed.push(((*path).clone(), fault_reason(FaultOp::Fsync, &e)));
                            }
                        }
                    }
                }
            }
        }
        let mut results: Vec<(usize, Option<Result<Sealed, FsError>>)> = Vec::new();
        let per_thread = jobs.len().div_ceil(SEAL_THREADS).max(1);
        let run = |slice: Vec<(usize, SealJob)>| -> Vec<(usize, Option<Result<Sealed, FsError>>)> {
            slice
                .into_iter()
                .map(|(i, job)| (i, Some(job.run())))
                .collect()
        };
        let mut slices: Vec<Vec<(usize, SealJob)>> = Vec::new();
        let mut jobs = jobs.into_iter().peekable();
        while jobs.peek().is_some() {
            slices.push(jobs.by_ref().take(per_thread).collect());
        }
        // The calling thread runs the first slice, then waits for the background's seals: a
        // live edit's one file costs no thread.
        std::thread::scope(|scope| {
            let mut slices = slices.into_iter();
            let first = slices.next();
            let workers: Vec<_> = slices
                .map(|slice| scope.spawn(move || run(slice)))
                .collect();
            if let Some(slice) = first {
                results.extend(run(slice));
            }
            for (i, handle) in waits {
                results.push((i, handle.wait()));
            }
            for w in workers {
                // A panicked thread's temps stay unsealed; their commits seal them.
                results.extend(w.join().unwrap_or_default());
            }
        });
        for (i, result) in results {
            let Some((path, staged)) = items.get_mut(i) else {
                continue;
            };
            match result {
                Some(Ok(proof)) => {
                    staged.temp.accept_seal(proof);
                }
                Some(Err(e)) => {
                    tracing::warn!(path = %path.escaped(), "fsync of staged file failed: {e}");
                    failed.push(((*path).clone(), fault_reason(FaultOp::Fsync, &e)));
                }
                None => {}
            }
        }
        for (path, reason) in failed {
            self.unstage(&path);
            self.fault(path, reason);
        }
        counts
    }

    /// What `path` is on disk right now, hashing it if the index cannot vouch for it.
    fn current(&mut self, path: &RelPath) -> Result<Option<Entry>, String> {
        let root = self.root().map_err(|e| e.to_string())?;
        let Some(stat) = root.stat(path).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        Ok(Some(match stat.kind {
            FileKind::Dir => Entry::Dir {
                mode: stat.mode & PERM_MASK,
                mtime: stat.mtime,
            },
            FileKind::Symlink => Entry::Symlink {
                target: root.read_link(path).map_err(|e| e.to_string())?,
                mtime: stat.mtime,
            },
            FileKind::Other => return Err("a special file is in the way".into()),
            FileKind::File => {
                let mode = stat.mode & PERM_MASK;
                match self.index.get(path) {
                    Some(rec) if rec.identity == Identity::of(&stat) => {
                        Entry::File(FileMeta { mode, ..rec.meta })
                    }
                    _ => {
                        let rec = hash_file(root, path)?;
                        let meta = rec.meta;
                        self.index.insert(path.clone(), rec);
                        Entry::File(meta)
                    }
                }
            }
        }))
    }

    /// Makes `path` hold `change.new`; `current` is what is there (already checked against
    /// `change.expected`). Returns the index record for the path afterwards (`None`: not a file).
    fn apply(
        &mut self,
        change: &Change,
        current: Option<&Entry>,
    ) -> Result<Option<IndexRecord>, ApplyError> {
        let path = &change.path;
        let fs = |e: FsError| e.to_string();
        let mkdir = |e: FsError| fault_reason(FaultOp::Mkdir, &e);
        match &change.new {
            None => {
                self.remove(path, current)?;
                Ok(None)
            }
            Some(Entry::Dir { mode, mtime }) => {
                let root = self.root().map_err(|e| e.to_string())?;
                match current {
                    Some(Entry::Dir { mode: m, .. }) if m == mode => {}
                    Some(Entry::Dir { .. }) => root.set_mode(path, *mode).map_err(fs)?,
                    Some(old) => {
                        self.keep(path, old, false)?;
                        let root = self.root().map_err(|e| e.to_string())?;
                        root.mkdir_at(path, *mode, Some(*mtime)).map_err(mkdir)?;
                        return Ok(None);
                    }
                    None => {
                        root.mkdir_at(path, *mode, Some(*mtime)).map_err(mkdir)?;
                        return Ok(None);
                    }
                }
                // The directory's own time; what lands beneath it later in this batch leaves
                // it alone (see `ParentTimes`).
                let root = self.root().map_err(|e| e.to_string())?;
                if current.map(Entry::mtime) != Some(*mtime) {
                    root.set_mtime(path, *mtime).map_err(fs)?;
                }
                Ok(None)
            }
            Some(Entry::Symlink { target, mtime }) => {
                match current {
                    // Same link, another time: a metadata update in place, nothing replaced.
                    Some(Entry::Symlink { target: t, .. }) if t == target => {}
                    Some(Entry::Dir { .. }) => {
                        self.remove(path, current)?;
                        let root = self.root().map_err(|e| e.to_string())?;
                        root.symlink(path, target).map_err(fs)?;
                    }
                    // Kept first, then replaced in one rename: the path is never empty.
                    Some(old) => {
                        self.keep(path, old, true)?;
                        let root = self.root().map_err(|e| e.to_string())?;
                        root.replace_with_symlink_at(path, target, Some(*mtime))
                            .map_err(fs)?;
                        return Ok(None);
                    }
                    None => {
                        let root = self.root().map_err(|e| e.to_string())?;
                        root.symlink(path, target).map_err(fs)?;
                    }
                }
                let root = self.root().map_err(|e| e.to_string())?;
                root.set_mtime(path, *mtime).map_err(fs)?;
                Ok(None)
            }
            Some(Entry::File(meta)) => self.apply_file(path, meta, current).map(Some),
        }
    }

    fn apply_file(
        &mut self,
        path: &RelPath,
        meta: &FileMeta,
        current: Option<&Entry>,
    ) -> Result<IndexRecord, ApplyError> {
        let fs = |e: FsError| e.to_string();
        // Same content already there: only metadata changes, no data moves.
        if let Some(Entry::File(cur)) = current {
            if cur.digest == meta.digest && cur.size == meta.size {
                self.unstage(path);
                let root = self.root().map_err(|e| e.to_string())?;
                root.set_mode(path, meta.mode).map_err(fs)?;
                root.set_mtime(path, meta.mtime).map_err(fs)?;
                let stat = root
                    .stat(path)
                    .map_err(fs)?
                    .ok_or("vanished while updating metadata")?;
                let manifest = self
                    .index
                    .get(path)
                    .map(|r| r.manifest())
                    .unwrap_or_default();
                return Ok(IndexRecord::new(Identity::of(&stat), *meta, &manifest));
            }
        }
        match self.staged.get(path) {
            Some(s) if s.meta.digest != meta.digest => return Err("content was not staged".into()),
            Some(s) if !s.missing.is_empty() => return Err("staged file is incomplete".into()),
            _ => {}
        }
        let Some(mut staged) = self.staged.remove(path) else {
            return Err(match self.faulted.remove(path) {
                Some(reason) => reason.into(),
                None => "content was not staged".into(),
            });
        };
        let root = self.root().map_err(|e| e.to_string())?;
        // `seal_staged` settled every seal this commit could meet; should one still be out,
        // it must finish (or be taken back) before the temp is renamed, and a failure is final.
        if let Some(handle) = staged.seal.take() {
            let result = match handle.claim() {
                Some(job) => Some(job.run()),
                None => handle.wait(),
            };
            match result {
                Some(Ok(proof)) => {
                    staged.temp.accept_seal(proof);
                }
                Some(Err(e)) => {
                    root.discard_temp(staged.temp);
                    return Err(fault_reason(FaultOp::Fsync, &e).into());
                }
                None => {}
            }
        }
        if let Some(append) = staged.append.take() {
            match self.append_in_place(path, meta, current, &staged, append) {
                Ok(Some(record)) => {
                    if let Ok(root) = self.root() {
                        root.discard_temp(staged.temp);
                    }
                    return Ok(record);
                }
                // Not an append after all: the temp gets its head and replaces the file.
                Ok(None) => {
                    if let Err(reason) = self.fill_head(path, meta, &mut staged, append) {
                        if let Ok(root) = self.root() {
                            root.discard_temp(staged.temp);
                        }
                        return Err(reason.into());
                    }
                }
                Err(e) => {
                    if let Ok(root) = self.root() {
                        root.discard_temp(staged.temp);
                    }
                    return Err(e);
                }
            }
        }
        let root = self.root().map_err(|e| e.to_string())?;
        match current {
            Some(Entry::Dir { .. }) => {
                if let Err(e) = root.remove_dir(path) {
                    root.discard_temp(staged.temp);
                    return Err(e.to_string().into());
                }
            }
            // The old version is kept (a second link in the trash) before the rename replaces
            // it; if it cannot be kept, it is not replaced.
            Some(old) => {
                if let Err(e) = self.keep(path, old, true) {
                    let root = self.root().map_err(|e| e.to_string())?;
                    root.discard_temp(staged.temp);
                    return Err(e.into());
                }
            }
            None => {}
        }
        let root = self.root().map_err(|e| e.to_string())?;
        // Where nothing was, nothing is replaced: a file someone created since the check
        // stays, and the change is decided again.
        let committed = match current {
            None => root.commit_temp_new(staged.temp, path, meta.mode, meta.mtime),
            Some(_) => root.commit_temp(staged.temp, path, meta.mode, meta.mtime),
        };
        let stat = committed.map_err(|e| match e.kind() {
            FsErrorKind::Exists | FsErrorKind::NotAFile if current.is_none() => {
                ApplyError::Appeared
            }
            // The commit seals a temp not sealed yet, then renames it.
            _ if e.op() == crate::root::SEAL_OP => {
                ApplyError::Failed(fault_reason(FaultOp::Fsync, &e))
            }
            _ => ApplyError::Failed(fault_reason(FaultOp::Rename, &e)),
        })?;
        let record = IndexRecord::new(Identity::of(&stat), *meta, &staged.manifest);
        if !staged.manifest.links.is_empty() {
            self.to_link.push((path.clone(), staged.manifest.links));
        }
        Ok(record)
    }

    /// Links each file this transition committed to the other names its source gave it, where
    /// this side holds one with the same content and metadata (committed now or before): the
    /// share's hard links come out as hard links here too. The committed copy goes (it is the
    /// same content); nothing else is replaced. Updates the records and echoes of both names.
    /// Best effort: a name that changed meanwhile is left as it is, a plain copy.
    fn link_committed(&mut self, index_changes: &mut Vec<(RelPath, Option<IndexRecord>)>) {
        let to_link = std::mem::take(&mut self.to_link);
        let Some(root) = self.root.as_ref() else {
            return;
        };
        for (path, others) in to_link {
            let Some(mine) = index_changes
                .iter()
                .rev()
                .find(|(p, _)| *p == path)
                .and_then(|(_, r)| r.clone())
            else {
                continue;
            };
            for other in others {
                let theirs = match index_changes.iter().rev().find(|(p, _)| *p == other) {
                    Some((_, r)) => r.clone(),
                    None => self.index.get(&other).cloned(),
                };
                let Some(theirs) = theirs else { continue };
                let (a, b) = (&mine.identity, &theirs.identity);
                if (a.dev, a.ino) == (b.dev, b.ino) {
                    break;
                }
                if theirs.meta != mine.meta {
                    continue;
                }
                match root.link_over(&other, b, &path, a) {
                    Ok(st) => {
                        let identity = Identity::of(&st);
                        for (name, rec) in [(&path, &mine), (&other, &theirs)] {
                            let mut rec = rec.clone();
                            rec.identity = identity;
                            index_changes.push((name.clone(), Some(rec)));
                            self.echoes.insert(name.clone(), Some(identity));
                            self.links.set(name, Some((st.dev, st.ino)));
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(share = %self.name, path = %path.escaped(), other = %other.escaped(), "not linked: {e}");
                    }
                }
            }
        }
    }

    /// Appends the staged tail of an append-staged file to the file at `path` in place, if it
    /// still is the old version the plan was made against (`current`, checked against the
    /// change, has its digest, and the open file has the identity the index recorded for it)
    /// and the new bytes at the old last chunk are that chunk. `Ok(None)`: not an append
    /// (the new bytes there differ); `Appeared`: the file changed under us.
    fn append_in_place(
        &mut self,
        path: &RelPath,
        meta: &FileMeta,
        current: Option<&Entry>,
        staged: &Staged,
        append: StagedAppend,
    ) -> Result<Option<IndexRecord>, ApplyError> {
        let Some(Entry::File(cur)) = current else {
            return Ok(None);
        };
        let expected = match self.index.get(path) {
            Some(rec)
                if cur.digest == append.old_digest && rec.meta.digest == append.old_digest =>
            {
                rec.identity
            }
            _ => return Ok(None),
        };
        if let Some((hash, len)) = append.verify {
            let mut buf = vec![0u8; len as usize];
            let same = staged
                .temp
                .file
                .read_exact_at(&mut buf, append.from)
                .is_ok()
                && hash_chunk(&buf) == hash;
            if !same {
                return Ok(None);
            }
        }
        // The tail to write: past the old end, zero chunks left as holes (set_len last, so a
        // reader never sees zeros ahead of data).
        let old_size = append.old_size;
        let zeros = &self.zeros;
        let ranges: Vec<(u64, u64)> = staged
            .manifest
            .chunks
            .iter()
            .filter(|c| c.offset + u64::from(c.len) > old_size && !zeros.is_zero(c))
            .map(|c| (c.offset.max(old_size), c.offset + u64::from(c.len)))
            .collect();
        let temp = &staged.temp.file;
        let size = meta.size;
        let write = |file: &File| -> std::io::Result<()> {
            let mut buf = Vec::new();
            for &(start, end) in &ranges {
                let len = usize::try_from(end - start).map_err(std::io::Error::other)?;
                buf.resize(len, 0);
                temp.read_exact_at(&mut buf, start)?;
                file.write_all_at(&buf, start)?;
            }
            if file.metadata()?.len() < size {
                file.set_len(size)?;
            }
            Ok(())
        };
        let root = self.root().map_err(|e| e.to_string())?;
        // A file with other names (hard links, or a name kept in the trash) would change
        // under those too: it is replaced instead.
        match root.stat(path) {
            Ok(Some(st)) if st.nlink == 1 => {}
            _ => return Ok(None),
        }
        let appended = root
            .append_in_place(
                path,
                |st| Identity::of(st) == expected,
                write,
                meta.mode,
                meta.mtime,
            )
            .map_err(|e| ApplyError::Failed(fault_reason(FaultOp::Write, &e)))?;
        let Some(stat) = appended else {
            return Err(ApplyError::Appeared);
        };
        Ok(Some(IndexRecord::new(
            Identity::of(&stat),
            *meta,
            &staged.manifest,
        )))
    }

    /// Completes an append-staged temp that will replace its file after all: writes the head
    /// (`[0, from)`, the old version's chunks, which are the new one's) from the file at
    /// `path`, verifying each chunk, and seals the temp again.
    fn fill_head(
        &mut self,
        path: &RelPath,
        meta: &FileMeta,
        staged: &mut Staged,
        append: StagedAppend,
    ) -> Result<(), String> {
        let root = self.root().map_err(|e| e.to_string())?;
        let mut files = OpenFiles::default();
        for c in &staged.manifest.chunks {
            if c.offset >= append.from {
                break;
            }
            if self.zeros.is_zero(c) {
                continue;
            }
            let data = files
                .read_verified(root, path, c.offset, c.len, &c.hash)
                .ok_or("the old version changed while it was reused")?;
            write_at(&staged.temp.file, &data, c.offset)?;
        }
        root.seal_temp(&mut staged.temp, meta.mode, meta.mtime)
            .map_err(|e| fault_reason(FaultOp::Fsync, &e))
    }

    /// Keeps the file or symlink `entry` at `path` in the trash: moved there (`link` false:
    /// a deletion) or linked there (`link` true: it is about to be replaced).
    fn keep(&mut self, path: &RelPath, entry: &Entry, link: bool) -> Result<(), String> {
        let root = self.root().map_err(|e| e.to_string())?;
        let kept = if link {
            root.trash_link(path)
        } else {
            root.trash_remove(path)
        }
        .map_err(|e| format!("could not be kept in the trash, so it was left alone: {e}"))?;
        let bytes = match entry {
            Entry::File(meta) => meta.size,
            Entry::Symlink { target, .. } => target.len() as u64,
            Entry::Dir { .. } => 0,
        };
        match self.trashed.last_mut() {
            Some((batch, files, sum)) if *batch == kept.batch => {
                *files += 1;
                *sum += bytes;
            }
            _ => self.trashed.push((kept.batch.clone(), 1, bytes)),
        }
        self.kept.record(
            std::time::Instant::now(),
            path.clone(),
            kept.batch,
            entry.clone(),
        );
        Ok(())
    }

    /// See [`Endpoint::put_back`].
    fn put_back(&mut self, items: Vec<(RelPath, Entry)>) -> Result<Vec<Outcome>, EndpointError> {
        if self.root.is_none() {
            self.open_root()?;
        }
        self.root()?.begin_batch();
        let now = std::time::Instant::now();
        let mut outcomes = Vec::with_capacity(items.len());
        // What is put back into a directory leaves it the time it had (see `ParentTimes`).
        let mut parents = ParentTimes::default();
        for (path, entry) in items {
            if let Some(root) = self.root.as_ref() {
                parents.before_write(root, &path);
            }
            let outcome = self.put_back_one(now, &path, &entry);
            if outcome == Outcome::Applied {
                // What is there now is no echo of ours: let a hint through, the scan sees it.
                self.echoes.remove(&path);
                if let Entry::Dir { mtime, .. } = entry {
                    parents.made(&path, mtime);
                }
            }
            outcomes.push(outcome);
        }
        parents.restore(self.root()?, &self.name);
        self.root()?.end_batch().map_err(io_err)?;
        // What was put back left the trash: counted again by a walk.
        self.tell_pruner(outcomes.contains(&Outcome::Applied));
        Ok(outcomes)
    }

    /// Tells the pruner what was kept since the last time; with `measure`, also that the
    /// trash lost what it cannot count.
    fn tell_pruner(&mut self, measure: bool) {
        let trashed = std::mem::take(&mut self.trashed);
        if let Some(p) = &self.pruner {
            for (batch, files, bytes) in trashed {
                p.kept(batch, files, bytes);
            }
            if measure {
                p.measure();
            }
        }
    }

    fn put_back_one(&mut self, now: std::time::Instant, path: &RelPath, entry: &Entry) -> Outcome {
        let root = match self.root() {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let there = match root.stat(path) {
            Ok(s) => s,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        if let Some(stat) = there {
            if stat.kind == FileKind::Dir && entry.is_dir() {
                return Outcome::Applied;
            }
            return match self.current(path) {
                Ok(now) => Outcome::Changed(now),
                Err(reason) => Outcome::Failed(reason),
            };
        }
        if let Entry::Dir { mode, mtime } = entry {
            return match root.mkdir_at(path, *mode, Some(*mtime)) {
                Ok(()) => Outcome::Applied,
                Err(e) => Outcome::Failed(e.to_string()),
            };
        }
        let Some((seq, batch)) = self.kept.find(now, path, entry) else {
            return Outcome::Failed("not found in the trash".into());
        };
        let root = match self.root() {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let kept_is_it = match (entry, root.kept_stat(&batch, path)) {
            (Entry::File(meta), Ok(Some(st))) => {
                st.kind == FileKind::File && st.size == meta.size && st.mtime == meta.mtime
            }
            (Entry::Symlink { target, .. }, Ok(Some(st))) => {
                st.kind == FileKind::Symlink
                    && root.kept_read_link(&batch, path).ok().as_ref() == Some(target)
            }
            _ => false,
        };
        if !kept_is_it {
            return Outcome::Failed("the kept version is gone or changed in the trash".into());
        }
        match root.restore_kept(&batch, path, path) {
            Ok(()) => {
                self.kept.take(path, seq);
                Outcome::Applied
            }
            Err(e) if e.kind() == FsErrorKind::Exists => match self.current(path) {
                Ok(now) => Outcome::Changed(now),
                Err(reason) => Outcome::Failed(reason),
            },
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }

    fn remove(&mut self, path: &RelPath, current: Option<&Entry>) -> Result<(), String> {
        let result = match current {
            None => return Ok(()),
            Some(Entry::Dir { .. }) => self.root().map_err(|e| e.to_string())?.remove_dir(path),
            Some(entry) => return self.keep(path, entry, false),
        };
        result.map_err(|e| match e.kind() {
            FsErrorKind::NotEmpty => {
                "directory is not empty (it holds entries not synced, such as ignored files)"
                    .to_string()
            }
            _ => e.to_string(),
        })
    }
}

/// Whether what is at a path still is what the scan saw: exactly, except that a directory's
/// mtime may have moved (a child changed since). That time holds nothing to lose, and the
/// change brings the other side's time anyway.
fn still_expected(current: Option<&Entry>, expected: Option<&Entry>) -> bool {
    match (current, expected) {
        (Some(c @ Entry::Dir { .. }), Some(e @ Entry::Dir { .. })) => c.same_content(e),
        _ => current == expected,
    }
}

/// The times of the directories a transition writes into, put back once it is done: creating,
/// replacing, renaming or removing an entry moves its parent directory's mtime, and a
/// destination directory must keep the time the source gave it (as `rsync -a` does). The
/// share root's own time is not synced and not put back (its watcher event would be a hint to
/// rescan everything).
#[derive(Debug, Default)]
struct ParentTimes {
    /// Directory → the mtime it must be left with.
    times: HashMap<RelPath, Timestamp>,
}

impl ParentTimes {
    /// Remembers the time of `path`'s parent before the first write into it.
    fn before_write(&mut self, root: &ShareRoot, path: &RelPath) {
        let Some(parent) = path.parent().filter(|p| !p.is_root()) else {
            return;
        };
        if self.times.contains_key(&parent) {
            return;
        }
        if let Ok(Some(st)) = root.stat(&parent) {
            if st.kind == FileKind::Dir {
                self.times.insert(parent, st.mtime);
            }
        }
    }

    /// A change gave the directory `path` this time: it is the one to keep.
    fn set(&mut self, path: &RelPath, mtime: Timestamp) {
        if let Some(t) = self.times.get_mut(path) {
            *t = mtime;
        }
    }

    /// The directory `path` was just made with this time: it is the one to keep when
    /// something is written into it next.
    fn made(&mut self, path: &RelPath, mtime: Timestamp) {
        self.times.insert(path.clone(), mtime);
    }

    /// Puts every time back that moved; returns the identity each such directory was left
    /// with, for echo suppression. A directory gone or replaced since is left alone.
    fn restore(self, root: &ShareRoot, share: &str) -> Vec<(RelPath, Identity)> {
        let mut restored = Vec::new();
        for (dir, mtime) in self.times {
            let Ok(Some(st)) = root.stat(&dir) else {
                continue;
            };
            if st.kind != FileKind::Dir || st.mtime == mtime {
                continue;
            }
            if let Err(e) = root.set_mtime(&dir, mtime) {
                tracing::debug!(share, dir = %dir.escaped(), "cannot put the time back: {e}");
                continue;
            }
            if let Ok(Some(st)) = root.stat(&dir) {
                restored.push((dir, Identity::of(&st)));
            }
        }
        restored
    }
}

/// At most this many restored directory times are remembered as echoes (beyond, all are
/// forgotten: a forgotten echo costs one rescan).
const MAX_DIR_ECHOES: usize = 65_536;

/// Writes `pieces` (sorted by offset) to `file`: each run of adjacent pieces in one `pwritev`,
/// so a file's chunks cost one system call per supply instead of one each, and the page cache
/// is not made to zero the partial pages at every chunk boundary.
fn write_pieces(file: &File, pieces: &[(u64, &[u8])]) -> std::io::Result<()> {
    for run in adjacent_runs(pieces) {
        for group in run.chunks(MAX_IOVECS) {
            let Some(&(at, _)) = group.first() else {
                continue;
            };
            let mut slices: Vec<std::io::IoSlice<'_>> = group
                .iter()
                .map(|(_, d)| std::io::IoSlice::new(d))
                .collect();
            let mut bufs = &mut slices[..];
            let mut pos = at;
            while !bufs.is_empty() {
                let n = rustix::io::pwritev(file, bufs, pos)?;
                if n == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                pos += n as u64;
                std::io::IoSlice::advance_slices(&mut bufs, n);
            }
        }
    }
    Ok(())
}

/// At most this many buffers per `pwritev` (Linux's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// Splits `pieces` (sorted by offset) into runs where each piece starts where the last ended.
fn adjacent_runs<'a, 'b>(pieces: &'a [(u64, &'b [u8])]) -> Vec<&'a [(u64, &'b [u8])]> {
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..=pieces.len() {
        let joined = match (pieces.get(i - 1), pieces.get(i)) {
            (Some((o, d)), Some((next, _))) => o + d.len() as u64 == *next,
            _ => false,
        };
        if !joined {
            if let Some(run) = pieces.get(start..i) {
                runs.push(run);
            }
            start = i;
        }
    }
    runs
}

/// What one supply writes to one staged file: (offset, index of the chunk's bytes) pairs, and
/// the chunks that fills.
type FileWrites = (Vec<(u64, usize)>, Vec<Hash>);

/// Why a change was not applied.
#[derive(Debug)]
enum ApplyError {
    /// Something appeared at the path after it was found empty: the change no longer fits.
    Appeared,
    Failed(String),
}

impl From<String> for ApplyError {
    fn from(reason: String) -> Self {
        ApplyError::Failed(reason)
    }
}

impl From<&str> for ApplyError {
    fn from(reason: &str) -> Self {
        ApplyError::Failed(reason.to_owned())
    }
}

/// Makes `[offset, offset + len)` of `file` a hole (zeros that take no disk), or writes zeros
/// there where the filesystem cannot punch holes.
fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use rustix::fs::FallocateFlags;
    let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    match rustix::fs::fallocate(file, flags, offset, len) {
        Ok(()) => Ok(()),
        Err(_) => {
            let zeros = vec![0u8; CHUNK_MAX_BYTES as usize];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(zeros.len() as u64);
                file.write_all_at(zeros.get(..n as usize).unwrap_or(&zeros), at)?;
                at += n;
            }
            Ok(())
        }
    }
}

fn write_at(file: &File, data: &[u8], offset: u64) -> Result<(), String> {
    file.write_all_at(data, offset)
        .map_err(|e| format!("cannot write temp file: {e}"))
}

/// A small cache of files opened for reading chunks within one request.
#[derive(Default)]
struct OpenFiles {
    files: HashMap<RelPath, Option<File>>,
}

/// Raises this process's soft fd limit to its hard limit (agents call it first thing): a
/// share with many files in flight wants descriptors, and the soft default (1024) is low.
pub fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
}

/// Most staged files held open at once: a quarter of the soft fd limit (at least 16), so a
/// host that batches more than this process can hold gets retries, not EMFILE failures.
fn max_staged_files() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        soft.map_or(4096, |n| usize::try_from(n / 4).unwrap_or(4096))
            .max(16)
    })
}

/// Most paths remembered as this side's own writes (see [`LocalShare::drop_echoes`]); past it
/// the memory starts over, and echoes are rescanned as before.
const MAX_ECHOES: usize = 65_536;

/// Threads that fsync the staged files of one transition batch that the background sealer
/// has not started on.
const SEAL_THREADS: usize = 8;

/// How the staged files of one transition got sealed (for the debug log).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct SealCounts {
    /// Sealed in the background before the transition asked.
    early: usize,
    /// Still being sealed in the background: waited for.
    waited: usize,
    /// Queued for the background but not started: sealed by the transition.
    claimed: usize,
    /// Never handed to the background: sealed by the transition.
    inline: usize,
}

/// Most source files kept open at once while serving one request.
const MAX_OPEN_SOURCE_FILES: usize = 64;

impl OpenFiles {
    /// Reads `len` bytes at `offset` of `path` and returns them only if they hash to `hash`.
    fn read_verified(
        &mut self,
        root: &ShareRoot,
        path: &RelPath,
        offset: u64,
        len: u32,
        hash: &Hash,
    ) -> Option<Vec<u8>> {
        if len > CHUNK_MAX_BYTES {
            return None;
        }
        let buf = self.read_at(root, path, offset, u64::from(len))?;
        (hash_chunk(&buf) == *hash).then_some(buf)
    }

    /// Reads `len` bytes (at most [`delta::MAX_BASE_BYTES`]) at `offset` of `path`: a delta
    /// base, unverified (whatever is built from it is verified).
    fn read_range(
        &mut self,
        root: &ShareRoot,
        path: &RelPath,
        offset: u64,
        len: u64,
    ) -> Option<Vec<u8>> {
        if len > delta::MAX_BASE_BYTES {
            return None;
        }
        self.read_at(root, path, offset, len)
    }

    fn read_at(
        &mut self,
        root: &ShareRoot,
        path: &RelPath,
        offset: u64,
        len: u64,
    ) -> Option<Vec<u8>> {
        if !self.files.contains_key(path) {
            if self.files.len() >= MAX_OPEN_SOURCE_FILES {
                self.files.clear();
            }
            let file = root.open_file(path).ok().map(|(f, _)| f);
            self.files.insert(path.clone(), file);
        }
        let file = self.files.get(path)?.as_ref()?;
        let mut buf = vec![0u8; usize::try_from(len).ok()?];
        file.read_exact_at(&mut buf, offset).ok()?;
        Some(buf)
    }
}

#[cfg(test)]
mod watch_limit_tests {
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
        let error = notify::Error::new(notify::ErrorKind::MaxFilesWatch).add_path(share.join("b"));
        watcher.inject(Err(error));
        assert!(ep.changes().await.unwrap().rescan, "a full rescan first");
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

#[cfg(test)]
mod write_tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn adjacent_runs_split_where_a_piece_does_not_start_at_the_last_end() {
        let (a, b, c) = (&b"abc"[..], &b"de"[..], &b"f"[..]);
        type Case<'a> = (Vec<(u64, &'a [u8])>, Vec<usize>);
        let cases: Vec<Case> = vec![
            (vec![], vec![]),
            (vec![(0, a)], vec![1]),
            (vec![(0, a), (3, b), (5, c)], vec![3]),
            (vec![(0, a), (4, b), (6, c)], vec![1, 2]),
            (vec![(0, a), (3, b), (9, c)], vec![2, 1]),
            (vec![(2, a), (10, b), (20, c)], vec![1, 1, 1]),
        ];
        for (pieces, lens) in cases {
            let runs = adjacent_runs(&pieces);
            assert_eq!(
                runs.iter().map(|r| r.len()).collect::<Vec<_>>(),
                lens,
                "{pieces:?}"
            );
            assert_eq!(
                runs.concat(),
                pieces,
                "runs cover every piece once, in order"
            );
        }
    }

    proptest::proptest! {
        /// However a file's bytes are cut into pieces and whichever are left out, writing the
        /// pieces gives what writing each one by itself gives.
        #[test]
        fn written_pieces_land_where_single_writes_would(
            data in proptest::collection::vec(proptest::num::u8::ANY, 1..6000),
            cuts in proptest::collection::vec(1usize..3000, 0..12),
            skip in proptest::collection::vec(proptest::bool::ANY, 12),
        ) {
            let mut bounds: Vec<usize> = cuts.into_iter().filter(|&c| c < data.len()).collect();
            bounds.extend([0, data.len()]);
            bounds.sort_unstable();
            bounds.dedup();
            let pieces: Vec<(u64, &[u8])> = bounds
                .windows(2)
                .enumerate()
                .filter(|(i, _)| !skip.get(*i).copied().unwrap_or(false))
                .map(|(_, w)| (w[0] as u64, &data[w[0]..w[1]]))
                .collect();
            let dir = tempfile::tempdir().unwrap();
            let (together, alone) = (dir.path().join("t"), dir.path().join("a"));
            let file = File::create_new(&together).unwrap();
            write_pieces(&file, &pieces).unwrap();
            let single = File::create_new(&alone).unwrap();
            for (offset, piece) in &pieces {
                single.write_all_at(piece, *offset).unwrap();
            }
            proptest::prop_assert_eq!(std::fs::read(&together).unwrap(), std::fs::read(&alone).unwrap());
        }
    }

    #[test]
    fn more_pieces_than_one_call_takes_are_all_written() {
        let data: Vec<u8> = (0..(MAX_IOVECS * 3 + 7)).map(|i| i as u8).collect();
        let pieces: Vec<(u64, &[u8])> = data
            .iter()
            .enumerate()
            .map(|(i, b)| (i as u64, std::slice::from_ref(b)))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_pieces(&File::create_new(&path).unwrap(), &pieces).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }

    #[test]
    fn a_write_that_fails_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let readonly = File::open(dir.path().join("f")).unwrap();
        assert!(write_pieces(&readonly, &[(0, &b"abc"[..])]).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::chunk_bytes;
    use std::os::unix::fs::MetadataExt;
    use std::sync::{mpsc, Condvar};
    use std::time::{Duration, Instant};
    use vmsync_core::entry::Timestamp;

    const MODE: u32 = 0o640;
    const MTIME: Timestamp = Timestamp {
        secs: 1_700_000_000,
        nanos: 7,
    };

    struct Fixture {
        _dir: tempfile::TempDir,
        share_dir: PathBuf,
        share: LocalShare,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let share_dir = dir.path().join("share");
        std::fs::create_dir(&share_dir).unwrap();
        let db = Arc::new(StateDb::open(&dir.path().join("state"), "db").unwrap());
        let LocalEndpoint { inner, .. } =
            LocalEndpoint::new("t", share_dir.clone(), Filter::none(), db).unwrap();
        let mut share = Arc::try_unwrap(inner).ok().unwrap().into_inner().unwrap();
        full_scan(&mut share);
        Fixture {
            _dir: dir,
            share_dir,
            share,
        }
    }

    fn full_scan(share: &mut LocalShare) {
        let options = ScanOptions {
            create_marker: true,
        };
        share.scan(&ScanScope::Full, &options).unwrap();
    }

    /// A few chunks of bytes no other test file shares.
    fn content(seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..150_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn request(path: &RelPath, data: &[u8]) -> StageRequest {
        let chunks = chunk_bytes(data);
        StageRequest {
            path: path.clone(),
            meta: FileMeta {
                size: data.len() as u64,
                mode: MODE,
                mtime: MTIME,
                digest: Manifest::digest_of(&chunks),
            },
            manifest: Manifest {
                chunks,
                links: Vec::new(),
            },
        }
    }

    /// Stages `data` at `path`; returns the chunks it still misses, with their bytes.
    fn stage(share: &mut LocalShare, path: &RelPath, data: &[u8]) -> Vec<(Hash, ChunkData)> {
        let req = request(path, data);
        let chunks = req.manifest.chunks.clone();
        let mut results = share.stage(vec![req]).unwrap();
        let missing = results.pop().unwrap().unwrap();
        missing
            .iter()
            .map(|m| {
                let c = chunks.iter().find(|c| c.hash == m.hash).unwrap();
                let start = usize::try_from(c.offset).unwrap();
                let bytes = data[start..start + c.len as usize].to_vec();
                (m.hash, ChunkData::Whole(bytes))
            })
            .collect()
    }

    /// Stages a file whose chunks never come: other staged files then complete while more
    /// transfer is still to come, which is when they are sealed early. Returns its path.
    fn keep_waiting(share: &mut LocalShare) -> RelPath {
        let path = RelPath::from_bytes(b"pending").unwrap();
        assert!(!stage(share, &path, &content(999)).is_empty());
        path
    }

    fn create(path: &RelPath, data: &[u8]) -> Change {
        Change {
            path: path.clone(),
            expected: None,
            new: Some(Entry::File(request(path, data).meta)),
        }
    }

    fn temp_meta(share: &LocalShare, path: &RelPath) -> std::fs::Metadata {
        share.staged[path].temp.file.metadata().unwrap()
    }

    fn temp_bytes(share: &LocalShare, path: &RelPath) -> Vec<u8> {
        let file = &share.staged[path].temp.file;
        let mut buf = vec![0u8; usize::try_from(file.metadata().unwrap().len()).unwrap()];
        file.read_exact_at(&mut buf, 0).unwrap();
        buf
    }

    /// Polls `done` until it holds; fails after a generous deadline.
    fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn is_sealed_on_disk(share: &LocalShare, path: &RelPath) -> bool {
        let m = temp_meta(share, path);
        m.mode() & 0o7777 == MODE
            && (m.mtime(), m.mtime_nsec()) == (MTIME.secs, i64::from(MTIME.nanos))
    }

    fn leftover_temps(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir.join(".vmsync/tmp")).unwrap().count()
    }

    /// A hook that holds seals one at a time until released, announcing each on `entered`,
    /// and ends the n-th with `results[n]` (`Some`: fail with that errno).
    fn holding_hook(
        results: Vec<Option<rustix::io::Errno>>,
    ) -> (crate::seal::Hook, mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let results = Mutex::new(results.into_iter());
        let hook: crate::seal::Hook = Arc::new(move || {
            // One seal at a time, announced only once it holds the turn: the n-th announced
            // is the n-th released and gets the n-th result.
            let turn = release_rx.lock().unwrap();
            let _ = entered_tx.send(());
            let _ = turn.recv();
            results.lock().unwrap().next().flatten()
        });
        (hook, entered, release)
    }

    /// Open (true) or closed, and the signal that it opened.
    type Gate = Arc<(Mutex<bool>, Condvar)>;

    /// A hook that holds every seal, announcing each on `entered`, until the gate opens.
    fn gate_hook() -> (crate::seal::Hook, mpsc::Receiver<()>, Gate) {
        let (entered_tx, entered) = mpsc::channel();
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let g = gate.clone();
        let hook: crate::seal::Hook = Arc::new(move || {
            let _ = entered_tx.send(());
            let (open, cv) = &*g;
            let mut open = open.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            None
        });
        (hook, entered, gate)
    }

    #[test]
    fn file_completed_by_supply_is_sealed_before_transition() {
        let mut f = fixture();
        keep_waiting(&mut f.share);
        let path = RelPath::from_bytes(b"f.bin").unwrap();
        let data = content(1);
        let mut missing = stage(&mut f.share, &path, &data);
        assert!(missing.len() >= 2, "want a file of several chunks");
        let last = missing.split_off(1);
        f.share.supply(missing).unwrap();
        // Incomplete: nothing to seal yet.
        assert_eq!(temp_meta(&f.share, &path).mode() & 0o7777, 0o600);
        f.share.supply(last).unwrap();
        // Complete: sealed without anyone asking for a transition.
        eventually("the background seal", || is_sealed_on_disk(&f.share, &path));
        let outcomes = f.share.transition(vec![create(&path, &data)]).unwrap();
        assert_eq!(outcomes, vec![Outcome::Applied]);
        let placed = f.share_dir.join("f.bin");
        assert_eq!(std::fs::read(&placed).unwrap(), data);
        assert_eq!(std::fs::metadata(&placed).unwrap().mode() & 0o7777, MODE);
    }

    /// A whole chunk whose bytes are not what its id says is refused before anything of the
    /// supply is written (the wire layer does not hash it: this is the check), and the file it
    /// was for cannot be committed.
    #[test]
    fn a_chunk_that_does_not_match_its_id_is_refused() {
        let mut f = fixture();
        let path = RelPath::from_bytes(b"f.bin").unwrap();
        let data = content(4);
        let mut missing = stage(&mut f.share, &path, &data);
        assert!(missing.len() >= 2, "want a file of several chunks");
        if let Some((_, ChunkData::Whole(bytes))) = missing.last_mut() {
            bytes[0] ^= 1;
        }
        let before = temp_bytes(&f.share, &path);
        assert!(matches!(
            f.share.supply(missing),
            Err(EndpointError::Protocol(_))
        ));
        assert_eq!(
            temp_bytes(&f.share, &path),
            before,
            "nothing of the supply written"
        );
        let outcomes = f.share.transition(vec![create(&path, &data)]).unwrap();
        assert!(matches!(outcomes[..], [Outcome::Failed(_)]), "{outcomes:?}");
        assert!(!f.share_dir.join("f.bin").exists());
    }

    /// A chunk that cannot be written leaves no staged file that looks complete: the change
    /// fails instead of committing a temp with a hole in it.
    #[test]
    fn a_chunk_that_cannot_be_written_unstages_its_file() {
        let mut f = fixture();
        let path = RelPath::from_bytes(b"f.bin").unwrap();
        let data = content(3);
        let missing = stage(&mut f.share, &path, &data);
        assert!(!missing.is_empty());
        // Writes to the temp now fail (EBADF: a read-only descriptor in its place).
        let readonly = std::fs::File::open(f.share_dir.join(".")).unwrap();
        if let Some(staged) = f.share.staged.get_mut(&path) {
            staged.temp.file = readonly;
        }
        // The supply itself goes on (other files in it may land); this file is dropped.
        assert_eq!(f.share.supply(missing).unwrap(), Vec::<Hash>::new());
        assert!(!f.share.staged.contains_key(&path), "still staged");
        let outcomes = f.share.transition(vec![create(&path, &data)]).unwrap();
        match &outcomes[..] {
            [Outcome::Failed(reason)] => assert!(reason.starts_with("write failed"), "{reason}"),
            _ => panic!("{outcomes:?}"),
        }
        assert!(!f.share_dir.join("f.bin").exists());
        assert_eq!(leftover_temps(&f.share_dir), 0);
    }

    fn dir_time(share: &LocalShare, rel: &str) -> Timestamp {
        let path = RelPath::from_bytes(rel.as_bytes()).unwrap();
        share
            .root
            .as_ref()
            .unwrap()
            .stat(&path)
            .unwrap()
            .unwrap()
            .mtime
    }

    /// A transition gives new directories and symlinks their source's time before they are
    /// visible, updates a time in place, and leaves every directory it wrote into at the time
    /// it must have, not the time of the write.
    #[test]
    fn a_transition_leaves_directory_and_symlink_times_as_the_source_gave_them() {
        let mut f = fixture();
        let p = |s: &str| RelPath::from_bytes(s.as_bytes()).unwrap();
        let (t1, t2, t3) = (
            Timestamp::new(1_000_000_000, 1),
            Timestamp::new(1_100_000_000, 2),
            Timestamp::new(1_200_000_000, 3),
        );
        let dir = |mtime| Entry::Dir { mode: 0o755, mtime };
        let link = |mtime| Entry::Symlink {
            target: b"f".to_vec(),
            mtime,
        };
        let data = content(3);
        let file = p("d/f");
        let missing = stage(&mut f.share, &file, &data);
        f.share.supply(missing).unwrap();
        let outcomes = f
            .share
            .transition(vec![
                Change {
                    path: p("d"),
                    expected: None,
                    new: Some(dir(t1)),
                },
                create(&file, &data),
                Change {
                    path: p("d/l"),
                    expected: None,
                    new: Some(link(t2)),
                },
            ])
            .unwrap();
        assert_eq!(outcomes, vec![Outcome::Applied; 3]);
        assert_eq!(std::fs::read(f.share_dir.join("d/f")).unwrap(), data);
        assert_eq!(
            dir_time(&f.share, "d"),
            t1,
            "the file and the link moved it"
        );
        assert_eq!(dir_time(&f.share, "d/l"), t2);
        // Time-only updates: in place (same inode), nothing kept in the trash.
        let ino = |rel: &str| {
            std::os::unix::fs::MetadataExt::ino(
                &std::fs::symlink_metadata(f.share_dir.join(rel)).unwrap(),
            )
        };
        let link_ino = ino("d/l");
        let outcomes = f
            .share
            .transition(vec![
                Change {
                    path: p("d"),
                    expected: Some(dir(t1)),
                    new: Some(dir(t3)),
                },
                Change {
                    path: p("d/l"),
                    expected: Some(link(t2)),
                    new: Some(link(t3)),
                },
            ])
            .unwrap();
        assert_eq!(outcomes, vec![Outcome::Applied; 2]);
        assert_eq!(
            (dir_time(&f.share, "d"), dir_time(&f.share, "d/l")),
            (t3, t3)
        );
        assert_eq!(ino("d/l"), link_ino);
        // A deletion inside puts the directory's time back too.
        let outcomes = f
            .share
            .transition(vec![Change {
                path: p("d/l"),
                expected: Some(link(t3)),
                new: None,
            }])
            .unwrap();
        assert_eq!(outcomes, vec![Outcome::Applied]);
        assert!(!f.share_dir.join("d/l").exists());
        assert_eq!(dir_time(&f.share, "d"), t3);
    }

    #[test]
    fn file_found_locally_is_sealed_at_stage() {
        let mut f = fixture();
        let data = content(2);
        std::fs::write(f.share_dir.join("old"), &data).unwrap();
        full_scan(&mut f.share);
        keep_waiting(&mut f.share);
        let path = RelPath::from_bytes(b"copy").unwrap();
        assert!(stage(&mut f.share, &path, &data).is_empty(), "all local");
        eventually("the background seal", || is_sealed_on_disk(&f.share, &path));
        let outcomes = f.share.transition(vec![create(&path, &data)]).unwrap();
        assert_eq!(outcomes, vec![Outcome::Applied]);
        assert_eq!(std::fs::read(f.share_dir.join("copy")).unwrap(), data);
    }

    #[test]
    fn background_seal_failure_fails_the_change() {
        let mut f = fixture();
        f.share
            .sealer
            .set_hook(Some(Arc::new(|| Some(rustix::io::Errno::IO))));
        let pending = keep_waiting(&mut f.share);
        let path = RelPath::from_bytes(b"f.bin").unwrap();
        let data = content(3);
        let missing = stage(&mut f.share, &path, &data);
        f.share.supply(missing).unwrap();
        f.share.sealer.wait_idle();
        let outcomes = f.share.transition(vec![create(&path, &data)]).unwrap();
        assert_eq!(
            outcomes,
            vec![Outcome::Failed("fsync failed: I/O error".into())]
        );
        assert!(!f.share_dir.join("f.bin").exists());
        assert!(!f.share.staged.contains_key(&path));
        f.share.unstage(&pending);
        assert_eq!(leftover_temps(&f.share_dir), 0);
    }

    /// Stages `f.bin`, lets its seal start, stages it again (the old temp is dropped while
    /// its seal runs), then lets the two seals end with `results` (the old one's first) and
    /// transitions it.
    fn restage_during_an_inflight_seal(
        results: Vec<Option<rustix::io::Errno>>,
    ) -> (Fixture, Vec<u8>, Vec<Outcome>) {
        let mut f = fixture();
        let (hook, entered, release) = holding_hook(results);
        f.share.sealer.set_hook(Some(hook));
        let pending = keep_waiting(&mut f.share);
        let path = RelPath::from_bytes(b"f.bin").unwrap();
        let data = content(4);
        let missing = stage(&mut f.share, &path, &data);
        f.share.supply(missing).unwrap();
        entered.recv().unwrap();
        let missing = stage(&mut f.share, &path, &data);
        f.share.supply(missing).unwrap();
        release.send(()).unwrap();
        entered.recv().unwrap();
        release.send(()).unwrap();
        f.share.sealer.wait_idle();
        let outcomes = f.share.transition(vec![create(&path, &data)]).unwrap();
        f.share.unstage(&pending);
        (f, data, outcomes)
    }

    #[test]
    fn restage_during_an_inflight_seal_gets_its_own_result() {
        // The first seal fails, but only after its file was staged again: the new temp's own
        // seal (which succeeds) decides.
        let (f, data, outcomes) =
            restage_during_an_inflight_seal(vec![Some(rustix::io::Errno::IO), None]);
        assert_eq!(outcomes, vec![Outcome::Applied]);
        assert_eq!(std::fs::read(f.share_dir.join("f.bin")).unwrap(), data);
        assert_eq!(leftover_temps(&f.share_dir), 0);
    }

    #[test]
    fn restaged_file_is_not_credited_with_the_old_temps_seal() {
        // The first seal succeeds after its file was staged again; the new temp's fails.
        let (f, _, outcomes) =
            restage_during_an_inflight_seal(vec![None, Some(rustix::io::Errno::IO)]);
        assert_eq!(
            outcomes,
            vec![Outcome::Failed("fsync failed: I/O error".into())]
        );
        assert!(!f.share_dir.join("f.bin").exists());
    }

    #[test]
    fn full_scan_during_an_inflight_seal_discards_the_file() {
        let mut f = fixture();
        let (hook, entered, release) = holding_hook(vec![None]);
        f.share.sealer.set_hook(Some(hook));
        keep_waiting(&mut f.share);
        let path = RelPath::from_bytes(b"f.bin").unwrap();
        let data = content(6);
        let missing = stage(&mut f.share, &path, &data);
        f.share.supply(missing).unwrap();
        entered.recv().unwrap();
        // Discards every staged file and reopens the root while the seal runs.
        full_scan(&mut f.share);
        release.send(()).unwrap();
        f.share.sealer.wait_idle();
        let outcomes = f.share.transition(vec![create(&path, &data)]).unwrap();
        assert_eq!(
            outcomes,
            vec![Outcome::Failed("content was not staged".into())]
        );
        assert!(!f.share_dir.join("f.bin").exists());
        assert_eq!(leftover_temps(&f.share_dir), 0);
    }

    #[test]
    fn transition_seals_what_the_background_has_not_started() {
        let mut f = fixture();
        // Every worker held in a seal of another file: this file's job stays queued.
        let (hook, entered, gate) = gate_hook();
        f.share.sealer.set_hook(Some(hook));
        keep_waiting(&mut f.share);
        let mut busy = Vec::new();
        for i in 0..crate::seal::SEAL_WORKERS {
            let p = RelPath::from_bytes(format!("busy{i}").as_bytes()).unwrap();
            let data = content(100 + i as u64);
            let missing = stage(&mut f.share, &p, &data);
            f.share.supply(missing).unwrap();
            entered.recv().unwrap();
            busy.push((p, data));
        }
        let path = RelPath::from_bytes(b"f.bin").unwrap();
        let data = content(7);
        let missing = stage(&mut f.share, &path, &data);
        f.share.supply(missing).unwrap();
        // Taken back from the queue and sealed by the transition itself, without waiting.
        let outcomes = f.share.transition(vec![create(&path, &data)]).unwrap();
        assert_eq!(outcomes, vec![Outcome::Applied]);
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        let changes = busy.iter().map(|(p, d)| create(p, d)).collect();
        let outcomes = f.share.transition(changes).unwrap();
        assert!(
            outcomes.iter().all(|o| *o == Outcome::Applied),
            "{outcomes:?}"
        );
    }

    #[test]
    fn last_file_to_complete_is_left_for_its_transition() {
        let mut f = fixture();
        let path = RelPath::from_bytes(b"f.bin").unwrap();
        let data = content(8);
        let missing = stage(&mut f.share, &path, &data);
        f.share.supply(missing).unwrap();
        // Nothing more to transfer: no thread hand-off, the transition seals it (a live edit).
        assert!(f.share.staged[&path].seal.is_none());
        assert_eq!(temp_meta(&f.share, &path).mode() & 0o7777, 0o600);
        let outcomes = f.share.transition(vec![create(&path, &data)]).unwrap();
        assert_eq!(outcomes, vec![Outcome::Applied]);
        let placed = f.share_dir.join("f.bin");
        assert_eq!(std::fs::read(&placed).unwrap(), data);
        assert_eq!(std::fs::metadata(&placed).unwrap().mode() & 0o7777, MODE);
        assert_eq!(f.share.sealer.workers(), 0, "no sealing thread started");
    }

    /// The file left for its transition is handed to the background once another batch is
    /// staged first: its transition is not next any more (the controller commits a batch
    /// after filling the next), and its fsync can run meanwhile.
    #[test]
    fn a_file_left_for_its_transition_is_sealed_when_another_batch_starts() {
        let mut f = fixture();
        let path = RelPath::from_bytes(b"f.bin").unwrap();
        let data = content(9);
        let missing = stage(&mut f.share, &path, &data);
        f.share.supply(missing).unwrap();
        assert!(
            f.share.staged[&path].seal.is_none(),
            "left for its transition"
        );
        let next = RelPath::from_bytes(b"g.bin").unwrap();
        let next_data = content(10);
        let next_missing = stage(&mut f.share, &next, &next_data);
        assert!(f.share.staged[&path].seal.is_some(), "handed to the sealer");
        eventually("the background seal", || is_sealed_on_disk(&f.share, &path));
        assert!(f.share.staged[&next].seal.is_none(), "still incomplete");
        f.share.supply(next_missing).unwrap();
        let outcomes = f
            .share
            .transition(vec![create(&path, &data), create(&next, &next_data)])
            .unwrap();
        assert_eq!(outcomes, vec![Outcome::Applied, Outcome::Applied]);
        assert_eq!(std::fs::read(f.share_dir.join("f.bin")).unwrap(), data);
        assert_eq!(std::fs::read(f.share_dir.join("g.bin")).unwrap(), next_data);
    }

    #[test]
    fn files_completing_the_transfer_together_are_sealed_early() {
        let mut f = fixture();
        let files: Vec<(RelPath, Vec<u8>)> = (0..3)
            .map(|i| {
                let p = RelPath::from_bytes(format!("f{i}").as_bytes()).unwrap();
                (p, content(200 + i))
            })
            .collect();
        let mut missing = Vec::new();
        for (p, d) in &files {
            missing.extend(stage(&mut f.share, p, d));
        }
        // One supply completes all three and the transfer: still worth the pool.
        f.share.supply(missing).unwrap();
        for (p, _) in &files {
            eventually("the background seal", || is_sealed_on_disk(&f.share, p));
        }
        let changes = files.iter().map(|(p, d)| create(p, d)).collect();
        let outcomes = f.share.transition(changes).unwrap();
        assert!(
            outcomes.iter().all(|o| *o == Outcome::Applied),
            "{outcomes:?}"
        );
    }
}
