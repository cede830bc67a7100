//! Chunk deltas: how a changed chunk crosses as an rsync delta against bytes the destination
//! already holds, instead of whole. Pure computation over byte slices, built on `fast_rsync`
//! (Dropbox's librsync port); no I/O.
//!
//! The exchange, for one chunk the destination lacks:
//! 1. the destination picks a *base*, the bytes of its current file at the same path where the
//!    new chunk probably came from ([`base_windows`]), and sends its [`signature`];
//! 2. the source computes a [`delta`] of the chunk against that signature, and sends it only if it
//!    is smaller than the chunk;
//! 3. the destination re-reads the base and [`apply`]s the delta, with the output capped at the
//!    chunk's length, and keeps the result only if it hashes to the chunk id.
//!
//! Signatures use truncated MD4 and a weak rolling checksum, so a delta may rebuild the wrong
//! bytes (a collision, or a base that changed between the steps, or a hostile peer). Step 3's
//! BLAKE3 check turns every such case into "chunk still missing", which the controller then
//! sends whole. Nothing a peer sends is trusted: [`parse_signature`] bounds a signature before
//! `fast_rsync` sees it, and [`apply`] bounds the delta and its output.

use crate::digest::Hash;
use crate::entry::ChunkRef;
use crate::limits::{
    CHUNK_MAX_BYTES, DELTA_BLOCK_MAX_BYTES, DELTA_BLOCK_MIN_BYTES, MAX_DELTA_BYTES,
    MAX_SIGNATURE_BYTES,
};
use fast_rsync::{Signature, SignatureOptions};
use std::collections::HashMap;

/// Bytes of MD4 kept per block in the signatures we make. rsync itself uses as few as 2 on a
/// first pass, because the whole result is checked afterwards; so is ours (BLAKE3), and a false
/// match costs one chunk sent whole. Each byte here costs `base / block` bytes on the wire.
pub const SIGNATURE_HASH_BYTES: u32 = 4;
/// Chunks shorter than this are not worth a base: signature plus delta would save next to
/// nothing over the whole chunk, which zstd compresses anyway.
pub const DELTA_MIN_CHUNK_BYTES: u32 = 1024;
/// A base window is the estimated old range of the chunk widened by this much on each side, so
/// that cut points that moved a little still find their bytes...
pub const BASE_SLACK_MIN_BYTES: u64 = 1024;
/// ...plus the length difference of the changed region, up to this much.
pub const BASE_SLACK_EXTRA_MAX_BYTES: u64 = 4096;
/// The largest base we read and sign: the largest chunk with the largest slack on both sides.
pub const MAX_BASE_BYTES: u64 =
    CHUNK_MAX_BYTES as u64 + 2 * (BASE_SLACK_MIN_BYTES + BASE_SLACK_EXTRA_MAX_BYTES);

/// Magic of an MD4 rsync signature (librsync `RS_MD4_SIG_MAGIC`), big-endian.
const MD4_SIGNATURE_MAGIC: u32 = 0x7273_0136;
/// Signature header: magic, block size, hash size (each a big-endian u32).
const SIGNATURE_HEADER_BYTES: usize = 12;
/// Bytes of the rolling checksum per block.
const ROLLING_BYTES: usize = 4;
/// Longest MD4 hash.
const MD4_BYTES: u32 = 16;

/// Why a peer's signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("signature of {len} bytes, outside {SIGNATURE_HEADER_BYTES}..={MAX_SIGNATURE_BYTES}")]
    Length { len: usize },
    #[error("signature is not an MD4 rsync signature")]
    Magic,
    #[error("signature block size {0} outside {DELTA_BLOCK_MIN_BYTES}..={DELTA_BLOCK_MAX_BYTES}")]
    BlockSize(u32),
    #[error("signature hash size {0} outside 1..={MD4_BYTES}")]
    HashSize(u32),
    #[error("signature is not a whole number of blocks")]
    Blocks,
}

