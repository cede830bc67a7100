//! Checks serde cannot express, run on every message right after it is decoded (and before one is
//! sent, so a local bug becomes a typed error instead of a session the peer tears down).
//!
//! What is checked: counts and string lengths against [`crate::limits`]; entry metadata (mode bits
//! within `0o777`, timestamp nanoseconds below 10^9, symlink targets non-empty, NUL-free and
//! bounded); chunk references (length within `1..=CHUNK_MAX_BYTES`, no offset overflow); manifest
//! and missing-chunk lists within `MAX_FILE_CHUNKS`; scan reports sorted strictly by path and not
//! containing the root; wire chunks and deltas whose data length fits their codec; delta
//! signatures within `MAX_SIGNATURE_BYTES`.
//!
//! What is not: anything that needs the session state (the handshake decides magic, versions,
//! chunker parameters and share names, see [`crate::handshake`]) or real work (decompressing and
//! hashing chunks is [`crate::chunk::decode_chunk`], a manifest's coverage and digest is
//! `Manifest::validate` at the consumer).

use crate::chunk::{Codec, WireChunk, WireContent, WireDelta};
use crate::limits::{
    CHUNK_MAX_BYTES, MAX_AGENT_VERSION_BYTES, MAX_BATCH_CHANGES, MAX_BATCH_CHUNKS, MAX_BATCH_FILES,
    MAX_BATCH_PATHS, MAX_DELTA_BYTES, MAX_FILE_CHUNKS, MAX_GENERATION, MAX_HALT_CODE_BYTES,
    MAX_IGNORE_PATTERNS, MAX_IGNORE_PATTERN_BYTES, MAX_MANIFEST_LINKS, MAX_REASON_BYTES,
    MAX_SCAN_ENTRIES, MAX_SCAN_IGNORED, MAX_SCAN_PROBLEMS, MAX_SHARES, MAX_SHARE_NAME_BYTES,
    MAX_SIGNATURE_BYTES, MAX_SYMLINK_TARGET_BYTES,
};
use crate::messages::{
    BasedRead, ErrorCode, Hello, ManifestForm, Message, Refused, Request, RequestBody, Response,
    ResponseBody, ScanDelta, Scanned, ShareOpen, StageAnswer, StageFile, Welcome, WireError,
    WireProblem, SCAN_MANIFESTS_MAX,
};
use vmsync_core::edits::ManifestEdit;
use vmsync_core::endpoint::MissingChunk;
use vmsync_core::endpoint::{Change, Outcome, ScanScope};
use vmsync_core::entry::PERM_MASK;
use vmsync_core::progress::SyncState;
use vmsync_core::{ChunkRef, Entry, FileMeta, Manifest, RelPath, Timestamp};

/// Nanoseconds in a second: a timestamp's `nanos` must be below it.
pub const NANOS_PER_SEC: u32 = 1_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("{what}: {count} items, more than the limit of {max}")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("{what}: {len} bytes, more than the limit of {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} contains a control character")]
    ControlCharacter { what: &'static str },
    #[error("mode {mode:#o} has bits outside {PERM_MASK:#o}")]
    BadMode { mode: u32 },
    #[error("timestamp has {nanos} nanoseconds, not below {NANOS_PER_SEC}")]
    BadNanos { nanos: u32 },
    #[error("symlink target contains a NUL byte")]
    NulInSymlink,
    #[error("chunk length {len} is outside 1..={CHUNK_MAX_BYTES}")]
    BadChunkLength { len: u32 },
    #[error("chunk at offset {offset} with length {len} runs past the largest file size")]
    ChunkOverflow { offset: u64, len: u32 },
    #[error("scan entry {index} is not after the previous one in path order")]
    Unsorted { index: usize },
    #[error("scan report lists the share root as an entry")]
    RootEntry,
    #[error("{codec:?} chunk carries {actual} bytes of data for {declared} declared bytes")]
    ChunkDataLength {
        codec: Codec,
        declared: u32,
        actual: usize,
    },
    #[error("delta length {len} is outside 1..={MAX_DELTA_BYTES}")]
    BadDeltaLength { len: u32 },
    #[error("a targeted Scan asks for a full scan, which only ScanFull does")]
    FullTargetedScan,
    #[error("share generation {0} is above the limit of {MAX_GENERATION}")]
    BadGeneration(u64),
}

impl ValidationError {
    /// True when the message broke a size or count bound (as opposed to carrying a malformed
    /// value): for a message we were about to send, that is a resource limit, not a bug.
    pub fn is_limit(&self) -> bool {
        matches!(
            self,
            ValidationError::TooMany { .. } | ValidationError::TooLong { .. }
        )
    }
}

