//! Property tests for reconcile: random small trees, independent random edits on host and
//! guest, one cycle carried out by the simulator, then the invariants a sync must keep.
//!
//! Trees use three names and depth ≤ 3 (39 possible paths) with four contents, four mtimes
//! and two modes, so the two sides collide often: type changes, delete vs modify, same
//! content with other mtimes and edits beneath deleted directories all come up in every run.

mod common;

use common::{
    dir, dir_mode, file_mode, holds_content, link, malformed, path, same_version, Applied, World,
};
use proptest::prelude::*;
use vmsync_core::reconcile::{reconcile, Conflict, ConflictPolicy, Plan, Side, SyncMode};
use vmsync_core::rollback::rollback_ancestor;
use vmsync_core::{Entry, RelPath, Snapshot, Timestamp};

const NAMES: [&str; 3] = ["a", "b", "c"];

/// Every path of depth 1..=3 over `NAMES`.
fn universe() -> Vec<RelPath> {
    let mut out = Vec::new();
    for x in NAMES {
        out.push(path(x));
        for y in NAMES {
            out.push(path(&format!("{x}/{y}")));
            for z in NAMES {
                out.push(path(&format!("{x}/{y}/{z}")));
            }
        }
    }
    out
}

const UNIVERSE_LEN: usize = 39;

