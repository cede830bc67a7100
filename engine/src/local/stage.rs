//! Staging: each incoming file is built in a temp file from chunks found locally (`stage`)
//! and those the source sends (`supply`: whole, or deltas against the bases offered), a
//! file's chunks written with as few `pwritev` calls as their offsets allow. A file is handed
//! to the background sealer as soon as it is complete (see the module docs of `local`).

use super::source::OpenFiles;
use super::LocalShare;
use crate::chunk::hash_chunk;
use crate::faults::{io_reason, FaultOp};
use crate::index::Identity;
use crate::reuse::Plan;
use crate::root::{FileKind, TempFile};
use crate::seal::{SealHandle, Sealer};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use vmsync_core::delta;
use vmsync_core::endpoint::{
    ChunkData, EndpointError, MissingChunk, NotStaged, Problem, StageRequest,
};
use vmsync_core::limits::CHUNK_MAX_BYTES;
use vmsync_core::{FileMeta, Hash, Manifest, RelPath};

/// A file being built for a later transition.
pub(super) struct Staged {
    pub(super) temp: TempFile,
    pub(super) meta: FileMeta,
    pub(super) manifest: Manifest,
    /// Chunk id → offsets in the temp file still waiting for data.
    pub(super) missing: HashMap<Hash, Vec<u64>>,
    /// The seal submitted once `missing` became empty (`None` before, or if it could not be
    /// submitted: `transition` then seals the temp itself).
    pub(super) seal: Option<SealHandle>,
    /// Staged as an append to the old version (see [`crate::reuse`]): the temp holds only
    /// `[from, size)`, and must never be renamed into place before its head is filled.
    pub(super) append: Option<StagedAppend>,
}

/// What an append-staged file needs at its transition.
#[derive(Debug, Clone, Copy)]
pub(super) struct StagedAppend {
    /// Where the staged bytes start (the old last chunk's offset).
    pub(super) from: u64,
    pub(super) old_size: u64,
    /// The digest of the old version the plan was made against.
    pub(super) old_digest: Hash,
    /// The old last chunk, which the new bytes at `from` must be (unless known to be).
    pub(super) verify: Option<(Hash, u32)>,
}

impl Staged {
    /// Hands this complete file's seal to `sealer`. A failure to hand it over (no descriptor
    /// for the job's `dup`) only means `transition` will seal it itself.
    fn seal_early(&mut self, sealer: &mut Sealer, path: &RelPath) {
        match self.temp.seal_job(self.meta.mode, self.meta.mtime) {
            Ok(job) => self.seal = Some(sealer.submit(job)),
            Err(e) => {
                tracing::debug!(path = %path.escaped(), "sealing at the transition instead: {e}");
            }
        }
    }
}

/// Old bytes offered as the base for a missing chunk: re-read when its delta arrives.
pub(super) struct Base {
    path: RelPath,
    offset: u64,
    len: u64,
    /// The length of the chunk the delta must rebuild.
    chunk_len: u32,
}

/// Most signature bytes one `stage` call offers, summed over its files: bounds the answer
/// (and the source's work) when many big files were rewritten wholesale.
const MAX_STAGE_SIGNATURE_BYTES: usize = 8 << 20;

impl LocalShare {
    pub(super) fn stage(
        &mut self,
        files: Vec<StageRequest>,
    ) -> Result<Vec<Result<Vec<MissingChunk>, NotStaged>>, EndpointError> {
        // Sizes claimed by the peer: an upper bound of what this batch writes.
        let incoming = files
            .iter()
            .fold(0u64, |n, f| n.saturating_add(f.meta.size));
        self.check_room(incoming)?;
        // A file that completed a transfer alone was left for its transition to seal (see
        // `seal_early`); a new batch starting first means that transition is not next (the
        // controller commits a batch after filling the one after it): seal it meanwhile.
        let left: Vec<RelPath> = self
            .staged
            .iter()
            .filter(|(_, s)| {
                s.missing.is_empty()
                    && s.seal.is_none()
                    && !s.temp.is_sealed(s.meta.mode, s.meta.mtime)
            })
            .map(|(p, _)| p.clone())
            .collect();
        for path in left {
            if let Some(staged) = self.staged.get_mut(&path) {
                staged.seal_early(&mut self.sealer, &path);
            }
        }
        let mut results = Vec::with_capacity(files.len());
        let mut sources = OpenFiles::default();
        let mut budget = MAX_STAGE_SIGNATURE_BYTES;
        let mut completed = Vec::new();
        for req in files {
            let path = req.path.clone();
            if !self.staged.contains_key(&path) && self.staged.len() >= self.max_staged {
                // Out of file descriptors to hold more temp files open: not an error, later.
                results.push(Err(NotStaged::NoRoom));
                continue;
            }
            let result = self.stage_one(req, &mut sources, &mut budget);
            if result.as_ref().is_ok_and(|missing| missing.is_empty()) {
                completed.push(path.clone());
            }
            results.push(result.map_err(|reason| NotStaged::Problem(Problem { path, reason })));
        }
        self.seal_early(completed);
        Ok(results)
    }