type Result<T = ()> = std::result::Result<T, ValidationError>;

/// A structural check on a decoded value.
pub trait Validate {
    fn validate(&self) -> Result;
}

fn count(what: &'static str, count: usize, max: usize) -> Result {
    if count > max {
        return Err(ValidationError::TooMany { what, count, max });
    }
    Ok(())
}

fn bytes(what: &'static str, len: usize, max: usize) -> Result {
    if len > max {
        return Err(ValidationError::TooLong { what, len, max });
    }
    Ok(())
}

fn text(what: &'static str, s: &str, max: usize) -> Result {
    bytes(what, s.len(), max)
}

/// A single-line string: bounded and free of control characters (they would let a peer forge
/// log lines, or split one ignore pattern into several).
fn line(what: &'static str, s: &str, max: usize) -> Result {
    text(what, s, max)?;
    if s.chars().any(char::is_control) {
        return Err(ValidationError::ControlCharacter { what });
    }
    Ok(())
}

fn mode(mode: u32) -> Result {
    if mode & !PERM_MASK != 0 {
        return Err(ValidationError::BadMode { mode });
    }
    Ok(())
}

fn timestamp(t: &Timestamp) -> Result {
    if t.nanos >= NANOS_PER_SEC {
        return Err(ValidationError::BadNanos { nanos: t.nanos });
    }
    Ok(())
}

fn file_meta(m: &FileMeta) -> Result {
    mode(m.mode)?;
    timestamp(&m.mtime)
}

fn entry(e: &Entry) -> Result {
    match e {
        Entry::File(m) => file_meta(m),
        Entry::Dir { mode: m, mtime } => {
            mode(*m)?;
            timestamp(mtime)
        }
        Entry::Symlink { target, mtime } => {
            timestamp(mtime)?;
            if target.is_empty() {
                return Err(ValidationError::Empty {
                    what: "symlink target",
                });
            }
            bytes("symlink target", target.len(), MAX_SYMLINK_TARGET_BYTES)?;
            if target.contains(&0) {
                return Err(ValidationError::NulInSymlink);
            }
            Ok(())
        }
    }
}

fn chunk_ref(c: &ChunkRef) -> Result {
    if c.len == 0 || c.len > CHUNK_MAX_BYTES {
        return Err(ValidationError::BadChunkLength { len: c.len });
    }
    if c.offset.checked_add(u64::from(c.len)).is_none() {
        return Err(ValidationError::ChunkOverflow {
            offset: c.offset,
            len: c.len,
        });
    }
    Ok(())
}

fn manifest(m: &Manifest) -> Result {
    count("manifest chunks", m.chunks.len(), MAX_FILE_CHUNKS)?;
    count("manifest links", m.links.len(), MAX_MANIFEST_LINKS)?;
    m.chunks.iter().try_for_each(chunk_ref)
}

fn problem(p: &WireProblem) -> Result {
    text("problem reason", &p.message, MAX_REASON_BYTES)
}

fn wire_error(e: &WireError) -> Result {
    if let ErrorCode::DiskFull { .. } = e.code {
        // Its text is made from its numbers on the side that shows it.
        return text("error message", &e.message, 0);
    }
    text("error message", &e.message, MAX_REASON_BYTES)
}

fn result<T>(r: &std::result::Result<T, WireError>, ok: impl FnOnce(&T) -> Result) -> Result {
    match r {
        Ok(v) => ok(v),
        Err(e) => wire_error(e),
    }
}

impl Validate for WireChunk {
    fn validate(&self) -> Result {
        if self.len == 0 || self.len > CHUNK_MAX_BYTES {
            return Err(ValidationError::BadChunkLength { len: self.len });
        }
        codec_data(self.codec, self.len, &self.data)
    }
}

/// Data that fits its codec: raw data is exactly `declared` bytes, compressed data is shorter
/// (it is only sent when it is, see `chunk::encode_chunk`) and not empty.
fn codec_data(codec: Codec, declared: u32, data: &[u8]) -> Result {
    // `declared` is at most 64 KiB here: it fits any usize we build for.
    let n = usize::try_from(declared).unwrap_or(usize::MAX);
    let fits = match codec {
        Codec::Raw => data.len() == n,
        Codec::Zstd => !data.is_empty() && data.len() < n,
    };
    if !fits {
        return Err(ValidationError::ChunkDataLength {
            codec,
            declared,
            actual: data.len(),
        });
    }
    Ok(())
}

