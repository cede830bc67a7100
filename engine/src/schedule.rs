//! When cycles run. [`Live`] keeps a set of shares in sync for as long as a connection to the
//! peer lasts: a full cycle of every share first, then a targeted cycle whenever change hints
//! come (a burst of them is one cycle), paced paths when they fall due, one bulk step at a time
//! when nothing else waits, a retry with backoff while work is pending, and the commands of the
//! control socket. [`idle`] answers the commands while there is no connection.
//!
//! Generic over the endpoints and the connection: the host runs it over a session to its
//! guest, the tests over two local endpoints with tokio's clock paused. Every delay is read
//! from tokio's clock, so the tests see the backoff and the pacing exactly.

use crate::controller::Controller;
use crate::log_limit::LogLimit;
use crate::pace::{Pacer, RescanBudget, RescanLimit};
use crate::status::ShareState;
use crate::watch::HintSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use vmsync_core::endpoint::{ChangeHints, Endpoint, ScanScope};
use vmsync_core::reconcile::Side;
use vmsync_core::text::escape_text;
use vmsync_core::RelPath;

/// Extra cycles run at once when a cycle found paths that changed under it.
pub const MAX_RETRY_CYCLES: usize = 3;
/// First delay before retrying a cycle that left work pending; doubles up to the maximum, and
/// starts again from the minimum once nothing is pending.
pub const PENDING_RETRY_MIN: Duration = Duration::from_millis(500);
pub const PENDING_RETRY_MAX: Duration = Duration::from_secs(30);

/// A share as the agent keeps it across connections.
pub struct Share<L> {
    pub controller: Controller,
    /// This machine's side of the share.
    pub local: L,
    /// The share's directory on this machine (`resolve --keep both` links a copy in it).
    pub dir: PathBuf,
    /// Bounds how often one path is cycled live (see [`crate::pace`]).
    pub pacer: Pacer,
}

impl<L> Share<L> {
    pub fn new(controller: Controller, local: L, dir: PathBuf) -> Share<L> {
        Share {
            controller,
            local,
            dir,
            pacer: Pacer::default(),
        }
    }

    /// A share with paths held back by pacing is not in sync yet (so `wait` waits for them).
    fn show_held(&self) {
        if self.pacer.next_due().is_none() {
            return;
        }
        if let Ok(mut s) = self.controller.status().lock() {
            if s.state == ShareState::InSync {
                s.state = ShareState::Syncing;
            }
        }
    }
}

/// The connection the remote endpoints run over.
pub trait Link {
    /// Resolves, with why, once the connection has ended.
    fn closed(&self) -> impl Future<Output = String> + Send;
    /// Content bytes sent and received over the connection so far.
    fn content_bytes(&self) -> (u64, u64);
}

/// How a [`Command`] is answered: `Err` says why it was not done. Called in the loop's task
/// at the moment the command is done (so a status taken then shows that moment).
pub trait Answer: Send {
    fn answer(self, result: Result<(), String>);
}

/// A plain answer over a channel.
pub type Reply = oneshot::Sender<Result<(), String>>;

impl Answer for Reply {
    fn answer(self, result: Result<(), String>) {
        let _ = self.send(result);
    }
}

/// What the control socket asks of the sync loop.
pub enum Command<A = Reply> {
    /// A full cycle of every share; answered when it is done.
    Sync(A),
    /// Lifts a share's safety halt; answered at once, then a full cycle.
    Resume { share: String, reply: A },
    /// Settles a conflict at `path` (never the root) in favour of `keep`, after linking this
    /// machine's version under a sibling name first when `aside` is set; answered after the
    /// cycle of the path.
    Resolve {
        share: String,
        path: RelPath,
        keep: Side,
        aside: bool,
        reply: A,
    },
}

/// Answers commands while there is no connection, for `delay`: a halt can be lifted (the
/// share then waits for the connection), everything else is refused.
pub async fn idle<L, A: Answer>(
    shares: &mut [Share<L>],
    commands: &mut mpsc::Receiver<Command<A>>,
    delay: Duration,
) {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return,
            command = commands.recv() => match command {
                Some(Command::Sync(reply)) | Some(Command::Resolve { reply, .. }) => {
                    reply.answer(Err("not connected to the guest".into()));
                }
                Some(Command::Resume { share, reply }) => {
                    let result = resume(shares, &share);
                    if result.is_ok() {
                        for s in shares.iter().filter(|s| s.controller.name() == share) {
                            s.controller.set_state(ShareState::Connecting);
                        }
                    }
                    reply.answer(result);
                }
                None => std::future::pending::<()>().await,
            },
        }
    }
}

