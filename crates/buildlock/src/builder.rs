//! [`Lock`]: the builder that is the documented way to take a lock, on top of [`crate::acquire`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Backend, Cancel, Connect, Error, Lease, LockMode, LockTarget, Options, Wait, WaitInfo};

/// A lock to take: which one, how, and how long to wait. Built with chained calls, taken with
/// [`Lock::acquire`], which can be called again after the [`Lease`] is gone.
///
/// ```
/// use std::time::Duration;
/// # let dir = tempfile::tempdir()?;
/// let lease = buildlock::Lock::named("libfastled_build")
///     # .lock_dir(dir.path()).connect(buildlock::Connect::Direct)
///     .timeout(Duration::from_secs(30))        // default: wait forever; or .no_wait()
///     .operation("build:libfastled_build")      // shown to anyone who waits
///     .on_wait(|w| eprintln!("{w}"))            // e.g. "waiting 1s for lock ..., held by pid 42 (make)"
///     .acquire()?;
/// assert!(lease.token() > 0);
/// lease.release()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Lock<'a> {
    spec: Spec,
    lock_dir: Option<PathBuf>,
    opts: Options,
    on_wait: Option<OnWait<'a>>,
    /// [`Lock::backend`] and [`Lock::remote_timeout`], until the first acquire resolves them
    /// into `opts.remote`.
    backend: Option<String>,
    remote_timeout: Option<Duration>,
    resolved: bool,
}

/// What [`Lock::on_wait`] was given.
type OnWait<'a> = Box<dyn FnMut(&WaitInfo) + Send + 'a>;

/// What the caller named.
#[derive(Clone, Debug)]
enum Spec {
    /// A name in the lock directory.
    Named(String),
    /// A file, used as given.
    Path(PathBuf),
    /// Either, by the command line's rule (see [`Lock::new`]).
    Arg(String),
}

impl fmt::Debug for Lock<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock")
            .field("spec", &self.spec)
            .field("lock_dir", &self.lock_dir)
            .field("opts", &self.opts)
            .field("on_wait", &self.on_wait.is_some())
            .finish()
    }
}

