//! `buildlock`: locks for build tools.
//!
//! ```
//! # let dir = tempfile::tempdir()?;
//! # std::env::set_var("BUILDLOCK_DIR", dir.path());
//! # std::env::set_var("BUILDLOCK_NO_DAEMON", "1");
//! let lease = buildlock::Lock::named("libfastled_build").acquire()?;
//! // ... build, holding the lock; `lease.token()` is its fencing token ...
//! drop(lease); // or lease.release()?, which reports a lock lost meanwhile
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A blocking API (no async runtime is forced on the caller): pick a lock by name or path,
//! shared or exclusive, say what you are doing and how long you will wait, and get a [`Lease`]
//! that releases on drop, tells its fencing token, and tells whether it was lost.
//!
//! Three ways to get there ([`Connect`]):
//! - **Auto** (default): through the per-user daemon `buildlockd`, started on demand; when no
//!   daemon can be had, the on-disk protocol directly, after one warning saying why.
//! - **DaemonOnly**: the daemon or an error.
//! - **Direct** (`--no-daemon`, `BUILDLOCK_NO_DAEMON=1`): the on-disk protocol only.
//!
//! Either way the lock is the same OS lock on the same `.lock` file, so daemon clients, direct
//! clients and Python `fasteners` users all exclude one another.
//!
//! [`Lock`] is the way to take a lock: [`Lock::named`] or [`Lock::path`], then `.shared()`,
//! `.timeout(d)` or `.no_wait()`, `.operation(..)`, `.on_wait(|w| ..)`, `.lock_dir(..)`,
//! `.connect(..)`, `.soft()`, `.stale_after(d)`, and `.acquire()`:
//!
//! ```
//! use std::time::Duration;
//! # let dir = tempfile::tempdir()?;
//! let lease = buildlock::Lock::named("cache")
//!     .lock_dir(dir.path())                        // default: $BUILDLOCK_DIR, else the user's data dir
//!     .connect(buildlock::Connect::Direct)         // default: Auto (the daemon, else the files)
//!     .shared()                                    // default: exclusive
//!     .timeout(Duration::from_secs(30))            // default: forever; or .no_wait()
//!     .operation("read:cache")
//!     .on_wait(|w| eprintln!("{w}"))               // Display names the holder
//!     .acquire()?;
//! lease.check()?;                                  // still ours? (nobody deleted the file)
//! lease.release()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Through the daemon (started on demand), the same with `Connect::DaemonOnly`:
//!
//! ```no_run
//! let lease = buildlock::Lock::named("libfastled_build").connect(buildlock::Connect::DaemonOnly).acquire()?;
//! println!("token {}", lease.token());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! **Remote locks** ([`Options::remote`], set from `--backend`, `BUILDLOCK_BACKEND` or the
//! [`config`] file): the lock lives on a PostgreSQL server, shared by every host that uses it
//! (`buildlock_remote`; a server is an `Arc<dyn buildlock_remote::Engine>` from
//! `buildlock_remote::from_url`, whose scheme chooses the engine). A lock's backend is part of its identity: the remote lock `deploy` is
//! not the local lock `deploy`. In `Auto`/`DaemonOnly` the daemon holds the server session and
//! this process speaks only the local protocol; with `Direct` (or no daemon to be had in
//! `Auto`) the library talks to the server itself. Either way [`Lease::check`] reports a lost
//! session as [`Error::Remote`] (`buildlock_remote::Error::Lost`): through the daemon, when it
//! says so (`LeaseLost`). The daemon attaches a copy of the session's socket to the grant, which
//! the lease keeps (and `run`'s command inherits): the daemon's death is then no loss, and the
//! lease is lost only once that copy shows the session ended, or the server has been silent
//! for half the remote timeout (network cut; nobody checks in any more).
//!
//! **Daemon leases and daemon death.** On Linux the daemon hands the client a duplicate of the
//! locked descriptor, and the client keeps it for as long as it holds the lease: if the daemon
//! dies, the OS lock stays with the client and nobody else can take it. Release closes the
//! client's copy, then asks the daemon to remove the metadata and drop its own copy; if the
//! daemon is gone by then, the client removes its metadata itself.
//!
//! **One connection per process.** All the daemon leases of a process (per runtime directory)
//! ride on one connection, made by the first acquisition and shared by every thread; a forked
//! child makes its own and cannot release its parent's leases. The process's death releases all
//! its leases at once; dropping a lease releases only it, without waiting for the daemon's
//! answer ([`Lease::release_confirmed`] waits).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use buildlock_disk::{lock_dir, Backend, Cancel, LockMode, LockTarget, Wait, DEFAULT_STALE_AFTER};
use buildlock_proto::{AcquireRequest, ErrorCode, Reply, Request, WaitFor};

mod builder;
#[cfg(unix)]
mod client;
pub mod config;
mod held;
pub mod history;
#[cfg(unix)]
mod mux;

pub use builder::Lock;

#[cfg(unix)]
pub use client::{daemon_binary, Client};

/// How to reach the lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connect {
    /// The daemon (started on demand), else the on-disk protocol with a warning.
    Auto,
    /// The daemon, or an error.
    DaemonOnly,
    /// The on-disk protocol only.
    Direct,
}

impl Connect {
    /// `Direct` if `no_daemon` or `BUILDLOCK_NO_DAEMON` is set (to anything but `0`/empty),
    /// else `Auto`.
    pub fn from_env(no_daemon: bool) -> Connect {
        let env = std::env::var("BUILDLOCK_NO_DAEMON").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
        if no_daemon || env {
            Connect::Direct
        } else {
            Connect::Auto
        }
    }
}

