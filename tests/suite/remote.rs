//! Remote locks on a real PostgreSQL server that each test starts (`tests/support/pg_server.rs`),
//! through the real CLI (`--backend URL`): talking to the server itself (`Env::new()`, which sets
//! `BUILDLOCK_NO_DAEMON`), and through the daemon, which holds the server sessions
//! (`Env::daemon()`). The key tests run both ways (`both!`).

use crate::netns::{NetHost, HOSTS_CIDR};
use crate::pg_server::PgServer;
use crate::util::*;

/// `buildlock-client --backend URL ARGS...`.
fn remote(env: &Env, pg: &PgServer, args: &[&str]) -> Out {
    let url = pg.url();
    let mut all = vec!["--backend", url.as_str()];
    all.extend_from_slice(args);
    env.run(&all)
}

fn spawn_remote(env: &Env, pg: &PgServer, args: &[&str]) -> Proc {
    let url = pg.url();
    let mut all = vec!["--backend", url.as_str()];
    all.extend_from_slice(args);
    env.spawn(&all)
}

/// Two tests from one body taking an `Env`: `NAME_direct` (the CLI talks to the server) and
/// `NAME_through_the_daemon` (the daemon holds the server session).
macro_rules! both {
    ($body:ident: $direct:ident, $daemon:ident) => {
        #[test]
        fn $direct() {
            $body(Env::new())
        }
        #[test]
        fn $daemon() {
            $body(Env::daemon())
        }
    };
}

/// Sessions waiting in the server's queue for a buildlock lock.
fn waiting(pg: &PgServer) -> usize {
    pg.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").parse().unwrap()
}

both!(remote_exclusive_excludes_across_processes: remote_exclusive_excludes_across_processes_direct, remote_exclusive_excludes_across_processes_through_the_daemon);

fn remote_exclusive_excludes_across_processes(env: Env) {
    let Some(pg) = PgServer::start() else { return };
    let dir = env.path("inside");
    // Every CMD checks independently that it is alone: mkdir fails if another is inside.
    let script = format!("mkdir {0} || echo TWO-HOLDERS; sleep 0.05; rmdir {0}; echo done", dir.display());
    let mut procs: Vec<Proc> =
        (0..6).map(|_| spawn_remote(&env, &pg, &["run", "x", "--", "sh", "-c", &script])).collect();
    for p in &mut procs {
        assert_eq!(p.next_line().as_deref(), Some("done"), "two holders at once: {}", p.stderr());
        assert!(p.wait().success(), "{}", p.stderr());
    }
    // The local lock of the same name is another lock.
    let mut holder = spawn_remote(&env, &pg, &["run", "x", "--", "sh", "-c", "echo locked; read x"]);
    holder.expect_line("locked");
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(0);
    let out = remote(&env, &pg, &["run", "-n", "x", "--", "true"]);
    out.assert_code(1).assert_stderr_has(&format!("busy: lock x on postgres://127.0.0.1:{}/postgres", pg.port));
    out.assert_stderr_has(&format!("held by pid {}", holder.pid()));
    holder.send_line();
    assert!(holder.wait().success());
}

both!(remote_shared_shares_and_wait_times_out_naming_the_holder: remote_shared_shares_and_wait_times_out_naming_the_holder_direct, remote_shared_shares_and_wait_times_out_naming_the_holder_through_the_daemon);

fn remote_shared_shares_and_wait_times_out_naming_the_holder(env: Env) {
    let Some(pg) = PgServer::start() else { return };
    let mut reader =
        spawn_remote(&env, &pg, &["run", "-s", "-o", "reading cache", "c", "--", "sh", "-c", "echo locked; read x"]);
    reader.expect_line("locked");
    remote(&env, &pg, &["run", "-s", "-n", "c", "--", "true"]).assert_code(0);
    let out = remote(&env, &pg, &["run", "-w", "0.3", "-E", "7", "c", "--", "true"]);
    out.assert_code(7).assert_stderr_has("timed out waiting for lock c on postgres://");
    out.assert_stderr_has(&format!("held by pid {} on", reader.pid())).assert_stderr_has("(reading cache), shared");
    // A waiter is told which backend the lock lives on, and who holds it.
    let mut writer = spawn_remote(&env, &pg, &["run", "c", "--", "true"]);
    let line = writer.expect_stderr("waiting for lock c");
    assert!(
        line.contains(&format!("(postgres://127.0.0.1:{}/postgres), held by pid {}", pg.port, reader.pid())),
        "{line}"
    );
    reader.send_line();
    assert!(reader.wait().success());
    assert!(writer.wait().success(), "{}", writer.stderr());
    // `acquire --pid` is not available for remote locks yet: refused, never taken locally.
    remote(&env, &pg, &["acquire", "c"]).assert_code(2).assert_stderr_has("lives on a remote backend");
}

