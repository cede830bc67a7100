//! One sync cycle of one share between two [`Endpoint`]s: scan both sides, check the roots,
//! reconcile against the ancestor, check the plan is safe, stage files, transition, and record
//! the new ancestor. The controller cannot tell a local side from
//! a remote one; it owns the ancestor and every decision (docs/design.md "Sync model").
//!
//! Order within a cycle matters for both safety and efficiency:
//! 1. Losing versions need no step of their own: the transition that replaces or deletes one
//!    keeps it in its side's trash (`engine/src/trash.rs`), and fails rather than lose it.
//! 2. Every new file is staged before anything is removed, so a renamed or moved file is built
//!    from its old copy instead of crossing the wire.
//! 3. Removals run children-first, then creations parents-first.
//!
//! Live (targeted) cycles keep big transfers out of the way: a file that still needs
//! [`BULK_MIN_BYTES`] or more of chunk data from the other side after staging is left staged
//! and finished by [`Controller::bulk_step`], a few MiB at a time, between the cycles that the
//! next hints bring. Its path is frozen in those cycles until it lands, then hinted again.

use crate::filter::Filter;
use crate::state::{Generation, InFlight, PendingBatch, ShareMeta, StateDb, StateError};
use crate::status::{ProblemView, ShareState, ShareStatus};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vmsync_core::deletions::{judge, lost_content, planned_losses, Content, DeletionWindow};
use vmsync_core::endpoint::{
    Change, ChunkData, ChunkRead, DeltaRead, Endpoint, EndpointError, NotStaged, Outcome, Problem,
    ScanOptions, ScanReport, ScanScope, StageRequest,
};
use vmsync_core::path::{escape_bytes, subtree};
use vmsync_core::reconcile::{reconcile, Action, ConflictPolicy, Plan, Side, SyncMode};
use vmsync_core::rollback::{check_generation, rollback_ancestor, GenerationCheck};
use vmsync_core::safety::{check_emptied, check_root, DeletionLimit, HaltReason};
use vmsync_core::{Entry, FileMeta, Hash, RelPath, Snapshot};

/// Files per stage batch: bounds the temp files a destination holds open at once, two batches'
/// worth (it also caps itself: `max_staged` in `engine/src/local/mod.rs`). 128 keeps round trips and
/// directory fsyncs few (each directory is fsynced once per batch) and the destination's
/// parallel fsyncs busy.
const MAX_STAGE_BATCH_FILES: usize = 128;
/// Chunks per stage batch (summed over its manifests): bounds the size of one message.
const MAX_STAGE_BATCH_CHUNKS: usize = 64 * 1024;
/// Chunks per read/supply round trip: 64 chunks are at most 4 MiB.
const MAX_CHUNKS_PER_READ: usize = 64;
/// Changes per transition message.
const MAX_TRANSITION_BATCH: usize = 1024;
/// In a live cycle, a file missing at least this much chunk data on its destination after
/// staging is finished in the background (see [`Controller::bulk_step`]).
pub const BULK_MIN_BYTES: u64 = 8 << 20;

/// The `halt_code` of a share paused because a disk is below its reserve.
pub const DISK_FULL_CODE: &str = "disk-full";

/// A share's sync settings, resolved from configuration.
#[derive(Debug, Clone)]
pub struct ShareSettings {
    pub name: String,
    pub mode: SyncMode,
    pub policy: ConflictPolicy,
    pub filter: Filter,
    pub deletion_limit: DeletionLimit,
    /// Paths whose deletion never counts toward `deletion_limit` (build outputs and caches
    /// that vanish in bulk by design); still kept in the trash like any other.
    pub deletion_exempt: Filter,
}

#[derive(Debug, thiserror::Error)]
pub enum CycleError {
    #[error("{side} side: {source}")]
    Endpoint {
        side: &'static str,
        #[source]
        source: EndpointError,
    },
    #[error(transparent)]
    State(#[from] StateError),
}

impl CycleError {
    /// True when the connection to the peer is gone: the caller reconnects.
    pub fn is_disconnect(&self) -> bool {
        matches!(
            self,
            CycleError::Endpoint {
                source: EndpointError::Disconnected(_) | EndpointError::Protocol(_),
                ..
            }
        )
    }
}

fn side_err(side: Side) -> impl Fn(EndpointError) -> CycleError {
    move |source| CycleError::Endpoint {
        side: side.as_str(),
        source,
    }
}

/// How a cycle ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CycleReport {
    /// Changes applied on either side.
    pub applied: usize,
    /// Paths left in conflict.
    pub conflicts: usize,
    /// Some change found its path changed since the scan: run another cycle soon.
    pub retry: bool,
    /// The share is halted (now or from before); nothing was changed.
    pub halted: bool,
    /// Changes that failed this cycle (listed as problems); the share is not in sync until a
    /// later cycle does them.
    pub pending: usize,
}

/// Drives cycles for one share. Holds the ancestor in memory and in the state database.
pub struct Controller {
    settings: ShareSettings,
    db: Arc<StateDb>,
    ancestor: Snapshot,
    /// Changes sent in a transition that never answered: each may or may not have landed.
    /// The next full cycle records in the ancestor those its scan finds in place, so that a
    /// copy which landed is not read as the destination's own edit (and a deletion of it on
    /// the source brought back from there).
    unconfirmed: Vec<(Side, RelPath, Option<Entry>)>,
    /// The guest batch in flight, noted on disk (see [`PendingBatch`]).
    pending: PendingBatch,
    /// Regular files in `ancestor` and their total size, kept up to date as it changes: a live
    /// cycle must not cost time in proportion to the whole share.
    totals: Totals,
    meta: ShareMeta,
    /// The share's generation (see `docs/safety.md`, "Snapshot reverts").
    generation: Generation,
    status: Arc<Mutex<ShareStatus>>,
    /// Set by `resume` after a mass-deletion halt: the next cycle may delete past the limit.
    allow_deletions_once: bool,
    /// What each side's transitions removed recently (host, guest): the mass-deletion guard
    /// counts them, and a halt puts them back.
    windows: [DeletionWindow; 2],
    /// Zero of the windows' clock.
    epoch: Instant,
    /// Big files of live cycles still crossing: staged on their destination, chunks missing.
    bulk: VecDeque<BulkJob>,
    /// Paths a finished bulk job asks to look at again (its cycles froze them meanwhile).
    rehint: Vec<RelPath>,
    /// Paths in conflict, as the cycles that last covered them found them.
    conflicts: std::collections::BTreeSet<RelPath>,
    /// Disk space: see [`Controller::set_min_free`].
    space: SpaceGuard,
}

/// What keeps a share from filling a disk (`docs/safety.md`, "Faults and full disks").
struct SpaceGuard {
    /// The host's state directory, whose database every cycle writes.
    state_dir: std::path::PathBuf,
    min_free: vmsync_core::reserve::MinFree,
    /// The share is paused with `disk-full`: the last cycle found a side (or the state
    /// directory) below its reserve. The next cycle tries again.
    paused: bool,
}

/// Files of one stage batch whose missing chunks cross in [`Controller::bulk_step`]s.
struct BulkJob {
    /// The changes to make once everything is there; all on one destination side.
    actions: Vec<Action>,
    /// Source reads of the chunks the destination still lacks, each chunk once, with the base
    /// the destination offered for it (a chunk whose delta failed comes back without one).
    reads: VecDeque<DeltaRead>,
    /// Chunks read and not yet supplied (the source reads ahead of the destination by one step).
    ready: Option<Vec<(ChunkRead, ChunkData)>>,
    /// Chunk → the job's files that wait for it, to drop the right ones when a read fails.
    waiting: HashMap<Hash, Vec<RelPath>>,
    /// Files whose source changed while being read: not committed.
    failed: HashSet<RelPath>,
}

impl BulkJob {
    fn target(&self) -> Option<Side> {
        self.actions.first().map(|a| a.target)
    }

    /// The chunks this job has still to supply, with the side they go to.
    fn queued(&self) -> impl Iterator<Item = (Side, Hash)> + '_ {
        let target = self.target();
        let reads = self.reads.iter().map(|r| r.read.chunk.hash);
        let ready = self.ready.iter().flatten().map(|(r, _)| r.chunk.hash);
        reads
            .chain(ready)
            .filter_map(move |h| target.map(|t| (t, h)))
    }
}

impl Controller {
    pub fn new(
        settings: ShareSettings,
        db: Arc<StateDb>,
        state_dir: &Path,
    ) -> Result<Controller, StateError> {
        let ancestor = db.load_ancestor(&settings.name)?;
        // A share record that cannot be read is lost state: start clean (add-only), never
        // refuse to start.
        let (meta, notice) = match db.load_meta(&settings.name) {
            Ok(meta) => (meta, None),
            Err(e @ StateError::Corrupt { .. }) => {
                let notice = format!(
                    "the share's state record could not be read ({e}): the next cycle merges \
                     both sides add-only"
                );
                tracing::warn!(share = %settings.name, "{notice}");
                db.clear_ancestor(&settings.name)?;
                (ShareMeta::default(), Some(notice))
            }
            Err(e) => return Err(e),
        };
        let ancestor = if notice.is_some() {
            Snapshot::new()
        } else {
            ancestor
        };
        let generation = db.load_generation(&settings.name)?;
        let status = ShareStatus {
            name: settings.name.clone(),
            ..ShareStatus::default()
        };
        let totals = Totals::of(&ancestor, &settings.deletion_exempt);
        let settings_name = settings.name.clone();
        // A batch a killed predecessor left in flight: verified by the first full cycle.
        let pending = PendingBatch::new(state_dir, &settings_name);
        let unconfirmed = pending.load();
        let controller = Controller {
            settings,
            db,
            ancestor,
            unconfirmed,
            pending,
            totals,
            meta,
            generation,
            status: Arc::new(Mutex::new(status)),
            allow_deletions_once: false,
            windows: Default::default(),
            epoch: Instant::now(),
            bulk: VecDeque::new(),
            rehint: Vec::new(),
            space: SpaceGuard {
                state_dir: state_dir.to_path_buf(),
                min_free: Default::default(),
                paused: false,
            },
            conflicts: Default::default(),
        };
        controller.show_halt();
        if let Some(notice) = notice {
            controller.set_notice(notice);
        }
        Ok(controller)
    }

