//! Applying one side's actions: stage every new file on the destination from chunks it has,
//! supply what it lacks from the source, then transition (commit) batch by batch, recording
//! what landed in the ancestor as it lands. The controller plans; this module carries the plan
//! out and reports what happened in [`Executed`].

use super::ancestor::Ancestor;
use super::bulk::BulkJob;
use super::{side_err, CycleError};
use crate::state::{Generation, InFlight, PendingBatch};
use crate::status::{ProblemView, ShareStatus};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vmsync_core::deletions::{lost_content, Content};
use vmsync_core::endpoint::{
    Change, ChunkData, ChunkRead, DeltaRead, Endpoint, EndpointError, NotStaged, Outcome, Problem,
    StageRequest,
};
use vmsync_core::path::escape_bytes;
use vmsync_core::progress::Progress;
use vmsync_core::reconcile::{Action, Side};
use vmsync_core::{Entry, FileMeta, Hash, RelPath};

/// Files per stage batch: bounds the temp files a destination holds open at once, two batches'
/// worth (it also caps itself: `max_staged` in `engine/src/local/mod.rs`). 128 keeps round
/// trips and directory fsyncs few (each directory is fsynced once per batch) and the
/// destination's parallel fsyncs busy.
pub(super) const MAX_STAGE_BATCH_FILES: usize = 128;
/// Chunks per stage batch (summed over its manifests, estimated from sizes): bounds the size
/// of one message and what both sides keep per chunk while the batch is filled (the source's
/// bookkeeping below, the destination's missing chunks of each staged file). 16 Ki chunks is
/// one 256 MiB file (a bigger file is a batch of its own); at 64 Ki the standard benchmark's
/// four 256 MiB files went in one batch, about 18 MiB of bookkeeping on the host and 4 MiB in
/// the guest at once.
pub(super) const MAX_STAGE_BATCH_CHUNKS: usize = 16 * 1024;
/// Chunks per read/supply round trip: 64 chunks are at most 4 MiB.
pub(super) const MAX_CHUNKS_PER_READ: usize = 64;
/// Changes per transition message.
pub(super) const MAX_TRANSITION_BATCH: usize = 1024;
/// In a live cycle, a file missing at least this much chunk data on its destination after
/// staging is finished in the background (see
/// [`Controller::bulk_step`](super::Controller::bulk_step)).
pub const BULK_MIN_BYTES: u64 = 8 << 20;

#[derive(Default)]
pub(super) struct Executed {
    pub(super) applied: Vec<(RelPath, Option<Entry>)>,
    /// What applied changes removed or replaced by another kind (for the deletion windows).
    pub(super) removed: Vec<Removed>,
    /// Content applied changes created on a side (for the deletion windows).
    pub(super) gained: Vec<(Side, Content)>,
    /// Where each transition records what it applied in the ancestor, durably, as soon as it
    /// returns (`None`: only at the end of the cycle). A cycle cut off later (the agent killed,
    /// the connection lost) must not forget what already landed: the next cycle would read a
    /// file it copied as the destination's own creation, and the source's later edit or
    /// deletion of it as a conflict or a resurrection.
    pub(super) recorder: Option<Recorder>,
    /// How many of `applied`, from the start, the recorder has stored.
    pub(super) recorded: usize,
    /// The changes of a transition that failed without an answer (the connection lost, the
    /// destination killed): some may have landed. See `Controller::unconfirmed`.
    pub(super) unconfirmed: Vec<(Side, RelPath, Option<Entry>)>,
    /// Paths changed under the cycle: run another one now.
    pub(super) retry: bool,
    /// Actions that could not be done this cycle (reported as problems): retry later.
    pub(super) pending: usize,
    pub(super) chunks_reused: u64,
    /// Big files left staged for [`Controller::bulk_step`].
    pub(super) bulk: Vec<BulkJob>,
    /// Chunks that bulk jobs (earlier ones, or this cycle's) are still to supply, by
    /// destination side. A file staged now that lacks one joins the bulk queue behind them and
    /// is filled by that supply: asked again, the chunk would cross twice.
    pub(super) queued: HashSet<(Side, Hash)>,
    /// Where the time went, for the cycle's debug log.
    pub(super) times: PhaseTimes,
    /// How far the cycle has come, shown in `status` as transitions land.
    pub(super) progress: Option<ProgressSink>,
}

