//! Timing bounds of a session, each with its unit in its name. Size and count bounds of the wire
//! format are in `vmsync_protocol::limits`.
//!
//! How liveness works: the client sends a `Ping` whenever it has sent nothing for
//! [`HEARTBEAT_INTERVAL_MS`] (with at most one heartbeat outstanding), and the server answers
//! pings at once, from its reader, even while it is busy with a long request. So while a session
//! is healthy, neither side waits more than about one interval for bytes. Each side declares the
//! peer dead after [`PEER_SILENCE_LIMIT_MS`] spent waiting for bytes that do not come: a missed
//! heartbeat window. [`REQUEST_TIMEOUT_MS`] is only a backstop for a peer that is alive but
//! stuck, so it can be generous: scanning or staging a large tree legitimately takes minutes.

/// Longest the whole handshake (Hello out, Welcome or Refused back) may take, on either side.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// The client pings after sending nothing for this long.
pub const HEARTBEAT_INTERVAL_MS: u64 = 5_000;
/// A peer that sends no byte for this long while we wait for one is dead: three heartbeat
/// intervals, so one lost or late pong is not fatal.
pub const PEER_SILENCE_LIMIT_MS: u64 = 3 * HEARTBEAT_INTERVAL_MS;
/// Once a message's first byte is in, it must keep coming at this average rate after the
/// first silence limit (`vmsync_protocol::MinRate`): a peer trickling a message a byte at a
/// time just inside the silence limit is cut off. vsock and Unix sockets move gigabytes a
/// second; this is a floor for a peer that is alive but hostile.
pub const MIN_MESSAGE_BYTES_PER_SEC: u64 = 64 * 1024;
/// Backstop per request: if a request has no answer after this long although the peer is alive
/// (it answers heartbeats), the session is torn down and every pending request fails.
pub const REQUEST_TIMEOUT_MS: u64 = 30 * 60 * 1000;
/// Encoded messages waiting for a writer task. Small: the writer's socket buffer does the real
/// buffering, and a full queue is back-pressure on whoever produces messages.
pub const WRITE_QUEUE_MESSAGES: usize = 16;

/// Longest a change long-poll is held open before it is answered empty and re-asked: well
/// inside the request backstop, so a quiet share never looks like a hung request.
pub const POLL_WAIT_MS: u32 = 25_000;