/// How to take a lock.
#[derive(Clone, Debug)]
pub struct Options {
    pub mode: LockMode,
    pub wait: Wait,
    /// What the holder is doing, shown to anyone who waits.
    pub operation: String,
    /// The holder's command line, shown to anyone who waits.
    pub command: Option<String>,
    pub connect: Connect,
    /// The daemon's runtime directory [default: `$BUILDLOCK_RUNTIME_DIR`, `$XDG_RUNTIME_DIR/buildlock`, ...].
    pub runtime_dir: Option<PathBuf>,
    /// On-disk protocol settings (direct mode): soft locks, stale threshold.
    pub backend: Backend,
    pub stale_after: Duration,
    /// Bind a daemon lease to this process as well (see [`Lease::bind_pid`]).
    pub bind_pid: Option<u32>,
    /// Direct mode: have a background thread check once a second that the lock file was not
    /// deleted or replaced, and report it at once. Callers that poll [`Lease::check`] themselves
    /// can turn it off; release checks in any case.
    pub watch: bool,
    /// Take the lock on this server instead of the lock directory (`None`: local), from
    /// [`buildlock_remote::from_url`] (a `postgres://` URL: PostgreSQL).
    pub remote: Option<std::sync::Arc<dyn buildlock_remote::Engine>>,
    /// Through the daemon, with the lease bound to a process (`run`'s command): past this long
    /// held, the daemon stops that process's group (SIGTERM, then SIGKILL after `kill_after`),
    /// even if the process that asked is gone; `status` shows it. `run --max-hold` also stops
    /// its command itself.
    pub max_hold: Option<Duration>,
    /// With `max_hold`: the grace between SIGTERM and SIGKILL [default: 10 s].
    pub kill_after: Option<Duration>,
    /// Direct mode, waiting forever: block in the calling thread until the lock is free, with no
    /// `on_wait` reports (a waiting thread of the library's own would report them, then hand
    /// the lock over, which costs a wake-up when the lock comes free). For a caller that keeps
    /// the clock itself in another thread, as the Python package does. Ignored with `cancel`.
    pub wait_here: bool,
    /// Lets another thread end the wait (directly or through the daemon; not a remote lock's
    /// wait without a daemon): [`Cancel::cancel`] makes `acquire` return a cancelled error within
    /// a few milliseconds, and nothing is taken after it. A direct wait with a `cancel` polls
    /// the lock (0.5 to 10 ms apart) instead of blocking in the kernel.
    pub cancel: Option<Cancel>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: LockMode::Exclusive,
            wait: Wait::Forever,
            operation: String::new(),
            command: None,
            connect: Connect::Auto,
            runtime_dir: None,
            backend: Backend::Auto,
            stale_after: DEFAULT_STALE_AFTER,
            bind_pid: None,
            watch: true,
            remote: None,
            max_hold: None,
            kill_after: None,
            wait_here: false,
            cancel: None,
        }
    }
}

impl Options {
    #[cfg(unix)]
    fn runtime_dir(&self) -> PathBuf {
        self.runtime_dir.clone().unwrap_or_else(buildlock_sys::ipc::default_runtime_dir)
    }
}

/// What a waiter is told about once a second.
#[derive(Clone, Debug)]
pub struct WaitInfo {
    /// Who holds the lock, in one line.
    pub holder: String,
    pub holder_pid: Option<u32>,
    /// The holder's command line, when known (for the lock history's "usually" figure).
    pub holder_command: Option<String>,
    /// Place in the daemon's queue (1 = next), when waiting through the daemon.
    pub position: Option<u32>,
    pub waited: Duration,
}

/// What went wrong, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Disk(#[from] buildlock_disk::Error),
    /// The lock is busy (`NoWait`) or the wait ran out; the message names the holder.
    #[error("{message}")]
    Busy { message: String, timed_out: bool },
    #[error("buildlockd: {message}")]
    Daemon { code: ErrorCode, message: String },
    #[error("no daemon: {0}")]
    NoDaemon(String),
    #[error("{0}")]
    Protocol(String),
    #[error("lock {path} was lost while held: {reason}")]
    Lost { path: PathBuf, reason: String },
    /// The daemon went away (killed, stopped) while we waited for it; `acquire` asks the next
    /// one, so this is seen only when that keeps failing.
    #[error("buildlockd went away while we waited for it: {0}")]
    DaemonGone(String),
    /// A remote lock's error (busy, lost, unreachable server, ...), naming the server.
    #[error(transparent)]
    Remote(#[from] buildlock_remote::Error),
    /// Waiting would never end: the message names the cycle of holders and waiters (through the
    /// daemon), or says that this thread holds the lock itself (directly).
    #[error("{0}")]
    Deadlock(String),
    /// The config file cannot be used (it routes locks to their backends).
    #[error(transparent)]
    Config(#[from] config::ConfigError),
}

impl Error {
    /// A busy lock or a wait that ran out: the caller's "conflict" case.
    pub fn is_conflict(&self) -> bool {
        match self {
            Error::Busy { .. } => true,
            Error::Disk(e) => e.is_conflict(),
            Error::Remote(e) => e.is_conflict(),
            _ => false,
        }
    }
}

/// A held lock. Dropping it releases it; [`Lease::release`] does too and reports problems.
#[derive(Debug)]
pub struct Lease {
    target: LockTarget,
    token: u64,
    inner: Option<Inner>,
    /// A direct lease, known to this process's threads (`held.rs`) until it is dropped.
    _held: Option<held::Registered>,
    /// Direct mode: the acquisition, recorded in the lock history once released.
    history: Option<history::Pending>,
}

// One per lease, never in a collection of its own: boxing the larger variant would cost a
// direct lease an allocation for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Inner {
    #[cfg(unix)]
    Daemon {
        /// The process's connection (shared with its other leases), and this lease's id on it.
        mux: std::sync::Arc<mux::Mux>,
        lease: buildlock_proto::LeaseRef,
        path: String,
        /// Our copy of the locked descriptor (Linux); `None` where the daemon alone holds it.
        file: Option<File>,
        id: Option<buildlock_sys::FileId>,
        /// The process the lease is bound to (`bind_pid`, or at acquire), and the runtime
        /// directory: with the token they name the daemon's journal entry for the lease.
        bound: Option<u32>,
        runtime_dir: PathBuf,
        /// A remote lock whose server session the daemon holds: its server
        /// (`postgres://host:port/db`); `path` is then the lock's name.
        remote: Option<String>,
        /// A remote lease whose `file` is a copy of the server session's socket (the daemon
        /// attached it to `Granted`): its remote timeout. The lock then holds while this copy
        /// is healthy, even if the daemon dies.
        session: Option<Duration>,
        /// `file` was given out for another process to inherit ([`Lease::inherit_file`]).
        handed_out: std::sync::atomic::AtomicBool,
        /// This process's forks when the lease was granted ([`buildlock_sys::forks`]): one more
        /// by the release, and a child may hold a copy of `file`.
        forks: Option<u64>,
    },
    Direct(buildlock_disk::Guard),
    Remote(buildlock_remote::Lease),
}

