//! One connection per client process: many leases (several on one lock too) on one
//! connection, threads sharing it, a dropped lease releasing only itself, a killed process
//! releasing all at once, a forked child that cannot release its parent's leases, and waiters
//! that outlive their daemon. The client is the library in a worker process (this binary re-run
//! as `multiplex_worker`), driven line by line.

use std::io::BufRead;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use buildlock::{Connect, Lease, LockMode, LockTarget, Options, Wait};

use crate::util::{Env, Proc};

fn options(mode: &str, wait: Wait) -> Options {
    Options {
        mode: if mode == "s" { LockMode::Shared } else { LockMode::Exclusive },
        wait,
        operation: "multiplex".into(),
        connect: Connect::DaemonOnly,
        ..Options::default()
    }
}

fn target(name: &str) -> LockTarget {
    let dir = std::path::PathBuf::from(std::env::var("BUILDLOCK_DIR").expect("set by the test"));
    LockTarget::resolve(name, &dir).unwrap()
}

/// The worker. Commands, one a line on stdin, each answered on stdout:
/// `acq NAME x|s` (`got N`, N counting leases from 0), `try NAME x|s` (`got N` or `busy`),
/// `fail NAME` (`error: ...`), `drop N` (`dropped N`), `fork N NAME` (a child releases and drops the parent's lease N, then
/// takes NAME itself: `child ok`), `threads N NAME ROUNDS` (`threads ok`, or `violation`),
/// `waiters N NAME` (N threads wait for NAME: `waiting` from each, then `thread got` from each
/// when granted, released at once), `cancel NAME` (a thread waits for NAME and its wait is cancelled
/// once the daemon has queued it: `cancelled: ERROR`), `stats` (`connections N`).
#[test]
#[ignore = "run by the multiplex tests in their worker processes"]
fn multiplex_worker() {
    let mut leases: Vec<Option<Lease>> = Vec::new();
    let mut waiters = Vec::new();
    // Ends the line the test harness started ("test multiplex_worker ... ").
    println!();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["acq", name, mode] => {
                let lease = buildlock::acquire(&target(name), &options(mode, Wait::Forever), &mut |_| {}).unwrap();
                leases.push(Some(lease));
                println!("got {}", leases.len() - 1);
            }
            ["try", name, mode] => match buildlock::acquire(&target(name), &options(mode, Wait::NoWait), &mut |_| {}) {
                Ok(lease) => {
                    leases.push(Some(lease));
                    println!("got {}", leases.len() - 1);
                }
                Err(e) if e.is_conflict() => println!("busy"),
                Err(e) => panic!("{e}"),
            },
            ["fail", name] => match buildlock::acquire(&target(name), &options("x", Wait::NoWait), &mut |_| {}) {
                Ok(_) => panic!("lock {name} was granted"),
                Err(e) => println!("error: {e}"),
            },
            ["drop", n] => {
                let n: usize = n.parse().unwrap();
                drop(leases[n].take());
                println!("dropped {n}");
            }
            ["fork", n, own] => {
                let n: usize = n.parse().unwrap();
                // SAFETY: this worker process runs only its own test; the threads it may have
                // (the connection's reader) hold no lock the child takes before it makes its
                // own connection, and the child ends with `_exit`.
                match unsafe { nix::unistd::fork() }.unwrap() {
                    nix::unistd::ForkResult::Child => {
                        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            let parents = leases[n].take().unwrap();
                            let err = parents.release().expect_err("a child released its parent's lease");
                            assert!(err.to_string().contains("parent process"), "{err}");
                            // Every other lease of the parent dropped here: nothing on the wire.
                            leases.clear();
                            let mine = buildlock::acquire(&target(own), &options("x", Wait::NoWait), &mut |_| {});
                            mine.unwrap().release_confirmed().unwrap();
                        }))
                        .map_or(1, |()| 0);
                        // SAFETY: ends the child without running the parent's exit handlers.
                        unsafe { nix::libc::_exit(code) };
                    }
                    nix::unistd::ForkResult::Parent { child } => {
                        let status = nix::sys::wait::waitpid(child, None).unwrap();
                        assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
                        println!("child ok");
                    }
                }
            }
            ["threads", n, name, rounds] => {
                let (n, rounds): (usize, usize) = (n.parse().unwrap(), rounds.parse().unwrap());
                let marker = target(name).path.with_extension("inside");
                let violated = Arc::new(AtomicBool::new(false));
                let handles: Vec<_> = (0..n)
                    .map(|_| {
                        let (name, marker, violated) = (name.to_string(), marker.clone(), violated.clone());
                        std::thread::spawn(move || {
                            for _ in 0..rounds {
                                let lease =
                                    buildlock::acquire(&target(&name), &options("x", Wait::Forever), &mut |_| {})
                                        .unwrap();
                                // Independent of the lock: a second holder finds the marker.
                                match std::fs::OpenOptions::new().write(true).create_new(true).open(&marker) {
                                    Ok(_) => std::fs::remove_file(&marker).unwrap(),
                                    Err(_) => violated.store(true, Ordering::SeqCst),
                                }
                                lease.release().unwrap();
                            }
                        })
                    })
                    .collect();
                for h in handles {
                    h.join().unwrap();
                }
                println!("{}", if violated.load(Ordering::SeqCst) { "violation" } else { "threads ok" });
            }
            ["waiters", n, name] => {
                for _ in 0..n.parse::<usize>().unwrap() {
                    let name = name.to_string();
                    waiters.push(std::thread::spawn(move || {
                        let mut told = false;
                        let on_wait = &mut |_: &buildlock::WaitInfo| {
                            if !std::mem::replace(&mut told, true) {
                                println!("waiting");
                            }
                        };
                        let lease = buildlock::acquire(&target(&name), &options("x", Wait::Forever), on_wait).unwrap();
                        println!("thread got");
                        lease.release_confirmed().unwrap();
                    }));
                }
            }
            ["cancel", name] => {
                // A thread waits for NAME; once the daemon has queued it, the wait is cancelled.
                let cancel = buildlock::Cancel::new();
                let opts = Options { cancel: Some(cancel.clone()), ..options("x", Wait::Forever) };
                let name = name.to_string();
                let waiter = std::thread::spawn(move || buildlock::acquire(&target(&name), &opts, &mut |_| {}));
                let rt = std::env::var_os("BUILDLOCK_RUNTIME_DIR").map(std::path::PathBuf::from);
                crate::util::wait_until(|| {
                    match buildlock::ask_daemon(rt.as_deref(), &buildlock_proto::Request::Status { path: None })
                        .unwrap()
                    {
                        buildlock_proto::Reply::Status { locks } => locks.iter().any(|l| !l.waiters.is_empty()),
                        other => panic!("{other:?}"),
                    }
                });
                cancel.cancel();
                match waiter.join().unwrap() {
                    Ok(_) => panic!("a cancelled wait was granted"),
                    Err(e) => println!("cancelled: {e}"),
                }
            }
            ["stats"] => {
                let rt = std::env::var_os("BUILDLOCK_RUNTIME_DIR").map(std::path::PathBuf::from);
                match buildlock::ask_daemon(rt.as_deref(), &buildlock_proto::Request::DaemonStatus).unwrap() {
                    // Less the asking connection itself.
                    buildlock_proto::Reply::DaemonStatus(info) => println!("connections {}", info.connections - 1),
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("unknown command {other:?}"),
        }
    }
    for w in waiters {
        w.join().unwrap();
    }
}

