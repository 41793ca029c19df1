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
//!
//! `--max-hold`: a wedged CMD is stopped, never robbed. CMD then runs in a process group of its
//! own (as under `timeout(1)`), and `run` passes Ctrl+C on to it as well. Past the limit the
//! group gets SIGTERM, and SIGKILL after `--kill-after`; the lock is released only once CMD and
//! its group are gone, and `run` exits with [`EXIT_MAX_HOLD`].
//!
//! Remote locks (PostgreSQL): CMD inherits a copy of the server connection's socket instead of
//! a lock file, so the session (and the lock) lives while CMD does even if `run` is killed, and
//! CMD runs in a process group of its own. When the connection is lost (server restart,
//! network cut), the lock is gone or soon will be: unless `--on-lost=warn`, CMD's group gets
//! SIGTERM, SIGKILL after a quarter of the remote timeout (or `--kill-after`, if shorter), well
//! before the server can give the lock to another host, and `run` exits with [`EXIT_LOST`].
//! Through the daemon, CMD inherits the copy of the server session's socket that the daemon
//! attached to the grant: the session (and the lock) then outlives a killed daemon as well, and
//! `run` takes the daemon's death for a loss only once that socket shows the session ended.

use std::io::{IsTerminal, Write};
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::time::{Duration, Instant};

use crate::{fail, Context, RunArgs};

/// `run`'s exit code when CMD was stopped for holding the lock past `--max-hold`, as `timeout(1)`.
pub(crate) const EXIT_MAX_HOLD: u8 = 124;
/// `eprintln!` that cannot fail: once CMD runs, `run` must go on to stop it, release the lock
/// and wait for its group even if nobody reads its stderr any more (its parent killed, a closed
/// pipe), where `eprintln!` would panic and leave CMD running with a lock that is no longer held.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `run`'s exit code when CMD was stopped because its remote lock was lost.
pub(crate) const EXIT_LOST: u8 = 122;
/// How long CMD has between SIGTERM and SIGKILL when `--kill-after` is not given.
const DEFAULT_KILL_AFTER: Duration = Duration::from_secs(10);
/// How often the lock file is checked while CMD runs (Linux).
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The `--max-hold` limit of one `run`.
struct MaxHold {
    limit: Duration,
    kill_after: Duration,
}

