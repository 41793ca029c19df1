//! Unit tests: the store (schema, versions, pruning, unusable files), the figures from known
//! rows, the Prometheus format, and the SVG rendered by a real renderer.

use super::*;

const LOCK: &str = "/locks/build.lock";

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("sub/history.sqlite3")).unwrap();
    (dir, s)
}

fn ev(kind: Kind, at_ms: i64, session: &str) -> Event {
    let mut e = Event::new(LOCK, kind);
    e.at_ms = at_ms;
    e.session = session.into();
    e.pid = Some(100);
    e.command = "make all".into();
    e.host = "h".into();
    e.mode = "exclusive".into();
    e
}

fn granted(at_ms: i64, wait_us: u64) -> Event {
    let mut e = ev(Kind::Granted, at_ms, "s");
    e.wait_us = Some(wait_us);
    e
}

fn released(at_ms: i64, hold_us: u64, command: &str) -> Event {
    let mut e = ev(Kind::Released, at_ms, "s");
    e.hold_us = Some(hold_us);
    e.command = command.into();
    e
}

#[test]
fn schema_is_versioned_and_wal() {
    let (dir, s) = store();
    let v: i64 = s.conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
    assert_eq!(v, SCHEMA_VERSION);
    let mode: String = s.conn.pragma_query_value(None, "journal_mode", |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
    // Opening again keeps what was written.
    s.insert(&[ev(Kind::Requested, 5, "a")]).unwrap();
    drop(s);
    let again = Store::open(&dir.path().join("sub/history.sqlite3")).unwrap();
    assert_eq!(again.count().unwrap(), 1);
}

#[test]
fn a_newer_schema_is_refused() {
    let (dir, s) = store();
    s.conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
    drop(s);
    let err = Store::open(&dir.path().join("sub/history.sqlite3")).unwrap_err();
    assert!(matches!(err, Error::NewerSchema { .. }), "{err}");
}

#[test]
fn garbage_at_the_path_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.sqlite3");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(err.to_string().contains("history.sqlite3"), "{err}");
}

#[test]
fn events_round_trip_and_filter() {
    let (_dir, s) = store();
    let mut stale = ev(Kind::StaleRecovered, 30, "");
    stale.rule = Some(StaleRule::NoMetadataOld);
    let mut other = ev(Kind::Busy, 20, "b");
    other.lock = "/locks/other.lock".into();
    s.insert(&[granted(10, 7), other.clone(), stale.clone()]).unwrap();
    assert_eq!(s.events(Some(LOCK), 0).unwrap(), vec![granted(10, 7), stale.clone()]);
    assert_eq!(s.events(None, 15).unwrap(), vec![other, stale]);
}

#[test]
fn pruning_keeps_the_window_and_the_cap() {
    let (_dir, s) = store();
    let day = 86_400_000;
    let now = 100 * day;
    let events: Vec<Event> = (0..10).map(|i| ev(Kind::Requested, now - (10 - i) * day, "p")).collect();
    s.insert(&events).unwrap();
    s.prune(Retention { days: 5, max_rows: 1000 }, now).unwrap();
    let left = s.events(None, 0).unwrap();
    assert_eq!(left.len(), 5, "days -5..-1 kept");
    assert!(left.iter().all(|e| e.at_ms >= now - 5 * day));
    s.prune(Retention { days: 5, max_rows: 2 }, now).unwrap();
    let left: Vec<i64> = s.events(None, 0).unwrap().iter().map(|e| e.at_ms).collect();
    assert_eq!(left, vec![now - 2 * day, now - day], "the newest two");
}

