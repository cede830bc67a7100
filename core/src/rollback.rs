//! Share generations and the merge after a guest went back in time (a VM snapshot revert).
//! Pure functions; the controller stores the generation and asks the guest to keep it (see
//! `docs/safety.md`, "Snapshot reverts").
//!
//! The rules:
//! - The host advances a share's *generation* `G` each time it records a new ancestor, after
//!   the guest has durably noted `G + 1` beside its files. A guest that reports less than `G`
//!   (or none, while its root marker is there and `G > 0`) is older than the state the
//!   ancestor relies on: [`check_generation`] halts the share, nothing is applied.
//! - After `resume`, the next full cycle reconciles against [`rollback_ancestor`] instead of
//!   the ancestor: a substitute under which nothing is deleted on either side, the host's
//!   versions win over the guest's older ones, and what the guest really changed since goes
//!   through the share's conflict policy.
//!
//! What it must not do: read a clock, or treat a guest's mtime as proof of anything but "not
//! newer than what both sides once agreed on".

use crate::entry::{Entry, Snapshot};
use crate::safety::HaltReason;

/// What the host should do with the generation a guest's scan reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerationCheck {
    /// The guest holds the host's generation (or a fresh share has none yet).
    Current,
    /// The guest holds a newer one: the host noted it on the guest and died before recording
    /// it. Record it as the share's generation.
    Adopt(u64),
}

/// Compares the generation a guest's scan reported (`seen`) with the host's (`stored`).
/// `has_marker`: the guest's root has its identity marker (a share never synced has neither).
pub fn check_generation(
    stored: u64,
    seen: Option<u64>,
    has_marker: bool,
) -> Result<GenerationCheck, HaltReason> {
    match seen {
        Some(g) if g > stored => Ok(GenerationCheck::Adopt(g)),
        Some(g) if g < stored => Err(HaltReason::GuestRolledBack {
            guest: Some(g),
            host: stored,
        }),
        Some(_) => Ok(GenerationCheck::Current),
        None if stored > 0 && has_marker => Err(HaltReason::GuestRolledBack {
            guest: None,
            host: stored,
        }),
        None => Ok(GenerationCheck::Current),
    }
}

/// The substitute ancestor for the merge after a rollback, path by path (a path absent from
/// all three is absent here too):
///
/// | guest | host | substitute |
/// |---|---|---|
/// | absent | any | absent: the host's version is created on the guest |
/// | any | absent | absent: the guest's version is created on the host (add-only) |
/// | equal to the host's | | the guest's (nothing to do) |
/// | older: equal to the ancestor's, or a file (or directory) no newer than it | | the guest's: the host's version replaces it |
/// | anything else | | absent: both look created, the conflict policy decides |
///
/// "No newer" for a file is an mtime at most the ancestor's file mtime at that path; a
/// directory has no mtime, so only its equality with the ancestor counts.
pub fn rollback_ancestor(ancestor: &Snapshot, host: &Snapshot, guest: &Snapshot) -> Snapshot {
    let mut out = Snapshot::new();
    for (path, g) in guest {
        let Some(h) = host.get(path) else { continue };
        let a = ancestor.get(path);
        if g == h || is_older(g, a) {
            out.insert(path.clone(), g.clone());
        }
    }
    out
}

/// The guest's entry `g` is a version from before the ancestor's `a` (or that very one).
fn is_older(g: &Entry, a: Option<&Entry>) -> bool {
    let Some(a) = a else { return false };
    if g == a {
        return true;
    }
    match (g, a) {
        (Entry::File(g), Entry::File(a)) => g.mtime <= a.mtime,
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn check_generation_table() {
        let back = |guest, host| Err(HaltReason::GuestRolledBack { guest, host });
        type Row = (
            &'static str,
            u64,
            Option<u64>,
            bool,
            Result<GenerationCheck, HaltReason>,
        );
        #[rustfmt::skip]
        let cases: Vec<Row> = vec![
            ("new share, nothing yet", 0, None, false, Ok(GenerationCheck::Current)),
            ("new share, marker just made", 0, None, true, Ok(GenerationCheck::Current)),
            ("an older agent's share, first mark to come", 0, None, true, Ok(GenerationCheck::Current)),
            ("in step", 7, Some(7), true, Ok(GenerationCheck::Current)),
            ("host died between mark and commit", 7, Some(8), true, Ok(GenerationCheck::Adopt(8))),
            ("guest reverted one step", 7, Some(6), true, back(Some(6), 7)),
            ("guest reverted to its first sync", 7, Some(1), true, back(Some(1), 7)),
            ("generation file gone, marker kept", 7, None, true, back(None, 7)),
            ("no marker: the root checks decide", 7, None, false, Ok(GenerationCheck::Current)),
            ("zero reported where one is expected", 1, Some(0), true, back(Some(0), 1)),
        ];
        for (name, stored, seen, marker, want) in cases {
            assert_eq!(check_generation(stored, seen, marker), want, "{name}");
        }
    }
}
