//! `buildlockd`: the per-user lock daemon.
//!
//! The daemon grants leases on lock files to clients connected over a Unix socket
//! (`<runtime dir>/buildlockd.sock`, protocol in `proto/PROTOCOL.md`). It queues waiters fairly
//! (the pure state machine in `buildlock-queue`), sees a dead client the instant its socket
//! closes, and stays interoperable with everything that uses the same lock files on disk:
//! every grant takes the OS lock through `buildlock-disk` and writes `.lock.pid` naming the
//! client, so `fasteners` users and direct-mode clients are excluded and informed.
//!
//! Layers, bottom-up (after mini-redis):
//! - `conn`: one connection: handshake, frames in, replies (with descriptors) out.
//! - `state`: the shared state and every request's effect: the queue, the leases, the OS locks.
//!   The queue decides *who* is next; this layer takes the OS lock for them (waiting for an
//!   outside holder in that lock file's waiter thread, `outside`) and hands it over.
//! - `outside`: waiting for a process outside the daemon to let go of a lock file: one thread
//!   blocked in the kernel per lock file, shared by every lease waiting for it.
//! - `remote`: remote leases (locks on a PostgreSQL server, `buildlock-remote`, seen only through
//!   its `Engine`/`EngineSession` traits): one server session per lease at a time on the
//!   daemon's runtime, released when its client and bound process are gone, and `LeaseLost` sent the
//!   moment the session is lost; `--max-hold` stops the bound group as for local leases. Not in
//!   the local queue.
//! - `pool`: idle server sessions, unlocked, kept for the next remote lease on the same server
//!   when no other process can hold a copy of their socket.
//! - `server`: the accept loop, connection admission (limits), timers (deadlines, idle exit) and
//!   shutdown.
//! - [`main`]: the `buildlockd` command: runtime directory checks, the single-instance lock,
//!   binding the socket.
//!
//! **Handing over the lock.** On Linux the daemon sends the client a duplicate of the locked
//! descriptor (SCM_RIGHTS). The OS lock belongs to the open file, so it holds while *either*
//! copy is open: the daemon's death frees nothing a live client holds, and a client's death
//! frees its lock the moment the daemon drops its copy on seeing the socket close. A lease
//! bound to a process (`run`'s command, `acquire --pid`) keeps the daemon's copy until that
//! process has exited too.
//!
//! **Architecture invariant:** a lease is released (metadata removed, daemon's copy closed,
//! next waiter granted) only when its connection is gone or released it *and* its bound
//! process, if any, has exited.
//!
//! **Architecture invariant:** a remote lease is granted only when the server granted its own
//! session the lock; its session ends (and the server frees the lock) when the lease is
//! released, or its connection is gone and its bound process has exited.
//!
//! **Architecture invariant:** bad input from one connection (garbage, a huge frame, a wrong
//! version) closes that connection only; no other client's lease is touched.
//!
//! Unix only. On Windows (a named-pipe daemon is future work) [`main`] says so and exits, and
//! clients use the lock files directly.

use std::path::PathBuf;
use std::time::Duration;

#[cfg(unix)]
mod conn;
#[cfg(unix)]
mod journal;
#[cfg(unix)]
mod pool;
#[cfg(unix)]
mod remote;
#[cfg(unix)]
mod server;
#[cfg(unix)]
mod state;

#[cfg(unix)]
pub use server::{serve, Daemon};
#[cfg(unix)]
mod outside;

/// What a daemon needs to know at start.
#[derive(Clone, Debug)]
pub struct Config {
    /// The private directory holding the socket, pid file and instance lock.
    pub runtime_dir: PathBuf,
    /// Exit after this long with no connection and no lease; `None`: never.
    pub idle_exit: Option<Duration>,
    /// How much one user's clients may ask of the daemon.
    pub limits: Limits,
}

/// The daemon's caps, so that a runaway script cannot wear it down for every other build of its
/// user. Past each one the request gets an error naming the limit and the setting that raises
/// it; everything already granted carries on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open client connections (`--max-connections`, `BUILDLOCKD_MAX_CONNECTIONS`).
    pub max_connections: usize,
    /// Leases held or waited for, all connections together (`--max-leases`,
    /// `BUILDLOCKD_MAX_LEASES`).
    pub max_leases: usize,
    /// Lock files waited for at once while a process outside the daemon holds them
    /// (`--max-outside-waits`, `BUILDLOCKD_MAX_OUTSIDE_WAITS`). Each costs one thread blocked in
    /// the kernel, shared by every lease waiting for that file.
    pub max_outside_waits: usize,
    /// The open-file limit, when it lowered `max_leases` at start (each held lease and each
    /// connection costs a descriptor): the lease limit's message then names it.
    pub open_files: Option<u64>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_connections: 4096, max_leases: 65_536, max_outside_waits: 256, open_files: None }
    }
}

impl Config {
    pub fn socket_path(&self) -> PathBuf {
        buildlock_proto::transport::socket_path(&self.runtime_dir)
    }
}

#[cfg(unix)]
mod cli;
#[cfg(unix)]
pub use cli::{main, main_from};

/// The daemon is Unix-only for now: say so.
#[cfg(not(unix))]
pub fn main() -> std::process::ExitCode {
    eprintln!("buildlockd: error: the daemon is not available on this platform yet; buildlock-client uses the lock files directly");
    std::process::ExitCode::from(2)
}

/// The daemon is Unix-only for now: say so.
#[cfg(not(unix))]
pub fn main_from<I, T>(_args: I) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    main()
}