impl Validate for WireDelta {
    fn validate(&self) -> Result {
        if self.len == 0 || usize::try_from(self.len).map_or(true, |n| n > MAX_DELTA_BYTES) {
            return Err(ValidationError::BadDeltaLength { len: self.len });
        }
        codec_data(self.codec, self.len, &self.data)
    }
}

impl Validate for WireContent {
    fn validate(&self) -> Result {
        match self {
            WireContent::Whole(c) => c.validate(),
            WireContent::Delta(d) => d.validate(),
        }
    }
}

fn signature(base: &Option<Vec<u8>>) -> Result {
    match base {
        Some(sig) => bytes("delta signature", sig.len(), MAX_SIGNATURE_BYTES),
        None => Ok(()),
    }
}

fn missing_chunks(missing: &[MissingChunk]) -> Result {
    count("missing chunks", missing.len(), MAX_FILE_CHUNKS)?;
    missing.iter().try_for_each(|m| signature(&m.base))
}

fn stage_file(f: &StageFile) -> Result {
    file_meta(&f.meta)?;
    match &f.manifest {
        ManifestForm::Full(m) => manifest(m),
        ManifestForm::Edits { edits, .. } => manifest_edits(edits),
    }
}

/// Edits: bounded in number and in new references, each reference's length legal. Whether the
/// copies fit the old manifest is checked when they are applied (`vmsync_core::edits::apply`).
fn manifest_edits(edits: &[ManifestEdit]) -> Result {
    count("manifest edits", edits.len(), MAX_FILE_CHUNKS)?;
    let mut new = 0usize;
    for e in edits {
        if let ManifestEdit::New(refs) = e {
            new = new.saturating_add(refs.len());
            count("new chunk references", new, MAX_FILE_CHUNKS)?;
            for &(_, len) in refs {
                if len == 0 || len > CHUNK_MAX_BYTES {
                    return Err(ValidationError::BadChunkLength { len });
                }
            }
        }
    }
    Ok(())
}

fn based_read(r: &BasedRead) -> Result {
    chunk_ref(&r.read.chunk)?;
    signature(&r.base)
}

impl Validate for ShareOpen {
    fn validate(&self) -> Result {
        text("share name", &self.name, MAX_SHARE_NAME_BYTES)?;
        count("ignore patterns", self.ignore.len(), MAX_IGNORE_PATTERNS)?;
        self.ignore
            .iter()
            .try_for_each(|p| line("ignore pattern", p, MAX_IGNORE_PATTERN_BYTES))
    }
}

impl Validate for Hello {
    fn validate(&self) -> Result {
        line(
            "agent version",
            &self.agent_version,
            MAX_AGENT_VERSION_BYTES,
        )?;
        count("shares", self.shares.len(), MAX_SHARES)?;
        self.shares.iter().try_for_each(Validate::validate)
    }
}

impl Validate for Welcome {
    fn validate(&self) -> Result {
        line(
            "agent version",
            &self.agent_version,
            MAX_AGENT_VERSION_BYTES,
        )
    }
}

impl Validate for Refused {
    fn validate(&self) -> Result {
        text("refusal reason", &self.reason, MAX_REASON_BYTES)
    }
}

impl Validate for Scanned {
    fn validate(&self) -> Result {
        count("scan problems", self.problems.len(), MAX_SCAN_PROBLEMS)?;
        scan_entries(&self.entries)?;
        ignored_paths(&self.ignored)?;
        generation(self.generation)?;
        self.problems.iter().try_for_each(problem)?;
        count("scan manifests", self.manifests.len(), SCAN_MANIFESTS_MAX)?;
        let paths: Vec<RelPath> = self.manifests.iter().map(|(p, _)| p.clone()).collect();
        strictly_sorted(&paths)?;
        self.manifests.iter().try_for_each(|(_, m)| manifest(m))
    }
}

fn generation(g: Option<u64>) -> Result {
    match g {
        Some(g) if g > MAX_GENERATION => Err(ValidationError::BadGeneration(g)),
        _ => Ok(()),
    }
}

/// Ignored paths: bounded and strictly sorted (so without duplicates). The root may appear: a
/// scan that skipped more than it may list reports ever shallower directories, at worst the
/// root.
fn ignored_paths(paths: &[RelPath]) -> Result {
    count("ignored paths", paths.len(), MAX_SCAN_IGNORED)?;
    strictly_sorted(paths)
}