#[test]
fn stats_from_known_rows() {
    // Waits 1..=20 ms (in µs), holds 10..=200 ms; nearest rank: p50 of 20 values is the 10th,
    // p95 the 19th.
    let mut events = Vec::new();
    for i in 1..=20u64 {
        events.push(granted(i as i64 * 1000, i * 1000));
        let cmd = if i % 2 == 0 { "cargo build" } else { "make all" };
        events.push(released(i as i64 * 1000 + 500, i * 10_000, cmd));
    }
    events.push(ev(Kind::TimedOut, 50_000, "t1"));
    events.push(ev(Kind::TimedOut, 50_001, "t2"));
    events.push(ev(Kind::Busy, 50_002, "t3"));
    let mut dead = ev(Kind::StaleRecovered, 60_000, "");
    dead.rule = Some(StaleRule::DeadPid);
    events.push(dead.clone());
    events.push(dead);
    let mut old = ev(Kind::StaleRecovered, 60_001, "");
    old.rule = Some(StaleRule::NoMetadataOld);
    events.push(old);
    let (_dir, s) = store();
    s.insert(&events).unwrap();
    let st = stats(&s.events(Some(LOCK), 0).unwrap(), 5);
    assert_eq!(st.len(), 1);
    let st = &st[0];
    assert_eq!(st.acquisitions, 20);
    // Waits of 10 ms and more: 10..=20.
    assert_eq!(st.waited, 11);
    assert_eq!(st.waited_share, 11.0 / 20.0);
    assert_eq!(
        st.wait,
        Some(Percentiles { p50_us: 10_000, p95_us: 19_000, max_us: 20_000, count: 20, sum_us: 210_000 })
    );
    assert_eq!(
        st.hold,
        Some(Percentiles { p50_us: 100_000, p95_us: 190_000, max_us: 200_000, count: 20, sum_us: 2_100_000 })
    );
    assert_eq!((st.timeouts, st.busy, st.lost, st.broken), (2, 1, 0, 0));
    assert_eq!(st.stale_recoveries.get("dead_pid"), Some(&2));
    assert_eq!(st.stale_recoveries.get("no_metadata_old"), Some(&1));
    assert_eq!(st.stale_recoveries.get("stopped_heartbeat"), None);
    // Even holds 20+40+...+200 ms = 1100 ms; odd 10+30+...+190 = 1000 ms.
    assert_eq!(
        st.top_holders,
        vec![
            TopHolder { command: "cargo build".into(), total_hold_us: 1_100_000, holds: 10 },
            TopHolder { command: "make all".into(), total_hold_us: 1_000_000, holds: 10 },
        ]
    );
}

#[test]
fn percentiles_of_few_values() {
    assert_eq!(Percentiles::of(&[]), None);
    let one = Percentiles::of(&[7]).unwrap();
    assert_eq!((one.p50_us, one.p95_us, one.max_us), (7, 7, 7));
    let three = Percentiles::of(&[30, 10, 20]).unwrap();
    assert_eq!((three.p50_us, three.p95_us, three.max_us), (20, 30, 30));
}

#[test]
fn usual_hold_needs_enough_holds() {
    assert_eq!(usual_hold(&[5, 6]), None);
    assert_eq!(usual_hold(&[190_000_000, 1, 500]), Some(500));
    let (_dir, s) = store();
    s.insert(&[released(1, 3, "a"), released(2, 9, "a"), released(3, 5, "a"), released(4, 1000, "b")]).unwrap();
    let holds = s.holds_by(LOCK, "a", 50).unwrap();
    assert_eq!(holds, vec![5, 9, 3], "newest first, only this command's");
    assert_eq!(usual_hold(&holds), Some(5));
}

/// Checks the Prometheus text format line by line: comments are `# HELP name text` or
/// `# TYPE name type`, every sample `name{labels} value` with a declared name, a float value
/// and well-formed, escaped labels.
fn check_prometheus(text: &str) -> usize {
    let mut declared = std::collections::HashSet::new();
    let mut samples = 0;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (what, name, tail) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
            assert!(what == "HELP" || what == "TYPE", "{line}");
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line}");
            if what == "TYPE" {
                assert!(["gauge", "counter", "summary"].contains(&tail), "{line}");
                declared.insert(name.to_owned());
            }
            continue;
        }
        let open = line.find('{').unwrap_or_else(|| panic!("no labels: {line}"));
        let name = &line[..open];
        let base = name.trim_end_matches("_sum").trim_end_matches("_count");
        assert!(declared.contains(name) || declared.contains(base), "undeclared {name}: {line}");
        // Labels: key="value" pairs, values with only escaped quotes, backslashes and newlines.
        let bytes: Vec<char> = line[open + 1..].chars().collect();
        let mut i = 0;
        loop {
            let key_end = i + bytes[i..].iter().position(|&c| c == '=').expect("=");
            let key: String = bytes[i..key_end].iter().collect();
            assert!(key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !key.is_empty(), "{line}");
            assert_eq!(bytes[key_end + 1], '"', "{line}");
            i = key_end + 2;
            loop {
                match bytes[i] {
                    '\\' => {
                        assert!(['\\', '"', 'n'].contains(&bytes[i + 1]), "bad escape: {line}");
                        i += 2;
                    }
                    '"' => break,
                    '\n' => panic!("raw newline: {line}"),
                    _ => i += 1,
                }
            }
            i += 1;
            match bytes[i] {
                ',' => i += 1,
                '}' => break,
                c => panic!("unexpected {c:?}: {line}"),
            }
        }
        let value: String = bytes[i + 1..].iter().collect();
        let value = value.strip_prefix(' ').unwrap_or_else(|| panic!("no space before value: {line}"));
        value.parse::<f64>().unwrap_or_else(|_| panic!("value {value:?}: {line}"));
        samples += 1;
    }
    samples
}

