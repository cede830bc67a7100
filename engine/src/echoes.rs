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

/// Path → what this side's transition left there (a file of this identity, or `None`:
/// nothing), with when.
#[derive(Debug, Default)]
pub struct Echoes {
    map: HashMap<RelPath, (Instant, Option<Identity>)>,
    swept: Option<Instant>,
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
        self.map.insert(path, (now, left));
    }

    /// What this side left at `path`, if remembered.
    pub fn get(&self, path: &RelPath) -> Option<&Option<Identity>> {
        self.map.get(path).map(|(_, left)| left)
    }

    pub fn remove(&mut self, path: &RelPath) {
        self.map.remove(path);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
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
        self.map
            .retain(|_, (at, _)| now.saturating_duration_since(*at) < ECHO_TTL);
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
        assert_eq!(echoes.get(&path(1)), Some(&id(1)));
        assert_eq!(echoes.get(&path(2)), Some(&None));
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
        assert_eq!(echoes.get(&path(7)), Some(&id(7)));
    }
}
