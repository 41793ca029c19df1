//! What a lock engine must do: the traits the daemon and the blocking facade use, and the choice
//! of engine by the URL's scheme. PostgreSQL (`postgres.rs`) is the one engine so far.
//!
//! An engine is two traits:
//!
//! - [`Engine`]: a configured server (from a URL): how users see it, the remote timeout, and
//!   [`Engine::connect`], which opens a session within the connect timeout.
//! - [`EngineSession`]: one session, which takes (or waits for) one lock and holds it until
//!   [`EngineSession::release`], [`EngineSession::close`] or the session's end.
//!
//! What every engine guarantees (the daemon and `run` rely on it; `docs/REMOTE.md`, "Adding an
//! engine"):
//!
//! 1. **A lock lives no longer than its session.** When the session ends (closed, aborted, its
//!    host dead or cut off) the server frees the lock by itself, within the remote timeout `T`
//!    (about `T + T/10` at most), never later and never because of a timer the holder can miss
//!    while alive and connected.
//! 2. **Loss is told within `T/2`.** [`EngineSession::closed`] fires, or
//!    [`EngineSession::heartbeat`] (called every [`Engine::heartbeat`], each with that deadline)
//!    fails, at least `T/2` before the server may grant the lock to someone else ([`crate::Bounds`]).
//! 3. **Fencing tokens only grow.** The token of an exclusive grant is larger than every earlier
//!    exclusive grant's of that lock on that server, from any host, and it is advanced while the
//!    lock is held; shared holders get the current value.
//! 4. **Exact names.** Two different names are two different locks (no hashing into a key space).
//! 5. **Order.** Waiters are served in the server's order; say whether it is FIFO (PostgreSQL's
//!    lock queue is, writers not starved) and how shared and exclusive requests mix.
//! 6. **Who holds.** [`EngineSession::status`] names holders and waiters from every host; the
//!    server's own lock state decides, any rows of ours only explain.
//! 7. **Nothing blocks.** Futures never block their thread (a file read such as `~/.pgpass`
//!    happens in [`from_url`], which callers run off the async runtime), and
//!    [`EngineSession::abort`] ends a session at once, even in the middle of a wait.
//!
//! The traits are object safe (`dyn`): the engine is chosen at run time, by the URL, and the
//! daemon's core holds `Box<dyn EngineSession>` without knowing which. A boxed future per
//! operation costs nothing next to a round trip to a server.

use std::fs::File;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::{redact, Error, Holder, LockEntry, Request, Settings};

/// A future an engine returns: `Send`, so the daemon can run it in a task of its own.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The URL schemes with an engine, and the engine's name.
pub const SCHEMES: &[(&str, &str)] = &[("postgres", "PostgreSQL"), ("postgresql", "PostgreSQL")];

/// A server of one engine, as configured by a backend URL.
pub trait Engine: Send + Sync + std::fmt::Debug {
    /// The engine's name for messages (`PostgreSQL`).
    fn engine(&self) -> &'static str;

    /// How users see the server (`postgres://host:port/db`): never a password.
    fn display(&self) -> String;

    /// A URL that [`from_url`] reads back to the same settings, secrets included, for a process
    /// of the same user that connects on this one's behalf (the daemon). Never print it.
    fn to_url(&self) -> String;

    /// How long a dead or cut-off host may keep its locks (`--remote-timeout`).
    fn remote_timeout(&self) -> Duration;

    /// The same server with another remote timeout (an error if the engine cannot bound it so).
    fn with_remote_timeout(&self, t: Duration) -> Result<Arc<dyn Engine>, Error>;

    /// How often a holder checks in, and each check-in's deadline: a quarter of the remote
    /// timeout, so a loss is seen within half of it.
    fn heartbeat(&self) -> Duration {
        self.remote_timeout() / 4
    }

    /// Opens a session, set up for liveness, within the connect timeout.
    fn connect(&self) -> BoxFuture<'_, Result<Box<dyn EngineSession>, Error>>;
}

