//! Scan listings as differences. A full scan of a large share lists every entry; sent whole on
//! every cycle it would cost megabytes even when nothing changed. Within one session both ends
//! remember the last full listing they exchanged for each share (tagged with a token), and the
//! next one travels as what changed against it. These are the two pure halves: `diff` on the
//! guest, `apply` on the host. A token mismatch simply means a full listing is sent.
//!
//! Between two full scans each end keeps its copy [`Packed`]: the host with every entry (it
//! rebuilds the next listing from it), the guest with a digest of each (it only compares).

use vmsync_core::{Entry, RelPath};

/// Entries that are new or different in `new`, and paths of `old` that are gone from `new`.
/// Both inputs must be sorted by path (scan reports are); so are both outputs.
pub fn diff(
    old: &[(RelPath, Entry)],
    new: &[(RelPath, Entry)],
) -> (Vec<(RelPath, Entry)>, Vec<RelPath>) {
    diff_with(old.iter().cloned(), new, |a, b| a == b)
}

/// [`diff`] against the guest's packed copy of the last listing (see [`pack_digests`]).
pub fn diff_packed(
    old: &Packed,
    new: &[(RelPath, Entry)],
) -> (Vec<(RelPath, Entry)>, Vec<RelPath>) {
    let old = old
        .iter()
        .filter_map(|(path, digest)| Some((RelPath::from_bytes(&path).ok()?, digest)));
    diff_with(old, new, |digest, entry| {
        entry_digest(entry).is_some_and(|d| d.as_slice() == *digest)
    })
}

/// [`diff`], with `old` as (path, value) pairs sorted by path and `same` telling whether a
/// value stands for an entry.
fn diff_with<V>(
    old: impl IntoIterator<Item = (RelPath, V)>,
    new: &[(RelPath, Entry)],
    same: impl Fn(&V, &Entry) -> bool,
) -> (Vec<(RelPath, Entry)>, Vec<RelPath>) {
    let (mut changed, mut removed) = (Vec::new(), Vec::new());
    let mut old = old.into_iter().peekable();
    let mut new = new.iter().peekable();
    loop {
        match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some(_), None) => removed.extend(old.next().map(|(p, _)| p)),
            (None, Some(_)) => changed.extend(new.next().cloned()),
            (Some((op, ov)), Some((np, ne))) => match op.cmp(np) {
                std::cmp::Ordering::Less => removed.extend(old.next().map(|(p, _)| p)),
                std::cmp::Ordering::Greater => changed.extend(new.next().cloned()),
                std::cmp::Ordering::Equal => {
                    if !same(ov, ne) {
                        changed.push((np.clone(), ne.clone()));
                    }
                    old.next();
                    new.next();
                }
            },
        }
    }
    (changed, removed)
}

/// A listing sorted by path, packed into one buffer: each path stored as the length it shares
/// with the path before it and the rest of it, then a value (bytes) for its entry. Kept from
/// one full scan to the next, it costs a share's memory about 60 bytes an entry with the whole
/// entry as value and 30 with a digest, against about 110 for the listing itself.
#[derive(Debug, Default, Clone)]
pub struct Packed {
    bytes: Vec<u8>,
    /// The offset of every [`RESTART`]th record, whose path is stored whole: where a lookup
    /// starts.
    restarts: Vec<usize>,
    len: usize,
}

/// Every this many records, a path is stored whole.
const RESTART: usize = 32;

fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn take_varint(bytes: &[u8], at: &mut usize) -> Option<usize> {
    let mut n = 0usize;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at)?;
        *at += 1;
        n |= usize::from(b & 0x7f).checked_shl(shift)?;
        if b & 0x80 == 0 {
            return Some(n);
        }
    }
    None
}

impl Packed {
    /// Packs `entries` (sorted by path) with the value `value` makes of each; `None` if it
    /// makes none for one.
    pub fn pack(
        entries: &[(RelPath, Entry)],
        value: impl Fn(&Entry) -> Option<Vec<u8>>,
    ) -> Option<Packed> {
        let mut packed = Packed::default();
        let mut last: &[u8] = &[];
        for (i, (path, entry)) in entries.iter().enumerate() {
            let path = path.as_bytes();
            let shared = if i % RESTART == 0 {
                packed.restarts.push(packed.bytes.len());
                0
            } else {
                last.iter().zip(path).take_while(|(a, b)| a == b).count()
            };
            let value = value(entry)?;
            put_varint(&mut packed.bytes, shared);
            put_varint(&mut packed.bytes, path.len() - shared);
            packed.bytes.extend_from_slice(&path[shared..]);
            put_varint(&mut packed.bytes, value.len());
            packed.bytes.extend_from_slice(&value);
            last = path;
        }
        packed.len = entries.len();
        packed.bytes.shrink_to_fit();
        packed.restarts.shrink_to_fit();
        Some(packed)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The records in order: (path bytes, value).
    pub fn iter(&self) -> impl Iterator<Item = (Vec<u8>, &[u8])> + '_ {
        self.records_from(0)
    }

