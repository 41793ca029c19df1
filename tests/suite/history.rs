//! The lock history: events recorded by the real CLI (direct mode) and the daemon, read back
//! through `history --json`, `stats`; history off; an unusable database never stops locking.

use serde_json::Value;

use crate::stale::hostname;
use crate::util::{age_file, dead_pid, Env, Proc};

/// The events of lock `name`, oldest first (`history --json --since all`).
fn events(env: &Env, name: &str) -> Vec<Value> {
    let out = env.run(&["history", "--json", "--since", "all", name]);
    out.assert_code(0);
    serde_json::from_str::<Value>(&out.stdout).unwrap().as_array().unwrap().clone()
}

/// Waits until the history of `name` holds at least `n` events of `kind` (the daemon writes
/// from a background thread) and returns all its events.
pub(crate) fn events_when(env: &Env, name: &str, kind: &str, n: usize) -> Vec<Value> {
    let start = std::time::Instant::now();
    loop {
        let all = events(env, name);
        if all.iter().filter(|e| e["kind"] == kind).count() >= n {
            return all;
        }
        // A bound on a hang, naming what was there.
        assert!(start.elapsed() < std::time::Duration::from_secs(60), "no {n} {kind} events for {name} in {all:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn of<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["kind"] == kind).collect()
}

fn int(v: &Value, key: &str) -> i64 {
    v[key].as_i64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// A holder, a waiter that times out, one refused at once, and one that waits for the
/// release: every figure recorded, in the right relation to the others.
fn grant_release_timeout_busy(env: &Env) {
    let holder = env.hold(&[], "x");
    env.run(&["run", "-w", "0.2", "x", "--", "true"]).assert_code(1);
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(1);
    let mut waiter = env.spawn(&["run", "x", "--", "echo", "waiter-got-it"]);
    waiter.expect_stderr("waiting for lock x");
    holder.release();
    waiter.expect_line("waiter-got-it");
    assert!(waiter.wait().success());

    let all = events_when(env, "x", "released", 2);
    let granted = of(&all, "granted");
    let released = of(&all, "released");
    let timed_out = of(&all, "timed_out");
    let busy = of(&all, "busy");
    assert_eq!((granted.len(), released.len(), timed_out.len(), busy.len()), (2, 2, 1, 1), "{all:#?}");
    // Requests that were not granted at once: the timed-out one and the waiter, at least.
    assert!(of(&all, "requested").len() >= 2, "{all:#?}");
    let lock = env.lock_file("x").canonicalize().unwrap();
    assert!(all.iter().all(|e| e["lock"] == lock.display().to_string() && e["backend"] == "local"), "{all:#?}");
    let (first, second) = (granted[0], granted[1]);
    assert!(first["command"].as_str().unwrap().contains("echo locked"), "{first}");
    assert_eq!(second["command"], "echo waiter-got-it");
    assert_eq!(second["mode"], "exclusive");
    assert_eq!(second["host"], hostname());
    // The timed-out waiter waited within the first hold, which therefore lasted longer than
    // that wait.
    let hold1 = int(released[0], "hold_us");
    assert!(int(timed_out[0], "wait_us") > 0, "{all:#?}");
    assert!(hold1 > int(timed_out[0], "wait_us"), "{all:#?}");
    assert!(int(timed_out[0], "at_ms") <= int(released[0], "at_ms"));
    // The busy refusal did not wait as long as the timeout.
    assert!(int(busy[0], "wait_us") < int(timed_out[0], "wait_us"), "{all:#?}");
    // The second holder was granted after the first released, having waited for it.
    assert!(int(second, "at_ms") >= int(released[0], "at_ms"), "{all:#?}");
    assert!(int(second, "wait_us") > int(timed_out[0], "wait_us"), "waited through the timeout too: {all:#?}");
    assert!(int(second, "wait_us") > int(first, "wait_us"), "{all:#?}");
    // Grants, releases and the requests they answer share a session.
    assert_eq!(first["session"], released[0]["session"]);
    assert_ne!(first["session"], second["session"]);

    // The same figures through `stats`.
    let out = env.run(&["stats", "--json", "x"]);
    let stats: Value = serde_json::from_str(&out.stdout).unwrap();
    let s = &stats["locks"][0];
    assert_eq!((s["acquisitions"].as_u64(), s["timeouts"].as_u64(), s["busy"].as_u64()), (Some(2), Some(1), Some(1)));
    assert_eq!(s["hold"]["max_us"].as_i64().unwrap(), hold1.max(int(released[1], "hold_us")));
    // The second holder waited past its "waiting" message (about a second), far above the
    // threshold; the first may have too, on a loaded machine.
    assert!(s["waited"].as_u64().is_some_and(|n| n >= 1), "the second holder waited: {s}");
}

#[test]
fn history_records_grant_release_timeout_and_busy_direct() {
    grant_release_timeout_busy(&Env::new());
}

#[test]
fn history_records_grant_release_timeout_and_busy_through_the_daemon() {
    let env = Env::daemon();
    grant_release_timeout_busy(&env);
    assert!(env.daemon_pid().is_some(), "the daemon served the test");
}

#[test]
fn history_records_a_stale_recovery_by_dead_pid() {
    let env = Env::new();
    let pid = dead_pid();
    env.write_meta(
        "x",
        &format!(
            r#"{{"pid": {pid}, "timestamp": "2026-02-14T06:50:11.123456", "operation": "build:x", "hostname": "{}", "command": "make old"}}"#,
            hostname()
        ),
    );
    std::fs::write(env.lock_file("x"), "").unwrap();
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(0).assert_stderr_has("Recovered stale lock");
    let all = events(&env, "x");
    let stale = of(&all, "stale_recovered");
    assert_eq!(stale.len(), 1, "{all:#?}");
    assert_eq!(stale[0]["rule"], "dead_pid");
    assert_eq!(stale[0]["pid"], pid, "the dead holder is named");
    assert_eq!(stale[0]["command"], "make old");
    assert_eq!(stale[0]["operation"], "build:x");
    // Recovered while the lock was taken: before the release.
    assert!(int(stale[0], "at_ms") <= int(of(&all, "released")[0], "at_ms"));
    let out = env.run(&["stats", "x"]);
    out.assert_code(0).assert_stdout_has("stale recoveries: dead_pid 1");
}

#[test]
fn history_records_a_break_and_the_rule_behind_it() {
    let env = Env::new();
    // A soft lock whose holder is dead, broken by `break`; another with no metadata, old.
    std::fs::create_dir_all(env.locks()).unwrap();
    let pid = dead_pid();
    let meta = format!(
        r#"{{"pid": {pid}, "timestamp": 1.0, "operation": "old build", "hostname": "{}", "lock": "soft"}}"#,
        hostname()
    );
    std::fs::write(env.lock_file("x"), meta).unwrap();
    env.run(&["--soft", "break", "x"]).assert_code(0).assert_stdout_has("removed stale lock");
    std::fs::write(env.lock_file("y"), "").unwrap();
    age_file(&env.lock_file("y"), 600);
    env.run(&["--soft", "run", "-n", "y", "--", "true"]).assert_code(0);

    let x = events(&env, "x");
    let broken = of(&x, "broken");
    assert_eq!(broken.len(), 1, "{x:#?}");
    assert!(broken[0]["detail"].as_str().unwrap().contains(&format!("holder pid {pid} is dead")), "{x:#?}");
    let stale = of(&x, "stale_recovered");
    assert_eq!((stale.len(), &stale[0]["rule"]), (1, &Value::from("dead_pid")), "{x:#?}");
    let y = events(&env, "y");
    let stale = of(&y, "stale_recovered");
    assert_eq!((stale.len(), &stale[0]["rule"]), (1, &Value::from("no_metadata_old")), "{y:#?}");
    let prom = env.run(&["stats", "--prometheus"]);
    prom.assert_code(0);
    for line in prom.stdout.lines() {
        let ok = line.starts_with("# HELP buildlock_")
            || line.starts_with("# TYPE buildlock_")
            || (line.starts_with("buildlock_")
                && line.contains("{lock=\"")
                && line.rsplit(' ').next().unwrap().parse::<f64>().is_ok());
        assert!(ok, "not Prometheus text format: {line:?}\n{}", prom.stdout);
    }
    assert!(prom.stdout.contains("rule=\"no_metadata_old\"} 1"), "{}", prom.stdout);
    assert!(prom.stdout.contains("buildlock_breaks{lock="), "{}", prom.stdout);
}

#[test]
fn history_off_writes_nothing() {
    let env = Env::new();
    let db = env.path("off.sqlite3");
    let mut c = env.cli();
    c.env("BUILDLOCK_HISTORY", "0").args(["run", "x", "--", "true"]);
    assert!(c.status().unwrap().success());
    let mut c = env.cli();
    c.env("BUILDLOCK_HISTORY", "0").args(["run", "-n", "x", "--", "true"]);
    assert!(c.status().unwrap().success());
    assert!(!db.exists());
    assert!(!env.path("history.sqlite3").exists(), "the test's default history is untouched");
    assert!(!env.path("history.sqlite3-spool").exists());
    assert!(!env.path("home/.local/share/buildlock/history.sqlite3").exists());
    let mut c = env.cli();
    let out = c.env("BUILDLOCK_HISTORY", "0").args(["stats"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("BUILDLOCK_HISTORY=0"));
}

/// `run` with history at `db`, which cannot be used: the lock works, one warning.
fn locking_goes_on(mut c: std::process::Command, what: &str) {
    c.args(["run", "x", "--", "echo", "inside"]);
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what}: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "inside\n");
    assert_eq!(stderr.matches("lock history").count(), 1, "{what}: one warning: {stderr}");
    assert!(stderr.contains("locking goes on"), "{stderr}");
}

#[test]
fn corrupt_history_warns_once_and_locking_goes_on() {
    let env = Env::new();
    let db = env.path("history.sqlite3");
    std::fs::write(&db, vec![b'x'; 10_000]).unwrap();
    locking_goes_on(env.cli(), "garbage file");
    // Still garbage: nothing was overwritten.
    assert_eq!(std::fs::read(&db).unwrap(), vec![b'x'; 10_000]);
    // And through the daemon: its lock works too (its warning goes to its log).
    let env = Env::daemon();
    std::fs::write(env.path("history.sqlite3"), vec![b'x'; 10_000]).unwrap();
    env.run(&["run", "x", "--", "echo", "inside"]).assert_code(0).assert_stdout_has("inside");
}

#[test]
fn unwritable_history_directory_warns_once_and_locking_goes_on() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let ro = env.path("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let db = ro.join("history.sqlite3");
    let c = if nix::unistd::geteuid().is_root() {
        // Root writes anywhere: run as nobody, who may use the lock directory but not `ro`.
        std::fs::set_permissions(env.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for dir in [env.locks(), env.path("home")] {
            std::fs::create_dir_all(&dir).unwrap();
            nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(65534)), Some(nix::unistd::Gid::from_raw(65534)))
                .unwrap();
        }
        env.cli_as_user(65534)
    } else {
        env.cli()
    };
    let mut c = c;
    c.env("BUILDLOCK_HISTORY", &db);
    locking_goes_on(c, "read-only directory");
    assert!(!db.exists());
}

#[test]
fn waiting_message_says_how_long_the_holder_usually_holds_it() {
    let env = Env::new();
    for _ in 0..3 {
        env.hold(&[], "x").release();
    }
    let holder = env.hold(&[], "x");
    let mut waiter = env.spawn(&["run", "x", "--", "true"]);
    let line = waiter.expect_stderr("waiting for lock x");
    assert!(line.contains("; it usually holds it "), "{line}");
    holder.release();
    assert!(waiter.wait().success());
    // A command with no past holds gets no such figure.
    let other = env.spawn(&["run", "x", "--", "sh", "-c", "echo other; read x"]);
    let mut other = other;
    other.expect_line("other");
    let mut waiter = env.spawn(&["run", "x", "--", "true"]);
    let line = waiter.expect_stderr("waiting for lock x");
    assert!(!line.contains("usually"), "{line}");
    other.send_line();
    assert!(other.wait().success());
    assert!(waiter.wait().success());
}

#[test]
fn waiting_message_through_the_daemon_gives_the_place_in_line_and_the_usual_hold() {
    let env = Env::daemon();
    for _ in 0..3 {
        env.hold(&[], "x").release();
    }
    // The three holds are in the history before the next waiter asks.
    events_when(&env, "x", "released", 3);
    let holder = env.hold(&[], "x");
    let mut waiter = env.spawn(&["run", "x", "--", "true"]);
    let line = waiter.expect_stderr("waiting for lock x");
    assert!(line.contains("next in line"), "{line}");
    assert!(line.contains("; it usually holds it "), "{line}");
    holder.release();
    assert!(waiter.wait().success());
}

#[test]
fn status_says_how_long_each_holder_has_held_the_lock() {
    for env in [Env::new(), Env::daemon()] {
        let holder: Proc = env.hold(&[], "x");
        let out = env.run(&["status", "x"]);
        out.assert_code(0).assert_stdout_has("  held for ");
        let json = env.run(&["--json", "status", "x"]);
        let v: Value = serde_json::from_str(&json.stdout).unwrap();
        assert!(v["holder"]["held_ms"].as_i64().is_some_and(|ms| ms >= 0), "{v}");
        if env.daemon {
            assert!(out.stdout.contains("daemon lease: ") && out.stdout.contains(", held for "), "{}", out.stdout);
        }
        holder.release();
    }
}

#[test]
fn history_svg_is_written_for_a_lock() {
    let env = Env::new();
    env.hold(&[], "x").release();
    let svg = env.path("t.svg");
    env.run(&["history", "x", "--svg", svg.to_str().unwrap()]).assert_code(0).assert_stdout_has("1 rows");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.contains("echo locked; read x"), "{text}");
    let listed = env.run(&["history", "x"]);
    listed.assert_code(0).assert_stdout_has("granted").assert_stdout_has("released");
    let first_granted = listed.stdout.find(" granted ").unwrap();
    assert!(listed.stdout.find(" released ").unwrap() > first_granted, "newest last:\n{}", listed.stdout);
}

/// A request refused as a deadlock, and a holder stopped past its max-hold, are in the history
/// with why: through the daemon, and directly (a thread asking for its own lock; `run` stopping
/// its command).
#[test]
fn deadlocks_and_max_hold_stops_are_recorded() {
    let cli = env!("CARGO_BIN_EXE_buildlock-client");
    let env = Env::daemon();
    env.run(&["run", "A", "--", cli, "run", "A", "--", "true"]).assert_code(3);
    let all = events_when(&env, "A", "deadlock", 1);
    let refused = of(&all, "deadlock");
    assert!(refused[0]["detail"].as_str().unwrap().contains("would never end"), "{}", refused[0]);
    env.run(&["run", "--max-hold", "0.2", "--kill-after", "0.2", "B", "--", "sleep", "100"]).assert_code(124);
    let all = events_when(&env, "B", "stopped_max_hold", 1);
    assert!(of(&all, "stopped_max_hold")[0]["detail"].as_str().unwrap().contains("max-hold"));
    let stats = env.run(&["stats", "--json", "A"]);
    assert!(stats.stdout.contains("\"deadlocks\":1"), "{}", stats.stdout);
}
