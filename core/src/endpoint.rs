//! The `Endpoint` trait: everything the controller asks of one side of a share. The engine's
//! local side and the transport's remote side both implement it, and the controller cannot tell
//! them apart (docs/design.md, "One interface for the local and the remote side").
//!
//! A file update crosses in three steps so that nothing half-written is ever visible and renamed
//! or copied data never crosses the wire:
//! 1. `manifests` on the source: the chunk lists of the files to send;
//! 2. `stage` on the destination: it builds each file in its reserved directory from chunks it
//!    finds locally and answers with the chunks it still lacks, offering for some of them a
//!    *base* (a signature of old bytes the chunk probably resembles, see [`crate::delta`]);
//!    `supply` fills those in with data the controller read from the source with `read_deltas`:
//!    a delta against the base where that is smaller, the whole chunk otherwise. A delta that
//!    does not rebuild its chunk leaves it missing, and the controller sends it whole;
//! 3. `transition` on the destination: verify-before-replace, rename into place, fsync.
//!
//! Per-path trouble is data (`Problem`, `Outcome::Failed`), not an `Err`: an `Err` means the
//! side as a whole cannot go on (root gone, connection lost, peer misbehaved).

use crate::digest::Hash;
use crate::entry::{ChunkRef, Entry, FileMeta, Manifest};
use crate::path::RelPath;
use serde::{Deserialize, Serialize};
use std::future::Future;

/// What to scan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScanScope {
    /// The whole share.
    Full,
    /// These paths and, where they are directories, everything beneath them. Paths that do not
    /// exist are simply absent from the report.
    Paths(
        #[serde(
            deserialize_with = "crate::bounded::vec::<_, _, { crate::limits::MAX_BATCH_PATHS }>"
        )]
        Vec<RelPath>,
    ),
}

/// The identity of a share root: the random id in its marker file, and where it lives.
/// A change of any of these between cycles means the root was replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RootId {
    /// The marker's random id; [`RootId::NO_MARKER`] when the root has no marker file.
    pub marker: [u8; 16],
    pub dev: u64,
    pub ino: u64,
}

impl RootId {
    /// The marker of a root that has none (a real marker is 16 random bytes, never all zero):
    /// the scan still reports where the root is, so that the host can tell a marker removed
    /// in place from a root replaced by another directory.
    pub const NO_MARKER: [u8; 16] = [0; 16];

    pub fn has_marker(&self) -> bool {
        self.marker != RootId::NO_MARKER
    }
}

/// Why a destination did not stage a file (see [`Endpoint::stage`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotStaged {
    /// No room to stage it now: the destination holds a limited number of temp files open (a
    /// share of its descriptor limit), and files staged earlier still wait for their
    /// transition. Not a problem: the controller commits what waits and asks again.
    NoRoom,
    /// A problem worth showing; the file is retried on a later cycle.
    Problem(Problem),
}

impl NotStaged {
    /// What `status` shows for a file left unstaged for want of room.
    pub const NO_ROOM_REASON: &str = "too many files staged at once; will retry";
}

/// A path that could not be synced this time, and why. Shown in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub path: RelPath,
    pub reason: String,
}

/// The result of a scan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanReport {
    /// The root's identity (with [`RootId::NO_MARKER`] when the root has no marker and none
    /// was created); `None` from a side that cannot say where its root is.
    pub root: Option<RootId>,
    /// Every syncable, non-ignored entry in scope, sorted by path. Never contains the root.
    pub entries: Vec<(RelPath, Entry)>,
    /// Entries skipped (special files, escaping symlinks, unreadable, unstable) and why.
    pub problems: Vec<Problem>,
    /// Paths in scope that the tree's own ignore files (`.gitignore`, `.ignore`) exclude on
    /// this side, sorted, none beneath another (what is beneath an ignored directory is not
    /// listed: it is ignored with it). The controller leaves them, and everything beneath
    /// them, alone on both sides. At most [`MAX_SCAN_IGNORED`](crate::limits::MAX_SCAN_IGNORED);
    /// beyond that a scan lists ancestor directories instead. Empty unless the share
    /// respects ignore files. Paths the configured `ignore` patterns exclude are not listed:
    /// both sides apply those alike.
    pub ignored: Vec<RelPath>,
    /// The share generation this side last noted ([`Endpoint::mark`]), kept in its reserved
    /// directory beside the files it describes; `None` when there is none. Read on every scan.
    pub generation: Option<u64>,
}

