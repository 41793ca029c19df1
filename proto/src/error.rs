//! The errors of this crate: [`ProtoError`] for framing and encoding, [`HandshakeError`] for a
//! `Hello`/`Welcome` that does not match ours.

use std::fmt;

/// Which end of a connection a message came from. Used to word errors from the point of view of
/// the side that hit them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// `buildlock-client` (or any program using the client library).
    Client,
    /// The `buildlockd` daemon.
    Daemon,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Peer::Client => "buildlock-client",
            Peer::Daemon => "buildlockd",
        })
    }
}

/// Something went wrong reading, writing, framing or decoding a message.
///
/// After any of these (except an [`ProtoError::Io`] of kind `WouldBlock` or `Interrupted`) the
/// byte stream is out of step: close the connection, after telling the peer why where possible.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// The socket itself failed.
    #[error("I/O error on the buildlock connection: {0}")]
    Io(#[from] std::io::Error),

    /// A frame's length prefix (or a message being encoded) is over [`crate::MAX_FRAME_LEN`].
    #[error(
        "frame of {len} bytes is over the {max}-byte limit: the peer is not speaking the buildlock protocol \
         (or is broken); close the connection"
    )]
    FrameTooLarge {
        /// The length the prefix announced (or the encoded size of the message).
        len: u64,
        /// The limit, [`crate::MAX_FRAME_LEN`].
        max: u32,
    },

    /// A frame's length prefix is 0. No buildlock message encodes to zero bytes.
    #[error("zero-length frame: the peer is not speaking the buildlock protocol (or is broken); close the connection")]
    EmptyFrame,

    /// The stream ended part-way through a frame.
    #[error(
        "the connection closed in the middle of a message: the other side exited or crashed; \
         if it was the daemon, run the command again and a new daemon will start"
    )]
    Truncated,

    /// The frame was well formed but its payload is not a valid message of the expected type.
    #[error(
        "malformed message: {0} (the peer sent bytes that do not decode as a buildlock message; are both \
         sides the same buildlock version?)"
    )]
    Malformed(String),

    /// A message could not be encoded. Does not happen for this crate's own types.
    #[error("cannot encode message: {0} (this is a bug in buildlock; please report it)")]
    Encode(String),

    /// The handshake failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
}

/// The peer's `Hello` (or `Welcome`) says it cannot talk to us.
///
/// Each variant's message is worded for a person: it says which side is which version and what to
/// do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The payload does not start with [`crate::MAGIC`]: something other than buildlock is at the
    /// other end of the socket.
    #[error("{}", bad_magic_message(*.peer, .found))]
    BadMagic {
        /// Who we expected at the other end.
        peer: Peer,
        /// The first (up to) four bytes we got instead.
        found: Vec<u8>,
    },

    /// The peer speaks a different [`crate::PROTOCOL_VERSION`].
    #[error("{}", version_mismatch_message(*.peer, *.peer_version, .peer_build, *.our_version, .our_build))]
    VersionMismatch {
        /// Who the peer is.
        peer: Peer,
        /// The peer's protocol version.
        peer_version: u16,
        /// The peer's build ([`crate::BUILD`] on its side).
        peer_build: String,
        /// Our protocol version.
        our_version: u16,
        /// Our build.
        our_build: String,
    },

    /// The magic and version are right but the rest of the hello does not decode.
    #[error("{peer} sent a malformed handshake: {detail}; is it a buildlock of the same version?")]
    Malformed {
        /// Who sent it.
        peer: Peer,
        /// What postcard said.
        detail: String,
    },

    /// The daemon answered our hello with a [`crate::Welcome`] whose `error` is set.
    #[error("buildlockd {peer_build} (pid {daemon_pid}) refused the connection: {message}")]
    Refused {
        /// The daemon's explanation.
        message: String,
        /// The daemon's pid.
        daemon_pid: u32,
        /// The daemon's protocol version.
        peer_version: u16,
        /// The daemon's build.
        peer_build: String,
    },
}

impl HandshakeError {
    /// The peer's protocol version, where the peer got far enough to send one.
    pub fn peer_version(&self) -> Option<u16> {
        match self {
            HandshakeError::VersionMismatch { peer_version, .. } | HandshakeError::Refused { peer_version, .. } => {
                Some(*peer_version)
            }
            HandshakeError::BadMagic { .. } | HandshakeError::Malformed { .. } => None,
        }
    }

    /// The peer's build string, where the peer got far enough to send one.
    pub fn peer_build(&self) -> Option<&str> {
        match self {
            HandshakeError::VersionMismatch { peer_build, .. } | HandshakeError::Refused { peer_build, .. } => {
                Some(peer_build)
            }
            HandshakeError::BadMagic { .. } | HandshakeError::Malformed { .. } => None,
        }
    }
}

fn bad_magic_message(peer: Peer, found: &[u8]) -> String {
    let found = found.escape_ascii();
    match peer {
        Peer::Client => format!(
            "not a buildlock client (bad magic b\"{found}\", expected b\"BLCK\"): something other than \
             buildlock-client connected to the daemon's socket"
        ),
        Peer::Daemon => format!(
            "not a buildlock daemon (bad magic b\"{found}\", expected b\"BLCK\"): something other than buildlockd \
             is listening on the socket; stop it or point BUILDLOCK_RUNTIME_DIR at another directory"
        ),
    }
}

fn version_mismatch_message(
    peer: Peer,
    peer_version: u16,
    peer_build: &str,
    our_version: u16,
    our_build: &str,
) -> String {
    // Always name the client first, whichever side is reporting, so that both ends of a
    // mismatch print the same sentence.
    let (client_version, client_build, daemon_version, daemon_build) = match peer {
        Peer::Client => (peer_version, peer_build, our_version, our_build),
        Peer::Daemon => (our_version, our_build, peer_version, peer_build),
    };
    let advice = if client_version > daemon_version {
        // The usual case: buildlock was upgraded while an old daemon kept running.
        "restart the daemon (`buildlock-client daemon stop`) so the new version starts, or use matching versions"
    } else {
        "this buildlock-client is older than the running daemon: use the buildlock-client that came with \
         the daemon, or stop the daemon (`buildlock-client daemon stop`) so this version starts its own"
    };
    format!(
        "buildlock-client {client_build} speaks protocol {client_version} but buildlockd {daemon_build} speaks \
         protocol {daemon_version}: {advice}"
    )
}
