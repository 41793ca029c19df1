//! Figures from events: per-lock statistics, the Prometheus text format, a holder's usual hold.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use serde::Serialize;

use crate::{Event, Kind, StaleRule, WAITED_AT_LEAST_US};

/// The 50th and 95th percentiles and the maximum of some durations (µs), nearest-rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    pub p50_us: u64,
    pub p95_us: u64,
    pub max_us: u64,
    pub count: u64,
    pub sum_us: u64,
}

impl Percentiles {
    /// `None` for no values.
    pub fn of(values: &[u64]) -> Option<Percentiles> {
        let mut v = values.to_vec();
        v.sort_unstable();
        let max_us = *v.last()?;
        let sum_us = v.iter().fold(0u64, |a, b| a.saturating_add(*b));
        Some(Percentiles {
            p50_us: nearest_rank(&v, 50),
            p95_us: nearest_rank(&v, 95),
            max_us,
            count: v.len() as u64,
            sum_us,
        })
    }
}

/// The `pct`th percentile of sorted, non-empty `v` by the nearest-rank method: the smallest
/// value with at least `pct`% of the values at or below it.
fn nearest_rank(v: &[u64], pct: usize) -> u64 {
    let rank = (pct * v.len()).div_ceil(100).max(1);
    v[rank - 1]
}

/// What happened to one lock in a window of time.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LockStats {
    pub lock: String,
    /// Grants.
    pub acquisitions: u64,
    /// Grants that waited at least [`WAITED_AT_LEAST_US`].
    pub waited: u64,
    /// `waited / acquisitions` (0 with no acquisitions).
    pub waited_share: f64,
    pub wait: Option<Percentiles>,
    pub hold: Option<Percentiles>,
    pub timeouts: u64,
    pub busy: u64,
    pub lost: u64,
    pub broken: u64,
    /// Requests refused as deadlocks.
    pub deadlocks: u64,
    /// Holders stopped for holding past their max-hold.
    pub stopped: u64,
    /// Stale recoveries by rule (`dead_pid`, `no_metadata_old`, `stopped_heartbeat`).
    pub stale_recoveries: BTreeMap<&'static str, u64>,
    /// The commands that held the lock longest in total, longest first.
    pub top_holders: Vec<TopHolder>,
}

/// A command's total time holding a lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TopHolder {
    pub command: String,
    pub total_hold_us: u64,
    pub holds: u64,
}

/// Per-lock figures from `events` (any order), sorted by lock; `top` commands each.
pub fn stats(events: &[Event], top: usize) -> Vec<LockStats> {
    let mut by_lock: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in events {
        by_lock.entry(&e.lock).or_default().push(e);
    }
    by_lock.into_iter().map(|(lock, evs)| lock_stats(lock, &evs, top)).collect()
}

fn lock_stats(lock: &str, events: &[&Event], top: usize) -> LockStats {
    let count = |k: Kind| events.iter().filter(|e| e.kind == k).count() as u64;
    let waits: Vec<u64> = events.iter().filter(|e| e.kind == Kind::Granted).map(|e| e.wait_us.unwrap_or(0)).collect();
    let holds: Vec<u64> = events.iter().filter(|e| e.kind == Kind::Released).filter_map(|e| e.hold_us).collect();
    let acquisitions = waits.len() as u64;
    let waited = waits.iter().filter(|&&w| w >= WAITED_AT_LEAST_US).count() as u64;
    let mut stale_recoveries = BTreeMap::new();
    for rule in StaleRule::ALL {
        let n = events.iter().filter(|e| e.kind == Kind::StaleRecovered && e.rule == Some(rule)).count() as u64;
        if n > 0 {
            stale_recoveries.insert(rule.as_str(), n);
        }
    }
    let mut totals: HashMap<&str, (u64, u64)> = HashMap::new();
    for e in events.iter().filter(|e| e.kind == Kind::Released) {
        let t = totals.entry(&e.command).or_default();
        t.0 = t.0.saturating_add(e.hold_us.unwrap_or(0));
        t.1 += 1;
    }
    let mut top_holders: Vec<TopHolder> = totals
        .into_iter()
        .map(|(c, (total, n))| TopHolder { command: c.to_owned(), total_hold_us: total, holds: n })
        .collect();
    top_holders.sort_by(|a, b| b.total_hold_us.cmp(&a.total_hold_us).then_with(|| a.command.cmp(&b.command)));
    top_holders.truncate(top);
    LockStats {
        lock: lock.to_owned(),
        acquisitions,
        waited,
        waited_share: if acquisitions == 0 { 0.0 } else { waited as f64 / acquisitions as f64 },
        wait: Percentiles::of(&waits),
        hold: Percentiles::of(&holds),
        timeouts: count(Kind::TimedOut),
        busy: count(Kind::Busy),
        lost: count(Kind::Lost),
        broken: count(Kind::Broken),
        deadlocks: count(Kind::Deadlock),
        stopped: count(Kind::StoppedMaxHold),
        stale_recoveries,
        top_holders,
    }
}

