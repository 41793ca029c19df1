//! Bad input: each gets a clear error or a safe recovery, never a crash.

use crate::util::Env;

#[test]
fn bad_lock_names_are_refused_with_the_reason() {
    let env = Env::new();
    for (name, why) in [("..", "\"..\""), ("a..b", "\"..\""), ("", "empty"), ("tab\there", "character")] {
        env.run(&["run", name, "--", "true"])
            .assert_code(2)
            .assert_stderr_has("invalid lock name")
            .assert_stderr_has(why);
    }
    let long = "n".repeat(200);
    env.run(&["run", &long, "--", "true"]).assert_code(2).assert_stderr_has("the limit is");
    env.run(&["status", "dir/"]).assert_code(2).assert_stderr_has("not a directory");
    assert!(!env.locks().exists(), "a refused name created files");
}

#[test]
fn unusable_lock_directories_are_named_in_the_error() {
    let env = Env::new();
    std::fs::write(env.path("afile"), "").unwrap();
    let under_file = env.path("afile/locks");
    env.run(&["--dir", under_file.to_str().unwrap(), "run", "x", "--", "true"])
        .assert_code(2)
        .assert_stderr_has("cannot create the lock directory")
        .assert_stderr_has(under_file.to_str().unwrap());
    // Even root cannot create directories in /proc.
    env.run(&["--dir", "/proc/buildlock-test/locks", "run", "x", "--", "true"])
        .assert_code(2)
        .assert_stderr_has("/proc/buildlock-test/locks");
}

#[test]
fn a_lock_path_that_is_a_directory_is_refused() {
    let env = Env::new();
    std::fs::create_dir(env.path("d.lock")).unwrap();
    env.run(&["run", "d.lock", "--", "true"]).assert_code(2).assert_stderr_has("d.lock");
}

#[test]
fn corrupt_metadata_of_every_kind_is_treated_as_none_and_never_removed() {
    let huge = "x".repeat(200 * 1024);
    for garbage in ["{", "null", "[]", "{\"pid\": \"seven\"}", "\u{feff}\u{0}binary", huge.as_str()] {
        let env = Env::new();
        let meta = env.locks().join("x.lock.pid");
        env.write_meta("x", garbage);
        env.run(&["status", "x"]).assert_code(0);
        // An OS lock is taken at once; the file that is not metadata stays as it was.
        env.run(&["run", "-n", "x", "--", "true"]).assert_code(0).assert_stderr_has("is not lock metadata");
        assert_eq!(std::fs::read_to_string(&meta).unwrap(), garbage);
        // A soft lock file holding it is not a lock file: refused, not removed, however old.
        std::fs::write(env.lock_file("x"), garbage).unwrap();
        env.run(&["--soft", "--stale-after", "0", "run", "-n", "x", "--", "true"])
            .assert_code(2)
            .assert_stderr_has("is not a lock file")
            .assert_stderr_has(env.lock_file("x").to_str().unwrap());
        assert_eq!(std::fs::read_to_string(env.lock_file("x")).unwrap(), garbage);
        // An empty soft lock whose .lock.pid is not metadata cannot be judged: refused too.
        std::fs::write(env.lock_file("x"), "").unwrap();
        env.run(&["--soft", "--stale-after", "0", "run", "-n", "x", "--", "true"])
            .assert_code(2)
            .assert_stderr_has("is not lock metadata")
            .assert_stderr_has(meta.to_str().unwrap());
        assert!(env.lock_file("x").exists());
        assert_eq!(std::fs::read_to_string(&meta).unwrap(), garbage);
    }
    // Empty files say nothing: replaced and removed like no metadata at all.
    let env = Env::new();
    env.write_meta("x", "");
    std::fs::write(env.lock_file("x"), "").unwrap();
    env.run(&["--soft", "--stale-after", "0", "run", "-n", "x", "--", "true"]).assert_code(0);
    assert!(!env.lock_file("x").exists());
}

