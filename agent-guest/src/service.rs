//! `vmsync-guest run`: listen for the host, serve one session at a time (a new connection
//! replaces the old one: the host reconnected), and answer the control socket.

use crate::config::GuestConfig;
use crate::readiness::Notifier;
use anyhow::Context;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use vmsync_agent_common::control::{self, AgentInfo, ControlRequest, ControlResponse};
use vmsync_core::progress::SyncState;
use vmsync_engine::filter::Filter;
use vmsync_engine::local::LocalEndpoint;
use vmsync_engine::state::StateDb;
use vmsync_engine::status::{ShareState, ShareStatus};
use vmsync_protocol::handshake;
use vmsync_transport::{EndpointAddr, ServerConfig, ShareStats, Stats};

#[derive(Clone)]
struct Shared {
    exports: Arc<BTreeMap<String, LocalEndpoint>>,
    /// The current host session, if any: its peer description.
    peer: Arc<Mutex<Option<String>>>,
    /// Counters of the current (or last) host session.
    wire: Arc<Mutex<Arc<Stats>>>,
    /// Per share: what the sessions before the current one moved, and the current session's
    /// share names in the order the host opened them (its counters are by that index).
    counters: Arc<Mutex<Counters>>,
    /// What the host says of each share; tells systemd (see `crate::readiness`).
    readiness: Notifier,
}

#[derive(Default)]
struct Counters {
    past: BTreeMap<String, ShareStats>,
    current: Vec<String>,
}

impl Counters {
    /// Folds the ending session's per-share counters into `past` and starts a new session.
    fn new_session(&mut self, ended: &Stats) {
        for (index, name) in std::mem::take(&mut self.current).into_iter().enumerate() {
            let Ok(index) = u16::try_from(index) else {
                break;
            };
            let moved = ended.share(index);
            let total = self.past.entry(name).or_default();
            total.content_bytes_sent += moved.content_bytes_sent;
            total.content_bytes_received += moved.content_bytes_received;
            total.scans += moved.scans;
        }
    }

    /// Everything share `name` moved, this session included.
    fn of(&self, name: &str, session: &Stats) -> ShareStats {
        let mut total = self.past.get(name).copied().unwrap_or_default();
        if let Some(index) = self.current.iter().position(|n| n == name) {
            if let Ok(index) = u16::try_from(index) {
                let now = session.share(index);
                total.content_bytes_sent += now.content_bytes_sent;
                total.content_bytes_received += now.content_bytes_received;
                total.scans += now.scans;
            }
        }
        total
    }
}

impl Shared {
    fn snapshot(&self) -> ControlResponse {
        let peer = self.peer.lock().map(|p| p.clone()).unwrap_or(None);
        let session = self.wire.lock().map(|w| w.clone()).ok();
        let wire = session.as_ref().map(|w| w.snapshot()).unwrap_or_default();
        let counters = self.counters.lock().ok();
        let moved = |name: &str| match (&counters, &session) {
            (Some(c), Some(s)) => c.of(name, s),
            _ => ShareStats::default(),
        };
        let shares = self
            .exports
            .iter()
            .map(|(name, ep)| {
                let (files, bytes) = ep.indexed_totals();
                let (trash_files, trash_bytes) = ep.trash_totals();
                let moved = moved(name);
                // The host decides conflicts and halts, and says how each share stands.
                let told = peer.as_ref().and(self.readiness.state(name));
                let (state, halt_code, progress) = match told {
                    None if peer.is_some() => (ShareState::Syncing, None, None),
                    None => (ShareState::Connecting, None, None),
                    Some(SyncState::Syncing(p)) => (ShareState::Syncing, None, p),
                    Some(SyncState::InSync) => (ShareState::InSync, None, None),
                    Some(SyncState::Conflicted { .. }) => (ShareState::Conflicted, None, None),
                    Some(SyncState::Halted { code }) => (ShareState::Halted, Some(code), None),
                };
                ShareStatus {
                    name: name.clone(),
                    state,
                    halt_code,
                    progress,
                    files,
                    bytes,
                    files_hashed: ep.files_hashed(),
                    bytes_sent: moved.content_bytes_sent,
                    bytes_received: moved.content_bytes_received,
                    // The host runs the cycles; each scans this side once.
                    cycles: moved.scans,
                    watching: ep.is_watching(),
                    watched_dirs: ep.watched_dirs(),
                    watch_problem: ep.watch_problem(),
                    trash_files,
                    trash_bytes,
                    ..ShareStatus::default()
                }
            })
            .collect();
        ControlResponse::Status {
            agent: AgentInfo {
                role: "vmsync-guest".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
                peer: if peer.is_some() {
                    "connected"
                } else {
                    "disconnected"
                }
                .into(),
                peer_detail: peer,
                rss_bytes: control::rss_bytes(),
                bytes_sent: wire.content_bytes_sent,
                bytes_received: wire.content_bytes_received,
                reconnects: None,
            },
            shares,
        }
    }
}

