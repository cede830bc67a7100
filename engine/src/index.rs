//! The file index of one share side: what each regular file was when last hashed (so
//! unchanged files are not re-read) and where each chunk can be found locally (so a receiver
//! never asks the wire for data it already has: renames, copies, reverts, branch switches).
//! Kept in the state database ([`crate::state`]); a cache, always rebuildable by a full rescan.

use crate::root::Stat;
use crate::state::{StateDb, StateError};
use redb::{AccessGuard as Guard, ReadOnlyTable, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::Arc;
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

/// One indexed file. Its fields are stored in this order, and `IndexReader::identity` reads
/// the first two alone.
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

/// The index table: path → postcard [`IndexRecord`].
type FilesTable = ReadOnlyTable<&'static [u8], &'static [u8]>;
/// The chunk table: chunk id followed by the path of a file holding it → (offset, length) of
/// its first place in that file. Every holder is listed, so a chunk stays locatable for as
/// long as any indexed file holds it.
type ChunksTable = ReadOnlyTable<&'static [u8], (u64, u32)>;

fn files_def(name: &str) -> TableDefinition<'_, &'static [u8], &'static [u8]> {
    TableDefinition::new(name)
}

fn chunks_def(name: &str) -> TableDefinition<'_, &'static [u8], (u64, u32)> {
    TableDefinition::new(name)
}

fn chunk_key(hash: &Hash, path: &RelPath) -> Vec<u8> {
    let mut key = Vec::with_capacity(32 + path.as_bytes().len());
    key.extend_from_slice(&hash.0);
    key.extend_from_slice(path.as_bytes());
    key
}

/// Each distinct chunk of `record` with its first offset, in file order.
fn first_places(record: &IndexRecord) -> Vec<(Hash, u64, u32)> {
    let mut seen = HashSet::with_capacity(record.chunks.len());
    let mut offset = 0u64;
    let mut out = Vec::with_capacity(record.chunks.len());
    for &(hash, len) in &record.chunks {
        if seen.insert(hash) {
            out.push((hash, offset, len));
        }
        offset += u64::from(len);
    }
    out
}

/// The file index of one share, kept in the state database and read from it where needed,
/// so that what an agent holds in memory does not grow with the share (docs/performance.md,
/// "Memory at scale"). Only the totals are kept here. A record that cannot be read counts
/// as absent: the file is hashed again.
pub struct FileIndex {
    db: Arc<StateDb>,
    files_table: String,
    chunks_table: String,
    files: u64,
    bytes: u64,
}

impl FileIndex {
    /// The index of `share` in `db`, its totals counted. A database written before the chunk
    /// table existed gets it built from the index.
    pub fn open(db: Arc<StateDb>, share: &str) -> Result<FileIndex, StateError> {
        let mut index = FileIndex {
            files_table: format!("index:{share}"),
            chunks_table: format!("chunks:{share}"),
            db,
            files: 0,
            bytes: 0,
        };
        let reader = index.reader();
        for (_, record) in reader.records() {
            index.files += 1;
            index.bytes = index.bytes.saturating_add(record.meta.size);
        }
        if reader.files.is_some() && reader.chunks.is_none() {
            index.build_chunks(&reader)?;
        }
        Ok(index)
    }

    fn build_chunks(&self, reader: &IndexReader) -> Result<(), StateError> {
        self.db.write_index(|txn| {
            let mut chunks = txn.open_table(chunks_def(&self.chunks_table))?;
            for (path, record) in reader.records() {
                for (hash, offset, len) in first_places(&record) {
                    chunks.insert(chunk_key(&hash, &path).as_slice(), (offset, len))?;
                }
            }
            Ok(())
        })
    }

    /// A consistent view of the index as it is now, for many lookups (a scan's).
    pub fn reader(&self) -> IndexReader {
        let open = || -> Result<IndexReader, redb::Error> {
            let txn = self.db.read()?;
            let files = match txn.open_table(files_def(&self.files_table)) {
                Ok(t) => Some(t),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(e.into()),
            };
            let chunks = match txn.open_table(chunks_def(&self.chunks_table)) {
                Ok(t) => Some(t),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(e.into()),
            };
            Ok(IndexReader { files, chunks })
        };
        open().unwrap_or_else(|e| {
            tracing::warn!("reading the file index: {e}; files are hashed again");
            IndexReader::default()
        })
    }