impl<'a> Lock<'a> {
    fn with(spec: Spec) -> Lock<'a> {
        Lock {
            spec,
            lock_dir: None,
            opts: Options { connect: Connect::from_env(false), ..Options::default() },
            on_wait: None,
            backend: None,
            remote_timeout: None,
            resolved: false,
        }
    }

    /// The lock `<lock dir>/<name>.lock` (see [`Lock::lock_dir`]). The name may not contain `/`
    /// or `..`; use [`Lock::path`] for a file of your choosing.
    pub fn named(name: impl Into<String>) -> Lock<'a> {
        Lock::with(Spec::Named(name.into()))
    }

    /// The lock file `path`, used as given (its metadata is `path` plus `.pid`).
    pub fn path(path: impl AsRef<Path>) -> Lock<'a> {
        Lock::with(Spec::Path(path.as_ref().to_owned()))
    }

    /// A name or a path by the command line's rule: a bare name (no `/`, not ending in `.lock`)
    /// is a name in the lock directory, anything else a path.
    pub fn new(name_or_path: impl Into<String>) -> Lock<'a> {
        Lock::with(Spec::Arg(name_or_path.into()))
    }

    /// Shared (reader) lock; the default is exclusive.
    pub fn shared(self) -> Self {
        self.mode(LockMode::Shared)
    }

    /// Exclusive (writer) lock: the default.
    pub fn exclusive(self) -> Self {
        self.mode(LockMode::Exclusive)
    }

    pub fn mode(mut self, mode: LockMode) -> Self {
        self.opts.mode = mode;
        self
    }

    /// Wait at most `d` for the lock, then fail with a conflict ([`Error::is_conflict`]) that
    /// names the holder. The default is to wait forever.
    pub fn timeout(self, d: Duration) -> Self {
        self.wait(Wait::Timeout(d))
    }

    /// Do not wait: fail at once, naming the holder, if the lock is held.
    pub fn no_wait(self) -> Self {
        self.wait(Wait::NoWait)
    }

    pub fn wait(mut self, wait: Wait) -> Self {
        self.opts.wait = wait;
        self
    }

    /// Lets another thread end the wait: after [`Cancel::cancel`], `acquire` returns an error
    /// ([`Error::is_cancelled`]) within a few milliseconds and takes nothing.
    ///
    /// ```no_run
    /// let cancel = buildlock::Cancel::new();
    /// let stop = cancel.clone();
    /// std::thread::spawn(move || {
    ///     std::thread::sleep(std::time::Duration::from_secs(5));
    ///     stop.cancel();
    /// });
    /// match buildlock::Lock::named("deploy").cancel_with(&cancel).acquire() {
    ///     Ok(lease) => drop(lease),
    ///     Err(e) if e.is_cancelled() => eprintln!("gave up waiting"),
    ///     Err(e) => eprintln!("{e}"),
    /// }
    /// ```
    pub fn cancel_with(mut self, cancel: &Cancel) -> Self {
        self.opts.cancel = Some(cancel.clone());
        self
    }

    /// What the holder is doing, shown to anyone who waits and by `status`.
    pub fn operation(mut self, op: impl Into<String>) -> Self {
        self.opts.operation = op.into();
        self
    }

    /// The holder's command line, shown to anyone who waits [default: read from the OS].
    pub fn command(mut self, command: impl Into<String>) -> Self {
        self.opts.command = Some(command.into());
        self
    }

    /// Called about once a second while waiting; [`WaitInfo`]'s `Display` says who holds the
    /// lock and for how long we have waited. Without it, a direct wait for the lock blocks in the
    /// calling thread ([`crate::Options::wait_here`]), which hands a freed lock over sooner.
    pub fn on_wait(mut self, f: impl FnMut(&WaitInfo) + Send + 'a) -> Self {
        self.on_wait = Some(Box::new(f));
        self
    }

    /// The directory for named locks [default: `$BUILDLOCK_DIR`, else the per-user data
    /// directory].
    pub fn lock_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.lock_dir = Some(dir.as_ref().to_owned());
        self
    }

    /// Daemon or lock files ([`Connect`]) [default: `Auto`, or `Direct` if
    /// `BUILDLOCK_NO_DAEMON` is set].
    pub fn connect(mut self, connect: Connect) -> Self {
        self.opts.connect = connect;
        self
    }

    /// The daemon's runtime directory [default: `$BUILDLOCK_RUNTIME_DIR`, else
    /// `$XDG_RUNTIME_DIR/buildlock`, else a private directory under the temp dir].
    pub fn runtime_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.opts.runtime_dir = Some(dir.as_ref().to_owned());
        self
    }

    /// A soft lock (the lock file's existence), for file systems without OS locks. Soft locks
    /// exist only in the on-disk protocol, so this also means [`Connect::Direct`].
    pub fn soft(mut self) -> Self {
        self.opts.backend = Backend::Soft;
        self.opts.connect = Connect::Direct;
        self
    }

    /// When a soft lock, or a lock file without metadata, counts as stale
    /// [default: [`crate::DEFAULT_STALE_AFTER`]].
    pub fn stale_after(mut self, d: Duration) -> Self {
        self.opts.stale_after = d;
        self
    }

    /// Where the lock lives: a `postgres://` URL puts it, by its name, on that server, shared by
    /// every host that names it; `"local"` keeps it in the lock directory. Without this call,
    /// `$BUILDLOCK_BACKEND`, then the config file's first matching `[[locks]]` entry decide, as
    /// for the command line ([`crate::config::remote_for`]), at the first acquire.
    pub fn backend(mut self, url_or_local: impl Into<String>) -> Self {
        self.backend = Some(url_or_local.into());
        self
    }

    /// How long a dead or cut-off host may keep a remote lock (`--remote-timeout`)
    /// [default: [`buildlock_remote::DEFAULT_REMOTE_TIMEOUT`]].
    pub fn remote_timeout(mut self, d: Duration) -> Self {
        self.remote_timeout = Some(d);
        self
    }

    /// All the settings at once, for callers that have them in an [`Options`] (the CLI).
    pub fn options(mut self, opts: Options) -> Self {
        self.opts = opts;
        self
    }

    /// The settings as they stand.
    pub fn settings(&self) -> &Options {
        &self.opts
    }

    /// The lock file and metadata file this lock names.
    pub fn target(&self) -> Result<LockTarget, Error> {
        let dir = || crate::lock_dir(self.lock_dir.as_deref());
        Ok(match &self.spec {
            Spec::Named(name) if name.contains('/') || name.ends_with(".lock") => {
                return Err(buildlock_disk::Error::InvalidName {
                    name: name.clone(),
                    reason: "a lock name may not contain '/' or end in \".lock\"; use Lock::path for a file".into(),
                }
                .into())
            }
            Spec::Named(name) | Spec::Arg(name) => LockTarget::resolve(name, &dir()?)?,
            Spec::Path(path) => {
                if path.file_name().is_none() {
                    return Err(buildlock_disk::Error::InvalidName {
                        name: path.display().to_string(),
                        reason: "a lock path must name a file, not a directory".into(),
                    }
                    .into());
                }
                let mut meta = path.clone().into_os_string();
                meta.push(".pid");
                LockTarget { name: path.display().to_string(), path: path.clone(), meta_path: meta.into() }
            }
        })
    }

    /// Takes the lock, waiting as set. The [`Lease`] releases it when dropped.
    ///
    /// A busy lock ([`Lock::no_wait`]) or a wait that ran out is an error for which
    /// [`Error::is_conflict`] is true and whose message names the holder.
    pub fn acquire(&mut self) -> Result<Lease, Error> {
        let target = self.target()?;
        if !self.resolved && self.opts.remote.is_none() {
            let remote_timeout = self.remote_timeout.unwrap_or(buildlock_remote::DEFAULT_REMOTE_TIMEOUT);
            let remote = crate::config::remote_for(&target.name, self.backend.as_deref(), remote_timeout)?;
            if remote.is_some() && self.opts.backend == Backend::Soft {
                return Err(buildlock_remote::Error::Settings(format!(
                    "lock {} lives on a server (its backend): soft locks are files in the lock directory; drop \
                     .soft(), or keep it local with .backend(\"local\")",
                    target.name
                ))
                .into());
            }
            self.opts.remote = remote;
        }
        self.resolved = true;
        match &mut self.on_wait {
            Some(f) => crate::acquire(&target, &self.opts, &mut **f),
            None => {
                // Nobody to report to: a direct wait blocks in this thread, and the freed lock
                // wakes it, not a reporting thread of the library's that would then wake it.
                let set = std::mem::replace(&mut self.opts.wait_here, true);
                let lease = crate::acquire(&target, &self.opts, &mut |_| {});
                self.opts.wait_here = set;
                lease
            }
        }
    }
}

