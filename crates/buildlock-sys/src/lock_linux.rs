//! Linux: open-file-description record locks (`F_OFD_SETLK`) over the whole file.
//!
//! OFD locks conflict with the process-bound `fcntl`/`lockf` locks that Python `fasteners` takes
//! (they share one lock table), but belong to the open file description, so two handles in one
//! process exclude each other and closing an unrelated descriptor never drops them.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use nix::libc;

use crate::{FileId, LockMode, Probe};

#[derive(Debug)]
pub(crate) struct LockFile {
    file: File,
    /// The open file's (device, inode), read once: it cannot change while the file is open.
    id: Option<FileId>,
}

fn whole_file(kind: libc::c_int) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers; all-zero is a valid value, and OFD
    // locks require `l_pid` to be zero.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // to the end of the file, however it grows
    fl
}

fn kind(mode: LockMode) -> libc::c_int {
    match mode {
        LockMode::Shared => libc::F_RDLCK,
        LockMode::Exclusive => libc::F_WRLCK,
    }
}

impl LockFile {
    pub(crate) fn open(path: &Path, create: bool) -> io::Result<LockFile> {
        // Read and write, so both lock kinds are possible; std opens with O_CLOEXEC. O_NONBLOCK
        // (from the open that refuses FIFOs) stays: on a regular file it changes nothing for
        // reads, writes or locks (F_OFD_SETLKW still waits), and clearing it would cost a call
        // per acquisition.
        let (file, meta) = crate::fs::open_regular_rw_stat(path, create, false, false)?;
        Ok(LockFile { file, id: Some(FileId { dev: meta.dev(), ino: meta.ino() }) })
    }

    pub(crate) fn try_lock(&self, mode: LockMode) -> io::Result<bool> {
        match fcntl(&self.file, FcntlArg::F_OFD_SETLK(&whole_file(kind(mode)))) {
            Ok(_) => Ok(true),
            Err(Errno::EAGAIN | Errno::EACCES) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) fn lock(&self, mode: LockMode) -> io::Result<()> {
        loop {
            match fcntl(&self.file, FcntlArg::F_OFD_SETLKW(&whole_file(kind(mode)))) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub(crate) fn unlock(&self) -> io::Result<()> {
        fcntl(&self.file, FcntlArg::F_OFD_SETLK(&whole_file(libc::F_UNLCK)))?;
        Ok(())
    }

    pub(crate) fn probe(&self) -> io::Result<Probe> {
        let mut fl = whole_file(libc::F_WRLCK);
        fcntl(&self.file, FcntlArg::F_OFD_GETLK(&mut fl))?;
        Ok(match fl.l_type as libc::c_int {
            libc::F_UNLCK => Probe::Free,
            t => Probe::Held {
                mode: if t == libc::F_RDLCK { LockMode::Shared } else { LockMode::Exclusive },
                // OFD locks report -1; process-bound POSIX locks report their owner.
                pid: u32::try_from(fl.l_pid).ok().filter(|&p| p > 0),
            },
        })
    }

    pub(crate) fn id(&self) -> io::Result<FileId> {
        if let Some(id) = self.id {
            return Ok(id);
        }
        let m = self.file.metadata()?;
        Ok(FileId { dev: m.dev(), ino: m.ino() })
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    pub(crate) fn from_file(file: File) -> LockFile {
        LockFile { file, id: None }
    }

    pub(crate) fn into_file(self) -> File {
        self.file
    }
}

pub(crate) fn path_id(path: &Path) -> io::Result<FileId> {
    // A link at the path is not the file it names: never the lock we hold.
    let m = std::fs::symlink_metadata(path)?;
    Ok(FileId { dev: m.dev(), ino: m.ino() })
}