/// At least this many past holds before [`usual_hold`] says anything.
pub const USUAL_MIN_HOLDS: usize = 3;

/// The median of `holds` (µs), if there are at least [`USUAL_MIN_HOLDS`] of them.
pub fn usual_hold(holds: &[u64]) -> Option<u64> {
    if holds.len() < USUAL_MIN_HOLDS {
        return None;
    }
    Percentiles::of(holds).map(|p| p.p50_us)
}

/// A label value in the Prometheus text format: `\`, `"` and newlines escaped.
fn label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn secs(us: u64) -> String {
    format!("{}", us as f64 / 1e6)
}

/// `stats` in the Prometheus text exposition format (for node_exporter's textfile collector):
/// every metric with its `# HELP` and `# TYPE` lines, labels escaped, the figures of the
/// window the stats cover (so gauges, and summaries for waits and holds).
pub fn prometheus(stats: &[LockStats]) -> String {
    let mut out = String::new();
    let gauge = |out: &mut String, name: &str, help: &str, f: &dyn Fn(&LockStats) -> Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP buildlock_{name} {help}");
        let _ = writeln!(out, "# TYPE buildlock_{name} gauge");
        for s in stats {
            for (extra, v) in f(s) {
                let _ = writeln!(out, "buildlock_{name}{{lock=\"{}\"{extra}}} {v}", label(&s.lock));
            }
        }
    };
    gauge(&mut out, "acquisitions", "Locks granted in the window.", &|s| vec![(String::new(), s.acquisitions as f64)]);
    gauge(&mut out, "waited_acquisitions", "Grants that had to wait (10 ms or more) in the window.", &|s| {
        vec![(String::new(), s.waited as f64)]
    });
    gauge(&mut out, "timeouts", "Waits that ran out in the window.", &|s| vec![(String::new(), s.timeouts as f64)]);
    gauge(&mut out, "busy_refusals", "Requests refused at once (busy) in the window.", &|s| {
        vec![(String::new(), s.busy as f64)]
    });
    gauge(&mut out, "lost", "Locks lost while held in the window.", &|s| vec![(String::new(), s.lost as f64)]);
    gauge(&mut out, "deadlocks", "Requests refused because waiting would have deadlocked, in the window.", &|s| {
        vec![(String::new(), s.deadlocks as f64)]
    });
    gauge(&mut out, "max_hold_stops", "Holders stopped for holding past their max-hold, in the window.", &|s| {
        vec![(String::new(), s.stopped as f64)]
    });
    gauge(&mut out, "breaks", "Locks broken by `buildlock-client break` in the window.", &|s| {
        vec![(String::new(), s.broken as f64)]
    });
    gauge(
        &mut out,
        "stale_recoveries",
        "Stale locks recovered in the window, by the rule that found them stale.",
        &|s| {
            StaleRule::ALL
                .iter()
                .map(|r| {
                    (format!(",rule=\"{}\"", r.as_str()), *s.stale_recoveries.get(r.as_str()).unwrap_or(&0) as f64)
                })
                .collect()
        },
    );
    for (name, help, pick) in [
        ("wait_seconds", "Time from request to grant in the window.", (|s: &LockStats| s.wait) as fn(&LockStats) -> _),
        ("hold_seconds", "Time from grant to release in the window.", |s: &LockStats| s.hold),
    ] {
        let _ = writeln!(out, "# HELP buildlock_{name} {help}");
        let _ = writeln!(out, "# TYPE buildlock_{name} summary");
        for s in stats {
            let Some(p) = pick(s) else { continue };
            let l = label(&s.lock);
            for (q, v) in [("0.5", p.p50_us), ("0.95", p.p95_us), ("1", p.max_us)] {
                let _ = writeln!(out, "buildlock_{name}{{lock=\"{l}\",quantile=\"{q}\"}} {}", secs(v));
            }
            let _ = writeln!(out, "buildlock_{name}_sum{{lock=\"{l}\"}} {}", secs(p.sum_us));
            let _ = writeln!(out, "buildlock_{name}_count{{lock=\"{l}\"}} {}", p.count);
        }
    }
    out
}
