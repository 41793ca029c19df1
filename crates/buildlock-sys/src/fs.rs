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
//! - [`install_file`]: the same, but replacing a file already there only if the caller agrees
//!   (asked only when there is one: `RENAME_NOREPLACE`); returns the new file's [`FileStamp`],
//!   which [`remove_if_stamp`] checks before removing it.
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
    open_regular_rw_stat(path, create, single_link, true).map(|(file, _)| file)
}

/// [`open_regular_rw`], also returning what `fstat` said of the file opened (its id, size and
/// link count: callers need not ask again). With `blocking` false the descriptor keeps
/// `O_NONBLOCK`, which changes nothing for reading and writing a regular file and saves a
/// system call (fence files).
///
/// The file is opened without `O_CREAT` first: it exists on every acquisition but the first,
/// and then the directory need not be looked at for the new file's mode.
pub fn open_regular_rw_stat(
    path: &Path,
    create: bool,
    single_link: bool,
    blocking: bool,
) -> io::Result<(File, std::fs::Metadata)> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).truncate(false);
    let file = match imp::open(path, &mut opts) {
        Err(e) if create && e.kind() == io::ErrorKind::NotFound => {
            opts.create(true);
            imp::set_mode(&mut opts, shared_mode(path));
            imp::open(path, &mut opts)?
        }
        other => other?,
    };
    let meta = file.metadata()?;
    check_regular(&meta)?;
    if single_link && imp::links(&meta) > 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("it has {} hard links, so writing into it would change another file", imp::links(&meta)),
        ));
    }
    if blocking {
        imp::set_blocking(&file)?;
    }
    Ok((file, meta))
}

/// What identifies one version of a file: (device, inode), size and modification time. A file
/// replaced, rewritten or deleted and recreated no longer matches (see [`install_file`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    pub id: crate::FileId,
    pub len: u64,
    pub modified: Option<std::time::SystemTime>,
}

impl FileStamp {
    /// Whether `now` (a stamp just read) is the version this stamp describes; a stamp without
    /// a time is checked by id and size alone.
    pub fn matches(&self, now: &FileStamp) -> bool {
        self.id == now.id && self.len == now.len && (self.modified.is_none() || self.modified == now.modified)
    }

    /// The stamp of the file `meta` describes.
    pub fn of(meta: &std::fs::Metadata) -> FileStamp {
        FileStamp { id: imp::file_id(meta), len: meta.len(), modified: meta.modified().ok() }
    }
}

/// The stamp of the file at `path` itself (a symbolic link's own, never the file it names).
pub fn path_stamp(path: &Path) -> io::Result<FileStamp> {
    std::fs::symlink_metadata(path).map(|m| FileStamp::of(&m))
}

/// Puts a new file holding `bytes` (mode `rw-r--r--`) at `path` atomically: written to a
/// temporary file next to it (created exclusively, so a planted link is never followed), then
/// renamed into place without replacing anything (`renameat2(RENAME_NOREPLACE)` on Linux).
/// Only if a file is already there is `may_replace` asked (it may read that file); if it says
/// yes, the new file replaces the old one, atomically; if no, nothing changes and `Ok(None)` is
/// returned. Readers see no file, the old one, or the whole new one, never a part.
///
/// Returns the new file's stamp, so that its writer can later tell it is still the one at `path`
/// ([`remove_if_stamp`]) without reading it back.
pub fn install_file(path: &Path, bytes: &[u8], may_replace: &mut dyn FnMut() -> bool) -> io::Result<Option<FileStamp>> {
    install_new(path, None, bytes, may_replace)
}

