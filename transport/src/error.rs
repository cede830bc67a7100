//! The transport's error type: why a connection or session could not be set up or ended.
//! Per-request failures are `vmsync_core::endpoint::EndpointError`s (what the controller sees);
//! this type is what `client_handshake` and `serve` return.

use std::error::Error;
use std::fmt::Write;
use std::io;
use vmsync_protocol::handshake::WelcomeError;
use vmsync_protocol::{CodecError, FrameError, ValidationError};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("connection I/O failed")]
    Io(#[source] io::Error),
    #[error("the peer sent bad data")]
    Codec(#[source] CodecError),
    #[error("the handshake did not finish within {ms} ms")]
    HandshakeTimeout { ms: u64 },
    #[error("the peer closed the connection during the handshake")]
    ClosedDuringHandshake,
    /// The guest refused our `Hello`. `reason` is the guest's text, escaped for printing.
    #[error("the guest refused the session: {reason}")]
    Refused { reason: String },
    /// We (the guest) refused the host's `Hello`, and told it why.
    #[error("refused the host's session: {reason}")]
    RefusedPeer { reason: String },
    #[error("the guest's Welcome is not acceptable")]
    BadWelcome(#[source] WelcomeError),
    #[error("protocol violation by the peer: {0}")]
    Protocol(String),
    #[error("our own Hello is invalid")]
    InvalidHello(#[source] ValidationError),
    #[error("share index {index} does not exist: the session opened {count} shares")]
    NoSuchShare { index: u16, count: usize },
    #[error("could not encode our own message")]
    Encode(#[source] CodecError),
    #[error("a session task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl From<io::Error> for TransportError {
    fn from(e: io::Error) -> Self {
        TransportError::Io(e)
    }
}

impl From<CodecError> for TransportError {
    /// I/O failures surface as `Io`, not as "bad data", even when they come through the codec.
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::Frame(FrameError::Io(io)) => TransportError::Io(io),
            other => TransportError::Codec(other),
        }
    }
}

impl From<FrameError> for TransportError {
    fn from(e: FrameError) -> Self {
        TransportError::from(CodecError::Frame(e))
    }
}

/// An error and all its causes on one line: `top: cause: root cause`. For texts that cross a
/// boundary as a plain string (`EndpointError`, logs).
pub fn error_chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let _ = write!(s, ": {c}");
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_includes_causes() {
        let e = TransportError::from(CodecError::Frame(FrameError::EmptyMessage));
        assert_eq!(
            error_chain(&e),
            "the peer sent bad data: framing error: empty message"
        );
        let e = TransportError::from(CodecError::Frame(FrameError::Io(io::Error::other("boom"))));
        assert!(matches!(e, TransportError::Io(_)));
    }
}