/// A cycle's [`Progress`], published to the share's status after every transition.
pub(super) struct ProgressSink {
    pub(super) status: Arc<Mutex<ShareStatus>>,
    pub(super) done: Progress,
}

impl ProgressSink {
    /// Starts counting the actions of a plan: those on files and symlinks (directories are
    /// cheap and not what a person counts), and the bytes of new content among them.
    pub(super) fn start(status: Arc<Mutex<ShareStatus>>, actions: &[Action]) -> ProgressSink {
        let bytes_total = actions
            .iter()
            .filter_map(needs_content)
            .map(|m| m.size)
            .sum();
        let sink = ProgressSink {
            status,
            done: Progress {
                files_total: actions.iter().filter(|a| Self::counts(a)).count() as u64,
                bytes_total,
                ..Progress::default()
            },
        };
        sink.publish();
        sink
    }

    fn counts(action: &Action) -> bool {
        !matches!(
            (&action.expected, &action.new),
            (_, Some(Entry::Dir { .. })) | (Some(Entry::Dir { .. }), None)
        )
    }

    fn applied(&mut self, action: &Action) {
        if !Self::counts(action) {
            return;
        }
        self.done.files_done += 1;
        self.done.bytes_done += needs_content(action).map_or(0, |m| m.size);
    }

    fn publish(&self) {
        if let Ok(mut s) = self.status.lock() {
            s.progress = Some(self.done);
        }
    }
}

/// An entry an applied change took from its side: deleted, or replaced by another kind.
pub(super) struct Removed {
    pub(super) side: Side,
    pub(super) path: RelPath,
    pub(super) entry: Entry,
    /// What that side lost, when it was a file or symlink.
    pub(super) lost: Option<Content>,
}

/// Time a cycle spent waiting on each kind of endpoint call (debug log only).
#[derive(Default)]
pub(super) struct PhaseTimes {
    pub(super) manifests: std::time::Duration,
    pub(super) stage: std::time::Duration,
    pub(super) transfer: std::time::Duration,
    pub(super) transition: std::time::Duration,
}

pub(super) fn view(side: Side, p: Problem) -> ProblemView {
    ProblemView {
        path: p.path.escaped(),
        side: side.as_str().into(),
        // Reasons may come from the guest: never let its bytes reach a terminal raw.
        reason: escape_bytes(p.reason.as_bytes()),
    }
}

/// True when the action needs file content on its target (not a metadata-only change).
pub(super) fn needs_content(action: &Action) -> Option<&FileMeta> {
    let Some(Entry::File(new)) = &action.new else {
        return None;
    };
    match &action.expected {
        Some(Entry::File(old)) if old.digest == new.digest && old.size == new.size => None,
        _ => Some(new),
    }
}

/// What [`Transfer::stage_files`] did with a batch's files.
#[derive(Debug, Default)]
pub(super) struct StagedFiles {
    /// Fully staged: ready for their transition.
    pub(super) staged: HashSet<RelPath>,
    /// Not staged for want of room on the destination ([`NotStaged::NoRoom`]): to be asked
    /// again once what waits there is committed.
    pub(super) no_room: HashSet<RelPath>,
}

/// One side's share of a cycle: the actions whose target is `target`, carried out from `src`
/// (the other side) to `dst`. Every method fails with the [`CycleError`] of the side whose
/// endpoint failed.
pub(super) struct Transfer<'a, S, D> {
    pub(super) src: &'a mut S,
    pub(super) dst: &'a mut D,
    pub(super) target: Side,
    /// A live cycle: big files are left to bulk jobs.
    pub(super) defer: bool,
    pub(super) problems: &'a mut Vec<ProblemView>,
    pub(super) executed: &'a mut Executed,
}

