//! A lock's events as a timeline (one row per holder or waiter) and that timeline as an SVG.

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::{Event, Kind};

/// What a bar shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Waiting,
    Holding,
}

/// One span of a row, in ms since the epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bar {
    pub kind: BarKind,
    pub from_ms: i64,
    pub to_ms: i64,
}

/// A moment marked on a row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mark {
    /// This (dead) holder's lock was recovered as stale, by the given rule.
    StaleRecovered {
        at_ms: i64,
        rule: String,
    },
    Lost {
        at_ms: i64,
    },
    /// The wait ran out, or the request was refused at once.
    GaveUp {
        at_ms: i64,
    },
    Broken {
        at_ms: i64,
    },
    /// Stopped for holding past its max-hold.
    Stopped {
        at_ms: i64,
    },
}

impl Mark {
    fn at(&self) -> i64 {
        match self {
            Mark::StaleRecovered { at_ms, .. }
            | Mark::Lost { at_ms }
            | Mark::GaveUp { at_ms }
            | Mark::Broken { at_ms }
            | Mark::Stopped { at_ms } => *at_ms,
        }
    }
}

/// One holder or waiter (one acquisition), labelled with its command, pid and host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub label: String,
    pub pid: Option<u32>,
    pub bars: Vec<Bar>,
    pub marks: Vec<Mark>,
}

/// The rows of a lock's timeline and the span of time they cover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeline {
    pub lock: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub rows: Vec<Row>,
}

