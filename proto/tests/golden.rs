//! Golden bytes: the exact frames this version puts on the wire, so that an accidental change to
//! the encoding (a reordered field, a variant inserted in the middle, a serde attribute) fails
//! here instead of between two installed versions.
//!
//! When a change is deliberate: bump `PROTOCOL_VERSION`, regenerate with
//! `cargo test -p buildlock-proto --test golden -- --ignored --nocapture print_fixture`, and paste
//! the output over `FIXTURE` (and `FIXTURE_PROTOCOL_VERSION`).

mod common;

use buildlock_proto::{
    decode, encode, AcquireRequest, DaemonInfo, ErrorCode, ErrorReply, FileRef, Hello, Holder, LockInfo, Mode, Reply,
    Request, WaitFor, Waiter, Welcome, MAGIC, PROTOCOL_VERSION,
};
use common::{from_hex, reply_variant, request_variant, to_hex, REPLY_VARIANTS, REQUEST_VARIANTS};

/// The protocol version the fixture was generated for.
const FIXTURE_PROTOCOL_VERSION: u16 = 6;

/// (name, whole frame as hex: 4-byte little-endian length, then the postcard payload).
const FIXTURE: &[(&str, &str)] = &[
    ("Hello", "0d000000424c434b0605302e312e30d209"),
    ("Welcome", "0d000000424c434b0605302e312e306300"),
    ("Welcome(refused)", "10000000424c434b0605302e312e306301026e6f"),
    ("Request::Acquire", "200000000003072f6c2e6c6f636b0001e807026f7003636d640107e12101e0d403000000"),
    ("Request::Release", "0400000001030101"),
    ("Request::ReleasePid", "0c00000002072f6c2e6c6f636b808004"),
    ("Request::Status", "020000000300"),
    ("Request::DaemonStatus", "0100000004"),
    ("Request::Shutdown", "0100000005"),
    ("Request::Bind", "050000000603922101"),
    ("Reply::Granted", "120000000003072f6c2e6c6f636b0501018110828008"),
    ("Reply::Waiting", "290000000103072f6c2e6c6f636b020101922101046d616b650101680101010301026f7001ac02000164018827"),
    ("Reply::Released", "0a0000000203072f6c2e6c6f636b"),
    (
        "Reply::Status",
        "2f0000000301072f6c2e6c6f636b0101922101046d616b650101680101010301026f7001ac0200016401882701080196010177",
    ),
    ("Reply::DaemonStatus", "1b00000004630105302e312e3080a0abfef962022f72042f722f7301020300"),
    ("Reply::ShuttingDown", "0100000005"),
    ("Reply::Error", "060000000607016d0003"),
    ("Reply::LeaseLost", "0f0000000703072f6c2e6c6f636b04676f6e65"),
    ("Reply::Bound", "0c0000000803072f6c2e6c6f636b9221"),
];

/// One message of each kind. The values are fixed literals (the build string too, rather than
/// `BUILD`, so that a crate version bump does not change them).
enum Msg {
    Hello(Hello),
    Welcome(Welcome),
    Request(Request),
    Reply(Reply),
}

fn holder() -> Holder {
    Holder {
        pid: Some(4242),
        command: Some("make".into()),
        host: Some("h".into()),
        mode: Some(Mode::Exclusive),
        since_unix_ms: Some(-2),
        operation: Some("op".into()),
        token: Some(300),
        outside: false,
        description: "d".into(),
        max_hold_ms: Some(5_000),
    }
}

