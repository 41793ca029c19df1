//! buildlock's wire protocol: the messages `buildlock-client` and the `buildlockd` daemon exchange
//! over the daemon's Unix socket, their postcard encoding, the length-prefixed frames that carry
//! them, and the `Hello`/`Welcome` exchange that opens every connection.
//!
//! The crate does no I/O of its own beyond the blocking helpers over [`std::io::Read`] and
//! [`std::io::Write`]: the daemon's event loop uses the sans-IO [`FrameDecoder`], a simple client
//! uses [`read_frame`]/[`write_frame`]. `PROTOCOL.md` beside this crate's `Cargo.toml` describes
//! the bytes for anyone writing a client in another language.
//!
//! How the pieces fit:
//!
//! - A **frame** is a 4-byte little-endian length `N` (`1 ..= MAX_FRAME_LEN`) then `N` bytes of
//!   one postcard-encoded message. [`encode`] makes a whole frame; [`FrameDecoder`] (or
//!   [`read_frame`]) splits a byte stream back into payloads; [`decode`] turns a payload into a
//!   message. Framing faults are [`ProtoError`]s.
//! - The **handshake**: the client's first frame is a [`Hello`], which the daemon checks with
//!   [`check_hello`] and answers with a [`Welcome`], which the client checks with
//!   [`check_welcome`]. Both start with the same three fields (magic, [`PROTOCOL_VERSION`],
//!   [`BUILD`]) in every version, so a mismatch is reported as a [`HandshakeError`] naming both
//!   sides' versions rather than as garbage.
//! - After that the client sends [`Request`]s and the daemon answers with [`Reply`]s; an
//!   [`Request::Acquire`] may be answered by several [`Reply::Waiting`] before its
//!   [`Reply::Granted`], and [`Reply::LeaseLost`] may arrive at any time.
//! - [`transport`] names the socket both sides use: `<runtime dir>/buildlockd.sock`.
//!
//! ```
//! use buildlock_proto::{
//!     check_hello, decode, encode, AcquireRequest, FrameDecoder, Hello, Mode, Request, WaitFor,
//! };
//!
//! // Client side: a hello, then a request, as the bytes that go on the socket.
//! let mut wire = encode(&Hello::new(4242))?;
//! let request = Request::Acquire(AcquireRequest {
//!     lease: 1,
//!     path: "/home/me/.local/share/buildlock/locks/demo.lock".into(),
//!     mode: Mode::Exclusive,
//!     wait: WaitFor::Millis(30_000),
//!     operation: "build:demo".into(),
//!     command: "make -j8".into(),
//!     bind_pid: None,
//!     thread: 1,
//!     max_hold_ms: None,
//!     kill_after_ms: None,
//!     remote: None,
//!     remote_timeout_ms: None,
//! });
//! wire.extend(encode(&request)?);
//!
//! // Daemon side: bytes arrive in whatever pieces the socket hands over.
//! let mut decoder = FrameDecoder::new();
//! decoder.push(&wire[..7]);
//! assert_eq!(decoder.next_frame()?, None); // not a whole frame yet
//! decoder.push(&wire[7..]);
//! let hello = check_hello(&decoder.next_frame()?.expect("hello frame"))?;
//! assert_eq!(hello.pid, 4242);
//! let got: Request = decode(&decoder.next_frame()?.expect("request frame"))?;
//! assert_eq!(got, request);
//! assert_eq!(decoder.buffered(), 0);
//! # Ok::<(), buildlock_proto::ProtoError>(())
//! ```

mod error;
mod frame;
mod handshake;
mod message;
pub mod transport;

pub use error::{HandshakeError, Peer, ProtoError};
pub use frame::{decode, encode, read_frame, read_message, write_frame, FrameDecoder};
pub use handshake::{check_hello, check_welcome, Hello, Welcome};
pub use message::{
    AcquireRequest, DaemonInfo, ErrorCode, ErrorReply, FileRef, Holder, LeaseRef, LockInfo, Mode, Reply, Request,
    WaitFor, Waiter,
};

/// The first four bytes of every [`Hello`] and [`Welcome`] payload: tells a buildlock peer from
/// anything else that happens to connect to (or listen on) the socket.
pub const MAGIC: [u8; 4] = *b"BLCK";

/// The version of the message layout. Two peers talk only if theirs are equal.
///
/// Bump it on any change to the encoding of a message (a field added, removed, reordered or
/// retyped, a variant reordered or removed) and on any new variant of any wire enum, then
/// regenerate the golden fixture in `tests/golden.rs`: peers talk only at equal versions, which
/// is what keeps either side from receiving a message it cannot decode. `tests/versioning.rs`
/// fails when an enum gains a variant without a bump.
///
/// Version 2 added `ErrorCode::LimitExceeded`, and `Waiting`'s queue positions count from 1 as
/// version 1 documented (its daemons sent them from 0).
///
/// Version 3 names leases by an id the client chooses ([`LeaseRef`]) instead of their path:
/// `AcquireRequest.lease`, `Release { lease }`, `Bind { lease, pid }`, and every reply about a
/// lease (`Granted`, `Waiting`, `Released`, `Bound`, `LeaseLost`, `ErrorReply.lease`) says
/// which one it answers, so one connection carries all of a process's leases, several on one
/// lock too, with requests pipelined.
///
/// Version 4 lets a client say it will not wait for a release's answer (`Release.answer`), and
/// `Granted` carries the locked file's identity (`Granted.file`), so the client need not
/// `fstat` the descriptor it receives.
///
/// Version 5 lets a client say it closed every copy of a grant's descriptor
/// (`Release.copies_closed`), so the daemon may keep a remote lease's server session for the
/// next lease.
///
/// Version 6 lets a client binding a lease say it stops that process on a loss
/// (`Bind.stop_on_loss`): the daemon then guards a remote lease's command from the binding on.
pub const PROTOCOL_VERSION: u16 = 6;

/// The largest payload a frame may carry, in bytes. Every message buildlock sends is far smaller
/// (a status of a few hundred locks fits); the limit exists so a broken or hostile peer cannot
/// make the other side allocate without bound.
pub const MAX_FRAME_LEN: u32 = 64 * 1024;

/// The version of this crate, sent in the handshake so that a mismatch can name both builds.
pub const BUILD: &str = env!("CARGO_PKG_VERSION");
