//! Byte counters of one session, shared between its tasks and readable at any time (the status
//! command shows them). Counting only; no decisions are made from these numbers.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters. Cheap to update from any task.
#[derive(Debug, Default)]
pub struct Stats {
    wire_bytes_sent: AtomicU64,
    wire_bytes_received: AtomicU64,
    content_bytes_sent: AtomicU64,
    content_bytes_received: AtomicU64,
    requests: AtomicU64,
    /// Per share (by its index in the session): what [`ShareStats`] shows.
    shares: std::sync::Mutex<Vec<ShareStats>>,
}

/// What one share of a session moved: content bytes as counted above, and the scans served
/// (one per cycle of the host's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ShareStats {
    pub content_bytes_sent: u64,
    pub content_bytes_received: u64,
    pub scans: u64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// Every byte written to the connection (headers, messages, heartbeats).
    pub wire_bytes_sent: u64,
    /// Every byte read from the connection.
    pub wire_bytes_received: u64,
    /// File content sent: the data lengths of chunks as they went on the wire (compressed
    /// where compressed).
    pub content_bytes_sent: u64,
    /// File content received, counted the same way.
    pub content_bytes_received: u64,
    /// Requests sent (client) or served (server), heartbeats excluded.
    pub requests: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            wire_bytes_sent: self.wire_bytes_sent.load(Ordering::Relaxed),
            wire_bytes_received: self.wire_bytes_received.load(Ordering::Relaxed),
            content_bytes_sent: self.content_bytes_sent.load(Ordering::Relaxed),
            content_bytes_received: self.content_bytes_received.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn add_wire_sent(&self, n: u64) {
        self.wire_bytes_sent.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn add_wire_received(&self, n: u64) {
        self.wire_bytes_received.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn add_content_sent(&self, n: u64) {
        self.content_bytes_sent.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn add_content_received(&self, n: u64) {
        self.content_bytes_received.fetch_add(n, Ordering::Relaxed);
    }

    /// Share `share`'s counters (zero for a share that moved nothing).
    pub fn share(&self, share: u16) -> ShareStats {
        self.shares
            .lock()
            .ok()
            .and_then(|s| s.get(usize::from(share)).copied())
            .unwrap_or_default()
    }

    pub(crate) fn update_share(&self, share: u16, f: impl FnOnce(&mut ShareStats)) {
        let Ok(mut shares) = self.shares.lock() else {
            return;
        };
        let index = usize::from(share);
        // Indexes come from requests the reader checked against the shares the session opened.
        if shares.len() <= index {
            shares.resize(index + 1, ShareStats::default());
        }
        if let Some(counters) = shares.get_mut(index) {
            f(counters);
        }
    }

    pub(crate) fn add_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
}

/// Sum of the on-wire data lengths of some chunk contents (whole chunks and deltas).
pub(crate) fn content_bytes<'a>(
    contents: impl IntoIterator<Item = &'a vmsync_protocol::WireContent>,
) -> u64 {
    contents
        .into_iter()
        .map(|c| u64::try_from(c.data_len()).unwrap_or(u64::MAX))
        .fold(0u64, u64::saturating_add)
}
