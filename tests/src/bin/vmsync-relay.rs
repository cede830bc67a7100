//! `vmsync-relay LISTEN_SOCK UPSTREAM_SOCK [--stats-file FILE]`: the test relay
//! ([`vmsync_tests::relay::Relay`]) as a process, for the benchmark and manual measurements.
//!
//! Accepts connections on `LISTEN_SOCK`, relays each to `UPSTREAM_SOCK`, and counts the bytes
//! each way. With `--stats-file`, writes `{"up":N,"down":N}` (cumulative bytes client → upstream
//! and upstream → client) to `FILE` every 200 ms and once more on SIGTERM or SIGINT, then exits 0.
//! The file is replaced atomically (write a temporary file, rename), so a reader never sees a
//! partial write.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use vmsync_tests::relay::{Relay, RelayCounters};

/// How often the stats file is rewritten.
const STATS_INTERVAL_MS: u64 = 200;

const USAGE: &str = "usage: vmsync-relay LISTEN_SOCK UPSTREAM_SOCK [--stats-file FILE]\n\
\n\
Relays every connection accepted on LISTEN_SOCK to UPSTREAM_SOCK and counts the bytes each way.\n\
--stats-file FILE   write {\"up\":N,\"down\":N} to FILE every 200 ms and on SIGTERM/SIGINT";

struct Args {
    listen: PathBuf,
    upstream: PathBuf,
    stats_file: Option<PathBuf>,
}

enum Parsed {
    Run(Args),
    Help,
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("vmsync-relay: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("vmsync-relay: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args(mut args: impl Iterator<Item = OsString>) -> Result<Parsed, String> {
    let mut positional = Vec::new();
    let mut stats_file = None;
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("-h" | "--help") => return Ok(Parsed::Help),
            Some("--stats-file") => {
                let file = args.next().ok_or("--stats-file needs a FILE")?;
                stats_file = Some(PathBuf::from(file));
            }
            Some(flag) if flag.starts_with("--") => {
                return Err(format!("unknown option {flag}"));
            }
            _ => positional.push(PathBuf::from(arg)),
        }
    }
    let [listen, upstream]: [PathBuf; 2] = positional
        .try_into()
        .map_err(|given: Vec<PathBuf>| format!("expected 2 socket paths, got {}", given.len()))?;
    Ok(Parsed::Run(Args {
        listen,
        upstream,
        stats_file,
    }))
}

fn run(args: &Args) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    // Signal handlers go in before the socket exists: whoever starts the relay waits for the
    // socket, then may stop it at once, and that must still produce a final stats file.
    let (mut terminate, mut interrupt) = {
        let _context = runtime.enter();
        (
            signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
        )
    };
    let relay = Relay::start(&args.listen, &args.upstream).with_context(|| {
        format!(
            "cannot listen on {} (upstream {})",
            args.listen.display(),
            args.upstream.display()
        )
    })?;
    eprintln!(
        "vmsync-relay: {} -> {}",
        args.listen.display(),
        args.upstream.display()
    );
    let counters = relay.counters();
    let stats_file = args.stats_file.as_deref();
    runtime.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_millis(STATS_INTERVAL_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported_failure = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Some(file) = stats_file {
                        // A periodic write can fail transiently (the directory being cleaned
                        // up at the end of a run); say so once and keep relaying.
                        if let Err(error) = write_stats(file, &counters) {
                            if !reported_failure {
                                eprintln!("vmsync-relay: {error:#}");
                                reported_failure = true;
                            }
                        }
                    }
                }
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
            }
        }
    });
    // Stop relaying first so the final figures are the last ones.
    relay.shutdown();
    if let Some(file) = stats_file {
        write_stats(file, &counters)?;
    }
    Ok(())
}

fn write_stats(file: &Path, counters: &RelayCounters) -> Result<()> {
    let text = format!(
        "{{\"up\":{},\"down\":{}}}\n",
        counters.up(),
        counters.down()
    );
    let mut temporary = file.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    std::fs::write(&temporary, text)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, file).with_context(|| {
        format!(
            "cannot rename {} to {}",
            temporary.display(),
            file.display()
        )
    })
}
