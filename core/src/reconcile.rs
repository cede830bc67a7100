//! Three-way reconciliation: given the ancestor (the last state both sides agreed on), the host's
//! and the guest's current entries, decide per path what to change on which side. A pure
//! function of its inputs: no I/O, no clock.
//!
//! Rules (docs/design.md "Sync model"):
//! - A side "changed" a path when its entry differs from the ancestor's (`Entry` equality).
//! - Only one side changed: the change propagates to the other side (mode permitting).
//! - Both changed to equal entries: agreed, no action. Both changed to the same content with
//!   different mtimes (files, directories and symlinks alike): the newer mtime is applied to
//!   the other side, not a conflict. A directory's mtime moves whenever a child changes, so
//!   both sides moving it is common and never a conflict.
//! - One side only touched an entry (same content as the ancestor, new mtime) while the other
//!   changed its content: the content change propagates. Nothing but an mtime is lost, so
//!   this is not a conflict. Against a deletion a touch still counts as a modification.
//! - Both changed differently: a conflict, settled by the `ConflictPolicy`. Delete vs modify
//!   always keeps the modification. A loser that is a directory is never destroyed: such a
//!   conflict is kept whatever the policy.
//! - One-way modes make the destination match the source; a destination entry whose content
//!   differs from both the ancestor's and the source's (a local edit there) is kept in the
//!   destination's trash (`.vmsync/trash/` in the share) before it is replaced.
//! - Structure: a path that will exist on a side forces its parent directories to exist there.
//!   A directory one side deleted is re-created there when the other side keeps or adds
//!   something beneath it; a directory one side replaced by a file or symlink while the other
//!   side keeps or adds something beneath it is a conflict (settled by the policy, a directory
//!   loser kept).
//! - Nothing beneath a kept conflict is touched, except when both sides hold a directory
//!   there: then only the directory's permission bits are in conflict and its children
//!   reconcile on their own.
//!
//! Executing a plan (the controller's job): deletions and directories replaced by a
//! non-directory children-first, then everything else parents-first. Both orders are reverse
//! and forward path order; the plan is consistent under exactly that schedule.

use crate::entry::{Entry, Snapshot, Timestamp};
use crate::path::RelPath;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Which side of a share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Side {
    Host,
    Guest,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Host => Side::Guest,
            Side::Guest => Side::Host,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Host => "host",
            Side::Guest => "guest",
        }
    }
}

/// Direction of a share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum SyncMode {
    #[default]
    TwoWay,
    HostToGuest,
    GuestToHost,
}

/// How a two-way share settles a path both sides changed differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum ConflictPolicy {
    /// Leave both sides as they are and report the path until the user resolves it.
    #[default]
    Keep,
    HostWins,
    GuestWins,
    /// The file with the later mtime wins; on a tie, the host. Entries without an mtime
    /// (directories, symlinks) lose to files.
    NewerWins,
}

/// One change the controller must make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    pub path: RelPath,
    /// The side to change.
    pub target: Side,
    /// What the scan saw on `target` (checked again right before the change).
    pub expected: Option<Entry>,
    /// What `target` must hold afterwards; `None` deletes.
    pub new: Option<Entry>,
    /// `target`'s current version (`expected`) is a conflict's losing version or a one-way
    /// destination's local edit. Every replaced or deleted file is kept in the target side's
    /// trash whatever this says; the flag names the losers (the simulator and tests check it).
    pub save_loser: bool,
}

/// A conflict left for the user (policy `keep`, or a directory that would have lost).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub path: RelPath,
    pub ancestor: Option<Entry>,
    pub host: Option<Entry>,
    pub guest: Option<Entry>,
}

/// The result of reconciling.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Plan {
    /// Changes to make, sorted by path. Once an action succeeds, the ancestor at its path
    /// becomes `new`.
    pub actions: Vec<Action>,
    /// Paths left in conflict; their ancestor entries stay as they were.
    pub conflicts: Vec<Conflict>,
    /// Paths where both sides already agree but the ancestor differs: set the ancestor to this
    /// (`None`: remove it). Sorted by path.
    pub agreed: Vec<(RelPath, Option<Entry>)>,
}

