//! Paces live cycles per path: a file that keeps changing (a log appended many times a
//! second) is synced at a bounded rate instead of once per write, and its final version
//! always lands. Pure: the caller passes `now`.
//!
//! The rule (a token bucket per path): a path may be cycled [`PATH_BURST`] times in a row, then
//! at most once per [`PATH_CYCLE_INTERVAL`] (10 a second). A hint for a path over its rate is
//! held, not dropped, and handed back once the path may be cycled again
//! ([`Pacer::next_due`] says when): the last change of a burst is always synced, at most one
//! interval late. A full rescan is never held, nor a directory: its hint may stand for new
//! files beneath it (the watcher coalesces), and its own time moves with every file written
//! into it. A path first seen, or quiet for a while, passes at once: a single edit costs no
//! latency.
//!
//! What it must not do: grow without bound. Only paths cycled in the last
//! `PATH_BURST × PATH_CYCLE_INTERVAL` are remembered, and past [`MAX_HELD_PATHS`] held paths
//! everything held is released (pacing off rather than memory up).
//!
//! Full rescans a side asks for are paced apart ([`RescanLimit`]): the host applies
//! [`GUEST_RESCANS`] to the guest's hints, so a guest that asks for a rescan on every poll
//! costs the host one full scan every few seconds, not scans back to back.

use crate::watch::HintSet;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use vmsync_core::RelPath;

/// The least time between two cycles of one path, once its burst is spent.
pub const PATH_CYCLE_INTERVAL: Duration = Duration::from_millis(100);
/// Cycles of one path allowed back to back before pacing starts (a file's create and its
/// close usually come as two hints).
pub const PATH_BURST: u32 = 3;
/// Most paths held at once.
pub const MAX_HELD_PATHS: usize = 4096;

/// How often one side's hints may ask for a full rescan: `burst` at once, then one per
/// `every` (a token bucket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RescanLimit {
    pub burst: u32,
    pub every: Duration,
}

/// The limit on rescans the guest's hints cause on the host. A guest asks for one after an
/// inotify queue overflow or past its watch limit (every 10 s at most then), so these never
/// hold back an honest guest; one that asks on every poll gets a full cycle every 5 s.
pub const GUEST_RESCANS: RescanLimit = RescanLimit {
    burst: 3,
    every: Duration::from_secs(5),
};

/// The state of a [`RescanLimit`]: when the next rescan may go.
#[derive(Debug, Clone)]
pub struct RescanBudget {
    limit: RescanLimit,
    /// The theoretical arrival time (GCRA): a rescan may go while this is at most
    /// `burst - 1` intervals ahead of now.
    tat: Instant,
}

impl RescanBudget {
    pub fn new(limit: RescanLimit, now: Instant) -> RescanBudget {
        RescanBudget { limit, tat: now }
    }

    /// When the next rescan may go: `None` for now.
    pub fn wait_until(&self, now: Instant) -> Option<Instant> {
        let ahead = self.limit.every * self.limit.burst.saturating_sub(1);
        let at = self.tat.checked_sub(ahead)?;
        (at > now).then_some(at)
    }

    /// A rescan went at `now`.
    pub fn take(&mut self, now: Instant) {
        self.tat = self.tat.max(now) + self.limit.every;
    }
}

#[derive(Debug, Default)]
pub struct Pacer {
    /// Path → its theoretical arrival time (GCRA): the path is over its rate while this is
    /// more than `PATH_BURST` intervals ahead of now.
    tat: HashMap<RelPath, Instant>,
    /// Held paths → when they may be cycled.
    held: BTreeMap<RelPath, Instant>,
}