/// One session on the server: it takes at most one lock, and the lock ends with it.
pub trait EngineSession: Send {
    /// Takes lock `req.name` (waiting as `req.wait` says) and returns the fencing token.
    /// `on_wait` is told who holds it when it must wait, then about once a second. Dropping
    /// the future gives up the wait only together with [`EngineSession::abort`].
    fn acquire<'a>(
        &'a mut self,
        req: &'a Request,
        on_wait: &'a mut (dyn FnMut(&Holder) + Send),
    ) -> BoxFuture<'a, Result<u64, Error>>;

    /// Releases the lock this session holds; `Error::Lost` (naming the lock) if the server says
    /// it no longer did.
    fn release(&mut self) -> BoxFuture<'_, Result<(), Error>>;

    /// One round trip: the server still answers on this session.
    fn heartbeat(&self) -> BoxFuture<'_, Result<(), Error>>;

    /// `Some(why)` once the session has ended (the loss notification).
    fn closed(&self) -> watch::Receiver<Option<String>>;

    /// Ends the session at once, without a round trip, even while a request waits. It closes
    /// only this process's side and never tells the server (no Terminate): a copy of
    /// [`EngineSession::socket`] held elsewhere keeps the session, and the lock, alive. The daemon
    /// relies on it when a lease's holders are gone (it drops its copy, the holders' copies decide).
    /// The signal that the abort is complete is `closed()`'s sender being dropped.
    fn abort(&self);

    /// The connection's socket, if a copy inherited by a command keeps the session (and so the
    /// lock) alive while that command runs.
    fn socket(&self) -> Option<&File>;

    /// Whether this session may take another lock once its lease has ended: it holds none,
    /// its connection is open, and no request on it failed but for a busy lock (a failure may
    /// leave the session in a state this side does not know). Only a session whose socket no
    /// other process holds a copy of may be reused: that is the caller's to know.
    fn reusable(&self) -> bool;

    /// Holders and waiters of every lock (or of `name`), from every host.
    fn status<'a>(&'a self, name: Option<&'a str>) -> BoxFuture<'a, Result<Vec<LockEntry>, Error>>;

    /// Ends the session: the server is told, bounded in time (a second), then it is aborted.
    fn close(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// The server of a backend URL; its scheme chooses the engine ([`SCHEMES`]). May read files
/// (`~/.pgpass`): call it off an async runtime's threads.
pub fn from_url(url: &str) -> Result<Arc<dyn Engine>, Error> {
    let supported = || {
        let list: Vec<String> = SCHEMES.iter().map(|(s, e)| format!("{s}:// ({e})")).collect();
        list.join(", ")
    };
    match url.split_once("://").map(|(s, _)| s) {
        Some("postgres" | "postgresql") => Ok(Arc::new(Settings::from_url(url)?)),
        Some(scheme) => Err(Error::Settings(format!(
            "backend URL {}: no engine for scheme {scheme}://; the supported ones are {}",
            redact(url),
            supported()
        ))),
        None => Err(Error::Settings(format!(
            "backend URL {}: not a URL (SCHEME://...); the supported schemes are {}",
            redact(url),
            supported()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_chooses_the_engine() {
        let pg = from_url("postgres://ci:secret@db.internal:5433/locks").unwrap();
        assert_eq!(pg.engine(), "PostgreSQL");
        assert_eq!(pg.display(), "postgres://db.internal:5433/locks");
        assert_eq!(from_url("postgresql://db.internal/locks").unwrap().engine(), "PostgreSQL");
    }

    #[test]
    fn another_scheme_is_an_error_naming_it_and_the_supported_ones() {
        let e = from_url("etcd://ci:secret@etcd.internal:2379").unwrap_err().to_string();
        assert!(e.contains("no engine for scheme etcd://"), "{e}");
        assert!(e.contains("postgres:// (PostgreSQL), postgresql:// (PostgreSQL)"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        let e = from_url("db.internal").unwrap_err().to_string();
        assert!(e.contains("not a URL") && e.contains("postgres://"), "{e}");
    }

    #[test]
    fn the_remote_timeout_goes_through_the_trait() {
        let pg = from_url("postgres://db.internal/locks").unwrap();
        let t = pg.with_remote_timeout(Duration::from_secs(8)).unwrap();
        assert_eq!((t.remote_timeout(), t.heartbeat()), (Duration::from_secs(8), Duration::from_secs(2)));
        assert!(pg.with_remote_timeout(Duration::from_millis(10)).is_err());
        // The URL for the daemon reads back to the same server.
        assert_eq!(from_url(&t.to_url()).unwrap().display(), pg.display());
    }
}