fn messages() -> Vec<(String, Msg)> {
    let mut out = vec![
        (
            "Hello".to_owned(),
            Msg::Hello(Hello { magic: MAGIC, version: PROTOCOL_VERSION, build: "0.1.0".into(), pid: 1234 }),
        ),
        (
            "Welcome".to_owned(),
            Msg::Welcome(Welcome {
                magic: MAGIC,
                version: PROTOCOL_VERSION,
                build: "0.1.0".into(),
                pid: 99,
                error: None,
            }),
        ),
        (
            "Welcome(refused)".to_owned(),
            Msg::Welcome(Welcome {
                magic: MAGIC,
                version: PROTOCOL_VERSION,
                build: "0.1.0".into(),
                pid: 99,
                error: Some("no".into()),
            }),
        ),
    ];
    let requests = vec![
        Request::Acquire(AcquireRequest {
            lease: 3,
            path: "/l.lock".into(),
            mode: Mode::Shared,
            wait: WaitFor::Millis(1000),
            operation: "op".into(),
            command: "cmd".into(),
            bind_pid: Some(7),
            thread: 4321,
            max_hold_ms: Some(60_000),
            kill_after_ms: None,
            remote: None,
            remote_timeout_ms: None,
        }),
        Request::Release { lease: 3, answer: true, copies_closed: true },
        Request::ReleasePid { path: "/l.lock".into(), pid: 65536 },
        Request::Status { path: None },
        Request::DaemonStatus,
        Request::Shutdown,
        Request::Bind { lease: 3, pid: 4242, stop_on_loss: true },
    ];
    let replies = vec![
        Reply::Granted {
            lease: 3,
            path: "/l.lock".into(),
            token: 5,
            fd_attached: true,
            file: Some(FileRef { dev: 2049, ino: 131_074 }),
        },
        Reply::Waiting { lease: 3, path: "/l.lock".into(), position: 2, holder: Some(holder()) },
        Reply::Released { lease: 3, path: "/l.lock".into() },
        Reply::Status {
            locks: vec![LockInfo {
                path: "/l.lock".into(),
                holders: vec![holder()],
                waiters: vec![Waiter { pid: 8, mode: Mode::Exclusive, waited_ms: 150, operation: "w".into() }],
            }],
        },
        Reply::DaemonStatus(DaemonInfo {
            pid: 99,
            version: 1,
            build: "0.1.0".into(),
            started_unix_ms: 1_700_000_000_000,
            runtime_dir: "/r".into(),
            socket: "/r/s".into(),
            connections: 1,
            leases: 2,
            waiters: 3,
            idle_exit_ms: None,
        }),
        Reply::ShuttingDown,
        Reply::Error(ErrorReply { code: ErrorCode::Timeout, message: "m".into(), holder: None, lease: 3 }),
        Reply::LeaseLost { lease: 3, path: "/l.lock".into(), reason: "gone".into() },
        Reply::Bound { lease: 3, path: "/l.lock".into(), pid: 4242 },
    ];
    out.extend(requests.into_iter().map(|r| (format!("Request::{}", request_variant(&r)), Msg::Request(r))));
    out.extend(replies.into_iter().map(|r| (format!("Reply::{}", reply_variant(&r)), Msg::Reply(r))));
    out
}

fn encode_msg(msg: &Msg) -> Vec<u8> {
    match msg {
        Msg::Hello(m) => encode(m),
        Msg::Welcome(m) => encode(m),
        Msg::Request(m) => encode(m),
        Msg::Reply(m) => encode(m),
    }
    .expect("encode")
}

/// Decodes `frame` as the same kind of message as `msg` and checks it equals `msg`.
fn decodes_to(frame: &[u8], msg: &Msg) -> bool {
    let payload = &frame[4..];
    match msg {
        Msg::Hello(m) => decode::<Hello>(payload).ok().as_ref() == Some(m),
        Msg::Welcome(m) => decode::<Welcome>(payload).ok().as_ref() == Some(m),
        Msg::Request(m) => decode::<Request>(payload).ok().as_ref() == Some(m),
        Msg::Reply(m) => decode::<Reply>(payload).ok().as_ref() == Some(m),
    }
}

#[test]
fn fixture_covers_every_variant() {
    let names: Vec<String> = messages().into_iter().map(|(name, _)| name).collect();
    for variant in REQUEST_VARIANTS {
        assert!(names.contains(&format!("Request::{variant}")), "golden fixture lacks Request::{variant}");
    }
    for variant in REPLY_VARIANTS {
        assert!(names.contains(&format!("Reply::{variant}")), "golden fixture lacks Reply::{variant}");
    }
}

#[test]
fn wire_format_is_unchanged() {
    assert_eq!(
        PROTOCOL_VERSION, FIXTURE_PROTOCOL_VERSION,
        "PROTOCOL_VERSION changed: regenerate the golden fixture (see the top of tests/golden.rs)"
    );
    let messages = messages();
    assert_eq!(
        messages.len(),
        FIXTURE.len(),
        "wire format changed: bump PROTOCOL_VERSION and update the fixture (messages and fixture differ in number)"
    );
    for ((name, msg), (fixture_name, fixture_hex)) in messages.iter().zip(FIXTURE) {
        assert_eq!(name, fixture_name, "fixture out of order: regenerate it (see the top of tests/golden.rs)");
        let actual = encode_msg(msg);
        assert_eq!(
            to_hex(&actual),
            *fixture_hex,
            "wire format changed: bump PROTOCOL_VERSION and update the fixture ({name} now encodes differently)"
        );
        // The pinned bytes must also still decode to the same value.
        assert!(decodes_to(&from_hex(fixture_hex), msg), "fixture bytes of {name} no longer decode to the message");
    }
}

/// Prints `FIXTURE` as Rust source, for regenerating it after a deliberate change.
#[test]
#[ignore = "run by hand to regenerate the fixture"]
fn print_fixture() {
    println!("const FIXTURE_PROTOCOL_VERSION: u16 = {PROTOCOL_VERSION};");
    println!("const FIXTURE: &[(&str, &str)] = &[");
    for (name, msg) in messages() {
        println!("    ({name:?}, {:?}),", to_hex(&encode_msg(&msg)));
    }
    println!("];");
}
