//! `vmsync-guest`: the guest agent. A thin endpoint: it listens for its host, exports the
//! shares its own config names (and nothing else), and scans, serves chunks and applies changes
//! when the host asks. Every decision is the host's.
//!
//! Module map:
//! - `config`: the TOML file → a validated `GuestConfig`.
//! - `service`: `run`: listen, serve one host session at a time, answer the control socket.

mod config;
mod readiness;
mod service;

use clap::{CommandFactory, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use vmsync_agent_common::control::{self, ControlRequest, ControlResponse};

/// The guest side of vmsync: serves this VM's shares to the host controller over virtio-vsock.
#[derive(Parser, Debug)]
#[command(name = "vmsync-guest", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Listen for the host and serve the configured shares. A new host connection replaces the
    /// previous one (the host reconnected after a restart or a network blip).
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file without running. Exits 2 and prints what and where on error.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show the agent's connection and each share's counters. Conflicts and halts are decided
    /// and shown by the host (`vmsync-host status`).
    Status {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
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
    /// The packages install them; by hand, e.g. `vmsync-guest completions bash >
    /// ~/.local/share/bash-completion/completions/vmsync-guest`.
    Completions {
        #[arg(value_enum)]
        shell: vmsync_agent_common::cli_docs::Shell,
    },
}

/// How long `status` waits for the agent.
const CONTROL_TIMEOUT_MS: u64 = 10_000;

fn main() -> ExitCode {
    // Also takes the hidden `generate-man DIR` (agent-common's cli_docs).
    let cli = match vmsync_agent_common::cli_docs::parse::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let path = match &cli.command {
        Command::Completions { shell } => {
            return vmsync_agent_common::cli_docs::completions(Cli::command(), *shell)
        }
        Command::Run { config }
        | Command::Check { config }
        | Command::Status { config, .. }
        | Command::Trash { config, .. }
        | Command::Restore { config, .. } => config.clone(),
    };
    let config = match config::load(&path) {
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
            eprintln!("vmsync-guest: cannot start the async runtime: {e}");
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
                    eprintln!("no share named {share:?} in {}", path.display());
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
                eprintln!("no share named {share:?} in {}", path.display());
                ExitCode::from(2)
            }
        },
        Command::Check { .. } => {
            println!("{}: ok ({} share(s))", path.display(), config.shares.len());
            // The directories as resolved (symlinks followed once, here): what is exported.
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
                    eprintln!("vmsync-guest: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status { json, .. } => {
            let timeout = Duration::from_millis(CONTROL_TIMEOUT_MS);
            match runtime.block_on(control::request(
                &config.control,
                &ControlRequest::Status,
                timeout,
            )) {
                Ok(r @ ControlResponse::Status { .. }) => {
                    let text = if json {
                        format!("{}\n", control::render_json(&r))
                    } else {
                        control::render_text(&r, None)
                    };
                    // A closed pipe (`status | head`) is not an error worth a panic.
                    let _ =
                        std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
                    ExitCode::SUCCESS
                }
                Ok(ControlResponse::Error { message }) => {
                    eprintln!("error: {message}");
                    ExitCode::from(1)
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    eprintln!(
                        "no agent answers at {}: {e} (is `vmsync-guest run` running with this \
                         config?)",
                        config.control.display()
                    );
                    // The host's exit code for the same (README "Running it").
                    ExitCode::from(4)
                }
                Err(e) => {
                    eprintln!(
                        "cannot reach the agent at {}: {e}",
                        config.control.display()
                    );
                    ExitCode::from(1)
                }
            }
        }
    }
}
