//! A byte-counting Unix-socket relay, for tests and the benchmark.
//!
//! [`Relay`] listens on one Unix socket path and, for every connection it accepts, dials an
//! upstream Unix socket and copies bytes both ways, counting them: "up" is client → upstream
//! (host → guest when the host dials the relay), "down" is upstream → client. The counts are
//! payload bytes as they cross the socket, so they include framing and protocol overhead: what a
//! test means by "bytes on the wire".
//!
//! The relay runs on its own thread with its own single-threaded tokio runtime, so it works the
//! same from plain `#[test]`s, from async tests and from the `vmsync-relay` binary, and dropping
//! it (or [`Relay::shutdown`]) stops it completely: the listener closes, every relayed connection
//! is cut and the socket file is removed.
//!
//! Counting is exact once a connection has been closed in both directions: a direction's count
//! is updated after each write to the other side returns and before that direction's end-of-
//! stream is passed on, so a peer that has read end-of-stream has been counted in full.
//! Half-closes are passed through (one direction can finish while the other keeps going).

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Copy buffer per direction per connection. Large enough that a bulk transfer costs few
/// syscalls, so the relay adds little CPU next to the agents it measures.
const RELAY_BUFFER_BYTES: usize = 256 * 1024;
/// Pause after a failed `accept` (for example out of file descriptors) so the loop does not spin.
const ACCEPT_RETRY_DELAY_MS: u64 = 20;

/// The counters a [`Relay`] updates, shareable with a reporter (the binary's stats writer).
#[derive(Debug, Default)]
pub struct RelayCounters {
    up: AtomicU64,
    down: AtomicU64,
    connections: AtomicU64,
    /// Bytes per second each direction may carry; 0: as fast as it goes.
    rate: AtomicU64,
}

impl RelayCounters {
    /// Bytes copied client → upstream.
    pub fn up(&self) -> u64 {
        self.up.load(Ordering::Relaxed)
    }

    /// Bytes copied upstream → client.
    pub fn down(&self) -> u64 {
        self.down.load(Ordering::Relaxed)
    }

    /// Connections accepted.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Sets all counters to zero.
    pub fn reset(&self) {
        self.up.store(0, Ordering::Relaxed);
        self.down.store(0, Ordering::Relaxed);
        self.connections.store(0, Ordering::Relaxed);
    }
}

/// What the owner asks of the relay thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Command {
    stop: bool,
    /// Bumped by [`Relay::disconnect_all`]; a connection ends when this changes.
    generation: u64,
}

/// A running relay. See the module documentation.
#[derive(Debug)]
pub struct Relay {
    listen: PathBuf,
    /// Device and inode of the socket file this relay bound, so that cleanup removes only that
    /// file and never one somebody bound at the same path later.
    socket_identity: (u64, u64),
    counters: Arc<RelayCounters>,
    commands: watch::Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Binds `listen` and starts relaying each accepted connection to `upstream`.
    ///
    /// A stale socket file at `listen` (left by a process that died) is replaced; any other kind
    /// of file there is an error. `upstream` is dialed per connection, so it need not exist yet:
    /// a connection accepted while it is missing is closed at once, which the client sees as the
    /// server going away.
    pub fn start(listen: impl AsRef<Path>, upstream: impl AsRef<Path>) -> io::Result<Relay> {
        let listen = listen.as_ref().to_path_buf();
        let upstream = upstream.as_ref().to_path_buf();
        remove_stale_socket(&listen)?;
        let std_listener = std::os::unix::net::UnixListener::bind(&listen)?;
        std_listener.set_nonblocking(true)?;
        let metadata = std::fs::symlink_metadata(&listen)?;
        let socket_identity = (metadata.dev(), metadata.ino());

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = {
            // Registering the listener with the reactor needs the runtime's context.
            let _context = runtime.enter();
            UnixListener::from_std(std_listener)?
        };
        let counters = Arc::new(RelayCounters::default());
        let (commands, command_rx) = watch::channel(Command::default());
        let thread_counters = Arc::clone(&counters);
        let thread = std::thread::Builder::new()
            .name("vmsync-relay".to_string())
            .spawn(move || {
                runtime.block_on(serve(listener, upstream, thread_counters, command_rx));
            })?;
        Ok(Relay {
            listen,
            socket_identity,
            counters,
            commands,
            thread: Some(thread),
        })
    }

