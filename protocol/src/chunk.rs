//! Chunk payloads on the wire: [`WireChunk`], optional zstd compression, and the checks that
//! make a received chunk safe to use (docs/security.md rule 11).
//!
//! Each chunk is its own zstd frame, decompressed in one shot into a buffer of exactly its
//! declared length (at most [`CHUNK_MAX_BYTES`]). So a zstd bomb, a frame without a content
//! size, concatenated frames or a huge window can at worst fill that buffer and then fail; they
//! never make us allocate more than one chunk. The data is only handed out after its BLAKE3
//! hash matched the chunk id. This module does no I/O.

use crate::limits::{CHUNK_MAX_BYTES, MAX_DELTA_BYTES};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::fmt;
use std::io;
use vmsync_core::endpoint::ChunkData;
use vmsync_core::Hash;

/// Level 0 means "never compress".
pub const COMPRESSION_OFF: i32 = 0;
/// The default zstd level for bulk batches (see [`level_for_batch`]): none. zstd's fastest
/// level compresses at about 500 MB/s a core, while a Unix socket or virtio-vsock moves GB/s:
/// for bulk data the link is not the bottleneck, so compressing only costs CPU. Measured on a
/// 2-core machine, 512 MiB (text + random) initial sync over a Unix socket, runs alternated:
/// raw 2.37 s and 2.40 s, level 1 3.37 s and 3.49 s (and 25 % more CPU).
pub const DEFAULT_ZSTD_LEVEL: i32 = COMPRESSION_OFF;
/// Below this many raw bytes in one batch, chunks are compressed at [`SMALL_BATCH_ZSTD_LEVEL`]
/// instead: a live edit or a delta moves little data, so its bytes matter; a bulk transfer
/// keeps the bulk level. A read group holds up to 64 chunks, so an initial sync of small files
/// (16-64 KiB each) makes groups of 0.5-2 MiB: at the former 1 MiB most of them were
/// compressed, and zstd was 15 % of the sync's CPU. At 256 KiB, `SCALE=0.3` initial sync,
/// alternated: 3.52 / 3.90 s wall vs 4.47 / 4.40 s, 458 MiB on the wire instead of 400 MiB.
pub const SMALL_BATCH_BYTES: usize = 256 * 1024;
/// zstd's default level. Chunks are compressed one by one, and on 16 KiB inputs the higher
/// levels cost far more than they save: `zstd -b -B16K` on text here gave level 3 at
/// 203 MB/s (ratio 2.65), level 6 at 40 MB/s (2.74), level 9 at 10 MB/s (2.76). Level 9 made
/// a 1 MiB batch cost about 100 ms of CPU, in the live loop and in initial syncs of small files.
pub const SMALL_BATCH_ZSTD_LEVEL: i32 = 3;

/// The zstd level for a batch of `raw_bytes` of chunk data: `bulk_level` for batches of
/// [`SMALL_BATCH_BYTES`] or more, at least [`SMALL_BATCH_ZSTD_LEVEL`] below that.
pub fn level_for_batch(bulk_level: i32, raw_bytes: usize) -> i32 {
    if raw_bytes >= SMALL_BATCH_BYTES {
        bulk_level
    } else {
        bulk_level.max(SMALL_BATCH_ZSTD_LEVEL)
    }
}

/// Compressed data is kept only if it saves at least `1 / MIN_SAVING_DIVISOR` of the raw size.
pub const MIN_SAVING_DIVISOR: usize = 16;
/// Largest window a chunk's zstd frame may declare: 2^17 = 128 KiB, above [`CHUNK_MAX_BYTES`].
/// One-shot decoding (what we do) allocates no window at all, so this only matters should the
/// decoder ever become a streaming one; it is set so that change cannot open a hole.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 17;

/// How a chunk's data is encoded. Append-only: a new variant is a protocol version bump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Codec {
    Raw,
    Zstd,
}

/// One chunk as it crosses the wire.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireChunk {
    /// BLAKE3 of the decoded data: the chunk id.
    pub hash: Hash,
    /// Length of the decoded data.
    pub len: u32,
    pub codec: Codec,
    /// The data as encoded by `codec`. Serialised as a byte string (postcard: length + bytes,
    /// the same layout as a `Vec<u8>`, but copied in one piece).
    #[serde(with = "byte_string")]
    pub data: Vec<u8>,
}

