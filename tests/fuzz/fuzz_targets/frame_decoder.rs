//! The frame splitter: arbitrary bytes, delivered in arbitrary pieces, must decode to exactly the
//! same messages and the same error as when delivered all at once; no panic; no message over the
//! cap; every decoded message survives an encode/decode round trip.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, Encoder};
use vmsync_protocol::limits::MAX_HANDSHAKE_BYTES;
use vmsync_protocol::FrameCodec;

/// Small enough that the fuzzer reaches the cap; large enough for several fragments.
const CAP_BYTES: usize = 4096;

/// Decodes until EOF; returns the messages and the error (as text), if any.
fn run(pieces: &[&[u8]], cap: usize) -> (Vec<Vec<u8>>, Option<String>) {
    let mut codec = FrameCodec::with_max_message_bytes(cap);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(m)) => out.push(m.to_vec()),
                Ok(None) => break,
                Err(e) => return (out, Some(format!("{e:?}"))),
            }
        }
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(m)) => out.push(m.to_vec()),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(format!("{e:?}"))),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let Some((splits, stream)) = rest.split_at_checked(8) else {
        return;
    };
    let cap = if control & 1 == 0 {
        CAP_BYTES
    } else {
        MAX_HANDSHAKE_BYTES
    };

    let whole = run(&[stream], cap);

    // The same bytes in pieces whose sizes cycle through `splits` (0 means 1 byte).
    let mut pieces = Vec::new();
    let mut at = 0;
    for &s in splits.iter().cycle() {
        if at >= stream.len() {
            break;
        }
        let end = (at + usize::from(s).max(1)).min(stream.len());
        pieces.push(&stream[at..end]);
        at = end;
    }
    let split = run(&pieces, cap);
    assert_eq!(whole, split, "decoding depends on how the bytes arrive");

    let fragment = usize::from(control >> 1).max(1);
    for message in &whole.0 {
        assert!(!message.is_empty() && message.len() <= cap);
        let mut enc = FrameCodec::with_max_message_bytes(cap).with_fragment_bytes(fragment);
        let mut wire = BytesMut::new();
        enc.encode(&message[..], &mut wire)
            .expect("a decoded message encodes");
        let mut dec = FrameCodec::with_max_message_bytes(cap);
        let back = dec.decode(&mut wire).expect("re-decodes").expect("whole");
        assert_eq!(&back[..], &message[..]);
        assert!(wire.is_empty());
    }
});