impl<S: Endpoint, D: Endpoint> Transfer<'_, S, D> {
    /// Applies the actions (all on `target`), reading new content from `src`, in four phases:
    /// 1. new directories, symlinks and files' metadata-only changes, parents first;
    /// 2. new file content, batch by batch: stage, fill from `src`, commit. A batch is committed
    ///    once the next one is filled (its files' fsyncs overlap that transfer), so the
    ///    destination holds at most two batches of temps open however many files a cycle brings;
    /// 3. removals, children first: until then a renamed or moved file's old copy is still there
    ///    to build the new one from;
    /// 4. the time and mode of directories that stay directories, last (with the last batch of
    ///    the phases before, when they fit): those phases write into them (and put their times
    ///    back), and a live edit's file need not wait for them.
    ///
    /// With `defer` (live cycles), big transfers are left to bulk jobs (see
    /// [`Transfer::stage_files`]).
    pub(super) async fn apply(mut self, actions: Vec<Action>) -> Result<(), CycleError> {
        let side = self.target;
        let (mut removals, creations): (Vec<Action>, Vec<Action>) =
            actions.into_iter().partition(is_removal);
        let (mut content, rest): (Vec<Action>, Vec<Action>) = creations
            .into_iter()
            .partition(|a| needs_content(a).is_some());
        let (mut dir_attrs, mut plain): (Vec<Action>, Vec<Action>) =
            rest.into_iter().partition(|a| {
                matches!(
                    (&a.expected, &a.new),
                    (Some(Entry::Dir { .. }), Some(Entry::Dir { .. }))
                )
            });
        plain.sort_by(|a, b| a.path.cmp(&b.path));
        dir_attrs.sort_by(|a, b| a.path.cmp(&b.path));
        content.sort_by(|a, b| a.path.cmp(&b.path));
        removals.sort_by(|a, b| b.path.cmp(&a.path));
        // Content this side is to gain: a removal of the same content is (part of) a move.
        // Only removals ask (an initial sync has none: a set of every new file's content for
        // nothing).
        let moving: HashSet<Content> = if removals.is_empty() {
            HashSet::new()
        } else {
            plain
                .iter()
                .chain(&content)
                .filter_map(|a| a.new.as_ref().and_then(Content::of))
                .collect()
        };
        // Directories, symlinks and times are recorded with the first content batch after them
        // (or at the end of the cycle): recording costs a round trip and a database commit, and a
        // live edit's file would wait for its directory's time to be recorded before landing.
        for batch in plain.chunks(MAX_TRANSITION_BATCH) {
            self.commit(batch, false).await?;
        }
        // The directories' own times go with the last batch that writes into them, after its
        // other changes (the batch's `ParentTimes` keeps the time they set): one transition, one
        // index commit and one record for a live edit, as without them.
        let mut dir_attrs = Some(dir_attrs);
        let no_removals = removals.is_empty();
        for (step, mut phase) in [content, removals].into_iter().enumerate() {
            if step == 1 {
                phase = hold_unlanded_moves(side, phase, &moving, self.problems, self.executed);
            }
            let last_phase = step == 1 || no_removals;
            // A batch is committed after the next one is staged and filled: the background seals
            // (fsyncs) of its files then run during that transfer instead of holding up the
            // commit. At most two batches of temps are open at once.
            let mut filled: Option<Vec<Action>> = None;
            let mut queue: VecDeque<Action> = phase.into();
            while !queue.is_empty() {
                let take = queue.len().min(MAX_STAGE_BATCH_FILES);
                let batch: Vec<Action> = queue.drain(..take).collect();
                let mut deferred = HashSet::new();
                let StagedFiles { staged, no_room } =
                    self.stage_files(&batch, &mut deferred).await?;
                // Files the destination had no room to stage (few descriptors, and the previous
                // batch's temps still open): commit that batch, then ask again. Given up for this
                // cycle when nothing could be staged and nothing waits to be committed: every
                // retry follows a batch that took files off the queue for good, so this ends.
                let waiting = filled.as_ref().is_some_and(|f| !f.is_empty());
                let again = !no_room.is_empty() && (waiting || !staged.is_empty());
                if again {
                    if let Some(previous) = filled.take() {
                        self.commit(&previous, true).await?;
                    }
                } else {
                    let mut left: Vec<&RelPath> = no_room.iter().collect();
                    left.sort();
                    self.problems
                        .extend(left.into_iter().map(|path| ProblemView {
                            path: path.escaped(),
                            side: side.as_str().into(),
                            reason: NotStaged::NO_ROOM_REASON.into(),
                        }));
                }
                let mut retry = Vec::new();
                let mut ready = Vec::new();
                for action in batch {
                    if needs_content(&action).is_none() || staged.contains(&action.path) {
                        ready.push(action);
                    } else if again && no_room.contains(&action.path) {
                        retry.push(action);
                    } else if !deferred.contains(&action.path) {
                        self.executed.pending += 1;
                    }
                }
                for action in retry.into_iter().rev() {
                    queue.push_front(action);
                }
                if let Some(previous) = filled.replace(ready) {
                    self.commit(&previous, true).await?;
                }
            }
            if let Some(mut last) = filled {
                let fits = |d: &Vec<Action>| last.len() + d.len() <= MAX_TRANSITION_BATCH;
                if last_phase && dir_attrs.as_ref().is_some_and(fits) {
                    last.extend(dir_attrs.take().unwrap_or_default());
                }
                self.commit(&last, true).await?;
            }
        }
        for batch in dir_attrs.unwrap_or_default().chunks(MAX_TRANSITION_BATCH) {
            self.commit(batch, false).await?;
        }
        Ok(())
    }

    /// Transitions one batch on `dst` (see [`transition`]).
    async fn commit(&mut self, batch: &[Action], record: bool) -> Result<(), CycleError> {
        transition(
            &mut *self.dst,
            self.target,
            batch,
            self.problems,
            self.executed,
            record,
        )
        .await
    }

    /// Stages on `dst` every file the actions need, reading missing chunks from `src`. Returns
    /// the paths that are fully staged and those the destination had no room for. With `defer`,
    /// a file still missing [`BULK_MIN_BYTES`] or more after staging is left staged: it goes into
    /// a bulk job in `executed` and into `deferred_paths`. Per-file trouble becomes a problem.
    async fn stage_files(
        &mut self,
        actions: &[Action],
        deferred_paths: &mut HashSet<RelPath>,
    ) -> Result<StagedFiles, CycleError> {
        let (dst_side, defer) = (self.target, self.defer);
        let src_side = dst_side.other();
        let (src, dst) = (&mut *self.src, &mut *self.dst);
        let (problems, executed) = (&mut *self.problems, &mut *self.executed);
        if actions.is_empty() {
            return Ok(StagedFiles::default());
        }
        let wanted: Vec<(RelPath, FileMeta)> = actions
            .iter()
            .filter_map(|a| needs_content(a).map(|m| (a.path.clone(), *m)))
            .collect();
        let mut staged = HashSet::new();
        let mut no_room = HashSet::new();
        let mut batch: Vec<(RelPath, FileMeta)> = Vec::new();
        let mut batch_chunks = 0usize;
        let mut pending = wanted.into_iter().peekable();
        while pending.peek().is_some() || !batch.is_empty() {
            // Fill a batch, estimating chunks from size (a manifest has at most size/min + 1).
            while let Some((_, meta)) = pending.peek() {
                let estimate =
                    (meta.size / u64::from(vmsync_core::limits::CHUNK_AVG_BYTES)) as usize + 1;
                if !batch.is_empty()
                    && (batch.len() >= MAX_STAGE_BATCH_FILES
                        || batch_chunks + estimate > MAX_STAGE_BATCH_CHUNKS)
                {
                    break;
                }
                batch_chunks += estimate;
                if let Some(item) = pending.next() {
                    batch.push(item);
                }
            }
            let items = std::mem::take(&mut batch);
            batch_chunks = 0;
            let clock = Instant::now();
            let manifests = src
                .manifests(items.clone())
                .await
                .map_err(side_err(src_side))?;
            executed.times.manifests += clock.elapsed();
            let mut requests = Vec::new();
            for ((path, meta), m) in items.into_iter().zip(manifests) {
                match m {
                    Ok(manifest) => requests.push(StageRequest {
                        path,
                        meta,
                        manifest,
                    }),
                    Err(p) => problems.push(view(src_side, p)),
                }
            }
            // Where to read each chunk from on the source (the first file of the batch that has
            // it), and, once wanted now, its slot in `missing`. Kept per chunk for the whole
            // batch, so by index into `paths` rather than a path of its own.
            let mut sources = Sources::new(&requests);
            let paths: Vec<(RelPath, usize)> = requests
                .iter()
                .map(|r| (r.path.clone(), r.manifest.chunks.len()))
                .collect();
            let clock = Instant::now();
            let results = dst.stage(requests).await.map_err(side_err(dst_side))?;
            executed.times.stage += clock.elapsed();
            let clock = Instant::now();
            // Only hashes this batch's manifests contain can be read; anything else a (possibly
            // hostile) destination asked for is ignored. A base is the destination's business: the
            // source only computes a delta against it, and the destination checks what it rebuilds.
            let mut bases: HashMap<Hash, Vec<u8>> = HashMap::new();
            // A chunk some file waits for now is supplied now, once (it fills every staged file
            // that wants it); the files left to bulk jobs are handled below.
            let mut missing: Vec<Hash> = Vec::new();
            // Files supplied now: index into `paths`, and the slots in `missing` they wait for.
            let mut now: Vec<(usize, Vec<u32>)> = Vec::new();
            // Files left to a bulk job: index into `paths`, and the chunks they wait for.
            let mut later: Vec<(usize, Vec<Hash>)> = Vec::new();
            for (file, ((path, total), result)) in paths.iter().zip(results).enumerate() {
                match result {
                    Ok(lacking) => {
                        executed.chunks_reused += total.saturating_sub(lacking.len()) as u64;
                        let mut want = Vec::with_capacity(lacking.len());
                        let mut behind_bulk = false;
                        for m in lacking {
                            if sources.get(&m.hash).is_none() {
                                continue;
                            }
                            if defer && executed.queued.contains(&(dst_side, m.hash)) {
                                behind_bulk = true;
                                continue;
                            }
                            if let Some(base) = m.base {
                                bases.entry(m.hash).or_insert(base);
                            }
                            want.push(m.hash);
                        }
                        let bytes: u64 = want
                            .iter()
                            .filter_map(|h| sources.get(h))
                            .map(|s| u64::from(s.len))
                            .sum();
                        if defer && (behind_bulk || bytes >= BULK_MIN_BYTES) {
                            later.push((file, want));
                            continue;
                        }
                        let slots = want
                            .iter()
                            .filter_map(|h| sources.slot(h, &mut missing))
                            .collect();
                        now.push((file, slots));
                    }
                    Err(NotStaged::Problem(p)) => problems.push(view(dst_side, p)),
                    Err(NotStaged::NoRoom) => {
                        no_room.insert(path.clone());
                    }
                }
            }
            let read_of = |h: &Hash, s: &Source| ChunkRead {
                path: paths[s.file as usize].0.clone(),
                chunk: vmsync_core::ChunkRef {
                    hash: *h,
                    offset: s.offset,
                    len: s.len,
                },
            };
            let mut job = BulkJob {
                actions: Vec::new(),
                reads: VecDeque::new(),
                ready: None,
                waiting: HashMap::new(),
                failed: HashSet::new(),
            };
            for (file, want) in later {
                let path = &paths[file].0;
                for h in want {
                    // Supplied now for another file: that fills this one too.
                    let Some(source) = sources.get(&h).filter(|s| s.slot == NO_SLOT) else {
                        continue;
                    };
                    let w = job.waiting.entry(h).or_default();
                    if w.is_empty() {
                        job.reads.push_back(DeltaRead {
                            read: read_of(&h, source),
                            base: bases.remove(&h),
                        });
                    }
                    w.push(path.clone());
                }
                if let Some(action) = actions.iter().find(|a| a.path == *path) {
                    job.actions.push(action.clone());
                }
                deferred_paths.insert(path.clone());
            }
            if !job.actions.is_empty() {
                executed.queued.extend(job.queued());
                executed.bulk.push(job);
            }
            // Slots of `missing` that did not arrive: the files waiting for them fail.
            let mut failed = vec![false; missing.len()];
            let mut fail = |h: &Hash| {
                if let Some(slot) = sources.get(h).and_then(|s| failed.get_mut(s.slot as usize)) {
                    *slot = true;
                }
            };
            // Chunks whose delta did not rebuild them on the destination: sent whole below.
            let mut whole: Vec<ChunkRead> = Vec::new();
            // Two stages in flight: the source reads group k+1 while the destination takes group
            // k, so neither side idles waiting for the other.
            let mut ready: Option<Vec<(ChunkRead, ChunkData)>> = None;
            for group in missing.chunks(MAX_CHUNKS_PER_READ) {
                let reads: Vec<DeltaRead> = group
                    .iter()
                    .filter_map(|h| {
                        sources.get(h).map(|s| DeltaRead {
                            read: read_of(h, s),
                            base: bases.remove(h),
                        })
                    })
                    .collect();
                let asked: Vec<ChunkRead> = reads.iter().map(|r| r.read.clone()).collect();
                let previous = ready.take();
                let (data, supplied) = tokio::join!(src.read_deltas(reads), supply(dst, previous));
                let (retry, lost) = supplied.map_err(side_err(dst_side))?;
                whole.extend(retry);
                lost.iter().for_each(&mut fail);
                let data = data.map_err(side_err(src_side))?;
                let mut batch = Vec::with_capacity(group.len());
                for (read, d) in asked.into_iter().zip(data) {
                    match d {
                        Some(d) => batch.push((read, d)),
                        None => fail(&read.chunk.hash),
                    }
                }
                ready = Some(batch);
            }
            let (retry, lost) = supply(dst, ready).await.map_err(side_err(dst_side))?;
            whole.extend(retry);
            lost.iter().for_each(&mut fail);
            // The fallback: one more round trip, only for chunks whose delta failed.
            for group in whole.chunks(MAX_CHUNKS_PER_READ) {
                let data = src
                    .read_chunks(group.to_vec())
                    .await
                    .map_err(side_err(src_side))?;
                let mut batch = Vec::with_capacity(group.len());
                for (read, d) in group.iter().zip(data) {
                    match d {
                        Some(d) => batch.push((read.clone(), ChunkData::Whole(d))),
                        None => fail(&read.chunk.hash),
                    }
                }
                let (retry, lost) = supply(dst, Some(batch)).await.map_err(side_err(dst_side))?;
                retry.iter().for_each(|r| fail(&r.chunk.hash));
                lost.iter().for_each(&mut fail);
            }
            executed.times.transfer += clock.elapsed();
            for (file, slots) in now {
                let path = &paths[file].0;
                if slots.iter().any(|&slot| failed[slot as usize]) {
                    executed.retry = true;
                    problems.push(ProblemView {
                        path: path.escaped(),
                        side: src_side.as_str().into(),
                        reason: "changed while it was being sent; will retry".into(),
                    });
                } else {
                    staged.insert(path.clone());
                }
            }
        }
        Ok(StagedFiles { staged, no_room })
    }
}