/// [`install_file`], keeping a file it replaces at `spare` when one is given.
fn install_new(
    path: &Path,
    spare: Option<&Path>,
    bytes: &[u8],
    may_replace: &mut dyn FnMut() -> bool,
) -> io::Result<Option<FileStamp>> {
    let tmp = temp_path(path);
    let result = (|| {
        let stamp = write_new(&tmp, bytes)?;
        if move_into_place(&tmp, path, spare, Move::Rename, may_replace)? {
            Ok(Some(stamp))
        } else {
            let _ = std::fs::remove_file(&tmp);
            Ok(None)
        }
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// [`install_file`], reusing the file at `spare` instead of creating one when it is there (a
/// regular file of ours with a single link): `bytes`, padded with spaces to the spare's size
/// (for JSON, trailing white space is nothing), are written into it in place, then it is given
/// the name `path` as well (a hard link, which like `RENAME_NOREPLACE` fails if anything is
/// there), so that [`retire_if_stamp`] need only remove that name. Where the file system has no
/// hard links it is renamed to `path` as a new file would be. Nobody reads `spare`; the caller
/// serialises its users (an exclusive lock).
///
/// What this saves: creating and deleting a file on every use (on ext4 without a journal, each
/// new inode costs a search past every one freed in the last 30 s), and half of the directory
/// updates of a rename there and back (a link and an unlink cost about what one rename does).
///
/// The stamp returned has no modification time (reading it would cost a call): the file is
/// known by (device, inode) and size.
pub fn install_file_reusing(
    path: &Path,
    spare: &Path,
    bytes: &[u8],
    may_replace: &mut dyn FnMut() -> bool,
) -> io::Result<Option<FileStamp>> {
    match rewrite_kept(spare, bytes) {
        None => install_new(path, Some(spare), bytes, may_replace),
        Some(stamp) => {
            // Written whole before it is linked into place, or not linked at all.
            let stamp = stamp?;
            Ok(move_into_place(spare, path, Some(spare), Move::Link, may_replace)?.then_some(stamp))
        }
    }
}

/// Writes `bytes` in place into the file kept at `kept` (a regular file of ours with a single
/// link, of at most 64 KiB), padded with spaces to its size (for JSON, trailing white space is
/// nothing); its stamp, without a modification time. `None`: no such file there, so the caller
/// makes a new one.
fn rewrite_kept(kept: &Path, bytes: &[u8]) -> Option<io::Result<FileStamp>> {
    const MAX_KEPT: u64 = 64 * 1024;
    let (file, meta) = match open_regular_rw_stat(kept, false, true, false) {
        Ok((f, m)) if m.len() <= MAX_KEPT => (f, m),
        _ => return None,
    };
    let mut padded;
    let mut data = bytes;
    if (bytes.len() as u64) < meta.len() {
        padded = bytes.to_vec();
        padded.resize(meta.len() as usize, b' ');
        data = &padded;
    }
    let written = imp::write_all_at(&file, data);
    Some(written.map(|()| FileStamp { id: imp::file_id(&meta), len: data.len() as u64, modified: None }))
}

/// A new file at `tmp` (created exclusively, so a planted link is never followed; mode
/// `rw-r--r--`) holding `bytes`; returns its stamp.
fn write_new(tmp: &Path, bytes: &[u8]) -> io::Result<FileStamp> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    imp::set_mode(&mut opts, 0o644);
    let mut f = opts.open(tmp)?;
    f.write_all(bytes)?;
    Ok(FileStamp::of(&f.metadata()?))
}

/// How [`move_into_place`] puts a file at its path when nothing is there.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Move {
    /// Renamed: the old name goes.
    Rename,
    /// Linked: the old name stays (falling back to a rename where there are no hard links).
    Link,
}

/// Moves (renames, or with [`Move::Link`] links) `from` to `path` without replacing anything;
/// if something is at `path` (or the file system cannot say without replacing it), only if
/// `may_replace` says so, replacing it atomically. `Ok(false)`: left where it was.
///
/// A regular file at `path` (a holder's left over by its death) is replaced by exchanging the
/// two (`renameat2(RENAME_EXCHANGE)`), not by a rename over it: that would make ext4 write the
/// new file out at once and free the old one (its "replace by rename" safety net), about half a
/// millisecond on the way to a grant. The old file, at `from` after the exchange, is then kept
/// at `spare` if nothing is there (to be written over next time), else removed.
fn move_into_place(
    from: &Path,
    path: &Path,
    spare: Option<&Path>,
    how: Move,
    may_replace: &mut dyn FnMut() -> bool,
) -> io::Result<bool> {
    let moved = match how {
        Move::Link => match imp::link_noreplace(from, path) {
            Ok(false) => imp::rename_noreplace(from, path),
            other => other,
        },
        Move::Rename => imp::rename_noreplace(from, path),
    };
    match moved {
        Ok(true) => return Ok(true),
        Ok(false) => {}
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        Err(_) => {}
    }
    if !may_replace() {
        return Ok(false);
    }
    let regular = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file());
    if regular && imp::rename_exchange(from, path)? {
        let kept = match spare {
            Some(spare) if spare == from => true,
            Some(spare) => matches!(imp::rename_noreplace(from, spare), Ok(true)),
            None => false,
        };
        if !kept {
            let _ = std::fs::remove_file(from);
        }
        return Ok(true);
    }
    std::fs::rename(from, path)?;
    Ok(true)
}

