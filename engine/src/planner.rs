//! A cycle's decisions, as pure functions: what each side's scan shows once filtered, scoped
//! and frozen, what the plan is once directories that must stay are kept, and what a cycle does
//! when a safety check objects. No I/O and no state: [`crate::controller`] feeds them its scans
//! and ancestor and acts on the answers (docs/design.md "Sync model").
//!
//! Order in a cycle: [`visible`] on each scan; on a full cycle, [`landed`] (what was applied
//! but not recorded); [`views`] over the cycle's scope; [`plan`]; and [`on_objection`] or
//! [`on_lost_marker`] wherever a check says no.

use crate::filter::Filter;
use std::borrow::Cow;
use std::collections::{BTreeSet, HashSet};
use vmsync_core::endpoint::{Problem, ScanScope};
use vmsync_core::path::subtree;
use vmsync_core::reconcile::{reconcile, ConflictPolicy, Plan, Side, SyncMode};
use vmsync_core::safety::HaltReason;
use vmsync_core::{Entry, RelPath, Snapshot, Timestamp};

/// A scan's entries without what the share's ignore patterns exclude.
pub fn visible(entries: Vec<(RelPath, Entry)>, filter: &Filter) -> Snapshot {
    entries
        .into_iter()
        .filter(|(p, e)| !filter.is_ignored(p, e.is_dir()))
        .collect()
}

/// Of the changes applied but not recorded (by this process, or a predecessor killed between
/// a transition and its record), those a full scan shows landed: the side a change was sent
/// to holds exactly what was applied. One more condition keeps a rollback safe: for a path the
/// ancestor records (`ancestor`), the guest must not hold that recorded state, the one from
/// before the change. A guest reverted to before it holds exactly that; the change then stays
/// unrecorded, so the host's version reads as the host's own (given to the guest), never the
/// guest's older one as an edit over it (docs/safety.md, "Snapshot reverts"). A guest that
/// holds the change, or changed the file again since, does not. A creation (nothing recorded
/// before it) is always taken. The first of several at one path wins.
pub fn landed(
    candidates: Vec<(Side, RelPath, Option<Entry>)>,
    ancestor: impl Fn(&RelPath) -> Option<Entry>,
    host: &Snapshot,
    guest: &Snapshot,
) -> Vec<(RelPath, Option<Entry>)> {
    let mut seen = HashSet::new();
    candidates
        .into_iter()
        .filter(|(side, path, new)| {
            let target = match side {
                Side::Host => host,
                Side::Guest => guest,
            };
            let now = guest.get(path);
            target.get(path) == new.as_ref()
                && (now == new.as_ref() || {
                    // A creation is always taken: a guest that made a file and deleted it
                    // again looks the same, and its deletion must reach the host (the
                    // host's copy goes to the trash, as any deletion's).
                    let before = ancestor(path);
                    before.is_none() || now != before.as_ref()
                })
        })
        .filter(|(_, path, _)| seen.insert(path.clone()))
        .map(|(_, path, new)| (path, new))
        .collect()
}

/// What a cycle compares, over its scope: the ancestor and both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Views {
    pub ancestor: Snapshot,
    pub host: Snapshot,
    pub guest: Snapshot,
}

