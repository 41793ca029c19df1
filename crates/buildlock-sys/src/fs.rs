//! Opening files in lock directories that other users may write to (a team's group-writable
//! directory, `/tmp`): no symbolic link is followed, no open blocks on a FIFO, and only regular
//! files are used.
//!
//! - [`open_regular_nonblocking`]: for reading what somebody else may have written (metadata,
//!   fencing tokens, keeper files, soft locks). A FIFO, device, directory or symbolic link at the
//!   path is an error at once, never a hang; so is a file larger than the caller allows.
//! - [`open_regular_rw`]: for locking or rewriting in place (lock files, fence files); refuses
//!   the same things, and a file with more than one hard link when asked to write into it.
//! - [`replace_file`]: writes a new file next to the path (`O_EXCL`, which never follows a link)
//!   and renames it over the path, so whatever was planted there is replaced, not written through.
//!
//! - [`create_dir_all`]: a lock directory and its parents, `rwxr-xr-x` at most.
//!
//! Modes are explicit, never just "whatever the umask leaves of 0666" (the daemon runs with a
//! umask of 0, not its starter's): a lock or fence file is as shared as its directory (read for
//! all, write for the group or others only where they may write the directory: a team's
//! group-writable directory, `/tmp`), and a file replaced by rename is `rw-r--r--`, or
//! `rw-------` where the caller asks for private.
//!
//! The errors say what was found (`it is a FIFO (named pipe), not a regular file`); callers add
//! the path and what to do.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Opens `path` for reading without following a symbolic link at its last component and without
/// blocking (a FIFO there would otherwise hang the open). Only a regular file of at most
/// `max_len` bytes is accepted (`ErrorKind::FileTooLarge` past that).
pub fn open_regular_nonblocking(path: &Path, max_len: u64) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true);
    let file = imp::open(path, &mut opts)?;
    let meta = file.metadata()?;
    check_regular(&meta)?;
    if meta.len() > max_len {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("it is {} bytes, more than the {max_len} expected here", meta.len()),
        ));
    }
    Ok(file)
}

/// Opens `path` for reading and writing (creating it if `create`), without following a symbolic
/// link at its last component and without blocking on a FIFO. Only a regular file is accepted;
/// with `single_link`, also only one that has no other hard link (so writing into it cannot
/// change a file elsewhere). The returned file is in blocking mode.
pub fn open_regular_rw(path: &Path, create: bool, single_link: bool) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).create(create).truncate(false);
    if create {
        imp::set_mode(&mut opts, shared_mode(path));
    }
    let file = imp::open(path, &mut opts)?;
    let meta = file.metadata()?;
    check_regular(&meta)?;
    if single_link && imp::links(&meta) > 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("it has {} hard links, so writing into it would change another file", imp::links(&meta)),
        ));
    }
    imp::set_blocking(&file)?;
    Ok(file)
}

/// Replaces the file at `path` with one holding `bytes`: written to a new temporary file in the
/// same directory (created exclusively, so a planted link is never followed), then renamed over
/// `path`. Readers see the old file or the whole new one.
pub fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_file_with_mode(path, bytes, 0o644)
}

/// [`replace_file`], the new file getting permission bits `mode` (e.g. `0o600` for a private one).
pub fn replace_file_with_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        imp::set_mode(&mut opts, mode);
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Creates directory `dir` and its missing parents with mode `rwxr-xr-x` (less the umask).
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    imp::create_dir_all(dir)
}

/// The mode for a lock or fence file created at `path`: `rw-r--r--`, plus write for the group
/// and for others where they may write the directory (so that a team shares the lock).
fn shared_mode(path: &Path) -> u32 {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    0o644 | imp::dir_mode(dir) & 0o022
}

/// A temporary name next to `path`, unique to this process and call.
fn temp_path(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}-{nanos}-{n}.tmp", std::process::id()))
}

fn check_regular(meta: &std::fs::Metadata) -> io::Result<()> {
    let ft = meta.file_type();
    if ft.is_file() {
        return Ok(());
    }
    let (kind, what) = if ft.is_dir() {
        (io::ErrorKind::IsADirectory, "a directory")
    } else if ft.is_symlink() {
        (io::ErrorKind::InvalidInput, "a symbolic link")
    } else {
        (io::ErrorKind::InvalidInput, imp::special_kind(ft))
    };
    Err(io::Error::new(kind, format!("it is {what}, not a regular file")))
}

