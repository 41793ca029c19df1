//! `buildlock._buildlock`: the Python extension module. A thin binding over the `buildlock`
//! library (the locks), `buildlock_cli` (the `buildlock-client` command) and `buildlockd` (the
//! daemon), so one wheel brings all three.
//!
//! The binding converts types and errors and releases the GIL around anything that waits; the
//! locking is the library's. What it adds is what Python users expect of a lock object:
//! re-entrant acquires counted per object (the thread that holds it may take it again; other
//! threads wait for it in the process first), `Ctrl+C` during a wait, and the fork rule.
//!
//! **Fork invariant:** a lease belongs to the process that acquired it. A forked child that
//! inherited a held [`Lock`] never releases it (its copy of the Rust lease is forgotten, not
//! dropped) and refuses to release, check or re-enter it, saying the lease is its parent's.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use buildlock::{Connect, Lease, LockTarget};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

/// The locks held through some [`Lock`] of this process, by lock file, with the thread that
/// acquired each: a thread that waits for a lock it holds through another object would wait
/// forever, so it is told instead.
static HELD: Mutex<Vec<(PathBuf, ThreadId)>> = Mutex::new(Vec::new());

fn held() -> MutexGuard<'static, Vec<(PathBuf, ThreadId)>> {
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

/// How often a waiting thread looks for a signal (`Ctrl+C`) or a cancellation.
const SLICE: Duration = Duration::from_millis(20);

