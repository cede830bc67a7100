//! `vmsync-host`: the host controller for one VM. Wiring only: the CLI, the configuration, the
//! reconnect loop and the control socket; every sync decision lives in `vmsync-engine`.
//!
//! Module map:
//! - `config`: the TOML file → a validated `HostConfig`.
//! - `service`: `run`: dial the guest, reconnect with backoff, drive cycles, serve control.
//! - `report`: `status`, `metrics`, `wait`, `sync`, `resume`, `resolve` as clients of the
//!   control socket.
//! - `metrics`: the status as Prometheus text (`metrics`, and `run`'s `metrics_file`).
//! - `oneshot`: `sync --guest ENDPOINT --share NAME DIR`: one share synced once, no agent.

mod config;
mod metrics;
mod oneshot;
mod progress;
mod report;
mod service;

use clap::{CommandFactory, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use vmsync_agent_common::control::Keep;

/// Keep a directory identical between this host and a VM guest, live, over virtio-vsock.
#[derive(Parser, Debug)]
#[command(name = "vmsync-host", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller: dial the guest (reconnecting with backoff whenever the connection
    /// drops or the guest is not up yet) and sync every share after each (re)connect.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file without running. Exits 2 and prints what and where on error.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show each share's state, conflicts, problems and counters.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// Machine-readable JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the agent's state as Prometheus text exposition (format 0.0.4): per share
    /// counters, state, halts and cycle durations; the connection to the guest.
    Metrics {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Sync now: have the running agent run a full cycle (--config), or sync one share once,
    /// without an agent (--guest, --share).
    ///
    /// `sync --config F` has the running agent run a full cycle of every share and returns
    /// when it is done: exit 1 when it is not connected to the guest, 3 when a share is
    /// conflicted or halted.
    ///
    /// `sync --guest ENDPOINT --share NAME DIR` needs no configuration file and no running
    /// agent: it connects to the guest itself and runs full cycles of that one share, with
    /// every safety of `run`, until it converges, then prints what moved. Its state is kept
    /// per guest and share (--state-dir), so the next run is incremental. Exit 0 in sync, 3
    /// conflicted or halted (with what to do), 1 on a failure.
    #[command(
        group(clap::ArgGroup::new("form").required(true).args(["config", "guest"])),
        override_usage = "vmsync-host sync --config <CONFIG>\n       \
                          vmsync-host sync --guest <ENDPOINT> --share <NAME> <DIR> [--mode <MODE>] \
                          [--conflict <CONFLICT>] [--state-dir <DIR>] [--resume] [--json]"
    )]
    Sync {
        /// Configuration form: the running agent's configuration.
        #[arg(long, short, conflicts_with = "oneshot")]
        config: Option<PathBuf>,
        #[command(flatten)]
        oneshot: oneshot::OneShotArgs,
    },
    /// Block until every share is in sync. Exit 0 when it is, 1 on timeout, 3 when a share is
    /// conflicted or halted.
    Wait {
        #[arg(long, short)]
        config: PathBuf,
        /// Give up after this many seconds (default: wait forever).
        #[arg(long)]
        timeout: Option<f64>,
        /// Show how far each share's running cycle has come: a progress bar per share on a
        /// terminal (files and bytes done of total, rate, ETA), a line every few seconds
        /// otherwise.
        #[arg(long)]
        progress: bool,
    },
    /// Lift a share's safety halt. A replaced or emptied root is accepted and both sides are
    /// merged add-only (nothing is deleted); a halted mass deletion is allowed to proceed once.
    Resume {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        share: String,
    },
    /// Settle a conflict: keep the host's version, the guest's, or both (the guest's at PATH,
    /// the host's under a sibling name NAME.host-conflict-TIME.EXT). A replaced version goes
    /// to its side's trash. PATH as `status` shows it. Exit 0 when the conflict is gone, 3 when
    /// the share is still conflicted or halted, 1 when it cannot be done.
    Resolve {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        share: String,
        /// The path in conflict, relative to the share root, as `status` shows it.
        path: String,
        #[arg(long, value_parser = ["host", "guest", "both"])]
        keep: String,
    },
    /// List what the share's trash keeps (files and symlinks that changes replaced or deleted):
    /// when, original path, kind, size; totals. Reads the share directory directly.
    Trash {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        share: String,
        #[arg(long)]
        json: bool,
    },
    /// Put back the newest kept version of each PATH (and everything beneath it; none: all),
    /// never over a file newer than the kept version. Exit 0 when all went back, 3 when
    /// something was skipped (listed with why), 1 on error, 2 on a bad configuration.
    Restore {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        share: String,
        /// Only versions trashed at or after this time: RFC 3339 UTC
        /// (2026-12-06T08:16:44Z) or an age (10m, 2h, 1d).
        #[arg(long)]
        since: Option<String>,
        /// Only say what would be done.
        #[arg(long)]
        dry_run: bool,
        /// Share-relative paths, or absolute paths inside the share.
        paths: Vec<String>,
    },
    /// Print the completion script for SHELL (bash, zsh or fish) on stdout.
    ///
    /// The packages install them; by hand, e.g. `vmsync-host completions bash >
    /// ~/.local/share/bash-completion/completions/vmsync-host`.
    Completions {
        #[arg(value_enum)]
        shell: vmsync_agent_common::cli_docs::Shell,
    },
}