/// Builds the timeline of `events` (one lock's, oldest first). A hold with no release yet
/// runs to `now_ms`. An acquisition is one row: waiting from its request (the grant's wait
/// time before the grant) and holding from the grant to its release. Events with no
/// acquisition (a stale recovery, a loss found by a new daemon) mark the newest row of their
/// pid, or a row of their own.
pub fn timeline(lock: &str, events: &[Event], now_ms: i64) -> Timeline {
    let mut rows: Vec<Row> = Vec::new();
    let mut by_session: HashMap<&str, usize> = HashMap::new();
    // Per row: when it started waiting and when it got the lock (until closed).
    let mut open: HashMap<usize, (Option<i64>, Option<i64>)> = HashMap::new();
    let row_for = |rows: &mut Vec<Row>, e: &Event, by_session: &mut HashMap<&str, usize>, session: &str| {
        if let Some(&i) = by_session.get(session) {
            return i;
        }
        let host = if e.host.is_empty() { String::new() } else { format!(" @{}", e.host) };
        let pid = e.pid.map_or_else(String::new, |p| format!("pid {p}"));
        let cmd = if e.command.is_empty() { e.operation.clone() } else { e.command.clone() };
        let label = format!("{} ({pid}{host})", shorten(&cmd, 40)).replace(" ()", "");
        rows.push(Row { label, pid: e.pid, bars: Vec::new(), marks: Vec::new() });
        rows.len() - 1
    };
    for e in events {
        if e.session.is_empty() {
            continue;
        }
        let i = row_for(&mut rows, e, &mut by_session, &e.session);
        by_session.insert(e.session.as_str(), i);
        let slot = open.entry(i).or_default();
        match e.kind {
            Kind::Requested => slot.0 = Some(e.at_ms),
            Kind::Granted => {
                let waited_from = e.at_ms - e.wait_us.map_or(0, |w| i64::try_from(w / 1000).unwrap_or(0));
                let from = slot.0.map_or(waited_from, |r| r.min(waited_from));
                if from < e.at_ms {
                    rows[i].bars.push(Bar { kind: BarKind::Waiting, from_ms: from, to_ms: e.at_ms });
                }
                *slot = (None, Some(e.at_ms));
            }
            Kind::Released | Kind::Lost => {
                let held_from = e.at_ms - e.hold_us.map_or(0, |h| i64::try_from(h / 1000).unwrap_or(0));
                let from = slot.1.unwrap_or(held_from);
                rows[i].bars.push(Bar { kind: BarKind::Holding, from_ms: from, to_ms: e.at_ms });
                if e.kind == Kind::Lost {
                    rows[i].marks.push(Mark::Lost { at_ms: e.at_ms });
                }
                *slot = (None, None);
            }
            Kind::StoppedMaxHold => rows[i].marks.push(Mark::Stopped { at_ms: e.at_ms }),
            Kind::TimedOut | Kind::Busy | Kind::Deadlock => {
                let waited_from = e.at_ms - e.wait_us.map_or(0, |w| i64::try_from(w / 1000).unwrap_or(0));
                let from = slot.0.map_or(waited_from, |r| r.min(waited_from));
                if from < e.at_ms {
                    rows[i].bars.push(Bar { kind: BarKind::Waiting, from_ms: from, to_ms: e.at_ms });
                }
                rows[i].marks.push(Mark::GaveUp { at_ms: e.at_ms });
                *slot = (None, None);
            }
            Kind::StaleRecovered | Kind::Broken => {}
        }
    }
    // Still waiting or holding.
    for (i, (waiting, held)) in open {
        if let Some(from) = held {
            rows[i].bars.push(Bar { kind: BarKind::Holding, from_ms: from, to_ms: now_ms.max(from) });
        } else if let Some(from) = waiting {
            rows[i].bars.push(Bar { kind: BarKind::Waiting, from_ms: from, to_ms: now_ms.max(from) });
        }
    }
    // Events of no acquisition: on the newest row of their pid, else their own row.
    for e in events.iter().filter(|e| e.session.is_empty() || matches!(e.kind, Kind::StaleRecovered | Kind::Broken)) {
        let mark = match e.kind {
            Kind::StaleRecovered => {
                Mark::StaleRecovered { at_ms: e.at_ms, rule: e.rule.map_or("", |r| r.as_str()).to_owned() }
            }
            Kind::Lost => Mark::Lost { at_ms: e.at_ms },
            Kind::Broken => Mark::Broken { at_ms: e.at_ms },
            Kind::TimedOut | Kind::Busy | Kind::Deadlock => Mark::GaveUp { at_ms: e.at_ms },
            Kind::StoppedMaxHold => Mark::Stopped { at_ms: e.at_ms },
            _ => continue,
        };
        let existing = e.pid.and_then(|p| rows.iter().rposition(|r| r.pid == Some(p)));
        let i = match existing {
            Some(i) => i,
            None => {
                let key = format!("#{}", rows.len());
                let mut by = HashMap::new();
                row_for(&mut rows, e, &mut by, &key)
            }
        };
        rows[i].marks.push(mark);
    }
    let times = rows.iter().flat_map(|r| {
        r.bars.iter().flat_map(|b| [b.from_ms, b.to_ms]).chain(r.marks.iter().map(Mark::at)).collect::<Vec<_>>()
    });
    let (mut start_ms, mut end_ms) = (i64::MAX, i64::MIN);
    for t in times {
        start_ms = start_ms.min(t);
        end_ms = end_ms.max(t);
    }
    if start_ms > end_ms {
        (start_ms, end_ms) = (now_ms, now_ms);
    }
    Timeline { lock: lock.to_owned(), start_ms, end_ms, rows }
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(max - 1).collect();
        out.push('…');
        out
    }
}

/// Layout of [`svg`], public so that tests can find a bar's pixels.
pub mod layout {
    /// Total width of the picture.
    pub const WIDTH: f64 = 1000.0;
    /// Where the time axis starts (labels are to its left).
    pub const PLOT_LEFT: f64 = 340.0;
    pub const PLOT_RIGHT: f64 = 980.0;
    /// Where the first row starts.
    pub const TOP: f64 = 50.0;
    pub const ROW_HEIGHT: f64 = 26.0;
    /// The height of the axis and legend below the rows.
    pub const BOTTOM: f64 = 60.0;
    pub const HOLDING_COLOR: &str = "#2b6cb0";
    pub const WAITING_COLOR: &str = "#ed8936";
    pub const STALE_COLOR: &str = "#9b2c2c";
    pub const LOST_COLOR: &str = "#e53e3e";
    pub const BACKGROUND: &str = "#ffffff";

