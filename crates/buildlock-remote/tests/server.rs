//! The backend against a real PostgreSQL server started by each test.

#[path = "../../../tests/support/pg_server.rs"]
mod pg_server;

use std::time::Duration;

use buildlock_remote::{acquire, status, Error, Mode, Request, Settings, Wait};
use pg_server::PgServer;

fn settings(url: &str) -> Settings {
    Settings::from_url(url).unwrap()
}

fn req(name: &str, mode: Mode, wait: Wait) -> Request {
    Request::new(name, mode, wait, "test")
}

#[test]
fn exclusive_excludes_and_names_the_holder_and_tokens_grow() {
    let Some(pg) = PgServer::start() else { return };
    let s = settings(&pg.url());
    let a = acquire(&s, &req("deploy", Mode::Exclusive, Wait::Forever), &mut |_, _| {}).unwrap();
    let busy = acquire(&s, &req("deploy", Mode::Exclusive, Wait::NoWait), &mut |_, _| {}).unwrap_err();
    assert!(busy.is_conflict(), "{busy}");
    let msg = busy.to_string();
    assert!(msg.contains(&format!("pid {}", std::process::id())) && msg.contains("(test)"), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{}", pg.port)), "{msg}");
    // A shared request waits behind the exclusive holder too.
    let e = acquire(&s, &req("deploy", Mode::Shared, Wait::Timeout(Duration::from_millis(200))), &mut |_, _| {})
        .unwrap_err();
    assert!(matches!(e, Error::Busy { timed_out: true, .. }), "{e}");
    // Another name is another lock.
    let other = acquire(&s, &req("deploy-other", Mode::Exclusive, Wait::NoWait), &mut |_, _| {}).unwrap();
    let t1 = a.token();
    a.release().unwrap();
    let b = acquire(&s, &req("deploy", Mode::Exclusive, Wait::NoWait), &mut |_, _| {}).unwrap();
    assert!(b.token() > t1, "{} > {t1}", b.token());
    drop((b, other));
    // The rows of released locks are gone.
    assert_eq!(pg.psql("SELECT count(*) FROM buildlock_holders"), "0");
    assert_eq!(pg.psql("SELECT max(version) FROM buildlock_schema"), "1");
}

#[test]
fn shared_holders_share_and_status_lists_holders_and_waiters() {
    let Some(pg) = PgServer::start() else { return };
    let s = settings(&pg.socket_url());
    let r1 = acquire(&s, &req("cache", Mode::Shared, Wait::NoWait), &mut |_, _| {}).unwrap();
    let r2 = acquire(&s, &req("cache", Mode::Shared, Wait::NoWait), &mut |_, _| {}).unwrap();
    assert_eq!(r1.token(), r2.token(), "shared holders get the current value");
    let waiter = {
        let s = s.clone();
        std::thread::spawn(move || acquire(&s, &req("cache", Mode::Exclusive, Wait::Forever), &mut |_, _| {}))
    };
    // Wait for the waiter to be in the server's queue (bounded as a hang guard).
    let guard = std::time::Instant::now() + Duration::from_secs(60);
    let entries = loop {
        assert!(std::time::Instant::now() < guard, "the waiter never showed in the server's queue");
        let e = status(&s, Some("cache")).unwrap();
        if e.iter().any(|e| !e.granted) {
            break e;
        }
        std::thread::yield_now();
    };
    assert_eq!(entries.iter().filter(|e| e.granted).count(), 2, "{entries:?}");
    let w = entries.iter().find(|e| !e.granted).unwrap();
    assert_eq!(w.holder.mode, Mode::Exclusive);
    assert_eq!(w.holder.pid, Some(std::process::id()));
    drop((r1, r2));
    let x = waiter.join().unwrap().unwrap();
    assert!(x.token() > 0);
}

#[test]
fn tls_verify_full_works_and_a_wrong_root_is_refused() {
    let Some(pg) = PgServer::start() else { return };
    let ok = settings(&pg.url_with("localhost", &format!("sslmode=verify-full&sslrootcert={}", pg.ca().display())));
    let lease = acquire(&ok, &req("tls", Mode::Exclusive, Wait::NoWait), &mut |_, _| {}).unwrap();
    assert_eq!(pg.psql("SELECT count(*) FROM pg_stat_ssl WHERE ssl"), "1");
    lease.release().unwrap();
    let verify_ca =
        settings(&pg.url_with("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={}", pg.ca().display())));
    acquire(&verify_ca, &req("tls", Mode::Exclusive, Wait::NoWait), &mut |_, _| {}).unwrap();
    let wrong =
        settings(&pg.url_with("localhost", &format!("sslmode=verify-full&sslrootcert={}", pg.other_ca().display())));
    let e = acquire(&wrong, &req("tls", Mode::Exclusive, Wait::NoWait), &mut |_, _| {}).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Unreachable { .. }), "{msg}");
    assert!(msg.contains("certificate") && msg.contains("sslrootcert") && msg.contains("localhost:"), "{msg}");
}

