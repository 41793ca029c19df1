//! Recording direct-mode lock events in the lock history (`buildlock-history`), after the
//! lock is released, never while it is being taken or held.
//!
//! Through the daemon, the daemon records; here only what the on-disk protocol did in this
//! process: the request, grant (with its wait), release (with its hold) or loss, a busy refusal
//! or timeout, and stale locks the engine recovered meanwhile (kept in memory until then).

use std::time::{Duration, Instant};

use buildlock_disk::recovery::{Recovery, StaleRule};
use buildlock_disk::{LockMode, LockTarget};
use buildlock_history::{Event, Kind};

/// An acquisition in progress or held, remembered until it ends.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    lock: String,
    mode: &'static str,
    session: String,
    command: String,
    operation: String,
    requested_ms: i64,
    requested: Instant,
    /// When the lock was granted, and after how long a wait.
    granted: Option<(i64, Instant, Duration)>,
}

fn mode_str(m: LockMode) -> &'static str {
    match m {
        LockMode::Shared => "shared",
        LockMode::Exclusive => "exclusive",
    }
}

/// The name the history knows `target` by: the canonical path the daemon uses too.
pub fn lock_key(target: &LockTarget) -> String {
    crate::daemon_key(target).unwrap_or_else(|| target.path.clone()).display().to_string()
}

impl Pending {
    /// Starts remembering an acquisition (nothing is written).
    pub(crate) fn start(target: &LockTarget, opts: &crate::Options) -> Pending {
        install_hook();
        let requested_ms = buildlock_history::now_ms();
        Pending {
            lock: lock_key(target),
            mode: mode_str(opts.mode),
            session: format!("{}:{requested_ms}", buildlock_sys::current_pid()),
            command: opts.command.clone().unwrap_or_default(),
            operation: opts.operation.clone(),
            requested_ms,
            requested: Instant::now(),
            granted: None,
        }
    }

    pub(crate) fn granted(&mut self) {
        let now = Instant::now();
        self.granted = Some((buildlock_history::now_ms(), now, now - self.requested));
    }

    fn event(&self, kind: Kind, at_ms: i64) -> Event {
        let mut e = Event::new(self.lock.clone(), kind);
        e.at_ms = at_ms;
        e.mode = self.mode.into();
        e.session = self.session.clone();
        e.pid = Some(buildlock_sys::current_pid());
        e.command = self.command.clone();
        e.operation = self.operation.clone();
        e.host = buildlock_sys::hostname();
        e
    }

    /// The moment the hold ends, taken just before the release (so that the release is
    /// recorded no later than the next holder's grant).
    pub(crate) fn ending() -> (i64, Instant) {
        (buildlock_history::now_ms(), Instant::now())
    }

    /// The request and its grant, and the release at `ended` (or the loss, with `lost` the
    /// reason). Call after the lock is released.
    pub(crate) fn released(self, ended: (i64, Instant), lost: Option<String>) {
        if !buildlock_history::enabled() {
            return;
        }
        let mut events = Vec::new();
        if let Some((at_ms, at, wait)) = self.granted {
            // A request granted at once is told by its grant alone (its wait is there).
            if buildlock_history::micros(wait) >= buildlock_history::WAITED_AT_LEAST_US {
                events.push(self.event(Kind::Requested, self.requested_ms));
            }
            let mut g = self.event(Kind::Granted, at_ms);
            g.wait_us = Some(buildlock_history::micros(wait));
            events.push(g);
            let mut r = self.event(if lost.is_some() { Kind::Lost } else { Kind::Released }, ended.0);
            r.hold_us = Some(buildlock_history::micros(ended.1.saturating_duration_since(at)));
            r.detail = lost.unwrap_or_default();
            events.push(r);
        }
        buildlock_history::record_direct(events);
    }

