//! Checks that `.lock.pid` metadata parsing (`Metadata::parse`, `meta::read_from`) never panics on arbitrary bytes, agrees between the two entry points, and that metadata that parses survives `to_json` then `parse` with the same pid, operation, hostname, start_time, mode, id, token and command (and the other text fields).
#![no_main]

use buildlock_disk::meta::{self, MAX_METADATA_BYTES};
use buildlock_disk::{MetaRead, Metadata};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
    // A readable time stays readable (its precision drops to microseconds in the local zone).
    if m.timestamp.is_some() {
        assert!(back.timestamp.is_some(), "timestamp lost: {json}");
    }
});