/// Takes the lock `target`. While waiting, `on_wait` is called about once a second.
///
/// If a lease on this lock was lost while its script still ran (`buildlock_disk::lost`), the new
/// holder is warned: that script may still be inside the lock.
pub fn acquire(target: &LockTarget, opts: &Options, on_wait: &mut dyn FnMut(&WaitInfo)) -> Result<Lease, Error> {
    let lease = acquire_any(target, opts, on_wait)?;
    if opts.remote.is_none() {
        buildlock_disk::lost::warn_new_holder(target);
    }
    Ok(lease)
}

fn acquire_any(target: &LockTarget, opts: &Options, on_wait: &mut dyn FnMut(&WaitInfo)) -> Result<Lease, Error> {
    if let Some(settings) = &opts.remote {
        // Through the daemon, which holds the server session, unless `Direct`.
        #[cfg(unix)]
        if opts.connect != Connect::Direct {
            return acquire_through_daemon(target, opts, on_wait);
        }
        return acquire_remote(&**settings, target, opts, on_wait);
    }
    #[cfg(not(unix))]
    {
        // No daemon on this platform yet (a named-pipe daemon is future work).
        if opts.connect == Connect::DaemonOnly {
            return Err(Error::NoDaemon("buildlockd is not available on this platform yet".into()));
        }
        acquire_direct(target, opts, on_wait)
    }
    #[cfg(unix)]
    match opts.connect {
        Connect::Direct => acquire_direct(target, opts, on_wait),
        Connect::DaemonOnly | Connect::Auto => acquire_through_daemon(target, opts, on_wait),
    }
}

/// Through the daemon (started on demand). A daemon that goes away while we wait (killed,
/// stopped, idle exit racing us) is not the end: the next one is asked, within the same
/// deadline. With no daemon to be had, `Auto` uses the lock files directly (one warning).
#[cfg(unix)]
fn acquire_through_daemon(
    target: &LockTarget,
    opts: &Options,
    on_wait: &mut dyn FnMut(&WaitInfo),
) -> Result<Lease, Error> {
    /// How many times a daemon that went away is replaced during one acquisition.
    const MAX_DAEMONS: usize = 20;
    let started = Instant::now();
    let deadline = match effective_wait(opts.wait) {
        Wait::Timeout(t) => started.checked_add(t),
        _ => None,
    };
    for _ in 0..MAX_DAEMONS {
        let mux = match mux::Mux::get(&opts.runtime_dir(), true) {
            Ok(m) => m,
            Err(why) if opts.connect == Connect::Auto => {
                tracing::warn!("no buildlockd ({why}); using the lock files directly");
                let mut left = opts.clone();
                if let Some(d) = deadline {
                    left.wait = Wait::Timeout(d.saturating_duration_since(Instant::now()));
                }
                if let Some(settings) = &opts.remote {
                    return acquire_remote(&**settings, target, &left, on_wait);
                }
                return acquire_direct(target, &left, on_wait);
            }
            Err(why) => return Err(Error::NoDaemon(why)),
        };
        match acquire_daemon(mux, target, opts, started, deadline, on_wait) {
            Err(Error::DaemonGone(why)) if deadline.is_none_or(|d| Instant::now() < d) => {
                tracing::info!("buildlockd went away while we waited ({why}); asking the next one");
            }
            other => return other,
        }
    }
    Err(Error::DaemonGone(format!("{MAX_DAEMONS} daemons in a row went away; see its log in the runtime directory")))
}

/// On the server `settings`, talking to it from this process (`Direct`, or no daemon to be had
/// in `Auto`).
fn acquire_remote(
    settings: &dyn buildlock_remote::Engine,
    target: &LockTarget,
    opts: &Options,
    on_wait: &mut dyn FnMut(&WaitInfo),
) -> Result<Lease, Error> {
    let mode = match opts.mode {
        LockMode::Shared => buildlock_remote::Mode::Shared,
        LockMode::Exclusive => buildlock_remote::Mode::Exclusive,
    };
    let wait = match effective_wait(opts.wait) {
        Wait::NoWait => buildlock_remote::Wait::NoWait,
        Wait::Timeout(t) => buildlock_remote::Wait::Timeout(t),
        Wait::Forever => buildlock_remote::Wait::Forever,
    };
    let mut req = buildlock_remote::Request::new(&target.name, mode, wait, &opts.operation);
    req.command = opts.command.clone().unwrap_or_default();
    let lease = buildlock_remote::acquire(settings, &req, &mut |h, waited| {
        on_wait(&WaitInfo {
            holder: h.describe(),
            // On another host, perhaps: not a pid of this machine.
            holder_pid: None,
            holder_command: Some(h.command.clone()).filter(|c| !c.is_empty()),
            position: None,
            waited,
        })
    })?;
    Ok(Lease {
        target: target.clone(),
        token: lease.token(),
        inner: Some(Inner::Remote(lease)),
        _held: None,
        history: None,
    })
}

fn acquire_direct(target: &LockTarget, opts: &Options, on_wait: &mut dyn FnMut(&WaitInfo)) -> Result<Lease, Error> {
    let disk = buildlock_disk::LockOptions {
        mode: opts.mode,
        backend: opts.backend,
        stale_after: opts.stale_after,
        operation: opts.operation.clone(),
        command: opts.command.clone(),
        watch: opts.watch,
        max_hold: opts.max_hold,
        wait_here: opts.wait_here,
        cancel: opts.cancel.clone(),
    };
    if effective_wait(opts.wait) != Wait::NoWait {
        if let Err(held) = held::check(&target.path, opts.mode) {
            let msg = format!(
                "this thread already holds lock {} ({}), so waiting for it ({}) would never end: the kernel \
                 counts every open of a lock file as another holder, this process's own included. Release it \
                 first, or keep using the lease you have",
                target.path.display(),
                mode_name(held),
                mode_name(opts.mode)
            );
            history::Pending::start(target, opts).deadlock(&msg);
            return Err(Error::Deadlock(msg));
        }
    }
    let mut pending = history::Pending::start(target, opts);
    let result = buildlock_disk::acquire(target, &disk, effective_wait(opts.wait), &mut |holder, waited| {
        let holder_command = holder.meta.as_ref().and_then(|m| m.command.clone()).or_else(|| holder.command.clone());
        on_wait(&WaitInfo {
            holder: holder.to_string(),
            holder_pid: holder.pid(),
            holder_command,
            position: None,
            waited,
        })
    });
    let guard = match result {
        Ok(guard) => guard,
        Err(e) => {
            if e.is_conflict() {
                pending.refused(matches!(e, buildlock_disk::Error::Timeout { .. }));
            }
            return Err(e.into());
        }
    };
    pending.granted();
    Ok(Lease {
        target: target.clone(),
        token: guard.token(),
        inner: Some(Inner::Direct(guard)),
        _held: Some(held::register(&target.path, opts.mode)),
        history: Some(pending),
    })
}