/// A peer's signature that passed [`parse_signature`].
#[derive(Debug, Clone)]
pub struct CheckedSignature(Signature);

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The block size for a chunk of `chunk_len` bytes and a base of `base_len` bytes.
///
/// About `sqrt(base_len * per_block)`: that minimises the signature (`base_len / block *
/// per_block` bytes) plus the literal bytes a change costs around itself (about a block). Then
/// nudged so that the chunk is nearly a whole number of blocks: a diff sends the chunk's last
/// partial block as a literal, so `chunk_len = n * block + r` with `r < n` costs `r` bytes,
/// where a round block size would cost half a block on average.
pub fn block_size(chunk_len: u32, base_len: u64) -> u32 {
    let per_block = ROLLING_BYTES as u64 + u64::from(SIGNATURE_HASH_BYTES);
    let target = base_len.saturating_mul(per_block);
    let mut ideal = 1u64;
    while ideal.saturating_mul(ideal) < target {
        ideal += 1;
    }
    let ideal = ideal.clamp(
        u64::from(DELTA_BLOCK_MIN_BYTES),
        u64::from(DELTA_BLOCK_MAX_BYTES),
    );
    let chunk = u64::from(chunk_len);
    let blocks = ((chunk + ideal / 2) / ideal).max(1);
    let b = (chunk / blocks).clamp(
        u64::from(DELTA_BLOCK_MIN_BYTES),
        u64::from(DELTA_BLOCK_MAX_BYTES),
    );
    u32::try_from(b).unwrap_or(DELTA_BLOCK_MAX_BYTES)
}

/// The rsync signature of `base` in blocks of `block` bytes (clamped to the legal range), of at
/// most [`MAX_BASE_BYTES`] of it. Always within [`MAX_SIGNATURE_BYTES`].
pub fn signature(base: &[u8], block: u32) -> Vec<u8> {
    let base = base.get(..MAX_BASE_BYTES as usize).unwrap_or(base);
    let options = SignatureOptions {
        block_size: block.clamp(DELTA_BLOCK_MIN_BYTES, DELTA_BLOCK_MAX_BYTES),
        crypto_hash_size: SIGNATURE_HASH_BYTES,
    };
    Signature::calculate(base, options).into_serialized()
}

/// Checks a signature from a peer: bounded length, MD4, sane block and hash sizes, whole
/// blocks. `fast_rsync` itself accepts a zero block size (and then never finishes a diff) and
/// any length, so nothing reaches it unchecked.
pub fn parse_signature(bytes: Vec<u8>) -> Result<CheckedSignature, SignatureError> {
    let len = bytes.len();
    if !(SIGNATURE_HEADER_BYTES..=MAX_SIGNATURE_BYTES).contains(&len) {
        return Err(SignatureError::Length { len });
    }
    if be_u32(&bytes, 0) != Some(MD4_SIGNATURE_MAGIC) {
        return Err(SignatureError::Magic);
    }
    let block = be_u32(&bytes, 4).unwrap_or(0);
    if !(DELTA_BLOCK_MIN_BYTES..=DELTA_BLOCK_MAX_BYTES).contains(&block) {
        return Err(SignatureError::BlockSize(block));
    }
    let hash = be_u32(&bytes, 8).unwrap_or(0);
    if !(1..=MD4_BYTES).contains(&hash) {
        return Err(SignatureError::HashSize(hash));
    }
    // `hash` ≤ 16: no overflow.
    // `%` rather than `is_multiple_of`, which is newer than the workspace's rust-version.
    #[allow(clippy::manual_is_multiple_of)]
    let partial = (len - SIGNATURE_HEADER_BYTES) % (ROLLING_BYTES + hash as usize) != 0;
    if partial {
        return Err(SignatureError::Blocks);
    }
    Signature::deserialize(bytes)
        .map(CheckedSignature)
        .map_err(|_| SignatureError::Blocks)
}

