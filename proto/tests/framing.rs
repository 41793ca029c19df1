//! Framing faults: bad lengths, truncation, end of stream and garbage payloads are errors, never
//! panics or unbounded buffering.

mod common;

use std::io::{self, Read};

use buildlock_proto::{
    decode, encode, read_frame, read_message, FrameDecoder, ProtoError, Reply, Request, MAX_FRAME_LEN,
};

fn frame_with_len(len: u32, body: &[u8]) -> Vec<u8> {
    let mut frame = len.to_le_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

#[test]
fn zero_length_is_empty_frame() {
    let mut decoder = FrameDecoder::new();
    decoder.push(&[0, 0, 0, 0]);
    assert!(matches!(decoder.next_frame(), Err(ProtoError::EmptyFrame)));
    // The decoder stays failed rather than skipping ahead into an unknown position.
    decoder.push(&encode(&Request::Shutdown).expect("encode"));
    assert!(matches!(decoder.next_frame(), Err(ProtoError::EmptyFrame)));

    let mut reader: &[u8] = &[0, 0, 0, 0];
    assert!(matches!(read_frame(&mut reader), Err(ProtoError::EmptyFrame)));
}

#[test]
fn max_len_is_accepted() {
    let body = vec![7u8; MAX_FRAME_LEN as usize];
    let frame = frame_with_len(MAX_FRAME_LEN, &body);
    let mut decoder = FrameDecoder::new();
    decoder.push(&frame[..frame.len() - 1]);
    assert_eq!(decoder.next_frame().expect("not an error"), None);
    decoder.push(&frame[frame.len() - 1..]);
    assert_eq!(decoder.next_frame().expect("not an error"), Some(body.clone()));

    let mut reader = &frame[..];
    assert_eq!(read_frame(&mut reader).expect("read_frame"), Some(body));
}

#[test]
fn max_plus_one_is_too_large_after_four_bytes() {
    let mut decoder = FrameDecoder::new();
    let prefix = (MAX_FRAME_LEN + 1).to_le_bytes();
    decoder.push(&prefix[..3]);
    assert_eq!(decoder.next_frame().expect("three bytes are not a length yet"), None);
    decoder.push(&prefix[3..]);
    match decoder.next_frame() {
        Err(ProtoError::FrameTooLarge { len, max }) => {
            assert_eq!(len, u64::from(MAX_FRAME_LEN) + 1);
            assert_eq!(max, MAX_FRAME_LEN);
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    assert_eq!(decoder.buffered(), 4);
}

/// A reader that hands out `data` and then fails the test if anyone reads further: proves the
/// length is rejected before the body is waited for.
struct NoFurther<'a> {
    data: &'a [u8],
}

impl Read for NoFurther<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        assert!(!self.data.is_empty(), "read past the length prefix of an oversized frame");
        self.data.read(buf)
    }
}

#[test]
fn all_ones_length_is_too_large_and_costs_nothing() {
    let prefix = u32::MAX.to_le_bytes();
    let mut decoder = FrameDecoder::new();
    decoder.push(&prefix);
    match decoder.next_frame() {
        Err(ProtoError::FrameTooLarge { len, .. }) => assert_eq!(len, u64::from(u32::MAX)),
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }

    let mut reader = NoFurther { data: &prefix };
    assert!(matches!(read_frame(&mut reader), Err(ProtoError::FrameTooLarge { .. })));
    let mut reader = NoFurther { data: &(MAX_FRAME_LEN + 1).to_le_bytes() };
    assert!(matches!(read_frame(&mut reader), Err(ProtoError::FrameTooLarge { .. })));
}

