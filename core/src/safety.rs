//! Safety checks that halt a share instead of letting a cycle propagate deletions (docs/security.md
//! rule 19): a root that is missing, was replaced or was emptied, and a plan that would delete
//! too much at once. Pure functions over what the scans reported and what reconcile planned;
//! the controller decides when to call them and records the halt until `resume`.

use crate::endpoint::RootId;
use crate::entry::Snapshot;
use crate::path::escape_bytes;
use crate::reconcile::Side;
use serde::{Deserialize, Serialize};
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
    /// The other side's changes deleted or would delete more of this side's files and symlinks
    /// within a minute than the configured limit allows (see [`crate::deletions`]).
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
// for every log line and status output that prints a halt (docs/security.md rule 14).
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
                "the {}'s changes would delete {deletions} of {entries} synced files and \
                 symlinks on the {} within a minute",
                side.other().as_str(),
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
    let Some(seen) = seen.filter(RootId::has_marker) else {
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

/// How many of a side's files and symlinks the other side's changes may delete within the
/// deletion window before the share halts (see [`crate::deletions`]).
///
/// Both bounds must be crossed to halt. The fraction is generous because ordinary work
/// deletes a lot at once (`git checkout` of another branch); build outputs and caches are
/// exempt by path instead. `min_entries` keeps small shares from halting when a few deletions
/// are a large fraction of them (deleting 3 of 4 files is not a disaster worth a `resume`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DeletionLimit {
    /// Largest fraction of its countable entries one side may lose in the window, in
    /// `0.0..=1.0`.
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
                "marker file removed",
                Some(id(1, 5, 7)),
                Some(id(0, 5, 7)),
                replaced("the root identity marker is gone"),
            ),
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
                "the host's changes would delete 700 of 1000 synced files and symlinks on the \
                 guest within a minute",
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
