//! Through the daemon: autostart, leases freed by death, fairness, interop with on-disk users,
//! daemon death, bad input on the socket, version and user checks.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use buildlock_proto::{Hello, Reply, Request};

use crate::util::{is_dead, output_bounded, wait_bounded, wait_dead, Env, Proc, HANG};

/// Polls `status --json TARGET` until the daemon reports `n` waiters (bounded by [`HANG`]).
fn wait_for_waiters(env: &Env, name: &str, n: usize) {
    let start = Instant::now();
    loop {
        let out = env.run(&["status", "--json", name]);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
        if v["daemon"]["waiters"].as_array().map_or(0, Vec::len) == n {
            return;
        }
        assert!(start.elapsed() < HANG, "never saw {n} waiters on {name}: {}", out.stdout);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A raw connection to the test's daemon, hello done.
fn raw_client(env: &Env) -> UnixStream {
    let mut s = UnixStream::connect(env.runtime().join("buildlockd.sock")).unwrap();
    s.write_all(&buildlock_proto::encode(&Hello::new(std::process::id())).unwrap()).unwrap();
    let welcome = buildlock_proto::read_frame(&mut s).unwrap().unwrap();
    buildlock_proto::check_welcome(&welcome).unwrap();
    s
}

fn start_daemon(env: &Env) -> u32 {
    env.run(&["daemon", "start"]).assert_code(0).assert_stdout_has("buildlockd is running");
    env.daemon_pid().expect("daemon pid file")
}

#[test]
fn run_goes_through_an_autostarted_daemon_that_hands_over_the_descriptor() {
    let env = Env::daemon();
    // `run` (the parent of CMD) holds its own copy of the locked descriptor. It also made one
    // for CMD to inherit, which it closes once CMD has started: CMD may look before that, so it
    // looks again until `run` holds one (10 s at most; 0 or a copy left open fails).
    let script = "for i in $(seq 1000); do n=$(ls -l /proc/$PPID/fd | grep -c 'x.lock$'); \
                  [ \"$n\" = 1 ] && break; sleep 0.01; done; echo $n";
    let out = env.run(&["run", "x", "--", "sh", "-c", script]);
    out.assert_code(0);
    assert_eq!(out.stdout.trim(), "1", "{}", out.stderr);
    let pid = env.daemon_pid().expect("a daemon was started");
    let st = env.run(&["daemon", "status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    assert_eq!(v["pid"], pid);
    assert_eq!(v["running"], true);
}

#[test]
fn many_clients_autostarting_at_once_make_one_daemon() {
    let env = Env::daemon();
    let mut procs: Vec<Proc> = (0..12).map(|i| env.spawn(&["run", &format!("l{i}"), "--", "true"])).collect();
    for p in &mut procs {
        assert!(p.wait().success(), "{}", p.stderr());
        assert!(!p.stderr().contains("no buildlockd"), "a client fell back to direct mode: {}", p.stderr());
    }
    let pid = env.daemon_pid().expect("one daemon runs");
    let running: Vec<_> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| {
            let c = String::from_utf8_lossy(c);
            c.contains("buildlockd") && c.contains(env.runtime().to_str().unwrap())
        })
        .collect();
    assert_eq!(running.len(), 1, "daemons for this runtime dir: {running:?} (pid file says {pid})");
}

#[test]
fn sigkill_of_a_build_frees_its_lease_at_once() {
    use std::os::unix::process::CommandExt;
    let env = Env::daemon();
    // What a CI timeout does: SIGKILL to the whole process group, `run` and CMD alike.
    let mut c = env.cli();
    c.args(["run", "x", "--", "sh", "-c", "echo $$; exec sleep 1000"]).process_group(0);
    let mut holder = Proc::spawn(c);
    let cmd_pid: u32 = holder.next_line().unwrap().parse().unwrap();
    // Dead means gone or a zombie (its parent, `run`, died first, so it waits for init).
    let check = format!(
        "s=$(cut -d' ' -f3 /proc/{cmd_pid}/stat 2>/dev/null); if [ -z \"$s\" ] || [ \"$s\" = Z ]; then echo got it; else echo CMD-ALIVE; fi"
    );
    let mut waiter = env.spawn(&["run", "x", "--", "sh", "-c", &check]);
    wait_for_waiters(&env, "x", 1);
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(holder.pid() as i32), nix::sys::signal::SIGKILL).unwrap();
    holder.wait();
    // The lease was bound to CMD, which holds the descriptor too: the waiter runs only once
    // CMD is gone, and then at once.
    waiter.expect_line("got it");
    assert!(waiter.wait().success());
    wait_dead(cmd_pid);
}

#[test]
fn pid_bound_lease_is_released_when_the_pid_exits() {
    let env = Env::daemon();
    let mut script_proc = Proc::spawn({
        let mut c = std::process::Command::new("sh");
        c.args(["-c", "echo $$; read x"]);
        c
    });
    let pid: u32 = script_proc.next_line().unwrap().parse().unwrap();
    env.run(&["acquire", "--pid", &pid.to_string(), "-o", "script", "x"]).assert_code(0);
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(1).assert_stderr_has(&format!("held by pid {pid}"));
    let mut waiter = env.spawn(&["run", "x", "--", "echo", "got it"]);
    script_proc.send_line();
    script_proc.wait();
    waiter.expect_line("got it");
    assert!(waiter.wait().success());
}

#[test]
fn acquire_and_release_from_a_shell_script() {
    let env = Env::daemon();
    let me = env!("CARGO_BIN_EXE_buildlock-client");
    let script = format!(
        "{me} acquire -o 'step 1' x || exit 10; \
         {me} run -n x -- true && exit 11; \
         {me} release x || exit 12; \
         {me} run -n x -- echo free-again"
    );
    let out = env.run(&["run", "other", "--", "sh", "-c", &script]);
    out.assert_code(0).assert_stdout_has("free-again");
    env.run(&["release", "--pid", "1", "x"]).assert_code(1).assert_stderr_has("not held for pid 1");
    let gone = crate::util::dead_pid().to_string();
    env.run(&["acquire", "--pid", &gone, "x"])
        .assert_code(2)
        .assert_stderr_has(&format!("process {gone} does not exist"));
}

#[test]
fn waiters_are_served_first_come_first_served() {
    let env = Env::daemon();
    let order = env.path("order");
    let holder = env.hold(&[], "x");
    let mut waiters = Vec::new();
    for i in 1..=4 {
        let script = format!("echo {i} >> {}", order.display());
        waiters.push(env.spawn(&["run", "x", "--", "sh", "-c", &script]));
        wait_for_waiters(&env, "x", i);
    }
    holder.release();
    for w in &mut waiters {
        assert!(w.wait().success(), "{}", w.stderr());
    }
    assert_eq!(std::fs::read_to_string(&order).unwrap(), "1\n2\n3\n4\n");
}

#[test]
fn readers_are_batched_and_a_waiting_writer_is_not_starved() {
    let env = Env::daemon();
    let log = env.path("log");
    let dir = env.path("inside");
    std::fs::create_dir(&dir).unwrap();
    let holder = env.hold(&[], "x");
    // Each reader waits (bounded) until the other batched reader is inside too.
    let reader = |me: &str, other: &str| {
        format!(
            "touch {d}/{me}; i=0; while [ ! -e {d}/{other} ] && [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done; \
             [ -e {d}/{other} ] || exit 90; echo {me} >> {l}",
            d = dir.display(),
            l = log.display()
        )
    };
    let r1 = reader("r1", "r2");
    let r2 = reader("r2", "r1");
    let w = format!("echo w >> {}", log.display());
    let r3 = format!("echo r3 >> {}", log.display());
    let mut procs = vec![env.spawn(&["run", "-s", "x", "--", "sh", "-c", &r1])];
    wait_for_waiters(&env, "x", 1);
    procs.push(env.spawn(&["run", "-s", "x", "--", "sh", "-c", &r2]));
    wait_for_waiters(&env, "x", 2);
    procs.push(env.spawn(&["run", "-x", "x", "--", "sh", "-c", &w]));
    wait_for_waiters(&env, "x", 3);
    procs.push(env.spawn(&["run", "-s", "x", "--", "sh", "-c", &r3]));
    wait_for_waiters(&env, "x", 4);
    holder.release();
    for p in &mut procs {
        assert!(p.wait().success(), "{}", p.stderr());
    }
    let log = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 4, "{log}");
    let mut first_two = lines[..2].to_vec();
    first_two.sort();
    assert_eq!(first_two, ["r1", "r2"], "readers were not batched: {log}");
    assert_eq!(&lines[2..], ["w", "r3"], "a later reader overtook the waiting writer: {log}");
}

#[test]
fn fasteners_and_direct_clients_and_daemon_clients_exclude_each_other() {
    let env = Env::daemon();
    std::fs::create_dir_all(env.locks()).unwrap();
    let lock = env.lock_file("x");
    // A daemon lease excludes fasteners and direct-mode clients.
    let holder = env.hold(&[], "x");
    let out = output_bounded(env.fasteners(&["try", "plain", lock.to_str().unwrap()]), "fasteners try");
    assert_eq!(out.stdout.trim(), "busy", "{}", out.stderr);
    env.run(&["--no-daemon", "run", "-n", "x", "--", "true"])
        .assert_code(1)
        .assert_stderr_has(&format!("pid {}", holder.cmd_pid()));
    holder.release();
    // A fasteners holder makes the daemon wait, and says who it is.
    let mut c = env.fasteners(&["hold", "plain", lock.to_str().unwrap()]);
    c.stdin(Stdio::piped());
    let mut py = Proc::spawn(c);
    py.expect_line("locked");
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(1).assert_stderr_has(&format!("pid {}", py.pid()));
    let mut waiter = env.spawn(&["run", "x", "--", "echo", "got it"]);
    waiter.expect_stderr("not a buildlockd client");
    py.release();
    waiter.expect_line("got it");
    assert!(waiter.wait().success());
    // A direct-mode holder makes the daemon wait too.
    let direct = env.hold(&["--no-daemon"], "x");
    env.run(&["run", "-w", "0.2", "x", "--", "true"]).assert_code(1).assert_stderr_has("timed out");
    direct.release();
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(0);
}

#[test]
fn counter_increments_through_the_daemon_lose_nothing_with_direct_and_fasteners_users_mixed_in() {
    let env = Env::daemon();
    std::fs::create_dir_all(env.locks()).unwrap();
    let counter = env.path("counter");
    std::fs::write(&counter, "0").unwrap();
    let lock = env.lock_file("x");
    const N: usize = 25;
    let py =
        env.fasteners(&["incr", lock.to_str().unwrap(), counter.to_str().unwrap(), &N.to_string()]).spawn().unwrap();
    let script = env.increment_script();
    std::thread::scope(|s| {
        for direct in [false, false, true] {
            let (env, script) = (&env, &script);
            s.spawn(move || {
                for _ in 0..N {
                    let mut args = vec!["run", "x", "--", "sh", "-c", script];
                    if direct {
                        args.insert(0, "--no-daemon");
                    }
                    env.run(&args).assert_code(0);
                }
            });
        }
    });
    let mut py = py;
    let st = wait_bounded(&mut py).unwrap_or_else(|e| panic!("the fasteners incrementer: {e}"));
    assert!(st.success(), "the fasteners incrementer saw two holders or failed");
    assert_eq!(std::fs::read_to_string(&counter).unwrap().trim(), (4 * N).to_string());
}

#[test]
fn sigkill_of_the_daemon_never_makes_two_holders() {
    let env = Env::daemon();
    let holder = env.hold(&[], "x");
    let daemon = env.daemon_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon as i32), nix::sys::signal::SIGKILL).unwrap();
    wait_dead(daemon);
    // The holder kept its copy of the locked descriptor: nobody else gets the lock, not a
    // direct client, not a new daemon's client.
    env.run(&["--no-daemon", "run", "-n", "x", "--", "echo", "TWO"]).assert_code(1);
    env.run(&["run", "-n", "x", "--", "echo", "TWO"])
        .assert_code(1)
        .assert_stderr_has(&format!("pid {} ", holder.cmd_pid()));
    let new = env.daemon_pid().expect("a new daemon was started");
    assert_ne!(new, daemon, "the pid file still names the killed daemon");
    holder.release();
    env.run(&["run", "-n", "x", "--", "echo", "free"]).assert_code(0).assert_stdout_has("free");
    // The holder cleaned up its metadata although its daemon was gone.
    assert!(!env.locks().join("x.lock.pid").exists());
}

