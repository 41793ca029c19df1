//! Checks that `.lock.pid` metadata parsing never panics and that parsed metadata round-trips.
//!
//! `Metadata::parse` and `meta::read_from` must not panic and must agree; metadata that parses
//! must survive `to_json` then `parse` with the same pid, operation, hostname, start_time, mode,
//! id, token and command (and the other text fields).
//!
//! Random bytes almost never form a JSON object with a valid `"pid"`, so half the inputs (first
//! byte odd) are turned into one: a JSON object whose keys are the metadata keys, in any order,
//! repeated or missing, with values of the right or the wrong type. The other half (first byte
//! even) go to the parser as they are.
#![no_main]

use buildlock_disk::meta::{self, MAX_METADATA_BYTES};
use buildlock_disk::{MetaRead, Metadata};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

/// 0000-01-01T00:00:00Z in seconds since the Unix epoch.

const KEYS: &[&str] = &[
    "pid",
    "timestamp",
    "operation",
    "hostname",
    "start_time",
    "boot_id",
    "mode",
    "command",
    "lock",
    "token",
    "id",
    "version",
];

/// Some JSON value, biased towards what the metadata keys expect.
fn value(u: &mut Unstructured) -> Result<Value> {
    Ok(match u.int_in_range(0..=13u8)? {
        0 => Value::Null,
        1 => json!(u.arbitrary::<bool>()?),
        2 => json!(u.arbitrary::<u64>()?),
        3 => json!(u.int_in_range(1..=4_194_304u32)?), // a plausible pid
        4 => json!(u.arbitrary::<i64>()?),
        5 => serde_json::Number::from_f64(u.arbitrary::<f64>()?).map_or(Value::Null, Value::Number),
        6 => json!(u.arbitrary::<String>()?),
        7 => json!(*u.choose(&["shared", "exclusive", "Shared", "os", "soft", "buildlock/1", ""])?),
        8 => {
            // An ISO 8601 date and time, naive or with an offset, maybe out of range.
            let (y, mo, d) = (u.int_in_range(0..=10_000i32)?, u.int_in_range(0..=13u8)?, u.int_in_range(0..=32u8)?);
            let (h, mi, s, us) = (
                u.int_in_range(0..=24u8)?,
                u.int_in_range(0..=60u8)?,
                u.int_in_range(0..=60u8)?,
                u.arbitrary::<u32>()? % 1_000_000,
            );
            let zone = *u.choose(&["", "Z", "+01:00", "-23:59", "[UTC]"])?;
            json!(format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{us:06}{zone}"))
        }
        9 => json!(u.arbitrary::<f64>()?.to_string()),
        10 => json!([u.arbitrary::<u8>()?]),
        11 => json!({ "pid": u.arbitrary::<u32>()? }),
        12 => json!(u.arbitrary::<u32>()? as f64 + 0.5), // a float where an integer is wanted
        _ => json!(u.int_in_range(-1_000_000_000_000i64..=300_000_000_000i64)? as f64 / 7.0), // seconds
    })
}

/// A JSON object text built from `u`: metadata keys (and a stranger) with `value`s.
fn object(u: &mut Unstructured) -> Result<Vec<u8>> {
    let mut members = Vec::new();
    if u.ratio(7u8, 8u8)? {
        members.push(format!("\"pid\":{}", json!(u.int_in_range(0..=u32::MAX as u64 + 1)?)));
    }
    u.arbitrary_loop(None, Some(24), |u| {
        let key = if u.ratio(1u8, 16u8)? { u.arbitrary::<String>()? } else { (*u.choose(KEYS)?).to_owned() };
        members.push(format!("{}:{}", json!(key), value(u)?));
        Ok(std::ops::ControlFlow::Continue(()))
    })?;
    let pad = if u.arbitrary()? { "\n  " } else { "" };
    Ok(format!("{pad}{{{}}}{pad}", members.join(",")).into_bytes())
}

fn check(data: &[u8]) {
    let parsed = Metadata::parse(data);
    let read = meta::read_from(data);

    // read_from is parse plus "blank means missing" and a size cap (it reads one byte past the
    // limit, so only that much of the input decides "blank"); the two must agree.
    let read_len = data.len().min(MAX_METADATA_BYTES as usize + 1);
    let blank = data[..read_len].iter().all(u8::is_ascii_whitespace);
    match (&parsed, &read) {
        (_, MetaRead::Missing) => assert!(blank, "read_from called non-blank input missing"),
        (Ok(m), MetaRead::Valid(r)) => assert_eq!(m, r, "parse and read_from disagree"),
        (Err(_), MetaRead::Corrupt(_)) => assert!(!blank),
        (Ok(_), MetaRead::Corrupt(why)) => panic!("parse accepted what read_from called corrupt: {why}"),
        (Err(why), MetaRead::Valid(_)) => panic!("read_from accepted what parse refused: {why}"),
    }
    if data.len() as u64 > MAX_METADATA_BYTES {
        assert!(parsed.is_err(), "oversized metadata accepted");
    }

    let Ok(m) = parsed else {
        return;
    };
    assert!(m.pid > 0, "parse returned pid 0");
    let json = m.to_json();
    let back = match Metadata::parse(json.as_bytes()) {
        Ok(back) => back,
        Err(why) => panic!("to_json output does not parse ({why}): {json}"),
    };
    assert_eq!(back.pid, m.pid, "pid changed: {json}");
    assert_eq!(back.operation, m.operation, "operation changed: {json}");
    assert_eq!(back.hostname, m.hostname, "hostname changed: {json}");
    assert_eq!(back.start_time, m.start_time, "start_time changed: {json}");
    assert_eq!(back.mode, m.mode, "mode changed: {json}");
    assert_eq!(back.id, m.id, "id changed: {json}");
    assert_eq!(back.token, m.token, "token changed: {json}");
    assert_eq!(back.command, m.command, "command changed: {json}");
    assert_eq!(back.boot_id, m.boot_id, "boot_id changed: {json}");
    assert_eq!(back.lock, m.lock, "lock changed: {json}");
    assert_eq!(back.version, m.version, "version changed: {json}");
    // A readable time stays readable (its precision drops to microseconds in the local zone;
    // years outside 0..=9999 are written as seconds since the epoch, see
    // `timestamp_before_year_0_survives_a_rewrite` in crates/buildlock-disk/tests/fuzz_regressions.rs).
    if m.timestamp.is_some() {
        assert!(back.timestamp.is_some(), "timestamp lost: {json}");
    }
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((first, rest)) if first % 2 == 1 => {
            if let Ok(text) = object(&mut Unstructured::new(rest)) {
                check(&text);
            }
        }
        _ => check(data),
    }
});
