//! Bulk jobs: in a live cycle, files still lacking [`BULK_MIN_BYTES`] or more of chunk data
//! after staging are left staged, and their chunks cross a few MiB at a time in
//! [`Controller::bulk_step`](super::Controller::bulk_step)s between the cycles the next hints
//! bring, so small edits never wait behind a big file.
//!
//! [`BULK_MIN_BYTES`]: super::BULK_MIN_BYTES

use super::transfer::{supply, MAX_CHUNKS_PER_READ};
use super::{side_err, CycleError};
use std::collections::{HashMap, HashSet, VecDeque};
use vmsync_core::endpoint::{ChunkData, ChunkRead, DeltaRead, Endpoint};
use vmsync_core::reconcile::{Action, Side};
use vmsync_core::{Hash, RelPath};

/// Files of one stage batch whose missing chunks cross in [`Controller::bulk_step`]s.
pub(super) struct BulkJob {
    /// The changes to make once everything is there; all on one destination side.
    pub(super) actions: Vec<Action>,
    /// Source reads of the chunks the destination still lacks, each chunk once, with the base
    /// the destination offered for it (a chunk whose delta failed comes back without one).
    pub(super) reads: VecDeque<DeltaRead>,
    /// Chunks read and not yet supplied (the source reads ahead of the destination by one step).
    pub(super) ready: Option<Vec<(ChunkRead, ChunkData)>>,
    /// Chunk → the job's files that wait for it, to drop the right ones when a read fails.
    pub(super) waiting: HashMap<Hash, Vec<RelPath>>,
    /// Files whose source changed while being read: not committed.
    pub(super) failed: HashSet<RelPath>,
}

impl BulkJob {
    pub(super) fn target(&self) -> Option<Side> {
        self.actions.first().map(|a| a.target)
    }

    /// The chunks this job has still to supply, with the side they go to.
    pub(super) fn queued(&self) -> impl Iterator<Item = (Side, Hash)> + '_ {
        let target = self.target();
        let reads = self.reads.iter().map(|r| r.read.chunk.hash);
        let ready = self.ready.iter().flatten().map(|(r, _)| r.chunk.hash);
        reads
            .chain(ready)
            .filter_map(move |h| target.map(|t| (t, h)))
    }
}

/// One step of a bulk job from `src` to `dst`, the `target` side (see
/// [`Controller::bulk_step`](super::Controller::bulk_step)). `Ok(true)` once every chunk has
/// been read and supplied.
pub(super) async fn advance<S: Endpoint, D: Endpoint>(
    src: &mut S,
    dst: &mut D,
    target: Side,
    job: &mut BulkJob,
) -> Result<bool, CycleError> {
    let take = job.reads.len().min(MAX_CHUNKS_PER_READ);
    let reads: Vec<DeltaRead> = job.reads.drain(..take).collect();
    let asked: Vec<ChunkRead> = reads.iter().map(|r| r.read.clone()).collect();
    let previous = job.ready.take();
    let (data, supplied) = tokio::join!(
        async {
            if reads.is_empty() {
                Ok(Vec::new())
            } else {
                src.read_deltas(reads).await
            }
        },
        supply(dst, previous)
    );
    let (retry, lost) = supplied.map_err(side_err(target))?;
    let data = data.map_err(side_err(target.other()))?;
    let mut fail = |h: &Hash| {
        let waiting = job.waiting.get(h).into_iter().flatten();
        job.failed.extend(waiting.cloned());
    };
    lost.iter().for_each(&mut fail);
    let mut batch = Vec::with_capacity(asked.len());
    for (read, d) in asked.into_iter().zip(data) {
        match d {
            Some(d) => batch.push((read, d)),
            None => fail(&read.chunk.hash),
        }
    }
    // A chunk whose delta failed goes round again, whole.
    job.reads
        .extend(retry.into_iter().map(|read| DeltaRead { read, base: None }));
    if !batch.is_empty() {
        job.ready = Some(batch);
    }
    Ok(job.reads.is_empty() && job.ready.is_none())
}
