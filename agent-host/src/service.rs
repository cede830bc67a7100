//! `vmsync-host run`: owns the share controllers, keeps a session to the guest alive
//! (reconnecting with exponential backoff and jitter), runs a full cycle of every share after
//! each (re)connect and whenever `sync` asks, and answers the control socket. When cycles run
//! is `vmsync_engine::schedule`'s business.

use crate::config::{HostConfig, HostShare};
use anyhow::Context;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use vmsync_agent_common::control::{self, AgentInfo, ControlRequest, ControlResponse, Keep};
use vmsync_agent_common::notify_systemd;
use vmsync_core::endpoint::ChangeHints;
use vmsync_core::reconcile::Side;
use vmsync_core::safety::DeletionLimit;
use vmsync_core::RelPath;
use vmsync_engine::controller::{Controller, ShareSettings};
use vmsync_engine::filter::Filter;
use vmsync_engine::local::LocalEndpoint;
use vmsync_engine::log_limit::LogLimit;
use vmsync_engine::pace::GUEST_RESCANS;
use vmsync_engine::schedule::{self, forward_changes, Answer, Command, Link, Live, Share};
use vmsync_engine::state::StateDb;
use vmsync_engine::status::{ShareState, ShareStatus};
use vmsync_protocol::handshake;
use vmsync_protocol::messages::ShareOpen;
use vmsync_transport::{client_handshake, connect, EndpointAddr, RemoteEndpoint, Session};

/// First reconnect delay; doubles up to [`RECONNECT_MAX_MS`], with ±25 % jitter.
const RECONNECT_MIN_MS: u64 = 100;
const RECONNECT_MAX_MS: u64 = 5_000;
/// A session that lasted at least this long starts the backoff again from
/// [`RECONNECT_MIN_MS`]; a shorter one does not, so a guest that breaks every session right
/// after the handshake is reconnected to at most every [`RECONNECT_MAX_MS`], not every 100 ms.
const SESSION_RESETS_BACKOFF: Duration = Duration::from_millis(RECONNECT_MAX_MS);
/// Hint messages queued between the watchers and the sync loop (each carries a whole set).
const HINT_QUEUE: usize = 64;
/// How long one connection attempt (not the handshake) may take.
const CONNECT_TIMEOUT_MS: u64 = 5_000;
/// How often `metrics_file` is written (and once more at shutdown).
const METRICS_FILE_INTERVAL: Duration = Duration::from_secs(15);

/// What the control socket reads without disturbing the sync loop.
#[derive(Clone)]
struct Shared {
    statuses: Vec<Arc<Mutex<ShareStatus>>>,
    locals: Vec<LocalEndpoint>,
    peer: Arc<Mutex<(bool, Option<String>)>>,
    /// The live session, for its wire counters.
    session: Arc<Mutex<Option<Session>>>,
    /// Sessions with the guest established since the agent started.
    connects: Arc<AtomicU64>,
}

impl Shared {
    fn snapshot(&self) -> ControlResponse {
        let (connected, detail) = self.peer.lock().map(|p| p.clone()).unwrap_or((false, None));
        let wire = self
            .session
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(Session::stats))
            .unwrap_or_default();
        let shares: Vec<ShareStatus> = self
            .statuses
            .iter()
            .zip(&self.locals)
            .filter_map(|(s, local)| {
                let mut s = s.lock().ok()?.clone();
                s.files_hashed = local.files_hashed();
                s.watching = local.is_watching();
                s.watched_dirs = local.watched_dirs();
                s.watch_problem = local.watch_problem();
                (s.trash_files, s.trash_bytes) = local.trash_totals();
                Some(s)
            })
            .collect();
        ControlResponse::Status {
            agent: AgentInfo {
                role: "vmsync-host".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
                peer: if connected {
                    "connected"
                } else {
                    "disconnected"
                }
                .into(),
                peer_detail: detail,
                rss_bytes: control::rss_bytes(),
                bytes_sent: wire.content_bytes_sent,
                bytes_received: wire.content_bytes_received,
                reconnects: Some(self.connects.load(Ordering::Relaxed).saturating_sub(1)),
            },
            shares,
        }
    }
}

