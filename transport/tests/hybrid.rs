//! The hybrid vsock handshake against a fake VMM socket, scripted at the byte level on a real
//! Unix socket in a temporary directory: one test per way a VMM (or something posing as one)
//! can answer `CONNECT PORT\n`. No AF_VSOCK socket is opened.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{self, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmsync_transport::hybrid;
use vmsync_transport::EndpointAddr;

const PORT: u32 = 5001;

/// What the fake VMM does after it has read the request line.
enum Step {
    Send(&'static [u8]),
    Pause(u64),
    /// Keep the connection open (silent) for this many milliseconds, then close.
    Hold(u64),
}

/// What the fake VMM saw: the request line, and the bytes the client sent after the handshake.
type Seen = thread::JoinHandle<(Vec<u8>, Vec<u8>)>;

/// Binds a fake VMM socket, serves exactly one connection with `script`, and returns the
/// socket path and a handle yielding what the client sent.
fn fake_vmm(dir: &Path, script: Vec<Step>) -> (PathBuf, Seen) {
    let path = dir.join("vm.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let handle = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Read the request the way a VMM does: up to the newline, byte by byte.
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while request.last() != Some(&b'\n') && request.len() < 64 {
            match conn.read(&mut byte) {
                Ok(1) => request.push(byte[0]),
                _ => break,
            }
        }
        for step in script {
            match step {
                Step::Send(bytes) => {
                    let _ = conn.write_all(bytes);
                }
                Step::Pause(ms) | Step::Hold(ms) => thread::sleep(Duration::from_millis(ms)),
            }
        }
        // Whatever the client wrote after the handshake (used by the pass-through test).
        conn.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut after = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok(n) = conn.read(&mut buf) {
            if n == 0 {
                break;
            }
            after.extend_from_slice(&buf[..n]);
        }
        (request, after)
    });
    (path, handle)
}

async fn dial(path: &Path) -> io::Result<tokio::net::UnixStream> {
    hybrid::connect_with_timeout(path, PORT, Duration::from_millis(1_000)).await
}

#[tokio::test]
async fn ok_reply_connects_and_request_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (path, server) = fake_vmm(dir.path(), vec![Step::Send(b"OK 5001\n")]);
    let stream = dial(&path).await.unwrap();
    drop(stream);
    let (request, _) = server.join().unwrap();
    assert_eq!(request, b"CONNECT 5001\n");
}

#[tokio::test]
async fn firecracker_style_reply_is_accepted() {
    // Firecracker answers with the host-side port it assigned, not the guest port.
    let dir = tempfile::tempdir().unwrap();
    let (path, server) = fake_vmm(dir.path(), vec![Step::Send(b"OK 1073741824\n")]);
    dial(&path).await.unwrap();
    server.join().unwrap();
}

#[tokio::test]
async fn reply_split_across_reads() {
    let dir = tempfile::tempdir().unwrap();
    let script = vec![
        Step::Send(b"O"),
        Step::Pause(30),
        Step::Send(b"K 50"),
        Step::Pause(30),
        Step::Send(b"01"),
        Step::Pause(30),
        Step::Send(b"\n"),
    ];
    let (path, server) = fake_vmm(dir.path(), script);
    dial(&path).await.unwrap();
    server.join().unwrap();
}

#[tokio::test]
async fn bytes_after_the_newline_are_left_for_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    // Reply and the guest's first bytes in one write: a buffered reader would eat the latter.
    let (path, server) = fake_vmm(
        dir.path(),
        vec![Step::Send(b"OK 5001\nGUEST-HELLO"), Step::Hold(100)],
    );
    let addr = EndpointAddr::Hybrid {
        path: path.clone(),
        port: PORT,
    };
    // Through the public `connect`, as the host agent dials.
    let mut stream = vmsync_transport::connect(&addr).await.unwrap();
    let mut first = [0u8; 11];
    stream.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"GUEST-HELLO");
    stream.write_all(b"host-bytes").await.unwrap();
    stream.flush().await.unwrap();
    let (_, after) = server.join().unwrap();
    assert_eq!(after, b"host-bytes");
}

#[tokio::test]
async fn no_newline_within_the_bound_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (path, server) = fake_vmm(
        dir.path(),
        vec![
            Step::Send(b"OK 50010000000000000000000000000000000000000000"),
            Step::Hold(300),
        ],
    );
    let err = dial(&path).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    assert!(
        err.to_string().contains("no newline within 32 bytes"),
        "{err}"
    );
    server.join().unwrap();
}

#[tokio::test]
async fn garbage_reply_is_refused_and_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let (path, server) = fake_vmm(dir.path(), vec![Step::Send(b"ERR\x1b[31m no\n")]);
    let err = dial(&path).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("refused CONNECT 5001"), "{msg}");
    assert!(!msg.contains('\x1b'), "peer bytes must be escaped: {msg:?}");
    server.join().unwrap();

    // `OK` without the space is not `OK `.
    let dir = tempfile::tempdir().unwrap();
    let (path, server) = fake_vmm(dir.path(), vec![Step::Send(b"OK\n")]);
    assert_eq!(
        dial(&path).await.unwrap_err().kind(),
        io::ErrorKind::InvalidData
    );
    server.join().unwrap();
}

#[tokio::test]
async fn eof_without_reply_means_guest_not_listening() {
    // vhost-device-vsock closes the socket when nothing listens on the guest port.
    let dir = tempfile::tempdir().unwrap();
    let (path, server) = fake_vmm(dir.path(), vec![]);
    let err = dial(&path).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    assert!(err.to_string().contains("nothing listens"), "{err}");
    assert!(err.to_string().contains("vm.sock"), "{err}");
    server.join().unwrap();
}

#[tokio::test]
async fn eof_in_the_middle_of_the_reply() {
    let dir = tempfile::tempdir().unwrap();
    let (path, server) = fake_vmm(dir.path(), vec![Step::Send(b"OK 50")]);
    let err = dial(&path).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    server.join().unwrap();
}

#[tokio::test]
async fn silence_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let (path, server) = fake_vmm(dir.path(), vec![Step::Hold(1_000)]);
    let started = std::time::Instant::now();
    let err = hybrid::connect_with_timeout(&path, PORT, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    assert!(started.elapsed() < Duration::from_millis(900));
    server.join().unwrap();
}

#[tokio::test]
async fn missing_vmm_socket_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.sock");
    let err = dial(&path).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    assert!(err.to_string().contains("absent.sock"), "{err}");
}

#[tokio::test]
async fn vmm_dropping_the_request_unread_counts_as_not_listening() {
    // vhost-device-vsock with no VM attached accepts and closes at once: depending on timing
    // the client sees a broken pipe, a reset or EOF. All must be the one retryable error.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        for _ in 0..3 {
            let (conn, _) = listener.accept().unwrap();
            drop(conn);
        }
    });
    let mut messages = Vec::new();
    for _ in 0..3 {
        let err = dial(&path).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        messages.push(err.to_string());
    }
    // One stable message, so the host logs it once rather than at every alternation.
    messages.dedup();
    assert_eq!(messages.len(), 1, "{messages:?}");
    server.join().unwrap();
}