/// Reconciles every path present in any of the three snapshots.
///
/// Paths absent from all three snapshots are out of scope (a partial scan covers only some
/// subtrees): they are never required, created or removed. The root itself is never
/// reconciled; whether it exists is the safety checks' business.
///
/// Every action makes its target equal to the other side's current entry at the same path
/// (`new == other side's scan`), so the content for a new file always comes from the other
/// side at that path. `save_loser` is set only when `expected` is a file or symlink whose
/// content (bytes, permission bits or target; not mtime) would otherwise be lost.
pub fn reconcile(
    ancestor: &Snapshot,
    host: &Snapshot,
    guest: &Snapshot,
    mode: SyncMode,
    policy: ConflictPolicy,
    guest_mtime_limit: Timestamp,
) -> Plan {
    let judge = Judge {
        policy,
        guest_mtime_limit,
    };
    let mut rows = collect_rows(ancestor, host, guest);
    for row in &mut rows {
        row.decision = decide(row.ancestor, row.host, row.guest, mode, judge);
    }
    block_beneath_conflicts(&mut rows);
    enforce_parents(&mut rows, mode, judge);
    into_plan(&rows)
}

/// The later of two mtimes wins in two places: the same content with different mtimes, and
/// the `newer-wins` policy. A guest can set any mtime, so a guest mtime later than
/// `guest_mtime_limit` (the caller passes its clock plus [`GUEST_MTIME_SLACK`]) counts as
/// older than any other: a year-9999 file from the guest neither wins every conflict nor
/// stamps its time on the host's copy. Nothing is rewritten to clamp it, so nothing churns.
#[derive(Debug, Clone, Copy)]
struct Judge {
    policy: ConflictPolicy,
    guest_mtime_limit: Timestamp,
}

/// How far ahead of the host's clock a guest mtime may be and still count as a time (clocks
/// of a host and its guests drift, and a file can come from a machine a little ahead).
pub const GUEST_MTIME_SLACK_SECS: i64 = 24 * 60 * 60;

/// The latest guest mtime that counts as a time when the host's clock reads `now`.
pub fn guest_mtime_limit(now: Timestamp) -> Timestamp {
    Timestamp::new(now.secs.saturating_add(GUEST_MTIME_SLACK_SECS), now.nanos)
}

impl Judge {
    /// Whether the guest's `g` is newer than the host's `h`.
    fn guest_newer(&self, h: Timestamp, g: Timestamp) -> bool {
        g <= self.guest_mtime_limit && g > h
    }
}

/// One path's inputs and what we decided for it.
#[derive(Debug, Clone, Copy)]
struct Row<'a> {
    path: &'a RelPath,
    ancestor: Option<&'a Entry>,
    host: Option<&'a Entry>,
    guest: Option<&'a Entry>,
    decision: Decision<'a>,
}

/// The per-path outcome, before it becomes part of a `Plan`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision<'a> {
    /// Both sides equal the ancestor.
    Unchanged,
    /// Both sides already hold this; only the ancestor moves.
    Agreed(Option<&'a Entry>),
    /// Change `target` to `new` (always the other side's current entry).
    Apply {
        target: Side,
        new: Option<&'a Entry>,
        save_loser: bool,
    },
    /// Left for the user; reported as a `Conflict`.
    Conflict,
    /// Beneath a conflict that covers its subtree: nothing happens here.
    Blocked,
}

impl<'a> Row<'a> {
    fn current(&self, side: Side) -> Option<&'a Entry> {
        match side {
            Side::Host => self.host,
            Side::Guest => self.guest,
        }
    }

    /// What `side` holds at this path once the decision is carried out.
    fn after(&self, side: Side) -> Option<&'a Entry> {
        match self.decision {
            Decision::Apply { target, new, .. } if target == side => new,
            _ => self.current(side),
        }
    }

    /// A conflict between two directories is about the directory's own permission bits only:
    /// both sides can still hold children, so those reconcile on their own. Any other
    /// conflict decides what the path *is*, and everything beneath it waits with it.
    fn conflict_covers_subtree(&self) -> bool {
        !(self.host.is_some_and(Entry::is_dir) && self.guest.is_some_and(Entry::is_dir))
    }
}

