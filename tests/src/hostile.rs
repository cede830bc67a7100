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

// ---------------------------------------------------------------- floods (tests/tests/floods.rs)

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use vmsync_core::endpoint::{Outcome, ScanScope};
use vmsync_core::{Entry, FileMeta, Hash, Manifest, RelPath, Timestamp};
use vmsync_protocol::messages::{ManifestForm, StageAnswer, WireProblem};
use vmsync_protocol::{RequestKind, WireContent};

/// The host's peak RSS whatever a guest sends: three times the largest message plus 64 MiB
/// (docs/threat-model.md, the hostile guest's tests; docs/security.md, "Decoders cannot
/// over-allocate").
pub const RSS_BOUND: u64 = 3 * vmsync_protocol::limits::MAX_MESSAGE_BYTES as u64 + (64 << 20);

/// No answer at all: the request stays unanswered (for a long-poll: the host's poll waits, and
/// no poll answered every 300 ms holds up the requests behind it).
pub const NO_ANSWER: Answer = Answer::Raw(Vec::new());

impl HostileGuest {
    /// [`HostileGuest::start`], with `answer` also told which connection of the host it serves
    /// (1 for the first).
    pub fn start_counted(
        socket: &Path,
        answer: impl Fn(u32, &Request) -> Answer + Send + Sync + 'static,
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
                            let n = sessions.fetch_add(1, Ordering::Relaxed) + 1;
                            let _ = serve(stream, &|req: &Request| answer(n, req), &stop);
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
}

/// A share the hostile guest can serve honestly: files with real manifests and chunks, which
/// the host can sync; and what the host asked of it. Staged files, supplied chunks and
/// transitions from the host are kept (in memory), so a host that sends files to it sees them
/// listed at the next scan. The generation the host marks is reported back, as a real guest
/// does (else the host would take it for a guest reverted to a snapshot).
#[derive(Default)]
pub struct FakeShare {
    state: Mutex<FakeState>,
}

#[derive(Default)]
struct FakeState {
    entries: BTreeMap<RelPath, Entry>,
    manifests: HashMap<RelPath, Manifest>,
    chunks: HashMap<Hash, Vec<u8>>,
    staged: HashMap<RelPath, (FileMeta, Manifest)>,
    generation: Option<u64>,
    token: u64,
    asked: HashMap<RequestKind, usize>,
    supplied: Vec<Hash>,
}

impl FakeState {
    fn add_file(&mut self, path: &str, data: &[u8]) {
        let path = RelPath::from_bytes(path.as_bytes()).expect("a valid path");
        let (manifest, meta) = manifest_of(data);
        for c in &manifest.chunks {
            let at = c.offset as usize..c.offset as usize + c.len as usize;
            self.chunks.insert(c.hash, data[at].to_vec());
        }
        let mut parent = path.parent();
        while let Some(dir) = parent.filter(|d| !d.is_root()) {
            self.entries.insert(
                dir.clone(),
                Entry::Dir {
                    mode: 0o755,
                    mtime: FAKE_MTIME,
                },
            );
            parent = dir.parent();
        }
        self.entries.insert(path.clone(), Entry::File(meta));
        self.manifests.insert(path, manifest);
    }
}

/// The mtime of a fake share's files and directories.
pub const FAKE_MTIME: Timestamp = Timestamp::new(1_700_000_000, 0);

/// `data` chunked by the real chunker: its manifest and file metadata (mode 0644).
pub fn manifest_of(data: &[u8]) -> (Manifest, FileMeta) {
    let chunks = vmsync_engine::chunk::chunk_bytes(data);
    let manifest = Manifest {
        chunks,
        links: Vec::new(),
    };
    let meta = FileMeta {
        size: data.len() as u64,
        mode: 0o644,
        mtime: FAKE_MTIME,
        digest: manifest.digest(),
    };
    (manifest, meta)
}

impl FakeShare {
    /// Adds (or replaces) a file and its parent directories.
    pub fn add_file(&self, path: &str, data: &[u8]) {
        self.state.lock().unwrap().add_file(path, data);
    }

