//! `buildlock-remote`: buildlock locks on PostgreSQL, for locks shared across machines.
//!
//! Its one job: take, hold, watch and release a named lock on a PostgreSQL server, and say who
//! holds and waits for locks there. A lock is a session advisory lock, which lives exactly as
//! long as its connection, the model the daemon has for local clients.
//!
//! Everything outside this crate sees an engine only through two object-safe traits:
//! [`Engine`] (a server, from [`from_url`], whose URL scheme chooses the engine) and
//! [`EngineSession`] (one session holding one lock); `engine.rs` says what an engine must
//! guarantee. PostgreSQL (`postgres.rs`: [`Settings`] and [`Session`]) is the one engine so far.
//!
//! - [`Settings`] come from a libpq URL (`sslmode`, `sslrootcert`, `connect_timeout`,
//!   `application_name`; the password from the URL, `PGPASSFILE` or `~/.pgpass`), plus the
//!   remote timeout that bounds how long a dead or cut-off host keeps its locks ([`Bounds`]).
//! - [`Session`] is the async core (tokio; any runtime flavour): one connection, set up for
//!   liveness, that creates the versioned schema on first use and takes one lock
//!   ([`Session::acquire`], [`Session::release`], [`Session::heartbeat`], [`Session::status`]).
//!   The daemon can hold sessions on its own runtime.
//! - [`acquire`] and [`Lease`] are the blocking facade for the library and the CLI: the session
//!   lives on a thread of its own that checks in with the server and records a loss at once
//!   ([`Lease::check`]). A released session is kept, unlocked, for the process's next lease on
//!   the same server while no other process can hold a copy of its socket (`blocking.rs`).
//!
//! Names map to keys exactly: the table `buildlock_locks` gives each name an id, and the lock
//! is `pg_advisory_lock(NAMESPACE, id)` (the two-int4 form, [`NAMESPACE`] as the first key so
//! other applications' advisory locks do not collide). The server's lock queue is the order
//! (FIFO, writers not starved). Fencing tokens come from `buildlock_locks.fence`, advanced by
//! each exclusive holder in its own session while it holds the lock. Holder and waiter rows in
//! `buildlock_holders` only explain; `pg_locks` decides who holds and waits.
//!
//! ```no_run
//! use buildlock_remote::{acquire, from_url, Mode, Request, Wait};
//! let server = from_url("postgres://ci@db.internal/buildlock")?;
//! let req = Request::new("deploy-staging", Mode::Exclusive, Wait::Forever, "deploy");
//! let lease = acquire(&*server, &req, &mut |holder, _waited| eprintln!("waiting for {}", holder.describe()))?;
//! println!("token {}", lease.token());
//! lease.check()?; // Err(Error::Lost) once the connection broke
//! lease.release()?;
//! # Ok::<(), buildlock_remote::Error>(())
//! ```

use std::time::Duration;

mod blocking;
mod engine;
mod error;
mod net;
mod postgres;
mod session;
mod settings;

pub use blocking::{acquire, status, Lease};
pub use engine::{from_url, BoxFuture, Engine, EngineSession, SCHEMES};
pub use error::Error;
pub use session::{Grant, Session, NAMESPACE, SCHEMA_VERSION};
pub use settings::{
    pgpass_lookup, redact, Host, Settings, SslMode, DEFAULT_CONNECT_TIMEOUT, DEFAULT_REMOTE_TIMEOUT, MIN_REMOTE_TIMEOUT,
};

/// Shared (readers) or exclusive (writer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Exclusive,
}

/// How long to wait for a busy lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    NoWait,
    Timeout(Duration),
    Forever,
}

/// What to take, and who asks (shown to everyone who waits, on every host).
#[derive(Clone, Debug)]
pub struct Request {
    pub name: String,
    pub mode: Mode,
    pub wait: Wait,
    pub host: String,
    pub pid: u32,
    pub command: String,
    pub operation: String,
}

impl Request {
    /// A request from this process on this host.
    pub fn new(name: &str, mode: Mode, wait: Wait, operation: &str) -> Request {
        Request {
            name: name.to_owned(),
            mode,
            wait,
            host: local_hostname(),
            pid: std::process::id(),
            command: String::new(),
            operation: operation.to_owned(),
        }
    }
}

fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// A holder of (or waiter for) a remote lock.
#[derive(Clone, Debug, PartialEq)]
pub struct Holder {
    pub mode: Mode,
    /// The holder's host (its own name for itself; the client address if it wrote no row).
    pub host: String,
    pub pid: Option<u32>,
    pub command: String,
    pub operation: String,
    /// When it took the lock (or began to wait), as the server prints a timestamp.
    pub since: Option<String>,
    pub held_secs: f64,
    pub token: Option<u64>,
    /// The server process of its session.
    pub backend_pid: i32,
}

impl Holder {
    /// One line: `pid 4242 on ci-7 (deploy), exclusive, for 12s, token 9`.
    pub fn describe(&self) -> String {
        let mut out = match self.pid {
            Some(pid) => format!("pid {pid} on {}", self.host),
            None => format!("a session from {}", self.host),
        };
        let what = if self.operation.is_empty() { &self.command } else { &self.operation };
        if !what.is_empty() {
            out.push_str(&format!(" ({what})"));
        }
        out.push_str(match self.mode {
            Mode::Shared => ", shared",
            Mode::Exclusive => ", exclusive",
        });
        out.push_str(&format!(", for {}s", self.held_secs as u64));
        if let Some(t) = self.token {
            out.push_str(&format!(", token {t}"));
        }
        out
    }
}

/// A row of [`status`]: a session holding (`granted`) or waiting for lock `name`.
#[derive(Clone, Debug, PartialEq)]
pub struct LockEntry {
    pub name: String,
    pub granted: bool,
    pub holder: Holder,
}

/// What bounds a dead or cut-off host's hold, for a remote timeout `T` (`--remote-timeout`).
///
/// - The server drops a silent client's session, and so its locks, once nothing was received
///   from it for `T` (`tcp_user_timeout = T`, with keepalives from `T/3`, every `T/10`):
///   at least `T` and at most about `T + T/10` after the last packet it received.
/// - The holder checks in every `T/4` with a deadline of `T/4`, and its socket gives up on
///   unacknowledged data after `T/4`: it sees the loss at most `T/2` after the last check-in the
///   server answered, so at least `T/2` before the server can free the lock.
/// - `run` then has `T/4` for SIGTERM before SIGKILL ([`Bounds::stop_grace`]), plus its
///   one-second check: CMD is stopped before another host can be granted the lock.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub remote_timeout: Duration,
}

impl Bounds {
    /// How long a command stopped for a lost lock has between SIGTERM and SIGKILL, at most.
    pub fn stop_grace(&self) -> Duration {
        self.remote_timeout / 4
    }

    /// The socket's `TCP_USER_TIMEOUT` (and the idle time before keepalive probes) while a
    /// holder checks in on the session: `T/4`, at least a second.
    pub fn user_timeout(&self) -> Duration {
        (self.remote_timeout / 4).max(Duration::from_secs(1))
    }

    /// The socket's `TCP_USER_TIMEOUT` once nobody checks in on a session any more (its daemon
    /// and its `run` gone, or going) and the kernel's guard is armed: only keepalives can fail
    /// it then, about `3T/4` after the server was last heard from, when `run` itself would have
    /// sent SIGKILL (SIGTERM at `T/2`, a stop grace before), and before the server frees the lock.
    pub fn unwatched_user_timeout(&self) -> Duration {
        self.remote_timeout * 3 / 4
    }
}