impl fmt::Debug for WireChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WireChunk")
            .field("hash", &self.hash)
            .field("len", &self.len)
            .field("codec", &self.codec)
            .field("data_len", &self.data.len())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {hash:?} declares {len} bytes, more than the {max}-byte limit")]
    TooLong { hash: Hash, len: u32, max: u32 },
    #[error("chunk {hash:?} declares zero bytes")]
    Empty { hash: Hash },
    #[error("raw chunk {hash:?} carries {actual} bytes but declares {declared}")]
    RawLength {
        hash: Hash,
        declared: u32,
        actual: usize,
    },
    #[error("compressed chunk {hash:?} does not decompress")]
    Decompress {
        hash: Hash,
        #[source]
        source: io::Error,
    },
    #[error("compressed chunk {hash:?} decompresses to {actual} bytes but declares {declared}")]
    DecompressedLength {
        hash: Hash,
        declared: u32,
        actual: usize,
    },
    #[error("chunk data hashes to {actual:?}, not to its id {expected:?}")]
    HashMismatch { expected: Hash, actual: Hash },
}

/// A chunk delta as it crosses the wire: an rsync delta that rebuilds chunk `hash` from the
/// base the destination offered for it (see `vmsync_core::delta`). Compressed like a chunk.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireDelta {
    /// The chunk the delta rebuilds.
    pub hash: Hash,
    /// Length of the decoded delta (not of the chunk).
    pub len: u32,
    pub codec: Codec,
    #[serde(with = "byte_string")]
    pub data: Vec<u8>,
}

impl fmt::Debug for WireDelta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WireDelta")
            .field("hash", &self.hash)
            .field("len", &self.len)
            .field("codec", &self.codec)
            .field("data_len", &self.data.len())
            .finish()
    }
}

/// Chunk content on the wire: whole, or a delta. Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireContent {
    Whole(WireChunk),
    Delta(WireDelta),
}

impl WireContent {
    /// The chunk this is for.
    pub fn hash(&self) -> Hash {
        match self {
            WireContent::Whole(c) => c.hash,
            WireContent::Delta(d) => d.hash,
        }
    }

    /// Bytes of data as sent (compressed where compressed).
    pub fn data_len(&self) -> usize {
        match self {
            WireContent::Whole(c) => c.data.len(),
            WireContent::Delta(d) => d.data.len(),
        }
    }
}

/// Chunk content for the wire (a whole chunk or a delta), compressed at `level` when that
/// pays (see [`encode_chunk`]).
pub fn encode_content(hash: Hash, data: &ChunkData, level: i32) -> WireContent {
    match data {
        ChunkData::Whole(d) => WireContent::Whole(encode_chunk(hash, d, level)),
        ChunkData::Delta(d) => WireContent::Delta(encode_delta(hash, d, level)),
    }
}

/// [`encode_content`] of content the caller gives up: data sent raw (no compression asked, or
/// none that pays) is moved into the message, not copied, so a batch of chunks on its way is
/// held once rather than twice.
pub fn encode_content_owned(hash: Hash, data: ChunkData, level: i32) -> WireContent {
    match data {
        ChunkData::Whole(d) => WireContent::Whole(encode_chunk_owned(hash, d, level)),
        ChunkData::Delta(d) => WireContent::Delta(encode_delta(hash, &d, level)),
    }
}

/// Unpacks supplied content for `Endpoint::supply`, which verifies every whole chunk against
/// its id itself (its contract): checked here for length and codec only, so each byte is
/// hashed once. A delta is verified once applied, by the destination.
pub fn unpack_content(c: WireContent) -> Result<(Hash, ChunkData), ChunkError> {
    match c {
        WireContent::Whole(c) => unpack_chunk(c).map(|(h, d)| (h, ChunkData::Whole(d))),
        WireContent::Delta(d) => decode_delta(d).map(|(h, d)| (h, ChunkData::Delta(d))),
    }
}

pub use vmsync_core::digest::hash_chunk;

