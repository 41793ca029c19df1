//! Thousands of pseudo-random byte strings through the decoder: errors are fine, panics are not.

use buildlock_proto::{check_hello, check_welcome, decode, FrameDecoder, Reply, Request};

/// xorshift64*: deterministic, so a failure reproduces; no dependency needed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, max_len: usize) -> Vec<u8> {
        let len = (self.next() % (max_len as u64 + 1)) as usize;
        (0..len).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn random_payloads_never_panic() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut decoded = 0;
    for _ in 0..5000 {
        let payload = rng.bytes(64);
        // Bias the first byte towards real tags so that decoding gets past the tag more often.
        let mut tagged = payload.clone();
        if let Some(first) = tagged.first_mut() {
            *first %= 10;
        }
        for p in [&payload, &tagged] {
            decoded += usize::from(decode::<Request>(p).is_ok());
            decoded += usize::from(decode::<Reply>(p).is_ok());
            let _ = check_hello(p);
            let _ = check_welcome(p);
        }
    }
    // Some random strings are valid messages (a lone 0x04 is Request::DaemonStatus); the point is
    // that none panicked, but make sure the loop really exercised the success path too.
    assert!(decoded > 0);
}

#[test]
fn random_streams_never_panic() {
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    for _ in 0..3000 {
        // Small lengths so that some frames complete; the prefix is built from random bytes.
        let mut stream = Vec::new();
        for _ in 0..(rng.next() % 4) {
            let body = rng.bytes(40);
            let len = if rng.next().is_multiple_of(8) { rng.next() as u32 } else { body.len() as u32 };
            stream.extend_from_slice(&len.to_le_bytes());
            stream.extend_from_slice(&body);
        }
        stream.extend(rng.bytes(8));

        let mut decoder = FrameDecoder::new();
        for chunk in stream.chunks(1 + (rng.next() % 7) as usize) {
            decoder.push(chunk);
            loop {
                match decoder.next_frame() {
                    Ok(Some(payload)) => {
                        let _ = decode::<Request>(&payload);
                    }
                    Ok(None) => break,
                    Err(_) => break,
                }
            }
        }
        assert!(decoder.buffered() <= stream.len());
    }
}
