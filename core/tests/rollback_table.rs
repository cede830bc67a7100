//! The substitute ancestor for the merge after a guest went back in time: one named case per
//! rule of `vmsync_core::rollback::rollback_ancestor`, each with the plan reconcile then makes.

mod common;

use common::{dir, dir_mode, file, link, path, snapshot};
use vmsync_core::reconcile::{reconcile, ConflictPolicy, Side, SyncMode};
use vmsync_core::rollback::rollback_ancestor;
use vmsync_core::Entry;

/// What the plan does at the case's path: (side, new) for an action, "conflict", or "none".
fn outcome(
    a: Option<Entry>,
    h: Option<Entry>,
    g: Option<Entry>,
    policy: ConflictPolicy,
) -> (Option<Entry>, String) {
    let one = |e: Option<Entry>| snapshot(e.map(|e| ("f", e)));
    let (a, h, g) = (one(a), one(h), one(g));
    let substitute = rollback_ancestor(&a, &h, &g);
    let no_limit = vmsync_core::Timestamp::new(i64::MAX, 0);
    let plan = reconcile(&substitute, &h, &g, SyncMode::TwoWay, policy, no_limit);
    let what = match (plan.actions.as_slice(), plan.conflicts.as_slice()) {
        ([], []) => "none".to_string(),
        ([], [_]) => "conflict".to_string(),
        ([act], []) => format!(
            "{} gets {}",
            act.target.as_str(),
            match &act.new {
                None => "deleted".to_string(),
                Some(e) if Some(e) == h.get(&path("f")) => "host's".to_string(),
                Some(e) if Some(e) == g.get(&path("f")) => "guest's".to_string(),
                Some(_) => "other".to_string(),
            }
        ),
        _ => format!("{:?} {:?}", plan.actions, plan.conflicts),
    };
    (substitute.get(&path("f")).cloned(), what)
}

#[test]
fn substitute_ancestor_table() {
    use ConflictPolicy::{HostWins, Keep};
    let (old, synced, newer) = (file(1, 10), file(2, 20), file(3, 30));
    type Row = (
        &'static str,
        Option<Entry>,
        Option<Entry>,
        Option<Entry>,
        ConflictPolicy,
        Option<Entry>,
        &'static str,
    );
    #[rustfmt::skip]
    let cases: Vec<Row> = vec![
        // name, ancestor, host, guest, policy, substitute, what the plan does
        ("created on the host since the snapshot: back on the guest",
            Some(synced.clone()), Some(synced.clone()), None, Keep, None, "guest gets host's"),
        ("created on the host after the ancestor, guest never had it",
            None, Some(newer.clone()), None, Keep, None, "guest gets host's"),
        ("deleted on the host since: the guest's copy comes back (add-only)",
            Some(synced.clone()), None, Some(synced.clone()), Keep, None, "host gets guest's"),
        ("created on the guest after the revert: to the host",
            None, None, Some(newer.clone()), Keep, None, "host gets guest's"),
        ("same on both sides", Some(synced.clone()), Some(synced.clone()), Some(synced.clone()),
            Keep, Some(synced.clone()), "none"),
        ("host edited after the snapshot, guest holds the old version: host wins",
            Some(synced.clone()), Some(synced.clone()), Some(old.clone()), Keep, Some(old.clone()),
            "guest gets host's"),
        ("host edited again since the ancestor, guest reverted: host wins",
            Some(synced.clone()), Some(newer.clone()), Some(old.clone()), Keep, Some(old.clone()),
            "guest gets host's"),
        ("guest holds the ancestor's version, host edited since",
            Some(synced.clone()), Some(newer.clone()), Some(synced.clone()), Keep,
            Some(synced.clone()), "guest gets host's"),
        ("guest edited after the revert (newer than the ancestor): keep lists it",
            Some(synced.clone()), Some(synced.clone()), Some(newer.clone()), Keep, None, "conflict"),
        ("guest edited after the revert, host-wins: host's version replaces it",
            Some(synced.clone()), Some(synced.clone()), Some(newer.clone()), HostWins, None,
            "guest gets host's"),
        ("guest edit with an old mtime but no ancestor to compare: a conflict",
            None, Some(synced.clone()), Some(old.clone()), Keep, None, "conflict"),
        ("a symlink the guest holds from before: host wins",
            Some(link("a")), Some(link("b")), Some(link("a")), Keep, Some(link("a")),
            "guest gets host's"),
        ("a symlink the guest changed: a conflict",
            Some(link("a")), Some(link("b")), Some(link("c")), Keep, None, "conflict"),
        ("a directory whose mode the host changed since: host wins",
            Some(dir()), Some(dir_mode(0o700)), Some(dir()), Keep, Some(dir()), "guest gets host's"),
        ("a file that became a directory on the guest: a conflict",
            Some(synced.clone()), Some(synced.clone()), Some(dir()), Keep, None, "conflict"),
    ];
    for (name, a, h, g, policy, want_sub, want) in cases {
        let (sub, what) = outcome(a, h, g, policy);
        assert_eq!(sub, want_sub, "{name}: substitute");
        assert_eq!(what, want, "{name}: plan");
    }
    // No rule ever lets the plan delete: checked for every case above by its outcome, and
    // across random histories by `rollback_merge_deletes_nothing_on_either_side`.
    let _ = Side::Host;
}
