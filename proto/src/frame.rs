//! Length-prefixed frames: turning messages into bytes for the socket and back.

use std::io::{ErrorKind, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{ProtoError, MAX_FRAME_LEN};

/// Size of the little-endian `u32` length that starts every frame.
const PREFIX_LEN: usize = 4;

/// Encodes `msg` as one whole frame: the 4-byte little-endian payload length, then the postcard
/// payload. The result can be written to the socket as is.
///
/// Fails with [`ProtoError::FrameTooLarge`] if the payload is over [`MAX_FRAME_LEN`] (the peer
/// would refuse it), and with [`ProtoError::EmptyFrame`] if it is empty (only a type that encodes
/// to nothing, such as `()`, does that; none of this crate's messages do).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtoError> {
    // Reserve the prefix up front and patch it afterwards, so the payload is not copied.
    let mut frame = postcard::to_extend(msg, vec![0u8; PREFIX_LEN]).map_err(|e| ProtoError::Encode(e.to_string()))?;
    let payload_len = frame.len() - PREFIX_LEN;
    let len = check_len(payload_len as u64)?;
    frame[..PREFIX_LEN].copy_from_slice(&len.to_le_bytes());
    Ok(frame)
}

/// Decodes one message from a frame's payload (without its length prefix).
///
/// Trailing bytes after the message are ignored, as `postcard::from_bytes` does: they are not an
/// error. This is deliberate: it is what lets a newer peer append fields to the end of a message
/// such as `Hello` and still be read by an older one. It is no substitute for the version check,
/// because a field appended to a struct nested inside a message shifts everything after it.
///
/// Any decoding failure (truncated data, an unknown enum variant, invalid UTF-8, ...) is a
/// [`ProtoError::Malformed`]; this function does not panic on any input.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ProtoError> {
    postcard::from_bytes(payload).map_err(|e| ProtoError::Malformed(describe_postcard_error(&e)))
}

/// Splits a byte stream into frame payloads without doing any I/O itself: push whatever bytes the
/// socket produced, then call [`FrameDecoder::next_frame`] until it returns `Ok(None)`.
///
/// A length prefix of 0 or over [`MAX_FRAME_LEN`] is reported as soon as its 4 bytes have
/// arrived, before any of the body is waited for, so a peer announcing a 4 GiB frame costs
/// nothing. After an error the stream is out of step and the decoder keeps returning the same
/// error; close the connection. Memory use stays under one maximum frame plus one `push` as long
/// as `next_frame` is drained after every `push`.
#[derive(Debug, Default, Clone)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Start of the bytes not yet returned. Consumed bytes are dropped lazily on the next
    /// [`FrameDecoder::push`], so that taking many small frames out of one large read does not
    /// shift the rest of the buffer once per frame.
    start: usize,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes received from the peer.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Returns the next complete frame's payload, `Ok(None)` if more bytes are needed, or an error
    /// if the next frame's length prefix is out of range.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ProtoError> {
        let pending = &self.buf[self.start..];
        let Some(prefix) = pending.first_chunk::<PREFIX_LEN>() else {
            return Ok(None);
        };
        let len = check_len(u64::from(u32::from_le_bytes(*prefix)))? as usize;
        let Some(payload) = pending.get(PREFIX_LEN..PREFIX_LEN + len) else {
            return Ok(None);
        };
        let payload = payload.to_vec();
        self.start += PREFIX_LEN + len;
        if self.start == self.buf.len() {
            // The common case (one read, whole frames): reset for free instead of draining later.
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(payload))
    }

    /// How many bytes have been pushed but not yet returned as part of a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// Reads one frame's payload from a blocking reader.
