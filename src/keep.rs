//! `acquire --pid` and `release`: locks held on behalf of a shell script's process.
//!
//! `acquire` starts a keeper: this program again (`__keep`), in its own session, which takes the
//! lock (bound to PID as well, through the daemon), says `ok` and then holds the lock until PID
//! exits or `release` asks it to stop. The keeper records itself in `<lock file>.keeper-<PID>`
//! (its pid and start time) so that `release` can find it in every mode, daemon or not.
//!
//! The lock directory may be shared, so the keeper file is only a hint: it is written by creating
//! a new file and renaming it into place (never through a planted link), read without blocking,
//! and `release` signals the process it names only once that process is proven to be the keeper
//! (same start time, and running `__keep --pid PID`), then waits a bounded time for it to exit.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use buildlock_sys::{ProcessIdentity, ProcessState};

use crate::{fail, AcquireArgs, Context};

/// The process that ran us: the shell script in `buildlock-client acquire x`.
fn parent_pid() -> u32 {
    std::os::unix::process::parent_id()
}

/// How long `release` waits for the keeper to let go after asking it to.
const KEEPER_EXIT_WAIT: Duration = Duration::from_secs(30);

fn keeper_file(target: &buildlock_disk::LockTarget, pid: u32) -> PathBuf {
    let mut p = target.path.clone().into_os_string();
    p.push(format!(".keeper-{pid}"));
    PathBuf::from(p)
}

/// What a keeper file says: the keeper's pid and start time, then its shadow's if it has one
/// (one `pid start` line each). Empty: no file. `Err`: a file that is not a keeper file (a
/// link, a FIFO, garbage), which is left alone.
fn read_keeper_file(file: &Path) -> Result<Vec<ProcessIdentity>, String> {
    let mut text = String::new();
    match buildlock_sys::fs::open_regular_nonblocking(file, 4096) {
        Ok(f) => (&f).read_to_string(&mut text).map_err(|e| e.to_string())?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.to_string()),
    };
    let not_ours = || "it does not hold a keeper's pid and start time".to_owned();
    let nums: Vec<u64> =
        text.split_whitespace().map(|w| w.parse::<u64>().map_err(|_| not_ours())).collect::<Result<_, _>>()?;
    if nums.is_empty() || nums.len() > 4 || !nums.len().is_multiple_of(2) {
        return Err(not_ours());
    }
    nums.chunks(2)
        .map(|pair| match (pair[0], pair[1]) {
            (pid, start) if pid > 0 && pid <= u64::from(u32::MAX) => {
                Ok(ProcessIdentity { pid: pid as u32, start_time: (start != 0).then_some(start), boot_id: None })
            }
            _ => Err(not_ours()),
        })
        .collect()
}

/// Whether the keeper file at `file` names this process first (it is the keeper on record).
fn names_me(file: &Path) -> bool {
    read_keeper_file(file).is_ok_and(|ks| ks.first().is_some_and(|k| k.pid == std::process::id()))
}

/// Whether `k` is, provably, the keeper of a lock for `pid`: the very process recorded (its
/// start time matches) and running this program's `__keep --pid PID`.
fn is_our_keeper(k: &ProcessIdentity, pid: u32) -> Result<(), String> {
    if k.start_time.is_none() {
        return Err("the keeper file records no start time, so the process cannot be identified".into());
    }
    match buildlock_sys::process_state(k) {
        ProcessState::Alive => {}
        ProcessState::Dead => return Err("it is not running (or its pid now names another process)".into()),
        ProcessState::Unknown(why) => return Err(format!("it cannot be checked ({why})")),
    }
    let args = buildlock_sys::command_args(k.pid).ok_or("its command line cannot be read")?;
    let pid_arg = pid.to_string();
    let keeps = args.iter().any(|a| a == "__keep" || a == "__keep-shadow")
        && args.windows(2).any(|w| w[0] == "--pid" && w[1] == pid_arg);
    if keeps {
        Ok(())
    } else {
        Err(format!("it is not a buildlock keeper for pid {pid} (it runs `{}`)", args.join(" ")))
    }
}