    /// Shows `notice` in the share's status until the agent restarts.
    pub fn set_notice(&self, notice: String) {
        self.update_status(|s| s.notice = Some(notice));
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    pub fn settings(&self) -> &ShareSettings {
        &self.settings
    }

    /// The live status, shared with the control socket.
    pub fn status(&self) -> Arc<Mutex<ShareStatus>> {
        self.status.clone()
    }

    /// Adds chunk payload bytes that crossed the wire for this share (the session counts them).
    pub fn add_wire_bytes(&self, sent: u64, received: u64) {
        self.update_status(|s| {
            s.bytes_sent += sent;
            s.bytes_received += received;
        });
    }

    pub fn is_halted(&self) -> bool {
        self.meta.halt.is_some()
    }

    pub fn set_state(&self, state: ShareState) {
        if let Ok(mut s) = self.status.lock() {
            if s.state != ShareState::Halted || state == ShareState::Halted {
                s.state = state;
            }
        }
    }

    fn update_status(&self, f: impl FnOnce(&mut ShareStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    fn show_halt(&self) {
        let halt = self.meta.halt.clone();
        self.update_status(|s| match halt {
            Some(h) => {
                s.state = ShareState::Halted;
                s.halt_code = Some(h.code().to_string());
                s.halt_reason = Some(h.to_string());
            }
            None => {
                // Lifted: the cycle that follows decides the state; until it starts the share
                // is waiting for it, not for a connection (the caller says so when it is).
                if s.state == ShareState::Halted {
                    s.state = ShareState::Syncing;
                }
                s.halt_code = None;
                s.halt_reason = None;
            }
        });
    }

    /// Lifts a safety halt (`vmsync-host resume`). A replaced, missing or emptied root is
    /// accepted as the new root and the next cycle merges both sides add-only (the ancestor is
    /// forgotten, so nothing is deleted anywhere); a mass deletion is allowed to go ahead once;
    /// after a rolled-back guest the next cycle is a full one that merges add-only with the
    /// host's newer versions winning (see [`Controller::merge_after_rollback`]).
    pub fn resume(&mut self) -> Result<bool, StateError> {
        let Some(halt) = self.meta.halt.take() else {
            return Ok(false);
        };
        match halt {
            HaltReason::MassDeletion { .. } => self.allow_deletions_once = true,
            HaltReason::RootMissing { side, .. }
            | HaltReason::RootReplaced { side, .. }
            | HaltReason::RootEmptied { side } => self.forget_root(side)?,
            HaltReason::GuestRolledBack { .. } => {
                // Recorded before the halt is lifted: the merge must not be skipped by a
                // restart in between.
                self.generation.merge_pending = true;
                self.db
                    .store_generation(&self.settings.name, self.generation)?;
            }
        }
        self.db.store_meta(&self.settings.name, &self.meta)?;
        tracing::info!(share = %self.settings.name, "safety halt lifted by resume");
        self.show_halt();
        Ok(true)
    }

    /// Settles a conflict by hand (`vmsync-host resolve ... --keep host|guest`): `path`'s
    /// ancestor becomes the losing side's current version, so the next cycle of `path` reads
    /// the loser as unchanged and the kept version as the one change: it is copied over the
    /// loser, which goes to the loser's trash like every replaced file, with every check a
    /// cycle makes. Nothing is written here but the ancestor. Refused when `path` is not in
    /// conflict, when the loser is gone, and when it is a directory (never destroyed as a
    /// loser). The caller runs a cycle of `path` next.
    pub async fn resolve<H: Endpoint, G: Endpoint>(
        &mut self,
        host: &mut H,
        guest: &mut G,
        path: &RelPath,
        keep: Side,
    ) -> Result<(), String> {
        if !self.conflicts.contains(path) {
            return Err(format!(
                "{} is not in conflict in share `{}` (as of the last cycle that covered it)",
                path.escaped(),
                self.settings.name
            ));
        }
        let scope = ScanScope::Paths(vec![path.clone()]);
        let opts = ScanOptions {
            create_marker: false,
        };
        let loser = match keep {
            Side::Host => guest.scan(scope, opts).await,
            Side::Guest => host.scan(scope, opts).await,
        }
        .map_err(|e| format!("scanning {}: {e}", path.escaped()))?
        .entries
        .into_iter()
        .find_map(|(p, e)| (p == *path).then_some(e));
        let lose = keep.other().as_str();
        let Some(loser) = loser else {
            return Err(format!(
                "{} is no longer on the {lose} side; the next cycle settles it",
                path.escaped()
            ));
        };
        if loser.is_dir() {
            return Err(format!(
                "the {lose} side's {} is a directory, and vmsync never replaces a directory as a \
                 loser; move it (or the other side's version) aside by hand",
                path.escaped()
            ));
        }
        self.db
            .update_ancestor(&self.settings.name, [(path, Some(&loser))])
            .map_err(|e| format!("recording the resolution: {e}"))?;
        self.ancestor.insert(path.clone(), loser);
        self.totals = Totals::of(&self.ancestor, &self.settings.deletion_exempt);
        tracing::info!(share = %self.settings.name, path = %path.escaped(), keep = keep.as_str(), "conflict resolved by hand");
        Ok(())
    }

    /// Records the host directory the configuration names for the share. When it names
    /// another directory than last time, what the host remembers of the old one no longer
    /// applies: a halt about the host's root (or a mass deletion judged there) is dropped, and
    /// the host's root identity and the ancestor are forgotten, so the first cycle merges the
    /// new directory with the guest add-only (nothing deleted anywhere), as after `resume`.
    pub fn adopt_host_path(&mut self, path: &Path) -> Result<(), StateError> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = path.as_os_str().as_bytes();
        let before = self.db.load_host_path(&self.settings.name)?;
        if before.as_deref() == Some(bytes) {
            return Ok(());
        }
        if let Some(before) = before {
            let dropped = match &self.meta.halt {
                Some(HaltReason::MassDeletion { .. }) => true,
                Some(halt) => halt.side() == Side::Host,
                None => false,
            };
            if dropped {
                self.meta.halt = None;
            }
            self.forget_root(Side::Host)?;
            let notice = format!(
                "the share's host directory changed from {} to {}: {}both sides merge add-only \
                 (nothing deleted anywhere)",
                escape_bytes(&before),
                escape_bytes(bytes),
                if dropped {
                    "the halt about the old one was dropped; "
                } else {
                    ""
                }
            );
            tracing::warn!(share = %self.settings.name, "{notice}");
            self.show_halt();
            self.set_notice(notice);
        }
        self.db.store_host_path(&self.settings.name, bytes)
    }

    /// Milliseconds on the deletion windows' clock.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn window(&mut self, side: Side) -> &mut DeletionWindow {
        match side {
            Side::Host => &mut self.windows[0],
            Side::Guest => &mut self.windows[1],
        }
    }

    /// Judges `side`'s losses in the window plus `planned` more against the share's limit. The
    /// share's size is what it held before the window's losses.
    fn judge_window(&mut self, side: Side, planned: usize) -> Result<(), HaltReason> {
        let limit = self.settings.deletion_limit;
        let countable = usize::try_from(self.totals.countable).unwrap_or(usize::MAX);
        let window = self.window(side).losses();
        judge(
            &limit,
            side,
            window + planned,
            countable.saturating_add(window),
        )
    }

    /// Enters what this cycle's transitions removed and gained into the deletion windows,
    /// creations first (they make up for earlier removals of the same content: a move split
    /// over cycles), then judges each side's window.
    fn count_removals(&mut self, executed: &Executed) -> Result<(), HaltReason> {
        if self.allow_deletions_once {
            return Ok(());
        }
        let touched = self.note_removals(executed);
        for (side, touched) in [Side::Host, Side::Guest].into_iter().zip(touched) {
            if touched {
                self.judge_window(side, 0)?;
            }
        }
        Ok(())
    }

    /// Adds what `executed` removed and gained to the deletion windows; returns which sides'
    /// windows it touched (host, guest).
    fn note_removals(&mut self, executed: &Executed) -> [bool; 2] {
        let now = self.now_ms();
        for (side, content) in &executed.gained {
            self.window(*side).record_creation(content);
        }
        let exempt = self.settings.deletion_exempt.clone();
        let mut touched = [false, false];
        for removed in &executed.removed {
            // A loss whose content the same side gained in this cycle is a move: no loss.
            let counted = removed.lost.clone().filter(|c| {
                !exempt.is_ignored(&removed.path, false)
                    && !executed.gained.contains(&(removed.side, c.clone()))
            });
            touched[usize::from(removed.side == Side::Guest)] = true;
            self.window(removed.side).record_removal(
                now,
                removed.path.clone(),
                removed.entry.clone(),
                counted,
            );
        }
        touched
    }

    /// Halts the share and puts back what the window removed from the side that suffered:
    /// for a mass deletion the side that lost the entries, for a root found missing or emptied
    /// the other side (its recent removals were that wipe's doing). A side that keeps no trash
    /// puts nothing back; its removals stay in its trash if it has one.
    async fn halt_and_put_back<H: Endpoint, G: Endpoint>(
        &mut self,
        reason: HaltReason,
        host: &mut H,
        guest: &mut G,
    ) -> Result<CycleReport, CycleError> {
        // A wipe in progress shows as a root gone or emptied: what the window removed was its
        // doing. A replaced root (a rebuilt VM) or a reverted one says nothing about the
        // deletions before it, which the old root's life made: those stay as they went (kept
        // in the trash).
        let victim = match reason {
            HaltReason::MassDeletion { side, .. } => Some(side),
            HaltReason::RootMissing { side, .. } | HaltReason::RootEmptied { side } => {
                Some(side.other())
            }
            _ => None,
        };
        let report = self.halt(reason)?;
        let Some(victim) = victim else {
            return Ok(report);
        };
        let back = match victim {
            Side::Host => self.put_back(Side::Host, host).await,
            Side::Guest => self.put_back(Side::Guest, guest).await,
        };
        self.windows = Default::default();
        let put_back = back.len();
        // Recorded as synced again, so that `resume` sees the deletion once more. Should the
        // guest be gone for the mark, they stay unrecorded: the next cycle then copies them
        // back to the other side instead (nothing is lost either way).
        if let Err(e) = self.commit_ancestor(guest, back).await {
            tracing::warn!(share = %self.settings.name, "recording what was put back: {e}");
        }
        if put_back > 0 {
            tracing::warn!(
                share = %self.settings.name,
                side = victim.as_str(),
                "put back {put_back} entries that the window's removals took"
            );
            self.update_status(|s| s.put_back = put_back as u64);
        }
        Ok(report)
    }

    /// Asks `ep` to put back every removal in `side`'s window, parents first, the latest
    /// removal of each path. Returns what came back, as ancestor changes.
    async fn put_back<E: Endpoint>(
        &mut self,
        side: Side,
        ep: &mut E,
    ) -> Vec<(RelPath, Option<Entry>)> {
        let mut latest: std::collections::BTreeMap<RelPath, Entry> = Default::default();
        for removal in self.window(side).removals() {
            latest.insert(removal.path.clone(), removal.entry.clone());
        }
        if latest.is_empty() {
            return Vec::new();
        }
        let items: Vec<(RelPath, Entry)> = latest.into_iter().collect();
        let outcomes = match ep.put_back(items.clone()).await {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(share = %self.settings.name, side = side.as_str(), "putting back removed entries failed: {e}");
                return Vec::new();
            }
        };
        let mut back = Vec::new();
        for ((path, entry), outcome) in items.into_iter().zip(outcomes) {
            match outcome {
                Outcome::Applied => back.push((path, Some(entry))),
                Outcome::Changed(_) => {}
                Outcome::Failed(reason) => tracing::warn!(
                    share = %self.settings.name,
                    side = side.as_str(),
                    path = %path.escaped(),
                    "not put back: {}",
                    escape_bytes(reason.as_bytes())
                ),
            }
        }
        back
    }

