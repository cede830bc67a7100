//! vmsync's byte streams and RPC sessions. The host dials a guest and drives it through a
//! [`RemoteEndpoint`], an implementation of `vmsync_core::endpoint::Endpoint` that the
//! controller cannot tell from a local one; the guest [`serve`]s its local endpoints.
//!
//! Module map:
//! - [`endpoint_addr`]: `unix:`, `vsock://`, `hybrid:`, `libvirt:` address syntax, parsed and
//!   printed.
//! - [`libvirt`]: a `libvirt:` domain's vsock CID, from `virsh dumpxml`, at each dial.
//! - [`stream`]: dialling and listening; hands back boxed byte streams.
//! - [`hybrid`]: the `CONNECT PORT` handshake on a VMM's hybrid vsock Unix socket.
//! - [`capped`]: a stream wrapper bounding each write (the 32 KiB vsock trap).
//! - [`rpc`]: the session over any byte stream (client, remote endpoint, server, stats).
//! - [`limits`]: timing bounds (handshake, heartbeat, silence, request backstop).
//! - [`error`]: `TransportError`, why a session could not start or ended.
//!
//! The wire format itself (frames, messages, validation, chunk compression) is the
//! `vmsync_protocol` crate; this crate moves its messages and keeps the session state.

pub mod capped;
pub mod endpoint_addr;
pub mod error;
pub mod hybrid;
pub mod libvirt;
pub mod limits;
pub mod rpc;
pub mod stream;

pub use capped::CappedWrite;
pub use endpoint_addr::{AddrError, EndpointAddr, LibvirtDomain, DEFAULT_VSOCK_PORT};
pub use error::TransportError;
pub use rpc::{
    client_handshake, client_handshake_with, serve, serve_with, RemoteEndpoint, ServerConfig,
    Session, SessionConfig, ShareStats, Stats, StatsSnapshot,
};
pub use stream::{connect, listen, BoxedStream, Listener};