    /// Replaces everything the share holds by these files (at once: no scan sees it empty).
    pub fn set_files<'a>(&self, files: impl IntoIterator<Item = (&'a str, &'a [u8])>) {
        let mut st = self.state.lock().unwrap();
        st.entries.clear();
        st.manifests.clear();
        for (path, data) in files {
            st.add_file(path, data);
        }
    }

    /// How many requests of `kind` the host made.
    pub fn asked(&self, kind: RequestKind) -> usize {
        let st = self.state.lock().unwrap();
        st.asked.get(&kind).copied().unwrap_or(0)
    }

    /// Every chunk the host supplied, in order.
    pub fn supplied(&self) -> Vec<Hash> {
        self.state.lock().unwrap().supplied.clone()
    }

    /// What the share lists at `path`.
    pub fn entry(&self, path: &str) -> Option<Entry> {
        let path = RelPath::from_bytes(path.as_bytes()).expect("a valid path");
        self.state.lock().unwrap().entries.get(&path).cloned()
    }

    /// Notes a request without answering it (for a test that answers it some other way).
    pub fn note(&self, req: &Request) {
        let mut st = self.state.lock().unwrap();
        *st.asked.entry(req.body.kind()).or_default() += 1;
    }

    /// The honest answer to `req`, as a guest with this share would give it. Long-polls are
    /// never answered ([`NO_ANSWER`]): the share never changes by itself.
    pub fn answer(&self, req: &Request) -> Answer {
        self.note(req);
        let mut st = self.state.lock().unwrap();
        let st = &mut *st;
        let body = match &req.body {
            RequestBody::Ping => ResponseBody::Pong,
            RequestBody::ScanFull { .. } => {
                st.token += 1;
                ResponseBody::ScanDelta(Ok(ScanDelta {
                    token: st.token,
                    base: None,
                    root: Some(MARKER),
                    changed: st
                        .entries
                        .iter()
                        .map(|(p, e)| (p.clone(), e.clone()))
                        .collect(),
                    removed: vec![],
                    problems: vec![],
                    ignored: vec![],
                    generation: st.generation,
                }))
            }
            RequestBody::Scan { scope, .. } => {
                let inside = |p: &RelPath| match scope {
                    ScanScope::Full => true,
                    ScanScope::Paths(paths) => paths.iter().any(|s| s == p || s.is_ancestor_of(p)),
                };
                ResponseBody::Scanned(Ok(Scanned {
                    root: Some(MARKER),
                    entries: st
                        .entries
                        .iter()
                        .filter(|(p, _)| inside(p))
                        .map(|(p, e)| (p.clone(), e.clone()))
                        .collect(),
                    problems: vec![],
                    ignored: vec![],
                    generation: st.generation,
                    manifests: vec![],
                }))
            }
            RequestBody::PollChanges { .. } => return NO_ANSWER,
            RequestBody::Manifests { files } => ResponseBody::Manifests(Ok(files
                .iter()
                .map(
                    |(path, meta)| match (st.entries.get(path), st.manifests.get(path)) {
                        (Some(Entry::File(m)), Some(manifest))
                            if m.digest == meta.digest && m.size == meta.size =>
                        {
                            Ok(manifest.clone())
                        }
                        _ => Err(WireProblem {
                            path: path.clone(),
                            message: "changed since it was scanned".into(),
                        }),
                    },
                )
                .collect())),
            RequestBody::ReadChunks { reads } => ResponseBody::Chunks(Ok(reads
                .iter()
                .map(|r| {
                    st.chunks.get(&r.read.chunk.hash).map(|data| {
                        WireContent::Whole(vmsync_protocol::chunk::encode_chunk(
                            r.read.chunk.hash,
                            data,
                            0,
                        ))
                    })
                })
                .collect())),
            RequestBody::Stage { files } => ResponseBody::Staged(Ok(files
                .iter()
                .map(|f| match &f.manifest {
                    ManifestForm::Full(m) => {
                        st.staged.insert(f.path.clone(), (f.meta, m.clone()));
                        let mut missing: Vec<Hash> = m
                            .chunks
                            .iter()
                            .map(|c| c.hash)
                            .filter(|h| !st.chunks.contains_key(h))
                            .collect();
                        missing.sort();
                        missing.dedup();
                        StageAnswer::Missing(
                            missing
                                .into_iter()
                                .map(|hash| vmsync_core::endpoint::MissingChunk {
                                    hash,
                                    base: None,
                                })
                                .collect(),
                        )
                    }
                    ManifestForm::Edits { .. } => StageAnswer::BaseUnknown,
                })
                .collect())),
            RequestBody::Supply { chunks } => {
                for c in chunks {
                    if let WireContent::Whole(c) = c {
                        if let Ok((hash, data)) = vmsync_protocol::chunk::decode_chunk(c.clone()) {
                            st.supplied.push(hash);
                            st.chunks.insert(hash, data);
                        }
                    }
                }
                ResponseBody::Supplied(Ok(vec![]))
            }
            RequestBody::Transition { changes } => {
                let mut outcomes = Vec::with_capacity(changes.len());
                for c in changes {
                    let current = st.entries.get(&c.path).cloned();
                    if current != c.expected {
                        outcomes.push(Outcome::Changed(current));
                        continue;
                    }
                    match &c.new {
                        Some(Entry::File(meta)) => {
                            let staged = st.staged.get(&c.path).cloned();
                            match staged {
                                Some((m, manifest))
                                    if m.digest == meta.digest
                                        && manifest
                                            .chunks
                                            .iter()
                                            .all(|ch| st.chunks.contains_key(&ch.hash)) =>
                                {
                                    st.staged.remove(&c.path);
                                    st.manifests.insert(c.path.clone(), manifest);
                                    st.entries.insert(c.path.clone(), Entry::File(*meta));
                                    outcomes.push(Outcome::Applied);
                                }
                                _ => {
                                    outcomes.push(Outcome::Failed("content was not staged".into()))
                                }
                            }
                        }
                        Some(other) => {
                            st.entries.insert(c.path.clone(), other.clone());
                            outcomes.push(Outcome::Applied);
                        }
                        None => {
                            st.entries.remove(&c.path);
                            st.manifests.remove(&c.path);
                            outcomes.push(Outcome::Applied);
                        }
                    }
                }
                ResponseBody::Transitioned(Ok(outcomes))
            }
            RequestBody::Mark { generation } => {
                st.generation = Some(*generation);
                ResponseBody::Marked(Ok(()))
            }
            RequestBody::NoteSync(_) => ResponseBody::Noted(Ok(())),
        };
        respond(req, body)
    }
}

