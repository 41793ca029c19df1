//! The system calls buildlock needs that `std` lacks, in one place per platform.
//!
//! Nothing else in the workspace calls `fcntl`, `prctl`, `kill` or reads `/proc`: every such call
//! lives here, behind the same signatures on every platform (a `clippy.toml` entry forbids the raw
//! calls elsewhere). The main types:
//!
//! - [`LockFile`]: an open lock file and the OS lock on it. The lock conflicts with the Python
//!   `fasteners` library and with `fcntl.lockf` users in general:
//!   - Linux: an open-file-description lock (`F_OFD_SETLK`) over the whole file. It belongs to the
//!     open file, not the process, so two threads (or two [`LockFile`]s) exclude each other.
//!   - other Unix (macOS, BSD): a POSIX record lock (`F_SETLK`) over the whole file. Those locks
//!     belong to the process and vanish when *any* descriptor of the file is closed, so this crate
//!     keeps one descriptor per file per process and serialises the process's threads itself.
//!   - Windows: `LockFileEx` through `std::fs::File::lock`, whose range covers byte 0, the byte
//!     `fasteners` locks.
//! - [`FileId`]: (device, inode) of a file, used to notice a lock file that was deleted or replaced.
//! - [`ProcessIdentity`] and [`process_state`]: a process named by pid *and* start time, so that a
//!   recycled pid is never taken for the process that wrote a lock's metadata.
//! - [`pass_to_child`]: let a command inherit the locked descriptor, so the lock lives as long as
//!   the command and what it starts (`run`); [`lock_holders`] finds those processes again.
//! - [`kill_on_parent_death`]: stop a child when the process that holds its lock dies.
//! - [`fs`]: opening files beside a lock without following planted links or blocking on FIFOs.
//!
//! ```no_run
//! use buildlock_sys::{LockFile, LockMode};
//! let file = LockFile::open("/tmp/example.lock".as_ref())?;
//! if file.try_lock(LockMode::Exclusive)? {
//!     // ... critical section ...
//!     file.unlock()?;
//! }
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! macOS and Windows code is written against their documented APIs but only Linux is tested.
#![allow(clippy::disallowed_methods)]

use std::fs::File;
use std::io;
use std::path::Path;

pub mod fs;
mod inherit;
#[cfg(unix)]
pub mod ipc;
mod process;

#[cfg(target_os = "linux")]
#[path = "lock_linux.rs"]
mod lock_imp;
#[cfg(all(unix, not(target_os = "linux")))]
#[path = "lock_posix.rs"]
mod lock_imp;
#[cfg(windows)]
#[path = "lock_windows.rs"]
mod lock_imp;

pub use inherit::{holds_lock, inheritable_copy_single_threaded, lock_holders, pass_to_child};
pub use process::{
    ancestors, at_exit, command_args, command_line, current_pid, current_process, current_thread_id,
    end_on_closed_pipe, forks, hostname, identify, kill_on_parent_death, process_state, send_signal, signal_group,
    CloseInChild, ProcessIdentity, ProcessState,
};

/// How a lock is held: many shared holders at once, or one exclusive holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LockMode {
    /// Any number of shared holders, no exclusive one (a reader lock).
    Shared,
    /// A single holder (a writer lock).
    Exclusive,
}

impl LockMode {
    /// `"shared"` or `"exclusive"`, as written into metadata and status output.
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Shared => "shared",
            LockMode::Exclusive => "exclusive",
        }
    }
}

/// What a look at a lock file found, without taking the lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Nobody holds an OS lock on the file.
    Free,
    /// Somebody holds it. `pid` is known only when the holder uses process-bound POSIX locks
    /// (`fasteners`, `lockf`); open-file-description locks have no owning process.
    Held { mode: LockMode, pid: Option<u32> },
}

