//! `run`: exit codes, waiting, signals, kill -9, descriptor hygiene.

use crate::util::{is_dead, wait_dead, Env};

#[test]
fn run_passes_exit_status_through() {
    let env = Env::new();
    env.run(&["run", "x", "--", "sh", "-c", "exit 0"]).assert_code(0);
    env.run(&["run", "x", "--", "sh", "-c", "exit 42"]).assert_code(42);
}

#[test]
fn run_reports_death_by_signal_as_128_plus_n() {
    let env = Env::new();
    env.run(&["run", "x", "--", "sh", "-c", "kill -9 $$"]).assert_code(137);
    env.run(&["run", "x", "--", "sh", "-c", "kill -TERM $$"]).assert_code(143);
}

#[test]
fn command_not_found_is_127() {
    let env = Env::new();
    env.run(&["run", "x", "--", "/no/such/command"]).assert_code(127).assert_stderr_has("cannot run /no/such/command");
    // And the lock was released.
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(0);
}

#[test]
fn nonblock_conflict_exits_1_or_the_chosen_code_and_names_the_holder() {
    let env = Env::new();
    let holder = env.hold(&["-o", "build:libfastled_build"], "x");
    let out = env.run(&["run", "-n", "x", "--", "echo", "ran"]);
    out.assert_code(1)
        .assert_stderr_has(&format!("is held by pid {}", holder.cmd_pid()))
        .assert_stderr_has("operation 'build:libfastled_build'")
        .assert_stderr_has("exclusive");
    assert!(!out.stdout.contains("ran"), "CMD ran without the lock");
    env.run(&["run", "-n", "-E", "75", "x", "--", "true"]).assert_code(75);
    holder.release();
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(0);
}

#[test]
fn wait_timeout_exits_with_the_conflict_code() {
    let env = Env::new();
    let holder = env.hold(&[], "x");
    env.run(&["run", "-w", "0.3", "-E", "9", "x", "--", "echo", "ran"])
        .assert_code(9)
        .assert_stderr_has("timed out after")
        .assert_stderr_has(&format!("pid {}", holder.cmd_pid()));
    holder.release();
}

#[test]
fn waiter_is_told_who_holds_the_lock_and_gets_it_on_release() {
    let env = Env::new();
    let holder = env.hold(&["-o", "compiling"], "x");
    let mut waiter = env.spawn(&["run", "x", "--", "echo", "got it"]);
    let line = waiter.expect_stderr("waiting for lock x");
    assert!(line.contains(&format!("held by pid {}", holder.cmd_pid())), "{line}");
    assert!(line.contains("operation 'compiling'"), "{line}");
    holder.release();
    waiter.expect_line("got it");
    assert!(waiter.wait().success());
    // Said once, not once a second.
    assert_eq!(waiter.stderr().matches("waiting for lock").count(), 1, "{}", waiter.stderr());
}

/// `run` alone is killed with SIGKILL while CMD and a grandchild still work: the lock stays
/// held (and its holder is named truthfully) until every process that inherited it is gone.
fn killed_run_keeps_the_lock_for_its_command_and_children(env: &Env) {
    // CMD prints its own pid, then its background child's, then waits for it.
    let mut holder =
        env.spawn(&["run", "x", "--", "sh", "-c", "sleep 1000 </dev/null >/dev/null 2>&1 & echo $$; echo $!; wait"]);
    let cmd: u32 = holder.next_line().unwrap().parse().unwrap();
    let grandchild: u32 = holder.next_line().unwrap().parse().unwrap();
    // `run` names its command as the holder a moment after starting it.
    env.wait_for_handover("x", holder.pid());
    // A waiter that, once it runs, says whether the grandchild still had files open then.
    let check = format!("if ls /proc/{grandchild}/fd 2>/dev/null | grep -q .; then echo TOO-EARLY; fi; echo got it");
    let mut waiter = env.spawn(&["run", "x", "--", "sh", "-c", &check]);
    holder.kill9();
    holder.wait();

    // CMD and its child run on: nobody else may have the lock, and the holder named is CMD.
    let busy = env.run(&["run", "-n", "x", "--", "echo", "SECOND-HOLDER"]);
    busy.assert_code(1).assert_stderr_has("the command of a killed `run`").assert_stderr_has(&format!("pid {cmd} (sh"));
    assert!(!busy.stdout.contains("SECOND-HOLDER"));
    let status = env.run(&["status", "x"]);
    status.assert_code(0).assert_stdout_has("held").assert_stdout_has(&format!("pid {cmd}"));

    // CMD is gone, its child still holds the inherited descriptor: still held, and by the child.
    kill9(cmd);
    wait_dead(cmd);
    let busy = env.run(&["run", "-n", "x", "--", "echo", "SECOND-HOLDER"]);
    busy.assert_code(1).assert_stderr_has(&format!("pid {grandchild} (sleep 1000)"));
    assert!(!busy.stdout.contains("SECOND-HOLDER"));

    // The last one gone: the waiter is woken, and only then.
    kill9(grandchild);
    waiter.expect_line("got it");
    assert!(waiter.wait().success(), "{}", waiter.stderr());
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(0);
}

