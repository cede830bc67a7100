//! The hybrid vsock handshake: how a host process reaches a guest's vsock port through the VMM's
//! Unix socket (Firecracker, Cloud Hypervisor, vhost-device-vsock / vhost-user-vsock).
//!
//! The client connects to the VMM's socket, sends `CONNECT <port>\n`, and the VMM answers one
//! line. Any reply starting with `OK ` means the stream is now spliced to the guest port:
//! vhost-device-vsock answers `OK <guest port>`, Firecracker `OK <host-side port it assigned>`,
//! so nothing after `OK ` is interpreted. From then on the socket carries the guest's bytes.
//!
//! Three rules keep this safe against a confused or hostile VMM socket:
//! - The reply is read **one byte at a time** into a fixed [`MAX_REPLY_BYTES`] buffer and never
//!   past the newline: the guest may send its first protocol bytes right behind the reply, and a
//!   buffered reader would swallow them (vhost-device-vsock's own `BufReader::read_until`
//!   pattern can drop them).
//! - The whole handshake (write + reply) has one deadline, [`HANDSHAKE_TIMEOUT_MS`]: a VMM that
//!   accepts and then says nothing must not hang the caller's reconnect loop.
//! - A socket that closes before sending any reply byte is how vhost-device-vsock reports "no
//!   one listens on that guest port" (the guest agent is not up yet); with no VM attached it
//!   accepts and closes at once (the client sees EOF, a reset or a broken pipe), and 0.3.0 also
//!   drops a request now and then when a previous connection closed in the same instant
//!   (a stale readiness event: it reads the request, gets EAGAIN and closes). All of those are
//!   reported as
//!   [`io::ErrorKind::ConnectionRefused`] so callers treat it like any refused connection: retry
//!   with backoff. Every other failure has its own kind (see [`handshake`]).
//!
//! The handshake is generic over its stream so the tests can drive it with in-memory fakes as
//! well as real Unix sockets.

use std::io;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use vmsync_core::path::escape_bytes;

/// Longest reply line accepted, newline included. Firecracker's longest reply is
/// `OK 4294967295\n` (14 bytes); 32 leaves room without letting a peer make us buffer much.
pub const MAX_REPLY_BYTES: usize = 32;
/// Deadline for the whole handshake. A local VMM answers in about a millisecond (measured 1.5 ms
/// for vhost-device-vsock's refusal under software emulation), so this only catches a stuck
/// peer; it is below the host agent's 5 s connect bound so the error says what went wrong.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 3_000;

/// Connects to the VMM socket at `path` and asks for guest `port`, with the default deadline.
pub async fn connect(path: &Path, port: u32) -> io::Result<UnixStream> {
    connect_with_timeout(path, port, Duration::from_millis(HANDSHAKE_TIMEOUT_MS)).await
}

/// [`connect`] with an explicit handshake deadline (the Unix connect itself is local and does
/// not block on the guest).
pub async fn connect_with_timeout(
    path: &Path,
    port: u32,
    timeout: Duration,
) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(path).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot connect to the VMM socket {}: {e}", path.display()),
        )
    })?;
    handshake(&mut stream, port, timeout)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("{} port {port}: {e}", path.display())))?;
    Ok(stream)
}

/// Runs the `CONNECT` handshake on `stream` and returns the reply line (without the newline).
/// On success the stream is positioned exactly after the reply's newline.
///
/// Errors, by kind:
/// - `ConnectionRefused`: closed (EOF, reset or broken pipe) before any reply byte: nobody
///   listens on the guest port yet, or the VM is not running;
/// - `UnexpectedEof`: closed in the middle of the reply line;
/// - `InvalidData`: a reply line that does not start with `OK `, or no newline within
///   [`MAX_REPLY_BYTES`];
/// - `TimedOut`: no complete reply within `timeout`;
/// - anything the stream itself reports.
pub async fn handshake<S>(stream: &mut S, port: u32, timeout: Duration) -> io::Result<String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(timeout, exchange(stream, port)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no reply to CONNECT {port} within {} ms",
                timeout.as_millis()
            ),
        )),
    }
}

async fn exchange<S>(stream: &mut S, port: u32) -> io::Result<String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    exchange_inner(stream, port).await.map_err(|e| {
        // A VMM with no guest (or no listener on the port) drops the connection: depending on
        // timing the client sees EOF, a reset or a broken pipe. All mean the same thing, and
        // one stable error lets the caller log it once instead of at every alternation.
        if matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        ) {
            not_listening(port)
        } else {
            e
        }
    })
}

fn not_listening(port: u32) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionRefused,
        format!(
            "the VMM closed the connection without a reply to CONNECT {port}: nothing listens \
             on that guest port (yet), or the VM is not running"
        ),
    )
}

async fn exchange_inner<S>(stream: &mut S, port: u32) -> io::Result<String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    stream.flush().await?;

    let mut buf = [0u8; MAX_REPLY_BYTES];
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "reply to CONNECT {port} has no newline within {MAX_REPLY_BYTES} bytes: \"{}\"",
                    escape_bytes(&buf)
                ),
            ));
        }
        // One byte per read: anything after the newline belongs to the guest's stream.
        let n = stream.read(&mut buf[len..len + 1]).await?;
        if n == 0 {
            return Err(if len == 0 {
                not_listening(port)
            } else {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the VMM closed the connection in the middle of its reply: \"{}\"",
                        escape_bytes(&buf[..len])
                    ),
                )
            });
        }
        if buf[len] == b'\n' {
            break;
        }
        len += 1;
    }
    let line = &buf[..len];
    if !line.starts_with(b"OK ") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the VMM refused CONNECT {port}: \"{}\"", escape_bytes(line)),
        ));
    }
    // The reply is at most MAX_REPLY_BYTES and escaped, so it is safe to log as is.
    Ok(escape_bytes(line))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn silent_peer_times_out_in_virtual_time() {
        // An in-memory peer that reads the request and then never answers.
        let (mut client, mut server) = tokio::io::duplex(64);
        let keep = tokio::spawn(async move {
            let mut req = [0u8; 13];
            server.read_exact(&mut req).await.unwrap();
            assert_eq!(&req, b"CONNECT 5001\n");
            std::future::pending::<()>().await;
            drop(server);
        });
        let started = tokio::time::Instant::now();
        let err = handshake(&mut client, 5001, Duration::from_secs(3))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        keep.abort();
    }

    #[tokio::test]
    async fn reply_is_read_only_up_to_the_newline() {
        let (mut client, mut server) = tokio::io::duplex(64);
        server.write_all(b"OK 1073741824\nhello").await.unwrap();
        let reply = handshake(&mut client, 52, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(reply, "OK 1073741824");
        let mut rest = [0u8; 5];
        client.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"hello");
    }
}
