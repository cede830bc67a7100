//! The messages of the vmsync protocol, encoded with postcard (1.x).
//!
//! One [`Message`] enum carries every message in both directions, so each side's session state
//! machine can name and reject a message that is legal in the protocol but not from that peer or
//! in that state (a `Response` sent by the host, a second `Hello`, anything before `Hello`).
//!
//! Conversation:
//! 1. host → guest `Hello` (magic, version range, chunker parameters, the shares it opens);
//!    guest → host `Welcome` or `Refused`. See [`crate::handshake`].
//! 2. host → guest `Request { id, share, body }`; guest → host `Response { id, body }`. Requests
//!    are pipelined: many may be outstanding (up to
//!    [`MAX_OUTSTANDING_REQUESTS`](crate::limits::MAX_OUTSTANDING_REQUESTS)); responses carry
//!    the request id. `Ping` is answered with `Pong` straight away, even while other requests
//!    are being served, and is the heartbeat.
//!
//! The request bodies mirror the methods of `vmsync_core::endpoint::Endpoint`, and
//! carry the core domain types: `RelPath` validates itself while being decoded, `Hash` is a fixed
//! `[u8; 32]`. What serde cannot check is checked by [`crate::validate`] right after decoding.
//!
//! Format stability: postcard is not self-describing, so the byte layout of every type here and
//! of the core types they contain is the wire format. **Enum variants are append-only** (a new
//! variant goes at the end; nothing is reordered, removed or changed), struct fields are never
//! reordered, and any change to the layout is a protocol version bump. Golden byte vectors in
//! `tests/golden.rs` fail on any accidental change.
//!
//! One message per `Endpoint` method, named by what it does. A change of layout is a new
//! protocol version: the handshake's version range is how two builds find out they differ.
//!
//! Errors and per-path problems travel as this crate's own structs ([`WireError`],
//! [`WireProblem`]: a code and a message), not as the core crate's error types, so those can
//! change without changing the wire.

use crate::chunk::WireContent;
use crate::limits::{
    MAX_BATCH_CHANGES, MAX_BATCH_CHUNKS, MAX_BATCH_FILES, MAX_FILE_CHUNKS, MAX_IGNORE_PATTERNS,
    MAX_SCAN_ENTRIES, MAX_SCAN_IGNORED, MAX_SCAN_PROBLEMS, MAX_SHARES,
};
use serde::{Deserialize, Serialize};
use vmsync_core::bounded::{result_vec, vec};
use vmsync_core::edits::ManifestEdit;
use vmsync_core::endpoint::RootId;
use vmsync_core::endpoint::{
    Change, ChangeHints, ChunkRead, EndpointError, MissingChunk, Outcome, Problem, ScanOptions,
    ScanScope, StageRequest,
};
use vmsync_core::progress::SyncState;
use vmsync_core::text::escape_text;
use vmsync_core::{Entry, FileMeta, Hash, Manifest, RelPath};

/// First field of every `Hello`: "VMSYNC", NUL, and the magic's own revision.
pub const MAGIC: [u8; 8] = *b"VMSYNC\0\x01";
/// Oldest protocol version this build speaks.
pub const PROTOCOL_VERSION_MIN: u16 = 2;
/// Newest protocol version this build speaks.
pub const PROTOCOL_VERSION_MAX: u16 = 2;
/// A targeted scan's answer ([`Scanned`]) carries the manifests of files of at most this many bytes (a few chunks
/// each)...
pub const SCAN_MANIFEST_MAX_FILE_BYTES: u64 = 256 * 1024;
/// ...and of at most this many of them.
pub const SCAN_MANIFESTS_MAX: usize = 256;

/// Every message, both directions. Variant order is the wire tag: append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// host → guest, first message of a session.
    Hello(Hello),
    /// guest → host, accepts the `Hello`.
    Welcome(Welcome),
    /// guest → host, refuses the `Hello`; the guest closes the connection after it.
    Refused(Refused),
    /// host → guest, after `Welcome`.
    Request(Request),
    /// guest → host, answers one `Request`.
    Response(Response),
}

impl Message {
    /// The variant's name, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Refused(_) => "Refused",
            Message::Request(_) => "Request",
            Message::Response(_) => "Response",
        }
    }
}