///
/// Returns `Ok(None)` if the stream ends cleanly before the first byte of a frame (the peer closed
/// the connection between messages) and [`ProtoError::Truncated`] if it ends inside one. The
/// length is checked before the body is read, as with [`FrameDecoder`].
pub fn read_frame(r: &mut impl Read) -> Result<Option<Vec<u8>>, ProtoError> {
    let mut prefix = [0u8; PREFIX_LEN];
    let mut filled = 0;
    while filled < PREFIX_LEN {
        match r.read(&mut prefix[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(ProtoError::Truncated),
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtoError::Io(e)),
        }
    }
    let len = check_len(u64::from(u32::from_le_bytes(prefix)))? as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|e| match e.kind() {
        ErrorKind::UnexpectedEof => ProtoError::Truncated,
        _ => ProtoError::Io(e),
    })?;
    Ok(Some(payload))
}

/// Encodes `msg` as a frame and writes it all to a blocking writer, then flushes it.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), ProtoError> {
    let frame = encode(msg)?;
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame with [`read_frame`] and decodes it with [`decode`]. `Ok(None)` on a clean end
/// of stream between messages.
pub fn read_message<T: DeserializeOwned>(r: &mut impl Read) -> Result<Option<T>, ProtoError> {
    match read_frame(r)? {
        Some(payload) => decode(&payload).map(Some),
        None => Ok(None),
    }
}

/// Checks a payload length against the frame limits and narrows it to the `u32` of the prefix.
fn check_len(len: u64) -> Result<u32, ProtoError> {
    if len == 0 {
        return Err(ProtoError::EmptyFrame);
    }
    match u32::try_from(len) {
        Ok(len) if len <= MAX_FRAME_LEN => Ok(len),
        _ => Err(ProtoError::FrameTooLarge { len, max: MAX_FRAME_LEN }),
    }
}

/// Words a postcard decoding error for a person. postcard's own texts are terse and some (an
/// unknown enum variant comes out as "Serde Deserialization Error") say nothing useful.
pub(crate) fn describe_postcard_error(e: &postcard::Error) -> String {
    use postcard::Error as E;
    match e {
        E::DeserializeUnexpectedEnd => "the message ends too early".to_owned(),
        E::DeserializeBadVarint => "an integer is out of range or badly encoded".to_owned(),
        E::DeserializeBadBool => "a boolean is neither 0 nor 1".to_owned(),
        E::DeserializeBadUtf8 | E::DeserializeBadChar => "a string is not valid UTF-8".to_owned(),
        E::DeserializeBadOption => "an optional field's tag is neither 0 nor 1".to_owned(),
        E::DeserializeBadEnum | E::SerdeDeCustom => {
            "unknown message kind or enum variant, or a value out of range".to_owned()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_frame(payload: &[u8]) -> Vec<u8> {
        let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn undecodable_payloads_are_described_for_a_person() {
        let why = |payload: &[u8]| match decode::<crate::Request>(payload) {
            Err(ProtoError::Malformed(why)) => why,
            other => panic!("{payload:?} decoded as {other:?}"),
        };
        assert_eq!(why(&[]), "the message ends too early");
        assert_eq!(why(&[0x7f]), "unknown message kind or enum variant, or a value out of range");
        assert_eq!(why(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]), "an integer is out of range or badly encoded");
    }

    /// The documented memory bound: bytes already returned are dropped by the next `push`, so a
    /// peer whose reads always end inside a frame does not make the buffer grow forever.
    #[test]
    fn push_drops_the_bytes_of_frames_already_returned() {
        let frame = raw_frame(b"payload");
        let mut d = FrameDecoder::new();
        d.push(&frame[..3]);
        for _ in 0..100 {
            // The rest of one frame and the start of the next, as a read might bring them.
            let mut read = frame[3..].to_vec();
            read.extend_from_slice(&frame[..3]);
            d.push(&read);
            assert_eq!(d.buf.len(), d.buffered(), "bytes already returned are still buffered");
            assert_eq!(d.buffered(), frame.len() + 3);
            assert_eq!(d.next_frame().unwrap().as_deref(), Some(&b"payload"[..]));
            assert_eq!(d.next_frame().unwrap(), None);
            assert_eq!(d.buffered(), 3);
        }
    }
}
