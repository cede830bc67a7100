//! What this side's own transitions left at each path, remembered for a short while: a watcher
//! hint for such a path that still finds exactly that is our own echo and is not passed on
//! (`LocalShare::drop_echoes` in `engine/src/local/echo.rs`).
//!
//! Rules:
//! - An echo is remembered for [`ECHO_TTL`] after it was recorded, then forgotten (swept at
//!   most every [`ECHO_SWEEP_EVERY`]). The watcher's hint for a write arrives within
//!   milliseconds; a hint that comes later than the TTL is simply passed on, and costs one
//!   rescan of that path (the index still recognises the file as ours: nothing is synced back).
//! - At most [`MAX_ECHOES`] are held; past it all are forgotten at once (a burst bigger than
//!   that costs one rescan per path).
//! - Memory follows what the last [`ECHO_TTL`] wrote, not everything since start: after a
//!   burst the table is shrunk again. An agent that syncs for weeks holds a few thousand.
//!
//! Must not: decide anything about sync. Forgetting an echo early is always safe.

use crate::index::Identity;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use vmsync_core::RelPath;

/// How long an echo is remembered.
pub const ECHO_TTL: Duration = Duration::from_secs(60);
/// Expired echoes are swept at most this often (a sweep walks the table once).
pub const ECHO_SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Most echoes held at once; past it they are all forgotten.
pub const MAX_ECHOES: usize = 65_536;

/// A 128-bit digest (BLAKE3, truncated): of a path (the table's key) or of an [`Identity`].
/// Two different ones agree with odds of 2^-128, as the guest's listing digests do.
type Digest = [u8; 16];

/// What this side's transition left at a path, as remembered: compare with [`Echo::is`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Echo(Option<Digest>);

impl Echo {
    fn of(left: Option<&Identity>) -> Echo {
        Echo(left.map(identity_digest))
    }

    /// Whether `now` (the identity at the path now; `None`: nothing there) is what was left.
    pub fn is(&self, now: Option<&Identity>) -> bool {
        *self == Echo::of(now)
    }

    /// A file or directory was left there (not a deletion).
    pub fn left_something(&self) -> bool {
        self.0.is_some()
    }
}

/// Path → what this side's transition left there (a file of this identity, or nothing), with
/// when (milliseconds after `base`). Both are kept as digests, so an echo takes 48 bytes of
/// table and no allocation of its own: an initial sync of 20,000 files leaves 40,000 (each
/// file and its temp), which as paths and identities took 7.9 MiB, as digests 3.1 MiB.
#[derive(Debug, Default)]
pub struct Echoes {
    map: HashMap<Digest, (u64, Echo)>,
    base: Option<Instant>,
    swept: Option<Instant>,
}

fn path_digest(path: &RelPath) -> Digest {
    truncated(blake3::hash(path.as_bytes()))
}

fn identity_digest(id: &Identity) -> Digest {
    let mut h = blake3::Hasher::new();
    for n in [id.dev, id.ino, id.size] {
        h.update(&n.to_le_bytes());
    }
    for t in [id.mtime, id.ctime] {
        h.update(&t.secs.to_le_bytes());
        h.update(&t.nanos.to_le_bytes());
    }
    truncated(h.finalize())
}

fn truncated(hash: blake3::Hash) -> Digest {
    let mut d = [0u8; 16];
    d.copy_from_slice(&hash.as_bytes()[..16]);
    d
}

impl Echoes {
    /// Records that this side just left `left` at `path`.
    pub fn insert(&mut self, path: RelPath, left: Option<Identity>) {
        self.insert_at(Instant::now(), path, left);
    }

    pub fn insert_at(&mut self, now: Instant, path: RelPath, left: Option<Identity>) {
        self.expire(now);
        if self.map.len() >= MAX_ECHOES {
            self.map = HashMap::new();
        }
        let at = self.millis(now);
        self.map
            .insert(path_digest(&path), (at, Echo::of(left.as_ref())));
    }

    /// What this side left at `path`, if remembered.
    pub fn get(&self, path: &RelPath) -> Option<Echo> {
        self.map.get(&path_digest(path)).map(|(_, echo)| *echo)
    }