impl fmt::Display for WaitInfo {
    /// `waiting 3s for a lock held by pid 4242 (make -j8) on myhost, exclusive, since ...`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "waiting {}s for a lock held by {}", self.waited.as_secs(), self.holder)
    }
}

impl Error {
    /// The wait ran out (as opposed to a busy lock with [`Lock::no_wait`]).
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            Error::Busy { timed_out: true, .. }
                | Error::Disk(buildlock_disk::Error::Timeout { .. })
                | Error::Remote(buildlock_remote::Error::Busy { timed_out: true, .. })
        )
    }

    /// The wait was ended through [`Lock::cancel_with`] (or [`crate::Options::cancel`]).
    pub fn is_cancelled(&self) -> bool {
        matches!(self, Error::Disk(buildlock_disk::Error::Cancelled { .. }))
    }

    /// The lock was lost while held: another holder may have run at the same time.
    pub fn is_lost(&self) -> bool {
        matches!(
            self,
            Error::Lost { .. }
                | Error::Disk(buildlock_disk::Error::Lost { .. })
                | Error::Remote(buildlock_remote::Error::Lost { .. })
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_is_resolved_before_anything_is_taken_and_soft_locks_stay_local() {
        let dir = tempfile::tempdir().unwrap();
        let lock = |name: &str| Lock::named(name).lock_dir(dir.path()).connect(Connect::Direct);
        // "local" keeps it in the lock directory, whatever the environment says.
        let lease = lock("kept-local").backend("local").acquire().unwrap();
        assert_eq!(lease.remote_server(), None);
        drop(lease);
        // Errors come from the settings alone: no server is reached (port 1 would refuse).
        let e = lock("soft").soft().backend("postgres://127.0.0.1:1/locks").acquire().unwrap_err().to_string();
        assert!(e.contains("soft locks are files in the lock directory"), "{e}");
        let e = lock("ftp").backend("ftp://files.internal/locks").acquire().unwrap_err().to_string();
        assert!(e.contains("no engine for scheme ftp://"), "{e}");
    }

    /// Without `on_wait`, a direct wait blocks in the caller's thread (the freed lock wakes it);
    /// with one, a waiting thread of the library's blocks and reports.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_direct_wait_blocks_in_the_callers_thread_unless_reports_are_asked_for() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let lock = |dir: &Path| Lock::named("waited").lock_dir(dir).connect(Connect::Direct);
        let waiting_threads = || {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|comm| comm.trim() == "buildlock-wait")
                .count()
        };
        for reports in [false, true] {
            let held = lock(dir.path()).acquire().unwrap();
            let ino = std::fs::metadata(dir.path().join("waited.lock")).unwrap().ino();
            let blocked = || {
                std::fs::read_to_string("/proc/locks")
                    .unwrap()
                    .lines()
                    .any(|l| l.contains("->") && l.contains(&format!(":{ino} ")))
            };
            let at = dir.path().to_owned();
            let waiter = std::thread::spawn(move || {
                let mut waiter = lock(&at);
                if reports {
                    waiter = waiter.on_wait(|_| {});
                }
                waiter.acquire().map(|l| l.token())
            });
            while !blocked() {
                std::thread::yield_now();
            }
            assert_eq!(waiting_threads(), usize::from(reports), "reports asked for: {reports}");
            let token = held.token();
            drop(held);
            assert!(waiter.join().unwrap().unwrap() > token);
        }
    }

    #[test]
    fn a_remote_lock_lost_or_timed_out_is_classified_as_a_local_one() {
        let (lock, server) = ("deploy".to_owned(), "postgres://db/locks".to_owned());
        let lost = Error::Remote(buildlock_remote::Error::Lost {
            lock: lock.clone(),
            server: server.clone(),
            why: "cut".into(),
        });
        assert!(lost.is_lost() && !lost.is_timeout() && !lost.is_conflict());
        let busy = |timed_out| {
            Error::Remote(buildlock_remote::Error::Busy {
                lock: lock.clone(),
                server: server.clone(),
                holder: None,
                timed_out,
            })
        };
        assert!(busy(true).is_timeout() && busy(true).is_conflict() && !busy(true).is_lost());
        assert!(!busy(false).is_timeout() && busy(false).is_conflict());
    }

    #[test]
    fn named_lock_is_in_the_lock_dir_and_path_is_used_as_given() {
        let named = Lock::named("cache").lock_dir("/locks").target().unwrap();
        assert_eq!(named.path, Path::new("/locks/cache.lock"));
        let path = Lock::path("here").lock_dir("/locks").target().unwrap();
        assert_eq!(path.path, Path::new("here"));
        assert_eq!(path.meta_path, Path::new("here.pid"));
        assert_eq!(Lock::new("a/b.lock").target().unwrap().path, Path::new("a/b.lock"));
    }

    #[test]
    fn named_refuses_a_path() {
        let e = Lock::named("a/b").lock_dir("/locks").target().unwrap_err();
        assert!(e.to_string().contains("Lock::path"), "{e}");
    }

    #[test]
    fn soft_means_direct() {
        let l = Lock::named("x").soft();
        assert_eq!(l.settings().connect, Connect::Direct);
        assert_eq!(l.settings().backend, Backend::Soft);
    }

    #[test]
    fn no_wait_on_a_held_lock_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = Lock::named("x").lock_dir(dir.path()).connect(Connect::Direct).operation("first").acquire().unwrap();
        let e = Lock::named("x").lock_dir(dir.path()).connect(Connect::Direct).no_wait().acquire().unwrap_err();
        assert!(e.is_conflict() && !e.is_timeout(), "{e:?}");
        assert!(e.to_string().contains(&format!("pid {}", std::process::id())), "{e}");
        // A wait that runs out (in another thread: this one would wait for itself, which is
        // refused as a deadlock).
        let e = std::thread::scope(|s| {
            s.spawn(|| {
                Lock::named("x")
                    .lock_dir(dir.path())
                    .connect(Connect::Direct)
                    .timeout(Duration::from_millis(1))
                    .acquire()
            })
            .join()
            .unwrap()
            .unwrap_err()
        });
        assert!(e.is_timeout(), "{e:?}");
        assert!(e.to_string().contains("first"), "{e}");
        let e = Lock::named("x").lock_dir(dir.path()).connect(Connect::Direct).acquire().unwrap_err();
        assert!(matches!(e, crate::Error::Deadlock(_)), "{e:?}");
        held.release().unwrap();
    }

    #[test]
    fn wait_info_names_the_holder() {
        let w = WaitInfo {
            holder: "pid 42 (make)".into(),
            holder_pid: Some(42),
            holder_command: Some("make".into()),
            position: None,
            waited: Duration::from_secs(3),
        };
        assert_eq!(w.to_string(), "waiting 3s for a lock held by pid 42 (make)");
    }
}