/// A list of paths in strictly increasing order.
fn strictly_sorted(paths: &[RelPath]) -> Result {
    for (index, pair) in paths.windows(2).enumerate() {
        if pair[0] >= pair[1] {
            return Err(ValidationError::Unsorted { index: index + 1 });
        }
    }
    Ok(())
}

/// Scan entries: bounded, strictly sorted by path, never the root, each entry valid.
fn scan_entries(entries: &[(RelPath, Entry)]) -> Result {
    count("scan entries", entries.len(), MAX_SCAN_ENTRIES)?;
    let mut previous = None;
    for (index, (path, e)) in entries.iter().enumerate() {
        if path.is_root() {
            return Err(ValidationError::RootEntry);
        }
        if previous.is_some_and(|p| p >= path) {
            return Err(ValidationError::Unsorted { index });
        }
        previous = Some(path);
        entry(e)?;
    }
    Ok(())
}

impl Validate for ScanDelta {
    fn validate(&self) -> Result {
        count("removed scan entries", self.removed.len(), MAX_SCAN_ENTRIES)?;
        count("scan problems", self.problems.len(), MAX_SCAN_PROBLEMS)?;
        scan_entries(&self.changed)?;
        strictly_sorted(&self.removed)?;
        ignored_paths(&self.ignored)?;
        generation(self.generation)?;
        self.problems.iter().try_for_each(problem)
    }
}

fn change(c: &Change) -> Result {
    if let Some(e) = &c.expected {
        entry(e)?;
    }
    if let Some(e) = &c.new {
        entry(e)?;
    }
    Ok(())
}

impl Validate for RequestBody {
    fn validate(&self) -> Result {
        match self {
            RequestBody::Ping => Ok(()),
            RequestBody::Scan { scope, options: _ } => match scope {
                ScanScope::Full => Err(ValidationError::FullTargetedScan),
                ScanScope::Paths(paths) => count("scan paths", paths.len(), MAX_BATCH_PATHS),
            },
            RequestBody::Manifests { files } => {
                count("manifest requests", files.len(), MAX_BATCH_FILES)?;
                files.iter().try_for_each(|(_, m)| file_meta(m))
            }
            RequestBody::ReadChunks { reads } => {
                count("chunk reads", reads.len(), MAX_BATCH_CHUNKS)?;
                reads.iter().try_for_each(based_read)
            }
            RequestBody::Stage { files } => {
                count("files to stage", files.len(), MAX_BATCH_FILES)?;
                files.iter().try_for_each(stage_file)
            }
            RequestBody::Supply { chunks } => {
                count("supplied chunks", chunks.len(), MAX_BATCH_CHUNKS)?;
                chunks.iter().try_for_each(Validate::validate)
            }
            RequestBody::Transition { changes } => {
                count("changes", changes.len(), MAX_BATCH_CHANGES)?;
                changes.iter().try_for_each(change)
            }
            RequestBody::PollChanges { .. } | RequestBody::ScanFull { .. } => Ok(()),
            RequestBody::Mark { generation: g } => generation(Some(*g)),
            RequestBody::NoteSync(state) => match state {
                SyncState::Halted { code } => line("halt code", code, MAX_HALT_CODE_BYTES),
                SyncState::Syncing(_) | SyncState::InSync | SyncState::Conflicted { .. } => Ok(()),
            },
        }
    }
}

fn outcome(o: &Outcome) -> Result {
    match o {
        Outcome::Applied | Outcome::Changed(None) => Ok(()),
        Outcome::Changed(Some(e)) => entry(e),
        Outcome::Failed(reason) => text("failure reason", reason, MAX_REASON_BYTES),
    }
}

impl Validate for ResponseBody {
    fn validate(&self) -> Result {
        match self {
            ResponseBody::Pong => Ok(()),
            ResponseBody::Scanned(r) => result(r, Validate::validate),
            ResponseBody::ScanDelta(r) => result(r, Validate::validate),
            ResponseBody::Manifests(r) => result(r, |files| {
                count("manifests", files.len(), MAX_BATCH_FILES)?;
                files.iter().try_for_each(|f| match f {
                    Ok(m) => manifest(m),
                    Err(p) => problem(p),
                })
            }),
            ResponseBody::Chunks(r) => result(r, |chunks| {
                count("chunks read", chunks.len(), MAX_BATCH_CHUNKS)?;
                chunks.iter().flatten().try_for_each(Validate::validate)
            }),
            ResponseBody::Staged(r) => result(r, |files| {
                count("staged files", files.len(), MAX_BATCH_FILES)?;
                files.iter().try_for_each(|f| match f {
                    StageAnswer::Missing(missing) => missing_chunks(missing),
                    StageAnswer::Problem(p) => problem(p),
                    StageAnswer::BaseUnknown | StageAnswer::NoRoom => Ok(()),
                })
            }),
            ResponseBody::Supplied(r) => result(r, |missing| {
                count("chunks still missing", missing.len(), MAX_BATCH_CHUNKS)
            }),
            ResponseBody::Transitioned(r) => result(r, |outcomes| {
                count("outcomes", outcomes.len(), MAX_BATCH_CHANGES)?;
                outcomes.iter().try_for_each(outcome)
            }),
            ResponseBody::Changes(r) => result(r, |hints| {
                count("change hints", hints.paths.len(), MAX_BATCH_PATHS)
            }),
            ResponseBody::Marked(r) | ResponseBody::Noted(r) => result(r, |()| Ok(())),
        }
    }
}

