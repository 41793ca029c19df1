//! `stats` and `history`: what the lock history says, for people, scripts (`--json`),
//! Prometheus (`--prometheus`) and as an SVG timeline (`history --svg FILE`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use buildlock_history::{human_ms, Event, Kind, LockStats, Percentiles};
use serde_json::json;

use crate::{fail, Context};

/// How many commands `stats` lists as the longest holders.
const TOP_HOLDERS: usize = 5;

/// A `--since` value: how far back to look (`None`: all of it).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Since(pub(crate) Option<Duration>);

/// A `--since` value: `90s`, `30m`, `24h`, `7d`, `2w`, or `all`.
pub(crate) fn parse_since(s: &str) -> Result<Since, String> {
    let s = s.trim();
    if s == "all" {
        return Ok(Since(None));
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("{s:?} is not a time span such as 90s, 30m, 24h, 7d or all"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" | "" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use s, m, h, d or w (e.g. 24h), or all")),
    };
    Ok(Since(Some(Duration::from_secs(n.saturating_mul(secs)))))
}

fn since_ms(since: Option<Duration>) -> i64 {
    since.map_or(0, |d| buildlock_history::now_ms() - i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2))
}

fn window(since: Option<Duration>) -> String {
    since.map_or_else(|| "all of the history".into(), |d| format!("the last {}", human_ms(d.as_millis() as i64)))
}

/// The events of `target` (every lock if `None`) since `since`, or the reason there are none.
fn load(cx: &Context, target: Option<&str>, since: Option<Duration>) -> Result<(Option<String>, Vec<Event>), String> {
    let key = match target {
        Some(t) => Some(buildlock::history::lock_key(&cx.target(t).map_err(|e| e.to_string())?)),
        None => None,
    };
    let store = match buildlock_history::open_for_reading(buildlock_history::READ_BUSY_TIMEOUT) {
        Ok(s) => s,
        Err(buildlock_history::Error::Off) => {
            return Err("lock history is off (BUILDLOCK_HISTORY=0): nothing was recorded".into())
        }
        // Nothing recorded yet: an empty history, not an error.
        Err(e) if !history_exists() => {
            tracing::debug!("{e}");
            return Ok((key, Vec::new()));
        }
        Err(e) => return Err(format!("{e}; move the file aside to start a new history")),
    };
    let events = store.events(key.as_deref(), since_ms(since)).map_err(|e| e.to_string())?;
    Ok((key, events))
}

fn history_exists() -> bool {
    matches!(buildlock_history::Setting::from_env(), buildlock_history::Setting::At(p) if p.exists())
}

fn local_time(ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(t) => t
            .to_zoned_datetime(buildlock_disk::meta::local_tz())
            .datetime()
            .strftime("%Y-%m-%d %H:%M:%S%.3f")
            .to_string(),
        Err(_) => ms.to_string(),
    }
}

fn us(v: u64) -> String {
    if v < 1000 {
        format!("{v}µs")
    } else {
        human_ms((v / 1000) as i64)
    }
}

fn percentiles(p: &Option<Percentiles>) -> String {
    match p {
        Some(p) => format!("p50 {}  p95 {}  max {}", us(p.p50_us), us(p.p95_us), us(p.max_us)),
        None => "-".into(),
    }
}

pub(crate) fn stats(cx: &Context, target: Option<&str>, since: Option<Duration>, prometheus: bool) -> ExitCode {
    let (_, events) = match load(cx, target, since) {
        Ok(x) => x,
        Err(e) => return fail(&e),
    };
    let stats = buildlock_history::stats(&events, TOP_HOLDERS);
    if prometheus {
        print!("{}", buildlock_history::prometheus(&stats));
    } else if cx.json {
        let since_ms = since.map(|_| since_ms(since));
        println!("{}", json!({ "since_unix_ms": since_ms, "locks": stats }));
    } else if stats.is_empty() {
        println!("no lock events in {}", window(since));
    } else {
        for s in &stats {
            print_stats(s, since);
        }
    }
    ExitCode::SUCCESS
}