/// Options that shape a scan; the host sends its share config's values to the guest.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ScanOptions {
    /// Create the root marker if it is missing (only on a first sync or after `resume`).
    pub create_marker: bool,
}

/// One chunk to read from a source file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRead {
    pub path: RelPath,
    pub chunk: ChunkRef,
}

/// A chunk the destination still lacks after staging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingChunk {
    pub hash: Hash,
    /// An rsync signature of bytes the destination holds that the chunk probably resembles
    /// (see [`crate::delta`]): the source may answer with a delta against them.
    pub base: Option<Vec<u8>>,
}

/// One chunk to read from a source file, with the base the destination offered for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaRead {
    pub read: ChunkRead,
    pub base: Option<Vec<u8>>,
}

/// Chunk content on its way from a source to a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkData {
    /// The chunk's bytes, verified against its id.
    Whole(Vec<u8>),
    /// An rsync delta that rebuilds the chunk from the base the destination offered for it.
    /// Unverified until the destination has applied it.
    Delta(Vec<u8>),
}

impl ChunkData {
    /// Bytes this carries (the delta's length for a delta).
    pub fn len(&self) -> usize {
        match self {
            ChunkData::Whole(d) | ChunkData::Delta(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A file the destination should build, ready for a later `transition`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRequest {
    pub path: RelPath,
    pub meta: FileMeta,
    pub manifest: Manifest,
}

/// A change to make on one side, checked against what the scan saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub path: RelPath,
    /// What must be on disk right now for the change to go ahead (`None`: nothing).
    pub expected: Option<Entry>,
    /// What must be there afterwards (`None`: delete). A file needs a completed `stage` of the
    /// same digest, unless the file on disk already has that content (a metadata-only change).
    pub new: Option<Entry>,
}

/// How one `Change` went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Done; the path now holds `Change::new`.
    Applied,
    /// The path no longer matches `Change::expected`: nothing was changed. Holds what is there.
    Changed(Option<Entry>),
    /// Not done, for a reason worth showing; retried on a later cycle.
    Failed(String),
}

/// What changed on a side since it last answered [`Endpoint::changes`]: hints, not facts. The
/// controller rescans these paths (a directory with everything beneath it) to learn what they
/// are now.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChangeHints {
    /// Paths that changed, coalesced: no path here lies beneath another one here.
    #[serde(deserialize_with = "crate::bounded::vec::<_, _, { crate::limits::MAX_BATCH_PATHS }>")]
    pub paths: Vec<RelPath>,
    /// Too much changed to say what (an event queue overflowed, too many paths, a watch could
    /// not be placed): rescan the whole share.
    pub rescan: bool,
}

impl ChangeHints {
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty() && !self.rescan
    }
}

/// Why a side cannot go on at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum EndpointError {
    #[error("share root is missing: {0}")]
    RootMissing(String),
    #[error("share root is not a directory (or is a symlink): {0}")]
    RootNotDir(String),
    #[error("unknown share `{0}`")]
    UnknownShare(String),
    #[error("connection lost: {0}")]
    Disconnected(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("I/O error: {0}")]
    Io(String),
    #[error("resource limit: {0}")]
    Limit(String),
    /// The side's filesystem has less free space than its reserve (`min_free`): it refuses to
    /// stage or write new content until there is room again. Bytes free for an unprivileged
    /// writer, and the reserve.
    #[error("disk full: {} free, below the reserve of {}", crate::reserve::ShowBytes(*free), crate::reserve::ShowBytes(*reserve))]
    DiskFull { free: u64, reserve: u64 },
}

/// One side of a share. See the module docs for how a transfer uses these.
pub trait Endpoint: Send {
    /// Scans `scope`, returning sorted entries and the root identity.
    fn scan(
        &mut self,
        scope: ScanScope,
        options: ScanOptions,
    ) -> impl Future<Output = Result<ScanReport, EndpointError>> + Send;

    /// The chunk lists of these files, each checked against the given metadata. A file whose
    /// content no longer matches gets a `Problem` instead.
    fn manifests(
        &mut self,
        files: Vec<(RelPath, FileMeta)>,
    ) -> impl Future<Output = Result<Vec<Result<Manifest, Problem>>, EndpointError>> + Send;

