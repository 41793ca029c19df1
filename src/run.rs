//! `run`: hold a lock exactly while a command runs.
//!
//! Order matters: the lock is taken before CMD starts and released only after CMD has exited.
//!
//! A build's lock lives as long as the build, as with `flock(1)`: CMD inherits the locked
//! descriptor (Linux, OS locks, in both modes), so if `run` is killed the lock stays held until
//! CMD and every process it started that still holds the descriptor have exited. The metadata
//! names CMD as the holder (and `run` as the process that handed it over), so no tool takes the
//! dead `run` for the holder. Through the daemon the lease is also bound to CMD's process.
//! When CMD exits, `run` releases the lock for every copy at once, even if a background
//! process CMD started (a compiler server) lives on with an inherited descriptor. Soft locks
//! have no descriptor to pass: there CMD is killed if `run` dies (Linux: `PR_SET_PDEATHSIG`).
//!
//! CMD's environment gains `BUILDLOCK_TOKEN`, the lease's fencing token.
//!
//! Signals: Ctrl+C reaches CMD from the terminal directly (same process group); `run` ignores
//! SIGINT and releases the lock once CMD has exited. SIGTERM, SIGHUP and SIGQUIT sent to `run`
//! are passed on to CMD. No helper thread is started: each costs more than the lock itself.

use std::io::{IsTerminal, Write};
use std::process::{Command, ExitCode};
use std::time::Duration;

use crate::{fail, Context, RunArgs};

pub(crate) fn run(cx: &Context, args: RunArgs) -> ExitCode {
    let target = match cx.target(&args.target) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let command_line = args.cmd.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ");
    let mut opts = args.lock.options(cx, command_line);
    // `wait_for` below checks the lock file once a second itself, where it can (Linux): one
    // thread less per `run`, which costs more than the lock.
    opts.watch = !cfg!(target_os = "linux");
    let mut notice = WaitNotice::new(&target.name, &target.path.display().to_string());
    let mut extras = crate::history::WaitExtras::new();
    let mut lease = match buildlock::acquire(&target, &opts, &mut |w| {
        let holder = format!("{}{}", w.holder, extras.describe(&target, w));
        notice.show(&holder, w.waited)
    }) {
        Ok(l) => l,
        Err(e) if e.is_conflict() => {
            notice.finish();
            eprintln!("buildlock-client: {e}");
            return ExitCode::from(args.lock.conflict_exit_code);
        }
        Err(e) => {
            notice.finish();
            return fail(&e);
        }
    };
    notice.finish();

    let mut cmd = Command::new(&args.cmd[0]);
    cmd.args(&args.cmd[1..]).env("BUILDLOCK_TOKEN", lease.token().to_string());
    let passed = lease.os_file().is_some_and(|file| buildlock_sys::pass_to_child(&mut cmd, file));
    if !passed && !buildlock_sys::kill_on_parent_death(&mut cmd) {
        tracing::debug!("this platform cannot stop CMD if buildlock-client is killed");
    }
    let forward = signals::Forwarder::install();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            drop(lease);
            eprintln!("buildlock-client: cannot run {}: {e}", args.cmd[0].to_string_lossy());
            return ExitCode::from(if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 });
        }
    };
    forward.set_child(child.id());
    // CMD holds the lock now (its inherited descriptor; through the daemon, the binding too):
    // the metadata names it, so that nobody takes a killed `run` for a dead holder.
    if let Err(e) = lease.bind_pid(child.id()) {
        tracing::warn!("cannot name the command's process as the lock's holder: {e}");
    }
    let status = wait_for(&mut child, &lease);
    forward.set_child_exited();
    let code = match status {
        Ok(s) => exit_code(&s),
        Err(e) => {
            eprintln!("buildlock-client: cannot wait for {}: {e}", args.cmd[0].to_string_lossy());
            1
        }
    };
    match lease.release() {
        Ok(()) => ExitCode::from(code),
        Err(e) => {
            eprintln!("buildlock-client: error: {e}");
            ExitCode::from(if code == 0 { 1 } else { code })
        }
    }
}