/// FastCDC parameters in bytes. Both sides must use the same ones: chunk ids and file digests
/// depend on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkerParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl ChunkerParams {
    /// The parameters vmsync pins (`vmsync_core::limits`).
    pub const PINNED: ChunkerParams = ChunkerParams {
        min: vmsync_core::limits::CHUNK_MIN_BYTES,
        avg: vmsync_core::limits::CHUNK_AVG_BYTES,
        max: vmsync_core::limits::CHUNK_MAX_BYTES,
    };
}

/// A share the host wants to sync with this guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareOpen {
    /// The name the guest's config exports the share under.
    pub name: String,
    /// Gitignore patterns the host wants applied on the guest's side (one pattern per string,
    /// no newlines), so ignored files are not even scanned there.
    #[serde(deserialize_with = "vec::<_, _, MAX_IGNORE_PATTERNS>")]
    pub ignore: Vec<String>,
    /// Also honour the tree's own `.gitignore` and `.ignore` files (the share's
    /// `respect_gitignore`): the guest's scans then read them and report what they exclude.
    pub respect_gitignore: bool,
}

/// host → guest: who we are, what we speak, what we want.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`MAGIC`].
    pub magic: [u8; 8],
    pub min_version: u16,
    pub max_version: u16,
    /// The host agent's version, for logs and `status`.
    pub agent_version: String,
    pub chunker: ChunkerParams,
    /// The shares to open; a request's `share` is an index into this list.
    #[serde(deserialize_with = "vec::<_, _, MAX_SHARES>")]
    pub shares: Vec<ShareOpen>,
}

/// guest → host: the session is open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The version both sides now speak: the highest in both ranges.
    pub version: u16,
    /// The guest agent's version, for logs and `status`.
    pub agent_version: String,
    /// The guest's chunker parameters; always equal to the `Hello`'s (else it refuses).
    pub chunker: ChunkerParams,
}

/// guest → host: the session is refused, and why (shown to the user on both sides).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub reason: String,
}

/// host → guest: one call of an `Endpoint` method on one share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the host, echoed in the response.
    pub id: u64,
    /// Index into `Hello::shares`. Ignored for `Ping`.
    pub share: u16,
    pub body: RequestBody,
}

/// guest → host: the result of one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    pub body: ResponseBody,
}

/// The request kinds, without their data. Order matches [`RequestBody`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    Ping,
    Scan,
    ScanFull,
    Manifests,
    ReadChunks,
    Stage,
    Supply,
    Transition,
    PollChanges,
    Mark,
    NoteSync,
}

impl RequestKind {
    pub fn name(self) -> &'static str {
        match self {
            RequestKind::Ping => "Ping",
            RequestKind::Scan => "Scan",
            RequestKind::ScanFull => "ScanFull",
            RequestKind::Manifests => "Manifests",
            RequestKind::ReadChunks => "ReadChunks",
            RequestKind::Stage => "Stage",
            RequestKind::Supply => "Supply",
            RequestKind::Transition => "Transition",
            RequestKind::PollChanges => "PollChanges",
            RequestKind::Mark => "Mark",
            RequestKind::NoteSync => "NoteSync",
        }
    }
}

/// One variant per `Endpoint` method, plus `Ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestBody {
    /// Heartbeat; answered with `Pong`.
    Ping,
    /// A targeted scan (`scope` is never `Full`), answered with [`Scanned`]: the report and
    /// the manifests of its small files, which saves a live edit the `Manifests` round trip.
    Scan {
        scope: ScanScope,
        options: ScanOptions,
    },
    /// A full scan, answered as a [`ScanDelta`] against the listing this session last sent
    /// with token `base` (or in full when the guest does not have that one).
    ScanFull {
        options: ScanOptions,
        base: Option<u64>,
    },
    Manifests {
        #[serde(deserialize_with = "vec::<_, _, MAX_BATCH_FILES>")]
        files: Vec<(RelPath, FileMeta)>,
    },
    /// Chunks to read; a read may carry the destination's base signature, and its answer be a
    /// delta against it (see `vmsync_core::delta`).
    ReadChunks {
        #[serde(deserialize_with = "vec::<_, _, MAX_BATCH_CHUNKS>")]
        reads: Vec<BasedRead>,
    },
    /// Files to stage; the answer may offer delta bases ([`StageAnswer`]).
    Stage {
        #[serde(deserialize_with = "vec::<_, _, MAX_BATCH_FILES>")]
        files: Vec<StageFile>,
    },
    /// Whole chunks or deltas (compressed when that pays, see [`crate::chunk`]); answered with
    /// the chunks still missing.
    Supply {
        #[serde(deserialize_with = "vec::<_, _, MAX_BATCH_CHUNKS>")]
        chunks: Vec<WireContent>,
    },
    Transition {
        #[serde(deserialize_with = "vec::<_, _, MAX_BATCH_CHANGES>")]
        changes: Vec<Change>,
    },
    /// Long-poll for change hints: answered when the guest has some, or with empty hints after
    /// at most `max_wait_ms` (so no request outlives the client's backstop).
    PollChanges { max_wait_ms: u32 },
    /// Note the share generation in the share's reserved directory (`Endpoint::mark`).
    Mark { generation: u64 },
    /// How the share's sync stands on the host (`Endpoint::note_sync`): the guest's readiness
    /// and status.
    NoteSync(SyncState),
}

