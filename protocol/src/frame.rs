//! The framing layer: splits logical messages into fragments and assembles them back, with every
//! size checked before anything is buffered for it. It knows nothing of what a message means.
//!
//! A fragment is a big-endian `u32` header followed by its payload. Bit 31 of the header is set
//! when more fragments of the same message follow; the low 31 bits are the payload length, at
//! most [`MAX_FRAME_BYTES`]. A message is the concatenation of its fragments' payloads and is at
//! most the codec's current cap ([`MAX_HANDSHAKE_BYTES`] until the handshake is done, then
//! [`MAX_MESSAGE_BYTES`]). Empty fragments and empty messages are errors (our encoder never
//! produces them, and accepting them would let a peer spin us on four-byte headers).
//!
//! Memory: the decoder never reserves from a claimed length. A fragment's bytes sit in the
//! reader's buffer, which grows only as bytes arrive; a multi-fragment message grows its
//! assembly buffer only by fragments that have fully arrived. Every error ends the session:
//! after one, the stream position is meaningless.
//!
//! EOF between messages is a clean end (`decode_eof` returns `None`); EOF inside a header, a
//! fragment or between the fragments of one message is [`FrameError::Truncated`].
//!
//! Time: with a [`MinRate`], a message must keep arriving at least at an average rate once its
//! first byte has, or decoding fails with [`FrameError::TooSlow`]. A silence limit alone (the
//! transport's) lets a peer trickle a message a byte at a time just inside it, holding the
//! request it answers for as long as the request's backstop.

use crate::limits::{FRAME_HEADER_BYTES, MAX_FRAME_BYTES, MAX_HANDSHAKE_BYTES};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::io;
use std::time::{Duration, Instant};
use tokio_util::codec::{Decoder, Encoder};

/// Header bit: more fragments of this message follow.
pub const MORE_FRAGMENTS: u32 = 1 << 31;
const LEN_MASK: u32 = !MORE_FRAGMENTS;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("fragment of {len} bytes is larger than the {max}-byte limit")]
    FragmentTooLarge { len: usize, max: usize },
    #[error("message of at least {len} bytes is larger than the {max}-byte limit")]
    MessageTooLarge { len: usize, max: usize },
    #[error("empty fragment inside a message")]
    EmptyFragment,
    #[error("empty message")]
    EmptyMessage,
    #[error(
        "connection closed in the middle of a message \
         ({buffered} bytes of an unfinished fragment, {assembled} bytes of earlier fragments)"
    )]
    Truncated { buffered: usize, assembled: usize },
    #[error(
        "message arriving too slowly: {bytes} bytes in {secs} s, below {min_rate} bytes/s \
         after the first {grace_secs} s"
    )]
    TooSlow {
        bytes: usize,
        secs: u64,
        min_rate: u64,
        grace_secs: u64,
    },
    #[error("connection I/O failed")]
    Io(#[from] io::Error),
}

/// The slowest a message may arrive (see the module docs): once its first byte is in, after
/// `grace`, at least `bytes_per_sec` on average since that byte. `clock` tells the time (the
/// transport passes tokio's, so tests can pause it).
#[derive(Debug, Clone, Copy)]
pub struct MinRate {
    pub bytes_per_sec: u64,
    pub grace: Duration,
    pub clock: fn() -> Instant,
}

impl MinRate {
    /// `Err` when `bytes` of a message that began at `since` are too few by now.
    fn check(&self, since: Instant, bytes: usize) -> Result<(), FrameError> {
        let elapsed = (self.clock)().saturating_duration_since(since);
        let Some(late) = elapsed.checked_sub(self.grace) else {
            return Ok(());
        };
        let owed = u128::from(self.bytes_per_sec) * late.as_millis() / 1000;
        if (bytes as u128) >= owed {
            return Ok(());
        }
        Err(FrameError::TooSlow {
            bytes,
            secs: elapsed.as_secs(),
            min_rate: self.bytes_per_sec,
            grace_secs: self.grace.as_secs(),
        })
    }
}

