//! A lock that lives as long as the build: passing the locked descriptor to a command, and
//! finding the processes that hold a lock file when no metadata names them.
//!
//! `buildlock-client run NAME -- CMD` lets CMD inherit the locked descriptor, as `flock(1)`
//! does: on Linux the OFD lock belongs to the open file description, so it lives until every
//! process that inherited a copy has exited (or closed it), even if `run` itself is killed.
//! The same property makes those processes findable: each has a descriptor on the lock file,
//! and `/proc/PID/fdinfo/FD` lists the lock held through it.

use std::io;
use std::path::Path;
use std::process::Command;

/// Arranges for the child that `cmd` spawns to inherit the descriptor of `file` (which stays
/// close-on-exec in this process, so no other child gets it). Returns `false` where the
/// platform cannot pass it.
///
/// Linux: the child's copy shares the open file description and with it the OFD lock. Other
/// Unix: the descriptor is passed, but POSIX record locks belong to a process and are not
/// inherited, so the lock itself is not (untested there). Windows: not supported.
#[cfg(unix)]
pub fn pass_to_child(cmd: &mut Command, file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let raw = file.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec and makes one
    // async-signal-safe system call (fcntl F_SETFD) on a descriptor the child inherited from
    // the fork; it allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            let fd = std::os::fd::BorrowedFd::borrow_raw(raw);
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))?;
            Ok(())
        });
    }
    cfg!(target_os = "linux")
}

/// [`pass_to_child`] without a closure run between `fork` and `exec`, so that `std` can start
/// the command with `posix_spawn` (a `vfork`-like clone that copies no page tables: a large
/// part of the cost of starting a command from a big process). The locked descriptor is
/// duplicated without close-on-exec; keep the returned descriptor until `spawn` has returned,
/// then drop it. The child finds the lock on that descriptor's number.
///
/// Only for a process with no other thread that could start a program meanwhile: such a
/// program would inherit the duplicate, and the lock with it (`buildlock-client run`, which
/// starts no thread). `None` where descriptors cannot be passed (see [`pass_to_child`]).
#[cfg(unix)]
pub fn inheritable_copy_single_threaded(file: &std::fs::File) -> std::io::Result<Option<std::os::fd::OwnedFd>> {
    use std::os::fd::{AsFd, FromRawFd};
    if !cfg!(target_os = "linux") {
        return Ok(None);
    }
    // F_DUPFD (not F_DUPFD_CLOEXEC): the copy survives `exec`. Above 2, never a standard stream.
    let raw = nix::fcntl::fcntl(file.as_fd(), nix::fcntl::FcntlArg::F_DUPFD(3))?;
    // SAFETY: `raw` is a new descriptor that F_DUPFD just returned; nothing else owns it.
    Ok(Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) }))
}

/// Windows: descriptors are not passed.
#[cfg(windows)]
pub fn inheritable_copy_single_threaded(_file: &std::fs::File) -> std::io::Result<Option<std::fs::File>> {
    Ok(None)
}

/// Windows: descriptors are not passed; the lock stays with this process.
#[cfg(windows)]
pub fn pass_to_child(_cmd: &mut Command, _file: &std::fs::File) -> bool {
    false
}

/// Whether `file`'s open file description carries a lock (Linux: its `/proc/self/fdinfo` entry
/// lists one). Elsewhere, and when it cannot be told, `true`.
pub fn holds_lock(file: &std::fs::File) -> bool {
    imp::holds_lock(file)
}

/// The live processes (other than this one) that hold a lock through a descriptor on the file
/// at `path`, found by scanning `/proc/*/fdinfo` (Linux; only processes this user may inspect).
/// Empty where the platform cannot tell.
///
/// This reads every descriptor of every visible process: call it only to explain a lock that
/// is held and that no metadata explains.
pub fn lock_holders(path: &Path) -> io::Result<Vec<u32>> {
    imp::lock_holders(path)
}

