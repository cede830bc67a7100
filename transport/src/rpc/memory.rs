//! What the host's side of a session remembers about one share's big files on the guest: the
//! manifest the guest holds at a path, as far as this session has seen one cross (staged and then committed
//! by a transition, or listed by the guest in a `Manifests` answer). A later `Stage` of the
//! same path can then carry the new manifest as edits against that one
//! (`vmsync_core::edits`), so a small change to a big file does not resend its whole manifest.
//!
//! This is a hint, never trusted: the edits name the old file's size and digest, the guest
//! rebuilds from its own index and checks the result against the new file's digest, and answers
//! `BaseUnknown` when anything does not fit, after which the host sends the manifest in full.
//! Bounded: only manifests of [`MIN_REMEMBERED_CHUNKS`] or more, at most
//! [`MAX_REMEMBERED_REFS`] references in all (about 36 bytes each).

use std::collections::HashMap;
use std::sync::Arc;
use vmsync_core::edits;
use vmsync_core::{Hash, Manifest, RelPath};

/// Smaller manifests cost little to send whole (about 40 bytes a chunk).
pub const MIN_REMEMBERED_CHUNKS: usize = 64;
/// Most chunk references remembered per share: 512 Ki, about 18 MiB (8 GiB of big files).
pub const MAX_REMEMBERED_REFS: usize = 512 * 1024;

/// A manifest the guest holds (or will, once staged and committed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    pub size: u64,
    pub digest: Hash,
    pub refs: Vec<(Hash, u32)>,
}

impl Remembered {
    pub fn of(manifest: &Manifest) -> Remembered {
        Remembered {
            size: manifest.size(),
            digest: manifest.digest(),
            refs: edits::refs(manifest),
        }
    }
}

type Key = RelPath;

#[derive(Debug, Default)]
pub struct ManifestMemory {
    /// What the guest holds at a path.
    held: HashMap<Key, Arc<Remembered>>,
    /// Staged on the guest, not yet committed.
    pending: HashMap<Key, Arc<Remembered>>,
    refs: usize,
}

impl ManifestMemory {
    fn make_room(&mut self, n: usize) -> bool {
        if n > MAX_REMEMBERED_REFS {
            return false;
        }
        while self.refs + n > MAX_REMEMBERED_REFS {
            let Some(key) = self
                .pending
                .keys()
                .next()
                .or_else(|| self.held.keys().next())
                .cloned()
            else {
                break;
            };
            self.forget(&key);
        }
        true
    }

    fn drop_entry(&mut self, removed: Option<Arc<Remembered>>) {
        if let Some(r) = removed {
            self.refs = self.refs.saturating_sub(r.refs.len());
        }
    }

    fn forget(&mut self, key: &Key) {
        let held = self.held.remove(key);
        self.drop_entry(held);
        let pending = self.pending.remove(key);
        self.drop_entry(pending);
    }

    /// The manifest the guest holds at `path`, if remembered.
    pub fn held(&self, path: &RelPath) -> Option<Arc<Remembered>> {
        self.held.get(path).cloned()
    }

    /// The guest holds `manifest` at `path` (it said so in a `Manifests` answer).
    pub fn hold(&mut self, path: &RelPath, manifest: &Manifest) {
        let key = path.clone();
        let old = self.held.remove(&key);
        self.drop_entry(old);
        if manifest.chunks.len() < MIN_REMEMBERED_CHUNKS || !self.make_room(manifest.chunks.len()) {
            return;
        }
        self.refs += manifest.chunks.len();
        self.held.insert(key, Arc::new(Remembered::of(manifest)));
    }

    /// `manifest` was staged at `path`; it is held once a transition commits it.
    pub fn staged(&mut self, path: &RelPath, manifest: &Manifest) {
        let key = path.clone();
        let old = self.pending.remove(&key);
        self.drop_entry(old);
        if manifest.chunks.len() < MIN_REMEMBERED_CHUNKS || !self.make_room(manifest.chunks.len()) {
            return;
        }
        self.refs += manifest.chunks.len();
        self.pending.insert(key, Arc::new(Remembered::of(manifest)));
    }

    /// A transition applied a change at `path`: it now holds a file of `digest`, or (`None`)
    /// something that is not a file, or nothing.
    pub fn applied(&mut self, path: &RelPath, digest: Option<Hash>) {
        let key = path.clone();
        let pending = self.pending.remove(&key);
        match (pending, digest) {
            (Some(p), Some(d)) if p.digest == d => {
                let old = self.held.insert(key, p);
                self.drop_entry(old);
            }
            (p, d) => {
                self.drop_entry(p);
                // A metadata-only change keeps the content it had.
                if d.is_none() || self.held.get(&key).is_none_or(|h| Some(h.digest) != d) {
                    let old = self.held.remove(&key);
                    self.drop_entry(old);
                }
            }
        }
    }

    #[cfg(test)]
    fn total_refs(&self) -> usize {
        self.refs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmsync_core::ChunkRef;

    fn manifest(seed: u8, n: usize) -> Manifest {
        let chunks = (0..n)
            .map(|i| ChunkRef {
                hash: Hash([seed ^ (i as u8); 32]),
                offset: i as u64 * 100,
                len: 100,
            })
            .collect();
        Manifest {
            chunks,
            links: Vec::new(),
        }
    }

    fn p(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes()).unwrap()
    }

    #[test]
    fn a_committed_stage_is_held_until_something_else_lands_there() {
        let mut m = ManifestMemory::default();
        let a = manifest(1, 100);
        m.staged(&p("f"), &a);
        assert!(m.held(&p("f")).is_none(), "not committed yet");
        m.applied(&p("f"), Some(a.digest()));
        assert_eq!(m.held(&p("f")).unwrap().digest, a.digest());
        // Metadata only: still the same content.
        m.applied(&p("f"), Some(a.digest()));
        assert!(m.held(&p("f")).is_some());
        // Another path: nothing.
        assert!(m.held(&p("g")).is_none());
        // Deleted, or replaced by content this side never saw: forgotten.
        m.applied(&p("f"), None);
        assert!(m.held(&p("f")).is_none());
        m.hold(&p("f"), &a);
        m.applied(&p("f"), Some(Hash([9; 32])));
        assert!(m.held(&p("f")).is_none());
        assert_eq!(m.total_refs(), 0);
    }

    #[test]
    fn small_manifests_are_not_kept_and_the_total_is_bounded() {
        let mut m = ManifestMemory::default();
        m.hold(&p("small"), &manifest(1, MIN_REMEMBERED_CHUNKS - 1));
        assert!(m.held(&p("small")).is_none());
        let big = manifest(2, MAX_REMEMBERED_REFS / 2 + 1);
        m.hold(&p("a"), &big);
        m.hold(&p("b"), &big);
        assert!(m.total_refs() <= MAX_REMEMBERED_REFS);
        assert!(m.held(&p("b")).is_some());
        assert!(m.held(&p("a")).is_none(), "evicted to make room");
        m.hold(&p("huge"), &manifest(3, MAX_REMEMBERED_REFS + 1));
        assert!(m.held(&p("huge")).is_none());
    }
}