/// Raises the Python exception class `name` of `buildlock._errors` with `msg`.
fn raise(py: Python<'_>, name: &str, msg: String) -> PyErr {
    match py.import("buildlock._errors").and_then(|m| m.getattr(name)).and_then(|cls| cls.call1((msg.clone(),))) {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

fn to_py(py: Python<'_>, e: &buildlock::Error) -> PyErr {
    let name = if e.is_timeout() || e.is_conflict() {
        "Timeout"
    } else if e.is_lost() {
        "LockLost"
    } else {
        "Error"
    };
    raise(py, name, e.to_string())
}

/// One acquisition's settings, from the constructor's arguments: the lock file resolved and the
/// library's options built once, when the `Lock` is made, so that an acquire reads no
/// environment variable and allocates nothing of its own.
#[derive(Clone, Debug)]
struct Spec {
    /// As the caller named it, for messages.
    name: String,
    target: LockTarget,
    /// The library's options, with `Wait::NoWait`: the first attempt of every acquire.
    opts: buildlock::Options,
    shared: bool,
    timeout: Option<Duration>,
}

impl Spec {
    /// The options for an acquisition that waits as `wait` says.
    fn waiting(&self, wait: buildlock::Wait) -> buildlock::Options {
        buildlock::Options { wait, ..self.opts.clone() }
    }
}

/// What a [`Lock`] holds.
struct State {
    lease: Option<Lease>,
    /// Acquires not yet matched by releases, by `owner`.
    count: usize,
    owner: Option<ThreadId>,
    /// A thread of this process is taking the lock (others wait on the condition variable).
    taking: bool,
    /// Threads waiting on the condition variable: only they need a notification (a system
    /// call, which an uncontended acquire and release would otherwise pay each).
    waiting: usize,
    /// The process that acquired `lease`.
    pid: u32,
    /// Set in a forked child whose copy of the object was held by its parent (that pid).
    parents: Option<u32>,
}

impl State {
    /// In a forked child, the parent's lease is forgotten, never released (fork invariant).
    fn after_fork(&mut self) {
        let me = buildlock_sys::current_pid();
        if self.pid != me {
            if let Some(lease) = self.lease.take() {
                std::mem::forget(lease);
                self.parents = Some(self.pid);
            }
            // Threads of the parent are not here: nobody is taking the lock or waiting.
            self.taking = false;
            self.waiting = 0;
            self.pid = me;
        }
    }

    fn parents_error(&self, py: Python<'_>, what: &str) -> Option<PyErr> {
        self.parents.map(|p| {
            raise(
                py,
                "Error",
                format!(
                    "cannot {what} this lock: its lease belongs to process {p}, which acquired it before os.fork(); \
                     a forked child never releases or uses its parent's lock. Take the lock with a new \
                     buildlock.Lock in the child if it needs one"
                ),
            )
        })
    }
}

impl Drop for State {
    fn drop(&mut self) {
        if self.pid != buildlock_sys::current_pid() {
            if let Some(lease) = self.lease.take() {
                std::mem::forget(lease);
            }
        }
    }
}

/// A lock, as `buildlock.Lock` (see the package's `__init__.pyi`).
#[pyclass(module = "buildlock._buildlock", frozen)]
struct Lock {
    spec: Spec,
    state: Mutex<State>,
    changed: Condvar,
}

impl Lock {
    fn state(&self) -> MutexGuard<'_, State> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.after_fork();
        s
    }

    /// Wakes the threads of this process waiting for this object, if there are any (`s` is the
    /// state as changed, still locked).
    fn notify(&self, s: MutexGuard<'_, State>) {
        let any = s.waiting > 0;
        drop(s);
        if any {
            self.changed.notify_all();
        }
    }

    /// The lock file, as the registry of held locks knows it.
    fn lease_path(&self) -> &Path {
        &self.spec.target.path
    }

    /// Takes the OS-level lock for this object (the caller has set `taking`), waiting in a helper
    /// thread while this one, without the GIL, looks for signals and `cancel` every slice.
    fn take(
        &self,
        py: Python<'_>,
        blocking: bool,
        timeout: Option<Duration>,
        cancel: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Option<Lease>> {
        let wait = match (blocking, timeout) {
            (false, _) => buildlock::Wait::NoWait,
            (true, Some(t)) => buildlock::Wait::Timeout(t),
            (true, None) => buildlock::Wait::Forever,
        };
        // First without waiting, on this thread (no thread to start when the lock is free, as
        // it mostly is); only a busy lock is waited for, in a helper thread.
        let (target, first) = (&self.spec.target, &self.spec.opts);
        match py.detach(|| buildlock::acquire(target, first, &mut |_| {})) {
            Ok(lease) => return Ok(Some(lease)),
            Err(e) if e.is_conflict() && blocking => {
                let me = std::thread::current().id();
                let path = self.lease_path();
                if held().iter().any(|(p, t)| p == path && *t == me) {
                    return Err(raise(
                        py,
                        "Error",
                        format!(
                            "this thread already holds lock {} through another buildlock.Lock object, so waiting \
                             for it would never end; acquire the same Lock object again (it is re-entrant), or \
                             release the other one first",
                            path.display()
                        ),
                    ));
                }
            }
            Err(e) if e.is_conflict() => return Ok(None),
            Err(e) => return Err(to_py(py, &e)),
        }
        let (target, mut opts) = (self.spec.target.clone(), self.spec.waiting(wait));
        // Waiting forever with nothing to cancel it but Ctrl+C (which mostly ends the program),
        // the helper blocks in the kernel itself (this thread keeps the clock): the lock then
        // comes to Python through one hand-over, not two. A wait that may end early (a timeout,
        // a cancellable task) is ended through a token instead, so that no helper is left to
        // take the lock, if only for a moment, after the caller gave up.
        let stop = (wait != buildlock::Wait::Forever || cancel.is_some()).then(buildlock::Cancel::new);
        opts.wait_here = stop.is_none();
        opts.cancel = stop.clone();
        let (tx, rx) = mpsc::channel::<Result<Lease, buildlock::Error>>();
        let (abandon_tx, abandon_rx) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("buildlock-acquire".into())
            .spawn(move || {
                let got = buildlock::acquire(&target, &opts, &mut |_| {});
                // Handed over, or, if the waiter has gone (interrupted, cancelled), released here.
                if abandon_rx.try_recv().is_err() {
                    if let Err(std::sync::mpsc::SendError(Ok(lease))) = tx.send(got) {
                        drop(lease);
                    }
                }
            })
            .map_err(|e| raise(py, "Error", format!("cannot start a thread to wait for the lock: {e}")))?;
        let mut rx = rx;
        loop {
            let (back, got) = py.detach(move || {
                let got = rx.recv_timeout(SLICE);
                (rx, got)
            });
            rx = back;
            match got {
                Ok(Ok(lease)) => return Ok(Some(lease)),
                Ok(Err(e)) => return Err(to_py(py, &e)),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(raise(py, "Error", "the thread waiting for the lock died".into()))
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            let cancelled = match cancel {
                Some(c) => c.call_method0("is_set")?.is_truthy()?,
                None => false,
            };
            let interrupted = py.check_signals().err();
            if cancelled || interrupted.is_some() {
                match &stop {
                    // The helper stops within a few milliseconds; waiting for it means nothing
                    // is taken after this returns (a lease granted just before is released).
                    Some(stop) => {
                        stop.cancel();
                        drop(py.detach(move || rx.recv()));
                    }
                    // Blocked in the kernel, it cannot be stopped: it releases what it gets
                    // from now on; what it already sent is dropped with `rx`.
                    None => {
                        let _ = abandon_tx.send(());
                        drop(rx);
                    }
                }
                return match interrupted {
                    Some(e) => Err(e),
                    None => Ok(None),
                };
            }
        }
    }
}

fn secs(py: Python<'_>, what: &str, v: Option<f64>) -> PyResult<Option<Duration>> {
    match v {
        None => Ok(None),
        Some(s) if s.is_finite() && s >= 0.0 => Ok(Some(Duration::from_secs_f64(s.min(1e9)))),
        Some(s) if s.is_infinite() && s > 0.0 => Ok(None),
        Some(s) => {
            let _ = py;
            Err(PyValueError::new_err(format!("{what} must be a number of seconds >= 0, not {s}")))
        }
    }
}

#[pymethods]
impl Lock {
    #[new]
    #[pyo3(signature = (name_or_path, shared=false, timeout=None, operation=String::new(), mode="auto",
                        lock_dir=None, soft=false, stale_after=None, backend=None, remote_timeout=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        name_or_path: PathBuf,
        shared: bool,
        timeout: Option<f64>,
        operation: String,
        mode: &str,
        lock_dir: Option<PathBuf>,
        soft: bool,
        stale_after: Option<f64>,
        backend: Option<String>,
        remote_timeout: Option<f64>,
    ) -> PyResult<Self> {
        let connect = match mode {
            "auto" => Connect::from_env(false),
            "daemon" => Connect::DaemonOnly,
            "direct" => Connect::Direct,
            other => {
                return Err(PyValueError::new_err(format!(
                    "mode must be \"auto\", \"daemon\" or \"direct\", not {other:?}"
                )))
            }
        };
        let name = name_or_path
            .to_str()
            .ok_or_else(|| PyValueError::new_err(format!("lock name {name_or_path:?} is not valid UTF-8")))?
            .to_owned();
        let mut builder =
            buildlock::Lock::new(name.clone()).connect(connect).operation(operation).wait(buildlock::Wait::NoWait);
        if shared {
            builder = builder.shared();
        }
        if let Some(d) = &lock_dir {
            builder = builder.lock_dir(d);
        }
        if soft {
            builder = builder.soft();
        }
        if let Some(s) = secs(py, "stale_after", stale_after)? {
            builder = builder.stale_after(s);
        }
        // A bad name is an error now, not at the first acquire; the lock directory
        // (`$BUILDLOCK_DIR`, ...) is read once, here.
        let target = builder.target().map_err(|e| to_py(py, &e))?;
        let mut opts = builder.settings().clone();
        // The server the lock lives on, as for the command line: `backend` (a URL, or "local"),
        // else `$BUILDLOCK_BACKEND`, else the config file's first matching `[[locks]]` entry.
        let remote_timeout =
            secs(py, "remote_timeout", remote_timeout)?.unwrap_or(buildlock_remote::DEFAULT_REMOTE_TIMEOUT);
        opts.remote = py
            .detach(|| buildlock::config::remote_for(&target.name, backend.as_deref(), remote_timeout))
            .map_err(|e| to_py(py, &e))?;
        if opts.remote.is_some() && soft {
            return Err(PyValueError::new_err(format!(
                "lock {name} lives on a server (backend): soft locks are files in the lock directory; drop soft=True, \
                 or pass backend=\"local\""
            )));
        }
        let spec = Spec { name, target, opts, shared, timeout: secs(py, "timeout", timeout)? };
        Ok(Lock {
            spec,
            state: Mutex::new(State {
                lease: None,
                count: 0,
                owner: None,
                taking: false,
                waiting: 0,
                pid: buildlock_sys::current_pid(),
                parents: None,
            }),
            changed: Condvar::new(),
        })
    }

    /// Takes the lock; see `__init__.pyi`.
    #[pyo3(signature = (blocking=true, timeout=None, _cancel=None))]
    fn acquire(
        &self,
        py: Python<'_>,
        blocking: bool,
        timeout: Option<f64>,
        _cancel: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let timeout = match secs(py, "timeout", timeout)? {
            Some(t) => Some(t),
            None => self.spec.timeout,
        };
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let me = std::thread::current().id();
        // First, within this process: re-enter, or wait for the thread that holds or takes it.
        loop {
            let mut s = self.state();
            if let Some(e) = s.parents_error(py, "acquire") {
                return Err(e);
            }
            if s.count > 0 && s.owner == Some(me) {
                s.count += 1;
                return Ok(true);
            }
            if s.count == 0 && !s.taking {
                s.taking = true;
                s.owner = Some(me);
                break;
            }
            if !blocking {
                return Ok(false);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(raise(
                    py,
                    "Timeout",
                    format!(
                        "timed out waiting for lock {}: another thread of this process (pid {}) holds it",
                        self.spec.name,
                        buildlock_sys::current_pid()
                    ),
                ));
            }
            drop(s);
            py.detach(|| {
                let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if s.count > 0 || s.taking {
                    s.waiting += 1;
                    let (mut s, _) = self.changed.wait_timeout(s, SLICE).unwrap_or_else(|e| e.into_inner());
                    s.waiting -= 1;
                }
            });
            py.check_signals()?;
            if let Some(c) = _cancel {
                if c.call_method0("is_set")?.is_truthy()? {
                    return Ok(false);
                }
            }
        }
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let got = self.take(py, blocking, left, _cancel);
        let mut s = self.state();
        s.taking = false;
        let result = match got {
            Ok(Some(lease)) => {
                held().push((self.lease_path().to_owned(), std::thread::current().id()));
                s.lease = Some(lease);
                s.count = 1;
                s.pid = buildlock_sys::current_pid();
                Ok(true)
            }
            Ok(None) => {
                s.owner = None;
                Ok(false)
            }
            Err(e) => {
                s.owner = None;
                Err(e)
            }
        };
        self.notify(s);
        result
    }

    /// Undoes one `acquire`; the last one releases the lock.
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        let mut s = self.state();
        if let Some(e) = s.parents_error(py, "release") {
            return Err(e);
        }
        if s.count == 0 {
            return Err(raise(py, "Error", format!("cannot release lock {}: it is not held", self.spec.name)));
        }
        s.count -= 1;
        if s.count > 0 {
            return Ok(());
        }
        let owner = s.owner.take();
        let lease = s.lease.take();
        if let Some(owner) = owner {
            let mut h = held();
            if let Some(i) = h.iter().position(|(p, t)| p == self.lease_path() && *t == owner) {
                h.remove(i);
            }
        }
        self.notify(s);
        match lease {
            Some(l) => py.detach(|| l.release_confirmed()).map_err(|e| to_py(py, &e)),
            None => Ok(()),
        }
    }

    /// Raises `LockLost` if the lock was lost while held (the lock file deleted or replaced).
    fn check(&self, py: Python<'_>) -> PyResult<()> {
        let s = self.state();
        if let Some(e) = s.parents_error(py, "check") {
            return Err(e);
        }
        match &s.lease {
            Some(l) => l.check().map_err(|e| to_py(py, &e)),
            None => Err(raise(py, "Error", format!("cannot check lock {}: it is not held", self.spec.name))),
        }
    }

    #[getter]
    fn token(&self) -> Option<u64> {
        self.state().lease.as_ref().map(Lease::token)
    }

    #[getter]
    fn is_locked(&self) -> bool {
        let s = self.state();
        s.lease.is_some() && s.parents.is_none()
    }

    /// Whether the lease came from the daemon (else from the lock files directly).
    #[getter]
    fn via_daemon(&self) -> Option<bool> {
        self.state().lease.as_ref().map(Lease::via_daemon)
    }

    /// The server the lock lives on (`postgres://host:port/db`, never a password), or None for
    /// the lock directory.
    #[getter]
    fn backend(&self) -> Option<String> {
        self.spec.opts.remote.as_ref().map(|e| e.display())
    }

    #[getter]
    fn path(&self) -> String {
        self.lease_path().display().to_string()
    }

    fn __enter__<'py>(slf: Bound<'py, Self>, py: Python<'py>) -> PyResult<Bound<'py, Self>> {
        slf.get().acquire(py, true, None, None)?;
        Ok(slf)
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.release(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        let s = self.state();
        format!(
            "buildlock.Lock({:?}, shared={}, held={})",
            self.spec.name,
            if self.spec.shared { "True" } else { "False" },
            if s.count > 0 && s.parents.is_none() { "True" } else { "False" }
        )
    }
}

impl Drop for Lock {
    /// A lock dropped while held (its lease released by `State`'s drop) leaves the registry.
    fn drop(&mut self) {
        let s = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        let (held_here, owner) = (s.lease.is_some() && s.pid == buildlock_sys::current_pid(), s.owner);
        if held_here {
            if let Some(owner) = owner {
                let mut h = held();
                if let Some(i) = h.iter().position(|(p, t)| p == self.lease_path() && *t == owner) {
                    h.remove(i);
                }
            }
        }
    }
}

/// Options for the on-disk protocol, from the functions' arguments.
fn disk_opts(py: Python<'_>, soft: bool, stale_after: Option<f64>) -> PyResult<buildlock_disk::LockOptions> {
    Ok(buildlock_disk::LockOptions {
        backend: if soft { buildlock::Backend::Soft } else { buildlock::Backend::Auto },
        stale_after: secs(py, "stale_after", stale_after)?.unwrap_or(buildlock::DEFAULT_STALE_AFTER),
        ..buildlock_disk::LockOptions::default()
    })
}

fn resolve(py: Python<'_>, arg: &str, lock_dir: Option<PathBuf>) -> PyResult<LockTarget> {
    let dir = buildlock::lock_dir(lock_dir.as_deref()).map_err(|e| to_py(py, &e.into()))?;
    LockTarget::resolve(arg, &dir).map_err(|e| to_py(py, &e.into()))
}

/// Every lock in the lock directory (or the one named), and on the servers remote locks live on,
/// as dicts; see `__init__.pyi`.
#[pyfunction]
#[pyo3(signature = (name_or_path=None, lock_dir=None, mode="auto", soft=false, stale_after=None, backend=None))]
fn status<'py>(
    py: Python<'py>,
    name_or_path: Option<&str>,
    lock_dir: Option<PathBuf>,
    mode: &str,
    soft: bool,
    stale_after: Option<f64>,
    backend: Option<String>,
) -> PyResult<Bound<'py, PyList>> {
    let opts = disk_opts(py, soft, stale_after)?;
    let out = PyList::empty(py);
    // Remote locks where the command line's `status` looks for them
    // (`buildlock::config::Config::status_servers`), `$BUILDLOCK_BACKEND` standing for `--backend`.
    let backend = backend.or_else(|| std::env::var("BUILDLOCK_BACKEND").ok());
    let config = py.detach(buildlock::config::Config::load).map_err(|e| raise(py, "Error", e.to_string()))?;
    let engine = |url: &str| {
        buildlock_remote::from_url(url)
            .and_then(|e| e.with_remote_timeout(buildlock_remote::DEFAULT_REMOTE_TIMEOUT))
            .map_err(|e| raise(py, "Error", e.to_string()))
    };
    let named = match name_or_path {
        Some(t) => Some(resolve(py, t, lock_dir.clone())?),
        None => None,
    };
    let remote_name = named.as_ref().map(|t| t.name.clone());
    let (urls, only_remote) = config.status_servers(remote_name.as_deref(), backend.as_deref());
    for url in urls {
        let server = engine(url)?;
        let entries = py
            .detach(|| buildlock_remote::status(&*server, remote_name.as_deref()))
            .map_err(|e| to_py(py, &e.into()))?;
        remote_status(py, &out, &server.display(), remote_name.as_deref(), &entries)?;
    }
    if only_remote {
        // The named lock lives on a server (or `backend` names the one server to list).
        return Ok(out);
    }
    let targets = match named {
        Some(t) => vec![t],
        None => {
            let dir = buildlock::lock_dir(lock_dir.as_deref()).map_err(|e| to_py(py, &e.into()))?;
            py.detach(|| buildlock_disk::list(&dir)).map_err(|e| to_py(py, &e.into()))?
        }
    };
    let ask_daemon = mode != "direct" && Connect::from_env(false) != Connect::Direct;
    for t in &targets {
        let (s, daemon) = py.detach(|| {
            let s = buildlock_disk::status(t, &opts);
            (s, if ask_daemon { daemon_view(t) } else { None })
        });
        let s = match s {
            Ok(s) => s,
            Err(e) if name_or_path.is_some() => return Err(to_py(py, &e.into())),
            // Listing them all: one file that is not a lock hides no other.
            Err(_) => continue,
        };
        let d = PyDict::new(py);
        d.set_item("name", &s.target.name)?;
        d.set_item("path", s.target.path.display().to_string())?;
        d.set_item("state", s.state.as_str())?;
        d.set_item("kind", s.kind.to_string())?;
        d.set_item("detail", &s.detail)?;
        let holder = match &s.holder {
            Some(h) => {
                let m = h.meta.as_ref();
                let hd = PyDict::new(py);
                hd.set_item("pid", h.pid())?;
                hd.set_item("command", &h.command)?;
                hd.set_item("host", m.map(|m| &m.hostname))?;
                hd.set_item("since", h.since().map(|t| t.to_string()))?;
                hd.set_item("operation", m.map(|m| &m.operation))?;
                hd.set_item("mode", h.mode.or(m.and_then(|m| m.mode)).map(|m| m.as_str()))?;
                hd.set_item("token", m.and_then(|m| m.token))?;
                hd.set_item("description", h.to_string())?;
                Some(hd)
            }
            None => None,
        };
        d.set_item("holder", holder)?;
        let waiters = PyList::empty(py);
        if let Some(info) = &daemon {
            for w in &info.waiters {
                let wd = PyDict::new(py);
                wd.set_item("pid", w.pid)?;
                wd.set_item("mode", w.mode.to_string())?;
                wd.set_item("waited", w.waited_ms as f64 / 1000.0)?;
                wd.set_item("operation", &w.operation)?;
                waiters.append(wd)?;
            }
        }
        d.set_item("waiters", waiters)?;
        out.append(d)?;
    }
    Ok(out)
}

