//! buildlock's on-disk lock protocol: `.lock` files, `.lock.pid` metadata, stale-lock recovery.
//!
//! This is the protocol every buildlock process speaks on disk, and the one it shares with tools
//! that know nothing of buildlock: Python `fasteners` (an OS lock on `X.lock`) and the original
//! build tool (`X.lock.pid` JSON naming the holder). The daemon and the client library's fallback
//! both stand on it.
//!
//! - [`LockTarget`] turns a name (`libfastled_build`) or path (`.build/x.lock`) into the lock file
//!   and its metadata file; [`lock_dir`] finds the default directory.
//! - [`acquire`] takes a lock ([`LockOptions`]: mode, backend, operation; [`Wait`]: how long) and
//!   returns a [`Guard`] that releases it on drop.
//! - Two backends. **OS locks** (the default): an OS lock on the file (see `buildlock-sys`); the
//!   kernel is the truth, so a free lock is taken at once whatever files remain, and a held lock
//!   is never broken. **Soft locks** (`Backend::Soft`, or automatically where the file system
//!   refuses OS locks): the lock is the file's existence, created atomically with its metadata;
//!   stale ones are judged by [`stale::judge`] and broken race-safely.
//! - [`status`] and [`list`] say who holds what; [`break_lock`] removes a stale lock and refuses
//!   a live one.
//!
//! ```no_run
//! use buildlock_disk::{acquire, lock_dir, LockOptions, LockTarget, Wait};
//! let target = LockTarget::resolve("libfastled_build", &lock_dir(None)?)?;
//! let guard = acquire(&target, &LockOptions::default(), Wait::Forever, &mut |holder, waited| {
//!     eprintln!("waiting {waited:?} for {}: held by {holder}", target.name);
//! })?;
//! // ... build ...
//! guard.release()?;
//! # Ok::<(), buildlock_disk::Error>(())
//! ```
//!
//! **Invariant:** no code path deletes or rewrites a `.lock` file that a live process may hold an
//! OS lock on; the OS-lock backend never writes into or deletes `.lock` files at all.
//!
//! **Invariant:** a file is deleted or replaced only when it is empty or holds metadata this tool
//! recognises (ours or the seed tool's JSON); anything else is [`Error::NotALock`], left alone
//! however old. Files beside a lock are opened without following links or blocking on FIFOs
//! (`buildlock_sys::fs`), and written only by creating a new file and renaming it into place, or
//! in place after checking the file is a regular one with a single link.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use buildlock_sys::LockMode;
use jiff::Timestamp;

pub mod fence;
mod guard;
pub mod lost;
pub mod meta;
mod os;
pub mod recovery;
mod retry;
mod soft;
pub mod stale;
mod target;

pub use guard::Guard;
pub use meta::{MetaRead, Metadata};
pub use os::{OsHold, OsLocked};
pub use stale::{Verdict, DEFAULT_STALE_AFTER};
pub use target::{lock_dir, LockTarget, MAX_NAME_BYTES};

/// Which kind of lock to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// An OS lock; soft locks only where the file system cannot do OS locks.
    Auto,
    /// Soft locks always (existence of the file is the lock).
    Soft,
}

/// How to take a lock.
#[derive(Clone, Debug)]
pub struct LockOptions {
    pub mode: LockMode,
    pub backend: Backend,
    /// How long a lock nobody can vouch for stays active (soft locks; default 120 s).
    pub stale_after: Duration,
    /// What the holder is doing, written into metadata (`operation`).
    pub operation: String,
    /// The holder's command line, written into metadata; defaults to this process's.
    pub command: Option<String>,
    /// Watch the lock file while holding it and report at once if it is deleted or replaced.
    /// (Soft locks always do, to refresh their heartbeat; release checks in any case.)
    pub watch: bool,
    /// The holder's max-hold, written into metadata so that `status` and waiters show it.
    pub max_hold: Option<Duration>,
    /// With [`Wait::Forever`]: wait in the calling thread, blocked in the kernel, with no
    /// `on_wait` reports, instead of in a helper thread that hands the lock over (one wake-up
    /// fewer when the lock comes free). OS locks only; soft locks are polled as always.
    /// Ignored with a [`LockOptions::cancel`].
    pub wait_here: bool,
    /// Lets another thread end the wait early ([`Cancel::cancel`]): `acquire` then returns
    /// [`Error::Cancelled`] within a few milliseconds, and takes nothing afterwards.
    pub cancel: Option<Cancel>,
}

