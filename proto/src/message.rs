//! The requests a client sends after the handshake and the replies the daemon sends back.
//!
//! Compatibility rule: postcard encodes an enum variant as its index in declaration order and a
//! struct as its fields in order, with no names. So:
//!
//! - new variants of an enum go **at the end**, never between existing ones;
//! - any change to an existing variant or struct (adding, removing, reordering or retyping a
//!   field, renaming is fine) changes the bytes: bump [`crate::PROTOCOL_VERSION`] and regenerate
//!   the golden fixture in `tests/golden.rs`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Whether a lease may be shared with other shared holders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Mode {
    /// Any number of shared holders at once, no exclusive holder.
    Shared,
    /// One holder, nobody else.
    Exclusive,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Shared => "shared",
            Mode::Exclusive => "exclusive",
        })
    }
}

/// How long an [`AcquireRequest`] may wait for the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WaitFor {
    /// Fail at once with [`ErrorCode::WouldBlock`] if the lock is taken.
    NoWait,
    /// Wait up to this many milliseconds, then fail with [`ErrorCode::Timeout`].
    Millis(u64),
    /// Wait until granted (or the connection closes).
    Forever,
}

/// A lease's id on its connection: chosen by the client when it asks for the lease (any
/// number but 0, not in use by another lease or pending request of that connection), and named
/// by every request and reply about that lease afterwards. 0 means "no lease" (a reply to a
/// request about no particular lease, such as `Status`). Added in protocol 3, so that one
/// connection can hold many leases, several on one lock too.
pub type LeaseRef = u64;

/// Ask for a lease on one lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcquireRequest {
    /// The id the client gives this lease on its connection (not 0; see [`LeaseRef`]).
    pub lease: LeaseRef,
    /// Absolute path of the `.lock` file. The client resolves lock names to paths; the daemon
    /// does not know about names.
    pub path: String,
    /// Shared or exclusive.
    pub mode: Mode,
    /// How long to wait.
    pub wait: WaitFor,
    /// What the holder is doing (e.g. `build:libfoo`), shown to waiters.
    pub operation: String,
    /// The holder's command line, shown to waiters.
    pub command: String,
    /// Also bind the lease to this process: it is released only once the connection has closed
    /// (or released it) *and* this process has exited. Lets `buildlock-client` exit while the
    /// command it started keeps the lock.
    pub bind_pid: Option<u32>,
    /// The asking thread (the kernel's thread id where there is one): a thread that waits for a
    /// lock it holds itself would wait forever, while another thread of its process may wait
    /// for it. For deadlock detection; added in protocol 3.
    pub thread: u64,
    /// Past this long held (milliseconds), the daemon stops the process the lease is bound to
    /// (SIGTERM to its process group, SIGKILL `kill_after_ms` later), so that a killed `run`
    /// does not take its command's limit with it. Added in protocol 3.
    pub max_hold_ms: Option<u64>,
    /// With `max_hold_ms`: the grace between SIGTERM and SIGKILL.
    pub kill_after_ms: Option<u64>,
    /// A remote lock: the backend's URL (`postgres://...`, the password as given: the socket is
    /// private and the daemon runs as the same user). `path` then carries the lock's *name*,
    /// and the daemon holds the server session for the lease (no descriptor is handed over).
    /// `None`: a lock file. Added in protocol 3.
    pub remote: Option<String>,
    /// With `remote`: the remote timeout (`--remote-timeout`) in milliseconds, which bounds how
    /// long a dead or cut-off host keeps the lock on the server [default: 30000].
    pub remote_timeout_ms: Option<u64>,
}