/// One file of a `Stage` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageFile {
    pub path: RelPath,
    pub meta: FileMeta,
    pub manifest: ManifestForm,
}

/// How a `Stage` request carries a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManifestForm {
    /// Every chunk reference.
    Full(Manifest),
    /// Edits against the manifest of the file the guest has at that path now, which must be
    /// the one of `base_size` bytes with digest `base_digest` (see `vmsync_core::edits`). A
    /// guest that does not have it answers [`StageAnswer::BaseUnknown`], and the host sends
    /// the manifest in full.
    Edits {
        base_size: u64,
        base_digest: Hash,
        #[serde(deserialize_with = "vec::<_, _, MAX_FILE_CHUNKS>")]
        edits: Vec<ManifestEdit>,
    },
}

/// The answer for one file of a `Stage` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StageAnswer {
    /// Staged; these chunks are still missing, some with a delta base.
    Missing(#[serde(deserialize_with = "vec::<_, _, MAX_FILE_CHUNKS>")] Vec<MissingChunk>),
    /// Not staged, for a reason worth showing.
    Problem(WireProblem),
    /// The manifest came as edits against a file this side does not have (any more), or they
    /// did not rebuild a manifest of the file's digest: nothing was staged; send it in full.
    BaseUnknown,
    /// Not staged: no room to hold another staged file now (`NotStaged::NoRoom`); ask again
    /// after committing what waits.
    NoRoom,
}

/// One read of a `ReadChunks` request: a chunk, and the signature of the base the destination
/// offered for it (see `vmsync_core::delta`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BasedRead {
    pub read: ChunkRead,
    pub base: Option<Vec<u8>>,
}

impl From<StageRequest> for StageFile {
    fn from(r: StageRequest) -> StageFile {
        StageFile {
            path: r.path,
            meta: r.meta,
            manifest: ManifestForm::Full(r.manifest),
        }
    }
}

impl RequestBody {
    pub fn kind(&self) -> RequestKind {
        match self {
            RequestBody::Ping => RequestKind::Ping,
            RequestBody::Scan { .. } => RequestKind::Scan,
            RequestBody::ScanFull { .. } => RequestKind::ScanFull,
            RequestBody::Manifests { .. } => RequestKind::Manifests,
            RequestBody::ReadChunks { .. } => RequestKind::ReadChunks,
            RequestBody::Stage { .. } => RequestKind::Stage,
            RequestBody::Supply { .. } => RequestKind::Supply,
            RequestBody::Transition { .. } => RequestKind::Transition,
            RequestBody::PollChanges { .. } => RequestKind::PollChanges,
            RequestBody::Mark { .. } => RequestKind::Mark,
            RequestBody::NoteSync(_) => RequestKind::NoteSync,
        }
    }
}