/// Ends a wait from another thread (see [`LockOptions::cancel`]): a caller interrupted while
/// waiting (Ctrl+C, a cancelled task) gives up its place without ever taking the lock after it.
#[derive(Clone, Debug, Default)]
pub struct Cancel(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Cancel {
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Ends the waits that use this token, now and later.
    pub fn cancel(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions {
            mode: LockMode::Exclusive,
            backend: Backend::Auto,
            stale_after: DEFAULT_STALE_AFTER,
            operation: String::new(),
            command: None,
            watch: false,
            max_hold: None,
            wait_here: false,
            cancel: None,
        }
    }
}

/// How long [`acquire`] may wait for a held lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Fail at once with [`Error::WouldBlock`].
    NoWait,
    /// Fail with [`Error::Timeout`] after this long.
    Timeout(Duration),
    Forever,
}

/// Everything known about who holds a lock, for messages and `status`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Holder {
    /// The mode the lock is held in, when the OS says.
    pub mode: Option<LockMode>,
    /// The holder's metadata, when it wrote any that is readable.
    pub meta: Option<Metadata>,
    /// The holder's pid as the OS reports it (process-bound POSIX locks only, e.g. `fasteners`).
    pub os_pid: Option<u32>,
    /// The holder's command line: live from the OS when it is on this host, else from metadata.
    pub command: Option<String>,
    /// Anything else worth saying (metadata that contradicts the OS, a stale verdict).
    pub note: Option<String>,
    /// The process that took the lock for the holder `meta` names and is gone since: the
    /// `buildlock-client run` whose command holds the lock after `run` was killed.
    pub orphaned_by: Option<u32>,
    /// When no live holder is named otherwise: the processes found holding a descriptor of the
    /// locked file (Linux), such as the children of a killed `run`'s command. `command` is the
    /// first one's.
    pub inheritors: Vec<u32>,
}

impl Holder {
    /// The holder's pid, from metadata, the OS, or the processes found holding the lock.
    pub fn pid(&self) -> Option<u32> {
        self.meta.as_ref().map(|m| m.pid).or(self.os_pid).or(self.inheritors.first().copied())
    }

    /// When the lock was taken, if known.
    pub fn since(&self) -> Option<Timestamp> {
        self.meta.as_ref().and_then(|m| m.timestamp)
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.meta, self.os_pid) {
            (Some(m), _) => {
                if let Some(run) = self.orphaned_by {
                    write!(f, "the command of a killed `run` (pid {run}): ")?;
                }
                write!(f, "pid {}", m.pid)?;
                if let Some(cmd) = &self.command {
                    write!(f, " ({})", shorten(cmd, 80))?;
                }
                if !m.hostname.is_empty() {
                    write!(f, " on {}", m.hostname)?;
                }
                if let Some(mode) = self.mode.or(m.mode) {
                    write!(f, ", {}", mode.as_str())?;
                }
                if let Some(ts) = m.timestamp {
                    write!(f, ", since {}", describe_time(ts))?;
                }
                if !m.operation.is_empty() {
                    write!(f, ", operation '{}'", shorten(&m.operation, 80))?;
                }
                if let Some(ms) = m.max_hold_ms {
                    write!(f, ", max-hold {}", stale::secs(Duration::from_millis(ms)))?;
                }
            }
            (None, Some(pid)) => {
                write!(f, "pid {pid}")?;
                if let Some(cmd) = &self.command {
                    write!(f, " ({})", shorten(cmd, 80))?;
                }
                write!(f, ", which wrote no metadata")?;
                if let Some(mode) = self.mode {
                    write!(f, ", {}", mode.as_str())?;
                }
            }
            (None, None) if !self.inheritors.is_empty() => {
                write!(f, "pid {}", self.inheritors[0])?;
                if let Some(cmd) = &self.command {
                    write!(f, " ({})", shorten(cmd, 80))?;
                }
                if self.inheritors.len() > 1 {
                    write!(f, " and {} more", self.inheritors.len() - 1)?;
                }
                write!(f, ", which holds an inherited descriptor of the lock")?;
                if let Some(mode) = self.mode {
                    write!(f, " ({})", mode.as_str())?;
                }
            }
            (None, None) => {
                write!(f, "a process that wrote no metadata")?;
                if let Some(mode) = self.mode {
                    write!(f, " ({})", mode.as_str())?;
                }
            }
        }
        if let Some(note) = &self.note {
            write!(f, "; {note}")?;
        }
        Ok(())
    }
}

pub(crate) fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        format!("{}...", s.chars().take(max).collect::<String>())
    }
}