    fn halt(&mut self, reason: HaltReason) -> Result<CycleReport, CycleError> {
        tracing::warn!(share = %self.settings.name, code = reason.code(), "share halted: {reason}");
        self.meta.halt = Some(reason);
        self.db.store_meta(&self.settings.name, &self.meta)?;
        self.show_halt();
        Ok(CycleReport {
            halted: true,
            ..CycleReport::default()
        })
    }

    /// Sets the free space to keep on the state directory's filesystem (the share's
    /// `min_free`; each side checks its own share root).
    pub fn set_min_free(&mut self, min_free: vmsync_core::reserve::MinFree) {
        self.space.min_free = min_free;
    }

    /// Runs one cycle. A side whose disk is below its reserve (or a host state directory that
    /// is) pauses the share with `disk-full` instead: the report says work is pending, so the
    /// caller tries again later, and the first cycle with room lifts the pause by itself.
    pub async fn cycle<H: Endpoint, G: Endpoint>(
        &mut self,
        host: &mut H,
        guest: &mut G,
        scope: ScanScope,
    ) -> Result<CycleReport, CycleError> {
        if self.meta.halt.is_none() {
            let checked = crate::space::check_path(&self.space.state_dir, self.space.min_free);
            if let Err(EndpointError::DiskFull { free, reserve }) = checked {
                let dir = self.space.state_dir.display().to_string();
                return Ok(self.pause_disk_full(
                    &format!("host state directory {dir}"),
                    free,
                    reserve,
                ));
            }
        }
        let result = self.cycle_inner(host, guest, scope).await;
        if let Err(CycleError::Endpoint {
            side,
            source: EndpointError::DiskFull { free, reserve },
        }) = result
        {
            return Ok(self.pause_disk_full(&format!("{side} share"), free, reserve));
        }
        if std::mem::take(&mut self.space.paused) {
            tracing::info!(share = %self.settings.name, "disk-full pause lifted: there is room again");
            self.show_halt();
            self.update_status(|s| {
                s.disk_free = None;
                s.disk_reserve = None;
            });
        }
        result
    }

    fn pause_disk_full(&mut self, what: &str, free: u64, reserve: u64) -> CycleReport {
        use vmsync_core::reserve::ShowBytes;
        let reason = format!(
            "{what}: {} free, below the reserve of {} (min_free); paused until there is room",
            ShowBytes(free),
            ShowBytes(reserve)
        );
        if !self.space.paused {
            tracing::warn!(share = %self.settings.name, "share paused: {}", escape_bytes(reason.as_bytes()));
        }
        self.space.paused = true;
        self.update_status(|s| {
            s.state = ShareState::Halted;
            s.halt_code = Some(DISK_FULL_CODE.to_string());
            s.halt_reason = Some(escape_bytes(reason.as_bytes()));
            s.disk_free = Some(free);
            s.disk_reserve = Some(reserve);
        });
        CycleReport {
            pending: 1,
            ..CycleReport::default()
        }
    }

    async fn cycle_inner<H: Endpoint, G: Endpoint>(
        &mut self,
        host: &mut H,
        guest: &mut G,
        scope: ScanScope,
    ) -> Result<CycleReport, CycleError> {
        // The merge after a rolled-back guest looks at the whole share.
        let scope = if self.generation.merge_pending {
            ScanScope::Full
        } else {
            scope
        };
        if scope == ScanScope::Full {
            // A full scan discards both sides' staged files; this cycle covers those paths.
            self.bulk.clear();
            self.rehint.clear();
        }
        if let Some(halt) = &self.meta.halt {
            // A missing root that came back unchanged lifts its own halt; every other halt
            // waits for `resume`.
            if !matches!(halt, HaltReason::RootMissing { .. }) {
                return Ok(CycleReport {
                    halted: true,
                    ..CycleReport::default()
                });
            }
        }
        self.set_state(ShareState::Scanning);
        let started = Instant::now();
        let host_opts = ScanOptions {
            create_marker: self.meta.host_root.is_none(),
        };
        let guest_opts = ScanOptions {
            create_marker: self.meta.guest_root.is_none(),
        };
        let ((h, host_took), (g, guest_took)) = tokio::join!(
            timed(host.scan(scope.clone(), host_opts)),
            timed(guest.scan(scope.clone(), guest_opts))
        );
        let (host_scan, guest_scan) =
            match (self.scanned(Side::Host, h)?, self.scanned(Side::Guest, g)?) {
                (Ok(h), Ok(g)) => (h, g),
                (Err(reason), _) | (_, Err(reason)) => {
                    return self.halt_and_put_back(reason, host, guest).await
                }
            };
        for (side, report) in [(Side::Host, &host_scan), (Side::Guest, &guest_scan)] {
            if !self.marker_lost(side, report) {
                continue;
            }
            // Judge a lost marker on a full scan only: a targeted one cannot tell an emptied
            // root from a few quiet paths.
            if scope != ScanScope::Full {
                return Ok(CycleReport {
                    retry: true,
                    ..CycleReport::default()
                });
            }
            if !report.entries.is_empty() {
                self.forget_root(side)?;
                let notice = format!(
                    "the {} share's root marker (.vmsync/id) was gone: the root was accepted \
                     again and both sides merged add-only (nothing deleted anywhere)",
                    side.as_str()
                );
                tracing::warn!(share = %self.settings.name, "{notice}");
                self.set_notice(notice);
                return Ok(CycleReport {
                    retry: true,
                    ..CycleReport::default()
                });
            }
        }
        if let Err(reason) = self.check_roots(&host_scan, &guest_scan) {
            return self.halt_and_put_back(reason, host, guest).await;
        }
        if matches!(self.meta.halt, Some(HaltReason::RootMissing { .. })) {
            self.meta.halt = None;
            self.db.store_meta(&self.settings.name, &self.meta)?;
            self.show_halt();
        }
        if let Err(reason) = self.check_generation(&guest_scan) {
            return self.halt(reason);
        }

        let filter = &self.settings.filter.clone();
        let visible = |entries: Vec<(RelPath, Entry)>| -> Snapshot {
            entries
                .into_iter()
                .filter(|(p, e)| !filter.is_ignored(p, e.is_dir()))
                .collect()
        };
        let mut host_snap = visible(host_scan.entries);
        let mut guest_snap = visible(guest_scan.entries);
        if scope == ScanScope::Full {
            // What this process or a killed predecessor applied without recording it.
            let mut candidates = std::mem::take(&mut self.unconfirmed);
            candidates.extend(self.pending.load());
            let landed: Vec<(RelPath, Option<Entry>)> = candidates
                .into_iter()
                .filter(|(side, path, new)| {
                    let snap = match side {
                        Side::Host => &host_snap,
                        Side::Guest => &guest_snap,
                    };
                    snap.get(path) == new.as_ref()
                })
                .map(|(_, path, new)| (path, new))
                .collect();
            let mut seen = HashSet::new();
            let landed: Vec<(RelPath, Option<Entry>)> = landed
                .into_iter()
                .filter(|(p, _)| seen.insert(p.clone()))
                .collect();
            self.commit_ancestor(guest, landed).await?;
            self.pending.clear();
        }
        // What the scope covers, found by range: a live cycle looks at its paths only.
        let scoped: Box<dyn Iterator<Item = (&RelPath, &Entry)>> = match &scope {
            ScanScope::Full => Box::new(self.ancestor.iter()),
            ScanScope::Paths(paths) => Box::new(
                paths
                    .iter()
                    .flat_map(|p| subtree(&self.ancestor, p))
                    .chain(scope_parents(paths).filter_map(|d| self.ancestor.get_key_value(&d))),
            ),
        };
        let mut ancestor: Snapshot = scoped
            .filter(|(p, e)| !filter.is_ignored(p, e.is_dir()))
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect();
        // A path a scan could not read (unreadable, still changing, a special file in the way)
        // is absent from its report. Absent must not read as deleted: freeze every such path,
        // and everything beneath it, on both sides for this cycle. Likewise what a side's own
        // ignore files exclude: never sent, deleted or overwritten, and its ancestor record
        // kept for when it is no longer ignored. Files still crossing in a bulk job are frozen
        // too, until it has landed them.
        let frozen: Vec<&RelPath> = host_scan
            .problems
            .iter()
            .chain(&guest_scan.problems)
            .map(|p| &p.path)
            .chain(&host_scan.ignored)
            .chain(&guest_scan.ignored)
            .chain(
                self.bulk
                    .iter()
                    .flat_map(|j| j.actions.iter().map(|a| &a.path)),
            )
            .collect();
        for path in frozen {
            for snap in [&mut host_snap, &mut guest_snap, &mut ancestor] {
                remove_subtree(snap, path);
            }
        }
        if let ScanScope::Paths(paths) = &scope {
            only_directory_parents(paths, &mut ancestor, &mut host_snap, &mut guest_snap);
        }
        if scope == ScanScope::Full {
            for (side, snap) in [(Side::Host, &host_snap), (Side::Guest, &guest_snap)] {
                if let Err(reason) = check_emptied(side, &ancestor, snap) {
                    return self.halt_and_put_back(reason, host, guest).await;
                }
            }
        }
        if self.generation.merge_pending {
            ancestor = self
                .merge_after_rollback(guest, &ancestor, &host_snap, &guest_snap)
                .await?;
        }

        let mut plan = reconcile(
            &ancestor,
            &host_snap,
            &guest_snap,
            self.settings.mode,
            self.settings.policy,
        );
        // A directory the other side removed cannot go while something this side ignores is
        // still in it (nothing ignored is ever deleted). Keep it, and forget it in the
        // ancestor: the next cycle then sees it as this side's and gives the other side the
        // (empty) directory back, where retrying the removal would fail on every cycle.
        let mut kept_dirs = Vec::new();
        plan.actions.retain(|a| {
            let ignored = match a.target {
                Side::Host => &host_scan.ignored,
                Side::Guest => &guest_scan.ignored,
            };
            let keep = a.new.is_none()
                && matches!(a.expected, Some(Entry::Dir { .. }))
                && holds_any(ignored, &a.path);
            if keep {
                kept_dirs.push(a.path.clone());
            }
            !keep
        });
        let dirs_kept = !kept_dirs.is_empty();
        plan.agreed.extend(kept_dirs.into_iter().map(|p| (p, None)));
        let now = self.now_ms();
        for window in &mut self.windows {
            window.expire(now);
        }
        if self.allow_deletions_once {
            self.windows = Default::default();
        } else {
            // The plan's losses on top of what the window already holds, against the whole
            // share, also for a targeted cycle.
            let exempt = self.settings.deletion_exempt.clone();
            let verdict = [Side::Host, Side::Guest].into_iter().try_for_each(|side| {
                let planned = planned_losses(&plan, side, |p| exempt.is_ignored(p, false));
                self.judge_window(side, planned)
            });
            if let Err(reason) = verdict {
                // A targeted cycle sees part of the story: the hint for a directory's old name
                // can arrive a moment before the one for its new name, and a move then looks
                // like a mass deletion. Decide only on a full cycle.
                if scope != ScanScope::Full {
                    return Ok(CycleReport {
                        retry: true,
                        ..CycleReport::default()
                    });
                }
                return self.halt_and_put_back(reason, host, guest).await;
            }
        }

        let mut problems = Vec::new();
        for (side, list) in [
            (Side::Host, host_scan.problems),
            (Side::Guest, guest_scan.problems),
        ] {
            problems.extend(list.into_iter().map(|p| view(side, p)));
        }
        self.set_state(ShareState::Syncing);
        let mut ancestor_changes: Vec<(RelPath, Option<Entry>)> = plan.agreed.clone();
        let defer = scope != ScanScope::Full;
        let planned = started.elapsed();
        let mut executed = self
            .execute(host, guest, &plan, defer, &mut problems)
            .await?;
        if let Some(rec) = &executed.recorder {
            self.generation = rec.generation;
        }
        let done = started.elapsed();
        // What the transitions stored already is a prefix of `applied`; it is that of these
        // changes only when nothing comes before it.
        let stored = if ancestor_changes.is_empty() {
            executed.recorded
        } else {
            0
        };
        ancestor_changes.extend(executed.applied.iter().cloned());
        if let Err(e) = self
            .commit_ancestor_from(guest, ancestor_changes, stored)
            .await
        {
            self.record_cut_off(executed);
            return Err(e);
        }
        self.pending.clear();
        if let Err(reason) = self.count_removals(&executed) {
            // Only removals this cycle could not foresee get here (the plan was judged): halt
            // all the same, and undo the window.
            return self.halt_and_put_back(reason, host, guest).await;
        }
        self.allow_deletions_once = false;
        tracing::debug!(
            share = %self.settings.name,
            full = scope == ScanScope::Full,
            actions = plan.actions.len(),
            applied = executed.applied.len(),
            "cycle: scanned (host {} us, guest {} us) and planned in {} us, executed in {} us \
             (manifests {}, stage {}, transfer {}, transition {}), recorded in {} us",
            host_took.as_micros(),
            guest_took.as_micros(),
            planned.as_micros(),
            (done - planned).as_micros(),
            executed.times.manifests.as_micros(),
            executed.times.stage.as_micros(),
            executed.times.transfer.as_micros(),
            executed.times.transition.as_micros(),
            (started.elapsed() - done).as_micros()
        );
        self.bulk.extend(std::mem::take(&mut executed.bulk));

        let (files, bytes) = self.agreed_totals();
        // A targeted cycle sees only its paths: conflicts elsewhere stand until a cycle that
        // covers them finds them settled.
        match &scope {
            ScanScope::Full => self.conflicts.clear(),
            ScanScope::Paths(paths) => {
                let parents: HashSet<RelPath> = scope_parents(paths).collect();
                self.conflicts.retain(|c| {
                    !parents.contains(c) && !paths.iter().any(|p| p == c || p.is_ancestor_of(c))
                })
            }
        }
        self.conflicts
            .extend(plan.conflicts.iter().map(|c| c.path.clone()));
        let conflicts: Vec<String> = self.conflicts.iter().map(RelPath::escaped).collect();
        let dirs = (scope == ScanScope::Full)
            .then(|| 1 + host_snap.values().filter(|e| e.is_dir()).count() as u64);
        let report = CycleReport {
            applied: executed.applied.len(),
            conflicts: conflicts.len(),
            retry: executed.retry || dirs_kept,
            halted: false,
            pending: executed.pending,
        };
        let bulk_pending = !self.bulk.is_empty();
        self.update_status(|s| {
            s.state = if !conflicts.is_empty() {
                ShareState::Conflicted
            } else if report.pending > 0 || report.retry || bulk_pending {
                // Work remains: not in sync until a later cycle has done it.
                ShareState::Syncing
            } else {
                ShareState::InSync
            };
            s.conflicts = conflicts;
            s.problems = problems;
            s.files = files;
            s.bytes = bytes;
            if let Some(dirs) = dirs {
                s.watched_dirs = dirs;
            }
            s.chunks_reused += executed.chunks_reused;
            s.cycles += 1;
        });
        Ok(report)
    }

