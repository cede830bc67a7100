//! What `status` shows for a share: its state, why it halted, its conflicts and problems, and
//! its counters. Shared between the controller (which updates it) and the control socket
//! (which serialises it as JSON or a table). Peer-derived strings are stored escaped.

use serde::{Deserialize, Serialize};
use std::time::Duration;
use vmsync_core::progress::Progress;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ShareState {
    #[default]
    Connecting,
    Scanning,
    Syncing,
    InSync,
    Conflicted,
    Halted,
}

impl ShareState {
    pub fn as_str(self) -> &'static str {
        match self {
            ShareState::Connecting => "connecting",
            ShareState::Scanning => "scanning",
            ShareState::Syncing => "syncing",
            ShareState::InSync => "in-sync",
            ShareState::Conflicted => "conflicted",
            ShareState::Halted => "halted",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProblemView {
    /// Escaped share-relative path.
    pub path: String,
    /// `host` or `guest`.
    pub side: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareStatus {
    pub name: String,
    pub state: ShareState,
    /// Machine-readable halt code (`root-missing`, `root-replaced`, `root-emptied`,
    /// `mass-deletion`, or `disk-full` and `quota`, pauses that lift themselves) and the
    /// message, when halted.
    pub halt_code: Option<String>,
    pub halt_reason: Option<String>,
    /// Entries the last halt put back on the side that lost them (from its trash).
    pub put_back: u64,
    /// Something this agent did on its own that the user should know about (a damaged state
    /// database set aside, a lost root marker), and what it means for the next cycle.
    pub notice: Option<String>,
    /// Escaped paths in conflict (policy `keep`).
    pub conflicts: Vec<String>,
    pub problems: Vec<ProblemView>,
    /// Regular files and their total bytes that both sides agree on after the last cycle
    /// (on the guest: what its index holds).
    pub files: u64,
    pub bytes: u64,
    /// Chunk payload bytes sent to / received from the other side, as they crossed the wire
    /// (compressed size), since the agent started.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Chunks found locally on the receiving side instead of transferred.
    pub chunks_reused: u64,
    /// Files this agent read and hashed since it started (unchanged files are not re-read).
    pub files_hashed: u64,
    /// Whether this agent's side of the share is watched live (inotify), how many
    /// directories that watch covers (the kernel's count of its watches, `.vmsync/` and
    /// ignored directories included), and why not if it is not.
    pub watching: bool,
    pub watched_dirs: u64,
    pub watch_problem: Option<String>,
    /// While paused with `disk-full`: the bytes free (after the refused write) and the reserve
    /// of the filesystem that is short.
    #[serde(default)]
    pub disk_free: Option<u64>,
    #[serde(default)]
    pub disk_reserve: Option<u64>,
    /// Completed cycles since the agent started (on the guest: the host's cycles it served,
    /// one scan each).
    pub cycles: u64,
    /// What this side's trash (`.vmsync/trash/` in the share) holds: files and symlinks kept
    /// because a change replaced or deleted them, and their bytes.
    pub trash_files: u64,
    pub trash_bytes: u64,
    /// How long this side's completed cycles took (the host's; the guest runs none): full
    /// cycles (the whole share) and live ones (the paths hints named) apart.
    #[serde(default, skip_serializing_if = "CycleHistogram::is_empty")]
    pub full_cycle_durations: CycleHistogram,
    #[serde(default, skip_serializing_if = "CycleHistogram::is_empty")]
    pub live_cycle_durations: CycleHistogram,
    /// Why the last cycle failed, until one succeeds (escaped; the host's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// While a cycle applies changes (the host's): how far it has come.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

/// Upper bounds (inclusive) of [`CycleHistogram`]'s buckets, in microseconds; durations past
/// the last one are counted in [`CycleHistogram::count`] only.
pub const CYCLE_BUCKETS_MICROS: [u64; 10] = [
    1_000, 2_000, 5_000, 10_000, 50_000, 100_000, 500_000, 1_000_000, 5_000_000, 30_000_000,
];

/// Cycle durations counted into fixed buckets ([`CYCLE_BUCKETS_MICROS`]): constant size,
/// however many cycles run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CycleHistogram {
    /// Cycles per bucket, not cumulative: `buckets[i]` counts the durations above
    /// `CYCLE_BUCKETS_MICROS[i - 1]` and at most `CYCLE_BUCKETS_MICROS[i]`.
    pub buckets: [u64; CYCLE_BUCKETS_MICROS.len()],
    /// Every cycle recorded, those past the last bound included.
    pub count: u64,
    /// Their total duration, in microseconds.
    pub sum_micros: u64,
}

impl CycleHistogram {
    pub fn record(&mut self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        if let Some(i) = CYCLE_BUCKETS_MICROS.iter().position(|&b| micros <= b) {
            if let Some(bucket) = self.buckets.get_mut(i) {
                *bucket += 1;
            }
        }
        self.count += 1;
        self.sum_micros = self.sum_micros.saturating_add(micros);
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_each_duration_in_its_bucket_bounds_included() {
        let mut h = CycleHistogram::default();
        for micros in [0, 1_000, 1_001, 30_000_000, 30_000_001, 400_000_000] {
            h.record(Duration::from_micros(micros));
        }
        assert_eq!(h.buckets, [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(h.count, 6);
        assert_eq!(h.sum_micros, 460_002_002);
        assert!(!h.is_empty() && CycleHistogram::default().is_empty());
    }
}