fn kill9(pid: u32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
}

#[test]
fn killed_run_keeps_the_lock_for_its_command_and_children_direct() {
    killed_run_keeps_the_lock_for_its_command_and_children(&Env::new());
}

#[test]
fn killed_run_keeps_the_lock_for_its_command_and_children_through_the_daemon() {
    killed_run_keeps_the_lock_for_its_command_and_children(&Env::daemon());
}

/// CMD exits normally but leaves a background child holding the inherited descriptor (a
/// compiler server): the lock is released at once all the same.
fn normal_exit_releases_the_lock_despite_a_background_child(env: &Env) {
    let out = env.run(&[
        "run",
        "x",
        "--",
        "sh",
        "-c",
        "sleep 1000 >/dev/null 2>&1 </dev/null & echo $!; ls -l /proc/$!/fd; echo token=$BUILDLOCK_TOKEN",
    ]);
    out.assert_code(0);
    let bg: u32 = out.stdout.lines().next().unwrap().trim().parse().unwrap();
    // The background child did inherit the lock file (as with flock(1))...
    assert!(out.stdout.contains("x.lock"), "CMD's child did not inherit the lock file:\n{}", out.stdout);
    assert!(!is_dead(bg));
    // ...and the lock is free once CMD has exited, while that child lives on.
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(0);
    assert!(!is_dead(bg));
    // CMD was told its fencing token.
    let token: u64 = out.stdout.lines().find_map(|l| l.strip_prefix("token=")).unwrap().parse().unwrap();
    assert!(token > 0);
    kill9(bg);
}

#[test]
fn normal_exit_releases_the_lock_despite_a_background_child_direct() {
    normal_exit_releases_the_lock_despite_a_background_child(&Env::new());
}

#[test]
fn normal_exit_releases_the_lock_despite_a_background_child_through_the_daemon() {
    normal_exit_releases_the_lock_despite_a_background_child(&Env::daemon());
}

#[test]
fn ctrl_c_reaches_the_command_and_the_lock_is_held_until_it_exits() {
    use std::os::unix::process::CommandExt;
    let env = Env::new();
    let me = env!("CARGO_BIN_EXE_buildlock-client");
    // On SIGINT, CMD checks from inside its trap that the lock is still held, then exits 5.
    let script = format!(
        "trap 'if {me} run -n x -- true 2>/dev/null; then echo NOT-HELD; else echo still-held; fi; exit 5' INT; \
         echo locked; read x"
    );
    let mut c = env.cli();
    c.args(["run", "x", "--", "sh", "-c", &script]).process_group(0);
    let mut p = crate::util::Proc::spawn(c);
    p.expect_line("locked");
    // What a terminal does on Ctrl+C: SIGINT to the whole foreground process group.
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(p.pid() as i32), nix::sys::signal::SIGINT).unwrap();
    p.expect_line("still-held");
    assert_eq!(p.wait().code(), Some(5));
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(0);
}

#[test]
fn sigterm_to_run_is_passed_on_to_the_command() {
    let env = Env::new();
    let mut p = env.spawn(&["run", "x", "--", "sh", "-c", "trap 'echo got-term; exit 7' TERM; echo locked; read x"]);
    p.expect_line("locked");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid() as i32), nix::sys::signal::SIGTERM).unwrap();
    p.expect_line("got-term");
    assert_eq!(p.wait().code(), Some(7));
}

#[test]
fn shared_holders_coexist_and_exclude_an_exclusive_one() {
    let env = Env::new();
    let a = env.hold(&["-s"], "x");
    let b = env.hold(&["--shared"], "x");
    env.run(&["run", "-n", "-x", "x", "--", "true"]).assert_code(1).assert_stderr_has("shared");
    a.release();
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(1);
    b.release();
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(0);
    let c = env.hold(&[], "x");
    env.run(&["run", "-n", "-s", "x", "--", "true"]).assert_code(1);
    c.release();
}