/// No slot in `missing` (yet): the chunk is not supplied in this pass.
const NO_SLOT: u32 = u32::MAX;

/// Where a stage batch's chunk is read on the source: the first of the batch's files that
/// has it (an index into the batch), at which offset.
#[derive(Clone, Copy)]
struct Source {
    file: u32,
    offset: u64,
    len: u32,
    /// Its place in the chunks supplied now, or [`NO_SLOT`].
    slot: u32,
}

/// A stage batch's chunks and where to read each, sorted by hash: about 56 bytes a chunk, no
/// path of its own (a hash map of paths took about 150).
struct Sources(Vec<(Hash, Source)>);

impl Sources {
    fn new(requests: &[StageRequest]) -> Sources {
        let mut all: Vec<(Hash, Source)> =
            Vec::with_capacity(requests.iter().map(|r| r.manifest.chunks.len()).sum());
        for (file, r) in requests.iter().enumerate() {
            let file = u32::try_from(file).unwrap_or(u32::MAX);
            all.extend(r.manifest.chunks.iter().map(|c| {
                let source = Source {
                    file,
                    offset: c.offset,
                    len: c.len,
                    slot: NO_SLOT,
                };
                (c.hash, source)
            }));
        }
        // Stable: of a chunk's copies, the first (in file and offset order) stays.
        all.sort_by_key(|a| a.0);
        all.dedup_by(|later, first| later.0 == first.0);
        all.shrink_to_fit();
        Sources(all)
    }

