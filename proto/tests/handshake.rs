//! The Hello/Welcome exchange: magic, version mismatches in both directions, refusals.

use buildlock_proto::{
    check_hello, check_welcome, encode, HandshakeError, Hello, Peer, ProtoError, Welcome, BUILD, MAGIC,
    PROTOCOL_VERSION,
};
use serde::Serialize;

/// The payload of `msg`'s frame.
fn payload<T: Serialize>(msg: &T) -> Vec<u8> {
    encode(msg).expect("encode")[4..].to_vec()
}

/// A hello from some future version: the shared prefix, then fields this version has never seen.
#[derive(Serialize)]
struct FutureHello {
    magic: [u8; 4],
    version: u16,
    build: String,
    pid: u32,
    features: Vec<String>,
    uid: Option<u64>,
    nonce: [u8; 16],
}

fn future_hello() -> FutureHello {
    FutureHello {
        magic: MAGIC,
        version: PROTOCOL_VERSION + 1,
        build: "0.2.0".into(),
        pid: 31337,
        features: vec!["batch-acquire".into(), "fd-passing-v2".into()],
        uid: Some(1000),
        nonce: [0xab; 16],
    }
}

#[test]
fn matching_hello_and_welcome_are_accepted() {
    let hello = check_hello(&payload(&Hello::new(4242))).expect("our own hello");
    assert_eq!(hello, Hello::new(4242));
    assert_eq!((hello.magic, hello.version, hello.build.as_str()), (MAGIC, PROTOCOL_VERSION, BUILD));

    let welcome = check_welcome(&payload(&Welcome::new(99))).expect("our own welcome");
    assert_eq!(welcome.pid, 99);
    assert_eq!(welcome.error, None);
}

#[test]
fn bad_magic_is_named() {
    match check_hello(b"GET / HTTP/1.1\r\n") {
        Err(e @ HandshakeError::BadMagic { .. }) => {
            let message = e.to_string();
            assert!(message.starts_with("not a buildlock client (bad magic b\"GET \""), "{message}");
            assert_eq!(e.peer_version(), None);
        }
        other => panic!("expected BadMagic, got {other:?}"),
    }

    let mut wrong = Welcome::new(1);
    wrong.magic = *b"XXXX";
    match check_welcome(&payload(&wrong)) {
        Err(e @ HandshakeError::BadMagic { .. }) => {
            assert!(e.to_string().starts_with("not a buildlock daemon (bad magic b\"XXXX\""), "{e}");
        }
        other => panic!("expected BadMagic, got {other:?}"),
    }

    // Shorter than the magic, including nothing at all, and non-printable bytes.
    for short in [&b""[..], b"BL", b"BLC"] {
        assert!(matches!(check_hello(short), Err(HandshakeError::BadMagic { peer: Peer::Client, .. })));
    }
    match check_welcome(&[0, 0xff, b'\n', 1, 2]) {
        Err(HandshakeError::BadMagic { found, .. }) => assert_eq!(found, vec![0, 0xff, b'\n', 1]),
        other => panic!("expected BadMagic, got {other:?}"),
    }
}

#[test]
fn future_client_hello_names_both_versions() {
    let bytes = payload(&future_hello());
    // The extra fields really are there, after the part this version understands.
    assert!(bytes.len() > payload(&Hello::new(31337)).len() + 16);

    let err = check_hello(&bytes).expect_err("a different version must be refused");
    match &err {
        HandshakeError::VersionMismatch { peer, peer_version, peer_build, our_version, our_build } => {
            assert_eq!(*peer, Peer::Client);
            assert_eq!(*peer_version, PROTOCOL_VERSION + 1);
            assert_eq!(peer_build, "0.2.0");
            assert_eq!(*our_version, PROTOCOL_VERSION);
            assert_eq!(our_build, BUILD);
        }
        other => panic!("expected VersionMismatch, got {other:?}"),
    }
    assert_eq!(err.peer_version(), Some(PROTOCOL_VERSION + 1));
    assert_eq!(err.peer_build(), Some("0.2.0"));
    assert_eq!(
        err.to_string(),
        format!(
            "buildlock-client 0.2.0 speaks protocol {} but buildlockd {BUILD} speaks protocol {PROTOCOL_VERSION}: \
             restart the daemon (`buildlock-client daemon stop`) so the new version starts, or use matching versions",
            PROTOCOL_VERSION + 1
        )
    );
}

