//! Scan listings as differences. A full scan of a large share lists every entry; sent whole on
//! every cycle it would cost megabytes even when nothing changed. Within one session both ends
//! remember the last full listing they exchanged for each share (tagged with a token), and the
//! next one travels as what changed against it. These are the two pure halves: `diff` on the
//! guest, `apply` on the host. A token mismatch simply means a full listing is sent.

use vmsync_core::{Entry, RelPath};

/// Entries that are new or different in `new`, and paths of `old` that are gone from `new`.
/// Both inputs must be sorted by path (scan reports are); so are both outputs.
pub fn diff(
    old: &[(RelPath, Entry)],
    new: &[(RelPath, Entry)],
) -> (Vec<(RelPath, Entry)>, Vec<RelPath>) {
    let (mut changed, mut removed) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    loop {
        match (old.get(i), new.get(j)) {
            (None, None) => break,
            (Some((p, _)), None) => {
                removed.push(p.clone());
                i += 1;
            }
            (None, Some(n)) => {
                changed.push(n.clone());
                j += 1;
            }
            (Some((op, oe)), Some((np, ne))) => match op.cmp(np) {
                std::cmp::Ordering::Less => {
                    removed.push(op.clone());
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    changed.push((np.clone(), ne.clone()));
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    if oe != ne {
                        changed.push((np.clone(), ne.clone()));
                    }
                    i += 1;
                    j += 1;
                }
            },
        }
    }
    (changed, removed)
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