fn mode_name(mode: LockMode) -> &'static str {
    match mode {
        LockMode::Shared => "shared",
        LockMode::Exclusive => "exclusive",
    }
}

/// `wait` with a timeout too long for the clock to represent (`-w 1e19`) turned into `Forever`,
/// which it is in all but name: it could never run out.
fn effective_wait(wait: Wait) -> Wait {
    match wait {
        Wait::Timeout(t) if Instant::now().checked_add(t).is_none() => Wait::Forever,
        w => w,
    }
}

#[cfg(unix)]
/// The absolute path the daemon knows the lock by (the directory is created and canonicalised,
/// so two spellings of one lock meet in one queue). A directory's canonical path is remembered
/// for the life of the process, so that a process taking many leases does this once per
/// directory (the daemon creates a directory that was removed meanwhile).
fn daemon_path(target: &LockTarget) -> Result<PathBuf, Error> {
    if let Some(known) = canonical_known(target) {
        return Ok(known);
    }
    let dir = target.dir();
    buildlock_sys::fs::create_dir_all(dir).map_err(|e| buildlock_disk::Error::Io {
        action: "create the lock directory",
        path: dir.to_owned(),
        source: e,
    })?;
    canonical(target)
        .map_err(|e| buildlock_disk::Error::Io { action: "resolve", path: dir.to_owned(), source: e }.into())
}

/// Canonical lock directories already resolved by this process, by the absolute directory a
/// target names (a relative one means another directory after a `chdir`: never remembered).
static CANONICAL: std::sync::Mutex<Option<std::collections::HashMap<PathBuf, PathBuf>>> = std::sync::Mutex::new(None);

/// `target`'s canonical path if its directory was resolved before by this process.
fn canonical_known(target: &LockTarget) -> Option<PathBuf> {
    canonical_cached(&target.path)
}

/// `path` (a lock file) with its directory resolved, if this process resolved that (absolute)
/// directory before.
fn canonical_cached(path: &Path) -> Option<PathBuf> {
    let (dir, name) = (path.parent()?, path.file_name()?);
    if !dir.is_absolute() {
        return None;
    }
    let cache = CANONICAL.lock().unwrap_or_else(|e| e.into_inner());
    cache.as_ref()?.get(dir).map(|canonical| canonical.join(name))
}

/// `path` (a lock file) with its directory resolved: from what this process remembers when it
/// can (no system call), else resolved now; as given if its directory cannot be resolved.
pub(crate) fn canonical_lock_path(path: &Path) -> PathBuf {
    canonical_cached(path).unwrap_or_else(|| match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => dir.canonicalize().map_or_else(|_| path.to_owned(), |d| d.join(name)),
        _ => path.to_owned(),
    })
}

/// Resolves `target`'s directory (which must exist) and remembers it.
fn canonical(target: &LockTarget) -> std::io::Result<PathBuf> {
    let dir = target.dir().canonicalize()?;
    if target.dir().is_absolute() {
        let mut cache = CANONICAL.lock().unwrap_or_else(|e| e.into_inner());
        cache.get_or_insert_with(std::collections::HashMap::new).insert(target.dir().to_owned(), dir.clone());
    }
    Ok(dir.join(target.path.file_name().unwrap_or_default()))
}

/// The path the daemon knows `target` by, if its directory exists (nothing is created).
pub fn daemon_key(target: &LockTarget) -> Option<PathBuf> {
    canonical_known(target).or_else(|| canonical(target).ok())
}

/// How often a waiter through the daemon reports who holds the lock.
#[cfg(unix)]
const REPORT_EVERY: Duration = Duration::from_secs(1);