    fn find(&self, h: &Hash) -> Option<usize> {
        self.0.binary_search_by(|(k, _)| k.cmp(h)).ok()
    }

    fn get(&self, h: &Hash) -> Option<&Source> {
        self.find(h).map(|i| &self.0[i].1)
    }

    /// The chunk's slot in `missing`, appending it there the first time it is asked.
    fn slot(&mut self, h: &Hash, missing: &mut Vec<Hash>) -> Option<u32> {
        let i = self.find(h)?;
        let source = &mut self.0[i].1;
        if source.slot == NO_SLOT {
            source.slot = u32::try_from(missing.len()).ok()?;
            missing.push(*h);
        }
        Some(source.slot)
    }
}

/// Supplies `chunks` (if any) to `dst`. Returns the chunks to send again whole (their delta
/// did not rebuild them) and the ones that are lost (sent whole and still refused: the files
/// waiting for them fail this time).
pub(super) async fn supply<D: Endpoint>(
    dst: &mut D,
    chunks: Option<Vec<(ChunkRead, ChunkData)>>,
) -> Result<(Vec<ChunkRead>, Vec<Hash>), EndpointError> {
    let Some(chunks) = chunks.filter(|c| !c.is_empty()) else {
        return Ok((Vec::new(), Vec::new()));
    };
    let mut sent: HashMap<Hash, (ChunkRead, bool)> = HashMap::with_capacity(chunks.len());
    let mut data = Vec::with_capacity(chunks.len());
    for (read, d) in chunks {
        let is_delta = matches!(d, ChunkData::Delta(_));
        data.push((read.chunk.hash, d));
        sent.insert(read.chunk.hash, (read, is_delta));
    }
    let still_missing = dst.supply(data).await?;
    let (mut retry, mut lost) = (Vec::new(), Vec::new());
    // Only chunks of this batch count; the destination cannot add work by naming others.
    for h in still_missing {
        match sent.remove(&h) {
            Some((read, true)) => retry.push(read),
            Some((_, false)) => lost.push(h),
            None => {}
        }
    }
    Ok((retry, lost))
}

