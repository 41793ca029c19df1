//! The daemon cannot be worn down: waits on a lock held outside the daemon leave no thread
//! behind, a signal or `daemon stop` ends it whatever is blocked, idle exit never races a
//! connecting client, and its limits answer with a message naming the setting.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use buildlock_proto::{AcquireRequest, ErrorCode, Hello, Reply, Request, WaitFor};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::util::{is_dead, wait_dead, wait_until, Env, Proc};

/// Starts the test's daemon with extra environment (limits, idle exit); returns its pid.
fn start_daemon_with(env: &Env, vars: &[(&str, &str)]) -> u32 {
    let mut c = env.cli();
    c.args(["daemon", "start"]).envs(vars.iter().copied()).stdin(Stdio::null());
    let out = c.output().unwrap();
    assert!(out.status.success(), "daemon start: {}", String::from_utf8_lossy(&out.stderr));
    env.daemon_pid().expect("daemon pid file")
}

/// `run NAME` on the lock files directly (a holder outside the daemon), held until released.
fn hold_direct(env: &Env, name: &str) -> Proc {
    let mut c = env.cli();
    c.env("BUILDLOCK_NO_DAEMON", "1").args(["run", name, "--", "sh", "-c", "echo locked; read x; echo released"]);
    let mut p = Proc::spawn(c);
    p.expect_line("locked");
    p
}

/// A raw connection to the test's daemon, hello done.
fn raw_client(env: &Env) -> UnixStream {
    let mut s = UnixStream::connect(env.runtime().join("buildlockd.sock")).unwrap();
    s.write_all(&buildlock_proto::encode(&Hello::new(std::process::id())).unwrap()).unwrap();
    let welcome = buildlock_proto::read_frame(&mut s).unwrap().unwrap();
    buildlock_proto::check_welcome(&welcome).unwrap();
    s
}

fn acquire(s: &mut UnixStream, path: &std::path::Path, wait: WaitFor) {
    // Every lease on a connection has an id of its own.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let req = Request::Acquire(AcquireRequest {
        operation: "test".into(),
        command: "test".into(),
        ..crate::util::acquire_request(
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            path.display().to_string(),
            wait,
        )
    });
    s.write_all(&buildlock_proto::encode(&req).unwrap()).unwrap();
}

fn reply(s: &mut UnixStream) -> Reply {
    buildlock_proto::read_message(s).unwrap().expect("the daemon closed the connection")
}

/// Reads replies until the daemon says it waits for a holder outside it.
#[track_caller]
fn expect_waiting_for_outside(s: &mut UnixStream) {
    loop {
        match reply(s) {
            Reply::Waiting { position: 0, holder: Some(h), .. } if h.outside => return,
            Reply::Waiting { .. } => {}
            other => panic!("expected to wait for an outside holder, got {other:?}"),
        }
    }
}

/// The daemon's thread count, from `/proc/PID/status`.
fn threads(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Threads:")).unwrap();
    line["Threads:".len()..].trim().parse().unwrap()
}

