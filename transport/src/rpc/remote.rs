//! [`RemoteEndpoint`]: the `Endpoint` trait over a session, for one share. Each method is one
//! request; its response is checked against the request (right kind, one answer per item, chunk
//! ids and lengths as asked, chunk data hashing to its id) before the controller sees it.
//!
//! A response that fails those checks is a guest breaking the protocol: the call returns
//! `EndpointError::Protocol` and the whole session is closed, since nothing else the guest says
//! on it can be trusted either. Chunk data sent by `supply` is compressed here, at the level set
//! with [`RemoteEndpoint::with_zstd_level`].

use super::client::{Listing, PendingCall, Session};
use super::stats::chunk_bytes;
use crate::error::{error_chain, TransportError};
use std::sync::Arc;
use vmsync_core::endpoint::{
    Change, ChangeHints, ChunkRead, Endpoint, EndpointError, Outcome, Problem, ScanOptions,
    ScanReport, ScanScope, StageRequest,
};
use vmsync_core::{ChunkRef, FileMeta, Hash, Manifest, RelPath};
use vmsync_protocol::chunk::{level_for_batch, DEFAULT_ZSTD_LEVEL};
use vmsync_protocol::listing;
use vmsync_protocol::{decode_chunk, encode_chunk, RequestBody, ResponseBody, WireChunk};

/// One share of a remote guest, as an `Endpoint`. Cheap to create; many may share a session.
#[derive(Debug)]
pub struct RemoteEndpoint {
    session: Session,
    share: u16,
    zstd_level: i32,
    /// The last `supply`, sent and not yet answered: its answer is collected by the next call,
    /// after that call's request is on its way (see [`Endpoint::supply`] below).
    unanswered: Option<PendingCall>,
}

