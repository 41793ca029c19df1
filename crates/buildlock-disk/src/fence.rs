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
    if !exclusive {
        return Ok(read(target));
    }
    match FenceFile::open(target) {
        Ok(mut fence) => fence.advance(target),
        Err(e) => {
            // A link, FIFO or file with other hard links where the fence file should be: read
            // what can be read, never write; the clock keeps tokens growing.
            let next = advance_from(target, read(target))?;
            warn_unrecorded(target, &e);
            Ok(next)
        }
    }
}

/// An open fence file, checked once to be a regular file with no other hard link: each
/// [`FenceFile::advance`] costs one read and one write. The lock-file cache of `os.rs` keeps
/// one beside each idle lock file it keeps open.
#[derive(Debug)]
pub(crate) struct FenceFile {
    file: std::fs::File,
    opened: std::time::Instant,
}

impl FenceFile {
    /// Opens (creating) the fence file of `target` for reading and writing in place.
    pub(crate) fn open(target: &LockTarget) -> std::io::Result<FenceFile> {
        let (file, _) = buildlock_sys::fs::open_regular_rw_stat(&fence_path(target), true, true, false)?;
        Ok(FenceFile { file, opened: std::time::Instant::now() })
    }

    /// Whether this open file is recent enough to use again: a fence file kept open is
    /// reopened at least once a second, so a process that keeps one does not go on writing a
    /// file somebody deleted or replaced (its tokens would then rest on the clock alone).
    pub(crate) fn is_fresh(&self) -> bool {
        self.opened.elapsed() < std::time::Duration::from_secs(1)
    }

    /// The open file.
    pub(crate) fn file(&self) -> &std::fs::File {
        &self.file
    }

    /// Reads the last token and records the next, as [`next_token`] does for an exclusive
    /// holder. Call only while holding the lock.
    pub(crate) fn advance(&mut self, target: &LockTarget) -> Result<u64, Error> {
        let last = self.read();
        let next = advance_from(target, last)?;
        if let Err(e) = self.write(next) {
            warn_unrecorded(target, &e);
        }
        Ok(next)
    }

    /// The last token: one `pread` when the file holds a token as we write them (21 bytes).
    /// An unreadable, oversized (more than 64 bytes, as [`current`] reads it) or garbled file
    /// reads as 0: the clock term takes over.
    fn read(&mut self) -> u64 {
        let mut buf = [0u8; 65];
        let mut got = 0;
        // Stop at a whole token, the end of the file, or more than 64 bytes.
        while got < TOKEN_LEN || (got < buf.len() && got > TOKEN_LEN) {
            match read_at(&self.file, &mut buf[got..], got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return 0,
            }
            if got == TOKEN_LEN && buf[TOKEN_LEN - 1] == b'\n' {
                break;
            }
        }
        if got > 64 {
            return 0;
        }
        std::str::from_utf8(&buf[..got]).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
    }

    /// Overwrites the token in place with a fixed-width number: no truncation, which on ext4
    /// would force a flush on close (its "replace by truncate" safety net) and cost a
    /// millisecond.
    fn write(&mut self, token: u64) -> std::io::Result<()> {
        write_all_at(&self.file, format!("{token:020}\n").as_bytes())
    }
}

#[cfg(unix)]
fn read_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, offset)
}

#[cfg(unix)]
fn write_all_at(file: &std::fs::File, bytes: &[u8]) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, 0)
}

#[cfg(windows)]
fn read_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    std::os::windows::fs::FileExt::seek_read(file, buf, offset)
}

#[cfg(windows)]
fn write_all_at(file: &std::fs::File, mut bytes: &[u8]) -> std::io::Result<()> {
    let mut offset = 0;
    while !bytes.is_empty() {
        let n = std::os::windows::fs::FileExt::seek_write(file, bytes, offset)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n..];
        offset += n as u64;
    }
    Ok(())
}

/// Bytes of a token as written: 20 digits and a newline.
const TOKEN_LEN: usize = 21;

/// `max(last + 1, microseconds since the epoch)`, or the error for a fence at `u64::MAX`.
fn advance_from(target: &LockTarget, last: u64) -> Result<u64, Error> {
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
    Ok(after_last.max(now))
}

fn warn_unrecorded(target: &LockTarget, e: &std::io::Error) {
    let path = fence_path(target);
    crate::warn_once(&path, || {
        format!("cannot record fencing token in {}: {e} (tokens still grow with the clock)", path.display())
    });
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

/// The fence files of the locks the daemon granted last, kept open between grants (at most
/// [`kept::MAX_KEPT`], none older than [`FenceFile::is_fresh`] allows). Only for the daemon's
/// grants: a library process keeps its fence file with its idle lock file instead (`os.rs`).
pub(crate) mod kept {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use super::FenceFile;

    /// Descriptors kept at most, whatever the number of locks held.
    pub(crate) const MAX_KEPT: usize = 16;

    struct Entry {
        pid: u32,
        path: PathBuf,
        fence: FenceFile,
    }

    static KEPT: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

    fn entries() -> std::sync::MutexGuard<'static, Vec<Entry>> {
        let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
        // A forked child closes its copies of its parent's (they are its own descriptors; the
        // parent's stay open) and never writes through them.
        let pid = buildlock_sys::current_pid();
        kept.retain(|e| e.pid == pid);
        kept
    }

    /// The open fence file of the lock at `path`, if one was kept and is fresh.
    pub(crate) fn take(path: &Path) -> Option<FenceFile> {
        let mut kept = entries();
        let i = kept.iter().position(|e| e.path == path)?;
        Some(kept.swap_remove(i).fence).filter(FenceFile::is_fresh)
    }

    /// Keeps `fence`, the fence file of the lock at `path`, for the next grant.
    pub(crate) fn put(path: &Path, fence: FenceFile) {
        if !fence.is_fresh() {
            return;
        }
        let mut kept = entries();
        if kept.len() >= MAX_KEPT {
            kept.remove(0);
        }
        kept.push(Entry { pid: buildlock_sys::current_pid(), path: path.to_owned(), fence });
    }

    #[cfg(test)]
    pub(crate) fn keeps(path: &Path) -> bool {
        entries().iter().any(|e| e.path == path)
    }
}