/// A message from client to daemon after the handshake. Append-only: see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Take a lease. Answered by zero or more [`Reply::Waiting`], then [`Reply::Granted`] or
    /// [`Reply::Error`].
    Acquire(AcquireRequest),
    /// Release this connection's lease `lease` (held, or still waiting: the wait is cancelled).
    /// Answered by [`Reply::Released`] (only when `answer` is set) or [`ErrorCode::NotHeld`].
    /// A client need not wait for the answer before sending its next request: the daemon handles
    /// a connection's requests in order, so the lease is gone before the next one is looked at.
    Release {
        /// The lease, as named in its `Acquire`.
        lease: LeaseRef,
        /// Whether to say [`Reply::Released`] once the lock is free. A client that does not wait
        /// for it sets `false` and saves the daemon a write and itself a read; errors are sent
        /// either way.
        answer: bool,
        /// The client closed its copy of the descriptor that came with `Granted` before sending
        /// this, and no other process can hold one: it passed none on (no command inherited it)
        /// and did not fork while holding it. The daemon may then reuse what only that
        /// descriptor could have kept alive, a remote lease's server session, for another
        /// lease. A client that cannot tell sets `false`: the session is then ended.
        copies_closed: bool,
    },
    /// Release the lease on `path` bound to `pid` (see [`AcquireRequest::bind_pid`]), whichever
    /// connection took it. Answered by [`Reply::Released`] or [`ErrorCode::NotHeld`].
    ReleasePid {
        /// The lock file.
        path: String,
        /// The process the lease is bound to.
        pid: u32,
    },
    /// Describe one lock, or (`None`) every lock the daemon knows. Answered by [`Reply::Status`].
    Status {
        /// The lock file, or `None` for all.
        path: Option<String>,
    },
    /// Describe the daemon itself. Answered by [`Reply::DaemonStatus`].
    DaemonStatus,
    /// Ask the daemon to exit. Answered by [`Reply::ShuttingDown`], then the daemon closes.
    Shutdown,
    /// Bind this connection's held lease `lease` to process `pid` as well: the lease is
    /// released only once the connection is gone (or released it) and `pid` has exited.
    /// Answered by [`Reply::Bound`] or [`ErrorCode::NotHeld`].
    Bind {
        /// The lease, as named in its `Acquire`.
        lease: LeaseRef,
        /// The process to bind to (e.g. the command `run` started).
        pid: u32,
        /// (Version 6) The client stops `pid` when the lease is lost (`run --on-lost=stop`):
        /// for a remote lease, the daemon arms the kernel's guard on the server session for
        /// `pid`'s group at once, not only once the client is gone, so that no two watchers
        /// killed together leave it unguarded. Ignored for local leases.
        stop_on_loss: bool,
    },
}

/// Who holds a lock, as far as the daemon can tell. Most fields are optional because a holder
/// outside the daemon (another tool, or buildlock in direct mode) may have left no metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The holding process.
    pub pid: Option<u32>,
    /// Its command line.
    pub command: Option<String>,
    /// The host it runs on.
    pub host: Option<String>,
    /// Shared or exclusive.
    pub mode: Option<Mode>,
    /// When it took the lock, in milliseconds since the Unix epoch.
    pub since_unix_ms: Option<i64>,
    /// What it says it is doing.
    pub operation: Option<String>,
    /// The lease token, for holders that got their lease from the daemon.
    pub token: Option<u64>,
    /// Held by a process that does not speak to the daemon (the Python `fasteners` library,
    /// `buildlock-client --no-daemon`), seen only through the OS lock.
    pub outside: bool,
    /// One human-readable line describing the holder, worded as buildlock prints it.
    pub description: String,
    /// Its `--max-hold`, in milliseconds, if it has one. Added in protocol 3.
    pub max_hold_ms: Option<u64>,
}

/// A client queued for a lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiter {
    /// The waiting client's process id (from its `Hello`).
    pub pid: u32,
    /// The mode it asked for.
    pub mode: Mode,
    /// How long it has waited so far, in milliseconds.
    pub waited_ms: u64,
    /// What it will be doing.
    pub operation: String,
}

/// The state of one lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// The lock file.
    pub path: String,
    /// Current holders: one exclusive, or any number of shared.
    pub holders: Vec<Holder>,
    /// Queued clients, first in line first.
    pub waiters: Vec<Waiter>,
}

/// The state of the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonInfo {
    /// The daemon's process id.
    pub pid: u32,
    /// Its [`crate::PROTOCOL_VERSION`].
    pub version: u16,
    /// Its [`crate::BUILD`].
    pub build: String,
    /// When it started, in milliseconds since the Unix epoch.
    pub started_unix_ms: i64,
    /// Its runtime directory.
    pub runtime_dir: String,
    /// The path of its socket.
    pub socket: String,
    /// Open client connections.
    pub connections: u32,
    /// Leases currently granted.
    pub leases: u32,
    /// Clients currently waiting.
    pub waiters: u32,
    /// How long it stays up with no connections and no leases before exiting, if it ever does.
    pub idle_exit_ms: Option<u64>,
}

