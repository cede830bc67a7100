//! vmsync's wire format: how messages become bytes and back, and every check a received message
//! passes before anything acts on it. No sockets, no runtime, no tasks: the transport crate owns
//! the streams and sessions; this crate only turns bytes into validated values and back.
//!
//! Module map:
//! - [`limits`]: every wire bound (frame, message, batch, string sizes), named with its unit.
//! - [`frame`]: fragments on a byte stream; size checked from the header before buffering.
//! - [`listing`]: full scan listings sent as differences against the previous one.
//! - [`messages`]: the postcard-encoded message enums (handshake, requests, responses).
//! - [`validate`]: the checks serde cannot express, run on every decoded message.
//! - [`handshake`]: the pure decisions of the handshake (accept/refuse a `Hello`, check a
//!   `Welcome`).
//! - [`chunk`]: chunk payloads and chunk deltas, zstd compression when it pays, decompression
//!   with a hard cap and a hash check.
//! - [`codec`]: frame + postcard + validate as one `tokio_util` codec, canonical-form decoding.

pub mod chunk;
pub mod codec;
pub mod frame;
pub mod handshake;
pub mod limits;
pub mod listing;
pub mod messages;
pub mod validate;

pub use chunk::{
    decode_chunk, decode_delta, encode_chunk, encode_chunk_owned, encode_content,
    encode_content_owned, encode_delta, unpack_chunk, unpack_content, ChunkError, Codec, WireChunk,
    WireContent, WireDelta,
};
pub use codec::{decode_message, encode_message, CodecError, MessageCodec};
pub use frame::{FrameCodec, FrameError, MinRate};
pub use messages::{
    ChunkerParams, Hello, Message, Refused, Request, RequestBody, RequestKind, Response,
    ResponseBody, ShareOpen, Welcome,
};
pub use validate::{Validate, ValidationError};
