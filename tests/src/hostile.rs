//! A hostile guest: a test peer that speaks the protocol at the frame and message level and can
//! send anything, in place of `vmsync-guest` (see docs/threat-model.md). It listens on a Unix
//! socket, answers the host's `Hello` with a `Welcome`, and then answers every request as the
//! test's [`Answer`] says: a message encoded without any of the sender's checks, a payload of
//! any bytes, raw bytes on the socket, or a hang-up. [`benign`] answers like an empty, quiet
//! share, so a test changes only the answers it is about.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use vmsync_core::endpoint::{ChangeHints, RootId};
use vmsync_protocol::frame::MORE_FRAGMENTS;
use vmsync_protocol::limits::MAX_FRAME_BYTES;
use vmsync_protocol::messages::{ScanDelta, Scanned, Welcome};
use vmsync_protocol::{decode_message, Message, Request, RequestBody, Response, ResponseBody};

/// What the hostile guest sends for one request.
pub enum Answer {
    /// This message, encoded with postcard alone (no validation, no size check) and framed.
    Message(Message),
    /// This payload, framed as one message (in fragments of at most `MAX_FRAME_BYTES`).
    Payload(Vec<u8>),
    /// These bytes on the socket, as they are (a forged header, half a frame).
    Raw(Vec<u8>),
    /// Close the connection.
    HangUp,
}

/// The marker id the hostile guest's share claims.
pub const MARKER: RootId = RootId {
    marker: [7; 16],
    dev: 1,
    ino: 2,
};

/// The answer of an empty, quiet share: empty scans, no change hints (after a pause, so the
/// host's long poll does not spin), pongs, and `Marked`. Requests an empty share never gets
/// (manifests, chunks, staging, transitions) end the session.
pub fn benign(req: &Request) -> Answer {
    let body = match &req.body {
        RequestBody::Ping => ResponseBody::Pong,
        RequestBody::ScanFull { .. } => ResponseBody::ScanDelta(Ok(ScanDelta {
            token: 1,
            base: None,
            root: Some(MARKER),
            changed: vec![],
            removed: vec![],
            problems: vec![],
            ignored: vec![],
            generation: None,
        })),
        RequestBody::Scan { .. } => ResponseBody::Scanned(Ok(Scanned {
            root: Some(MARKER),
            entries: vec![],
            problems: vec![],
            ignored: vec![],
            generation: None,
            manifests: vec![],
        })),
        RequestBody::PollChanges { max_wait_ms } => {
            std::thread::sleep(Duration::from_millis(u64::from(*max_wait_ms).min(300)));
            ResponseBody::Changes(Ok(ChangeHints::default()))
        }
        RequestBody::Mark { .. } => ResponseBody::Marked(Ok(())),
        RequestBody::NoteSync(_) => ResponseBody::Noted(Ok(())),
        _ => return Answer::HangUp,
    };
    respond(req, body)
}

/// `body` as the response to `req`.
pub fn respond(req: &Request, body: ResponseBody) -> Answer {
    Answer::Message(Message::Response(Response { id: req.id, body }))
}

/// A running hostile guest; stops when dropped.
pub struct HostileGuest {
    stop: Arc<AtomicBool>,
    sessions: Arc<AtomicU32>,
    thread: Option<JoinHandle<()>>,
}

impl HostileGuest {
    /// Listens on `socket` and serves one host connection after another, answering each
    /// request with `answer`.
    pub fn start(
        socket: &Path,
        answer: impl Fn(&Request) -> Answer + Send + Sync + 'static,
    ) -> HostileGuest {
        let listener = UnixListener::bind(socket).expect("bind the hostile guest's socket");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let sessions = Arc::new(AtomicU32::new(0));
        let thread = {
            let (stop, sessions) = (stop.clone(), sessions.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            sessions.fetch_add(1, Ordering::Relaxed);
                            // A session ends on any error: the host hung up or refused us.
                            let _ = serve(stream, &answer, &stop);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        HostileGuest {
            stop,
            sessions,
            thread: Some(thread),
        }
    }

    /// Connections the host has made so far.
    pub fn sessions(&self) -> u32 {
        self.sessions.load(Ordering::Relaxed)
    }
}

impl Drop for HostileGuest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    mut s: UnixStream,
    answer: &dyn Fn(&Request) -> Answer,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let Message::Hello(hello) = read_message(&mut s, stop)? else {
        return Ok(());
    };
    let welcome = Message::Welcome(Welcome {
        version: hello.max_version,
        agent_version: "hostile".into(),
        chunker: hello.chunker,
    });
    write_payload(&mut s, &postcard::to_allocvec(&welcome).map_err(other)?)?;
    loop {
        let Message::Request(req) = read_message(&mut s, stop)? else {
            return Ok(());
        };
        match answer(&req) {
            Answer::Message(m) => {
                write_payload(&mut s, &postcard::to_allocvec(&m).map_err(other)?)?
            }
            Answer::Payload(p) => write_payload(&mut s, &p)?,
            Answer::Raw(bytes) => s.write_all(&bytes)?,
            Answer::HangUp => return Ok(()),
        }
    }
}

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Reads one whole message (every fragment), waiting as long as it takes unless stopped.
fn read_message(s: &mut UnixStream, stop: &AtomicBool) -> std::io::Result<Message> {
    let mut payload = Vec::new();
    loop {
        let mut header = [0u8; 4];
        read_exact(s, &mut header, stop)?;
        let header = u32::from_be_bytes(header);
        let len = (header & !MORE_FRAGMENTS) as usize;
        let start = payload.len();
        payload.resize(start + len, 0);
        read_exact(s, &mut payload[start..], stop)?;
        if header & MORE_FRAGMENTS == 0 {
            return decode_message(&payload).map_err(other);
        }
    }
}

fn read_exact(s: &mut UnixStream, mut buf: &mut [u8], stop: &AtomicBool) -> std::io::Result<()> {
    while !buf.is_empty() {
        if stop.load(Ordering::Relaxed) {
            return Err(other("stopped"));
        }
        match s.read(buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `payload` as one message: fragments of at most `MAX_FRAME_BYTES`, every one but the last
/// flagged with `MORE_FRAGMENTS`.
fn write_payload(s: &mut UnixStream, payload: &[u8]) -> std::io::Result<()> {
    let mut parts = payload.chunks(MAX_FRAME_BYTES).peekable();
    while let Some(part) = parts.next() {
        let more = if parts.peek().is_some() {
            MORE_FRAGMENTS
        } else {
            0
        };
        s.write_all(&(part.len() as u32 | more).to_be_bytes())?;
        s.write_all(part)?;
    }
    Ok(())
}

/// The peak resident memory (`VmHWM`) of process `pid`, in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