pub(crate) fn run(cx: &Context, args: RunArgs) -> ExitCode {
    let target = match cx.target(&args.target) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let command_line = args.cmd.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ");
    let mut opts = args.lock.options(cx, command_line);
    opts.remote = match cx.remote_for(&target.name) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    // A max-hold from the command line, else from the config file's entry for this lock. The
    // daemon is told too, so that it stops CMD even if this process is killed.
    let max_hold = args
        .max_hold
        .or_else(|| cx.config.max_hold_for(&target.name))
        .map(|limit| MaxHold { limit, kill_after: args.kill_after.unwrap_or(DEFAULT_KILL_AFTER) });
    #[cfg(not(unix))]
    if max_hold.is_some() {
        eprintln!("buildlock-client: --max-hold is not supported on this platform yet (it stops process groups)");
        return ExitCode::from(crate::EXIT_USAGE);
    }
    opts.max_hold = max_hold.as_ref().map(|m| m.limit);
    opts.kill_after = max_hold.as_ref().map(|m| m.kill_after);
    let remote = opts.remote.as_ref().map(|s| s.display());
    // `wait_for` below checks the lock file once a second itself, where it can (Linux): one
    // thread less per `run`, which costs more than the lock.
    opts.watch = !cfg!(target_os = "linux");
    let place = remote.clone().unwrap_or_else(|| target.path.display().to_string());
    let mut notice = WaitNotice::new(&target.name, &place);
    let mut extras = crate::history::WaitExtras::new();
    let mut lease = match buildlock::acquire(&target, &opts, &mut |w| {
        let holder = format!("{}{}", w.holder, extras.describe(&target, w));
        notice.show(&holder, w.waited)
    }) {
        Ok(l) => l,
        Err(e) => {
            notice.finish();
            return crate::acquire_failed(&e, args.lock.conflict_exit_code);
        }
    };
    notice.finish();

    let mut cmd = Command::new(&args.cmd[0]);
    cmd.args(&args.cmd[1..]).env("BUILDLOCK_TOKEN", lease.token().to_string());
    // CMD inherits a copy of the locked descriptor (or of a remote lock's connection) made for
    // it (no closure between fork and exec, so std starts it with posix_spawn, far cheaper than
    // fork for a process this size; `run` starts no program from another thread meanwhile that
    // could inherit the copy).
    let copy = match lease.inherit_file().map(buildlock_sys::inheritable_copy_single_threaded) {
        Some(Ok(copy)) => copy,
        Some(Err(e)) => {
            tracing::debug!("cannot copy the locked descriptor for CMD ({e}); passing it the other way");
            None
        }
        None => None,
    };
    let passed =
        copy.is_some() || lease.inherit_file().is_some_and(|file| buildlock_sys::pass_to_child(&mut cmd, file));
    // A remote lease the daemon holds: CMD inherits a copy of the server session's socket
    // (or, from a daemon that attaches none, of `run`'s connection to the daemon, which ends the
    // lease only when every copy is closed), and the lease is bound to CMD below; so CMD keeps it
    // if `run` dies, even before the binding reached the daemon.
    let daemon_keeps = lease.via_daemon() && lease.remote_server().is_some();
    if !passed && !daemon_keeps && !buildlock_sys::kill_on_parent_death(&mut cmd) {
        tracing::debug!("this platform cannot stop CMD if buildlock-client is killed");
    }
    // A lost remote lock stops CMD's group within a quarter of the remote timeout.
    let lost_grace = match (&opts.remote, args.on_lost.as_str()) {
        (Some(s), "stop") => {
            let grace = buildlock_remote::Bounds { remote_timeout: s.remote_timeout() }.stop_grace();
            Some(args.kill_after.map_or(grace, |k| k.min(grace)))
        }
        _ => None,
    };
    let group = max_hold.is_some() || opts.remote.is_some();
    #[cfg(unix)]
    if group {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let forward = signals::Forwarder::install(group);
    let spawned = cmd.spawn();
    drop(copy);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            drop(lease);
            say!("buildlock-client: cannot run {}: {e}", args.cmd[0].to_string_lossy());
            return ExitCode::from(if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 });
        }
    };
    wait_after_spawn_in_tests();
    forward.set_child(child.id(), group);
    // A remote lock held without a daemon: should this process be killed, CMD keeps the session
    // (its inherited socket) with nobody to watch it, so a keeper process arms the kernel's guard
    // for CMD if this one dies before dismissing it.
    #[cfg(unix)]
    let guard = match (&opts.remote, lost_grace, lease.via_daemon()) {
        (Some(server), Some(_), false) => keep_guard(&lease, child.id(), server.remote_timeout()),
        _ => None,
    };
    stall_before_binding_in_tests();
    // CMD holds the lock now (its inherited descriptor; through the daemon, the binding too):
    // the metadata names it, so that nobody takes a killed `run` for a dead holder. A remote
    // lock that CMD must not outlive is guarded by the kernel from now on, too (through the
    // daemon: `bind_pid_stopping_on_loss`).
    let bound = match lost_grace {
        Some(_) => lease.bind_pid_stopping_on_loss(child.id()),
        None => lease.bind_pid(child.id()),
    };
    if let Err(e) = bound {
        tracing::warn!("cannot name the command's process as the lock's holder: {e}");
    }
    let (status, mut stopped) = wait_for(&mut child, &lease, max_hold.as_ref(), lost_grace, &target.name);
    // Killed by the kernel's guard: the server ended the session (the lock was free for others
    // from that moment), before this process had seen the loss. The guard fires on the server's
    // last words; its close follows them at once (a SIGKILL from elsewhere costs that wait).
    // The loss itself is said once, below: as the daemon saw it, else as the socket shows it.
    let mut guard_loss = None;
    // `wait_for` said it already, as it stopped the command.
    let loss_said = stopped == Some(Stopped::Lost);
    if let (None, Some(_), Ok(s)) = (stopped, lost_grace, &status) {
        if cfg!(target_os = "linux") && killed_by_sigkill(s) && lease.via_daemon() {
            guard_loss = lease.session_ended(Duration::from_secs(1));
            if guard_loss.is_some() {
                say!(
                    "buildlock-client: the command (pid {}) was killed (SIGKILL, by the kernel's guard on the lock's \
                     server session) the moment it lost lock {} (exit {EXIT_LOST})",
                    child.id(),
                    target.name
                );
                stopped = Some(Stopped::Lost);
            }
        }
    }
    forward.set_child_exited();
    #[cfg(unix)]
    if let Some(guard) = guard {
        // CMD is gone (and its group, if it was stopped): nothing for the guard to arm.
        guard.dismiss();
    }
    let code = match status {
        Ok(_) if stopped == Some(Stopped::MaxHold) => EXIT_MAX_HOLD,
        Ok(_) if stopped == Some(Stopped::Lost) => EXIT_LOST,
        Ok(s) => exit_code(&s),
        Err(e) => {
            say!("buildlock-client: cannot wait for {}: {e}", args.cmd[0].to_string_lossy());
            1
        }
    };
    match lease.release_confirmed() {
        Ok(()) => {
            if let Some(e) = guard_loss {
                say!("buildlock-client: error: {e}");
            }
            ExitCode::from(code)
        }
        Err(e) => {
            let said_again = loss_said && matches!(e, buildlock::Error::Remote(buildlock_remote::Error::Lost { .. }));
            if !said_again {
                say!("buildlock-client: error: {e}");
            }
            ExitCode::from(if code == 0 { 1 } else { code })
        }
    }
}

