//! Content-defined chunking: cuts a file into FastCDC 2020 chunks (4/16/64 KiB) and hashes each
//! with BLAKE3. The cut points are a wire contract (both sides must cut identical data
//! identically), so the fastcdc version is pinned exactly and golden vectors below fail on any
//! change.

use std::io::{self, Read};
use vmsync_core::limits::{CHUNK_AVG_BYTES, CHUNK_MAX_BYTES, CHUNK_MIN_BYTES, MAX_FILE_CHUNKS};
use vmsync_core::ChunkRef;

pub use vmsync_core::digest::hash_chunk;

/// Cuts everything `reader` yields into chunks. Fails with `InvalidData` past
/// [`MAX_FILE_CHUNKS`] so a huge file cannot make us build an unbounded list.
pub fn chunk_reader<R: Read>(reader: R) -> io::Result<Vec<ChunkRef>> {
    chunk_reader_then(reader, || {})
}

/// [`chunk_reader`], calling `first_cut` once right after the first chunk is cut: the chunker
/// has then read at most [`CHUNK_MAX_BYTES`] of `reader` (a buffer's worth), nothing past
/// them. Not called for an empty input. For the tests' hook at that moment
/// ([`crate::faults::Moment::FirstChunkCut`]).
pub(crate) fn chunk_reader_then<R: Read>(
    reader: R,
    first_cut: impl FnOnce(),
) -> io::Result<Vec<ChunkRef>> {
    let mut first_cut = Some(first_cut);
    let cdc = fastcdc::v2020::StreamCDC::new(
        reader,
        CHUNK_MIN_BYTES as usize,
        CHUNK_AVG_BYTES as usize,
        CHUNK_MAX_BYTES as usize,
    );
    let mut chunks = Vec::new();
    for item in cdc {
        let chunk = item.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(e) => e,
            other => io::Error::other(other.to_string()),
        })?;
        if chunks.len() >= MAX_FILE_CHUNKS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("file has more than {MAX_FILE_CHUNKS} chunks"),
            ));
        }
        let len = u32::try_from(chunk.length)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "chunk longer than u32"))?;
        chunks.push(ChunkRef {
            hash: hash_chunk(&chunk.data),
            offset: chunk.offset,
            len,
        });
        if let Some(f) = first_cut.take() {
            f();
        }
    }
    Ok(chunks)
}

/// Chunks an in-memory buffer (tests, small data).
pub fn chunk_bytes(data: &[u8]) -> Vec<ChunkRef> {
    fastcdc::v2020::FastCDC::new(
        data,
        CHUNK_MIN_BYTES as usize,
        CHUNK_AVG_BYTES as usize,
        CHUNK_MAX_BYTES as usize,
    )
    .map(|c| ChunkRef {
        hash: hash_chunk(&data[c.offset..c.offset + c.length]),
        offset: c.offset as u64,
        len: c.length as u32,
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmsync_core::testing::noise;
    use vmsync_core::Manifest;

    /// Golden cut points for 1 MiB of the seed-7 stream. If this fails, the chunker changed:
    /// every digest on every deployed side changes with it. That needs a protocol version bump,
    /// not a test update.
    #[test]
    fn golden_cut_points() {
        let data = noise(1 << 20, 7);
        let chunks = chunk_bytes(&data);
        let offsets: Vec<u64> = chunks.iter().map(|c| c.offset).collect();
        assert_eq!(offsets, GOLDEN_OFFSETS, "cut points changed");
        assert_eq!(
            Manifest {
                chunks,
                links: Vec::new()
            }
            .digest()
            .to_hex(),
            GOLDEN_DIGEST
        );
    }

    #[test]
    fn reader_and_bytes_agree() {
        let data = noise(700_000, 3);
        let a = chunk_bytes(&data);
        let b = chunk_reader(&data[..]).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            Manifest {
                chunks: a,
                links: vec![]
            }
            .size(),
            700_000
        );
    }

    /// The callback runs once, after the first chunk is cut and before the chunker read past
    /// its first buffer (64 KiB); what it does to the source shows in the rest of the cut.
    #[test]
    fn first_cut_runs_once_after_one_buffer_is_read() {
        use std::cell::Cell;
        use std::rc::Rc;
        struct Counted<'a>(&'a [u8], Rc<Cell<usize>>);
        impl Read for Counted<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.0.read(buf)?;
                self.1.set(self.1.get() + n);
                Ok(n)
            }
        }
        let data = noise(1 << 20, 4);
        let read = Rc::new(Cell::new(0));
        let mut seen = Vec::new();
        let chunks = chunk_reader_then(Counted(&data, Rc::clone(&read)), || {
            seen.push(read.get());
        })
        .unwrap();
        assert_eq!(seen, vec![CHUNK_MAX_BYTES as usize], "once, one buffer in");
        assert_eq!(chunks, chunk_bytes(&data));
        let mut called = false;
        assert!(chunk_reader_then(&[][..], || called = true)
            .unwrap()
            .is_empty());
        assert!(!called, "an empty input has no first chunk");
    }

    #[test]
    fn chunk_sizes_within_bounds() {
        let data = noise(3 << 20, 11);
        let chunks = chunk_bytes(&data);
        for c in &chunks[..chunks.len() - 1] {
            assert!(
                c.len >= CHUNK_MIN_BYTES && c.len <= CHUNK_MAX_BYTES,
                "{c:?}"
            );
        }
    }

    /// An insertion in the middle changes only the chunks around it.
    #[test]
    fn insertion_is_local() {
        let data = noise(4 << 20, 5);
        let mut edited = data[..2 << 20].to_vec();
        edited.extend_from_slice(&noise(100_000, 99));
        edited.extend_from_slice(&data[2 << 20..]);
        let before: std::collections::HashSet<_> =
            chunk_bytes(&data).into_iter().map(|c| c.hash).collect();
        let after = chunk_bytes(&edited);
        let new_bytes: u64 = after
            .iter()
            .filter(|c| !before.contains(&c.hash))
            .map(|c| u64::from(c.len))
            .sum();
        assert!(new_bytes < 100_000 + 4 * 64 * 1024, "{new_bytes} new bytes");
    }

    #[test]
    fn empty_input_has_no_chunks() {
        assert!(chunk_bytes(&[]).is_empty());
        assert!(chunk_reader(&[][..]).unwrap().is_empty());
    }

    const GOLDEN_OFFSETS: &[u64] = &[
        0, 23688, 42775, 59346, 107831, 125878, 155809, 178242, 201821, 224692, 236791, 258087,
        281281, 300721, 316532, 332979, 350349, 367027, 391180, 417727, 448704, 471066, 505873,
        530137, 534340, 545371, 567574, 612048, 647999, 659898, 676195, 707814, 754452, 785014,
        789170, 821031, 879333, 913934, 933175, 950290, 958091, 965208, 985214, 1006669, 1035550,
    ];
    const GOLDEN_DIGEST: &str = "956f38ff21e62129c1d3d9372dc37408734d0e0bab1b0a9fbf5f92531cf7e9e9";
}
