//! Soft locks (`--soft`): the seed's rules in full, heartbeats, and race-safe breaking.

use std::time::{Duration, Instant, SystemTime};

use crate::stale::hostname;
use crate::util::{age_file, dead_pid, Env, HANG};

/// A soft lock file as another tool would leave it, with optional JSON content.
fn plant(env: &Env, name: &str, content: &str, age_secs: u64) {
    std::fs::create_dir_all(env.locks()).unwrap();
    std::fs::write(env.lock_file(name), content).unwrap();
    age_file(&env.lock_file(name), age_secs);
}

fn soft_meta(pid: u32, host: &str) -> String {
    format!(r#"{{"pid": {pid}, "timestamp": 1.0, "operation": "old build", "hostname": "{host}", "lock": "soft"}}"#)
}

#[test]
fn soft_lock_excludes_and_is_removed_on_release() {
    let env = Env::new();
    let holder = env.hold(&["--soft"], "x");
    let content = std::fs::read_to_string(env.lock_file("x")).unwrap();
    assert!(content.contains(&format!("\"pid\":{}", holder.pid())), "{content}");
    assert!(content.contains("\"lock\":\"soft\""), "{content}");
    env.run(&["--soft", "run", "-n", "x", "--", "true"])
        .assert_code(1)
        .assert_stderr_has(&format!("pid {}", holder.pid()));
    // A default (OS-lock) client sees the live soft lock too.
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(1);
    env.run(&["status", "x"]).assert_stdout_has("held (soft lock");
    holder.release();
    assert!(!env.lock_file("x").exists());
    assert!(!env.locks().join("x.lock.pid").exists());
    env.run(&["--soft", "run", "-n", "x", "--", "true"]).assert_code(0);
}

#[test]
fn soft_seed_case_1_no_metadata_recent_lock_is_active_until_the_grace_period_ends() {
    let env = Env::new();
    plant(&env, "x", "", 0);
    env.run(&["--soft", "run", "-n", "x", "--", "true"])
        .assert_code(1)
        .assert_stderr_has("within the 2m00s grace period");
    // With a short grace period, a waiter gets it once the file is old enough.
    env.run(&["--soft", "--stale-after", "0.3", "run", "-w", "30", "x", "--", "true"])
        .assert_code(0)
        .assert_stderr_has("Removed stale lock");
}

#[test]
fn soft_seed_case_2_no_metadata_old_lock_is_stale() {
    let env = Env::new();
    plant(&env, "x", "", 3 * 60);
    env.run(&["--soft", "run", "-n", "x", "--", "true"])
        .assert_code(0)
        .assert_stderr_has("Removed stale lock")
        .assert_stderr_has("no metadata and the lock is 3m00s old");
}

#[test]
fn soft_seed_case_3_dead_pid_is_stale_at_once() {
    let env = Env::new();
    let pid = dead_pid();
    plant(&env, "x", &soft_meta(pid, &hostname()), 0);
    env.run(&["--soft", "run", "-n", "x", "--", "true"])
        .assert_code(0)
        .assert_stderr_has(&format!("Removed stale lock {} (holder pid {pid} is dead)", env.lock_file("x").display()));
}

#[test]
fn soft_seed_case_3_seed_tool_metadata_in_lock_pid_counts_too() {
    // The original tool: an empty lock file plus `.lock.pid` naming a dead process.
    let env = Env::new();
    plant(&env, "x", "", 0);
    env.write_meta(
        "x",
        &format!(
            r#"{{"pid": {}, "timestamp": "2026-02-14T06:50:11.123456", "operation": "build", "hostname": "{}"}}"#,
            dead_pid(),
            hostname()
        ),
    );
    env.run(&["--soft", "run", "-n", "x", "--", "true"]).assert_code(0).assert_stderr_has("is dead");
}

#[test]
fn soft_seed_case_4_live_pid_is_active_however_old() {
    let env = Env::new();
    let holder = env.hold(&["--soft", "--stale-after", "1"], "x");
    age_file(&env.lock_file("x"), 3600);
    env.run(&["--soft", "--stale-after", "1", "run", "-n", "x", "--", "true"])
        .assert_code(1)
        .assert_stderr_has(&format!("holder pid {} is alive", holder.pid()));
    env.run(&["--soft", "--stale-after", "1", "break", "x"]).assert_code(1).assert_stderr_has("is alive");
    holder.release();
}

#[test]
fn soft_seed_case_5_other_host_is_active_until_its_heartbeat_stops() {
    let env = Env::new();
    plant(&env, "x", &soft_meta(4242, "otherhost"), 10);
    env.run(&["--soft", "run", "-n", "x", "--", "true"])
        .assert_code(1)
        .assert_stderr_has("on another host (otherhost)");
    age_file(&env.lock_file("x"), 121);
    env.run(&["--soft", "run", "-n", "x", "--", "true"])
        .assert_code(0)
        .assert_stderr_has("sent no heartbeat for 2m01s");
}

#[test]
fn soft_break_refuses_live_and_force_breaks_a_remote_holder() {
    let env = Env::new();
    plant(&env, "x", &soft_meta(4242, "otherhost"), 0);
    env.run(&["--soft", "break", "x"]).assert_code(1).assert_stderr_has("not stale");
    env.run(&["--soft", "break", "--force", "x"]).assert_code(0).assert_stdout_has("removed stale lock");
    assert!(!env.lock_file("x").exists());
}

#[test]
fn soft_holder_refreshes_its_heartbeat() {
    let env = Env::new();
    let holder = env.hold(&["--soft", "--stale-after", "0.2"], "x");
    let lock = env.lock_file("x");
    age_file(&lock, 3600);
    let aged = std::fs::metadata(&lock).unwrap().modified().unwrap();
    // The keeper touches the file every stale_after/4; wait for that event.
    let start = Instant::now();
    loop {
        let now = std::fs::metadata(&lock).unwrap().modified().unwrap();
        if now > aged && SystemTime::now().duration_since(now).unwrap() < Duration::from_secs(60) {
            break;
        }
        assert!(start.elapsed() < HANG, "heartbeat never refreshed the lock file");
        std::thread::sleep(Duration::from_millis(20));
    }
    holder.release();
}

#[test]
fn racing_breakers_of_one_stale_soft_lock_never_both_hold_it() {
    let env = Env::new();
    let marker = env.path("inside");
    let script = format!("mkdir {m} || {{ echo TWO-HOLDERS; exit 99; }}; sleep 0.02; rmdir {m}", m = marker.display());
    for round in 0..5 {
        plant(&env, "x", &soft_meta(dead_pid(), &hostname()), 0);
        let mut procs: Vec<_> = (0..6).map(|_| env.spawn(&["--soft", "run", "x", "--", "sh", "-c", &script])).collect();
        let mut removed = 0;
        for p in &mut procs {
            let st = p.wait();
            assert_eq!(st.code(), Some(0), "round {round}: {}", p.stderr());
            removed += p.stderr().matches("Removed stale lock").count();
        }
        // Exactly one of them broke the stale lock; the others waited their turn.
        assert_eq!(removed, 1, "round {round}: the stale lock was removed {removed} times");
        assert!(!env.lock_file("x").exists());
    }
}

#[test]
fn a_makefile_named_as_a_soft_lock_is_never_deleted_however_old() {
    let env = Env::new();
    let makefile = env.path("Makefile");
    let content = "all:\n\techo building\n";
    std::fs::write(&makefile, content).unwrap();
    age_file(&makefile, 3600);
    let refused = |out: crate::util::Out| {
        out.assert_code(2).assert_stderr_has("./Makefile is not a lock file").assert_stderr_has("leaves it alone");
        assert_eq!(std::fs::read_to_string(&makefile).unwrap(), content);
    };
    refused(env.run(&["--soft", "run", "./Makefile", "--", "true"]));
    refused(env.run(&["--soft", "--stale-after", "0", "run", "-w", "5", "./Makefile", "--", "true"]));
    refused(env.run(&["--soft", "break", "./Makefile"]));
    refused(env.run(&["--soft", "break", "--force", "./Makefile"]));
    refused(env.run(&["--soft", "status", "./Makefile"]));
    // Only the Makefile itself: nothing else was left beside it.
    let names: Vec<_> = std::fs::read_dir(env.tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(names.iter().all(|n| !n.to_string_lossy().contains("Makefile.")), "{names:?}");
}

#[test]
fn an_empty_old_soft_lock_is_still_broken_as_stale() {
    let env = Env::new();
    plant(&env, "x", "", 3 * 60);
    env.run(&["--soft", "break", "x"]).assert_code(0).assert_stdout_has("removed stale lock");
    assert!(!env.lock_file("x").exists());
}
