//! The seed's "Edge Cases Handled", one test each, with OS locks (the default backend): the
//! kernel is the truth, metadata only explains. (Soft-lock versions: `soft.rs`.)

use std::process::Stdio;

use crate::util::{age_file, dead_pid, Env, Proc};

/// Holds the named lock through `fasteners`, which writes no metadata at all.
fn fasteners_holder(env: &Env, name: &str) -> Proc {
    std::fs::create_dir_all(env.locks()).unwrap();
    let mut c = env.fasteners(&["hold", "plain", env.lock_file(name).to_str().unwrap()]);
    c.stdin(Stdio::piped());
    let mut p = Proc::spawn(c);
    p.expect_line("locked");
    p
}

#[test]
fn seed_case_1_no_metadata_recent_lock_held_is_active() {
    let env = Env::new();
    let holder = fasteners_holder(&env, "x");
    env.run(&["run", "-n", "x", "--", "true"])
        .assert_code(1)
        .assert_stderr_has(&format!("pid {}", holder.pid()))
        .assert_stderr_has("wrote no metadata");
    holder.release();
}

#[test]
fn seed_case_1_no_metadata_recent_lock_free_is_taken_at_once() {
    // No grace period is needed when the kernel says nobody holds the lock.
    let env = Env::new();
    std::fs::create_dir_all(env.locks()).unwrap();
    std::fs::write(env.lock_file("x"), "").unwrap();
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(0);
}

#[test]
fn seed_case_2_no_metadata_old_lock_free_is_taken_at_once() {
    let env = Env::new();
    std::fs::create_dir_all(env.locks()).unwrap();
    std::fs::write(env.lock_file("x"), "").unwrap();
    age_file(&env.lock_file("x"), 3 * 60);
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(0);
}

#[test]
fn seed_case_2_no_metadata_old_lock_held_by_a_live_process_is_never_broken() {
    let env = Env::new();
    let holder = fasteners_holder(&env, "x");
    age_file(&env.lock_file("x"), 3 * 60);
    env.run(&["--stale-after", "1", "run", "-n", "x", "--", "true"]).assert_code(1);
    env.run(&["break", "x"]).assert_code(1).assert_stderr_has("a live process holds its OS lock");
    env.run(&["break", "--force", "x"]).assert_code(1).assert_stderr_has("--force cannot break an OS lock");
    assert!(env.lock_file("x").exists());
    holder.release();
}

#[test]
fn seed_case_3_metadata_with_dead_pid_is_recovered_at_once() {
    let env = Env::new();
    let pid = dead_pid();
    env.write_meta(
        "x",
        &format!(
            r#"{{"pid": {pid}, "timestamp": "2026-02-14T06:50:11.123456", "operation": "build:x", "hostname": "{}"}}"#,
            hostname()
        ),
    );
    std::fs::write(env.lock_file("x"), "").unwrap();
    let meta = env.locks().join("x.lock.pid");
    let script = format!("cat {}", meta.display());
    let out = env.run(&["run", "-n", "x", "--", "sh", "-c", &script]);
    out.assert_code(0).assert_stderr_has(&format!("Recovered stale lock {}", env.lock_file("x").display()));
    out.assert_stderr_has(&format!("holder pid {pid} is dead"));
    // While held, the metadata names the real holder, not the dead one.
    assert!(!out.stdout.contains(&format!("\"pid\":{pid},")), "{}", out.stdout);
    assert!(out.stdout.contains("\"operation\":\"sh -c"), "{}", out.stdout);
    // And it is removed on release.
    assert!(!meta.exists());
}

#[test]
fn seed_case_4_metadata_with_live_pid_is_active() {
    let env = Env::new();
    let holder = env.hold(&["-o", "build:libfastled_build"], "x");
    env.run(&["run", "-n", "x", "--", "true"])
        .assert_code(1)
        .assert_stderr_has(&format!("held by pid {}", holder.cmd_pid()))
        .assert_stderr_has(&format!("on {}", hostname()));
    env.run(&["break", "x"]).assert_code(1);
    holder.release();
}

#[test]
fn seed_case_4_recycled_pid_is_not_taken_for_the_holder() {
    // The metadata names a live pid (ours) but with another start time: a recycled pid.
    let env = Env::new();
    let me = std::process::id();
    env.write_meta(
        "x",
        &format!(
            r#"{{"pid": {me}, "start_time": 1, "timestamp": 1.0, "operation": "old", "hostname": "{}"}}"#,
            hostname()
        ),
    );
    let out = env.run(&["status", "x"]);
    out.assert_code(0).assert_stdout_has("free");
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(0).assert_stderr_has(&format!("holder pid {me} is dead"));
}

#[test]
fn seed_case_5_pid_that_cannot_be_checked_is_assumed_active_while_held() {
    // Metadata from another host cannot be checked here: while the OS lock is held it is
    // reported as the holder, and nothing is broken.
    let env = Env::new();
    let holder = fasteners_holder(&env, "x");
    env.write_meta("x", r#"{"pid": 4242, "timestamp": "2026-02-14T06:50:11.123456", "operation": "remote build", "hostname": "otherhost"}"#);
    env.run(&["--stale-after", "0", "run", "-n", "x", "--", "true"])
        .assert_code(1)
        .assert_stderr_has("pid 4242")
        .assert_stderr_has("on otherhost");
    env.run(&["break", "--force", "x"]).assert_code(1);
    holder.release();
    // Once the OS lock is free it is taken, whatever the metadata says.
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(0);
}

#[test]
fn seed_case_5_unreadable_metadata_is_no_metadata() {
    let env = Env::new();
    env.write_meta("x", "\u{0}\u{1}garbage{{{");
    let holder = fasteners_holder(&env, "x");
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(1).assert_stderr_has("metadata is unreadable");
    holder.release();
    // Free: taken at once, but a file that is not metadata is never replaced.
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(0).assert_stderr_has("is not lock metadata");
    assert_eq!(std::fs::read_to_string(env.locks().join("x.lock.pid")).unwrap(), "\u{0}\u{1}garbage{{{");
}

#[test]
fn seed_case_6_os_lock_released_is_acquirable_at_once() {
    let env = Env::new();
    let holder = env.hold(&[], "x");
    let mut waiter = env.spawn(&["run", "x", "--", "echo", "got it"]);
    holder.release();
    waiter.expect_line("got it");
    assert!(waiter.wait().success());
    // Leftover files do not matter once the OS lock is free.
    env.write_meta("x", &format!(r#"{{"pid": {}, "hostname": "{}"}}"#, dead_pid(), hostname()));
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(0);
}

pub fn hostname() -> String {
    nix::unistd::gethostname().unwrap().into_string().unwrap()
}