/// Waits up to `guard` for `pid` to die; whether it did. A hang guard, not a timing check.
fn died_within(pid: u32, guard: Duration) -> bool {
    let start = Instant::now();
    while !is_dead(pid) {
        if start.elapsed() > guard {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

#[test]
fn six_hundred_timed_out_waits_on_an_outside_holder_leave_no_thread_behind() {
    let env = Env::daemon();
    let pid = start_daemon_with(&env, &[]);
    let before = threads(pid);
    let x = hold_direct(&env, "x");
    let mut s = raw_client(&env);
    for _ in 0..600 {
        acquire(&mut s, &env.lock_file("x"), WaitFor::Millis(1));
        expect_waiting_for_outside(&mut s);
        match reply(&mut s) {
            Reply::Error(e) if e.code == ErrorCode::Timeout => {}
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
    // One thread waits in the kernel for x, however many gave up on it.
    let after = threads(pid);
    assert!(after <= before + 2, "{after} threads after 600 timed-out waits ({before} before)");
    // Another lock held outside the daemon is still waited for, and granted when it frees.
    let y = hold_direct(&env, "y");
    let mut w = raw_client(&env);
    acquire(&mut w, &env.lock_file("y"), WaitFor::Forever);
    expect_waiting_for_outside(&mut w);
    y.release();
    assert!(matches!(reply(&mut w), Reply::Granted { .. }), "the waiter on y was not granted");
    env.run(&["run", "-n", "z", "--", "true"]).assert_code(0);
    // Once x is free, its waiter thread takes it, finds no taker, lets go and ends.
    x.release();
    wait_until(|| threads(pid) <= before);
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(0);
}

#[test]
fn sigterm_ends_a_daemon_whose_waiters_are_blocked_on_an_outside_holder() {
    let env = Env::daemon();
    let pid = start_daemon_with(&env, &[]);
    let _x = hold_direct(&env, "x");
    let _y = hold_direct(&env, "y");
    let mut waiters = Vec::new();
    for name in ["x", "y"] {
        let mut s = raw_client(&env);
        acquire(&mut s, &env.lock_file(name), WaitFor::Forever);
        expect_waiting_for_outside(&mut s);
        waiters.push(s);
    }
    // A second waiter on x queues behind the first, which waits in the kernel.
    let mut s = raw_client(&env);
    acquire(&mut s, &env.lock_file("x"), WaitFor::Forever);
    match reply(&mut s) {
        Reply::Waiting { position: 1, .. } => {}
        other => panic!("expected to be next in line for x, got {other:?}"),
    }
    waiters.push(s);
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    // The promise is 2 s; the guard is generous so that only a hang fails.
    let died = died_within(pid, Duration::from_secs(10));
    if !died {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    assert!(died, "buildlockd did not exit after SIGTERM while waiting for outside holders");
    assert!(!env.runtime().join("buildlockd.pid").exists(), "pid file left behind: not a clean exit");
}

#[test]
fn daemon_stop_fails_when_the_daemon_does_not_exit() {
    let env = Env::daemon();
    let pid = start_daemon_with(&env, &[]);
    let daemon = Pid::from_raw(pid as i32);
    kill(daemon, Signal::SIGSTOP).unwrap();
    let out = env.run(&["daemon", "stop"]);
    kill(daemon, Signal::SIGCONT).unwrap();
    assert_ne!(out.code(), 0, "daemon stop succeeded against a stopped daemon: {}", out.stdout);
    out.assert_stderr_has(&format!("buildlockd (pid {pid})")).assert_stderr_has("does not answer");
    assert!(!out.stdout.contains("no buildlockd is running"), "{}", out.stdout);
    // Resumed, it stops as asked.
    env.run(&["daemon", "stop"]).assert_code(0).assert_stdout_has(&format!("stopped buildlockd (pid {pid})"));
    assert!(is_dead(pid));
}

#[test]
fn past_the_lease_limit_the_next_lease_gets_a_clear_error_and_others_keep_working() {
    let env = Env::daemon();
    start_daemon_with(&env, &[("BUILDLOCKD_MAX_LEASES", "2")]);
    let a = env.hold(&[], "a");
    let b = env.hold(&[], "b");
    let out = env.run(&["run", "c", "--", "true"]);
    assert_ne!(out.code(), 0);
    out.assert_stderr_has("2 leases").assert_stderr_has("--max-leases").assert_stderr_has("BUILDLOCKD_MAX_LEASES");
    a.release();
    env.run(&["run", "c", "--", "true"]).assert_code(0);
    b.release();
}

#[test]
fn past_the_limit_of_locks_waited_for_outside_the_daemon_a_clear_error_and_others_keep_working() {
    let env = Env::daemon();
    start_daemon_with(&env, &[("BUILDLOCKD_MAX_OUTSIDE_WAITS", "1")]);
    let p = hold_direct(&env, "p");
    let q = hold_direct(&env, "q");
    let mut w = raw_client(&env);
    acquire(&mut w, &env.lock_file("p"), WaitFor::Forever);
    expect_waiting_for_outside(&mut w);
    let out = env.run(&["run", "-w", "30", "q", "--", "true"]);
    assert_ne!(out.code(), 0);
    out.assert_stderr_has("--max-outside-waits").assert_stderr_has("BUILDLOCKD_MAX_OUTSIDE_WAITS");
    p.release();
    assert!(matches!(reply(&mut w), Reply::Granted { .. }), "the waiter on p was not granted");
    drop(w);
    // Its waiter thread is done: q can be waited for now.
    let mut waiter = env.spawn(&["run", "-w", "60", "q", "--", "echo", "got q"]);
    waiter.expect_stderr("waiting for lock q");
    q.release();
    waiter.expect_line("got q");
    assert!(waiter.wait().success());
}

#[test]
fn past_the_connection_limit_a_client_is_told_and_uses_the_lock_files() {
    let env = Env::daemon();
    start_daemon_with(&env, &[("BUILDLOCKD_MAX_CONNECTIONS", "1")]);
    let holder = env.hold(&[], "a");
    let out = env.run(&["run", "b", "--", "echo", "ran"]);
    out.assert_code(0).assert_stdout_has("ran");
    out.assert_stderr_has("1 connections").assert_stderr_has("--max-connections");
    // The one connection allowed is served as before.
    holder.release();
    let out = env.run(&["run", "b", "--", "true"]);
    out.assert_code(0);
    assert!(!out.stderr.contains("--max-connections"), "refused with no other client: {}", out.stderr);
}

#[test]
fn a_connection_in_its_handshake_keeps_an_idle_daemon_up() {
    let env = Env::daemon();
    let pid = start_daemon_with(&env, &[("BUILDLOCKD_IDLE_EXIT", "1")]);
    // Connected, no hello yet.
    let mut s = UnixStream::connect(env.runtime().join("buildlockd.sock")).unwrap();
    // The absence of an exit has no event: give the idle timer more than twice its time.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(!is_dead(pid), "the daemon exited while a client was in its handshake");
    s.write_all(&buildlock_proto::encode(&Hello::new(std::process::id())).unwrap()).unwrap();
    let welcome = buildlock_proto::read_frame(&mut s).unwrap().expect("welcome");
    let welcome = buildlock_proto::check_welcome(&welcome).unwrap();
    assert!(welcome.error.is_none(), "{welcome:?}");
    drop(s);
    wait_dead(pid);
}

#[test]
fn the_idle_clock_starts_when_the_last_bound_process_is_gone() {
    let env = Env::daemon();
    let pid = start_daemon_with(&env, &[("BUILDLOCKD_IDLE_EXIT", "1")]);
    let mut script = Proc::spawn({
        let mut c = std::process::Command::new("sh");
        c.args(["-c", "echo $$; read x"]);
        c
    });
    let script_pid: u32 = script.next_line().unwrap().parse().unwrap();
    let mut s = raw_client(&env);
    // Every lease on a connection has an id of its own.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let req = Request::Acquire(AcquireRequest {
        operation: "script".into(),
        command: "sh".into(),
        bind_pid: Some(script_pid),
        ..crate::util::acquire_request(
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            env.lock_file("x").display().to_string(),
            WaitFor::NoWait,
        )
    });
    s.write_all(&buildlock_proto::encode(&req).unwrap()).unwrap();
    assert!(matches!(reply(&mut s), Reply::Granted { .. }));
    // The connection closes; the lease stays, bound to the script.
    drop(s);
    // The absence of an exit has no event: give the idle timer more than twice its time.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(!is_dead(pid), "the daemon exited while a bound process still held a lease");
    env.run(&["--no-daemon", "run", "-n", "x", "--", "true"]).assert_code(1);
    // The lease ends with the script, and from then on the idle clock runs.
    script.send_line();
    script.wait();
    wait_dead(pid);
}

#[test]
fn a_client_that_finds_the_daemon_closing_starts_the_next_one_instead_of_falling_back() {
    let env = Env::daemon();
    std::fs::create_dir(env.runtime()).unwrap();
    std::fs::set_permissions(env.runtime(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let socket = env.runtime().join("buildlockd.sock");
    // A daemon on its way out: connections closed before their handshake.
    let closing = UnixListener::bind(&socket).unwrap();
    let mut client = env.spawn(&["run", "x", "--", "echo", "ran"]);
    for _ in 0..2 {
        let (conn, _) = closing.accept().unwrap();
        drop(conn);
    }
    // It is gone (socket first, as a daemon does, so the next one's is never removed): the
    // client starts the next daemon.
    std::fs::remove_file(&socket).unwrap();
    drop(closing);
    client.expect_line("ran");
    assert!(client.wait().success(), "{}", client.stderr());
    assert!(!client.stderr().contains("lock files directly"), "fell back: {}", client.stderr());
    assert!(env.daemon_pid().is_some(), "no daemon was started");
}
