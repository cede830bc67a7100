//! The RPC session over any byte stream: the host's client ([`client_handshake`], [`Session`],
//! [`RemoteEndpoint`]) and the guest's server ([`serve`]). Generic over
//! `AsyncRead + AsyncWrite`, so tests run both ends over an in-memory pipe.
//!
//! - [`client`]: handshake, the cloneable session handle, pipelining, heartbeats, timeouts.
//! - [`remote`]: `RemoteEndpoint`, the `Endpoint` trait as requests on a session.
//! - [`server`]: handshake answer, the per-connection state machine, dispatch to a local
//!   `Endpoint`.
//! - [`stats`]: byte counters shown by `status`.
//! - `framing`: the stream as framed messages, the handshake's limits and deadline (both
//!   sides).
//! - `memory`: the guest's big manifests as this session saw them, for manifest edits.
//! - `io`: stream wrappers that count bytes and enforce the silence and stall limits.
//! - `told`: what the guest's server has told the host about each share's entries (the last
//!   full listing, and targeted scans since).

pub mod client;
mod framing;
mod io;
mod memory;
pub mod remote;
pub mod server;
pub mod stats;
mod told;

pub use client::{client_handshake, client_handshake_with, Session, SessionConfig};
pub use remote::RemoteEndpoint;
pub use server::{serve, serve_with, ServerConfig};
pub use stats::{ShareStats, Stats, StatsSnapshot};