    pub fn get(&self, path: &RelPath) -> Option<IndexRecord> {
        self.reader().get(path)
    }

    /// A place to read `hash` from, if any indexed file had it when hashed. Callers verify the
    /// bytes they read: the file may have changed since.
    pub fn locate(&self, hash: &Hash) -> Option<ChunkLocation> {
        self.reader().locate(hash)
    }

    pub fn len(&self) -> u64 {
        self.files
    }

    pub fn is_empty(&self) -> bool {
        self.files == 0
    }

    /// The total size of the indexed files, without walking them.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Records changes in one transaction: `Some` indexes a file (replacing what was indexed
    /// at its path), `None` forgets one.
    pub fn apply<'a>(
        &mut self,
        changes: impl IntoIterator<Item = (&'a RelPath, Option<&'a IndexRecord>)>,
    ) -> Result<(), StateError> {
        let mut changes = changes.into_iter().peekable();
        if changes.peek().is_none() {
            // A live cycle's scans mostly find nothing new on one side: no transaction.
            return Ok(());
        }
        let (mut files, mut bytes) = (self.files, self.bytes);
        self.db.write_index(|txn| {
            let mut table = txn.open_table(files_def(&self.files_table))?;
            let mut chunks = txn.open_table(chunks_def(&self.chunks_table))?;
            for (path, record) in changes {
                let old = table
                    .get(path.as_bytes())?
                    .and_then(|v| postcard::from_bytes::<IndexRecord>(v.value()).ok());
                if let Some(old) = old {
                    files = files.saturating_sub(1);
                    bytes = bytes.saturating_sub(old.meta.size);
                    for (hash, _, _) in first_places(&old) {
                        chunks.remove(chunk_key(&hash, path).as_slice())?;
                    }
                }
                match record {
                    Some(record) => {
                        let value = postcard::to_allocvec(record).map_err(|source| {
                            StateError::Corrupt {
                                key: path.escaped(),
                                source,
                            }
                        })?;
                        table.insert(path.as_bytes(), value.as_slice())?;
                        for (hash, offset, len) in first_places(record) {
                            chunks.insert(chunk_key(&hash, path).as_slice(), (offset, len))?;
                        }
                        files += 1;
                        bytes = bytes.saturating_add(record.meta.size);
                    }
                    None => {
                        table.remove(path.as_bytes())?;
                    }
                }
            }
            Ok(())
        })?;
        (self.files, self.bytes) = (files, bytes);
        Ok(())
    }
}

/// A read transaction on the index: lookups see the index as it was when it began.
#[derive(Default)]
pub struct IndexReader {
    files: Option<FilesTable>,
    chunks: Option<ChunksTable>,
}

impl IndexReader {
    pub fn get(&self, path: &RelPath) -> Option<IndexRecord> {
        let value = self.files.as_ref()?.get(path.as_bytes()).ok()??;
        postcard::from_bytes(value.value()).ok()
    }

    /// The identity and metadata indexed for `path`, without its chunk list: what a scan
    /// needs to trust a file it has seen before.
    pub fn identity(&self, path: &RelPath) -> Option<(Identity, FileMeta)> {
        let value = self.files.as_ref()?.get(path.as_bytes()).ok()??;
        // A record starts with these two fields (see `IndexRecord`).
        postcard::take_from_bytes(value.value())
            .ok()
            .map(|(head, _)| head)
    }

    /// See [`FileIndex::locate`].
    pub fn locate(&self, hash: &Hash) -> Option<ChunkLocation> {
        let table = self.chunks.as_ref()?;
        let (key, value) = table.range(hash.0.as_slice()..).ok()?.next()?.ok()?;
        let path = key.value().strip_prefix(hash.0.as_slice())?;
        let (offset, len) = value.value();
        Some(ChunkLocation {
            path: RelPath::from_bytes(path).ok()?,
            offset,
            len,
        })
    }

