//! The guest's side of a session: answer the handshake, then serve requests on the shares it
//! opened by calling a local `Endpoint` for each.
//!
//! State machine. Before the handshake only `Hello` is accepted (anything else, or nothing within
//! the handshake timeout, ends the connection). A `Hello` that asks for something we do not
//! speak or export gets a `Refused` with the reason, then the connection ends. After `Welcome`,
//! only `Request`s are accepted: a second `Hello`, a `Response`, `Welcome` or `Refused` from the
//! host, a share index out of range, or more than `MAX_OUTSTANDING_REQUESTS` unanswered requests
//! is a protocol violation and ends the session.
//!
//! Concurrency. A reader task decodes requests, answers `Ping` at once and queues the rest; a
//! writer task sends responses; requests are served one at a time, in order, by `serve` itself
//! (the local endpoint is `&mut`). Because pings bypass the queue, a long request does not look
//! like a dead guest to the host. An endpoint call in progress is never cancelled midway by the
//! connection's end; the session ends right after it.

use super::framing::{self, Reader, Writer};
use super::stats::{content_bytes, Stats};
use super::told::{Kept, Listing, Told};
use crate::error::{error_chain, TransportError};
use crate::limits::{
    HANDSHAKE_TIMEOUT_MS, PEER_SILENCE_LIMIT_MS, POLL_WAIT_MS, WRITE_QUEUE_MESSAGES,
};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::{JoinError, JoinHandle};
use vmsync_core::edits;
use vmsync_core::endpoint::{
    ChangeHints, ChunkData, DeltaRead, Endpoint, EndpointError, NotStaged, ScanOptions, ScanScope,
    StageRequest,
};
use vmsync_core::path::escape_bytes;
use vmsync_core::FileMeta;
use vmsync_core::{Entry, RelPath};
use vmsync_protocol::chunk::{level_for_batch, DEFAULT_ZSTD_LEVEL};
use vmsync_protocol::handshake::{accept_hello, welcome, LocalParams};
use vmsync_protocol::limits::CHUNK_MAX_BYTES;
use vmsync_protocol::limits::{
    MAX_HANDSHAKE_BYTES, MAX_MESSAGE_BYTES, MAX_OUTSTANDING_REQUESTS, MAX_REASON_BYTES,
};
use vmsync_protocol::listing;
use vmsync_protocol::messages::{
    ManifestForm, ScanDelta, Scanned, StageAnswer, StageFile, WireError, WireProblem,
    SCAN_MANIFESTS_MAX, SCAN_MANIFEST_MAX_FILE_BYTES,
};
use vmsync_protocol::{
    encode_content_owned, encode_message, unpack_content, CodecError, Message, Refused, Request,
    RequestBody, RequestKind, Response, ResponseBody, ShareOpen,
};

/// How a server session behaves. `Default` uses [`crate::limits`] and this build's protocol
/// parameters.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Versions, chunker parameters and features this guest speaks.
    pub local: LocalParams,
    /// zstd level for chunk data this side sends (`ReadChunks` answers); 0 never compresses.
    pub zstd_level: i32,
    pub handshake_timeout: Duration,
    pub silence_limit: Duration,
    /// Counters for this connection; keep a clone to read them while it runs.
    pub stats: Arc<Stats>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            local: LocalParams::default(),
            zstd_level: DEFAULT_ZSTD_LEVEL,
            handshake_timeout: Duration::from_millis(HANDSHAKE_TIMEOUT_MS),
            silence_limit: Duration::from_millis(PEER_SILENCE_LIMIT_MS),
            stats: Arc::new(Stats::default()),
        }
    }
}

/// Serves one connection with the default [`ServerConfig`]. See [`serve_with`].
pub async fn serve<S, E, F>(
    stream: S,
    exports: F,
    guest_version: &str,
) -> Result<(), TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    E: Endpoint + Clone + 'static,
    F: Fn(&ShareOpen) -> Result<E, String>,
{
    serve_with(stream, exports, guest_version, ServerConfig::default()).await
}

