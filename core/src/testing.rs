//! Helpers for tests across the workspace (cargo feature `testing`, never in a release build).

/// `len` deterministic pseudo-random bytes from `seed` (the BLAKE3 extendable output of the
/// seed): incompressible, reproducible, the same in every crate's tests.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// A file entry of `size` bytes, mode 0644, mtime 0, with a digest that differs by size: enough
/// for tests that compare entries and never read the content.
pub fn file_entry(size: u64) -> crate::Entry {
    crate::Entry::File(crate::FileMeta {
        size,
        mode: 0o644,
        mtime: crate::Timestamp::new(0, 0),
        digest: crate::Hash([size as u8; 32]),
    })
}
