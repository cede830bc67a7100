//! Messages on a byte stream: [`FrameCodec`] for the fragments, postcard for the bytes, and
//! [`Validate`] for what serde cannot check. [`MessageCodec`] puts them together as a
//! `tokio_util` codec; [`encode_message`] and [`decode_message`] are the same steps without a
//! stream (for callers that encode off the writer task, and for fuzzing).
//!
//! Decoding is strict: the whole payload must be one value (no trailing bytes), and it must be in
//! canonical form, i.e. re-encoding the decoded value gives back exactly the received bytes.
//! postcard alone accepts over-long varints (`0x80 0x00` for 0); rejecting them means every
//! message has exactly one encoding, so what was validated is what was sent.

use crate::frame::{FrameCodec, FrameError};
use crate::limits::MAX_MESSAGE_BYTES;
use crate::validate::{Validate, ValidationError};
use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io;
use std::marker::PhantomData;
use tokio_util::codec::{Decoder, Encoder};

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("framing error")]
    Frame(#[from] FrameError),
    #[error("message does not decode")]
    Decode(#[source] postcard::Error),
    #[error("{count} stray bytes after the end of the message")]
    TrailingBytes { count: usize },
    #[error("message is not in canonical form (over-long integer encoding)")]
    NonCanonical,
    #[error("message is invalid")]
    Invalid(#[from] ValidationError),
    #[error("message does not encode")]
    Encode(#[source] postcard::Error),
    #[error("message is {len} bytes, more than the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
}

impl From<io::Error> for CodecError {
    fn from(e: io::Error) -> Self {
        CodecError::Frame(FrameError::Io(e))
    }
}

impl CodecError {
    /// The I/O error underneath, if this is one (as opposed to bad data).
    pub fn as_io(&self) -> Option<&io::Error> {
        match self {
            CodecError::Frame(FrameError::Io(e)) => Some(e),
            _ => None,
        }
    }
}

/// Serialises and validates a message, refusing one larger than `max_message_bytes`.
pub fn encode_message<T: Serialize + Validate>(
    value: &T,
    max_message_bytes: usize,
) -> Result<Vec<u8>, CodecError> {
    value.validate()?;
    // Sized first (a pass that copies nothing), so the message is written into a buffer of
    // exactly its length: grown by doubling, a 4 MiB batch of chunks took up to 8 MiB, and
    // twice that while each doubling copied it.
    let len = postcard::serialize_with_flavor(value, postcard::ser_flavors::Size::default())
        .map_err(CodecError::Encode)?;
    if len > max_message_bytes {
        return Err(CodecError::TooLarge {
            len,
            max: max_message_bytes,
        });
    }
    let bytes = postcard::to_extend(value, Vec::with_capacity(len)).map_err(CodecError::Encode)?;
    debug_assert_eq!(bytes.len(), len);
    Ok(bytes)
}

/// Deserialises one whole message, checks it is canonical, and validates it.
pub fn decode_message<T: DeserializeOwned + Serialize + Validate>(
    bytes: &[u8],
) -> Result<T, CodecError> {
    let (value, rest) = postcard::take_from_bytes::<T>(bytes).map_err(CodecError::Decode)?;
    if !rest.is_empty() {
        return Err(CodecError::TrailingBytes { count: rest.len() });
    }
    postcard::serialize_with_flavor(
        &value,
        SameBytes {
            expected: bytes,
            pos: 0,
        },
    )
    .map_err(|_| CodecError::NonCanonical)?;
    value.validate()?;
    Ok(value)
}

/// A postcard output "flavor" that writes nothing and fails at the first byte that differs from
/// `expected`: re-encoding check without allocating a second copy of a large message.
struct SameBytes<'a> {
    expected: &'a [u8],
    pos: usize,
}

impl postcard::ser_flavors::Flavor for SameBytes<'_> {
    type Output = ();

    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.try_extend(&[byte])
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        let end = self.pos.checked_add(data.len());
        match end.and_then(|end| self.expected.get(self.pos..end)) {
            Some(slice) if slice == data => {
                self.pos += data.len();
                Ok(())
            }
            _ => Err(postcard::Error::SerializeBufferFull),
        }
    }

    fn finalize(self) -> postcard::Result<()> {
        if self.pos == self.expected.len() {
            Ok(())
        } else {
            Err(postcard::Error::SerializeBufferFull)
        }
    }
}

/// A `tokio_util` codec that decodes `In` messages and encodes `Out` messages. Starts with the
/// handshake cap ([`crate::limits::MAX_HANDSHAKE_BYTES`]); call [`MessageCodec::handshake_done`] once the
/// handshake succeeded.
#[derive(Debug)]
pub struct MessageCodec<In, Out> {
    frame: FrameCodec,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> Default for MessageCodec<In, Out> {
    fn default() -> Self {
        Self::new()
    }
}

impl<In, Out> MessageCodec<In, Out> {
    pub fn new() -> Self {
        MessageCodec {
            frame: FrameCodec::new(),
            _types: PhantomData,
        }
    }