pub(crate) fn acquire(cx: &Context, args: AcquireArgs) -> ExitCode {
    match cx.target(&args.target) {
        Err(e) => return fail(&e),
        // Never take a remote lock locally instead.
        Ok(t) if cx.backend_url(&t.name).is_some() => {
            return fail(&format!(
                "lock {} lives on a remote backend, where `acquire --pid` is not available yet; use `run {} -- CMD`",
                t.name, t.name
            ))
        }
        Ok(_) => {}
    }
    let pid = args.pid.unwrap_or_else(parent_pid);
    if buildlock_sys::process_state(&buildlock_sys::identify(pid)) == ProcessState::Dead {
        return fail(&format!("process {pid} does not exist; pass the pid of a running process with --pid"));
    }
    let mut cmd = match crate::self_command() {
        Ok(cmd) => cmd,
        Err(e) => return fail(&format!("cannot find this program to start a keeper: {e}")),
    };
    cmd.arg("--dir").arg(&cx.dir).arg("--runtime-dir").arg(&cx.runtime_dir);
    cmd.arg("--stale-after").arg(cx.opts.stale_after.as_secs_f64().to_string());
    if cx.connect == buildlock::Connect::Direct {
        cmd.arg("--no-daemon");
    }
    if cx.opts.backend == buildlock_disk::Backend::Soft {
        cmd.arg("--soft");
    }
    cmd.arg("__keep");
    let l = &args.lock;
    if l.shared {
        cmd.arg("--shared");
    }
    if l.nonblock {
        cmd.arg("--nonblock");
    }
    if let Some(w) = l.wait {
        cmd.arg("--wait").arg(w.as_secs_f64().to_string());
    }
    cmd.arg("-E").arg(l.conflict_exit_code.to_string());
    if let Some(op) = &l.operation {
        cmd.arg("--operation").arg(op);
    }
    cmd.arg("--pid").arg(pid.to_string()).arg(&args.target);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    buildlock_sys::ipc::detach(&mut cmd);
    let mut keeper = match cmd.spawn() {
        Ok(k) => k,
        Err(e) => return fail(&format!("cannot start a keeper process: {e}")),
    };
    // Pass on what the keeper says while it waits for the lock, until it says "ok".
    let stderr = keeper.stderr.take().expect("piped");
    let relay = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
        }
    });
    let mut line = String::new();
    let _ = BufReader::new(keeper.stdout.take().expect("piped")).read_line(&mut line);
    if line.starts_with("ok") {
        // The keeper holds the lock and has let go of our pipes; leave it running.
        let _ = relay.join();
        return ExitCode::SUCCESS;
    }
    let status = keeper.wait();
    let _ = relay.join();
    match status.ok().and_then(|s| s.code()) {
        Some(code) => ExitCode::from(code as u8),
        None => {
            // Killed before it said "ok": whatever it may have handed over (a shadow holding a
            // copy, a daemon lease bound to PID) must not outlive our answer that it failed.
            undo_failed_keeper(cx, &args.target, pid, keeper.id());
            fail(&"the keeper process died before taking the lock")
        }
    }
}