/// Lifts `name`'s safety halt.
fn resume<L>(shares: &mut [Share<L>], name: &str) -> Result<(), String> {
    let share = shares
        .iter_mut()
        .find(|s| s.controller.name() == name)
        .ok_or_else(|| format!("no share named `{name}`"))?;
    match share.controller.resume() {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!("share `{name}` is not halted")),
        Err(e) => Err(format!("resume failed: {e}")),
    }
}

/// The shares kept in sync over one connection: `remotes[i]` is the peer's side of
/// `shares[i]`, kept for the connection's life (each remembers what it learned of its share).
pub struct Live<'a, L, R, K> {
    shares: &'a mut [Share<L>],
    remotes: Vec<R>,
    link: K,
    /// Hints gathered per share and not yet cycled.
    hints: Vec<HintSet>,
    /// Failed cycles are logged at most once a minute per share and kind: by a limiter the
    /// caller keeps across connections ([`Live::with_log`]), else by one of this connection's.
    log: Arc<Mutex<LogLimit>>,
}

impl<'a, L: Endpoint, R: Endpoint, K: Link> Live<'a, L, R, K> {
    pub fn new(shares: &'a mut [Share<L>], remotes: Vec<R>, link: K) -> Self {
        let hints = shares.iter().map(|_| HintSet::default()).collect();
        Live {
            shares,
            remotes,
            link,
            hints,
            log: Arc::default(),
        }
    }

    /// Logs failed cycles through `log`, which the caller keeps from one connection to the
    /// next: a guest that fails a cycle and then hangs up gets no fresh line a connection.
    pub fn with_log(mut self, log: Arc<Mutex<LogLimit>>) -> Self {
        self.log = log;
        self
    }

    /// Syncs every share, calls `synced` once that first full sync is done, then keeps the
    /// shares in sync until the connection ends or a side fails it. Returns why it ended.
    pub async fn run<A: Answer>(
        mut self,
        hints: &mut mpsc::Receiver<(usize, ChangeHints)>,
        commands: &mut mpsc::Receiver<Command<A>>,
        synced: impl FnOnce(),
    ) -> String {
        match self.run_inner(hints, commands, synced).await {
            Ok(never) => match never {},
            Err(reason) => reason,
        }
    }

    async fn run_inner<A: Answer>(
        &mut self,
        hints: &mut mpsc::Receiver<(usize, ChangeHints)>,
        commands: &mut mpsc::Receiver<Command<A>>,
        synced: impl FnOnce(),
    ) -> Result<std::convert::Infallible, String> {
        let mut pending = self.sync_all(false).await?;
        synced();
        let mut retry_delay = PENDING_RETRY_MIN;
        loop {
            let retry = tokio::time::sleep(retry_delay);
            let bulk = self.shares.iter().position(|s| s.controller.has_bulk());
            // Paths held back by pacing go when their time comes.
            let paced = self.shares.iter().filter_map(|s| s.pacer.next_due()).min();
            let paced_sleep =
                tokio::time::sleep_until(paced.map(Instant::from_std).unwrap_or_else(Instant::now));
            // Biased: hints and commands come first, so a big file crossing in bulk steps
            // never holds up the live cycles of everything else.
            tokio::select! {
                biased;
                reason = self.link.closed() => return Err(reason),
                Some((index, h)) = hints.recv() => {
                    self.add_hints(index, h);
                    // Take everything else already waiting: one cycle for a whole burst.
                    while let Ok((index, h)) = hints.try_recv() {
                        self.add_hints(index, h);
                    }
                    pending = self.sync_all(true).await?;
                }
                () = paced_sleep, if paced.is_some() => pending = self.sync_all(true).await?,
                () = std::future::ready(()), if bulk.is_some() => {
                    pending |= self.bulk_step(bulk.unwrap_or_default()).await?;
                }
                _ = retry, if pending => {
                    retry_delay = (retry_delay * 2).min(PENDING_RETRY_MAX);
                    pending = self.sync_all(false).await?;
                }
                command = commands.recv() => match command {
                    Some(command) => pending = self.command(command, pending).await?,
                    None => return Err("control channel closed".into()),
                },
            }
            if !pending {
                retry_delay = PENDING_RETRY_MIN;
            }
        }
    }

