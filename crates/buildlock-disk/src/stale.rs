//! When a lock without an OS lock behind it is stale: the seed's rules, as a pure function.
//!
//! With OS locks the kernel decides and this module is only used to explain what leftover
//! metadata means. For soft locks (existence of the file is the lock) it decides:
//!
//! | metadata                         | verdict                                             |
//! |----------------------------------|-----------------------------------------------------|
//! | this host, pid + start time dead | stale at once                                       |
//! | this host, process alive         | active, however old                                 |
//! | this host, process uncheckable   | active until `stale_after` without a heartbeat      |
//! | another host                     | active until `stale_after` without a heartbeat      |
//! | none (empty lock, no `.lock.pid`) | active until the file is `stale_after` old         |
//!
//! A soft lock file holding anything but recognised metadata, or an empty one whose `.lock.pid`
//! is not metadata, is never judged: the soft backend refuses it as "not a lock file" before
//! asking (so a Makefile named as a lock is never removed, however old).
//! The heartbeat is the lock file's modification time, which a holder refreshes while it holds.

use std::time::Duration;

use buildlock_sys::{ProcessIdentity, ProcessState};

use crate::meta::MetaRead;

/// The default grace period for locks that cannot be checked: the seed's 120 seconds.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(120);

/// Whether a lock may be broken, and the human reason either way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Stale(String),
    Active(String),
}

impl Verdict {
    pub fn is_stale(&self) -> bool {
        matches!(self, Verdict::Stale(_))
    }

    pub fn reason(&self) -> &str {
        match self {
            Verdict::Stale(r) | Verdict::Active(r) => r,
        }
    }
}

/// Judges a lock with no OS lock behind it.
///
/// `age` is the time since the lock file was last modified (its heartbeat); `this_host` is the
/// local host name; `state` asks the OS about a process (injected so tests can drive every row).
pub fn judge(
    meta: &MetaRead,
    age: Duration,
    stale_after: Duration,
    this_host: &str,
    state: impl Fn(&ProcessIdentity) -> ProcessState,
) -> Verdict {
    let old = age >= stale_after;
    let (age_s, limit_s) = (secs(age), secs(stale_after));
    match meta {
        MetaRead::Valid(m) if m.hostname.is_empty() || m.hostname == this_host => match state(&m.process()) {
            ProcessState::Dead => Verdict::Stale(format!("holder pid {} is dead", m.pid)),
            ProcessState::Alive => Verdict::Active(format!("holder pid {} is alive", m.pid)),
            ProcessState::Unknown(why) if old => Verdict::Stale(format!(
                "cannot check holder pid {} ({why}) and it sent no heartbeat for {age_s}, past the {limit_s} limit",
                m.pid
            )),
            ProcessState::Unknown(why) => Verdict::Active(format!(
                "cannot check holder pid {} ({why}); assumed alive until {limit_s} pass without a heartbeat",
                m.pid
            )),
        },
        MetaRead::Valid(m) if old => Verdict::Stale(format!(
            "holder pid {} on host {} sent no heartbeat for {age_s}, past the {limit_s} limit",
            m.pid, m.hostname
        )),
        MetaRead::Valid(m) => Verdict::Active(format!(
            "holder pid {} is on another host ({}); assumed alive until {limit_s} pass without a heartbeat",
            m.pid, m.hostname
        )),
        MetaRead::Missing | MetaRead::Corrupt(_) => {
            let what = match meta {
                MetaRead::Corrupt(why) => format!("unreadable metadata ({why})"),
                _ => "no metadata".to_owned(),
            };
            if old {
                Verdict::Stale(format!("{what} and the lock is {age_s} old, past the {limit_s} limit"))
            } else {
                Verdict::Active(format!("{what}; the lock is {age_s} old, within the {limit_s} grace period"))
            }
        }
    }
}