/// A delta that rebuilds `chunk` from the base `signature` describes, if one exists that is
/// shorter than the chunk itself (else sending the chunk whole is better).
pub fn delta(signature: &CheckedSignature, chunk: &[u8]) -> Option<Vec<u8>> {
    if chunk.is_empty() || chunk.len() > CHUNK_MAX_BYTES as usize {
        return None;
    }
    let indexed = signature.0.index();
    let mut out = Vec::with_capacity(chunk.len() / 4);
    fast_rsync::diff(&indexed, chunk, &mut out).ok()?;
    (out.len() < chunk.len() && out.len() <= MAX_DELTA_BYTES).then_some(out)
}

/// Rebuilds a chunk of `len` bytes from `base` and a peer's `delta`, and returns it only if it
/// hashes to `hash`. The output is capped at `len` while it is built, so no delta can make it
/// grow past one chunk.
pub fn apply(base: &[u8], delta: &[u8], len: u32, hash: &Hash) -> Option<Vec<u8>> {
    if delta.len() > MAX_DELTA_BYTES || len == 0 || len > CHUNK_MAX_BYTES {
        return None;
    }
    let limit = usize::try_from(len).ok()?;
    let mut out = Vec::with_capacity(limit);
    fast_rsync::apply_limited(base, delta, &mut out, limit).ok()?;
    (out.len() == limit && crate::digest::hash_chunk(&out) == *hash).then_some(out)
}

/// Where in the old file a new chunk's bytes probably are: a byte range of the old file, and
/// the block size to sign it with. The estimated start of the chunk lies a whole number of
/// blocks into the window, so an unchanged chunk start matches from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub offset: u64,
    pub len: u64,
    pub block: u32,
}

