//! How a file being staged reuses the version this side already has at its path, decided from
//! the two chunk lists alone (pure: no I/O). Staging then writes only what the plan leaves to
//! write (see `crate::local`):
//!
//! - **Append**: the new version is the old one with bytes added at the end (every old chunk
//!   but the last is the new version's chunk at the same place; the old last chunk, cut by
//!   the old end of file, must be the new bytes at its place, which staging checks once it
//!   has them). Only the new version from the old last chunk on is staged, and the
//!   destination file is appended in place: same inode, so a reader following it sees it grow.
//!   Nothing that was in the file is overwritten, so nothing needs keeping in the trash.
//! - **Clone**: enough of the new version's chunks are the old file's at the same offsets that
//!   cloning the old file into the temp (a reflink, where the filesystem has them) and writing
//!   only the other chunks costs less disk than writing it all.
//! - **Fresh**: nothing worth reusing in place; the temp is built from chunks found anywhere.
//!
//! What it must not do: trust the old chunk list for a file that may have changed since it
//! was hashed. Callers pass the list only when the file's identity still matches it.
//!
//! Zero runs: a chunk of only zero bytes is never written (nor asked from the peer); the temp
//! is sized first, so it stays a hole ([`ZeroChunks`] recognises such chunks by id).

use std::collections::{HashMap, HashSet};
use vmsync_core::limits::CHUNK_MAX_BYTES;
use vmsync_core::{ChunkRef, Hash, Manifest};

/// Clone only files at least this big: for a smaller one the clone's extra open and ioctl
/// cost more than writing it.
pub const CLONE_MIN_BYTES: u64 = 1 << 20;
/// Clone only when at least 1/`CLONE_MIN_SHARE` of the new version is the old file's chunks
/// at the same offsets.
pub const CLONE_MIN_SHARE: u64 = 4;

/// What staging reuses of the old version at the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Fresh,
    /// Clone the old file into the temp; the new chunks at these offsets are already right.
    Clone {
        same: HashSet<u64>,
    },
    /// Stage only `[from, size)` and append in place. `verify`: the old last chunk (id,
    /// length), at `from`, which the new bytes there must hash to (`None`: known to, or the
    /// old file was empty).
    Append {
        from: u64,
        old_size: u64,
        verify: Option<(Hash, u32)>,
    },
}

/// Decides how to stage `new` over an old version whose chunks are `old` ((id, length) in
/// order, as the index keeps them).
pub fn plan(old: &[(Hash, u32)], new: &Manifest) -> Plan {
    let old_size: u64 = old.iter().map(|&(_, len)| u64::from(len)).sum();
    let new_size = new.size();
    if new_size > old_size {
        if let Some(append) = append_plan(old, old_size, new) {
            return append;
        }
    }
    if new_size < CLONE_MIN_BYTES {
        return Plan::Fresh;
    }
    let mut at: HashMap<u64, (Hash, u32)> = HashMap::with_capacity(old.len());
    let mut offset = 0u64;
    for &(hash, len) in old {
        at.insert(offset, (hash, len));
        offset += u64::from(len);
    }
    let mut same = HashSet::new();
    let mut same_bytes = 0u64;
    for c in &new.chunks {
        if at.get(&c.offset) == Some(&(c.hash, c.len)) {
            same.insert(c.offset);
            same_bytes += u64::from(c.len);
        }
    }
    if same_bytes == 0 || same_bytes.saturating_mul(CLONE_MIN_SHARE) < new_size {
        return Plan::Fresh;
    }
    Plan::Clone { same }
}

fn append_plan(old: &[(Hash, u32)], old_size: u64, new: &Manifest) -> Option<Plan> {
    let Some((&(last_hash, last_len), head)) = old.split_last() else {
        return Some(Plan::Append {
            from: 0,
            old_size: 0,
            verify: None,
        });
    };
    if new.chunks.len() < old.len() {
        return None;
    }
    let head_same = head
        .iter()
        .zip(&new.chunks)
        .all(|(&(hash, len), c)| c.hash == hash && c.len == len);
    if !head_same {
        return None;
    }
    let from = old_size - u64::from(last_len);
    let verify = match new.chunks.get(head.len()) {
        Some(c) if c.hash == last_hash && c.len == last_len => None,
        _ => Some((last_hash, last_len)),
    };
    Some(Plan::Append {
        from,
        old_size,
        verify,
    })
}

/// Recognises chunks of only zero bytes by their id without hashing anything: a run of zeros
/// is cut into chunks of the lengths the chunker gives a long zero run (learnt once, by
/// chunking one), whose ids are remembered. Only the last chunk of a file ending in zeros can
/// have another length: it is written like data (at most one chunk's worth).
#[derive(Debug)]
pub struct ZeroChunks {
    ids: HashMap<u32, Hash>,
}