    /// Turns a scan result into a report, a halt reason (root gone) or a cycle error.
    fn scanned(
        &self,
        side: Side,
        result: Result<ScanReport, EndpointError>,
    ) -> Result<Result<ScanReport, HaltReason>, CycleError> {
        match result {
            Ok(r) => Ok(Ok(r)),
            Err(EndpointError::RootMissing(detail)) => {
                Ok(Err(HaltReason::RootMissing { side, detail }))
            }
            Err(EndpointError::RootNotDir(detail)) => Ok(Err(HaltReason::RootReplaced {
                side,
                detail: format!("{detail} is no longer a directory"),
            })),
            Err(e) => Err(side_err(side)(e)),
        }
    }

    /// True when `side`'s root had a marker at the last sync and this scan found none, while
    /// the root itself is the same directory: someone removed `.vmsync/` (or just its `id`).
    fn marker_lost(&self, side: Side, report: &ScanReport) -> bool {
        let stored = match side {
            Side::Host => self.meta.host_root,
            Side::Guest => self.meta.guest_root,
        };
        match (stored, report.root) {
            (Some(stored), Some(seen)) => {
                stored.has_marker()
                    && !seen.has_marker()
                    && stored.dev == seen.dev
                    && stored.ino == seen.ino
            }
            _ => false,
        }
    }

    /// Forgets `side`'s root identity and the ancestor: the next scan makes a new marker, and
    /// the next cycle merges both sides add-only.
    fn forget_root(&mut self, side: Side) -> Result<(), StateError> {
        match side {
            Side::Host => self.meta.host_root = None,
            Side::Guest => self.meta.guest_root = None,
        }
        self.db.store_meta(&self.settings.name, &self.meta)?;
        self.db.clear_ancestor(&self.settings.name)?;
        self.ancestor.clear();
        self.totals = Totals::default();
        self.windows = Default::default();
        if side == Side::Guest {
            // A new guest root (or one that lost `.vmsync/`) starts its generations afresh.
            self.generation = Generation::default();
            self.db
                .store_generation(&self.settings.name, self.generation)?;
        }
        Ok(())
    }

    fn check_roots(&mut self, host: &ScanReport, guest: &ScanReport) -> Result<(), HaltReason> {
        check_root(Side::Host, self.meta.host_root, host.root)?;
        check_root(Side::Guest, self.meta.guest_root, guest.root)?;
        let mut changed = false;
        for (stored, seen) in [
            (&mut self.meta.host_root, host.root),
            (&mut self.meta.guest_root, guest.root),
        ] {
            if stored.is_none() && seen.is_some_and(|r| r.has_marker()) {
                *stored = seen;
                changed = true;
            }
        }
        if changed {
            let meta = self.meta.clone();
            if let Err(e) = self.db.store_meta(&self.settings.name, &meta) {
                tracing::error!(share = %self.settings.name, "recording root identity: {e}");
            }
        }
        Ok(())
    }

    /// What both sides agree on: regular files and their total size.
    fn agreed_totals(&self) -> (u64, u64) {
        (self.totals.files, self.totals.bytes)
    }

    /// True while big files of live cycles are still crossing (see [`Controller::bulk_step`]).
    /// Whether `path` is a directory as both sides last agreed (the root always is).
    pub fn is_known_dir(&self, path: &RelPath) -> bool {
        path.is_root() || matches!(self.ancestor.get(path), Some(Entry::Dir { .. }))
    }

    pub fn has_bulk(&self) -> bool {
        !self.bulk.is_empty()
    }

    /// Paths to look at again: finished bulk jobs froze them while they ran.
    pub fn take_rehints(&mut self) -> Vec<RelPath> {
        std::mem::take(&mut self.rehint)
    }