#[test]
fn global_flags_go_before_or_after_the_command() {
    let env = Env::new();
    let dir = env.path("elsewhere");
    let d = dir.to_str().unwrap();
    env.run(&["--dir", d, "run", "x", "--", "true"]).assert_code(0);
    env.run(&["run", "--dir", d, "--stale-after", "5", "x", "--", "true"]).assert_code(0);
    env.run(&["status", "--json", "--dir", d, "--no-daemon"]).assert_code(0).assert_stdout_has("\"locks\"");
    assert!(dir.join("x.lock").exists());
    assert!(!env.lock_file("x").exists());
}

#[test]
fn lock_file_deleted_under_its_holder_is_reported() {
    let env = Env::new();
    let lock = env.lock_file("x");
    let script = format!("rm {}; echo removed", lock.display());
    let out = env.run(&["run", "x", "--", "sh", "-c", &script]);
    out.assert_code(1).assert_stderr_has("lost while held").assert_stderr_has("deleted or replaced");
}

/// CMD is a binary with file capabilities, started by an unprivileged user: the kernel clears
/// the parent-death signal on such an exec, so stopping CMD when `run` dies could never be
/// relied on. The inherited descriptor survives the exec: `run` killed, the lock stays with CMD.
fn killed_run_keeps_the_lock_for_a_file_capability_command(env: &Env) {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: setting file capabilities and switching users needs root");
        return;
    }
    let capsleep = env.path("capsleep");
    std::fs::copy("/bin/sleep", &capsleep).unwrap();
    let setcap = std::process::Command::new("setcap").arg("cap_net_bind_service+ep").arg(&capsleep).output();
    if !setcap.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: setcap is missing or this file system keeps no capabilities ({setcap:?})");
        return;
    }
    // Let nobody reach the test's directories.
    std::fs::set_permissions(env.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for dir in [env.locks(), env.path("home"), env.runtime()] {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(65534)), Some(nix::unistd::Gid::from_raw(65534)))
            .unwrap();
    }
    let mut c = env.cli_as_user(65534);
    c.args(["run", "x", "--", "sh", "-c"]).arg(format!("echo $$; exec {} 1000", capsleep.display()));
    let mut holder = crate::util::Proc::spawn(c);
    let cmd: u32 = holder.next_line().unwrap().parse().unwrap();
    env.wait_for_handover("x", holder.pid());
    // Until the exec is done, CMD is still the shell.
    crate::util::wait_until(|| {
        std::fs::read_to_string(format!("/proc/{cmd}/comm")).is_ok_and(|c| c.trim() == "capsleep")
    });
    let status = std::fs::read_to_string(format!("/proc/{cmd}/status")).unwrap();
    assert!(status.lines().any(|l| l.starts_with("CapPrm:") && !l.ends_with("0000000000000000")), "{status}");
    // Through the daemon if the test asked for one: no fallback to the files.
    assert!(!holder.stderr().contains("no buildlockd"), "{}", holder.stderr());
    // `holder` is setpriv, which exec'd buildlock-client: the same process.
    holder.kill9();
    holder.wait();
    env.run(&["--no-daemon", "run", "-n", "x", "--", "echo", "SECOND-HOLDER"])
        .assert_code(1)
        .assert_stderr_has(&format!("pid {cmd}"));
    kill9(cmd);
    wait_dead(cmd);
    env.run(&["--no-daemon", "run", "-n", "x", "--", "true"]).assert_code(0);
}

#[test]
fn killed_run_keeps_the_lock_for_a_file_capability_command_direct() {
    killed_run_keeps_the_lock_for_a_file_capability_command(&Env::new());
}

#[test]
fn killed_run_keeps_the_lock_for_a_file_capability_command_through_the_daemon() {
    killed_run_keeps_the_lock_for_a_file_capability_command(&Env::daemon());
}

