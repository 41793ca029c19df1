//! Every request and reply survives encode → FrameDecoder → decode, whichever way the bytes are cut.

mod common;

use std::fmt::Debug;

use buildlock_proto::{decode, encode, read_message, write_frame, FrameDecoder, Hello, Welcome};
use common::{reply_variant, request_variant, sample_replies, sample_requests, REPLY_VARIANTS, REQUEST_VARIANTS};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Round-trips `msgs` through the decoder three ways: each frame whole, all frames in one push,
/// and the whole stream one byte at a time.
fn round_trip_all<T: Serialize + DeserializeOwned + PartialEq + Debug>(msgs: &[T]) {
    let frames: Vec<Vec<u8>> = msgs.iter().map(|m| encode(m).expect("encode")).collect();

    // One frame per push.
    for (msg, frame) in msgs.iter().zip(&frames) {
        let mut decoder = FrameDecoder::new();
        decoder.push(frame);
        let payload = decoder.next_frame().expect("next_frame").expect("a whole frame");
        assert_eq!(&decode::<T>(&payload).expect("decode"), msg);
        assert_eq!(decoder.next_frame().expect("next_frame"), None);
        assert_eq!(decoder.buffered(), 0);
    }

    let stream: Vec<u8> = frames.concat();

    // The whole stream in one push.
    let mut decoder = FrameDecoder::new();
    decoder.push(&stream);
    assert_eq!(decoder.buffered(), stream.len());
    for msg in msgs {
        let payload = decoder.next_frame().expect("next_frame").expect("a whole frame");
        assert_eq!(&decode::<T>(&payload).expect("decode"), msg);
    }
    assert_eq!(decoder.next_frame().expect("next_frame"), None);
    assert_eq!(decoder.buffered(), 0);

    // Byte by byte: a frame appears exactly when its last byte arrives.
    let mut decoder = FrameDecoder::new();
    let mut got = Vec::new();
    let mut ends = frames.iter().scan(0, |end, f| {
        *end += f.len();
        Some(*end)
    });
    let mut next_end = ends.next();
    for (i, byte) in stream.iter().enumerate() {
        decoder.push(std::slice::from_ref(byte));
        match decoder.next_frame().expect("next_frame") {
            Some(payload) => {
                assert_eq!(Some(i + 1), next_end, "frame completed at the wrong byte");
                next_end = ends.next();
                got.push(decode::<T>(&payload).expect("decode"));
            }
            None => assert_ne!(Some(i + 1), next_end, "frame not returned once complete"),
        }
    }
    assert_eq!(got, msgs);
    assert_eq!(decoder.buffered(), 0);

    // And through the blocking helpers.
    let mut wire = Vec::new();
    for msg in msgs {
        write_frame(&mut wire, msg).expect("write_frame");
    }
    assert_eq!(wire, stream);
    let mut reader = &wire[..];
    for msg in msgs {
        assert_eq!(&read_message::<T>(&mut reader).expect("read_message").expect("a message"), msg);
    }
    assert!(read_message::<T>(&mut reader).expect("clean EOF").is_none());
}

#[test]
fn every_request_variant_round_trips() {
    let requests = sample_requests();
    for name in REQUEST_VARIANTS {
        assert!(requests.iter().any(|r| request_variant(r) == *name), "no sample of Request::{name}");
    }
    round_trip_all(&requests);
}

#[test]
fn every_reply_variant_round_trips() {
    let replies = sample_replies();
    for name in REPLY_VARIANTS {
        assert!(replies.iter().any(|r| reply_variant(r) == *name), "no sample of Reply::{name}");
    }
    round_trip_all(&replies);
}

#[test]
fn handshake_messages_round_trip() {
    round_trip_all(&[Hello::new(1), Hello::new(u32::MAX)]);
    round_trip_all(&[Welcome::new(7), Welcome::refused(7, "the daemon is shutting down: try again")]);
}

#[test]
fn partial_frames_are_kept_across_pushes() {
    let requests = sample_requests();
    let stream: Vec<u8> = requests.iter().flat_map(|r| encode(r).expect("encode")).collect();
    // Cut the stream into uneven pieces that straddle frame boundaries and length prefixes.
    for piece in [2, 3, 5, 7, 64] {
        let mut decoder = FrameDecoder::new();
        let mut got = Vec::new();
        for chunk in stream.chunks(piece) {
            decoder.push(chunk);
            while let Some(payload) = decoder.next_frame().expect("next_frame") {
                got.push(decode::<buildlock_proto::Request>(&payload).expect("decode"));
            }
        }
        assert_eq!(got, requests, "pieces of {piece} bytes");
        assert_eq!(decoder.buffered(), 0);
    }
}

#[test]
fn display_names() {
    use buildlock_proto::{ErrorCode, Mode};
    assert_eq!(Mode::Shared.to_string(), "shared");
    assert_eq!(Mode::Exclusive.to_string(), "exclusive");
    let codes = [
        (ErrorCode::BadHello, "bad-hello"),
        (ErrorCode::VersionMismatch, "version-mismatch"),
        (ErrorCode::FrameTooLarge, "frame-too-large"),
        (ErrorCode::Malformed, "malformed"),
        (ErrorCode::InvalidRequest, "invalid-request"),
        (ErrorCode::InvalidName, "invalid-name"),
        (ErrorCode::WouldBlock, "would-block"),
        (ErrorCode::Timeout, "timeout"),
        (ErrorCode::NotHeld, "not-held"),
        (ErrorCode::Io, "io"),
        (ErrorCode::PermissionDenied, "permission-denied"),
        (ErrorCode::ShuttingDown, "shutting-down"),
        (ErrorCode::Internal, "internal"),
        (ErrorCode::LimitExceeded, "limit-exceeded"),
    ];
    for (code, name) in codes {
        assert_eq!(code.to_string(), name);
    }
}