/// Removals: deletes, and a directory replaced by a non-directory (its children go first).
pub(super) fn is_removal(a: &Action) -> bool {
    a.new.is_none()
        || (matches!(a.expected, Some(Entry::Dir { .. }))
            && !matches!(a.new, Some(Entry::Dir { .. })))
}

/// Notes what an applied action removed and gained on its side, for the deletion windows.
pub(super) fn record_applied(side: Side, action: &Action, executed: &mut Executed) {
    let lost = lost_content(action.expected.as_ref(), action.new.as_ref());
    let removed_dir = action.new.is_none() && matches!(action.expected, Some(Entry::Dir { .. }));
    if let (Some(entry), true) = (&action.expected, lost.is_some() || removed_dir) {
        executed.removed.push(Removed {
            side,
            path: action.path.clone(),
            entry: entry.clone(),
            lost,
        });
    }
    let gained = action.new.as_ref().and_then(Content::of);
    if let Some(content) = gained {
        if action.expected.as_ref().and_then(Content::of).as_ref() != Some(&content) {
            executed.gained.push((side, content));
        }
    }
}

/// Keeps back the removals whose content was to move to another path on this side but has not
/// landed there (its source refused to serve it, it changed while crossing): the old copy stays
/// until the new one exists, so a move can never turn into a loss. Counted as pending: a later
/// cycle does both.
pub(super) fn hold_unlanded_moves(
    side: Side,
    removals: Vec<Action>,
    moving: &HashSet<Content>,
    problems: &mut Vec<ProblemView>,
    executed: &mut Executed,
) -> Vec<Action> {
    let landed: HashSet<&Content> = executed
        .gained
        .iter()
        .filter(|(s, _)| *s == side)
        .map(|(_, c)| c)
        .collect();
    let (go, held): (Vec<Action>, Vec<Action>) = removals.into_iter().partition(|a| {
        match lost_content(a.expected.as_ref(), a.new.as_ref()) {
            Some(c) => !moving.contains(&c) || landed.contains(&c),
            None => true,
        }
    });
    for action in held {
        executed.pending += 1;
        problems.push(ProblemView {
            path: action.path.escaped(),
            side: side.as_str().into(),
            reason: "kept until its content has landed at its new path".into(),
        });
    }
    go
}