    fn records_from(&self, mut at: usize) -> impl Iterator<Item = (Vec<u8>, &[u8])> + '_ {
        let bytes = self.bytes.as_slice();
        let mut path = Vec::new();
        std::iter::from_fn(move || {
            if at >= bytes.len() {
                return None;
            }
            let shared = take_varint(bytes, &mut at)?;
            let rest = take_varint(bytes, &mut at)?;
            path.truncate(shared);
            path.extend_from_slice(bytes.get(at..at.checked_add(rest)?)?);
            at += rest;
            let len = take_varint(bytes, &mut at)?;
            let value = bytes.get(at..at.checked_add(len)?)?;
            at += len;
            Some((path.clone(), value))
        })
    }

    /// The value stored for `path`.
    pub fn get(&self, path: &[u8]) -> Option<&[u8]> {
        let first_path = |&at: &usize| self.records_from(at).next().map(|(p, _)| p);
        // The last block whose first path is not past `path`.
        let block = self
            .restarts
            .partition_point(|at| first_path(at).is_some_and(|p| p.as_slice() <= path));
        let start = *self.restarts.get(block.checked_sub(1)?)?;
        self.records_from(start)
            .take(RESTART)
            .find(|(p, _)| p.as_slice() == path)
            .map(|(_, v)| v)
    }
}

/// A listing packed with each whole entry: the host's copy, from which it rebuilds the next.
pub fn pack_entries(entries: &[(RelPath, Entry)]) -> Option<Packed> {
    Packed::pack(entries, |e| postcard::to_allocvec(e).ok())
}

/// The listing packed by [`pack_entries`]; `None` if a record does not read back.
pub fn unpack_entries(packed: &Packed) -> Option<Vec<(RelPath, Entry)>> {
    packed
        .iter()
        .map(|(path, value)| {
            Some((
                RelPath::from_bytes(&path).ok()?,
                postcard::from_bytes(value).ok()?,
            ))
        })
        .collect()
}

/// A listing packed with a digest of each entry: the guest's copy, which only compares.
pub fn pack_digests(entries: &[(RelPath, Entry)]) -> Option<Packed> {
    Packed::pack(entries, |e| entry_digest(e).map(|d| d.to_vec()))
}

/// 128 bits of the BLAKE3 hash of an entry's encoding: two entries with the same digest are
/// taken for the same (a chance of 2^-128 that a change goes unsent until the next one).
pub fn entry_digest(entry: &Entry) -> Option<[u8; 16]> {
    let bytes = postcard::to_allocvec(entry).ok()?;
    let hash = blake3::hash(&bytes);
    let mut out = [0u8; 16];
    out.copy_from_slice(&hash.as_bytes()[..16]);
    Some(out)
}