/// "3s", "2m05s", "1h02m": short human durations for messages.
pub fn secs(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 if d.as_millis() < 10_000 && d.subsec_millis() != 0 => format!("{:.1}s", d.as_secs_f64()),
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::Metadata;

    const LIMIT: Duration = DEFAULT_STALE_AFTER;

    fn meta(host: &str) -> MetaRead {
        MetaRead::Valid(Metadata {
            pid: 4242,
            timestamp: None,
            operation: "build".into(),
            hostname: host.into(),
            start_time: Some(99),
            boot_id: None,
            mode: None,
            command: None,
            lock: Some("soft".into()),
            token: None,
            id: None,
            version: None,
            via_pid: None,
            max_hold_ms: None,
        })
    }

    fn judge_with(m: &MetaRead, age_s: u64, st: ProcessState) -> Verdict {
        judge(m, Duration::from_secs(age_s), LIMIT, "here", |_| st.clone())
    }

    #[test]
    fn seed_case_1_no_metadata_recent_lock_is_active() {
        let v = judge_with(&MetaRead::Missing, 30, ProcessState::Alive);
        assert_eq!(v, Verdict::Active("no metadata; the lock is 30s old, within the 2m00s grace period".into()));
    }

    #[test]
    fn seed_case_2_no_metadata_old_lock_is_stale() {
        assert!(judge_with(&MetaRead::Missing, 180, ProcessState::Alive).is_stale());
        assert!(judge_with(&MetaRead::Corrupt("x".into()), 120, ProcessState::Alive).is_stale());
        assert!(!judge_with(&MetaRead::Corrupt("x".into()), 119, ProcessState::Alive).is_stale());
        // Unreadable metadata is named as such, with why, not as missing.
        let v = judge_with(&MetaRead::Corrupt("not JSON".into()), 180, ProcessState::Alive);
        assert_eq!(v.reason(), "unreadable metadata (not JSON) and the lock is 3m00s old, past the 2m00s limit");
    }

    #[test]
    fn the_reason_is_the_verdicts_text_either_way() {
        assert_eq!(Verdict::Stale("gone".into()).reason(), "gone");
        assert_eq!(Verdict::Active("alive".into()).reason(), "alive");
        let v = judge_with(&meta("here"), 0, ProcessState::Alive);
        assert_eq!(v.reason(), "holder pid 4242 is alive");
    }

    #[test]
    fn seed_case_3_dead_pid_is_stale_at_once() {
        assert_eq!(judge_with(&meta("here"), 0, ProcessState::Dead), Verdict::Stale("holder pid 4242 is dead".into()));
    }

    #[test]
    fn seed_case_4_live_pid_is_active_however_old() {
        assert!(!judge_with(&meta("here"), 100_000, ProcessState::Alive).is_stale());
    }

    #[test]
    fn seed_case_5_uncheckable_pid_is_active_until_heartbeat_expires() {
        let denied = ProcessState::Unknown("permission denied".into());
        assert!(!judge_with(&meta("here"), 10, denied.clone()).is_stale());
        assert!(judge_with(&meta("here"), 121, denied).is_stale());
        // Another host: never asks the local OS about its pid.
        let v = judge(&meta("elsewhere"), Duration::from_secs(10), LIMIT, "here", |_| panic!("asked the OS"));
        assert!(!v.is_stale(), "{v:?}");
        assert!(judge(&meta("elsewhere"), LIMIT, LIMIT, "here", |_| ProcessState::Dead).is_stale());
    }

    #[test]
    fn human_durations() {
        assert_eq!(secs(Duration::from_millis(1500)), "1.5s");
        // Tenths only below 10 s, and only when there are some.
        assert_eq!(secs(Duration::from_secs(3)), "3s");
        assert_eq!(secs(Duration::from_millis(9_900)), "9.9s");
        assert_eq!(secs(Duration::from_millis(12_500)), "12s");
        assert_eq!(secs(Duration::from_secs(42)), "42s");
        assert_eq!(secs(Duration::from_secs(125)), "2m05s");
        assert_eq!(secs(Duration::from_secs(3720)), "1h02m");
    }
}