/// Runs the guest agent; each share stages at most `max_staged` files at once (see
/// `vmsync_agent_common::process::max_staged_files`).
pub async fn run(config: GuestConfig, max_staged: usize) -> anyhow::Result<()> {
    vmsync_agent_common::process::spawn_heap_trimmer();
    vmsync_agent_common::notify_systemd::spawn_watchdog();
    let (db, notice) = match StateDb::open_or_recover(&config.state_dir, "guest.redb") {
        Ok((db, notice)) => (Arc::new(db), notice),
        Err(e) if e.is_locked() => anyhow::bail!(
            "another vmsync-guest is already running with state_dir {}",
            config.state_dir.display()
        ),
        Err(e) => return Err(e).context("opening the state database"),
    };
    // Logged where it was found; the guest's index is a cache, rebuilt by the next scans.
    drop(notice);
    let readiness = Notifier::default();
    readiness.update(|r| r.session_ended(0));
    let mut exports = BTreeMap::new();
    for share in &config.shares {
        // The request loop awaits one call at a time: the share's work can run on its thread.
        let ep = LocalEndpoint::new(&share.name, share.path.clone(), Filter::none(), db.clone())?
            .on_calling_thread();
        ep.set_retention(share.retention);
        ep.set_min_free(share.min_free);
        ep.set_max_staged(max_staged);
        let (name, notifier) = (share.name.clone(), readiness.clone());
        ep.observe_sync(Arc::new(move |state| {
            notifier.update(|r| r.heard(&name, state));
        }));
        exports.insert(share.name.clone(), ep);
    }
    let shared = Shared {
        exports: Arc::new(exports),
        peer: Arc::new(Mutex::new(None)),
        wire: Arc::new(Mutex::new(Arc::new(Stats::default()))),
        counters: Arc::new(Mutex::new(Counters::default())),
        readiness,
    };

    let control_listener = control::bind(&config.control)
        .await
        .with_context(|| format!("binding the control socket {}", config.control.display()))?;
    tokio::spawn(serve_control(control_listener, shared.clone()));

    let listen: EndpointAddr = config.listen.to_string().parse()?;
    let listener = vmsync_transport::listen(&listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    tracing::info!(listen = %listen, shares = shared.exports.len(), "vmsync-guest started");
    // READY=1 waits for the host's first sync (see `crate::readiness`).

    let mut current: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = vmsync_agent_common::process::shutdown_signal() => {
                tracing::info!("shutting down");
                return Ok(());
            }
        };
        if let Some(previous) = current.take() {
            // One host per guest: a new connection means the host reconnected, and the old
            // session is dead or about to be.
            previous.abort();
        }
        let shared = shared.clone();
        let max_write_bytes = config.max_write_bytes;
        current = Some(tokio::spawn(async move {
            if let Ok(mut p) = shared.peer.lock() {
                *p = Some(peer.clone());
            }
            tracing::info!(peer = %peer, "host connected");
            let exports = shared.exports.clone();
            let stats = Arc::new(Stats::default());
            if let Ok(mut w) = shared.wire.lock() {
                if let Ok(mut c) = shared.counters.lock() {
                    c.new_session(&w);
                }
                *w = stats.clone();
            }
            let counters = shared.counters.clone();
            let readiness = shared.readiness.clone();
            let mut session = 0;
            readiness.update(|r| {
                let messages = r.session_started();
                session = r.session();
                messages
            });
            let opened = readiness.clone();
            let server = ServerConfig {
                stats,
                ..ServerConfig::default()
            };
            // Every write to the host is capped (the 32 KiB vsock trap, see config.rs).
            let stream = vmsync_transport::CappedWrite::new(stream, max_write_bytes);
            let result = vmsync_transport::serve_with(
                stream,
                move |open| {
                    let ep = exports
                        .get(&open.name)
                        .ok_or_else(|| handshake::share_not_exported(&open.name))?;
                    // Called once per share, in the order the host opened them: the session
                    // counts each share by that index.
                    if let Ok(mut c) = counters.lock() {
                        c.current.push(open.name.clone());
                    }
                    opened.update(|r| {
                        r.opened(&open.name);
                        Vec::new()
                    });
                    let filter = Filter::new(&open.ignore)
                        .map_err(|e| e.to_string())?
                        .with_gitignore(open.respect_gitignore);
                    ep.set_filter(filter);
                    Ok(ep.clone())
                },
                env!("CARGO_PKG_VERSION"),
                server,
            )
            .await;
            match result {
                Ok(()) => tracing::info!(peer = %peer, "host disconnected"),
                Err(e) => tracing::warn!(peer = %peer, "host session ended: {e}"),
            }
            if let Ok(mut p) = shared.peer.lock() {
                *p = None;
            }
            readiness.update(|r| r.session_ended(session));
        }));
    }
}

async fn serve_control(listener: tokio::net::UnixListener, shared: Shared) {
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
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let response = match control::read_request(&mut stream).await {
                Ok(ControlRequest::Status) => shared.snapshot(),
                Ok(_) => ControlResponse::Error {
                    message: "the guest only answers status; sync and resume are the host's".into(),
                },
                Err(e) => ControlResponse::Error {
                    message: format!("bad request: {e}"),
                },
            };
            let _ = control::write_response(&mut stream, &response).await;
        });
    }
}
