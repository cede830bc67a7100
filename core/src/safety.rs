//! Safety checks that halt a share instead of letting a cycle propagate deletions (HOSTILE.md
//! rule 19): a root that is missing, was replaced or was emptied, and a plan that would delete
//! too much at once. Pure functions over what the scans reported and what reconcile planned;
//! the controller decides when to call them and records the halt until `resume`.

use crate::digest::Hash;
use crate::endpoint::RootId;
use crate::entry::{Entry, Snapshot};
use crate::path::escape_bytes;
use crate::reconcile::{Plan, Side};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fmt;

/// Why a share stopped syncing. Every variant blocks all changes until lifted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HaltReason {
    /// The root directory is not there (unmounted, deleted, a VM disk not attached).
    RootMissing { side: Side, detail: String },
    /// The root is another directory than the one we synced: its marker or device/inode
    /// changed, the marker is gone, or the root is now a symlink or not a directory.
    RootReplaced { side: Side, detail: String },
    /// The root holds nothing although the last sync left entries there.
    RootEmptied { side: Side },
    /// The plan deletes more entries on one side than the configured limit allows.
    MassDeletion {
        side: Side,
        deletions: usize,
        entries: usize,
    },
    /// The guest's share went back in time (a VM snapshot revert, a disk image copied back):
    /// it holds an older generation than the host recorded (`None`: no generation at all).
    /// See [`crate::rollback`].
    GuestRolledBack { guest: Option<u64>, host: u64 },
}

impl HaltReason {
    /// A stable machine-readable code for `status --json` and logs.
    pub fn code(&self) -> &'static str {
        match self {
            HaltReason::RootMissing { .. } => "root-missing",
            HaltReason::RootReplaced { .. } => "root-replaced",
            HaltReason::RootEmptied { .. } => "root-emptied",
            HaltReason::MassDeletion { .. } => "mass-deletion",
            HaltReason::GuestRolledBack { .. } => "guest-rolled-back",
        }
    }

    pub fn side(&self) -> Side {
        match self {
            HaltReason::RootMissing { side, .. }
            | HaltReason::RootReplaced { side, .. }
            | HaltReason::RootEmptied { side }
            | HaltReason::MassDeletion { side, .. } => *side,
            HaltReason::GuestRolledBack { .. } => Side::Guest,
        }
    }
}

// `detail` may come from the guest (an endpoint error's text), so it is escaped here, once,
// for every log line and status output that prints a halt (HOSTILE.md rule 14).
impl fmt::Display for HaltReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HaltReason::RootMissing { side, detail } => write!(
                f,
                "{} share root is missing: {}",
                side.as_str(),
                escape_bytes(detail.as_bytes())
            ),
            HaltReason::RootReplaced { side, detail } => write!(
                f,
                "{} share root was replaced: {}",
                side.as_str(),
                escape_bytes(detail.as_bytes())
            ),
            HaltReason::RootEmptied { side } => write!(
                f,
                "{} share root is empty although the last sync left entries in it",
                side.as_str()
            ),
            HaltReason::MassDeletion {
                side,
                deletions,
                entries,
            } => write!(
                f,
                "this cycle would delete {deletions} of {entries} synced entries on the {}",
                side.as_str()
            ),
            HaltReason::GuestRolledBack { guest, host } => {
                let seen = match guest {
                    Some(g) => format!("generation {g}"),
                    None => "no generation".to_string(),
                };
                write!(
                    f,
                    "the guest share went back in time (a snapshot revert?): it holds {seen}, \
                     the host synced generation {host} with it; nothing was changed on the host"
                )
            }
        }
    }
}

impl std::error::Error for HaltReason {}

/// Checks that a side's root is the one we synced before.
///
/// `stored` is the identity recorded at the first sync (`None`: there was none yet, so any
/// root is accepted and the caller records it); `seen` is what this scan reported.
pub fn check_root(
    side: Side,
    stored: Option<RootId>,
    seen: Option<RootId>,
) -> Result<(), HaltReason> {
    let Some(stored) = stored else {
        return Ok(());
    };
    let Some(seen) = seen else {
        return Err(HaltReason::RootReplaced {
            side,
            detail: "the root identity marker is gone".to_string(),
        });
    };
    let mut changed = Vec::new();
    if seen.marker != stored.marker {
        changed.push(format!(
            "marker {} is now {}",
            hex(&stored.marker),
            hex(&seen.marker)
        ));
    }
    if seen.dev != stored.dev {
        changed.push(format!("device {} is now {}", stored.dev, seen.dev));
    }
    if seen.ino != stored.ino {
        changed.push(format!("inode {} is now {}", stored.ino, seen.ino));
    }
    if changed.is_empty() {
        Ok(())
    } else {
        Err(HaltReason::RootReplaced {
            side,
            detail: changed.join(", "),
        })
    }
}