/// Zeros chunked to learn the lengths of a zero run's chunks: several maximum-length chunks.
const ZERO_SAMPLE_BYTES: usize = 4 * CHUNK_MAX_BYTES as usize;

impl Default for ZeroChunks {
    fn default() -> Self {
        let sample = vec![0u8; ZERO_SAMPLE_BYTES];
        let ids = crate::chunk::chunk_bytes(&sample)
            .into_iter()
            .map(|c| (c.len, c.hash))
            .collect();
        ZeroChunks { ids }
    }
}

impl ZeroChunks {
    pub fn is_zero(&self, c: &ChunkRef) -> bool {
        self.ids.get(&c.len) == Some(&c.hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::hash_chunk;

    fn h(b: u8) -> Hash {
        Hash([b; 32])
    }

    fn manifest(chunks: &[(u8, u32)]) -> Manifest {
        let mut offset = 0;
        Manifest {
            chunks: chunks
                .iter()
                .map(|&(b, len)| {
                    let c = ChunkRef {
                        hash: h(b),
                        offset,
                        len,
                    };
                    offset += u64::from(len);
                    c
                })
                .collect(),
            links: Vec::new(),
        }
    }

    fn old(chunks: &[(u8, u32)]) -> Vec<(Hash, u32)> {
        chunks.iter().map(|&(b, l)| (h(b), l)).collect()
    }

    const K: u32 = 64 * 1024;

    #[test]
    fn plans() {
        // (name, old chunks, new chunks, expected plan)
        let big_same: Vec<(u8, u32)> = (0..32).map(|i| (i, K)).collect();
        let mut big_one_changed = big_same.clone();
        big_one_changed[5] = (200, K);
        let mut big_mostly_new: Vec<(u8, u32)> = (100..132).map(|i| (i, K)).collect();
        big_mostly_new[0] = (0, K);
        type Case = (&'static str, Vec<(u8, u32)>, Vec<(u8, u32)>, Plan);
        let cases: Vec<Case> = vec![
            (
                "empty old file grows: append everything",
                vec![],
                vec![(1, 10)],
                Plan::Append {
                    from: 0,
                    old_size: 0,
                    verify: None,
                },
            ),
            (
                "last chunk grew: append, check the old last chunk",
                vec![(1, 10), (2, 5)],
                vec![(1, 10), (3, 9)],
                Plan::Append {
                    from: 10,
                    old_size: 15,
                    verify: Some((h(2), 5)),
                },
            ),
            (
                "old last chunk kept whole: append, nothing to check",
                vec![(1, 10), (2, 5)],
                vec![(1, 10), (2, 5), (3, 7)],
                Plan::Append {
                    from: 10,
                    old_size: 15,
                    verify: None,
                },
            ),
            (
                "a changed head chunk is no append",
                vec![(1, 10), (2, 5)],
                vec![(9, 10), (3, 9)],
                Plan::Fresh,
            ),
            (
                "same size is no append (small: fresh)",
                vec![(1, 10)],
                vec![(2, 10)],
                Plan::Fresh,
            ),
            (
                "shrunk small file: fresh",
                vec![(1, 10), (2, 5)],
                vec![(1, 10)],
                Plan::Fresh,
            ),
            (
                "one chunk changed in a big file: clone, all but it reused",
                big_same.clone(),
                big_one_changed.clone(),
                Plan::Clone {
                    same: (0..32u64)
                        .filter(|&i| i != 5)
                        .map(|i| i * u64::from(K))
                        .collect(),
                },
            ),
            (
                "a big file sharing one chunk: fresh",
                big_same.clone(),
                big_mostly_new,
                Plan::Fresh,
            ),
        ];
        for (name, o, n, want) in cases {
            assert_eq!(plan(&old(&o), &manifest(&n)), want, "{name}");
        }
    }

    #[test]
    fn zero_chunks_of_a_hole_are_known_by_id_and_data_is_not() {
        let z = ZeroChunks::default();
        // What a sparse file's hole chunks into: each of those is known.
        let holes = crate::chunk::chunk_bytes(&vec![0u8; 1 << 20]);
        assert!(holes.len() > 4, "{}", holes.len());
        for c in &holes[..holes.len() - 1] {
            assert!(z.is_zero(c), "{c:?}");
        }
        // Data of a zero run's length is not zero.
        let len = holes[0].len;
        let mut data = vec![0u8; len as usize];
        data[len as usize - 1] = 1;
        let other = ChunkRef {
            hash: hash_chunk(&data),
            offset: 0,
            len,
        };
        assert!(!z.is_zero(&other), "{len}");
    }
}