#[test]
fn prometheus_output_parses_and_escapes_labels() {
    let mut events = vec![granted(1, 2_000_000), released(2, 3_000_000, "make")];
    let mut odd = granted(3, 5);
    odd.lock = "/locks/we\"ird\\name\nx.lock".into();
    events.push(odd);
    let text = prometheus(&stats(&events, 3));
    let samples = check_prometheus(&text);
    assert!(samples >= 10, "{text}");
    assert!(text.contains(r#"buildlock_wait_seconds{lock="/locks/build.lock",quantile="0.5"} 2"#), "{text}");
    assert!(text.contains(r#"buildlock_hold_seconds{lock="/locks/build.lock",quantile="1"} 3"#), "{text}");
    assert!(text.contains(r#"lock="/locks/we\"ird\\name\nx.lock""#), "{text}");
    assert!(text.contains("# TYPE buildlock_acquisitions gauge"), "{text}");
}

/// Renders `svg` with resvg and returns the pixmap.
fn render(svg: &str) -> resvg::tiny_skia::Pixmap {
    let tree = resvg::usvg::Tree::from_str(svg, &resvg::usvg::Options::default()).expect("the SVG parses");
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height()).unwrap();
    resvg::render(&tree, resvg::tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap
}

fn rgb(hex: &str) -> (u8, u8, u8) {
    let h = |i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap();
    (h(1), h(3), h(5))
}

fn pixel(p: &resvg::tiny_skia::Pixmap, x: f64, y: f64) -> (u8, u8, u8) {
    let c = p.pixel(x.round() as u32, y.round() as u32).unwrap();
    (c.red(), c.green(), c.blue())
}

#[test]
fn svg_timeline_renders_bars_where_they_belong() {
    // Row 0: A waits 0..1 s? No: A is granted at once at 1 s, holds until 6 s.
    // Row 1: B asks at 2 s, waits until 6 s, holds until 9 s.
    // Row 2: C (dead holder) recovered as stale at 9.5 s; D asks at 7 s and times out at 8 s.
    let mut a_req = ev(Kind::Requested, 1000, "A");
    a_req.pid = Some(1);
    let mut a_gr = ev(Kind::Granted, 1000, "A");
    a_gr.pid = Some(1);
    a_gr.wait_us = Some(0);
    let mut a_rel = ev(Kind::Released, 6000, "A");
    a_rel.pid = Some(1);
    a_rel.hold_us = Some(5_000_000);
    let mut b_req = ev(Kind::Requested, 2000, "B");
    b_req.pid = Some(2);
    b_req.command = "cargo build".into();
    let mut b_gr = b_req.clone();
    b_gr.kind = Kind::Granted;
    b_gr.at_ms = 6000;
    b_gr.wait_us = Some(4_000_000);
    let mut b_rel = b_req.clone();
    b_rel.kind = Kind::Released;
    b_rel.at_ms = 9000;
    b_rel.hold_us = Some(3_000_000);
    let mut d_req = ev(Kind::Requested, 7000, "D");
    d_req.pid = Some(4);
    let mut d_to = d_req.clone();
    d_to.kind = Kind::TimedOut;
    d_to.at_ms = 8000;
    let mut stale = ev(Kind::StaleRecovered, 9500, "");
    stale.pid = Some(3);
    stale.rule = Some(StaleRule::DeadPid);
    let events = vec![a_req, a_gr, b_req, a_rel, b_gr, d_req, d_to, b_rel, stale];
    let t = timeline(LOCK, &events, 10_000);
    assert_eq!((t.start_ms, t.end_ms), (1000, 9500));
    assert_eq!(t.rows.len(), 4, "{:?}", t.rows);
    assert!(t.rows[1].label.contains("cargo build") && t.rows[1].label.contains("pid 2"), "{}", t.rows[1].label);

    let svg = svg(&t, "build.lock");
    let p = render(&svg);
    let x = |ms| layout::x(ms, t.start_ms, t.end_ms);
    let hold = rgb(layout::HOLDING_COLOR);
    let wait = rgb(layout::WAITING_COLOR);
    let bg = rgb(layout::BACKGROUND);
    let row = layout::row_middle;
    // A: holding across 1..6 s; nothing after it on its row.
    assert_eq!(pixel(&p, x(1100), row(0)), hold);
    assert_eq!(pixel(&p, x(5900), row(0)), hold);
    assert_eq!(pixel(&p, x(7000), row(0)), bg);
    // B: background before its request, waiting 2..6 s, holding 6..9 s.
    assert_eq!(pixel(&p, x(1500), row(1)), rgb("#f7fafc"), "odd rows are shaded");
    assert_eq!(pixel(&p, x(2100), row(1)), wait);
    assert_eq!(pixel(&p, x(5900), row(1)), wait);
    assert_eq!(pixel(&p, x(6100), row(1)), hold);
    assert_eq!(pixel(&p, x(8900), row(1)), hold);
    // Waiting is drawn thinner than holding: above the waiting bar's edge is background.
    assert_eq!(pixel(&p, x(4000), row(1) - layout::ROW_HEIGHT / 3.0), rgb("#f7fafc"));
    assert_eq!(pixel(&p, x(7500), row(1) - layout::ROW_HEIGHT / 3.0), hold);
    // D: waited 7..8 s, then gave up.
    assert_eq!(pixel(&p, x(7500), row(2)), wait);
    assert_eq!(pixel(&p, x(6500), row(2)), bg);
    // The stale recovery: a marker on its own row at 9.5 s, nothing well before it.
    assert_eq!(pixel(&p, x(9500), row(3) + 3.0), rgb(layout::STALE_COLOR));
    assert_eq!(pixel(&p, x(5000), row(3)), rgb("#f7fafc"));
    // The axis has ticks with labels.
    assert!(svg.contains(">+0ms</text>") && svg.contains(">+8s</text>"), "{svg}");
}

#[test]
fn pruning_is_occasional_not_per_write() {
    // Rows older than the window, then writes from fresh connections (as each CLI run makes):
    // only a write that crosses a multiple of PRUNE_EVERY prunes.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.sqlite3");
    let s = Store::open(&path).unwrap();
    let old: Vec<Event> = (0..(PRUNE_EVERY - 10)).map(|i| ev(Kind::Requested, i, "old")).collect();
    s.insert(&old).unwrap();
    drop(s);
    let fresh = || Store::open(&path).unwrap();
    fresh().insert(&[ev(Kind::Requested, now_ms(), "new")]).unwrap();
    assert_eq!(fresh().count().unwrap(), PRUNE_EVERY as u64 - 9, "no prune before the boundary");
    fresh().insert(&(0..20).map(|_| ev(Kind::Requested, now_ms(), "new")).collect::<Vec<_>>()).unwrap();
    assert_eq!(fresh().count().unwrap(), 21, "the old rows were pruned at the boundary");
}

#[test]
fn spooled_rows_are_imported_once() {
    let (dir, s) = store();
    let db = dir.path().join("sub/history.sqlite3");
    spool_append(&db, &[granted(1, 5), released(2, 7, "make")]).unwrap();
    assert!(std::fs::metadata(spool_path(&db)).unwrap().len() > 0);
    // A line a crashed writer left half-written is skipped, not an error.
    std::fs::OpenOptions::new()
        .append(true)
        .open(spool_path(&db))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"\n{\"at_ms\": 3, \"lo"))
        .unwrap();
    spool_append(&db, &[ev(Kind::Busy, 4, "b")]).unwrap();
    assert_eq!(s.import_spool(Retention::default()).unwrap(), 3);
    assert!(!spool_path(&db).exists());
    assert_eq!(s.import_spool(Retention::default()).unwrap(), 0, "nothing twice");
    let kinds: Vec<Kind> = s.events(None, 0).unwrap().iter().map(|e| e.kind).collect();
    assert_eq!(kinds, vec![Kind::Granted, Kind::Released, Kind::Busy]);
    assert_eq!(s.events(None, 0).unwrap()[0], granted(1, 5));
}

#[test]
fn the_setting_is_a_switch_or_a_file() {
    let parse = |v: Option<&str>| Setting::parse(v.map(std::ffi::OsString::from));
    let default = parse(None);
    for off in ["0", "off", "OFF", "false", "no"] {
        assert_eq!(parse(Some(off)), Setting::Off, "{off}");
    }
    for on in ["", "1", "on", "True", "yes"] {
        assert_eq!(parse(Some(on)), default, "{on:?} is a switch, not a file name");
    }
    assert_eq!(parse(Some("/var/tmp/h.sqlite3")), Setting::At(PathBuf::from("/var/tmp/h.sqlite3")));
    // A relative path names one file for every process, whatever its working directory: the
    // default file's directory, not the current one.
    let Setting::At(default_file) = default else { panic!("this test needs a home directory") };
    let dir = default_file.parent().unwrap();
    assert_eq!(parse(Some("ci.sqlite3")), Setting::At(dir.join("ci.sqlite3")));
    assert_eq!(parse(Some("sub/ci.sqlite3")), Setting::At(dir.join("sub/ci.sqlite3")));
}