/// Waits for CMD, checking meanwhile (Linux: every second, on a pidfd) that the lock file was
/// not deleted or replaced under us, and saying so at once if it was.
fn wait_for(child: &mut std::process::Child, lease: &buildlock::Lease) -> std::io::Result<std::process::ExitStatus> {
    #[cfg(target_os = "linux")]
    if let Ok(Some(pidfd)) = buildlock_sys::ipc::pidfd_open(child.id()) {
        use std::os::fd::AsFd;
        let mut reported = false;
        loop {
            match buildlock_sys::ipc::wait_readable(&[pidfd.as_fd()], Some(Duration::from_secs(1))) {
                Ok(None) if !reported => {
                    if let Err(e) = lease.check() {
                        eprintln!("buildlock-client: error: {e}");
                        reported = true;
                    }
                }
                Ok(None) => {}
                Ok(Some(_)) | Err(_) => break,
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = lease;
    child.wait()
}

/// CMD's exit status as a shell reports it: its code, or 128+N for death by signal N.
fn exit_code(status: &std::process::ExitStatus) -> u8 {
    if let Some(code) = status.code() {
        return code as u8;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return (128 + sig) as u8;
        }
    }
    1
}

/// The "waiting for lock" message: printed once after about a second; on a terminal, kept up to
/// date in place until the lock is ours.
struct WaitNotice {
    name: String,
    path: String,
    tty: bool,
    shown: bool,
}

impl WaitNotice {
    fn new(name: &str, path: &str) -> Self {
        WaitNotice { name: name.to_owned(), path: path.to_owned(), tty: std::io::stderr().is_terminal(), shown: false }
    }

    fn show(&mut self, holder: &str, waited: Duration) {
        let text = format!("buildlock-client: waiting for lock {} ({}), held by {holder}", self.name, self.path);
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[K{text} [waited {}s]", waited.as_secs());
            let _ = err.flush();
        } else if !self.shown {
            let _ = writeln!(err, "{text}");
        }
        self.shown = true;
    }

    fn finish(&mut self) {
        if self.tty && self.shown {
            eprintln!();
        }
    }
}

#[cfg(unix)]
mod signals {
    //! Forwarding without a thread: the handlers themselves pass SIGTERM, SIGHUP and SIGQUIT on
    //! to CMD (kill(2) is async-signal-safe) and swallow SIGINT, which the terminal delivers to
    //! CMD itself. Signals that come before CMD starts are kept and passed on once it has.

    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};

    /// CMD's pid while it runs, else 0.
    static CHILD: AtomicU32 = AtomicU32::new(0);
    /// Signals (as bits) that came while no CMD ran.
    static PENDING: AtomicU64 = AtomicU64::new(0);

    pub(super) struct Forwarder;

    impl Forwarder {
        pub(super) fn install() -> Forwarder {
            for sig in [SIGINT, SIGTERM, SIGHUP, SIGQUIT] {
                // SAFETY: the handler only reads and writes atomics and calls kill(2), all
                // async-signal-safe; it allocates nothing and takes no lock.
                let registered = unsafe {
                    signal_hook::low_level::register(sig, move || {
                        if sig == SIGINT {
                            return;
                        }
                        match CHILD.load(Ordering::SeqCst) {
                            0 => {
                                PENDING.fetch_or(1 << sig, Ordering::SeqCst);
                            }
                            pid => {
                                let _ = buildlock_sys::send_signal(pid, sig);
                            }
                        }
                    })
                };
                if let Err(e) = registered {
                    tracing::warn!("cannot handle signal {sig} ({e}); it may stop buildlock-client before CMD");
                }
            }
            Forwarder
        }

        /// CMD runs: pass on what came before. (Single-threaded: a handler runs either before
        /// the store, and its signal is in PENDING, or after it, and forwards it itself.)
        pub(super) fn set_child(&self, pid: u32) {
            CHILD.store(pid, Ordering::SeqCst);
            let pending = PENDING.swap(0, Ordering::SeqCst);
            for sig in 1..64 {
                if pending & (1 << sig) != 0 {
                    let _ = buildlock_sys::send_signal(pid, sig);
                }
            }
        }

        /// After CMD is reaped its pid may be reused: never signal it again.
        pub(super) fn set_child_exited(&self) {
            CHILD.store(0, Ordering::SeqCst);
        }
    }
}

#[cfg(windows)]
mod signals {
    /// Windows delivers Ctrl+C to every process on the console, CMD included: ignore it here
    /// and release the lock once CMD has exited. (Untested: CI runs Linux.)
    pub(super) struct Forwarder;

    impl Forwarder {
        pub(super) fn install() -> Forwarder {
            if let Err(e) = ctrlc::set_handler(|| {}) {
                tracing::warn!("cannot handle Ctrl+C ({e})");
            }
            Forwarder
        }

        pub(super) fn set_child(&self, _pid: u32) {}

        pub(super) fn set_child_exited(&self) {}
    }
}
