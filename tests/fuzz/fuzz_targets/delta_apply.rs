//! Delta application on the destination side: a source (possibly a compromised guest) sends a
//! delta for a chunk, compressed or not; `decode_delta` bounds and decompresses it, and
//! `delta::apply` runs it against the base with the output capped at the chunk length. Neither
//! may panic or allocate past their caps, and `apply` returns data only if it hashes to the
//! chunk id. To reach that success path, the same delta is also run through the unchecked
//! `fast_rsync` apply, and `apply` must then accept exactly its output under its hash.
//!
//! Input: one byte (bit 0: the delta is zstd; bits 1-7 with the next byte: the declared delta
//! length), two bytes of chunk length, two bytes splitting the rest into base and delta data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmsync_core::delta::apply;
use vmsync_core::Hash;
use vmsync_protocol::{decode_delta, Codec, WireDelta};

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_at_checked(5) else {
        return;
    };
    let codec = if head[0] & 1 == 0 {
        Codec::Raw
    } else {
        Codec::Zstd
    };
    let chunk_len = u32::from(u16::from_le_bytes([head[2], head[3]]));
    let at = usize::from(head[4]).saturating_mul(64).min(rest.len());
    let (base, payload) = rest.split_at(at);
    let declared = match codec {
        Codec::Raw => u32::try_from(payload.len()).unwrap_or(u32::MAX),
        Codec::Zstd => u32::from(u16::from_le_bytes([head[0] >> 1, head[1]])) << 2,
    };
    let wire = WireDelta {
        hash: Hash::default(),
        len: declared,
        codec,
        data: payload.to_vec(),
    };
    let Ok((_, delta)) = decode_delta(wire) else {
        return;
    };
    assert_eq!(delta.len(), declared as usize);
    // Never data under an id it does not hash to.
    assert_eq!(apply(base, &delta, chunk_len, &Hash::default()), None);
    let mut out = Vec::new();
    let limit = chunk_len as usize;
    if fast_rsync::apply_limited(base, &delta, &mut out, limit).is_ok()
        && out.len() == limit
        && limit > 0
    {
        let id = Hash(*blake3::hash(&out).as_bytes());
        assert_eq!(apply(base, &delta, chunk_len, &id), Some(out));
    }
});
