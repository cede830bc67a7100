//! `vmsync-host run`: owns the share controllers, keeps a session to the guest alive
//! (reconnecting with exponential backoff and jitter), runs a full cycle of every share after
//! each (re)connect and whenever `sync` asks, and answers the control socket.

use crate::config::{HostConfig, HostShare};
use anyhow::Context;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use vmsync_agent_common::control::{self, AgentInfo, ControlRequest, ControlResponse, Keep};
use vmsync_agent_common::notify_systemd;
use vmsync_core::endpoint::{ChangeHints, Endpoint, ScanScope};
use vmsync_core::reconcile::Side;
use vmsync_core::safety::DeletionLimit;
use vmsync_core::RelPath;
use vmsync_engine::controller::{Controller, ShareSettings};
use vmsync_engine::filter::Filter;
use vmsync_engine::local::LocalEndpoint;
use vmsync_engine::pace::Pacer;
use vmsync_engine::state::StateDb;
use vmsync_engine::status::{ShareState, ShareStatus};
use vmsync_engine::watch::HintSet;
use vmsync_protocol::handshake;
use vmsync_protocol::messages::ShareOpen;
use vmsync_transport::{
    client_handshake, connect, EndpointAddr, RemoteEndpoint, Session, StatsSnapshot,
};

/// First reconnect delay; doubles up to [`RECONNECT_MAX_MS`], with ±25 % jitter.
const RECONNECT_MIN_MS: u64 = 100;
const RECONNECT_MAX_MS: u64 = 5_000;
/// Extra cycles run at once when a cycle found paths that changed under it.
const MAX_RETRY_CYCLES: usize = 3;
/// Hint messages queued between the watchers and the sync loop (each carries a whole set).
const HINT_QUEUE: usize = 64;
/// First delay before retrying a cycle that left work pending; doubles up to the maximum.
const PENDING_RETRY_MIN_MS: u64 = 500;
const PENDING_RETRY_MAX_MS: u64 = 30_000;
/// How long one connection attempt (not the handshake) may take.
const CONNECT_TIMEOUT_MS: u64 = 5_000;

/// A command from the control socket to the sync loop.
enum Command {
    Sync(oneshot::Sender<ControlResponse>),
    Resume(String, oneshot::Sender<ControlResponse>),
    Resolve(Resolve, oneshot::Sender<ControlResponse>),
}

/// A `resolve` request.
struct Resolve {
    share: String,
    path: String,
    keep: Keep,
}

struct Share {
    controller: Controller,
    local: LocalEndpoint,
    config: HostShare,
    /// Bounds how often one path is cycled live (see `vmsync_engine::pace`).
    pacer: Pacer,
}

/// What the control socket reads without disturbing the sync loop.
#[derive(Clone)]
struct Shared {
    statuses: Vec<Arc<Mutex<ShareStatus>>>,
    locals: Vec<LocalEndpoint>,
    peer: Arc<Mutex<(bool, Option<String>)>>,
    /// The live session, for its wire counters.
    session: Arc<Mutex<Option<Session>>>,
}

impl Shared {
    /// A fresh snapshot in place of `response`, unless that is an error.
    fn snapshot_or(&self, response: ControlResponse) -> ControlResponse {
        match response {
            ControlResponse::Error { .. } => response,
            ControlResponse::Status { .. } => self.snapshot(),
        }
    }

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
            },
            shares,
        }
    }
}