fn collect_rows<'a>(
    ancestor: &'a Snapshot,
    host: &'a Snapshot,
    guest: &'a Snapshot,
) -> Vec<Row<'a>> {
    let paths: BTreeSet<&RelPath> = ancestor
        .keys()
        .chain(host.keys())
        .chain(guest.keys())
        .filter(|p| !p.is_root())
        .collect();
    paths
        .into_iter()
        .map(|path| Row {
            path,
            ancestor: ancestor.get(path),
            host: host.get(path),
            guest: guest.get(path),
            decision: Decision::Unchanged,
        })
        .collect()
}

// ---- Per-path decisions -------------------------------------------------------------------

fn decide<'a>(
    ancestor: Option<&'a Entry>,
    host: Option<&'a Entry>,
    guest: Option<&'a Entry>,
    mode: SyncMode,
    judge: Judge,
) -> Decision<'a> {
    match mode {
        SyncMode::TwoWay => decide_two_way(ancestor, host, guest, judge),
        SyncMode::HostToGuest => decide_one_way(Side::Guest, ancestor, host, guest),
        SyncMode::GuestToHost => decide_one_way(Side::Host, ancestor, guest, host),
    }
}

/// One-way: the destination is made to match the source, whatever either side did.
fn decide_one_way<'a>(
    destination: Side,
    ancestor: Option<&'a Entry>,
    source: Option<&'a Entry>,
    dest: Option<&'a Entry>,
) -> Decision<'a> {
    if dest == source {
        return if ancestor == source {
            Decision::Unchanged
        } else {
            Decision::Agreed(source)
        };
    }
    // A destination version that is neither the synced one nor the incoming one exists
    // nowhere else: it is a local edit, and replacing it must not lose it.
    let local_edit = dest.is_some_and(holds_content)
        && !same_version(dest, ancestor)
        && !same_version(dest, source);
    Decision::Apply {
        target: destination,
        new: source,
        save_loser: local_edit,
    }
}

fn decide_two_way<'a>(
    ancestor: Option<&'a Entry>,
    host: Option<&'a Entry>,
    guest: Option<&'a Entry>,
    judge: Judge,
) -> Decision<'a> {
    match (host != ancestor, guest != ancestor) {
        (false, false) => Decision::Unchanged,
        (true, false) => propagate(Side::Guest, host),
        (false, true) => propagate(Side::Host, guest),
        (true, true) => decide_both_changed(ancestor, host, guest, judge),
    }
}

fn decide_both_changed<'a>(
    ancestor: Option<&'a Entry>,
    host: Option<&'a Entry>,
    guest: Option<&'a Entry>,
    judge: Judge,
) -> Decision<'a> {
    if host == guest {
        return Decision::Agreed(host);
    }
    let (Some(h), Some(g)) = (host, guest) else {
        // Delete vs modify: the side that still has an entry modified it, and a modification
        // always beats a deletion, whatever the policy.
        return match host {
            None => propagate(Side::Host, guest),
            Some(_) => propagate(Side::Guest, host),
        };
    };
    if let Some(decision) = newer_mtime_of_same_content(h, g, judge) {
        return decision;
    }
    // A side that only touched the file (same bytes and mode as the ancestor, new mtime) has
    // nothing to lose: the other side's real edit goes through instead of raising a conflict.
    if same_version(host, ancestor) {
        return propagate(Side::Host, guest);
    }
    if same_version(guest, ancestor) {
        return propagate(Side::Guest, host);
    }
    resolve_conflict(h, g, judge)
}