/// Replaces the file at `path` (which must exist: the caller's own) with one holding `bytes`,
/// atomically. The new content goes into the file kept at `next` when there is one (a regular
/// file of ours with a single link, as [`install_file_reusing`] checks its spare), written in
/// place and padded with spaces, and that file is renamed over `path`; [`retire_if_stamp`] puts
/// it back at `next` at the release. The file it replaces is normally still the spare as well
/// (installed by a link), so nothing is freed. So a holder that hands its lock over (`run`
/// naming its command) creates and frees no file: on ext4 without a journal each new inode
/// costs a search past every one freed in the last 30 s. Nobody reads `next`; the caller
/// serialises its users (an exclusive lock). (ext4 writes a file renamed over another out at
/// once if it has blocks not yet allocated, its "replace by rename" safety net; a file
/// rewritten in place has none after its first write-back.)
///
/// Without a kept file, the new content goes into a new file, exchanged with the old one
/// (`renameat2(RENAME_EXCHANGE)`: the new file's blocks are not allocated yet), and the old one
/// is kept at `next` unless something is there.
pub fn replace_file_keeping(path: &Path, bytes: &[u8], next: &Path) -> io::Result<FileStamp> {
    if let Some(stamp) = rewrite_kept(next, bytes) {
        let stamp = stamp?;
        std::fs::rename(next, path)?;
        return Ok(stamp);
    }
    let tmp = temp_path(path);
    let result = (|| {
        let stamp = write_new(&tmp, bytes)?;
        if imp::rename_exchange(&tmp, path)? {
            // `tmp` now names the old file: keep it at `next`, unless something is there.
            if !matches!(imp::rename_noreplace(&tmp, next), Ok(true)) {
                std::fs::remove_file(&tmp)?;
            }
        } else {
            std::fs::rename(&tmp, path)?;
        }
        Ok(stamp)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes the file at `path` if it is still the one `stamp` describes, as [`remove_if_stamp`]
/// does. A file with another name as well (the spare it was linked from by
/// [`install_file_reusing`]) just loses this one. A file with no other name is renamed to the
/// first of `keep` where nothing is (for [`install_file_reusing`] or [`replace_file_keeping`]
/// to use next), else unlinked.
pub fn retire_if_stamp(path: &Path, stamp: &FileStamp, keep: &[&Path]) -> io::Result<bool> {
    let now = match std::fs::symlink_metadata(path) {
        Ok(now) => now,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if !stamp.matches(&FileStamp::of(&now)) {
        return Ok(false);
    }
    if imp::links(&now) == 1 && keep.iter().any(|k| matches!(imp::rename_noreplace(path, k), Ok(true))) {
        return Ok(true);
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes the file at `path` if it is still the one `stamp` describes. `Ok(false)` when it is
/// not (another file, or none): nothing is removed then.
pub fn remove_if_stamp(path: &Path, stamp: &FileStamp) -> io::Result<bool> {
    match path_stamp(path) {
        Ok(now) if stamp.matches(&now) => match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        },
        Ok(_) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
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
    path.with_file_name(format!(".{name}.{}-{nanos}-{n}.tmp", crate::current_pid()))
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
        // The only status flag `open` set is O_NONBLOCK (O_APPEND, O_ASYNC, O_DIRECT and
        // O_NOATIME never are), so clearing them all is clearing it: one call, no F_GETFL.
        fcntl(file, FcntlArg::F_SETFL(OFlag::empty()))?;
        Ok(())
    }

    pub(super) fn file_id(meta: &std::fs::Metadata) -> crate::FileId {
        crate::FileId { dev: meta.dev(), ino: meta.ino() }
    }

    pub(super) fn write_all_at(file: &File, bytes: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(file, bytes, 0)
    }

    /// `Ok(true)`: renamed; `Err(AlreadyExists)`: something is at `to`; `Ok(false)`: this file
    /// system cannot rename without replacing (the caller checks first, then replaces).
    #[cfg(target_os = "linux")]
    pub(super) fn rename_noreplace(from: &Path, to: &Path) -> io::Result<bool> {
        use nix::errno::Errno;
        use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
        match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => Ok(true),
            Err(Errno::EEXIST) => Err(io::ErrorKind::AlreadyExists.into()),
            Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub(super) fn rename_noreplace(_from: &Path, _to: &Path) -> io::Result<bool> {
        Ok(false)
    }

    /// Gives the file at `from` (not following a symbolic link there) the name `to` as well.
    /// `Ok(true)`: linked; `Err(AlreadyExists)`: something is at `to`; `Ok(false)`: this file
    /// system (or its owner's rules, `fs.protected_hardlinks`) allows no such link here.
    pub(super) fn link_noreplace(from: &Path, to: &Path) -> io::Result<bool> {
        use nix::errno::Errno;
        use nix::fcntl::{AtFlags, AT_FDCWD};
        match nix::unistd::linkat(AT_FDCWD, from, AT_FDCWD, to, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::EEXIST) => Err(io::ErrorKind::AlreadyExists.into()),
            Err(Errno::EPERM | Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EMLINK | Errno::EXDEV) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// `Ok(true)`: the two names now name each other's file; `Ok(false)`: not supported here
    /// (or `b` is gone), nothing changed.
    #[cfg(target_os = "linux")]
    pub(super) fn rename_exchange(a: &Path, b: &Path) -> io::Result<bool> {
        use nix::errno::Errno;
        use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
        match renameat2(AT_FDCWD, a, AT_FDCWD, b, RenameFlags::RENAME_EXCHANGE) {
            Ok(()) => Ok(true),
            Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::ENOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub(super) fn rename_exchange(_a: &Path, _b: &Path) -> io::Result<bool> {
        Ok(false)
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

    pub(super) fn write_all_at(mut file: &File, bytes: &[u8]) -> io::Result<()> {
        use std::io::{Seek, SeekFrom, Write};
        file.seek(SeekFrom::Start(0))?;
        file.write_all(bytes)
    }

    pub(super) fn file_id(_meta: &std::fs::Metadata) -> crate::FileId {
        // No stable inode number through std here: the size and time still tell versions apart.
        crate::FileId { dev: 0, ino: 0 }
    }

    pub(super) fn rename_noreplace(_from: &Path, _to: &Path) -> io::Result<bool> {
        Ok(false)
    }

    pub(super) fn rename_exchange(_a: &Path, _b: &Path) -> io::Result<bool> {
        Ok(false)
    }

    pub(super) fn link_noreplace(_from: &Path, _to: &Path) -> io::Result<bool> {
        // Renamed there and back instead, as before hard links were used on Unix.
        Ok(false)
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

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn a_file_left_at_the_path_is_replaced_and_kept_as_the_spare_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (path, spare) = (dir.path().join("x.pid"), dir.path().join("x.pid.spare"));
        // Left by a dead holder; no spare (it was moved into place then).
        std::fs::write(&path, "old").unwrap();
        let mut asked = 0;
        let stamp = install_file_reusing(&path, &spare, b"new", &mut || {
            asked += 1;
            true
        })
        .unwrap()
        .expect("installed");
        assert_eq!(asked, 1);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        assert!(stamp.matches(&path_stamp(&path).unwrap()));
        // The old file is the spare now, written over by the next install.
        assert_eq!(std::fs::read_to_string(&spare).unwrap(), "old");
        assert_eq!(names(dir.path()), ["x.pid", "x.pid.spare"]);
        // Left again, with the spare there: the spare is written and exchanged in; what it
        // replaced becomes the spare.
        std::fs::write(&path, "older").unwrap();
        install_file_reusing(&path, &spare, b"newer", &mut || true).unwrap().expect("installed");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "newer");
        assert_eq!(std::fs::read_to_string(&spare).unwrap(), "older");
        // Without a spare to keep it at, what is replaced is removed.
        install_file(&path, b"newest", &mut || true).unwrap().expect("installed");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "newest");
        assert_eq!(names(dir.path()), ["x.pid", "x.pid.spare"]);
        // Not allowed to: nothing changes, nothing is left behind.
        assert_eq!(install_file(&path, b"no", &mut || false).unwrap(), None);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "newest");
        assert_eq!(names(dir.path()), ["x.pid", "x.pid.spare"]);
    }

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
