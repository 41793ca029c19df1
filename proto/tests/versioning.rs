//! How the protocol grows: every enum's set of variants is pinned to `PROTOCOL_VERSION`.
//!
//! Two sides talk only when their versions are equal (there is no capability negotiation), so a
//! message a peer cannot decode never reaches it: a daemon of version 2 never receives a request
//! of version 3 and closes the connection (dropping that client's leases) as malformed. That
//! holds only if every new variant comes with a version bump. These tests fail when a variant is
//! added without one: bump `PROTOCOL_VERSION`, update the golden fixtures and `PROTOCOL.md`, then
//! the numbers below.

use buildlock_proto::{decode, Mode, Reply, Request, WaitFor, PROTOCOL_VERSION};

/// The number of variants of each wire enum in this protocol version.
const VARIANTS: &[(u16, &str, u8)] = &[
    (1, "Request", 7),
    (1, "Reply", 9),
    (1, "ErrorCode", 13),
    (1, "Mode", 2),
    (1, "WaitFor", 3),
    // 2: ErrorCode::LimitExceeded.
    (2, "Request", 7),
    (2, "Reply", 9),
    (2, "ErrorCode", 14),
    (2, "Mode", 2),
    (2, "WaitFor", 3),
    // 3: leases named by a client-chosen id, the asking thread, max-hold (fields changed);
    // ErrorCode::Deadlock.
    (3, "Request", 7),
    (3, "Reply", 9),
    (3, "ErrorCode", 15),
    (3, "Mode", 2),
    (3, "WaitFor", 3),
    // 4: `Release.answer`, `Granted.file` (fields added).
    (4, "Request", 7),
    (4, "Reply", 9),
    (4, "ErrorCode", 15),
    (4, "Mode", 2),
    (4, "WaitFor", 3),
    // 5: `Release.copies_closed` (field added).
    (5, "Request", 7),
    (5, "Reply", 9),
    (5, "ErrorCode", 15),
    (5, "Mode", 2),
    (5, "WaitFor", 3),
    // 6: `Bind.stop_on_loss` (field added).
    (6, "Request", 7),
    (6, "Reply", 9),
    (6, "ErrorCode", 15),
    (6, "Mode", 2),
    (6, "WaitFor", 3),
];

/// Whether a payload starting with variant index `i` (and padded with zeros for its content)
/// decodes as `T`: unknown indices fail whatever follows.
fn known<T: serde::de::DeserializeOwned>(i: u8) -> bool {
    let mut payload = vec![i];
    payload.extend([0u8; 64]);
    decode::<T>(&payload).is_ok()
}

fn count(name: &str) -> u8 {
    let probe = |f: fn(u8) -> bool| (0..=127u8).take_while(|&i| f(i)).count() as u8;
    match name {
        "Request" => probe(known::<Request>),
        // An error code alone is not a reply: wrap it as `Reply::Error` (index 6).
        "ErrorCode" => probe(|i| {
            let mut p = vec![6, i, 0, 0];
            p.extend([0u8; 8]);
            decode::<Reply>(&p).is_ok_and(|r| matches!(r, Reply::Error(_)))
        }),
        "Reply" => probe(known::<Reply>),
        "Mode" => probe(known::<Mode>),
        "WaitFor" => probe(known::<WaitFor>),
        _ => unreachable!(),
    }
}

#[test]
fn every_wire_enum_has_the_variants_its_protocol_version_says() {
    for &(version, name, n) in VARIANTS.iter().filter(|(v, ..)| *v == PROTOCOL_VERSION) {
        assert_eq!(
            count(name),
            n,
            "{name} has changed its variants in protocol version {version}: a peer of the same version \
             would not decode the new ones; bump PROTOCOL_VERSION (and the golden fixtures, PROTOCOL.md \
             and this table)"
        );
    }
    assert!(
        VARIANTS.iter().any(|(v, ..)| *v == PROTOCOL_VERSION),
        "no variant counts for protocol version {PROTOCOL_VERSION}: add them to this table"
    );
}

#[test]
fn the_first_unknown_variant_is_refused_not_misread() {
    // What a daemon of this version does with the next request variant a later version might add:
    // a decoding error (and the connection closed), never another request.
    assert!(decode::<Request>(&[7]).is_err());
    assert!(decode::<Reply>(&[9]).is_err());
    // And the last known ones decode.
    assert!(matches!(decode::<Request>(&[6, 1, 1, 0]), Ok(Request::Bind { .. })));
}
