//! Shared fixtures for the transport tests: an in-memory `Endpoint` (a map of files), a way to
//! run a real client against a real server over an in-memory pipe, and raw-frame peers for
//! hostile-peer tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::DuplexStream;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::codec::Framed;
use vmsync_core::endpoint::{
    Change, ChunkData, ChunkRead, DeltaRead, Endpoint, EndpointError, MissingChunk, NotStaged,
    Outcome, Problem, ScanOptions, ScanReport, ScanScope, StageRequest,
};
use vmsync_core::{ChunkRef, Entry, FileMeta, Hash, Manifest, RelPath, Timestamp};
use vmsync_protocol::handshake::{self, share_not_exported};
use vmsync_protocol::{Message, MessageCodec, ShareOpen};
use vmsync_transport::{
    client_handshake_with, serve_with, ServerConfig, Session, SessionConfig, TransportError,
};

/// Chunk size of the fake: fixed-size chunks are enough to exercise the protocol.
pub const FAKE_CHUNK_BYTES: usize = 4096;
/// Capacity of the in-memory pipe in each direction.
pub const PIPE_BYTES: usize = 64 * 1024;

pub fn p(s: &str) -> RelPath {
    RelPath::from_bytes(s.as_bytes()).unwrap()
}

pub fn hash(data: &[u8]) -> Hash {
    vmsync_core::digest::hash_chunk(data)
}

pub fn chunks_of(data: &[u8]) -> Vec<(ChunkRef, &[u8])> {
    let mut offset = 0u64;
    data.chunks(FAKE_CHUNK_BYTES)
        .map(|c| {
            let r = ChunkRef {
                hash: hash(c),
                offset,
                len: c.len() as u32,
            };
            offset += c.len() as u64;
            (r, c)
        })
        .collect()
}

pub fn manifest_of(data: &[u8]) -> Manifest {
    Manifest {
        chunks: chunks_of(data).into_iter().map(|(r, _)| r).collect(),
        links: Vec::new(),
    }
}

pub fn meta_of(data: &[u8]) -> FileMeta {
    FileMeta {
        size: data.len() as u64,
        mode: 0o644,
        mtime: Timestamp::new(1_700_000_000, 0),
        digest: manifest_of(data).digest(),
    }
}

#[derive(Default)]
pub struct FakeState {
    pub files: BTreeMap<RelPath, Vec<u8>>,
    pub dirs: BTreeSet<RelPath>,
    pub store: HashMap<Hash, Vec<u8>>,
    pub staged: BTreeMap<RelPath, StageRequest>,
}

/// An in-memory share. Clones share state. With a gate, every call first waits for a permit
/// (tests use it to hold requests in flight).
#[derive(Clone, Default)]
pub struct Fake {
    pub state: Arc<Mutex<FakeState>>,
    pub gate: Option<Arc<Semaphore>>,
    pub started: Arc<AtomicUsize>,
    pub started_signal: Arc<Notify>,
}

impl Fake {
    pub fn with_files(files: &[(&str, Vec<u8>)]) -> Self {
        let fake = Fake::default();
        {
            let mut st = fake.state.lock().unwrap();
            for (path, data) in files {
                st.files.insert(p(path), data.clone());
            }
        }
        fake
    }

    pub fn gated(mut self) -> (Self, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        self.gate = Some(gate.clone());
        (self, gate)
    }

    pub fn file(&self, path: &str) -> Option<Vec<u8>> {
        self.state.lock().unwrap().files.get(&p(path)).cloned()
    }

    /// Waits until at least `n` calls have started.
    pub async fn wait_started(&self, n: usize) {
        loop {
            let notified = self.started_signal.notified();
            if self.started.load(Ordering::SeqCst) >= n {
                return;
            }
            notified.await;
        }
    }

    async fn enter(&self) {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.started_signal.notify_waiters();
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
    }

    fn entry(st: &FakeState, path: &RelPath) -> Option<Entry> {
        if let Some(data) = st.files.get(path) {
            return Some(Entry::File(meta_of(data)));
        }
        st.dirs.contains(path).then_some(Entry::Dir {
            mode: 0o755,
            mtime: Default::default(),
        })
    }
}