/// Serves one connection: handshake, then requests until the host disconnects (`Ok`) or
/// something goes wrong (`Err`). `exports` maps each share the host opens to a local endpoint,
/// or to the refusal reason (use `vmsync_protocol::handshake::share_not_exported` for a share
/// this guest does not export). Must be called within a tokio runtime.
pub async fn serve_with<S, E, F>(
    stream: S,
    exports: F,
    guest_version: &str,
    config: ServerConfig,
) -> Result<(), TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    E: Endpoint + Clone + 'static,
    F: Fn(&ShareOpen) -> Result<E, String>,
{
    let stats = config.stats.clone();
    let (mut reader, mut writer) = framing::framed(stream, &stats, config.silence_limit);

    let handshake = handshake(
        &mut reader,
        &mut writer,
        &exports,
        guest_version,
        &config.local,
    );
    let mut endpoints = framing::within(config.handshake_timeout, handshake).await?;
    framing::handshake_done(&mut reader, &mut writer);

    let (queue_tx, mut queue) = mpsc::channel(MAX_OUTSTANDING_REQUESTS);
    let (out_tx, out_rx) = mpsc::channel(WRITE_QUEUE_MESSAGES);
    let shares = endpoints.len();
    let mut reads = AbortOnDrop(tokio::spawn(read_requests(
        reader,
        queue_tx,
        out_tx.clone(),
        shares,
        stats.clone(),
    )));
    let mut writes = AbortOnDrop(tokio::spawn(write_responses(writer, out_rx)));
    // Pending long-polls; dropped (aborted) with the session.
    let mut polls = Polls::default();
    // Per share, what this session has told the host about its entries.
    let mut told: Vec<Told> = (0..shares).map(|_| Told::default()).collect();
    let mut next_token: u64 = 1;

    let mut times = ServeTimes::default();
    // Requests are handled one at a time, in the order they arrived (long-polls aside).
    loop {
        let waiting = Instant::now();
        let request = tokio::select! {
            biased;
            ended = &mut reads.0 => return finished(ended),
            ended = &mut writes.0 => return finished(ended),
            request = queue.recv() => match request {
                Some(request) => request,
                // The reader is ending; its result says why.
                None => return finished((&mut reads.0).await),
            },
        };
        stats.add_request();
        let Request { id, share, body } = request;
        let kind = body.kind();
        let started = Instant::now();
        times.idle += started - waiting;
        // A long-poll waits in a task of its own, so the requests behind it are not held up.
        if let RequestBody::PollChanges { max_wait_ms } = body {
            if let Some(endpoint) = endpoints.get(usize::from(share)) {
                let mut endpoint = endpoint.clone();
                let (out, stats) = (out_tx.clone(), stats.clone());
                let wait = Duration::from_millis(u64::from(max_wait_ms.min(POLL_WAIT_MS)));
                polls.spawn(async move {
                    let body = match tokio::time::timeout(wait, endpoint.changes()).await {
                        Ok(result) => ResponseBody::Changes(result.map_err(WireError::from)),
                        Err(_) => ResponseBody::Changes(Ok(ChangeHints::default())),
                    };
                    if let Ok(bytes) = encode_response(id, kind, body, &stats) {
                        let _ = out.send(bytes).await;
                    }
                });
                continue;
            }
        }
        let index = usize::from(share);
        let body = match (endpoints.get_mut(index), told.get_mut(index)) {
            (Some(endpoint), Some(told)) => {
                let served = Served {
                    told,
                    zstd_level: config.zstd_level,
                    next_token: &mut next_token,
                };
                dispatch(endpoint, served, body).await
            }
            // The reader checked the index already.
            _ => ResponseBody::error(kind, EndpointError::UnknownShare(share.to_string()).into()),
        };
        if matches!(kind, RequestKind::Scan | RequestKind::ScanFull) {
            stats.update_share(share, |s| s.scans += 1);
        }
        let sent_before = stats.snapshot().content_bytes_sent;
        let bytes = encode_response(id, kind, body, &stats)?;
        let sent = stats.snapshot().content_bytes_sent - sent_before;
        if sent > 0 {
            stats.update_share(share, |s| s.content_bytes_sent += sent);
        }
        times.add(kind, started.elapsed());
        if out_tx.send(bytes).await.is_err() {
            return finished((&mut writes.0).await);
        }
    }
}

/// The long-polls of one session, each in a task of its own. A finished task stays in a
/// `JoinSet`, its memory with it, until it is joined: every spawn first reaps the finished
/// ones, so a session that lives for weeks holds only the polls still waiting and those that
/// finished since the last spawn, however many it has answered. Dropping it aborts those
/// still waiting.
#[derive(Default)]
struct Polls(tokio::task::JoinSet<()>);

