//! What the two agents (`vmsync-host`, `vmsync-guest`) share, so neither carries a copy.
//!
//! - [`cli_docs`]: the `completions` command and the man pages, from each agent's clap
//!   definitions.
//! - [`config`]: problem collection and `FILE:LINE:COLUMN` reports, share-name and path checks.
//! - [`control`]: the control socket protocol (`status`, `sync`, `resume`, ...) and its client.
//! - [`notify_systemd`]: `READY=1` and `STATUS=` to systemd for `Type=notify` units.
//! - [`process`]: logging setup, the open-file limit, the async runtime, waiting for
//!   SIGTERM/SIGINT.
//! - [`trash_cli`]: the `trash` and `restore` commands, on this side's share directory.

pub mod cli_docs;
pub mod config;
pub mod control;
pub mod notify_systemd;
pub mod process;
pub mod trash_cli;