impl Pacer {
    /// Takes out of `hints` the paths over their rate (held until due), puts back the held
    /// paths now due, and charges every path left in `hints` for one cycle.
    /// `is_dir` tells the directories apart (never held).
    pub fn admit(&mut self, hints: &mut HintSet, now: Instant, is_dir: impl Fn(&RelPath) -> bool) {
        self.tat.retain(|_, tat| *tat > now);
        if self.held.len() > MAX_HELD_PATHS {
            for (path, _) in std::mem::take(&mut self.held) {
                hints.add(path);
            }
        }
        let due: Vec<RelPath> = self
            .held
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(p, _)| p.clone())
            .collect();
        for path in due {
            self.held.remove(&path);
            hints.add(path);
        }
        if hints.is_rescan() {
            return;
        }
        let span = PATH_CYCLE_INTERVAL * PATH_BURST;
        let (tat, held) = (&mut self.tat, &mut self.held);
        hints.retain_paths(|path| {
            if is_dir(path) {
                return true;
            }
            if held.contains_key(path) {
                return false;
            }
            let next = tat.get(path).map_or(now, |t| (*t).max(now)) + PATH_CYCLE_INTERVAL;
            if next.saturating_duration_since(now) <= span {
                tat.insert(path.clone(), next);
                true
            } else {
                held.insert(path.clone(), next - span);
                false
            }
        });
    }

    /// When the first held path may be cycled (`None`: nothing held).
    pub fn next_due(&self) -> Option<Instant> {
        self.held.values().min().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes()).unwrap()
    }

    fn paths(h: &HintSet) -> Vec<String> {
        h.clone()
            .take()
            .paths
            .iter()
            .map(|p| String::from_utf8_lossy(p.as_bytes()).into_owned())
            .collect()
    }

    /// One hint for `path` every `every` over `total`, a cycle whenever the pacer lets one
    /// through (and at every due time): how many cycles, and whether the last write was
    /// followed by a cycle.
    fn simulate(every: Duration, total: Duration) -> (u32, bool) {
        let start = Instant::now();
        let mut pacer = Pacer::default();
        let mut cycles = 0;
        let mut last_write = start;
        let mut last_cycle = None;
        let mut t = start;
        let end = start + total;
        let mut next_write = start;
        loop {
            let mut hints = HintSet::default();
            if t == next_write && t <= end {
                hints.add(p("app.log"));
                last_write = t;
                next_write = t + every;
            }
            pacer.admit(&mut hints, t, |_| false);
            if !hints.is_empty() {
                cycles += 1;
                last_cycle = Some(t);
            }
            let due = pacer.next_due();
            t = match (due, next_write <= end) {
                (Some(d), true) => d.min(next_write),
                (Some(d), false) => d,
                (None, true) => next_write,
                (None, false) => break,
            };
        }
        (cycles, last_cycle.is_some_and(|c| c >= last_write))
    }

    #[test]
    fn a_path_written_190_times_a_second_is_cycled_about_10_times_a_second_and_lands_last() {
        let (cycles, landed) = simulate(Duration::from_micros(5263), Duration::from_secs(20));
        assert!((200..=205).contains(&cycles), "{cycles} cycles in 20 s");
        assert!(landed, "the last write was followed by a cycle");
    }

    #[test]
    fn rescans_go_in_a_burst_then_one_per_interval() {
        let t0 = Instant::now();
        let limit = RescanLimit {
            burst: 3,
            every: Duration::from_secs(5),
        };
        let mut budget = RescanBudget::new(limit, t0);
        // A side asking as fast as it is let through, for a minute.
        let (mut now, mut went) = (t0, Vec::new());
        while now < t0 + Duration::from_secs(60) {
            if let Some(at) = budget.wait_until(now) {
                assert!(at > now);
                now = at;
                continue;
            }
            budget.take(now);
            went.push(now.duration_since(t0).as_secs());
        }
        assert_eq!(went, [0, 0, 0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55]);
        // Quiet for a while: the burst is back.
        let later = now + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(budget.wait_until(later), None);
            budget.take(later);
        }
        assert_eq!(
            budget.wait_until(later),
            Some(later + Duration::from_secs(5))
        );
    }

    #[test]
    fn a_path_written_rarely_is_never_held() {
        let (cycles, landed) = simulate(Duration::from_millis(150), Duration::from_secs(3));
        assert_eq!(cycles, 21);
        assert!(landed);
    }

    #[test]
    fn a_burst_passes_then_the_path_is_held_until_due_and_others_are_not() {
        let t0 = Instant::now();
        let mut pacer = Pacer::default();
        for i in 0..PATH_BURST {
            let mut h = HintSet::default();
            h.add(p("a"));
            pacer.admit(&mut h, t0, |_| false);
            assert_eq!(paths(&h), ["a"], "burst cycle {i}");
        }
        let mut h = HintSet::default();
        h.add(p("a"));
        h.add(p("b"));
        pacer.admit(&mut h, t0, |_| false);
        assert_eq!(paths(&h), ["b"], "a is held, b passes");
        let due = pacer.next_due().unwrap();
        assert_eq!(due, t0 + PATH_CYCLE_INTERVAL);
        let mut h = HintSet::default();
        pacer.admit(&mut h, due - Duration::from_millis(1), |_| false);
        assert!(h.is_empty(), "not due yet");
        pacer.admit(&mut h, due, |_| false);
        assert_eq!(paths(&h), ["a"], "released when due");
        assert_eq!(pacer.next_due(), None);
    }

    #[test]
    fn a_directory_is_never_held() {
        let t0 = Instant::now();
        let mut pacer = Pacer::default();
        for i in 0..10 {
            let mut h = HintSet::default();
            h.add(p("out"));
            pacer.admit(&mut h, t0, |path| *path == p("out"));
            assert_eq!(paths(&h), ["out"], "cycle {i}");
        }
        assert_eq!(pacer.next_due(), None);
    }

    #[test]
    fn a_rescan_is_never_held() {
        let t0 = Instant::now();
        let mut pacer = Pacer::default();
        for _ in 0..10 {
            let mut h = HintSet::default();
            h.add_rescan();
            pacer.admit(&mut h, t0, |_| false);
            assert!(h.is_rescan());
        }
    }
}
