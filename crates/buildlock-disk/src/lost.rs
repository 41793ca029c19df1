//! `X.lock.lost`: the record of a lease that was lost while the process it was bound to lived.
//!
//! A lease bound to a process (`acquire --pid`) is held by its keeper and the daemon. If both
//! die, no process holds the lock while the script goes on: a daemon started later re-takes it
//! from its journal, unless another process took the lock meanwhile. Either way the script's
//! exclusion was broken or at risk, and nobody may learn it silently: the daemon writes this file,
//! `status` shows it, every acquirer of the lock is warned while the script lives, and the
//! script's own `release` reports it and fails.
//!
//! The file is JSON (`pid`, `start_time`, `command`, `operation`, `at`, `reason`), created by
//! rename and read without following links or blocking, like every file beside a lock.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde_json::{json, Value};

use crate::{meta, LockTarget};

/// What was lost, whose, when and why.
#[derive(Clone, Debug, PartialEq)]
pub struct LostLease {
    /// The process the lease was bound to (the script).
    pub pid: u32,
    pub start_time: Option<u64>,
    pub command: Option<String>,
    pub operation: String,
    /// The lost lease's fencing token, when its metadata had one: which of the script's leases
    /// it was (a keeper that gave a lease up before the script was told it held it knows its
    /// token, and clears such a record, [`remove_if_token`]).
    pub token: Option<u64>,
    /// When the loss was found.
    pub at: Timestamp,
    /// What happened, in a sentence.
    pub reason: String,
}

impl LostLease {
    /// The loss, found now, of the lease whose holder `meta` names.
    pub fn of(meta: &crate::Metadata, reason: String) -> LostLease {
        LostLease {
            pid: meta.pid,
            start_time: meta.start_time,
            command: meta.command.clone(),
            operation: meta.operation.clone(),
            token: meta.token,
            at: Timestamp::now(),
            reason,
        }
    }

    /// Whether the process the lease was bound to still runs (so its script may still rely on
    /// the lock); an unreadable state counts as running.
    pub fn owner_alive(&self) -> bool {
        let id = buildlock_sys::ProcessIdentity { pid: self.pid, start_time: self.start_time, boot_id: None };
        buildlock_sys::process_state(&id) != buildlock_sys::ProcessState::Dead
    }
}

impl std::fmt::Display for LostLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the lease of pid {}", self.pid)?;
        if let Some(cmd) = &self.command {
            write!(f, " ({})", crate::shorten(cmd, 60))?;
        }
        if !self.operation.is_empty() {
            write!(f, ", operation '{}'", crate::shorten(&self.operation, 60))?;
        }
        write!(f, " was lost at {}: {}", crate::describe_time(self.at), self.reason)
    }
}

/// The record's path: the lock file's plus `.lost`.
pub fn lost_path(target: &LockTarget) -> PathBuf {
    let mut p = target.path.clone().into_os_string();
    p.push(".lost");
    PathBuf::from(p)
}

/// Records `lost` for `target`, replacing any earlier record.
pub fn record(target: &LockTarget, lost: &LostLease) -> std::io::Result<()> {
    let v = json!({
        "pid": lost.pid,
        "start_time": lost.start_time,
        "command": lost.command,
        "operation": lost.operation,
        "token": lost.token,
        "at": lost.at.to_string(),
        "reason": lost.reason,
    });
    buildlock_sys::fs::replace_file(&lost_path(target), v.to_string().as_bytes())
}

/// The record for `target`, if there is a readable one.
pub fn read(target: &LockTarget) -> Option<LostLease> {
    use std::io::Read;
    let file = buildlock_sys::fs::open_regular_nonblocking(&lost_path(target), meta::MAX_METADATA_BYTES).ok()?;
    let mut text = String::new();
    (&file).read_to_string(&mut text).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    Some(LostLease {
        pid: v.get("pid")?.as_u64().and_then(|p| u32::try_from(p).ok())?,
        start_time: v.get("start_time").and_then(Value::as_u64),
        command: v.get("command").and_then(Value::as_str).map(str::to_owned),
        operation: v.get("operation").and_then(Value::as_str).unwrap_or_default().to_owned(),
        token: v.get("token").and_then(Value::as_u64),
        at: v.get("at").and_then(Value::as_str).and_then(|s| s.parse().ok())?,
        reason: v.get("reason").and_then(Value::as_str).unwrap_or_default().to_owned(),
    })
}

/// Removes the record if it is one (never another kind of file planted at its path).
pub fn remove(target: &LockTarget) {
    if read(target).is_some() {
        let _ = std::fs::remove_file(lost_path(target));
    }
}

/// Removes the record if it is of a lease of process `pid` whose token is one of `tokens`;
/// whether it did. For a keeper that gave those leases up before its script was told it held
/// the lock (their daemon died before confirming the binding): a daemon started later may have
/// found such a lease in its journal and recorded it lost, though the script never relied on it.
pub fn remove_if_token(target: &LockTarget, pid: u32, tokens: &[u64]) -> bool {
    match read(target) {
        Some(l) if l.pid == pid && l.token.is_some_and(|t| tokens.contains(&t)) => {
            let _ = std::fs::remove_file(lost_path(target));
            true
        }
        _ => false,
    }
}

/// For a new holder of `target`: warns of a lost lease whose script may still run; a record
/// whose script has ended has been seen enough and is removed.
///
/// A process looks for the record at most once a second per lock ([`CHECK_EVERY`]): a build
/// tool that takes one lock thousands of times a second is warned once a second, and its
/// acquisitions in between cost no look-up of a file that is almost never there.
pub fn warn_new_holder(target: &LockTarget) {
    if due(&target.path) {
        warn_and_tidy(target);
    }
}