#[cfg(unix)]
fn acquire_daemon(
    mux: std::sync::Arc<mux::Mux>,
    target: &LockTarget,
    opts: &Options,
    start: Instant,
    deadline: Option<Instant>,
    on_wait: &mut dyn FnMut(&WaitInfo),
) -> Result<Lease, Error> {
    // A remote lock is named by its name; the daemon holds its server session.
    let path = match &opts.remote {
        Some(_) => target.name.clone(),
        None => daemon_path(target)?.display().to_string(),
    };
    let wait = match (effective_wait(opts.wait), deadline) {
        (Wait::NoWait, _) => WaitFor::NoWait,
        // What is left of the caller's wait (a daemon that went away took some).
        (Wait::Timeout(_), Some(d)) => {
            let left = d.saturating_duration_since(Instant::now());
            u64::try_from(left.as_millis()).map_or(WaitFor::Forever, WaitFor::Millis)
        }
        _ => WaitFor::Forever,
    };
    let gone = |e: Error| match e {
        Error::Protocol(why) => Error::DaemonGone(why),
        other => other,
    };
    let mode = match opts.mode {
        LockMode::Shared => buildlock_proto::Mode::Shared,
        LockMode::Exclusive => buildlock_proto::Mode::Exclusive,
    };
    let lease = mux.next_id();
    let replies = mux.listen(lease);
    mux.send(&Request::Acquire(AcquireRequest {
        lease,
        path: path.clone(),
        mode,
        wait,
        operation: opts.operation.clone(),
        command: opts.command.clone().unwrap_or_default(),
        bind_pid: opts.bind_pid,
        thread: buildlock_sys::current_thread_id(),
        max_hold_ms: opts.max_hold.map(millis),
        kill_after_ms: opts.kill_after.map(millis),
        remote: opts.remote.as_ref().map(|s| s.to_url()),
        remote_timeout_ms: opts.remote.as_ref().map(|s| millis(s.remote_timeout())),
    }))
    .map_err(gone)?;
    let mut holder: Option<buildlock_proto::Holder> = None;
    let mut place = None;
    // A wait that may be cancelled looks at its token between replies.
    let slice = match opts.cancel {
        Some(_) => Duration::from_millis(10),
        None => REPORT_EVERY,
    };
    let mut next_report = start + REPORT_EVERY;
    loop {
        let got = replies.recv(Some(slice)).map_err(gone)?;
        if got.is_none() && opts.cancel.as_ref().is_some_and(Cancel::is_cancelled) {
            // A lease still waiting stops waiting; one granted meanwhile is released. A late
            // grant's descriptor is closed with `replies`.
            drop(replies);
            // A grant's descriptor may still be in flight: no promise about copies.
            let _ = mux.send(&Request::Release { lease, answer: false, copies_closed: false });
            let e = buildlock_disk::Error::Cancelled { name: target.name.clone(), path: target.path.clone() };
            return Err(e.into());
        }
        match got {
            None if Instant::now() < next_report => {}
            None => {
                next_report = Instant::now() + REPORT_EVERY;
                on_wait(&WaitInfo {
                    holder: holder.as_ref().map_or_else(|| "another process".into(), |h| h.description.clone()),
                    holder_pid: holder.as_ref().and_then(|h| h.pid),
                    holder_command: holder.as_ref().and_then(|h| h.command.clone()),
                    position: place,
                    waited: start.elapsed(),
                })
            }
            Some((Reply::Waiting { holder: h, position, .. }, _)) => {
                holder = h.or(holder);
                place = (position > 0).then_some(position);
            }
            Some((Reply::Granted { token, file: checked, .. }, fd)) => {
                // A remote lease: a copy of the server session's socket (the daemon attaches
                // it), else a copy of the connection to the daemon, for a command to inherit
                // (`inherit_file`).
                let session = opts.remote.as_ref().filter(|_| fd.is_some()).map(|s| s.remote_timeout());
                let file = match (fd, &opts.remote) {
                    (None, Some(_)) => mux.connection_copy().ok(),
                    (fd, _) => fd.map(File::from),
                };
                // The daemon says which file it locked (and checked against the path); an
                // `fstat` of our own only if it did not.
                let id = match (&file, checked) {
                    _ if opts.remote.is_some() => None,
                    (Some(_), Some(f)) => Some(buildlock_sys::FileId { dev: f.dev, ino: f.ino }),
                    (f, _) => f.as_ref().and_then(file_id),
                };
                let (bound, runtime_dir) = (opts.bind_pid, opts.runtime_dir());
                drop(replies);
                let remote = opts.remote.as_ref().map(|s| s.display());
                let (handed_out, forks) = (Default::default(), buildlock_sys::forks());
                let inner = Inner::Daemon {
                    mux,
                    lease,
                    path,
                    file,
                    id,
                    bound,
                    runtime_dir,
                    remote,
                    session,
                    handed_out,
                    forks,
                };
                return Ok(Lease { target: target.clone(), token, inner: Some(inner), _held: None, history: None });
            }
            Some((Reply::Error(e), _)) => {
                return Err(match e.code {
                    ErrorCode::WouldBlock | ErrorCode::Timeout => {
                        Error::Busy { message: e.message, timed_out: e.code == ErrorCode::Timeout }
                    }
                    ErrorCode::Deadlock => Error::Deadlock(e.message),
                    code => Error::Daemon { code, message: e.message },
                })
            }
            Some((other, _)) => return Err(Error::Protocol(format!("unexpected reply from buildlockd: {other:?}"))),
        }
    }
}

/// Asks the daemon to release `lease`; with `confirmed`, waits for its answer (a lease already
/// released meanwhile, by `ReleasePid` from a keeper's script's `release`, counts as released).
/// `copies_closed`: no process holds a copy of the grant's descriptor any more (`Release`).
#[cfg(unix)]
fn send_release(
    mux: &std::sync::Arc<mux::Mux>,
    lease: buildlock_proto::LeaseRef,
    confirmed: bool,
    copies_closed: bool,
) -> Result<(), Error> {
    if !confirmed {
        return mux.send(&Request::Release { lease, answer: false, copies_closed });
    }
    let replies = mux.listen(lease);
    mux.send(&Request::Release { lease, answer: true, copies_closed })?;
    loop {
        match replies.recv(None)? {
            Some((Reply::Released { .. }, _)) => return Ok(()),
            Some((Reply::Error(e), _)) if e.code == ErrorCode::NotHeld => return Ok(()),
            Some((Reply::Error(e), _)) => return Err(Error::Daemon { code: e.code, message: e.message }),
            _ => {}
        }
    }
}

/// Milliseconds for the wire, saturating.
#[cfg(unix)]
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(unix)]
fn file_id(f: &File) -> Option<buildlock_sys::FileId> {
    use std::os::unix::fs::MetadataExt;
    f.metadata().ok().map(|m| buildlock_sys::FileId { dev: m.dev(), ino: m.ino() })
}

impl Lease {
    /// The fencing token: larger than that of every earlier holder of this lock.
    pub fn token(&self) -> u64 {
        self.token
    }

    pub fn target(&self) -> &LockTarget {
        &self.target
    }

    /// The server a remote lease lives on (`postgres://host:port/db`), `None` for a local one.
    pub fn remote_server(&self) -> Option<&str> {
        match &self.inner {
            Some(Inner::Remote(r)) => Some(r.server()),
            #[cfg(unix)]
            Some(Inner::Daemon { remote: Some(server), .. }) => Some(server),
            _ => None,
        }
    }

    /// What a command should inherit so the lock lives while it does: the locked file
    /// ([`Lease::os_file`]), or a remote lease's server connection (the session, and so the
    /// lock, then lasts while any process holds a copy, even if this one is killed).
    ///
    /// For a remote lease the daemon holds, the copy of the server session's socket that the
    /// daemon attached to the grant: the lock then outlives this process and the daemon for as
    /// long as a command holding it runs. From a daemon that attaches none, a copy of this
    /// process's connection to the daemon:
    /// the daemon ends the connection's leases only once every copy is closed, so a command
    /// started with it keeps the lock if this process is killed before it could bind the lease
    /// to the command ([`Lease::bind_pid`]). Every lease of this process on that connection
    /// then lasts as long: pass it from a process that holds one lease, as `run` does.
    pub fn inherit_file(&self) -> Option<&File> {
        match &self.inner {
            Some(Inner::Remote(r)) => r.socket(),
            #[cfg(unix)]
            Some(Inner::Daemon { file, remote: Some(_), handed_out, .. }) => {
                // Another process may now hold the session: it is never reused after release.
                handed_out.store(true, std::sync::atomic::Ordering::Relaxed);
                file.as_ref()
            }
            _ => self.os_file(),
        }
    }