    pub fn remove(&mut self, path: &RelPath) {
        self.map.remove(&path_digest(path));
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// `now` as milliseconds after the first time this table was used.
    fn millis(&mut self, now: Instant) -> u64 {
        let base = *self.base.get_or_insert(now);
        u64::try_from(now.saturating_duration_since(base).as_millis()).unwrap_or(u64::MAX)
    }

    /// Forgets the echoes older than [`ECHO_TTL`], at most every [`ECHO_SWEEP_EVERY`], and
    /// gives back the room a burst left behind.
    pub fn expire(&mut self, now: Instant) {
        if self
            .swept
            .is_some_and(|t| now.saturating_duration_since(t) < ECHO_SWEEP_EVERY)
        {
            return;
        }
        self.swept = Some(now);
        let ttl = u64::try_from(ECHO_TTL.as_millis()).unwrap_or(u64::MAX);
        let now = self.millis(now);
        self.map.retain(|_, (at, _)| now.saturating_sub(*at) < ttl);
        let len = self.map.len();
        if self.map.capacity() > 4 * len.max(256) {
            self.map.shrink_to(2 * len);
        }
    }

    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.map.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmsync_core::Timestamp;

    fn path(i: u64) -> RelPath {
        RelPath::from_bytes(format!("d{}/f{i}", i % 100).as_bytes()).unwrap()
    }

    fn id(i: u64) -> Option<Identity> {
        Some(Identity {
            dev: 1,
            ino: i,
            size: i,
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
        })
    }

    /// A week of steady churn at 50 writes a second, every one a new path (as renames and
    /// fresh files are): the table holds what the last minute or so wrote, not the week.
    #[test]
    fn steady_churn_holds_only_the_last_ttl_of_echoes() {
        let t0 = Instant::now();
        let per_sec = 50u64;
        let bound = ((ECHO_TTL + ECHO_SWEEP_EVERY).as_secs() * per_sec + 1) as usize;
        let mut echoes = Echoes::default();
        let mut largest = 0;
        // 2 hours, 360,000 writes: far past MAX_ECHOES, so only expiry keeps it small.
        for i in 0..2 * 3600 * per_sec {
            let now = t0 + Duration::from_millis(i * 1000 / per_sec);
            echoes.insert_at(now, path(i), id(i));
            largest = largest.max(echoes.len());
        }
        assert!(largest <= bound, "held {largest} echoes, bound {bound}");
        assert!(
            echoes.capacity() <= 8 * bound,
            "capacity {}",
            echoes.capacity()
        );
    }

    #[test]
    fn an_echo_is_found_within_its_ttl_and_forgotten_after() {
        let t0 = Instant::now();
        let mut echoes = Echoes::default();
        echoes.insert_at(t0, path(1), id(1));
        echoes.insert_at(t0, path(2), None);
        echoes.expire(t0 + ECHO_TTL - Duration::from_millis(1));
        assert!(echoes.get(&path(1)).is_some_and(|e| e.is(id(1).as_ref())));
        assert!(!echoes.get(&path(1)).is_some_and(|e| e.is(id(2).as_ref())));
        assert!(!echoes.get(&path(1)).is_some_and(|e| e.is(None)));
        assert!(echoes.get(&path(2)).is_some_and(|e| e.is(None)));
        assert!(!echoes.get(&path(2)).is_some_and(|e| e.left_something()));
        assert_eq!(echoes.get(&path(3)), None);
        echoes.expire(t0 + ECHO_TTL + ECHO_SWEEP_EVERY);
        assert_eq!(echoes.get(&path(1)), None);
        assert!(echoes.is_empty());
    }

    /// A burst larger than the cap is forgotten at once, and once it has expired the table
    /// gives its room back.
    #[test]
    fn a_burst_is_capped_and_its_room_given_back() {
        let t0 = Instant::now();
        let mut echoes = Echoes::default();
        for i in 0..(MAX_ECHOES as u64 + 10) {
            echoes.insert_at(t0, path(i), None);
            assert!(echoes.len() <= MAX_ECHOES);
        }
        assert_eq!(echoes.len(), 10);
        for i in 0..40_000 {
            echoes.insert_at(t0, path(i), None);
        }
        assert!(echoes.capacity() >= 40_000);
        let later = t0 + ECHO_TTL + ECHO_SWEEP_EVERY;
        echoes.insert_at(later, path(7), id(7));
        assert_eq!(echoes.len(), 1);
        assert!(
            echoes.capacity() <= 4 * 256,
            "capacity {}",
            echoes.capacity()
        );
        assert!(echoes.get(&path(7)).is_some_and(|e| e.is(id(7).as_ref())));
    }
}