    /// Offers bases for the missing chunks of `req` (sorted, each once) from the file this
    /// side has at that path now, within `budget` signature bytes.
    fn offer_bases(
        &mut self,
        req: &StageRequest,
        want: Vec<Hash>,
        sources: &mut OpenFiles,
        budget: &mut usize,
    ) -> Vec<MissingChunk> {
        let mut out: Vec<MissingChunk> = want
            .into_iter()
            .map(|hash| MissingChunk { hash, base: None })
            .collect();
        let (Some(old), Some(root)) = (self.index.get(&req.path), self.root.as_ref()) else {
            return out;
        };
        let windows = delta::base_windows(&old.chunks, &req.manifest.chunks);
        for (c, window) in req.manifest.chunks.iter().zip(windows) {
            let Some(w) = window else { continue };
            if *budget == 0 || self.bases.contains_key(&c.hash) {
                continue;
            }
            let Ok(i) = out.binary_search_by(|m| m.hash.cmp(&c.hash)) else {
                continue;
            };
            if out[i].base.is_some() {
                continue;
            }
            let Some(bytes) = sources.read_range(root, &req.path, w.offset, w.len) else {
                continue;
            };
            let sig = delta::signature(&bytes, w.block);
            if sig.len() > *budget {
                *budget = 0;
                continue;
            }
            *budget -= sig.len();
            out[i].base = Some(sig);
            self.bases.insert(
                c.hash,
                Base {
                    path: req.path.clone(),
                    offset: w.offset,
                    len: w.len,
                    chunk_len: c.len,
                },
            );
        }
        out
    }

