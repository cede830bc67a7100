//! The mass-deletion guard: how many entries the other side's changes took away from a side,
//! counted over a sliding window of time when they are executed, and whether that is too many
//! (see `docs/safety.md`, "Deletions are guarded over time").
//!
//! Live sync spreads an `rm -rf` of a whole share over many small cycles, so a per-cycle limit
//! lets it through one cycle at a time. The guard therefore keeps every removal a side's
//! transitions made during the last [`DELETION_WINDOW_MS`], and judges each new plan against
//! that window plus the plan's own losses. When the limit is crossed the share halts and the
//! window's removals are put back from the side's trash: a live wipe leaves the tree as it was.
//!
//! What counts as a loss: a file or symlink removed, or replaced by an entry of another kind,
//! whose content the same side does not gain elsewhere (a move or rename loses nothing: the
//! new name's creation is credited against the old name's removal, also when the two land in
//! different cycles of the window), and whose path is not exempt (build outputs and caches the
//! user expects to vanish in bulk: a `cargo clean`, `rm -rf node_modules`, `git gc`).
//! Directories never count themselves: their files do.
//!
//! Pure: no clock (callers pass `now_ms`), no I/O.

use crate::digest::Hash;
use crate::entry::Entry;
use crate::path::RelPath;
use crate::reconcile::{Plan, Side};
use crate::safety::{DeletionLimit, HaltReason};
use std::collections::{HashMap, HashSet, VecDeque};

/// How long an executed removal keeps counting against its side.
pub const DELETION_WINDOW_MS: u64 = 60_000;

/// What a side would lose if an entry vanished: a file's content or a symlink's target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Content {
    File(Hash),
    Symlink(Vec<u8>),
}

impl Content {
    /// `None` for a directory (its entries count instead).
    pub fn of(entry: &Entry) -> Option<Content> {
        match entry {
            Entry::File(m) => Some(Content::File(m.digest)),
            Entry::Symlink { target, .. } => Some(Content::Symlink(target.clone())),
            Entry::Dir { .. } => None,
        }
    }
}

/// The content a change from `expected` to `new` takes away from its side: `expected`'s, when
/// it is a file or symlink that is deleted or replaced by an entry of another kind. A file
/// whose content changes is not a loss here (its old version is kept in the trash, and edits
/// are what sync is for).
pub fn lost_content(expected: Option<&Entry>, new: Option<&Entry>) -> Option<Content> {
    let old = expected?;
    let same_kind = match (old, new) {
        (_, None) => false,
        (Entry::File(_), Some(Entry::File(_))) => true,
        (Entry::Symlink { .. }, Some(Entry::Symlink { .. })) => true,
        (Entry::Dir { .. }, Some(Entry::Dir { .. })) => true,
        _ => false,
    };
    if same_kind {
        None
    } else {
        Content::of(old)
    }
}

/// The losses `plan` would inflict on `side`: removals (and kind changes) of files and
/// symlinks whose content the plan does not create elsewhere on that side, at paths that are
/// not `exempt`.
pub fn planned_losses(plan: &Plan, side: Side, exempt: impl Fn(&RelPath) -> bool) -> usize {
    let created: HashSet<Content> = plan
        .actions
        .iter()
        .filter(|a| a.target == side)
        .filter_map(|a| a.new.as_ref().and_then(Content::of))
        .collect();
    plan.actions
        .iter()
        .filter(|a| a.target == side && !exempt(&a.path))
        .filter_map(|a| lost_content(a.expected.as_ref(), a.new.as_ref()))
        .filter(|c| !created.contains(c))
        .count()
}

/// Judges `losses` (the window's plus a plan's) against `limit`. `entries` is the number of
/// countable entries (files and symlinks not exempt) the side had before those losses. Both
/// bounds must be crossed to halt; a NaN fraction halts.
pub fn judge(
    limit: &DeletionLimit,
    side: Side,
    losses: usize,
    entries: usize,
) -> Result<(), HaltReason> {
    let within = losses as f64 <= limit.max_fraction * entries as f64;
    if losses >= limit.min_entries && !within {
        return Err(HaltReason::MassDeletion {
            side,
            deletions: losses,
            entries,
        });
    }
    Ok(())
}