impl Polls {
    fn spawn(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        // A poll that panicked has nothing to report here: its request stays unanswered and
        // the host's own deadline covers it.
        while self.0.try_join_next().is_some() {}
        self.0.spawn(task);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Where a session's request loop spent its time: per request kind, and waiting for requests.
/// Logged (debug) when the session ends; it tells whether this side was the bottleneck.
#[derive(Default)]
struct ServeTimes {
    busy: HashMap<RequestKind, (u64, Duration)>,
    idle: Duration,
}

impl ServeTimes {
    fn add(&mut self, kind: RequestKind, took: Duration) {
        let entry = self.busy.entry(kind).or_default();
        entry.0 += 1;
        entry.1 += took;
    }
}

impl Drop for ServeTimes {
    fn drop(&mut self) {
        let mut busy: Vec<_> = self.busy.iter().collect();
        busy.sort_by_key(|(_, (_, took))| std::cmp::Reverse(*took));
        let shown: Vec<String> = busy
            .iter()
            .map(|(kind, (n, took))| format!("{kind:?} {n}x {} ms", took.as_millis()))
            .collect();
        tracing::debug!(
            "session requests: {}; waited for requests {} ms",
            shown.join(", "),
            self.idle.as_millis()
        );
    }
}

/// Reads the `Hello`, decides, and answers. `Ok(endpoints)` once `Welcome` is sent.
async fn handshake<S, E, F>(
    reader: &mut Reader<S>,
    writer: &mut Writer<S>,
    exports: &F,
    guest_version: &str,
    local: &LocalParams,
) -> Result<Vec<E>, TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(&ShareOpen) -> Result<E, String>,
{
    let hello = match reader.next().await {
        None => return Err(TransportError::ClosedDuringHandshake),
        Some(Err(e)) => return Err(e.into()),
        Some(Ok(Message::Hello(hello))) => hello,
        Some(Ok(other)) => {
            return Err(TransportError::Protocol(format!(
                "expected Hello, got {}",
                other.kind()
            )))
        }
    };
    let decision = accept_hello(&hello, local)
        .map_err(|refusal| refusal.to_string())
        .and_then(|agreement| {
            let endpoints = hello
                .shares
                .iter()
                .map(exports)
                .collect::<Result<Vec<E>, String>>()?;
            Ok((agreement, endpoints))
        });
    match decision {
        Ok((agreement, endpoints)) => {
            let welcome = Message::Welcome(welcome(agreement, guest_version, local));
            let bytes =
                encode_message(&welcome, MAX_HANDSHAKE_BYTES).map_err(TransportError::Encode)?;
            writer.send(Bytes::from(bytes)).await?;
            Ok(endpoints)
        }
        Err(reason) => {
            let reason = truncate(reason, MAX_REASON_BYTES);
            let refused = Message::Refused(Refused {
                reason: reason.clone(),
            });
            let bytes =
                encode_message(&refused, MAX_HANDSHAKE_BYTES).map_err(TransportError::Encode)?;
            writer.send(Bytes::from(bytes)).await?;
            // EOF right after the reason, so the host reads it before the connection ends.
            let _ = SinkExt::<Bytes>::close(writer).await;
            Err(TransportError::RefusedPeer {
                reason: escape_bytes(reason.as_bytes()),
            })
        }
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Decodes requests: answers pings, checks the share index, queues the rest for `serve`.
async fn read_requests<S>(
    mut reader: Reader<S>,
    queue: mpsc::Sender<Request>,
    out: mpsc::Sender<Bytes>,
    shares: usize,
    stats: Arc<Stats>,
) -> Result<(), TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    loop {
        let message = match reader.next().await {
            None => return Ok(()),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(message)) => message,
        };
        let request = match message {
            Message::Request(request) => request,
            Message::Hello(_) => return Err(TransportError::Protocol("a second Hello".to_owned())),
            other => {
                return Err(TransportError::Protocol(format!(
                    "the host sent {}, which only a guest sends",
                    other.kind()
                )))
            }
        };
        if request.body == RequestBody::Ping {
            let pong = Message::Response(Response {
                id: request.id,
                body: ResponseBody::Pong,
            });
            let bytes = encode_message(&pong, MAX_MESSAGE_BYTES).map_err(TransportError::Encode)?;
            if out.send(Bytes::from(bytes)).await.is_err() {
                // The writer has ended; `serve` reports why.
                return Ok(());
            }
            continue;
        }
        if usize::from(request.share) >= shares {
            return Err(TransportError::Protocol(format!(
                "request {} names share {}, but the session opened {shares}",
                request.id, request.share
            )));
        }
        let received = match &request.body {
            RequestBody::Supply { chunks } => content_bytes(chunks),
            _ => 0,
        };
        if received > 0 {
            stats.add_content_received(received);
            stats.update_share(request.share, |s| s.content_bytes_received += received);
        }
        match queue.try_send(request) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(TransportError::Protocol(format!(
                    "more than {MAX_OUTSTANDING_REQUESTS} requests outstanding"
                )))
            }
            Err(TrySendError::Closed(_)) => return Ok(()),
        }
    }
}

