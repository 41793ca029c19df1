//! `status` and `break` output, for people and scripts.

use crate::stale::hostname;
use crate::util::{dead_pid, Env};

#[test]
fn status_of_a_held_lock_names_pid_command_host_mode_and_since() {
    let env = Env::new();
    let holder = env.hold(&["-s", "-o", "build:libfastled_build"], "libfastled_build");
    let out = env.run(&["status", "libfastled_build"]);
    out.assert_code(0)
        .assert_stdout_has("libfastled_build")
        .assert_stdout_has("held (os lock, shared)")
        .assert_stdout_has(&format!("pid {}", holder.cmd_pid()))
        .assert_stdout_has(&hostname())
        .assert_stdout_has("since ")
        .assert_stdout_has("operation 'build:libfastled_build'");
    let out = env.run(&["status", "--json", "libfastled_build"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["state"], "held");
    assert_eq!(v["kind"], "os");
    assert_eq!(v["holder"]["pid"], holder.cmd_pid());
    assert_eq!(v["holder"]["mode"], "shared");
    assert_eq!(v["holder"]["host"], hostname());
    assert_eq!(v["holder"]["operation"], "build:libfastled_build");
    // The holder is CMD, which `run` handed the lock to: its command line, not `run`'s.
    assert!(v["holder"]["command"].as_str().unwrap().contains("echo locked"), "{v}");
    assert!(v["holder"]["since"].is_string(), "{v}");
    holder.release();
    let v: serde_json::Value =
        serde_json::from_str(&env.run(&["status", "--json", "libfastled_build"]).stdout).unwrap();
    assert_eq!(v["state"], "free");
    assert!(v["holder"].is_null());
}

#[test]
fn status_without_target_lists_every_lock_in_the_dir() {
    let env = Env::new();
    env.run(&["status"]).assert_code(0).assert_stdout_has("no locks in");
    let a = env.hold(&[], "alpha");
    env.run(&["run", "beta", "--", "true"]).assert_code(0);
    let out = env.run(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let locks = v["locks"].as_array().unwrap();
    let names: Vec<_> = locks.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["alpha", "beta"]);
    assert_eq!(locks[0]["state"], "held");
    assert_eq!(locks[1]["state"], "free");
    env.run(&["status"]).assert_stdout_has("alpha").assert_stdout_has("beta");
    a.release();
}

#[test]
fn status_does_not_create_files() {
    let env = Env::new();
    env.run(&["status", "nothing"]).assert_code(0).assert_stdout_has("free");
    assert!(!env.lock_file("nothing").exists());
    assert!(!env.locks().exists());
}

#[test]
fn break_of_a_free_lock_cleans_leftover_metadata() {
    let env = Env::new();
    std::fs::create_dir_all(env.locks()).unwrap();
    std::fs::write(env.lock_file("x"), "").unwrap();
    env.write_meta("x", &format!(r#"{{"pid": {}, "hostname": "{}"}}"#, dead_pid(), hostname()));
    let out = env.run(&["--json", "break", "x"]);
    out.assert_code(0);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["result"], "not-held");
    assert!(v["detail"].as_str().unwrap().contains("removed leftover metadata"), "{v}");
    assert!(!env.locks().join("x.lock.pid").exists());
    env.run(&["break", "x"]).assert_code(0).assert_stdout_has("nothing to do");
}

#[test]
fn break_refuses_a_live_holder_and_says_who() {
    let env = Env::new();
    let holder = env.hold(&[], "x");
    let out = env.run(&["--json", "break", "x"]);
    out.assert_code(1);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["result"], "refused");
    assert!(v["detail"].as_str().unwrap().contains(&format!("stop pid {}", holder.cmd_pid())), "{v}");
    // The holder is untouched.
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(1);
    holder.release();
}

#[test]
fn status_into_a_closed_pipe_ends_quietly_as_unix_tools_do() {
    use std::os::unix::process::ExitStatusExt;
    let env = Env::new();
    env.run(&["run", "gamma", "--", "true"]).assert_code(0);
    // `status | head -0`: the reader is gone before anything is written.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut c = env.cli();
    c.args(["status"]).stdout(writer).stderr(std::process::Stdio::piped());
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "status panicked on a closed pipe: {stderr}");
    assert_eq!(out.status.signal(), Some(13), "status did not end by SIGPIPE: {:?}, {stderr}", out.status);
}
