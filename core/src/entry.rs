//! What a path is on one side: `Entry` (file, directory or symlink, with the metadata we sync),
//! a side's view of a share (`Snapshot`), and a file's chunk list (`Manifest`).
//!
//! Equality of entries is what the reconciler calls "unchanged": files compare content digest,
//! size, permission bits and mtime; directories compare permission bits and mtime; symlinks
//! compare their target bytes and mtime. A difference in mtime alone is a metadata update,
//! never a conflict (see `reconcile`): a directory's mtime moves whenever a child changes.

use crate::digest::Hash;
use crate::path::RelPath;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Permission bits we sync: rwx for user, group, other. Never setuid, setgid or sticky.
pub const PERM_MASK: u32 = 0o777;

/// A point in time with nanosecond precision, as `stat` reports it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    pub const fn new(secs: i64, nanos: u32) -> Self {
        Timestamp { secs, nanos }
    }
}

/// A regular file's synced state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileMeta {
    pub size: u64,
    /// Permission bits only ([`PERM_MASK`]).
    pub mode: u32,
    pub mtime: Timestamp,
    /// BLAKE3 of the chunk list; see [`Manifest::digest_of`].
    pub digest: Hash,
}

impl FileMeta {
    /// Same bytes and permission bits; mtime may differ.
    pub fn same_content(&self, other: &FileMeta) -> bool {
        self.digest == other.digest && self.size == other.size && self.mode == other.mode
    }
}

/// What one path is on one side.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Entry {
    File(FileMeta),
    Dir {
        mode: u32,
        /// The directory's own mtime; applied on the other side after the changes beneath it.
        mtime: Timestamp,
    },
    /// A symlink, kept as data. Only relative targets that stay inside the root are synced.
    Symlink {
        target: Vec<u8>,
        /// The link's own mtime (`lstat`), never its target's.
        mtime: Timestamp,
    },
}

/// The kind of an entry, for messages and type-change decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

impl Entry {
    pub fn kind(&self) -> Kind {
        match self {
            Entry::File(_) => Kind::File,
            Entry::Dir { .. } => Kind::Dir,
            Entry::Symlink { .. } => Kind::Symlink,
        }
    }
    pub fn is_dir(&self) -> bool {
        matches!(self, Entry::Dir { .. })
    }
    pub fn as_file(&self) -> Option<&FileMeta> {
        match self {
            Entry::File(m) => Some(m),
            _ => None,
        }
    }
    /// The entry's own modification time.
    pub fn mtime(&self) -> Timestamp {
        match self {
            Entry::File(m) => m.mtime,
            Entry::Dir { mtime, .. } | Entry::Symlink { mtime, .. } => *mtime,
        }
    }
    /// Equal but for mtime: the content both sides would read is the same.
    pub fn same_content(&self, other: &Entry) -> bool {
        match (self, other) {
            (Entry::File(a), Entry::File(b)) => a.same_content(b),
            (Entry::Dir { mode: a, .. }, Entry::Dir { mode: b, .. }) => a == b,
            (Entry::Symlink { target: a, .. }, Entry::Symlink { target: b, .. }) => a == b,
            _ => false,
        }
    }
}

/// A side's view of (part of) a share: path → entry, ordered so parents precede children.
pub type Snapshot = BTreeMap<RelPath, Entry>;

/// One chunk of a file: where it is and what it hashes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    pub hash: Hash,
    pub offset: u64,
    pub len: u32,
}

/// A file's content as a list of chunks covering `[0, size)` in order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(deserialize_with = "crate::bounded::vec::<_, _, { crate::limits::MAX_FILE_CHUNKS }>")]
    pub chunks: Vec<ChunkRef>,
    /// Other paths where the source holds this very file (hard links to the same inode), at
    /// most [`crate::limits::MAX_MANIFEST_LINKS`]: the destination links the copies it holds
    /// together too. Empty for a file with one name. See docs/hard-links.md.
    #[serde(
        deserialize_with = "crate::bounded::vec::<_, _, { crate::limits::MAX_MANIFEST_LINKS }>"
    )]
    pub links: Vec<RelPath>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("chunk {index} starts at {offset}, expected {expected}")]
    Gap {
        index: usize,
        offset: u64,
        expected: u64,
    },
    #[error("chunk {index} has length {len}, outside 1..={max}")]
    BadLength { index: usize, len: u32, max: u32 },
    #[error(
        "chunk {index} has length {len}, under the chunker's minimum of {min}, and is not the last"
    )]
    Short { index: usize, len: u32, min: u32 },
    #[error("chunks cover {covered} bytes, file has {size}")]
    Size { covered: u64, size: u64 },
    #[error("{count} chunks, more than {max}")]
    TooManyChunks { count: usize, max: usize },
    #[error("chunk list does not hash to the file digest")]
    Digest,
    #[error("{count} hard links, more than {max}")]
    TooManyLinks { count: usize, max: usize },
}

impl Manifest {
    pub fn size(&self) -> u64 {
        self.chunks
            .last()
            .map_or(0, |c| c.offset + u64::from(c.len))
    }

    /// The file digest: BLAKE3 over each chunk's (length as u32 LE, hash), in order. Binding the
    /// lengths makes the digest commit to the exact byte layout, not only to the chunk ids.
    pub fn digest_of(chunks: &[ChunkRef]) -> Hash {
        let mut h = blake3::Hasher::new();
        for c in chunks {
            h.update(&c.len.to_le_bytes());
            h.update(c.hash.as_bytes());
        }
        Hash(*h.finalize().as_bytes())
    }

