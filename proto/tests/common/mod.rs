//! Sample messages and helpers shared by the integration tests.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use buildlock_proto::{
    AcquireRequest, DaemonInfo, ErrorCode, ErrorReply, FileRef, Holder, LockInfo, Mode, Reply, Request, WaitFor, Waiter,
};

/// A holder with every field set, including multi-byte varints, a negative i64 and non-ASCII text.
pub fn full_holder() -> Holder {
    Holder {
        pid: Some(4242),
        command: Some("make -j8".into()),
        host: Some("myhost".into()),
        mode: Some(Mode::Exclusive),
        since_unix_ms: Some(1_790_000_000_000),
        operation: Some("build:libfastled_build".into()),
        token: Some(u64::MAX),
        outside: false,
        description: "pid 4242 (make -j8) on myhost, exclusive — since 14:03:11".into(),
        max_hold_ms: None,
    }
}

/// A holder seen only through the OS lock.
pub fn outside_holder() -> Holder {
    Holder {
        pid: None,
        command: None,
        host: None,
        mode: None,
        since_unix_ms: Some(-1),
        operation: None,
        token: None,
        outside: true,
        description: "held outside buildlock".into(),
        max_hold_ms: None,
    }
}

/// Every `Request` variant, some more than once with different field values.
pub fn sample_requests() -> Vec<Request> {
    let acquire = AcquireRequest {
        lease: 1,
        path: "/home/me/.local/share/buildlock/locks/demo.lock".into(),
        mode: Mode::Exclusive,
        wait: WaitFor::Millis(30_000),
        operation: "build:demo".into(),
        command: "make -j8".into(),
        bind_pid: Some(77),
        thread: 0,
        max_hold_ms: None,
        kill_after_ms: None,
        remote: None,
        remote_timeout_ms: None,
    };
    vec![
        Request::Acquire(acquire.clone()),
        Request::Acquire(AcquireRequest {
            mode: Mode::Shared,
            wait: WaitFor::NoWait,
            bind_pid: None,
            thread: 0,
            max_hold_ms: None,
            kill_after_ms: None,
            remote: None,
            remote_timeout_ms: None,
            ..acquire.clone()
        }),
        Request::Acquire(AcquireRequest {
            lease: u64::MAX,
            wait: WaitFor::Forever,
            operation: String::new(),
            ..acquire
        }),
        Request::Release { lease: 1, answer: true, copies_closed: false },
        Request::Release { lease: u64::MAX, answer: false, copies_closed: true },
        Request::ReleasePid { path: "/tmp/a.lock".into(), pid: u32::MAX },
        Request::Status { path: Some("/tmp/a.lock".into()) },
        Request::Status { path: None },
        Request::DaemonStatus,
        Request::Shutdown,
        Request::Bind { lease: 300, pid: 4242, stop_on_loss: true },
    ]
}

/// Every `Reply` variant, some more than once with different field values.
pub fn sample_replies() -> Vec<Reply> {
    vec![
        Reply::Granted {
            lease: 1,
            path: "/tmp/a.lock".into(),
            token: 1,
            fd_attached: true,
            file: Some(FileRef { dev: 2049, ino: 131_074 }),
        },
        Reply::Granted { lease: u64::MAX, path: "/tmp/a.lock".into(), token: u64::MAX, fd_attached: false, file: None },
        Reply::Waiting { lease: 2, path: "/tmp/a.lock".into(), position: 3, holder: Some(full_holder()) },
        Reply::Waiting { lease: 3, path: "/tmp/a.lock".into(), position: 1, holder: None },
        Reply::Released { lease: 1, path: "/tmp/a.lock".into() },
        Reply::Released { lease: 0, path: "/tmp/a.lock".into() },
        Reply::Status { locks: vec![] },
        Reply::Status {
            locks: vec![
                LockInfo {
                    path: "/tmp/a.lock".into(),
                    holders: vec![full_holder(), outside_holder()],
                    waiters: vec![
                        Waiter { pid: 1, mode: Mode::Shared, waited_ms: 0, operation: "read".into() },
                        Waiter { pid: 2, mode: Mode::Exclusive, waited_ms: 123_456_789, operation: String::new() },
                    ],
                },
                LockInfo { path: "/tmp/b.lock".into(), holders: vec![], waiters: vec![] },
            ],
        },
        Reply::DaemonStatus(DaemonInfo {
            pid: 999,
            version: 1,
            build: "0.1.0".into(),
            started_unix_ms: 1_790_000_000_000,
            runtime_dir: "/run/user/1000/buildlock".into(),
            socket: "/run/user/1000/buildlock/buildlockd.sock".into(),
            connections: 2,
            leases: 1,
            waiters: 0,
            idle_exit_ms: Some(600_000),
        }),
        Reply::ShuttingDown,
        Reply::Error(ErrorReply {
            code: ErrorCode::WouldBlock,
            message: "lock /tmp/a.lock is held".into(),
            holder: Some(full_holder()),
            lease: 7,
        }),
        Reply::Error(ErrorReply { code: ErrorCode::Internal, message: String::new(), holder: None, lease: 0 }),
        Reply::LeaseLost { lease: 9, path: "/tmp/a.lock".into(), reason: "the lock file was deleted".into() },
        Reply::Bound { lease: 300, path: "/tmp/a.lock".into(), pid: 4242 },
    ]
}

/// The variant's name. The exhaustive match makes a new variant a compile error here, which
/// points at the samples (and the golden fixture) that need one too.
pub fn request_variant(r: &Request) -> &'static str {
    match r {
        Request::Acquire(_) => "Acquire",
        Request::Release { .. } => "Release",
        Request::ReleasePid { .. } => "ReleasePid",
        Request::Status { .. } => "Status",
        Request::DaemonStatus => "DaemonStatus",
        Request::Shutdown => "Shutdown",
        Request::Bind { .. } => "Bind",
    }
}

/// All `Request` variant names, in declaration order.
pub const REQUEST_VARIANTS: &[&str] =
    &["Acquire", "Release", "ReleasePid", "Status", "DaemonStatus", "Shutdown", "Bind"];

/// See [`request_variant`].
pub fn reply_variant(r: &Reply) -> &'static str {
    match r {
        Reply::Granted { .. } => "Granted",
        Reply::Waiting { .. } => "Waiting",
        Reply::Released { .. } => "Released",
        Reply::Status { .. } => "Status",
        Reply::DaemonStatus(_) => "DaemonStatus",
        Reply::ShuttingDown => "ShuttingDown",
        Reply::Error(_) => "Error",
        Reply::LeaseLost { .. } => "LeaseLost",
        Reply::Bound { .. } => "Bound",
    }
}

/// All `Reply` variant names, in declaration order.
pub const REPLY_VARIANTS: &[&str] =
    &["Granted", "Waiting", "Released", "Status", "DaemonStatus", "ShuttingDown", "Error", "LeaseLost", "Bound"];

/// Lower-case hex, two digits per byte, no separators.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Inverse of [`to_hex`]; whitespace is ignored so fixtures can be wrapped.
pub fn from_hex(hex: &str) -> Vec<u8> {
    let digits: Vec<u8> = hex.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert!(digits.len().is_multiple_of(2), "odd number of hex digits in {hex:?}");
    digits
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).expect("hex digits are ASCII");
            u8::from_str_radix(pair, 16).unwrap_or_else(|_| panic!("bad hex digits {pair:?}"))
        })
        .collect()
}