fn worker(env: &Env) -> Proc {
    Proc::spawn(env.worker("multiplex::multiplex_worker"))
}

#[test]
fn leases_on_two_locks_and_two_shared_on_one_lock_share_one_connection() {
    let env = Env::daemon();
    let mut w = worker(&env);
    for (cmd, n) in [("acq a x", 0), ("acq b x", 1), ("acq c s", 2), ("acq c s", 3)] {
        w.send(cmd);
        w.expect_line(&format!("got {n}"));
    }
    w.send("stats");
    w.expect_line("connections 1");
    env.run(&["run", "-n", "a", "--", "true"]).assert_code(1);
    env.run(&["run", "-n", "b", "--", "true"]).assert_code(1);
    env.run(&["run", "-n", "c", "--", "true"]).assert_code(1);
    env.run(&["run", "-n", "--shared", "c", "--", "true"]).assert_code(0);
    // One of the two shared leases goes: the other still keeps a writer out.
    w.send("drop 2");
    w.expect_line("dropped 2");
    w.send("try c x");
    w.expect_line("busy");
}

#[test]
fn dropping_one_lease_releases_only_it_and_a_killed_process_releases_all() {
    let env = Env::daemon();
    let mut w = worker(&env);
    w.send("acq a x");
    w.expect_line("got 0");
    w.send("acq b x");
    w.expect_line("got 1");
    let mut waiter = env.spawn(&["run", "-w", "60", "a", "--", "echo", "got a"]);
    w.send("drop 0");
    w.expect_line("dropped 0");
    waiter.expect_line("got a");
    assert!(waiter.wait().success());
    env.run(&["run", "-n", "b", "--", "true"]).assert_code(1);
    w.send("acq c x");
    w.expect_line("got 2");
    let mut waiter_b = env.spawn(&["run", "-w", "60", "b", "--", "echo", "got b"]);
    let mut waiter_c = env.spawn(&["run", "-w", "60", "c", "--", "echo", "got c"]);
    w.kill9();
    waiter_b.expect_line("got b");
    waiter_c.expect_line("got c");
}