/// Checks that a side's root was not emptied behind our back: an unmounted filesystem or a
/// wiped directory scans as "no entries", which reconcile would read as "delete everything on
/// the other side". `scan` must be a full scan of that side; a partial scan can be empty
/// legitimately.
pub fn check_emptied(side: Side, ancestor: &Snapshot, scan: &Snapshot) -> Result<(), HaltReason> {
    if !ancestor.is_empty() && scan.is_empty() {
        Err(HaltReason::RootEmptied { side })
    } else {
        Ok(())
    }
}

/// How many deletions one cycle may make on one side before the share halts.
///
/// Both bounds must be crossed to halt. The fraction is generous because ordinary work
/// deletes a lot at once: `git checkout` of another branch, `make clean`, removing
/// `node_modules`. `min_entries` keeps small shares from halting when a few deletions are a
/// large fraction of them (deleting 3 of 4 files is not a disaster worth a manual `resume`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DeletionLimit {
    /// Largest fraction of the ancestor's entries one side may lose in a cycle, in `0.0..=1.0`.
    pub max_fraction: f64,
    /// Fewer deletions than this never halt, whatever the fraction.
    pub min_entries: usize,
}

impl Default for DeletionLimit {
    fn default() -> Self {
        DeletionLimit {
            max_fraction: 0.5,
            min_entries: 100,
        }
    }
}

/// Checks the plan's deletions per side against `limit`, relative to the size of the whole
/// share (`ancestor` must be the full ancestor, also for a cycle over a few paths: a targeted
/// cycle that deletes a whole subtree is not a disaster if the share is large).
///
/// What counts is what the user would lose: deleted files and symlinks whose content the same
/// plan does not re-create elsewhere on that side. A moved or renamed directory deletes every
/// path in it and creates the same content under the new name: nothing is lost, nothing
/// counts. Directories themselves do not count (their files do). Against an empty ancestor
/// any deletion exceeds the fraction, so a first one-way sync that would wipe a populated
/// destination halts once it reaches `min_entries`. The host is checked first.
pub fn check_deletions(
    plan: &Plan,
    ancestor: &Snapshot,
    limit: &DeletionLimit,
) -> Result<(), HaltReason> {
    let entries = ancestor.len();
    for side in [Side::Host, Side::Guest] {
        // Content this side gains in the plan: file digests and symlink targets.
        let created: HashSet<ContentKey<'_>> = plan
            .actions
            .iter()
            .filter(|a| a.target == side)
            .filter_map(|a| a.new.as_ref().and_then(content_key))
            .collect();
        let deletions = plan
            .actions
            .iter()
            .filter(|a| a.target == side && a.new.is_none())
            .filter_map(|a| a.expected.as_ref().and_then(content_key))
            .filter(|k| !created.contains(k))
            .count();
        // Written as "not within the limit" so that a NaN fraction halts instead of never
        // halting.
        let within = deletions as f64 <= limit.max_fraction * entries as f64;
        if deletions >= limit.min_entries && !within {
            return Err(HaltReason::MassDeletion {
                side,
                deletions,
                entries,
            });
        }
    }
    Ok(())
}

#[derive(PartialEq, Eq, Hash)]
enum ContentKey<'a> {
    File(Hash),
    Symlink(&'a [u8]),
}

