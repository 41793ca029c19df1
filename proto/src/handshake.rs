//! The first exchange on every connection: the client's [`Hello`] and the daemon's [`Welcome`].

use serde::{Deserialize, Serialize};

use crate::frame::describe_postcard_error;
use crate::{HandshakeError, Peer, BUILD, MAGIC, PROTOCOL_VERSION};

/// The first frame a client sends.
///
/// The first three fields (`magic`, `version`, `build`) are fixed for all time, in this order and
/// with these types, in `Hello` and [`Welcome`] alike: postcard encodes fields by position, so
/// keeping this prefix stable is what lets any version read another version's hello far enough
/// to report a version mismatch in words. Fields after them may change with
/// [`PROTOCOL_VERSION`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`MAGIC`].
    pub magic: [u8; 4],
    /// The client's [`PROTOCOL_VERSION`].
    pub version: u16,
    /// The client's [`BUILD`], for error messages.
    pub build: String,
    /// The client's process id.
    pub pid: u32,
}

impl Hello {
    /// This build's hello for a client whose process id is `pid`.
    pub fn new(pid: u32) -> Self {
        Hello { magic: MAGIC, version: PROTOCOL_VERSION, build: BUILD.to_owned(), pid }
    }
}

/// The daemon's answer to a [`Hello`]. Starts with the same three fields as `Hello`, for the same
/// reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Always [`MAGIC`].
    pub magic: [u8; 4],
    /// The daemon's [`PROTOCOL_VERSION`].
    pub version: u16,
    /// The daemon's [`BUILD`].
    pub build: String,
    /// The daemon's process id.
    pub pid: u32,
    /// Set when the daemon refuses the connection (bad hello, version mismatch, shutting down);
    /// the daemon closes the connection after sending it.
    pub error: Option<String>,
}

impl Welcome {
    /// This build's welcome from a daemon whose process id is `pid`, accepting the connection.
    pub fn new(pid: u32) -> Self {
        Welcome { magic: MAGIC, version: PROTOCOL_VERSION, build: BUILD.to_owned(), pid, error: None }
    }

    /// This build's welcome refusing the connection with `message`, which the client shows to its
    /// user (so it should say what to do).
    pub fn refused(pid: u32, message: impl Into<String>) -> Self {
        Welcome { error: Some(message.into()), ..Welcome::new(pid) }
    }
}

/// The part of a hello or welcome that every version agrees on.
#[derive(Deserialize)]
struct Prefix {
    magic: [u8; 4],
    version: u16,
    build: String,
}

/// Checks a client's first frame (its payload) on the daemon side: right magic, same protocol
/// version, well formed. The error's message is meant to be sent back in [`Welcome::refused`].
pub fn check_hello(payload: &[u8]) -> Result<Hello, HandshakeError> {
    check_prefix(payload, Peer::Client)?;
    postcard::from_bytes(payload)
        .map_err(|e| HandshakeError::Malformed { peer: Peer::Client, detail: describe_postcard_error(&e) })
}

/// Checks the daemon's answer to our hello on the client side: right magic, same protocol
/// version, well formed, and not a refusal (a [`Welcome`] with `error` set becomes
/// [`HandshakeError::Refused`]). A version mismatch is reported as such even if the daemon also
/// refused, because that message says more.
pub fn check_welcome(payload: &[u8]) -> Result<Welcome, HandshakeError> {
    check_prefix(payload, Peer::Daemon)?;
    let welcome: Welcome = postcard::from_bytes(payload)
        .map_err(|e| HandshakeError::Malformed { peer: Peer::Daemon, detail: describe_postcard_error(&e) })?;
    match welcome.error {
        Some(message) => Err(HandshakeError::Refused {
            message,
            daemon_pid: welcome.pid,
            peer_version: welcome.version,
            peer_build: welcome.build,
        }),
        None => Ok(welcome),
    }
}

/// Checks the fields every version shares: the magic (looked at as raw bytes first, so that a
/// payload from something that is not buildlock at all is named as such rather than as a decoding
/// error), then the version, whatever follows it.
fn check_prefix(payload: &[u8], peer: Peer) -> Result<(), HandshakeError> {
    if payload.get(..MAGIC.len()) != Some(&MAGIC[..]) {
        let found = payload.get(..MAGIC.len()).unwrap_or(payload).to_vec();
        return Err(HandshakeError::BadMagic { peer, found });
    }
    // take_from_bytes, not from_bytes: the rest of the payload is the peer's business and may be
    // laid out differently in its version.
    let (prefix, _rest) = postcard::take_from_bytes::<Prefix>(payload)
        .map_err(|e| HandshakeError::Malformed { peer, detail: describe_postcard_error(&e) })?;
    debug_assert_eq!(prefix.magic, MAGIC);
    if prefix.version != PROTOCOL_VERSION {
        return Err(HandshakeError::VersionMismatch {
            peer,
            peer_version: prefix.version,
            peer_build: prefix.build,
            our_version: PROTOCOL_VERSION,
            our_build: BUILD.to_owned(),
        });
    }
    Ok(())
}