    /// Moves the oldest bulk job one step on: the source reads the next group of its missing
    /// chunks while the destination takes the group read last time. When all are there, its
    /// files are committed like a cycle's, and their paths queued for [`take_rehints`]: the
    /// cycles that ran meanwhile froze them, so whatever changed there since is looked at now.
    ///
    /// [`take_rehints`]: Controller::take_rehints
    pub async fn bulk_step<H: Endpoint, G: Endpoint>(
        &mut self,
        host: &mut H,
        guest: &mut G,
    ) -> Result<(), CycleError> {
        let Some(job) = self.bulk.front_mut() else {
            return Ok(());
        };
        let Some(target) = job.target() else {
            self.bulk.pop_front();
            return Ok(());
        };
        let source = target.other();
        let advanced = match target {
            Side::Guest => advance(host, guest, job).await,
            Side::Host => advance(guest, host, job).await,
        };
        let done = match advanced {
            Ok(done) => done,
            Err((which, e)) => {
                // Give the job up; its paths are looked at again by the next cycle.
                if let Some(job) = self.bulk.pop_front() {
                    self.rehint.extend(job.actions.into_iter().map(|a| a.path));
                }
                return Err(side_err(flip(which, source))(e));
            }
        };
        if !done {
            return Ok(());
        }
        let Some(job) = self.bulk.pop_front() else {
            return Ok(());
        };
        self.rehint
            .extend(job.actions.iter().map(|a| a.path.clone()));
        let ready: Vec<Action> = job
            .actions
            .iter()
            .filter(|a| !job.failed.contains(&a.path))
            .cloned()
            .collect();
        let mut executed = Executed::default();
        let mut problems = Vec::new();
        let result = match target {
            Side::Guest => {
                transition(guest, target, &ready, &mut problems, &mut executed, false).await
            }
            Side::Host => {
                transition(host, target, &ready, &mut problems, &mut executed, false).await
            }
        };
        result.map_err(|(_, e)| side_err(target)(e))?;
        self.commit_ancestor(guest, std::mem::take(&mut executed.applied))
            .await?;
        // A bulk job only creates; its creations may make up for earlier removals.
        if let Err(reason) = self.count_removals(&executed) {
            self.halt_and_put_back(reason, host, guest).await?;
        }
        let (files, bytes) = self.agreed_totals();
        self.update_status(|s| {
            s.files = files;
            s.bytes = bytes;
        });
        Ok(())
    }

    /// Records ancestor changes, after the guest has noted the next generation: whatever
    /// guest state the new ancestor relies on is stamped before the host relies on it, so a
    /// revert to any instant after this is seen. If the guest cannot note it, nothing is
    /// recorded (the next cycle finds both sides agreeing again).
    async fn commit_ancestor<G: Endpoint>(
        &mut self,
        guest: &mut G,
        changes: Vec<(RelPath, Option<Entry>)>,
    ) -> Result<(), CycleError> {
        self.commit_ancestor_from(guest, changes, 0).await
    }

    /// Records `changes` in the ancestor, in memory and in the database, where the first
    /// `stored` of them already are (a transition recorded them as it landed). The rest is
    /// recorded after the guest has noted the next generation, like every ancestor write.
    async fn commit_ancestor_from<G: Endpoint>(
        &mut self,
        guest: &mut G,
        changes: Vec<(RelPath, Option<Entry>)>,
        stored: usize,
    ) -> Result<(), CycleError> {
        if changes.is_empty() {
            return Ok(());
        }
        if let Some(rest) = changes.get(stored..).filter(|r| !r.is_empty()) {
            let rows = rest.iter().map(|(p, e)| (p, e.as_ref())).collect();
            self.generation = mark_and_record(
                guest,
                &self.db,
                &self.settings.name,
                self.generation,
                rows,
                false,
            )
            .await?;
        }
        for (path, entry) in changes {
            self.totals.record(
                &mut self.ancestor,
                path,
                entry,
                &self.settings.deletion_exempt,
            );
        }
        Ok(())
    }

    /// Checks the generation the guest's scan reported (`vmsync_core::rollback`): older than
    /// the host's halts the share, newer is adopted. Skipped for the merge after `resume`.
    fn check_generation(&mut self, guest: &ScanReport) -> Result<(), HaltReason> {
        if self.generation.merge_pending {
            return Ok(());
        }
        let seen = guest.generation;
        let marked = guest.root.is_some_and(|r| r.has_marker());
        match check_generation(self.generation.value, seen, marked)? {
            GenerationCheck::Current => {}
            GenerationCheck::Adopt(value) => {
                tracing::info!(share = %self.settings.name, "the guest holds generation {value}, newer than the host's {}: adopted", self.generation.value);
                self.generation.value = value;
                if let Err(e) = self
                    .db
                    .store_generation(&self.settings.name, self.generation)
                {
                    tracing::error!(share = %self.settings.name, "recording the generation: {e}");
                }
            }
        }
        Ok(())
    }

    /// The first full cycle after `resume` of a rolled-back guest: replaces the (in-scope)
    /// ancestor with the substitute of [`rollback_ancestor`], under which reconcile deletes
    /// nothing on either side and the host's versions win over the guest's older ones, and
    /// records it as the ancestor with a generation past the host's, noted on the guest
    /// first. Recording it (rather than using it once) keeps a merge that does not finish in
    /// one cycle add-only in the cycles after. Returns the substitute.
    async fn merge_after_rollback<G: Endpoint>(
        &mut self,
        guest: &mut G,
        ancestor: &Snapshot,
        host: &Snapshot,
        guest_snap: &Snapshot,
    ) -> Result<Snapshot, CycleError> {
        let substitute = rollback_ancestor(ancestor, host, guest_snap);
        let rows = substitute.iter().map(|(p, e)| (p, Some(e))).collect();
        self.generation = mark_and_record(
            guest,
            &self.db,
            &self.settings.name,
            self.generation,
            rows,
            true,
        )
        .await?;
        tracing::info!(share = %self.settings.name, "merging add-only after the guest went back in time: {} of {} ancestor entries kept", substitute.len(), self.ancestor.len());
        self.ancestor = substitute.clone();
        self.totals = Totals::of(&self.ancestor, &self.settings.deletion_exempt);
        Ok(substitute)
    }

    async fn execute<H: Endpoint, G: Endpoint>(
        &mut self,
        host: &mut H,
        guest: &mut G,
        plan: &Plan,
        defer: bool,
        problems: &mut Vec<ProblemView>,
    ) -> Result<Executed, CycleError> {
        let mut executed = Executed {
            recorder: Some(Recorder {
                db: self.db.clone(),
                share: self.settings.name.clone(),
                generation: self.generation,
                pending: PendingBatch::new(&self.space.state_dir, &self.settings.name),
            }),
            queued: self.bulk.iter().flat_map(BulkJob::queued).collect(),
            ..Executed::default()
        };
        let mut host_actions = Vec::new();
        let mut guest_actions = Vec::new();
        for action in &plan.actions {
            match action.target {
                Side::Host => host_actions.push(action.clone()),
                Side::Guest => guest_actions.push(action.clone()),
            }
        }
        // Apply each side: see `apply_side` for the order. A side that fails part way
        // leaves what already landed recorded in the ancestor (see `Executed::recorder`).
        if let Err((which, e)) = apply_side(
            guest,
            host,
            Side::Host,
            host_actions,
            defer,
            problems,
            &mut executed,
        )
        .await
        {
            self.record_cut_off(executed);
            return Err(side_err(flip(which, Side::Guest))(e));
        }
        if let Err((which, e)) = apply_side(
            host,
            guest,
            Side::Guest,
            guest_actions,
            defer,
            problems,
            &mut executed,
        )
        .await
        {
            self.record_cut_off(executed);
            return Err(side_err(flip(which, Side::Host))(e));
        }
        Ok(executed)
    }

    /// A cycle failed after applying `executed.applied`: those changes are true on both sides
    /// now, so the ancestor takes them (in memory too, for the next cycle of this process).
    ///
    /// The guest may be gone, so nothing is recorded here: what landed without being recorded
    /// is verified by the next full cycle's scans and recorded then (`unconfirmed`; either
    /// side holding the new entry is enough, the change made both sides hold it). The
    /// generation and what the transitions did record are kept.
    fn record_cut_off(&mut self, executed: Executed) {
        if let Some(recorder) = &executed.recorder {
            self.generation = recorder.generation;
        }
        // What landed before the cut counts in the deletion windows, and is put back with
        // them if a halt follows (a wipe of the other side fails a cycle part way).
        if !self.allow_deletions_once {
            self.note_removals(&executed);
        }
        self.unconfirmed.extend(executed.unconfirmed);
        let mut applied = executed.applied;
        let unrecorded = applied.split_off(executed.recorded.min(applied.len()));
        // The recorded prefix is in the database already: the in-memory ancestor follows.
        for (path, entry) in applied {
            self.totals.record(
                &mut self.ancestor,
                path,
                entry,
                &self.settings.deletion_exempt,
            );
        }
        for (path, new) in unrecorded {
            for side in [Side::Host, Side::Guest] {
                self.unconfirmed.push((side, path.clone(), new.clone()));
            }
        }
    }
}

fn flip(which: Which, source_side: Side) -> Side {
    match which {
        Which::Source => source_side,
        Which::Dest => source_side.other(),
    }
}

#[derive(Default)]
struct Executed {
    applied: Vec<(RelPath, Option<Entry>)>,
    /// What applied changes removed or replaced by another kind (for the deletion windows).
    removed: Vec<Removed>,
    /// Content applied changes created on a side (for the deletion windows).
    gained: Vec<(Side, Content)>,
    /// Where each transition records what it applied in the ancestor, durably, as soon as it
    /// returns (`None`: only at the end of the cycle). A cycle cut off later (the agent killed,
    /// the connection lost) must not forget what already landed: the next cycle would read a
    /// file it copied as the destination's own creation, and the source's later edit or
    /// deletion of it as a conflict or a resurrection.
    recorder: Option<Recorder>,
    /// How many of `applied`, from the start, the recorder has stored.
    recorded: usize,
    /// The changes of a transition that failed without an answer (the connection lost, the
    /// destination killed): some may have landed. See `Controller::unconfirmed`.
    unconfirmed: Vec<(Side, RelPath, Option<Entry>)>,
    /// Paths changed under the cycle: run another one now.
    retry: bool,
    /// Actions that could not be done this cycle (reported as problems): retry later.
    pending: usize,
    chunks_reused: u64,
    /// Big files left staged for [`Controller::bulk_step`].
    bulk: Vec<BulkJob>,
    /// Chunks that bulk jobs (earlier ones, or this cycle's) are still to supply, by
    /// destination side. A file staged now that lacks one joins the bulk queue behind them and
    /// is filled by that supply: asked again, the chunk would cross twice.
    queued: HashSet<(Side, Hash)>,
    /// Where the time went, for the cycle's debug log.
    times: PhaseTimes,
}

/// An entry an applied change took from its side: deleted, or replaced by another kind.
struct Removed {
    side: Side,
    path: RelPath,
    entry: Entry,
    /// What that side lost, when it was a file or symlink.
    lost: Option<Content>,
}

/// Time a cycle spent waiting on each kind of endpoint call (debug log only).
#[derive(Default)]
struct PhaseTimes {
    manifests: std::time::Duration,
    stage: std::time::Duration,
    transfer: std::time::Duration,
    transition: std::time::Duration,
}

fn view(side: Side, p: Problem) -> ProblemView {
    ProblemView {
        path: p.path.escaped(),
        side: side.as_str().into(),
        // Reasons may come from the guest: never let its bytes reach a terminal raw.
        reason: escape_bytes(p.reason.as_bytes()),
    }
}