/// `--max-hold`: a command past its limit is stopped, and the lock goes to the next waiter only
/// once its whole process group is gone. Here SIGTERM ends the command at once, but its
/// background child ignores it and lives until SIGKILL, `--kill-after` later.
fn max_hold_stops_a_wedged_command_and_its_group(env: &Env) {
    let script = "(trap '' TERM; exec sleep 1000) </dev/null >/dev/null 2>&1 & echo $$; echo $!; wait";
    let mut holder = env.spawn(&["run", "--max-hold", "0.3", "--kill-after", "1", "x", "--", "sh", "-c", script]);
    let cmd: u32 = holder.next_line().unwrap().parse().unwrap();
    let child: u32 = holder.next_line().unwrap().parse().unwrap();
    // Once it runs, the waiter says whether either was still alive (not a zombie) then.
    let check = format!(
        "for p in {cmd} {child}; do if [ -d /proc/$p ] && ! grep -q '^State:.*Z' /proc/$p/status; then echo TOO-EARLY $p; fi; \
         done; echo got it"
    );
    let mut waiter = env.spawn(&["run", "x", "--", "sh", "-c", &check]);
    let status = holder.wait();
    assert_eq!(status.code(), Some(124), "{}", holder.stderr());
    let err = holder.stderr();
    assert!(err.contains("its --max-hold: stopping it"), "{err}");
    assert!(err.contains(&format!("process group {cmd} did not stop after SIGTERM: SIGKILL")), "{err}");
    assert_eq!(waiter.next_line().as_deref(), Some("got it"), "{}", waiter.stderr());
    assert!(waiter.wait().success());
    assert!(is_dead(cmd) && is_dead(child));
}

#[test]
fn max_hold_stops_a_wedged_command_and_its_group_direct() {
    max_hold_stops_a_wedged_command_and_its_group(&Env::new());
}

#[test]
fn max_hold_stops_a_wedged_command_and_its_group_through_the_daemon() {
    max_hold_stops_a_wedged_command_and_its_group(&Env::daemon());
}

#[test]
fn max_hold_leaves_a_command_that_finishes_in_time_alone() {
    let env = Env::new();
    env.run(&["run", "--max-hold", "1h", "x", "--", "sh", "-c", "exit 3"]).assert_code(3);
    env.run(&["run", "--max-hold", "soon", "x", "--", "true"]).assert_code(2).assert_stderr_has("is not a duration");
    // A grace alone is for a max-hold from the config file; without one it changes nothing.
    env.run(&["run", "--kill-after", "1", "x", "--", "true"]).assert_code(0);
}

/// Under `--max-hold` the command leads its own process group, which the terminal no longer
/// sends Ctrl+C to: `run` passes SIGINT on itself.
#[test]
fn max_hold_passes_ctrl_c_on_to_the_command() {
    let env = Env::new();
    let script = "trap 'echo got INT; kill $!; exit 7' INT; sleep 1000 & echo ready; wait";
    let mut holder = env.spawn(&["run", "--max-hold", "1h", "x", "--", "sh", "-c", script]);
    holder.expect_line("ready");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(holder.pid() as i32), nix::sys::signal::SIGINT).unwrap();
    holder.expect_line("got INT");
    assert_eq!(holder.wait().code(), Some(7), "{}", holder.stderr());
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(0);
}

/// A Ctrl+C that comes after CMD started but before `run` has told its forwarder about it (a
/// window of microseconds, held open here by a test-only switch) still reaches CMD.
#[test]
fn max_hold_passes_on_a_ctrl_c_that_comes_as_the_command_starts() {
    let env = Env::new();
    let fifo = env.path("go.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let script = "trap 'echo got INT; kill $!; exit 7' INT; sleep 1000 & echo ready; wait";
    let mut c = env.cli();
    c.env("BUILDLOCK_TEST_WAIT_AFTER_SPAWN", &fifo);
    c.args(["run", "--max-hold", "1h", "x", "--", "sh", "-c", script]);
    let mut holder = crate::util::Proc::spawn(c);
    holder.expect_line("ready");
    holder.expect_stderr("waiting after starting CMD");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(holder.pid() as i32), nix::sys::signal::SIGINT).unwrap();
    // Let `run` go on: it must pass the SIGINT it kept on to CMD's group.
    std::fs::write(&fifo, "go").unwrap();
    holder.expect_line("got INT");
    assert_eq!(holder.wait().code(), Some(7), "{}", holder.stderr());
}

/// `status` (and any waiter) shows a holder's max-hold, from its metadata, in both modes.
fn status_shows_the_max_hold(env: &Env) {
    let mut holder = env.spawn(&["run", "--max-hold", "20m", "x", "--", "sh", "-c", "echo locked; read x"]);
    holder.expect_line("locked");
    env.wait_for_handover("x", holder.pid());
    env.run(&["status", "x"]).assert_code(0).assert_stdout_has("max-hold 20m");
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(1).assert_stderr_has("max-hold 20m");
    holder.send_line();
    assert!(holder.wait().success());
}

#[test]
fn status_shows_the_max_hold_direct() {
    status_shows_the_max_hold(&Env::new());
}

#[test]
fn status_shows_the_max_hold_through_the_daemon() {
    status_shows_the_max_hold(&Env::daemon());
}