/// One removal a side's transitions executed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    pub at_ms: u64,
    pub path: RelPath,
    /// What was there (and is now in that side's trash, or was an empty directory).
    pub entry: Entry,
}

/// The removals of one side over the last [`DELETION_WINDOW_MS`], and the losses among them
/// that no creation of the same content has made up for since.
#[derive(Debug, Default)]
pub struct DeletionWindow {
    /// Oldest first; the one at index `i` has sequence number `first_seq + i`.
    removals: VecDeque<Recorded>,
    first_seq: u64,
    /// Per content, the sequence numbers of the counted removals not made up for, oldest first.
    owed: HashMap<Content, VecDeque<u64>>,
    /// How many removals `owed` holds.
    losses: usize,
}

#[derive(Debug)]
struct Recorded {
    removal: Removal,
    /// The lost content while this removal counts (not made up for).
    owes: Option<Content>,
}

impl DeletionWindow {
    /// Losses in the window not made up for by a creation of the same content.
    pub fn losses(&self) -> usize {
        self.losses
    }

    /// Every removal still in the window, oldest first.
    pub fn removals(&self) -> impl Iterator<Item = &Removal> {
        self.removals.iter().map(|r| &r.removal)
    }

    pub fn is_empty(&self) -> bool {
        self.removals.is_empty()
    }

    pub fn clear(&mut self) {
        *self = DeletionWindow::default();
    }

    /// Forgets what happened more than [`DELETION_WINDOW_MS`] before `now_ms`.
    pub fn expire(&mut self, now_ms: u64) {
        let horizon = now_ms.saturating_sub(DELETION_WINDOW_MS);
        while self
            .removals
            .front()
            .is_some_and(|r| r.removal.at_ms < horizon)
        {
            if let Some(Recorded {
                owes: Some(content),
                ..
            }) = self.removals.pop_front()
            {
                // The oldest removal owing this content is this one.
                if let Some(queue) = self.owed.get_mut(&content) {
                    queue.pop_front();
                    if queue.is_empty() {
                        self.owed.remove(&content);
                    }
                }
                self.losses = self.losses.saturating_sub(1);
            }
            self.first_seq += 1;
        }
    }

    /// Records a removal. `counted` is its lost content when it counts as a loss (see
    /// [`lost_content`]; `None` for a directory, an exempt path, or a loss made up for in the
    /// same cycle).
    pub fn record_removal(
        &mut self,
        now_ms: u64,
        path: RelPath,
        entry: Entry,
        counted: Option<Content>,
    ) {
        let seq = self.first_seq + self.removals.len() as u64;
        if let Some(content) = &counted {
            self.owed.entry(content.clone()).or_default().push_back(seq);
            self.losses += 1;
        }
        self.removals.push_back(Recorded {
            removal: Removal {
                at_ms: now_ms,
                path,
                entry,
            },
            owes: counted,
        });
    }

    /// Records that the side gained `content`: it makes up for the oldest counted removal of
    /// the same content in the window, if there is one (a move whose halves landed in
    /// different cycles). A creation with nothing to make up for changes nothing.
    pub fn record_creation(&mut self, content: &Content) {
        let Some(queue) = self.owed.get_mut(content) else {
            return;
        };
        let seq = queue.pop_front();
        if queue.is_empty() {
            self.owed.remove(content);
        }
        let Some(seq) = seq else {
            return;
        };
        let index = usize::try_from(seq - self.first_seq).unwrap_or(usize::MAX);
        if let Some(r) = self.removals.get_mut(index) {
            r.owes = None;
        }
        self.losses = self.losses.saturating_sub(1);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::entry::{FileMeta, Timestamp};
    use crate::reconcile::Action;

    fn p(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes()).unwrap()
    }

    fn file(i: u8) -> Entry {
        Entry::File(FileMeta {
            size: 1,
            mode: 0o644,
            mtime: Timestamp::default(),
            digest: Hash([i; 32]),
        })
    }

    fn link(t: &str) -> Entry {
        Entry::Symlink {
            target: t.as_bytes().to_vec(),
            mtime: Default::default(),
        }
    }

    fn dir() -> Entry {
        Entry::Dir {
            mode: 0o755,
            mtime: Default::default(),
        }
    }