async fn write_responses<S>(
    mut writer: Writer<S>,
    mut out: mpsc::Receiver<Bytes>,
) -> Result<(), TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    while let Some(bytes) = out.recv().await {
        writer.send(bytes).await?;
        framing::shed_write_buffer(&mut writer);
    }
    Ok(())
}

/// What a request to one share is served with besides its endpoint.
struct Served<'a> {
    /// What this session has told the host about the share.
    told: &'a mut Told,
    /// zstd level for chunk data this side sends.
    zstd_level: i32,
    /// The session's next listing token.
    next_token: &'a mut u64,
}

/// Calls the local endpoint for one request.
async fn dispatch<E: Endpoint>(
    endpoint: &mut E,
    served: Served<'_>,
    body: RequestBody,
) -> ResponseBody {
    let Served {
        told,
        zstd_level,
        next_token,
    } = served;
    match body {
        RequestBody::Ping => ResponseBody::Pong,
        RequestBody::Scan { scope, options } => ResponseBody::Scanned(
            scan_with_manifests(endpoint, scope, options, told)
                .await
                .map_err(WireError::from),
        ),
        RequestBody::ScanFull { options, base } => {
            let last = told.take_listing();
            let (body, listing) = scan_full(endpoint, options, base, last, next_token).await;
            if let Some(listing) = listing {
                told.listed(listing);
            }
            body
        }
        RequestBody::Manifests { files } => ResponseBody::Manifests(
            endpoint
                .manifests(files)
                .await
                .map(|answers| {
                    answers
                        .into_iter()
                        .map(|a| a.map_err(WireProblem::from))
                        .collect()
                })
                .map_err(WireError::from),
        ),
        RequestBody::ReadChunks { reads } => {
            let asked: Vec<_> = reads.iter().map(|r| r.read.chunk.hash).collect();
            let reads = reads
                .into_iter()
                .map(|r| DeltaRead {
                    read: r.read,
                    base: r.base,
                })
                .collect();
            let result = endpoint.read_deltas(reads).await.and_then(|datas| {
                if datas.len() != asked.len() {
                    return Err(EndpointError::Io(format!(
                        "the guest's endpoint answered {} of {} chunk reads",
                        datas.len(),
                        asked.len()
                    )));
                }
                let raw: usize = datas.iter().flatten().map(ChunkData::len).sum();
                let level = level_for_batch(zstd_level, raw);
                Ok(asked
                    .iter()
                    .zip(datas)
                    .map(|(hash, data)| data.map(|d| encode_content_owned(*hash, d, level)))
                    .collect())
            });
            ResponseBody::Chunks(result.map_err(WireError::from))
        }
        RequestBody::Stage { files } => {
            ResponseBody::Staged(stage(endpoint, files).await.map_err(WireError::from))
        }
        RequestBody::Supply { chunks } => {
            let decoded: Result<Vec<_>, _> = chunks
                .into_iter()
                .enumerate()
                .map(|(i, c)| {
                    unpack_content(c).map_err(|e| {
                        EndpointError::Protocol(format!("supplied chunk {i}: {}", error_chain(&e)))
                    })
                })
                .collect();
            let result = match decoded {
                Ok(chunks) => endpoint.supply(chunks).await,
                Err(e) => Err(e),
            };
            ResponseBody::Supplied(result.map_err(WireError::from))
        }
        RequestBody::Transition { changes } => {
            ResponseBody::Transitioned(endpoint.transition(changes).await.map_err(WireError::from))
        }
        RequestBody::Mark { generation } => {
            ResponseBody::Marked(endpoint.mark(generation).await.map_err(WireError::from))
        }
        RequestBody::NoteSync(state) => {
            ResponseBody::Noted(endpoint.note_sync(state).await.map_err(WireError::from))
        }
        // Served in a task of its own by the session loop; reaching here means the share index
        // was bad, which the reader already refused.
        RequestBody::PollChanges { .. } => ResponseBody::Changes(Ok(ChangeHints::default())),
    }
}

