//! Inputs found by fuzzing (`fuzz/fuzz_targets/metadata_parser.rs`, see docs/RELIABILITY.md), kept as tests.

use buildlock_disk::Metadata;

/// Parses `text`, writes it back with `to_json`, and parses that.
fn rewrite(text: &str) -> (Metadata, Metadata, String) {
    let m = Metadata::parse(text.as_bytes()).expect("the input is valid metadata");
    let json = m.to_json();
    let back =
        Metadata::parse(json.as_bytes()).unwrap_or_else(|why| panic!("to_json output does not parse ({why}): {json}"));
    (m, back, json)
}

/// Found by `metadata_parser` (minimized input `[123, 34, 13, 13, 13, 13, 13, 13, 13, 13, 13]`,
/// which its structured mode turns into the object below). A float timestamp of about -1.4e11
/// seconds (year -2557) parsed, but `to_json` wrote it as `"-2557-01-14T20:19:04.714294"`: a
/// 4-digit negative year, which the reader does not accept (jiff wants a signed 6-digit year,
/// `-002557`), so the time was silently lost on a rewrite. Such years are now written as seconds
/// since the epoch.
#[test]
fn timestamp_before_year_0_survives_a_rewrite() {
    let (m, back, json) = rewrite(r#"{"pid":151850219,"timestamp":-142857142857.14285}"#);
    assert!(m.timestamp.is_some(), "the float timestamp itself is readable");
    assert_eq!(back.pid, m.pid);
    assert!(back.timestamp.is_some(), "timestamp lost: {json}");
    let delta = back.timestamp.unwrap().duration_since(m.timestamp.unwrap());
    assert!(delta.as_secs_f64().abs() < 1e-5, "timestamp changed: {json}");
}

/// The boundary of the bug above: from year 0 on, the time survives a rewrite, as do the fields
/// the fuzz target compares.
#[test]
fn timestamps_from_year_0_survive_a_rewrite() {
    for ts in ["-62167219200", "-62135596800", "0", "1771051811.5", "\"0001-01-01T00:00:00Z\""] {
        let text = format!(
            r#"{{"pid":7,"timestamp":{ts},"operation":"build:x","hostname":"h","start_time":12,"mode":"shared","id":"7-1-0","token":3,"command":"make"}}"#
        );
        let (m, back, json) = rewrite(&text);
        assert!(m.timestamp.is_some(), "{text}");
        assert!(back.timestamp.is_some(), "timestamp lost: {json}");
        assert_eq!(
            (&back.operation, &back.hostname, back.start_time, back.mode, &back.id, back.token, &back.command),
            (&m.operation, &m.hostname, m.start_time, m.mode, &m.id, m.token, &m.command),
            "{json}"
        );
    }
}