impl Endpoint for Fake {
    async fn scan(
        &mut self,
        scope: ScanScope,
        _options: ScanOptions,
    ) -> Result<ScanReport, EndpointError> {
        self.enter().await;
        let st = self.state.lock().unwrap();
        let in_scope = |path: &RelPath| match &scope {
            ScanScope::Full => true,
            ScanScope::Paths(paths) => paths.iter().any(|s| s == path || s.is_ancestor_of(path)),
        };
        let mut entries: Vec<(RelPath, Entry)> = st
            .dirs
            .iter()
            .map(|d| {
                (
                    d.clone(),
                    Entry::Dir {
                        mode: 0o755,
                        mtime: Default::default(),
                    },
                )
            })
            .chain(
                st.files
                    .iter()
                    .map(|(path, data)| (path.clone(), Entry::File(meta_of(data)))),
            )
            .filter(|(path, _)| in_scope(path))
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(ScanReport {
            root: None,
            entries,
            problems: vec![],
            ignored: vec![],
            generation: None,
        })
    }

    async fn manifests(
        &mut self,
        files: Vec<(RelPath, FileMeta)>,
    ) -> Result<Vec<Result<Manifest, Problem>>, EndpointError> {
        self.enter().await;
        let st = self.state.lock().unwrap();
        Ok(files
            .into_iter()
            .map(|(path, meta)| match st.files.get(&path) {
                // Content, like the real endpoint: size and digest (mode and mtime may differ).
                Some(data)
                    if meta_of(data).size == meta.size && meta_of(data).digest == meta.digest =>
                {
                    Ok(manifest_of(data))
                }
                _ => Err(Problem {
                    path,
                    reason: "changed since the scan".into(),
                }),
            })
            .collect())
    }

    async fn read_chunks(
        &mut self,
        reads: Vec<ChunkRead>,
    ) -> Result<Vec<Option<Vec<u8>>>, EndpointError> {
        self.enter().await;
        let st = self.state.lock().unwrap();
        Ok(reads
            .into_iter()
            .map(|r| {
                let data = st.files.get(&r.path)?;
                let start = usize::try_from(r.chunk.offset).ok()?;
                let slice = data.get(start..start + r.chunk.len as usize)?;
                (hash(slice) == r.chunk.hash).then(|| slice.to_vec())
            })
            .collect())
    }

    /// The fake offers no delta bases, so it always reads whole chunks.
    async fn read_deltas(
        &mut self,
        reads: Vec<DeltaRead>,
    ) -> Result<Vec<Option<ChunkData>>, EndpointError> {
        let reads = reads.into_iter().map(|r| r.read).collect();
        let datas = self.read_chunks(reads).await?;
        Ok(datas.into_iter().map(|d| d.map(ChunkData::Whole)).collect())
    }

    async fn stage(
        &mut self,
        files: Vec<StageRequest>,
    ) -> Result<Vec<Result<Vec<MissingChunk>, NotStaged>>, EndpointError> {
        self.enter().await;
        let mut st = self.state.lock().unwrap();
        let mut local: HashMap<Hash, Vec<u8>> = HashMap::new();
        for data in st.files.values() {
            for (r, c) in chunks_of(data) {
                local.insert(r.hash, c.to_vec());
            }
        }
        let mut out = Vec::new();
        for f in files {
            let mut missing = Vec::new();
            for c in &f.manifest.chunks {
                if let Some(data) = local.get(&c.hash) {
                    st.store.insert(c.hash, data.clone());
                } else if !st.store.contains_key(&c.hash) && !missing.contains(&c.hash) {
                    missing.push(c.hash);
                }
            }
            st.staged.insert(f.path.clone(), f);
            out.push(Ok(missing
                .into_iter()
                .map(|hash| MissingChunk { hash, base: None })
                .collect()));
        }
        Ok(out)
    }

    async fn supply(&mut self, chunks: Vec<(Hash, ChunkData)>) -> Result<Vec<Hash>, EndpointError> {
        self.enter().await;
        let mut st = self.state.lock().unwrap();
        let mut missing = Vec::new();
        for (h, data) in chunks {
            // No base was offered, so no delta can rebuild anything.
            let ChunkData::Whole(data) = data else {
                missing.push(h);
                continue;
            };
            if hash(&data) != h {
                return Err(EndpointError::Protocol(
                    "chunk does not hash to its id".into(),
                ));
            }
            st.store.insert(h, data);
        }
        Ok(missing)
    }

