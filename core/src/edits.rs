//! Manifest edits: a new chunk list written as runs copied from an old one plus the chunk
//! references that are new, so a small change to a big file does not resend all of its
//! manifest (a 256 MiB file has about 16,000 chunk references, some 600 KiB).
//!
//! [`diff`] encodes, [`apply`] rebuilds. Nothing here trusts its input: `apply` checks every
//! range against the old list and bounds the result before building it, and the caller still
//! validates the rebuilt manifest against the file digest (`Manifest::validate`), so edits
//! against the wrong old list are caught there.

use crate::digest::Hash;
use crate::entry::{ChunkRef, Manifest};
use crate::limits::MAX_FILE_CHUNKS;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// One step of rebuilding a chunk list. Append-only (a wire type).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManifestEdit {
    /// The old list's references `start .. start + count`.
    Copy { start: u32, count: u32 },
    /// New references: (chunk id, length).
    New(
        #[serde(
            deserialize_with = "crate::bounded::vec::<_, _, { crate::limits::MAX_FILE_CHUNKS }>"
        )]
        Vec<(Hash, u32)>,
    ),
}

/// Why edits could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error("copy of {count} references from {start} runs past the {len} of the old list")]
    OutOfRange { start: u32, count: u32, len: usize },
    #[error("the edits build more than {MAX_FILE_CHUNKS} references")]
    TooMany,
    #[error("an edit is empty")]
    Empty,
}

/// Edits that turn `old` into `new`: every run of `new` found in `old` becomes a copy, the
/// rest new references.
pub fn diff(old: &[(Hash, u32)], new: &[(Hash, u32)]) -> Vec<ManifestEdit> {
    let mut at: HashMap<(Hash, u32), usize> = HashMap::with_capacity(old.len());
    for (i, r) in old.iter().enumerate().rev() {
        at.insert(*r, i);
    }
    let mut out = Vec::new();
    let mut fresh: Vec<(Hash, u32)> = Vec::new();
    let mut i = 0;
    while i < new.len() {
        let Some(&start) = at.get(&new[i]) else {
            fresh.push(new[i]);
            i += 1;
            continue;
        };
        let mut count = 0;
        while i + count < new.len() && old.get(start + count) == Some(&new[i + count]) {
            count += 1;
        }
        if !fresh.is_empty() {
            out.push(ManifestEdit::New(std::mem::take(&mut fresh)));
        }
        match (u32::try_from(start), u32::try_from(count)) {
            (Ok(start), Ok(count)) => out.push(ManifestEdit::Copy { start, count }),
            // Beyond any manifest we accept: spell the references out.
            _ => fresh.extend_from_slice(&new[i..i + count]),
        }
        i += count;
    }
    if !fresh.is_empty() {
        out.push(ManifestEdit::New(fresh));
    }
    out
}

/// Rebuilds the chunk list `edits` describe against `old`. The result is bounded by
/// [`MAX_FILE_CHUNKS`] before anything is allocated for it.
pub fn apply(old: &[(Hash, u32)], edits: &[ManifestEdit]) -> Result<Vec<(Hash, u32)>, EditError> {
    let mut total = 0usize;
    for e in edits {
        let n = match e {
            ManifestEdit::Copy { start, count } => {
                let (s, c) = (*start as usize, *count as usize);
                if c == 0 {
                    return Err(EditError::Empty);
                }
                if s.checked_add(c).is_none_or(|end| end > old.len()) {
                    return Err(EditError::OutOfRange {
                        start: *start,
                        count: *count,
                        len: old.len(),
                    });
                }
                c
            }
            ManifestEdit::New(refs) if refs.is_empty() => return Err(EditError::Empty),
            ManifestEdit::New(refs) => refs.len(),
        };
        total = total.saturating_add(n);
        if total > MAX_FILE_CHUNKS {
            return Err(EditError::TooMany);
        }
    }
    let mut out = Vec::with_capacity(total);
    for e in edits {
        match e {
            ManifestEdit::Copy { start, count } => {
                let s = *start as usize;
                out.extend_from_slice(&old[s..s + *count as usize]);
            }
            ManifestEdit::New(refs) => out.extend_from_slice(refs),
        }
    }
    Ok(out)
}

/// A chunk list as a manifest (offsets are the running sum of lengths).
pub fn to_manifest(refs: &[(Hash, u32)]) -> Manifest {
    let mut offset = 0u64;
    let chunks = refs
        .iter()
        .map(|&(hash, len)| {
            let c = ChunkRef { hash, offset, len };
            offset = offset.saturating_add(u64::from(len));
            c
        })
        .collect();
    Manifest {
        chunks,
        links: Vec::new(),
    }
}

