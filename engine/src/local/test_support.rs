//! Fixtures the tests of staging and transitions share: a share in a temp directory, files of
//! known content, and the requests and changes that stage and commit them.

use super::{LocalEndpoint, LocalShare};
use crate::chunk::chunk_bytes;
use crate::filter::Filter;
use crate::state::StateDb;
use std::path::PathBuf;
use std::sync::Arc;
use vmsync_core::endpoint::{Change, ChunkData, ScanOptions, ScanScope, StageRequest};
use vmsync_core::entry::Timestamp;
use vmsync_core::{Entry, FileMeta, Hash, Manifest, RelPath};

pub(super) const MODE: u32 = 0o640;

pub(super) const MTIME: Timestamp = Timestamp {
    secs: 1_700_000_000,
    nanos: 7,
};

pub(super) struct Fixture {
    _dir: tempfile::TempDir,
    pub(super) share_dir: PathBuf,
    pub(super) share: LocalShare,
}

pub(super) fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let share_dir = dir.path().join("share");
    std::fs::create_dir(&share_dir).unwrap();
    let db = Arc::new(StateDb::open(&dir.path().join("state"), "db").unwrap());
    let LocalEndpoint { inner, .. } =
        LocalEndpoint::new("t", share_dir.clone(), Filter::none(), db).unwrap();
    let mut share = Arc::try_unwrap(inner).ok().unwrap().into_inner().unwrap();
    full_scan(&mut share);
    Fixture {
        _dir: dir,
        share_dir,
        share,
    }
}

pub(super) fn full_scan(share: &mut LocalShare) {
    let options = ScanOptions {
        create_marker: true,
    };
    share.scan(&ScanScope::Full, &options).unwrap();
}

/// A few chunks of bytes no other test file shares.
pub(super) fn content(seed: u64) -> Vec<u8> {
    vmsync_core::testing::noise(150_000, seed)
}

pub(super) fn request(path: &RelPath, data: &[u8]) -> StageRequest {
    let chunks = chunk_bytes(data);
    StageRequest {
        path: path.clone(),
        meta: FileMeta {
            size: data.len() as u64,
            mode: MODE,
            mtime: MTIME,
            digest: Manifest::digest_of(&chunks),
        },
        manifest: Manifest {
            chunks,
            links: Vec::new(),
        },
    }
}

/// Stages `data` at `path`; returns the chunks it still misses, with their bytes.
pub(super) fn stage(share: &mut LocalShare, path: &RelPath, data: &[u8]) -> Vec<(Hash, ChunkData)> {
    let req = request(path, data);
    let chunks = req.manifest.chunks.clone();
    let mut results = share.stage(vec![req]).unwrap();
    let missing = results.pop().unwrap().unwrap();
    missing
        .iter()
        .map(|m| {
            let c = chunks.iter().find(|c| c.hash == m.hash).unwrap();
            let start = usize::try_from(c.offset).unwrap();
            let bytes = data[start..start + c.len as usize].to_vec();
            (m.hash, ChunkData::Whole(bytes))
        })
        .collect()
}

/// Stages a file whose chunks never come: other staged files then complete while more
/// transfer is still to come, which is when they are sealed early. Returns its path.
pub(super) fn keep_waiting(share: &mut LocalShare) -> RelPath {
    let path = RelPath::from_bytes(b"pending").unwrap();
    assert!(!stage(share, &path, &content(999)).is_empty());
    path
}

pub(super) fn create(path: &RelPath, data: &[u8]) -> Change {
    Change {
        path: path.clone(),
        expected: None,
        new: Some(Entry::File(request(path, data).meta)),
    }
}

pub(super) fn leftover_temps(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join(".vmsync/tmp")).unwrap().count()
}