/// Sends one batch of changes and notes how each went; with `record`, stores in the ancestor
/// what landed and is not stored yet (see `Executed::recorder`).
pub(super) async fn transition<E: Endpoint>(
    ep: &mut E,
    side: Side,
    batch: &[Action],
    problems: &mut Vec<ProblemView>,
    executed: &mut Executed,
    record: bool,
) -> Result<(), CycleError> {
    if batch.is_empty() {
        return Ok(());
    }
    let changes: Vec<Change> = batch
        .iter()
        .map(|a| Change {
            path: a.path.clone(),
            expected: a.expected.clone(),
            new: a.new.clone(),
        })
        .collect();
    if let Some(rec) = &executed.recorder {
        let in_flight: Vec<InFlight> = batch
            .iter()
            .map(|a| (side, a.path.clone(), a.new.clone()))
            .collect();
        rec.pending.append(&in_flight);
    }
    let clock = Instant::now();
    let outcomes = match ep.transition(changes).await {
        Ok(o) => o,
        Err(e) => {
            executed
                .unconfirmed
                .extend(batch.iter().map(|a| (side, a.path.clone(), a.new.clone())));
            return Err(side_err(side)(e));
        }
    };
    executed.times.transition += clock.elapsed();
    for (action, outcome) in batch.iter().zip(outcomes) {
        match outcome {
            Outcome::Applied => {
                if let Some(progress) = executed.progress.as_mut() {
                    progress.applied(action);
                }
                record_applied(side, action, executed);
                executed
                    .applied
                    .push((action.path.clone(), action.new.clone()));
            }
            // Changed since the scan: the next cycle sees the new state and decides again.
            Outcome::Changed(_) => executed.retry = true,
            Outcome::Failed(reason) => {
                executed.pending += 1;
                problems.push(ProblemView {
                    path: action.path.escaped(),
                    side: side.as_str().into(),
                    reason: escape_bytes(reason.as_bytes()),
                });
            }
        }
    }
    if let Some(progress) = &executed.progress {
        progress.publish();
    }
    // What is stored is always a prefix of `applied` (the end of the cycle stores the rest):
    // everything from the end of that prefix on. Only for the guest's own batches: every
    // ancestor write follows a mark on the guest (see `commit_ancestor`), and here the
    // destination is the endpoint at hand.
    if record && side == Side::Guest && executed.applied.len() > executed.recorded {
        if let Some(rec) = executed.recorder.as_mut() {
            let unstored = executed
                .applied
                .get(executed.recorded..)
                .unwrap_or_default();
            let rows: Vec<_> = unstored.iter().map(|(p, e)| (p, e.as_ref())).collect();
            match mark_and_record(ep, &rec.ancestor, rec.generation, &rows, false).await {
                Ok(next) => {
                    rec.generation = next;
                    rec.pending.clear();
                    executed.recorded = executed.applied.len();
                }
                Err(e) => {
                    tracing::warn!(share = %rec.share, "recording a batch in the ancestor: {e}")
                }
            }
        }
    }
    Ok(())
}