pub async fn run(config: HostConfig) -> anyhow::Result<()> {
    let (db, notice) = match StateDb::open_or_recover(&config.state_dir, "host.redb") {
        Ok((db, notice)) => (Arc::new(db), notice),
        Err(e) if e.is_locked() => anyhow::bail!(
            "another vmsync-host is already running with state_dir {}",
            config.state_dir.display()
        ),
        Err(e) => return Err(e).context("opening the state database"),
    };
    let mut shares = Vec::new();
    for share in &config.shares {
        let filter = Filter::new(&share_patterns(share))?.with_gitignore(share.respect_gitignore);
        let settings = ShareSettings {
            name: share.name.clone(),
            mode: share.mode,
            policy: share.conflict,
            filter: filter.clone(),
            deletion_limit: DeletionLimit {
                max_fraction: config.max_delete_fraction,
                ..DeletionLimit::default()
            },
            deletion_exempt: Filter::new(&share.deletion_exempt)?,
        };
        let mut controller = Controller::new(settings, db.clone(), &config.state_dir)?;
        controller.set_min_free(share.min_free);
        controller.adopt_host_path(&share.path)?;
        if let Some(notice) = &notice {
            controller.set_notice(notice.clone());
        }
        let local = LocalEndpoint::new(&share.name, share.path.clone(), filter, db.clone())?;
        local.set_retention(share.retention);
        local.set_min_free(share.min_free);
        shares.push(Share {
            controller,
            local,
            config: share.clone(),
            pacer: Pacer::default(),
        });
    }
    let shared = Shared {
        statuses: shares.iter().map(|s| s.controller.status()).collect(),
        locals: shares.iter().map(|s| s.local.clone()).collect(),
        peer: Arc::new(Mutex::new((false, None))),
        session: Arc::new(Mutex::new(None)),
    };

    let (tx, rx) = mpsc::channel::<Command>(16);
    let listener = control::bind(&config.control)
        .with_context(|| format!("binding the control socket {}", config.control.display()))?;
    tokio::spawn(serve_control(listener, tx, shared.clone()));
    tracing::info!(guest = %config.guest, shares = shares.len(), "vmsync-host started");

    let mut sync = SyncLoop {
        ready_sent: false,
        config,
        shares,
        shared,
        rx,
    };
    tokio::select! {
        r = sync.run() => r,
        _ = vmsync_agent_common::process::shutdown_signal() => {
            tracing::info!("shutting down");
            Ok(())
        }
    }
}

async fn serve_control(
    listener: tokio::net::UnixListener,
    tx: mpsc::Sender<Command>,
    shared: Shared,
) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let tx = tx.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let response = match control::read_request(&mut stream).await {
                Err(e) => ControlResponse::Error {
                    message: format!("bad request: {e}"),
                },
                Ok(ControlRequest::Status) => shared.snapshot(),
                Ok(ControlRequest::Sync) => ask(&tx, Command::Sync).await,
                Ok(ControlRequest::Resume { share }) => {
                    ask(&tx, |r| Command::Resume(share, r)).await
                }
                Ok(ControlRequest::Resolve { share, path, keep }) => {
                    ask(&tx, |r| Command::Resolve(Resolve { share, path, keep }, r)).await
                }
            };
            let _ = control::write_response(&mut stream, &response).await;
        });
    }
}