    /// Carries out a command; returns whether work is pending now (`pending`: before it).
    async fn command<A: Answer>(
        &mut self,
        command: Command<A>,
        pending: bool,
    ) -> Result<bool, String> {
        match command {
            Command::Sync(reply) => {
                let result = self.sync_all(false).await;
                reply.answer(result.as_ref().map(|_| ()).map_err(Clone::clone));
                result
            }
            Command::Resume { share, reply } => {
                // Answered as soon as the halt is lifted: the add-only merge that follows can
                // take long, and `wait` is there to watch it.
                let result = resume(self.shares, &share);
                let lifted = result.is_ok();
                reply.answer(result);
                if lifted {
                    self.sync_all(false).await
                } else {
                    Ok(pending)
                }
            }
            Command::Resolve {
                share,
                path,
                keep,
                aside,
                reply,
            } => match self.resolve(&share, path, keep, aside).await {
                Ok(Ok(now_pending)) => {
                    reply.answer(Ok(()));
                    Ok(pending | now_pending)
                }
                Ok(Err(why)) => {
                    reply.answer(Err(why));
                    Ok(pending)
                }
                Err(e) => {
                    reply.answer(Err(e.clone()));
                    Err(e)
                }
            },
        }
    }

    fn add_hints(&mut self, index: usize, hints: ChangeHints) {
        let Some(set) = self.hints.get_mut(index) else {
            return;
        };
        if hints.rescan {
            set.add_rescan();
        }
        for p in hints.paths {
            set.add(p);
        }
    }

    /// A cycle of every share: a full one unless `targeted`, else a targeted one for each
    /// share with hints (taking them). Paths that changed under a cycle get quick extra
    /// cycles. `Ok(true)` when some share still has work pending; `Err` when the connection is
    /// unusable.
    async fn sync_all(&mut self, targeted: bool) -> Result<bool, String> {
        let mut pending = false;
        let shares = self.shares.iter_mut().zip(&mut self.remotes);
        for ((share, remote), hints) in shares.zip(&mut self.hints) {
            let mut scope = if targeted {
                let controller = &share.controller;
                let now = Instant::now().into_std();
                share
                    .pacer
                    .admit(hints, now, |path| controller.is_known_dir(path));
                if hints.is_empty() {
                    share.show_held();
                    continue;
                }
                let taken = hints.take();
                if taken.rescan {
                    ScanScope::Full
                } else {
                    ScanScope::Paths(taken.paths)
                }
            } else {
                ScanScope::Full
            };
            share.controller.set_state(ShareState::Syncing);
            let mut share_pending = true;
            for _ in 0..=MAX_RETRY_CYCLES {
                let before = self.link.content_bytes();
                let result = share
                    .controller
                    .cycle(&mut share.local, remote, scope.clone())
                    .await;
                credit(&self.link, &share.controller, before);
                if let Ok(mut s) = share.controller.status().lock() {
                    // A lost connection shows as such in the agent's status, not here.
                    s.error = match &result {
                        Err(e) if !e.is_disconnect() => Some(escape_text(&e.to_string())),
                        _ => None,
                    };
                }
                match result {
                    Ok(report) => {
                        share_pending = report.retry || report.pending > 0;
                        if !report.retry {
                            break;
                        }
                        // Something moved under the cycle: look at the whole share again.
                        scope = ScanScope::Full;
                    }
                    Err(e) if e.is_disconnect() => return Err(e.to_string()),
                    Err(e) => {
                        let name = share.controller.name();
                        if let Some(line) =
                            admit(&self.log, &format!("cycle:{name}"), &e.to_string())
                        {
                            tracing::error!(share = %name, "cycle failed: {line}");
                        }
                        break;
                    }
                }
            }
            pending |= share_pending;
            share.show_held();
        }
        Ok(pending)
    }