/// Runs `f`, timing it (for the debug log).
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, std::time::Duration) {
    let clock = Instant::now();
    let out = f.await;
    (out, clock.elapsed())
}

/// Regular files and their total size in a snapshot, and the entries the deletion guard
/// counts (files and symlinks at paths not exempt).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Totals {
    files: u64,
    bytes: u64,
    countable: u64,
}

impl Totals {
    fn of(snap: &Snapshot, exempt: &Filter) -> Totals {
        let mut t = Totals::default();
        snap.iter().for_each(|(p, e)| t.add(p, e, exempt));
        t
    }

    fn add(&mut self, path: &RelPath, e: &Entry, exempt: &Filter) {
        if let Some(m) = e.as_file() {
            self.files += 1;
            self.bytes = self.bytes.saturating_add(m.size);
        }
        if !e.is_dir() && !exempt.is_ignored(path, false) {
            self.countable += 1;
        }
    }

    fn remove(&mut self, path: &RelPath, e: &Entry, exempt: &Filter) {
        if let Some(m) = e.as_file() {
            self.files = self.files.saturating_sub(1);
            self.bytes = self.bytes.saturating_sub(m.size);
        }
        if !e.is_dir() && !exempt.is_ignored(path, false) {
            self.countable = self.countable.saturating_sub(1);
        }
    }

    /// Sets (or with `None` removes) `path` in `snap`, which these are the totals of.
    fn record(
        &mut self,
        snap: &mut Snapshot,
        path: RelPath,
        entry: Option<Entry>,
        exempt: &Filter,
    ) {
        if let Some(e) = &entry {
            self.add(&path, e, exempt);
        }
        let old = match entry {
            Some(e) => snap.insert(path.clone(), e),
            None => snap.remove(&path),
        };
        if let Some(old) = old {
            self.remove(&path, &old, exempt);
        }
    }
}

/// Removes `path` and everything beneath it from `snap`.
/// The directories the paths of a targeted scope are in (not the root, none inside the scope).
fn scope_parents(paths: &[RelPath]) -> impl Iterator<Item = RelPath> + '_ {
    let parents: BTreeSet<RelPath> = paths
        .iter()
        .filter_map(RelPath::parent)
        .filter(|d| !d.is_root() && !paths.iter().any(|p| p == d || p.is_ancestor_of(d)))
        .collect();
    parents.into_iter()
}

/// A targeted scan reports the directories its paths are in for their own metadata (a change
/// inside moves a directory's mtime), without the rest of what they hold. Such a directory is
/// reconciled only when it is a directory in the ancestor and on both sides: a metadata
/// update at most. Anything else there (created, deleted, replaced) is left to a scan that
/// covers it, so it is dropped from all three snapshots.
fn only_directory_parents(
    paths: &[RelPath],
    ancestor: &mut Snapshot,
    host: &mut Snapshot,
    guest: &mut Snapshot,
) {
    for dir in scope_parents(paths) {
        let all_dirs = [&*ancestor, &*host, &*guest]
            .iter()
            .all(|s| s.get(&dir).is_some_and(Entry::is_dir));
        if !all_dirs {
            for snap in [&mut *ancestor, &mut *host, &mut *guest] {
                snap.remove(&dir);
            }
        }
    }
}

fn remove_subtree(snap: &mut Snapshot, path: &RelPath) {
    if path.is_root() {
        snap.clear();
        return;
    }
    let doomed: Vec<RelPath> = subtree(snap, path).map(|(p, _)| p.clone()).collect();
    for p in doomed {
        snap.remove(&p);
    }
}

/// True when `sorted` (sorted by path, as scans report ignored paths) holds a path beneath
/// `dir`. Descendants of `dir` are exactly the paths starting with "dir/": a binary search
/// finds the first path not below that prefix, so a removal of many directories does not scan
/// a long list once each.
fn holds_any(sorted: &[RelPath], dir: &RelPath) -> bool {
    let mut prefix = dir.as_bytes().to_vec();
    prefix.push(b'/');
    let first = sorted.partition_point(|p| p.as_bytes() < prefix.as_slice());
    sorted.get(first).is_some_and(|p| dir.is_ancestor_of(p))
}

/// Which endpoint of a transfer failed.
#[derive(Debug, Clone, Copy)]
enum Which {
    Source,
    Dest,
}

/// True when the action needs file content on its target (not a metadata-only change).
fn needs_content(action: &Action) -> Option<&FileMeta> {
    let Some(Entry::File(new)) = &action.new else {
        return None;
    };
    match &action.expected {
        Some(Entry::File(old)) if old.digest == new.digest && old.size == new.size => None,
        _ => Some(new),
    }
}

/// What [`stage_files`] did with a batch's files.
#[derive(Debug, Default)]
struct StagedFiles {
    /// Fully staged: ready for their transition.
    staged: HashSet<RelPath>,
    /// Not staged for want of room on the destination ([`NotStaged::NoRoom`]): to be asked
    /// again once what waits there is committed.
    no_room: HashSet<RelPath>,
}

/// Stages on `dst` every file the actions need, reading missing chunks from `src`. Returns the
/// paths that are fully staged and those the destination had no room for. With `defer`, a file
/// still missing [`BULK_MIN_BYTES`] or more after staging is left staged: it goes into a bulk
/// job in `executed` and into `deferred_paths`. Per-file trouble becomes a problem; an endpoint failure is an error
/// tagged with which endpoint failed.
async fn stage_files<S: Endpoint, D: Endpoint>(
    src: &mut S,
    dst: &mut D,
    actions: &[Action],
    defer: bool,
    deferred_paths: &mut HashSet<RelPath>,
    problems: &mut Vec<ProblemView>,
    executed: &mut Executed,
) -> Result<StagedFiles, (Which, EndpointError)> {
    let Some(dst_side) = actions.first().map(|a| a.target) else {
        return Ok(StagedFiles::default());
    };
    let src_side = dst_side.other();
    let wanted: Vec<(RelPath, FileMeta)> = actions
        .iter()
        .filter_map(|a| needs_content(a).map(|m| (a.path.clone(), *m)))
        .collect();
    let mut staged = HashSet::new();
    let mut no_room = HashSet::new();
    let mut batch: Vec<(RelPath, FileMeta)> = Vec::new();
    let mut batch_chunks = 0usize;
    let mut pending = wanted.into_iter().peekable();
    while pending.peek().is_some() || !batch.is_empty() {
        // Fill a batch, estimating chunks from size (a manifest has at most size/min + 1).
        while let Some((_, meta)) = pending.peek() {
            let estimate =
                (meta.size / u64::from(vmsync_core::limits::CHUNK_AVG_BYTES)) as usize + 1;
            if !batch.is_empty()
                && (batch.len() >= MAX_STAGE_BATCH_FILES
                    || batch_chunks + estimate > MAX_STAGE_BATCH_CHUNKS)
            {
                break;
            }
            batch_chunks += estimate;
            if let Some(item) = pending.next() {
                batch.push(item);
            }
        }
        let items = std::mem::take(&mut batch);
        batch_chunks = 0;
        let clock = Instant::now();
        let manifests = src
            .manifests(items.clone())
            .await
            .map_err(|e| (Which::Source, e))?;
        executed.times.manifests += clock.elapsed();
        let mut requests = Vec::new();
        for ((path, meta), m) in items.into_iter().zip(manifests) {
            match m {
                Ok(manifest) => requests.push(StageRequest {
                    path,
                    meta,
                    manifest,
                }),
                Err(p) => problems.push(view(src_side, p)),
            }
        }
        // Where to read each chunk from on the source, and which files wait for it.
        let mut sources: HashMap<Hash, ChunkRead> = HashMap::new();
        for r in &requests {
            for c in &r.manifest.chunks {
                sources.entry(c.hash).or_insert_with(|| ChunkRead {
                    path: r.path.clone(),
                    chunk: *c,
                });
            }
        }
        let paths: Vec<(RelPath, usize)> = requests
            .iter()
            .map(|r| (r.path.clone(), r.manifest.chunks.len()))
            .collect();
        let clock = Instant::now();
        let results = dst.stage(requests).await.map_err(|e| (Which::Dest, e))?;
        executed.times.stage += clock.elapsed();
        let clock = Instant::now();
        // Only hashes this batch's manifests contain can be read; anything else a (possibly
        // hostile) destination asked for is ignored. A base is the destination's business: the
        // source only computes a delta against it, and the destination checks what it rebuilds.
        let mut bases: HashMap<Hash, Vec<u8>> = HashMap::new();
        let mut wants: Vec<(RelPath, Vec<Hash>, bool)> = Vec::new();
        for ((path, total), result) in paths.into_iter().zip(results) {
            match result {
                Ok(missing) => {
                    executed.chunks_reused += total.saturating_sub(missing.len()) as u64;
                    let mut want = Vec::with_capacity(missing.len());
                    let mut behind_bulk = false;
                    for m in missing {
                        if !sources.contains_key(&m.hash) {
                            continue;
                        }
                        if defer && executed.queued.contains(&(dst_side, m.hash)) {
                            behind_bulk = true;
                            continue;
                        }
                        if let Some(base) = m.base {
                            bases.entry(m.hash).or_insert(base);
                        }
                        want.push(m.hash);
                    }
                    let bytes: u64 = want
                        .iter()
                        .filter_map(|h| sources.get(h))
                        .map(|r| u64::from(r.chunk.len))
                        .sum();
                    let deferred = defer && (behind_bulk || bytes >= BULK_MIN_BYTES);
                    wants.push((path, want, deferred));
                }
                Err(NotStaged::Problem(p)) => problems.push(view(dst_side, p)),
                Err(NotStaged::NoRoom) => {
                    no_room.insert(path);
                }
            }
        }
        // A chunk some file sent now waits for is supplied now (it fills every staged file
        // that wants it); the rest go to the bulk job.
        let mut missing: Vec<Hash> = Vec::new();
        let mut waiting: HashMap<Hash, Vec<RelPath>> = HashMap::new();
        for (path, want, deferred) in &wants {
            if *deferred {
                continue;
            }
            for h in want {
                let w = waiting.entry(*h).or_default();
                if w.is_empty() {
                    missing.push(*h);
                }
                w.push(path.clone());
            }
        }
        let mut job = BulkJob {
            actions: Vec::new(),
            reads: VecDeque::new(),
            ready: None,
            waiting: HashMap::new(),
            failed: HashSet::new(),
        };
        let mut ok_paths = Vec::new();
        for (path, want, deferred) in wants {
            if !deferred {
                ok_paths.push(path);
                continue;
            }
            for h in want {
                if waiting.contains_key(&h) {
                    continue;
                }
                let w = job.waiting.entry(h).or_default();
                if w.is_empty() {
                    if let Some(read) = sources.get(&h) {
                        job.reads.push_back(DeltaRead {
                            read: read.clone(),
                            base: bases.remove(&h),
                        });
                    }
                }
                w.push(path.clone());
            }
            if let Some(action) = actions.iter().find(|a| a.path == path) {
                job.actions.push(action.clone());
            }
            deferred_paths.insert(path);
        }
        if !job.actions.is_empty() {
            executed.queued.extend(job.queued());
            executed.bulk.push(job);
        }
        let mut failed: HashSet<RelPath> = HashSet::new();
        let mut fail = |h: &Hash| failed.extend(waiting.get(h).into_iter().flatten().cloned());
        // Chunks whose delta did not rebuild them on the destination: sent whole below.
        let mut whole: Vec<ChunkRead> = Vec::new();
        // Two stages in flight: the source reads group k+1 while the destination takes group
        // k, so neither side idles waiting for the other.
        let mut ready: Option<Vec<(ChunkRead, ChunkData)>> = None;
        for group in missing.chunks(MAX_CHUNKS_PER_READ) {
            let reads: Vec<DeltaRead> = group
                .iter()
                .filter_map(|h| {
                    sources.get(h).map(|r| DeltaRead {
                        read: r.clone(),
                        base: bases.remove(h),
                    })
                })
                .collect();
            let asked: Vec<ChunkRead> = reads.iter().map(|r| r.read.clone()).collect();
            let previous = ready.take();
            let (data, supplied) = tokio::join!(src.read_deltas(reads), supply(dst, previous));
            let (retry, lost) = supplied.map_err(|e| (Which::Dest, e))?;
            whole.extend(retry);
            lost.iter().for_each(&mut fail);
            let data = data.map_err(|e| (Which::Source, e))?;
            let mut batch = Vec::with_capacity(group.len());
            for (read, d) in asked.into_iter().zip(data) {
                match d {
                    Some(d) => batch.push((read, d)),
                    None => fail(&read.chunk.hash),
                }
            }
            ready = Some(batch);
        }
        let (retry, lost) = supply(dst, ready).await.map_err(|e| (Which::Dest, e))?;
        whole.extend(retry);
        lost.iter().for_each(&mut fail);
        // The fallback: one more round trip, only for chunks whose delta failed.
        for group in whole.chunks(MAX_CHUNKS_PER_READ) {
            let data = src
                .read_chunks(group.to_vec())
                .await
                .map_err(|e| (Which::Source, e))?;
            let mut batch = Vec::with_capacity(group.len());
            for (read, d) in group.iter().zip(data) {
                match d {
                    Some(d) => batch.push((read.clone(), ChunkData::Whole(d))),
                    None => fail(&read.chunk.hash),
                }
            }
            let (retry, lost) = supply(dst, Some(batch))
                .await
                .map_err(|e| (Which::Dest, e))?;
            retry.iter().for_each(|r| fail(&r.chunk.hash));
            lost.iter().for_each(&mut fail);
        }
        executed.times.transfer += clock.elapsed();
        for path in ok_paths {
            if failed.contains(&path) {
                executed.retry = true;
                problems.push(ProblemView {
                    path: path.escaped(),
                    side: src_side.as_str().into(),
                    reason: "changed while it was being sent; will retry".into(),
                });
            } else {
                staged.insert(path);
            }
        }
    }
    Ok(StagedFiles { staged, no_room })
}