    /// A codec over an already configured frame codec (tests and fuzzing use small fragments).
    pub fn with_frame(frame: FrameCodec) -> Self {
        MessageCodec {
            frame,
            _types: PhantomData,
        }
    }

    /// Raises the message cap from [`crate::limits::MAX_HANDSHAKE_BYTES`] to [`MAX_MESSAGE_BYTES`].
    pub fn handshake_done(&mut self) {
        self.frame.set_max_message_bytes(MAX_MESSAGE_BYTES);
    }

    pub fn max_message_bytes(&self) -> usize {
        self.frame.max_message_bytes()
    }

    pub fn frame(&self) -> &FrameCodec {
        &self.frame
    }

    /// Messages must arrive at least this fast from now on (see [`crate::frame::MinRate`]).
    pub fn set_min_rate(&mut self, min_rate: crate::frame::MinRate) {
        self.frame.set_min_rate(min_rate);
    }
}

impl<In, Out> Decoder for MessageCodec<In, Out>
where
    In: DeserializeOwned + Serialize + Validate,
{
    type Item = In;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        match self.frame.decode(src)? {
            Some(payload) => decode_message(&payload).map(Some),
            None => Ok(None),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        match self.frame.decode_eof(src)? {
            Some(payload) => decode_message(&payload).map(Some),
            None => Ok(None),
        }
    }
}

impl<In, Out> Encoder<Out> for MessageCodec<In, Out>
where
    Out: Serialize + Validate,
{
    type Error = CodecError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        let bytes = encode_message(&item, self.frame.max_message_bytes())?;
        self.frame.encode(Bytes::from(bytes), dst)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::hello;
    use crate::limits::MAX_HANDSHAKE_BYTES;
    use crate::messages::{Message, Request, RequestBody, ShareOpen};

    fn ping(id: u64) -> Message {
        Message::Request(Request {
            id,
            share: 0,
            body: RequestBody::Ping,
        })
    }

    #[test]
    fn round_trip_through_codec() {
        let mut codec = MessageCodec::<Message, Message>::new();
        let mut buf = BytesMut::new();
        let h = Message::Hello(hello(
            "1",
            vec![ShareOpen {
                name: "a".into(),
                ignore: vec![],
                respect_gitignore: true,
            }],
        ));
        codec.encode(h.clone(), &mut buf).unwrap();
        codec.encode(ping(7), &mut buf).unwrap();
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(h));
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(ping(7)));
        assert_eq!(codec.decode_eof(&mut buf).unwrap(), None);
    }

    #[test]
    fn rejects_overlong_varint() {
        // Request tag 3, id 5 as the over-long varint 0x85 0x00, share 0, Ping 0.
        let canonical = [3u8, 5, 0, 0];
        assert_eq!(decode_message::<Message>(&canonical).unwrap(), ping(5));
        let overlong = [3u8, 0x85, 0x00, 0, 0];
        assert!(
            postcard::from_bytes::<Message>(&overlong).is_ok(),
            "postcard alone accepts it"
        );
        assert!(matches!(
            decode_message::<Message>(&overlong),
            Err(CodecError::NonCanonical)
        ));
    }

    #[test]
    fn rejects_trailing_bytes_and_unknown_tags() {
        assert!(matches!(
            decode_message::<Message>(&[3, 5, 0, 0, 0]),
            Err(CodecError::TrailingBytes { count: 1 })
        ));
        assert!(matches!(
            decode_message::<Message>(&[5]),
            Err(CodecError::Decode(_))
        ));
        assert!(matches!(
            decode_message::<Message>(&[3, 5, 0, 200]),
            Err(CodecError::Decode(_))
        ));
    }

    #[test]
    fn rejects_huge_claimed_counts_without_allocating() {
        // Hello with a share list claiming u32::MAX entries and nothing after it.
        let mut bytes = postcard::to_allocvec(&Message::Hello(hello("1", vec![]))).unwrap();
        bytes.pop(); // the empty share list's length
        bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(matches!(
            decode_message::<Message>(&bytes),
            Err(CodecError::Decode(_))
        ));
    }

    #[test]
    fn handshake_cap_then_full_cap() {
        let mut codec = MessageCodec::<Message, Message>::new();
        let big = Message::Refused(crate::messages::Refused {
            reason: "x".repeat(4000),
        });
        let mut buf = BytesMut::new();
        codec.encode(big, &mut buf).unwrap();
        assert_eq!(codec.max_message_bytes(), MAX_HANDSHAKE_BYTES);
        codec.handshake_done();
        assert_eq!(codec.max_message_bytes(), MAX_MESSAGE_BYTES);
    }

    #[test]
    fn encoder_validates() {
        let mut codec = MessageCodec::<Message, Message>::new();
        let bad = Message::Refused(crate::messages::Refused {
            reason: "x".repeat(5000),
        });
        let mut buf = BytesMut::new();
        assert!(matches!(
            codec.encode(bad, &mut buf),
            Err(CodecError::Invalid(_))
        ));
        assert!(buf.is_empty());
    }
}