#[cfg(target_os = "linux")]
mod imp {
    use std::io;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    pub(super) fn holds_lock(file: &std::fs::File) -> bool {
        use std::os::fd::AsRawFd;
        match std::fs::read_to_string(format!("/proc/self/fdinfo/{}", file.as_raw_fd())) {
            Ok(text) => text.lines().any(|l| l.starts_with("lock:")),
            Err(_) => true,
        }
    }

    pub(super) fn lock_holders(path: &Path) -> io::Result<Vec<u32>> {
        let target = std::fs::metadata(path)?;
        let (dev, ino) = (target.dev(), target.ino());
        let me = std::process::id();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if pid == me {
                continue;
            }
            // Processes we may not inspect, or that exit meanwhile, are skipped.
            let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
            for fd in fds.flatten() {
                // stat() through the magic link gives the open file's device and inode.
                let Ok(m) = std::fs::metadata(fd.path()) else { continue };
                if m.dev() != dev || m.ino() != ino {
                    continue;
                }
                let info = format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy());
                let holds =
                    std::fs::read_to_string(info).is_ok_and(|text| text.lines().any(|l| l.starts_with("lock:")));
                if holds {
                    found.push(pid);
                    break;
                }
            }
        }
        Ok(found)
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::io;
    use std::path::Path;

    pub(super) fn holds_lock(_file: &std::fs::File) -> bool {
        true
    }

    pub(super) fn lock_holders(_path: &Path) -> io::Result<Vec<u32>> {
        Ok(Vec::new())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::{LockFile, LockMode};
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    /// Whether the lock at `path` can be taken within 10 s. Other tests of this binary start
    /// processes meanwhile: each holds a copy of every descriptor of ours (one about to be
    /// closed included) from its fork to its `exec`, so a lock let go here may stay taken for
    /// that moment.
    fn free_soon(path: &std::path::Path) -> bool {
        let file = LockFile::open(path).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !file.try_lock(LockMode::Exclusive).unwrap() {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }

    #[test]
    fn a_child_given_the_descriptor_keeps_the_lock_after_we_close_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let file = LockFile::open(&path).unwrap();
        assert!(file.try_lock(LockMode::Exclusive).unwrap());
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo started; read line"]).stdin(Stdio::piped()).stdout(Stdio::piped());
        assert!(pass_to_child(&mut cmd, file.file()));
        let mut child = cmd.spawn().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line, "started\n");
        drop(file);
        // Our copy is closed, the child's is not: the lock is still held, and by the child.
        let other = LockFile::open(&path).unwrap();
        assert!(!other.try_lock(LockMode::Exclusive).unwrap());
        // (Other tests of this binary fork meanwhile; a fork of theirs holds our descriptor for
        // a moment before its exec closes it, so the list may name that child too.)
        assert!(lock_holders(&path).unwrap().contains(&child.id()));
        assert!(!holds_lock(other.file()));
        drop(child.stdin.take());
        child.wait().unwrap();
        drop(other);
        assert!(free_soon(&path), "the lock stayed held after the child exited");
    }

    #[test]
    fn unlocking_our_copy_frees_the_lock_the_child_shares() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let file = LockFile::open(&path).unwrap();
        assert!(file.try_lock(LockMode::Exclusive).unwrap());
        assert!(holds_lock(file.file()));
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo started; read line"]).stdin(Stdio::piped()).stdout(Stdio::piped());
        pass_to_child(&mut cmd, file.file());
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        file.unlock().unwrap();
        assert!(!holds_lock(file.file()));
        assert!(LockFile::open(&path).unwrap().try_lock(LockMode::Exclusive).unwrap());
        drop(child.stdin.take());
        child.wait().unwrap();
    }

    #[test]
    fn a_child_not_given_the_descriptor_does_not_hold_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let file = LockFile::open(&path).unwrap();
        assert!(file.try_lock(LockMode::Exclusive).unwrap());
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        assert!(!lock_holders(&path).unwrap().contains(&child.id()));
        drop(file);
        // Free while the child still runs: were it holding a copy, it would stay taken.
        assert!(free_soon(&path), "the lock stayed held by a child that was not given it");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
