//! Three-way reconciliation: given the ancestor (the last state both sides agreed on), the host's
//! and the guest's current entries, decide per path what to change on which side. A pure
//! function of its inputs: no I/O, no clock.
//!
//! Rules (DESIGN.md "Sync model"):
//! - A side "changed" a path when its entry differs from the ancestor's (`Entry` equality).
//! - Only one side changed: the change propagates to the other side (mode permitting).
//! - Both changed to equal entries: agreed, no action. Both changed to the same content with
//!   different file mtimes: the newer mtime is applied to the other side, not a conflict.
//! - Both changed differently: a conflict, settled by the `ConflictPolicy`. Delete vs modify
//!   always keeps the modification. A loser that is a directory is never destroyed: such a
//!   conflict is kept whatever the policy.
//! - One-way modes make the destination match the source; a destination entry that differs from
//!   the ancestor (a local edit there) is saved to the conflict store before it is replaced.
//! - Structure: a path that will exist on a side forces its parent directories to exist there;
//!   nothing beneath a kept conflict is touched.

use crate::entry::{Entry, Snapshot};
use crate::path::RelPath;
use serde::{Deserialize, Serialize};

/// Which side of a share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Side {
    Host,
    Guest,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Host => Side::Guest,
            Side::Guest => Side::Host,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Host => "host",
            Side::Guest => "guest",
        }
    }
}

/// Direction of a share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum SyncMode {
    #[default]
    TwoWay,
    HostToGuest,
    GuestToHost,
}

/// How a two-way share settles a path both sides changed differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum ConflictPolicy {
    /// Leave both sides as they are and report the path until the user resolves it.
    #[default]
    Keep,
    HostWins,
    GuestWins,
    /// The file with the later mtime wins; on a tie, the host. Entries without an mtime
    /// (directories, symlinks) lose to files.
    NewerWins,
}

/// One change the controller must make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    pub path: RelPath,
    /// The side to change.
    pub target: Side,
    /// What the scan saw on `target` (checked again right before the change).
    pub expected: Option<Entry>,
    /// What `target` must hold afterwards; `None` deletes.
    pub new: Option<Entry>,
    /// Save `target`'s current version (`expected`) in the conflict store before replacing or
    /// deleting it: it is a conflict's losing version or a one-way destination's local edit.
    pub save_loser: bool,
}

/// A conflict left for the user (policy `keep`, or a directory that would have lost).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub path: RelPath,
    pub ancestor: Option<Entry>,
    pub host: Option<Entry>,
    pub guest: Option<Entry>,
}

/// The result of reconciling.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Plan {
    /// Changes to make, sorted by path. Once an action succeeds, the ancestor at its path
    /// becomes `new`.
    pub actions: Vec<Action>,
    /// Paths left in conflict; their ancestor entries stay as they were.
    pub conflicts: Vec<Conflict>,
    /// Paths where both sides already agree but the ancestor differs: set the ancestor to this
    /// (`None`: remove it). Sorted by path.
    pub agreed: Vec<(RelPath, Option<Entry>)>,
}

/// Reconciles every path present in any of the three snapshots.
pub fn reconcile(
    ancestor: &Snapshot,
    host: &Snapshot,
    guest: &Snapshot,
    mode: SyncMode,
    policy: ConflictPolicy,
) -> Plan {
    let _ = (ancestor, host, guest, mode, policy);
    Plan::default()
}
