//! How far the shares' sync has come, told to whoever waits for it (docs/cli.md, "Progress
//! and readiness"):
//! - the guest: [`tell_guest`] sends each share's [`SyncState`] as it changes, so that
//!   `vmsync-guest` says `READY=1` once the first full cycle has converged;
//! - systemd: [`systemd_status`] keeps the unit's `STATUS=` line current;
//! - a person: [`Display`] draws a progress bar per share on a terminal (`run`, `wait
//!   --progress`), or prints a line every few seconds when stderr is not one.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmsync_core::endpoint::Endpoint;
use vmsync_core::progress::{Progress, SyncState};
use vmsync_engine::status::{ShareState, ShareStatus};

/// How often the shares' states are looked at while a cycle is applying changes...
const LOOK_EVERY: Duration = Duration::from_millis(250);
/// ...and while none is: an idle agent (a fleet of them on one host) barely wakes up.
const IDLE_LOOK_EVERY: Duration = Duration::from_secs(2);
/// A share's progress is told again at most this often (a change of state goes at once).
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Off a terminal, a progress line at most this often per share.
const LINE_EVERY: Duration = Duration::from_secs(5);
/// A cycle is shown (bar or lines) once it has run this long: live edits never are.
const SHOW_AFTER: Duration = Duration::from_secs(1);

/// What the guest is told of a share. Until `converged_once` (this connection's first full
/// sync has run), never more than syncing: a status left from an earlier connection says
/// nothing of this one.
pub fn sync_state(s: &ShareStatus, converged_once: bool) -> SyncState {
    if let Some(code) = &s.halt_code {
        return SyncState::Halted { code: code.clone() };
    }
    if !converged_once {
        return SyncState::Syncing(s.progress);
    }
    match s.state {
        ShareState::InSync => SyncState::InSync,
        ShareState::Conflicted => SyncState::Conflicted {
            conflicts: s.conflicts.len() as u64,
        },
        ShareState::Halted => SyncState::Halted {
            code: "halted".into(),
        },
        ShareState::Connecting | ShareState::Scanning | ShareState::Syncing => {
            SyncState::Syncing(s.progress)
        }
    }
}

/// Whether `new` is worth telling, `last` having been told at `told`: a change of kind (or of
/// a halt's code, or of a conflict count) at once, progress at most every [`PROGRESS_EVERY`].
fn worth_telling(last: Option<&SyncState>, new: &SyncState, told: Option<Instant>) -> bool {
    match (last, new) {
        (Some(SyncState::Syncing(a)), SyncState::Syncing(b)) => {
            a != b && told.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY)
        }
        (Some(last), new) => last != new,
        (None, _) => true,
    }
}

/// How long to wait before looking at the shares again: [`LOOK_EVERY`] while one has a cycle
/// applying changes, [`IDLE_LOOK_EVERY`] otherwise.
fn next_look(shares: &[ShareStatus]) -> Duration {
    if shares.iter().any(|s| s.progress.is_some()) {
        LOOK_EVERY
    } else {
        IDLE_LOOK_EVERY
    }
}

/// Tells the guest each share's state as it changes, for as long as the connection lasts
/// (returns when a note cannot be sent). `converged_once` is set once the connection's first
/// full sync has run, and `wake` notified then, so the guest hears it at once.
pub async fn tell_guest<R: Endpoint>(
    statuses: Vec<Arc<Mutex<ShareStatus>>>,
    mut remotes: Vec<R>,
    converged_once: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
) {
    let mut told: Vec<(Option<SyncState>, Option<Instant>)> =
        statuses.iter().map(|_| (None, None)).collect();
    loop {
        let once = converged_once.load(Ordering::Acquire);
        let shares = glance(&statuses);
        for ((share, remote), (last, at)) in shares.iter().zip(&mut remotes).zip(&mut told) {
            let state = sync_state(share, once);
            if !worth_telling(last.as_ref(), &state, *at) {
                continue;
            }
            if let Err(e) = remote.note_sync(state.clone()).await {
                tracing::debug!("telling the guest how its share stands: {e}");
                return;
            }
            *last = Some(state);
            *at = Some(Instant::now());
        }
        tokio::select! {
            () = tokio::time::sleep(next_look(&shares)) => {}
            () = wake.notified() => {}
        }
    }
}

/// What [`summary`] and [`Display`] read of each share's status (not its problem and
/// conflict lists: this runs a few times a second for as long as the agent does).
fn glance(statuses: &[Arc<Mutex<ShareStatus>>]) -> Vec<ShareStatus> {
    statuses
        .iter()
        .filter_map(|s| {
            s.lock().ok().map(|s| ShareStatus {
                name: s.name.clone(),
                state: s.state,
                halt_code: s.halt_code.clone(),
                progress: s.progress,
                conflicts: s.conflicts.clone(),
                ..ShareStatus::default()
            })
        })
        .collect()
}