/// `old` with `changed` put in and `removed` taken out: the inverse of [`diff`]. `None` when
/// the difference does not fit `old` (removing a path it lacks), which means the two ends'
/// listings disagree, or when the result would hold more than `max_entries` (a peer growing
/// the listing difference after difference, past what one scan may list).
pub fn apply(
    old: &[(RelPath, Entry)],
    changed: Vec<(RelPath, Entry)>,
    removed: &[RelPath],
    max_entries: usize,
) -> Option<Vec<(RelPath, Entry)>> {
    let mut out = Vec::with_capacity(old.len() + changed.len());
    let mut changed = changed.into_iter().peekable();
    let mut removed = removed.iter().peekable();
    for (path, entry) in old {
        while let Some((p, _)) = changed.peek() {
            if p >= path {
                break;
            }
            out.extend(changed.next());
        }
        if removed.peek() == Some(&path) {
            removed.next();
            continue;
        }
        if changed.peek().is_some_and(|(p, _)| p == path) {
            out.extend(changed.next());
            continue;
        }
        out.push((path.clone(), entry.clone()));
    }
    out.extend(changed);
    (removed.next().is_none() && out.len() <= max_entries).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmsync_core::{FileMeta, Hash, Timestamp};

    fn file(n: u8) -> Entry {
        Entry::File(FileMeta {
            size: u64::from(n),
            mode: 0o644,
            mtime: Timestamp::default(),
            digest: Hash([n; 32]),
        })
    }

    fn listing(items: &[(&str, u8)]) -> Vec<(RelPath, Entry)> {
        let mut v: Vec<_> = items
            .iter()
            .map(|(p, n)| (RelPath::from_bytes(p.as_bytes()).unwrap(), file(*n)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// A listing written as (path, content id) pairs.
    type Spec<'a> = &'a [(&'a str, u8)];

    #[test]
    fn diff_then_apply_gives_the_new_listing() {
        let cases: &[(Spec<'_>, Spec<'_>)] = &[
            (&[], &[]),
            (&[("a", 1)], &[]),
            (&[], &[("a", 1), ("b", 2)]),
            (
                &[("a", 1), ("b", 2), ("c", 3)],
                &[("a", 1), ("b", 9), ("d", 4)],
            ),
            (
                &[("a", 1), ("a/b", 2), ("a-c", 3)],
                &[("a/b", 2), ("a/c", 5), ("a-c", 3), ("z", 1)],
            ),
        ];
        for (old, new) in cases {
            let (old, new) = (listing(old), listing(new));
            let (changed, removed) = diff(&old, &new);
            assert_eq!(
                apply(&old, changed, &removed, usize::MAX),
                Some(new.clone()),
                "{old:?} -> {new:?}"
            );
        }
    }

    /// A packed listing reads back entry for entry, finds each path's value and no other
    /// path, and the guest's diff against its packed digests is the diff against the listing.
    #[test]
    fn a_packed_listing_reads_back_and_diffs_like_the_listing() {
        let mut names: Vec<String> = (0..200)
            .map(|i| format!("d{}/sub{}/f{i}.txt", i % 7, i % 3))
            .chain(["a", "a-c", "a.b", "a/b", "\u{e9}t\u{e9}"].map(String::from))
            .collect();
        names.sort();
        let old: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (RelPath::from_bytes(n.as_bytes()).unwrap(), file(i as u8)))
            .collect();
        let host = pack_entries(&old).unwrap();
        assert_eq!(host.len(), old.len());
        assert_eq!(unpack_entries(&host).unwrap(), old);
        let guest = pack_digests(&old).unwrap();
        for (path, entry) in &old {
            let want = entry_digest(entry).unwrap();
            assert_eq!(guest.get(path.as_bytes()), Some(want.as_slice()));
        }
        for absent in ["", "0", "a/", "d0", "d6/sub2/f99.txt0", "zzz"] {
            assert_eq!(guest.get(absent.as_bytes()), None, "{absent}");
        }
        let mut new = old.clone();
        new.retain(|(p, _)| !p.as_bytes().ends_with(b"5.txt"));
        new[3].1 = file(250);
        new.push((RelPath::from_bytes(b"zz/new").unwrap(), file(1)));
        assert_eq!(diff_packed(&guest, &new), diff(&old, &new));
        assert_eq!(diff_packed(&Packed::default(), &new), diff(&[], &new));
    }

    #[test]
    fn an_unchanged_listing_costs_nothing() {
        let l = listing(&[("a", 1), ("b", 2)]);
        let (changed, removed) = diff(&l, &l);
        assert!(changed.is_empty() && removed.is_empty());
    }

    #[test]
    fn a_difference_that_does_not_fit_is_refused() {
        let old = listing(&[("a", 1)]);
        let removed = vec![RelPath::from_bytes(b"zz").unwrap()];
        assert_eq!(apply(&old, Vec::new(), &removed, usize::MAX), None);
    }

    /// A peer cannot grow the listing a host keeps past one scan's bound, difference after
    /// difference: a result over `max_entries` does not fit. Changing entries of a full
    /// listing still does.
    #[test]
    fn a_difference_that_grows_the_listing_past_its_bound_is_refused() {
        let old = listing(&[("a", 1), ("b", 2), ("c", 3)]);
        let grown = listing(&[("a", 1), ("b", 2), ("c", 3), ("d", 4)]);
        let (changed, removed) = diff(&old, &grown);
        assert_eq!(apply(&old, changed, &removed, 3), None);
        let edited = listing(&[("a", 9), ("b", 9), ("c", 9)]);
        let (changed, removed) = diff(&old, &edited);
        assert_eq!(apply(&old, changed, &removed, 3), Some(edited));
    }

    #[test]
    fn random_listings_round_trip() {
        // A small deterministic generator: no extra dependency for one test.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let mut make = || {
                let n = next() % 20;
                let mut items: Vec<(String, u8)> = (0..n)
                    .map(|_| (format!("p{}", next() % 30), (next() % 3) as u8))
                    .collect();
                items.sort();
                items.dedup_by(|a, b| a.0 == b.0);
                items
            };
            let (a, b) = (make(), make());
            let old = listing(&a.iter().map(|(p, n)| (p.as_str(), *n)).collect::<Vec<_>>());
            let new = listing(&b.iter().map(|(p, n)| (p.as_str(), *n)).collect::<Vec<_>>());
            let (changed, removed) = diff(&old, &new);
            assert_eq!(apply(&old, changed, &removed, usize::MAX), Some(new));
        }
    }
}