impl Clone for RemoteEndpoint {
    /// A clone shares the session, not the unanswered supply.
    fn clone(&self) -> Self {
        RemoteEndpoint {
            session: self.session.clone(),
            share: self.share,
            zstd_level: self.zstd_level,
            unanswered: None,
        }
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
            unanswered: None,
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

    /// Sends one request; collects the answer of an unanswered `supply` sent before it (the
    /// guest handles them in order), then this request's answer.
    async fn call(
        &mut self,
        body: RequestBody,
        content_bytes: u64,
    ) -> Result<ResponseBody, EndpointError> {
        let pending = self.session.send(self.share, body, content_bytes).await?;
        self.settle().await?;
        pending.wait().await
    }

    /// Collects the answer of the unanswered `supply`, if any: its error, if it failed.
    async fn settle(&mut self) -> Result<(), EndpointError> {
        let Some(pending) = self.unanswered.take() else {
            return Ok(());
        };
        match pending.wait().await? {
            ResponseBody::Supply(result) => result,
            other => Err(self.wrong_kind("Supply", &other)),
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
        let last: Option<Listing> = self
            .session
            .inner
            .listings
            .lock()
            .ok()
            .and_then(|l| l.get(&self.share).cloned());
        let base = last.as_ref().map(|(token, _)| *token);
        let delta = match self
            .call(RequestBody::ScanFull { options, base }, 0)
            .await?
        {
            ResponseBody::ScanDelta(result) => result?,
            other => return Err(self.wrong_kind("ScanFull", &other)),
        };
        let entries = match (delta.base, last) {
            (None, _) => delta.changed,
            (Some(b), Some((token, old))) if b == token => {
                listing::apply(&old, delta.changed, &delta.removed).ok_or_else(|| {
                    self.session
                        .violation("sent a listing difference that does not fit".into())
                })?
            }
            (Some(b), _) => {
                return Err(self.session.violation(format!(
                    "sent a listing relative to {b}, which was never asked for"
                )));
            }
        };
        if let Ok(mut l) = self.session.inner.listings.lock() {
            l.insert(self.share, (delta.token, Arc::new(entries.clone())));
        }
        Ok(ScanReport {
            root: delta.root,
            entries,
            problems: delta.problems,
            ignored: delta.ignored,
        })
    }
}

impl Endpoint for RemoteEndpoint {
    async fn changes(&mut self) -> Result<ChangeHints, EndpointError> {
        loop {
            let body = RequestBody::PollChanges {
                max_wait_ms: crate::limits::POLL_WAIT_MS,
            };
            match self.call(body, 0).await? {
                // Nothing within the poll window: ask again.
                ResponseBody::Changes(Ok(hints)) if hints.is_empty() => continue,
                ResponseBody::Changes(result) => return result,
                other => return Err(self.wrong_kind("PollChanges", &other)),
            }
        }
    }

    async fn scan(
        &mut self,
        scope: ScanScope,
        options: ScanOptions,
    ) -> Result<ScanReport, EndpointError> {
        if scope == ScanScope::Full {
            return self.scan_full(options).await;
        }
        match self.call(RequestBody::Scan { scope, options }, 0).await? {
            ResponseBody::Scan(result) => result,
            other => Err(self.wrong_kind("Scan", &other)),
        }
    }

    async fn manifests(
        &mut self,
        files: Vec<(RelPath, FileMeta)>,
    ) -> Result<Vec<Result<Manifest, Problem>>, EndpointError> {
        let asked = files.len();
        match self.call(RequestBody::Manifests { files }, 0).await? {
            ResponseBody::Manifests(Ok(manifests)) => {
                self.check_count("manifest requests", asked, &manifests)?;
                Ok(manifests)
            }
            ResponseBody::Manifests(Err(e)) => Err(e),
            other => Err(self.wrong_kind("Manifests", &other)),
        }
    }

    async fn read_chunks(
        &mut self,
        reads: Vec<ChunkRead>,
    ) -> Result<Vec<Option<Vec<u8>>>, EndpointError> {
        let asked: Vec<ChunkRef> = reads.iter().map(|r| r.chunk).collect();
        let chunks = match self.call(RequestBody::ReadChunks { reads }, 0).await? {
            ResponseBody::ReadChunks(Ok(chunks)) => chunks,
            ResponseBody::ReadChunks(Err(e)) => return Err(e),
            other => return Err(self.wrong_kind("ReadChunks", &other)),
        };
        self.check_count("chunk reads", asked.len(), &chunks)?;
        self.session
            .stats_handle()
            .add_content_received(chunk_bytes(chunks.iter().flatten()));
        asked
            .iter()
            .zip(chunks)
            .map(|(read, chunk)| chunk.map(|c| self.receive_chunk(read, c)).transpose())
            .collect()
    }

    async fn stage(
        &mut self,
        files: Vec<StageRequest>,
    ) -> Result<Vec<Result<Vec<Hash>, Problem>>, EndpointError> {
        let asked = files.len();
        match self.call(RequestBody::Stage { files }, 0).await? {
            ResponseBody::Stage(Ok(staged)) => {
                self.check_count("files to stage", asked, &staged)?;
                Ok(staged)
            }
            ResponseBody::Stage(Err(e)) => Err(e),
            other => Err(self.wrong_kind("Stage", &other)),
        }
    }

    async fn supply(&mut self, chunks: Vec<(Hash, Vec<u8>)>) -> Result<(), EndpointError> {
        let level = self.zstd_level;
        let raw: usize = chunks.iter().map(|(_, d)| d.len()).sum();
        let chunks: Vec<WireChunk> = chunks
            .iter()
            .map(|(hash, data)| encode_chunk(*hash, data, level_for_batch(level, raw)))
            .collect();
        let content = chunk_bytes(&chunks);
        // Not waited for: what follows a supply (the next supply, the transition) is sent
        // right behind it, and its answer, an error included, is collected by that next call.
        // This saves a round trip per batch; a failed supply fails the call after it.
        let pending = self
            .session
            .send(self.share, RequestBody::Supply { chunks }, content)
            .await?;
        self.settle().await?;
        self.unanswered = Some(pending);
        Ok(())
    }

    async fn transition(&mut self, changes: Vec<Change>) -> Result<Vec<Outcome>, EndpointError> {
        let asked = changes.len();
        match self.call(RequestBody::Transition { changes }, 0).await? {
            ResponseBody::Transition(Ok(outcomes)) => {
                self.check_count("changes", asked, &outcomes)?;
                Ok(outcomes)
            }
            ResponseBody::Transition(Err(e)) => Err(e),
            other => Err(self.wrong_kind("Transition", &other)),
        }
    }
}
