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
use std::process::{Command, ExitCode, Stdio};
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

/// What a keeper file says: the keeper's pid and start time. `Ok(None)`: no file. `Err`: a file
/// that is not a keeper file (a link, a FIFO, garbage), which is left alone.
fn read_keeper_file(file: &Path) -> Result<Option<ProcessIdentity>, String> {
    let mut text = String::new();
    match buildlock_sys::fs::open_regular_nonblocking(file, 4096) {
        Ok(f) => (&f).read_to_string(&mut text).map_err(|e| e.to_string())?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let mut it = text.split_whitespace().map(|w| w.parse::<u64>().ok());
    match (it.next().flatten(), it.next().flatten(), it.next()) {
        (Some(pid), Some(start), None) if pid > 0 && pid <= u64::from(u32::MAX) => {
            Ok(Some(ProcessIdentity { pid: pid as u32, start_time: (start != 0).then_some(start), boot_id: None }))
        }
        _ => Err("it does not hold a keeper's pid and start time".into()),
    }
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
    let keeps = args.iter().any(|a| a == "__keep") && args.windows(2).any(|w| w[0] == "--pid" && w[1] == pid_arg);
    if keeps {
        Ok(())
    } else {
        Err(format!("it is not a buildlock keeper for pid {pid} (it runs `{}`)", args.join(" ")))
    }
}

pub(crate) fn acquire(cx: &Context, args: AcquireArgs) -> ExitCode {
    if let Err(e) = cx.target(&args.target) {
        return fail(&e);
    }
    let pid = args.pid.unwrap_or_else(parent_pid);
    if buildlock_sys::process_state(&buildlock_sys::identify(pid)) == ProcessState::Dead {
        return fail(&format!("process {pid} does not exist; pass the pid of a running process with --pid"));
    }
    let mut cmd = match std::env::current_exe() {
        Ok(exe) => Command::new(exe),
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
        None => fail(&"the keeper process died before taking the lock"),
    }
}

/// The keeper itself (`__keep`).
pub(crate) fn keep(cx: &Context, args: AcquireArgs) -> ExitCode {
    let target = match cx.target(&args.target) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let Some(pid) = args.pid else { return fail(&"__keep needs --pid") };
    let who = buildlock_sys::command_line(pid).unwrap_or_else(|| format!("pid {pid}"));
    let mut opts = args.lock.options(cx, who);
    opts.bind_pid = Some(pid);
    // Signals that ask us to let go (release sends SIGTERM); registered before the lock is ours.
    let (sig_rd, sig_wr) = match std::os::unix::net::UnixStream::pair() {
        Ok(p) => p,
        Err(e) => return fail(&format!("cannot create a signal pipe: {e}")),
    };
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT, signal_hook::consts::SIGHUP] {
        if let Err(e) = signal_hook::low_level::pipe::register(sig, sig_wr.try_clone().expect("dup")) {
            return fail(&format!("cannot handle signals: {e}"));
        }
    }
    let lease = match buildlock::acquire(&target, &opts, &mut |w| {
        eprintln!(
            "buildlock-client: waiting for lock {} ({}), held by {}",
            target.name,
            target.path.display(),
            w.holder
        )
    }) {
        Ok(l) => l,
        Err(e) if e.is_conflict() => {
            eprintln!("buildlock-client: {e}");
            return ExitCode::from(args.lock.conflict_exit_code);
        }
        Err(e) => return fail(&e),
    };
    let me = buildlock_sys::current_process();
    let file = keeper_file(&target, pid);
    let record = format!("{} {}\n", me.pid, me.start_time.unwrap_or(0));
    if let Err(e) = buildlock_sys::fs::replace_file(&file, record.as_bytes()) {
        drop(lease);
        return fail(&format!("cannot write {}: {e}", file.display()));
    }
    println!("ok token={}", lease.token());
    let _ = std::io::stdout().flush();
    // From here on we hold no pipe or terminal of the caller's.
    let _ = buildlock_sys::ipc::stdio_to_null();
    let pidfd = buildlock_sys::ipc::pidfd_open(pid).ok().flatten();
    let target_pid = buildlock_sys::identify(pid);
    loop {
        let mut fds = vec![sig_rd.as_fd()];
        if let Some(p) = &pidfd {
            fds.push(p.as_fd());
        }
        // Without a pidfd, look at the process every 200 ms.
        let step = pidfd.is_none().then(|| std::time::Duration::from_millis(200));
        match buildlock_sys::ipc::wait_readable(&fds, step) {
            Ok(Some(_)) => break,
            Ok(None) if buildlock_sys::process_state(&target_pid) == ProcessState::Dead => break,
            Ok(None) => {}
            Err(_) => break,
        }
    }
    let result = lease.release();
    if read_keeper_file(&file).is_ok_and(|k| k.is_some_and(|k| k.pid == me.pid)) {
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

pub(crate) fn release(cx: &Context, pid: Option<u32>, target: &str) -> ExitCode {
    let target = match cx.target(target) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let pid = pid.unwrap_or_else(parent_pid);
    let file = keeper_file(&target, pid);
    // A keeper that was stopped here: the lock is released, unless it died (killed) before it
    // could let go of its daemon lease, which the request to the daemon below then releases.
    let mut stopped_keeper = false;
    match read_keeper_file(&file) {
        Ok(Some(k)) => match is_our_keeper(&k, pid) {
            Ok(()) => {
                if let Err(e) = buildlock_sys::send_signal(k.pid, signal_hook::consts::SIGTERM) {
                    return fail(&format!("cannot stop the keeper (pid {}) of lock {}: {e}", k.pid, target.name));
                }
                match buildlock_sys::ipc::wait_exit(k.pid, Some(KEEPER_EXIT_WAIT)) {
                    Ok(true) | Err(_) => stopped_keeper = true,
                    Ok(false) => {
                        eprintln!(
                            "buildlock-client: the keeper (pid {}) of lock {} did not exit within {}s of being \
                             asked to; the lock may still be held: see `buildlock-client status {}`",
                            k.pid,
                            target.name,
                            KEEPER_EXIT_WAIT.as_secs(),
                            target.name
                        );
                        return ExitCode::from(1);
                    }
                }
            }
            Err(why) if buildlock_sys::process_state(&k) == ProcessState::Dead => {
                tracing::debug!("keeper file {} names pid {}: {why}", file.display(), k.pid);
                let _ = std::fs::remove_file(&file);
            }
            Err(why) => {
                // Somebody else's process: never signalled. The file stays for a human to judge.
                eprintln!(
                    "buildlock-client: warning: {} names pid {} as the keeper of lock {}, but {why}; \
                     that process is left alone",
                    file.display(),
                    k.pid,
                    target.name
                );
            }
        },
        Ok(None) => {}
        Err(why) => {
            eprintln!("buildlock-client: warning: {} is not a keeper file ({why}); it is left alone", file.display())
        }
    }
    // Perhaps another client bound it to PID through the daemon, its keeper died before it
    // released it, or a daemon recovered it from its journal after the keeper and its
    // predecessor died.
    let mut released = false;
    if cx.connect != buildlock::Connect::Direct {
        // As the lock was named when taken: the directory resolved, a link at the lock never followed.
        let path = buildlock::daemon_key(&target).unwrap_or(target.path.clone()).display().to_string();
        let req = buildlock_proto::Request::ReleasePid { path, pid };
        released =
            matches!(buildlock::ask_daemon(Some(&cx.runtime_dir), &req), Ok(buildlock_proto::Reply::Released { .. }));
    }
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