/// One dict per remote lock of `entries` (server `server`), shaped as the local ones: its first
/// holder, the sessions waiting for it; `name`, when asked for one lock, even if nobody holds it.
fn remote_status(
    py: Python<'_>,
    out: &Bound<'_, PyList>,
    server: &str,
    name: Option<&str>,
    entries: &[buildlock_remote::LockEntry],
) -> PyResult<()> {
    let mut names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    names.dedup();
    if let Some(n) = name.filter(|_| names.is_empty()) {
        names.push(n);
    }
    for n in names {
        let of_lock = || entries.iter().filter(move |e| e.name == n);
        let holder = of_lock().find(|e| e.granted).map(|e| &e.holder);
        let d = PyDict::new(py);
        d.set_item("name", n)?;
        d.set_item("path", format!("{n} on {server}"))?;
        d.set_item("state", if of_lock().next().is_some() { "held" } else { "free" })?;
        d.set_item("kind", "remote")?;
        d.set_item("detail", format!("on {server}"))?;
        let holder = match holder {
            Some(h) => {
                let hd = PyDict::new(py);
                hd.set_item("pid", h.pid)?;
                hd.set_item("command", &h.command)?;
                hd.set_item("host", &h.host)?;
                hd.set_item("since", &h.since)?;
                hd.set_item("operation", &h.operation)?;
                hd.set_item("mode", if h.mode == buildlock_remote::Mode::Shared { "shared" } else { "exclusive" })?;
                hd.set_item("token", h.token)?;
                hd.set_item("description", h.describe())?;
                Some(hd)
            }
            None => None,
        };
        d.set_item("holder", holder)?;
        let waiters = PyList::empty(py);
        for w in of_lock().filter(|e| !e.granted).map(|e| &e.holder) {
            let wd = PyDict::new(py);
            wd.set_item("pid", w.pid)?;
            wd.set_item("mode", if w.mode == buildlock_remote::Mode::Shared { "shared" } else { "exclusive" })?;
            wd.set_item("waited", w.held_secs)?;
            wd.set_item("operation", &w.operation)?;
            wd.set_item("host", &w.host)?;
            waiters.append(wd)?;
        }
        d.set_item("waiters", waiters)?;
        out.append(d)?;
    }
    Ok(())
}