/// Answers a targeted `Scan`: the scan, and the manifests of the first
/// [`SCAN_MANIFESTS_MAX`] files it lists of at most [`SCAN_MANIFEST_MAX_FILE_BYTES`] whose
/// entries the host has not heard yet (in path order, as the report lists them): the files
/// that changed here, which the host would otherwise ask for next (see `told`).
async fn scan_with_manifests<E: Endpoint>(
    endpoint: &mut E,
    scope: ScanScope,
    options: ScanOptions,
    told: &mut Told,
) -> Result<Scanned, EndpointError> {
    let scanned: Vec<RelPath> = match &scope {
        ScanScope::Full => vec![RelPath::root()],
        ScanScope::Paths(paths) => paths.clone(),
    };
    let report = endpoint.scan(scope, options).await?;
    let small: Vec<(RelPath, FileMeta)> = report
        .entries
        .iter()
        .filter(|(path, e)| !told.knows(path, e))
        .filter_map(|(path, e)| match e {
            Entry::File(m) if m.size <= SCAN_MANIFEST_MAX_FILE_BYTES => Some((path.clone(), *m)),
            _ => None,
        })
        .take(SCAN_MANIFESTS_MAX)
        .collect();
    told.heard(&scanned, &report.entries);
    let mut manifests = Vec::with_capacity(small.len());
    if !small.is_empty() {
        let paths: Vec<RelPath> = small.iter().map(|(p, _)| p.clone()).collect();
        // The manifests are a bonus: if they cannot be had, the scan still answers, and the
        // host asks for them (and hears why) as it would have.
        let Ok(answers) = endpoint.manifests(small).await else {
            return Ok(Scanned::new(report, manifests));
        };
        for (path, answer) in paths.into_iter().zip(answers) {
            // A file that changed since is simply left out: the host asks for it as before.
            if let Ok(m) = answer {
                manifests.push((path, m));
            }
        }
    }
    Ok(Scanned::new(report, manifests))
}

/// Answers `Stage`: rebuilds manifests sent as edits against the manifest of the file the
/// endpoint has at that path now (which must be the base the edits name), checks each rebuilt
/// one against its file's digest, and stages every file it has a manifest for. A file whose
/// edits do not fit gets `BaseUnknown`, and the host sends it again in full.
async fn stage<E: Endpoint>(
    endpoint: &mut E,
    files: Vec<StageFile>,
) -> Result<Vec<StageAnswer>, EndpointError> {
    // The bases of the edited files, in one call.
    let bases: Vec<(RelPath, FileMeta)> = files
        .iter()
        .filter_map(|f| match &f.manifest {
            ManifestForm::Edits {
                base_size,
                base_digest,
                ..
            } => Some((
                f.path.clone(),
                FileMeta {
                    size: *base_size,
                    digest: *base_digest,
                    ..f.meta
                },
            )),
            ManifestForm::Full(_) => None,
        })
        .collect();
    let mut bases = if bases.is_empty() {
        Vec::new()
    } else {
        endpoint.manifests(bases).await?
    }
    .into_iter();
    let mut answers: Vec<Option<StageAnswer>> = Vec::with_capacity(files.len());
    let mut requests = Vec::with_capacity(files.len());
    for f in files {
        let manifest = match f.manifest {
            ManifestForm::Full(m) => Some(m),
            ManifestForm::Edits { edits: e, .. } => bases
                .next()
                .and_then(Result::ok)
                .and_then(|base| edits::apply(&edits::refs(&base), &e).ok())
                .map(|refs| edits::to_manifest(&refs))
                .filter(|m| m.validate(&f.meta, CHUNK_MAX_BYTES).is_ok()),
        };
        match manifest {
            Some(manifest) => {
                answers.push(None);
                requests.push(StageRequest {
                    path: f.path,
                    meta: f.meta,
                    manifest,
                });
            }
            None => answers.push(Some(StageAnswer::BaseUnknown)),
        }
    }
    let mut staged = endpoint.stage(requests).await?.into_iter();
    answers
        .into_iter()
        .map(|a| match a {
            Some(a) => Ok(a),
            None => match staged.next() {
                Some(Ok(missing)) => Ok(StageAnswer::Missing(missing)),
                Some(Err(NotStaged::Problem(p))) => Ok(StageAnswer::Problem(p.into())),
                Some(Err(NotStaged::NoRoom)) => Ok(StageAnswer::NoRoom),
                None => Err(EndpointError::Io(
                    "the guest's endpoint answered too few staged files".into(),
                )),
            },
        })
        .collect()
}

