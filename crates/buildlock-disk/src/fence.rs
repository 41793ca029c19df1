//! Fencing tokens: a number per lock that only grows, across processes, modes and restarts.
//!
//! A holder passes its token to whatever it guards (a cache, a remote store); the store refuses
//! a write carrying a token lower than one it has seen, so a holder that lost its lock (paused,
//! partitioned) cannot do damage after the next holder started.
//!
//! The last token lives in `X.lock.fence` (decimal text), next to the lock. It is bumped only by
//! an exclusive holder, while holding the lock, to `max(last + 1, microseconds since the epoch)`:
//! the clock term keeps tokens growing even if the file is lost or corrupt (as long as the clock
//! does not step backwards by more than the time since the last grant). Shared holders get the
//! current value without bumping it.

use std::path::PathBuf;

use jiff::Timestamp;

use crate::LockTarget;

/// The fence file of a lock: its path plus `.fence`.
pub fn fence_path(target: &LockTarget) -> PathBuf {
    let mut p = target.path.clone().into_os_string();
    p.push(".fence");
    PathBuf::from(p)
}

fn read(target: &LockTarget) -> u64 {
    std::fs::read_to_string(fence_path(target)).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// The token for a new holder of `target`. Call only while holding the lock; `exclusive`
/// holders advance it (and persist it), shared ones read it.
pub fn next_token(target: &LockTarget, exclusive: bool) -> u64 {
    let last = read(target);
    if !exclusive {
        return last;
    }
    let now = u64::try_from(Timestamp::now().as_microsecond()).unwrap_or(0);
    let next = (last + 1).max(now);
    if let Err(e) = write(target, next) {
        tracing::warn!("cannot record fencing token in {}: {e}", fence_path(target).display());
    }
    next
}

/// Overwrites the token in place with a fixed-width number: no truncation, which on ext4 would
/// force a flush on close (its "replace by truncate" safety net) and cost a millisecond.
fn write(target: &LockTarget, token: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(fence_path(target))?;
    f.write_all(format!("{token:020}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_grow_and_survive_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let t = LockTarget::resolve("x", dir.path()).unwrap();
        let a = next_token(&t, true);
        let b = next_token(&t, true);
        assert!(b > a);
        assert_eq!(next_token(&t, false), b);
        // A corrupt file falls back to the clock, which is past the last (clock-based) token.
        let last = next_token(&t, true);
        std::fs::write(fence_path(&t), "garbage").unwrap();
        assert!(next_token(&t, true) > last);
        // A token far in the future is still exceeded.
        std::fs::write(fence_path(&t), (u64::MAX / 2).to_string()).unwrap();
        assert_eq!(next_token(&t, true), u64::MAX / 2 + 1);
    }
}
