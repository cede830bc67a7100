//! One machine's side of a vmsync share.
//!
//! Module map:
//! - [`root`]: the only door to share content: a root directory fd and `*at` syscalls; path
//!   resolution alone in `root/resolve.rs`, beside temp files, directory fsyncs, the trash and
//!   the marker files.
//! - [`chunk`]: FastCDC cut points and BLAKE3 chunk ids.
//! - [`filter`]: ignore rules (gitignore syntax) applied to relative paths.
//! - [`gitignore`]: the tree's own `.gitignore` and `.ignore` files, for `respect_gitignore`.
//! - [`index`]: the in-memory file index: cached digests and where each chunk is found locally.
//! - [`state`]: the redb database: per-share file index, and on the host the ancestor and halts.
//! - [`scan`]: walks (part of) a share into entries, re-hashing only what changed.
//! - [`local`]: the local `Endpoint`: scan, serve chunks, stage and apply changes; one file a
//!   job under `local/` (the watch loop, source reads, staging, transitions, echo suppression).
//! - [`reuse`]: how a staged file reuses the old version at its path (append in place, clone,
//!   holes for zero runs).
//! - [`echoes`]: what this side's own transitions just wrote, so their watch events are
//!   not synced back; remembered for a minute.
//! - [`faults`]: how a failed write, fsync, mkdir or rename reads in `status`; test-only
//!   fault injection (cargo feature `faults`).
//! - [`space`]: free space against a share's reserve (`min_free`).
//! - [`seal`]: fsyncs complete staged files in the background, ahead of their transition.
//! - [`status`]: what `status` reports per share.
//! - [`trash`]: what replaced and deleted files become: batches in `.vmsync/trash/`, their
//!   retention, listing and restore.
//! - [`watch`]: inotify events → coalesced change hints.
//! - [`pace`]: bounds how often one path is cycled live (a log written many times a second).
//! - [`planner`]: a cycle's decisions as pure functions: views, plan, verdicts.
//! - [`controller`]: runs a sync cycle between two `Endpoint`s.
//! - [`schedule`]: when cycles run: the live loop of hints, pacing, bulk steps, retries and
//!   commands, generic over the endpoints and the connection.
//! - [`log_limit`]: at most one log line per cause a minute (a guest can make every cycle fail).
//! - [`sibling`]: `resolve --keep both` keeps the host's version under a sibling name.

pub mod chunk;
pub mod controller;
pub mod echoes;
pub mod faults;
pub mod filter;
pub mod gitignore;
pub mod index;
pub mod links;
pub mod local;
pub mod log_limit;
pub mod pace;
pub mod planner;
pub mod reuse;
pub mod root;
pub mod scan;
pub mod schedule;
pub mod seal;
pub mod sibling;
pub mod space;
pub mod state;
pub mod status;
pub mod trash;
pub mod watch;
