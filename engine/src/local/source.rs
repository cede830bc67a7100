//! Serving reads as a source: chunks read back and verified against their ids, and deltas
//! against the bases a destination offered.
//!
//! A chunk read from an indexed file at the place its index record gives it, while the file
//! is still the inode, size, mtime and ctime indexed (checked when it is opened and again
//! after each read), is the indexed chunk without hashing it again: the scan itself trusts that
//! identity to skip hashing an unchanged file, so this check is exactly as strong as the index.
//! Any other read is hashed. Whatever a peer receives it verifies on its own (docs/design.md,
//! "Data path").

use super::LocalShare;
use crate::chunk::hash_chunk;
use crate::index::{Identity, IndexReader};
use crate::root::{ShareRoot, Stat};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use vmsync_core::delta;
use vmsync_core::endpoint::{ChunkData, ChunkRead, DeltaRead, EndpointError};
use vmsync_core::limits::CHUNK_MAX_BYTES;
use vmsync_core::{Hash, RelPath};

impl LocalShare {
    pub(super) fn read_chunks(
        &mut self,
        reads: Vec<ChunkRead>,
    ) -> Result<Vec<Option<Vec<u8>>>, EndpointError> {
        let root = self.root()?;
        let mut files = OpenFiles::trusting(self.index.reader());
        Ok(reads
            .into_iter()
            .map(|r| files.read_verified(root, &r.path, r.chunk.offset, r.chunk.len, &r.chunk.hash))
            .collect())
    }

    pub(super) fn read_deltas(
        &mut self,
        reads: Vec<DeltaRead>,
    ) -> Result<Vec<Option<ChunkData>>, EndpointError> {
        let root = self.root()?;
        let mut files = OpenFiles::trusting(self.index.reader());
        Ok(reads
            .into_iter()
            .map(|DeltaRead { read: r, base }| {
                let data = files.read_verified(
                    root,
                    &r.path,
                    r.chunk.offset,
                    r.chunk.len,
                    &r.chunk.hash,
                )?;
                // A signature this side cannot use (malformed, hostile) just means "whole".
                let delta = base
                    .and_then(|b| delta::parse_signature(b).ok())
                    .and_then(|sig| delta::delta(&sig, &data));
                Some(match delta {
                    Some(d) => ChunkData::Delta(d),
                    None => ChunkData::Whole(data),
                })
            })
            .collect())
    }
}

/// A small cache of files opened for reading chunks within one request; with an index, the
/// indexed files among them are read without hashing (see the module's documentation).
#[derive(Default)]
pub(super) struct OpenFiles {
    files: HashMap<RelPath, Option<Opened>>,
    index: Option<IndexReader>,
}

struct Opened {
    file: File,
    /// The identity the index holds for this path, when the file opened is that file.
    indexed: Option<Identity>,
}

/// Most source files kept open at once while serving one request.
const MAX_OPEN_SOURCE_FILES: usize = 64;

impl OpenFiles {
    /// Files read for one request, trusting what `index` holds.
    pub(super) fn trusting(index: IndexReader) -> OpenFiles {
        OpenFiles {
            files: HashMap::new(),
            index: Some(index),
        }
    }

    /// Reads `len` bytes at `offset` of `path` and returns them only if they are the chunk
    /// `hash`: the place the index gives it in a file still as indexed, or else they hash to it.
    pub(super) fn read_verified(
        &mut self,
        root: &ShareRoot,
        path: &RelPath,
        offset: u64,
        len: u32,
        hash: &Hash,
    ) -> Option<Vec<u8>> {
        if len > CHUNK_MAX_BYTES {
            return None;
        }
        let buf = self.read_at(root, path, offset, u64::from(len))?;
        if self.still_indexed(path, hash, offset, len) {
            return Some(buf);
        }
        (hash_chunk(&buf) == *hash).then_some(buf)
    }

    /// Whether `path` was opened as indexed, is so still, and its record places `hash` at
    /// `offset`, `len` bytes long.
    fn still_indexed(&self, path: &RelPath, hash: &Hash, offset: u64, len: u32) -> bool {
        let (Some(index), Some(Some(opened))) = (&self.index, self.files.get(path)) else {
            return false;
        };
        let Some(indexed) = &opened.indexed else {
            return false;
        };
        index.place(hash, path) == Some((offset, len))
            && Stat::of_open_file(&opened.file).is_ok_and(|st| Identity::of(&st) == *indexed)
    }