    /// A remote lease held through a daemon that is gone: arms the kernel's guard on this
    /// process's copy of the server session for process `pid`'s group (the command it was bound
    /// to), so that the kernel kills that group the moment the session fails or the server ends
    /// it, even if this process dies too. A living daemon arms it itself once this process is
    /// gone ([`buildlock_sys::ipc::arm_kill_switch`]). `Ok(false)`: nothing was armed (another
    /// kind of lease, a daemon still there, or a platform without the guard: Linux only).
    /// `run` calls it for its command, unless `--on-lost=warn`.
    ///
    /// Nobody sends on the session any more, so only keepalives can fail it: its
    /// `TCP_USER_TIMEOUT` becomes [`buildlock_remote::Bounds::unwatched_user_timeout`].
    pub fn guard_if_unwatched(&self, pid: u32) -> Result<bool, Error> {
        match &self.inner {
            #[cfg(unix)]
            Some(Inner::Daemon { remote: Some(_), mux, file: Some(sock), session: Some(remote_timeout), .. })
                if mux.daemon_gone() =>
            {
                use std::os::fd::AsFd;
                let ut = buildlock_remote::Bounds { remote_timeout: *remote_timeout }.unwatched_user_timeout();
                buildlock_sys::ipc::arm_kill_switch_unwatched(sock.as_fd(), pid, ut).map_err(|e| {
                    Error::Protocol(format!("cannot arm the kernel's guard on the server session's socket: {e}"))
                })
            }
            _ => Ok(false),
        }
    }

    /// A copy of the connection to the daemon this remote lease is held through, to wait on:
    /// it hangs up when the daemon is gone (then see [`Lease::guard_if_unwatched`]).
    pub fn daemon_connection(&self) -> Option<File> {
        match &self.inner {
            #[cfg(unix)]
            Some(Inner::Daemon { remote: Some(_), mux, .. }) => mux.connection_copy().ok(),
            _ => None,
        }
    }

    /// Whether the lease came from the daemon (else from the on-disk protocol, or from a remote
    /// server, directly).
    pub fn via_daemon(&self) -> bool {
        #[cfg(unix)]
        return matches!(self.inner, Some(Inner::Daemon { .. }));
        #[cfg(not(unix))]
        false
    }

    /// Hands the lock to process `pid`, which was given [`Lease::os_file`] (`run` binds the
    /// command it starts): the metadata names `pid` as the holder from now on, and through the
    /// daemon the lease also lasts until `pid` has exited, even if this process dies first.
    /// In direct mode, what keeps the lock after this process dies is the descriptor `pid`
    /// inherited.
    ///
    /// Through the daemon the request costs no round trip: its answer is read with the next one
    /// (at release). The daemon handles a connection's requests in order, so the binding is in
    /// force before anything this process does next, its death included.
    pub fn bind_pid(&mut self, pid: u32) -> Result<(), Error> {
        self.bind(pid, false)
    }

    /// [`Lease::bind_pid`] for a caller that stops `pid` when the lease is lost (`run
    /// --on-lost=stop`). For a remote lease held through the daemon, the daemon then arms the
    /// kernel's guard for `pid`'s group on the server session at once
    /// ([`buildlock_sys::ipc::arm_kill_switch`]): should the server end the session, the group
    /// is killed that moment, and should this process and the daemon be killed together (where
    /// neither lives to arm it for the other), it stays armed (the socket's `TCP_USER_TIMEOUT`
    /// is then [`buildlock_remote::Bounds::unwatched_user_timeout`], so that a cut network is
    /// still met by this process's own stop first, while it lives).
    pub fn bind_pid_stopping_on_loss(&mut self, pid: u32) -> Result<(), Error> {
        self.bind(pid, true)
    }

    fn bind(&mut self, pid: u32, stop_on_loss: bool) -> Result<(), Error> {
        match &mut self.inner {
            #[cfg(unix)]
            Some(Inner::Daemon { mux, lease, bound, .. }) => {
                forked_check(mux)?;
                mux.send(&Request::Bind { lease: *lease, pid, stop_on_loss })?;
                *bound = Some(pid);
                Ok(())
            }
            Some(Inner::Direct(guard)) => guard.hand_over_to(pid, None).map_err(Error::from),
            Some(Inner::Remote(_)) | None => Ok(()),
        }
    }

    /// [`Lease::bind_pid`], and waits for the daemon to confirm it: once this returns, the lease
    /// outlives this process for as long as `pid` runs (what a keeper needs before it tells its
    /// script the lock is held).
    pub fn bind_pid_confirmed(&mut self, pid: u32) -> Result<(), Error> {
        match &mut self.inner {
            #[cfg(unix)]
            Some(Inner::Daemon { mux, lease, bound, .. }) => {
                forked_check(mux)?;
                let replies = mux.listen(*lease);
                mux.send(&Request::Bind { lease: *lease, pid, stop_on_loss: false })?;
                *bound = Some(pid);
                loop {
                    match replies.recv(None)? {
                        Some((Reply::Bound { .. }, _)) => return Ok(()),
                        Some((Reply::Error(e), _)) => return Err(Error::Daemon { code: e.code, message: e.message }),
                        _ => {}
                    }
                }
            }
            _ => self.bind_pid(pid),
        }
    }

    /// The open lock file carrying the OS lock, for a command to inherit (see
    /// `buildlock_sys::pass_to_child`): on Linux the lock then lasts while any process holds a
    /// copy, even if this one is killed, and [`Lease::release`] still ends it for all copies.
    /// `None` for soft locks, and where the daemon cannot hand out the descriptor.
    pub fn os_file(&self) -> Option<&File> {
        match &self.inner {
            #[cfg(unix)]
            Some(Inner::Daemon { file, remote: None, .. }) => file.as_ref(),
            #[cfg(unix)]
            Some(Inner::Daemon { remote: Some(_), .. }) => None,
            Some(Inner::Direct(guard)) => guard.os_file(),
            Some(Inner::Remote(_)) | None => None,
        }
    }