/// Identity of a file on its file system: (device, inode). Two paths with the same id are the
/// same file; a path whose id changed was deleted or replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// An open lock file and the OS lock this handle holds on it, if any.
///
/// Dropping the handle closes this descriptor; the lock is released once no copy of it is open
/// (on Linux, copies passed to a child with [`pass_to_child`] keep it), or at once by
/// [`LockFile::unlock`]. The file is opened close-on-exec, so no child inherits the lock
/// unless it is passed on purpose.
#[derive(Debug)]
pub struct LockFile {
    inner: lock_imp::LockFile,
}

impl LockFile {
    /// Opens (creating if needed) the lock file at `path` for locking. Never truncates or writes it.
    /// A symbolic link, FIFO, directory or other non-regular file at `path` is an error at once
    /// (see [`fs::open_regular_rw`]): the lock is never taken on a file a link points to.
    pub fn open(path: &Path) -> io::Result<LockFile> {
        Ok(LockFile { inner: lock_imp::LockFile::open(path, true)? })
    }

    /// Opens the lock file at `path` only if it exists (`NotFound` otherwise), for looking
    /// at a lock without leaving a file behind.
    pub fn open_existing(path: &Path) -> io::Result<LockFile> {
        Ok(LockFile { inner: lock_imp::LockFile::open(path, false)? })
    }

    /// Takes the lock without waiting. `Ok(false)` means somebody else holds a conflicting lock.
    pub fn try_lock(&self, mode: LockMode) -> io::Result<bool> {
        self.inner.try_lock(mode)
    }

    /// Takes the lock, blocking in the kernel until it is free (woken the moment it is released).
    pub fn lock(&self, mode: LockMode) -> io::Result<()> {
        self.inner.lock(mode)
    }

    /// Releases the lock this handle holds; a no-op when it holds none.
    pub fn unlock(&self) -> io::Result<()> {
        self.inner.unlock()
    }

    /// Tells whether another holder has a lock on the file, without taking it.
    pub fn probe(&self) -> io::Result<Probe> {
        self.inner.probe()
    }

    /// The (device, inode) of the open file.
    pub fn id(&self) -> io::Result<FileId> {
        self.inner.id()
    }

    /// The open file, for reading its size, contents or times.
    pub fn file(&self) -> &File {
        self.inner.file()
    }

    /// Takes over an open lock file whose lock this process shares through an inherited
    /// descriptor (Linux: the lock belongs to the open file description), so that it can be
    /// unlocked for every copy.
    #[cfg(target_os = "linux")]
    pub fn from_inherited(file: File) -> LockFile {
        LockFile { inner: lock_imp::LockFile::from_file(file) }
    }

    /// Consumes the handle, returning the open file with its lock.
    ///
    /// With Linux OFD locks the lock belongs to the open file, so the file (or a duplicate of
    /// it passed to another process) keeps the lock until its last descriptor closes. On other
    /// platforms the lock cannot outlive the handle's process bookkeeping, so this is Linux-only.
    #[cfg(target_os = "linux")]
    pub fn into_file(self) -> File {
        self.inner.into_file()
    }
}

/// The (device, inode) of the file at `path` now; of the link itself if `path` is a symbolic
/// link (which is never the lock file that was opened).
pub fn path_id(path: &Path) -> io::Result<FileId> {
    lock_imp::path_id(path)
}

/// Whether a locking error means "this file system cannot do OS locks" (some network mounts),
/// in which case callers fall back to soft locks.
pub fn lock_unsupported(err: &io::Error) -> bool {
    if err.kind() == io::ErrorKind::Unsupported {
        return true;
    }
    #[cfg(unix)]
    {
        use nix::errno::Errno;
        if let Some(code) = err.raw_os_error() {
            let e = Errno::from_raw(code);
            return matches!(e, Errno::ENOLCK | Errno::ENOSYS | Errno::EOPNOTSUPP) || e == Errno::ENOTSUP;
        }
    }
    false
}

