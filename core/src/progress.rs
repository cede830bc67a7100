//! How far a share's sync has come: what `status` shows while a cycle applies changes, what
//! the host tells its guest (so that `vmsync-guest` can say `READY=1` to systemd only once the
//! tree is complete, see docs/cli.md, "Readiness"), and the one-line form both agents print.

use crate::reserve::ShowBytes;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The changes a running cycle applies: files (every created, changed or removed entry) and
/// the bytes of new content among them, done of planned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

impl fmt::Display for Progress {
    /// `1,234/20,000 files, 40 MiB/1.5 GiB`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} files, {}/{}",
            Count(self.files_done),
            Count(self.files_total),
            ShowBytes(self.bytes_done),
            ShowBytes(self.bytes_total)
        )
    }
}

/// A share's state as the host tells its guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncState {
    /// A cycle has work to do, or the first full cycle of this connection has not converged.
    Syncing(Option<Progress>),
    /// The last cycle converged: both trees agree (this connection's first full cycle
    /// included).
    InSync,
    /// Converged except for paths in conflict, which wait for the user.
    Conflicted { conflicts: u64 },
    /// Halted or paused (`mass-deletion`, `disk-full`, ...): nothing syncs until it lifts.
    Halted { code: String },
}

impl SyncState {
    /// Whether the tree is as complete as sync can make it (what readiness waits for).
    pub fn converged(&self) -> bool {
        matches!(self, SyncState::InSync | SyncState::Conflicted { .. })
    }
}

impl fmt::Display for SyncState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyncState::Syncing(None) => write!(f, "syncing"),
            SyncState::Syncing(Some(p)) => write!(f, "syncing {p}"),
            SyncState::InSync => write!(f, "in sync"),
            SyncState::Conflicted { conflicts } => {
                write!(f, "in sync but for {} in conflict", Count(*conflicts))
            }
            SyncState::Halted { code } => write!(f, "halted ({code}) on the host"),
        }
    }
}

/// A count with thousands separators: `20,000`.
#[derive(Debug, Clone, Copy)]
pub struct Count(pub u64);

impl fmt::Display for Count {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.0.to_string();
        // Groups of three from the right; the first group takes what is left over.
        let first = match digits.len() % 3 {
            0 => 3,
            n => n,
        };
        let (head, rest) = digits.split_at(first.min(digits.len()));
        f.write_str(head)?;
        for group in rest.as_bytes().chunks(3) {
            f.write_str(",")?;
            f.write_str(std::str::from_utf8(group).unwrap_or_default())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_progress_read_as_people_write_them() {
        let cases = [(0, "0"), (999, "999"), (1000, "1,000"), (20_000, "20,000")];
        for (n, want) in cases {
            assert_eq!(Count(n).to_string(), want);
        }
        assert_eq!(Count(u64::MAX).to_string(), "18,446,744,073,709,551,615");
        let p = Progress {
            files_done: 1234,
            files_total: 20_000,
            bytes_done: 40 << 20,
            bytes_total: 3 << 29,
        };
        assert_eq!(p.to_string(), "1,234/20,000 files, 40 MiB/1.5 GiB");
        assert_eq!(
            SyncState::Syncing(Some(p)).to_string(),
            "syncing 1,234/20,000 files, 40 MiB/1.5 GiB"
        );
        assert!(SyncState::Conflicted { conflicts: 2 }.converged());
        assert!(!SyncState::Halted {
            code: "mass-deletion".into()
        }
        .converged());
        assert!(!SyncState::Syncing(None).converged());
    }
}
