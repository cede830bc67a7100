//! [`RemoteEndpoint`]: the `Endpoint` trait over a session, for one share. Each method is one
//! request; its response is checked against the request (right kind, one answer per item, chunk
//! ids and lengths as asked, chunk data hashing to its id) before the controller sees it.
//!
//! A response that fails those checks is a guest breaking the protocol: the call returns
//! `EndpointError::Protocol` and the whole session is closed, since nothing else the guest says
//! on it can be trusted either. Chunk data sent by `supply` is compressed here, at the level set
//! with [`RemoteEndpoint::with_zstd_level`].
//!
//! Chunk deltas travel in `Stage` (the guest's bases), `ReadChunks` (a read with a base may
//! be answered with a delta) and `Supply` (whole chunks or deltas).
//!
//! Manifest edits: a `Stage` of a big file the guest already holds at that path (as this
//! session saw it, see `memory`) carries the manifest as edits against the old one when that
//! is smaller. A guest that cannot rebuild it answers `BaseUnknown` for that file, and this
//! side stages it again with the full manifest: a second round trip that only a stale memory
//! costs.

use super::client::{PendingCall, Session};
use super::memory::ManifestMemory;
use super::stats::content_bytes;
use crate::error::{error_chain, TransportError};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use vmsync_core::edits;
use vmsync_core::endpoint::{
    Change, ChangeHints, ChunkData, ChunkRead, DeltaRead, Endpoint, EndpointError, MissingChunk,
    NotStaged, Outcome, Problem, ScanOptions, ScanReport, ScanScope, StageRequest,
};
use vmsync_core::progress::SyncState;
use vmsync_core::text::escape_text;
use vmsync_core::{ChunkRef, FileMeta, Hash, Manifest, RelPath};
use vmsync_protocol::chunk::{level_for_batch, DEFAULT_ZSTD_LEVEL};
use vmsync_protocol::limits::{CHUNK_MAX_BYTES, MAX_SCAN_ENTRIES};
use vmsync_protocol::listing;
use vmsync_protocol::messages::{BasedRead, ManifestForm, StageAnswer, StageFile};
use vmsync_protocol::{
    decode_chunk, decode_delta, encode_content_owned, RequestBody, ResponseBody, WireChunk,
    WireContent,
};

/// At most this many supplies of whole chunks in flight unanswered per endpoint: enough that
/// the guest always has the next one at hand, few enough to bound what waits in its queue
/// (each is at most `MAX_BATCH_CHUNKS` chunks).
const MAX_UNANSWERED_SUPPLIES: usize = 3;

/// One share of a remote guest, as an `Endpoint`. Cheap to create; many may share a session.
#[derive(Debug)]
pub struct RemoteEndpoint {
    session: Session,
    share: u16,
    zstd_level: i32,
    /// Supplies of whole chunks sent and not answered yet, oldest first (see `supply`): the
    /// next other call is sent first, then these answers awaited.
    unanswered: Mutex<VecDeque<PendingCall>>,
    /// Manifests the last targeted scan brought, for `manifests` to answer from.
    scanned: HashMap<RelPath, Manifest>,
    /// The last full listing the guest sent, and its token: the next full scan comes as the
    /// difference against it. Packed (`vmsync_protocol::listing::Packed`) while it waits.
    listing: Option<Listing>,
    /// The guest's big manifests as this endpoint saw them (see `stage`).
    memory: ManifestMemory,
}

/// A full listing received earlier: its token and entries.
type Listing = (u64, listing::Packed);

impl Clone for RemoteEndpoint {
    /// A clone shares the session, not the unanswered supplies (they stay with the calls they
    /// precede) nor the caches: a clone is for long-polls, which need neither.
    fn clone(&self) -> Self {
        RemoteEndpoint {
            session: self.session.clone(),
            share: self.share,
            zstd_level: self.zstd_level,
            unanswered: Mutex::new(VecDeque::new()),
            scanned: HashMap::new(),
            listing: None,
            memory: ManifestMemory::default(),
        }
    }
}

impl Session {
    /// A remote `Endpoint` for share `index` of the `Hello`.
    pub fn endpoint(&self, index: u16) -> Result<RemoteEndpoint, TransportError> {
        RemoteEndpoint::new(self.clone(), index)
    }
}

