//! The host's side of a session: the handshake, then a cloneable [`Session`] handle through
//! which any number of tasks send requests concurrently.
//!
//! Structure: a writer task owns the write half and sends encoded messages from a bounded queue
//! (and a `Ping` whenever nothing was sent for a heartbeat interval); a reader task owns the read
//! half and hands each response to the waiting caller through a map `id → oneshot`. Requests
//! are encoded and validated in the caller's task, so a message that breaks a wire bound fails
//! that call alone. A semaphore caps outstanding requests at the server's limit; a waiter keeps
//! its permit until its response arrives, so even a caller that gives up early cannot make the
//! client exceed the limit.
//!
//! The session dies on the first of: the guest closing the connection, an I/O error, a byte
//! stream that breaks the protocol (undecodable, a message that is not a response, a response to
//! no request), silence past the limit, a request past its backstop timeout, [`Session::close`],
//! or every handle being dropped. Then every pending request resolves to
//! `EndpointError::Disconnected` with the reason, and [`Session::closed`] returns it.

use super::framing::{self, millis, Reader, Writer};
use super::stats::{Stats, StatsSnapshot};
use crate::error::{error_chain, TransportError};
use crate::limits::{
    HANDSHAKE_TIMEOUT_MS, HEARTBEAT_INTERVAL_MS, PEER_SILENCE_LIMIT_MS, REQUEST_TIMEOUT_MS,
    WRITE_QUEUE_MESSAGES,
};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use vmsync_core::endpoint::EndpointError;
use vmsync_core::path::escape_bytes;
use vmsync_protocol::handshake::check_welcome;
use vmsync_protocol::limits::{MAX_HANDSHAKE_BYTES, MAX_MESSAGE_BYTES, MAX_OUTSTANDING_REQUESTS};
use vmsync_protocol::{
    encode_message, CodecError, Hello, Message, Request, RequestBody, RequestKind, Response,
    ResponseBody, Validate, Welcome,
};

/// Timing and concurrency of a client session. `Default` uses [`crate::limits`].
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub handshake_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub silence_limit: Duration,
    pub request_timeout: Duration,
    /// Clamped to `1..=MAX_OUTSTANDING_REQUESTS` (the server's limit).
    pub max_outstanding: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            handshake_timeout: Duration::from_millis(HANDSHAKE_TIMEOUT_MS),
            heartbeat_interval: Duration::from_millis(HEARTBEAT_INTERVAL_MS),
            silence_limit: Duration::from_millis(PEER_SILENCE_LIMIT_MS),
            request_timeout: Duration::from_millis(REQUEST_TIMEOUT_MS),
            max_outstanding: MAX_OUTSTANDING_REQUESTS,
        }
    }
}

/// Opens a session over `stream` with the default [`SessionConfig`].
pub async fn client_handshake<S>(
    stream: S,
    hello: Hello,
) -> Result<(Session, Welcome), TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    client_handshake_with(stream, hello, SessionConfig::default()).await
}

