//! What one session has told the host about a share's entries, kept by the guest's server:
//!
//! - the last full listing it sent, with its token: the next full scan travels as the
//!   difference against it (`vmsync_protocol::listing`);
//! - the entries targeted scans reported since.
//!
//! A targeted scan's answer carries manifests to save the host a round trip, but only of files
//! whose entry the host has not heard yet: those are the files that changed on this side. A
//! file whose entry the host already has needs no manifest from here (its ancestor has it, or the
//! host asked for it when it first heard the entry); sending them anyway made every targeted
//! scan of a directory carry the manifests of all its files. A manifest left out costs nothing
//! but speed: the host asks for any it lacks with `Manifests`.

use std::collections::HashMap;
use vmsync_core::{Entry, RelPath};
use vmsync_protocol::listing::{entry_digest, pack_digests, Packed};

/// A full listing sent: its token and entries, sorted by path.
pub(super) type Listing = (u64, Vec<(RelPath, Entry)>);

/// The last full listing sent in this session, kept: its token, and a digest of each entry.
pub(super) type Kept = (u64, Packed);

/// At most this many entries from targeted scans are remembered between two full scans (about
/// 150 bytes each); past it the memory starts afresh, which only means some manifests are sent
/// again. Full scans are rare in a live session, so this bound is what holds it.
const HEARD_MAX: usize = 4096;
/// Forgetting the paths a targeted scan no longer found costs scope × remembered comparisons;
/// past this many, everything is forgotten instead.
const PRUNE_WORK_MAX: usize = 1 << 20;

/// One share's memory within one session (see the module doc).
#[derive(Debug, Default)]
pub(super) struct Told {
    listing: Option<Kept>,
    /// Entries reported by targeted scans since the last full listing.
    heard: HashMap<RelPath, Entry>,
}

impl Told {
    /// The last full listing, taken: a full scan replaces it (or, if it fails, leaves none).
    pub(super) fn take_listing(&mut self) -> Option<Kept> {
        self.heard.clear();
        self.listing.take()
    }

    /// A full listing was sent: it is what the host knows now.
    pub(super) fn listed(&mut self, (token, entries): Listing) {
        self.heard.clear();
        // A listing that cannot be packed is not kept: the next one is sent whole.
        self.listing = pack_digests(&entries).map(|packed| (token, packed));
    }

    /// Whether the host has already been told that `path` is `entry`.
    pub(super) fn knows(&self, path: &RelPath, entry: &Entry) -> bool {
        if let Some(heard) = self.heard.get(path) {
            return heard == entry;
        }
        let Some((_, packed)) = &self.listing else {
            return false;
        };
        let digest = packed.get(path.as_bytes());
        digest.is_some() && digest == entry_digest(entry).as_ref().map(|d| d.as_slice())
    }

    /// A targeted scan of `scope` reported these entries (sorted by path): what it did not
    /// find under its scope is gone, and forgotten.
    pub(super) fn heard(&mut self, scope: &[RelPath], entries: &[(RelPath, Entry)]) {
        if scope.len().saturating_mul(self.heard.len()) > PRUNE_WORK_MAX {
            self.heard.clear();
        }
        let reported = |path: &RelPath| entries.binary_search_by(|(p, _)| p.cmp(path)).is_ok();
        self.heard.retain(|path, _| {
            reported(path) || !scope.iter().any(|s| s == path || s.is_ancestor_of(path))
        });
        if self.heard.len() + entries.len() > HEARD_MAX {
            self.heard.clear();
            if entries.len() > HEARD_MAX {
                return;
            }
        }
        for (path, entry) in entries {
            self.heard.insert(path.clone(), entry.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmsync_core::testing::file_entry as file;

    fn path(p: &str) -> RelPath {
        RelPath::from_bytes(p.as_bytes()).unwrap()
    }

    #[test]
    fn nothing_is_known_before_a_listing() {
        let told = Told::default();
        assert!(!told.knows(&path("a"), &file(1)));
    }

    #[test]
    fn the_listing_and_later_targeted_scans_are_known_entry_for_entry() {
        let mut told = Told::default();
        told.listed((1, vec![(path("a"), file(1)), (path("b/c"), file(2))]));
        assert!(told.knows(&path("a"), &file(1)));
        assert!(told.knows(&path("b/c"), &file(2)));
        // Another size is another entry; an unlisted path is unknown.
        assert!(!told.knows(&path("a"), &file(3)));
        assert!(!told.knows(&path("b"), &file(2)));

        // A targeted scan's entry overrides the listing's, either way.
        told.heard(
            &[path("a"), path("new")],
            &[(path("a"), file(3)), (path("new"), file(4))],
        );
        assert!(told.knows(&path("a"), &file(3)));
        assert!(!told.knows(&path("a"), &file(1)));
        assert!(told.knows(&path("new"), &file(4)));
        assert!(told.knows(&path("b/c"), &file(2)));
    }

    #[test]
    fn a_full_scan_forgets_what_targeted_scans_said() {
        let mut told = Told::default();
        told.listed((1, vec![(path("a"), file(1))]));
        told.heard(&[path("a")], &[(path("a"), file(2))]);
        let (token, _) = told.take_listing().unwrap();
        assert_eq!(token, 1);
        // Between taking and replacing the listing, nothing is known.
        assert!(!told.knows(&path("a"), &file(1)));
        assert!(!told.knows(&path("a"), &file(2)));
        told.listed((2, vec![(path("a"), file(1))]));
        assert!(told.knows(&path("a"), &file(1)));
        assert!(!told.knows(&path("a"), &file(2)));
    }

    #[test]
    fn the_memory_of_targeted_scans_is_bounded() {
        let mut told = Told::default();
        let mut many: Vec<_> = (0..HEARD_MAX)
            .map(|i| (path(&format!("d/f{i}")), file(1)))
            .collect();
        many.sort_by(|a, b| a.0.cmp(&b.0));
        told.heard(&[path("d")], &many);
        assert!(told.knows(&path("d/f0"), &file(1)));
        told.heard(&[path("one-more")], &[(path("one-more"), file(1))]);
        assert!(told.heard.len() <= HEARD_MAX);
        assert!(!told.knows(&path("d/f0"), &file(1)));
        assert!(told.knows(&path("one-more"), &file(1)));
    }

    #[test]
    fn what_a_targeted_scan_no_longer_finds_is_forgotten() {
        let mut told = Told::default();
        told.heard(
            &[path("d"), path("e")],
            &[
                (path("d/a"), file(1)),
                (path("d/b"), file(2)),
                (path("e"), file(3)),
            ],
        );
        // x was outside the next scan's scope; d/b and e are gone.
        told.heard(&[path("x")], &[(path("x"), file(4))]);
        told.heard(&[path("d"), path("e")], &[(path("d/a"), file(1))]);
        assert_eq!(told.heard.len(), 2, "{:?}", told.heard);
        assert!(told.knows(&path("d/a"), &file(1)));
        assert!(told.knows(&path("x"), &file(4)));
    }
}