/// A manifest as a chunk list.
pub fn refs(manifest: &Manifest) -> Vec<(Hash, u32)> {
    manifest.chunks.iter().map(|c| (c.hash, c.len)).collect()
}

/// Rough encoded size of edits, to decide whether they beat the full manifest: a copy is a tag
/// and two varints, a new reference an id and a varint length.
pub fn encoded_size(edits: &[ManifestEdit]) -> usize {
    edits
        .iter()
        .map(|e| match e {
            ManifestEdit::Copy { .. } => 9,
            ManifestEdit::New(refs) => 4 + refs.len() * 35,
        })
        .sum()
}

/// Rough encoded size of a full manifest of `chunks` references (id, offset and length).
pub fn full_size(chunks: usize) -> usize {
    chunks * 40
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(b: u8, len: u32) -> (Hash, u32) {
        (Hash([b; 32]), len)
    }

    #[test]
    fn an_insertion_is_two_copies_around_the_new_refs() {
        let old: Vec<_> = (0..100).map(|i| r(i, 1000)).collect();
        let mut new = old[..40].to_vec();
        new.extend([r(200, 7), r(201, 8)]);
        new.extend_from_slice(&old[41..]);
        let edits = diff(&old, &new);
        assert_eq!(
            edits,
            vec![
                ManifestEdit::Copy {
                    start: 0,
                    count: 40
                },
                ManifestEdit::New(vec![r(200, 7), r(201, 8)]),
                ManifestEdit::Copy {
                    start: 41,
                    count: 59
                },
            ]
        );
        assert_eq!(apply(&old, &edits).unwrap(), new);
        assert!(encoded_size(&edits) * 20 < full_size(new.len()));
    }

    #[test]
    fn hostile_edits_are_refused() {
        let old = vec![r(1, 10), r(2, 10)];
        assert_eq!(
            apply(&old, &[ManifestEdit::Copy { start: 1, count: 2 }]),
            Err(EditError::OutOfRange {
                start: 1,
                count: 2,
                len: 2
            })
        );
        assert!(apply(
            &old,
            &[ManifestEdit::Copy {
                start: u32::MAX,
                count: u32::MAX
            }]
        )
        .is_err());
        assert_eq!(
            apply(&old, &[ManifestEdit::Copy { start: 0, count: 0 }]),
            Err(EditError::Empty)
        );
        assert_eq!(
            apply(&old, &[ManifestEdit::New(vec![])]),
            Err(EditError::Empty)
        );
        // Many copies of a big old list: refused before anything is built.
        let big = vec![r(1, 10); 1 << 20];
        let copy_all = ManifestEdit::Copy {
            start: 0,
            count: 1 << 20,
        };
        assert_eq!(
            apply(&big, &[copy_all.clone(), copy_all.clone(), copy_all]),
            Err(EditError::TooMany)
        );
    }

    proptest! {
        #[test]
        fn edits_round_trip(
            old in proptest::collection::vec((0u8..20, 1u32..5), 0..200),
            new in proptest::collection::vec((0u8..30, 1u32..5), 0..200),
        ) {
            let old: Vec<_> = old.into_iter().map(|(b, l)| r(b, l)).collect();
            let new: Vec<_> = new.into_iter().map(|(b, l)| r(b, l)).collect();
            let edits = diff(&old, &new);
            prop_assert_eq!(apply(&old, &edits).unwrap(), new);
        }

        #[test]
        fn edits_of_a_few_changes_are_small(
            len in 100usize..2000,
            changes in proptest::collection::vec((any::<usize>(), 0u8..3), 1..5),
        ) {
            let old: Vec<_> = (0..len).map(|i| (Hash([(i % 251) as u8, (i / 251) as u8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), 1000)).collect();
            let mut new = old.clone();
            for (at, kind) in &changes {
                let at = at % new.len();
                match kind {
                    0 => new[at] = r(255, 7),
                    1 => new.insert(at, r(254, 9)),
                    _ => { new.remove(at); }
                }
            }
            let edits = diff(&old, &new);
            prop_assert_eq!(apply(&old, &edits).unwrap(), new.clone());
            prop_assert!(edits.len() <= 3 * changes.len() + 1);
            prop_assert!(encoded_size(&edits) < full_size(new.len()) / 10);
        }
    }
}