    async fn transition(&mut self, changes: Vec<Change>) -> Result<Vec<Outcome>, EndpointError> {
        self.enter().await;
        let mut st = self.state.lock().unwrap();
        let mut out = Vec::new();
        for c in changes {
            let current = Fake::entry(&st, &c.path);
            if current != c.expected {
                out.push(Outcome::Changed(current));
                continue;
            }
            match c.new {
                None => {
                    st.files.remove(&c.path);
                    st.dirs.remove(&c.path);
                    out.push(Outcome::Applied);
                }
                Some(Entry::Dir { .. }) => {
                    st.dirs.insert(c.path.clone());
                    out.push(Outcome::Applied);
                }
                Some(Entry::File(meta)) => {
                    let Some(staged) = st.staged.remove(&c.path) else {
                        out.push(Outcome::Failed("not staged".into()));
                        continue;
                    };
                    let mut data = Vec::new();
                    for chunk in &staged.manifest.chunks {
                        match st.store.get(&chunk.hash) {
                            Some(d) => data.extend_from_slice(d),
                            None => break,
                        }
                    }
                    if meta_of(&data) != meta {
                        out.push(Outcome::Failed("incomplete".into()));
                        continue;
                    }
                    st.files.insert(c.path.clone(), data);
                    out.push(Outcome::Applied);
                }
                Some(Entry::Symlink { .. }) => out.push(Outcome::Failed("no symlinks here".into())),
            }
        }
        Ok(out)
    }
}

pub fn share(name: &str) -> ShareOpen {
    ShareOpen {
        name: name.to_owned(),
        ignore: vec![],
        respect_gitignore: false,
    }
}

/// The exports of a test guest: every share named `src` maps to `guest`.
pub fn exports(guest: Fake) -> impl Fn(&ShareOpen) -> Result<Fake, String> + Send + 'static {
    move |s: &ShareOpen| {
        if s.name == "src" || s.name == "also" {
            Ok(guest.clone())
        } else {
            Err(share_not_exported(&s.name))
        }
    }
}

pub struct Pair {
    pub session: Session,
    pub server: JoinHandle<Result<(), TransportError>>,
    pub server_stats: Arc<vmsync_transport::Stats>,
}

pub fn spawn_server(
    stream: DuplexStream,
    guest: Fake,
    config: ServerConfig,
) -> JoinHandle<Result<(), TransportError>> {
    tokio::spawn(
        async move { serve_with(stream, exports(guest), "vmsync-guest test", config).await },
    )
}

/// A real client and a real server over an in-memory pipe, share `src` opened as index 0.
pub async fn pair(guest: Fake) -> Pair {
    pair_with(guest, SessionConfig::default(), ServerConfig::default()).await
}

pub async fn pair_with(guest: Fake, client: SessionConfig, server: ServerConfig) -> Pair {
    let (a, b) = tokio::io::duplex(PIPE_BYTES);
    let server_stats = server.stats.clone();
    let server = spawn_server(b, guest, server);
    let hello = handshake::hello("vmsync-host test", vec![share("src")]);
    let (session, welcome) = client_handshake_with(a, hello, client).await.unwrap();
    assert_eq!(welcome.agent_version, "vmsync-guest test");
    Pair {
        session,
        server,
        server_stats,
    }
}

pub type Raw = Framed<DuplexStream, MessageCodec<Message, Message>>;

/// A peer that speaks messages but follows no rules.
pub fn raw(stream: DuplexStream) -> Raw {
    Framed::new(stream, MessageCodec::new())
}

pub async fn send_raw_bytes(raw: &mut Raw, bytes: &[u8]) {
    use tokio::io::AsyncWriteExt;
    raw.get_mut().write_all(bytes).await.unwrap();
}

/// A raw host that has done a proper handshake opening `src`.
pub async fn raw_host_after_handshake(stream: DuplexStream) -> Raw {
    let mut host = raw(stream);
    host.send(Message::Hello(handshake::hello(
        "raw host",
        vec![share("src")],
    )))
    .await
    .unwrap();
    match host.next().await {
        Some(Ok(Message::Welcome(_))) => {}
        other => panic!("expected Welcome, got {other:?}"),
    }
    host.codec_mut().handshake_done();
    host
}

/// A raw guest: reads the Hello and welcomes it.
pub async fn raw_guest_welcome(guest: &mut Raw) -> vmsync_protocol::Hello {
    let hello = match guest.next().await {
        Some(Ok(Message::Hello(h))) => h,
        other => panic!("expected Hello, got {other:?}"),
    };
    let agreement = handshake::accept_hello(&hello, &Default::default()).unwrap();
    let welcome = handshake::welcome(agreement, "raw guest", &Default::default());
    guest.send(Message::Welcome(welcome)).await.unwrap();
    guest.codec_mut().handshake_done();
    hello
}

pub fn frame_header(len: u32, more: bool) -> [u8; 4] {
    (len | if more { 1 << 31 } else { 0 }).to_be_bytes()
}

pub fn bytes_of(m: &Message) -> Bytes {
    let mut buf = BytesMut::new();
    tokio_util::codec::Encoder::encode(
        &mut MessageCodec::<Message, Message>::new(),
        m.clone(),
        &mut buf,
    )
    .unwrap();
    buf.freeze()
}