/// The three snapshots a cycle reconciles.
///
/// - The ancestor is cut to the scope (a live cycle looks at its paths and the directories
///   they are in) and filtered like the scans.
/// - `frozen` paths, and everything beneath them, are dropped from all three: a path a scan
///   could not read is absent from its report, and absent must not read as deleted; the same
///   for what a side's own ignore files exclude and for files a bulk job is still landing.
/// - A targeted scan reports the directories its paths are in for their own metadata only: such
///   a directory is reconciled only when it is a directory in all three (a metadata update at
///   most); anything else there is left to a scan that covers it.
pub fn views<'a>(
    scope: &ScanScope,
    ancestor: Snapshot,
    host: Snapshot,
    guest: Snapshot,
    frozen: impl IntoIterator<Item = &'a RelPath>,
    filter: &Filter,
) -> Views {
    // Taken, not copied: on a full cycle it is the whole ancestor, as large as a side's scan.
    let mut ancestor = match scope {
        ScanScope::Full => ancestor,
        ScanScope::Paths(paths) => paths
            .iter()
            .flat_map(|p| subtree(&ancestor, p))
            .chain(scope_parents(paths).filter_map(|d| ancestor.get_key_value(&d)))
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect(),
    };
    ancestor.retain(|p, e| !filter.is_ignored(p, e.is_dir()));
    let mut views = Views {
        ancestor,
        host,
        guest,
    };
    for path in frozen {
        for snap in [&mut views.host, &mut views.guest, &mut views.ancestor] {
            remove_subtree(snap, path);
        }
    }
    if let ScanScope::Paths(paths) = scope {
        for dir in scope_parents(paths) {
            let all_dirs = [&views.ancestor, &views.host, &views.guest]
                .iter()
                .all(|s| s.get(&dir).is_some_and(Entry::is_dir));
            if !all_dirs {
                for snap in [&mut views.ancestor, &mut views.host, &mut views.guest] {
                    snap.remove(&dir);
                }
            }
        }
    }
    views
}

/// A cycle's plan, and whether it kept a directory the other side removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub plan: Plan,
    /// A directory stayed (see [`plan`]): a later cycle must give it back to the other side.
    pub kept_dirs: bool,
}

/// Reconciles the views, then keeps every directory whose removal would take something its
/// side leaves alone (`host_ignored`, `guest_ignored`, sorted: what each side's own ignore
/// files exclude, and what its scan could not sync, see [`unsynced`]): nothing ignored or
/// unreadable is ever deleted. Such a directory is forgotten in the ancestor, so the next
/// cycle sees it as that side's and gives the other side the (empty) directory back, where
/// retrying the removal would fail on every cycle.
pub fn plan(
    views: &Views,
    mode: SyncMode,
    policy: ConflictPolicy,
    guest_mtime_limit: Timestamp,
    host_ignored: &[RelPath],
    guest_ignored: &[RelPath],
) -> Planned {
    let mut plan = reconcile(
        &views.ancestor,
        &views.host,
        &views.guest,
        mode,
        policy,
        guest_mtime_limit,
    );
    let mut kept = Vec::new();
    plan.actions.retain(|a| {
        let ignored = match a.target {
            Side::Host => host_ignored,
            Side::Guest => guest_ignored,
        };
        let keep = a.new.is_none()
            && matches!(a.expected, Some(Entry::Dir { .. }))
            && holds_any(ignored, &a.path);
        if keep {
            kept.push(a.path.clone());
        }
        !keep
    });
    let kept_dirs = !kept.is_empty();
    plan.agreed.extend(kept.into_iter().map(|p| (p, None)));
    Planned { plan, kept_dirs }
}

/// What a side holds that sync leaves alone, sorted, for [`plan`]: what its ignore files
/// exclude (`ignored`, sorted, as scans report it) and the paths its scan reported as problems
/// (a FIFO, an entry past the path bounds, a directory it could not open, a file that kept
/// changing): a directory holding one cannot be removed, so it is kept.
pub fn unsynced<'a>(ignored: &'a [RelPath], problems: &[Problem]) -> Cow<'a, [RelPath]> {
    if problems.is_empty() {
        return Cow::Borrowed(ignored);
    }
    let mut all: Vec<RelPath> = ignored
        .iter()
        .cloned()
        .chain(problems.iter().map(|p| p.path.clone()))
        .collect();
    all.sort();
    all.dedup();
    Cow::Owned(all)
}

/// What a cycle does when a safety check objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Stop here and run again soon, as a full cycle.
    Retry,
    /// Halt the share (and put back what the window removed).
    Halt(HaltReason),
}