    fn stage_one(
        &mut self,
        req: StageRequest,
        sources: &mut OpenFiles,
        budget: &mut usize,
    ) -> Result<Vec<MissingChunk>, String> {
        req.manifest
            .validate(&req.meta, CHUNK_MAX_BYTES)
            .map_err(|e| format!("invalid manifest: {e}"))?;
        self.unstage(&req.path);
        self.faulted.remove(&req.path);
        let root = self.root().map_err(|e| e.to_string())?;
        let temp = root
            .create_temp_for(&req.path)
            .map_err(|e| format!("cannot create temp file: {e}"))?;
        let mut tmp_echo = None;
        // An unnamed (O_TMPFILE) temp in the file's directory shows up in watch events as
        // `#<inode>` there, gone by the time anyone looks: one more echo of our own.
        if temp.name().is_empty() {
            let tmp_name = rustix::fs::fstat(&temp.file)
                .ok()
                .map(|st| format!("#{}", st.st_ino));
            tmp_echo = tmp_name.and_then(|n| {
                req.path
                    .parent()
                    .and_then(|dir| dir.join(n.as_bytes()).ok())
            });
        }
        // What of the old version at this path can be reused in place: only if the file there
        // is still what the index hashed (else its chunk list says nothing of its bytes).
        let old = self.index.get(&req.path).filter(|rec| {
            root.stat(&req.path)
                .ok()
                .flatten()
                .is_some_and(|st| st.kind == FileKind::File && Identity::of(&st) == rec.identity)
        });
        let old = old.as_ref();
        let plan = old.map_or(Plan::Fresh, |rec| {
            crate::reuse::plan(&rec.chunks, &req.manifest)
        });
        let append = match &plan {
            Plan::Append {
                from,
                old_size,
                verify,
            } => old.map(|rec| StagedAppend {
                from: *from,
                old_size: *old_size,
                old_digest: rec.meta.digest,
                verify: *verify,
            }),
            _ => None,
        };
        // Offsets whose chunk the temp already holds, cloned from the old file; and how much
        // of the temp is the old file's (zero chunks inside it must be punched out).
        let (same, cloned_size) = match (&plan, old) {
            (Plan::Clone { same }, Some(rec)) => match root.clone_into_temp(&req.path, &temp) {
                Ok(Some((before, after)))
                    if Identity::of(&before) == rec.identity
                        && Identity::of(&after) == rec.identity =>
                {
                    (Some(same), rec.meta.size)
                }
                // Changed while cloned: start again from an empty temp.
                Ok(Some(_)) => match temp.file.set_len(0) {
                    Ok(()) => (None, 0),
                    Err(e) => {
                        root.discard_temp(temp);
                        return Err(io_reason(FaultOp::Write, &e));
                    }
                },
                Ok(None) | Err(_) => (None, 0),
            },
            _ => (None, 0),
        };
        let index = self.index.reader();
        let zeros = &self.zeros;
        let mut fill = || -> Result<HashMap<Hash, Vec<u64>>, String> {
            temp.file
                .set_len(req.meta.size)
                .map_err(|e| io_reason(FaultOp::Write, &e))?;
            let write = |data: &[u8], offset: u64| -> Result<(), String> {
                if let Some(e) = root.injected(FaultOp::Write, &req.path) {
                    return Err(io_reason(FaultOp::Write, &e.into()));
                }
                write_at(&temp.file, data, offset)
            };
            let mut missing: HashMap<Hash, Vec<u64>> = HashMap::new();
            // Bytes of chunks already placed in this temp file, so a repeated chunk is copied
            // once.
            let mut placed: HashMap<Hash, Vec<u8>> = HashMap::new();
            // A run of zero chunks still to punch out of the clone: [start, end).
            let mut punch: Option<(u64, u64)> = None;
            for c in &req.manifest.chunks {
                if append.is_some_and(|a| c.offset < a.from)
                    || same.is_some_and(|s| s.contains(&c.offset))
                {
                    continue;
                }
                if zeros.is_zero(c) {
                    // The sized temp is a hole there, unless the clone brought data: then the
                    // run is punched out, in one call (punches of single chunks would leave
                    // the blocks they share allocated).
                    if c.offset < cloned_size {
                        let end = c.offset + u64::from(c.len);
                        punch = match punch {
                            Some((start, last)) if last == c.offset => Some((start, end)),
                            Some((start, last)) => {
                                punch_hole(&temp.file, start, last - start)
                                    .map_err(|e| io_reason(FaultOp::Write, &e))?;
                                Some((c.offset, end))
                            }
                            None => Some((c.offset, end)),
                        };
                    }
                    continue;
                }
                if let Some(data) = placed.get(&c.hash) {
                    write(data, c.offset)?;
                    continue;
                }
                let local = index.locate(&c.hash).and_then(|loc| {
                    sources.read_verified(root, &loc.path, loc.offset, loc.len, &c.hash)
                });
                match local {
                    Some(data) => {
                        write(&data, c.offset)?;
                        // Keep only small repeated chunks in memory: a repeat costs one more
                        // read.
                        if placed.len() < 64 {
                            placed.insert(c.hash, data);
                        }
                    }
                    None => missing.entry(c.hash).or_default().push(c.offset),
                }
            }
            if let Some((start, end)) = punch {
                punch_hole(&temp.file, start, end - start)
                    .map_err(|e| io_reason(FaultOp::Write, &e))?;
            }
            Ok(missing)
        };
        let missing = match fill() {
            Ok(missing) => missing,
            Err(reason) => {
                // Half written: the temp goes now, not at the next start.
                root.discard_temp(temp);
                return Err(reason);
            }
        };
        let mut want: Vec<Hash> = missing.keys().copied().collect();
        want.sort();
        for h in &want {
            self.wanted.entry(*h).or_default().push(req.path.clone());
        }
        if let Some(path) = tmp_echo {
            self.echoes.insert(path, None);
        }
        let want = self.offer_bases(&req, want, sources, budget);
        let staged = Staged {
            temp,
            meta: req.meta,
            manifest: req.manifest,
            missing,
            seal: None,
            append,
        };
        self.staged.insert(req.path, staged);
        Ok(want)
    }