#[test]
fn break_leaves_a_pid_file_holding_garbage_alone() {
    let env = Env::new();
    let meta = env.locks().join("x.lock.pid");
    // With no lock file, and with a free one.
    for lock_file in [false, true] {
        env.write_meta("x", "my notes, not a lock");
        if lock_file {
            std::fs::write(env.lock_file("x"), "").unwrap();
        }
        env.run(&["break", "x"])
            .assert_code(2)
            .assert_stderr_has(&format!("{} is not lock metadata", meta.display()))
            .assert_stderr_has("leaves it alone");
        assert_eq!(std::fs::read_to_string(&meta).unwrap(), "my notes, not a lock");
    }
    // Metadata it recognises (here of a dead process) is still cleaned up.
    env.write_meta("x", &format!(r#"{{"pid": {}, "timestamp": 1.0}}"#, crate::util::dead_pid()));
    env.run(&["break", "x"]).assert_code(0).assert_stdout_has("removed leftover metadata");
    assert!(!meta.exists());
}

#[test]
fn bad_numbers_are_usage_errors() {
    let env = Env::new();
    env.run(&["run", "-w", "soon", "x", "--", "true"]).assert_code(2).assert_stderr_has("not a number of seconds");
    env.run(&["--stale-after=-1", "status"]).assert_code(2).assert_stderr_has("not a number of seconds");
    env.run(&["run", "x"]).assert_code(2);
    env.run(&["run", "-n", "-w", "1", "x", "--", "true"]).assert_code(2);
}

#[test]
fn wait_values_that_are_not_seconds_are_refused() {
    let env = Env::new();
    for bad in ["nan", "NaN", "-nan"] {
        env.run(&["run", &format!("--wait={bad}"), "x", "--", "true"])
            .assert_code(2)
            .assert_stderr_has("not a number of seconds");
    }
    for neg in ["-1", "-0.5", "-inf", "-1e19"] {
        env.run(&["run", &format!("--wait={neg}"), "x", "--", "true"]).assert_code(2).assert_stderr_has("is negative");
    }
    assert!(!env.locks().exists(), "a refused value took a lock");
}

/// Huge waits (more than the clock can count, or more milliseconds than a u64 holds) mean
/// "forever": they once panicked (an `Instant` overflow) or wrapped to a short timeout.
#[test]
fn huge_waits_wait_like_forever_in_both_modes() {
    for env in [Env::new(), Env::daemon()] {
        let holder = env.hold(&[], "x");
        let mut waiters: Vec<_> = ["1e19", "18446744073709552", "18446744073709551", "inf", "1e300"]
            .iter()
            .map(|w| (w, env.spawn(&["run", "-w", w, "x", "--", "echo", "got"])))
            .collect();
        // Each waits past the first second (a wrapped timeout of 384 ms would have ended it).
        for (_, w) in &mut waiters {
            w.expect_stderr("waiting for lock x");
        }
        holder.release();
        for (value, mut w) in waiters {
            w.expect_line("got");
            let st = w.wait();
            assert!(st.success(), "-w {value} (daemon: {}): {st}; stderr:\n{}", env.daemon, w.stderr());
        }
    }
}

/// A client that stops reading (shuts its read side) while still connected: the daemon's reply
/// to it fails, and that ends the connection and frees its lease, even though the client never
/// closes its end.
#[test]
fn a_client_that_cannot_be_written_to_loses_its_connection_and_its_lease() {
    use buildlock_proto::{AcquireRequest, Hello, Reply, Request, WaitFor};
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    let env = Env::daemon();
    env.run(&["daemon", "start"]).assert_code(0);
    std::fs::create_dir_all(env.locks()).unwrap();
    let path = env.locks().canonicalize().unwrap().join("x.lock").display().to_string();
    let mut s = UnixStream::connect(env.runtime().join("buildlockd.sock")).unwrap();
    let send = |s: &mut UnixStream, bytes: Vec<u8>| s.write_all(&bytes).unwrap();
    send(&mut s, buildlock_proto::encode(&Hello::new(std::process::id())).unwrap());
    buildlock_proto::check_welcome(&buildlock_proto::read_frame(&mut s).unwrap().unwrap()).unwrap();
    let acquire = Request::Acquire(AcquireRequest {
        operation: "stops reading".into(),
        ..crate::util::acquire_request(1, path.clone(), WaitFor::NoWait)
    });
    send(&mut s, buildlock_proto::encode(&acquire).unwrap());
    // Read (and so close: a plain read drops the descriptor that came with it) the grant.
    let granted: Reply = buildlock_proto::decode(&buildlock_proto::read_frame(&mut s).unwrap().unwrap()).unwrap();
    assert!(matches!(granted, Reply::Granted { .. }), "{granted:?}");
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(1);
    // Stop reading, then ask something: the daemon's answer cannot be delivered.
    s.shutdown(std::net::Shutdown::Read).unwrap();
    send(&mut s, buildlock_proto::encode(&Request::Status { path: Some(path) }).unwrap());
    // The connection (still open on our side) is over for the daemon, and the lock is free.
    // Without the fix the lease stays for as long as `s` lives, and this times out.
    env.run(&["run", "-w", "60", "x", "--", "echo", "got"]).assert_code(0).assert_stdout_has("got");
    drop(s);
}