#[test]
fn garbage_and_oversized_frames_close_only_that_connection() {
    let env = Env::daemon();
    let holder = env.hold(&[], "x");
    // Garbage instead of a hello.
    let mut s = UnixStream::connect(env.runtime().join("buildlockd.sock")).unwrap();
    s.write_all(b"\x05\x00\x00\x00GET / HTTP/1.1\r\n").unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    let welcome = buildlock_proto::decode::<buildlock_proto::Welcome>(&rest[4..]).unwrap();
    assert!(welcome.error.is_some(), "{welcome:?}");
    // A huge length prefix after a good hello.
    let mut s = raw_client(&env);
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    let reply: Reply = buildlock_proto::read_message(&mut s).unwrap().unwrap();
    assert!(matches!(&reply, Reply::Error(e) if e.code == buildlock_proto::ErrorCode::FrameTooLarge), "{reply:?}");
    assert!(buildlock_proto::read_frame(&mut s).unwrap().is_none(), "connection left open");
    // A frame of garbage.
    let mut s = raw_client(&env);
    s.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap();
    let reply: Reply = buildlock_proto::read_message(&mut s).unwrap().unwrap();
    assert!(matches!(&reply, Reply::Error(e) if e.code == buildlock_proto::ErrorCode::Malformed), "{reply:?}");
    // Half-closed mid-frame.
    let mut s = raw_client(&env);
    s.write_all(&[10, 0, 0, 0, 1]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = buildlock_proto::read_frame(&mut s);
    // A relative path.
    let mut s = raw_client(&env);
    let req =
        Request::Acquire(crate::util::acquire_request(1, "relative.lock".into(), buildlock_proto::WaitFor::NoWait));
    buildlock_proto::write_frame(&mut s, &req).unwrap();
    let reply: Reply = buildlock_proto::read_message(&mut s).unwrap().unwrap();
    assert!(matches!(&reply, Reply::Error(e) if e.code == buildlock_proto::ErrorCode::InvalidName), "{reply:?}");
    // One lease id twice on one connection, and a release of a lease it never had.
    let path = env.locks().canonicalize().unwrap().join("z.lock").display().to_string();
    let Request::Acquire(mut twice) = req else { unreachable!() };
    twice.path = path.clone();
    buildlock_proto::write_frame(&mut s, &Request::Acquire(twice.clone())).unwrap();
    let reply: Reply = buildlock_proto::read_message(&mut s).unwrap().unwrap();
    assert!(matches!(&reply, Reply::Granted { .. }), "{reply:?}");
    buildlock_proto::write_frame(&mut s, &Request::Acquire(twice)).unwrap();
    let reply: Reply = buildlock_proto::read_message(&mut s).unwrap().unwrap();
    assert!(matches!(&reply, Reply::Error(e) if e.code == buildlock_proto::ErrorCode::InvalidRequest), "{reply:?}");
    buildlock_proto::write_frame(&mut s, &Request::Release { lease: 99, answer: true, copies_closed: false }).unwrap();
    let reply: Reply = buildlock_proto::read_message(&mut s).unwrap().unwrap();
    assert!(matches!(&reply, Reply::Error(e) if e.code == buildlock_proto::ErrorCode::NotHeld), "{reply:?}");
    drop(s);
    // Through it all the holder kept its lease and the daemon kept serving.
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(1);
    env.run(&["run", "-n", "y", "--", "true"]).assert_code(0);
    holder.release();
}

#[test]
fn a_client_of_another_protocol_version_gets_a_clear_message() {
    let env = Env::daemon();
    start_daemon(&env);
    let mut s = UnixStream::connect(env.runtime().join("buildlockd.sock")).unwrap();
    let future = Hello { version: buildlock_proto::PROTOCOL_VERSION + 1, build: "9.9.9".into(), ..Hello::new(1) };
    s.write_all(&buildlock_proto::encode(&future).unwrap()).unwrap();
    let frame = buildlock_proto::read_frame(&mut s).unwrap().unwrap();
    let welcome: buildlock_proto::Welcome = buildlock_proto::decode(&frame).unwrap();
    let msg = welcome.error.expect("refused");
    assert!(
        msg.contains("9.9.9") && msg.contains(&format!("protocol {}", buildlock_proto::PROTOCOL_VERSION + 1)),
        "{msg}"
    );
    assert!(msg.contains("daemon stop"), "the message says what to do: {msg}");
}

#[test]
fn other_users_cannot_reach_the_daemon() {
    let env = Env::daemon();
    start_daemon(&env);
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(env.runtime()).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700);
    let socket = env.runtime().join("buildlockd.sock");
    if nix::unistd::getuid().is_root() {
        // As another user, the socket cannot even be reached.
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            // The system Python: a private checkout's venv may be out of that user's reach,
            // and setpriv's own "Permission denied" would pass for the socket's.
            .arg("/usr/bin/python3")
            .args(["-c", "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])"])
            .arg(&socket);
        let out = output_bounded(c, "python connecting as uid 65534");
        assert!(!out.status.success());
        assert!(out.stderr.contains("PermissionError: [Errno 13]"), "{}", out.stderr);
    }
}