/// Runs the host agent; each share stages at most `max_staged` files at once (see
/// `vmsync_agent_common::process::max_staged_files`).
pub async fn run(config: HostConfig, max_staged: usize) -> anyhow::Result<()> {
    vmsync_agent_common::process::spawn_heap_trimmer();
    vmsync_agent_common::notify_systemd::spawn_watchdog();
    let (db, notice) = match StateDb::open_or_recover(&config.state_dir, STATE_DB_FILE) {
        Ok((db, notice)) => (Arc::new(db), notice),
        Err(e) if e.is_locked() => anyhow::bail!(
            "another vmsync-host is already running with state_dir {}",
            config.state_dir.display()
        ),
        Err(e) => return Err(e).context("opening the state database"),
    };
    let place = StatePlace {
        db: &db,
        dir: &config.state_dir,
        notice: notice.as_deref(),
    };
    let shares = config
        .shares
        .iter()
        .map(|share| open_share(share, config.max_delete_fraction, place, max_staged))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let shared = Shared {
        statuses: shares.iter().map(|s| s.controller.status()).collect(),
        locals: shares.iter().map(|s| s.local.clone()).collect(),
        peer: Arc::new(Mutex::new((false, None))),
        session: Arc::new(Mutex::new(None)),
        connects: Arc::new(AtomicU64::new(0)),
    };

    let (tx, rx) = mpsc::channel::<Command<Answering>>(16);
    let listener = control::bind(&config.control)
        .await
        .with_context(|| format!("binding the control socket {}", config.control.display()))?;
    tokio::spawn(serve_control(listener, tx, shared.clone()));
    let metrics = config.metrics_file.clone().map(|path| MetricsFile {
        path,
        vm: crate::metrics::vm_label(&config.file),
        shared: shared.clone(),
        writing: Arc::new(Mutex::new(None)),
    });
    if let Some(metrics) = &metrics {
        tokio::spawn(metrics.clone().every(METRICS_FILE_INTERVAL));
    }
    tracing::info!(guest = %config.guest, shares = shares.len(), "vmsync-host started");
    tokio::spawn(crate::progress::systemd_status(shared.statuses.clone()));
    tokio::spawn(crate::progress::show_while_running(shared.statuses.clone()));

    let mut sync = SyncLoop {
        ready_sent: false,
        cycle_log: Arc::default(),
        config,
        shares,
        shared,
        rx,
    };
    let result = tokio::select! {
        r = sync.run() => r,
        _ = vmsync_agent_common::process::shutdown_signal() => {
            tracing::info!("shutting down");
            Ok(())
        }
    };
    if let Some(metrics) = &metrics {
        metrics.write();
    }
    result
}

/// The host's state database, in the state directory.
pub const STATE_DB_FILE: &str = "host.redb";

/// Where a share's state is kept: the open state database, its directory, and what opening it
/// had to do (a damaged database set aside), to show in the share's status.
#[derive(Clone, Copy)]
pub struct StatePlace<'a> {
    pub db: &'a Arc<StateDb>,
    pub dir: &'a std::path::Path,
    pub notice: Option<&'a str>,
}

/// A configured share as the host keeps it: its controller (settings, deletion limit, disk
/// reserve, quota, the host directory adopted) and the host's side (trash retention, reserve,
/// staging limit). `run` and the one-shot `sync` build every share here, so both apply the
/// same safety to it.
pub fn open_share(
    share: &HostShare,
    max_delete_fraction: f64,
    state: StatePlace<'_>,
    max_staged: usize,
) -> anyhow::Result<Share<LocalEndpoint>> {
    let filter = Filter::new(&share_patterns(share))?.with_gitignore(share.respect_gitignore);
    let settings = ShareSettings {
        name: share.name.clone(),
        mode: share.mode,
        policy: share.conflict,
        filter: filter.clone(),
        deletion_limit: DeletionLimit {
            max_fraction: max_delete_fraction,
            ..DeletionLimit::default()
        },
        deletion_exempt: Filter::new(&share.deletion_exempt)?,
    };
    let mut controller = Controller::new(settings, state.db.clone(), state.dir)?;
    controller.set_min_free(share.min_free);
    controller.set_quota(share.quota);
    controller.adopt_host_path(&share.path)?;
    if let Some(notice) = state.notice {
        controller.set_notice(notice.to_string());
    }
    let local = LocalEndpoint::new(&share.name, share.path.clone(), filter, state.db.clone())?;
    local.set_retention(share.retention);
    local.set_min_free(share.min_free);
    local.set_max_staged(max_staged);
    Ok(Share::new(controller, local, share.path.clone()))
}