/// A hostile host: a raw client that says `Hello` to a guest agent's socket and then sends
/// whatever requests the test writes (any id, any order, replays), reading the raw answers.
pub struct HostileHost {
    s: UnixStream,
    next_id: u64,
}

impl HostileHost {
    /// Connects to `socket`, opens share `share` and reads the guest's `Welcome`.
    pub fn connect(socket: &Path, share: &str) -> std::io::Result<(HostileHost, Message)> {
        let mut s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let hello = Message::Hello(vmsync_protocol::handshake::hello(
            "hostile host",
            vec![vmsync_protocol::ShareOpen {
                name: share.into(),
                ignore: vec![],
                respect_gitignore: false,
            }],
        ));
        write_payload(&mut s, &postcard::to_allocvec(&hello).map_err(other)?)?;
        let mut host = HostileHost { s, next_id: 1 };
        let welcome = host.read()?;
        Ok((host, welcome))
    }

    /// Sends request `id` for share 0, encoded with postcard alone (no check of any bound).
    pub fn send(&mut self, id: u64, body: RequestBody) -> std::io::Result<()> {
        let m = Message::Request(Request { id, share: 0, body });
        self.send_payload(&postcard::to_allocvec(&m).map_err(other)?)
    }

    /// `payload`, framed as one message.
    pub fn send_payload(&mut self, payload: &[u8]) -> std::io::Result<()> {
        write_payload(&mut self.s, payload)
    }