    /// Reads `len` bytes (at most [`delta::MAX_BASE_BYTES`]) at `offset` of `path`: a delta
    /// base, unverified (whatever is built from it is verified).
    pub(super) fn read_range(
        &mut self,
        root: &ShareRoot,
        path: &RelPath,
        offset: u64,
        len: u64,
    ) -> Option<Vec<u8>> {
        if len > delta::MAX_BASE_BYTES {
            return None;
        }
        self.read_at(root, path, offset, len)
    }

    fn read_at(
        &mut self,
        root: &ShareRoot,
        path: &RelPath,
        offset: u64,
        len: u64,
    ) -> Option<Vec<u8>> {
        if !self.files.contains_key(path) {
            if self.files.len() >= MAX_OPEN_SOURCE_FILES {
                self.files.clear();
            }
            let opened = root.open_file(path).ok().map(|(file, stat)| {
                let identity = Identity::of(&stat);
                let indexed = self
                    .index
                    .as_ref()
                    .and_then(|index| index.identity(path))
                    .map(|(id, _)| id)
                    .filter(|id| *id == identity);
                Opened { file, indexed }
            });
            self.files.insert(path.clone(), opened);
        }
        let file = &self.files.get(path)?.as_ref()?.file;
        let mut buf = vec![0u8; usize::try_from(len).ok()?];
        file.read_exact_at(&mut buf, offset).ok()?;
        Some(buf)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::index::{test_index, test_record};

    /// Which reads come back, by what the index says of the file. The index here claims
    /// chunk ids (`[1; 32]`, `[2; 32]`) that the file's bytes do not hash to, so a read that
    /// comes back was trusted, not hashed; one that does not was hashed.
    #[test]
    fn a_chunk_at_its_indexed_place_in_an_unchanged_file_is_not_hashed_again() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("f"), [7u8; 300]).unwrap();
        std::fs::write(tmp.path().join("g"), [8u8; 300]).unwrap();
        let root = ShareRoot::open(tmp.path()).unwrap();
        let (_db, mut index) = test_index();
        let f = RelPath::from_bytes(b"f").unwrap();
        let g = RelPath::from_bytes(b"g").unwrap();
        let identity = |p: &RelPath| Identity::of(&root.open_file(p).unwrap().1);
        let mut record = test_record(&[(1, 100), (2, 200)]);
        record.identity = identity(&f);
        let mut stale = test_record(&[(1, 100), (2, 200)]);
        stale.identity = identity(&g);
        stale.identity.ino += 1;
        index
            .apply([(&f, Some(&record)), (&g, Some(&stale))])
            .unwrap();
        let (one, two) = (Hash([1; 32]), Hash([2; 32]));
        let real = hash_chunk(&[7u8; 100]);

        let read = |path: &RelPath, offset, len, hash: &Hash| {
            OpenFiles::trusting(index.reader()).read_verified(&root, path, offset, len, hash)
        };
        let cases: &[(&str, &RelPath, u64, u32, &Hash, bool)] = &[
            ("at its place, file as indexed", &f, 0, 100, &one, true),
            ("second chunk at its place", &f, 100, 200, &two, true),
            ("at another offset", &f, 100, 100, &one, false),
            ("with another length", &f, 0, 50, &one, false),
            (
                "an id the index does not place there",
                &f,
                0,
                100,
                &two,
                false,
            ),
            ("the real bytes' id, hashed", &f, 0, 100, &real, true),
            (
                "in a file that is not the one indexed",
                &g,
                0,
                100,
                &one,
                false,
            ),
        ];
        for &(what, path, offset, len, hash, back) in cases {
            assert_eq!(read(path, offset, len, hash).is_some(), back, "{what}");
        }
        // Without an index every read is hashed.
        let mut plain = OpenFiles::default();
        assert!(plain.read_verified(&root, &f, 0, 100, &one).is_none());
        assert!(plain.read_verified(&root, &f, 0, 100, &real).is_some());

        // Changed after it was opened (same size, same inode): hashed from then on.
        let mut files = OpenFiles::trusting(index.reader());
        assert!(files.read_verified(&root, &f, 0, 100, &one).is_some());
        // Past a coarse timestamp tick, on kernels without fine-grained ctime.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(tmp.path().join("f"), [9u8; 300]).unwrap();
        assert!(files.read_verified(&root, &f, 0, 100, &one).is_none());
        assert!(
            read(&f, 0, 100, &one).is_none(),
            "changed before it was opened"
        );
    }
}