/// Supplies `chunks` (if any) to `dst`. Returns the chunks to send again whole (their delta
/// did not rebuild them) and the ones that are lost (sent whole and still refused: the files
/// waiting for them fail this time).
async fn supply<D: Endpoint>(
    dst: &mut D,
    chunks: Option<Vec<(ChunkRead, ChunkData)>>,
) -> Result<(Vec<ChunkRead>, Vec<Hash>), EndpointError> {
    let Some(chunks) = chunks.filter(|c| !c.is_empty()) else {
        return Ok((Vec::new(), Vec::new()));
    };
    let mut sent: HashMap<Hash, (ChunkRead, bool)> = HashMap::with_capacity(chunks.len());
    let mut data = Vec::with_capacity(chunks.len());
    for (read, d) in chunks {
        let is_delta = matches!(d, ChunkData::Delta(_));
        data.push((read.chunk.hash, d));
        sent.insert(read.chunk.hash, (read, is_delta));
    }
    let still_missing = dst.supply(data).await?;
    let (mut retry, mut lost) = (Vec::new(), Vec::new());
    // Only chunks of this batch count; the destination cannot add work by naming others.
    for h in still_missing {
        match sent.remove(&h) {
            Some((read, true)) => retry.push(read),
            Some((_, false)) => lost.push(h),
            None => {}
        }
    }
    Ok((retry, lost))
}

/// One step of a bulk job from `src` to `dst` (see [`Controller::bulk_step`]). `Ok(true)`
/// once every chunk has been read and supplied.
async fn advance<S: Endpoint, D: Endpoint>(
    src: &mut S,
    dst: &mut D,
    job: &mut BulkJob,
) -> Result<bool, (Which, EndpointError)> {
    let take = job.reads.len().min(MAX_CHUNKS_PER_READ);
    let reads: Vec<DeltaRead> = job.reads.drain(..take).collect();
    let asked: Vec<ChunkRead> = reads.iter().map(|r| r.read.clone()).collect();
    let previous = job.ready.take();
    let (data, supplied) = tokio::join!(
        async {
            if reads.is_empty() {
                Ok(Vec::new())
            } else {
                src.read_deltas(reads).await
            }
        },
        supply(dst, previous)
    );
    let (retry, lost) = supplied.map_err(|e| (Which::Dest, e))?;
    let data = data.map_err(|e| (Which::Source, e))?;
    let mut fail = |h: &Hash| {
        let waiting = job.waiting.get(h).into_iter().flatten();
        job.failed.extend(waiting.cloned());
    };
    lost.iter().for_each(&mut fail);
    let mut batch = Vec::with_capacity(asked.len());
    for (read, d) in asked.into_iter().zip(data) {
        match d {
            Some(d) => batch.push((read, d)),
            None => fail(&read.chunk.hash),
        }
    }
    // A chunk whose delta failed goes round again, whole.
    job.reads
        .extend(retry.into_iter().map(|read| DeltaRead { read, base: None }));
    if !batch.is_empty() {
        job.ready = Some(batch);
    }
    Ok(job.reads.is_empty() && job.ready.is_none())
}

/// Removals: deletes, and a directory replaced by a non-directory (its children go first).
fn is_removal(a: &Action) -> bool {
    a.new.is_none()
        || (matches!(a.expected, Some(Entry::Dir { .. }))
            && !matches!(a.new, Some(Entry::Dir { .. })))
}

/// Applies one side's actions, reading new content from `src`, in three phases:
/// 1. new directories, symlinks and files' metadata-only changes, parents first;
/// 2. new file content, batch by batch: stage, fill from `src`, commit. A batch is committed
///    once the next one is filled (its files' fsyncs overlap that transfer), so the
///    destination holds at most two batches of temps open however many files a cycle brings;
/// 3. removals, children first: until then a renamed or moved file's old copy is still there
///    to build the new one from;
/// 4. the time and mode of directories that stay directories, last (with the last batch of
///    the phases before, when they fit): those phases write into them (and put their times
///    back), and a live edit's file need not wait for them.
///
/// With `defer` (live cycles), big transfers are left to bulk jobs (see [`stage_files`]).
async fn apply_side<S: Endpoint, D: Endpoint>(
    src: &mut S,
    dst: &mut D,
    side: Side,
    actions: Vec<Action>,
    defer: bool,
    problems: &mut Vec<ProblemView>,
    executed: &mut Executed,
) -> Result<(), (Which, EndpointError)> {
    let (mut removals, creations): (Vec<Action>, Vec<Action>) =
        actions.into_iter().partition(is_removal);
    let (mut content, rest): (Vec<Action>, Vec<Action>) = creations
        .into_iter()
        .partition(|a| needs_content(a).is_some());
    let (mut dir_attrs, mut plain): (Vec<Action>, Vec<Action>) = rest.into_iter().partition(|a| {
        matches!(
            (&a.expected, &a.new),
            (Some(Entry::Dir { .. }), Some(Entry::Dir { .. }))
        )
    });
    plain.sort_by(|a, b| a.path.cmp(&b.path));
    dir_attrs.sort_by(|a, b| a.path.cmp(&b.path));
    content.sort_by(|a, b| a.path.cmp(&b.path));
    removals.sort_by(|a, b| b.path.cmp(&a.path));
    // Content this side is to gain: a removal of the same content is (part of) a move.
    let moving: HashSet<Content> = plain
        .iter()
        .chain(&content)
        .filter_map(|a| a.new.as_ref().and_then(Content::of))
        .collect();
    // Directories, symlinks and times are recorded with the first content batch after them
    // (or at the end of the cycle): recording costs a round trip and a database commit, and a
    // live edit's file would wait for its directory's time to be recorded before landing.
    for batch in plain.chunks(MAX_TRANSITION_BATCH) {
        transition(dst, side, batch, problems, executed, false).await?;
    }
    // The directories' own times go with the last batch that writes into them, after its
    // other changes (the batch's `ParentTimes` keeps the time they set): one transition, one
    // index commit and one record for a live edit, as without them.
    let mut dir_attrs = Some(dir_attrs);
    let no_removals = removals.is_empty();
    for (step, mut phase) in [content, removals].into_iter().enumerate() {
        if step == 1 {
            phase = hold_unlanded_moves(side, phase, &moving, problems, executed);
        }
        let last_phase = step == 1 || no_removals;
        // A batch is committed after the next one is staged and filled: the background seals
        // (fsyncs) of its files then run during that transfer instead of holding up the
        // commit. At most two batches of temps are open at once.
        let mut filled: Option<Vec<Action>> = None;
        let mut queue: VecDeque<Action> = phase.into();
        while !queue.is_empty() {
            let take = queue.len().min(MAX_STAGE_BATCH_FILES);
            let batch: Vec<Action> = queue.drain(..take).collect();
            let mut deferred = HashSet::new();
            let StagedFiles { staged, no_room } =
                stage_files(src, dst, &batch, defer, &mut deferred, problems, executed).await?;
            // Files the destination had no room to stage (few descriptors, and the previous
            // batch's temps still open): commit that batch, then ask again. Given up for this
            // cycle when nothing could be staged and nothing waits to be committed: every
            // retry follows a batch that took files off the queue for good, so this ends.
            let waiting = filled.as_ref().is_some_and(|f| !f.is_empty());
            let again = !no_room.is_empty() && (waiting || !staged.is_empty());
            if again {
                if let Some(previous) = filled.take() {
                    transition(dst, side, &previous, problems, executed, true).await?;
                }
            } else {
                let mut left: Vec<&RelPath> = no_room.iter().collect();
                left.sort();
                problems.extend(left.into_iter().map(|path| ProblemView {
                    path: path.escaped(),
                    side: side.as_str().into(),
                    reason: NotStaged::NO_ROOM_REASON.into(),
                }));
            }
            let mut retry = Vec::new();
            let mut ready = Vec::new();
            for action in batch {
                if needs_content(&action).is_none() || staged.contains(&action.path) {
                    ready.push(action);
                } else if again && no_room.contains(&action.path) {
                    retry.push(action);
                } else if !deferred.contains(&action.path) {
                    executed.pending += 1;
                }
            }
            for action in retry.into_iter().rev() {
                queue.push_front(action);
            }
            if let Some(previous) = filled.replace(ready) {
                transition(dst, side, &previous, problems, executed, true).await?;
            }
        }
        if let Some(mut last) = filled {
            let fits = |d: &Vec<Action>| last.len() + d.len() <= MAX_TRANSITION_BATCH;
            if last_phase && dir_attrs.as_ref().is_some_and(fits) {
                last.extend(dir_attrs.take().unwrap_or_default());
            }
            transition(dst, side, &last, problems, executed, true).await?;
        }
    }
    for batch in dir_attrs.unwrap_or_default().chunks(MAX_TRANSITION_BATCH) {
        transition(dst, side, batch, problems, executed, false).await?;
    }
    Ok(())
}

