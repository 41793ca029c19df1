//! The blocking facade for the library and the CLI: [`acquire`] returns a [`Lease`] whose
//! session lives on a thread of its own (a current-thread runtime) that checks in with the
//! server every quarter of the remote timeout and records at once when the connection is lost.
//!
//! **Sessions kept between leases.** Opening a session costs a connection, authentication and
//! its settings: milliseconds, next to a round trip for a free lock. So when a lease is released
//! and no other process can hold a copy of its session's socket, its thread keeps the session,
//! unlocked, for the next lease of this process on the same server (URL and remote timeout), at
//! most [`MAX_IDLE`] per server and [`KEEP_IDLE`] each. No other process can hold a copy when:
//!
//! - the socket was never handed out ([`Lease::socket`], for a command to inherit);
//! - this process has not forked since the session was opened ([`buildlock_sys::forks`]): a child
//!   holds copies of every descriptor, and would keep a later lease's lock alive after this
//!   process died. A kept session is never used in a forked child (its pid differs).

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::engine::{Engine, EngineSession};
use crate::{Error, Holder, LockEntry, Request};

/// The idle sessions kept per server and process, at most.
pub const MAX_IDLE: usize = 4;
/// How long an idle session is kept unused.
pub const KEEP_IDLE: Duration = Duration::from_secs(30);

/// A lock held on the server. Dropping it releases it; [`Lease::release`] does too and reports
/// problems.
#[derive(Debug)]
pub struct Lease {
    name: String,
    server: String,
    token: u64,
    lost: Arc<Mutex<Option<String>>>,
    /// Tells the session's thread to release, and whether it may keep the session.
    stop: Option<oneshot::Sender<bool>>,
    /// The release's outcome, from the session's thread.
    released: Option<std_mpsc::Receiver<Result<(), Error>>>,
    socket: Option<File>,
    /// [`Lease::socket`] was asked for: another process may hold a copy.
    handed_out: AtomicBool,
    /// The process that took it: in a forked child, the lease is the parent's.
    pid: u32,
}

/// What a session's thread is asked to do: take a lock.
struct Job {
    req: Request,
    events: std_mpsc::Sender<Event>,
}

/// What a session's thread tells the thread that asked.
enum Event {
    Waiting(Holder),
    Granted(Granted),
    Failed(Error),
}

struct Granted {
    token: u64,
    socket: Option<File>,
    lost: Arc<Mutex<Option<String>>>,
    stop: oneshot::Sender<bool>,
    released: std_mpsc::Receiver<Result<(), Error>>,
}

/// A session's thread waiting for its next job.
struct Parked {
    key: String,
    pid: u32,
    id: u64,
    /// This process's forks when the session was opened: one more since, and a child may hold
    /// a copy of its socket.
    forks: Option<u64>,
    /// Its next job: dropped unsent, the thread ends its session.
    job: oneshot::Sender<Job>,
}

static PARKED: Mutex<Vec<Parked>> = Mutex::new(Vec::new());

fn parked() -> std::sync::MutexGuard<'static, Vec<Parked>> {
    PARKED.lock().unwrap_or_else(|e| e.into_inner())
}

/// A server's key among kept sessions: its full URL (secrets included: it never leaves this
/// process) and remote timeout.
fn key(engine: &dyn Engine) -> String {
    format!("{} {}", engine.to_url(), engine.remote_timeout().as_millis())
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Settings(format!("cannot start the remote backend's runtime: {e}")))
}

/// Takes lock `req.name` on the server `engine`; `on_wait` is called about once a second
/// while waiting, with the holder and the time waited.
pub fn acquire(engine: &dyn Engine, req: &Request, on_wait: &mut dyn FnMut(&Holder, Duration)) -> Result<Lease, Error> {
    let started = Instant::now();
    let key = key(engine);
    let me = buildlock_sys::current_pid();
    let mut kept = {
        let mut all = parked();
        let forks = buildlock_sys::forks();
        // Sessions opened before a fork are ended (their senders dropped), never used: the
        // child holds copies of their sockets. A forked child leaves its parent's alone.
        all.retain(|p| p.pid != me || p.forks == forks);
        all.iter().rposition(|p| p.key == key && p.pid == me).map(|i| all.remove(i))
    };
    loop {
        let (events, rx) = std_mpsc::channel();
        let job = Job { req: req.clone(), events };
        let from_kept = match kept.take() {
            // Its thread may have ended meanwhile (the session was lost): then a new one.
            Some(p) => match p.job.send(job) {
                Ok(()) => true,
                Err(job) => start(engine, key.clone(), job).map(|()| false)?,
            },
            None => start(engine, key.clone(), job).map(|()| false)?,
        };
        let failed = loop {
            match rx.recv() {
                Ok(Event::Waiting(h)) => on_wait(&h, started.elapsed()),
                Ok(Event::Granted(g)) => {
                    return Ok(Lease {
                        name: req.name.clone(),
                        server: engine.display(),
                        token: g.token,
                        lost: g.lost,
                        stop: Some(g.stop),
                        released: Some(g.released),
                        socket: g.socket,
                        handed_out: AtomicBool::new(false),
                        pid: me,
                    })
                }
                Ok(Event::Failed(e)) => break e,
                Err(_) => {
                    break Error::Server {
                        server: engine.display(),
                        why: "the thread that held the session ended".into(),
                    }
                }
            }
        };
        // A kept session that failed for another reason than a busy lock (the server restarted
        // or the network failed while it was idle, unnoticed) is replaced by a new one, once.
        if from_kept && !matches!(failed, Error::Busy { .. }) {
            tracing::debug!("a kept session of {} failed ({failed}); taking a new one", engine.display());
            continue;
        }
        return Err(match failed {
            // Nothing was held yet: the connection ended while connecting or waiting.
            Error::Lost { server, why, .. } => {
                Error::Server { server, why: format!("{why}; lock {} was not taken, try again", req.name) }
            }
            other => other,
        });
    }
}

