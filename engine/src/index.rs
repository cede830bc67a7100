//! The in-memory file index of one share side: what each regular file was when last hashed
//! (so unchanged files are not re-read) and where each chunk can be found locally (so a
//! receiver never asks the wire for data it already has: renames, copies, reverts, branch
//! switches). Persisted through [`crate::state`]; always rebuildable by a full rescan.

use crate::root::Stat;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use vmsync_core::{ChunkRef, FileMeta, Hash, Manifest, RelPath, Timestamp};

/// The parts of `stat` that change whenever a file's content may have: if all match, the
/// cached digest is trusted; if any differs, the file is re-hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
}

impl Identity {
    pub fn of(stat: &Stat) -> Identity {
        Identity {
            dev: stat.dev,
            ino: stat.ino,
            size: stat.size,
            mtime: stat.mtime,
            ctime: stat.ctime,
        }
    }
}

/// One indexed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRecord {
    pub identity: Identity,
    pub meta: FileMeta,
    /// (hash, length) per chunk; offsets are the running sum.
    pub chunks: Vec<(Hash, u32)>,
}

impl IndexRecord {
    pub fn new(identity: Identity, meta: FileMeta, manifest: &Manifest) -> IndexRecord {
        IndexRecord {
            identity,
            meta,
            chunks: manifest.chunks.iter().map(|c| (c.hash, c.len)).collect(),
        }
    }

    pub fn manifest(&self) -> Manifest {
        let mut offset = 0u64;
        let chunks = self
            .chunks
            .iter()
            .map(|&(hash, len)| {
                let c = ChunkRef { hash, offset, len };
                offset += u64::from(len);
                c
            })
            .collect();
        Manifest {
            chunks,
            links: Vec::new(),
        }
    }
}

/// Where a chunk can be read locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkLocation {
    pub path: RelPath,
    pub offset: u64,
    pub len: u32,
}

/// How many files beyond the first the index remembers for one chunk. A chunk held by more
/// files than this is still found as long as one remembered holder stays; losing them all only
/// costs a transfer until the chunk's next holder is re-indexed.
const MAX_SPARE_HOLDERS: usize = 7;

#[derive(Debug, Default)]
pub struct FileIndex {
    /// Ordered, so the files beneath a path are a range (see [`FileIndex::paths_under`]).
    files: BTreeMap<RelPath, IndexRecord>,
    /// The first holder of each chunk: the place [`FileIndex::locate`] answers.
    chunks: HashMap<Hash, ChunkLocation>,
    /// Further files holding the same chunk, so that removing the first holder (a rename
    /// indexes the new path before it drops the old one) leaves the chunk locatable.
    spares: HashMap<Hash, Vec<ChunkLocation>>,
    /// The sum of the indexed files' sizes, kept as they come and go.
    bytes: u64,
}

impl FileIndex {
    pub fn from_records(records: impl IntoIterator<Item = (RelPath, IndexRecord)>) -> FileIndex {
        let mut index = FileIndex::default();
        for (path, record) in records {
            index.insert(path, record);
        }
        index
    }

    pub fn get(&self, path: &RelPath) -> Option<&IndexRecord> {
        self.files.get(path)
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The total size of the indexed files, without walking them.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn records(&self) -> impl Iterator<Item = &IndexRecord> {
        self.files.values()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&RelPath, &IndexRecord)> {
        self.files.iter()
    }

    pub fn paths(&self) -> impl Iterator<Item = &RelPath> {
        self.files.keys()
    }

    /// Indexed files at `path` or beneath it, without looking at the others.
    pub fn paths_under<'a>(&'a self, path: &'a RelPath) -> impl Iterator<Item = &'a RelPath> {
        vmsync_core::path::subtree(&self.files, path).map(|(p, _)| p)
    }

    /// A place to read `hash` from, if any indexed file had it when hashed. Callers verify the
    /// bytes they read: the file may have changed since.
    pub fn locate(&self, hash: &Hash) -> Option<&ChunkLocation> {
        self.chunks.get(hash)
    }

    pub fn insert(&mut self, path: RelPath, record: IndexRecord) {
        self.remove(&path);
        let mut offset = 0u64;
        for &(hash, len) in &record.chunks {
            let here = ChunkLocation {
                path: path.clone(),
                offset,
                len,
            };
            offset += u64::from(len);
            match self.chunks.get(&hash) {
                None => {
                    self.chunks.insert(hash, here);
                }
                // A chunk repeated within this file: its first place is enough.
                Some(first) if first.path == path => {}
                Some(_) => {
                    let spares = self.spares.entry(hash).or_default();
                    if spares.len() < MAX_SPARE_HOLDERS && spares.iter().all(|s| s.path != path) {
                        spares.push(here);
                    }
                }
            }
        }
        self.bytes = self.bytes.saturating_add(record.meta.size);
        self.files.insert(path, record);
    }

    pub fn remove(&mut self, path: &RelPath) -> Option<IndexRecord> {
        let old = self.files.remove(path)?;
        self.bytes = self.bytes.saturating_sub(old.meta.size);
        // Drop the chunk locations that pointed into this file; a spare holder, if any, takes
        // the first one's place.
        for (hash, _) in &old.chunks {
            if self.chunks.get(hash).is_some_and(|loc| &loc.path == path) {
                match self.spares.get_mut(hash).and_then(Vec::pop) {
                    Some(next) => {
                        self.chunks.insert(*hash, next);
                    }
                    None => {
                        self.chunks.remove(hash);
                    }
                }
            } else if let Some(spares) = self.spares.get_mut(hash) {
                spares.retain(|s| &s.path != path);
            }
            if self.spares.get(hash).is_some_and(Vec::is_empty) {
                self.spares.remove(hash);
            }
        }
        Some(old)
    }
}

/// A record of a file made of `hashes` (each chunk's id byte and length), for tests.
#[cfg(test)]
pub(crate) fn test_record(hashes: &[(u8, u32)]) -> IndexRecord {
    let chunks: Vec<(Hash, u32)> = hashes.iter().map(|&(b, l)| (Hash([b; 32]), l)).collect();
    let size = chunks.iter().map(|c| u64::from(c.1)).sum();
    IndexRecord {
        identity: Identity {
            dev: 1,
            ino: 2,
            size,
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
        },
        meta: FileMeta {
            size,
            mode: 0o644,
            mtime: Timestamp::default(),
            digest: Hash([0; 32]),
        },
        chunks,
    }
}

#[cfg(test)]
mod tests {
    use super::test_record as rec;
    use super::*;