/// Answers `ScanFull`: scans, then sends the listing as a difference against `last` when the
/// host says it holds that one (`base`), in full otherwise. Returns the listing to remember.
async fn scan_full<E: Endpoint>(
    endpoint: &mut E,
    options: ScanOptions,
    base: Option<u64>,
    last: Option<Kept>,
    next_token: &mut u64,
) -> (ResponseBody, Option<Listing>) {
    let report = match endpoint.scan(ScanScope::Full, options).await {
        Ok(r) => r,
        Err(e) => return (ResponseBody::ScanDelta(Err(e.into())), None),
    };
    let token = *next_token;
    *next_token += 1;
    let (base, changed, removed) = match last {
        Some((t, old)) if Some(t) == base => {
            let (changed, removed) = listing::diff_packed(&old, &report.entries);
            (Some(t), changed, removed)
        }
        _ => (None, report.entries.clone(), Vec::new()),
    };
    let delta = ScanDelta {
        token,
        base,
        root: report.root,
        changed,
        removed,
        problems: report.problems.into_iter().map(WireProblem::from).collect(),
        ignored: report.ignored,
        generation: report.generation,
    };
    (
        ResponseBody::ScanDelta(Ok(delta)),
        Some((token, report.entries)),
    )
}

/// Encodes a response; one that cannot be sent (too large, or invalid because of a local bug)
/// becomes an error response of the same kind, so the host gets an answer and the session lives.
fn encode_response(
    id: u64,
    kind: RequestKind,
    body: ResponseBody,
    stats: &Stats,
) -> Result<Bytes, TransportError> {
    let content = match &body {
        ResponseBody::Chunks(Ok(chunks)) => content_bytes(chunks.iter().flatten()),
        _ => 0,
    };
    match encode_message(&Message::Response(Response { id, body }), MAX_MESSAGE_BYTES) {
        Ok(bytes) => {
            stats.add_content_sent(content);
            Ok(Bytes::from(bytes))
        }
        Err(e) => {
            let limit = match &e {
                CodecError::TooLarge { .. } => true,
                CodecError::Invalid(v) => v.is_limit(),
                _ => false,
            };
            let text = format!("the guest cannot send this response: {}", error_chain(&e));
            tracing::warn!(request = id, "{text}");
            let err = if limit {
                EndpointError::Limit(text)
            } else {
                EndpointError::Io(text)
            };
            let fallback = Message::Response(Response {
                id,
                body: ResponseBody::error(kind, err.into()),
            });
            encode_message(&fallback, MAX_MESSAGE_BYTES)
                .map(Bytes::from)
                .map_err(TransportError::Encode)
        }
    }
}

fn finished(ended: Result<Result<(), TransportError>, JoinError>) -> Result<(), TransportError> {
    ended.map_err(TransportError::Task)?
}

/// A spawned task that is aborted when its owner goes away (the connection's tasks must not
/// outlive `serve`, e.g. when the caller drops it).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A long-lived session answers a poll after every change: the finished poll tasks must
    /// not pile up (each held about 1.5 KiB until the session ended).
    #[tokio::test]
    async fn finished_polls_are_reaped_so_a_long_session_holds_only_the_waiting_ones() {
        let mut polls = Polls::default();
        // Two polls that never finish: they must stay (and be aborted with the set).
        let (_keep_a, wait_a) = tokio::sync::oneshot::channel::<()>();
        let (_keep_b, wait_b) = tokio::sync::oneshot::channel::<()>();
        polls.spawn(async move {
            let _ = wait_a.await;
        });
        polls.spawn(async move {
            let _ = wait_b.await;
        });
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        for i in 0..10_000u32 {
            let done = done_tx.clone();
            polls.spawn(async move {
                let _ = done.send(i);
            });
            // Let it run to completion before the next one comes.
            assert_eq!(done_rx.recv().await, Some(i));
            tokio::task::yield_now().await;
            assert!(
                polls.len() <= 3,
                "after {} polls the set holds {} tasks",
                i + 1,
                polls.len()
            );
        }
        // The two waiting ones are still there, unanswered.
        polls.spawn(async {});
        assert!(polls.len() >= 2);
    }
}
