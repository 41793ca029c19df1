//! Windows: `LockFileEx` through `std::fs::File::{lock, try_lock, lock_shared, unlock}`.
//!
//! Untested here (CI runs Linux); written against the Win32 and `std` documentation.
//!
//! std locks the whole range of the file, which includes byte 0, the byte Python `fasteners`
//! locks with `msvcrt.locking`, so the two conflict. Lock handles are per file handle, so two
//! threads with their own [`LockFile`] exclude each other.
//!
//! The file is opened without `FILE_SHARE_DELETE`: while any buildlock handle has it open,
//! nobody can delete or rename it, so the "lock file replaced under its holder" split that Unix
//! must detect after the fact cannot happen here. [`FileId`] is therefore not needed and is
//! reported as a constant.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::windows::fs::OpenOptionsExt;
use std::path::Path;

use crate::{FileId, LockMode, Probe};

const FILE_SHARE_READ: u32 = 0x1;
const FILE_SHARE_WRITE: u32 = 0x2;

#[derive(Debug)]
pub(crate) struct LockFile {
    file: File,
}

impl LockFile {
    pub(crate) fn open(path: &Path, create: bool) -> io::Result<LockFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .share_mode(FILE_SHARE_READ | FILE_SHARE_WRITE)
            .open(path)?;
        Ok(LockFile { file })
    }

    pub(crate) fn try_lock(&self, mode: LockMode) -> io::Result<bool> {
        let r = match mode {
            LockMode::Shared => self.file.try_lock_shared(),
            LockMode::Exclusive => self.file.try_lock(),
        };
        match r {
            Ok(()) => Ok(true),
            Err(TryLockError::WouldBlock) => Ok(false),
            Err(TryLockError::Error(e)) => Err(e),
        }
    }

    pub(crate) fn lock(&self, mode: LockMode) -> io::Result<()> {
        match mode {
            LockMode::Shared => self.file.lock_shared(),
            LockMode::Exclusive => self.file.lock(),
        }
    }

    pub(crate) fn unlock(&self) -> io::Result<()> {
        self.file.unlock()
    }

    /// Windows has no "who holds this" query: take and drop the lock to see whether it is free.
    pub(crate) fn probe(&self) -> io::Result<Probe> {
        if self.try_lock(LockMode::Exclusive)? {
            self.unlock()?;
            return Ok(Probe::Free);
        }
        if self.try_lock(LockMode::Shared)? {
            self.unlock()?;
            return Ok(Probe::Held { mode: LockMode::Shared, pid: None });
        }
        Ok(Probe::Held { mode: LockMode::Exclusive, pid: None })
    }

    pub(crate) fn id(&self) -> io::Result<FileId> {
        Ok(FileId { dev: 0, ino: 0 })
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }
}

pub(crate) fn path_id(path: &Path) -> io::Result<FileId> {
    std::fs::metadata(path)?;
    Ok(FileId { dev: 0, ino: 0 })
}