/// "2026-02-14 06:50:11 (3m12s ago)" in local time.
pub fn describe_time(ts: Timestamp) -> String {
    let local = ts.to_zoned_datetime(meta::local_tz()).datetime().strftime("%Y-%m-%d %H:%M:%S").to_string();
    match Timestamp::now().duration_since(ts).unsigned_abs() {
        age if Timestamp::now() >= ts => format!("{local} ({} ago)", stale::secs(age)),
        _ => format!("{local} (in the future: check the clocks)"),
    }
}

/// What went wrong, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid lock name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("no lock directory: no home directory was found; pass --dir DIR or set BUILDLOCK_DIR")]
    NoLockDir,
    #[error("cannot {action} {}: {source}{}", path.display(), io_hint(source))]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("lock {name} ({}) is held by {holder}", path.display())]
    WouldBlock { name: String, path: PathBuf, holder: Box<Holder> },
    #[error("timed out after {} waiting for lock {name} ({}), held by {holder}", stale::secs(*waited), path.display())]
    Timeout { name: String, path: PathBuf, waited: Duration, holder: Box<Holder> },
    #[error("refusing to break lock {name} ({}): {reason}", path.display())]
    Refused { name: String, path: PathBuf, reason: String, holder: Option<Box<Holder>> },
    #[error("lock {name} ({}) was lost while held: {reason}", path.display())]
    Lost { name: String, path: PathBuf, reason: String },
    /// A file where a lock file, its metadata or its break marker should be, which is none of
    /// them. It is never deleted or written, however old.
    #[error(
        "{} is not {what} ({reason}); buildlock leaves it alone: if it is left over from a lock, remove it \
         yourself, else choose another lock name",
        path.display()
    )]
    NotALock { path: PathBuf, what: &'static str, reason: String },
    /// The wait was ended through [`LockOptions::cancel`]; nothing was taken.
    #[error("the wait for lock {name} ({}) was cancelled", path.display())]
    Cancelled { name: String, path: PathBuf },
}

fn io_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::PermissionDenied => {
            " (check the permissions of the lock directory, or choose another with --dir or BUILDLOCK_DIR)"
        }
        io::ErrorKind::IsADirectory => " (a lock must be a file: name a file inside the directory instead)",
        io::ErrorKind::NotADirectory => " (a component of the path is a file, not a directory)",
        io::ErrorKind::ReadOnlyFilesystem => " (the file system is read-only: choose a writable lock directory)",
        _ => "",
    }
}

impl Error {
    pub(crate) fn io(action: &'static str, path: &Path, source: io::Error) -> Error {
        Error::Io { action, path: path.to_owned(), source }
    }

    pub(crate) fn not_lock_metadata(path: &Path, reason: impl Into<String>) -> Error {
        Error::NotALock { path: path.to_owned(), what: "lock metadata", reason: reason.into() }
    }

    /// Whether the lock was simply busy (`-n`) or the wait timed out: the caller's "conflict" exit.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::WouldBlock { .. } | Error::Timeout { .. })
    }
}

/// Logs a warning about `path` the first time this process has one to give: a lock served again
/// and again (the daemon) repeats nothing.
pub(crate) fn warn_once(path: &Path, message: impl FnOnce() -> String) {
    static WARNED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned.iter().any(|p| p == path) {
        return;
    }
    if warned.len() >= 1024 {
        warned.clear();
    }
    warned.push(path.to_owned());
    tracing::warn!("{}", message());
}

/// Takes the lock `target`, waiting as `wait` says. While waiting, `on_wait` is called about once
/// a second with the current holder and the time waited so far.
pub fn acquire(
    target: &LockTarget,
    opts: &LockOptions,
    wait: Wait,
    on_wait: &mut dyn FnMut(&Holder, Duration),
) -> Result<Guard, Error> {
    if opts.backend == Backend::Soft {
        buildlock_sys::fs::create_dir_all(target.dir())
            .map_err(|e| Error::io("create the lock directory", target.dir(), e))?;
        return soft::acquire(target, opts, wait, on_wait);
    }
    // The OS-lock backend creates the directory only when opening the lock file finds it
    // missing: no failing `mkdir` on every acquisition.
    match os::acquire(target, opts, wait, on_wait)? {
        os::Outcome::Locked(guard) => Ok(guard),
        os::Outcome::Unsupported(e) => {
            tracing::warn!(
                "the file system at {} does not support OS locks ({e}); using a soft lock instead",
                target.dir().display()
            );
            soft::acquire(target, opts, wait, on_wait)
        }
    }
}

