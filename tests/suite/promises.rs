//! Promises that had no test able to fail: PID-bound leases without their connection, fencing
//! tokens read back across a daemon restart, a lock file replaced under a waiter, a daemon that
//! must not exit idle while it still has work.

use std::process::Stdio;

use crate::util::{output_bounded, wait_dead, Env, Proc};

/// A `sh` that prints its pid and lives until a line arrives on its stdin.
fn script_process() -> (Proc, u32) {
    let mut p = Proc::spawn({
        let mut c = std::process::Command::new("sh");
        c.args(["-c", "echo $$; read x"]);
        c
    });
    let pid = p.next_line().unwrap().parse().unwrap();
    (p, pid)
}

/// The keeper `acquire --pid PID` left for lock `name` (from its `.keeper-PID` file).
fn keeper_of(env: &Env, name: &str, pid: u32) -> u32 {
    let file = env.locks().join(format!("{name}.lock.keeper-{pid}"));
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    text.split_whitespace().next().unwrap().parse().unwrap()
}

/// `--no-daemon run -w SECS x -- true`: waits SECS on the lock file, untouched by the daemon,
/// and must time out (the lock stays held all along). An event that takes longer than a short
/// idle-exit time.
fn direct_wait_times_out(env: &Env, name: &str, secs: &str) {
    env.run(&["--no-daemon", "run", "-w", secs, name, "--", "true"]).assert_code(1).assert_stderr_has("timed out");
}

#[track_caller]
fn same_daemon(env: &Env, pid: u32, what: &str) {
    assert_eq!(env.daemon_pid(), Some(pid), "the daemon exited (or was replaced) while {what}");
}

#[test]
fn a_lease_bound_to_a_live_process_outlives_its_connection_and_keeps_the_daemon() {
    let env = Env::daemon();
    let (mut script, pid) = script_process();
    let mut c = env.cli();
    c.args(["acquire", "--pid", &pid.to_string(), "x"]).env("BUILDLOCKD_IDLE_EXIT", "1");
    output_bounded(c, "acquire --pid").assert_code(0);
    let daemon = env.daemon_pid().expect("a daemon was started");
    // The keeper's connection goes; the lease stays, bound to the script's process alone.
    let keeper = keeper_of(&env, "x", pid);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(keeper as i32), nix::sys::signal::SIGKILL).unwrap();
    wait_dead(keeper);
    env.run(&["--no-daemon", "run", "-n", "x", "--", "true"]).assert_code(1);
    // Longer than the idle time: a bound process is work, the daemon stays.
    direct_wait_times_out(&env, "x", "2.5");
    same_daemon(&env, daemon, "a lease was bound to a live process");
    env.run(&["--no-daemon", "run", "-n", "x", "--", "true"]).assert_code(1);
    // The process exits: the daemon lets go, and the next waiter (through it) is granted.
    let mut waiter = env.spawn(&["run", "x", "--", "echo", "got it"]);
    script.send_line();
    script.wait();
    waiter.expect_line("got it");
    assert!(waiter.wait().success(), "{}", waiter.stderr());
    env.run(&["--no-daemon", "run", "-n", "x", "--", "true"]).assert_code(0);
}

#[test]
fn an_idle_daemon_stays_while_a_lease_or_a_waiter_exists() {
    let env = Env::daemon();
    let mut holder = Proc::spawn({
        let mut c = env.cli();
        c.args(["run", "x", "--", "sh", "-c", "echo locked; read x"]).env("BUILDLOCKD_IDLE_EXIT", "1");
        c
    });
    holder.expect_line("locked");
    let daemon = env.daemon_pid().expect("a daemon was started");
    direct_wait_times_out(&env, "x", "2.5");
    same_daemon(&env, daemon, "a lease was held");
    holder.send_line();
    assert!(holder.wait().success(), "{}", holder.stderr());
    // A waiter alone: the lock is held outside the daemon.
    let direct = env.hold(&["--no-daemon"], "y");
    let mut waiter = env.spawn(&["run", "y", "--", "echo", "got it"]);
    waiter.expect_stderr("waiting for lock");
    direct_wait_times_out(&env, "y", "2.5");
    same_daemon(&env, daemon, "a client waited");
    direct.release();
    waiter.expect_line("got it");
    assert!(waiter.wait().success(), "{}", waiter.stderr());
}