fn main() -> ExitCode {
    // Also takes the hidden `generate-man DIR` (agent-common's cli_docs).
    let cli = match vmsync_agent_common::cli_docs::parse::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let config_path = match &cli.command {
        Command::Completions { shell } => {
            return vmsync_agent_common::cli_docs::completions(Cli::command(), *shell)
        }
        // The one-shot form needs no configuration (clap makes it `--config` or `--guest`).
        Command::Sync {
            config: None,
            oneshot,
        } => return oneshot::main(oneshot.clone()),
        Command::Run { config }
        | Command::Check { config }
        | Command::Status { config, .. }
        | Command::Metrics { config }
        | Command::Sync {
            config: Some(config),
            ..
        }
        | Command::Wait { config, .. }
        | Command::Resume { config, .. }
        | Command::Resolve { config, .. }
        | Command::Trash { config, .. }
        | Command::Restore { config, .. } => config.clone(),
    };
    let config = match config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    vmsync_agent_common::process::tune_malloc();
    let runtime = match vmsync_agent_common::process::runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmsync-host: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        // Answered above, before any configuration is read.
        Command::Completions { .. } => ExitCode::SUCCESS,
        Command::Trash { share, json, .. } => {
            match config.shares.iter().find(|s| s.name == share) {
                Some(s) => vmsync_agent_common::trash_cli::list(&s.name, &s.path, json),
                None => {
                    eprintln!("no share named {share:?} in {}", config_path.display());
                    ExitCode::from(2)
                }
            }
        }
        Command::Restore {
            share,
            since,
            dry_run,
            paths,
            ..
        } => match config.shares.iter().find(|s| s.name == share) {
            Some(s) => vmsync_agent_common::trash_cli::restore(
                &s.name,
                &s.path,
                since.as_deref(),
                dry_run,
                &paths,
            ),
            None => {
                eprintln!("no share named {share:?} in {}", config_path.display());
                ExitCode::from(2)
            }
        },
        Command::Check { .. } => {
            println!(
                "{}: ok ({} share(s))",
                config_path.display(),
                config.shares.len()
            );
            // The directories as resolved (symlinks followed once, here): what is synced.
            for share in &config.shares {
                println!("share {}: {}", share.name, share.path.display());
            }
            ExitCode::SUCCESS
        }
        Command::Run { .. } => {
            vmsync_agent_common::process::init_logging();
            let fd_limit = vmsync_agent_common::process::raise_fd_limit();
            let max_staged = vmsync_agent_common::process::max_staged_files(fd_limit);
            match runtime.block_on(service::run(config, max_staged)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("vmsync-host: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status { json, .. } => {
            runtime.block_on(report::status(&config.control, &config.file, json))
        }
        Command::Metrics { .. } => runtime.block_on(report::metrics(&config.control, &config.file)),
        Command::Sync { .. } => runtime.block_on(report::sync(&config.control, &config.file)),
        Command::Wait {
            timeout, progress, ..
        } => runtime.block_on(report::wait(&config.control, timeout, progress)),
        Command::Resolve {
            share, path, keep, ..
        } => {
            let keep = match keep.as_str() {
                "host" => Keep::Host,
                "guest" => Keep::Guest,
                _ => Keep::Both,
            };
            runtime.block_on(report::resolve(
                &config.control,
                &config.file,
                share,
                path,
                keep,
            ))
        }
        Command::Resume { share, .. } => {
            runtime.block_on(report::resume(&config.control, &config.file, &share))
        }
    }
}