    pub(super) fn supply(
        &mut self,
        chunks: Vec<(Hash, ChunkData)>,
    ) -> Result<Vec<Hash>, EndpointError> {
        let incoming = chunks
            .iter()
            .fold(0u64, |n, (_, d)| n.saturating_add(d.len() as u64));
        self.check_room(incoming)?;
        let mut still_missing = Vec::new();
        let mut bases = OpenFiles::default();
        // Every chunk is verified before anything is written; then each file's chunks are
        // written in offset order, neighbours in one `pwritev`.
        let mut datas: Vec<Vec<u8>> = Vec::with_capacity(chunks.len());
        let mut writes: HashMap<RelPath, FileWrites> = HashMap::new();
        for (hash, data) in chunks {
            // A chunk no staged file waits for any more (another supply filled them first, or
            // they were unstaged): nothing to write.
            if !self.wanted.contains_key(&hash) {
                tracing::debug!(share = %self.name, "chunk {hash} is no longer wanted");
                continue;
            }
            let data = match data {
                ChunkData::Whole(data) => {
                    if data.len() > CHUNK_MAX_BYTES as usize || hash_chunk(&data) != hash {
                        return Err(EndpointError::Protocol(format!(
                            "chunk {hash} does not match its id"
                        )));
                    }
                    data
                }
                ChunkData::Delta(d) => match self.rebuild(&hash, &d, &mut bases) {
                    Some(data) => data,
                    None => {
                        still_missing.push(hash);
                        continue;
                    }
                },
            };
            self.bases.remove(&hash);
            let Some(paths) = self.wanted.remove(&hash) else {
                continue;
            };
            let at = datas.len();
            datas.push(data);
            for path in paths {
                let Some(offsets) = self.staged.get(&path).and_then(|s| s.missing.get(&hash))
                else {
                    continue;
                };
                let (list, filled) = writes.entry(path).or_default();
                list.extend(offsets.iter().map(|&offset| (offset, at)));
                filled.push(hash);
            }
        }
        let mut completed = Vec::new();
        for (path, (mut list, filled)) in writes {
            let Some(staged) = self.staged.get_mut(&path) else {
                continue;
            };
            list.sort_unstable();
            let pieces: Vec<(u64, &[u8])> = list
                .iter()
                .filter_map(|&(offset, at)| datas.get(at).map(|d| (offset, d.as_slice())))
                .collect();
            let written = match self
                .root
                .as_ref()
                .and_then(|r| r.injected(FaultOp::Write, &path))
            {
                Some(e) => Err(e.into()),
                None => write_pieces(&staged.temp.file, &pieces),
            };
            if let Err(e) = written {
                // Half written: drop the temp, so nothing can take it for complete. The rest
                // of the supply goes on; this file's transition fails with the reason.
                tracing::warn!(path = %path.escaped(), "writing a staged file failed: {e}");
                self.unstage(&path);
                self.fault(path, io_reason(FaultOp::Write, &e));
                continue;
            }
            for hash in filled {
                staged.missing.remove(&hash);
            }
            if staged.missing.is_empty() {
                completed.push(path);
            }
        }
        self.seal_early(completed);
        Ok(still_missing)
    }

    /// Hands the seals of these just completed staged files to the background sealer, if
    /// other staged files still wait for chunks (the rest of the transfer then overlaps their
    /// fsyncs) or if there are several (the pool seals them with more concurrency than the
    /// transition would, and starts before it asks). One file completing the transfer is left
    /// to its transition, which follows at once: handing a live edit's one file to another
    /// thread would only add two thread wake-ups to its latency.
    fn seal_early(&mut self, completed: Vec<RelPath>) {
        if self.wanted.is_empty() && completed.len() <= 1 {
            return;
        }
        for path in completed {
            if let Some(staged) = self.staged.get_mut(&path) {
                if staged.missing.is_empty() && staged.seal.is_none() {
                    staged.seal_early(&mut self.sealer, &path);
                }
            }
        }
    }