    /// Every indexed file with its record, in path order.
    pub fn records(&self) -> impl Iterator<Item = (RelPath, IndexRecord)> + '_ {
        self.rows(..).filter_map(|(k, v)| {
            let path = RelPath::from_bytes(k.value()).ok()?;
            let record = postcard::from_bytes(v.value()).ok()?;
            Some((path, record))
        })
    }

    /// Every indexed file with its identity, in path order, without decoding chunk lists.
    pub fn identities(&self) -> impl Iterator<Item = (RelPath, Identity)> + '_ {
        self.rows(..).filter_map(|(k, v)| {
            let path = RelPath::from_bytes(k.value()).ok()?;
            let (identity, _) = postcard::take_from_bytes::<Identity>(v.value()).ok()?;
            Some((path, identity))
        })
    }

    /// Every indexed path, in order.
    pub fn paths(&self) -> impl Iterator<Item = RelPath> + '_ {
        self.rows(..)
            .filter_map(|(k, _)| RelPath::from_bytes(k.value()).ok())
    }

    /// The indexed paths at `path` or beneath it, in order, without looking at the others.
    pub fn paths_under(&self, path: &RelPath) -> Vec<RelPath> {
        if path.is_root() {
            return self.paths().collect();
        }
        let mut upper = path.as_bytes().to_vec();
        upper.push(b'0');
        self.rows(path.as_bytes()..upper.as_slice())
            .filter_map(|(k, _)| RelPath::from_bytes(k.value()).ok())
            .filter(|p| p == path || path.is_ancestor_of(p))
            .collect()
    }

    fn rows<'r>(
        &self,
        range: impl std::ops::RangeBounds<&'r [u8]> + 'r,
    ) -> impl Iterator<Item = (Guard<'static, &'static [u8]>, Guard<'static, &'static [u8]>)> + '_
    {
        let rows = self.files.as_ref().and_then(|t| t.range(range).ok());
        rows.into_iter().flatten().filter_map(Result::ok)
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

/// An empty index in a database of its own, for tests; the database goes with the directory.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn test_index() -> (tempfile::TempDir, FileIndex) {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(StateDb::open(dir.path(), "t.redb").unwrap());
    let index = FileIndex::open(db, "s").unwrap();
    (dir, index)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::test_record as rec;
    use super::*;

    fn insert(idx: &mut FileIndex, path: &RelPath, record: &IndexRecord) {
        idx.apply([(path, Some(record))]).unwrap();
    }

    fn remove(idx: &mut FileIndex, path: &RelPath) {
        idx.apply([(path, None)]).unwrap();
    }

    #[test]
    fn locates_chunks_and_forgets_removed_files() {
        let a = RelPath::from_bytes(b"a").unwrap();
        let b = RelPath::from_bytes(b"b").unwrap();
        let (_dir, mut idx) = test_index();
        insert(&mut idx, &a, &rec(&[(1, 10), (2, 20)]));
        insert(&mut idx, &b, &rec(&[(3, 5)]));
        assert_eq!(
            idx.locate(&Hash([2; 32])),
            Some(ChunkLocation {
                path: a.clone(),
                offset: 10,
                len: 20
            })
        );
        assert_eq!(idx.get(&a).unwrap().manifest().size(), 30);
        assert_eq!((idx.len(), idx.bytes()), (2, 35));
        remove(&mut idx, &a);
        assert!(idx.locate(&Hash([2; 32])).is_none());
        assert!(idx.locate(&Hash([3; 32])).is_some());
        assert_eq!((idx.len(), idx.bytes()), (1, 5));
    }

    #[test]
    fn identity_reads_the_head_of_a_record() {
        let a = RelPath::from_bytes(b"a").unwrap();
        let (_dir, mut idx) = test_index();
        let record = rec(&[(1, 10), (2, 20)]);
        insert(&mut idx, &a, &record);
        let reader = idx.reader();
        assert_eq!(reader.identity(&a), Some((record.identity, record.meta)));
        assert_eq!(reader.identity(&RelPath::from_bytes(b"b").unwrap()), None);
        let all: Vec<_> = reader.identities().collect();
        assert_eq!(all, [(a, record.identity)]);
    }

    #[test]
    fn a_chunk_stays_locatable_while_any_holder_is_left() {
        let [a, b, c] = [b"a", b"b", b"c"].map(|n| RelPath::from_bytes(n).unwrap());
        let (_dir, mut idx) = test_index();
        // A rename as a transition records it: the new path first, then the old one goes.
        insert(&mut idx, &a, &rec(&[(1, 10), (2, 20)]));
        insert(&mut idx, &b, &rec(&[(1, 10), (2, 20)]));
        remove(&mut idx, &a);
        assert_eq!(idx.locate(&Hash([2; 32])).map(|l| l.path), Some(b.clone()));
        insert(&mut idx, &c, &rec(&[(9, 5), (2, 20)]));
        remove(&mut idx, &b);
        let loc = idx.locate(&Hash([2; 32])).unwrap();
        assert_eq!((&loc.path, loc.offset), (&c, 5));
        remove(&mut idx, &c);
        assert!(idx.locate(&Hash([2; 32])).is_none());
        assert!(idx.is_empty());
    }

    /// The index outlives the agent: a new one opened on the same database finds the files,
    /// their totals and their chunks; one written before the chunk table existed gets it.
    #[test]
    fn reopened_indexes_keep_their_files_totals_and_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(StateDb::open(dir.path(), "t.redb").unwrap());
        let [a, b] = [b"d/a", b"d/b"].map(|n| RelPath::from_bytes(n).unwrap());
        let mut idx = FileIndex::open(db.clone(), "s").unwrap();
        idx.apply([
            (&a, Some(&rec(&[(1, 10)]))),
            (&b, Some(&rec(&[(2, 7), (1, 10)]))),
        ])
        .unwrap();
        drop(idx);
        let idx = FileIndex::open(db.clone(), "s").unwrap();
        assert_eq!((idx.len(), idx.bytes()), (2, 27));
        assert_eq!(idx.locate(&Hash([2; 32])).unwrap().path, b);
        let under = idx
            .reader()
            .paths_under(&RelPath::from_bytes(b"d").unwrap());
        assert_eq!(under, [a.clone(), b.clone()]);
        drop(idx);
        db.write_index(|txn| {
            txn.delete_table(chunks_def("chunks:s"))?;
            Ok(())
        })
        .unwrap();
        let idx = FileIndex::open(db, "s").unwrap();
        let loc = idx.locate(&Hash([1; 32])).unwrap();
        assert!(
            loc == ChunkLocation {
                path: a,
                offset: 0,
                len: 10
            } || loc
                == ChunkLocation {
                    path: b,
                    offset: 7,
                    len: 10
                }
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Whatever files come and go, a chunk that a remaining file holds is located in a
        /// file that holds it, at that chunk's place; nothing is located that no file holds;
        /// the totals are those of the files left.
        #[test]
        fn locations_follow_the_files_that_hold_them(
            ops in proptest::collection::vec(
                (0u8..5, proptest::option::of(proptest::collection::vec(0u8..6, 1..5))),
                1..60,
            ),
        ) {
            let (_dir, mut idx) = test_index();
            let mut model = std::collections::BTreeMap::new();
            for (file, chunks) in ops {
                let path = RelPath::from_bytes(&[b'a' + file]).unwrap();
                match chunks {
                    Some(c) => {
                        let hashes: Vec<(u8, u32)> = c.iter().map(|&h| (h, 7)).collect();
                        insert(&mut idx, &path, &rec(&hashes));
                        model.insert(path, rec(&hashes));
                    }
                    None => {
                        remove(&mut idx, &path);
                        model.remove(&path);
                    }
                }
            }
            let bytes: u64 = model.values().map(|r| r.meta.size).sum();
            proptest::prop_assert_eq!((idx.len(), idx.bytes()), (model.len() as u64, bytes));
            for h in 0u8..6 {
                let hash = Hash([h; 32]);
                let held = model.values().any(|r| r.chunks.iter().any(|c| c.0 == hash));
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