    /// The request, refused at once because waiting would never end (`detail` says why).
    pub(crate) fn deadlock(self, detail: &str) {
        if !buildlock_history::enabled() {
            return;
        }
        let mut e = self.event(Kind::Deadlock, buildlock_history::now_ms());
        e.detail = detail.to_owned();
        buildlock_history::record_direct(vec![e]);
    }

    /// The request, refused (`timed_out`: after waiting; else busy at once).
    pub(crate) fn refused(self, timed_out: bool) {
        if !buildlock_history::enabled() {
            return;
        }
        let mut e = self.event(if timed_out { Kind::TimedOut } else { Kind::Busy }, buildlock_history::now_ms());
        e.wait_us = Some(buildlock_history::micros(self.requested.elapsed()));
        buildlock_history::record_direct(vec![self.event(Kind::Requested, self.requested_ms), e]);
    }
}

/// Stale locks the engine recovers in this process go to the history, written with the next
/// direct-mode write (after the lock is released).
pub fn install_hook() {
    buildlock_disk::recovery::on_recovery(defer_recovery);
}

fn defer_recovery(r: Recovery) {
    buildlock_history::defer(recovery_event(&r));
}

/// The history event for a recovered stale lock: the holder that left it, and the rule.
pub fn recovery_event(r: &Recovery) -> Event {
    // Mostly remembered already (the acquisition resolved it): no system call on the way to the
    // grant that recovered the lock.
    let lock = crate::canonical_lock_path(&r.path);
    let mut e = Event::new(lock.display().to_string(), Kind::StaleRecovered);
    e.rule = Some(match r.rule {
        StaleRule::DeadPid => buildlock_history::StaleRule::DeadPid,
        StaleRule::NoMetadataOld => buildlock_history::StaleRule::NoMetadataOld,
        StaleRule::StoppedHeartbeat => buildlock_history::StaleRule::StoppedHeartbeat,
    });
    if let Some(m) = &r.holder {
        e.pid = Some(m.pid);
        e.command = m.command.clone().unwrap_or_default();
        e.operation = m.operation.clone();
        e.host = m.hostname.clone();
        e.mode = m.mode.map(mode_str).unwrap_or_default().into();
    }
    e.detail = format!("{}; recovered by pid {}", r.reason, buildlock_sys::current_pid());
    e
}

/// Records that `target` was broken by `break` (after the fact).
pub fn broken(target: &LockTarget, reason: &str) {
    if !buildlock_history::enabled() {
        return;
    }
    let mut e = Event::new(lock_key(target), Kind::Broken);
    e.pid = Some(buildlock_sys::current_pid());
    e.host = buildlock_sys::hostname();
    e.command = "buildlock-client break".into();
    e.detail = reason.to_owned();
    buildlock_history::record_direct(vec![e]);
}

/// Records that the holder of `target`, process `pid` running `command`, is being stopped for
/// holding past its max-hold (`detail` says how long).
pub fn stopped(target: &LockTarget, pid: u32, command: &str, detail: &str) {
    if !buildlock_history::enabled() {
        return;
    }
    let mut e = Event::new(lock_key(target), Kind::StoppedMaxHold);
    e.pid = Some(pid);
    e.host = buildlock_sys::hostname();
    e.command = command.to_owned();
    e.detail = detail.to_owned();
    buildlock_history::record_direct(vec![e]);
}

/// Writes what was deferred (stale recoveries seen by `status` or `break`), if anything.
pub fn flush() {
    buildlock_history::record_direct(Vec::new());
}

/// How long the holder's command usually holds `target`: the median of its past holds, when
/// the history has at least a few. Read-only, bounded by a short busy timeout.
pub fn usual_hold(target: &LockTarget, command: &str) -> Option<Duration> {
    if command.is_empty() {
        return None;
    }
    let store = buildlock_history::open_for_reading(buildlock_history::DIRECT_BUSY_TIMEOUT).ok()?;
    let holds = store.holds_by(&lock_key(target), command, 50).ok()?;
    buildlock_history::usual_hold(&holds).map(Duration::from_micros)
}