/// Whether `status` is that of a process killed by SIGKILL.
fn killed_by_sigkill(status: &ExitStatus) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        status.signal() == Some(SIGKILL)
    }
    #[cfg(not(unix))]
    {
        let _ = status;
        false
    }
}

/// Why `run` stopped CMD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stopped {
    MaxHold,
    Lost,
}

/// Waits for CMD, checking meanwhile (Linux: every second, on a pidfd) that the lock file was
/// not deleted or replaced under us (or, for a remote lock, that its connection lives), and
/// saying so at once if it was. With `--max-hold`, stops CMD's process group past the limit,
/// and with `lost_grace`, when a remote lock is lost; then returns only once the group is gone,
/// saying why it was stopped.
fn wait_for(
    child: &mut Child,
    lease: &buildlock::Lease,
    max_hold: Option<&MaxHold>,
    lost_grace: Option<Duration>,
    name: &str,
) -> (std::io::Result<ExitStatus>, Option<Stopped>) {
    let mut waiter = ChildWaiter::new(child, max_hold.is_some() || lost_grace.is_some());
    if !waiter.can_wait_in_steps() {
        return (child.wait(), None);
    }
    let mut why = None;
    let started = Instant::now();
    let pid = child.id();
    let mut reported = false;
    let mut stopping: Option<Stopping> = None;
    // A remote lock held through the daemon: should the daemon die, the kernel is set to guard
    // CMD (killed the moment the server session fails or the server ends it) in case this
    // process dies too. The daemon's connection is watched for it, unless `--on-lost=warn`.
    let mut daemon_conn = lost_grace.and_then(|_| lease.daemon_connection());
    let mut guard_pending = daemon_conn.is_some();
    let status = loop {
        let mut step = CHECK_EVERY;
        if let Some(s) = &mut stopping {
            step = step.min(s.step());
        } else if let Some(m) = max_hold {
            let now = Instant::now();
            match &mut stopping {
                None if now.duration_since(started) >= m.limit => {
                    say!(
                        "buildlock-client: the command (pid {pid}) has held lock {name} for {}, its --max-hold: \
                         stopping it (SIGTERM to its process group, SIGKILL after {}); the lock is released once it \
                         is gone",
                        human(m.limit),
                        human(m.kill_after)
                    );
                    stopping = Some(Stopping::start(pid, m.kill_after));
                    why = Some(Stopped::MaxHold);
                    let command = buildlock_sys::command_line(pid).unwrap_or_default();
                    let detail = format!("held for {}, its --max-hold", human(m.limit));
                    buildlock::history::stopped(lease.target(), pid, &command, &detail);
                    continue;
                }
                None => step = step.min(m.limit - now.duration_since(started)),
                Some(s) => step = step.min(s.step()),
            }
        }
        match waiter.wait(child, step, daemon_conn.as_ref()) {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if !reported => {
                let checked = lease.check();
                if guard_pending {
                    match lease.guard_if_unwatched(pid) {
                        Ok(true) => {
                            tracing::debug!("buildlockd is gone: the kernel guards the command (pid {pid}) now");
                            guard_pending = false;
                        }
                        Err(e) => {
                            say!("buildlock-client: warning: {e}");
                            guard_pending = false;
                        }
                        // Not gone, or not known to be yet (then looked at again every check).
                        Ok(false) => {}
                    }
                    // Hung up: nothing more to wake us for.
                    if !guard_pending || daemon_conn.as_ref().is_some_and(hung_up) {
                        daemon_conn = None;
                    }
                }
                if let Err(e) = checked {
                    say!("buildlock-client: error: {e}");
                    reported = true;
                    let remote_lost = matches!(e, buildlock::Error::Remote(buildlock_remote::Error::Lost { .. }));
                    if let (true, Some(grace), None) = (remote_lost, lost_grace, &stopping) {
                        say!(
                            "buildlock-client: stopping the command (pid {pid}) since it no longer holds lock {name}: \
                             SIGTERM to its process group, SIGKILL after {} (exit {EXIT_LOST}; --on-lost=warn lets it \
                             run on)",
                            human(grace)
                        );
                        stopping = Some(Stopping::start(pid, grace));
                        why = Some(Stopped::Lost);
                        continue;
                    }
                }
            }
            Ok(None) => {}
            Err(e) => break Err(e),
        }
    };
    match stopping {
        // CMD is gone; what it started in its group goes too before the lock is released.
        Some(mut s) => {
            s.wait_for_group();
            (status, why)
        }
        None => (status, None),
    }
}