#[test]
fn a_cancelled_wait_leaves_the_queue_and_is_never_granted() {
    let env = Env::daemon();
    let mut w = worker(&env);
    w.send("acq a x");
    w.expect_line("got 0");
    w.send("cancel a");
    let line = w.next_line().unwrap();
    assert!(line.starts_with("cancelled: ") && line.contains("was cancelled"), "{line}");
    // Out of the queue: when lease 0 goes, the lock is free for the next request on the same
    // connection (handled in order), not granted to the cancelled wait.
    w.send("drop 0");
    w.expect_line("dropped 0");
    w.send("try a x");
    w.expect_line("got 1");
}

#[test]
fn threads_sharing_one_connection_exclude_each_other() {
    let env = Env::daemon();
    let mut w = worker(&env);
    w.send("threads 8 t 40");
    w.expect_line("threads ok");
    w.send("stats");
    w.expect_line("connections 1");
}

#[test]
fn a_forked_child_cannot_release_its_parents_lease_and_takes_its_own() {
    let env = Env::daemon();
    let mut w = worker(&env);
    w.send("acq a x");
    w.expect_line("got 0");
    w.send("acq b x");
    w.expect_line("got 1");
    w.send("fork 0 own");
    w.expect_line("child ok");
    // Anything the child had sent on the parent's connection would come before this request.
    w.send("acq z x");
    w.expect_line("got 2");
    env.run(&["run", "-n", "a", "--", "true"]).assert_code(1);
    env.run(&["run", "-n", "b", "--", "true"]).assert_code(1);
    // The child's own lock was its own, and is free.
    env.run(&["run", "-n", "own", "--", "true"]).assert_code(0);
    let mut waiter = env.spawn(&["run", "-w", "60", "a", "--", "echo", "got a"]);
    w.send("drop 0");
    waiter.expect_line("got a");
}

#[test]
fn threads_waiting_when_the_daemon_dies_get_the_lock_from_the_next_one() {
    let env = Env::daemon();
    let mut w = worker(&env);
    w.send("acq a x");
    w.expect_line("got 0");
    w.send("waiters 3 a");
    for _ in 0..3 {
        w.expect_line("waiting");
    }
    let daemon = env.daemon_pid().expect("a daemon runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    crate::util::wait_dead(daemon);
    // The held lease kept its descriptor: still held, by this process.
    env.run(&["run", "-n", "a", "--", "true"]).assert_code(1);
    w.send("drop 0");
    for _ in 0..3 {
        w.expect_line("thread got");
    }
}

#[test]
fn a_daemon_at_its_open_file_limit_says_so_and_keeps_every_other_lease() {
    let env = Env::daemon();
    // The daemon may raise its soft limit to the hard one, not beyond: 90 descriptors leave
    // room for 21 leases next to 4 connections, one outside waiter and its reserve.
    let mut start = std::process::Command::new("setpriv");
    start.args([
        "--bounding-set=-sys_resource",
        "--",
        "sh",
        "-c",
        "ulimit -Sn 90 && ulimit -Hn 90 && exec \"$0\" daemon start",
    ]);
    start.arg(env!("CARGO_BIN_EXE_buildlock-client"));
    let mut start = env.scrubbed_command(start);
    start.env("BUILDLOCKD_MAX_CONNECTIONS", "4").env("BUILDLOCKD_MAX_OUTSIDE_WAITS", "1");
    let out = start.output().unwrap();
    assert!(out.status.success(), "daemon start: {}", String::from_utf8_lossy(&out.stderr));
    let mut w = worker(&env);
    for n in 0..21 {
        w.send(&format!("acq l{n} x"));
        w.expect_line(&format!("got {n}"));
    }
    w.send("fail l21");
    let line = loop {
        let line = w.next_line().expect("worker output");
        if line.starts_with("error: ") {
            break line;
        }
    };
    assert!(line.contains("open-file limit (90"), "{line}");
    assert!(line.contains("ulimit -Hn"), "{line}");
    // Every lease taken before is still held (asked of the lock files: the daemon is full),
    // and the daemon still serves once one is released.
    for n in [0, 10, 20] {
        let mut c = env.cli();
        c.env("BUILDLOCK_NO_DAEMON", "1").args(["run", "-n", &format!("l{n}"), "--", "true"]);
        let out = c.output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    }
    w.send("drop 0");
    env.run(&["run", "-w", "60", "l0", "--", "true"]).assert_code(0);
}