/// What kind of failure an [`ErrorReply`] reports, for programs to act on. Append-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The first frame was not a valid hello.
    BadHello,
    /// The hello's protocol version differs from the daemon's.
    VersionMismatch,
    /// A frame's length was 0 or over the limit; the daemon closes the connection.
    FrameTooLarge,
    /// A frame did not decode as a request; the daemon closes the connection.
    Malformed,
    /// The request decoded but makes no sense (e.g. a relative path).
    InvalidRequest,
    /// The lock path is not acceptable (e.g. not a `.lock` file).
    InvalidName,
    /// `WaitFor::NoWait` and the lock is taken; `holder` says by whom.
    WouldBlock,
    /// The wait ran out; `holder` says who still holds the lock.
    Timeout,
    /// There is no such lease to release.
    NotHeld,
    /// The daemon hit an I/O error on the lock file.
    Io,
    /// The daemon may not open or lock the file.
    PermissionDenied,
    /// The daemon is exiting and takes no new requests.
    ShuttingDown,
    /// A bug in the daemon.
    Internal,
    /// One of the daemon's limits (leases, locks waited for in the kernel) is reached; the
    /// message names the limit and the setting that raises it. Added in protocol 2.
    LimitExceeded,
    /// Waiting would never end: the request closes a cycle of waits (it, or a process it was
    /// started by, holds what the holders it waits for wait for). The message names the cycle.
    /// Added in protocol 3.
    Deadlock,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorCode::BadHello => "bad-hello",
            ErrorCode::VersionMismatch => "version-mismatch",
            ErrorCode::FrameTooLarge => "frame-too-large",
            ErrorCode::Malformed => "malformed",
            ErrorCode::InvalidRequest => "invalid-request",
            ErrorCode::InvalidName => "invalid-name",
            ErrorCode::WouldBlock => "would-block",
            ErrorCode::Timeout => "timeout",
            ErrorCode::NotHeld => "not-held",
            ErrorCode::Io => "io",
            ErrorCode::PermissionDenied => "permission-denied",
            ErrorCode::ShuttingDown => "shutting-down",
            ErrorCode::Internal => "internal",
            ErrorCode::LimitExceeded => "limit-exceeded",
            ErrorCode::Deadlock => "deadlock",
        })
    }
}

/// A request failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The kind of failure.
    pub code: ErrorCode,
    /// What happened and what to do, for a person.
    pub message: String,
    /// The holder in the way, for [`ErrorCode::WouldBlock`] and [`ErrorCode::Timeout`].
    pub holder: Option<Holder>,
    /// The lease the failed request was about (its `Acquire`, `Release` or `Bind`), 0 for a
    /// request about none, or for an error about the whole connection (a bad frame).
    pub lease: LeaseRef,
}

impl fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for ErrorReply {}

/// A file's identity on its machine: the device and inode numbers `stat` gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    pub dev: u64,
    pub ino: u64,
}

/// A message from daemon to client after the handshake. Append-only: see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The lease on `path` is granted.
    Granted {
        /// The lease, as named in its `Acquire`.
        lease: LeaseRef,
        /// The lock file.
        path: String,
        /// Identifies this lease in status output.
        token: u64,
        /// A descriptor of the locked file rides on this frame as `SCM_RIGHTS` ancillary data.
        /// The client keeps it open while it holds the lease and closes it (never unlocking it:
        /// the daemon's copy shares the lock) before sending `Release`.
        fd_attached: bool,
        /// The locked file's identity (device, inode) as the daemon checked it against `path`:
        /// what the client compares the path with later to tell whether the lock file was
        /// replaced while held. `None` when no descriptor is attached.
        file: Option<FileRef>,
    },
    /// The request is queued. Sent when queued, then about once a second while waiting.
    Waiting {
        /// The lease, as named in its `Acquire`.
        lease: LeaseRef,
        /// The lock file.
        path: String,
        /// Place in the queue, 1 for next in line.
        position: u32,
        /// Who holds the lock now, if known.
        holder: Option<Holder>,
    },
    /// The lease on `path` is released (for `ReleasePid`, sent to the connection that held it
    /// with its lease id, and to the asker with 0).
    Released {
        /// The lease, as named in its `Acquire`.
        lease: LeaseRef,
        /// The lock file.
        path: String,
    },
    /// Answer to [`Request::Status`].
    Status {
        /// One entry per lock asked about.
        locks: Vec<LockInfo>,
    },
    /// Answer to [`Request::DaemonStatus`].
    DaemonStatus(DaemonInfo),
    /// Answer to [`Request::Shutdown`]; the daemon closes the connection after it.
    ShuttingDown,
    /// A request failed.
    Error(ErrorReply),
    /// Unsolicited: a lease this connection held is gone (the lock file was deleted or replaced,
    /// the lock was broken, ...).
    LeaseLost {
        /// The lease, as named in its `Acquire`.
        lease: LeaseRef,
        /// The lock file.
        path: String,
        /// Why, for a person.
        reason: String,
    },
    /// Answer to [`Request::Bind`].
    Bound {
        /// The lease, as named in its `Acquire`.
        lease: LeaseRef,
        /// The lock file.
        path: String,
        /// The process the lease is now bound to.
        pid: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_reply_prints_its_message_then_its_code() {
        let reply = ErrorReply {
            code: ErrorCode::WouldBlock,
            message: "lock x is held by pid 7".into(),
            holder: None,
            lease: 1,
        };
        assert_eq!(reply.to_string(), "lock x is held by pid 7 (would-block)");
    }
}