impl RemoteEndpoint {
    /// The endpoint for share `share` (an index into the `Hello`'s shares).
    pub fn new(session: Session, share: u16) -> Result<Self, TransportError> {
        let count = session.shares().len();
        if usize::from(share) >= count {
            return Err(TransportError::NoSuchShare {
                index: share,
                count,
            });
        }
        Ok(RemoteEndpoint {
            session,
            share,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            unanswered: Mutex::new(VecDeque::new()),
            scanned: HashMap::new(),
            listing: None,
            memory: ManifestMemory::default(),
        })
    }

    /// The zstd level for chunk data this side sends (`supply`); 0 never compresses.
    pub fn with_zstd_level(mut self, level: i32) -> Self {
        self.zstd_level = level;
        self
    }

    pub fn share(&self) -> u16 {
        self.share
    }

    /// The share's name, as sent in the `Hello`.
    pub fn share_name(&self) -> &str {
        self.session
            .shares()
            .get(usize::from(self.share))
            .map_or("", String::as_str)
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    async fn call(
        &self,
        body: RequestBody,
        content_bytes: u64,
    ) -> Result<ResponseBody, EndpointError> {
        let pending = self.session.send(self.share, body, content_bytes).await?;
        self.settle().await?;
        pending.wait().await
    }

    /// Waits for the answers to the supplies sent earlier and not awaited (see `supply`), if
    /// any. A failure is this call's: the guest handles requests in order, so whatever was
    /// sent after it went ahead without those chunks and is best not trusted either.
    async fn settle(&self) -> Result<(), EndpointError> {
        self.settle_down_to(0).await
    }

    /// Awaits the oldest unanswered supplies until at most `left` remain.
    async fn settle_down_to(&self, left: usize) -> Result<(), EndpointError> {
        loop {
            let pending = {
                let mut unanswered = self
                    .unanswered
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if unanswered.len() <= left {
                    return Ok(());
                }
                unanswered.pop_front()
            };
            let Some(pending) = pending else {
                return Ok(());
            };
            match pending.wait().await? {
                ResponseBody::Supplied(Ok(missing)) => {
                    if let Some(h) = missing.first() {
                        return Err(self.session.violation(format!(
                            "says chunk {h:?} is still missing, which was supplied whole"
                        )));
                    }
                }
                ResponseBody::Supplied(Err(e)) => return Err(e.into()),
                other => return Err(self.wrong_kind("Supply", &other)),
            }
        }
    }

    /// The wire form of `req`: edits against the manifest the guest holds at that path
    /// where this session remembers one and the edits are smaller; in full otherwise (edits
    /// carry no hard links: a linked file always goes in full).
    fn stage_file(&self, req: StageRequest, edit: bool) -> StageFile {
        let held = if edit && req.manifest.links.is_empty() {
            self.memory.held(&req.path)
        } else {
            None
        };
        if let Some(old) = held {
            let new = edits::refs(&req.manifest);
            let e = edits::diff(&old.refs, &new);
            if edits::encoded_size(&e) < edits::full_size(new.len()) {
                return StageFile {
                    path: req.path,
                    meta: req.meta,
                    manifest: ManifestForm::Edits {
                        base_size: old.size,
                        base_digest: old.digest,
                        edits: e,
                    },
                };
            }
        }
        StageFile::from(req)
    }

    /// One `Stage` round trip.
    async fn stage_round(&self, files: Vec<StageFile>) -> Result<Vec<StageAnswer>, EndpointError> {
        let asked = files.len();
        match self.call(RequestBody::Stage { files }, 0).await? {
            ResponseBody::Staged(Ok(staged)) => {
                self.check_count("files to stage", asked, &staged)?;
                Ok(staged)
            }
            ResponseBody::Staged(Err(e)) => Err(e.into()),
            other => Err(self.wrong_kind("Stage", &other)),
        }
    }

    fn wrong_kind(&self, asked: &str, got: &ResponseBody) -> EndpointError {
        self.session
            .violation(format!("answered {asked} with {}", got.kind().name()))
    }

    fn check_count<T>(&self, what: &str, asked: usize, got: &[T]) -> Result<(), EndpointError> {
        if got.len() != asked {
            return Err(self.session.violation(format!(
                "answered {asked} {what} with {} results",
                got.len()
            )));
        }
        Ok(())
    }

    /// Verifies one chunk of a `ReadChunks` answer against what was asked.
    fn receive_chunk(&self, read: &ChunkRef, chunk: WireChunk) -> Result<Vec<u8>, EndpointError> {
        if chunk.hash != read.hash || chunk.len != read.len {
            return Err(self.session.violation(format!(
                "sent chunk {:?} ({} bytes) for a read of {:?} ({} bytes)",
                chunk.hash, chunk.len, read.hash, read.len
            )));
        }
        match decode_chunk(chunk) {
            Ok((_, data)) => Ok(data),
            Err(e) => Err(self
                .session
                .violation(format!("sent a bad chunk: {}", error_chain(&e)))),
        }
    }
}

impl RemoteEndpoint {
    /// A full scan whose listing travels as the difference against the last one this session
    /// received for the share (`vmsync_protocol::listing`): a no-op cycle of a large share
    /// moves a few bytes instead of its whole listing.
    async fn scan_full(&mut self, options: ScanOptions) -> Result<ScanReport, EndpointError> {
        let last = self.listing.take();
        let base = last.as_ref().map(|(token, _)| *token);
        let delta = match self
            .call(RequestBody::ScanFull { options, base }, 0)
            .await?
        {
            ResponseBody::ScanDelta(result) => result?,
            other => return Err(self.wrong_kind("ScanFull", &other)),
        };
        let last =
            last.and_then(|(token, packed)| Some((token, listing::unpack_entries(&packed)?)));
        let entries = match (delta.base, last) {
            (None, _) => delta.changed,
            (Some(b), Some((token, old))) if b == token => {
                listing::apply(&old, delta.changed, &delta.removed, MAX_SCAN_ENTRIES).ok_or_else(
                    || {
                        self.session.violation(format!(
                            "sent a listing difference that does not fit (or makes the listing \
                             longer than {MAX_SCAN_ENTRIES} entries)"
                        ))
                    },
                )?
            }
            (Some(b), _) => {
                return Err(self.session.violation(format!(
                    "sent a listing relative to {b}, which was never asked for"
                )));
            }
        };
        // A listing that cannot be packed is not kept: the next one is asked for whole.
        self.listing = listing::pack_entries(&entries).map(|packed| (delta.token, packed));
        Ok(ScanReport {
            root: delta.root,
            entries,
            problems: delta.problems.into_iter().map(Problem::from).collect(),
            ignored: delta.ignored,
            generation: delta.generation,
        })
    }
}

impl Endpoint for RemoteEndpoint {
    async fn changes(&mut self) -> Result<ChangeHints, EndpointError> {
        loop {
            let body = RequestBody::PollChanges {
                max_wait_ms: crate::limits::POLL_WAIT_MS,
            };
            // A long-poll is answered out of order: it never waits for an unanswered supply.
            match self.session.call(self.share, body, 0).await? {
                // Nothing within the poll window: ask again.
                ResponseBody::Changes(Ok(hints)) if hints.is_empty() => continue,
                ResponseBody::Changes(result) => return result.map_err(EndpointError::from),
                other => return Err(self.wrong_kind("PollChanges", &other)),
            }
        }
    }