async fn ask(
    tx: &mpsc::Sender<Command>,
    make: impl FnOnce(oneshot::Sender<ControlResponse>) -> Command,
) -> ControlResponse {
    let (reply, rx) = oneshot::channel();
    if tx.send(make(reply)).await.is_err() {
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
    config: HostConfig,
    shares: Vec<Share>,
    shared: Shared,
    rx: mpsc::Receiver<Command>,
}

impl SyncLoop {
    async fn run(&mut self) -> anyhow::Result<()> {
        let mut backoff = RECONNECT_MIN_MS;
        let mut last_error: Option<String> = None;
        loop {
            self.set_states(ShareState::Connecting);
            match self.connect().await {
                Ok(session) => {
                    backoff = RECONNECT_MIN_MS;
                    last_error = None;
                    self.set_peer(true, Some(self.config.guest.to_string()));
                    if let Ok(mut s) = self.shared.session.lock() {
                        *s = Some(session.clone());
                    }
                    tracing::info!(guest = %self.config.guest, "connected to guest");
                    let reason = self.connected(session).await;
                    if let Ok(mut s) = self.shared.session.lock() {
                        *s = None;
                    }
                    self.set_peer(false, Some(reason.clone()));
                    tracing::warn!("guest session ended: {reason}");
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
            let delay = jitter(backoff);
            backoff = (backoff * 2).min(RECONNECT_MAX_MS);
            self.idle(Duration::from_millis(delay)).await;
        }
    }

    async fn connect(&self) -> anyhow::Result<Session> {
        let addr: EndpointAddr = self.config.guest.to_string().parse()?;
        let stream =
            tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), connect(&addr))
                .await
                .map_err(|_| anyhow::anyhow!("connecting timed out"))??;
        let opens = self
            .shares
            .iter()
            .map(|s| ShareOpen {
                name: s.config.name.clone(),
                ignore: share_patterns(&s.config),
                respect_gitignore: s.config.respect_gitignore,
            })
            .collect();
        let hello = handshake::hello(env!("CARGO_PKG_VERSION"), opens);
        let (session, welcome) = client_handshake(stream, hello).await?;
        tracing::info!(guest_version = %welcome.agent_version, "handshake done");
        Ok(session)
    }

    /// Serves commands while disconnected, for `delay`.
    async fn idle(&mut self, delay: Duration) {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return,
                cmd = self.rx.recv() => match cmd {
                    Some(Command::Sync(reply)) | Some(Command::Resolve(_, reply)) => {
                        let _ = reply.send(ControlResponse::Error { message: "not connected to the guest".into() });
                    }
                    Some(Command::Resume(name, reply)) => {
                        let response = self.resume(&name);
                        // Lifted while there is no guest: the share waits for the connection.
                        for share in self.shares.iter().filter(|s| s.config.name == name) {
                            share.controller.set_state(ShareState::Connecting);
                        }
                        let _ = reply.send(self.shared.snapshot_or(response));
                    }
                    None => std::future::pending::<()>().await,
                },
            }
        }
    }

    /// Syncs everything, then keeps both sides in sync live until the session ends: each
    /// side's watcher feeds change hints, and the hints that pile up while a cycle runs become
    /// the scope of the next one. Also serves commands and retries pending work. Returns why
    /// the session ended.
    async fn connected(&mut self, session: Session) -> String {
        let (hint_tx, mut hint_rx) = mpsc::channel::<(usize, ChangeHints)>(HINT_QUEUE);
        let mut watchers = tokio::task::JoinSet::new();
        for (index, share) in self.shares.iter().enumerate() {
            let remote = match endpoint(&session, index) {
                Ok(r) => r,
                Err(e) => return e,
            };
            watchers.spawn(forward_changes(share.local.clone(), index, hint_tx.clone()));
            watchers.spawn(forward_changes(remote, index, hint_tx.clone()));
        }
        let remotes = (0..self.shares.len()).map(|index| endpoint(&session, index));
        let mut link = match remotes.collect() {
            Ok(remotes) => Link {
                session: session.clone(),
                remotes,
            },
            Err(e) => return e,
        };
        let mut hints: Vec<HintSet> = self.shares.iter().map(|_| HintSet::default()).collect();
        let mut pending_delay = PENDING_RETRY_MIN_MS;
        let mut pending = match self.sync_all(&mut link, None).await {
            Ok(p) => p,
            Err(e) => return e,
        };
        if !self.ready_sent {
            // systemd (Type=notify): started means the first sync is done, so units ordered
            // after this one start on a complete tree.
            notify_systemd::notify(
                std::env::var_os("NOTIFY_SOCKET"),
                "READY=1\nSTATUS=first sync done",
            );
            self.ready_sent = true;
        }
        loop {
            let retry = tokio::time::sleep(Duration::from_millis(pending_delay));
            let bulk = self.shares.iter().position(|s| s.controller.has_bulk());
            // Paths held back by pacing go when their time comes.
            let paced = self.shares.iter().filter_map(|s| s.pacer.next_due()).min();
            let paced_sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(
                paced.unwrap_or_else(std::time::Instant::now),
            ));
            // Biased: hints and commands come first, so a big file crossing in bulk steps
            // never holds up the live cycles of everything else.
            tokio::select! {
                biased;
                reason = session.closed() => return reason,
                Some((index, h)) = hint_rx.recv() => {
                    merge(&mut hints, index, h);
                    // Take everything else already waiting: one cycle for a whole burst.
                    while let Ok((index, h)) = hint_rx.try_recv() {
                        merge(&mut hints, index, h);
                    }
                    pending = match self.sync_all(&mut link, Some(&mut hints)).await {
                        Ok(p) => p,
                        Err(e) => return e,
                    };
                }
                () = paced_sleep, if paced.is_some() => {
                    pending = match self.sync_all(&mut link, Some(&mut hints)).await {
                        Ok(p) => p,
                        Err(e) => return e,
                    };
                }
                () = std::future::ready(()), if bulk.is_some() => {
                    let index = bulk.unwrap_or_default();
                    pending |= match self.bulk_step(&mut link, index, &mut hints).await {
                        Ok(p) => p,
                        Err(e) => return e,
                    };
                }
                _ = retry, if pending => {
                    pending_delay = (pending_delay * 2).min(PENDING_RETRY_MAX_MS);
                    pending = match self.sync_all(&mut link, None).await {
                        Ok(p) => p,
                        Err(e) => return e,
                    };
                }
                cmd = self.rx.recv() => {
                    let (result, reply, response) = match cmd {
                        Some(Command::Sync(reply)) => (self.sync_all(&mut link, None).await, reply, None),
                        Some(Command::Resume(name, reply)) => {
                            // Answer as soon as the halt is lifted: the add-only merge that
                            // follows can take long, and `wait` is there to watch it.
                            let response = self.resume(&name);
                            let lifted = !matches!(response, ControlResponse::Error { .. });
                            let _ = reply.send(response);
                            if lifted {
                                pending = match self.sync_all(&mut link, None).await {
                                    Ok(p) => p,
                                    Err(e) => return e,
                                };
                            }
                            continue;
                        }
                        Some(Command::Resolve(request, reply)) => {
                            let response = match self.resolve(&mut link, request, &mut hints).await {
                                Ok(Ok(p)) => {
                                    pending |= p;
                                    self.shared.snapshot()
                                }
                                Ok(Err(message)) => ControlResponse::Error { message },
                                Err(e) => {
                                    let _ = reply.send(ControlResponse::Error { message: e.clone() });
                                    return e;
                                }
                            };
                            let _ = reply.send(response);
                            continue;
                        }
                        None => return "control channel closed".into(),
                    };
                    match result {
                        Ok(p) => {
                            pending = p;
                            let _ = reply.send(response.unwrap_or_else(|| self.shared.snapshot()));
                        }
                        Err(e) => {
                            let _ = reply.send(ControlResponse::Error { message: e.clone() });
                            return e;
                        }
                    }
                }
            }
            if !pending {
                pending_delay = PENDING_RETRY_MIN_MS;
            }
        }
    }

    /// A cycle of every share: a full one when `hints` is `None`, else a targeted one for each
    /// share with hints (taking them). Paths that changed under a cycle get quick extra cycles.
    /// `Ok(true)` when some share still has work pending; `Err` when the session is unusable.
    async fn sync_all(
        &mut self,
        link: &mut Link,
        mut hints: Option<&mut Vec<HintSet>>,
    ) -> Result<bool, String> {
        let mut pending = false;
        for (index, share) in self.shares.iter_mut().enumerate() {
            if let Some(h) = hints.as_deref_mut().and_then(|h| h.get_mut(index)) {
                let controller = &share.controller;
                share.pacer.admit(h, std::time::Instant::now(), |path| {
                    controller.is_known_dir(path)
                });
            }
            let mut scope = match hints.as_deref_mut().and_then(|h| h.get_mut(index)) {
                None => ScanScope::Full,
                Some(h) if h.is_empty() => {
                    show_held(share);
                    continue;
                }
                Some(h) => {
                    let taken = h.take();
                    if taken.rescan {
                        ScanScope::Full
                    } else {
                        ScanScope::Paths(taken.paths)
                    }
                }
            };
            share.controller.set_state(ShareState::Syncing);
            let remote = link.remotes.get_mut(index).ok_or(NO_ENDPOINT)?;
            let mut share_pending = true;
            for _ in 0..=MAX_RETRY_CYCLES {
                let before = link.session.stats();
                let result = share
                    .controller
                    .cycle(&mut share.local, remote, scope.clone())
                    .await;
                credit_wire_bytes(&share.controller, &link.session, &before);
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
                        tracing::error!(share = %share.config.name, "cycle failed: {e}");
                        break;
                    }
                }
            }
            pending |= share_pending;
            show_held(share);
        }
        Ok(pending)
    }

    /// One step of share `index`'s oldest bulk transfer; when it lands, a targeted cycle of
    /// its paths. `Ok(true)` when work is pending; `Err` when the session is unusable.
    async fn bulk_step(
        &mut self,
        link: &mut Link,
        index: usize,
        hints: &mut Vec<HintSet>,
    ) -> Result<bool, String> {
        let Some(share) = self.shares.get_mut(index) else {
            return Ok(false);
        };
        let remote = link.remotes.get_mut(index).ok_or(NO_ENDPOINT)?;
        let before = link.session.stats();
        let result = share.controller.bulk_step(&mut share.local, remote).await;
        credit_wire_bytes(&share.controller, &link.session, &before);
        match result {
            Err(e) if e.is_disconnect() => return Err(e.to_string()),
            Err(e) => tracing::error!(share = %share.config.name, "bulk transfer failed: {e}"),
            Ok(()) => {}
        }
        let rehint = share.controller.take_rehints();
        if rehint.is_empty() {
            return Ok(false);
        }
        merge(
            hints,
            index,
            ChangeHints {
                paths: rehint,
                rescan: false,
            },
        );
        self.sync_all(link, Some(hints)).await
    }

    /// `vmsync-host resolve`: settles one conflict and runs a cycle of its path(s).
    /// `Ok(Err(why))` when it cannot be done; `Err` when the session is unusable.
    async fn resolve(
        &mut self,
        link: &mut Link,
        request: Resolve,
        hints: &mut Vec<HintSet>,
    ) -> Result<Result<bool, String>, String> {
        let Some(index) = self
            .shares
            .iter()
            .position(|s| s.config.name == request.share)
        else {
            return Ok(Err(format!("no share named `{}`", request.share)));
        };
        let path = match control::unescape_path(&request.path)
            .and_then(|b| RelPath::from_bytes(&b).map_err(|e| format!("{}: {e}", request.path)))
        {
            Ok(p) if !p.is_root() => p,
            Ok(_) => return Ok(Err("give the conflicting path, not the share root".into())),
            Err(e) => return Ok(Err(e)),
        };
        let remote = link.remotes.get_mut(index).ok_or(NO_ENDPOINT)?;
        let Some(share) = self.shares.get_mut(index) else {
            return Ok(Err(format!("no share named `{}`", request.share)));
        };
        // Both: the guest's version wins the path, and the host's is kept under a sibling
        // name first (a second hard link, so nothing is ever without a name).
        let keep = match request.keep {
            Keep::Host => Side::Host,
            Keep::Guest | Keep::Both => Side::Guest,
        };
        if let Err(e) = share
            .controller
            .resolve(&mut share.local, remote, &path, keep)
            .await
        {
            return Ok(Err(e));
        }
        let mut paths = vec![path.clone()];
        if request.keep == Keep::Both {
            match keep_aside(&share.config.path, &path) {
                Ok(sibling) => {
                    tracing::info!(share = %share.config.name, "the host's {} is kept as {}", path.escaped(), sibling.escaped());
                    paths.push(sibling);
                }
                Err(e) => return Ok(Err(e)),
            }
        }
        merge(
            hints,
            index,
            ChangeHints {
                paths,
                rescan: false,
            },
        );
        self.sync_all(link, Some(hints)).await.map(Ok)
    }

    fn resume(&mut self, name: &str) -> ControlResponse {
        let Some(share) = self.shares.iter_mut().find(|s| s.config.name == name) else {
            return ControlResponse::Error {
                message: format!("no share named `{name}`"),
            };
        };
        match share.controller.resume() {
            Ok(true) => self.shared.snapshot(),
            Ok(false) => ControlResponse::Error {
                message: format!("share `{name}` is not halted"),
            },
            Err(e) => ControlResponse::Error {
                message: format!("resume failed: {e}"),
            },
        }
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

/// A share with paths held back by pacing is not in sync yet (so `wait` waits for them).
fn show_held(share: &Share) {
    if share.pacer.next_due().is_none() {
        return;
    }
    if let Ok(mut s) = share.controller.status().lock() {
        if s.state == ShareState::InSync {
            s.state = ShareState::Syncing;
        }
    }
}

/// Links the host's version of `path` under a sibling name no file has
/// (`NAME.host-conflict-STAMP[.EXT]`, [`sibling_name`]), through the trash so that the link is
/// made by the root-confined calls and never replaces anything. Returns the sibling.
fn keep_aside(share_dir: &std::path::Path, path: &RelPath) -> Result<RelPath, String> {
    use vmsync_engine::root::ShareRoot;
    let root = ShareRoot::open(share_dir)
        .map_err(|e| format!("opening the host share {}: {e}", share_dir.display()))?;
    let kept = root
        .trash_link(path)
        .map_err(|e| format!("keeping the host's {}: {e}", path.escaped()))?;
    let stamp =
        vmsync_engine::trash::format_rfc3339(vmsync_engine::trash::now()).replace([':', '-'], "");
    for attempt in 1..=SIBLING_ATTEMPTS {
        let Some(sibling) = sibling_name(path, &stamp, attempt) else {
            break;
        };
        match root.restore_kept(&kept.batch, &kept.path, &sibling) {
            Ok(()) => return Ok(sibling),
            Err(e) if e.kind() == vmsync_engine::root::FsErrorKind::Exists => continue,
            Err(e) => return Err(format!("keeping the host's {}: {e}", path.escaped())),
        }
    }
    Err(format!(
        "no free sibling name for the host's {} (it stays in the host's trash)",
        path.escaped()
    ))
}

/// Sibling names tried before `resolve --keep both` gives up.
const SIBLING_ATTEMPTS: u32 = 16;

/// `dir/report.txt` → `dir/report.host-conflict-STAMP.txt` (`-N` added from the second
/// attempt); a name with no extension (or only a leading dot) gets the suffix at its end.
fn sibling_name(path: &RelPath, stamp: &str, attempt: u32) -> Option<RelPath> {
    let name = path.name()?;
    let split = name
        .iter()
        .rposition(|&b| b == b'.')
        .filter(|&i| i > 0)
        .unwrap_or(name.len());
    let (stem, ext) = name.split_at(split);
    let mut new = stem.to_vec();
    new.extend_from_slice(format!(".host-conflict-{stamp}").as_bytes());
    if attempt > 1 {
        new.extend_from_slice(format!("-{attempt}").as_bytes());
    }
    new.extend_from_slice(ext);
    match path.parent() {
        Some(parent) => parent.join(&new).ok(),
        None => RelPath::root().join(&new).ok(),
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

/// Forwards a side's change hints to the sync loop until the side or the loop goes away.
async fn forward_changes<E: Endpoint>(
    mut side: E,
    index: usize,
    tx: mpsc::Sender<(usize, ChangeHints)>,
) {
    loop {
        match side.changes().await {
            Ok(h) => {
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

/// Credits the content bytes the session moved since `before` to `controller`'s share: work
/// runs one share at a time, so the session's counters moved only for it meanwhile.
fn credit_wire_bytes(controller: &Controller, session: &Session, before: &StatsSnapshot) {
    let after = session.stats();
    controller.add_wire_bytes(
        after.content_bytes_sent - before.content_bytes_sent,
        after.content_bytes_received - before.content_bytes_received,
    );
}

fn merge(sets: &mut [HintSet], index: usize, hints: ChangeHints) {
    let Some(set) = sets.get_mut(index) else {
        return;
    };
    if hints.rescan {
        set.add_rescan();
    }
    for p in hints.paths {
        set.add(p);
    }
}

/// The session to the guest and one remote endpoint per share, kept for the session's life:
/// each holds what it learned of its share (the last listing, big files' manifests), which
/// makes the next full scan a difference and a big file's next stage a list of edits.
struct Link {
    session: Session,
    remotes: Vec<RemoteEndpoint>,
}

/// A share index without a remote endpoint: the shares and the session's `Hello` disagree.
const NO_ENDPOINT: &str = "no remote endpoint for a share";

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
