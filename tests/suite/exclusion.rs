//! Mutual exclusion under load, and under races to recover the same stale lock.

use crate::stale::hostname;
use crate::util::{dead_pid, Env};

fn hammer(env: &Env, global: &[&str], workers: usize, each: usize) {
    std::fs::write(env.path("counter"), "0").unwrap();
    let script = env.increment_script();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                for _ in 0..each {
                    let mut args = global.to_vec();
                    args.extend_from_slice(&["run", "x", "--", "sh", "-c", &script]);
                    env.run(&args).assert_code(0);
                }
            });
        }
    });
    let total = std::fs::read_to_string(env.path("counter")).unwrap();
    assert_eq!(total.trim(), (workers * each).to_string(), "lost increments");
}

#[test]
fn concurrent_increments_under_os_locks_lose_nothing() {
    hammer(&Env::new(), &[], 6, 25);
}

#[test]
fn concurrent_increments_under_soft_locks_lose_nothing() {
    hammer(&Env::new(), &["--soft"], 4, 15);
}

#[test]
fn readers_and_writers_mixed_never_overlap_a_writer() {
    let env = Env::new();
    let w = env.path("writer");
    let r = env.path("readers");
    std::fs::create_dir(&r).unwrap();
    // A writer must find no reader inside; a reader must find no writer inside.
    let writer = format!(
        "mkdir {w} || exit 99; [ -z \"$(ls {r})\" ] || exit 98; sleep 0.01; rmdir {w}",
        w = w.display(),
        r = r.display()
    );
    let reader = format!(
        "[ ! -d {w} ] || exit 97; touch {r}/$$; sleep 0.01; [ ! -d {w} ] || exit 96; rm {r}/$$",
        w = w.display(),
        r = r.display()
    );
    std::thread::scope(|s| {
        for i in 0..6 {
            let (mode, script) = if i % 3 == 0 { ("-x", &writer) } else { ("-s", &reader) };
            let env = &env;
            s.spawn(move || {
                for _ in 0..15 {
                    env.run(&["run", mode, "x", "--", "sh", "-c", script]).assert_code(0);
                }
            });
        }
    });
}

#[test]
fn racing_recoveries_of_one_stale_os_lock_never_both_hold_it() {
    let env = Env::new();
    let script = format!(
        "mkdir {m} || {{ echo TWO-HOLDERS; exit 99; }}; sleep 0.02; rmdir {m}",
        m = env.path("inside").display()
    );
    for round in 0..5 {
        std::fs::create_dir_all(env.locks()).unwrap();
        env.write_meta("x", &format!(r#"{{"pid": {}, "hostname": "{}", "timestamp": 1.0}}"#, dead_pid(), hostname()));
        let mut procs: Vec<_> = (0..6).map(|_| env.spawn(&["run", "x", "--", "sh", "-c", &script])).collect();
        let mut recovered = 0;
        for p in &mut procs {
            assert_eq!(p.wait().code(), Some(0), "round {round}: {}", p.stderr());
            recovered += p.stderr().matches("Recovered stale lock").count();
        }
        assert_eq!(recovered, 1, "round {round}");
    }
}
