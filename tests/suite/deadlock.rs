//! Deadlocks: the daemon refuses a request that would close a cycle of waits, naming it; a
//! process started below a holder (a nested `run` in a build recipe) acts for that holder. In
//! direct mode, a thread asking for a lock it holds is refused. And `--max-hold` enforced by
//! the daemon when `run` itself is killed.

use buildlock::{Connect, LockMode, LockTarget, Options, Wait};

use crate::util::{is_dead, wait_until, Env};

const CLI: &str = env!("CARGO_BIN_EXE_buildlock-client");

/// How many waiters the daemon lists for lock `name`.
fn waiters(env: &Env, name: &str) -> usize {
    let out = env.run(&["--json", "status", name]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    v["daemon"]["waiters"].as_array().map_or(0, Vec::len)
}

/// `run NAME -- sh -c '...'`: holds NAME, says `held`, and on a line from the test runs a
/// nested `run NEXT` (acting for it), printing what that exits with.
fn holder_then_nested(env: &Env, name: &str, next: &str) -> crate::util::Proc {
    let script = format!("echo held; read go; {CLI} run {next} -- echo got-{next}; echo nested-exit $?");
    let mut p = env.spawn(&["run", name, "--", "sh", "-c", &script]);
    p.expect_line("held");
    p
}

#[test]
fn two_builds_each_holding_what_the_others_nested_run_wants() {
    let env = Env::daemon();
    let mut a = holder_then_nested(&env, "A", "B");
    let mut b = holder_then_nested(&env, "B", "A");
    // A's build asks for B and waits (B's build holds it).
    a.send("go");
    wait_until(|| waiters(&env, "B") == 1);
    // B's build asks for A: A's holder waits, through its nested run, for B, which B's build
    // holds: refused at once, naming both.
    b.send("go");
    b.expect_line("nested-exit 3");
    // (Its stderr is read by another thread: wait for the line rather than read what came.)
    let err = b.expect_stderr("would never end (deadlock)");
    assert!(err.contains("holds B, and pid") && err.contains("which it started, waits for A"), "{err}");
    assert!(err.contains("holds A, and pid") && err.contains("which it started, waits for B"), "{err}");
    assert!(b.wait().success());
    // B's build ended, so A's nested run gets B: nothing was lost on the way.
    a.expect_line("got-B");
    a.expect_line("nested-exit 0");
    assert!(a.wait().success());
}

#[test]
fn three_builds_in_a_ring() {
    let env = Env::daemon();
    let mut a = holder_then_nested(&env, "A", "B");
    let mut b = holder_then_nested(&env, "B", "C");
    let mut c = holder_then_nested(&env, "C", "A");
    a.send("go");
    wait_until(|| waiters(&env, "B") == 1);
    b.send("go");
    wait_until(|| waiters(&env, "C") == 1);
    c.send("go");
    c.expect_line("nested-exit 3");
    let err = c.expect_stderr("would never end (deadlock)");
    for lock in ["A", "B", "C"] {
        assert!(err.contains(&format!("holds {lock}")), "{lock} missing from the cycle: {err}");
    }
    assert!(c.wait().success());
    b.expect_line("nested-exit 0");
    a.expect_line("nested-exit 0");
}

#[test]
fn a_nested_run_asking_for_its_own_builds_lock_is_refused() {
    let env = Env::daemon();
    let out = env.run(&["run", "A", "--", CLI, "run", "A", "--", "echo", "SECOND-HOLDER"]);
    out.assert_code(3)
        .assert_stderr_has("would never end (deadlock)")
        .assert_stderr_has("holds A")
        .assert_stderr_has("waits for A");
    assert!(!out.stdout.contains("SECOND-HOLDER"));
    // A reader asking to become a writer inside its own build: the same.
    let out = env.run(&["run", "-s", "A", "--", CLI, "run", "-x", "A", "--", "echo", "SECOND-HOLDER"]);
    out.assert_code(3).assert_stderr_has("deadlock");
    // Readers inside a reader share, as they may.
    env.run(&["run", "-s", "A", "--", CLI, "run", "-s", "A", "--", "true"]).assert_code(0);
    // Nothing is left held.
    env.run(&["run", "-n", "A", "--", "true"]).assert_code(0);
}

#[test]
fn waiting_for_an_unrelated_holder_is_no_deadlock() {
    let env = Env::daemon();
    // A holds A and waits for B; an unrelated client waits for A: a chain, not a cycle.
    let mut a = holder_then_nested(&env, "A", "B");
    let b = env.hold(&[], "B");
    a.send("go");
    wait_until(|| waiters(&env, "B") == 1);
    let mut c = env.spawn(&["run", "A", "--", "echo", "got-A"]);
    wait_until(|| waiters(&env, "A") == 1);
    b.release();
    a.expect_line("nested-exit 0");
    c.expect_line("got-A");
    assert!(c.wait().success());
}

/// The library in one thread: a lock it holds, asked for again (exclusive, or an upgrade).
/// Run as a worker, in both modes: prints one line per case.
#[test]
#[ignore = "run by deadlock tests in their worker processes"]
fn deadlock_worker() {
    println!();
    let connect = if std::env::var_os("BUILDLOCK_NO_DAEMON").is_some() { Connect::Direct } else { Connect::DaemonOnly };
    let dir = std::path::PathBuf::from(std::env::var("BUILDLOCK_DIR").unwrap());
    let target = LockTarget::resolve("self", &dir).unwrap();
    let opts = |mode, wait| Options { mode, wait, connect, ..Options::default() };
    // A bound on a regression (a wait that never ends), not a timing: 30 s.
    let patience = Wait::Timeout(std::time::Duration::from_secs(30));
    let report = |what: &str, r: Result<buildlock::Lease, buildlock::Error>| match r {
        Ok(_) => println!("{what}: granted"),
        Err(buildlock::Error::Deadlock(m)) => println!("{what}: deadlock: {m}"),
        Err(e) if e.is_conflict() => println!("{what}: busy"),
        Err(e) => println!("{what}: error: {e}"),
    };
    let held = buildlock::acquire(&target, &opts(LockMode::Exclusive, Wait::Forever), &mut |_| {}).unwrap();
    report("again", buildlock::acquire(&target, &opts(LockMode::Exclusive, patience), &mut |_| {}));
    // Another thread only waits (and is told the lock is busy).
    std::thread::scope(|s| {
        s.spawn(|| {
            report("other thread", buildlock::acquire(&target, &opts(LockMode::Exclusive, Wait::NoWait), &mut |_| {}))
        });
    });
    drop(held);
    let shared = buildlock::acquire(&target, &opts(LockMode::Shared, Wait::Forever), &mut |_| {}).unwrap();
    report("upgrade", buildlock::acquire(&target, &opts(LockMode::Exclusive, patience), &mut |_| {}));
    report("shared again", buildlock::acquire(&target, &opts(LockMode::Shared, patience), &mut |_| {}));
    drop(shared);
    report("after release", buildlock::acquire(&target, &opts(LockMode::Exclusive, Wait::NoWait), &mut |_| {}));
}

fn a_thread_asking_for_a_lock_it_holds_is_refused(env: &Env) {
    let out = crate::util::output_bounded(env.worker("deadlock::deadlock_worker"), "deadlock worker");
    let lines: Vec<&str> = out.stdout.lines().filter(|l| l.contains(": ")).collect();
    assert!(lines[0].starts_with("again: deadlock: "), "{}\n{}", out.stdout, out.stderr);
    assert!(lines[0].contains("self.lock"), "{}", lines[0]);
    assert_eq!(lines[1], "other thread: busy", "{}", out.stdout);
    assert!(lines[2].starts_with("upgrade: deadlock: "), "{}", out.stdout);
    assert_eq!(lines[3], "shared again: granted", "{}", out.stdout);
    assert_eq!(lines[4], "after release: granted", "{}", out.stdout);
}

#[test]
fn a_thread_asking_for_a_lock_it_holds_is_refused_direct() {
    a_thread_asking_for_a_lock_it_holds_is_refused(&Env::new());
}

#[test]
fn a_thread_asking_for_a_lock_it_holds_is_refused_through_the_daemon() {
    a_thread_asking_for_a_lock_it_holds_is_refused(&Env::daemon());
}

/// `run --max-hold` killed with SIGKILL: the daemon stops its command at the limit all the same,
/// and the next waiter gets the lock once it is gone.
#[test]
fn the_daemon_enforces_max_hold_after_run_is_killed() {
    let env = Env::daemon();
    let script = "trap '' TERM; echo $$; exec sleep 1000";
    let mut holder = env.spawn(&["run", "--max-hold", "1.5", "--kill-after", "0.3", "x", "--", "sh", "-c", script]);
    let cmd: u32 = holder.next_line().unwrap().parse().unwrap();
    env.wait_for_handover("x", holder.pid());
    let status = env.run(&["--json", "status", "x"]);
    assert!(status.stdout.contains("\"max_hold_ms\":1500"), "{}", status.stdout);
    holder.kill9();
    holder.wait();
    let check = format!(
        "if [ -d /proc/{cmd} ] && ! grep -q '^State:.*Z' /proc/{cmd}/status; then echo TOO-EARLY; fi; echo got it"
    );
    let mut waiter = env.spawn(&["run", "x", "--", "sh", "-c", &check]);
    assert_eq!(waiter.next_line().as_deref(), Some("got it"), "{}", waiter.stderr());
    assert!(waiter.wait().success());
    assert!(is_dead(cmd));
}