/// Both sides hold the same content (bytes and mode, permission bits, or target) with
/// different mtimes: the newer mtime goes to the side with the older one; on a tie, or a guest
/// mtime past the limit ([`Judge`]), the host's. Nothing is lost, so this is not a conflict.
fn newer_mtime_of_same_content<'a>(
    h: &'a Entry,
    g: &'a Entry,
    judge: Judge,
) -> Option<Decision<'a>> {
    if !h.same_content(g) {
        return None;
    }
    Some(if judge.guest_newer(h.mtime(), g.mtime()) {
        propagate(Side::Host, Some(g))
    } else {
        propagate(Side::Guest, Some(h))
    })
}

/// Both sides changed the path to different entries.
fn resolve_conflict<'a>(h: &'a Entry, g: &'a Entry, judge: Judge) -> Decision<'a> {
    let Some(winner) = policy_winner(judge, h, g) else {
        return Decision::Conflict;
    };
    let (win, lose) = match winner {
        Side::Host => (h, g),
        Side::Guest => (g, h),
    };
    if lose.is_dir() && !win.is_dir() {
        // A directory loser would take its whole subtree with it; that is never automatic.
        return Decision::Conflict;
    }
    Decision::Apply {
        target: winner.other(),
        new: Some(win),
        save_loser: holds_content(lose),
    }
}

/// The side whose entry wins under an automatic policy; `None` for `Keep`.
fn policy_winner(judge: Judge, h: &Entry, g: &Entry) -> Option<Side> {
    match judge.policy {
        ConflictPolicy::Keep => None,
        ConflictPolicy::HostWins => Some(Side::Host),
        ConflictPolicy::GuestWins => Some(Side::Guest),
        ConflictPolicy::NewerWins => Some(match (h.as_file(), g.as_file()) {
            (Some(hm), Some(gm)) if judge.guest_newer(hm.mtime, gm.mtime) => Side::Guest,
            (None, Some(_)) => Side::Guest,
            // Host newer, a tie, a file against a non-file, or two non-files: the host.
            _ => Side::Host,
        }),
    }
}

fn propagate(target: Side, new: Option<&Entry>) -> Decision<'_> {
    Decision::Apply {
        target,
        new,
        save_loser: false,
    }
}

/// Files and symlinks carry content of their own; a directory's content is its children,
/// which are decided (and saved) path by path.
fn holds_content(entry: &Entry) -> bool {
    !entry.is_dir()
}

/// Same content, ignoring mtimes; two absences are the same version too.
fn same_version(a: Option<&Entry>, b: Option<&Entry>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.same_content(b),
        (None, None) => true,
        _ => false,
    }
}

// ---- Structure ----------------------------------------------------------------------------

/// Nothing beneath a subtree-covering conflict is touched: it is part of that conflict.
/// Paths sort parents-first with each subtree contiguous, so one pass with the current
/// covering conflict suffices.
fn block_beneath_conflicts(rows: &mut [Row<'_>]) {
    let mut cover: Option<&RelPath> = None;
    for row in rows.iter_mut() {
        if cover.is_some_and(|c| c.is_ancestor_of(row.path)) {
            row.decision = Decision::Blocked;
            continue;
        }
        cover = (row.decision == Decision::Conflict && row.conflict_covers_subtree())
            .then_some(row.path);
    }
}

/// Which sides must hold a directory at a path because something beneath it will exist there.
#[derive(Debug, Clone, Copy, Default)]
struct Needs {
    host: bool,
    guest: bool,
}

impl Needs {
    fn on(self, side: Side) -> bool {
        match side {
            Side::Host => self.host,
            Side::Guest => self.guest,
        }
    }
}

/// Makes every path that will exist on a side have directories above it on that side.
///
/// Walks deepest-first (reverse path order puts every subtree before its root), so when a
/// path is visited everything beneath it is final and has recorded what it needs. A path that
/// falls short is repaired: a deleted directory is re-created instead (a modification beneath
/// it beats the deletion), and a directory the other side replaced by a file or symlink
/// becomes a conflict, settled by the policy like any other.
fn enforce_parents(rows: &mut [Row<'_>], mode: SyncMode, judge: Judge) {
    let mut needs = vec![Needs::default(); rows.len()];
    for i in (0..rows.len()).rev() {
        let row = rows[i];
        if row.decision == Decision::Blocked {
            continue;
        }
        if falls_short(&row, needs[i]) {
            rows[i].decision = repair(&row, needs[i], mode, judge);
            if rows[i].decision == Decision::Conflict {
                block_subtree(rows, i);
            }
        }
        record_parent_needs(rows, &mut needs, i);
    }
}

fn falls_short(row: &Row<'_>, needs: Needs) -> bool {
    [Side::Host, Side::Guest]
        .into_iter()
        .any(|side| needs.on(side) && !row.after(side).is_some_and(Entry::is_dir))
}

/// A decision for `row` under which every side in `needs` keeps a directory, or a conflict.
fn repair<'a>(row: &Row<'a>, needs: Needs, mode: SyncMode, judge: Judge) -> Decision<'a> {
    let candidate = match row.decision {
        Decision::Apply { target, .. }
            if mode == SyncMode::TwoWay
                && needs.on(target)
                && row.current(target).is_some_and(Entry::is_dir) =>
        {
            keep_directory(row, target, judge)
        }
        // With well-formed snapshots nothing else can fall short (one-way destinations end
        // equal to a well-formed source). Whatever input got us here, touching nothing at or
        // beneath this path is the safe answer.
        _ => Decision::Conflict,
    };
    let trial = Row {
        decision: candidate,
        ..*row
    };
    if falls_short(&trial, needs) {
        Decision::Conflict
    } else {
        candidate
    }
}