    /// Reads chunks from source files, verifying each against its hash. `None` where the data
    /// on disk no longer hashes to the chunk id (the file changed since its scan).
    fn read_chunks(
        &mut self,
        reads: Vec<ChunkRead>,
    ) -> impl Future<Output = Result<Vec<Option<Vec<u8>>>, EndpointError>> + Send;

    /// Reads chunks like [`Endpoint::read_chunks`], answering a read that carries a base with a
    /// delta against it where the delta is smaller than the chunk. `None` where the data on
    /// disk no longer hashes to the chunk id.
    fn read_deltas(
        &mut self,
        reads: Vec<DeltaRead>,
    ) -> impl Future<Output = Result<Vec<Option<ChunkData>>, EndpointError>> + Send;

    /// Starts building these files from locally available chunks. Returns, per file, the chunks
    /// still missing (each once, some with a base to send a delta against), or a `Problem`.
    fn stage(
        &mut self,
        files: Vec<StageRequest>,
    ) -> impl Future<Output = Result<Vec<Result<Vec<MissingChunk>, NotStaged>>, EndpointError>> + Send;

    /// Supplies missing chunk data for staged files. Whole chunks are verified against their
    /// ids (a mismatch is an error); a delta is applied to the base this side offered and the
    /// result verified. Returns the chunks still missing because their delta did not rebuild
    /// them (the base changed meanwhile, a checksum collision): send those whole.
    fn supply(
        &mut self,
        chunks: Vec<(Hash, ChunkData)>,
    ) -> impl Future<Output = Result<Vec<Hash>, EndpointError>> + Send;

    /// Waits until this side has seen changes since the previous call, then returns them. The
    /// first call starts watching and returns at once with `rescan` set (nothing before the
    /// watch is known). Changes this side's own `transition`s made may be included; rescanning
    /// them finds them unchanged.
    /// A side that cannot watch never answers (the default).
    fn changes(&mut self) -> impl Future<Output = Result<ChangeHints, EndpointError>> + Send {
        std::future::pending()
    }

    /// Puts back what this side's own recent `transition`s removed, for a share that halted
    /// because the other side's deletions were too many (see `docs/safety.md`): each item is a
    /// path and the entry a transition removed or replaced there, given parents first. A
    /// directory is re-created where nothing is; a file or symlink is moved back from the
    /// share's trash when the path is free and the kept version is that entry. Per item:
    /// `Applied` (back in place), `Changed` (something else is there now: left alone) or
    /// `Failed` (not found in the trash, or an error). A side that keeps no trash (the
    /// default) fails every item.
    fn put_back(
        &mut self,
        items: Vec<(RelPath, Entry)>,
    ) -> impl Future<Output = Result<Vec<Outcome>, EndpointError>> + Send {
        let outcomes = items
            .iter()
            .map(|_| Outcome::Failed("this side keeps no trash".into()))
            .collect();
        std::future::ready(Ok(outcomes))
    }

    /// Notes `generation` durably enough in this side's reserved directory (see
    /// `docs/safety.md`, "Snapshot reverts"): from now on its scans report it. The host calls
    /// it on the guest before it records a new ancestor. A side that keeps no generation (the
    /// default) does nothing.
    fn mark(&mut self, generation: u64) -> impl Future<Output = Result<(), EndpointError>> + Send {
        let _ = generation;
        std::future::ready(Ok(()))
    }

    /// Hears how the share's sync stands, as the host sees it (the host tells its guest; see
    /// [`crate::progress`]). Only the guest's readiness and status use it: nothing that syncs
    /// depends on it. A side with no use for it (the default) ignores it.
    fn note_sync(
        &mut self,
        state: crate::progress::SyncState,
    ) -> impl Future<Output = Result<(), EndpointError>> + Send {
        let _ = state;
        std::future::ready(Ok(()))
    }

    /// Applies changes in the order given (the controller orders removals children-first and
    /// creations parents-first). A staged file stays staged until a transition consumes it, a
    /// new `stage` of the same path replaces it, or a full scan discards every leftover.
    fn transition(
        &mut self,
        changes: Vec<Change>,
    ) -> impl Future<Output = Result<Vec<Outcome>, EndpointError>> + Send;
}