#[test]
fn an_unsafe_runtime_dir_is_refused_and_clients_fall_back_with_a_warning() {
    let env = Env::daemon();
    std::fs::create_dir(env.runtime()).unwrap();
    std::fs::set_permissions(env.runtime(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    env.run(&["daemon", "start"]).assert_code(2).assert_stderr_has("chmod 700");
    env.run(&["run", "x", "--", "echo", "ran"])
        .assert_code(0)
        .assert_stdout_has("ran")
        .assert_stderr_has("no buildlockd")
        .assert_stderr_has("using the lock files directly");
}

#[test]
fn daemon_stop_start_status_and_tokens_that_survive_a_restart() {
    let env = Env::daemon();
    let token = |env: &Env| {
        let out =
            env.run(&["run", "x", "--", "sh", "-c", &format!("cat {}", env.locks().join("x.lock.pid").display())]);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        v["token"].as_u64().unwrap()
    };
    let t1 = token(&env);
    let t2 = token(&env);
    assert!(t2 > t1);
    let pid = env.daemon_pid().unwrap();
    env.run(&["daemon", "stop"]).assert_code(0).assert_stdout_has(&format!("stopped buildlockd (pid {pid})"));
    assert!(is_dead(pid));
    assert!(!env.runtime().join("buildlockd.sock").exists(), "socket left behind");
    let v: serde_json::Value = serde_json::from_str(&env.run(&["daemon", "status", "--json"]).stdout).unwrap();
    assert_eq!(v["running"], false);
    env.run(&["daemon", "status"]).assert_code(1);
    let t3 = token(&env);
    assert!(t3 > t2, "token went backwards across a restart: {t2} then {t3}");
    let new = env.daemon_pid().expect("a new daemon served the token");
    assert_ne!(new, pid);
}

#[test]
fn sigterm_stops_the_daemon_cleanly_and_holders_keep_their_locks() {
    let env = Env::daemon();
    let holder = env.hold(&[], "x");
    let pid = env.daemon_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGTERM).unwrap();
    wait_dead(pid);
    assert!(!env.runtime().join("buildlockd.sock").exists(), "socket left behind");
    assert!(!env.runtime().join("buildlockd.pid").exists(), "pid file left behind");
    env.run(&["--no-daemon", "run", "-n", "x", "--", "true"]).assert_code(1);
    holder.release();
    env.run(&["--no-daemon", "run", "-n", "x", "--", "true"]).assert_code(0);
}

#[test]
fn an_idle_daemon_exits_by_itself() {
    let env = Env::daemon();
    // The daemon's pid, read while its lease keeps it busy: after, it may be gone already.
    let mut c = env.cli();
    c.args(["run", "x", "--", "sh", "-c", "cat \"$BUILDLOCK_RUNTIME_DIR/buildlockd.pid\""])
        .env("BUILDLOCKD_IDLE_EXIT", "1");
    let out = output_bounded(c, "run with a one-second idle exit");
    out.assert_code(0);
    let pid: u32 = out.stdout.trim().parse().expect("the daemon's pid");
    assert!(!out.stderr.contains("no buildlockd"), "the client fell back: {}", out.stderr);
    wait_dead(pid);
}