/// Dials `guest` and runs the handshake opening `shares`; returns the session and the address
/// dialled. A `libvirt:` guest is resolved to its current CID first, on its own timeout
/// (virsh's), so a restarted VM's new CID is found and a resolution failure is reported as
/// such.
pub async fn dial(
    guest: &EndpointAddr,
    shares: &[HostShare],
) -> anyhow::Result<(Session, EndpointAddr)> {
    let addr: EndpointAddr = match guest {
        EndpointAddr::Libvirt(target) => vmsync_transport::libvirt::resolve(target).await?,
        guest => guest.clone(),
    };
    let stream = tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), connect(&addr))
        .await
        .map_err(|_| anyhow::anyhow!("connecting timed out"))??;
    let opens = shares
        .iter()
        .map(|s| ShareOpen {
            name: s.name.clone(),
            ignore: share_patterns(s),
            respect_gitignore: s.respect_gitignore,
        })
        .collect();
    let hello = handshake::hello(env!("CARGO_PKG_VERSION"), opens);
    let (session, welcome) = client_handshake(stream, hello).await?;
    // The run loop says it connected (at most once a minute: see `SyncLoop::run`).
    tracing::debug!(guest_version = %welcome.agent_version, "handshake done");
    Ok((session, addr))
}

/// `metrics_file`: the metrics as `vmsync-host metrics` prints them, kept up to date for
/// node-exporter's textfile collector.
#[derive(Clone)]
struct MetricsFile {
    path: PathBuf,
    /// The `vm` label: the configuration file's stem.
    vm: String,
    shared: Shared,
    /// Held while writing (the periodic task and the one at shutdown share the temp file);
    /// holds the last error logged, so a failing write is logged once, not every 15 s.
    writing: Arc<Mutex<Option<String>>>,
}

impl MetricsFile {
    async fn every(self, interval: Duration) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let this = self.clone();
            // A slow disk must not hold up the runtime's threads.
            let _ = tokio::task::spawn_blocking(move || this.write()).await;
        }
    }

    /// Renders the current status and writes it atomically; logs a failure (once until it
    /// changes or a write succeeds).
    fn write(&self) {
        let ControlResponse::Status { agent, shares } = self.shared.snapshot() else {
            return;
        };
        let text = crate::metrics::render(&self.vm, &agent, &shares);
        let Ok(mut last_error) = self.writing.lock() else {
            return;
        };
        match crate::metrics::write_atomically(&self.path, &text) {
            Ok(()) => *last_error = None,
            Err(e) => {
                let message = e.to_string();
                if last_error.as_deref() != Some(message.as_str()) {
                    tracing::warn!(path = %self.path.display(), "cannot write metrics_file: {message}");
                    *last_error = Some(message);
                }
            }
        }
    }
}

async fn serve_control(
    listener: tokio::net::UnixListener,
    tx: mpsc::Sender<Command<Answering>>,
    shared: Shared,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(control::MAX_CONTROL_CLIENTS));
    loop {
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!("control socket: accept failed: {e}");
                tokio::time::sleep(control::CONTROL_ACCEPT_RETRY).await;
                continue;
            }
        };
        // Too many clients at once: this one is closed (dropped) right away.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let tx = tx.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let response = match control::read_request(&mut stream).await {
                Err(e) => ControlResponse::Error {
                    message: format!("bad request: {e}"),
                },
                Ok(ControlRequest::Status) => shared.snapshot(),
                Ok(ControlRequest::Sync) => ask(&tx, &shared, Command::Sync).await,
                Ok(ControlRequest::Resume { share }) => {
                    ask(&tx, &shared, |reply| Command::Resume { share, reply }).await
                }
                Ok(ControlRequest::Resolve { share, path, keep }) => match parse_path(&path) {
                    Ok(path) => {
                        // Both: the guest's version wins the path, and the host's is kept
                        // under a sibling name first (a second hard link, so nothing is ever
                        // without a name).
                        let (keep, aside) = match keep {
                            Keep::Host => (Side::Host, false),
                            Keep::Guest => (Side::Guest, false),
                            Keep::Both => (Side::Guest, true),
                        };
                        let resolve = |reply| Command::Resolve {
                            share,
                            path,
                            keep,
                            aside,
                            reply,
                        };
                        ask(&tx, &shared, resolve).await
                    }
                    Err(message) => ControlResponse::Error { message },
                },
            };
            let _ = control::write_response(&mut stream, &response).await;
        });
    }
}