/// Aims the kernel's guard on the session socket of `lease` (a remote lease held without a
/// daemon) at CMD `pid`'s group while CMD surely runs, and starts the keeper that arms it should
/// this process die before dismissing it, with the socket's `TCP_USER_TIMEOUT` at the unwatched
/// bound (nobody sends on it any more: only keepalives left unanswered can fail it). `None`
/// (said in the log) where it cannot: then a killed `run` leaves CMD unwatched.
#[cfg(unix)]
fn keep_guard(lease: &buildlock::Lease, pid: u32, remote_timeout: Duration) -> Option<buildlock_sys::ipc::GuardKeeper> {
    use std::os::fd::AsFd;
    let sock = lease.inherit_file()?;
    let user_timeout = buildlock_remote::Bounds { remote_timeout }.unwatched_user_timeout();
    let kept = buildlock_sys::ipc::aim_kill_switch(sock.as_fd(), pid).and_then(|aimed| match aimed {
        true => buildlock_sys::ipc::keep_guard_after_death(sock.as_fd(), Some(user_timeout)),
        false => Ok(None),
    });
    kept.unwrap_or_else(|e| {
        tracing::warn!(
            "cannot start the keeper of the kernel's guard for the command (pid {pid}): {e}; if this process is \
             killed, nothing watches the remote lock for it"
        );
        None
    })
}

/// Whether the daemon closed its end of connection `conn`.
fn hung_up(conn: &std::fs::File) -> bool {
    #[cfg(unix)]
    {
        use std::os::fd::AsFd;
        buildlock_sys::ipc::peer_closed(conn.as_fd())
    }
    #[cfg(not(unix))]
    {
        let _ = conn;
        false
    }
}

/// CMD past its `--max-hold`: SIGTERM sent to its process group, SIGKILL due at `kill_at`.
struct Stopping {
    pgid: u32,
    kill_at: Instant,
    killed: bool,
}

impl Stopping {
    /// SIGTERM to the group led by `pid` now, SIGKILL after `kill_after`.
    fn start(pid: u32, kill_after: Duration) -> Stopping {
        signal(pid, SIGTERM);
        Stopping { pgid: pid, kill_at: Instant::now() + kill_after, killed: false }
    }

    /// How long until the next thing to do (SIGKILL), at most a second.
    fn step(&mut self) -> Duration {
        if !self.killed && Instant::now() >= self.kill_at {
            self.kill();
        }
        match self.killed {
            true => CHECK_EVERY,
            false => self.kill_at.saturating_duration_since(Instant::now()).min(CHECK_EVERY),
        }
    }

