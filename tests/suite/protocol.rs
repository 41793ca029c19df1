//! The daemon does what `proto/PROTOCOL.md` says, on the wire.

use std::io::Write;
use std::os::unix::net::UnixStream;

use buildlock_proto::{Hello, Reply, Request, WaitFor};

use crate::util::Env;

/// A connection to the test's daemon, past the handshake.
fn connect(env: &Env) -> UnixStream {
    let mut s = UnixStream::connect(env.runtime().join("buildlockd.sock")).unwrap();
    s.write_all(&buildlock_proto::encode(&Hello::new(std::process::id())).unwrap()).unwrap();
    buildlock_proto::check_welcome(&buildlock_proto::read_frame(&mut s).unwrap().unwrap()).unwrap();
    s
}

fn acquire(s: &mut UnixStream, path: &str) -> Reply {
    // Every lease on a connection has an id of its own.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let req = Request::Acquire(crate::util::acquire_request(
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        path.to_owned(),
        WaitFor::Forever,
    ));
    s.write_all(&buildlock_proto::encode(&req).unwrap()).unwrap();
    buildlock_proto::decode(&buildlock_proto::read_frame(s).unwrap().unwrap()).unwrap()
}

#[test]
fn queue_positions_count_from_one_for_the_next_in_line() {
    let env = Env::daemon();
    env.run(&["daemon", "start"]).assert_code(0);
    std::fs::create_dir_all(env.locks()).unwrap();
    let path = env.locks().canonicalize().unwrap().join("x.lock").display().to_string();
    let mut holder = connect(&env);
    assert!(matches!(acquire(&mut holder, &path), Reply::Granted { .. }));
    let mut first = connect(&env);
    let mut second = connect(&env);
    match acquire(&mut first, &path) {
        Reply::Waiting { position, holder, .. } => {
            assert_eq!(position, 1, "the next in line is position 1");
            assert!(holder.is_some_and(|h| !h.outside));
        }
        other => panic!("{other:?}"),
    }
    match acquire(&mut second, &path) {
        Reply::Waiting { position, .. } => assert_eq!(position, 2),
        other => panic!("{other:?}"),
    }
    drop(holder);
    let granted: Reply = buildlock_proto::decode(&buildlock_proto::read_frame(&mut first).unwrap().unwrap()).unwrap();
    assert!(matches!(granted, Reply::Granted { .. }), "{granted:?}");
}

#[test]
fn an_outside_holder_is_announced_with_position_zero() {
    let env = Env::daemon();
    env.run(&["daemon", "start"]).assert_code(0);
    let mut direct = env.spawn(&["--no-daemon", "run", "x", "--", "sh", "-c", "echo locked; read x"]);
    direct.expect_line("locked");
    env.wait_for_handover("x", direct.pid());
    let path = env.locks().canonicalize().unwrap().join("x.lock").display().to_string();
    let mut s = connect(&env);
    match acquire(&mut s, &path) {
        Reply::Waiting { position, holder, .. } => {
            assert_eq!(position, 0);
            let holder = holder.expect("the outside holder is named");
            assert!(holder.outside);
            assert_eq!(holder.pid, Some(direct.cmd_pid()));
        }
        other => panic!("{other:?}"),
    }
    direct.send_line();
    assert!(direct.wait().success());
    let granted: Reply = buildlock_proto::decode(&buildlock_proto::read_frame(&mut s).unwrap().unwrap()).unwrap();
    assert!(matches!(granted, Reply::Granted { .. }), "{granted:?}");
}