    #[test]
    fn locates_chunks_and_forgets_removed_files() {
        let a = RelPath::from_bytes(b"a").unwrap();
        let b = RelPath::from_bytes(b"b").unwrap();
        let mut idx = FileIndex::default();
        idx.insert(a.clone(), rec(&[(1, 10), (2, 20)]));
        idx.insert(b.clone(), rec(&[(3, 5)]));
        assert_eq!(
            idx.locate(&Hash([2; 32])),
            Some(&ChunkLocation {
                path: a.clone(),
                offset: 10,
                len: 20
            })
        );
        assert_eq!(idx.get(&a).unwrap().manifest().size(), 30);
        idx.remove(&a);
        assert!(idx.locate(&Hash([2; 32])).is_none());
        assert!(idx.locate(&Hash([3; 32])).is_some());
    }

    #[test]
    fn a_chunk_stays_locatable_while_any_holder_is_left() {
        let [a, b, c] = [b"a", b"b", b"c"].map(|n| RelPath::from_bytes(n).unwrap());
        let mut idx = FileIndex::default();
        // A rename as a transition records it: the new path first, then the old one goes.
        idx.insert(a.clone(), rec(&[(1, 10), (2, 20)]));
        idx.insert(b.clone(), rec(&[(1, 10), (2, 20)]));
        idx.remove(&a);
        assert_eq!(idx.locate(&Hash([2; 32])).map(|l| &l.path), Some(&b));
        idx.insert(c.clone(), rec(&[(9, 5), (2, 20)]));
        idx.remove(&b);
        let loc = idx.locate(&Hash([2; 32])).unwrap();
        assert_eq!((&loc.path, loc.offset), (&c, 5));
        idx.remove(&c);
        assert!(idx.locate(&Hash([2; 32])).is_none());
        assert!(idx.spares.is_empty());
    }

    proptest::proptest! {
        /// Whatever files come and go, a chunk that a remaining file holds is located in a
        /// file that holds it, at that chunk's place; nothing is located that no file holds.
        #[test]
        fn locations_follow_the_files_that_hold_them(
            ops in proptest::collection::vec(
                (0u8..5, proptest::option::of(proptest::collection::vec(0u8..6, 1..5))),
                1..60,
            ),
        ) {
            let mut idx = FileIndex::default();
            for (file, chunks) in ops {
                let path = RelPath::from_bytes(&[b'a' + file]).unwrap();
                match chunks {
                    Some(c) => {
                        let hashes: Vec<(u8, u32)> = c.iter().map(|&h| (h, 7)).collect();
                        idx.insert(path, rec(&hashes));
                    }
                    None => {
                        idx.remove(&path);
                    }
                }
            }
            for h in 0u8..6 {
                let hash = Hash([h; 32]);
                let held = idx.records().any(|r| r.chunks.iter().any(|c| c.0 == hash));
                match idx.locate(&hash) {
                    None => proptest::prop_assert!(!held),
                    Some(loc) => {
                        let rec = idx.get(&loc.path).unwrap();
                        let at = (loc.offset / 7) as usize;
                        proptest::prop_assert_eq!(rec.chunks[at].0, hash);
                    }
                }
            }
        }
    }
}