/// Takes the OS lock on `target` without waiting, on behalf of the process that `meta` names
/// (the daemon's grants): writes `meta` (with a fencing token) as the lock's metadata.
/// `Ok(None)` when somebody else holds it.
pub fn try_lock_for(target: &LockTarget, mode: LockMode, meta: Metadata) -> Result<Option<OsHold>, Error> {
    // The lock file's opening creates the directory when it is missing (no `mkdir` per grant).
    os::try_lock_for(target, mode, meta)
}

/// Blocks (in the kernel, woken the moment the lock is free) until the OS lock on `target` is
/// taken in `mode`, with no metadata written yet: the daemon decides whose it is only once it
/// has it ([`OsLocked::claim_for`]). Dropping the result unlocks at once.
pub fn wait_lock(target: &LockTarget, mode: LockMode) -> Result<OsLocked, Error> {
    std::fs::create_dir_all(target.dir()).map_err(|e| Error::io("create the lock directory", target.dir(), e))?;
    os::wait_lock(target, mode)
}

/// Who holds `target` now, as well as can be told (OS lock, metadata, soft lock).
pub fn describe_holder(target: &LockTarget) -> Holder {
    os::describe_holder(target, &LockOptions::default())
}

/// The state of one lock, as `status` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct LockStatus {
    pub target: LockTarget,
    pub state: LockState,
    /// `"os"` or `"soft"`.
    pub kind: &'static str,
    pub holder: Option<Holder>,
    /// A sentence explaining the state (why stale, what leftover metadata means).
    pub detail: String,
    /// A lease on this lock lost while its script lived (see [`lost`]).
    pub lost: Option<lost::LostLease>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockState {
    /// Nobody holds it; taking it would succeed at once.
    Free,
    Held,
    /// A soft lock whose holder is gone; the next acquirer breaks it.
    Stale,
}

impl LockState {
    pub fn as_str(self) -> &'static str {
        match self {
            LockState::Free => "free",
            LockState::Held => "held",
            LockState::Stale => "stale",
        }
    }
}

/// Who holds `target`, without taking it or creating any file.
pub fn status(target: &LockTarget, opts: &LockOptions) -> Result<LockStatus, Error> {
    let mut status = status_of_lock(target, opts)?;
    status.lost = lost::read(target);
    Ok(status)
}

fn status_of_lock(target: &LockTarget, opts: &LockOptions) -> Result<LockStatus, Error> {
    let free = |detail: String| LockStatus {
        target: target.clone(),
        state: LockState::Free,
        kind: "os",
        holder: None,
        detail,
        lost: None,
    };
    if !target.path.exists() {
        return Ok(free("no lock file".into()));
    }
    if opts.backend == Backend::Soft || soft::is_soft_lock_file(&target.path) {
        return soft::status(target, opts);
    }
    match os::probe(target)? {
        os::ProbeOutcome::Free => Ok(free(os::leftover_metadata_note(target))),
        os::ProbeOutcome::Held(holder) => Ok(LockStatus {
            target: target.clone(),
            state: LockState::Held,
            kind: "os",
            detail: "an OS lock is held on the lock file".into(),
            holder: Some(holder),
            lost: None,
        }),
        os::ProbeOutcome::Unsupported => soft::status(target, opts),
    }
}

/// Every lock file (`*.lock`) in `dir`, sorted by name. A missing directory has none.
pub fn list(dir: &Path) -> Result<Vec<LockTarget>, Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list the lock directory", dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(file) = file.to_str() else { continue };
        if let Some(name) = file.strip_suffix(".lock").filter(|n| !n.starts_with('.') && !n.is_empty()) {
            if let Ok(t) = LockTarget::resolve(name, dir) {
                out.push(t);
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// What [`break_lock`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Broken {
    /// The lock was not held; `cleaned` says what leftover file was removed, if any.
    NotHeld { cleaned: Option<String> },
    /// A stale soft lock was removed, for the reason given.
    Broken { reason: String },
}

/// Removes a stale lock. Refuses ([`Error::Refused`]) when a live holder has it: an OS lock is
/// never broken, and a soft lock only when stale, or with `force` (the caller vouches that its
/// holder is gone, e.g. on a dead remote host). A file that is neither empty nor metadata this
/// tool recognises is never removed ([`Error::NotALock`]), with or without `force`.
pub fn break_lock(target: &LockTarget, opts: &LockOptions, force: bool) -> Result<Broken, Error> {
    if !target.path.exists() {
        let cleaned = os::remove_leftover_metadata(target)?;
        return Ok(Broken::NotHeld { cleaned });
    }
    if opts.backend == Backend::Soft || soft::is_soft_lock_file(&target.path) {
        return soft::break_lock(target, opts, force);
    }
    os::break_lock(target, opts, force)
}