    async fn scan(
        &mut self,
        scope: ScanScope,
        options: ScanOptions,
    ) -> Result<ScanReport, EndpointError> {
        self.scanned.clear();
        if scope == ScanScope::Full {
            return self.scan_full(options).await;
        }
        match self.call(RequestBody::Scan { scope, options }, 0).await? {
            ResponseBody::Scanned(Ok(scanned)) => {
                let (report, manifests) = scanned.into_parts();
                // Checked against the file's metadata when `manifests` uses one.
                self.scanned = manifests.into_iter().collect();
                Ok(report)
            }
            ResponseBody::Scanned(Err(e)) => Err(e.into()),
            other => Err(self.wrong_kind("Scan", &other)),
        }
    }

    async fn manifests(
        &mut self,
        files: Vec<(RelPath, FileMeta)>,
    ) -> Result<Vec<Result<Manifest, Problem>>, EndpointError> {
        // What the last targeted scan brought answers without a round trip; a manifest that
        // does not fit its file's metadata is asked for again, like any other.
        let mut answers: Vec<Option<Result<Manifest, Problem>>> = files
            .iter()
            .map(|(path, meta)| {
                self.scanned
                    .get(path)
                    .filter(|m| m.validate(meta, CHUNK_MAX_BYTES).is_ok())
                    .map(|m| Ok(m.clone()))
            })
            .collect();
        let ask: Vec<(RelPath, FileMeta)> = files
            .iter()
            .zip(&answers)
            .filter(|(_, a)| a.is_none())
            .map(|(f, _)| f.clone())
            .collect();
        if !ask.is_empty() {
            let asked = ask.len();
            let fetched = match self.call(RequestBody::Manifests { files: ask }, 0).await? {
                ResponseBody::Manifests(Ok(manifests)) => {
                    self.check_count("manifest requests", asked, &manifests)?;
                    manifests
                }
                ResponseBody::Manifests(Err(e)) => return Err(e.into()),
                other => return Err(self.wrong_kind("Manifests", &other)),
            };
            let mut fetched = fetched.into_iter();
            for slot in answers.iter_mut().filter(|a| a.is_none()) {
                *slot = fetched.next().map(|a| a.map_err(Problem::from));
            }
        }
        let mut out = Vec::with_capacity(files.len());
        for ((path, _), answer) in files.iter().zip(answers) {
            let answer = answer.ok_or_else(|| {
                EndpointError::Protocol("manifests answered fewer files than asked".into())
            })?;
            if let Ok(m) = &answer {
                self.memory.hold(path, m);
            }
            out.push(answer);
        }
        Ok(out)
    }

