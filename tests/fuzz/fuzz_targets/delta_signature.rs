//! Signature parsing and diffing on the source side: a destination (possibly a compromised
//! guest) sends the signature of its base; `parse_signature` must refuse anything unbounded or
//! malformed without panicking, and `delta` against whatever it accepts must finish, never
//! panic, and only ever offer a delta shorter than the chunk.
//!
//! Input: one byte choosing the mode, then two little-endian bytes splitting the rest into a
//! signature part and a chunk. Mode bit 0 set: the signature part is taken as a base and signed
//! with the block size from mode's other bits, so the diff's matching paths are reached too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmsync_core::delta::{delta, parse_signature, signature};
use vmsync_core::limits::CHUNK_MAX_BYTES;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Some((split, rest)) = rest.split_at_checked(2) else {
        return;
    };
    let at = usize::from(u16::from_le_bytes([split[0], split[1]])).min(rest.len());
    let (first, chunk) = rest.split_at(at);
    if chunk.is_empty() || chunk.len() > CHUNK_MAX_BYTES as usize {
        return;
    }
    let sig = if mode & 1 == 1 {
        signature(first, 64 + u32::from(mode >> 1) * 16)
    } else {
        first.to_vec()
    };
    let Ok(checked) = parse_signature(sig) else {
        assert_eq!(mode & 1, 0, "our own signature was refused");
        return;
    };
    if let Some(d) = delta(&checked, chunk) {
        assert!(d.len() < chunk.len());
        if mode & 1 == 1 {
            // Against the base it describes, the delta rebuilds the chunk (or, on an MD4 or
            // rolling-checksum collision, something else, which the id check refuses).
            let id = vmsync_core::Hash(*blake3::hash(chunk).as_bytes());
            let len = u32::try_from(chunk.len()).expect("bounded above");
            if let Some(out) = vmsync_core::delta::apply(first, &d, len, &id) {
                assert_eq!(out, chunk);
            }
        }
    }
});
