//! Every bound the wire format enforces, in one place, each with its unit in its name.
//!
//! These are a contract between the two peers: a message that breaks one is rejected by the
//! receiver and ends the session, so the sender checks the same bounds before sending (and turns
//! a violation into a typed error for its caller instead of a dead connection). Changing a bound
//! that makes a message legal for one side and illegal for the other is a protocol version bump.
//!
//! Domain bounds (path grammar, chunk sizes, chunks per file) live in `vmsync_core::limits` and
//! are re-exported here so that decoders read every bound from one module.

pub use vmsync_core::limits::{
    CHUNK_AVG_BYTES, CHUNK_MAX_BYTES, CHUNK_MIN_BYTES, MAX_BATCH_PATHS, MAX_DELTA_BYTES,
    MAX_FILE_CHUNKS, MAX_MANIFEST_LINKS, MAX_NAME_BYTES, MAX_PATH_BYTES, MAX_PATH_DEPTH,
    MAX_SCAN_IGNORED, MAX_SIGNATURE_BYTES, MAX_SYMLINK_TARGET_BYTES,
};

/// Size of a fragment header: one big-endian `u32`.
pub const FRAME_HEADER_BYTES: usize = 4;
/// Largest fragment payload. Checked from the header before anything is buffered for it.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Largest logical message (the sum of its fragments) once the handshake is done.
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024 * 1024;
/// Largest logical message before the handshake is done: an unauthenticated peer gets a small
/// budget, so a connection flood cannot pin much memory.
pub const MAX_HANDSHAKE_BYTES: usize = 64 * 1024;

/// Most shares one session may open (the request's share index is a `u16`, but a VM with more
/// than a few shares is already unusual).
pub const MAX_SHARES: usize = 256;
/// Longest share name. Share names are also restricted to `[A-Za-z0-9._-]` (see the handshake).
pub const MAX_SHARE_NAME_BYTES: usize = 64;
/// Most ignore patterns the host may send for one share.
pub const MAX_IGNORE_PATTERNS: usize = 1024;
/// Longest single ignore pattern.
pub const MAX_IGNORE_PATTERN_BYTES: usize = 1024;
/// Longest agent version string in `Hello` / `Welcome`.
pub const MAX_AGENT_VERSION_BYTES: usize = 64;
/// Longest human-readable reason: `Refused`, `Problem::reason`, `Outcome::Failed`, the text of
/// an `EndpointError`.
pub const MAX_REASON_BYTES: usize = 4096;
/// Bytes in a halt code the host tells its guest (`mass-deletion`, `disk-full`, ...).
pub const MAX_HALT_CODE_BYTES: usize = 64;

/// Most files in one `Manifests` or `Stage` request (and in its response).
pub const MAX_BATCH_FILES: usize = 65_536;
/// Most chunks in one `ReadChunks` or `Supply` message. At [`CHUNK_MAX_BYTES`] each, a full
/// batch of raw chunks is 64 MiB, so it always fits in one message (asserted below).
pub const MAX_BATCH_CHUNKS: usize = 1024;
/// Most changes in one `Transition` request (and outcomes in its response).
pub const MAX_BATCH_CHANGES: usize = 65_536;
/// Most entries in one scan report. A share with more cannot be synced (and is reported so).
pub const MAX_SCAN_ENTRIES: usize = 4 * 1024 * 1024;
/// Most problems in one scan report.
pub const MAX_SCAN_PROBLEMS: usize = 65_536;
/// Largest share generation a message may carry (`Mark`, scan reports): half the `u64` range,
/// so a guest cannot push the host's count to where it could no longer advance.
pub const MAX_GENERATION: u64 = u64::MAX / 2;

/// Most requests a client may have sent and not yet seen answered. The server enforces it (a
/// client that exceeds it is misbehaving and the session ends), so the server's queue is bounded
/// and its reader never has to stop reading (which would also stop it answering heartbeats).
pub const MAX_OUTSTANDING_REQUESTS: usize = 64;

/// Room for the message envelope around a full batch of chunks: the per-chunk header (hash,
/// length, codec, data length) is under 48 bytes, plus the request header.
const BATCH_ENVELOPE_BYTES: usize = MAX_BATCH_CHUNKS * 48 + 64;

const _: () = {
    // The length field of a fragment header has 31 bits.
    assert!(MAX_FRAME_BYTES < (1 << 31));
    assert!(MAX_HANDSHAKE_BYTES <= MAX_MESSAGE_BYTES);
    // A full batch of incompressible chunks fits in one message.
    assert!(
        MAX_BATCH_CHUNKS * (CHUNK_MAX_BYTES as usize) + BATCH_ENVELOPE_BYTES <= MAX_MESSAGE_BYTES
    );
    // Share indices are `u16`.
    assert!(MAX_SHARES <= (u16::MAX as usize) + 1);
};
