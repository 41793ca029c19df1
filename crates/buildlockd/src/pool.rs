//! Idle server sessions, kept for the next remote lease on the same server.
//!
//! Opening a session costs a TCP connection, authentication (SCRAM is thousands of hashes on
//! both sides) and the session's settings: milliseconds, next to a fraction of one for taking a
//! free lock on an open session. So a session whose lease was released is kept, unlocked, for
//! the next lease on the same server (the same URL and remote timeout), when all of these hold:
//!
//! - its release succeeded on the server and the engine says it is clean
//!   ([`buildlock_remote::EngineSession::reusable`]);
//! - no other process can hold a copy of its socket: the client closed the copy that came with
//!   the grant and passed none on (`Release.copies_closed`), and the lease was never bound to
//!   another process (`run`'s command inherits a copy, and so may its children). A copy left in
//!   another process would keep a later lease's session, and so its lock, alive after that
//!   lease's holders are gone.
//!
//! At most [`MAX_IDLE`] sessions per server are kept, each for at most [`KEEP_IDLE`] unused; one
//! that the server or the network ended meanwhile is dropped when seen (when taken, or by the
//! sweep). A taken session is checked again by its first request: one that fails for a broken
//! connection is replaced by a new session (`remote::drive`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use buildlock_remote::{Engine, EngineSession};
use tokio::time::Instant;

/// The idle sessions kept per server, at most.
pub(crate) const MAX_IDLE: usize = 8;
/// How long an idle session is kept unused.
pub(crate) const KEEP_IDLE: Duration = Duration::from_secs(30);

/// A server as a lease names it: its URL and remote timeout (the session's liveness settings
/// depend on it).
pub(crate) type Key = (String, Duration);

struct Idle {
    session: Box<dyn EngineSession>,
    since: Instant,
}

struct Server {
    engine: Arc<dyn Engine>,
    idle: Vec<Idle>,
}

#[derive(Default)]
pub(crate) struct Pool {
    servers: Mutex<HashMap<Key, Server>>,
    /// Whether the sweep task runs (it stops when nothing is left to sweep).
    sweeping: Mutex<bool>,
}

impl Pool {
    fn servers(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Server>> {
        self.servers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle session of server `key` that is still open, with its engine.
    pub(crate) fn take(&self, key: &Key) -> Option<(Arc<dyn Engine>, Box<dyn EngineSession>)> {
        let mut servers = self.servers();
        let server = servers.get_mut(key)?;
        while let Some(idle) = server.idle.pop() {
            if idle.session.reusable() {
                return Some((server.engine.clone(), idle.session));
            }
            close(idle.session);
        }
        None
    }

    /// Keeps `session` (unlocked, reusable) for the next lease on server `key`; closes it if
    /// that server has enough idle sessions already.
    pub(crate) fn put(self: &Arc<Self>, key: Key, engine: Arc<dyn Engine>, session: Box<dyn EngineSession>) {
        {
            let mut servers = self.servers();
            let server = servers.entry(key).or_insert_with(|| Server { engine, idle: Vec::new() });
            if server.idle.len() >= MAX_IDLE || !session.reusable() {
                drop(servers);
                return close(session);
            }
            server.idle.push(Idle { session, since: Instant::now() });
        }
        let mut sweeping = self.sweeping.lock().unwrap_or_else(|e| e.into_inner());
        if !*sweeping {
            *sweeping = true;
            tokio::spawn(self.clone().sweep());
        }
    }

    /// Closes the sessions unused for [`KEEP_IDLE`] and those that have ended, every few
    /// seconds, until none is left.
    async fn sweep(self: Arc<Self>) {
        loop {
            tokio::time::sleep(KEEP_IDLE / 8).await;
            let now = Instant::now();
            let mut servers = self.servers();
            for server in servers.values_mut() {
                let (keep, old): (Vec<Idle>, Vec<Idle>) = std::mem::take(&mut server.idle)
                    .into_iter()
                    .partition(|i| now.duration_since(i.since) < KEEP_IDLE && i.session.reusable());
                server.idle = keep;
                old.into_iter().for_each(|i| close(i.session));
            }
            servers.retain(|_, s| !s.idle.is_empty());
            if servers.is_empty() {
                // Under the servers' lock: a `put` after this starts a new sweep.
                *self.sweeping.lock().unwrap_or_else(|e| e.into_inner()) = false;
                return;
            }
        }
    }
}

/// Ends an idle session (the server is told), off the caller's path.
fn close(session: Box<dyn EngineSession>) {
    tokio::spawn(session.close());
}