/// A new session's thread, given its first job.
fn start(engine: &dyn Engine, key: String, job: Job) -> Result<(), Error> {
    let rt = runtime()?;
    // The thread's own handle on the server (the same settings).
    let engine = engine.with_remote_timeout(engine.remote_timeout())?;
    std::thread::Builder::new()
        .name("buildlock-remote".into())
        .spawn(move || rt.block_on(serve(engine, key, job)))
        .map(drop)
        .map_err(|e| Error::Settings(format!("cannot start the remote lease's thread: {e}")))
}

/// A session's thread: connects, then serves one lease after another, keeping the session
/// between them while that is safe (see the module's documentation).
async fn serve(engine: Arc<dyn Engine>, key: String, first: Job) {
    // Counted before the socket exists: a fork from now on may have copied it.
    let forks = buildlock_sys::forks();
    let mut session = match engine.connect().await {
        Ok(s) => s,
        Err(e) => return drop(first.events.send(Event::Failed(e))),
    };
    let mut job = first;
    static IDS: AtomicU64 = AtomicU64::new(0);
    // The last release's outcome, told once the session is kept or has ended: a process that
    // exits right after its release must not leave a session open behind it.
    let mut told: Option<Told>;
    loop {
        let (reuse, tell) = lease(&*engine, &mut *session, job).await;
        told = tell;
        let alone = reuse && forks.is_some() && forks == buildlock_sys::forks() && session.reusable();
        if !alone {
            break;
        }
        // Kept: parked for the next lease of this process on this server.
        let id = IDS.fetch_add(1, Ordering::Relaxed);
        let (tx, mut next_job) = oneshot::channel();
        {
            let mut all = parked();
            if all.iter().filter(|p| p.key == key).count() >= MAX_IDLE {
                break;
            }
            let pid = buildlock_sys::current_pid();
            all.push(Parked { key: key.clone(), pid, id, forks, job: tx });
        }
        if let Some(t) = told.take() {
            t.tell();
        }
        let mut closed = session.closed();
        let idle = tokio::select! {
            j = &mut next_job => match j {
                Ok(j) => {
                    job = j;
                    continue;
                }
                // Taken out of the parked list to be ended (a fork since it was opened).
                Err(_) => break,
            },
            _ = tokio::time::sleep(KEEP_IDLE) => true,
            _ = closed.changed() => false,
        };
        // Unused for long (`idle`), or ended by the server: unless a lease has just taken it,
        // it goes (a lease that took it sends its job, or drops the sender).
        let still_parked = {
            let mut all = parked();
            let at = all.iter().position(|p| p.id == id);
            at.map(|i| all.remove(i)).is_some()
        };
        if still_parked {
            tracing::debug!("kept session ends ({})", if idle { "unused" } else { "closed by the server" });
            break;
        }
        match next_job.await {
            Ok(j) => job = j,
            Err(_) => break,
        }
    }
    session.close().await;
    if let Some(t) = told {
        t.tell();
    }
}

/// A release's outcome, for the thread that released.
struct Told(std_mpsc::Sender<Result<(), Error>>, Result<(), Error>);

impl Told {
    fn tell(self) {
        let _ = self.0.send(self.1);
    }
}

/// One lease on `session`: takes the lock for `job`, holds it until released, and says whether
/// the session may be kept (the lock was busy, or the release asked for it and went well), with
/// the release's outcome to tell.
async fn lease(engine: &dyn Engine, session: &mut dyn EngineSession, job: Job) -> (bool, Option<Told>) {
    let Job { req, events } = job;
    // The engine's future is `Send`, `events` is too: holders go to the asking thread.
    let waiting = events.clone();
    let mut send = move |h: &Holder| drop(waiting.send(Event::Waiting(h.clone())));
    let token = match session.acquire(&req, &mut send).await {
        Ok(t) => t,
        Err(e) => {
            let busy = matches!(e, Error::Busy { .. });
            let _ = events.send(Event::Failed(e));
            // A busy lock: nothing was taken, nor handed out: the session may be kept.
            return (busy, None);
        }
    };
    let socket = match session.socket().map(File::try_clone).transpose() {
        Ok(s) => s,
        Err(e) => {
            let _ = session.release().await;
            let why = format!("cannot duplicate the server connection's socket: {e}");
            let _ = events.send(Event::Failed(Error::Settings(why)));
            return (false, None);
        }
    };
    let lost = Arc::new(Mutex::new(None));
    let (stop, stopped) = oneshot::channel();
    let (released_tx, released) = std_mpsc::channel();
    let granted = Granted { token, socket, lost: lost.clone(), stop, released };
    if events.send(Event::Granted(granted)).is_err() {
        // The asking thread is gone (it panicked): nothing holds the lease.
        let _ = session.release().await;
        return (false, None);
    }
    let (result, reuse) = keep(session, &req.name, engine.heartbeat(), stopped, &lost).await;
    (reuse, Some(Told(released_tx, result)))
}

