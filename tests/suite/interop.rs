//! Interoperation with the real Python `fasteners` package (PyPI): its locks exclude ours and
//! ours exclude it, in both modes.

use std::process::Stdio;

use crate::util::{output_bounded, wait_bounded, Env, Proc};

fn try_fasteners(env: &Env, kind: &str, name: &str) -> String {
    let out = output_bounded(env.fasteners(&["try", kind, env.lock_file(name).to_str().unwrap()]), "fasteners try");
    assert!(out.status.success(), "fasteners failed: {}", out.stderr);
    out.stdout.trim().to_owned()
}

fn hold_fasteners(env: &Env, kind: &str, name: &str) -> Proc {
    std::fs::create_dir_all(env.locks()).unwrap();
    let mut c = env.fasteners(&["hold", kind, env.lock_file(name).to_str().unwrap()]);
    c.stdin(Stdio::piped());
    let mut p = Proc::spawn(c);
    p.expect_line("locked");
    p
}

#[test]
fn fasteners_interprocess_lock_excludes_ours_and_names_its_pid() {
    let env = Env::new();
    let py = hold_fasteners(&env, "plain", "x");
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(1).assert_stderr_has(&format!("pid {}", py.pid()));
    env.run(&["run", "-n", "-s", "x", "--", "true"]).assert_code(1);
    let mut waiter = env.spawn(&["run", "x", "--", "echo", "got it"]);
    py.release();
    waiter.expect_line("got it");
    assert!(waiter.wait().success());
}

#[test]
fn our_exclusive_lock_excludes_every_fasteners_lock() {
    let env = Env::new();
    let ours = env.hold(&[], "x");
    assert_eq!(try_fasteners(&env, "plain", "x"), "busy");
    assert_eq!(try_fasteners(&env, "read", "x"), "busy");
    assert_eq!(try_fasteners(&env, "write", "x"), "busy");
    ours.release();
    assert_eq!(try_fasteners(&env, "plain", "x"), "acquired");
}

#[test]
fn our_shared_lock_admits_fasteners_readers_and_excludes_writers() {
    let env = Env::new();
    let ours = env.hold(&["-s"], "x");
    assert_eq!(try_fasteners(&env, "read", "x"), "acquired");
    assert_eq!(try_fasteners(&env, "write", "x"), "busy");
    assert_eq!(try_fasteners(&env, "plain", "x"), "busy");
    ours.release();
    assert_eq!(try_fasteners(&env, "write", "x"), "acquired");
}

#[test]
fn fasteners_reader_admits_our_readers_and_excludes_our_writers() {
    let env = Env::new();
    let py = hold_fasteners(&env, "read", "x");
    env.run(&["run", "-n", "-s", "x", "--", "true"]).assert_code(0);
    env.run(&["run", "-n", "-x", "x", "--", "true"]).assert_code(1).assert_stderr_has("shared");
    py.release();
    let py = hold_fasteners(&env, "write", "x");
    env.run(&["run", "-n", "-s", "x", "--", "true"]).assert_code(1).assert_stderr_has("exclusive");
    py.release();
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(0);
}

#[test]
fn fasteners_and_buildlock_incrementing_one_counter_lose_nothing() {
    let env = Env::new();
    std::fs::create_dir_all(env.locks()).unwrap();
    let counter = env.path("counter");
    std::fs::write(&counter, "0").unwrap();
    let lock = env.lock_file("x");
    const N: usize = 40;
    let py: Vec<_> = (0..2)
        .map(|_| {
            env.fasteners(&["incr", lock.to_str().unwrap(), counter.to_str().unwrap(), &N.to_string()]).spawn().unwrap()
        })
        .collect();
    let script = env.increment_script();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..N {
                    env.run(&["run", "x", "--", "sh", "-c", &script]).assert_code(0);
                }
            });
        }
    });
    for mut p in py {
        let st = wait_bounded(&mut p).unwrap_or_else(|e| panic!("a fasteners incrementer: {e}"));
        assert!(st.success(), "a fasteners process saw two holders or failed");
    }
    assert_eq!(std::fs::read_to_string(&counter).unwrap().trim(), (4 * N).to_string());
}