/// One variant per request kind, in the same order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseBody {
    Pong,
    Scanned(Result<Scanned, WireError>),
    ScanDelta(Result<ScanDelta, WireError>),
    /// One entry per requested file, in order.
    Manifests(
        #[serde(deserialize_with = "result_vec::<_, _, _, MAX_BATCH_FILES>")]
        Result<Vec<Result<Manifest, WireProblem>>, WireError>,
    ),
    /// One entry per requested read, in order: the chunk whole, a delta against the read's
    /// base, or `None` where the data changed on disk.
    Chunks(
        #[serde(deserialize_with = "result_vec::<_, _, _, MAX_BATCH_CHUNKS>")]
        Result<Vec<Option<WireContent>>, WireError>,
    ),
    /// One answer per requested file, in order.
    Staged(
        #[serde(deserialize_with = "result_vec::<_, _, _, MAX_BATCH_FILES>")]
        Result<Vec<StageAnswer>, WireError>,
    ),
    /// The supplied chunks still missing: their delta did not rebuild them.
    Supplied(
        #[serde(deserialize_with = "result_vec::<_, _, _, MAX_BATCH_CHUNKS>")]
        Result<Vec<Hash>, WireError>,
    ),
    /// One outcome per requested change, in order.
    Transitioned(
        #[serde(deserialize_with = "result_vec::<_, _, _, MAX_BATCH_CHANGES>")]
        Result<Vec<Outcome>, WireError>,
    ),
    Changes(Result<ChangeHints, WireError>),
    Marked(Result<(), WireError>),
    Noted(Result<(), WireError>),
}

/// A targeted scan's answer: the scan report (`vmsync_core::endpoint::ScanReport`) and the
/// manifests of some of the files it lists: files of at most [`SCAN_MANIFEST_MAX_FILE_BYTES`],
/// at most [`SCAN_MANIFESTS_MAX`] of them, sorted by path. The host then needs no `Manifests`
/// request to send them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scanned {
    pub root: Option<RootId>,
    /// Sorted by path.
    #[serde(deserialize_with = "vec::<_, _, MAX_SCAN_ENTRIES>")]
    pub entries: Vec<(RelPath, Entry)>,
    #[serde(deserialize_with = "vec::<_, _, MAX_SCAN_PROBLEMS>")]
    pub problems: Vec<WireProblem>,
    #[serde(deserialize_with = "vec::<_, _, MAX_SCAN_IGNORED>")]
    pub ignored: Vec<RelPath>,
    pub generation: Option<u64>,
    #[serde(deserialize_with = "vec::<_, _, SCAN_MANIFESTS_MAX>")]
    pub manifests: Vec<(RelPath, Manifest)>,
}

/// A full scan's listing as the difference against an earlier one (see [`crate::listing`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanDelta {
    /// Names this listing, for the next request's `base`.
    pub token: u64,
    /// The listing this one is relative to; `None`: `changed` is the whole listing.
    pub base: Option<u64>,
    pub root: Option<RootId>,
    /// New or different entries, sorted by path.
    #[serde(deserialize_with = "vec::<_, _, MAX_SCAN_ENTRIES>")]
    pub changed: Vec<(RelPath, Entry)>,
    /// Paths no longer there, sorted.
    #[serde(deserialize_with = "vec::<_, _, MAX_SCAN_ENTRIES>")]
    pub removed: Vec<RelPath>,
    /// All of this scan's problems (not a difference: they are few).
    #[serde(deserialize_with = "vec::<_, _, MAX_SCAN_PROBLEMS>")]
    pub problems: Vec<WireProblem>,
    /// All of this scan's ignored paths (`ScanReport::ignored`; not a difference either: a
    /// share's ignore files exclude a few directories and files, and the list is bounded).
    #[serde(deserialize_with = "vec::<_, _, MAX_SCAN_IGNORED>")]
    pub ignored: Vec<RelPath>,
    /// `ScanReport::generation`: the share generation the guest last noted.
    pub generation: Option<u64>,
}

impl ResponseBody {
    pub fn kind(&self) -> RequestKind {
        match self {
            ResponseBody::Pong => RequestKind::Ping,
            ResponseBody::Scanned(_) => RequestKind::Scan,
            ResponseBody::ScanDelta(_) => RequestKind::ScanFull,
            ResponseBody::Manifests(_) => RequestKind::Manifests,
            ResponseBody::Chunks(_) => RequestKind::ReadChunks,
            ResponseBody::Staged(_) => RequestKind::Stage,
            ResponseBody::Supplied(_) => RequestKind::Supply,
            ResponseBody::Transitioned(_) => RequestKind::Transition,
            ResponseBody::Changes(_) => RequestKind::PollChanges,
            ResponseBody::Marked(_) => RequestKind::Mark,
            ResponseBody::Noted(_) => RequestKind::NoteSync,
        }
    }

