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

mod ancestor;
mod bulk;
mod transfer;

use ancestor::Ancestor;
use bulk::{advance, BulkJob};
pub use transfer::BULK_MIN_BYTES;
use transfer::{mark_and_record, transition, view, Executed, ProgressSink, Recorder, Transfer};

use crate::filter::Filter;
use crate::planner::{self, LostMarker, Planned, Verdict};
use crate::state::{Generation, PendingBatch, ShareMeta, StateDb, StateError};
use crate::status::{ProblemView, ShareState, ShareStatus};
use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vmsync_core::deletions::{judge, planned_losses, DeletionWindow};
use vmsync_core::endpoint::{Endpoint, EndpointError, Outcome, ScanOptions, ScanReport, ScanScope};
use vmsync_core::path::escape_bytes;
use vmsync_core::quota::{self, OverQuota, Quota};
use vmsync_core::reconcile::{
    guest_mtime_limit, Action, Conflict, ConflictPolicy, Plan, Side, SyncMode,
};
use vmsync_core::rollback::{check_generation, rollback_ancestor, GenerationCheck};
use vmsync_core::safety::{check_emptied, check_root, DeletionLimit, HaltReason};
use vmsync_core::{Entry, RelPath, Snapshot};

/// The `halt_code` of a share paused because a disk is below its reserve.
pub const DISK_FULL_CODE: &str = "disk-full";
/// `status` halt code of a share paused because the guest's changes would take the host's
/// share past a quota.
pub const QUOTA_CODE: &str = "quota";

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

/// Why a cycle stops before it executes anything.
enum Stop {
    /// Look again at once: something moved under the scan, or a root was accepted again.
    Retry,
    /// Halt the share, putting back what the deletion window removed from the side that
    /// suffered (see [`Controller::halt_and_put_back`]).
    Halt(HaltReason),
    /// Pause the share: the plan would take the host's share past a quota.
    Quota(OverQuota),
}

/// Both sides' scans of a cycle, and how long each took.
struct Scans {
    host: ScanReport,
    guest: ScanReport,
    took: (std::time::Duration, std::time::Duration),
}

/// A cycle planned and judged, ready to execute.
struct Cycle {
    views: planner::Views,
    plan: Plan,
    /// A directory stayed (see [`planner::plan`]): a later cycle must give it back.
    kept_dirs: bool,
    /// What the scans could not read.
    problems: Vec<ProblemView>,
}

/// What `status` shows of a cycle besides what it executed.
struct Shown {
    /// Directories on the host, the root included (a full cycle only).
    dirs: Option<u64>,
    conflicts: Vec<Conflict>,
    kept_dirs: bool,
    problems: Vec<ProblemView>,
}