/// What would be lost if `e` vanished; `None` for a directory (its entries count instead).
fn content_key(e: &Entry) -> Option<ContentKey<'_>> {
    match e {
        Entry::File(m) => Some(ContentKey::File(m.digest)),
        Entry::Symlink { target } => Some(ContentKey::Symlink(target)),
        Entry::Dir { .. } => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
// Panicking on a malformed fixture is what a test should do.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::digest::Hash;
    use crate::entry::{Entry, FileMeta, Timestamp};
    use crate::path::RelPath;
    use crate::reconcile::Action;

    fn id(marker: u8, dev: u64, ino: u64) -> RootId {
        RootId {
            marker: [marker; 16],
            dev,
            ino,
        }
    }

    #[test]
    fn check_root_table() {
        let replaced = |detail: &str| {
            Err(HaltReason::RootReplaced {
                side: Side::Guest,
                detail: detail.to_string(),
            })
        };
        let m1 = "01".repeat(16);
        let m2 = "02".repeat(16);
        type Row = (
            &'static str,
            Option<RootId>,
            Option<RootId>,
            Result<(), HaltReason>,
        );
        let cases: Vec<Row> = vec![
            ("first sync, no marker yet", None, None, Ok(())),
            ("first sync, marker seen", None, Some(id(1, 5, 7)), Ok(())),
            ("same root", Some(id(1, 5, 7)), Some(id(1, 5, 7)), Ok(())),
            (
                "marker gone",
                Some(id(1, 5, 7)),
                None,
                replaced("the root identity marker is gone"),
            ),
            (
                "foreign marker",
                Some(id(1, 5, 7)),
                Some(id(2, 5, 7)),
                replaced(&format!("marker {m1} is now {m2}")),
            ),
            (
                "other device (remounted elsewhere)",
                Some(id(1, 5, 7)),
                Some(id(1, 6, 7)),
                replaced("device 5 is now 6"),
            ),
            (
                "other inode (directory recreated)",
                Some(id(1, 5, 7)),
                Some(id(1, 5, 8)),
                replaced("inode 7 is now 8"),
            ),
            (
                "everything changed",
                Some(id(1, 5, 7)),
                Some(id(2, 6, 8)),
                replaced(&format!(
                    "marker {m1} is now {m2}, device 5 is now 6, inode 7 is now 8"
                )),
            ),
        ];
        for (name, stored, seen, want) in cases {
            assert_eq!(check_root(Side::Guest, stored, seen), want, "{name}");
        }
    }

    fn snapshot(n: usize) -> Snapshot {
        (0..n)
            .map(|i| {
                let path = RelPath::from_bytes(format!("f{i:05}").as_bytes()).unwrap();
                let meta = FileMeta {
                    size: 1,
                    mode: 0o644,
                    mtime: Timestamp::new(1, 0),
                    digest: Hash([1; 32]),
                };
                (path, Entry::File(meta))
            })
            .collect()
    }

    #[test]
    fn check_emptied_table() {
        let cases = [
            ("both empty (new share)", 0, 0, true),
            ("ancestor empty, side has entries", 0, 3, true),
            ("side still has entries", 3, 1, true),
            ("side emptied", 3, 0, false),
            ("one entry lost, none left", 1, 0, false),
        ];
        for (name, ancestor, scan, ok) in cases {
            let got = check_emptied(Side::Host, &snapshot(ancestor), &snapshot(scan));
            let want = if ok {
                Ok(())
            } else {
                Err(HaltReason::RootEmptied { side: Side::Host })
            };
            assert_eq!(got, want, "{name}");
        }
    }

    /// A file with content `i`.
    fn file(i: usize) -> Entry {
        let mut digest = [0u8; 32];
        digest[..8].copy_from_slice(&(i as u64).to_le_bytes());
        Entry::File(FileMeta {
            size: 1,
            mode: 0o644,
            mtime: Timestamp::default(),
            digest: Hash(digest),
        })
    }

    /// A plan with `host` file deletions on the host, `guest` on the guest, and one creation
    /// on each side (creations never count).
    fn plan(host: usize, guest: usize) -> Plan {
        let action = |i: usize, target: Side, new: Option<Entry>| Action {
            path: RelPath::from_bytes(format!("p{i:05}").as_bytes()).unwrap(),
            target,
            expected: Some(file(i)),
            new,
            save_loser: false,
        };
        let dir = Some(Entry::Dir { mode: 0o700 });
        let mut actions: Vec<Action> = (0..host).map(|i| action(i, Side::Host, None)).collect();
        actions.extend((0..guest).map(|i| action(i, Side::Guest, None)));
        actions.push(action(99_998, Side::Host, dir.clone()));
        actions.push(action(99_999, Side::Guest, dir));
        Plan {
            actions,
            ..Plan::default()
        }
    }

    #[test]
    fn check_deletions_table() {
        let default = DeletionLimit::default();
        let strict = DeletionLimit {
            max_fraction: 0.3,
            min_entries: 1,
        };
        let nan = DeletionLimit {
            max_fraction: f64::NAN,
            min_entries: 1,
        };
        let mass = |side, deletions, entries| {
            Err(HaltReason::MassDeletion {
                side,
                deletions,
                entries,
            })
        };
        // (name, limit, ancestor entries, host deletions, guest deletions, result)
        type Row = (
            &'static str,
            DeletionLimit,
            usize,
            usize,
            usize,
            Result<(), HaltReason>,
        );
        #[rustfmt::skip]
        let cases: Vec<Row> = vec![
            ("no deletions", default, 1000, 0, 0, Ok(())),
            ("half exactly is allowed", default, 1000, 500, 0, Ok(())),
            ("just over half halts", default, 1000, 501, 0, mass(Side::Host, 501, 1000)),
            ("guest deletes everything", default, 1000, 0, 1000, mass(Side::Guest, 1000, 1000)),
            ("small share never halts", default, 60, 0, 60, Ok(())),
            ("99 deletions are under min_entries", default, 120, 99, 0, Ok(())),
            ("100 deletions reach min_entries", default, 120, 100, 0, mass(Side::Host, 100, 120)),
            ("each side judged alone", default, 1000, 400, 400, Ok(())),
            ("host reported first", default, 200, 150, 150, mass(Side::Host, 150, 200)),
            ("empty ancestor, big one-way wipe", default, 0, 0, 100, mass(Side::Guest, 100, 0)),
            ("empty ancestor, few deletions", default, 0, 0, 99, Ok(())),
            ("strict limit: 30%", strict, 10, 3, 0, Ok(())),
            ("strict limit: 40%", strict, 10, 4, 0, mass(Side::Host, 4, 10)),
            ("NaN fraction halts", nan, 10, 1, 0, mass(Side::Host, 1, 10)),
            ("NaN fraction, nothing deleted", nan, 10, 0, 0, Ok(())),
        ];
        for (name, limit, entries, host, guest, want) in cases {
            let got = check_deletions(&plan(host, guest), &snapshot(entries), &limit);
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn moves_and_directories_are_not_losses() {
        let limit = DeletionLimit {
            max_fraction: 0.5,
            min_entries: 1,
        };
        // Every file of a 200-entry share moves to a new name, and its directory goes.
        let mut actions = Vec::new();
        for i in 0..200 {
            let at = |name: String| RelPath::from_bytes(name.as_bytes()).unwrap();
            actions.push(Action {
                path: at(format!("old/f{i}")),
                target: Side::Guest,
                expected: Some(file(i)),
                new: None,
                save_loser: false,
            });
            actions.push(Action {
                path: at(format!("new/f{i}")),
                target: Side::Guest,
                expected: None,
                new: Some(file(i)),
                save_loser: false,
            });
        }
        actions.push(Action {
            path: RelPath::from_bytes(b"old").unwrap(),
            target: Side::Guest,
            expected: Some(Entry::Dir { mode: 0o755 }),
            new: None,
            save_loser: false,
        });
        let plan = Plan {
            actions,
            ..Plan::default()
        };
        assert_eq!(check_deletions(&plan, &snapshot(201), &limit), Ok(()));
    }

    #[test]
    fn display_and_codes() {
        let cases = [
            (
                HaltReason::RootMissing {
                    side: Side::Guest,
                    detail: "/srv/share: no such file\n\x1b[2J".into(),
                },
                "root-missing",
                "guest share root is missing: /srv/share: no such file\\x0a\\x1b[2J",
            ),
            (
                HaltReason::RootReplaced {
                    side: Side::Host,
                    detail: "inode 7 is now 8".into(),
                },
                "root-replaced",
                "host share root was replaced: inode 7 is now 8",
            ),
            (
                HaltReason::RootEmptied { side: Side::Host },
                "root-emptied",
                "host share root is empty although the last sync left entries in it",
            ),
            (
                HaltReason::MassDeletion {
                    side: Side::Guest,
                    deletions: 700,
                    entries: 1000,
                },
                "mass-deletion",
                "this cycle would delete 700 of 1000 synced entries on the guest",
            ),
            (
                HaltReason::GuestRolledBack {
                    guest: Some(3),
                    host: 9,
                },
                "guest-rolled-back",
                "the guest share went back in time (a snapshot revert?): it holds generation 3, \
                 the host synced generation 9 with it; nothing was changed on the host",
            ),
            (
                HaltReason::GuestRolledBack {
                    guest: None,
                    host: 9,
                },
                "guest-rolled-back",
                "the guest share went back in time (a snapshot revert?): it holds no generation, \
                 the host synced generation 9 with it; nothing was changed on the host",
            ),
        ];
        for (reason, code, text) in cases {
            assert_eq!(reason.code(), code);
            assert_eq!(reason.to_string(), text);
            assert!(!reason.to_string().contains('\n'));
        }
    }
}