/// A targeted cycle sees part of the story (the hint for a directory's old name can arrive a
/// moment before the one for its new name, and a move then looks like a mass deletion): it
/// retries, and only a full cycle halts.
pub fn on_objection(scope: &ScanScope, reason: HaltReason) -> Verdict {
    match scope {
        ScanScope::Full => Verdict::Halt(reason),
        ScanScope::Paths(_) => Verdict::Retry,
    }
}

/// What a cycle does about a side whose root marker is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostMarker {
    /// A targeted scan cannot tell an emptied root from a few quiet paths: retry, full.
    Retry,
    /// The root still holds entries: accept it again (forget its identity, merge add-only) and
    /// retry.
    Readopt,
    /// An empty root without its marker: leave it to the root checks, which halt.
    Judge,
}

/// The verdict on a lost marker, from the cycle's scope and whether the side's scan found
/// anything.
pub fn on_lost_marker(scope: &ScanScope, found_entries: bool) -> LostMarker {
    match (scope, found_entries) {
        (ScanScope::Paths(_), _) => LostMarker::Retry,
        (ScanScope::Full, true) => LostMarker::Readopt,
        (ScanScope::Full, false) => LostMarker::Judge,
    }
}

/// The directories the paths of a targeted scope are in (not the root, none inside the scope).
pub fn scope_parents(paths: &[RelPath]) -> impl Iterator<Item = RelPath> + '_ {
    let parents: BTreeSet<RelPath> = paths
        .iter()
        .filter_map(RelPath::parent)
        .filter(|d| !d.is_root() && !paths.iter().any(|p| p == d || p.is_ancestor_of(d)))
        .collect();
    parents.into_iter()
}