    async fn read_chunks(
        &mut self,
        reads: Vec<ChunkRead>,
    ) -> Result<Vec<Option<Vec<u8>>>, EndpointError> {
        let reads = reads
            .into_iter()
            .map(|read| DeltaRead { read, base: None })
            .collect();
        self.read_deltas(reads)
            .await?
            .into_iter()
            .map(|data| match data {
                None => Ok(None),
                Some(ChunkData::Whole(d)) => Ok(Some(d)),
                // Only a read with a base may be answered with a delta (checked below).
                Some(ChunkData::Delta(_)) => Err(self
                    .session
                    .violation("sent a delta for a read without a base".into())),
            })
            .collect()
    }

    async fn read_deltas(
        &mut self,
        reads: Vec<DeltaRead>,
    ) -> Result<Vec<Option<ChunkData>>, EndpointError> {
        let asked: Vec<(ChunkRef, bool)> = reads
            .iter()
            .map(|r| (r.read.chunk, r.base.is_some()))
            .collect();
        let reads = reads
            .into_iter()
            .map(|r| BasedRead {
                read: r.read,
                base: r.base,
            })
            .collect();
        let chunks = match self.call(RequestBody::ReadChunks { reads }, 0).await? {
            ResponseBody::Chunks(Ok(chunks)) => chunks,
            ResponseBody::Chunks(Err(e)) => return Err(e.into()),
            other => return Err(self.wrong_kind("ReadChunks", &other)),
        };
        self.check_count("chunk reads", asked.len(), &chunks)?;
        self.session
            .stats_handle()
            .add_content_received(content_bytes(chunks.iter().flatten()));
        asked
            .iter()
            .zip(chunks)
            .map(|((read, based), content)| match content {
                None => Ok(None),
                Some(WireContent::Whole(c)) => self
                    .receive_chunk(read, c)
                    .map(|d| Some(ChunkData::Whole(d))),
                Some(WireContent::Delta(d)) => {
                    if !based || d.hash != read.hash {
                        return Err(self.session.violation(format!(
                            "sent a delta for chunk {:?} to a read of {:?} {} a base",
                            d.hash,
                            read.hash,
                            if *based { "with" } else { "without" }
                        )));
                    }
                    // What the delta rebuilds is checked by the destination that applies it.
                    match decode_delta(d) {
                        Ok((_, delta)) => Ok(Some(ChunkData::Delta(delta))),
                        Err(e) => Err(self
                            .session
                            .violation(format!("sent a bad delta: {}", error_chain(&e)))),
                    }
                }
            })
            .collect()
    }

    async fn stage(
        &mut self,
        files: Vec<StageRequest>,
    ) -> Result<Vec<Result<Vec<MissingChunk>, NotStaged>>, EndpointError> {
        {
            for f in &files {
                self.memory.staged(&f.path, &f.manifest);
            }
        }
        let full: Vec<StageRequest> = files.clone();
        let wire: Vec<StageFile> = files
            .into_iter()
            .map(|f| self.stage_file(f, true))
            .collect();
        let edited: Vec<bool> = wire
            .iter()
            .map(|f| matches!(f.manifest, ManifestForm::Edits { .. }))
            .collect();
        let mut answers = self.stage_round(wire).await?;
        let baseless =
            (0..answers.len()).find(|&i| answers[i] == StageAnswer::BaseUnknown && !edited[i]);
        if let Some(i) = baseless {
            return Err(self.session.violation(format!(
                "answered BaseUnknown for file {i}, whose manifest was sent in full"
            )));
        }
        // Edits the guest could not rebuild: once more, in full.
        let again: Vec<usize> = (0..answers.len())
            .filter(|&i| answers[i] == StageAnswer::BaseUnknown)
            .collect();
        if !again.is_empty() {
            let retry = again
                .iter()
                .filter_map(|&i| full.get(i).cloned())
                .map(|f| self.stage_file(f, false))
                .collect();
            let second = self.stage_round(retry).await?;
            for (i, answer) in again.into_iter().zip(second) {
                answers[i] = answer;
            }
        }
        answers
            .into_iter()
            .map(|a| match a {
                StageAnswer::Missing(missing) => Ok(Ok(missing)),
                StageAnswer::Problem(p) => Ok(Err(NotStaged::Problem(p.into()))),
                StageAnswer::NoRoom => Ok(Err(NotStaged::NoRoom)),
                StageAnswer::BaseUnknown => Err(self
                    .session
                    .violation("answered a full manifest with BaseUnknown".into())),
            })
            .collect()
    }

