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

use crate::{Error, LockTarget};

/// The fence file of a lock: its path plus `.fence`.
pub fn fence_path(target: &LockTarget) -> PathBuf {
    let mut p = target.path.clone().into_os_string();
    p.push(".fence");
    PathBuf::from(p)
}

/// The last token issued for `target`, or 0 when the file is missing or unusable (a link, a
/// FIFO, garbage).
pub fn current(target: &LockTarget) -> u64 {
    read(target)
}

fn read(target: &LockTarget) -> u64 {
    use std::io::Read;
    let mut text = String::new();
    match buildlock_sys::fs::open_regular_nonblocking(&fence_path(target), 64) {
        Ok(f) if (&f).read_to_string(&mut text).is_ok() => text.trim().parse().unwrap_or(0),
        _ => 0,
    }
}

/// The token for a new holder of `target`. Call only while holding the lock; `exclusive`
/// holders advance it (and persist it), shared ones read it.
///
/// Tokens never wrap: when the last one is already `u64::MAX` (a fence file someone wrote by
/// hand, say), an exclusive holder gets an error saying so instead of a token that is not
/// larger than every earlier one.
pub fn next_token(target: &LockTarget, exclusive: bool) -> Result<u64, Error> {
    let last = read(target);
    if !exclusive {
        return Ok(last);
    }
    let Some(after_last) = last.checked_add(1) else {
        let path = fence_path(target);
        let why = format!(
            "it holds {last}, the largest token there is, so no new holder can get a larger one; if nothing that \
             checks these tokens still remembers them, delete {} and the clock will start them again",
            path.display()
        );
        return Err(Error::io("advance the fencing token in", &path, std::io::Error::other(why)));
    };
    let now = u64::try_from(Timestamp::now().as_microsecond()).unwrap_or(0);
    let next = after_last.max(now);
    if let Err(e) = write(target, next) {
        let path = fence_path(target);
        crate::warn_once(&path, || {
            format!("cannot record fencing token in {}: {e} (tokens still grow with the clock)", path.display())
        });
    }
    Ok(next)
}

/// Overwrites the token in place with a fixed-width number: no truncation, which on ext4 would
/// force a flush on close (its "replace by truncate" safety net) and cost a millisecond. Only a
/// regular file with no other hard link is written: a link or FIFO planted at the path is refused.
fn write(target: &LockTarget, token: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = buildlock_sys::fs::open_regular_rw(&fence_path(target), true, true)?;
    f.write_all(format!("{token:020}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_grow_and_survive_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let t = LockTarget::resolve("x", dir.path()).unwrap();
        assert_eq!(current(&t), 0, "no fence file yet");
        let a = next_token(&t, true).unwrap();
        assert_eq!(current(&t), a, "the token issued is the one recorded");
        let b = next_token(&t, true).unwrap();
        assert!(b > a);
        assert_eq!(current(&t), b);
        assert_eq!(next_token(&t, false).unwrap(), b);
        // A corrupt file falls back to the clock, which is past the last (clock-based) token.
        let last = next_token(&t, true).unwrap();
        std::fs::write(fence_path(&t), "garbage").unwrap();
        assert!(next_token(&t, true).unwrap() > last);
        // A token far in the future is still exceeded.
        std::fs::write(fence_path(&t), (u64::MAX / 2).to_string()).unwrap();
        assert_eq!(next_token(&t, true).unwrap(), u64::MAX / 2 + 1);
    }

    #[test]
    fn a_fence_at_the_largest_token_is_refused_not_wrapped() {
        let dir = tempfile::tempdir().unwrap();
        let t = LockTarget::resolve("x", dir.path()).unwrap();
        std::fs::write(fence_path(&t), (u64::MAX - 1).to_string()).unwrap();
        assert_eq!(next_token(&t, true).unwrap(), u64::MAX);
        // The file now holds u64::MAX: the next exclusive holder is refused, clearly.
        let err = next_token(&t, true).unwrap_err().to_string();
        assert!(err.contains(&fence_path(&t).display().to_string()), "{err}");
        assert!(err.contains(&u64::MAX.to_string()) && err.contains("delete"), "{err}");
        // Nothing was written: the token did not wrap or go backwards.
        let kept: u64 = std::fs::read_to_string(fence_path(&t)).unwrap().trim().parse().unwrap();
        assert_eq!(kept, u64::MAX);
        // Readers still get the current value.
        assert_eq!(next_token(&t, false).unwrap(), u64::MAX);
    }

    #[cfg(unix)]
    #[test]
    fn a_link_at_the_fence_file_is_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let t = LockTarget::resolve("x", dir.path()).unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "99").unwrap();
        std::os::unix::fs::symlink(&victim, fence_path(&t)).unwrap();
        let a = next_token(&t, true).unwrap();
        assert!(a > 99, "read through the link: {a}");
        assert!(next_token(&t, true).unwrap() > 0);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "99");
        // Nor a hard link to another file.
        std::fs::remove_file(fence_path(&t)).unwrap();
        std::fs::hard_link(&victim, fence_path(&t)).unwrap();
        next_token(&t, true).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "99");
    }
}