#[test]
fn fencing_tokens_are_read_back_by_a_restarted_daemon() {
    let env = Env::daemon();
    let token = |env: &Env| {
        let meta = env.locks().join("x.lock.pid");
        let out = env.run(&["run", "x", "--", "sh", "-c", &format!("cat {}", meta.display())]);
        out.assert_code(0);
        assert!(!out.stderr.contains("no buildlockd"), "the client fell back to the lock files: {}", out.stderr);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        v["token"].as_u64().unwrap()
    };
    let first = token(&env);
    let old = env.daemon_pid().expect("a daemon was started");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old as i32), nix::sys::signal::SIGKILL).unwrap();
    wait_dead(old);
    // Far past any clock-based token: only a daemon that reads the file can exceed it.
    const SEED: u64 = 1_000_000_000_000_000_000;
    assert!(first < SEED);
    std::fs::write(env.locks().join("x.lock.fence"), format!("{SEED}\n")).unwrap();
    let next = token(&env);
    assert!(next > SEED, "the restarted daemon did not read the fence file: {next} after {SEED}");
    let new = env.daemon_pid().expect("a new daemon served the token");
    assert_ne!(new, old, "the daemon pid file still names the killed daemon");
}

#[test]
fn a_waiter_does_not_run_on_a_lock_file_replaced_while_it_waited() {
    let env = Env::new();
    let holder = env.hold(&[], "x");
    let state = env.path("state");
    std::fs::write(&state, "the new file is held").unwrap();
    let mut waiter = Proc::spawn({
        let mut c = env.cli();
        c.args(["run", "x", "--", "cat", state.to_str().unwrap()]).env("BUILDLOCK_LOG", "debug");
        c
    });
    waiter.expect_stderr("waiting for lock");
    // Replace the lock file and hold the new one with fasteners.
    std::fs::remove_file(env.lock_file("x")).unwrap();
    let mut c = env.fasteners(&["hold", "plain", env.lock_file("x").to_str().unwrap()]);
    c.stdin(Stdio::piped());
    let mut py = Proc::spawn(c);
    py.expect_line("locked");
    // The old holder lets go: the waiter gets the old file, sees it is no longer the lock file
    // and waits on the new one.
    let mut holder = holder;
    holder.send_line();
    holder.wait();
    waiter.expect_stderr("replaced while we locked it");
    std::fs::write(&state, "the new file was released").unwrap();
    py.release();
    assert_eq!(waiter.next_line().as_deref(), Some("the new file was released"), "{}", waiter.stderr());
    assert!(waiter.wait().success(), "{}", waiter.stderr());
}

#[test]
fn the_daemon_itself_refuses_a_peer_of_another_uid() {
    if !nix::unistd::getuid().is_root() {
        println!("skipped: connecting as another uid needs root (setpriv)");
        return;
    }
    let env = Env::daemon();
    env.run(&["daemon", "start"]).assert_code(0);
    // Open the walls the daemon's own check stands behind: another uid may traverse the runtime
    // directory and connect to the socket.
    let socket = env.runtime().join("buildlockd.sock");
    for dir in [env.tmp.path().to_owned(), env.runtime()] {
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
    }
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    // The system Python (not a private checkout's venv, which uid 65534 may not reach): connect,
    // send nothing, print every byte the daemon sends (in hex).
    let mut c = std::process::Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", "/usr/bin/python3", "-c"])
        .arg(
            "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); \
             b=b''\nwhile True:\n    c=s.recv(4096)\n    if not c: break\n    b+=c\nprint(b.hex())",
        )
        .arg(&socket);
    let out = output_bounded(c, "python connecting as uid 65534");
    assert!(out.status.success(), "the other user could not connect: {}", out.stderr);
    let hex = out.stdout.trim();
    let stdout: Vec<u8> = (0..hex.len() / 2).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
    assert!(stdout.len() > 4, "the daemon sent nothing: {}", out.stderr);
    let welcome: buildlock_proto::Welcome = buildlock_proto::decode(&stdout[4..]).unwrap();
    let msg = welcome.error.expect("the daemon refused the connection");
    assert_eq!(msg, "buildlockd of uid 0 serves only its own user, not uid 65534");
    // And it still serves its own user.
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(0);
}