    fn kill(&mut self) {
        say!("buildlock-client: the command's process group {} did not stop after SIGTERM: SIGKILL", self.pgid);
        signal(self.pgid, SIGKILL);
        self.killed = true;
    }

    /// Waits until no process of the group is left (SIGKILL at `kill_at` if any still runs).
    /// A process that survives SIGKILL for long (stuck in the kernel) is reported, and the lock
    /// is released anyway: a release ends the lock for every copy of the descriptor.
    fn wait_for_group(&mut self) {
        let mut pause = Duration::from_millis(1);
        let mut killed_at = None;
        while group_alive(self.pgid) {
            if Instant::now() >= self.kill_at && !self.killed {
                self.kill();
            }
            if self.killed {
                let since = *killed_at.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(5) {
                    say!(
                        "buildlock-client: processes of the command's group {} outlive SIGKILL (stuck in the kernel?); \
                         releasing the lock anyway",
                        self.pgid
                    );
                    return;
                }
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

#[cfg(unix)]
use signal_hook::consts::{SIGKILL, SIGTERM};
#[cfg(not(unix))]
const SIGTERM: i32 = 15;
#[cfg(not(unix))]
const SIGKILL: i32 = 9;

fn signal(pgid: u32, sig: i32) {
    if let Err(e) = buildlock_sys::signal_group(pgid, Some(sig)) {
        say!("buildlock-client: cannot signal the command's process group {pgid}: {e}");
    }
}

fn group_alive(pgid: u32) -> bool {
    buildlock_sys::signal_group(pgid, None).unwrap_or(false)
}

/// Waits for CMD in steps, so that `run` can act between them: on a pidfd (Linux), else by
/// polling `try_wait` (only with `--max-hold`: otherwise a plain blocking wait).
struct ChildWaiter {
    #[cfg(target_os = "linux")]
    pidfd: Option<std::os::fd::OwnedFd>,
    poll: bool,
}

impl ChildWaiter {
    fn new(child: &Child, poll: bool) -> ChildWaiter {
        #[cfg(target_os = "linux")]
        let pidfd = buildlock_sys::ipc::pidfd_open(child.id()).ok().flatten();
        #[cfg(not(target_os = "linux"))]
        let _ = child;
        ChildWaiter {
            #[cfg(target_os = "linux")]
            pidfd,
            poll,
        }
    }

    fn can_wait_in_steps(&self) -> bool {
        #[cfg(target_os = "linux")]
        if self.pidfd.is_some() {
            return true;
        }
        self.poll
    }

    /// CMD's status if it exited within `step`. With `hangup` (Linux), returns early, with
    /// `Ok(None)`, once that socket's peer has closed it.
    fn wait(
        &mut self,
        child: &mut Child,
        step: Duration,
        hangup: Option<&std::fs::File>,
    ) -> std::io::Result<Option<ExitStatus>> {
        #[cfg(target_os = "linux")]
        if let Some(pidfd) = &self.pidfd {
            use std::os::fd::AsFd;
            let woken = match hangup {
                Some(h) => buildlock_sys::ipc::wait_readable_or_hangup(pidfd.as_fd(), h.as_fd(), Some(step)),
                None => buildlock_sys::ipc::wait_readable(&[pidfd.as_fd()], Some(step)),
            };
            return match woken {
                Ok(None) | Ok(Some(1)) => Ok(None),
                Ok(Some(_)) | Err(_) => child.wait().map(Some),
            };
        }
        #[cfg(not(target_os = "linux"))]
        let _ = hangup;
        let until = Instant::now() + step;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
    }
}

/// `90s`, `2m5s`, `1h30m`: a duration as people write it.
fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    for (n, unit) in [(h, "h"), (m, "m"), (s, "s")] {
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    out
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

    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};

    /// CMD's pid while it runs, else 0.
    static CHILD: AtomicU32 = AtomicU32::new(0);
    /// CMD leads a process group of its own (`--max-hold`): signals go to the whole group, and
    /// SIGINT too, which the terminal no longer delivers to it.
    static GROUP: AtomicBool = AtomicBool::new(false);
    /// Signals (as bits) that came while no CMD ran.
    static PENDING: AtomicU64 = AtomicU64::new(0);

    pub(super) struct Forwarder;

    impl Forwarder {
        /// `group`: CMD will lead a process group of its own, so a SIGINT that comes before it
        /// starts is kept for it too (the terminal will not deliver it).
        pub(super) fn install(group: bool) -> Forwarder {
            GROUP.store(group, Ordering::SeqCst);
            for sig in [SIGINT, SIGTERM, SIGHUP, SIGQUIT] {
                // SAFETY: the handler only reads and writes atomics and calls kill(2), all
                // async-signal-safe; it allocates nothing and takes no lock.
                let registered = unsafe {
                    signal_hook::low_level::register(sig, move || {
                        let group = GROUP.load(Ordering::SeqCst);
                        if sig == SIGINT && !group {
                            return;
                        }
                        match CHILD.load(Ordering::SeqCst) {
                            0 => {
                                PENDING.fetch_or(1 << sig, Ordering::SeqCst);
                            }
                            pid => send(pid, sig, group),
                        }
                    })
                };
                if let Err(e) = registered {
                    tracing::warn!("cannot handle signal {sig} ({e}); it may stop buildlock-client before CMD");
                }
            }
            Forwarder
        }

        /// CMD runs (leading its own process group if `group`): pass on what came before.
        /// (Single-threaded: a handler runs either before the store, and its signal is in
        /// PENDING, or after it, and forwards it itself.)
        pub(super) fn set_child(&self, pid: u32, group: bool) {
            GROUP.store(group, Ordering::SeqCst);
            CHILD.store(pid, Ordering::SeqCst);
            let pending = PENDING.swap(0, Ordering::SeqCst);
            for sig in 1..64 {
                if pending & (1 << sig) != 0 && (sig != SIGINT || group) {
                    send(pid, sig, group);
                }
            }
        }

        /// After CMD is reaped its pid may be reused: never signal it again.
        pub(super) fn set_child_exited(&self) {
            CHILD.store(0, Ordering::SeqCst);
        }
    }

    /// Async-signal-safe: kill(2) or killpg(3), nothing else.
    fn send(pid: u32, sig: i32, group: bool) {
        let _ = match group {
            true => buildlock_sys::signal_group(pid, Some(sig)).map(drop),
            false => buildlock_sys::send_signal(pid, sig),
        };
    }
}

#[cfg(windows)]
mod signals {
    /// Windows delivers Ctrl+C to every process on the console, CMD included: ignore it here
    /// and release the lock once CMD has exited. (Untested: CI runs Linux.)
    pub(super) struct Forwarder;

    impl Forwarder {
        pub(super) fn install(_group: bool) -> Forwarder {
            if let Err(e) = ctrlc::set_handler(|| {}) {
                tracing::warn!("cannot handle Ctrl+C ({e})");
            }
            Forwarder
        }

        pub(super) fn set_child(&self, _pid: u32, _group: bool) {}

        pub(super) fn set_child_exited(&self) {}
    }
}

/// Test builds only: `BUILDLOCK_TEST_STALL_BEFORE_BIND` stops `run` for good between starting CMD
/// and binding the lease to it, so a test can kill it in that window (which is otherwise a few
/// microseconds wide) and check that CMD still keeps the lock.
fn stall_before_binding_in_tests() {
    #[cfg(debug_assertions)]
    if std::env::var_os("BUILDLOCK_TEST_STALL_BEFORE_BIND").is_some() {
        eprintln!("buildlock-client: stalled before binding the lease (BUILDLOCK_TEST_STALL_BEFORE_BIND)");
        loop {
            std::thread::park();
        }
    }
}

/// Test builds only: `BUILDLOCK_TEST_WAIT_AFTER_SPAWN=FIFO` holds `run` between starting CMD and
/// telling the signal forwarder about it, until the test writes to the FIFO and closes it: a
/// signal sent in that window must still reach CMD.
fn wait_after_spawn_in_tests() {
    #[cfg(debug_assertions)]
    if let Some(fifo) = std::env::var_os("BUILDLOCK_TEST_WAIT_AFTER_SPAWN") {
        use std::io::Read;
        eprintln!("buildlock-client: waiting after starting CMD (BUILDLOCK_TEST_WAIT_AFTER_SPAWN)");
        // Opening blocks until the test opens the other end; reading ends when it closes it.
        if let Ok(mut f) = std::fs::File::open(fifo) {
            let _ = f.read_to_end(&mut Vec::new());
        }
    }
}