/// Notes what an applied action removed and gained on its side, for the deletion windows.
fn record_applied(side: Side, action: &Action, executed: &mut Executed) {
    let lost = lost_content(action.expected.as_ref(), action.new.as_ref());
    let removed_dir = action.new.is_none() && matches!(action.expected, Some(Entry::Dir { .. }));
    if let (Some(entry), true) = (&action.expected, lost.is_some() || removed_dir) {
        executed.removed.push(Removed {
            side,
            path: action.path.clone(),
            entry: entry.clone(),
            lost,
        });
    }
    let gained = action.new.as_ref().and_then(Content::of);
    if let Some(content) = gained {
        if action.expected.as_ref().and_then(Content::of).as_ref() != Some(&content) {
            executed.gained.push((side, content));
        }
    }
}

/// Keeps back the removals whose content was to move to another path on this side but has not
/// landed there (its source refused to serve it, it changed while crossing): the old copy stays
/// until the new one exists, so a move can never turn into a loss. Counted as pending: a later
/// cycle does both.
fn hold_unlanded_moves(
    side: Side,
    removals: Vec<Action>,
    moving: &HashSet<Content>,
    problems: &mut Vec<ProblemView>,
    executed: &mut Executed,
) -> Vec<Action> {
    let landed: HashSet<&Content> = executed
        .gained
        .iter()
        .filter(|(s, _)| *s == side)
        .map(|(_, c)| c)
        .collect();
    let (go, held): (Vec<Action>, Vec<Action>) = removals.into_iter().partition(|a| {
        match lost_content(a.expected.as_ref(), a.new.as_ref()) {
            Some(c) => !moving.contains(&c) || landed.contains(&c),
            None => true,
        }
    });
    for action in held {
        executed.pending += 1;
        problems.push(ProblemView {
            path: action.path.escaped(),
            side: side.as_str().into(),
            reason: "kept until its content has landed at its new path".into(),
        });
    }
    go
}

/// Sends one batch of changes and notes how each went; with `record`, stores in the ancestor
/// what landed and is not stored yet (see `Executed::recorder`).
async fn transition<E: Endpoint>(
    ep: &mut E,
    side: Side,
    batch: &[Action],
    problems: &mut Vec<ProblemView>,
    executed: &mut Executed,
    record: bool,
) -> Result<(), (Which, EndpointError)> {
    if batch.is_empty() {
        return Ok(());
    }
    let changes: Vec<Change> = batch
        .iter()
        .map(|a| Change {
            path: a.path.clone(),
            expected: a.expected.clone(),
            new: a.new.clone(),
        })
        .collect();
    if let Some(rec) = &executed.recorder {
        let in_flight: Vec<InFlight> = batch
            .iter()
            .map(|a| (side, a.path.clone(), a.new.clone()))
            .collect();
        rec.pending.append(&in_flight);
    }
    let clock = Instant::now();
    let outcomes = match ep.transition(changes).await {
        Ok(o) => o,
        Err(e) => {
            executed
                .unconfirmed
                .extend(batch.iter().map(|a| (side, a.path.clone(), a.new.clone())));
            return Err((Which::Dest, e));
        }
    };
    executed.times.transition += clock.elapsed();
    for (action, outcome) in batch.iter().zip(outcomes) {
        match outcome {
            Outcome::Applied => {
                record_applied(side, action, executed);
                executed
                    .applied
                    .push((action.path.clone(), action.new.clone()));
            }
            // Changed since the scan: the next cycle sees the new state and decides again.
            Outcome::Changed(_) => executed.retry = true,
            Outcome::Failed(reason) => {
                executed.pending += 1;
                problems.push(ProblemView {
                    path: action.path.escaped(),
                    side: side.as_str().into(),
                    reason: escape_bytes(reason.as_bytes()),
                });
            }
        }
    }
    // What is stored is always a prefix of `applied` (the end of the cycle stores the rest):
    // everything from the end of that prefix on. Only for the guest's own batches: every
    // ancestor write follows a mark on the guest (see `commit_ancestor`), and here the
    // destination is the endpoint at hand.
    if record && side == Side::Guest && executed.applied.len() > executed.recorded {
        if let Some(rec) = executed.recorder.as_mut() {
            let unstored = executed
                .applied
                .get(executed.recorded..)
                .unwrap_or_default();
            let rows = unstored.iter().map(|(p, e)| (p, e.as_ref())).collect();
            match mark_and_record(ep, &rec.db, &rec.share, rec.generation, rows, false).await {
                Ok(next) => {
                    rec.generation = next;
                    rec.pending.clear();
                    executed.recorded = executed.applied.len();
                }
                Err(e) => {
                    tracing::warn!(share = %rec.share, "recording a batch in the ancestor: {e}")
                }
            }
        }
    }
    Ok(())
}

/// Every ancestor write: the guest first notes the generation after `current`, then the
/// ancestor rows and that generation are recorded in one transaction, so whatever guest state
/// the ancestor relies on is stamped before the host relies on it (see `docs/safety.md`,
/// "Snapshot reverts"). `replace`: the rows are the whole ancestor. Returns the new generation;
/// nothing is recorded if the guest could not note it.
async fn mark_and_record<G: Endpoint>(
    guest: &mut G,
    db: &StateDb,
    share: &str,
    current: Generation,
    rows: Vec<(&RelPath, Option<&Entry>)>,
    replace: bool,
) -> Result<Generation, CycleError> {
    let next = Generation {
        value: current.value.saturating_add(1),
        merge_pending: false,
    };
    guest
        .mark(next.value)
        .await
        .map_err(side_err(Side::Guest))?;
    db.commit_ancestor(share, rows, replace, next)?;
    Ok(next)
}

/// Records each batch a transition applied on the guest in the ancestor as soon as it lands
/// (see `Executed::recorder`), with the generation it marks.
struct Recorder {
    db: Arc<StateDb>,
    share: String,
    generation: Generation,
    /// Notes the guest batch in flight on disk until it is recorded.
    pending: PendingBatch,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_any_finds_descendants_only() {
        let rp = |s: &str| RelPath::from_bytes(s.as_bytes()).unwrap();
        let sorted = vec![rp("a-b/x"), rp("a.c"), rp("a/b/target"), rp("ab/target")];
        assert!(holds_any(&sorted, &rp("a")));
        assert!(holds_any(&sorted, &rp("a/b")));
        assert!(!holds_any(&sorted, &rp("a/c")));
        assert!(
            !holds_any(&sorted, &rp("a-b/x")),
            "a path is not beneath itself"
        );
        assert!(holds_any(&sorted, &rp("ab")));
        assert!(!holds_any(&sorted, &rp("b")));
        assert!(!holds_any(&[], &rp("a")));
    }

    #[test]
    fn remove_subtree_takes_the_path_and_its_descendants_only() {
        let p = |s: &str| RelPath::from_bytes(s.as_bytes()).unwrap();
        let mut snap: Snapshot = ["a", "a/b", "a/b/c", "a-b", "a0", "ab", "b"]
            .into_iter()
            .map(|s| {
                (
                    p(s),
                    Entry::Dir {
                        mode: 0o755,
                        mtime: Default::default(),
                    },
                )
            })
            .collect();
        remove_subtree(&mut snap, &p("a"));
        let left: Vec<String> = snap.keys().map(|k| k.escaped()).collect();
        assert_eq!(left, ["a-b", "a0", "ab", "b"]);
        remove_subtree(&mut snap, &RelPath::root());
        assert!(snap.is_empty());
    }

    fn file(size: u64) -> Entry {
        Entry::File(FileMeta {
            size,
            mode: 0o644,
            mtime: vmsync_core::entry::Timestamp::new(0, 0),
            digest: Hash([size as u8; 32]),
        })
    }

    proptest::proptest! {
        /// The running totals always equal a count over the whole snapshot.
        #[test]
        fn totals_follow_every_change(
            ops in proptest::collection::vec((0u8..8, proptest::option::of(0u64..1000)), 0..60),
        ) {
            let mut snap = Snapshot::new();
            let mut totals = Totals::default();
            let exempt = Filter::new(&["f1".to_string()]).unwrap();
            for (name, size) in ops {
                let path = RelPath::from_bytes(format!("f{name}").as_bytes()).unwrap();
                let entry = size.map(|size| {
                    if size % 7 == 0 { Entry::Dir { mode: 0o755, mtime: Default::default() } } else { file(size) }
                });
                totals.record(&mut snap, path, entry, &exempt);
                proptest::prop_assert_eq!(totals, Totals::of(&snap, &exempt));
            }
        }
    }
}
