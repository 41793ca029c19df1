//! macOS and the BSDs: process-bound POSIX record locks (`F_SETLK`) over the whole file.
//!
//! Untested here (CI runs Linux); written against the POSIX and Darwin manuals.
//!
//! POSIX record locks belong to the process, not to the descriptor: two threads of one process
//! never conflict, and closing *any* descriptor of the file drops *all* of the process's locks on
//! it. So this module keeps exactly one open descriptor per file (keyed by device and inode) for
//! the whole process, shared by every [`LockFile`] handle on that file, and serialises the
//! process's own holders with a mutex and condition variable before asking the kernel.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, Weak};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use nix::libc;

use crate::{FileId, LockMode, Probe};

/// The one descriptor this process has on a file, and who in the process holds its lock.
#[derive(Debug)]
struct Shared {
    file: File,
    id: FileId,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    readers: usize,
    writer: bool,
    /// A thread is inside a blocking kernel call on behalf of the process; others wait.
    busy: bool,
}

impl State {
    fn conflicts(&self, mode: LockMode) -> bool {
        self.writer || self.busy || (mode == LockMode::Exclusive && self.readers > 0)
    }
}

static OPEN_FILES: LazyLock<Mutex<HashMap<FileId, Weak<Shared>>>> = LazyLock::new(Default::default);

#[derive(Debug)]
pub(crate) struct LockFile {
    shared: Arc<Shared>,
    held: Mutex<Option<LockMode>>,
}

fn whole_file(kind: libc::c_int) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl
}

fn kind(mode: LockMode) -> libc::c_int {
    match mode {
        LockMode::Shared => libc::F_RDLCK,
        LockMode::Exclusive => libc::F_WRLCK,
    }
}

fn lock_state(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}

impl LockFile {
    pub(crate) fn open(path: &Path, create: bool) -> io::Result<LockFile> {
        let mut table = OPEN_FILES.lock().unwrap_or_else(|e| e.into_inner());
        table.retain(|_, weak| weak.strong_count() > 0);
        // Look the file up by path first: opening and closing a second descriptor would drop
        // the locks this process already holds on it.
        if let Ok(id) = path_id(path) {
            if let Some(shared) = table.get(&id).and_then(Weak::upgrade) {
                return Ok(LockFile { shared, held: Mutex::new(None) });
            }
        }
        let file = crate::fs::open_regular_rw(path, create, false)?;
        let m = file.metadata()?;
        let id = FileId { dev: m.dev(), ino: m.ino() };
        let shared = Arc::new(Shared { file, id, state: Mutex::default(), changed: Condvar::new() });
        table.insert(id, Arc::downgrade(&shared));
        Ok(LockFile { shared, held: Mutex::new(None) })
    }

    fn set_held(&self, mode: Option<LockMode>) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = mode;
    }

    pub(crate) fn try_lock(&self, mode: LockMode) -> io::Result<bool> {
        let mut st = lock_state(&self.shared);
        if st.conflicts(mode) {
            return Ok(false);
        }
        if mode == LockMode::Exclusive || st.readers == 0 {
            match fcntl(&self.shared.file, FcntlArg::F_SETLK(&whole_file(kind(mode)))) {
                Ok(_) => {}
                Err(Errno::EAGAIN | Errno::EACCES) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        match mode {
            LockMode::Shared => st.readers += 1,
            LockMode::Exclusive => st.writer = true,
        }
        self.set_held(Some(mode));
        Ok(true)
    }

    pub(crate) fn lock(&self, mode: LockMode) -> io::Result<()> {
        let mut st = lock_state(&self.shared);
        while st.conflicts(mode) {
            st = self.shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if mode == LockMode::Exclusive || st.readers == 0 {
            st.busy = true;
            drop(st);
            let result = loop {
                match fcntl(&self.shared.file, FcntlArg::F_SETLKW(&whole_file(kind(mode)))) {
                    Err(Errno::EINTR) => continue,
                    other => break other,
                }
            };
            st = lock_state(&self.shared);
            st.busy = false;
            self.shared.changed.notify_all();
            result?;
        }
        match mode {
            LockMode::Shared => st.readers += 1,
            LockMode::Exclusive => st.writer = true,
        }
        self.set_held(Some(mode));
        Ok(())
    }

    pub(crate) fn unlock(&self) -> io::Result<()> {
        let Some(mode) = self.held.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return Ok(());
        };
        let mut st = lock_state(&self.shared);
        let last = match mode {
            LockMode::Shared => {
                st.readers -= 1;
                st.readers == 0
            }
            LockMode::Exclusive => {
                st.writer = false;
                true
            }
        };
        let result = if last {
            fcntl(&self.shared.file, FcntlArg::F_SETLK(&whole_file(libc::F_UNLCK))).map(drop)
        } else {
            Ok(())
        };
        self.shared.changed.notify_all();
        Ok(result?)
    }

    pub(crate) fn probe(&self) -> io::Result<Probe> {
        {
            let st = lock_state(&self.shared);
            let me = Some(std::process::id());
            if st.writer {
                return Ok(Probe::Held { mode: LockMode::Exclusive, pid: me });
            }
            if st.readers > 0 {
                return Ok(Probe::Held { mode: LockMode::Shared, pid: me });
            }
        }
        let mut fl = whole_file(libc::F_WRLCK);
        fcntl(&self.shared.file, FcntlArg::F_GETLK(&mut fl))?;
        Ok(match fl.l_type as libc::c_int {
            libc::F_UNLCK => Probe::Free,
            t => Probe::Held {
                mode: if t == libc::F_RDLCK { LockMode::Shared } else { LockMode::Exclusive },
                pid: u32::try_from(fl.l_pid).ok().filter(|&p| p > 0),
            },
        })
    }

    pub(crate) fn id(&self) -> io::Result<FileId> {
        let m = self.shared.file.metadata()?;
        let id = FileId { dev: m.dev(), ino: m.ino() };
        debug_assert_eq!(id, self.shared.id);
        Ok(id)
    }

    pub(crate) fn file(&self) -> &File {
        &self.shared.file
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        let _ = self.unlock();
    }
}

pub(crate) fn path_id(path: &Path) -> io::Result<FileId> {
    // A link at the path is not the file it names: never the lock we hold.
    let m = std::fs::symlink_metadata(path)?;
    Ok(FileId { dev: m.dev(), ino: m.ino() })
}
