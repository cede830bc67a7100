//! Serving reads as a source: chunks read back and verified against their ids, and deltas
//! against the bases a destination offered.

use super::LocalShare;
use crate::chunk::hash_chunk;
use crate::root::ShareRoot;
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
        let mut files = OpenFiles::default();
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
        let mut files = OpenFiles::default();
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

/// A small cache of files opened for reading chunks within one request.
#[derive(Default)]
pub(super) struct OpenFiles {
    files: HashMap<RelPath, Option<File>>,
}

/// Most source files kept open at once while serving one request.
const MAX_OPEN_SOURCE_FILES: usize = 64;

impl OpenFiles {
    /// Reads `len` bytes at `offset` of `path` and returns them only if they hash to `hash`.
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
        (hash_chunk(&buf) == *hash).then_some(buf)
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
            let file = root.open_file(path).ok().map(|(f, _)| f);
            self.files.insert(path.clone(), file);
        }
        let file = self.files.get(path)?.as_ref()?;
        let mut buf = vec![0u8; usize::try_from(len).ok()?];
        file.read_exact_at(&mut buf, offset).ok()?;
        Some(buf)
    }
}