/// The fragment codec. One per direction per connection (the decoder keeps assembly state).
#[derive(Debug)]
pub struct FrameCodec {
    max_message_bytes: usize,
    fragment_bytes: usize,
    /// Payloads of the fragments of the current message that arrived so far.
    assembled: BytesMut,
    min_rate: Option<MinRate>,
    /// When the first byte of the message now arriving was seen (with a `min_rate`).
    started: Option<Instant>,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameCodec {
    /// A codec for a fresh connection: messages are capped at [`MAX_HANDSHAKE_BYTES`].
    pub fn new() -> Self {
        Self::with_max_message_bytes(MAX_HANDSHAKE_BYTES)
    }

    pub fn with_max_message_bytes(max_message_bytes: usize) -> Self {
        FrameCodec {
            max_message_bytes,
            fragment_bytes: MAX_FRAME_BYTES,
            assembled: BytesMut::new(),
            min_rate: None,
            started: None,
        }
    }

    /// From now on, messages must arrive at least this fast (see [`MinRate`]).
    pub fn set_min_rate(&mut self, min_rate: MinRate) {
        self.min_rate = Some(min_rate);
    }

    /// Sets the fragment size the encoder uses (clamped to `1..=MAX_FRAME_BYTES`). The decoder
    /// accepts any fragment up to [`MAX_FRAME_BYTES`] regardless; this exists so tests and fuzz
    /// targets can exercise multi-fragment messages with small payloads.
    pub fn with_fragment_bytes(mut self, fragment_bytes: usize) -> Self {
        self.fragment_bytes = fragment_bytes.clamp(1, MAX_FRAME_BYTES);
        self
    }

    /// Changes the message cap, e.g. to `MAX_MESSAGE_BYTES` once the handshake is done.
    pub fn set_max_message_bytes(&mut self, max_message_bytes: usize) {
        self.max_message_bytes = max_message_bytes;
    }

    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// True while some fragments of a message have arrived but not its last one.
    pub fn in_message(&self) -> bool {
        !self.assembled.is_empty()
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        let decoded = self.decode_fragments(src)?;
        if let Some(min_rate) = self.min_rate {
            let pending = self.assembled.len() + src.len();
            let now = (min_rate.clock)();
            if decoded.is_some() {
                // What is left in `src` belongs to the next message, which begins now.
                self.started = (!src.is_empty()).then_some(now);
            } else if pending == 0 {
                self.started = None;
            } else {
                min_rate.check(*self.started.get_or_insert(now), pending)?;
            }
        }
        Ok(decoded)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        match self.decode(src)? {
            Some(message) => Ok(Some(message)),
            None if src.is_empty() && self.assembled.is_empty() => Ok(None),
            None => Err(FrameError::Truncated {
                buffered: src.len(),
                assembled: self.assembled.len(),
            }),
        }
    }
}

impl FrameCodec {
    /// Takes whole fragments off `src` until a message is complete (`Some`) or `src` holds
    /// only part of a fragment (`None`).
    fn decode_fragments(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        loop {
            let Some(header) = src
                .get(..FRAME_HEADER_BYTES)
                .and_then(|h| <[u8; FRAME_HEADER_BYTES]>::try_from(h).ok())
            else {
                return Ok(None);
            };
            let header = u32::from_be_bytes(header);
            let more = header & MORE_FRAGMENTS != 0;
            // A 31-bit value always fits a usize on the platforms we build for (≥ 32 bits).
            let len = usize::try_from(header & LEN_MASK).unwrap_or(usize::MAX);
            if len > MAX_FRAME_BYTES {
                return Err(FrameError::FragmentTooLarge {
                    len,
                    max: MAX_FRAME_BYTES,
                });
            }
            let total = self.assembled.len().saturating_add(len);
            if total > self.max_message_bytes {
                return Err(FrameError::MessageTooLarge {
                    len: total,
                    max: self.max_message_bytes,
                });
            }
            if len == 0 {
                return Err(if !more && self.assembled.is_empty() {
                    FrameError::EmptyMessage
                } else {
                    FrameError::EmptyFragment
                });
            }
            if src.len() < FRAME_HEADER_BYTES + len {
                // Wait for the rest; the reader's buffer grows only as bytes arrive.
                return Ok(None);
            }
            src.advance(FRAME_HEADER_BYTES);
            let payload = src.split_to(len);
            if !more {
                if self.assembled.is_empty() {
                    return Ok(Some(payload));
                }
                self.assembled.extend_from_slice(&payload);
                return Ok(Some(std::mem::take(&mut self.assembled)));
            }
            self.assembled.extend_from_slice(&payload);
        }
    }
}

impl Encoder<&[u8]> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, payload: &[u8], dst: &mut BytesMut) -> Result<(), FrameError> {
        if payload.is_empty() {
            return Err(FrameError::EmptyMessage);
        }
        if payload.len() > self.max_message_bytes {
            return Err(FrameError::MessageTooLarge {
                len: payload.len(),
                max: self.max_message_bytes,
            });
        }
        let fragments = payload.len().div_ceil(self.fragment_bytes);
        dst.reserve(payload.len() + fragments * FRAME_HEADER_BYTES);
        let mut rest = payload;
        while !rest.is_empty() {
            let (fragment, tail) = rest.split_at(rest.len().min(self.fragment_bytes));
            let len = u32::try_from(fragment.len()).map_err(|_| FrameError::FragmentTooLarge {
                len: fragment.len(),
                max: MAX_FRAME_BYTES,
            })?;
            let more = if tail.is_empty() { 0 } else { MORE_FRAGMENTS };
            dst.put_u32(len | more);
            dst.extend_from_slice(fragment);
            rest = tail;
        }
        Ok(())
    }
}