/// For each chunk of the `new` manifest, the window of the old file (chunks `old`, in order, as
/// (hash, length)) to use as its base, or `None` where there is none worth offering.
///
/// New chunks that the old file also has are *anchors*; the chunks between two anchors (or the
/// file's start or end) form a changed run that replaced the old bytes between the same
/// anchors (the *gap*). A chunk of a run is placed at the same distance from the run's start
/// in the gap, or at the same distance from its end, whichever overlaps the gap more: an edit in
/// place maps every chunk onto its old bytes, an insertion maps the chunks at its edges onto
/// the old bytes there, and the chunks in its middle, which are new data, get no base (no
/// signature bytes spent on them). Anchors and chunks shorter than [`DELTA_MIN_CHUNK_BYTES`]
/// get `None` too.
pub fn base_windows(old: &[(Hash, u32)], new: &[ChunkRef]) -> Vec<Option<Window>> {
    let mut out = vec![None; new.len()];
    if old.is_empty() || new.is_empty() {
        return out;
    }
    let mut old_offsets = Vec::with_capacity(old.len() + 1);
    let mut at = 0u64;
    for &(_, len) in old {
        old_offsets.push(at);
        at = at.saturating_add(u64::from(len));
    }
    let old_size = at;
    old_offsets.push(old_size);
    let mut positions: HashMap<Hash, Vec<usize>> = HashMap::new();
    for (i, (h, _)) in old.iter().enumerate() {
        positions.entry(*h).or_default().push(i);
    }
    // Each new chunk's old index if it is an anchor, preferring an occurrence after the
    // previous anchor so that repeated chunks keep the runs in order.
    let mut anchors: Vec<Option<usize>> = Vec::with_capacity(new.len());
    let mut last: Option<usize> = None;
    for c in new {
        let found = positions.get(&c.hash).and_then(|list| {
            list.iter()
                .copied()
                .find(|&i| last.is_none_or(|l| i > l))
                .or_else(|| list.first().copied())
        });
        if found.is_some() {
            last = found;
        }
        anchors.push(found);
    }
    let new_end = |i: usize| new[i].offset.saturating_add(u64::from(new[i].len));
    let mut i = 0;
    while i < new.len() {
        if anchors[i].is_some() {
            i += 1;
            continue;
        }
        let start = i;
        while i < new.len() && anchors[i].is_none() {
            i += 1;
        }
        // The run is new[start..i]; its gap lies between the anchors around it.
        let (r0, r1) = (new[start].offset, new_end(i - 1));
        let g0 = match start.checked_sub(1).and_then(|p| anchors[p]) {
            Some(a) => old_offsets[a + 1],
            None => 0,
        };
        let g1 = anchors
            .get(i)
            .copied()
            .flatten()
            .map_or(old_size, |a| old_offsets[a]);
        if g1 <= g0 {
            continue;
        }
        let (run, gap) = (r1 - r0, g1 - g0);
        let slack = BASE_SLACK_MIN_BYTES + run.abs_diff(gap).min(BASE_SLACK_EXTRA_MAX_BYTES);
        for (j, slot) in out.iter_mut().enumerate().take(i).skip(start) {
            let c = &new[j];
            let len = u64::from(c.len);
            if c.len < DELTA_MIN_CHUNK_BYTES {
                continue;
            }
            let front = g0.saturating_add(c.offset - r0);
            let back = (g1 + c.offset).checked_sub(r1).map(|b| b.min(g1));
            let overlap = |s: u64| g1.min(s.saturating_add(len)).saturating_sub(g0.max(s));
            let best = [Some(front), back]
                .into_iter()
                .flatten()
                .map(|s| (overlap(s), s))
                .max_by_key(|&(o, _)| o);
            let Some((overlap, s)) = best else { continue };
            if overlap == 0 {
                continue;
            }
            let hi = s.saturating_add(len).saturating_add(slack).min(old_size);
            let lo = s.saturating_sub(slack).min(hi);
            let block = block_size(c.len, hi - lo);
            // Whole blocks before the estimated start.
            let lo = s - (s - lo.min(s)) / u64::from(block) * u64::from(block);
            if hi > lo {
                *slot = Some(Window {
                    offset: lo,
                    len: (hi - lo).min(MAX_BASE_BYTES),
                    block,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(data: &[u8]) -> Hash {
        crate::digest::hash_chunk(data)
    }

    use crate::testing::noise;

    #[test]
    fn a_small_patch_crosses_in_a_small_delta() {
        let base = noise(16 * 1024, 1);
        let mut new = base.clone();
        new[5000..5256].copy_from_slice(&noise(256, 2));
        let sig = signature(&base, block_size(16 * 1024, 16 * 1024));
        assert!(sig.len() < 600, "signature {} bytes", sig.len());
        let checked = parse_signature(sig).unwrap();
        let d = delta(&checked, &new).unwrap();
        assert!(d.len() < 800, "delta {} bytes", d.len());
        let len = new.len() as u32;
        assert_eq!(apply(&base, &d, len, &h(&new)), Some(new.clone()));
        // Another base, or another id: nothing.
        assert_eq!(apply(&noise(16 * 1024, 3), &d, len, &h(&new)), None);
        assert_eq!(apply(&base, &d, len, &h(b"other")), None);
        assert_eq!(apply(&base, &d, len - 1, &h(&new)), None);
    }

    #[test]
    fn block_sizes_fit_the_chunk() {
        // About the square root of 8 x the base, nearly dividing the chunk.
        let b = block_size(16_000, 18_000);
        assert!((300..500).contains(&b), "{b}");
        assert!(16_000 % b < 16_000 / b, "{b}");
        assert_eq!(block_size(1, 1), DELTA_BLOCK_MIN_BYTES);
        assert!(block_size(CHUNK_MAX_BYTES, u64::MAX) <= DELTA_BLOCK_MAX_BYTES);
    }

    #[test]
    fn unrelated_data_gives_no_delta() {
        let sig = parse_signature(signature(&noise(8192, 1), 128)).unwrap();
        assert_eq!(delta(&sig, &noise(8192, 2)), None);
    }

    #[test]
    fn signatures_stay_small_and_within_bounds() {
        for len in [1, 100, 1024, 16 * 1024, MAX_BASE_BYTES as usize, 1 << 20] {
            let chunk = u32::try_from(len).unwrap().min(CHUNK_MAX_BYTES);
            let sig = signature(&vec![7u8; len], block_size(chunk, len as u64));
            assert!(sig.len() <= MAX_SIGNATURE_BYTES, "{len}: {}", sig.len());
            assert!(parse_signature(sig).is_ok(), "{len}");
        }
    }

    #[test]
    fn hostile_signatures_are_refused() {
        let good = signature(&noise(4096, 1), 256);
        let with = |at: usize, v: u32| {
            let mut s = good.clone();
            s[at..at + 4].copy_from_slice(&v.to_be_bytes());
            s
        };
        assert_eq!(
            parse_signature(vec![0; 4]).unwrap_err(),
            SignatureError::Length { len: 4 }
        );
        assert_eq!(
            parse_signature(vec![0; MAX_SIGNATURE_BYTES + 1]).unwrap_err(),
            SignatureError::Length {
                len: MAX_SIGNATURE_BYTES + 1
            }
        );
        // BLAKE2 signatures (librsync's other kind) are not ours.
        assert_eq!(
            parse_signature(with(0, 0x7273_0137)).unwrap_err(),
            SignatureError::Magic
        );
        assert_eq!(
            parse_signature(with(4, 0)).unwrap_err(),
            SignatureError::BlockSize(0)
        );
        assert_eq!(
            parse_signature(with(4, DELTA_BLOCK_MAX_BYTES + 1)).unwrap_err(),
            SignatureError::BlockSize(DELTA_BLOCK_MAX_BYTES + 1)
        );
        assert_eq!(
            parse_signature(with(8, 0)).unwrap_err(),
            SignatureError::HashSize(0)
        );
        assert_eq!(
            parse_signature(with(8, 17)).unwrap_err(),
            SignatureError::HashSize(17)
        );
        let mut odd = good.clone();
        odd.pop();
        assert_eq!(parse_signature(odd).unwrap_err(), SignatureError::Blocks);
    }

    fn refs(lens: &[(u8, u32)]) -> (Vec<(Hash, u32)>, Vec<ChunkRef>) {
        let mut offset = 0;
        let old = lens.iter().map(|&(b, l)| (Hash([b; 32]), l)).collect();
        let new = lens
            .iter()
            .map(|&(b, l)| {
                let c = ChunkRef {
                    hash: Hash([b; 32]),
                    offset,
                    len: l,
                };
                offset += u64::from(l);
                c
            })
            .collect();
        (old, new)
    }

    #[test]
    fn an_edit_in_place_maps_onto_its_old_bytes() {
        let k = 16 * 1024;
        let (old, _) = refs(&[(1, k), (2, k), (3, k)]);
        let (_, new) = refs(&[(1, k), (9, k), (3, k)]);
        let w = base_windows(&old, &new);
        assert_eq!(w[0], None);
        let w1 = w[1].unwrap();
        // Whole blocks of slack before the chunk's old start, up to the slack after its end.
        let start = u64::from(k);
        assert_eq!((start - w1.offset) % u64::from(w1.block), 0);
        assert!(start - w1.offset <= BASE_SLACK_MIN_BYTES);
        assert_eq!(
            w1.offset + w1.len,
            start + u64::from(k) + BASE_SLACK_MIN_BYTES
        );
        assert_eq!(w[2], None);
        // A single-chunk file: its old self, clamped to the file.
        let (old, _) = refs(&[(1, 5000)]);
        let (_, new) = refs(&[(2, 5000)]);
        let w = base_windows(&old, &new);
        assert_eq!(w.len(), 1);
        let w0 = w[0].unwrap();
        assert_eq!((w0.offset, w0.len), (0, 5000));
    }

    #[test]
    fn an_insertion_gives_bases_only_at_its_edges() {
        let k = 16 * 1024;
        let (old, _) = refs(&[(1, k), (2, k), (3, k)]);
        // Chunk 2 became 2a + 20 new chunks + 2b.
        let mut lens = vec![(1, k), (20, k)];
        lens.extend((30..50).map(|b| (b, k)));
        lens.extend([(21, k), (3, k)]);
        let (_, new) = refs(&lens);
        let w = base_windows(&old, &new);
        let with_base: Vec<usize> = (0..w.len()).filter(|&i| w[i].is_some()).collect();
        assert_eq!(with_base, vec![1, new.len() - 2]);
        // Both edge windows cover old chunk 2.
        for i in with_base {
            let win = w[i].unwrap();
            assert!(win.offset <= u64::from(k) && win.offset + win.len >= 2 * u64::from(k));
        }
    }

    #[test]
    fn pure_insertions_and_new_files_get_no_base() {
        let (old, _) = refs(&[(1, 8192), (2, 8192)]);
        let (_, new) = refs(&[(1, 8192), (7, 8192), (2, 8192)]);
        assert_eq!(base_windows(&old, &new), vec![None; 3]);
        let (_, new) = refs(&[(7, 8192)]);
        assert_eq!(base_windows(&[], &new), vec![None]);
        // Too short to be worth it.
        let (old, _) = refs(&[(1, 500)]);
        let (_, new) = refs(&[(2, 500)]);
        assert_eq!(base_windows(&old, &new), vec![None]);
    }

    /// A new version of `base`: random in-place patches, insertions and deletions.
    fn edited(base: &[u8], edits: &[(usize, u8, Vec<u8>)]) -> Vec<u8> {
        let mut out = base.to_vec();
        for (at, kind, bytes) in edits {
            if out.is_empty() {
                out.extend_from_slice(bytes);
                continue;
            }
            let at = at % out.len();
            match kind % 3 {
                0 => {
                    let end = (at + bytes.len()).min(out.len());
                    out[at..end].copy_from_slice(&bytes[..end - at]);
                }
                1 => {
                    out.splice(at..at, bytes.iter().copied());
                }
                _ => {
                    let end = (at + bytes.len()).min(out.len());
                    out.drain(at..end);
                }
            }
        }
        out.truncate(CHUNK_MAX_BYTES as usize);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn deltas_round_trip(
            seed in any::<u64>(),
            len in 1usize..40_000,
            edits in proptest::collection::vec(
                (any::<usize>(), any::<u8>(), proptest::collection::vec(any::<u8>(), 1..600)),
                0..4,
            ),
        ) {
            let base = noise(len, seed | 1);
            let new = edited(&base, &edits);
            prop_assume!(!new.is_empty());
            let block = block_size(new.len() as u32, base.len() as u64);
            let sig = parse_signature(signature(&base, block)).unwrap();
            if let Some(d) = delta(&sig, &new) {
                prop_assert!(d.len() < new.len());
                let got = apply(&base, &d, new.len() as u32, &h(&new));
                prop_assert_eq!(got, Some(new.clone()));
            }
        }

        #[test]
        fn corrupted_deltas_never_yield_a_wrong_chunk(
            seed in any::<u64>(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let base = noise(20_000, seed | 1);
            let mut new = base.clone();
            new[9000..9300].copy_from_slice(&noise(300, seed ^ 5));
            let sig = parse_signature(signature(&base, block_size(20_000, 20_000))).unwrap();
            let d = delta(&sig, &new).unwrap();
            let id = h(&new);
            let mut bad = d.clone();
            for (at, x) in &flips {
                let i = at % bad.len();
                bad[i] ^= x | 1;
            }
            // Whatever comes out was checked against the id: the right chunk, or nothing.
            if let Some(out) = apply(&base, &bad, new.len() as u32, &id) {
                prop_assert_eq!(out, new.clone());
            }
            let short = &d[..cut % d.len()];
            prop_assert_eq!(apply(&base, short, new.len() as u32, &id), None);
            // A base that changed under the delta.
            let mut moved = base.clone();
            moved[100] ^= 1;
            moved.rotate_left(1);
            if let Some(out) = apply(&moved, &d, new.len() as u32, &id) {
                prop_assert_eq!(out, new);
            }
        }

        #[test]
        fn any_bytes_as_a_signature_are_safe(bytes in proptest::collection::vec(any::<u8>(), 0..2000), data in proptest::collection::vec(any::<u8>(), 1..5000)) {
            if let Ok(sig) = parse_signature(bytes) {
                let _ = delta(&sig, &data);
            }
        }
    }
}