both!(remote_waiters_are_served_in_order_and_tokens_increase: remote_waiters_are_served_in_order_and_tokens_increase_direct, remote_waiters_are_served_in_order_and_tokens_increase_through_the_daemon);

fn remote_waiters_are_served_in_order_and_tokens_increase(env: Env) {
    let Some(pg) = PgServer::start() else { return };
    let order = env.path("order");
    let mut holder =
        spawn_remote(&env, &pg, &["run", "q", "--", "sh", "-c", "echo locked; echo $BUILDLOCK_TOKEN; read x"]);
    holder.expect_line("locked");
    let first: u64 = holder.next_line().unwrap().parse().unwrap();
    let mut waiters = Vec::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let script = format!("echo {name} $BUILDLOCK_TOKEN >> {}", order.display());
        waiters.push(spawn_remote(&env, &pg, &["run", "q", "--", "sh", "-c", &script]));
        wait_until(|| waiting(&pg) == i + 1);
    }
    let status = remote(&env, &pg, &["status", "q"]);
    status.assert_code(0).assert_stdout_has(&format!("held by pid {}", holder.pid()));
    assert_eq!(status.stdout.matches("waiting:").count(), 3, "{}", status.stdout);
    holder.send_line();
    assert!(holder.wait().success());
    for w in &mut waiters {
        assert!(w.wait().success(), "{}", w.stderr());
    }
    let text = std::fs::read_to_string(&order).unwrap();
    let lines: Vec<(&str, u64)> = text
        .lines()
        .map(|l| {
            let (n, t) = l.split_once(' ').unwrap();
            (n, t.parse().unwrap())
        })
        .collect();
    assert_eq!(lines.iter().map(|l| l.0).collect::<Vec<_>>(), ["a", "b", "c"], "FIFO: {text}");
    let mut last = first;
    for (_, t) in &lines {
        assert!(*t > last, "tokens grow: {first} then {text}");
        last = *t;
    }
}

both!(remote_holder_killed_frees_the_lock_and_a_killed_run_leaves_it_to_its_command: remote_holder_killed_frees_the_lock_and_a_killed_run_leaves_it_to_its_command_direct, remote_holder_killed_frees_the_lock_and_a_killed_run_leaves_it_to_its_command_through_the_daemon);

fn remote_holder_killed_frees_the_lock_and_a_killed_run_leaves_it_to_its_command(env: Env) {
    let Some(pg) = PgServer::start() else { return };
    let mut holder = spawn_remote(&env, &pg, &["run", "k", "--", "sh", "-c", "echo locked; exec sleep 1000"]);
    holder.expect_line("locked");
    let cmd = holder.cmd_pid();
    // `run` killed alone: its command inherited the connection, so it still holds the lock.
    holder.kill9();
    holder.wait();
    remote(&env, &pg, &["run", "-n", "k", "--", "true"]).assert_code(1).assert_stderr_has("busy: lock k");
    // The command killed too: the connection closes and the server frees the lock at once.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(cmd as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_dead(cmd);
    remote(&env, &pg, &["run", "-w", "30", "k", "--", "true"]).assert_code(0);
}

both!(remote_run_killed_before_binding_its_command_leaves_the_lock_to_the_command: remote_run_killed_before_binding_its_command_leaves_the_lock_to_the_command_direct, remote_run_killed_before_binding_its_command_leaves_the_lock_to_the_command_through_the_daemon);