    /// For a remote lease held through the daemon: why its server session has ended, if this
    /// process's copy of the session's socket shows it has within `wait` (the server closed or
    /// reset it, or the kernel gave up on it), as an [`Error::Remote`] `Lost`; without asking the
    /// daemon, and without consuming anything queued. `None` for other leases, and while the
    /// session lives. `run` asks it when its command was killed by SIGKILL, which the kernel's
    /// guard ([`Lease::bind_pid_stopping_on_loss`]) sends on the first event on the socket: the
    /// server's last words, its close following at once.
    pub fn session_ended(&self, wait: std::time::Duration) -> Option<Error> {
        match &self.inner {
            #[cfg(unix)]
            Some(Inner::Daemon { remote: Some(server), path, file: Some(sock), .. }) => {
                use std::os::fd::AsFd;
                let why = buildlock_sys::ipc::wait_connection_ended(sock.as_fd(), wait)?;
                Some(Error::Remote(buildlock_remote::Error::Lost { lock: path.clone(), server: server.clone(), why }))
            }
            _ => None,
        }
    }

    /// Checks that the lock is still held: the lock file is still the one locked (another tool
    /// may have deleted it), and, where the daemon alone holds the lock (platforms that cannot
    /// hand over the descriptor), that the daemon is still there to hold it.
    pub fn check(&self) -> Result<(), Error> {
        match &self.inner {
            // The daemon holds the server session: it says when it was lost, and its own death
            // (the connection broken) ends the session, so the lock, too.
            #[cfg(unix)]
            Some(Inner::Daemon { remote: Some(server), mux, lease, path, file, session, .. }) => {
                match remote_lost(mux, *lease, file.as_ref().zip(*session)) {
                    Some(why) => Err(Error::Remote(buildlock_remote::Error::Lost {
                        lock: path.clone(),
                        server: server.clone(),
                        why,
                    })),
                    None => Ok(()),
                }
            }
            #[cfg(unix)]
            Some(Inner::Daemon { file: None, mux, path, .. }) if mux.daemon_gone() => Err(Error::Lost {
                path: PathBuf::from(path),
                reason: "buildlockd, which alone held the lock on this platform, has exited; another process may \
                         hold it now"
                    .into(),
            }),
            Some(Inner::Direct(g)) => g.check().map_err(Error::from),
            Some(Inner::Remote(r)) => r.check().map_err(Error::from),
            #[cfg(unix)]
            Some(Inner::Daemon { id: Some(id), path, .. }) => match buildlock_sys::path_id(Path::new(path)) {
                Ok(now) if now == *id => Ok(()),
                _ => Err(Error::Lost {
                    path: PathBuf::from(path),
                    reason: "another process deleted or replaced the lock file, so another holder may have run at \
                             the same time; find the tool that removes lock files it does not hold"
                        .into(),
                }),
            },
            _ => Ok(()),
        }
    }

    /// Releases the lock; reports if it was lost while held (the lock file deleted or replaced,
    /// which the client sees itself).
    ///
    /// Through the daemon, the request is sent without waiting for its answer (an error in it
    /// is logged): the daemon handles a connection's requests in order, so the lease is released
    /// before anything this process asks next, but another process asking at once may still
    /// find it held for a moment. [`Lease::release_confirmed`] waits.
    ///
    /// In a process forked from the one that took the lease, this does nothing and says so:
    /// the lease belongs to the parent.
    pub fn release(mut self) -> Result<(), Error> {
        self.release_inner(false)
    }

    /// [`Lease::release`], and waits for the daemon to say the lock is free: once this returns,
    /// any process can take it (what a command-line tool needs before it exits).
    pub fn release_confirmed(mut self) -> Result<(), Error> {
        self.release_inner(true)
    }

    fn release_inner(&mut self, confirmed: bool) -> Result<(), Error> {
        let Some(inner) = self.inner.take() else { return Ok(()) };
        match inner {
            Inner::Direct(guard) => {
                let ended = history::Pending::ending();
                let result = guard.release().map_err(Error::from);
                // Only now, with the lock released: the history write never delays it.
                if let Some(pending) = self.history.take() {
                    pending.released(ended, result.as_ref().err().map(|e| e.to_string()));
                }
                result
            }
            Inner::Remote(r) => r.release().map_err(Error::from),
            #[cfg(unix)]
            Inner::Daemon {
                mux, lease, path, remote: Some(server), file, session, bound, handed_out, forks, ..
            } => {
                forked_check(&mux)?;
                let socket = file.as_ref().zip(session);
                let lost = remote_lost(&mux, lease, socket);
                let copy = socket.is_some();
                // No other process can hold a copy of the session's socket: the daemon may keep
                // the session for our next remote lease.
                let alone = lost.is_none()
                    && bound.is_none()
                    && !handed_out.into_inner()
                    && forks.is_some()
                    && forks == buildlock_sys::forks();
                // Our copy of the session closes first (the daemon's holds the lock); through a
                // live daemon the lock is then unlocked on the server for every copy.
                drop(file);
                let released = send_release(&mux, lease, confirmed && lost.is_none(), alone);
                mux.forget(lease);
                if let Some(why) = lost {
                    return Err(Error::Remote(buildlock_remote::Error::Lost { lock: path, server, why }));
                }
                match released {
                    // The daemon is gone, but the session was still healthy in our copy, which
                    // now closes: the server frees the lock once no other copy is left.
                    Err(Error::Protocol(_)) if copy => Ok(()),
                    // The daemon is gone, and the session with it: the server has freed the lock.
                    Err(Error::Protocol(why)) => Err(Error::Remote(buildlock_remote::Error::Lost {
                        lock: path,
                        server,
                        why: format!("buildlockd, which held the server session, went away ({why})"),
                    })),
                    other => other,
                }
            }
            #[cfg(unix)]
            Inner::Daemon { mux, lease, path, file, id, bound, runtime_dir, remote: None, .. } => {
                if let Err(e) = forked_check(&mux) {
                    // Our copy of the descriptor closes (the parent's and the daemon's keep the
                    // lock); nothing goes on the wire.
                    drop(file);
                    return Err(e);
                }
                let lost = match id {
                    Some(id) => !buildlock_sys::path_id(Path::new(&path)).is_ok_and(|now| now == id),
                    None => false,
                };
                // A daemon that is gone journaled the binding, if any: the entry goes before our
                // copy closes (and frees the lock), so that no daemon started later takes the lock
                // back for the bound process, or records it lost, once another process has it
                // (`Daemon::recover` looks for the entry again after trying the lock).
                let forget_binding = || {
                    if let Some(pid) = bound {
                        let entry =
                            buildlock_proto::transport::journal_entry(&runtime_dir, Path::new(&path), self.token, pid);
                        let _ = std::fs::remove_file(entry);
                    }
                };
                let gone_already = mux.daemon_gone();
                if gone_already {
                    forget_binding();
                }
                // Close our copy first, never unlocking it: the daemon's copy shares the lock
                // until the daemon has removed our metadata.
                drop(file);
                stall_after_closing_for_tests();
                let released = send_release(&mux, lease, confirmed, false);
                match released {
                    Err(Error::Daemon { code, message }) => {
                        tracing::warn!("buildlockd did not release lock {path}: {message} ({code})")
                    }
                    Err(e) => {
                        // The daemon is gone: with it went its copy, so the lock is free; remove
                        // the metadata naming us, if it still does.
                        tracing::debug!("releasing without the daemon: {e}");
                        remove_own_metadata(&self.target, self.token);
                        // And tell the next daemon not to take the lock back for the bound process.
                        if !gone_already {
                            forget_binding();
                        }
                    }
                    Ok(()) => {}
                }
                if lost {
                    return Err(Error::Lost {
                        path: PathBuf::from(path),
                        reason: "another process deleted or replaced the lock file while it was held".into(),
                    });
                }
                Ok(())
            }
        }
    }
}

