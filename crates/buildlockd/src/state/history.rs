//! The daemon's lock events, handed to the lock history's writer thread
//! (`buildlock_history::background`). Every function here only builds an event and queues it
//! on a channel that never blocks: nothing waits for the database on the grant path.

use std::sync::OnceLock;
use std::time::Instant;

use buildlock_disk::{LockTarget, Metadata};
use buildlock_history::{Event, Kind};
use buildlock_proto::Mode;

use super::{Lease, Phase};

/// Starts the writer thread (if history is on) and sends stale recoveries to it.
pub(crate) fn start() {
    let _ = started();
    buildlock_disk::recovery::on_recovery(recovered);
    let _ = buildlock_history::background();
}

/// Writes what is queued before the daemon exits (at most a second).
pub(crate) fn flush() {
    buildlock_history::background().flush(std::time::Duration::from_secs(1));
}

fn started() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn record(e: Event) {
    buildlock_history::background().record(e);
}

/// A stale lock the engine recovered while taking a lock for a client.
fn recovered(r: buildlock_disk::recovery::Recovery) {
    use buildlock_disk::recovery::StaleRule as R;
    use buildlock_history::StaleRule;
    let mut e = Event::new(r.path.display().to_string(), Kind::StaleRecovered);
    e.rule = Some(match r.rule {
        R::DeadPid => StaleRule::DeadPid,
        R::NoMetadataOld => StaleRule::NoMetadataOld,
        R::StoppedHeartbeat => StaleRule::StoppedHeartbeat,
    });
    if let Some(m) = &r.holder {
        e.pid = Some(m.pid);
        e.command = m.command.clone().unwrap_or_default();
        e.operation = m.operation.clone();
        e.host = m.hostname.clone();
    }
    e.detail = format!("{}; recovered by buildlockd", r.reason);
    record(e);
}

fn mode_str(m: Mode) -> &'static str {
    match m {
        Mode::Shared => "shared",
        Mode::Exclusive => "exclusive",
    }
}

impl Lease {
    /// An event of `kind` for this lease, now.
    fn event(&self, kind: Kind) -> Event {
        let mut e = Event::new(self.target.path.display().to_string(), kind);
        e.mode = mode_str(self.mode).into();
        // Unique per lease: the connection and the moment it asked.
        let asked = self.requested.saturating_duration_since(started()).as_nanos();
        e.session = format!("d{}:{}:{asked}", buildlock_sys::current_pid(), self.owner);
        e.pid = Some(self.holder_pid);
        e.command = self.command.clone();
        e.operation = self.operation.clone();
        e.host = buildlock_sys::hostname();
        e
    }

    /// Records `kind` for this lease: the wait so far for a grant, timeout or refusal, the
    /// hold (since the metadata's time) for a release.
    pub(super) fn record(&self, kind: Kind) {
        let mut e = self.event(kind);
        match kind {
            Kind::Granted | Kind::TimedOut | Kind::Busy => {
                e.wait_us = Some(buildlock_history::micros(self.requested.elapsed()));
            }
            Kind::Released | Kind::Lost => {
                if let Phase::Held { hold, .. } = &self.phase {
                    let since = hold.metadata().timestamp.map_or(i64::MAX, |t| t.as_microsecond());
                    let now = jiff::Timestamp::now().as_microsecond();
                    e.hold_us = Some(u64::try_from(now - since).unwrap_or(0));
                }
            }
            _ => {}
        }
        record(e);
    }
}

/// A request refused at once as a deadlock (it never became a lease).
pub(super) fn deadlock(path: &std::path::Path, mode: Mode, pid: u32, command: &str, operation: &str, detail: &str) {
    let mut e = Event::new(path.display().to_string(), Kind::Deadlock);
    e.mode = mode_str(mode).into();
    e.pid = Some(pid);
    e.command = command.to_owned();
    e.operation = operation.to_owned();
    e.host = buildlock_sys::hostname();
    e.detail = detail.to_owned();
    record(e);
}

/// A bound lease found lost when a new daemon started (`Daemon::recover`).
pub(super) fn lost(target: &LockTarget, meta: &Metadata, reason: &str) {
    let mut e = Event::new(target.path.display().to_string(), Kind::Lost);
    e.pid = Some(meta.pid);
    e.command = meta.command.clone().unwrap_or_default();
    e.operation = meta.operation.clone();
    e.host = meta.hostname.clone();
    e.detail = reason.to_owned();
    record(e);
}