/// `dir_side` holds a directory that the plan would remove because the other side deleted it
/// or replaced it by a non-directory, while something beneath it stays or arrives.
fn keep_directory<'a>(row: &Row<'a>, dir_side: Side, judge: Judge) -> Decision<'a> {
    let other = dir_side.other();
    let (Some(dir), replacement) = (row.current(dir_side), row.current(other)) else {
        return Decision::Conflict;
    };
    let Some(replacement) = replacement else {
        // Deleted on the other side: re-create it there. The deletions beneath still happen.
        return propagate(other, Some(dir));
    };
    // The other side turned the directory into a file or symlink; this side changed what is
    // beneath it. A type conflict like any other, with the directory side as its modifier.
    let (h, g) = match dir_side {
        Side::Host => (dir, replacement),
        Side::Guest => (replacement, dir),
    };
    if replacement.is_dir() || policy_winner(judge, h, g) != Some(dir_side) {
        return Decision::Conflict;
    }
    Decision::Apply {
        target: other,
        new: Some(dir),
        save_loser: holds_content(replacement),
    }
}

fn block_subtree(rows: &mut [Row<'_>], i: usize) {
    let root = rows[i].path;
    for row in rows.iter_mut().skip(i + 1) {
        if !root.is_ancestor_of(row.path) {
            break;
        }
        row.decision = Decision::Blocked;
    }
}

fn record_parent_needs(rows: &[Row<'_>], needs: &mut [Needs], i: usize) {
    let row = &rows[i];
    let Some(parent) = row.path.parent().filter(|p| !p.is_root()) else {
        return;
    };
    // A parent in none of the snapshots is outside the scanned scope: assumed to stay as is.
    let Ok(j) = rows.binary_search_by(|r| r.path.cmp(&parent)) else {
        return;
    };
    needs[j].host |= row.after(Side::Host).is_some();
    needs[j].guest |= row.after(Side::Guest).is_some();
}

fn into_plan(rows: &[Row<'_>]) -> Plan {
    let mut plan = Plan::default();
    for row in rows {
        match row.decision {
            Decision::Apply {
                target,
                new,
                save_loser,
            } => plan.actions.push(Action {
                path: row.path.clone(),
                target,
                expected: row.current(target).cloned(),
                new: new.cloned(),
                save_loser,
            }),
            Decision::Agreed(entry) => plan.agreed.push((row.path.clone(), entry.cloned())),
            Decision::Conflict => plan.conflicts.push(Conflict {
                path: row.path.clone(),
                ancestor: row.ancestor.cloned(),
                host: row.host.cloned(),
                guest: row.guest.cloned(),
            }),
            Decision::Unchanged | Decision::Blocked => {}
        }
    }
    plan
}