/// Encodes a chunk for the wire, compressing with zstd at `level` (0: never) when that pays.
///
/// Compressed data is kept only if it is smaller by at least 1/16 of the raw size. Below that
/// the receiver would spend a decompression (CPU, a second buffer) to save a few percent of a
/// transfer over a link that is usually faster than zstd's decoder anyway, and incompressible
/// data (media, archives, already-compressed files) would grow by the frame overhead. `hash` is
/// trusted to be the chunk's id: the caller read the data from a verified source.
pub fn encode_chunk(hash: Hash, data: &[u8], level: i32) -> WireChunk {
    compressed_chunk(hash, data, level).unwrap_or_else(|| WireChunk {
        hash,
        len: wire_len(data),
        codec: Codec::Raw,
        data: data.to_vec(),
    })
}

/// [`encode_chunk`] of data the caller gives up: sent raw, it is moved, not copied.
pub fn encode_chunk_owned(hash: Hash, data: Vec<u8>, level: i32) -> WireChunk {
    compressed_chunk(hash, &data, level).unwrap_or_else(|| WireChunk {
        hash,
        len: wire_len(&data),
        codec: Codec::Raw,
        data,
    })
}

/// A length beyond u32 cannot be a chunk; saturating makes the receiver (and our own pre-send
/// validation) reject it rather than see a wrapped length.
fn wire_len(data: &[u8]) -> u32 {
    u32::try_from(data.len()).unwrap_or(u32::MAX)
}

/// The chunk compressed at `level`, when that pays (see [`encode_chunk`]).
fn compressed_chunk(hash: Hash, data: &[u8], level: i32) -> Option<WireChunk> {
    if level == COMPRESSION_OFF || data.is_empty() {
        return None;
    }
    let compressed = compress(data, level)?;
    let saved = data.len().saturating_sub(compressed.len());
    (compressed.len() < data.len() && saved * MIN_SAVING_DIVISOR >= data.len()).then(|| WireChunk {
        hash,
        len: wire_len(data),
        codec: Codec::Zstd,
        data: compressed,
    })
}

/// Encodes a delta for the wire, compressing it like a chunk when that pays.
pub fn encode_delta(hash: Hash, delta: &[u8], level: i32) -> WireDelta {
    let WireChunk {
        len, codec, data, ..
    } = encode_chunk(hash, delta, level);
    WireDelta {
        hash,
        len,
        codec,
        data,
    }
}

/// Decodes a received delta: its declared length is legal (at most [`MAX_DELTA_BYTES`]) and
/// its data decodes to exactly that many bytes. What the delta rebuilds is checked where it is
/// applied (`vmsync_core::delta::apply`).
pub fn decode_delta(d: WireDelta) -> Result<(Hash, Vec<u8>), ChunkError> {
    let WireDelta {
        hash,
        len,
        codec,
        data,
    } = d;
    let declared = usize::try_from(len).unwrap_or(usize::MAX);
    if declared > MAX_DELTA_BYTES {
        return Err(ChunkError::TooLong {
            hash,
            len,
            max: u32::try_from(MAX_DELTA_BYTES).unwrap_or(u32::MAX),
        });
    }
    if len == 0 {
        return Err(ChunkError::Empty { hash });
    }
    let plain = match codec {
        Codec::Raw if data.len() == declared => data,
        Codec::Raw => {
            return Err(ChunkError::RawLength {
                hash,
                declared: len,
                actual: data.len(),
            })
        }
        Codec::Zstd => {
            let out = decompress(&data, declared)
                .map_err(|source| ChunkError::Decompress { hash, source })?;
            if out.len() != declared {
                return Err(ChunkError::DecompressedLength {
                    hash,
                    declared: len,
                    actual: out.len(),
                });
            }
            out
        }
    };
    Ok((hash, plain))
}

/// Decodes and verifies a received chunk: its declared length is legal, its data decodes to
/// exactly that many bytes, and those bytes hash to its id.
pub fn decode_chunk(c: WireChunk) -> Result<(Hash, Vec<u8>), ChunkError> {
    let (hash, plain) = unpack_chunk(c)?;
    let actual = hash_chunk(&plain);
    if actual != hash {
        return Err(ChunkError::HashMismatch {
            expected: hash,
            actual,
        });
    }
    Ok((hash, plain))
}