/// Holds the lock until told to release it, checking in every `every` with a deadline of
/// `every`; a lost connection is recorded in `lost` the moment it is seen. Returns the
/// release's outcome, and whether the session may be kept.
async fn keep(
    session: &mut dyn EngineSession,
    name: &str,
    every: Duration,
    mut stop: oneshot::Receiver<bool>,
    lost: &Mutex<Option<String>>,
) -> (Result<(), Error>, bool) {
    let mut closed = session.closed();
    let record = |why: String| {
        tracing::debug!("remote lock {name} lost: {why}");
        *lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    };
    let reuse = loop {
        tokio::select! {
            r = &mut stop => break r.unwrap_or(false),
            _ = closed.changed() => {
                let why = closed.borrow().clone().unwrap_or_else(|| "the connection ended".into());
                record(why);
                // Wait for the release (which reports the loss) without checking in again.
                let _ = (&mut stop).await;
                return (Ok(()), false);
            }
            _ = tokio::time::sleep(every) => {
                let why = match tokio::time::timeout(every, session.heartbeat()).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => format!("checking in failed: {e}"),
                    Err(_) => format!(
                        "the server did not answer within {}s (network cut off, or the server hangs)",
                        every.as_secs_f64()
                    ),
                };
                record(why);
                let _ = (&mut stop).await;
                return (Ok(()), false);
            }
        }
    };
    let released = session.release().await;
    let keep = reuse && released.is_ok();
    (released, keep)
}

impl Lease {
    /// The fencing token: larger than that of every earlier exclusive holder of this lock on
    /// this server, from any host; shared holders get the current value.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The server, as users see it (`postgres://host:port/db`).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// A duplicate of the server connection's socket, for a command to inherit: the session
    /// (and so the lock) then lasts while any copy is open, even if this process is killed.
    /// `None` for an engine whose sessions a socket alone does not keep alive. Once asked for,
    /// the session ends with the lease (it is not kept for another).
    pub fn socket(&self) -> Option<&File> {
        self.handed_out.store(true, Ordering::Relaxed);
        self.socket.as_ref()
    }

    /// `Err(Error::Lost)` once the connection to the server was seen to break.
    pub fn check(&self) -> Result<(), Error> {
        match &*self.lost.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(why) => Err(Error::Lost { lock: self.name.clone(), server: self.server.clone(), why: why.clone() }),
            None => Ok(()),
        }
    }

    /// Releases the lock; reports if it was lost while held.
    pub fn release(mut self) -> Result<(), Error> {
        self.release_inner()
    }

    fn release_inner(&mut self) -> Result<(), Error> {
        let Some(released) = self.released.take() else { return Ok(()) };
        if self.pid != buildlock_sys::current_pid() {
            // A forked child's copy of the parent's lease: its thread is the parent's, and so is
            // the lock. Only the child's copy of the socket closes.
            std::mem::forget(released);
            std::mem::forget(self.stop.take());
            drop(self.socket.take());
            return Err(Error::Settings(format!(
                "remote lock {} belongs to the parent process (this process was forked from it): only the parent \
                 can release it; take a lease of your own in this process",
                self.name
            )));
        }
        // Our copy of the socket closes first: the session may then be kept for another lease.
        drop(self.socket.take());
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(!*self.handed_out.get_mut());
        }
        let released = released.recv().unwrap_or_else(|_| {
            Err(Error::Lost {
                lock: self.name.clone(),
                server: self.server.clone(),
                why: "the thread that kept the session ended".into(),
            })
        });
        self.check()?;
        released.map_err(|e| match e {
            Error::Lost { lock, server, why } if lock.is_empty() => {
                Error::Lost { lock: self.name.clone(), server, why }
            }
            other => other,
        })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // A forked child drops its copy of the parent's lease silently.
        if self.pid != buildlock_sys::current_pid() {
            std::mem::forget(self.released.take());
            std::mem::forget(self.stop.take());
            return;
        }
        if let Err(e) = self.release_inner() {
            tracing::error!("{e}");
        }
    }
}

/// Holders and waiters of every remote lock (or of `name`) on the server, from every host.
pub fn status(engine: &dyn Engine, name: Option<&str>) -> Result<Vec<LockEntry>, Error> {
    runtime()?.block_on(async { engine.connect().await?.status(name).await })
}