/// One edit a user (or a tool) makes on one side.
#[derive(Debug, Clone)]
enum Op {
    /// Write a file (creating parent directories, replacing whatever was there).
    Write { at: usize, content: u8, mtime: i64 },
    /// Change an existing file's mtime only.
    Touch { at: usize, mtime: i64 },
    /// Change an existing file's or directory's mode.
    Chmod { at: usize, alt: bool },
    /// `mkdir -p`, replacing a non-directory.
    Mkdir { at: usize, alt: bool },
    /// Create a symlink, replacing whatever was there.
    Link { at: usize, target: u8 },
    /// `rm -rf`.
    Remove { at: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let at = 0..UNIVERSE_LEN;
    prop_oneof![
        3 => (at.clone(), 0..4u8, 0..4i64).prop_map(|(at, content, mtime)| Op::Write { at, content, mtime }),
        1 => (at.clone(), 0..4i64).prop_map(|(at, mtime)| Op::Touch { at, mtime }),
        1 => (at.clone(), any::<bool>()).prop_map(|(at, alt)| Op::Chmod { at, alt }),
        2 => (at.clone(), any::<bool>()).prop_map(|(at, alt)| Op::Mkdir { at, alt }),
        1 => (at.clone(), 0..2u8).prop_map(|(at, target)| Op::Link { at, target }),
        2 => at.prop_map(|at| Op::Remove { at }),
    ]
}

fn remove_subtree(tree: &mut Snapshot, p: &RelPath) {
    tree.retain(|q, _| q != p && !p.is_ancestor_of(q));
}

fn make_parents(tree: &mut Snapshot, p: &RelPath) {
    let mut ancestors: Vec<RelPath> = p.ancestors().filter(|a| !a.is_root()).collect();
    ancestors.reverse();
    for a in ancestors {
        if !tree.get(&a).is_some_and(Entry::is_dir) {
            remove_subtree(tree, &a);
            tree.insert(a, dir());
        }
    }
}

fn put(tree: &mut Snapshot, p: &RelPath, entry: Entry) {
    make_parents(tree, p);
    remove_subtree(tree, p);
    tree.insert(p.clone(), entry);
}

fn apply_op(tree: &mut Snapshot, op: &Op, universe: &[RelPath]) {
    match *op {
        Op::Write { at, content, mtime } => {
            put(tree, &universe[at], file_mode(content, mtime, 0o644))
        }
        Op::Touch { at, mtime } => {
            if let Some(Entry::File(meta)) = tree.get_mut(&universe[at]) {
                meta.mtime = Timestamp::new(mtime, 0);
            }
        }
        Op::Chmod { at, alt } => match tree.get_mut(&universe[at]) {
            Some(Entry::File(meta)) => meta.mode = if alt { 0o755 } else { 0o644 },
            Some(Entry::Dir { mode, .. }) => *mode = if alt { 0o700 } else { 0o755 },
            _ => {}
        },
        Op::Mkdir { at, alt } => {
            if !tree.get(&universe[at]).is_some_and(Entry::is_dir) {
                put(
                    tree,
                    &universe[at],
                    dir_mode(if alt { 0o700 } else { 0o755 }),
                );
            } else {
                make_parents(tree, &universe[at]);
            }
        }
        Op::Link { at, target } => put(
            tree,
            &universe[at],
            link(if target == 0 { "x" } else { "../y" }),
        ),
        Op::Remove { at } => remove_subtree(tree, &universe[at]),
    }
}

fn build(start: &Snapshot, ops: &[Op]) -> Snapshot {
    let universe = universe();
    let mut tree = start.clone();
    for op in ops {
        apply_op(&mut tree, op, &universe);
    }
    tree
}

/// A share after a common history (the ancestor, synced to both sides) and then independent
/// edits on each side.
fn diverged() -> impl Strategy<Value = World> {
    (
        prop::collection::vec(op(), 0..14),
        prop::collection::vec(op(), 1..8),
        prop::collection::vec(op(), 1..8),
    )
        .prop_map(|(base, host_ops, guest_ops)| {
            let ancestor = build(&Snapshot::new(), &base);
            let host = build(&ancestor, &host_ops);
            let guest = build(&ancestor, &guest_ops);
            World::new(ancestor, host, guest)
        })
}

/// Three unrelated trees: an ancestor that matches neither side, as after interrupted cycles
/// or a rebuilt state database.
fn unrelated() -> impl Strategy<Value = World> {
    (
        prop::collection::vec(op(), 0..10),
        prop::collection::vec(op(), 0..10),
        prop::collection::vec(op(), 0..10),
    )
        .prop_map(|(a, h, g)| {
            let empty = Snapshot::new();
            World::new(build(&empty, &a), build(&empty, &h), build(&empty, &g))
        })
}

fn auto_policy() -> impl Strategy<Value = ConflictPolicy> {
    prop_oneof![
        Just(ConflictPolicy::HostWins),
        Just(ConflictPolicy::GuestWins),
        Just(ConflictPolicy::NewerWins),
    ]
}

fn any_policy() -> impl Strategy<Value = ConflictPolicy> {
    prop_oneof![Just(ConflictPolicy::Keep), auto_policy()]
}

fn any_mode() -> impl Strategy<Value = SyncMode> {
    prop_oneof![
        Just(SyncMode::TwoWay),
        Just(SyncMode::HostToGuest),
        Just(SyncMode::GuestToHost),
    ]
}

fn plan_for(w: &World, mode: SyncMode, policy: ConflictPolicy) -> Plan {
    // No mtime is past the limit here: the table covers that.
    let no_limit = vmsync_core::Timestamp::new(i64::MAX, 0);
    reconcile(&w.ancestor, &w.host, &w.guest, mode, policy, no_limit)
}

/// Invariants of any plan, whatever the inputs; then the plan is carried out on `w`, which
/// must go cleanly and leave both sides well-formed.
fn run_cycle(w: &mut World, mode: SyncMode, policy: ConflictPolicy) -> Result<Plan, TestCaseError> {
    let plan = plan_for(w, mode, policy);
    prop_assert!(
        plan.actions.windows(2).all(|p| p[0].path < p[1].path),
        "actions unsorted"
    );
    prop_assert!(
        plan.conflicts.windows(2).all(|p| p[0].path < p[1].path),
        "conflicts unsorted"
    );
    prop_assert!(
        plan.agreed.windows(2).all(|p| p[0].0 < p[1].0),
        "agreed unsorted"
    );
    for a in &plan.actions {
        // The controller relies on these two: content always comes from the other side at
        // the same path, and a saved loser is a file or a symlink.
        prop_assert_eq!(
            a.new.as_ref(),
            w.side(a.target.other()).get(&a.path),
            "new at {}",
            a.path
        );
        prop_assert_eq!(
            a.expected.as_ref(),
            w.side(a.target).get(&a.path),
            "expected at {}",
            a.path
        );
        if a.save_loser {
            prop_assert!(
                a.expected.as_ref().is_some_and(holds_content),
                "save_loser on {}",
                a.path
            );
        }
        if mode != SyncMode::TwoWay {
            let destination = if mode == SyncMode::HostToGuest {
                Side::Guest
            } else {
                Side::Host
            };
            prop_assert_eq!(
                a.target,
                destination,
                "one-way action against the flow at {}",
                a.path
            );
        }
    }
    if mode == SyncMode::TwoWay {
        for a in &plan.actions {
            let removes_dir = a.expected.as_ref().is_some_and(Entry::is_dir)
                && !a.new.as_ref().is_some_and(Entry::is_dir);
            if removes_dir {
                // Only a directory nobody changed is removed: never one that lost a conflict.
                prop_assert_eq!(
                    a.expected.as_ref(),
                    w.ancestor.get(&a.path),
                    "changed directory {} removed",
                    a.path
                );
            }
        }
    }
    for k in plan.conflicts.iter().filter(|k| covers_subtree(k)) {
        let beneath = |p: &RelPath| k.path.is_ancestor_of(p);
        prop_assert!(
            !plan.actions.iter().any(|a| beneath(&a.path)),
            "action beneath conflict {}",
            k.path
        );
        prop_assert!(
            !plan.agreed.iter().any(|(p, _)| beneath(p)),
            "agreed beneath conflict {}",
            k.path
        );
    }
    let Applied { skipped, errors } = w.apply(&plan);
    prop_assert!(skipped.is_empty(), "expected mismatches: {:?}", skipped);
    prop_assert!(errors.is_empty(), "plan not executable: {:?}", errors);
    prop_assert!(
        malformed(&w.host).is_empty(),
        "host malformed: {:?}",
        malformed(&w.host)
    );
    prop_assert!(
        malformed(&w.guest).is_empty(),
        "guest malformed: {:?}",
        malformed(&w.guest)
    );
    Ok(plan)
}

/// A conflict that decides what a path is (anything but two directories) holds back its
/// whole subtree.
fn covers_subtree(k: &Conflict) -> bool {
    !(k.host.as_ref().is_some_and(Entry::is_dir) && k.guest.as_ref().is_some_and(Entry::is_dir))
}

/// At a conflict, or beneath one that covers its subtree.
fn contested(p: &RelPath, conflicts: &[Conflict]) -> bool {
    conflicts
        .iter()
        .any(|k| &k.path == p || (covers_subtree(k) && k.path.is_ancestor_of(p)))
}

/// Host, guest and ancestor agree on every path not held back by a conflict.
fn converged(w: &World, conflicts: &[Conflict]) -> Result<(), TestCaseError> {
    let paths: std::collections::BTreeSet<&RelPath> = w
        .ancestor
        .keys()
        .chain(w.host.keys())
        .chain(w.guest.keys())
        .collect();
    for p in paths.into_iter().filter(|p| !contested(p, conflicts)) {
        prop_assert_eq!(
            w.host.get(p),
            w.guest.get(p),
            "host and guest differ at {}",
            p
        );
        prop_assert_eq!(
            w.ancestor.get(p),
            w.host.get(p),
            "ancestor not updated at {}",
            p
        );
    }
    Ok(())
}

/// Files and symlinks on either side whose content differs from the ancestor's: edits made
/// since the last sync, which exist nowhere else.
fn unsynced_versions(w: &World) -> Vec<(Side, RelPath, Entry)> {
    let mut out = Vec::new();
    for side in [Side::Host, Side::Guest] {
        for (p, e) in w.side(side) {
            if holds_content(e) && !same_version(Some(e), w.ancestor.get(p)) {
                out.push((side, p.clone(), e.clone()));
            }
        }
    }
    out
}

fn survives(w: &World, p: &RelPath, e: &Entry, store_counts: bool) -> bool {
    let on = |s: &Snapshot| s.get(p).is_some_and(|x| x.same_content(e));
    on(&w.host)
        || on(&w.guest)
        || (store_counts && w.store.iter().any(|(_, q, x)| q == p && x.same_content(e)))
}

/// A second reconcile right after a cycle finds nothing new to do.
fn settled(
    w: &World,
    mode: SyncMode,
    policy: ConflictPolicy,
    first: &Plan,
) -> Result<(), TestCaseError> {
    let again = plan_for(w, mode, policy);
    prop_assert!(
        again.actions.is_empty(),
        "second cycle acts: {:?}",
        again.actions
    );
    prop_assert!(
        again.agreed.is_empty(),
        "second cycle agrees: {:?}",
        again.agreed
    );
    prop_assert_eq!(&again.conflicts, &first.conflicts, "conflicts changed");
    Ok(())
}

proptest! {
    /// Two-way with an automatic policy: one cycle converges everything except directories
    /// that would have lost a type conflict (those are kept); nothing unsynced is lost, the
    /// conflict store counting; a second cycle has nothing to do.
    #[test]
    fn two_way_auto_converges_and_loses_nothing(mut w in diverged(), policy in auto_policy()) {
        let before = w.clone();
        let plan = run_cycle(&mut w, SyncMode::TwoWay, policy)?;
        for k in &plan.conflicts {
            let dirs = [&k.host, &k.guest].iter().filter(|e| e.as_ref().is_some_and(Entry::is_dir)).count();
            prop_assert!(dirs == 1 && k.host.is_some() && k.guest.is_some(), "auto policy kept {:?}", k);
        }
        converged(&w, &plan.conflicts)?;
        for (side, p, e) in unsynced_versions(&before) {
            prop_assert!(survives(&w, &p, &e, true), "{} version of {} lost: {:?}", side.as_str(), p, e);
        }
        settled(&w, SyncMode::TwoWay, policy, &plan)?;
    }

    /// Two-way with `keep`: everything outside conflicts converges, no version leaves the
    /// synced trees (nothing goes to the conflict store), and the conflicts stay as reported.
    #[test]
    fn two_way_keep_holds_conflicts_and_loses_nothing(mut w in diverged()) {
        let before = w.clone();
        let plan = run_cycle(&mut w, SyncMode::TwoWay, ConflictPolicy::Keep)?;
        prop_assert!(w.store.is_empty(), "keep saved losers: {:?}", w.store);
        for k in &plan.conflicts {
            prop_assert_eq!(w.host.get(&k.path), before.host.get(&k.path));
            prop_assert_eq!(w.guest.get(&k.path), before.guest.get(&k.path));
            prop_assert_eq!(w.ancestor.get(&k.path), before.ancestor.get(&k.path));
        }
        converged(&w, &plan.conflicts)?;
        for (side, p, e) in unsynced_versions(&before) {
            prop_assert!(survives(&w, &p, &e, false), "{} version of {} lost: {:?}", side.as_str(), p, e);
        }
        settled(&w, SyncMode::TwoWay, ConflictPolicy::Keep, &plan)?;
    }

    /// One-way: the destination ends equal to the source (which is untouched), every local
    /// edit on the destination is in the conflict store, and no conflict is ever reported.
    #[test]
    fn one_way_mirrors_and_saves_local_edits(
        mut w in diverged(),
        to_guest in any::<bool>(),
        policy in any_policy(),
    ) {
        let (mode, source, dest) = if to_guest {
            (SyncMode::HostToGuest, Side::Host, Side::Guest)
        } else {
            (SyncMode::GuestToHost, Side::Guest, Side::Host)
        };
        let before = w.clone();
        let plan = run_cycle(&mut w, mode, policy)?;
        prop_assert!(plan.conflicts.is_empty());
        prop_assert_eq!(w.side(source), before.side(source), "source changed");
        prop_assert_eq!(w.side(dest), before.side(source), "destination differs from source");
        prop_assert_eq!(&w.ancestor, before.side(source), "ancestor differs from source");
        for (p, e) in before.side(dest) {
            let local_edit = holds_content(e)
                && !same_version(Some(e), before.ancestor.get(p))
                && !same_version(Some(e), before.side(source).get(p));
            if local_edit {
                prop_assert!(
                    w.store.iter().any(|(s, q, x)| *s == dest && q == p && x == e),
                    "local edit at {} not saved", p
                );
            }
        }
        settled(&w, mode, policy, &plan)?;
    }

    /// Whatever the ancestor (interrupted cycles, a rebuilt database), any mode and policy:
    /// the plan applies cleanly, leaves well-formed trees, loses no unsynced version, and a
    /// second cycle is quiet.
    #[test]
    fn unrelated_ancestor_still_gives_a_consistent_plan(
        mut w in unrelated(),
        mode in any_mode(),
        policy in any_policy(),
    ) {
        let before = w.clone();
        let plan = run_cycle(&mut w, mode, policy)?;
        if mode == SyncMode::TwoWay {
            converged(&w, &plan.conflicts)?;
            for (side, p, e) in unsynced_versions(&before) {
                prop_assert!(survives(&w, &p, &e, true), "{} version of {} lost", side.as_str(), p);
            }
        }
        settled(&w, mode, policy, &plan)?;
    }
}

/// A guest that went back to a snapshot: a common history up to the snapshot, more synced
/// edits (the ancestor, which both sides held), then host edits since, and a guest that is
/// the snapshot plus edits of its own made after the revert.
fn reverted() -> impl Strategy<Value = World> {
    (
        prop::collection::vec(op(), 0..10),
        prop::collection::vec(op(), 0..8),
        prop::collection::vec(op(), 0..6),
        prop::collection::vec(op(), 0..4),
    )
        .prop_map(|(base, synced, host_ops, guest_ops)| {
            let snapshot = build(&Snapshot::new(), &base);
            let ancestor = build(&snapshot, &synced);
            let host = build(&ancestor, &host_ops);
            let guest = build(&snapshot, &guest_ops);
            World::new(ancestor, host, guest)
        })
}

proptest! {
    /// The merge after `resume` of a rolled-back guest, under any policy: reconciling against
    /// the substitute ancestor deletes nothing on either side, never lets a guest version
    /// that is not newer than what both sides had agreed on replace a host version outright
    /// (only as a conflict's winner, the host's version kept), applies cleanly, and every
    /// version that was on either side is still somewhere (the conflict store counting), but
    /// the guest's older ones that the host's replaced.
    #[test]
    fn rollback_merge_deletes_nothing_on_either_side(w in reverted(), policy in any_policy()) {
        let substitute = rollback_ancestor(&w.ancestor, &w.host, &w.guest);
        let mut merged = World::new(substitute, w.host.clone(), w.guest.clone());
        let plan = run_cycle(&mut merged, SyncMode::TwoWay, policy)?;
        // A guest version from before what both sides agreed on: the host's replaces it.
        let older = |p: &RelPath, g: &Entry| match w.ancestor.get(p) {
            Some(anc) => g == anc || matches!(
                (g, anc),
                (Entry::File(g), Entry::File(anc)) if g.mtime <= anc.mtime
            ),
            None => false,
        };
        for a in &plan.actions {
            prop_assert!(a.new.is_some(), "{} deleted on the {}", a.path, a.target.as_str());
            if a.target == Side::Host {
                // What the host deleted since comes back (add-only), but an older guest version
                // replaces a host one only as the winner of a conflict that a guest change
                // beneath it caused, the host's version kept.
                let from_before = a.expected.is_some()
                    && w.guest.get(&a.path).is_some_and(|g| older(&a.path, g));
                let kept = a.save_loser || a.expected.as_ref().is_some_and(Entry::is_dir);
                prop_assert!(
                    !from_before || kept,
                    "older guest version given to the host at {} without keeping the host's",
                    a.path
                );
            }
        }
        for side in [Side::Host, Side::Guest] {
            for (p, e) in w.side(side) {
                prop_assert!(
                    merged.side(side).contains_key(p),
                    "{} gone from the {}", p, side.as_str()
                );
                // A directory's permission bits are settled like any conflict; its presence
                // is checked above.
                let replaceable = e.is_dir() || (side == Side::Guest && older(p, e));
                prop_assert!(
                    replaceable || survives(&merged, p, e, true),
                    "{} version of {} lost", side.as_str(), p
                );
            }
        }
    }
}
