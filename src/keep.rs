//! `acquire --pid` and `release`: locks held on behalf of a shell script's process.
//!
//! `acquire` starts a keeper: this program again (`__keep`), in its own session, which takes the
//! lock (bound to PID as well, through the daemon), says `ok` and then holds the lock until PID
//! exits or `release` asks it to stop. The keeper records itself in `<lock file>.keeper-<PID>`
//! (its pid and start time) so that `release` can find it in every mode, daemon or not.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use buildlock_sys::{ProcessIdentity, ProcessState};

use crate::{fail, AcquireArgs, Context};

/// The process that ran us: the shell script in `buildlock-client acquire x`.
fn parent_pid() -> u32 {
    std::os::unix::process::parent_id()
}

fn keeper_file(target: &buildlock_disk::LockTarget, pid: u32) -> PathBuf {
    let mut p = target.path.clone().into_os_string();
    p.push(format!(".keeper-{pid}"));
    PathBuf::from(p)
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
    if let Err(e) = std::fs::write(&file, format!("{} {}\n", me.pid, me.start_time.unwrap_or(0))) {
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
    let _ = std::fs::remove_file(&file);
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
    let keeper = std::fs::read_to_string(&file).ok().and_then(|s| {
        let mut it = s.split_whitespace().map(|w| w.parse::<u64>().ok());
        let (k, start) = (it.next()??, it.next()??);
        Some(ProcessIdentity { pid: k as u32, start_time: (start != 0).then_some(start), boot_id: None })
    });
    if let Some(k) = keeper.filter(|k| buildlock_sys::process_state(k) != ProcessState::Dead) {
        if let Err(e) = buildlock_sys::send_signal(k.pid, signal_hook::consts::SIGTERM) {
            return fail(&format!("cannot stop the keeper (pid {}) of lock {}: {e}", k.pid, target.name));
        }
        let _ = buildlock_sys::ipc::wait_exit(k.pid, None);
        return ExitCode::SUCCESS;
    }
    let _ = std::fs::remove_file(&file);
    // Perhaps another client bound it to PID through the daemon.
    if cx.connect != buildlock::Connect::Direct {
        let path = target.path.canonicalize().unwrap_or(target.path.clone()).display().to_string();
        let req = buildlock_proto::Request::ReleasePid { path, pid };
        if let Ok(buildlock_proto::Reply::Released { .. }) = buildlock::ask_daemon(Some(&cx.runtime_dir), &req) {
            return ExitCode::SUCCESS;
        }
    }
    eprintln!("buildlock-client: lock {} is not held for pid {pid}", target.name);
    ExitCode::from(1)
}