fn print_stats(s: &LockStats, since: Option<Duration>) {
    println!("{} ({}):", s.lock, window(since));
    println!(
        "  acquisitions: {}, {:.0}% had to wait ({} waited 10ms or more)",
        s.acquisitions,
        s.waited_share * 100.0,
        s.waited
    );
    println!("  wait: {}", percentiles(&s.wait));
    println!("  hold: {}", percentiles(&s.hold));
    println!("  timeouts: {}, busy refusals: {}, lost: {}, broken: {}", s.timeouts, s.busy, s.lost, s.broken);
    println!("  deadlocks refused: {}, stopped past max-hold: {}", s.deadlocks, s.stopped);
    if !s.stale_recoveries.is_empty() {
        let by: Vec<String> = s.stale_recoveries.iter().map(|(r, n)| format!("{r} {n}")).collect();
        println!("  stale recoveries: {}", by.join(", "));
    }
    if !s.top_holders.is_empty() {
        println!("  held longest by:");
        for h in &s.top_holders {
            let cmd = if h.command.is_empty() { "(unknown command)" } else { &h.command };
            println!("    {} in {} holds: {cmd}", us(h.total_hold_us), h.holds);
        }
    }
}

pub(crate) fn history(cx: &Context, target: &str, since: Option<Duration>, svg: Option<PathBuf>) -> ExitCode {
    let (key, events) = match load(cx, Some(target), since) {
        Ok(x) => x,
        Err(e) => return fail(&e),
    };
    let key = key.unwrap_or_default();
    if let Some(file) = svg {
        let t = buildlock_history::timeline(&key, &events, buildlock_history::now_ms());
        let title = format!("{key}: {} to {}", local_time(t.start_ms), local_time(t.end_ms));
        if let Err(e) = std::fs::write(&file, buildlock_history::svg(&t, &title)) {
            return fail(&format!("cannot write the timeline to {}: {e}", file.display()));
        }
        println!("wrote a timeline of {} events ({} rows) to {}", events.len(), t.rows.len(), file.display());
    } else if cx.json {
        println!("{}", serde_json::to_string(&events).unwrap_or_default());
    } else if events.is_empty() {
        println!("no events for {key} in {}", window(since));
    } else {
        for e in &events {
            println!("{}", line(e));
        }
    }
    ExitCode::SUCCESS
}

/// One event, on one line.
fn line(e: &Event) -> String {
    let mut out = format!("{}  {:<15}", local_time(e.at_ms), e.kind.as_str());
    if let Some(pid) = e.pid {
        out.push_str(&format!(" pid {pid}"));
    }
    if !e.host.is_empty() {
        out.push_str(&format!(" @{}", e.host));
    }
    if !e.mode.is_empty() {
        out.push_str(&format!(" {}", e.mode));
    }
    match e.kind {
        Kind::Granted | Kind::TimedOut | Kind::Busy => {
            if let Some(w) = e.wait_us {
                out.push_str(&format!(" waited {}", us(w)));
            }
        }
        Kind::Released | Kind::Lost => {
            if let Some(h) = e.hold_us {
                out.push_str(&format!(" held {}", us(h)));
            }
        }
        _ => {}
    }
    if let Some(r) = e.rule {
        out.push_str(&format!(" rule {}", r.as_str()));
    }
    let what = if e.command.is_empty() { &e.operation } else { &e.command };
    if !what.is_empty() {
        out.push_str(&format!("  {what}"));
    }
    if !e.detail.is_empty() {
        out.push_str(&format!("  ({})", e.detail));
    }
    out
}

/// What a waiter is told beyond who holds the lock: its place in the daemon's queue, and how
/// long the holder's command usually holds this lock (from the history).
pub(crate) struct WaitExtras {
    /// The holder's command and its usual hold, looked up once per holder.
    usual: Option<(String, Option<Duration>)>,
}

impl WaitExtras {
    pub(crate) fn new() -> WaitExtras {
        WaitExtras { usual: None }
    }

    pub(crate) fn describe(&mut self, target: &buildlock_disk::LockTarget, w: &buildlock::WaitInfo) -> String {
        let mut out = String::new();
        match w.position {
            Some(1) => out.push_str("; next in line"),
            Some(n) => out.push_str(&format!("; {} waiting ahead of us", n - 1)),
            None => {}
        }
        if let Some(cmd) = &w.holder_command {
            if self.usual.as_ref().is_none_or(|(c, _)| c != cmd) {
                self.usual = Some((cmd.clone(), buildlock::history::usual_hold(target, cmd)));
            }
        }
        if let Some((_, Some(d))) = &self.usual {
            out.push_str(&format!("; it usually holds it {}", human_ms(d.as_millis() as i64)));
        }
        out
    }
}

/// `status`: how long a holder has held the lock, from when it took it.
pub(crate) fn held_for(since_ms: i64) -> String {
    human_ms(buildlock_history::now_ms() - since_ms)
}