/// Test builds only: with `VAR=DIR` set, the first process to get here (the one that creates
/// `DIR/MARKER`) waits until the test has opened, written and closed the FIFO `DIR/go`; every
/// later one goes on. Whether this one waited. Holds open the windows that the daemon's and the
/// library's tests need (a daemon dying between two steps, a client between two others).
#[doc(hidden)]
pub fn pause_once_for_tests(var: &str, marker: &str) -> bool {
    #[cfg(debug_assertions)]
    if let Some(dir) = std::env::var_os(var).map(std::path::PathBuf::from) {
        if std::fs::create_dir(dir.join(marker)).is_ok() {
            // Opening blocks until the test opens the other end; reading ends when it closes it.
            if let Ok(mut go) = File::open(dir.join("go")) {
                let _ = io::Read::read_to_end(&mut go, &mut Vec::new());
            }
            return true;
        }
    }
    let _ = (var, marker);
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_handles_exclude_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let a = LockFile::open(&path).unwrap();
        let b = LockFile::open(&path).unwrap();
        assert!(a.try_lock(LockMode::Exclusive).unwrap());
        assert!(!b.try_lock(LockMode::Exclusive).unwrap());
        assert!(!b.try_lock(LockMode::Shared).unwrap());
        assert!(matches!(b.probe().unwrap(), Probe::Held { mode: LockMode::Exclusive, .. }));
        a.unlock().unwrap();
        assert_eq!(b.probe().unwrap(), Probe::Free);
        assert!(b.try_lock(LockMode::Shared).unwrap());
        assert!(a.try_lock(LockMode::Shared).unwrap());
        assert!(matches!(LockFile::open(&path).unwrap().probe().unwrap(), Probe::Held { mode: LockMode::Shared, .. }));
        drop(a);
        drop(b);
        assert!(LockFile::open(&path).unwrap().try_lock(LockMode::Exclusive).unwrap());
    }

    #[test]
    fn blocking_lock_wakes_on_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let a = LockFile::open(&path).unwrap();
        a.lock(LockMode::Exclusive).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        let t = std::thread::spawn(move || {
            let b = LockFile::open(&p).unwrap();
            tx.send("waiting").unwrap();
            b.lock(LockMode::Exclusive).unwrap();
            tx.send("locked").unwrap();
        });
        assert_eq!(rx.recv().unwrap(), "waiting");
        // The waiter cannot have the lock while we hold it.
        assert!(rx.try_recv().is_err());
        a.unlock().unwrap();
        assert_eq!(rx.recv().unwrap(), "locked");
        t.join().unwrap();
    }

    #[test]
    fn file_ids_tell_replaced_files_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let a = LockFile::open(&path).unwrap();
        assert_eq!(a.id().unwrap(), path_id(&path).unwrap());
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"").unwrap();
        assert_ne!(a.id().unwrap(), path_id(&path).unwrap());
    }

    #[cfg(unix)]
    #[test]
    fn a_link_or_fifo_at_the_lock_path_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let link = dir.path().join("link.lock");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let err = LockFile::open(&link).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(LockFile::open_existing(&link).is_err());
        let fifo = dir.path().join("fifo.lock");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = LockFile::open(&fifo).unwrap_err();
        assert!(err.to_string().contains("FIFO"), "{err}");
        assert_ne!(path_id(&link).unwrap(), path_id(&victim).unwrap());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    }

    #[test]
    fn current_process_is_alive_and_a_wrong_start_time_is_not() {
        let me = current_process();
        assert_eq!(me.pid, std::process::id());
        assert_eq!(process_state(&me), ProcessState::Alive);
        if let Some(start) = me.start_time {
            let recycled = ProcessIdentity { start_time: Some(start + 1), ..me.clone() };
            assert_eq!(process_state(&recycled), ProcessState::Dead);
        }
    }

    #[test]
    fn exited_child_is_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let id = ProcessIdentity { pid, start_time: None, boot_id: None };
        assert_eq!(process_state(&id), ProcessState::Dead);
    }
}