    async fn supply(&mut self, chunks: Vec<(Hash, ChunkData)>) -> Result<Vec<Hash>, EndpointError> {
        let raw: usize = chunks.iter().map(|(_, d)| d.len()).sum();
        let level = level_for_batch(self.zstd_level, raw);
        let sent: HashSet<Hash> = chunks.iter().map(|(h, _)| *h).collect();
        let whole = chunks.iter().all(|(_, d)| matches!(d, ChunkData::Whole(_)));
        // Consumed: raw data moves into the message instead of being copied beside it.
        let wire: Vec<WireContent> = chunks
            .into_iter()
            .map(|(hash, data)| encode_content_owned(hash, data, level))
            .collect();
        let content = content_bytes(&wire);
        if whole {
            // Whole chunks are never left missing (the guest verifies each and refuses a bad
            // one with an error), so the answer says nothing the controller needs now: send,
            // and collect it behind the next call (usually the transition these chunks
            // complete), one round trip less per live edit. A few such supplies may be in
            // flight at once, so the guest takes the next while it writes this one.
            self.settle_down_to(MAX_UNANSWERED_SUPPLIES - 1).await?;
            let pending = self
                .session
                .send(self.share, RequestBody::Supply { chunks: wire }, content)
                .await?;
            self.unanswered
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push_back(pending);
            return Ok(Vec::new());
        }
        let missing = match self
            .call(RequestBody::Supply { chunks: wire }, content)
            .await?
        {
            ResponseBody::Supplied(result) => result?,
            other => return Err(self.wrong_kind("Supply", &other)),
        };
        if let Some(h) = missing.iter().find(|h| !sent.contains(h)) {
            return Err(self.session.violation(format!(
                "says chunk {h:?} is still missing, which was not supplied"
            )));
        }
        Ok(missing)
    }

    async fn mark(&mut self, generation: u64) -> Result<(), EndpointError> {
        match self.call(RequestBody::Mark { generation }, 0).await? {
            ResponseBody::Marked(result) => result.map_err(EndpointError::from),
            other => Err(self.wrong_kind("Mark", &other)),
        }
    }

    async fn note_sync(&mut self, state: SyncState) -> Result<(), EndpointError> {
        match self.call(RequestBody::NoteSync(state), 0).await? {
            ResponseBody::Noted(result) => result.map_err(EndpointError::from),
            other => Err(self.wrong_kind("NoteSync", &other)),
        }
    }

    async fn transition(&mut self, changes: Vec<Change>) -> Result<Vec<Outcome>, EndpointError> {
        let asked = changes.len();
        let landing: Vec<(RelPath, Option<Hash>)> = changes
            .iter()
            .map(|c| {
                let digest = match &c.new {
                    Some(vmsync_core::Entry::File(m)) => Some(m.digest),
                    _ => None,
                };
                (c.path.clone(), digest)
            })
            .collect();
        match self.call(RequestBody::Transition { changes }, 0).await? {
            ResponseBody::Transitioned(Ok(outcomes)) => {
                self.check_count("changes", asked, &outcomes)?;
                for ((path, digest), outcome) in landing.iter().zip(&outcomes) {
                    if *outcome == Outcome::Applied {
                        self.memory.applied(path, *digest);
                    }
                }
                // The guest's reasons reach logs and `status`: escaped (vmsync_core::text).
                let outcomes = outcomes
                    .into_iter()
                    .map(|o| match o {
                        Outcome::Failed(reason) => Outcome::Failed(escape_text(&reason)),
                        other => other,
                    })
                    .collect();
                Ok(outcomes)
            }
            ResponseBody::Transitioned(Err(e)) => Err(e.into()),
            other => Err(self.wrong_kind("Transition", &other)),
        }
    }
}