#[test]
fn encode_refuses_oversized_messages() {
    let huge = Reply::LeaseLost { lease: 1, path: "x".repeat(MAX_FRAME_LEN as usize), reason: String::new() };
    match encode(&huge) {
        Err(ProtoError::FrameTooLarge { len, max }) => {
            assert!(len > u64::from(MAX_FRAME_LEN));
            assert_eq!(max, MAX_FRAME_LEN);
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    assert!(matches!(encode(&()), Err(ProtoError::EmptyFrame)));
}

#[test]
fn clean_eof_is_none() {
    let mut empty: &[u8] = &[];
    assert!(read_frame(&mut empty).expect("clean EOF").is_none());
    assert!(read_message::<Request>(&mut empty).expect("clean EOF").is_none());

    let frame = encode(&Request::DaemonStatus).expect("encode");
    let mut reader = &frame[..];
    assert!(read_frame(&mut reader).expect("one frame").is_some());
    assert!(read_frame(&mut reader).expect("then clean EOF").is_none());
}

#[test]
fn eof_inside_a_frame_is_truncated() {
    let frame = encode(&Request::ReleasePid { path: "/tmp/a.lock".into(), pid: 7 }).expect("encode");
    // Every cut inside the frame: within the prefix and within the body.
    for cut in 1..frame.len() {
        let mut reader = &frame[..cut];
        match read_frame(&mut reader) {
            Err(ProtoError::Truncated) => {}
            other => panic!("cut at {cut}: expected Truncated, got {other:?}"),
        }
    }
}

/// A reader that returns one byte per call and an `Interrupted` error in between, as a socket
/// under signals may.
struct Dribble<'a> {
    data: &'a [u8],
    interrupt_next: bool,
}

impl Read for Dribble<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.interrupt_next = !self.interrupt_next;
        if self.interrupt_next {
            return Err(io::Error::from(io::ErrorKind::Interrupted));
        }
        let n = buf.len().min(1).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

#[test]
fn read_frame_retries_interrupted_reads() {
    let requests = common::sample_requests();
    let stream: Vec<u8> = requests.iter().flat_map(|r| encode(r).expect("encode")).collect();
    let mut reader = Dribble { data: &stream, interrupt_next: false };
    for request in &requests {
        assert_eq!(&read_message::<Request>(&mut reader).expect("read").expect("a message"), request);
    }
    assert!(read_message::<Request>(&mut reader).expect("clean EOF").is_none());
}

#[test]
fn io_errors_are_reported() {
    struct Broken;
    impl Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::ConnectionReset))
        }
    }
    match read_frame(&mut Broken) {
        Err(ProtoError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
        other => panic!("expected Io, got {other:?}"),
    }
}

#[test]
fn garbage_payloads_are_malformed() {
    let cases: &[(&str, &[u8])] = &[
        ("out-of-range Request tag", &[6]),
        ("huge Request tag", &[0xff, 0xff, 0xff, 0xff, 0x0f]),
        ("unterminated varint tag", &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
        ("Release with an unterminated varint", &[1, 0xff]),
        ("ReleasePid with a string longer than the payload", &[2, 50, b'/', b'x']),
        ("ReleasePid with invalid UTF-8", &[2, 2, 0xc3, 0x28, 1]),
        ("Status with a bad Option tag", &[3, 2]),
        ("Acquire cut short", &[0, 1, 1, b'/']),
        ("Acquire with an out-of-range Mode", &[0, 1, 1, b'/', 2, 0]),
        ("Acquire with an out-of-range WaitFor", &[0, 1, 1, b'/', 0, 3]),
        ("ReleasePid with a pid over u32", &[2, 1, b'/', 0xff, 0xff, 0xff, 0xff, 0x7f]),
    ];
    for (what, payload) in cases {
        match decode::<Request>(payload) {
            Err(ProtoError::Malformed(detail)) => {
                let message = ProtoError::Malformed(detail).to_string();
                assert!(message.starts_with("malformed message: "), "{what}: {message}");
            }
            other => panic!("{what}: expected Malformed, got {other:?}"),
        }
    }
    // Through the blocking helper too: a well-framed but garbage payload.
    let frame = frame_with_len(1, &[0x42]);
    assert!(matches!(read_message::<Request>(&mut &frame[..]), Err(ProtoError::Malformed(_))));
    // A Reply tag past the last variant.
    assert!(matches!(decode::<Reply>(&[8]), Err(ProtoError::Malformed(_))));
    // A Granted whose bool is neither 0 nor 1.
    assert!(matches!(decode::<Reply>(&[0, 1, b'/', 5, 2]), Err(ProtoError::Malformed(_))));
}

#[test]
fn trailing_bytes_after_a_message_are_ignored() {
    // Documented choice: decode() uses postcard::from_bytes, which ignores what follows the message.
    let mut payload = encode(&Request::Shutdown).expect("encode")[4..].to_vec();
    payload.extend_from_slice(b"extra");
    assert_eq!(decode::<Request>(&payload).expect("decode"), Request::Shutdown);
}

#[test]
fn error_messages_say_what_to_do() {
    let too_large = ProtoError::FrameTooLarge { len: u64::from(u32::MAX), max: MAX_FRAME_LEN };
    assert!(too_large.to_string().contains("4294967295 bytes"), "{too_large}");
    assert!(too_large.to_string().contains("65536-byte limit"), "{too_large}");
    assert!(ProtoError::Truncated.to_string().contains("closed in the middle"));
    assert!(ProtoError::EmptyFrame.to_string().contains("zero-length frame"));
}