/// A conflicting path as `status` shows it, as a path of the share.
fn parse_path(shown: &str) -> Result<RelPath, String> {
    let bytes = control::unescape_path(shown)?;
    RelPath::from_bytes(&bytes).map_err(|e| format!("{shown}: {e}"))
}

/// The control socket's answer to a command: the status at the moment it was done, or why
/// it failed.
struct Answering {
    reply: oneshot::Sender<ControlResponse>,
    shared: Shared,
}

impl Answer for Answering {
    fn answer(self, result: Result<(), String>) {
        let response = match result {
            Ok(()) => self.shared.snapshot(),
            Err(message) => ControlResponse::Error { message },
        };
        let _ = self.reply.send(response);
    }
}

/// Hands a command to the sync loop and waits for its answer.
async fn ask(
    tx: &mpsc::Sender<Command<Answering>>,
    shared: &Shared,
    make: impl FnOnce(Answering) -> Command<Answering>,
) -> ControlResponse {
    let (reply, rx) = oneshot::channel();
    let answering = Answering {
        reply,
        shared: shared.clone(),
    };
    if tx.send(make(answering)).await.is_err() {
        return ControlResponse::Error {
            message: "the sync loop has stopped".into(),
        };
    }
    rx.await.unwrap_or(ControlResponse::Error {
        message: "the sync loop dropped the request".into(),
    })
}

struct SyncLoop {
    /// `READY=1` went to systemd (after the first full sync).
    ready_sent: bool,
    /// Failed cycles' log limiter, kept from one session to the next (see `Live::with_log`).
    cycle_log: Arc<Mutex<LogLimit>>,
    config: HostConfig,
    shares: Vec<Share<LocalEndpoint>>,
    shared: Shared,
    rx: mpsc::Receiver<Command<Answering>>,
}

