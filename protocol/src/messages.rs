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
//! Features: `Stage2`, `ReadChunks2` and `Supply2` carry chunk deltas (delta bases in the stage
//! answer, deltas in reads and supplies). A host sends them only to a guest that granted
//! [`FEATURE_CHUNK_DELTA`]; with an older guest it keeps to `Stage`, `ReadChunks` and `Supply`.
//! `Scan2` answers a targeted scan with the manifests of its small files too, saving a live
//! edit the `Manifests` round trip; only to a guest that granted [`FEATURE_SCAN_MANIFESTS`].

use crate::chunk::{WireChunk, WireContent};
use serde::{Deserialize, Serialize};
use vmsync_core::edits::ManifestEdit;
use vmsync_core::endpoint::RootId;
use vmsync_core::endpoint::{
    Change, ChangeHints, ChunkRead, EndpointError, MissingChunk, Outcome, Problem, ScanOptions,
    ScanReport, ScanScope, StageRequest,
};
use vmsync_core::{Entry, FileMeta, Hash, Manifest, RelPath};

/// First field of every `Hello`: "VMSYNC", NUL, and the magic's own revision.
pub const MAGIC: [u8; 8] = *b"VMSYNC\0\x01";
/// Oldest protocol version this build speaks. Version 2 added the mtime of directories and
/// symlinks (`Entry::Dir` and `Entry::Symlink` end with it) and the other names of a
/// hard-linked file (`Manifest::links`); version 1 peers are refused at the handshake, as their
/// entries and manifests have another layout.
pub const PROTOCOL_VERSION_MIN: u16 = 2;
/// Newest protocol version this build speaks.
pub const PROTOCOL_VERSION_MAX: u16 = 2;
/// Feature bit: the peer speaks `Stage2`, `ReadChunks2` and `Supply2` (chunk deltas).
pub const FEATURE_CHUNK_DELTA: u64 = 1;
/// Feature bit: the peer speaks `Scan2` (targeted scans that carry small files' manifests).
pub const FEATURE_SCAN_MANIFESTS: u64 = 2;
/// Feature bits this build understands. A peer answers with the intersection.
pub const FEATURES_SUPPORTED: u64 = FEATURE_CHUNK_DELTA | FEATURE_SCAN_MANIFESTS;
/// A `Scan2` answer carries the manifests of files of at most this many bytes (a few chunks
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
    /// Requested feature bits.
    pub features: u64,
    pub chunker: ChunkerParams,
    /// The shares to open; a request's `share` is an index into this list.
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
    /// The requested features the guest grants.
    pub features: u64,
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
    Manifests,
    ReadChunks,
    Stage,
    Supply,
    Transition,
    PollChanges,
    ScanFull,
    Stage2,
    ReadChunks2,
    Supply2,
    Scan2,
    Mark,
}

impl RequestKind {
    pub fn name(self) -> &'static str {
        match self {
            RequestKind::Ping => "Ping",
            RequestKind::Scan => "Scan",
            RequestKind::Manifests => "Manifests",
            RequestKind::ReadChunks => "ReadChunks",
            RequestKind::Stage => "Stage",
            RequestKind::Supply => "Supply",
            RequestKind::Transition => "Transition",
            RequestKind::PollChanges => "PollChanges",
            RequestKind::ScanFull => "ScanFull",
            RequestKind::Stage2 => "Stage2",
            RequestKind::ReadChunks2 => "ReadChunks2",
            RequestKind::Supply2 => "Supply2",
            RequestKind::Scan2 => "Scan2",
            RequestKind::Mark => "Mark",
        }
    }
}