/// Drives cycles for one share. Its ancestor is in the state database (see `ancestor.rs`).
pub struct Controller {
    settings: ShareSettings,
    db: Arc<StateDb>,
    ancestor: Ancestor,
    /// Changes sent in a transition that never answered (each may or may not have landed), or
    /// applied and not recorded (noted for both sides: it answered, so it landed on its
    /// side). The next full cycle records in the ancestor those its scans find in place, unless
    /// the guest went back to before them ([`planner::landed`]), so that a copy which landed is
    /// not read as the destination's own edit (and a deletion of it on the source brought back
    /// from there).
    unconfirmed: Vec<(Side, RelPath, Option<Entry>)>,
    /// The guest batch in flight, noted on disk (see [`PendingBatch`]).
    pending: PendingBatch,
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
/// A pause (`disk-full`, `quota`) as `status` shows it.
#[derive(Debug)]
struct Pause {
    code: &'static str,
    /// Escaped.
    reason: String,
    /// Free space and reserve, for `disk-full`.
    disk: Option<(u64, u64)>,
}

struct SpaceGuard {
    /// The host's state directory, whose database every cycle writes.
    state_dir: std::path::PathBuf,
    min_free: vmsync_core::reserve::MinFree,
    /// How much the guest may make the host's share hold (see [`Controller::set_quota`]).
    quota: Quota,
    /// The share is paused with `disk-full` or `quota`: the last cycle found a side (or the
    /// state directory) below its reserve, or a plan over a quota. The next cycle tries again.
    paused: Option<Pause>,
    /// The running cycle paused the share (it does not lift the pause when it ends).
    paused_now: bool,
}

impl Controller {
    pub fn new(
        settings: ShareSettings,
        db: Arc<StateDb>,
        state_dir: &Path,
    ) -> Result<Controller, StateError> {
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
        let ancestor =
            Ancestor::open(db.clone(), &settings.name, settings.deletion_exempt.clone())?;
        let generation = db.load_generation(&settings.name)?;
        let status = ShareStatus {
            name: settings.name.clone(),
            ..ShareStatus::default()
        };
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
                quota: Quota::default(),
                paused_now: false,
                paused: None,
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
        self.ancestor
            .update(&[(path, Some(&loser))])
            .map_err(|e| format!("recording the resolution: {e}"))?;
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
        let countable = usize::try_from(self.ancestor.totals().countable).unwrap_or(usize::MAX);
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

    /// Sets how much the guest may make the host's share hold (the share's `quota_*`): a plan
    /// that would take the share past it pauses the share with `quota` instead of running.
    pub fn set_quota(&mut self, quota: Quota) {
        self.space.quota = quota;
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
        self.space.paused_now = false;
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
        let full = scope == ScanScope::Full;
        let mut result = self.cycle_inner(host, guest, scope).await;
        // The cycle's progress is shown while it runs, however it ended.
        self.update_status(|s| s.progress = None);
        if let Err(CycleError::Endpoint {
            side,
            source: EndpointError::DiskFull { free, reserve },
        }) = result
        {
            return Ok(self.pause_disk_full(&format!("{side} share"), free, reserve));
        }
        if self.space.paused_now {
            return result;
        }
        match self.space.paused.take() {
            // A quota counts the whole share: a targeted cycle that fits does not show that
            // the rest does. The pause stands until a full cycle fits.
            Some(pause) if pause.code == QUOTA_CODE && !full => {
                self.show_pause(&pause);
                self.space.paused = Some(pause);
                if let Ok(report) = &mut result {
                    report.pending = report.pending.max(1);
                }
            }
            Some(_) => {
                tracing::info!(share = %self.settings.name, "pause lifted");
                self.show_halt();
                self.update_status(|s| {
                    s.disk_free = None;
                    s.disk_reserve = None;
                });
            }
            None => {}
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
        self.pause(DISK_FULL_CODE, &reason, Some((free, reserve)))
    }

    /// Pauses the share with `code` (`disk-full`, `quota`): `status` shows it, the report
    /// says work is pending, and the first cycle that goes through lifts it (for `quota`, the
    /// first full one). `disk`: free space and reserve, for `status`.
    fn pause(&mut self, code: &'static str, reason: &str, disk: Option<(u64, u64)>) -> CycleReport {
        if self.space.paused.is_none() {
            tracing::warn!(share = %self.settings.name, "share paused: {}", escape_bytes(reason.as_bytes()));
        }
        let pause = Pause {
            code,
            reason: escape_bytes(reason.as_bytes()),
            disk,
        };
        self.show_pause(&pause);
        self.space.paused = Some(pause);
        self.space.paused_now = true;
        CycleReport {
            pending: 1,
            ..CycleReport::default()
        }
    }

    fn show_pause(&self, pause: &Pause) {
        self.update_status(|s| {
            s.state = ShareState::Halted;
            s.halt_code = Some(pause.code.to_string());
            s.halt_reason = Some(pause.reason.clone());
            s.disk_free = pause.disk.map(|(free, _)| free);
            s.disk_reserve = pause.disk.map(|(_, reserve)| reserve);
        });
    }

    /// A cycle in four steps: scan both sides ([`Controller::scan_both`]), plan
    /// ([`Controller::plan_cycle`]), execute and record what landed, then show the outcome
    /// ([`Controller::show_cycle`]). The first two may stop the cycle ([`Stop`]).
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
            // A missing root that came back unchanged lifts its own halt, and so does a replaced
            // one whose recorded root is back (an unmounted filesystem mounted again: the mount
            // point's own directory was the replacement), seen by a full cycle, which opens the
            // roots anew. Every other halt waits for `resume`.
            let may_lift = match halt {
                HaltReason::RootMissing { .. } => true,
                HaltReason::RootReplaced { .. } => scope == ScanScope::Full,
                _ => false,
            };
            if !may_lift {
                return Ok(CycleReport {
                    halted: true,
                    ..CycleReport::default()
                });
            }
        }
        self.set_state(ShareState::Scanning);
        let started = Instant::now();
        let scans = match self.scan_both(host, guest, &scope).await? {
            Ok(scans) => scans,
            Err(stop) => return self.stop(stop, host, guest).await,
        };
        let took = scans.took;
        let cycle = match self.plan_cycle(guest, &scope, scans).await? {
            Ok(cycle) => cycle,
            Err(stop) => return self.stop(stop, host, guest).await,
        };
        let Cycle {
            views,
            mut plan,
            kept_dirs,
            mut problems,
        } = cycle;
        // All that is shown of the views: they (three snapshots of the scope) and the plan's
        // actions (moved into `execute`) are not kept while the cycle executes.
        let dirs = (scope == ScanScope::Full)
            .then(|| 1 + views.host.values().filter(|e| e.is_dir()).count() as u64);
        drop(views);
        let actions = std::mem::take(&mut plan.actions);
        let planned_actions = actions.len();

        self.set_state(ShareState::Syncing);
        let mut ancestor_changes: Vec<(RelPath, Option<Entry>)> = std::mem::take(&mut plan.agreed);
        let defer = scope != ScanScope::Full;
        let planned = started.elapsed();
        let mut executed = self
            .execute(host, guest, actions, defer, &mut problems)
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
            actions = planned_actions,
            applied = executed.applied.len(),
            "cycle: scanned (host {} us, guest {} us) and planned in {} us, executed in {} us \
             (manifests {}, stage {}, transfer {}, transition {}), recorded in {} us",
            took.0.as_micros(),
            took.1.as_micros(),
            planned.as_micros(),
            (done - planned).as_micros(),
            executed.times.manifests.as_micros(),
            executed.times.stage.as_micros(),
            executed.times.transfer.as_micros(),
            executed.times.transition.as_micros(),
            (started.elapsed() - done).as_micros()
        );
        self.bulk.extend(std::mem::take(&mut executed.bulk));
        let shown = Shown {
            dirs,
            conflicts: plan.conflicts,
            kept_dirs,
            problems,
        };
        Ok(self.show_cycle(&scope, shown, &executed, started.elapsed()))
    }