impl SyncLoop {
    async fn run(&mut self) -> anyhow::Result<()> {
        let mut backoff = RECONNECT_MIN_MS;
        let mut last_error: Option<String> = None;
        // Sessions starting and ending are logged at most once a minute each, with a count of
        // the rest (`vmsync_engine::log_limit`): a guest that breaks every session must not
        // fill the journal.
        let mut logs = LogLimit::default();
        loop {
            self.set_states(ShareState::Connecting);
            match self.connect().await {
                Ok((session, dialled)) => {
                    last_error = None;
                    // A `libvirt:` guest shows the address it resolved to this time.
                    let peer = if dialled == self.config.guest {
                        dialled.to_string()
                    } else {
                        format!("{} ({dialled})", self.config.guest)
                    };
                    self.set_peer(true, Some(peer));
                    self.shared.connects.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut s) = self.shared.session.lock() {
                        *s = Some(session.clone());
                    }
                    let version = vmsync_core::text::escape_text(&session.welcome().agent_version);
                    let began = std::time::Instant::now();
                    if let Some(line) = logs.admit("connected", "connected to guest", began) {
                        tracing::info!(guest = %self.config.guest, address = %dialled, guest_version = %version, "{line}");
                    }
                    let reason = self.connected(session).await;
                    if let Ok(mut s) = self.shared.session.lock() {
                        *s = None;
                    }
                    self.set_peer(false, Some(reason.clone()));
                    let message = format!("guest session ended: {reason}");
                    if let Some(line) = logs.admit("ended", &message, std::time::Instant::now()) {
                        tracing::warn!("{line}");
                    }
                    if began.elapsed() >= SESSION_RESETS_BACKOFF {
                        backoff = RECONNECT_MIN_MS;
                    }
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    // Log a failure once, not on every retry: a guest that is down for an hour
                    // must not fill the journal.
                    if last_error.as_deref() != Some(msg.as_str()) {
                        tracing::warn!(guest = %self.config.guest, "cannot reach guest (retrying): {msg}");
                        last_error = Some(msg.clone());
                    }
                    self.set_peer(false, Some(msg));
                }
            }
            let delay = Duration::from_millis(jitter(backoff));
            backoff = (backoff * 2).min(RECONNECT_MAX_MS);
            schedule::idle(&mut self.shares, &mut self.rx, delay).await;
        }
    }

    /// Dials the guest (see [`dial`]); the caller retries a failure with the same backoff as
    /// any failed dial.
    async fn connect(&self) -> anyhow::Result<(Session, EndpointAddr)> {
        dial(&self.config.guest, &self.config.shares).await
    }

    /// Keeps every share in sync over `session` until it ends (see `vmsync_engine::schedule`):
    /// each side's watcher feeds change hints to the loop. Returns why the session ended.
    async fn connected(&mut self, session: Session) -> String {
        let (hint_tx, mut hint_rx) = mpsc::channel::<(usize, ChangeHints)>(HINT_QUEUE);
        let mut watchers = tokio::task::JoinSet::new();
        let mut remotes = Vec::new();
        for (index, share) in self.shares.iter().enumerate() {
            let (watched, remote) = match (endpoint(&session, index), endpoint(&session, index)) {
                (Ok(w), Ok(r)) => (w, r),
                (Err(e), _) | (_, Err(e)) => return e,
            };
            watchers.spawn(forward_changes(
                share.local.clone(),
                index,
                hint_tx.clone(),
                None,
            ));
            watchers.spawn(forward_changes(
                watched,
                index,
                hint_tx.clone(),
                Some(GUEST_RESCANS),
            ));
            remotes.push(remote);
        }
        // The guest hears how each share stands (its readiness waits for the first sync).
        let converged_once = Arc::new(AtomicBool::new(false));
        let tell_now = Arc::new(tokio::sync::Notify::new());
        let mut told = Vec::new();
        for index in 0..self.shares.len() {
            match endpoint(&session, index) {
                Ok(remote) => told.push(remote),
                Err(e) => return e,
            }
        }
        watchers.spawn(crate::progress::tell_guest(
            self.shares.iter().map(|s| s.controller.status()).collect(),
            told,
            converged_once.clone(),
            tell_now.clone(),
        ));
        let ready_sent = &mut self.ready_sent;
        let synced = || {
            converged_once.store(true, Ordering::Release);
            tell_now.notify_one();
            if !*ready_sent {
                // systemd (Type=notify): started means the first sync is done, so units
                // ordered after this one start on a complete tree.
                notify_systemd::notify(
                    std::env::var_os("NOTIFY_SOCKET"),
                    "READY=1\nSTATUS=first sync done",
                );
                *ready_sent = true;
            }
        };
        Live::new(&mut self.shares, remotes, SessionLink(session))
            .with_log(self.cycle_log.clone())
            .run(&mut hint_rx, &mut self.rx, synced)
            .await
    }

    fn set_states(&self, state: ShareState) {
        for s in &self.shares {
            s.controller.set_state(state);
        }
    }

    fn set_peer(&self, connected: bool, detail: Option<String>) {
        if let Ok(mut p) = self.shared.peer.lock() {
            *p = (connected, detail);
        }
    }
}

/// The session as the sync loop sees it: when it ends, and the content bytes it moved.
struct SessionLink(Session);

impl Link for SessionLink {
    fn closed(&self) -> impl std::future::Future<Output = String> + Send {
        self.0.closed()
    }

    fn content_bytes(&self) -> (u64, u64) {
        let stats = self.0.stats();
        (stats.content_bytes_sent, stats.content_bytes_received)
    }
}

/// The ignore patterns both sides apply to a share: its own, plus the version control
/// directories when `ignore_vcs` is set.
fn share_patterns(share: &HostShare) -> Vec<String> {
    let mut patterns = share.ignore.clone();
    if share.ignore_vcs {
        patterns.extend([".git/", ".hg/", ".svn/"].map(String::from));
    }
    patterns
}

fn endpoint(session: &Session, index: usize) -> Result<RemoteEndpoint, String> {
    u16::try_from(index)
        .map_err(|_| "too many shares".to_string())
        .and_then(|i| session.endpoint(i).map_err(|e| e.to_string()))
}

/// `ms` ± 25 %, so a fleet of hosts restarting together does not reconnect in lockstep. The
/// clock's nanoseconds are random enough for spreading retries.
fn jitter(ms: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()))
        .unwrap_or(0);
    let spread = ms / 2;
    ms - ms / 4 + if spread == 0 { 0 } else { nanos % spread }
}