    /// One step of share `index`'s oldest bulk transfer; when it lands, a targeted cycle of
    /// its paths. `Ok(true)` when work is pending; `Err` when the connection is unusable.
    async fn bulk_step(&mut self, index: usize) -> Result<bool, String> {
        let (Some(share), Some(remote)) = (self.shares.get_mut(index), self.remotes.get_mut(index))
        else {
            return Ok(false);
        };
        let before = self.link.content_bytes();
        let result = share.controller.bulk_step(&mut share.local, remote).await;
        credit(&self.link, &share.controller, before);
        match result {
            Err(e) if e.is_disconnect() => return Err(e.to_string()),
            Err(e) => {
                let name = share.controller.name();
                if let Some(line) = admit(&self.log, &format!("bulk:{name}"), &e.to_string()) {
                    tracing::error!(share = %name, "bulk transfer failed: {line}");
                }
            }
            Ok(()) => {}
        }
        let paths = share.controller.take_rehints();
        if paths.is_empty() {
            return Ok(false);
        }
        self.add_hints(
            index,
            ChangeHints {
                paths,
                rescan: false,
            },
        );
        self.sync_all(true).await
    }

    /// `resolve`: settles one conflict and runs a cycle of its path(s). `Ok(Err(why))` when
    /// it cannot be done; `Err` when the connection is unusable.
    async fn resolve(
        &mut self,
        name: &str,
        path: RelPath,
        keep: Side,
        aside: bool,
    ) -> Result<Result<bool, String>, String> {
        let Some(index) = self.shares.iter().position(|s| s.controller.name() == name) else {
            return Ok(Err(format!("no share named `{name}`")));
        };
        if path.is_root() {
            return Ok(Err("give the conflicting path, not the share root".into()));
        }
        let (Some(share), Some(remote)) = (self.shares.get_mut(index), self.remotes.get_mut(index))
        else {
            return Ok(Err(format!("no share named `{name}`")));
        };
        if let Err(e) = share
            .controller
            .resolve(&mut share.local, remote, &path, keep)
            .await
        {
            return Ok(Err(e));
        }
        let mut paths = vec![path.clone()];
        if aside {
            match crate::sibling::keep_aside(&share.dir, &path) {
                Ok(sibling) => {
                    tracing::info!(share = %name, "the host's {} is kept as {}", path.escaped(), sibling.escaped());
                    paths.push(sibling);
                }
                Err(e) => return Ok(Err(e)),
            }
        }
        self.add_hints(
            index,
            ChangeHints {
                paths,
                rescan: false,
            },
        );
        self.sync_all(true).await.map(Ok)
    }
}

/// Credits the content bytes the connection moved since `before` to `controller`'s share:
/// work runs one share at a time, so the counters moved only for it meanwhile.
fn credit(link: &impl Link, controller: &Controller, before: (u64, u64)) {
    let (sent, received) = link.content_bytes();
    controller.add_wire_bytes(
        sent.saturating_sub(before.0),
        received.saturating_sub(before.1),
    );
}

/// The line `log` lets out for `cause` now, if any (see [`LogLimit::admit`]).
fn admit(log: &Mutex<LogLimit>, cause: &str, message: &str) -> Option<String> {
    let now = Instant::now().into_std();
    log.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .admit(cause, message, now)
}

/// Forwards a side's change hints to the sync loop, as share `index`'s, until the side or the
/// loop goes away. With `rescans`, a hint asking for a full rescan waits for the limit (see
/// [`crate::pace::GUEST_RESCANS`]); while it waits, the side is not asked for more.
pub async fn forward_changes<E: Endpoint>(
    mut side: E,
    index: usize,
    tx: mpsc::Sender<(usize, ChangeHints)>,
    rescans: Option<RescanLimit>,
) {
    let mut budget = rescans.map(|limit| RescanBudget::new(limit, Instant::now().into_std()));
    let mut logs = LogLimit::default();
    loop {
        match side.changes().await {
            Ok(h) => {
                // Dropped here, before the next poll lets another arrive.
                let h = crate::watch::bounded_hints(h);
                if let (true, Some(budget)) = (h.rescan, budget.as_mut()) {
                    let now = Instant::now().into_std();
                    if let Some(at) = budget.wait_until(now) {
                        let cause = "rescans paced";
                        let message = "the peer asks for full rescans faster than they are \
                                       allowed: held back";
                        if let Some(line) = logs.admit(cause, message, now) {
                            tracing::info!(share = index, "{line}");
                        }
                        tokio::time::sleep_until(Instant::from_std(at)).await;
                    }
                    budget.take(Instant::now().into_std());
                }
                if tx.send((index, h)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::debug!("change hints stopped: {e}");
                return;
            }
        }
    }
}
