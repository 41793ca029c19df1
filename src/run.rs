//! `run`: hold a lock exactly while a command runs.
//!
//! Order matters: the lock is taken before CMD starts and released only after CMD has exited.
//! Through the daemon the lease is also bound to CMD's process, so if `run` is killed the daemon
//! keeps the lock until CMD is gone too.
//! CMD never inherits the lock's descriptor (it is close-on-exec), so CMD's own background
//! children cannot keep the lock after CMD is gone. If `run` itself is killed, CMD is killed too
//! (Linux: `PR_SET_PDEATHSIG`), so CMD never runs unlocked.
//!
//! Signals: Ctrl+C reaches CMD from the terminal directly (same process group); `run` ignores
//! SIGINT and releases the lock once CMD has exited. SIGTERM, SIGHUP and SIGQUIT sent to `run`
//! are passed on to CMD.

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
    let opts = args.lock.options(cx, command_line);
    let mut notice = WaitNotice::new(&target.name, &target.path.display().to_string());
    let mut lease = match buildlock::acquire(&target, &opts, &mut |w| notice.show(&w.holder, w.waited)) {
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
    cmd.args(&args.cmd[1..]);
    if !buildlock_sys::kill_on_parent_death(&mut cmd) {
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
    // Through the daemon, the lease now also lasts until CMD has exited, even if we are killed.
    if let Err(e) = lease.bind_pid(child.id()) {
        tracing::warn!("cannot bind the lock to the command's process: {e}");
    }
    let status = child.wait();
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
    use std::sync::{Arc, Mutex};

    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
    use signal_hook::iterator::Signals;

    #[derive(Default)]
    struct State {
        child: Option<u32>,
        exited: bool,
        /// Signals that came before CMD was started, passed on once it is.
        pending: Vec<i32>,
    }

    /// Passes SIGTERM, SIGHUP and SIGQUIT on to CMD; swallows SIGINT, which the terminal
    /// delivers to CMD itself.
    pub(super) struct Forwarder {
        state: Arc<Mutex<State>>,
    }

    impl Forwarder {
        pub(super) fn install() -> Forwarder {
            let state = Arc::new(Mutex::new(State::default()));
            match Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT]) {
                Ok(mut signals) => {
                    let st = state.clone();
                    let _ = std::thread::Builder::new().name("buildlock-signals".into()).spawn(move || {
                        for sig in signals.forever() {
                            if sig == SIGINT {
                                continue;
                            }
                            let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                            match s.child {
                                Some(pid) if !s.exited => {
                                    let _ = buildlock_sys::send_signal(pid, sig);
                                }
                                Some(_) => {}
                                None => s.pending.push(sig),
                            }
                        }
                    });
                }
                Err(e) => tracing::warn!("cannot handle signals ({e}); Ctrl+C may stop buildlock-client before CMD"),
            }
            Forwarder { state }
        }

        pub(super) fn set_child(&self, pid: u32) {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.child = Some(pid);
            for sig in std::mem::take(&mut s.pending) {
                let _ = buildlock_sys::send_signal(pid, sig);
            }
        }

        /// After CMD is reaped its pid may be reused: never signal it again.
        pub(super) fn set_child_exited(&self) {
            self.state.lock().unwrap_or_else(|e| e.into_inner()).exited = true;
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