#[test]
fn future_daemon_welcome_names_both_versions() {
    // A newer daemon refuses us; we must report the version mismatch, not just its refusal, and
    // tell the user that it is the client that is old.
    #[derive(Serialize)]
    struct FutureWelcome {
        magic: [u8; 4],
        version: u16,
        build: String,
        something_new: Vec<u64>,
    }
    let bytes =
        payload(&FutureWelcome { magic: MAGIC, version: 7, build: "0.9.0".into(), something_new: vec![1, 2, 3] });
    let err = check_welcome(&bytes).expect_err("a different version must be refused");
    assert!(
        matches!(&err, HandshakeError::VersionMismatch { peer: Peer::Daemon, peer_version: 7, peer_build, .. } if peer_build == "0.9.0")
    );
    let message = err.to_string();
    assert!(
        message.starts_with(&format!(
            "buildlock-client {BUILD} speaks protocol {PROTOCOL_VERSION} but buildlockd 0.9.0 speaks protocol 7: "
        )),
        "{message}"
    );
    assert!(message.contains("older than the running daemon"), "{message}");
}

#[test]
fn older_peer_is_reported_too() {
    let old = Hello { magic: MAGIC, version: 0, build: "0.0.1".into(), pid: 1 };
    let err = check_hello(&payload(&old)).expect_err("version 0 must be refused");
    assert_eq!(err.peer_version(), Some(0));
    // An old client talking to a newer daemon: the client is the one to replace.
    assert!(err.to_string().contains("older than the running daemon"), "{err}");
}

#[test]
fn refusal_is_reported_with_the_daemons_message() {
    let refused = Welcome::refused(555, "buildlockd is shutting down: run the command again");
    match check_welcome(&payload(&refused)) {
        Err(e @ HandshakeError::Refused { .. }) => {
            assert_eq!(
                e.to_string(),
                format!("buildlockd {BUILD} (pid 555) refused the connection: buildlockd is shutting down: run the command again")
            );
            assert_eq!(e.peer_version(), Some(PROTOCOL_VERSION));
            assert_eq!(e.peer_build(), Some(BUILD));
        }
        other => panic!("expected Refused, got {other:?}"),
    }
}

#[test]
fn right_prefix_but_broken_rest_is_malformed() {
    let bytes = payload(&Hello::new(1234));
    // Cut off the pid.
    let cut = &bytes[..bytes.len() - 2];
    assert!(matches!(check_hello(cut), Err(HandshakeError::Malformed { peer: Peer::Client, .. })));
    // Cut inside the build string: the shared prefix itself is incomplete.
    assert!(matches!(check_hello(&bytes[..7]), Err(HandshakeError::Malformed { .. })));
    // A welcome whose error tag is neither 0 nor 1.
    let mut welcome = payload(&Welcome::new(1));
    *welcome.last_mut().expect("non-empty") = 9;
    let err = check_welcome(&welcome).expect_err("bad option tag");
    assert!(matches!(err, HandshakeError::Malformed { peer: Peer::Daemon, .. }));
    assert!(err.to_string().starts_with("buildlockd sent a malformed handshake: "), "{err}");
}

#[test]
fn handshake_errors_convert_into_proto_errors() {
    let err: ProtoError = check_hello(b"nope").expect_err("bad magic").into();
    assert!(matches!(err, ProtoError::Handshake(HandshakeError::BadMagic { .. })));
    assert!(err.to_string().starts_with("not a buildlock client"), "{err}");
}
