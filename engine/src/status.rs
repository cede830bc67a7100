//! What `status` shows for a share: its state, why it halted, its conflicts and problems, and
//! its counters. Shared between the controller (which updates it) and the control socket
//! (which serialises it as JSON or a table). Peer-derived strings are stored escaped.

use serde::{Deserialize, Serialize};

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
}