/// [`warn_new_holder`], each time.
fn warn_and_tidy(target: &LockTarget) {
    let Some(lost) = read(target) else { return };
    tracing::warn!(
        "lock {} ({}): {lost}; it may have been used by two processes at once",
        target.name,
        target.path.display()
    );
    if !lost.owner_alive() {
        remove(target);
    }
}

/// How often one process looks for a lock's record ([`warn_new_holder`]).
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Whether this process should look for `lock`'s record now (not in the last [`CHECK_EVERY`]);
/// if so, the look is counted as done.
fn due(lock: &Path) -> bool {
    /// Past this many locks, those not looked at within [`CHECK_EVERY`] are forgotten (all of
    /// them if that is not enough).
    const REMEMBERED: usize = 256;
    static LAST: Mutex<Option<HashMap<PathBuf, Instant>>> = Mutex::new(None);
    let now = Instant::now();
    // Never waits: busy (another thread here, or one that held it when this process was forked
    // and is not in it) means look now.
    let mut last = match LAST.try_lock() {
        Ok(last) => last,
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return true,
    };
    let last = last.get_or_insert_with(HashMap::new);
    match last.get_mut(lock) {
        Some(at) if now.duration_since(*at) < CHECK_EVERY => false,
        Some(at) => {
            *at = now;
            true
        }
        None => {
            if last.len() >= REMEMBERED {
                last.retain(|_, at| now.duration_since(*at) < CHECK_EVERY);
                if last.len() >= REMEMBERED {
                    // All looked at within the second: forgetting them costs a look each.
                    last.clear();
                }
            }
            last.insert(lock.to_path_buf(), now);
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_and_is_removed_only_if_it_is_one() {
        let dir = tempfile::tempdir().unwrap();
        let t = LockTarget::resolve("x", dir.path()).unwrap();
        assert_eq!(read(&t), None);
        let lost = LostLease {
            pid: 4242,
            start_time: Some(7),
            command: Some("sh deploy.sh".into()),
            operation: "deploy".into(),
            token: Some(99),
            at: Timestamp::now(),
            reason: "its keeper and the daemon both died".into(),
        };
        record(&t, &lost).unwrap();
        assert_eq!(read(&t).unwrap().pid, 4242);
        assert_eq!(read(&t).unwrap().token, Some(99));
        assert!(read(&t).unwrap().to_string().contains("the lease of pid 4242 (sh deploy.sh), operation 'deploy'"));
        remove(&t);
        assert!(!lost_path(&t).exists());
        std::fs::write(lost_path(&t), "not a record").unwrap();
        remove(&t);
        assert!(lost_path(&t).exists(), "a file that is not a record was removed");
    }

    fn lost_by(pid: u32, start_time: Option<u64>) -> LostLease {
        LostLease {
            pid,
            start_time,
            command: None,
            operation: String::new(),
            token: None,
            at: Timestamp::now(),
            reason: "its keeper and the daemon both died".into(),
        }
    }

    /// A keeper clears the record of a lease it gave up (its token), never one of another of the
    /// script's leases, another script's, or one without a token.
    #[test]
    fn a_record_is_removed_by_token_only_for_the_leases_named() {
        let dir = tempfile::tempdir().unwrap();
        let t = LockTarget::resolve("x", dir.path()).unwrap();
        let with = |pid, token| LostLease { token, ..lost_by(pid, None) };
        for (kept, pid, token) in [(true, 7, Some(5)), (true, 8, Some(4)), (true, 7, None)] {
            record(&t, &with(pid, token)).unwrap();
            assert!(!remove_if_token(&t, 7, &[3, 4]));
            assert_eq!(read(&t).is_some(), kept);
        }
        record(&t, &with(7, Some(4))).unwrap();
        assert!(remove_if_token(&t, 7, &[3, 4]));
        assert_eq!(read(&t), None);
    }

    /// A process that has exited and been reaped; its start time cannot match a later process
    /// given the same pid.
    fn a_dead_process() -> (u32, Option<u64>) {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        (pid, Some(u64::MAX))
    }

    #[test]
    fn owner_alive_is_false_only_for_a_dead_owner() {
        let me = buildlock_sys::current_process();
        assert!(lost_by(me.pid, me.start_time).owner_alive());
        let (pid, start) = a_dead_process();
        assert!(!lost_by(pid, start).owner_alive());
        // A pid the OS cannot be asked about counts as running.
        assert!(lost_by(u32::MAX, None).owner_alive());
    }

    #[test]
    fn a_new_holder_removes_the_record_once_its_script_has_ended() {
        let dir = tempfile::tempdir().unwrap();
        let t = LockTarget::resolve("x", dir.path()).unwrap();
        let me = buildlock_sys::current_process();
        record(&t, &lost_by(me.pid, me.start_time)).unwrap();
        warn_and_tidy(&t);
        assert_eq!(read(&t).map(|l| l.pid), Some(me.pid), "the script still runs: the record stays");
        let (pid, start) = a_dead_process();
        record(&t, &lost_by(pid, start)).unwrap();
        warn_and_tidy(&t);
        assert!(!lost_path(&t).exists(), "the script has ended: the record goes");
    }

    #[test]
    fn a_process_looks_for_a_locks_record_once_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.lock"), dir.path().join("b.lock"));
        assert!(due(&a));
        assert!(!due(&a), "looked again at once");
        assert!(due(&b), "another lock is looked at on its own schedule");
        let at = Instant::now();
        while at.elapsed() < CHECK_EVERY {
            std::thread::sleep(CHECK_EVERY / 10);
        }
        assert!(due(&a), "not looked at again after a second");
        // Many locks: each is looked at the first time (the table forgets, never wrongly skips).
        for i in 0..1000 {
            assert!(due(&dir.path().join(format!("{i}.lock"))));
        }
    }
}