/// One line for every share: `src: syncing 1,234/20,000 files, 40 MiB/1.5 GiB; doc: in sync`.
pub fn summary(shares: &[ShareStatus]) -> String {
    shares
        .iter()
        .map(|s| {
            let state = match (&s.halt_code, s.progress) {
                (Some(code), _) => format!("halted ({code})"),
                (None, Some(p)) => format!("syncing {p}"),
                (None, None) => s.state.as_str().to_string(),
            };
            format!("{}: {state}", s.name)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Keeps systemd's `STATUS=` line for this unit current (when `NOTIFY_SOCKET` is set):
/// [`summary`], sent when it changes, at most every [`PROGRESS_EVERY`] while a cycle applies
/// changes and within [`IDLE_LOOK_EVERY`] otherwise.
pub async fn systemd_status(statuses: Vec<Arc<Mutex<ShareStatus>>>) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let mut last = String::new();
    loop {
        let shares = glance(&statuses);
        let line = summary(&shares);
        if line != last {
            vmsync_agent_common::notify_systemd::notify(
                Some(socket.clone()),
                &format!("STATUS={line}"),
            );
            last = line;
        }
        tokio::time::sleep(next_look(&shares).max(PROGRESS_EVERY)).await;
    }
}

/// `run`'s own display of its long cycles: bars on a terminal (log lines written above them),
/// log lines every few seconds otherwise.
pub async fn show_while_running(statuses: Vec<Arc<Mutex<ShareStatus>>>) {
    let mut display = Display::new(true);
    if let Some(bars) = display.bars() {
        vmsync_agent_common::process::log_around(bars.clone());
    }
    loop {
        let shares = glance(&statuses);
        display.show(&shares);
        tokio::time::sleep(next_look(&shares)).await;
    }
}

/// What a person sees of the shares' cycles: a bar per share with a cycle running on a
/// terminal, a line every [`LINE_EVERY`] otherwise. Fed the shares' statuses as often as the
/// caller likes ([`Display::show`]).
pub struct Display {
    /// `None` off a terminal.
    bars: Option<MultiProgress>,
    /// Off a terminal, lines go to the log (the agent's own display) instead of stderr.
    lines_to_log: bool,
    shares: HashMap<String, Shown>,
}

struct Shown {
    /// When the cycle (this total) was first seen.
    since: Instant,
    total: (u64, u64),
    bar: Option<ProgressBar>,
    /// Off a terminal: when the last line was printed.
    printed: Option<Instant>,
}

impl Display {
    /// Bars on stderr when it is a terminal (and `VMSYNC_PROGRESS` is not `lines`); lines
    /// otherwise, logged (`lines_to_log`) or printed.
    pub fn new(lines_to_log: bool) -> Display {
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr())
            && std::env::var("VMSYNC_PROGRESS").as_deref() != Ok("lines");
        Display {
            bars: terminal.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            lines_to_log,
            shares: HashMap::new(),
        }
    }

    /// The bars, for logging around them (see `vmsync_agent_common::process`).
    pub fn bars(&self) -> Option<&MultiProgress> {
        self.bars.as_ref()
    }

    /// Updates what is shown from the shares' statuses now.
    pub fn show(&mut self, shares: &[ShareStatus]) {
        for s in shares {
            match s.progress {
                Some(p) => self.progress(&s.name, p),
                None => {
                    if let Some(shown) = self.shares.remove(&s.name) {
                        if let Some(bar) = shown.bar {
                            bar.finish_and_clear();
                        }
                    }
                }
            }
        }
    }

    /// Clears every bar still shown.
    pub fn finish(&mut self) {
        for (_, shown) in self.shares.drain() {
            if let Some(bar) = shown.bar {
                bar.finish_and_clear();
            }
        }
    }

    fn progress(&mut self, name: &str, p: Progress) {
        let now = Instant::now();
        let total = (p.files_total, p.bytes_total);
        let shown = self.shares.entry(name.to_string()).or_insert(Shown {
            since: now,
            total,
            bar: None,
            printed: None,
        });
        if shown.total != total {
            // Another cycle: start over.
            if let Some(bar) = shown.bar.take() {
                bar.finish_and_clear();
            }
            *shown = Shown {
                since: now,
                total,
                bar: None,
                printed: None,
            };
        }
        if now.duration_since(shown.since) < SHOW_AFTER {
            return;
        }
        // Bytes measure a cycle that brings content; files one that only creates, changes
        // metadata or removes.
        let (pos, len) = if p.bytes_total > 0 {
            (p.bytes_done, p.bytes_total)
        } else {
            (p.files_done, p.files_total)
        };
        match &self.bars {
            Some(bars) => {
                let bar = shown.bar.get_or_insert_with(|| {
                    let bar = bars.add(ProgressBar::new(len));
                    let template = if p.bytes_total > 0 {
                        "{prefix} [{bar:30}] {msg} {binary_bytes_per_sec} eta {eta}"
                    } else {
                        "{prefix} [{bar:30}] {msg} {per_sec} eta {eta}"
                    };
                    if let Ok(style) = ProgressStyle::with_template(template) {
                        bar.set_style(style.progress_chars("=> "));
                    }
                    bar.set_prefix(name.to_string());
                    bar
                });
                bar.set_length(len);
                bar.set_position(pos);
                bar.set_message(p.to_string());
            }
            None => {
                if shown
                    .printed
                    .is_none_or(|t| now.duration_since(t) >= LINE_EVERY)
                {
                    let rate = rate(pos, now.duration_since(shown.since), p.bytes_total > 0);
                    if self.lines_to_log {
                        tracing::info!(share = %name, "syncing {p}{rate}");
                    } else {
                        eprintln!("{name}: syncing {p}{rate}");
                    }
                    shown.printed = Some(now);
                }
            }
        }
    }
}

/// ` (12.0 MiB/s)` or ` (300 files/s)`, from what is done and how long it took.
fn rate(done: u64, took: Duration, bytes: bool) -> String {
    let secs = took.as_secs_f64();
    if secs <= 0.0 {
        return String::new();
    }
    let per_sec = (done as f64 / secs) as u64;
    if bytes {
        format!(" ({}/s)", vmsync_core::reserve::ShowBytes(per_sec))
    } else {
        format!(" ({} files/s)", vmsync_core::progress::Count(per_sec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: ShareState) -> ShareStatus {
        ShareStatus {
            name: "src".into(),
            state,
            ..ShareStatus::default()
        }
    }

    #[test]
    fn the_guest_hears_in_sync_only_after_this_connections_first_sync() {
        let p = Progress {
            files_done: 1,
            files_total: 2,
            bytes_done: 3,
            bytes_total: 4,
        };
        let syncing = ShareStatus {
            progress: Some(p),
            ..status(ShareState::Syncing)
        };
        let halted = ShareStatus {
            halt_code: Some("mass-deletion".into()),
            ..status(ShareState::Halted)
        };
        let conflicted = ShareStatus {
            conflicts: vec!["a".into(), "b".into()],
            ..status(ShareState::Conflicted)
        };
        // (status, first sync done, told)
        let cases = [
            (status(ShareState::InSync), false, SyncState::Syncing(None)),
            (status(ShareState::InSync), true, SyncState::InSync),
            (syncing.clone(), true, SyncState::Syncing(Some(p))),
            (syncing, false, SyncState::Syncing(Some(p))),
            (conflicted, true, SyncState::Conflicted { conflicts: 2 }),
            (
                halted.clone(),
                false,
                SyncState::Halted {
                    code: "mass-deletion".into(),
                },
            ),
            (
                halted,
                true,
                SyncState::Halted {
                    code: "mass-deletion".into(),
                },
            ),
            (
                status(ShareState::Connecting),
                true,
                SyncState::Syncing(None),
            ),
        ];
        for (s, once, want) in cases {
            assert_eq!(sync_state(&s, once), want, "{s:?} {once}");
        }
    }

    #[test]
    fn states_go_at_once_and_progress_at_most_every_second() {
        let p = |n| {
            SyncState::Syncing(Some(Progress {
                files_done: n,
                ..Progress::default()
            }))
        };
        let just_now = Some(Instant::now());
        let long_ago = Instant::now().checked_sub(PROGRESS_EVERY * 2);
        assert!(worth_telling(None, &p(1), None));
        assert!(!worth_telling(Some(&p(1)), &p(1), long_ago));
        assert!(!worth_telling(Some(&p(1)), &p(2), just_now));
        assert!(worth_telling(Some(&p(1)), &p(2), long_ago));
        assert!(worth_telling(Some(&p(1)), &SyncState::InSync, just_now));
        assert!(!worth_telling(
            Some(&SyncState::InSync),
            &SyncState::InSync,
            long_ago
        ));
        assert!(worth_telling(
            Some(&SyncState::Conflicted { conflicts: 1 }),
            &SyncState::Conflicted { conflicts: 2 },
            just_now
        ));
    }

    #[test]
    fn the_summary_names_every_share() {
        let a = ShareStatus {
            progress: Some(Progress {
                files_done: 1000,
                files_total: 2000,
                bytes_done: 1 << 20,
                bytes_total: 2 << 20,
            }),
            ..status(ShareState::Syncing)
        };
        let b = ShareStatus {
            name: "doc".into(),
            ..status(ShareState::InSync)
        };
        let c = ShareStatus {
            name: "out".into(),
            halt_code: Some("disk-full".into()),
            ..status(ShareState::Halted)
        };
        assert_eq!(
            summary(&[a, b, c]),
            "src: syncing 1,000/2,000 files, 1 MiB/2 MiB; doc: in-sync; out: halted (disk-full)"
        );
    }
}