#[cfg(unix)]
mod imp {
    use std::fs::{File, FileType, OpenOptions};
    use std::io;
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
    use std::path::Path;

    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use nix::libc;

    pub(super) fn set_mode(opts: &mut OpenOptions, mode: u32) {
        opts.mode(mode);
    }

    pub(super) fn dir_mode(dir: &Path) -> u32 {
        std::fs::metadata(dir).map_or(0, |m| m.mode())
    }

    pub(super) fn create_dir_all(dir: &Path) -> io::Result<()> {
        std::fs::DirBuilder::new().recursive(true).mode(0o755).create(dir)
    }

    pub(super) fn open(path: &Path, opts: &mut OpenOptions) -> io::Result<File> {
        // std adds O_CLOEXEC.
        opts.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
        match opts.open(path) {
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) && is_symlink(path) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "it is a symbolic link; buildlock follows no links at the files it writes or reads beside a lock \
                 (somebody may have planted it to turn the lock against another file)",
            )),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                // O_WRONLY|O_NONBLOCK on a FIFO without a reader; O_RDWR does not get here.
                Err(io::Error::new(io::ErrorKind::InvalidInput, "it is a FIFO or a socket, not a regular file"))
            }
            other => other,
        }
    }

    fn is_symlink(path: &Path) -> bool {
        std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
    }

    pub(super) fn set_blocking(file: &File) -> io::Result<()> {
        let flags = OFlag::from_bits_retain(fcntl(file, FcntlArg::F_GETFL)?);
        fcntl(file, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
        Ok(())
    }

    pub(super) fn links(meta: &std::fs::Metadata) -> u64 {
        meta.nlink()
    }

    pub(super) fn special_kind(ft: FileType) -> &'static str {
        if ft.is_fifo() {
            "a FIFO (named pipe)"
        } else if ft.is_socket() {
            "a socket"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else {
            "not a file"
        }
    }
}

#[cfg(not(unix))]
mod imp {
    use std::fs::{File, FileType, OpenOptions};
    use std::io;
    use std::path::Path;

    pub(super) fn set_mode(_opts: &mut OpenOptions, _mode: u32) {}

    pub(super) fn dir_mode(_dir: &Path) -> u32 {
        0
    }

    pub(super) fn create_dir_all(dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    pub(super) fn open(path: &Path, opts: &mut OpenOptions) -> io::Result<File> {
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "it is a symbolic link"));
        }
        opts.open(path)
    }

    pub(super) fn set_blocking(_file: &File) -> io::Result<()> {
        Ok(())
    }

    pub(super) fn links(_meta: &std::fs::Metadata) -> u64 {
        1
    }

    pub(super) fn special_kind(_ft: FileType) -> &'static str {
        "not a file"
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn refuses_links_fifos_directories_and_big_files_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();

        let err = open_regular_nonblocking(&link, 100).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        let err = open_regular_rw(&link, true, true).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        // Neither open blocks on the FIFO.
        let err = open_regular_nonblocking(&fifo, 100).unwrap_err();
        assert!(err.to_string().contains("FIFO"), "{err}");
        let err = open_regular_rw(&fifo, false, false).unwrap_err();
        assert!(err.to_string().contains("FIFO"), "{err}");
        let err = open_regular_nonblocking(dir.path(), 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::IsADirectory, "{err}");
        assert_eq!(open_regular_nonblocking(&victim, 3).unwrap_err().kind(), io::ErrorKind::FileTooLarge);
        assert!(open_regular_nonblocking(&victim, 8).is_ok());

        let hard = dir.path().join("hard");
        std::fs::hard_link(&victim, &hard).unwrap();
        assert!(open_regular_rw(&hard, false, true).unwrap_err().to_string().contains("hard links"));
        assert!(open_regular_rw(&hard, false, false).is_ok());

        // Replacing the link replaces the link, not the file it names.
        replace_file(&link, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "new");
        assert!(!std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    }
}