/// Sends `hello`, waits for the guest's answer (within the handshake timeout), checks it, and
/// starts the session's tasks. Must be called within a tokio runtime.
pub async fn client_handshake_with<S>(
    stream: S,
    hello: Hello,
    config: SessionConfig,
) -> Result<(Session, Welcome), TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    hello.validate().map_err(TransportError::InvalidHello)?;
    let stats = Arc::new(Stats::default());
    let (mut reader, mut writer) = framing::framed(stream, &stats, config.silence_limit);

    let exchange = async {
        let bytes = encode_message(&Message::Hello(hello.clone()), MAX_HANDSHAKE_BYTES).map_err(
            |e| match e {
                CodecError::Invalid(v) => TransportError::InvalidHello(v),
                other => TransportError::Encode(other),
            },
        )?;
        writer.send(Bytes::from(bytes)).await?;
        match reader.next().await {
            None => Err(TransportError::ClosedDuringHandshake),
            Some(Err(e)) => Err(e.into()),
            Some(Ok(Message::Welcome(welcome))) => {
                check_welcome(&hello, &welcome).map_err(TransportError::BadWelcome)?;
                Ok(welcome)
            }
            Some(Ok(Message::Refused(refused))) => Err(TransportError::Refused {
                reason: escape_bytes(refused.reason.as_bytes()),
            }),
            Some(Ok(other)) => Err(TransportError::Protocol(format!(
                "expected Welcome or Refused, got {}",
                other.kind()
            ))),
        }
    };
    let welcome = framing::within(config.handshake_timeout, exchange).await?;
    framing::handshake_done(&mut reader, &mut writer);

    let max_outstanding = config.max_outstanding.clamp(1, MAX_OUTSTANDING_REQUESTS);
    let (closed, _) = watch::channel(None);
    let inner = Arc::new(Inner {
        state: Mutex::new(State::default()),
        next_id: AtomicU64::new(1),
        permits: Arc::new(Semaphore::new(max_outstanding)),
        closed,
        stats,
        config,
        shares: hello.shares.iter().map(|s| s.name.clone()).collect(),
        welcome: welcome.clone(),
    });
    let (tx, rx) = mpsc::channel(WRITE_QUEUE_MESSAGES);
    tokio::spawn(read_loop(reader, inner.clone()));
    tokio::spawn(write_loop(writer, rx, inner.clone()));
    Ok((Session { inner, tx }, welcome))
}

/// A handle on an open session. Cheap to clone; all clones share one connection. The session
/// closes when [`Session::close`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct Session {
    pub(crate) inner: Arc<Inner>,
    tx: mpsc::Sender<Bytes>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("shares", &self.inner.shares)
            .field("closed", &self.inner.lock().closed)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    state: Mutex<State>,
    next_id: AtomicU64,
    permits: Arc<Semaphore>,
    closed: watch::Sender<Option<String>>,
    pub(crate) stats: Arc<Stats>,
    config: SessionConfig,
    shares: Vec<String>,
    welcome: Welcome,
}

#[derive(Default)]
struct State {
    waiters: HashMap<u64, Waiter>,
    /// The id of the one heartbeat in flight, if any.
    heartbeat: Option<u64>,
    /// Why the session ended, once it has.
    closed: Option<String>,
}

struct Waiter {
    tx: oneshot::Sender<ResponseBody>,
    /// Released when the response arrives (or the session ends), not when the caller stops
    /// waiting: the server counts the request as outstanding until it has answered. Pings hold
    /// none: the server answers them without queueing.
    _permit: Option<OwnedSemaphorePermit>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock; if one ever did, the map is still
        // consistent (every operation on it is a single insert or remove).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reason(&self) -> String {
        self.lock()
            .closed
            .clone()
            .unwrap_or_else(|| "session closed".to_owned())
    }

    /// Ends the session: the first reason wins, every waiter is dropped (its caller sees
    /// `Disconnected`), and both tasks stop.
    pub(crate) fn close(&self, reason: String) {
        let waiters = {
            let mut st = self.lock();
            if st.closed.is_some() {
                return;
            }
            tracing::debug!(reason = %reason, "session closed");
            st.closed = Some(reason.clone());
            st.heartbeat = None;
            std::mem::take(&mut st.waiters)
        };
        drop(waiters);
        self.closed.send_replace(Some(reason));
    }

    fn register(
        &self,
        id: u64,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<oneshot::Receiver<ResponseBody>, EndpointError> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.lock();
        if let Some(reason) = &st.closed {
            return Err(EndpointError::Disconnected(reason.clone()));
        }
        st.waiters.insert(
            id,
            Waiter {
                tx,
                _permit: permit,
            },
        );
        Ok(rx)
    }

    fn unregister(&self, id: u64) {
        let waiter = self.lock().waiters.remove(&id);
        drop(waiter);
    }

    /// Allocates the id of a new heartbeat, unless one is already in flight or the session
    /// is closed.
    fn start_heartbeat(&self) -> Option<u64> {
        let mut st = self.lock();
        if st.closed.is_some() || st.heartbeat.is_some() {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        st.heartbeat = Some(id);
        Some(id)
    }

    /// Hands a response to its waiter. `Err` is a protocol violation that ends the session.
    fn deliver(&self, response: Response) -> Result<(), String> {
        let mut st = self.lock();
        if st.heartbeat == Some(response.id) {
            st.heartbeat = None;
            return match response.body {
                ResponseBody::Pong => Ok(()),
                other => Err(format!(
                    "the guest answered a heartbeat with {}",
                    other.kind().name()
                )),
            };
        }
        match st.waiters.remove(&response.id) {
            Some(waiter) => {
                drop(st);
                // The caller may have stopped waiting; that is fine.
                let _ = waiter.tx.send(response.body);
                Ok(())
            }
            None => Err(format!(
                "the guest answered request {}, which is not pending",
                response.id
            )),
        }
    }
}

