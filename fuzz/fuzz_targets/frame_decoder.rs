//! Checks that `FrameDecoder` never panics and splits any byte stream correctly.
//!
//! The stream is pushed in chunks whose sizes come from the input's first byte. Invariants: every
//! frame is 1..=MAX_FRAME_LEN bytes and matches an independent reading of the stream,
//! `buffered()` adds up, errors come exactly at a length prefix of 0 or over the limit (after
//! which the decoder is dropped, as the daemon does), and `decode::<Request>` /
//! `decode::<Reply>` never panic on a frame.
#![no_main]

use buildlock_proto::{decode, FrameDecoder, ProtoError, Reply, Request, MAX_FRAME_LEN};
use libfuzzer_sys::fuzz_target;

/// What the stream holds at `pos`, read independently of `FrameDecoder`.
enum Expect {
    /// A whole frame with this payload length.
    Frame(usize),
    /// Not enough bytes yet.
    Incomplete,
    /// A length prefix of 0 or over the limit.
    BadLength(u32),
}

fn expect_at(stream: &[u8], pos: usize) -> Expect {
    let rest = &stream[pos..];
    if rest.len() < 4 {
        return Expect::Incomplete;
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
    if len == 0 || len > MAX_FRAME_LEN {
        return Expect::BadLength(len);
    }
    if rest.len() < 4 + len as usize {
        Expect::Incomplete
    } else {
        Expect::Frame(len as usize)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    // The first byte picks the chunking: 0 pushes the whole stream at once; otherwise its low 7
    // bits (+1) are the chunk size, and with the high bit set the size grows by one per chunk,
    // wrapping, so that prefixes and bodies are split at many different offsets.
    let base = usize::from(first & 0x7f) + 1;
    let varying = first & 0x80 != 0;

    let mut decoder = FrameDecoder::new();
    let mut pushed = 0usize; // bytes of `stream` pushed so far
    let mut consumed = 0usize; // bytes of `stream` returned as whole frames so far
    let mut chunk_index = 0usize;
    while pushed < stream.len() {
        let size = if first == 0 {
            stream.len()
        } else if varying {
            (base + chunk_index) % 128 + 1
        } else {
            base
        };
        chunk_index += 1;
        let end = (pushed + size).min(stream.len());
        decoder.push(&stream[pushed..end]);
        pushed = end;
        assert_eq!(decoder.buffered(), pushed - consumed, "buffered() disagrees with bytes pushed minus returned");

        loop {
            let seen = &stream[..pushed];
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    assert!(
                        !frame.is_empty() && frame.len() <= MAX_FRAME_LEN as usize,
                        "frame of {} bytes returned",
                        frame.len()
                    );
                    match expect_at(seen, consumed) {
                        Expect::Frame(len) => {
                            assert_eq!(frame.len(), len, "frame length differs from its prefix");
                            assert_eq!(&frame[..], &seen[consumed + 4..consumed + 4 + len], "frame bytes differ");
                        }
                        Expect::Incomplete => panic!("frame returned before all its bytes arrived"),
                        Expect::BadLength(len) => panic!("frame returned for a bad length prefix {len}"),
                    }
                    consumed += 4 + frame.len();
                    assert_eq!(decoder.buffered(), pushed - consumed);
                    let _ = decode::<Request>(&frame);
                    let _ = decode::<Reply>(&frame);
                }
                Ok(None) => {
                    assert!(
                        matches!(expect_at(seen, consumed), Expect::Incomplete),
                        "decoder wants more bytes but a whole frame or a bad prefix is buffered"
                    );
                    break;
                }
                Err(e) => {
                    match (expect_at(seen, consumed), &e) {
                        (Expect::BadLength(0), ProtoError::EmptyFrame) => {}
                        (Expect::BadLength(len), ProtoError::FrameTooLarge { len: got, max })
                            if u64::from(len) == *got && *max == MAX_FRAME_LEN => {}
                        _ => panic!("unexpected error {e:?}"),
                    }
                    // The stream is out of step: the daemon closes the connection here, and so do we.
                    return;
                }
            }
        }
    }
});