    /// The x of time `t` (ms) on a timeline from `start` to `end`.
    pub fn x(t: i64, start: i64, end: i64) -> f64 {
        let span = (end - start).max(1) as f64;
        PLOT_LEFT + (t - start) as f64 / span * (PLOT_RIGHT - PLOT_LEFT)
    }

    /// The vertical middle of row `i`.
    pub fn row_middle(i: usize) -> f64 {
        TOP + i as f64 * ROW_HEIGHT + ROW_HEIGHT / 2.0
    }

    /// The picture's height for `rows` rows.
    pub fn height(rows: usize) -> f64 {
        TOP + rows.max(1) as f64 * ROW_HEIGHT + BOTTOM
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A readable tick step (ms) for a span: about 6 ticks.
fn tick_step(span_ms: i64) -> i64 {
    const STEPS: [i64; 22] = [
        1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 15_000, 30_000, 60_000, 120_000, 300_000,
        600_000, 1_800_000, 3_600_000, 21_600_000,
    ];
    STEPS.into_iter().find(|s| span_ms / s <= 8).unwrap_or(86_400_000)
}

/// `ms` as a short duration: `250ms`, `12s`, `3m10s`, `2h05m`.
pub fn human_ms(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        let s = ms as f64 / 1000.0;
        if ms % 1000 == 0 {
            format!("{}s", ms / 1000)
        } else {
            format!("{s:.1}s")
        }
    } else if ms < 3_600_000 {
        let (m, s) = (ms / 60_000, (ms % 60_000) / 1000);
        if s == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{s:02}s")
        }
    } else {
        format!("{}h{:02}m", ms / 3_600_000, (ms % 3_600_000) / 60_000)
    }
}

