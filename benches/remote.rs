//! Remote locks (PostgreSQL) against the bare server, on a server this bench starts
//! (`tests/support/pg_server.rs`: `initdb` + `pg_ctl` into a temporary directory).
//!
//! Run: `cargo bench --bench remote` (`-- --quick` for a short run). Prints one row per figure:
//! median, 95th percentile, samples. Nothing here asserts on time.
//!
//! - `acquire+release`: one exclusive lock nobody else wants, over TCP on loopback
//!   (`127.0.0.1`, `sslmode=disable`) for every row, so like is compared with like: the bare
//!   client (`tokio-postgres` on one open connection: `pg_advisory_lock` + `pg_advisory_unlock`,
//!   each statement prepared and run, so four round trips), the same with the two statements
//!   prepared once (two round trips: the floor), the bare client opening a connection for each lock (what a session per
//!   lease costs at least), and buildlock's library talking to the server itself (`Connect::Direct`)
//!   and through a private daemon (`Connect::DaemonOnly`). Both keep a released session for the
//!   next lease on the server, so after a few warm-up leases every row reuses an open
//!   connection, as the bare loop does; the bare client's connect-per-lock row shows what a
//!   session per lease would cost.
//! - `kill-to-grant across hosts` (root only: two network namespaces, `tests/support/netns.rs`):
//!   a `run` on host a holds, a `run` on host b waits, each through its host's own daemon
//!   (`--remote-timeout 8`). *Killed*: every process of host a is SIGKILLed (its kernel closes
//!   the connections, the server frees the lock at once); from the kill to host b's command
//!   printing. *Cut off*: host a's link goes down (nothing closes; the server frees the lock
//!   when its keepalives and `tcp_user_timeout` give up); from the cut to host a's command being
//!   stopped (`run` exits 122) and to host b's grant.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use buildlock::{Connect, LockTarget, Options};

mod common;
#[path = "../tests/support/netns.rs"]
mod netns;
#[path = "../tests/support/pg_server.rs"]
mod pg_server;

use common::time_each;
use pg_server::PgServer;

const SCRUB: [&str; 6] = [
    "BUILDLOCK_NO_DAEMON",
    "BUILDLOCK_DIR",
    "BUILDLOCK_RUNTIME_DIR",
    "BUILDLOCK_BACKEND",
    "BUILDLOCK_CONFIG",
    "BUILDLOCK_LOG",
];

/// Prints one row: label, median, 95th percentile, sample count.
fn report(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!("{label:<66} {:>11} {:>11} {:>6}", fmt(at(0.5)), fmt(at(0.95)), samples.len());
}

fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    match us {
        _ if us < 1000.0 => format!("{us:.1} µs"),
        _ if us < 1e6 => format!("{:.2} ms", us / 1000.0),
        _ => format!("{:.2} s", us / 1e6),
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    for var in SCRUB {
        std::env::remove_var(var);
    }
    std::env::set_var("BUILDLOCKD", env!("CARGO_BIN_EXE_buildlockd"));
    std::env::set_var("BUILDLOCKD_IDLE_EXIT", "120");
    println!("{:<66} {:>11} {:>11} {:>6}", "remote lock (PostgreSQL, TCP loopback)", "median", "p95", "n");
    acquire_release(if quick { 100 } else { 1000 });
    kill_to_grant(if quick { 3 } else { 10 }, if quick { 1 } else { 3 });
}