/// Removes `path` and everything beneath it from `snap`.
pub fn remove_subtree(snap: &mut Snapshot, path: &RelPath) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use vmsync_core::entry::Timestamp;
    use vmsync_core::reconcile::Action;
    use vmsync_core::{FileMeta, Hash};

    /// No guest mtime is past it (the reconcile table covers the limit).
    const NO_LIMIT: Timestamp = Timestamp::new(i64::MAX, 0);

    fn p(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes()).unwrap()
    }

    fn dir() -> Entry {
        Entry::Dir {
            mode: 0o755,
            mtime: Timestamp::new(1, 0),
        }
    }

    fn file(seed: u8) -> Entry {
        Entry::File(FileMeta {
            size: u64::from(seed),
            mode: 0o644,
            mtime: Timestamp::new(i64::from(seed), 0),
            digest: Hash([seed; 32]),
        })
    }

    /// A snapshot from a compact form: `"a/"` is a directory, `"a=3"` a file with seed 3.
    fn snap(items: &[&str]) -> Snapshot {
        items
            .iter()
            .map(|s| match s.split_once('=') {
                Some((path, seed)) => (p(path), file(seed.parse().unwrap())),
                None => (p(s.trim_end_matches('/')), dir()),
            })
            .collect()
    }

    fn keys(s: &Snapshot) -> Vec<String> {
        s.keys().map(RelPath::escaped).collect()
    }

    fn no_filter() -> Filter {
        Filter::new(&[]).unwrap()
    }

    #[test]
    fn visible_drops_what_the_patterns_ignore() {
        let filter = Filter::new(&["target/".to_string(), "*.o".to_string()]).unwrap();
        let entries = snap(&["src/", "src/a.o=1", "src/a.c=2", "target/", "target/x=3"]);
        let shown = visible(entries.into_iter().collect(), &filter);
        assert_eq!(keys(&shown), ["src", "src/a.c"]);
    }

    #[test]
    fn landed_takes_what_the_target_holds_unless_the_guest_went_back_first_wins() {
        let host = snap(&["a=1", "b=2", "e=5", "f=6", "g=7"]);
        let guest = snap(&["a=1", "c=3", "e=4", "g=9"]);
        // What the ancestor records: e and g as they were before the change to them.
        let ancestor = snap(&["e=4", "g=4"]);
        let candidates = vec![
            (Side::Host, p("a"), Some(file(1))), // landed, and the guest holds it
            (Side::Host, p("b"), Some(file(9))), // something else is there
            (Side::Guest, p("c"), Some(file(3))),
            (Side::Guest, p("a"), None), // a later note of a landed path: the first wins
            (Side::Guest, p("d"), None), // a removal that landed
            (Side::Host, p("c"), Some(file(3))), // the other side's path
            (Side::Host, p("e"), Some(file(5))), // landed; the guest holds e as before it
            (Side::Host, p("f"), Some(file(6))), // a creation: taken, the guest's deletion follows
            (Side::Host, p("g"), Some(file(7))), // landed; the guest changed g again since
        ];
        let got = landed(candidates, |p| ancestor.get(p).cloned(), &host, &guest);
        assert_eq!(
            got,
            vec![
                (p("a"), Some(file(1))),
                (p("c"), Some(file(3))),
                (p("d"), None),
                (p("f"), Some(file(6))),
                (p("g"), Some(file(7))),
            ]
        );
    }

    /// Each row: scope, ancestor, host, guest, frozen paths; then the three views expected.
    #[test]
    fn views_table() {
        type Row<'a> = (
            &'a str,
            Option<&'a [&'a str]>,
            &'a [&'a str],
            &'a [&'a str],
            &'a [&'a str],
            &'a [&'a str],
            [&'a [&'a str]; 3],
        );
        let rows: &[Row] = &[
            (
                "a full cycle sees everything",
                None,
                &["a/", "a/x=1", "b=2"],
                &["a/", "a/x=1", "b=2"],
                &["a/", "a/x=1"],
                &[],
                [&["a", "a/x", "b"], &["a", "a/x", "b"], &["a", "a/x"]],
            ),
            (
                "an unreadable directory is frozen on all three sides",
                None,
                &["a/", "a/x=1", "b=2"],
                &["a/", "b=2"],
                &["a/", "a/x=1", "b=2"],
                &["a"],
                [&["b"], &["b"], &["b"]],
            ),
            (
                "a targeted cycle sees its paths and the directories they are in",
                Some(&["d/f"]),
                &["d/", "d/f=1", "d/g=2", "e=3"],
                &["d/", "d/f=4"],
                &["d/", "d/f=1"],
                &[],
                [&["d", "d/f"], &["d", "d/f"], &["d", "d/f"]],
            ),
            (
                "a parent that is not a directory everywhere is left to a later scan",
                Some(&["d/f"]),
                &["d/", "d/f=1"],
                &["d/", "d/f=1"],
                &["d=5"],
                &[],
                [&["d/f"], &["d/f"], &[]],
            ),
            (
                "the root frozen leaves nothing to compare",
                None,
                &["a=1"],
                &["a=1"],
                &[],
                &[""],
                [&[], &[], &[]],
            ),
        ];
        for (name, paths, ancestor, host, guest, frozen, want) in rows {
            let scope = match paths {
                None => ScanScope::Full,
                Some(paths) => ScanScope::Paths(paths.iter().map(|s| p(s)).collect()),
            };
            let frozen: Vec<RelPath> = frozen
                .iter()
                .map(|s| if s.is_empty() { RelPath::root() } else { p(s) })
                .collect();
            let v = views(
                &scope,
                snap(ancestor),
                snap(host),
                snap(guest),
                &frozen,
                &no_filter(),
            );
            assert_eq!(keys(&v.ancestor), want[0], "{name}: ancestor");
            assert_eq!(keys(&v.host), want[1], "{name}: host");
            assert_eq!(keys(&v.guest), want[2], "{name}: guest");
        }
    }

    #[test]
    fn views_filter_the_ancestor_like_the_scans() {
        let filter = Filter::new(&["*.o".to_string()]).unwrap();
        let v = views(
            &ScanScope::Full,
            snap(&["a.o=1", "b=2"]),
            snap(&["b=2"]),
            snap(&["b=2"]),
            &[],
            &filter,
        );
        assert_eq!(keys(&v.ancestor), ["b"]);
    }

    #[test]
    fn a_removed_directory_holding_ignored_files_is_kept_and_forgotten() {
        // The guest removed `build/` and `docs/`; the host ignores (by its own ignore files)
        // something inside `build/`.
        let views = Views {
            ancestor: snap(&["build/", "docs/", "keep=1"]),
            host: snap(&["build/", "docs/", "keep=1"]),
            guest: snap(&["keep=1"]),
        };
        let planned = plan(
            &views,
            SyncMode::TwoWay,
            ConflictPolicy::Keep,
            NO_LIMIT,
            &[p("build/cache/x"), p("buildx")],
            &[],
        );
        let acts: Vec<(String, Side)> = planned
            .plan
            .actions
            .iter()
            .map(|a: &Action| (a.path.escaped(), a.target))
            .collect();
        assert_eq!(acts, [("docs".to_string(), Side::Host)]);
        assert!(planned.kept_dirs);
        assert!(planned.plan.agreed.contains(&(p("build"), None)));
        let none = plan(
            &views,
            SyncMode::TwoWay,
            ConflictPolicy::Keep,
            NO_LIMIT,
            &[],
            &[],
        );
        assert!(!none.kept_dirs);
        assert_eq!(none.plan.actions.len(), 2);
    }

    #[test]
    fn objections_halt_only_a_full_cycle() {
        let reason = HaltReason::RootEmptied { side: Side::Guest };
        assert_eq!(
            on_objection(&ScanScope::Full, reason.clone()),
            Verdict::Halt(reason.clone())
        );
        assert_eq!(
            on_objection(&ScanScope::Paths(vec![p("a")]), reason),
            Verdict::Retry
        );
    }

    #[test]
    fn lost_marker_table() {
        let targeted = ScanScope::Paths(vec![p("a")]);
        let rows = [
            (&targeted, true, LostMarker::Retry),
            (&targeted, false, LostMarker::Retry),
            (&ScanScope::Full, true, LostMarker::Readopt),
            (&ScanScope::Full, false, LostMarker::Judge),
        ];
        for (scope, found, want) in rows {
            assert_eq!(on_lost_marker(scope, found), want, "{scope:?} {found}");
        }
    }

    #[test]
    fn scope_parents_are_outside_the_scope_and_never_the_root() {
        let got: Vec<String> = scope_parents(&[p("a/b/c"), p("a/b"), p("d/e"), p("f")])
            .map(|d| d.escaped())
            .collect();
        assert_eq!(got, ["a", "d"]);
    }

    #[test]
    fn holds_any_finds_descendants_only() {
        let sorted = vec![p("a-b/x"), p("a.c"), p("a/b/target"), p("ab/target")];
        assert!(holds_any(&sorted, &p("a")));
        assert!(holds_any(&sorted, &p("a/b")));
        assert!(!holds_any(&sorted, &p("a/c")));
        assert!(
            !holds_any(&sorted, &p("a-b/x")),
            "a path is not beneath itself"
        );
        assert!(holds_any(&sorted, &p("ab")));
        assert!(!holds_any(&sorted, &p("b")));
        assert!(!holds_any(&[], &p("a")));
    }

    #[test]
    fn remove_subtree_takes_the_path_and_its_descendants_only() {
        let mut s = snap(&["a/", "a/b/", "a/b/c/", "a-b/", "a0/", "ab/", "b/"]);
        remove_subtree(&mut s, &p("a"));
        assert_eq!(keys(&s), ["a-b", "a0", "ab", "b"]);
        remove_subtree(&mut s, &RelPath::root());
        assert!(s.is_empty());
    }
}
