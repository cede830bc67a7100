//! What both ends of a session share about its byte stream: the stream split into a metered,
//! framed message reader and frame writer, the handshake's small message limit and the switch
//! to the session's limits once it is done, and the handshake's deadline.

use super::io::{MeteredRead, MeteredWrite};
use super::stats::Stats;
use crate::error::TransportError;
use crate::limits::MIN_MESSAGE_BYTES_PER_SEC;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio_util::codec::{FramedRead, FramedWrite};
use vmsync_protocol::limits::MAX_MESSAGE_BYTES;
use vmsync_protocol::{FrameCodec, Message, MessageCodec, MinRate};

pub(crate) type Reader<S> = FramedRead<MeteredRead<ReadHalf<S>>, MessageCodec<Message, Message>>;
pub(crate) type Writer<S> = FramedWrite<MeteredWrite<WriteHalf<S>>, FrameCodec>;

/// Splits `stream` into its halves, counting bytes into `stats` and failing a half that stalls
/// for `silence_limit` or a message that arrives slower than [`MIN_MESSAGE_BYTES_PER_SEC`]
/// after it; messages are held to the handshake's limit until [`handshake_done`].
pub(crate) fn framed<S>(
    stream: S,
    stats: &Arc<Stats>,
    silence_limit: Duration,
) -> (Reader<S>, Writer<S>)
where
    S: AsyncRead + AsyncWrite,
{
    let (r, w) = tokio::io::split(stream);
    let mut codec = MessageCodec::<Message, Message>::new();
    codec.set_min_rate(MinRate {
        bytes_per_sec: MIN_MESSAGE_BYTES_PER_SEC,
        grace: silence_limit,
        clock: now,
    });
    let reader = FramedRead::new(MeteredRead::new(r, stats.clone(), silence_limit), codec);
    let writer = FramedWrite::new(
        MeteredWrite::new(w, stats.clone(), silence_limit),
        FrameCodec::new(),
    );
    (reader, writer)
}

/// A write buffer larger than this is given back once it has been sent.
const KEEP_WRITE_BUFFER_BYTES: usize = 1 << 20;

/// Gives back the write buffer after a large message: otherwise it keeps that message's size
/// for as long as the session lasts (a guest's full listing of 200,000 files left 13.7 MiB).
/// Call after a `send`, which leaves the buffer empty.
pub(crate) fn shed_write_buffer<S>(writer: &mut Writer<S>) {
    let buffer = writer.write_buffer_mut();
    if buffer.is_empty() && buffer.capacity() > KEEP_WRITE_BUFFER_BYTES {
        *buffer = bytes::BytesMut::new();
    }
}

/// The time on tokio's clock (paused in tests), for the codec's [`MinRate`].
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// The handshake is over: messages may be as large as the session allows.
pub(crate) fn handshake_done<S>(reader: &mut Reader<S>, writer: &mut Writer<S>) {
    reader.decoder_mut().handshake_done();
    writer
        .encoder_mut()
        .set_max_message_bytes(MAX_MESSAGE_BYTES);
}

/// Runs a handshake exchange, failing it after `timeout`.
pub(crate) async fn within<T>(
    timeout: Duration,
    exchange: impl Future<Output = Result<T, TransportError>>,
) -> Result<T, TransportError> {
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| TransportError::HandshakeTimeout {
            ms: millis(timeout),
        })?
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