/// Every ancestor write: the guest first notes the generation after `current`, then the
/// ancestor rows and that generation are recorded in one transaction, so whatever guest state
/// the ancestor relies on is stamped before the host relies on it (see `docs/safety.md`,
/// "Snapshot reverts"). `replace`: the rows are the whole ancestor. Returns the new generation;
/// nothing is recorded if the guest could not note it.
pub(super) async fn mark_and_record<G: Endpoint>(
    guest: &mut G,
    ancestor: &Ancestor,
    current: Generation,
    rows: &[(&RelPath, Option<&Entry>)],
    replace: bool,
) -> Result<Generation, CycleError> {
    let next = Generation {
        value: current.value.saturating_add(1),
        merge_pending: false,
    };
    guest
        .mark(next.value)
        .await
        .map_err(side_err(Side::Guest))?;
    ancestor.commit(rows, replace, next)?;
    Ok(next)
}

/// Records each batch a transition applied on the guest in the ancestor as soon as it lands
/// (see `Executed::recorder`), with the generation it marks.
pub(super) struct Recorder {
    pub(super) ancestor: Ancestor,
    pub(super) share: String,
    pub(super) generation: Generation,
    /// Notes the guest batch in flight on disk until it is recorded.
    pub(super) pending: PendingBatch,
}