/// Draws `t` as an SVG document: a title (`title`, e.g. the lock and the start time), one row
/// per holder or waiter with its label (command, pid, host), waiting as a thin orange bar,
/// holding as a full blue bar, stale recoveries (dark red triangle), losses (red cross) and
/// give-ups (a dark tick), a time axis with ticks (time since the start), and a legend.
pub fn svg(t: &Timeline, title: &str) -> String {
    use layout::*;
    let h = height(t.rows.len());
    let x = |ms: i64| layout::x(ms, t.start_ms, t.end_ms);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{h}" viewBox="0 0 {WIDTH} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect x="0" y="0" width="{WIDTH}" height="{h}" fill="{BACKGROUND}"/>"#);
    let _ = writeln!(s, r#"<text x="10" y="22" font-size="14" font-weight="bold">{}</text>"#, xml(title));
    for (i, row) in t.rows.iter().enumerate() {
        let top = TOP + i as f64 * ROW_HEIGHT;
        if i % 2 == 1 {
            let _ = writeln!(s, r##"<rect x="0" y="{top}" width="{WIDTH}" height="{ROW_HEIGHT}" fill="#f7fafc"/>"##);
        }
        let mid = row_middle(i);
        let _ = writeln!(s, r#"<text x="10" y="{}">{}</text>"#, mid + 4.0, xml(&row.label));
        for b in &row.bars {
            let (x0, x1) = (x(b.from_ms), x(b.to_ms));
            let w = (x1 - x0).max(1.0);
            let (color, bh, what) = match b.kind {
                BarKind::Holding => (HOLDING_COLOR, ROW_HEIGHT - 8.0, "holding"),
                BarKind::Waiting => (WAITING_COLOR, ROW_HEIGHT / 3.0, "waiting"),
            };
            let _ = writeln!(
                s,
                r#"<rect x="{x0:.2}" y="{:.2}" width="{w:.2}" height="{bh:.2}" fill="{color}"><title>{what} {}</title></rect>"#,
                mid - bh / 2.0,
                human_ms(b.to_ms - b.from_ms)
            );
        }
        for m in &row.marks {
            let mx = x(m.at());
            match m {
                Mark::StaleRecovered { rule, .. } => {
                    let _ = writeln!(
                        s,
                        r#"<polygon points="{mx:.2},{:.2} {:.2},{:.2} {:.2},{:.2}" fill="{STALE_COLOR}"><title>stale lock recovered ({})</title></polygon>"#,
                        mid - 9.0,
                        mx - 7.0,
                        mid + 7.0,
                        mx + 7.0,
                        mid + 7.0,
                        xml(rule)
                    );
                }
                Mark::Lost { .. } | Mark::Broken { .. } | Mark::Stopped { .. } => {
                    let what = match m {
                        Mark::Lost { .. } => "lost",
                        Mark::Broken { .. } => "broken",
                        _ => "stopped past its max-hold",
                    };
                    let _ = writeln!(
                        s,
                        r#"<path d="M{:.2},{:.2} L{:.2},{:.2} M{:.2},{:.2} L{:.2},{:.2}" stroke="{LOST_COLOR}" stroke-width="3"><title>{what}</title></path>"#,
                        mx - 6.0,
                        mid - 6.0,
                        mx + 6.0,
                        mid + 6.0,
                        mx - 6.0,
                        mid + 6.0,
                        mx + 6.0,
                        mid - 6.0
                    );
                }
                Mark::GaveUp { .. } => {
                    let _ = writeln!(
                        s,
                        r##"<line x1="{mx:.2}" y1="{:.2}" x2="{mx:.2}" y2="{:.2}" stroke="#1a202c" stroke-width="2"><title>gave up waiting</title></line>"##,
                        mid - 8.0,
                        mid + 8.0
                    );
                }
            }
        }
    }
    // The time axis.
    let axis_y = TOP + t.rows.len().max(1) as f64 * ROW_HEIGHT + 6.0;
    let _ = writeln!(
        s,
        r##"<line x1="{PLOT_LEFT}" y1="{axis_y}" x2="{PLOT_RIGHT}" y2="{axis_y}" stroke="#4a5568" stroke-width="1"/>"##
    );
    let span = (t.end_ms - t.start_ms).max(1);
    let step = tick_step(span);
    let mut tick = 0;
    while tick <= span {
        let tx = x(t.start_ms + tick);
        let _ = writeln!(
            s,
            r##"<line x1="{tx:.2}" y1="{axis_y}" x2="{tx:.2}" y2="{:.2}" stroke="#4a5568"/><text x="{tx:.2}" y="{:.2}" text-anchor="middle" fill="#4a5568">+{}</text>"##,
            axis_y + 5.0,
            axis_y + 18.0,
            human_ms(tick)
        );
        tick += step;
    }
    // The legend.
    let ly = axis_y + 36.0;
    let _ = writeln!(
        s,
        r##"<rect x="10" y="{:.2}" width="24" height="12" fill="{HOLDING_COLOR}"/><text x="40" y="{ly}">holding</text><rect x="110" y="{:.2}" width="24" height="6" fill="{WAITING_COLOR}"/><text x="140" y="{ly}">waiting</text><polygon points="217,{:.2} 211,{:.2} 223,{:.2}" fill="{STALE_COLOR}"/><text x="230" y="{ly}">stale lock recovered</text><path d="M371,{:.2} L381,{:.2} M371,{:.2} L381,{:.2}" stroke="{LOST_COLOR}" stroke-width="3"/><text x="388" y="{ly}">lost / broken</text><line x1="485" y1="{:.2}" x2="485" y2="{:.2}" stroke="#1a202c" stroke-width="2"/><text x="492" y="{ly}">gave up waiting</text>"##,
        ly - 10.0,
        ly - 7.0,
        ly - 11.0,
        ly + 1.0,
        ly + 1.0,
        ly - 10.0,
        ly,
        ly,
        ly - 10.0,
        ly - 11.0,
        ly + 1.0
    );
    s.push_str("</svg>\n");
    s
}