    /// Ends a cycle that stopped before executing anything.
    async fn stop<H: Endpoint, G: Endpoint>(
        &mut self,
        stop: Stop,
        host: &mut H,
        guest: &mut G,
    ) -> Result<CycleReport, CycleError> {
        match stop {
            Stop::Retry => Ok(CycleReport {
                retry: true,
                ..CycleReport::default()
            }),
            Stop::Halt(reason) => self.halt_and_put_back(reason, host, guest).await,
            Stop::Quota(over) => Ok(self.pause(QUOTA_CODE, &over.to_string(), None)),
        }
    }

    /// Scans both sides at once and checks what the scans say about the roots: gone, replaced,
    /// lost their marker, or (the guest) rolled back.
    async fn scan_both<H: Endpoint, G: Endpoint>(
        &mut self,
        host: &mut H,
        guest: &mut G,
        scope: &ScanScope,
    ) -> Result<Result<Scans, Stop>, CycleError> {
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
                (Err(reason), _) | (_, Err(reason)) => return Ok(Err(Stop::Halt(reason))),
            };
        for (side, report) in [(Side::Host, &host_scan), (Side::Guest, &guest_scan)] {
            if !self.marker_lost(side, report) {
                continue;
            }
            match planner::on_lost_marker(scope, !report.entries.is_empty()) {
                LostMarker::Judge => {}
                LostMarker::Retry => return Ok(Err(Stop::Retry)),
                LostMarker::Readopt => {
                    self.forget_root(side)?;
                    let notice = format!(
                        "the {} share's root marker (.vmsync/id) was gone: the root was accepted \
                     again and both sides merged add-only (nothing deleted anywhere)",
                        side.as_str()
                    );
                    tracing::warn!(share = %self.settings.name, "{notice}");
                    self.set_notice(notice);
                    return Ok(Err(Stop::Retry));
                }
            }
        }
        if let Err(reason) = self.check_roots(&host_scan, &guest_scan) {
            return Ok(Err(Stop::Halt(reason)));
        }
        if matches!(
            self.meta.halt,
            Some(HaltReason::RootMissing { .. } | HaltReason::RootReplaced { .. })
        ) {
            tracing::info!(share = %self.settings.name, "the recorded share roots are back");
            self.meta.halt = None;
            self.db.store_meta(&self.settings.name, &self.meta)?;
            self.show_halt();
        }
        if let Err(reason) = self.check_generation(&guest_scan) {
            return Ok(Err(Stop::Halt(reason)));
        }
        Ok(Ok(Scans {
            host: host_scan,
            guest: guest_scan,
            took: (host_took, guest_took),
        }))
    }

    /// From the scans to a judged plan: what each side shows, what landed unrecorded (a full
    /// cycle), the emptied-root check, the merge after a rollback, the plan itself, and the
    /// deletion window's verdict on it.
    async fn plan_cycle<G: Endpoint>(
        &mut self,
        guest: &mut G,
        scope: &ScanScope,
        scans: Scans,
    ) -> Result<Result<Cycle, Stop>, CycleError> {
        let Scans {
            host: host_scan,
            guest: guest_scan,
            ..
        } = scans;
        let filter = &self.settings.filter.clone();
        let host_snap = planner::visible(host_scan.entries, filter);
        let guest_snap = planner::visible(guest_scan.entries, filter);
        if *scope == ScanScope::Full {
            // What this process or a killed predecessor applied without recording it.
            let mut candidates = std::mem::take(&mut self.unconfirmed);
            candidates.extend(self.pending.load());
            let ancestor = |p: &RelPath| self.ancestor.get(p).ok().flatten();
            let landed = planner::landed(candidates, ancestor, &host_snap, &guest_snap);
            self.commit_ancestor(guest, landed).await?;
            self.pending.clear();
        }
        // Unreadable and still-changing paths (absent from their scan), what a side's own
        // ignore files exclude, and files still crossing in a bulk job.
        let frozen = host_scan
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
            );
        let mut views = planner::views(
            scope,
            self.ancestor.scoped(scope)?,
            host_snap,
            guest_snap,
            frozen,
            filter,
        );
        if *scope == ScanScope::Full {
            for (side, snap) in [(Side::Host, &views.host), (Side::Guest, &views.guest)] {
                if let Err(reason) = check_emptied(side, &views.ancestor, snap) {
                    return Ok(Err(Stop::Halt(reason)));
                }
            }
        }
        if self.generation.merge_pending {
            views.ancestor = self
                .merge_after_rollback(guest, &views.ancestor, &views.host, &views.guest)
                .await?;
        }
        let Planned { plan, kept_dirs } = planner::plan(
            &views,
            self.settings.mode,
            self.settings.policy,
            guest_mtime_limit(crate::trash::now()),
            &planner::unsynced(&host_scan.ignored, &host_scan.problems),
            &planner::unsynced(&guest_scan.ignored, &guest_scan.problems),
        );
        if let Err(reason) = self.judge_plan(&plan) {
            return Ok(Err(match planner::on_objection(scope, reason) {
                Verdict::Retry => Stop::Retry,
                Verdict::Halt(reason) => Stop::Halt(reason),
            }));
        }
        if let Err(over) = quota::check(
            &self.space.quota,
            self.ancestor.totals().usage,
            &plan.actions,
        ) {
            return Ok(Err(Stop::Quota(over)));
        }
        let mut problems = Vec::new();
        for (side, list) in [
            (Side::Host, host_scan.problems),
            (Side::Guest, guest_scan.problems),
        ] {
            problems.extend(list.into_iter().map(|p| view(side, p)));
        }
        Ok(Ok(Cycle {
            views,
            plan,
            kept_dirs,
            problems,
        }))
    }

    /// The deletion window's verdict on `plan`: its losses on top of what the window already
    /// holds, against the whole share, also for a targeted cycle (unless `resume` allowed a
    /// mass deletion once).
    fn judge_plan(&mut self, plan: &Plan) -> Result<(), HaltReason> {
        let now = self.now_ms();
        for window in &mut self.windows {
            window.expire(now);
        }
        if self.allow_deletions_once {
            self.windows = Default::default();
            return Ok(());
        }
        let exempt = self.settings.deletion_exempt.clone();
        [Side::Host, Side::Guest].into_iter().try_for_each(|side| {
            let planned = planned_losses(plan, side, |p| exempt.is_ignored(p, false));
            self.judge_window(side, planned)
        })
    }

    /// Shows a finished cycle in `status` (state, conflicts, problems, totals, how long it
    /// `took`) and reports it.
    fn show_cycle(
        &mut self,
        scope: &ScanScope,
        shown: Shown,
        executed: &Executed,
        took: std::time::Duration,
    ) -> CycleReport {
        let (files, bytes) = self.agreed_totals();
        // A targeted cycle sees only its paths: conflicts elsewhere stand until a cycle that
        // covers them finds them settled.
        match scope {
            ScanScope::Full => self.conflicts.clear(),
            ScanScope::Paths(paths) => {
                let parents: HashSet<RelPath> = planner::scope_parents(paths).collect();
                self.conflicts.retain(|c| {
                    !parents.contains(c) && !paths.iter().any(|p| p == c || p.is_ancestor_of(c))
                })
            }
        }
        self.conflicts
            .extend(shown.conflicts.into_iter().map(|c| c.path));
        let conflicts: Vec<String> = self.conflicts.iter().map(RelPath::escaped).collect();
        let dirs = shown.dirs;
        let report = CycleReport {
            applied: executed.applied.len(),
            conflicts: conflicts.len(),
            retry: executed.retry || shown.kept_dirs,
            halted: false,
            pending: executed.pending,
        };
        let bulk_pending = !self.bulk.is_empty();
        let problems = shown.problems;
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
            s.problems = match scope {
                ScanScope::Full => problems,
                // Like conflicts: a problem outside the cycle's paths stands until a cycle
                // that covers it finds it gone.
                ScanScope::Paths(paths) => {
                    let mut standing: Vec<ProblemView> = std::mem::take(&mut s.problems)
                        .into_iter()
                        .filter(|p| !covers(paths, &p.path))
                        .collect();
                    let over = (standing.len() + problems.len()).saturating_sub(MAX_STANDING);
                    standing.drain(..over.min(standing.len()));
                    standing.extend(problems);
                    standing
                }
            };
            s.files = files;
            s.bytes = bytes;
            if let Some(dirs) = dirs {
                s.watched_dirs = dirs;
            }
            s.chunks_reused += executed.chunks_reused;
            s.cycles += 1;
            match scope {
                ScanScope::Full => s.full_cycle_durations.record(took),
                ScanScope::Paths(_) => s.live_cycle_durations.record(took),
            }
        });
        report
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
        self.ancestor.clear()?;
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
        let totals = self.ancestor.totals();
        (totals.files, totals.usage.bytes)
    }

    /// True while big files of live cycles are still crossing (see [`Controller::bulk_step`]).
    /// Whether `path` is a directory as both sides last agreed (the root always is).
    pub fn is_known_dir(&self, path: &RelPath) -> bool {
        path.is_root() || matches!(self.ancestor.get(path), Ok(Some(Entry::Dir { .. })))
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
        let advanced = match target {
            Side::Guest => advance(host, guest, target, job).await,
            Side::Host => advance(guest, host, target, job).await,
        };
        let done = match advanced {
            Ok(done) => done,
            Err(e) => {
                // Give the job up; its paths are looked at again by the next cycle.
                if let Some(job) = self.bulk.pop_front() {
                    self.rehint.extend(job.actions.into_iter().map(|a| a.path));
                }
                return Err(e);
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
        result?;
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

    /// Records `changes` in the ancestor, where the first
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
            let rows: Vec<_> = rest.iter().map(|(p, e)| (p, e.as_ref())).collect();
            self.generation =
                mark_and_record(guest, &self.ancestor, self.generation, &rows, false).await?;
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
        let rows: Vec<_> = substitute.iter().map(|(p, e)| (p, Some(e))).collect();
        self.generation =
            mark_and_record(guest, &self.ancestor, self.generation, &rows, true).await?;
        tracing::info!(share = %self.settings.name, "merging add-only after the guest went back in time: {} of {} ancestor entries kept", substitute.len(), ancestor.len());
        Ok(substitute)
    }

    async fn execute<H: Endpoint, G: Endpoint>(
        &mut self,
        host: &mut H,
        guest: &mut G,
        actions: Vec<Action>,
        defer: bool,
        problems: &mut Vec<ProblemView>,
    ) -> Result<Executed, CycleError> {
        let mut executed = Executed {
            recorder: Some(Recorder {
                ancestor: self.ancestor.clone(),
                share: self.settings.name.clone(),
                generation: self.generation,
                pending: PendingBatch::new(&self.space.state_dir, &self.settings.name),
            }),
            queued: self.bulk.iter().flat_map(BulkJob::queued).collect(),
            progress: (!actions.is_empty())
                .then(|| ProgressSink::start(self.status.clone(), &actions)),
            ..Executed::default()
        };
        let (host_actions, guest_actions): (Vec<Action>, Vec<Action>) = actions
            .into_iter()
            .partition(|action| action.target == Side::Host);
        // Apply each side: see `Transfer::apply` for the order. A side that fails part way
        // leaves what already landed recorded in the ancestor (see `Executed::recorder`).
        let applied = async {
            let to_host = Transfer {
                src: &mut *guest,
                dst: &mut *host,
                target: Side::Host,
                defer,
                problems: &mut *problems,
                executed: &mut executed,
            };
            to_host.apply(host_actions).await?;
            let to_guest = Transfer {
                src: host,
                dst: guest,
                target: Side::Guest,
                defer,
                problems,
                executed: &mut executed,
            };
            to_guest.apply(guest_actions).await
        }
        .await;
        if let Err(e) = applied {
            self.record_cut_off(executed);
            return Err(e);
        }
        Ok(executed)
    }

    /// A cycle failed after applying `executed.applied`: those changes are true on both sides
    /// now, so the ancestor takes them (in memory too, for the next cycle of this process).
    ///
    /// The guest may be gone, so nothing is recorded here: what landed without being recorded
    /// is verified by the next full cycle's scans and recorded then (`unconfirmed`, see
    /// [`planner::landed`]). The generation and what the transitions did record are kept.
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
        // The recorded prefix is in the ancestor already.
        let mut applied = executed.applied;
        let unrecorded = applied.split_off(executed.recorded.min(applied.len()));
        for (path, new) in unrecorded {
            for side in [Side::Host, Side::Guest] {
                self.unconfirmed.push((side, path.clone(), new.clone()));
            }
        }
    }
}

