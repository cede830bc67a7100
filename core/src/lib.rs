//! vmsync's pure domain. Nothing here does I/O, spawns tasks or reads a clock: every function
//! is a plain transformation, tested as such.
//!
//! Module map:
//! - [`path`]: `RelPath`, a validated path relative to a share root (the only path type that
//!   crosses module or wire boundaries).
//! - [`edits`]: manifests written as edits against an old one (copy runs, new references).
//! - [`digest`]: `Hash`, a BLAKE3 digest (chunks and whole files).
//! - [`entry`]: what a path is on one side (`Entry`), a side's view (`Snapshot`), file manifests.
//! - [`reconcile`]: the three-way merge of ancestor, host and guest into a `Plan`.
//! - [`safety`]: the checks that halt a share instead of propagating a wiped or replaced root.
//! - [`deletions`]: the mass-deletion guard: losses counted over a sliding window of time.
//! - [`rollback`]: share generations (a guest that went back in time) and the add-only merge
//!   after one.
//! - [`delta`]: chunk deltas: rsync signatures of old bytes, deltas against them, checked apply.
//! - [`endpoint`]: the `Endpoint` trait that a local and a remote side both implement.
//! - [`limits`]: every bound on sizes and counts, named with its unit.
//! - [`text`]: a peer's text made safe to print (control and bidi characters escaped).
//! - [`progress`]: how far a share's sync has come (status, the guest's readiness).
//! - [`reserve`]: the free-space reserve (`min_free`) a destination keeps on its filesystem.

pub mod bounded;
pub mod deletions;
pub mod delta;
pub mod digest;
pub mod edits;
pub mod endpoint;
pub mod entry;
pub mod limits;
pub mod path;
pub mod progress;
pub mod quota;
pub mod reconcile;
pub mod reserve;
pub mod rollback;
pub mod safety;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod text;

pub use digest::Hash;
pub use entry::{ChunkRef, Entry, FileMeta, Manifest, Snapshot, Timestamp};
pub use path::{PathError, RelPath};