/// [`decode_chunk`] but for the last step: the bytes are checked against the declared length,
/// not hashed. For a receiver that hands them straight to something that verifies every chunk
/// itself (`Endpoint::supply` does), so that each byte is hashed once.
pub fn unpack_chunk(c: WireChunk) -> Result<(Hash, Vec<u8>), ChunkError> {
    let WireChunk {
        hash,
        len,
        codec,
        data,
    } = c;
    if len > CHUNK_MAX_BYTES {
        return Err(ChunkError::TooLong {
            hash,
            len,
            max: CHUNK_MAX_BYTES,
        });
    }
    if len == 0 {
        return Err(ChunkError::Empty { hash });
    }
    // `len` ≤ CHUNK_MAX_BYTES, so it fits any usize we build for.
    let declared = usize::try_from(len).unwrap_or(usize::MAX);
    let plain = match codec {
        Codec::Raw => {
            if data.len() != declared {
                return Err(ChunkError::RawLength {
                    hash,
                    declared: len,
                    actual: data.len(),
                });
            }
            data
        }
        Codec::Zstd => {
            let out = decompress(&data, declared)
                .map_err(|source| ChunkError::Decompress { hash, source })?;
            if out.len() != declared {
                return Err(ChunkError::DecompressedLength {
                    hash,
                    declared: len,
                    actual: out.len(),
                });
            }
            out
        }
    };
    Ok((hash, plain))
}

thread_local! {
    // zstd contexts are costly to create (hundreds of KiB of tables); one per thread is reused.
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

fn compress(data: &[u8], level: i32) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.try_borrow_mut().ok()?;
        if slot.is_none() {
            *slot = Some(zstd::bulk::Compressor::new(level).ok()?);
        }
        let compressor = slot.as_mut()?;
        compressor.set_compression_level(level).ok()?;
        // Records the content size in the frame header, so the receiver's one-shot decoder
        // can check it before writing anything.
        compressor.include_contentsize(true).ok()?;
        compressor.compress(data).ok()
    })
}

fn new_decompressor() -> io::Result<zstd::bulk::Decompressor<'static>> {
    let mut d = zstd::bulk::Decompressor::new()?;
    d.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
    Ok(d)
}

/// One-shot decompression into a buffer of exactly `capacity` bytes: output beyond it is an
/// error from zstd, never a reallocation.
fn decompress(data: &[u8], capacity: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(capacity);
    DECOMPRESSOR.with(|cell| match cell.try_borrow_mut() {
        Ok(mut slot) => {
            if slot.is_none() {
                *slot = Some(new_decompressor()?);
            }
            match slot.as_mut() {
                Some(d) => d.decompress_to_buffer(data, &mut out),
                None => new_decompressor()?.decompress_to_buffer(data, &mut out),
            }
        }
        Err(_) => new_decompressor()?.decompress_to_buffer(data, &mut out),
    })?;
    Ok(out)
}

/// Serde glue: a `Vec<u8>` as a byte string.
mod byte_string {
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn small_batches_compress_harder_bulk_stays_fast() {
        assert_eq!(level_for_batch(1, 16 * 1024), SMALL_BATCH_ZSTD_LEVEL);
        assert_eq!(level_for_batch(1, SMALL_BATCH_BYTES), 1);
        assert_eq!(level_for_batch(COMPRESSION_OFF, 10), SMALL_BATCH_ZSTD_LEVEL);
        assert_eq!(
            level_for_batch(COMPRESSION_OFF, SMALL_BATCH_BYTES),
            COMPRESSION_OFF
        );
        assert_eq!(level_for_batch(19, 10), 19);
    }

    use super::*;

    use vmsync_core::testing::noise;

    fn zstd_raw(data: &[u8]) -> Vec<u8> {
        zstd::bulk::compress(data, 3).unwrap()
    }