/// Removes a registered waiter if the call is abandoned before its request was queued (after
/// that, the response will come and must find the waiter).
struct Unregister<'a> {
    inner: &'a Inner,
    id: u64,
    armed: bool,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.inner.unregister(self.id);
        }
    }
}

impl Session {
    /// The guest's `Welcome`.
    pub fn welcome(&self) -> &Welcome {
        &self.inner.welcome
    }

    /// The share names opened by the `Hello`, in index order.
    pub fn shares(&self) -> &[String] {
        &self.inner.shares
    }

    /// Byte counters of this session.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    pub fn is_closed(&self) -> bool {
        self.inner.lock().closed.is_some()
    }

    /// Resolves when the session has ended, with the reason. For the host's reconnect loop.
    pub fn closed(&self) -> impl Future<Output = String> + Send + 'static {
        let mut rx = self.inner.closed.subscribe();
        async move {
            match rx.wait_for(Option::is_some).await {
                Ok(reason) => reason.clone().unwrap_or_default(),
                Err(_) => "session dropped".to_owned(),
            }
        }
    }

    /// Ends the session now. Pending requests resolve to `Disconnected`.
    pub fn close(&self) {
        self.inner.close("closed by the host".to_owned());
    }

    /// One round trip, for tests and diagnostics (heartbeats are automatic).
    pub async fn ping(&self) -> Result<(), EndpointError> {
        match self.call(0, RequestBody::Ping, 0).await? {
            ResponseBody::Pong => Ok(()),
            other => Err(self.violation(format!("answered Ping with {}", other.kind().name()))),
        }
    }

    pub(crate) fn stats_handle(&self) -> &Stats {
        &self.inner.stats
    }

    /// Records that the guest broke the protocol in a response, ends the session, and returns
    /// the error for the caller.
    pub(crate) fn violation(&self, what: String) -> EndpointError {
        let what = format!("the guest {what}");
        self.inner.close(format!("protocol violation: {what}"));
        EndpointError::Protocol(what)
    }

    /// Sends one request and waits for its response body. `content_bytes` is added to the
    /// sent-content counter once the request is queued.
    pub(crate) async fn call(
        &self,
        share: u16,
        body: RequestBody,
        content_bytes: u64,
    ) -> Result<ResponseBody, EndpointError> {
        self.send(share, body, content_bytes).await?.wait().await
    }

    /// Queues one request; its answer is collected with [`PendingCall::wait`]. The guest
    /// handles a session's requests in order (PollChanges aside), so a request sent after
    /// this one is handled after it.
    pub(crate) async fn send(
        &self,
        share: u16,
        body: RequestBody,
        content_bytes: u64,
    ) -> Result<PendingCall, EndpointError> {
        let inner = &*self.inner;
        let kind = body.kind();
        let permit = if kind == RequestKind::Ping {
            None
        } else {
            let permit = inner.permits.clone().acquire_owned().await;
            Some(permit.map_err(|_| EndpointError::Disconnected(inner.reason()))?)
        };
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let message = Message::Request(Request { id, share, body });
        let bytes = encode_message(&message, MAX_MESSAGE_BYTES).map_err(outgoing_error)?;
        drop(message);
        let rx = inner.register(id, permit)?;
        let mut guard = Unregister {
            inner,
            id,
            armed: true,
        };
        if self.tx.send(Bytes::from(bytes)).await.is_err() {
            return Err(EndpointError::Disconnected(inner.reason()));
        }
        guard.armed = false;
        if kind != RequestKind::Ping {
            inner.stats.add_request();
        }
        inner.stats.add_content_sent(content_bytes);
        Ok(PendingCall {
            inner: self.inner.clone(),
            id,
            kind,
            rx,
        })
    }
}