/// What the daemon knows of `target`, if one runs (never starts one).
fn daemon_view(target: &LockTarget) -> Option<buildlock_proto::LockInfo> {
    let path = buildlock::daemon_key(target)?.display().to_string();
    match buildlock::ask_daemon(None, &buildlock_proto::Request::Status { path: Some(path) }) {
        Ok(buildlock_proto::Reply::Status { locks }) => locks.into_iter().next(),
        _ => None,
    }
}

/// Removes a stale lock; raises `Error` (refusing) if a live holder has it. Returns what was
/// done, in words.
#[pyfunction]
#[pyo3(signature = (name_or_path, lock_dir=None, soft=false, stale_after=None))]
fn break_lock(
    py: Python<'_>,
    name_or_path: &str,
    lock_dir: Option<PathBuf>,
    soft: bool,
    stale_after: Option<f64>,
) -> PyResult<String> {
    let opts = disk_opts(py, soft, stale_after)?;
    let target = resolve(py, name_or_path, lock_dir)?;
    match py.detach(|| buildlock_disk::break_lock(&target, &opts, false)) {
        Ok(buildlock_disk::Broken::NotHeld { cleaned: Some(c) }) => {
            Ok(format!("lock {} is not held; {c}", target.name))
        }
        Ok(buildlock_disk::Broken::NotHeld { cleaned: None }) => {
            Ok(format!("lock {} is not held; nothing to do", target.name))
        }
        Ok(buildlock_disk::Broken::Broken { reason }) => {
            Ok(format!("removed stale lock {} ({reason})", target.path.display()))
        }
        Err(e) => Err(to_py(py, &e.into())),
    }
}

/// The `buildlock-client` command, with `argv` (the first is the program name). `self_command`
/// runs it again (interpreter and script), for the keeper `acquire` starts. Returns the exit status.
#[pyfunction]
fn cli_main(py: Python<'_>, argv: Vec<OsString>, self_command: Vec<OsString>) -> u8 {
    buildlock_cli::set_self_command(self_command);
    py.detach(|| buildlock_cli::exit_status(buildlock_cli::main_from(argv)))
}

/// The `buildlockd` daemon, with `argv` (the first is the program name). Returns the exit status.
#[pyfunction]
fn daemon_main(py: Python<'_>, argv: Vec<OsString>) -> u8 {
    py.detach(|| buildlock_cli::exit_status(buildlockd::main_from(argv)))
}

#[pymodule]
fn _buildlock(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Lock>()?;
    m.add_function(wrap_pyfunction!(status, m)?)?;
    m.add_function(wrap_pyfunction!(break_lock, m)?)?;
    m.add_function(wrap_pyfunction!(cli_main, m)?)?;
    m.add_function(wrap_pyfunction!(daemon_main, m)?)?;
    Ok(())
}
