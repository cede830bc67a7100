//! Every bound vmsync enforces on sizes and counts, in one place, each with its unit in its name.
//! The wire format (protocol crate) and the engine both read these; changing one that the wire
//! relies on is a protocol version bump.

/// Longest single path component, as on Linux (`NAME_MAX`).
pub const MAX_NAME_BYTES: usize = 255;
/// Longest relative path, joined with `/` (`PATH_MAX` less the terminating NUL).
pub const MAX_PATH_BYTES: usize = 4095;
/// Deepest relative path, in components.
pub const MAX_PATH_DEPTH: usize = 1024;
/// Longest symlink target we sync.
pub const MAX_SYMLINK_TARGET_BYTES: usize = 4095;

/// FastCDC 2020 parameters (bytes). Agreed in the handshake; changing them changes every digest.
pub const CHUNK_MIN_BYTES: u32 = 4 * 1024;
pub const CHUNK_AVG_BYTES: u32 = 16 * 1024;
pub const CHUNK_MAX_BYTES: u32 = 64 * 1024;

/// Most chunks one file may have: 2 Mi chunks (8 GiB at the minimum chunk size, 32 GiB on
/// average), so a manifest (about 41 bytes a chunk) fits one 128 MiB message.
/// Larger files are skipped and reported.
pub const MAX_FILE_CHUNKS: usize = 2 * 1024 * 1024;
/// At most this many other names of a hard-linked file travel with its manifest.
pub const MAX_MANIFEST_LINKS: usize = 64;
/// Most paths in a scan's scope and in one answer of change hints.
pub const MAX_BATCH_PATHS: usize = 65_536;

/// Most ignored paths one scan reports (shares with `respect_gitignore`). A scan that skipped
/// more reports their ancestor directories instead, a level higher at a time until they fit:
/// the other side then leaves those directories alone entirely, which is safe, where dropping
/// paths from the list would let it delete or overwrite them.
pub const MAX_SCAN_IGNORED: usize = 65_536;

/// Chunk deltas (see `crate::delta`): the smallest and largest block size a signature may use.
/// Small blocks make long signatures and slow diffs; a block past the largest chunk matches
/// nothing.
pub const DELTA_BLOCK_MIN_BYTES: u32 = 64;
pub const DELTA_BLOCK_MAX_BYTES: u32 = 16 * 1024;
/// Longest signature a peer may send for one chunk's base. Ours are under 1 KiB (block size
/// about the square root of the base, 8 bytes a block); this leaves room for other choices.
pub const MAX_SIGNATURE_BYTES: usize = 16 * 1024;
/// Longest delta: a delta is only sent when it is shorter than its chunk.
pub const MAX_DELTA_BYTES: usize = CHUNK_MAX_BYTES as usize;