/// Test builds only: with `BUILDLOCK_TEST_STALL_AFTER_CLOSING=DIR`, the first lease released
/// through a daemon, once its copy of the descriptor is closed, creates `DIR/closed` and waits
/// for the FIFO `DIR/go` (`buildlock_sys::pause_once_for_tests`): the window in which a daemon
/// started by another process recovers its journal.
fn stall_after_closing_for_tests() {
    buildlock_sys::pause_once_for_tests("BUILDLOCK_TEST_STALL_AFTER_CLOSING", "closed");
}

/// Why remote lease `lease` (held through the daemon) is lost, if it is: the daemon said so
/// (`LeaseLost`), or its connection is gone. With `socket`, this process's copy of the server
/// session, the daemon's death is no loss: the session lives in the copy, and is lost only if the
/// copy shows it ended (the server closed it, or the kernel gave up on it: keepalives and
/// `TCP_USER_TIMEOUT` unanswered), or that the server has not been heard from (not even
/// answering a keepalive probe, sent after a quarter of the remote timeout `T` of silence) for
/// `T/2`: the network is cut, and the server frees the lock `T` after it last heard from us.
#[cfg(unix)]
fn remote_lost(mux: &mux::Mux, lease: buildlock_proto::LeaseRef, socket: Option<(&File, Duration)>) -> Option<String> {
    use std::os::fd::AsFd;
    let why = mux.poll_lost(lease)?;
    let Some((sock, remote_timeout)) = socket.filter(|_| !mux.told_lost(lease)) else { return Some(why) };
    let ended = buildlock_sys::ipc::connection_ended(sock.as_fd()).or_else(|| {
        let heard = buildlock_sys::ipc::last_heard(sock.as_fd())?;
        (heard > remote_timeout / 2).then(|| {
            format!(
                "the server has not been heard from for {:.1}s, not even answering keepalives (network cut off, or \
                 its host is down)",
                heard.as_secs_f64()
            )
        })
    })?;
    Some(format!("{ended}; buildlockd, which checked in for it, is gone too ({why})"))
}

/// A daemon lease seen from a process forked from the one that took it: it is the parent's,
/// and nothing this process does may release it.
#[cfg(unix)]
fn forked_check(mux: &mux::Mux) -> Result<(), Error> {
    if mux.is_mine() {
        return Ok(());
    }
    Err(Error::Protocol(
        "this lease belongs to the parent process (this process was forked from it): only the parent can \
         release or bind it, so nothing was sent to buildlockd; take a lease of your own in this process"
            .into(),
    ))
}

impl Drop for Lease {
    fn drop(&mut self) {
        // A forked child drops its copy of the parent's lease silently.
        #[cfg(unix)]
        if let Some(Inner::Daemon { mux, .. }) = &self.inner {
            if !mux.is_mine() {
                self.inner = None;
                return;
            }
        }
        if let Err(e) = self.release_inner(false) {
            tracing::error!("{e}");
        }
    }
}

/// Removes `.lock.pid` if it names this process, or the process it handed the lock to, with our
/// token (daemon gone before release).
#[cfg(unix)]
fn remove_own_metadata(target: &LockTarget, token: u64) {
    if let buildlock_disk::MetaRead::Valid(m) = buildlock_disk::meta::read(&target.meta_path) {
        let me = std::process::id();
        if (m.pid == me || m.via_pid == Some(me)) && m.token == Some(token) {
            let _ = std::fs::remove_file(&target.meta_path);
        }
    }
}

/// Asks the daemon of `runtime_dir` (never starting one) a single question.
#[cfg(unix)]
pub fn ask_daemon(runtime_dir: Option<&Path>, req: &Request) -> Result<Reply, Error> {
    let rt = runtime_dir.map(Path::to_owned).unwrap_or_else(buildlock_sys::ipc::default_runtime_dir);
    let mut client = client::connect_or_start(&rt, false).map_err(Error::NoDaemon)?;
    client.send(req)?;
    loop {
        match client.recv(None)? {
            Some((Reply::Waiting { .. }, _)) | None => {}
            Some((reply, _)) => return Ok(reply),
        }
    }
}

/// Starts the daemon of `runtime_dir` if none runs; returns its pid.
#[cfg(unix)]
pub fn start_daemon(runtime_dir: Option<&Path>) -> Result<u32, Error> {
    let rt = runtime_dir.map(Path::to_owned).unwrap_or_else(buildlock_sys::ipc::default_runtime_dir);
    let client = client::connect_or_start(&rt, true).map_err(Error::NoDaemon)?;
    Ok(client.daemon_pid())
}

/// No daemon on this platform yet.
#[cfg(not(unix))]
pub fn ask_daemon(_runtime_dir: Option<&Path>, _req: &Request) -> Result<Reply, Error> {
    Err(Error::NoDaemon("buildlockd is not available on this platform yet".into()))
}

/// No daemon on this platform yet.
#[cfg(not(unix))]
pub fn start_daemon(_runtime_dir: Option<&Path>) -> Result<u32, Error> {
    Err(Error::NoDaemon("buildlockd is not available on this platform yet".into()))
}