fn acquire_release(n: usize) {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.url();
    // The bare client: one connection, lock and unlock by hand.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (client, conn) = rt.block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls)).unwrap();
    rt.spawn(conn);
    let lock_unlock = |c: &tokio_postgres::Client| {
        rt.block_on(async {
            c.execute("SELECT pg_advisory_lock(1, 2)", &[]).await.unwrap();
            c.execute("SELECT pg_advisory_unlock(1, 2)", &[]).await.unwrap();
        })
    };
    report("bare tokio-postgres: pg_advisory_lock + unlock (one connection)", time_each(n, || lock_unlock(&client)));
    // The same with both statements prepared once: one round trip each, the floor.
    let (lock, unlock) = rt.block_on(async {
        (
            client.prepare("SELECT pg_advisory_lock(1, 2)").await.unwrap(),
            client.prepare("SELECT pg_advisory_unlock(1, 2)").await.unwrap(),
        )
    });
    report(
        "bare tokio-postgres, statements prepared once: lock + unlock",
        time_each(n, || {
            rt.block_on(async {
                client.execute(&lock, &[]).await.unwrap();
                client.execute(&unlock, &[]).await.unwrap();
            })
        }),
    );
    report(
        "bare tokio-postgres: connect + lock + unlock + close",
        time_each(n / 4, || {
            let (c, conn) = rt.block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls)).unwrap();
            let task = rt.spawn(conn);
            lock_unlock(&c);
            drop(c);
            rt.block_on(task).unwrap().unwrap();
        }),
    );
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("rt");
    buildlock::start_daemon(Some(&runtime)).expect("start buildlockd");
    let engine = buildlock_remote::from_url(&url).unwrap();
    let target = LockTarget::resolve("bench", dir.path()).unwrap();
    for (label, connect) in [
        ("buildlock library, direct: acquire + release", Connect::Direct),
        ("buildlock library, through the daemon: acquire + release", Connect::DaemonOnly),
    ] {
        let opts = Options {
            connect,
            runtime_dir: Some(runtime.clone()),
            remote: Some(engine.clone()),
            operation: "bench".into(),
            ..Options::default()
        };
        // `time_each`'s warm-up opens the sessions that the timed leases reuse.
        let samples = time_each(n, || buildlock::acquire(&target, &opts, &mut |_| {}).unwrap().release().unwrap());
        report(label, samples);
    }
    let _ = buildlock::ask_daemon(Some(&runtime), &buildlock_proto::Request::Shutdown);
}

/// A host of the bench: its namespace, its own runtime directory (so its own daemon) and URL.
struct Host {
    net: netns::NetHost,
    dir: tempfile::TempDir,
    url: String,
}

impl Host {
    /// `buildlock-client --backend URL --remote-timeout 8 run NAME -- sh -c SCRIPT` on this host.
    fn run(&self, name: &str, script: &str) -> Child {
        let mut c = self.net.command(env!("CARGO_BIN_EXE_buildlock-client"));
        c.env("BUILDLOCK_RUNTIME_DIR", self.dir.path().join("rt"))
            .env("BUILDLOCK_DIR", self.dir.path().join("locks"))
            .env("BUILDLOCK_HISTORY", self.dir.path().join("history.sqlite3"))
            .args(["--backend", &self.url, "--remote-timeout", "8", "run", name, "--", "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        c.spawn().expect("start run")
    }

    fn kill_daemon(&self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("rt/buildlockd.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                #[allow(clippy::disallowed_methods)] // a bench's own signal, not locking code
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
            }
        }
    }
}

fn first_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    line.trim().to_owned()
}

fn kill_to_grant(killed_n: usize, cut_n: usize) {
    let (Some(a), Some(b)) = (netns::NetHost::create(), netns::NetHost::create()) else { return };
    let listen = format!("{},{}", a.server_ip, b.server_ip);
    let Some(pg) = PgServer::start_listening(Some((&listen, netns::HOSTS_CIDR))) else { return };
    let host = |net: netns::NetHost| Host {
        url: pg.url_with(&net.server_ip, "sslmode=disable"),
        dir: tempfile::tempdir().unwrap(),
        net,
    };
    let (a, b) = (host(a), host(b));
    let waiting = || pg.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted") == "1";
    let mut killed = Vec::new();
    let (mut stopped, mut granted) = (Vec::new(), Vec::new());
    for i in 0..killed_n + cut_n {
        let name = format!("k{i}");
        let mut holder = a.run(&name, "echo locked; exec sleep 1000");
        assert_eq!(first_line(&mut holder), "locked");
        let mut waiter = b.run(&name, "echo granted");
        while !waiting() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let at = Instant::now();
        if i < killed_n {
            a.net.kill_all();
            assert_eq!(first_line(&mut waiter), "granted");
            killed.push(at.elapsed());
            let _ = holder.wait();
        } else {
            a.net.cut();
            let st = holder.wait().unwrap();
            stopped.push(at.elapsed());
            assert_eq!(st.code(), Some(122), "the cut-off run stops its command");
            assert_eq!(first_line(&mut waiter), "granted");
            granted.push(at.elapsed());
            a.net.reconnect();
            a.kill_daemon();
        }
        waiter.wait().unwrap();
    }
    report("kill-to-grant across hosts, host killed (daemon, run, CMD)", killed);
    report("host cut off (--remote-timeout 8): its CMD stopped, run exits 122", stopped);
    report("host cut off (--remote-timeout 8): other host granted", granted);
    a.kill_daemon();
    b.kill_daemon();
}