/// `run` killed after starting CMD but before the daemon heard that the lease is CMD's: CMD
/// inherited what keeps the lock (the server connection, or a copy of `run`'s connection to the
/// daemon), so the lock is not free while CMD runs.
fn remote_run_killed_before_binding_its_command_leaves_the_lock_to_the_command(env: Env) {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.url();
    let mut c = env.cli();
    c.env("BUILDLOCK_TEST_STALL_BEFORE_BIND", "1");
    c.args(["--backend", url.as_str(), "run", "b", "--", "sh", "-c", "echo locked; exec sleep 1000"]);
    let mut holder = Proc::spawn(c);
    holder.expect_line("locked");
    holder.expect_stderr("stalled before binding");
    let cmd = holder.cmd_pid();
    holder.kill9();
    holder.wait();
    remote(&env, &pg, &["run", "-n", "b", "--", "true"]).assert_code(1).assert_stderr_has("busy: lock b");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(cmd as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_dead(cmd);
    remote(&env, &pg, &["run", "-w", "30", "b", "--", "true"]).assert_code(0);
}

both!(remote_server_restart_mid_hold_stops_the_command: remote_server_restart_mid_hold_stops_the_command_direct, remote_server_restart_mid_hold_stops_the_command_through_the_daemon);

fn remote_server_restart_mid_hold_stops_the_command(env: Env) {
    let Some(pg) = PgServer::start() else { return };
    let script = "echo locked; exec sleep 1000";
    let mut holder = spawn_remote(&env, &pg, &["run", "r", "--", "sh", "-c", script]);
    holder.expect_line("locked");
    let cmd = holder.cmd_pid();
    pg.restart();
    let st = holder.wait();
    assert_eq!(st.code(), Some(122), "{}", holder.stderr());
    let err = holder.stderr();
    assert!(err.contains("lock r on postgres://127.0.0.1:") && err.contains("was lost while held"), "{err}");
    // Through the daemon, the kernel's guard (armed at the binding) kills the command the moment
    // the server ends the session; without it, `run` stops it (SIGTERM first).
    let how = if env.daemon { "by the kernel's guard" } else { "stopping the command" };
    assert!(err.contains(how), "{err}");
    assert_eq!(err.matches("was lost while held").count(), 1, "the loss is said once: {err}");
    assert!(is_dead(cmd));
    // With --on-lost=warn the command runs on.
    let mut warned = spawn_remote(
        &env,
        &pg,
        &["run", "--on-lost", "warn", "r", "--", "sh", "-c", "echo locked; read x; echo ran-on"],
    );
    warned.expect_line("locked");
    pg.restart();
    warned.expect_stderr("was lost while held");
    warned.send_line();
    warned.expect_line("ran-on");
    assert_eq!(warned.wait().code(), Some(1), "the loss is still an error: {}", warned.stderr());
}

#[test]
fn remote_tls_verify_full_works_and_a_wrong_root_is_refused() {
    let Some(pg) = PgServer::start() else { return };
    let env = Env::new();
    let good = pg.url_with("localhost", &format!("sslmode=verify-full&sslrootcert={}", pg.ca().display()));
    env.run(&["--backend", &good, "run", "t", "--", "true"]).assert_code(0);
    let wrong = pg.url_with("localhost", &format!("sslmode=verify-full&sslrootcert={}", pg.other_ca().display()));
    let out = env.run(&["--backend", &wrong, "run", "t", "--", "true"]);
    out.assert_code(2).assert_stderr_has(&format!("cannot reach PostgreSQL server localhost:{}", pg.port));
    out.assert_stderr_has("certificate").assert_stderr_has("sslrootcert");
}

both!(remote_wrong_password_and_closed_port_are_clear_errors: remote_wrong_password_and_closed_port_are_clear_errors_direct, remote_wrong_password_and_closed_port_are_clear_errors_through_the_daemon);

fn remote_wrong_password_and_closed_port_are_clear_errors(env: Env) {
    let Some(pg) = PgServer::start() else { return };
    let bad = format!("postgres://{}:wrong@127.0.0.1:{}/postgres?sslmode=disable", crate::pg_server::USER, pg.port);
    let out = env.run(&["--backend", &bad, "run", "p", "--", "true"]);
    out.assert_code(2).assert_stderr_has("refused user").assert_stderr_has(".pgpass");
    assert!(!out.stderr.contains("wrong@"), "{}", out.stderr);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let closed = format!("postgres://u@127.0.0.1:{port}/db?connect_timeout=3");
    env.run(&["--backend", &closed, "run", "p", "--", "true"]).assert_code(2).assert_stderr_has("connection refused");
    // Local locks are unaffected.
    env.run(&["run", "p", "--", "true"]).assert_code(0);
}

#[test]
fn remote_config_file_routes_by_glob() {
    let Some(pg) = PgServer::start() else { return };
    let env = Env::new();
    let conf = env.path("config.toml");
    std::fs::write(&conf, format!("[[locks]]\nmatch = \"deploy-*\"\nbackend = \"{}\"\nmax_hold = \"30m\"\n", pg.url()))
        .unwrap();
    let mut holder = env.cli();
    holder.env("BUILDLOCK_CONFIG", &conf).args(["run", "deploy-x", "--", "sh", "-c", "echo locked; read x"]);
    let mut holder = Proc::spawn(holder);
    holder.expect_line("locked");
    assert_eq!(pg.psql("SELECT count(*) FROM buildlock_holders h JOIN buildlock_locks l ON l.id = h.lock_id WHERE l.name = 'deploy-x'"), "1");
    let mut status = env.cli();
    status.env("BUILDLOCK_CONFIG", &conf).arg("status");
    let out = output_bounded(status, "status");
    out.assert_code(0).assert_stdout_has(&format!("lock deploy-x on postgres://127.0.0.1:{}/postgres:", pg.port));
    assert!(!out.stdout.contains(crate::pg_server::PASSWORD), "{}", out.stdout);
    // Another name stays local.
    let mut local = env.cli();
    local.env("BUILDLOCK_CONFIG", &conf).args(["run", "build", "--", "true"]);
    output_bounded(local, "run build").assert_code(0);
    assert!(env.lock_file("build").exists() && !env.lock_file("deploy-x").exists());
    holder.send_line();
    assert!(holder.wait().success());
}

#[test]
fn remote_cut_off_host_stops_its_command_before_another_host_gets_the_lock() {
    let Some(net) = NetHost::create() else { return };
    let Some(pg) = PgServer::start_listening(Some((&net.server_ip, HOSTS_CIDR))) else { return };
    let env = Env::new();
    let url = pg.url_with(&net.server_ip, "sslmode=disable");
    // The holder runs on the cut-off host (in its namespace), with the shortest remote timeout.
    let cmd = env.cli();
    let mut holder = net.command(cmd.get_program());
    holder.args([
        "--backend",
        &url,
        "--remote-timeout",
        "8",
        "run",
        "cut",
        "--",
        "sh",
        "-c",
        "echo $$; exec sleep 1000",
    ]);
    holder.env_clear().envs(cmd.get_envs().filter_map(|(k, v)| Some((k, v?)))).current_dir(env.path(""));
    let mut holder = Proc::spawn(holder);
    let cmd_pid: u32 = holder.next_line().unwrap().parse().unwrap();
    // Another host (the root namespace) waits; when granted, it checks that the cut-off
    // holder's command is gone (or a zombie) by then.
    let check = format!(
        "if [ -d /proc/{cmd_pid} ] && ! grep -q '^State:.*Z' /proc/{cmd_pid}/status; then echo TOO-EARLY; fi; echo got it"
    );
    let mut waiter = env.spawn(&["--backend", &pg.url(), "run", "cut", "--", "sh", "-c", &check]);
    wait_until(|| waiting(&pg) == 1);
    net.cut();
    let st = holder.wait();
    assert_eq!(st.code(), Some(122), "{}", holder.stderr());
    assert!(holder.stderr().contains("was lost while held"), "{}", holder.stderr());
    assert_eq!(waiter.next_line().as_deref(), Some("got it"), "{}", waiter.stderr());
    assert!(waiter.wait().success());
}

#[test]
fn remote_lock_and_session_end_when_cmd_exits_even_if_a_background_child_lives_on() {
    let Some(pg) = PgServer::start() else { return };
    let env = Env::new();
    let out = remote(&env, &pg, &["run", "bg", "--", "sh", "-c", "sleep 1000 >/dev/null 2>&1 & echo $!"]);
    out.assert_code(0);
    let bg: i32 = out.stdout.trim().parse().unwrap();
    remote(&env, &pg, &["run", "-n", "bg", "--", "true"]).assert_code(0);
    // The server was told: no session of ours stays open for the child's copy of the socket.
    wait_until(|| pg.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'buildlock'") == "0");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(bg), nix::sys::signal::Signal::SIGKILL).unwrap();
}

#[test]
fn remote_through_the_daemon_daemon_status_shows_the_holder_and_its_backend() {
    let Some(pg) = PgServer::start() else { return };
    let env = Env::daemon();
    let mut holder =
        spawn_remote(&env, &pg, &["run", "-o", "deploying", "st", "--", "sh", "-c", "echo locked; exec sleep 1000"]);
    holder.expect_line("locked");
    let cmd = holder.cmd_pid();
    let mut waiter = spawn_remote(&env, &pg, &["run", "st", "--", "true"]);
    wait_until(|| waiting(&pg) == 1);
    // The daemon holds both sessions and names the holder (its command, once bound to it), the
    // lock's backend and the waiter; never the password of the URL it was given.
    let mut out = env.run(&["daemon", "status"]);
    wait_until(|| {
        out = env.run(&["daemon", "status"]);
        out.stdout.contains(&format!("held by pid {cmd} "))
    });
    out.assert_code(0).assert_stdout_has(&format!("remote lock st on postgres://127.0.0.1:{}/postgres:", pg.port));
    out.assert_stdout_has("(deploying), exclusive, token").assert_stdout_has(&format!("waiting: pid {}", waiter.pid()));
    assert!(!out.stdout.contains(crate::pg_server::PASSWORD), "{}", out.stdout);
    // Through the daemon, `run` itself has no server connection: stopping the daemon's sessions
    // (from the server's side) is what ends the lock, and `run` is told.
    let killed =
        pg.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND granted");
    assert_eq!(killed, "1");
    assert_eq!(holder.wait().code(), Some(122), "{}", holder.stderr());
    assert!(holder.stderr().contains("lock st on postgres://127.0.0.1:"), "{}", holder.stderr());
    assert!(is_dead(cmd));
    assert!(waiter.wait().success(), "the waiter is granted once the holder's session ended: {}", waiter.stderr());
}

/// The daemon holds the server session, but `run` and its command hold copies of its socket
/// (attached to the grant): the daemon's death is no loss. The lock stays busy on the server
/// past `run`'s check (each second), `run` lets its command finish, releases, exits with the
/// command's code, and the lock is then free.
#[test]
fn remote_through_the_daemon_daemon_killed_mid_hold_leaves_the_lock_to_the_running_command() {
    let Some(pg) = PgServer::start() else { return };
    let env = Env::daemon();
    let mut holder = spawn_remote(&env, &pg, &["run", "dk", "--", "sh", "-c", "echo locked; read x; echo done"]);
    holder.expect_line("locked");
    let cmd = holder.cmd_pid();
    let daemon = env.daemon_pid().expect("a daemon serves the test");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_dead(daemon);
    // Busy for another host's client (direct) for a second and a half, while `run` checks.
    let out = remote(&env, &pg, &["--no-daemon", "run", "-w", "1.5", "-E", "7", "dk", "--", "true"]);
    out.assert_code(7).assert_stderr_has("timed out waiting for lock dk on postgres://");
    assert!(!is_dead(cmd), "`run` stopped its command: {}", holder.stderr());
    holder.send_line();
    holder.expect_line("done");
    assert_eq!(holder.wait().code(), Some(0), "{}", holder.stderr());
    assert!(!holder.stderr().contains("lost"), "{}", holder.stderr());
    // Released (the last copies of the session closed): free on the server.
    remote(&env, &pg, &["--no-daemon", "run", "-w", "30", "dk", "--", "true"]).assert_code(0);
}

/// The daemon SIGKILLed, then `run` too: the command alone holds a copy of the session, so the
/// lock is busy for a direct client while it runs, and free once it has exited.
#[test]
fn remote_through_the_daemon_daemon_and_run_killed_leave_the_lock_to_the_command_until_it_exits() {
    let Some(pg) = PgServer::start() else { return };
    let env = Env::daemon();
    let mut holder = spawn_remote(&env, &pg, &["run", "dr", "--", "sh", "-c", "echo locked; exec sleep 1000"]);
    holder.expect_line("locked");
    let cmd = holder.cmd_pid();
    let daemon = env.daemon_pid().expect("a daemon serves the test");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_dead(daemon);
    remote(&env, &pg, &["--no-daemon", "run", "-n", "dr", "--", "true"])
        .assert_code(1)
        .assert_stderr_has("busy: lock dr");
    holder.kill9();
    holder.wait();
    remote(&env, &pg, &["--no-daemon", "run", "-n", "dr", "--", "true"])
        .assert_code(1)
        .assert_stderr_has("busy: lock dr");
    assert!(!is_dead(cmd));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(cmd as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_dead(cmd);
    remote(&env, &pg, &["--no-daemon", "run", "-w", "30", "dr", "--", "true"]).assert_code(0);
}

#[test]
fn remote_through_the_daemon_a_dead_waiter_leaves_the_server_queue_and_a_dead_holder_frees_the_lock() {
    let Some(pg) = PgServer::start() else { return };
    let env = Env::daemon();
    let mut holder = spawn_remote(&env, &pg, &["run", "dw", "--", "sh", "-c", "echo locked; exec sleep 1000"]);
    holder.expect_line("locked");
    let cmd = holder.cmd_pid();
    let mut waiter = spawn_remote(&env, &pg, &["run", "dw", "--", "true"]);
    wait_until(|| waiting(&pg) == 1);
    // The waiting client dies: the daemon ends its session, and the server's queue forgets it.
    waiter.kill9();
    waiter.wait();
    wait_until(|| waiting(&pg) == 0);
    // The holder's `run` and command die together: released on the server at once, and a waiter
    // from another process (a direct client) is granted.
    let mut next = spawn_remote(&env, &pg, &["--no-daemon", "run", "dw", "--", "sh", "-c", "echo got it"]);
    wait_until(|| waiting(&pg) == 1);
    holder.kill9();
    holder.wait();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(cmd as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    assert_eq!(next.next_line().as_deref(), Some("got it"), "{}", next.stderr());
    assert!(next.wait().success());
    // Other clients of the daemon were never disturbed: a local lock through it works.
    env.run(&["run", "local", "--", "true"]).assert_code(0);
}

/// `run --max-hold` on a remote lock, then `run` SIGKILLed: the daemon, which holds the server
/// session for the command, stops the command's group at the limit (SIGTERM, which ends the
/// command but not its child, which ignores it; then SIGKILL) and releases the lock on the server
/// only once the whole group is gone; the history says why.
#[test]
fn remote_through_the_daemon_daemon_enforces_max_hold_after_run_is_killed() {
    let Some(pg) = PgServer::start() else { return };
    let env = Env::daemon();
    let script = "sh -c \"trap '' TERM; exec sleep 1000\" & echo $!; wait";
    let mut holder =
        spawn_remote(&env, &pg, &["run", "--max-hold", "2", "--kill-after", "0.3", "mh", "--", "sh", "-c", script]);
    let child: u32 = holder.next_line().unwrap().parse().unwrap();
    let cmd = holder.cmd_pid();
    // Bound to the command (so the daemon keeps the lease when `run` dies), with its limit.
    wait_until(|| env.run(&["daemon", "status"]).stdout.contains(&format!("held by pid {cmd} ")));
    holder.kill9();
    holder.wait();
    assert!(!is_dead(cmd) && !is_dead(child), "the command outlives its killed `run`");
    let alive = |pid: u32| format!("[ -d /proc/{pid} ] && ! grep -q '^State:.*Z' /proc/{pid}/status");
    let check = format!("if {} || {}; then echo TOO-EARLY; fi; echo got it", alive(cmd), alive(child));
    let mut waiter = spawn_remote(&env, &pg, &["run", "mh", "--", "sh", "-c", &check]);
    assert_eq!(waiter.next_line().as_deref(), Some("got it"), "{}", waiter.stderr());
    assert!(waiter.wait().success(), "{}", waiter.stderr());
    assert!(is_dead(cmd) && is_dead(child));
    // Recorded by the daemon (the killed `run` recorded nothing), under the lock's backend.
    let label = format!("mh on postgres://127.0.0.1:{}/postgres", pg.port);
    wait_until(|| {
        let stats = env.run(&["--json", "stats"]);
        let v: serde_json::Value = serde_json::from_str(&stats.stdout).unwrap();
        v["locks"].as_array().unwrap().iter().any(|l| l["lock"] == label.as_str() && l["stopped"] == 1)
    });
}

/// Buildlock's server sessions (`application_name = buildlock`).
fn sessions(pg: &PgServer) -> usize {
    pg.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'buildlock'").parse().unwrap()
}

/// The server process of the session that holds a buildlock lock.
fn holding_backend(pg: &PgServer) -> String {
    pg.psql("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = 1114401585")
}

/// Runs `worker` (a test of this binary) in a process of its own, and checks it passed. The
/// tests of kept sessions count this process's forks, which other tests running in parallel
/// threads would add to.
fn in_own_process(worker: &str) {
    let out = crate::util::output_bounded(Env::new().worker(worker), worker);
    assert!(out.status.success(), "{worker} failed:\n{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("kept sessions: checked") || out.stdout.contains("kept sessions: no server"),
        "{worker} checked nothing:\n{}\n{}",
        out.stdout,
        out.stderr
    );
}

/// Two threads taking a lock 50 times each with `take`: never both inside, and every lease's
/// `token` larger than the one before; `release` lets each go.
fn two_contenders<L>(take: &(impl Fn() -> L + Sync), token: impl Fn(&L) -> u64 + Sync, release: impl Fn(L) + Sync) {
    let inside = std::sync::atomic::AtomicBool::new(false);
    let last = std::sync::Mutex::new(0u64);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..50 {
                    let lease = take();
                    assert!(!inside.swap(true, std::sync::atomic::Ordering::SeqCst), "two holders at once");
                    let mut l = last.lock().unwrap();
                    assert!(token(&lease) > *l, "token {} after {}", token(&lease), *l);
                    *l = token(&lease);
                    drop(l);
                    inside.store(false, std::sync::atomic::Ordering::SeqCst);
                    release(lease);
                }
            });
        }
    });
}