    /// A zstd frame of `blocks` RLE blocks of `block` zero bytes each, built by hand so it can
    /// claim gigabytes while being a few KiB. `content_size`: write it in the header or not.
    fn rle_bomb(window_log: u8, block: u32, blocks: usize, content_size: Option<u64>) -> Vec<u8> {
        let mut f = vec![0x28, 0xB5, 0x2F, 0xFD];
        // Frame header descriptor: FCS field 8 bytes (0b11 << 6) or absent (0), no single
        // segment, no checksum, no dictionary.
        f.push(if content_size.is_some() { 0xC0 } else { 0x00 });
        f.push((window_log - 10) << 3);
        if let Some(size) = content_size {
            f.extend_from_slice(&size.to_le_bytes());
        }
        for i in 0..blocks {
            let last = u32::from(i + 1 == blocks);
            let header = (block << 3) | (1 << 1) | last;
            f.extend_from_slice(&header.to_le_bytes()[..3]);
            f.push(0);
        }
        f
    }

    #[test]
    fn raw_round_trip_for_incompressible_data() {
        let data = noise(20_000, 1);
        let c = encode_chunk(hash_chunk(&data), &data, DEFAULT_ZSTD_LEVEL);
        assert_eq!(c.codec, Codec::Raw);
        assert_eq!(c.len, 20_000);
        let (h, out) = decode_chunk(c).unwrap();
        assert_eq!(h, hash_chunk(&data));
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_round_trip_for_compressible_data() {
        let data: Vec<u8> = b"all work and no play "
            .iter()
            .cycle()
            .take(60_000)
            .copied()
            .collect();
        let c = encode_chunk(hash_chunk(&data), &data, SMALL_BATCH_ZSTD_LEVEL);
        assert_eq!(c.codec, Codec::Zstd);
        assert!(c.data.len() < data.len() / 10);
        assert_eq!(decode_chunk(c).unwrap().1, data);
    }

    #[test]
    fn level_zero_never_compresses() {
        let data = vec![0u8; 4096];
        let c = encode_chunk(hash_chunk(&data), &data, COMPRESSION_OFF);
        assert_eq!(c.codec, Codec::Raw);
        assert_eq!(c.data, data);
    }

    #[test]
    fn small_savings_are_not_worth_it() {
        // 16 compressible bytes inside incompressible noise: zstd saves a few bytes, far
        // below 1/16, so the chunk goes raw.
        let mut data = noise(4096, 7);
        data[100..116].fill(0);
        let c = encode_chunk(hash_chunk(&data), &data, 19);
        assert_eq!(c.codec, Codec::Raw);
    }

    #[test]
    fn rejects_declared_length_over_limit() {
        let c = WireChunk {
            hash: Hash::default(),
            len: CHUNK_MAX_BYTES + 1,
            codec: Codec::Raw,
            data: vec![0; CHUNK_MAX_BYTES as usize + 1],
        };
        assert!(matches!(decode_chunk(c), Err(ChunkError::TooLong { .. })));
    }

    #[test]
    fn rejects_empty_chunk() {
        let c = WireChunk {
            hash: hash_chunk(b""),
            len: 0,
            codec: Codec::Raw,
            data: vec![],
        };
        assert!(matches!(decode_chunk(c), Err(ChunkError::Empty { .. })));
    }

    #[test]
    fn rejects_raw_length_mismatch() {
        let data = b"abcdef".to_vec();
        for len in [5, 7] {
            let c = WireChunk {
                hash: hash_chunk(&data),
                len,
                codec: Codec::Raw,
                data: data.clone(),
            };
            assert!(matches!(decode_chunk(c), Err(ChunkError::RawLength { .. })));
        }
    }

    #[test]
    fn rejects_hash_mismatch() {
        let data = b"abcdef".to_vec();
        let c = WireChunk {
            hash: hash_chunk(b"abcdeg"),
            len: 6,
            codec: Codec::Raw,
            data,
        };
        assert!(matches!(
            decode_chunk(c),
            Err(ChunkError::HashMismatch { .. })
        ));
        let data = vec![1u8; 1000];
        let mut c = encode_chunk(hash_chunk(&data), &data, 3);
        assert_eq!(c.codec, Codec::Zstd);
        c.hash = hash_chunk(b"other");
        assert!(matches!(
            decode_chunk(c),
            Err(ChunkError::HashMismatch { .. })
        ));
    }

    #[test]
    fn rejects_decompressing_to_fewer_bytes_than_declared() {
        let data = vec![9u8; 1000];
        let c = WireChunk {
            hash: hash_chunk(&data),
            len: 1001,
            codec: Codec::Zstd,
            data: zstd_raw(&data),
        };
        let err = decode_chunk(c).unwrap_err();
        assert!(
            matches!(
                err,
                ChunkError::DecompressedLength { actual: 1000, .. } | ChunkError::Decompress { .. }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_decompressing_to_more_bytes_than_declared() {
        let data = vec![9u8; 1000];
        let c = WireChunk {
            hash: hash_chunk(&data[..999]),
            len: 999,
            codec: Codec::Zstd,
            data: zstd_raw(&data),
        };
        assert!(matches!(
            decode_chunk(c),
            Err(ChunkError::Decompress { .. })
        ));
    }

    #[test]
    fn rejects_garbage_compressed_data() {
        for data in [vec![0u8; 10], noise(100, 3), b"\x28\xb5\x2f\xfd".to_vec()] {
            let c = WireChunk {
                hash: Hash::default(),
                len: 100,
                codec: Codec::Zstd,
                data: data.clone(),
            };
            let r = decode_chunk(c);
            assert!(
                matches!(r, Err(ChunkError::Decompress { .. })),
                "{data:?}: {r:?}"
            );
        }
        // No frame at all decodes to nothing, which is not the declared length.
        let c = WireChunk {
            hash: Hash::default(),
            len: 100,
            codec: Codec::Zstd,
            data: vec![],
        };
        assert!(matches!(
            decode_chunk(c),
            Err(ChunkError::DecompressedLength { actual: 0, .. })
        ));
    }

    #[test]
    fn bomb_expanding_to_a_gibibyte_fails_fast() {
        // 8192 RLE blocks of 128 KiB: 1 GiB of zeros in a 32 KiB frame, with and without the
        // content size in the header. Decoding is one-shot into a 64 KiB buffer, so zstd stops
        // at the first block that does not fit; nothing near 1 GiB is ever allocated.
        let gib = 1u64 << 30;
        for content_size in [Some(gib), None] {
            let bomb = rle_bomb(17, 128 * 1024, 8192, content_size);
            assert!(bomb.len() < 40 * 1024);
            let zeros = vec![0u8; CHUNK_MAX_BYTES as usize];
            let c = WireChunk {
                hash: hash_chunk(&zeros),
                len: CHUNK_MAX_BYTES,
                codec: Codec::Zstd,
                data: bomb,
            };
            let started = std::time::Instant::now();
            assert!(matches!(
                decode_chunk(c),
                Err(ChunkError::Decompress { .. })
            ));
            // Generous: decoding 1 GiB would take far longer than this even in release builds.
            assert!(started.elapsed() < std::time::Duration::from_secs(2));
        }
    }

    #[test]
    fn concatenated_frames_are_capped_at_declared_length() {
        let a = vec![5u8; 40_000];
        let mut data = zstd_raw(&a);
        data.extend_from_slice(&zstd_raw(&a));
        // Together 80 000 bytes: more than the 64 KiB buffer.
        let c = WireChunk {
            hash: hash_chunk(&a),
            len: 40_000,
            codec: Codec::Zstd,
            data,
        };
        assert!(decode_chunk(c).is_err());
    }

    #[test]
    fn huge_window_costs_nothing() {
        // A frame declaring a 2 GiB window (window log 31). One-shot decoding writes straight
        // into the output buffer and allocates no window, so the declaration is harmless: the
        // frame decodes to what it holds, and more than declared still fails.
        let zeros = vec![0u8; 100];
        let frame = rle_bomb(31, 100, 1, None);
        let c = WireChunk {
            hash: hash_chunk(&zeros),
            len: 100,
            codec: Codec::Zstd,
            data: frame,
        };
        assert_eq!(decode_chunk(c).unwrap().1, zeros);
        let frame = rle_bomb(31, 128 * 1024, 2, None);
        let c = WireChunk {
            hash: hash_chunk(&zeros),
            len: 100,
            codec: Codec::Zstd,
            data: frame,
        };
        assert!(matches!(
            decode_chunk(c),
            Err(ChunkError::Decompress { .. })
        ));
    }
}