    #[test]
    fn lost_content_table() {
        let f = file(1);
        type Row = (&'static str, Option<Entry>, Option<Entry>, Option<Content>);
        let cases: Vec<Row> = vec![
            ("file deleted", Some(f.clone()), None, Content::of(&f)),
            ("file edited", Some(f.clone()), Some(file(2)), None),
            (
                "file replaced by a directory",
                Some(f.clone()),
                Some(dir()),
                Content::of(&f),
            ),
            (
                "file replaced by a symlink",
                Some(f.clone()),
                Some(link("x")),
                Content::of(&f),
            ),
            (
                "symlink deleted",
                Some(link("a")),
                None,
                Content::of(&link("a")),
            ),
            ("symlink retargeted", Some(link("a")), Some(link("b")), None),
            (
                "symlink replaced by a file",
                Some(link("a")),
                Some(file(3)),
                Content::of(&link("a")),
            ),
            ("directory deleted", Some(dir()), None, None),
            (
                "directory replaced by a file",
                Some(dir()),
                Some(file(1)),
                None,
            ),
            ("creation", None, Some(file(1)), None),
        ];
        for (name, expected, new, want) in cases {
            assert_eq!(
                lost_content(expected.as_ref(), new.as_ref()),
                want,
                "{name}"
            );
        }
    }

    fn action(path: &str, target: Side, expected: Option<Entry>, new: Option<Entry>) -> Action {
        Action {
            path: p(path),
            target,
            expected,
            new,
            save_loser: false,
        }
    }

    #[test]
    fn planned_losses_table() {
        let exempt = |path: &RelPath| path.as_bytes().starts_with(b"target/");
        let cases: Vec<(&str, Vec<Action>, usize)> = vec![
            ("nothing", vec![], 0),
            (
                "two deletions on the host, one on the guest",
                vec![
                    action("a", Side::Host, Some(file(1)), None),
                    action("b", Side::Host, Some(file(2)), None),
                    action("c", Side::Guest, Some(file(3)), None),
                ],
                2,
            ),
            (
                "a move on the same side is no loss",
                vec![
                    action("old", Side::Host, Some(file(1)), None),
                    action("new", Side::Host, None, Some(file(1))),
                ],
                0,
            ),
            (
                "the same content created on the other side does not excuse it",
                vec![
                    action("old", Side::Host, Some(file(1)), None),
                    action("new", Side::Guest, None, Some(file(1))),
                ],
                1,
            ),
            (
                "files replaced by directories and symlinks count",
                vec![
                    action("a", Side::Host, Some(file(1)), Some(dir())),
                    action("b", Side::Host, Some(file(2)), Some(link("x"))),
                ],
                2,
            ),
            (
                "exempt paths and directories do not count",
                vec![
                    action("target/x", Side::Host, Some(file(1)), None),
                    action("target", Side::Host, Some(dir()), None),
                    action("d", Side::Host, Some(dir()), None),
                ],
                0,
            ),
            (
                "edits do not count",
                vec![action("a", Side::Host, Some(file(1)), Some(file(2)))],
                0,
            ),
        ];
        for (name, actions, want) in cases {
            let plan = Plan {
                actions,
                ..Plan::default()
            };
            assert_eq!(planned_losses(&plan, Side::Host, exempt), want, "{name}");
        }
    }

    #[test]
    fn judge_table() {
        let default = DeletionLimit::default();
        let strict = DeletionLimit {
            max_fraction: 0.3,
            min_entries: 1,
        };
        let nan = DeletionLimit {
            max_fraction: f64::NAN,
            min_entries: 1,
        };
        let mass = |deletions, entries| {
            Err(HaltReason::MassDeletion {
                side: Side::Host,
                deletions,
                entries,
            })
        };
        #[rustfmt::skip]
        type Row = (&'static str, DeletionLimit, usize, usize, Result<(), HaltReason>);
        let cases: Vec<Row> = vec![
            ("no losses", default, 0, 1000, Ok(())),
            ("half exactly is allowed", default, 500, 1000, Ok(())),
            ("just over half halts", default, 501, 1000, mass(501, 1000)),
            ("everything", default, 1000, 1000, mass(1000, 1000)),
            ("small share never halts", default, 60, 60, Ok(())),
            ("99 losses are under min_entries", default, 99, 120, Ok(())),
            (
                "100 losses reach min_entries",
                default,
                100,
                120,
                mass(100, 120),
            ),
            (
                "nothing synced before, a big wipe",
                default,
                100,
                0,
                mass(100, 0),
            ),
            ("strict: 30%", strict, 3, 10, Ok(())),
            ("strict: 40%", strict, 4, 10, mass(4, 10)),
            ("NaN fraction halts", nan, 1, 10, mass(1, 10)),
            ("NaN fraction, nothing lost", nan, 0, 10, Ok(())),
        ];
        for (name, limit, losses, entries, want) in cases {
            assert_eq!(judge(&limit, Side::Host, losses, entries), want, "{name}");
        }
    }

    #[test]
    fn window_counts_removals_until_they_expire() {
        let mut w = DeletionWindow::default();
        w.record_removal(0, p("a"), file(1), Content::of(&file(1)));
        w.record_removal(10_000, p("b"), file(2), Content::of(&file(2)));
        w.record_removal(10_000, p("d"), dir(), None);
        assert_eq!(w.losses(), 2);
        assert_eq!(w.removals().count(), 3);
        w.expire(DELETION_WINDOW_MS);
        assert_eq!(w.losses(), 2, "a removal exactly a window old still counts");
        w.expire(DELETION_WINDOW_MS + 1);
        assert_eq!(w.losses(), 1);
        assert_eq!(
            w.removals().map(|r| r.path.clone()).collect::<Vec<_>>(),
            [p("b"), p("d")]
        );
        w.expire(DELETION_WINDOW_MS + 10_001);
        assert_eq!(w.losses(), 0);
        assert!(w.is_empty());
    }

    #[test]
    fn a_move_split_over_two_cycles_makes_up_for_its_removal() {
        let mut w = DeletionWindow::default();
        for i in 0..3 {
            w.record_removal(5, p(&format!("old/{i}")), file(i), Content::of(&file(i)));
        }
        assert_eq!(w.losses(), 3);
        w.record_creation(&Content::File(Hash([0; 32])));
        w.record_creation(&Content::File(Hash([1; 32])));
        assert_eq!(w.losses(), 1);
        // A creation with nothing owed is not remembered, and cannot pre-pay a later loss.
        w.record_creation(&Content::File(Hash([1; 32])));
        w.record_creation(&Content::File(Hash([9; 32])));
        assert_eq!(w.losses(), 1);
        w.record_removal(9, p("x"), file(9), Content::of(&file(9)));
        assert_eq!(w.losses(), 2);
        // The removal made up for expires with the others; the owed one stops counting too.
        w.expire(DELETION_WINDOW_MS + 6);
        assert_eq!(w.losses(), 1, "only the removal at 9 is left");
        assert_eq!(w.removals().count(), 1);
    }

    proptest::proptest! {
        /// The running count always equals a recount by a plain model: each creation makes up
        /// for the oldest removal of its content still owed in the window.
        #[test]
        fn losses_match_a_model(
            events in proptest::collection::vec((0u64..200_000, 0u8..4, proptest::bool::ANY), 0..80),
        ) {
            let mut events = events;
            events.sort_by_key(|e| e.0);
            let mut w = DeletionWindow::default();
            // The model: (time, content, still owed) per counted removal.
            let mut model: Vec<(u64, u8, bool)> = Vec::new();
            for (at, content, is_removal) in events {
                w.expire(at);
                let horizon = at.saturating_sub(DELETION_WINDOW_MS);
                model.retain(|(t, _, _)| *t >= horizon);
                let c = Content::File(Hash([content; 32]));
                if is_removal {
                    w.record_removal(at, p("f"), file(content), Some(c));
                    model.push((at, content, true));
                } else {
                    w.record_creation(&c);
                    if let Some(m) = model.iter_mut().find(|(_, k, owed)| *k == content && *owed) {
                        m.2 = false;
                    }
                }
                let owed = model.iter().filter(|m| m.2).count();
                proptest::prop_assert_eq!(w.losses(), owed);
                proptest::prop_assert_eq!(w.removals().count(), model.len());
            }
        }
    }
}