/// At most this many problems are listed in `status` between two full cycles (the oldest
/// standing ones go first).
const MAX_STANDING: usize = 10_000;

/// Whether a targeted cycle of `paths` covers the problem shown at `shown` (an escaped path):
/// the path itself or one beneath it.
fn covers(paths: &[RelPath], shown: &str) -> bool {
    paths.iter().any(|p| {
        let p = p.escaped();
        p.is_empty()
            || shown
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// Runs `f`, timing it (for the debug log).
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, std::time::Duration) {
    let clock = Instant::now();
    let out = f.await;
    (out, clock.elapsed())
}

#[cfg(test)]
mod tests {
    use super::covers;
    use vmsync_core::RelPath;

    #[test]
    fn a_targeted_cycle_covers_its_paths_and_what_is_beneath_them() {
        let paths = |ps: &[&str]| -> Vec<RelPath> {
            ps.iter()
                .map(|p| RelPath::from_bytes(p.as_bytes()).unwrap())
                .collect()
        };
        let cases: &[(&[&str], &str, bool)] = &[
            (&["a"], "a", true),
            (&["a"], "a/b", true),
            (&["a"], "ab", false),
            (&["a"], "a.b", false),
            (&["a/b"], "a", false),
            (&["x", "a"], "a/b/c", true),
            (&[""], "anything", true),
            (&[], "a", false),
        ];
        for &(ps, shown, want) in cases {
            assert_eq!(covers(&paths(ps), shown), want, "{ps:?} {shown}");
        }
    }
}