    /// Rebuilds chunk `hash` from the base offered for it and `delta`: `None` unless the base
    /// can still be read and the result is exactly the chunk.
    fn rebuild(&self, hash: &Hash, delta: &[u8], files: &mut OpenFiles) -> Option<Vec<u8>> {
        let base = self.bases.get(hash)?;
        let root = self.root.as_ref()?;
        let bytes = files.read_range(root, &base.path, base.offset, base.len)?;
        delta::apply(&bytes, delta, base.chunk_len, hash)
    }

    pub(super) fn unstage(&mut self, path: &RelPath) {
        if let Some(old) = self.staged.remove(path) {
            for h in old.missing.keys() {
                if let Some(paths) = self.wanted.get_mut(h) {
                    paths.retain(|p| p != path);
                    if paths.is_empty() {
                        self.wanted.remove(h);
                        self.bases.remove(h);
                    }
                }
            }
            if let Some(root) = &self.root {
                root.discard_temp(old.temp);
            }
        }
    }

    pub(super) fn discard_staged(&mut self) {
        self.faulted.clear();
        let paths: Vec<RelPath> = self.staged.keys().cloned().collect();
        for p in paths {
            self.unstage(&p);
        }
        self.wanted.clear();
        self.bases.clear();
    }
}

/// What one supply writes to one staged file: (offset, index of the chunk's bytes) pairs, and
/// the chunks that fills.
type FileWrites = (Vec<(u64, usize)>, Vec<Hash>);

/// Writes `pieces` (sorted by offset) to `file`: each run of adjacent pieces in one `pwritev`,
/// so a file's chunks cost one system call per supply instead of one each, and the page cache
/// is not made to zero the partial pages at every chunk boundary.
fn write_pieces(file: &File, pieces: &[(u64, &[u8])]) -> std::io::Result<()> {
    for run in adjacent_runs(pieces) {
        for group in run.chunks(MAX_IOVECS) {
            let Some(&(at, _)) = group.first() else {
                continue;
            };
            let mut slices: Vec<std::io::IoSlice<'_>> = group
                .iter()
                .map(|(_, d)| std::io::IoSlice::new(d))
                .collect();
            let mut bufs = &mut slices[..];
            let mut pos = at;
            while !bufs.is_empty() {
                let n = rustix::io::pwritev(file, bufs, pos)?;
                if n == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                pos += n as u64;
                std::io::IoSlice::advance_slices(&mut bufs, n);
            }
        }
    }
    Ok(())
}

/// At most this many buffers per `pwritev` (Linux's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// Splits `pieces` (sorted by offset) into runs where each piece starts where the last ended.
fn adjacent_runs<'a, 'b>(pieces: &'a [(u64, &'b [u8])]) -> Vec<&'a [(u64, &'b [u8])]> {
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..=pieces.len() {
        let joined = match (pieces.get(i - 1), pieces.get(i)) {
            (Some((o, d)), Some((next, _))) => o + d.len() as u64 == *next,
            _ => false,
        };
        if !joined {
            if let Some(run) = pieces.get(start..i) {
                runs.push(run);
            }
            start = i;
        }
    }
    runs
}

/// Makes `[offset, offset + len)` of `file` a hole (zeros that take no disk), or writes zeros
/// there where the filesystem cannot punch holes.
fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use rustix::fs::FallocateFlags;
    let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    match rustix::fs::fallocate(file, flags, offset, len) {
        Ok(()) => Ok(()),
        Err(_) => {
            let zeros = vec![0u8; CHUNK_MAX_BYTES as usize];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(zeros.len() as u64);
                file.write_all_at(zeros.get(..n as usize).unwrap_or(&zeros), at)?;
                at += n;
            }
            Ok(())
        }
    }
}