/// The daemon keeps a released lease's session, unlocked, for the next lease on the server,
/// only when no other process can hold a copy of its socket: the library closed its copy and
/// passed none on. Handed out (`inherit_file`), or bound to `run`'s command, it is ended.
/// Through all of it the lock is free the moment a release is confirmed, and never held twice.
#[test]
fn remote_through_the_daemon_a_session_is_kept_for_the_next_lease_only_when_no_copy_can_be_left() {
    in_own_process("remote::kept_sessions_through_the_daemon_worker");
}

#[test]
#[ignore = "run by remote_through_the_daemon_a_session_is_kept_... in a process of its own"]
fn kept_sessions_through_the_daemon_worker() {
    use buildlock::{Connect, LockTarget, Options};
    let Some(pg) = PgServer::start() else { return println!("kept sessions: no server") };
    let env = Env::daemon();
    env.run(&["daemon", "start"]).assert_code(0);
    let direct = Env::new();
    let opts = Options {
        connect: Connect::DaemonOnly,
        runtime_dir: Some(env.runtime()),
        remote: Some(buildlock_remote::from_url(&pg.url()).unwrap()),
        ..Options::default()
    };
    let target = LockTarget::resolve("kept", env.tmp.path()).unwrap();
    let take = || buildlock::acquire(&target, &opts, &mut |_| {}).unwrap();

    // Released by its only holder: the session is kept, and the lock is free on the server.
    let a = take();
    let first = holding_backend(&pg);
    a.release_confirmed().unwrap();
    remote(&direct, &pg, &["run", "-n", "kept", "--", "true"]).assert_code(0);
    assert_eq!(sessions(&pg), 1, "the released session is kept open");
    let b = take();
    assert_eq!(holding_backend(&pg), first, "the next lease reuses the kept session");
    // Handed out for a command to inherit: ended at release, never reused.
    assert!(b.inherit_file().is_some());
    b.release_confirmed().unwrap();
    let c = take();
    let third = holding_backend(&pg);
    assert_ne!(third, first, "a session handed out was reused");
    c.release_confirmed().unwrap();
    assert_eq!(sessions(&pg), 1);
    // `run` binds the lease to its command, which inherits the session: ended, not kept. It
    // took the kept session (the only one), so the next lease must open another.
    remote(&env, &pg, &["run", "kept", "--", "true"]).assert_code(0);
    let d = take();
    assert_ne!(holding_backend(&pg), third, "the session of a `run` was reused");
    d.release_confirmed().unwrap();

    // A busy answer hands nothing out: that session is kept too, and reused by the next try.
    let held = take();
    assert_eq!(sessions(&pg), 1, "the holder took the kept session");
    remote(&env, &pg, &["run", "-n", "kept", "--", "true"]).assert_code(1);
    assert_eq!(sessions(&pg), 2, "the holder's session and the kept one");
    remote(&env, &pg, &["run", "-n", "kept", "--", "true"]).assert_code(1);
    assert_eq!(sessions(&pg), 2, "the second try reused the kept session");
    held.release_confirmed().unwrap();

    // Two threads contending through kept sessions: never both inside, tokens always growing.
    two_contenders(&take, |l| l.token(), |l| l.release().unwrap());
    // A release is not waited for, so the next lease may come before its session is back:
    // a few more may be opened, never more than the daemon keeps per server (8).
    assert!(sessions(&pg) <= 8, "{} sessions kept", sessions(&pg));
    // The server restarted while sessions were kept: the next lease gets a new one, no error.
    pg.restart();
    take().release_confirmed().unwrap();
    println!("kept sessions: checked");
}