    /// The error answer to a request of `kind` (`Pong` for a ping, which cannot fail).
    pub fn error(kind: RequestKind, err: WireError) -> ResponseBody {
        match kind {
            RequestKind::Ping => ResponseBody::Pong,
            RequestKind::Scan => ResponseBody::Scanned(Err(err)),
            RequestKind::ScanFull => ResponseBody::ScanDelta(Err(err)),
            RequestKind::Manifests => ResponseBody::Manifests(Err(err)),
            RequestKind::ReadChunks => ResponseBody::Chunks(Err(err)),
            RequestKind::Stage => ResponseBody::Staged(Err(err)),
            RequestKind::Supply => ResponseBody::Supplied(Err(err)),
            RequestKind::Transition => ResponseBody::Transitioned(Err(err)),
            RequestKind::PollChanges => ResponseBody::Changes(Err(err)),
            RequestKind::Mark => ResponseBody::Marked(Err(err)),
            RequestKind::NoteSync => ResponseBody::Noted(Err(err)),
        }
    }
}

/// An error answer: what kind, and the text to show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

/// The kinds of [`WireError`], one per `vmsync_core::endpoint::EndpointError` variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    RootMissing,
    RootNotDir,
    UnknownShare,
    Disconnected,
    Protocol,
    Io,
    Limit,
    /// The side's free space is below its reserve; bytes free and the reserve.
    DiskFull {
        free: u64,
        reserve: u64,
    },
}

impl From<EndpointError> for WireError {
    fn from(e: EndpointError) -> WireError {
        let (code, message) = match e {
            EndpointError::RootMissing(m) => (ErrorCode::RootMissing, m),
            EndpointError::RootNotDir(m) => (ErrorCode::RootNotDir, m),
            EndpointError::UnknownShare(m) => (ErrorCode::UnknownShare, m),
            EndpointError::Disconnected(m) => (ErrorCode::Disconnected, m),
            EndpointError::Protocol(m) => (ErrorCode::Protocol, m),
            EndpointError::Io(m) => (ErrorCode::Io, m),
            EndpointError::Limit(m) => (ErrorCode::Limit, m),
            EndpointError::DiskFull { free, reserve } => {
                (ErrorCode::DiskFull { free, reserve }, String::new())
            }
        };
        WireError { code, message }
    }
}

/// The peer's message is escaped on the way in (see [`vmsync_core::text`]): it reaches logs
/// and `status`.
impl From<WireError> for EndpointError {
    fn from(e: WireError) -> EndpointError {
        let m = escape_text(&e.message);
        match e.code {
            ErrorCode::RootMissing => EndpointError::RootMissing(m),
            ErrorCode::RootNotDir => EndpointError::RootNotDir(m),
            ErrorCode::UnknownShare => EndpointError::UnknownShare(m),
            ErrorCode::Disconnected => EndpointError::Disconnected(m),
            ErrorCode::Protocol => EndpointError::Protocol(m),
            ErrorCode::Io => EndpointError::Io(m),
            ErrorCode::Limit => EndpointError::Limit(m),
            ErrorCode::DiskFull { free, reserve } => EndpointError::DiskFull { free, reserve },
        }
    }
}

/// A path that could not be synced this time, and why (`vmsync_core::endpoint::Problem`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireProblem {
    pub path: RelPath,
    pub message: String,
}

impl From<Problem> for WireProblem {
    fn from(p: Problem) -> WireProblem {
        WireProblem {
            path: p.path,
            message: p.reason,
        }
    }
}

/// The peer's reason is escaped on the way in, like [`WireError`]'s message.
impl From<WireProblem> for Problem {
    fn from(p: WireProblem) -> Problem {
        Problem {
            path: p.path,
            reason: escape_text(&p.message),
        }
    }
}

/// The answer to a targeted scan, from a side's report and the manifests it brings.
impl Scanned {
    pub fn new(
        report: vmsync_core::endpoint::ScanReport,
        manifests: Vec<(RelPath, Manifest)>,
    ) -> Scanned {
        Scanned {
            root: report.root,
            entries: report.entries,
            problems: report.problems.into_iter().map(WireProblem::from).collect(),
            ignored: report.ignored,
            generation: report.generation,
            manifests,
        }
    }

    /// The scan report and the manifests, apart.
    pub fn into_parts(self) -> (vmsync_core::endpoint::ScanReport, Vec<(RelPath, Manifest)>) {
        let report = vmsync_core::endpoint::ScanReport {
            root: self.root,
            entries: self.entries,
            problems: self.problems.into_iter().map(Problem::from).collect(),
            ignored: self.ignored,
            generation: self.generation,
        };
        (report, self.manifests)
    }
}