/// One variant per `Endpoint` method, plus `Ping`. Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestBody {
    /// Heartbeat; answered with `Pong`.
    Ping,
    Scan {
        scope: ScanScope,
        options: ScanOptions,
    },
    Manifests {
        files: Vec<(RelPath, FileMeta)>,
    },
    ReadChunks {
        reads: Vec<ChunkRead>,
    },
    Stage {
        files: Vec<StageRequest>,
    },
    /// Chunk data travels compressed when that pays (see [`crate::chunk`]).
    Supply {
        chunks: Vec<WireChunk>,
    },
    Transition {
        changes: Vec<Change>,
    },
    /// Long-poll for change hints: answered when the guest has some, or with empty hints after
    /// at most `max_wait_ms` (so no request outlives the client's backstop).
    PollChanges {
        max_wait_ms: u32,
    },
    /// A full scan, answered as a [`ScanDelta`] against the listing this session last sent
    /// with token `base` (or in full when the guest does not have that one).
    ScanFull {
        options: ScanOptions,
        base: Option<u64>,
    },
    /// `Stage` whose answer may offer delta bases ([`StageAnswer`]). Needs
    /// [`FEATURE_CHUNK_DELTA`].
    Stage2 {
        files: Vec<StageFile>,
    },
    /// `ReadChunks` where a read may carry the destination's base signature, and the answer a
    /// delta against it. Needs [`FEATURE_CHUNK_DELTA`].
    ReadChunks2 {
        reads: Vec<BasedRead>,
    },
    /// `Supply` of whole chunks or deltas; answered with the chunks still missing. Needs
    /// [`FEATURE_CHUNK_DELTA`].
    Supply2 {
        chunks: Vec<WireContent>,
    },
    /// A targeted scan (`scope` is never `Full`), answered with [`ScanWithManifests`]. Needs
    /// [`FEATURE_SCAN_MANIFESTS`].
    Scan2 {
        scope: ScanScope,
        options: ScanOptions,
    },
    /// Note the share generation in the share's reserved directory (`Endpoint::mark`);
    /// answered with `Marked`.
    Mark {
        generation: u64,
    },
}

/// One file of a `Stage2` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageFile {
    pub path: RelPath,
    pub meta: FileMeta,
    pub manifest: ManifestForm,
}

/// How a `Stage2` request carries a manifest. Append-only.
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
        edits: Vec<ManifestEdit>,
    },
}

/// The answer for one file of a `Stage2` request. Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StageAnswer {
    /// Staged; these chunks are still missing, some with a delta base.
    Missing(Vec<MissingChunk>),
    Problem(Problem),
    /// The manifest came as edits against a file this side does not have (any more), or they
    /// did not rebuild a manifest of the file's digest: nothing was staged; send it in full.
    BaseUnknown,
}

/// One read of a `ReadChunks2` request: a chunk, and the signature of the base the destination
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
            RequestBody::Manifests { .. } => RequestKind::Manifests,
            RequestBody::ReadChunks { .. } => RequestKind::ReadChunks,
            RequestBody::Stage { .. } => RequestKind::Stage,
            RequestBody::Supply { .. } => RequestKind::Supply,
            RequestBody::Transition { .. } => RequestKind::Transition,
            RequestBody::PollChanges { .. } => RequestKind::PollChanges,
            RequestBody::ScanFull { .. } => RequestKind::ScanFull,
            RequestBody::Stage2 { .. } => RequestKind::Stage2,
            RequestBody::ReadChunks2 { .. } => RequestKind::ReadChunks2,
            RequestBody::Supply2 { .. } => RequestKind::Supply2,
            RequestBody::Scan2 { .. } => RequestKind::Scan2,
            RequestBody::Mark { .. } => RequestKind::Mark,
        }
    }
}