/// Without a daemon the library keeps a released lease's session, unlocked, for this process's
/// next lease on the server, only while no other process can hold a copy of its socket: never
/// handed out (`socket()`, for a command to inherit), and no fork since it was opened. Through
/// all of it the lock is free the moment `release` returns, and never held twice.
#[test]
fn remote_direct_a_session_is_kept_for_the_next_lease_of_the_process_only_when_no_copy_can_be_left() {
    in_own_process("remote::kept_sessions_direct_worker");
}

#[test]
#[ignore = "run by remote_direct_a_session_is_kept_... in a process of its own"]
fn kept_sessions_direct_worker() {
    let Some(pg) = PgServer::start() else { return println!("kept sessions: no server") };
    let env = Env::new();
    let engine = buildlock_remote::from_url(&pg.url()).unwrap();
    let req = buildlock_remote::Request::new(
        "kept-direct",
        buildlock_remote::Mode::Exclusive,
        buildlock_remote::Wait::Forever,
        "test",
    );
    let take = || buildlock_remote::acquire(&*engine, &req, &mut |_, _| {}).unwrap();

    let a = take();
    let first = holding_backend(&pg);
    a.release().unwrap();
    remote(&env, &pg, &["run", "-n", "kept-direct", "--", "true"]).assert_code(0);
    assert_eq!(sessions(&pg), 1, "the released session is kept open");
    let b = take();
    assert_eq!(holding_backend(&pg), first, "the next lease reuses the kept session");
    // Handed out for a command to inherit: ended at release, never reused.
    assert!(b.socket().is_some());
    b.release().unwrap();
    let c = take();
    let third = holding_backend(&pg);
    assert_ne!(third, first, "a session handed out was reused");
    c.release().unwrap();
    // A fork while it is kept: the child holds a copy of its socket, so it is never used again.
    // SAFETY: the child only calls `_exit`, which is async-signal-safe.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => unsafe { nix::libc::_exit(0) },
        nix::unistd::ForkResult::Parent { child } => drop(nix::sys::wait::waitpid(child, None).unwrap()),
    }
    let d = take();
    let fourth = holding_backend(&pg);
    assert_ne!(fourth, third, "a session kept across a fork was reused");
    // A fork while it is held: not kept at its release either.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => unsafe { nix::libc::_exit(0) },
        nix::unistd::ForkResult::Parent { child } => drop(nix::sys::wait::waitpid(child, None).unwrap()),
    }
    d.release().unwrap();
    let e = take();
    assert_ne!(holding_backend(&pg), fourth, "a session held across a fork was reused");
    e.release().unwrap();

    // Two threads contending through kept sessions: never both inside, tokens always growing.
    two_contenders(&take, |l| l.token(), |l| l.release().unwrap());
    // At most one kept session per contender (the library keeps up to 4 per server).
    assert!(sessions(&pg) <= 2, "{} sessions kept", sessions(&pg));
    // The server restarted while sessions were kept: the next lease gets a new one, no error.
    pg.restart();
    take().release().unwrap();
    println!("kept sessions: checked");
}