    /// The next message from the guest (an error once it has closed the connection).
    pub fn read(&mut self) -> std::io::Result<Message> {
        let mut payload = Vec::new();
        loop {
            let mut header = [0u8; 4];
            self.s.read_exact(&mut header)?;
            let header = u32::from_be_bytes(header);
            let len = (header & !MORE_FRAGMENTS) as usize;
            let start = payload.len();
            payload.resize(start + len, 0);
            self.s.read_exact(&mut payload[start..])?;
            if header & MORE_FRAGMENTS == 0 {
                return decode_message(&payload).map_err(other);
            }
        }
    }

    /// Sends `body` under a new id and returns the answer to it.
    pub fn call(&mut self, body: RequestBody) -> std::io::Result<ResponseBody> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(id, body)?;
        self.answer_to(id)
    }

    /// Reads until the answer to request `id`.
    pub fn answer_to(&mut self, id: u64) -> std::io::Result<ResponseBody> {
        loop {
            match self.read()? {
                Message::Response(r) if r.id == id => return Ok(r.body),
                Message::Response(_) => {}
                m => return Err(other(format!("the guest sent {}", m.kind()))),
            }
        }
    }

    /// A fresh request id.
    pub fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id - 1
    }

    /// Whether the guest has ended the session: the connection reads EOF (or fails) within
    /// `within`.
    pub fn ended(&mut self, within: Duration) -> bool {
        let _ = self.s.set_read_timeout(Some(within));
        let mut byte = [0u8; 1];
        loop {
            match self.s.read(&mut byte) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }
}

/// How many file descriptors process `pid` holds open.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The file descriptors of process `pid` on files under `dir` (temp files included: an
/// unnamed one shows as `dir/.../#inode (deleted)`).
pub fn fds_under(pid: u32, dir: &Path) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    fds.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|target| target.starts_with(dir))
        .count()
}

/// What is at each path under a directory: kind, size, mode, mtime, inode, and the bytes of a
/// file or the target of a symlink.
pub type Snapshot = BTreeMap<std::path::PathBuf, (u32, u64, u32, i64, u64, Vec<u8>)>;

/// [`Snapshot`] of `dir`.
pub fn snapshot(dir: &Path) -> Snapshot {
    use std::os::unix::fs::MetadataExt;
    let mut out = Snapshot::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let body = if m.is_file() {
                std::fs::read(&p).unwrap()
            } else if m.file_type().is_symlink() {
                std::fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else {
                Vec::new()
            };
            if m.is_dir() {
                stack.push(p.clone());
            }
            let key = p.strip_prefix(dir).unwrap().to_path_buf();
            let mtime_ns = m.mtime() * 1_000_000_000 + m.mtime_nsec();
            out.insert(
                key,
                (
                    m.mode() & 0o170000,
                    m.size(),
                    m.mode() & 0o7777,
                    mtime_ns,
                    m.ino(),
                    body,
                ),
            );
        }
    }
    out
}

/// Makes `<dir>/OUT` with known content (files, a directory, a symlink, a FIFO) and returns its
/// path: what must stay byte for byte the same whatever a peer sends.
pub fn make_out(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("OUT");
    std::fs::create_dir_all(out.join("dir")).unwrap();
    std::fs::write(out.join("a.txt"), "outside the share").unwrap();
    std::fs::write(out.join("dir/b.txt"), "also outside").unwrap();
    std::os::unix::fs::symlink("a.txt", out.join("link")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        out.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    out
}