/// One variant per request kind, in the same order. Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseBody {
    Pong,
    Scan(Result<ScanReport, EndpointError>),
    /// One entry per requested file, in order.
    Manifests(Result<Vec<Result<Manifest, Problem>>, EndpointError>),
    /// One entry per requested read, in order; `None` where the data changed on disk.
    ReadChunks(Result<Vec<Option<WireChunk>>, EndpointError>),
    /// One entry per requested file, in order: the chunk hashes still missing.
    Stage(Result<Vec<Result<Vec<Hash>, Problem>>, EndpointError>),
    Supply(Result<(), EndpointError>),
    /// One outcome per requested change, in order.
    Transition(Result<Vec<Outcome>, EndpointError>),
    Changes(Result<ChangeHints, EndpointError>),
    ScanDelta(Result<ScanDelta, EndpointError>),
    /// One answer per requested file, in order.
    Stage2(Result<Vec<StageAnswer>, EndpointError>),
    /// One entry per requested read, in order: the chunk whole, a delta against the read's
    /// base, or `None` where the data changed on disk.
    ReadChunks2(Result<Vec<Option<WireContent>>, EndpointError>),
    /// The supplied chunks still missing: their delta did not rebuild them.
    Supply2(Result<Vec<Hash>, EndpointError>),
    Scan2(Result<ScanWithManifests, EndpointError>),
    Marked(Result<(), EndpointError>),
}

/// A targeted scan's report with the manifests of some of the files it lists: files of at
/// most [`SCAN_MANIFEST_MAX_FILE_BYTES`], at most [`SCAN_MANIFESTS_MAX`] of them, sorted by
/// path. The host then needs no `Manifests` request to send them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanWithManifests {
    pub report: ScanReport,
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
    pub changed: Vec<(RelPath, Entry)>,
    /// Paths no longer there, sorted.
    pub removed: Vec<RelPath>,
    /// All of this scan's problems (not a difference: they are few).
    pub problems: Vec<Problem>,
    /// All of this scan's ignored paths (`ScanReport::ignored`; not a difference either: a
    /// share's ignore files exclude a few directories and files, and the list is bounded).
    pub ignored: Vec<RelPath>,
    /// `ScanReport::generation`: the share generation the guest last noted.
    pub generation: Option<u64>,
}

impl ResponseBody {
    pub fn kind(&self) -> RequestKind {
        match self {
            ResponseBody::Pong => RequestKind::Ping,
            ResponseBody::Scan(_) => RequestKind::Scan,
            ResponseBody::Manifests(_) => RequestKind::Manifests,
            ResponseBody::ReadChunks(_) => RequestKind::ReadChunks,
            ResponseBody::Stage(_) => RequestKind::Stage,
            ResponseBody::Supply(_) => RequestKind::Supply,
            ResponseBody::Transition(_) => RequestKind::Transition,
            ResponseBody::Changes(_) => RequestKind::PollChanges,
            ResponseBody::ScanDelta(_) => RequestKind::ScanFull,
            ResponseBody::Stage2(_) => RequestKind::Stage2,
            ResponseBody::ReadChunks2(_) => RequestKind::ReadChunks2,
            ResponseBody::Supply2(_) => RequestKind::Supply2,
            ResponseBody::Scan2(_) => RequestKind::Scan2,
            ResponseBody::Marked(_) => RequestKind::Mark,
        }
    }

    /// The error answer to a request of `kind` (`Pong` for a ping, which cannot fail).
    pub fn error(kind: RequestKind, err: EndpointError) -> ResponseBody {
        match kind {
            RequestKind::Ping => ResponseBody::Pong,
            RequestKind::Scan => ResponseBody::Scan(Err(err)),
            RequestKind::Manifests => ResponseBody::Manifests(Err(err)),
            RequestKind::ReadChunks => ResponseBody::ReadChunks(Err(err)),
            RequestKind::Stage => ResponseBody::Stage(Err(err)),
            RequestKind::Supply => ResponseBody::Supply(Err(err)),
            RequestKind::Transition => ResponseBody::Transition(Err(err)),
            RequestKind::PollChanges => ResponseBody::Changes(Err(err)),
            RequestKind::ScanFull => ResponseBody::ScanDelta(Err(err)),
            RequestKind::Stage2 => ResponseBody::Stage2(Err(err)),
            RequestKind::ReadChunks2 => ResponseBody::ReadChunks2(Err(err)),
            RequestKind::Supply2 => ResponseBody::Supply2(Err(err)),
            RequestKind::Scan2 => ResponseBody::Scan2(Err(err)),
            RequestKind::Mark => ResponseBody::Marked(Err(err)),
        }
    }
}