/// After a keeper died before saying "ok": stops its shadow, and releases a daemon lease it
/// bound to `pid`, waiting (a bounded time) for the daemon to have read everything the keeper
/// sent before it died.
fn undo_failed_keeper(cx: &Context, target: &str, pid: u32, keeper: u32) {
    let Ok(target) = cx.target(target) else { return };
    if let Err((_, why)) = stop_keepers(&target, pid) {
        eprintln!("buildlock-client: {why}");
    }
    if cx.connect == buildlock::Connect::Direct {
        return;
    }
    let rt = Some(cx.runtime_dir.as_path());
    for _ in 0..50 {
        if release_pid_through_daemon(cx, &target, pid) {
            return;
        }
        // Not (yet) bound: done, unless the daemon still holds a lease for the keeper or PID on
        // this lock (it has not read the dead keeper's last frames, a `Bind` perhaps, yet).
        let path = daemon_path(&target);
        let status = buildlock::ask_daemon(rt, &buildlock_proto::Request::Status { path: Some(path) });
        let held_for_pid = matches!(status, Ok(buildlock_proto::Reply::Status { locks })
            if locks.iter().any(|l| l.holders.iter().any(|h| h.pid == Some(pid) || h.pid == Some(keeper))));
        if !held_for_pid {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The path the daemon knows `target` by, as it was named when taken: the directory resolved, a
/// link at the lock never followed.
fn daemon_path(target: &buildlock_disk::LockTarget) -> String {
    buildlock::daemon_key(target).unwrap_or(target.path.clone()).display().to_string()
}

/// Asks the daemon (never starting one) to release a lease on `target` bound to `pid`; whether
/// it did.
fn release_pid_through_daemon(cx: &Context, target: &buildlock_disk::LockTarget, pid: u32) -> bool {
    let req = buildlock_proto::Request::ReleasePid { path: daemon_path(target), pid };
    matches!(buildlock::ask_daemon(Some(&cx.runtime_dir), &req), Ok(buildlock_proto::Reply::Released { .. }))
}

/// Stops every live process that the keeper file of `target` for `pid` names and that is
/// provably ours: the keeper, then its shadow (which took the lock over if the keeper was killed
/// before it let go; a keeper that released told its shadow to go). Processes that are not ours
/// are never signalled (a warning names them); the file goes once all it names are dead.
/// `Ok(true)`: one was stopped. `Err((exit code, message))`: one could not be.
fn stop_keepers(target: &buildlock_disk::LockTarget, pid: u32) -> Result<bool, (u8, String)> {
    let file = keeper_file(target, pid);
    let keepers = match read_keeper_file(&file) {
        Ok(k) => k,
        Err(why) => {
            eprintln!("buildlock-client: warning: {} is not a keeper file ({why}); it is left alone", file.display());
            return Ok(false);
        }
    };
    let mut stopped = false;
    let mut all_dead = !keepers.is_empty();
    for k in &keepers {
        match is_our_keeper(k, pid) {
            Ok(()) => {
                all_dead = false;
                if let Err(e) = buildlock_sys::send_signal(k.pid, signal_hook::consts::SIGTERM) {
                    let why = format!("error: cannot stop the keeper (pid {}) of lock {}: {e}", k.pid, target.name);
                    return Err((crate::EXIT_USAGE, why));
                }
                match buildlock_sys::ipc::wait_exit(k.pid, Some(KEEPER_EXIT_WAIT)) {
                    Ok(true) | Err(_) => stopped = true,
                    Ok(false) => {
                        let why = format!(
                            "the keeper (pid {}) of lock {} did not exit within {}s of being asked to; the lock \
                             may still be held: see `buildlock-client status {}`",
                            k.pid,
                            target.name,
                            KEEPER_EXIT_WAIT.as_secs(),
                            target.name
                        );
                        return Err((1, why));
                    }
                }
            }
            Err(why) if buildlock_sys::process_state(k) == ProcessState::Dead => {
                tracing::debug!("keeper file {} names pid {}: {why}", file.display(), k.pid);
            }
            Err(why) => {
                all_dead = false;
                // Somebody else's process: never signalled. The file stays for a human to judge.
                eprintln!(
                    "buildlock-client: warning: {} names pid {} as the keeper of lock {}, but {why}; that \
                     process is left alone",
                    file.display(),
                    k.pid,
                    target.name
                );
            }
        }
    }
    if all_dead {
        let _ = std::fs::remove_file(&file);
    }
    Ok(stopped)
}

/// The keeper itself (`__keep`).
pub(crate) fn keep(cx: &Context, args: AcquireArgs) -> ExitCode {
    let target = match cx.target(&args.target) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let Some(pid) = args.pid else { return fail(&"__keep needs --pid") };
    let who = buildlock_sys::command_line(pid).unwrap_or_else(|| format!("pid {pid}"));
    // The lease is bound to PID only once it is certain to be handed over (below): bound at
    // once, a keeper killed before it says "ok" would leave PID holding a lock that `acquire`
    // reported as not taken.
    let opts = args.lock.options(cx, who);
    // Signals that ask us to let go (release sends SIGTERM); registered before the lock is ours.
    let sig_rd = match release_signals() {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    // The script is named as the holder (and, through the daemon, the lease bound to it, which
    // the daemon confirms before we go on). A daemon that dies between the grant and the
    // binding leaves a lease that cannot be bound: let it go and ask again (the next daemon).
    let mut attempts = 0;
    // Leases given up before the script was told it held one (their tokens).
    let mut given_up = Vec::new();
    let lease = loop {
        let mut lease = match buildlock::acquire(&target, &opts, &mut |w| {
            eprintln!(
                "buildlock-client: waiting for lock {} ({}), held by {}",
                target.name,
                target.path.display(),
                w.holder
            )
        }) {
            Ok(l) => l,
            Err(e) => return crate::acquire_failed(&e, args.lock.conflict_exit_code),
        };
        match lease.bind_pid_confirmed(pid) {
            Ok(()) => break lease,
            Err(e @ (buildlock::Error::Protocol(_) | buildlock::Error::DaemonGone(_))) if attempts < 5 => {
                attempts += 1;
                tracing::info!("the daemon went away before lock {} was bound to pid {pid} ({e}); again", target.name);
                given_up.push(lease.token());
                drop(lease);
            }
            Err(e) => return fail(&format!("cannot bind lock {} to pid {pid}: {e}", target.name)),
        }
    };
    // Taken directly, the lock has no daemon to keep it if we are killed: a second process gets
    // a copy of the locked descriptor.
    let mut shadow = if lease.via_daemon() { None } else { start_shadow(cx, &args.target, pid, &lease) };
    let me = buildlock_sys::current_process();
    let file = keeper_file(&target, pid);
    let mut keepers = vec![me];
    keepers.extend(shadow.as_ref().map(|(child, _)| buildlock_sys::identify(child.id())));
    if let Err(e) = write_keeper_file(&file, &keepers) {
        drop(lease);
        return fail(&e);
    }
    // Committed: from here the shadow keeps the lock if we die (and `acquire`, if it never sees
    // our "ok", finds the shadow in the keeper file and stops it).
    if let Some((_, tell)) = &mut shadow {
        let _ = tell.write_all(SHADOW_HELD);
    }
    // A daemon that died after recording a binding it never confirmed leaves that lease in its
    // journal; the next daemon, finding the lock taken meanwhile, recorded it lost. The script
    // never held it: the record must not make its `release` report a loss.
    if buildlock_disk::lost::remove_if_token(&target, pid, &given_up) {
        tracing::info!("lock {}: cleared the loss recorded for a lease given up before pid {pid} held it", target.name);
    }
    println!("ok token={}", lease.token());
    let _ = std::io::stdout().flush();
    // From here on we hold no pipe or terminal of the caller's.
    let _ = buildlock_sys::ipc::stdio_to_null();
    let _ = wait_for_release(&sig_rd, None, pid);
    // Released for every copy, the shadow's included; then the shadow is told it may go.
    let result = lease.release_confirmed();
    if let Some((mut child, mut tell)) = shadow {
        let _ = tell.write_all(SHADOW_RELEASED);
        drop(tell);
        let _ = child.wait();
    }
    if names_me(&file) {
        let _ = std::fs::remove_file(&file);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(1)
        }
    }
}

/// What a keeper writes to its shadow once the lock is handed over to the script (from then on
/// the shadow keeps it if the keeper dies), and once it has released it.
const SHADOW_HELD: &[u8] = b"held\n";
const SHADOW_RELEASED: &[u8] = b"released\n";

fn write_keeper_file(file: &Path, keepers: &[ProcessIdentity]) -> Result<(), String> {
    let record: String = keepers.iter().map(|k| format!("{} {}\n", k.pid, k.start_time.unwrap_or(0))).collect();
    buildlock_sys::fs::replace_file(file, record.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", file.display()))
}

/// What ended a keeper's wait.
#[derive(PartialEq)]
enum Woke {
    /// A signal asking it to let go (`release`).
    Signal,
    /// The other descriptor it watched became readable.
    Other,
    /// The process it holds the lock for has exited.
    Gone,
}

/// Waits until we are asked to let go (a signal on `sig_rd`), `other` is readable, or `pid`
/// has exited.
fn wait_for_release(
    sig_rd: &std::os::unix::net::UnixStream,
    other: Option<std::os::fd::BorrowedFd<'_>>,
    pid: u32,
) -> Woke {
    let pidfd = buildlock_sys::ipc::pidfd_open(pid).ok().flatten();
    let target_pid = buildlock_sys::identify(pid);
    loop {
        let mut fds = vec![sig_rd.as_fd()];
        fds.extend(other);
        if let Some(p) = &pidfd {
            fds.push(p.as_fd());
        }
        // Without a pidfd, look at the process every 200 ms.
        let step = pidfd.is_none().then(|| std::time::Duration::from_millis(200));
        match buildlock_sys::ipc::wait_readable(&fds, step) {
            Ok(Some(0)) => return Woke::Signal,
            Ok(Some(1)) if other.is_some() => return Woke::Other,
            Ok(Some(_)) => return Woke::Gone,
            Ok(None) if buildlock_sys::process_state(&target_pid) == ProcessState::Dead => return Woke::Gone,
            Ok(None) => {}
            Err(_) => return Woke::Gone,
        }
    }
}

/// Signals that ask a keeper to let go (`release` sends SIGTERM), as a readable socket.
fn release_signals() -> Result<std::os::unix::net::UnixStream, String> {
    let (sig_rd, sig_wr) =
        std::os::unix::net::UnixStream::pair().map_err(|e| format!("cannot create a signal pipe: {e}"))?;
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT, signal_hook::consts::SIGHUP] {
        let wr = sig_wr.try_clone().map_err(|e| format!("cannot create a signal pipe: {e}"))?;
        signal_hook::low_level::pipe::register(sig, wr).map_err(|e| format!("cannot handle signals: {e}"))?;
    }
    Ok(sig_rd)
}

/// Starts the shadow of a keeper that took its lock directly (Linux, OS locks): a second
/// process holding a copy of the locked descriptor, so that a keeper killed while its script
/// runs does not free the lock. `None` where no copy can be passed (soft locks, other systems).
fn start_shadow(
    cx: &Context,
    target: &str,
    pid: u32,
    lease: &buildlock::Lease,
) -> Option<(std::process::Child, std::io::PipeWriter)> {
    use std::os::fd::AsRawFd;
    let file = lease.os_file()?;
    let mut cmd = crate::self_command().ok()?;
    let (rd, wr) = std::io::pipe().ok()?;
    cmd.arg("--dir").arg(&cx.dir).arg("--runtime-dir").arg(&cx.runtime_dir).arg("--no-daemon");
    cmd.args(["__keep-shadow", "--pid", &pid.to_string(), "--fd", &file.as_raw_fd().to_string(), target]);
    cmd.stdin(rd).stdout(Stdio::null()).stderr(Stdio::null());
    if !buildlock_sys::pass_to_child(&mut cmd, file) {
        return None;
    }
    buildlock_sys::ipc::detach(&mut cmd);
    match cmd.spawn() {
        Ok(child) => Some((child, wr)),
        Err(e) => {
            tracing::warn!("cannot start a second holder of the lock: {e}; if this keeper is killed, the lock is free");
            None
        }
    }
}

/// The shadow (`__keep-shadow`): holds the inherited descriptor `fd` of the lock its keeper
/// took for `pid`. When the keeper says it released, or `pid` exits, it goes. When the keeper
/// dies without saying so, it takes the keeper's place (the keeper file names it, `release`
/// stops it) and holds the lock until `pid` exits or it is asked to let go.
pub(crate) fn shadow(cx: &Context, pid: u32, fd: i32, target: &str) -> ExitCode {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let target = match cx.target(target) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    // SAFETY: the keeper passed us this descriptor (`pass_to_child`) and named it in `--fd`;
    // nothing else in this process owns it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    // The metadata the keeper wrote, naming `pid`: removed on release only if still the same.
    let meta_id =
        buildlock_disk::meta::read(&target.meta_path).valid().filter(|m| m.pid == pid).and_then(|m| m.id.clone());
    let sig_rd = match release_signals() {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let stdin = std::io::stdin();
    let keeper = keeper_file(&target, pid);
    let mut said = Vec::new();
    loop {
        match wait_for_release(&sig_rd, Some(stdin.as_fd()), pid) {
            // The script is gone: its keeper releases, or, if dead, our exit frees the last copy.
            Woke::Gone => return ExitCode::SUCCESS,
            // `release` (or `acquire` cleaning up) asks us only once the keeper is dead: let go.
            Woke::Signal => break,
            Woke::Other => {
                let mut buf = [0u8; 64];
                let n = (&stdin).read(&mut buf).unwrap_or(0);
                said.extend_from_slice(&buf[..n]);
                if said.windows(SHADOW_RELEASED.len()).any(|w| w == SHADOW_RELEASED) {
                    return ExitCode::SUCCESS;
                }
                if n > 0 {
                    continue;
                }
                // The keeper is gone without releasing. Before it handed the lock over, the
                // script was told it failed: our exit frees the lock. After: ours now.
                let committed = said.windows(SHADOW_HELD.len()).any(|w| w == SHADOW_HELD);
                if !committed || !buildlock_sys::holds_lock(&file) {
                    return ExitCode::SUCCESS;
                }
                tracing::warn!(
                    "the keeper of lock {} for pid {pid} died; its second holder keeps the lock",
                    target.name
                );
                let _ = write_keeper_file(&keeper, &[buildlock_sys::current_process()]);
                let _ = wait_for_release(&sig_rd, None, pid);
                break;
            }
        }
    }
    if let Some(id) = meta_id {
        let _ = buildlock_disk::meta::remove_if_ours(&target.meta_path, &id);
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = buildlock_sys::LockFile::from_inherited(file).unlock() {
        tracing::warn!("cannot unlock {}: {e}", target.path.display());
    }
    if names_me(&keeper) {
        let _ = std::fs::remove_file(&keeper);
    }
    ExitCode::SUCCESS
}

pub(crate) fn release(cx: &Context, pid: Option<u32>, target: &str) -> ExitCode {
    let target = match cx.target(target) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let pid = pid.unwrap_or_else(parent_pid);
    // A keeper that was stopped here: the lock is released, unless it died (killed) before it
    // could let go of its daemon lease, which the request to the daemon below then releases.
    let stopped_keeper = match stop_keepers(&target, pid) {
        Ok(stopped) => stopped,
        Err((code, why)) => {
            eprintln!("buildlock-client: {why}");
            return ExitCode::from(code);
        }
    };
    // Perhaps another client bound it to PID through the daemon, its keeper died before it
    // released it, or a daemon recovered it from its journal after the keeper and its
    // predecessor died.
    let released = cx.connect != buildlock::Connect::Direct && release_pid_through_daemon(cx, &target, pid);
    if report_lost(&target, pid) {
        return ExitCode::from(1);
    }
    if released || stopped_keeper {
        return ExitCode::SUCCESS;
    }
    eprintln!("buildlock-client: lock {} is not held for pid {pid}", target.name);
    ExitCode::from(1)
}

/// Tells the script whose lease was lost while it ran, and clears the record: `release` is where
/// a script learns that its critical section may not have been exclusive.
fn report_lost(target: &buildlock_disk::LockTarget, pid: u32) -> bool {
    match buildlock_disk::lost::read(target) {
        Some(lost) if lost.pid == pid => {
            eprintln!(
                "buildlock-client: error: lock {} ({}): {lost}; what this script did under the lock may have \
                 overlapped with another holder",
                target.name,
                target.path.display()
            );
            buildlock_disk::lost::remove(target);
            true
        }
        _ => false,
    }
}