    pub fn digest(&self) -> Hash {
        Self::digest_of(&self.chunks)
    }

    /// Checks the chunks cover `[0, meta.size)` exactly, in order, with legal lengths, and that
    /// they hash to `meta.digest` (docs/security.md rule 11). `max_chunk` is the chunker's
    /// maximum; every chunk but the last is at least its minimum ([`CHUNK_MIN_BYTES`]), as the
    /// chunker cuts them, so a file of `n` bytes has at most `n / 4 KiB + 1` chunks whoever
    /// made its manifest.
    ///
    /// [`CHUNK_MIN_BYTES`]: crate::limits::CHUNK_MIN_BYTES
    pub fn validate(&self, meta: &FileMeta, max_chunk: u32) -> Result<(), ManifestError> {
        if self.links.len() > crate::limits::MAX_MANIFEST_LINKS {
            return Err(ManifestError::TooManyLinks {
                count: self.links.len(),
                max: crate::limits::MAX_MANIFEST_LINKS,
            });
        }
        if self.chunks.len() > crate::limits::MAX_FILE_CHUNKS {
            return Err(ManifestError::TooManyChunks {
                count: self.chunks.len(),
                max: crate::limits::MAX_FILE_CHUNKS,
            });
        }
        let mut expected = 0u64;
        for (index, c) in self.chunks.iter().enumerate() {
            if c.offset != expected {
                return Err(ManifestError::Gap {
                    index,
                    offset: c.offset,
                    expected,
                });
            }
            if c.len == 0 || c.len > max_chunk {
                return Err(ManifestError::BadLength {
                    index,
                    len: c.len,
                    max: max_chunk,
                });
            }
            let min = crate::limits::CHUNK_MIN_BYTES;
            if c.len < min && index + 1 < self.chunks.len() {
                return Err(ManifestError::Short {
                    index,
                    len: c.len,
                    min,
                });
            }
            expected = expected.saturating_add(u64::from(c.len));
        }
        if expected != meta.size {
            return Err(ManifestError::Size {
                covered: expected,
                size: meta.size,
            });
        }
        if self.digest() != meta.digest {
            return Err(ManifestError::Digest);
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::limits::{CHUNK_MAX_BYTES, CHUNK_MIN_BYTES, MAX_MANIFEST_LINKS};

    /// A manifest of chunks of these lengths, laid end to end, and the meta that matches it.
    fn made(lens: &[u32]) -> (Manifest, FileMeta) {
        let mut offset = 0u64;
        let chunks: Vec<ChunkRef> = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let c = ChunkRef {
                    hash: Hash([i as u8; 32]),
                    offset,
                    len,
                };
                offset += u64::from(len);
                c
            })
            .collect();
        let meta = FileMeta {
            size: offset,
            mode: 0o644,
            mtime: Timestamp::new(0, 0),
            digest: Manifest::digest_of(&chunks),
        };
        let m = Manifest {
            chunks,
            links: Vec::new(),
        };
        (m, meta)
    }

    #[test]
    fn a_manifest_is_checked_against_its_file_and_the_chunker() {
        let (min, max) = (CHUNK_MIN_BYTES, CHUNK_MAX_BYTES);
        let ok: &[&[u32]] = &[&[], &[1], &[min, 1], &[max, min, max, 7], &[min + 1, 3]];
        for lens in ok {
            let (m, meta) = made(lens);
            assert_eq!(m.validate(&meta, max), Ok(()), "{lens:?}");
        }
        let short = |index, len| ManifestError::Short { index, len, min };
        let cases: Vec<(&str, Vec<u32>, ManifestError)> = vec![
            ("a one-byte chunk before the last", vec![1, 1], short(0, 1)),
            (
                "just under the minimum, not last",
                vec![max, min - 1, 5],
                short(1, min - 1),
            ),
            (
                "over the maximum",
                vec![max + 1],
                ManifestError::BadLength {
                    index: 0,
                    len: max + 1,
                    max,
                },
            ),
            (
                "empty chunk",
                vec![min, 0],
                ManifestError::BadLength {
                    index: 1,
                    len: 0,
                    max,
                },
            ),
        ];
        for (what, lens, want) in cases {
            let (m, meta) = made(&lens);
            assert_eq!(m.validate(&meta, max), Err(want), "{what}");
        }
        // Coverage and digest against the file's meta.
        let (mut m, meta) = made(&[min, 10]);
        m.chunks[1].offset += 1;
        assert!(matches!(
            m.validate(&meta, max),
            Err(ManifestError::Gap { index: 1, .. })
        ));
        let (m, mut meta) = made(&[min, 10]);
        meta.size += 1;
        assert!(matches!(
            m.validate(&meta, max),
            Err(ManifestError::Size { .. })
        ));
        let (m, mut meta) = made(&[min, 10]);
        meta.digest = Hash([9; 32]);
        assert_eq!(m.validate(&meta, max), Err(ManifestError::Digest));
        let (mut m, meta) = made(&[min]);
        m.links = vec![RelPath::from_bytes(b"x").unwrap(); MAX_MANIFEST_LINKS + 1];
        assert!(matches!(
            m.validate(&meta, max),
            Err(ManifestError::TooManyLinks { .. })
        ));
    }
}