impl Encoder<Bytes> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, payload: Bytes, dst: &mut BytesMut) -> Result<(), FrameError> {
        Encoder::<&[u8]>::encode(self, &payload, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::MAX_MESSAGE_BYTES;

    fn header(len: u32, more: bool) -> [u8; 4] {
        (len | if more { MORE_FRAGMENTS } else { 0 }).to_be_bytes()
    }

    fn encode(codec: &mut FrameCodec, payload: &[u8]) -> BytesMut {
        let mut dst = BytesMut::new();
        codec.encode(payload, &mut dst).unwrap();
        dst
    }

    #[test]
    fn single_fragment_round_trip() {
        let mut codec = FrameCodec::new();
        let mut wire = encode(&mut codec, b"hello");
        assert_eq!(&wire[..], b"\x00\x00\x00\x05hello");
        assert_eq!(&codec.decode(&mut wire).unwrap().unwrap()[..], b"hello");
        assert!(wire.is_empty());
        assert!(codec.decode_eof(&mut wire).unwrap().is_none());
    }

    #[test]
    fn splits_into_fragments_and_reassembles() {
        let mut codec = FrameCodec::new().with_fragment_bytes(3);
        let mut wire = encode(&mut codec, b"abcdefgh");
        assert_eq!(
            &wire[..],
            b"\x80\x00\x00\x03abc\x80\x00\x00\x03def\x00\x00\x00\x02gh"
        );
        assert_eq!(&codec.decode(&mut wire).unwrap().unwrap()[..], b"abcdefgh");
    }

    #[test]
    fn large_payload_uses_max_size_fragments() {
        let mut codec = FrameCodec::with_max_message_bytes(MAX_MESSAGE_BYTES);
        let payload = vec![7u8; MAX_FRAME_BYTES * 2 + 1];
        let mut wire = encode(&mut codec, &payload);
        assert_eq!(wire.len(), payload.len() + 3 * FRAME_HEADER_BYTES);
        assert_eq!(&wire[..4], &header(MAX_FRAME_BYTES as u32, true));
        assert_eq!(
            codec.decode(&mut wire).unwrap().unwrap().len(),
            payload.len()
        );
    }

    #[test]
    fn byte_by_byte_arrival() {
        let mut enc = FrameCodec::new().with_fragment_bytes(2);
        let wire = encode(&mut enc, b"12345");
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for &b in wire.iter() {
            buf.put_u8(b);
            if let Some(m) = codec.decode(&mut buf).unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out.len(), 1);
        assert_eq!(&out[0][..], b"12345");
    }

    #[test]
    fn rejects_fragment_over_limit_from_header_alone() {
        for len in [u32::MAX, LEN_MASK, MAX_FRAME_BYTES as u32 + 1] {
            let mut codec = FrameCodec::with_max_message_bytes(MAX_MESSAGE_BYTES);
            let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
            assert!(matches!(
                codec.decode(&mut buf),
                Err(FrameError::FragmentTooLarge { .. })
            ));
        }
    }

    #[test]
    fn rejects_message_over_cap_from_header_alone() {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::from(&header(MAX_HANDSHAKE_BYTES as u32 + 1, false)[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::MessageTooLarge { len, max: MAX_HANDSHAKE_BYTES })
                if len == MAX_HANDSHAKE_BYTES + 1
        ));
        // Exactly at the cap is fine (still waiting for the body).
        let mut buf = BytesMut::from(&header(MAX_HANDSHAKE_BYTES as u32, false)[..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn rejects_message_whose_fragments_add_up_over_cap() {
        let mut codec = FrameCodec::with_max_message_bytes(10);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&header(6, true));
        buf.extend_from_slice(b"abcdef");
        buf.extend_from_slice(&header(5, false));
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::MessageTooLarge { len: 11, max: 10 })
        ));
    }

    #[test]
    fn rejects_empty_message_and_empty_fragments() {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::from(&header(0, false)[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::EmptyMessage)
        ));

        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::from(&header(0, true)[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::EmptyFragment)
        ));

        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&header(1, true));
        buf.extend_from_slice(b"x");
        buf.extend_from_slice(&header(0, false));
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::EmptyFragment)
        ));

        let mut codec = FrameCodec::new();
        let mut dst = BytesMut::new();
        assert!(matches!(
            codec.encode(&b""[..], &mut dst),
            Err(FrameError::EmptyMessage)
        ));
    }

    #[test]
    fn eof_inside_a_message_is_an_error() {
        let cases: Vec<Vec<u8>> = vec![
            vec![0, 0],                      // half a header
            b"\x00\x00\x00\x05hel".to_vec(), // half a body
            b"\x80\x00\x00\x01a".to_vec(),   // first fragment only
        ];
        for case in cases {
            let mut codec = FrameCodec::new();
            let mut buf = BytesMut::from(&case[..]);
            assert!(codec.decode(&mut buf).unwrap().is_none());
            assert!(
                matches!(
                    codec.decode_eof(&mut buf),
                    Err(FrameError::Truncated { .. })
                ),
                "{case:?}"
            );
        }
    }

    #[test]
    fn eof_after_complete_messages_is_clean() {
        let mut codec = FrameCodec::new();
        let mut buf = encode(&mut codec, b"one");
        buf.extend_from_slice(&encode(&mut codec, b"two"));
        assert_eq!(&codec.decode_eof(&mut buf).unwrap().unwrap()[..], b"one");
        assert_eq!(&codec.decode_eof(&mut buf).unwrap().unwrap()[..], b"two");
        assert!(codec.decode_eof(&mut buf).unwrap().is_none());
    }

    #[test]
    fn encoder_refuses_oversized_message() {
        let mut codec = FrameCodec::with_max_message_bytes(4);
        let mut dst = BytesMut::new();
        assert!(matches!(
            codec.encode(&b"12345"[..], &mut dst),
            Err(FrameError::MessageTooLarge { len: 5, max: 4 })
        ));
        assert!(dst.is_empty());
    }

    #[test]
    fn partial_fragment_does_not_reserve_claimed_length() {
        let mut codec = FrameCodec::with_max_message_bytes(MAX_MESSAGE_BYTES);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&header(MAX_FRAME_BYTES as u32, false));
        buf.extend_from_slice(b"abc");
        let cap_before = buf.capacity();
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert_eq!(buf.capacity(), cap_before);
        assert!(buf.capacity() < MAX_FRAME_BYTES);
    }
}