#[test]
fn wrong_password_and_closed_port_are_clear_errors() {
    let Some(pg) = PgServer::start() else { return };
    let bad = settings(&format!("postgres://{}:nope@127.0.0.1:{}/postgres?sslmode=disable", pg_server::USER, pg.port));
    let e = acquire(&bad, &req("x", Mode::Exclusive, Wait::NoWait), &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, Error::Auth { .. }), "{e}");
    assert!(e.to_string().contains("password") && e.to_string().contains(".pgpass"), "{e}");
    assert!(!e.to_string().contains("nope"), "{e}");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let closed = settings(&format!("postgres://u@127.0.0.1:{port}/db?connect_timeout=3"));
    let e = acquire(&closed, &req("x", Mode::Exclusive, Wait::NoWait), &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, Error::Unreachable { .. }) && e.to_string().contains("refused"), "{e}");
}

#[test]
fn missing_privileges_are_named() {
    let Some(pg) = PgServer::start() else { return };
    pg.psql("CREATE ROLE weak LOGIN PASSWORD 'weak'; REVOKE CREATE ON SCHEMA public FROM PUBLIC");
    let s = settings(&format!("postgres://weak:weak@127.0.0.1:{}/postgres?sslmode=disable", pg.port));
    let e = acquire(&s, &req("x", Mode::Exclusive, Wait::NoWait), &mut |_, _| {}).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Privilege { .. }), "{msg}");
    assert!(msg.contains("\"weak\"") && msg.contains("permission denied") && msg.contains("CREATE"), "{msg}");
}

#[test]
fn server_restart_mid_hold_is_reported_as_lost() {
    let Some(pg) = PgServer::start() else { return };
    let s = settings(&pg.url());
    let lease = acquire(&s, &req("held", Mode::Exclusive, Wait::NoWait), &mut |_, _| {}).unwrap();
    lease.check().unwrap();
    pg.restart();
    // The connection's end is recorded by the lease's thread as soon as it is read.
    let e = loop {
        match lease.check() {
            Err(e) => break e,
            Ok(()) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    assert!(matches!(e, Error::Lost { .. }), "{e}");
    assert!(e.to_string().contains("lock held on postgres://127.0.0.1:"), "{e}");
    assert!(matches!(lease.release(), Err(Error::Lost { .. })));
}

#[test]
fn a_waiter_whose_server_restarts_fails_clearly() {
    let Some(pg) = PgServer::start() else { return };
    let s = settings(&pg.url());
    let holder = acquire(&s, &req("w", Mode::Exclusive, Wait::NoWait), &mut |_, _| {}).unwrap();
    let waiter = {
        let s = s.clone();
        std::thread::spawn(move || acquire(&s, &req("w", Mode::Exclusive, Wait::Forever), &mut |_, _| {}))
    };
    let guard = std::time::Instant::now() + Duration::from_secs(60);
    while pg.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted") != "1" {
        assert!(std::time::Instant::now() < guard, "the waiter never showed in the server's queue");
    }
    pg.restart();
    let e = waiter.join().unwrap().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Server { .. }), "{msg}");
    assert!(msg.contains("lock w was not taken, try again") && msg.contains("127.0.0.1:"), "{msg}");
    assert!(matches!(holder.release(), Err(Error::Lost { .. })));
}