impl Validate for Request {
    fn validate(&self) -> Result {
        self.body.validate()
    }
}

impl Validate for Response {
    fn validate(&self) -> Result {
        self.body.validate()
    }
}

impl Validate for Message {
    fn validate(&self) -> Result {
        match self {
            Message::Hello(m) => m.validate(),
            Message::Welcome(m) => m.validate(),
            Message::Refused(m) => m.validate(),
            Message::Request(m) => m.validate(),
            Message::Response(m) => m.validate(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{encode_chunk, hash_chunk};
    use vmsync_core::endpoint::ChunkRead;
    use vmsync_core::{Hash, RelPath};

    fn scanned(entries: Vec<(RelPath, Entry)>) -> Scanned {
        Scanned {
            root: None,
            entries,
            problems: vec![],
            ignored: vec![],
            generation: None,
            manifests: vec![],
        }
    }

    fn p(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes()).unwrap()
    }

    fn meta(mode: u32, nanos: u32) -> FileMeta {
        FileMeta {
            size: 1,
            mode,
            mtime: Timestamp::new(1, nanos),
            digest: Hash::default(),
        }
    }

    fn scan(entries: Vec<(RelPath, Entry)>) -> ResponseBody {
        ResponseBody::Scanned(Ok(scanned(entries)))
    }

    #[test]
    fn entry_metadata() {
        let ok = scan(vec![
            (
                p("a"),
                Entry::Dir {
                    mode: 0o755,
                    mtime: Default::default(),
                },
            ),
            (p("a/b"), Entry::File(meta(0o644, 999_999_999))),
            (
                p("c"),
                Entry::Symlink {
                    target: b"a/b".to_vec(),
                    mtime: Default::default(),
                },
            ),
        ]);
        assert_eq!(ok.validate(), Ok(()));
        let bad = [
            (
                scan(vec![(
                    p("a"),
                    Entry::Dir {
                        mode: 0o4755,
                        mtime: Default::default(),
                    },
                )]),
                ValidationError::BadMode { mode: 0o4755 },
            ),
            (
                scan(vec![(p("a"), Entry::File(meta(0o1777, 0)))]),
                ValidationError::BadMode { mode: 0o1777 },
            ),
            (
                scan(vec![(p("a"), Entry::File(meta(0o644, NANOS_PER_SEC)))]),
                ValidationError::BadNanos {
                    nanos: NANOS_PER_SEC,
                },
            ),
            (
                scan(vec![(
                    p("a"),
                    Entry::Symlink {
                        target: vec![],
                        mtime: Default::default(),
                    },
                )]),
                ValidationError::Empty {
                    what: "symlink target",
                },
            ),
            (
                scan(vec![(
                    p("a"),
                    Entry::Symlink {
                        target: b"x\0y".to_vec(),
                        mtime: Default::default(),
                    },
                )]),
                ValidationError::NulInSymlink,
            ),
            (
                scan(vec![(
                    p("a"),
                    Entry::Symlink {
                        target: vec![b'x'; MAX_SYMLINK_TARGET_BYTES + 1],
                        mtime: Default::default(),
                    },
                )]),
                ValidationError::TooLong {
                    what: "symlink target",
                    len: MAX_SYMLINK_TARGET_BYTES + 1,
                    max: MAX_SYMLINK_TARGET_BYTES,
                },
            ),
        ];
        for (body, want) in bad {
            assert_eq!(body.validate(), Err(want));
        }
    }

    #[test]
    fn scan_report_order() {
        let dir = Entry::Dir {
            mode: 0o755,
            mtime: Default::default(),
        };
        assert_eq!(
            scan(vec![(p("b"), dir.clone()), (p("a"), dir.clone())]).validate(),
            Err(ValidationError::Unsorted { index: 1 })
        );
        assert_eq!(
            scan(vec![(p("a"), dir.clone()), (p("a"), dir.clone())]).validate(),
            Err(ValidationError::Unsorted { index: 1 })
        );
        assert_eq!(
            scan(vec![(RelPath::root(), dir)]).validate(),
            Err(ValidationError::RootEntry)
        );
    }

    #[test]
    fn ignored_paths_sorted_unique_bounded() {
        let report = |ignored: Vec<RelPath>| {
            ResponseBody::Scanned(Ok(Scanned {
                ignored,
                ..scanned(vec![])
            }))
        };
        let delta = |ignored: Vec<RelPath>| {
            ResponseBody::ScanDelta(Ok(ScanDelta {
                token: 1,
                base: None,
                root: None,
                changed: vec![],
                removed: vec![],
                problems: vec![],
                ignored,
                generation: None,
            }))
        };
        let bodies: [fn(Vec<RelPath>) -> ResponseBody; 2] = [report, delta];
        for body in bodies {
            assert_eq!(
                body(vec![RelPath::root(), p("a"), p("a/b")]).validate(),
                Ok(())
            );
            for bad in [vec![p("b"), p("a")], vec![p("a"), p("a")]] {
                assert_eq!(
                    body(bad).validate(),
                    Err(ValidationError::Unsorted { index: 1 })
                );
            }
            let many: Vec<RelPath> = (0..=MAX_SCAN_IGNORED)
                .map(|i| p(&format!("f{i:06}")))
                .collect();
            assert!(body(many).validate().unwrap_err().is_limit());
        }
    }

    #[test]
    fn chunk_refs() {
        let read = |offset, len| RequestBody::ReadChunks {
            reads: vec![BasedRead {
                read: ChunkRead {
                    path: p("f"),
                    chunk: ChunkRef {
                        hash: Hash::default(),
                        offset,
                        len,
                    },
                },
                base: None,
            }],
        };
        assert_eq!(read(0, 1).validate(), Ok(()));
        assert_eq!(read(0, CHUNK_MAX_BYTES).validate(), Ok(()));
        assert_eq!(
            read(0, 0).validate(),
            Err(ValidationError::BadChunkLength { len: 0 })
        );
        assert_eq!(
            read(0, CHUNK_MAX_BYTES + 1).validate(),
            Err(ValidationError::BadChunkLength {
                len: CHUNK_MAX_BYTES + 1
            })
        );
        assert_eq!(
            read(u64::MAX, 1).validate(),
            Err(ValidationError::ChunkOverflow {
                offset: u64::MAX,
                len: 1
            })
        );
    }

    #[test]
    fn batch_counts() {
        let reads = vec![
            BasedRead {
                read: ChunkRead {
                    path: p("f"),
                    chunk: ChunkRef {
                        hash: Hash::default(),
                        offset: 0,
                        len: 1
                    }
                },
                base: None,
            };
            MAX_BATCH_CHUNKS + 1
        ];
        let err = RequestBody::ReadChunks { reads }.validate().unwrap_err();
        assert!(err.is_limit());
        let paths = vec![p("x"); MAX_BATCH_PATHS + 1];
        assert!(RequestBody::Scan {
            scope: ScanScope::Paths(paths),
            options: Default::default()
        }
        .validate()
        .unwrap_err()
        .is_limit());
        let missing = vec![
            vmsync_core::endpoint::MissingChunk {
                hash: Hash::default(),
                base: None
            };
            MAX_FILE_CHUNKS + 1
        ];
        assert!(
            ResponseBody::Staged(Ok(vec![StageAnswer::Missing(missing)]))
                .validate()
                .unwrap_err()
                .is_limit()
        );
    }

    #[test]
    fn wire_chunks() {
        let data = vec![0u8; 1000];
        let z = encode_chunk(hash_chunk(&data), &data, 3);
        assert_eq!(z.codec, Codec::Zstd);
        assert_eq!(z.validate(), Ok(()));
        let raw = encode_chunk(hash_chunk(&data), &data, 0);
        assert_eq!(raw.validate(), Ok(()));
        let mut short = raw.clone();
        short.data.pop();
        assert!(matches!(
            short.validate(),
            Err(ValidationError::ChunkDataLength { .. })
        ));
        let mut big = z.clone();
        big.data = vec![0; 1000];
        assert!(matches!(
            big.validate(),
            Err(ValidationError::ChunkDataLength { .. })
        ));
        let mut zero = raw;
        zero.len = 0;
        zero.data.clear();
        assert_eq!(
            zero.validate(),
            Err(ValidationError::BadChunkLength { len: 0 })
        );
    }

    #[test]
    fn chunk_delta_bounds() {
        use crate::chunk::encode_delta;
        use vmsync_core::endpoint::MissingChunk;
        let read = |base: Option<Vec<u8>>| RequestBody::ReadChunks {
            reads: vec![BasedRead {
                read: ChunkRead {
                    path: p("f"),
                    chunk: ChunkRef {
                        hash: Hash::default(),
                        offset: 0,
                        len: 1,
                    },
                },
                base,
            }],
        };
        assert_eq!(read(None).validate(), Ok(()));
        assert_eq!(read(Some(vec![0; MAX_SIGNATURE_BYTES])).validate(), Ok(()));
        assert!(read(Some(vec![0; MAX_SIGNATURE_BYTES + 1]))
            .validate()
            .unwrap_err()
            .is_limit());
        let staged = |base| {
            ResponseBody::Staged(Ok(vec![StageAnswer::Missing(vec![MissingChunk {
                hash: Hash::default(),
                base: Some(base),
            }])]))
        };
        assert_eq!(staged(vec![1; 100]).validate(), Ok(()));
        assert!(staged(vec![1; MAX_SIGNATURE_BYTES + 1])
            .validate()
            .unwrap_err()
            .is_limit());
        // Deltas: bounded declared length, data that fits the codec.
        let supply = |d: WireDelta| RequestBody::Supply {
            chunks: vec![WireContent::Delta(d)],
        };
        let z = encode_delta(Hash::default(), &[0u8; 1000], 3);
        assert_eq!(z.codec, Codec::Zstd);
        assert_eq!(supply(z.clone()).validate(), Ok(()));
        let mut long = encode_delta(Hash::default(), &[1], 0);
        long.len = u32::try_from(MAX_DELTA_BYTES).unwrap() + 1;
        assert_eq!(
            supply(long.clone()).validate(),
            Err(ValidationError::BadDeltaLength { len: long.len })
        );
        let mut empty = z.clone();
        empty.len = 0;
        assert_eq!(
            supply(empty).validate(),
            Err(ValidationError::BadDeltaLength { len: 0 })
        );
        let mut bloated = z;
        bloated.data = vec![0; 1000];
        assert!(matches!(
            supply(bloated).validate(),
            Err(ValidationError::ChunkDataLength { .. })
        ));
        let too_many = ResponseBody::Supplied(Ok(vec![Hash::default(); MAX_BATCH_CHUNKS + 1]));
        assert!(too_many.validate().unwrap_err().is_limit());
    }

    #[test]
    fn a_sync_note_carries_a_short_plain_halt_code() {
        let halted = |code: &str| RequestBody::NoteSync(SyncState::Halted { code: code.into() });
        assert_eq!(halted("mass-deletion").validate(), Ok(()));
        assert!(halted(&"x".repeat(MAX_HALT_CODE_BYTES + 1))
            .validate()
            .unwrap_err()
            .is_limit());
        assert_eq!(
            halted("disk-full\nREADY=1").validate(),
            Err(ValidationError::ControlCharacter { what: "halt code" })
        );
        assert_eq!(
            RequestBody::NoteSync(SyncState::Syncing(None)).validate(),
            Ok(())
        );
    }

    #[test]
    fn generation_bounds() {
        let mark = |generation| RequestBody::Mark { generation };
        assert_eq!(mark(0).validate(), Ok(()));
        assert_eq!(mark(MAX_GENERATION).validate(), Ok(()));
        assert_eq!(
            mark(MAX_GENERATION + 1).validate(),
            Err(ValidationError::BadGeneration(MAX_GENERATION + 1))
        );
        assert_eq!(
            mark(u64::MAX).validate(),
            Err(ValidationError::BadGeneration(u64::MAX))
        );
        let report = |generation| Scanned {
            generation,
            ..scanned(vec![])
        };
        assert_eq!(report(None).validate(), Ok(()));
        assert_eq!(report(Some(MAX_GENERATION)).validate(), Ok(()));
        assert_eq!(
            ResponseBody::Scanned(Ok(report(Some(u64::MAX)))).validate(),
            Err(ValidationError::BadGeneration(u64::MAX))
        );
        let delta = ScanDelta {
            token: 1,
            base: None,
            root: None,
            changed: vec![],
            removed: vec![],
            problems: vec![],
            ignored: vec![],
            generation: Some(MAX_GENERATION + 1),
        };
        assert_eq!(
            ResponseBody::ScanDelta(Ok(delta)).validate(),
            Err(ValidationError::BadGeneration(MAX_GENERATION + 1))
        );
        assert_eq!(ResponseBody::Marked(Ok(())).validate(), Ok(()));
    }

    #[test]
    fn targeted_scan_bounds() {
        assert_eq!(
            RequestBody::Scan {
                scope: ScanScope::Full,
                options: Default::default()
            }
            .validate(),
            Err(ValidationError::FullTargetedScan)
        );
        let answer = |manifests: Vec<(RelPath, Manifest)>| {
            ResponseBody::Scanned(Ok(Scanned {
                manifests,
                ..scanned(vec![])
            }))
        };
        let m = Manifest {
            chunks: vec![],
            links: vec![],
        };
        assert!(answer(vec![(p("a"), m.clone()), (p("b"), m.clone())])
            .validate()
            .is_ok());
        assert_eq!(
            answer(vec![(p("b"), m.clone()), (p("a"), m.clone())]).validate(),
            Err(ValidationError::Unsorted { index: 1 })
        );
        let many = (0..=SCAN_MANIFESTS_MAX)
            .map(|i| (p(&format!("f{i:05}")), m.clone()))
            .collect();
        assert!(answer(many).validate().unwrap_err().is_limit());
    }

    #[test]
    fn manifest_edit_bounds() {
        let stage = |edits: Vec<ManifestEdit>| RequestBody::Stage {
            files: vec![StageFile {
                path: p("f"),
                meta: meta(0o644, 0),
                manifest: ManifestForm::Edits {
                    base_size: 1,
                    base_digest: Hash::default(),
                    edits,
                },
            }],
        };
        let new = |len| ManifestEdit::New(vec![(Hash::default(), len)]);
        let copy = ManifestEdit::Copy { start: 0, count: 1 };
        assert_eq!(stage(vec![copy.clone(), new(1)]).validate(), Ok(()));
        assert_eq!(
            stage(vec![new(0)]).validate(),
            Err(ValidationError::BadChunkLength { len: 0 })
        );
        assert_eq!(
            stage(vec![new(CHUNK_MAX_BYTES + 1)]).validate(),
            Err(ValidationError::BadChunkLength {
                len: CHUNK_MAX_BYTES + 1
            })
        );
        let too_many = ManifestEdit::New(vec![(Hash::default(), 1); MAX_FILE_CHUNKS + 1]);
        assert!(stage(vec![too_many]).validate().unwrap_err().is_limit());
        assert!(stage(vec![copy; MAX_FILE_CHUNKS + 1])
            .validate()
            .unwrap_err()
            .is_limit());
    }

    #[test]
    fn strings() {
        let hello = |agent: &str, pattern: &str| Hello {
            magic: crate::messages::MAGIC,
            min_version: 1,
            max_version: 1,
            agent_version: agent.to_owned(),
            chunker: crate::messages::ChunkerParams::PINNED,
            shares: vec![ShareOpen {
                name: "s".into(),
                ignore: vec![pattern.to_owned()],
                respect_gitignore: false,
            }],
        };
        assert_eq!(hello("1.0", "*.o").validate(), Ok(()));
        assert!(hello(&"x".repeat(MAX_AGENT_VERSION_BYTES + 1), "*.o")
            .validate()
            .is_err());
        assert_eq!(
            hello("1.0", "a\nb").validate(),
            Err(ValidationError::ControlCharacter {
                what: "ignore pattern"
            })
        );
        assert_eq!(
            hello("1\x1b[0m", "a").validate(),
            Err(ValidationError::ControlCharacter {
                what: "agent version"
            })
        );
        let long = Refused {
            reason: "r".repeat(MAX_REASON_BYTES + 1),
        };
        assert!(long.validate().is_err());
        let err = |code, message: String| ResponseBody::Supplied(Err(WireError { code, message }));
        assert!(err(ErrorCode::Io, "e".repeat(MAX_REASON_BYTES + 1))
            .validate()
            .is_err());
        assert_eq!(
            err(ErrorCode::Io, "e".repeat(MAX_REASON_BYTES)).validate(),
            Ok(())
        );
        // A disk-full answer carries its numbers; its text is made on the side that shows it.
        let full = ErrorCode::DiskFull {
            free: 1,
            reserve: 2,
        };
        assert_eq!(err(full, String::new()).validate(), Ok(()));
        assert!(err(full, "x".into()).validate().is_err());
    }
}
