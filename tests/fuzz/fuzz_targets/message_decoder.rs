//! The message decoder: postcard decode, canonical-form check and validation of every message
//! type. No panic, no runaway allocation, and anything accepted re-encodes to identical bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use vmsync_protocol::{
    decode_message, encode_message, Hello, Message, Request, Response, Validate,
};

fn check<T: DeserializeOwned + Serialize + Validate + std::fmt::Debug>(bytes: &[u8]) {
    if let Ok(value) = decode_message::<T>(bytes) {
        let again = encode_message(&value, usize::MAX).expect("an accepted message encodes");
        assert_eq!(
            again, bytes,
            "accepted {value:?} but it re-encodes differently"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => check::<Message>(bytes),
        1 => check::<Hello>(bytes),
        2 => check::<Request>(bytes),
        _ => check::<Response>(bytes),
    }
});
