//! The zstd wrapper: `decode_chunk` on arbitrary declared lengths, codecs and data never panics,
//! never returns data of another length than declared, and accepts data only under its hash.
//! When the data hashes to something else, retrying with that hash must then succeed (this is
//! how the fuzzer reaches the success path of compressed chunks), and the result must survive
//! an `encode_chunk` / `decode_chunk` round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmsync_core::Hash;
use vmsync_protocol::chunk::{hash_chunk, ChunkError};
use vmsync_protocol::{decode_chunk, encode_chunk, Codec, WireChunk};

fuzz_target!(|data: &[u8]| {
    let Some((head, payload)) = data.split_at_checked(4) else {
        return;
    };
    let codec = if head[0] & 1 == 0 {
        Codec::Raw
    } else {
        Codec::Zstd
    };
    // Mostly plausible lengths (up to 128 KiB, twice the limit), sometimes anything.
    let raw_len = u32::from_le_bytes([head[1], head[2], head[3], head[0] >> 1]);
    let len = if head[0] & 2 == 0 {
        raw_len & 0x1_ffff
    } else {
        raw_len
    };
    let chunk = |hash| WireChunk {
        hash,
        len,
        codec,
        data: payload.to_vec(),
    };

    let result = match decode_chunk(chunk(Hash::default())) {
        Err(ChunkError::HashMismatch { actual, .. }) => decode_chunk(chunk(actual)),
        other => other,
    };
    if let Ok((hash, plain)) = result {
        assert_eq!(plain.len(), len as usize);
        assert_eq!(hash_chunk(&plain), hash);
        for level in [0, 1] {
            let again = decode_chunk(encode_chunk(hash, &plain, level)).expect("round trip");
            assert_eq!(again.1, plain);
        }
    }
});
