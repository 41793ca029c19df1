//! Checks that message decoding never panics and that decoded messages round-trip.
//!
//! `decode::<Request>`, `decode::<Reply>`, `check_hello` and `check_welcome` run on the raw
//! input; every `Request` or `Reply` that decodes must `encode` to a well-formed frame that
//! decodes to an equal value, and a hello/welcome that passes its check must pass it again once
//! re-encoded.
#![no_main]

use buildlock_proto::{check_hello, check_welcome, decode, encode, ProtoError, Reply, Request, MAX_FRAME_LEN};
use libfuzzer_sys::fuzz_target;

/// `encode(value)` is a well-formed frame whose payload decodes back to `value`. `input_len` is
/// the size of the payload `value` was decoded from: re-encoding never makes it longer, so only
/// an input over the frame limit may give a message too large to encode.
fn round_trip<T>(value: &T, input_len: usize)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let frame = match encode(value) {
        Ok(frame) => frame,
        Err(ProtoError::FrameTooLarge { .. }) if input_len > MAX_FRAME_LEN as usize => return,
        Err(e) => panic!("a decoded message must encode: {e:?}"),
    };
    assert!(frame.len() > 4, "encode made a frame with no payload");
    let (prefix, payload) = frame.split_at(4);
    let len = u32::from_le_bytes(prefix.try_into().unwrap());
    assert_eq!(len as usize, payload.len(), "length prefix does not match the payload");
    assert!(len <= MAX_FRAME_LEN);
    let back: T = decode(payload).expect("an encoded message must decode");
    assert_eq!(&back, value, "round trip changed the message");
}

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = decode::<Request>(data) {
        round_trip(&request, data.len());
    }
    if let Ok(reply) = decode::<Reply>(data) {
        round_trip(&reply, data.len());
    }
    if let Ok(hello) = check_hello(data) {
        // What passed the check must pass it again once re-encoded.
        let frame = encode(&hello).expect("a checked hello must encode");
        assert_eq!(check_hello(&frame[4..]).expect("re-encoded hello must pass"), hello);
    }
    if let Ok(welcome) = check_welcome(data) {
        let frame = encode(&welcome).expect("a checked welcome must encode");
        assert_eq!(check_welcome(&frame[4..]).expect("re-encoded welcome must pass"), welcome);
    }
});