/// A request on its way: [`PendingCall::wait`] for the answer. Dropped, the answer is
/// discarded when it comes.
pub(crate) struct PendingCall {
    inner: Arc<Inner>,
    id: u64,
    kind: RequestKind,
    rx: oneshot::Receiver<ResponseBody>,
}

impl std::fmt::Debug for PendingCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PendingCall({} {})", self.kind.name(), self.id)
    }
}

impl PendingCall {
    /// Waits for the answer, up to the request timeout (closing the session when it passes).
    pub(crate) async fn wait(self) -> Result<ResponseBody, EndpointError> {
        let PendingCall {
            inner,
            id,
            kind,
            rx,
        } = self;
        match tokio::time::timeout(inner.config.request_timeout, rx).await {
            Ok(Ok(body)) => Ok(body),
            Ok(Err(_)) => Err(EndpointError::Disconnected(inner.reason())),
            Err(_) => {
                let reason = format!(
                    "{} request {id} got no answer within {} ms although the guest is alive",
                    kind.name(),
                    millis(inner.config.request_timeout)
                );
                inner.close(reason.clone());
                Err(EndpointError::Disconnected(reason))
            }
        }
    }
}

/// A request we could not send: too large or out of bounds is a resource limit; anything else
/// means we built a malformed request.
fn outgoing_error(e: CodecError) -> EndpointError {
    let limit = match &e {
        CodecError::TooLarge { .. } => true,
        CodecError::Invalid(v) => v.is_limit(),
        _ => false,
    };
    let text = format!("request not sent: {}", error_chain(&e));
    if limit {
        EndpointError::Limit(text)
    } else {
        EndpointError::Protocol(text)
    }
}

async fn read_loop<S>(mut reader: Reader<S>, inner: Arc<Inner>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut closed = inner.closed.subscribe();
    let reason = loop {
        let item = tokio::select! {
            _ = closed.wait_for(Option::is_some) => return,
            item = reader.next() => item,
        };
        match item {
            None => break "the guest closed the connection".to_owned(),
            Some(Err(e)) => break error_chain(&TransportError::from(e)),
            Some(Ok(Message::Response(response))) => {
                if let Err(violation) = inner.deliver(response) {
                    break format!("protocol violation: {violation}");
                }
            }
            Some(Ok(other)) => {
                break format!(
                    "protocol violation: the guest sent {} after the handshake",
                    other.kind()
                )
            }
        }
    };
    inner.close(reason);
}

async fn write_loop<S>(mut writer: Writer<S>, mut rx: mpsc::Receiver<Bytes>, inner: Arc<Inner>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut closed = inner.closed.subscribe();
    let heartbeat = inner.config.heartbeat_interval;
    let reason = loop {
        let next = tokio::select! {
            _ = closed.wait_for(Option::is_some) => break None,
            message = rx.recv() => match message {
                Some(bytes) => bytes,
                None => break Some("every session handle was dropped".to_owned()),
            },
            () = tokio::time::sleep(heartbeat) => {
                let Some(id) = inner.start_heartbeat() else { continue };
                let ping = Message::Request(Request { id, share: 0, body: RequestBody::Ping });
                match encode_message(&ping, MAX_MESSAGE_BYTES) {
                    Ok(bytes) => Bytes::from(bytes),
                    Err(e) => break Some(error_chain(&e)),
                }
            }
        };
        let sent = tokio::select! {
            _ = closed.wait_for(Option::is_some) => break None,
            sent = writer.send(next) => sent,
        };
        if let Err(e) = sent {
            break Some(error_chain(&TransportError::from(e)));
        }
        framing::shed_write_buffer(&mut writer);
    };
    if let Some(reason) = reason {
        inner.close(reason);
    }
    // Tell the guest we are done (EOF), without waiting long for a peer that does not read.
    let _ = tokio::time::timeout(heartbeat, SinkExt::<Bytes>::close(&mut writer)).await;
}