/// The library's `Lock` builder decides where a lock lives as the command line does: an explicit
/// `.backend(URL)`, else `$BUILDLOCK_BACKEND`, else the config file's first matching entry. A
/// build tool and the command line naming the same lock must agree, or they would not exclude
/// each other. Run in a process of its own, with the config file in its environment.
#[test]
fn remote_the_library_builder_routes_locks_as_the_command_line_does() {
    let Some(pg) = PgServer::start() else { return };
    let env = Env::new();
    let config = env.path("config.toml");
    std::fs::write(&config, format!("[[locks]]\nmatch = \"deploy-*\"\nbackend = \"{}\"\n", pg.url())).unwrap();
    let mut worker = env.worker("remote::builder_routing_worker");
    worker.env("BUILDLOCK_CONFIG", &config).env("BUILDLOCK_TEST_PG_URL", pg.url());
    let mut worker = Proc::spawn(worker);
    // Held through the builder, routed by the config file: the command line (told the server
    // explicitly) finds it busy, and a name the config does not route stays local.
    worker.expect_line("held deploy-1");
    remote(&env, &pg, &["run", "-n", "deploy-1", "--", "true"]).assert_code(1).assert_stderr_has("busy: lock deploy-1");
    env.run(&["run", "-n", "build", "--", "true"]).assert_code(1).assert_stderr_has("is held by pid");
    remote(&env, &pg, &["run", "-n", "build", "--", "true"]).assert_code(0);
    worker.send("go");
    worker.expect_line("released");
    remote(&env, &pg, &["run", "-n", "deploy-1", "--", "true"]).assert_code(0);
    assert!(worker.wait().success(), "{}", worker.stderr());
}

#[test]
#[ignore = "run by remote_the_library_builder_routes_locks_as_the_command_line_does"]
fn builder_routing_worker() {
    // Past the harness's "test ... " prefix.
    println!();
    let url = std::env::var("BUILDLOCK_TEST_PG_URL").expect("started by its test");
    let server = buildlock_remote::from_url(&url).unwrap().display();
    let routed = buildlock::Lock::named("deploy-1").connect(buildlock::Connect::Direct).acquire().unwrap();
    assert_eq!(routed.remote_server(), Some(server.as_str()));
    let local = buildlock::Lock::named("build").connect(buildlock::Connect::Direct).acquire().unwrap();
    assert_eq!(local.remote_server(), None);
    // An explicit backend wins over the config file.
    let pinned = buildlock::Lock::named("deploy-2").backend("local").connect(buildlock::Connect::Direct).acquire();
    assert_eq!(pinned.unwrap().remote_server(), None);
    println!("held deploy-1");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    routed.release().unwrap();
    local.release().unwrap();
    println!("released");
}
