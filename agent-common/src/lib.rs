//! What the two agents (`vmsync-host`, `vmsync-guest`) share, so neither carries a copy.
//!
//! - [`config`]: problem collection and `FILE:LINE:COLUMN` reports, share-name and path checks.
//! - [`process`]: logging setup, the async runtime, waiting for SIGTERM/SIGINT.

pub mod config;
pub mod process;