pub(super) fn write_at(file: &File, data: &[u8], offset: u64) -> Result<(), String> {
    file.write_all_at(data, offset)
        .map_err(|e| format!("cannot write temp file: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::test_support::*;
    use std::os::unix::fs::MetadataExt;
    use std::time::{Duration, Instant};
    use vmsync_core::endpoint::Outcome;

    #[test]
    fn adjacent_runs_split_where_a_piece_does_not_start_at_the_last_end() {
        let (a, b, c) = (&b"abc"[..], &b"de"[..], &b"f"[..]);
        type Case<'a> = (Vec<(u64, &'a [u8])>, Vec<usize>);
        let cases: Vec<Case> = vec![
            (vec![], vec![]),
            (vec![(0, a)], vec![1]),
            (vec![(0, a), (3, b), (5, c)], vec![3]),
            (vec![(0, a), (4, b), (6, c)], vec![1, 2]),
            (vec![(0, a), (3, b), (9, c)], vec![2, 1]),
            (vec![(2, a), (10, b), (20, c)], vec![1, 1, 1]),
        ];
        for (pieces, lens) in cases {
            let runs = adjacent_runs(&pieces);
            assert_eq!(
                runs.iter().map(|r| r.len()).collect::<Vec<_>>(),
                lens,
                "{pieces:?}"
            );
            assert_eq!(
                runs.concat(),
                pieces,
                "runs cover every piece once, in order"
            );
        }
    }

    proptest::proptest! {
        /// However a file's bytes are cut into pieces and whichever are left out, writing the
        /// pieces gives what writing each one by itself gives.
        #[test]
        fn written_pieces_land_where_single_writes_would(
            data in proptest::collection::vec(proptest::num::u8::ANY, 1..6000),
            cuts in proptest::collection::vec(1usize..3000, 0..12),
            skip in proptest::collection::vec(proptest::bool::ANY, 12),
        ) {
            let mut bounds: Vec<usize> = cuts.into_iter().filter(|&c| c < data.len()).collect();
            bounds.extend([0, data.len()]);
            bounds.sort_unstable();
            bounds.dedup();
            let pieces: Vec<(u64, &[u8])> = bounds
                .windows(2)
                .enumerate()
                .filter(|(i, _)| !skip.get(*i).copied().unwrap_or(false))
                .map(|(_, w)| (w[0] as u64, &data[w[0]..w[1]]))
                .collect();
            let dir = tempfile::tempdir().unwrap();
            let (together, alone) = (dir.path().join("t"), dir.path().join("a"));
            let file = File::create_new(&together).unwrap();
            write_pieces(&file, &pieces).unwrap();
            let single = File::create_new(&alone).unwrap();
            for (offset, piece) in &pieces {
                single.write_all_at(piece, *offset).unwrap();
            }
            proptest::prop_assert_eq!(std::fs::read(&together).unwrap(), std::fs::read(&alone).unwrap());
        }
    }

    #[test]
    fn more_pieces_than_one_call_takes_are_all_written() {
        let data: Vec<u8> = (0..(MAX_IOVECS * 3 + 7)).map(|i| i as u8).collect();
        let pieces: Vec<(u64, &[u8])> = data
            .iter()
            .enumerate()
            .map(|(i, b)| (i as u64, std::slice::from_ref(b)))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_pieces(&File::create_new(&path).unwrap(), &pieces).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }

    #[test]
    fn a_write_that_fails_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let readonly = File::open(dir.path().join("f")).unwrap();
        assert!(write_pieces(&readonly, &[(0, &b"abc"[..])]).is_err());
    }

    fn temp_meta(share: &LocalShare, path: &RelPath) -> std::fs::Metadata {
        share.staged[path].temp.file.metadata().unwrap()
    }

    fn temp_bytes(share: &LocalShare, path: &RelPath) -> Vec<u8> {
        let file = &share.staged[path].temp.file;
        let mut buf = vec![0u8; usize::try_from(file.metadata().unwrap().len()).unwrap()];
        file.read_exact_at(&mut buf, 0).unwrap();
        buf
    }

    /// Polls `done` until it holds; fails after a generous deadline.
    fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn is_sealed_on_disk(share: &LocalShare, path: &RelPath) -> bool {
        let m = temp_meta(share, path);
        m.mode() & 0o7777 == MODE
            && (m.mtime(), m.mtime_nsec()) == (MTIME.secs, i64::from(MTIME.nanos))
    }

    #[test]
    fn file_completed_by_supply_is_sealed_before_transition() {
        let mut f = fixture();
        keep_waiting(&mut f.share);
        let path = RelPath::from_bytes(b"f.bin").unwrap();
        let data = content(1);
        let mut missing = stage(&mut f.share, &path, &data);
        assert!(missing.len() >= 2, "want a file of several chunks");
        let last = missing.split_off(1);
        f.share.supply(missing).unwrap();
        // Incomplete: nothing to seal yet.
        assert_eq!(temp_meta(&f.share, &path).mode() & 0o7777, 0o600);
        f.share.supply(last).unwrap();
        // Complete: sealed without anyone asking for a transition.
        eventually("the background seal", || is_sealed_on_disk(&f.share, &path));
        let outcomes = f.share.transition(vec![create(&path, &data)]).unwrap();
        assert_eq!(outcomes, vec![Outcome::Applied]);
        let placed = f.share_dir.join("f.bin");
        assert_eq!(std::fs::read(&placed).unwrap(), data);
        assert_eq!(std::fs::metadata(&placed).unwrap().mode() & 0o7777, MODE);
    }

    /// A whole chunk whose bytes are not what its id says is refused before anything of the
    /// supply is written (the wire layer does not hash it: this is the check), and the file it
    /// was for cannot be committed.
    #[test]
    fn a_chunk_that_does_not_match_its_id_is_refused() {
        let mut f = fixture();
        let path = RelPath::from_bytes(b"f.bin").unwrap();
        let data = content(4);
        let mut missing = stage(&mut f.share, &path, &data);
        assert!(missing.len() >= 2, "want a file of several chunks");
        if let Some((_, ChunkData::Whole(bytes))) = missing.last_mut() {
            bytes[0] ^= 1;
        }
        let before = temp_bytes(&f.share, &path);
        assert!(matches!(
            f.share.supply(missing),
            Err(EndpointError::Protocol(_))
        ));
        assert_eq!(
            temp_bytes(&f.share, &path),
            before,
            "nothing of the supply written"
        );
        let outcomes = f.share.transition(vec![create(&path, &data)]).unwrap();
        assert!(matches!(outcomes[..], [Outcome::Failed(_)]), "{outcomes:?}");
        assert!(!f.share_dir.join("f.bin").exists());
    }

    /// A chunk that cannot be written leaves no staged file that looks complete: the change
    /// fails instead of committing a temp with a hole in it.
    #[test]
    fn a_chunk_that_cannot_be_written_unstages_its_file() {
        let mut f = fixture();
        let path = RelPath::from_bytes(b"f.bin").unwrap();
        let data = content(3);
        let missing = stage(&mut f.share, &path, &data);
        assert!(!missing.is_empty());
        // Writes to the temp now fail (EBADF: a read-only descriptor in its place).
        let readonly = std::fs::File::open(f.share_dir.join(".")).unwrap();
        if let Some(staged) = f.share.staged.get_mut(&path) {
            staged.temp.file = readonly;
        }
        // The supply itself goes on (other files in it may land); this file is dropped.
        assert_eq!(f.share.supply(missing).unwrap(), Vec::<Hash>::new());
        assert!(!f.share.staged.contains_key(&path), "still staged");
        let outcomes = f.share.transition(vec![create(&path, &data)]).unwrap();
        match &outcomes[..] {
            [Outcome::Failed(reason)] => assert!(reason.starts_with("write failed"), "{reason}"),
            _ => panic!("{outcomes:?}"),
        }
        assert!(!f.share_dir.join("f.bin").exists());
        assert_eq!(leftover_temps(&f.share_dir), 0);
    }

    /// At its cap of staged files a share answers "no room" (the controller asks again later)
    /// instead of running out of descriptors; a path already staged may be staged anew.
    #[test]
    fn staging_past_the_cap_is_no_room() {
        let mut f = fixture();
        f.share.max_staged = 1;
        let a = RelPath::from_bytes(b"a").unwrap();
        let b = RelPath::from_bytes(b"b").unwrap();
        let results = f
            .share
            .stage(vec![request(&a, &content(11)), request(&b, &content(12))])
            .unwrap();
        assert!(results[0].is_ok());
        assert!(matches!(results[1], Err(NotStaged::NoRoom)));
        let again = f.share.stage(vec![request(&a, &content(13))]).unwrap();
        assert!(again[0].is_ok());
    }

    #[test]
    fn file_found_locally_is_sealed_at_stage() {
        let mut f = fixture();
        let data = content(2);
        std::fs::write(f.share_dir.join("old"), &data).unwrap();
        full_scan(&mut f.share);
        keep_waiting(&mut f.share);
        let path = RelPath::from_bytes(b"copy").unwrap();
        assert!(stage(&mut f.share, &path, &data).is_empty(), "all local");
        eventually("the background seal", || is_sealed_on_disk(&f.share, &path));
        let outcomes = f.share.transition(vec![create(&path, &data)]).unwrap();
        assert_eq!(outcomes, vec![Outcome::Applied]);
        assert_eq!(std::fs::read(f.share_dir.join("copy")).unwrap(), data);
    }

    #[test]
    fn last_file_to_complete_is_left_for_its_transition() {
        let mut f = fixture();
        let path = RelPath::from_bytes(b"f.bin").unwrap();
        let data = content(8);
        let missing = stage(&mut f.share, &path, &data);
        f.share.supply(missing).unwrap();
        // Nothing more to transfer: no thread hand-off, the transition seals it (a live edit).
        assert!(f.share.staged[&path].seal.is_none());
        assert_eq!(temp_meta(&f.share, &path).mode() & 0o7777, 0o600);
        let outcomes = f.share.transition(vec![create(&path, &data)]).unwrap();
        assert_eq!(outcomes, vec![Outcome::Applied]);
        let placed = f.share_dir.join("f.bin");
        assert_eq!(std::fs::read(&placed).unwrap(), data);
        assert_eq!(std::fs::metadata(&placed).unwrap().mode() & 0o7777, MODE);
        assert_eq!(f.share.sealer.workers(), 0, "no sealing thread started");
    }

    /// The file left for its transition is handed to the background once another batch is
    /// staged first: its transition is not next any more (the controller commits a batch
    /// after filling the next), and its fsync can run meanwhile.
    #[test]
    fn a_file_left_for_its_transition_is_sealed_when_another_batch_starts() {
        let mut f = fixture();
        let path = RelPath::from_bytes(b"f.bin").unwrap();
        let data = content(9);
        let missing = stage(&mut f.share, &path, &data);
        f.share.supply(missing).unwrap();
        assert!(
            f.share.staged[&path].seal.is_none(),
            "left for its transition"
        );
        let next = RelPath::from_bytes(b"g.bin").unwrap();
        let next_data = content(10);
        let next_missing = stage(&mut f.share, &next, &next_data);
        assert!(f.share.staged[&path].seal.is_some(), "handed to the sealer");
        eventually("the background seal", || is_sealed_on_disk(&f.share, &path));
        assert!(f.share.staged[&next].seal.is_none(), "still incomplete");
        f.share.supply(next_missing).unwrap();
        let outcomes = f
            .share
            .transition(vec![create(&path, &data), create(&next, &next_data)])
            .unwrap();
        assert_eq!(outcomes, vec![Outcome::Applied, Outcome::Applied]);
        assert_eq!(std::fs::read(f.share_dir.join("f.bin")).unwrap(), data);
        assert_eq!(std::fs::read(f.share_dir.join("g.bin")).unwrap(), next_data);
    }

    #[test]
    fn files_completing_the_transfer_together_are_sealed_early() {
        let mut f = fixture();
        let files: Vec<(RelPath, Vec<u8>)> = (0..3)
            .map(|i| {
                let p = RelPath::from_bytes(format!("f{i}").as_bytes()).unwrap();
                (p, content(200 + i))
            })
            .collect();
        let mut missing = Vec::new();
        for (p, d) in &files {
            missing.extend(stage(&mut f.share, p, d));
        }
        // One supply completes all three and the transfer: still worth the pool.
        f.share.supply(missing).unwrap();
        for (p, _) in &files {
            eventually("the background seal", || is_sealed_on_disk(&f.share, p));
        }
        let changes = files.iter().map(|(p, d)| create(p, d)).collect();
        let outcomes = f.share.transition(changes).unwrap();
        assert!(
            outcomes.iter().all(|o| *o == Outcome::Applied),
            "{outcomes:?}"
        );
    }
}