    /// The socket path clients connect to.
    pub fn listen_path(&self) -> &Path {
        &self.listen
    }

    /// Bytes copied client → upstream since the start or the last [`reset`](Self::reset).
    pub fn bytes_up(&self) -> u64 {
        self.counters.up()
    }

    /// Bytes copied upstream → client since the start or the last [`reset`](Self::reset).
    pub fn bytes_down(&self) -> u64 {
        self.counters.down()
    }

    /// Connections accepted since the start or the last [`reset`](Self::reset).
    pub fn connections(&self) -> u64 {
        self.counters.connections()
    }

    /// Sets the counters to zero; bytes of connections still open count from here on.
    pub fn reset(&self) {
        self.counters.reset();
    }

    /// The live counters, for a reporter that outlives borrows of the relay.
    pub fn counters(&self) -> Arc<RelayCounters> {
        Arc::clone(&self.counters)
    }

    /// Limits each direction of every connection to `bytes_per_sec` (0: no limit), like a slow
    /// link: lets tests see what happens while a big transfer is on the wire.
    pub fn set_rate_limit(&self, bytes_per_sec: u64) {
        self.counters.rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// Cuts every relayed connection (both sides see the connection close) and keeps listening:
    /// a way for tests to make the agents reconnect.
    pub fn disconnect_all(&self) {
        self.commands.send_modify(|command| command.generation += 1);
    }

    /// Stops the relay: closes the listener, cuts every connection, waits for the relay thread
    /// and removes the socket file. Dropping the relay does the same.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.commands.send_modify(|command| command.stop = true);
        if let Some(thread) = self.thread.take() {
            // The thread only panics on a bug in this module; there is nothing to recover then,
            // and a second panic inside a drop would abort the test binary.
            let _ = thread.join();
        }
        if let Ok(metadata) = std::fs::symlink_metadata(&self.listen) {
            if (metadata.dev(), metadata.ino()) == self.socket_identity {
                let _ = std::fs::remove_file(&self.listen);
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Removes `path` if it is a socket; fails if it is anything else, so a typo cannot delete a
/// regular file.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        )),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}

async fn serve(
    listener: UnixListener,
    upstream: PathBuf,
    counters: Arc<RelayCounters>,
    mut commands: watch::Receiver<Command>,
) {
    let upstream = Arc::new(upstream);
    // Connections get their own receiver: `commands` is borrowed by the stop wait below.
    let connection_commands = commands.clone();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            changed = commands.wait_for(|command| command.stop) => {
                // An error means the `Relay` is gone, which also means stop.
                let _ = changed;
                break;
            }
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    counters.connections.fetch_add(1, Ordering::Relaxed);
                    connections.spawn(relay_connection(
                        client,
                        Arc::clone(&upstream),
                        Arc::clone(&counters),
                        connection_commands.clone(),
                    ));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(ACCEPT_RETRY_DELAY_MS)).await,
            },
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// Relays one accepted connection until both directions end, one fails, or the owner stops the
/// relay or cuts connections.
async fn relay_connection(
    client: UnixStream,
    upstream: Arc<PathBuf>,
    counters: Arc<RelayCounters>,
    mut commands: watch::Receiver<Command>,
) {
    let generation = commands.borrow_and_update().generation;
    let cut = async move {
        // Ends on stop, on a cut, or when the `Relay` is gone (the wait then errors).
        let _ = commands
            .wait_for(|command| command.stop || command.generation != generation)
            .await;
    };
    tokio::pin!(cut);

    let server = tokio::select! {
        connected = UnixStream::connect(upstream.as_path()) => match connected {
            Ok(server) => server,
            // Upstream not there: closing the client tells it so.
            Err(_) => return,
        },
        () = &mut cut => return,
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, &counters.up, &counters.rate);
    let down = pump(server_read, client_write, &counters.down, &counters.rate);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            result = &mut up, if !up_done => match result {
                Ok(()) => up_done = true,
                // A failed direction ends the connection: the halves are dropped on return,
                // which closes both sockets.
                Err(_) => return,
            },
            result = &mut down, if !down_done => match result {
                Ok(()) => down_done = true,
                Err(_) => return,
            },
            () = &mut cut => return,
        }
    }
}

/// Copies `from` to `to` until end-of-stream, then shuts down `to`'s write side so the peer sees
/// the half-close. `counter` grows by every byte written.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    counter: &AtomicU64,
    rate: &AtomicU64,
) -> io::Result<()> {
    let mut buffer = vec![0u8; RELAY_BUFFER_BYTES];
    loop {
        let limit = rate.load(Ordering::Relaxed);
        // Under a rate limit, small reads keep the pacing smooth.
        let want = if limit == 0 {
            RELAY_BUFFER_BYTES
        } else {
            RELAY_BUFFER_BYTES.min(16 * 1024)
        };
        let read = from.read(&mut buffer[..want]).await?;
        if read == 0 {
            return to.shutdown().await;
        }
        if let Some(nanos) = (read as u64 * 1_000_000_000).checked_div(limit) {
            tokio::time::sleep(Duration::from_nanos(nanos)).await;
        }
        // Counted write by write rather than after `write_all`, so bytes that did reach the
        // peer before a failure are not lost from the count.
        let mut offset = 0;
        while offset < read {
            let written = to.write(&buffer[offset..read]).await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            counter.fetch_add(written as u64, Ordering::Relaxed);
            offset += written;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener as StdListener, UnixStream as StdStream};

    /// An echo server on `path` that serves connections one after another until its listener
    /// is dropped with the returned thread (tests end the process anyway).
    fn echo_server(path: &Path) -> std::thread::JoinHandle<()> {
        let listener = StdListener::bind(path).expect("bind echo server");
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                std::thread::spawn(move || {
                    let mut buffer = [0u8; 8192];
                    loop {
                        match stream.read(&mut buffer) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if stream.write_all(&buffer[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    // Dropping `stream` closes it: the echo of a half-closed input ends too.
                });
            }
        })
    }

    /// Sends `payload` through `path`, half-closes, and returns everything echoed back.
    fn round_trip(path: &Path, payload: &[u8]) -> Vec<u8> {
        let mut stream = StdStream::connect(path).expect("connect to relay");
        let writer = {
            let mut stream = stream.try_clone().expect("clone stream");
            let payload = payload.to_vec();
            // Write from another thread: an echo server would block on a full socket buffer
            // if nobody read while a large payload is written.
            std::thread::spawn(move || {
                stream.write_all(&payload).expect("write payload");
                stream
                    .shutdown(std::net::Shutdown::Write)
                    .expect("half-close");
            })
        };
        let mut echoed = Vec::new();
        stream.read_to_end(&mut echoed).expect("read echo");
        writer.join().expect("writer thread");
        echoed
    }

    fn payload(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn counts_are_exact_in_both_directions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let upstream = dir.path().join("echo.sock");
        let listen = dir.path().join("relay.sock");
        let _server = echo_server(&upstream);
        let relay = Relay::start(&listen, &upstream).expect("start relay");

        let big = payload(5 * 1024 * 1024 + 17);
        assert_eq!(round_trip(&listen, &big), big);
        assert_eq!(relay.bytes_up(), big.len() as u64);
        assert_eq!(relay.bytes_down(), big.len() as u64);

        // Connections add up; reset starts over.
        assert_eq!(round_trip(&listen, b"hello"), b"hello");
        assert_eq!(relay.bytes_up(), big.len() as u64 + 5);
        assert_eq!(relay.connections(), 2);
        relay.reset();
        assert_eq!((relay.bytes_up(), relay.bytes_down()), (0, 0));
        assert_eq!(round_trip(&listen, &big[..1000]), &big[..1000]);
        assert_eq!((relay.bytes_up(), relay.bytes_down()), (1000, 1000));
        assert_eq!(relay.connections(), 1);

        // An empty exchange counts nothing and still closes cleanly.
        assert_eq!(round_trip(&listen, b""), b"");
        assert_eq!((relay.bytes_up(), relay.bytes_down()), (1000, 1000));
    }

    #[test]
    fn concurrent_connections_are_counted_separately_and_summed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let upstream = dir.path().join("echo.sock");
        let listen = dir.path().join("relay.sock");
        let _server = echo_server(&upstream);
        let relay = Relay::start(&listen, &upstream).expect("start relay");
        let clients: Vec<_> = (1..=4usize)
            .map(|i| {
                let listen = listen.clone();
                std::thread::spawn(move || {
                    let data = payload(i * 100_000);
                    assert_eq!(round_trip(&listen, &data), data);
                })
            })
            .collect();
        for client in clients {
            client.join().expect("client thread");
        }
        let total = (1..=4u64).map(|i| i * 100_000).sum::<u64>();
        assert_eq!((relay.bytes_up(), relay.bytes_down()), (total, total));
        assert_eq!(relay.connections(), 4);
    }

    #[test]
    fn missing_upstream_closes_the_client() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listen = dir.path().join("relay.sock");
        let relay = Relay::start(&listen, dir.path().join("nobody.sock")).expect("start relay");
        let mut stream = StdStream::connect(&listen).expect("connect to relay");
        let mut rest = Vec::new();
        // End-of-stream (or a reset) rather than a hang.
        let _ = stream.read_to_end(&mut rest);
        assert!(rest.is_empty());
        assert_eq!(relay.connections(), 1);
        assert_eq!((relay.bytes_up(), relay.bytes_down()), (0, 0));
    }

    #[test]
    fn disconnect_all_cuts_open_connections_and_keeps_listening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let upstream = dir.path().join("echo.sock");
        let listen = dir.path().join("relay.sock");
        let _server = echo_server(&upstream);
        let relay = Relay::start(&listen, &upstream).expect("start relay");

        let mut stream = StdStream::connect(&listen).expect("connect to relay");
        stream.write_all(b"ping").expect("write");
        let mut echoed = [0u8; 4];
        stream.read_exact(&mut echoed).expect("read echo");
        relay.disconnect_all();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        assert!(rest.is_empty());

        assert_eq!(round_trip(&listen, b"again"), b"again");
    }

    #[test]
    fn shutdown_removes_the_socket_and_refuses_new_clients() {
        let dir = tempfile::tempdir().expect("tempdir");
        let upstream = dir.path().join("echo.sock");
        let listen = dir.path().join("relay.sock");
        let _server = echo_server(&upstream);
        let relay = Relay::start(&listen, &upstream).expect("start relay");
        let mut open = StdStream::connect(&listen).expect("connect to relay");
        open.write_all(b"x").expect("write");
        let mut one = [0u8; 1];
        open.read_exact(&mut one).expect("read echo");

        relay.shutdown();
        assert!(!listen.exists());
        assert!(StdStream::connect(&listen).is_err());
        let mut rest = Vec::new();
        let _ = open.read_to_end(&mut rest);
        assert!(rest.is_empty());
    }

    #[test]
    fn start_replaces_a_stale_socket_but_never_a_regular_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stale = dir.path().join("stale.sock");
        drop(StdListener::bind(&stale).expect("bind"));
        assert!(stale.exists());
        let relay = Relay::start(&stale, dir.path().join("up.sock")).expect("replace stale");
        drop(relay);
        assert!(!stale.exists());

        let file = dir.path().join("file");
        std::fs::write(&file, b"keep me").expect("write file");
        let error = Relay::start(&file, dir.path().join("up.sock")).expect_err("must refuse");
        assert!(error.to_string().contains("not a socket"), "{error}");
        assert_eq!(std::fs::read(&file).expect("read file"), b"keep me");
    }
}
