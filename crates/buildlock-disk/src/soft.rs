//! The soft-lock backend, for file systems where OS locks do not work (or when asked for).
//!
//! The lock is the existence of `X.lock`. It is created atomically together with its metadata:
//! the JSON is written to a temporary file which is then hard-linked into place, which fails if
//! `X.lock` exists (where hard links are refused, `O_CREAT|O_EXCL` is used and the metadata
//! follows). So a soft lock without metadata can only come from another tool. A holder refreshes
//! the file's modification time (its heartbeat) while it holds; `.lock.pid` gets a copy of the
//! metadata for old readers.
//!
//! Stale locks are judged by [`stale::judge`] and broken under a second lock, `X.lock.break`,
//! itself a soft lock: breakers take turns, and each re-checks under it that the file at the
//! path is still the very one judged stale (inode, metadata id and heartbeat) before removing it.
//! So of two processes breaking the same stale lock only one removes it, and a fresh lock that
//! replaced it is never removed. Known limit: a holder on another host judged stale (no
//! heartbeat for `stale_after`, e.g. a suspended machine) is broken although it may still run.
//!
//! Soft locks are always exclusive: existence cannot count readers.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use buildlock_sys::{FileId, LockFile, LockMode, Probe};

use crate::guard::{Guard, Held};
use crate::meta::{self, MetaRead, Metadata};
use crate::retry::{Retry, Stop};
use crate::stale::{self, Verdict};
use crate::{Broken, Error, Holder, LockOptions, LockState, LockStatus, LockTarget, Wait};

/// Pauses between two looks at a busy soft lock (no kernel wake-up exists for them): the first,
/// doubling up to the longest.
const FIRST_POLL: Duration = Duration::from_millis(1);
const MAX_POLL: Duration = Duration::from_millis(10);

/// What one look at a soft lock file found.
#[derive(Debug)]
struct Examined {
    id: FileId,
    /// The metadata id and modification time: with the inode, what makes "the same lock".
    fingerprint: (Option<String>, Option<SystemTime>),
    meta: MetaRead,
    /// Whether `meta` came from the separate `.lock.pid` (the lock file itself had none).
    meta_from_pid_file: bool,
    verdict: Verdict,
}

pub(crate) fn acquire(
    target: &LockTarget,
    opts: &LockOptions,
    wait: Wait,
    on_wait: &mut dyn FnMut(&Holder, Duration),
) -> Result<Guard, Error> {
    if opts.mode == LockMode::Shared {
        tracing::debug!("soft locks are exclusive; taking {} exclusively", target.path.display());
    }
    let mut ours = Metadata::for_current_process(LockMode::Exclusive, "soft", &opts.operation, opts.command.clone());
    let deadline = match wait {
        Wait::Timeout(t) => Some(Instant::now() + t),
        _ => None,
    };
    let mut retry = Retry::new(FIRST_POLL, MAX_POLL, deadline, opts.cancel.as_ref());
    loop {
        if let Some(file) = create_exclusive(&target.path, &ours)? {
            // The fence advances only once the lock is ours; `.lock.pid` records the token.
            ours.token = match crate::fence::next_token(target, true) {
                Ok(token) => Some(token),
                Err(e) => {
                    // Just created by us and not yet announced: take it back.
                    drop(file);
                    let _ = std::fs::remove_file(&target.path);
                    return Err(e);
                }
            };
            let id = buildlock_sys::path_id(&target.path).map_err(|e| Error::io("stat", &target.path, e))?;
            // For readers that only know `.lock.pid`; the lock file itself already says it all.
            if let Err(e) = meta::write_atomic(&target.meta_path, &ours) {
                tracing::warn!("cannot write {}: {e}", target.meta_path.display());
            }
            let heartbeat = (opts.stale_after / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
            return Ok(Guard::new(target, ours, Held::Soft(file), id, Some(heartbeat), true));
        }
        let Some(seen) = examine(target, opts, true)? else {
            continue; // released between our attempt and our look: try again at once
        };
        if seen.verdict.is_stale() && break_stale(target, opts, &seen, false)? {
            continue;
        }
        let holder = || holder_from(&seen);
        if wait == Wait::NoWait {
            return Err(Error::WouldBlock {
                name: target.name.clone(),
                path: target.path.clone(),
                holder: Box::new(holder()),
            });
        }
        match retry.pause(|waited| on_wait(&holder(), waited)) {
            Ok(()) => {}
            Err(Stop::TimedOut(waited)) => {
                return Err(Error::Timeout {
                    name: target.name.clone(),
                    path: target.path.clone(),
                    waited,
                    holder: Box::new(holder()),
                })
            }
            Err(Stop::Cancelled) => {
                return Err(Error::Cancelled { name: target.name.clone(), path: target.path.clone() })
            }
        }
    }
}

/// Creates `path` holding `meta`, atomically, unless it exists (`Ok(None)`).
fn create_exclusive(path: &Path, meta: &Metadata) -> Result<Option<File>, Error> {
    let json = meta.to_json();
    let tmp = meta::temp_path(path);
    let write = |p: &Path| -> io::Result<File> {
        let mut f = OpenOptions::new().read(true).write(true).create_new(true).open(p)?;
        f.write_all(json.as_bytes())?;
        Ok(f)
    };
    let file = write(&tmp).map_err(|e| Error::io("create a temporary file", &tmp, e))?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(Some(file)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(None),
        Err(e) if link_unsupported(&e) => {
            // No hard links here: exclusive creation, then the content. A reader that looks in
            // between sees "no metadata, recent": active, the safe side.
            match write(path) {
                Ok(f) => Ok(Some(f)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(Error::io("create the soft lock", path, e)),
            }
        }
        Err(e) => Err(Error::io("create the soft lock", path, e)),
    }
}

fn link_unsupported(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::PermissionDenied | io::ErrorKind::Unsupported)
        || buildlock_sys::lock_unsupported(e)
}

/// Looks at the soft lock at `target` (None: no such file). With `probe_os`, a file someone holds
/// an OS lock on is active whatever its metadata says.
///
/// Only an empty file or one holding metadata we recognise is a soft lock; anything else (a
/// Makefile named as the lock, a link, a FIFO) is [`Error::NotALock`], never judged stale. An
/// empty lock file is judged by its `.lock.pid`, or by its age when there is none; a `.lock.pid`
/// that is not metadata leaves it unjudgeable, so that is an error too.
fn examine(target: &LockTarget, opts: &LockOptions, probe_os: bool) -> Result<Option<Examined>, Error> {
    examine_path(&target.path, Some(&target.meta_path), opts, probe_os)
}

fn examine_path(
    path: &Path,
    pid_file: Option<&Path>,
    opts: &LockOptions,
    probe_os: bool,
) -> Result<Option<Examined>, Error> {
    let not_a_lock = |reason: String| Error::NotALock { path: path.to_owned(), what: "a lock file", reason };
    let file = match buildlock_sys::fs::open_regular_nonblocking(path, meta::MAX_METADATA_BYTES) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Err(Error::io("read the lock file", path, e)),
        Err(e) if e.kind() == io::ErrorKind::FileTooLarge => {
            return Err(not_a_lock(format!("{e}, too big for a lock")))
        }
        Err(e) => return Err(not_a_lock(e.to_string())),
    };
    let stat = file.metadata().map_err(|e| Error::io("stat", path, e))?;
    let Ok(id) = buildlock_sys::path_id(path) else { return Ok(None) };
    let mut meta = meta::read_from(&file);
    if let MetaRead::Corrupt(why) = &meta {
        return Err(not_a_lock(format!("it holds no lock metadata: {why}")));
    }
    let mut meta_from_pid_file = false;
    if let (None, Some(p)) = (meta.valid(), pid_file) {
        match meta::read(p) {
            MetaRead::Valid(m) => {
                meta = MetaRead::Valid(m);
                meta_from_pid_file = true;
            }
            MetaRead::Missing => {}
            MetaRead::Corrupt(why) => {
                return Err(Error::NotALock {
                    path: p.to_owned(),
                    what: "lock metadata",
                    reason: format!("{why}; so nothing tells who holds the soft lock {}", path.display()),
                })
            }
        }
    }
    let mtime = stat.modified().ok();
    let verdict = match probe_os.then(|| os_holder(path)).flatten() {
        Some(pid) => Verdict::Active(match pid {
            Some(pid) => format!("pid {pid} holds an OS lock on it"),
            None => "a process holds an OS lock on it".into(),
        }),
        None => verdict(&meta, mtime, opts),
    };
    let fingerprint = (meta.valid().and_then(|m| m.id.clone()), mtime);
    Ok(Some(Examined { id, fingerprint, meta, meta_from_pid_file, verdict }))
}

fn verdict(meta: &MetaRead, mtime: Option<SystemTime>, opts: &LockOptions) -> Verdict {
    let age = mtime.and_then(|t| SystemTime::now().duration_since(t).ok()).unwrap_or_default();
    stale::judge(meta, age, opts.stale_after, &buildlock_sys::hostname(), buildlock_sys::process_state)
}

/// `Some(pid)` when somebody holds an OS lock on `path` (pid if the OS tells).
fn os_holder(path: &Path) -> Option<Option<u32>> {
    match LockFile::open_existing(path).and_then(|f| f.probe()) {
        Ok(Probe::Held { pid, .. }) => Some(pid),
        _ => None,
    }
}

/// The verdict on a file that holds soft-lock metadata, read from an already open handle
/// (used by the OS backend, which holds the OS lock itself and so must not probe it).
pub(crate) fn verdict_of_file(_target: &LockTarget, opts: &LockOptions, mut file: &File) -> Option<Verdict> {
    file.rewind().ok()?;
    let meta = meta::read_from(file);
    let m = meta.valid().filter(|m| m.is_soft())?;
    let _ = m;
    Some(verdict(&meta, file.metadata().ok()?.modified().ok(), opts))
}

/// Whether the file at `path` holds soft-lock metadata (a soft lock, live or stale).
pub(crate) fn is_soft_lock_file(path: &Path) -> bool {
    buildlock_sys::fs::open_regular_nonblocking(path, meta::MAX_METADATA_BYTES)
        .map(|f| meta::read_from(f).valid().is_some_and(Metadata::is_soft))
        .unwrap_or(false)
}

fn holder_from(seen: &Examined) -> Holder {
    let meta = seen.meta.valid().cloned();
    let command = meta.as_ref().and_then(|m| {
        let local = m.hostname == buildlock_sys::hostname();
        local.then(|| buildlock_sys::command_line(m.pid)).flatten().or_else(|| m.command.clone())
    });
    Holder {
        mode: Some(LockMode::Exclusive),
        meta,
        os_pid: None,
        command,
        note: Some(seen.verdict.reason().to_owned()),
        ..Holder::default()
    }
}

pub(crate) fn describe_holder(target: &LockTarget, opts: &LockOptions) -> Holder {
    match examine(target, opts, true) {
        Ok(seen) => seen.map(|s| holder_from(&s)).unwrap_or_default(),
        Err(e) => Holder { note: Some(e.to_string()), ..Holder::default() },
    }
}

pub(crate) fn status(target: &LockTarget, opts: &LockOptions) -> Result<LockStatus, Error> {
    let Some(seen) = examine(target, opts, true)? else {
        return Ok(LockStatus {
            target: target.clone(),
            state: LockState::Free,
            kind: "soft",
            holder: None,
            detail: "no lock file".into(),
            lost: None,
        });
    };
    let state = if seen.verdict.is_stale() { LockState::Stale } else { LockState::Held };
    Ok(LockStatus {
        target: target.clone(),
        state,
        kind: "soft",
        holder: Some(holder_from(&seen)),
        detail: seen.verdict.reason().to_owned(),
        lost: None,
    })
}

pub(crate) fn break_lock(target: &LockTarget, opts: &LockOptions, force: bool) -> Result<Broken, Error> {
    let Some(seen) = examine(target, opts, true)? else {
        return Ok(Broken::NotHeld { cleaned: None });
    };
    let refuse = |reason: String| Error::Refused {
        name: target.name.clone(),
        path: target.path.clone(),
        reason,
        holder: Some(Box::new(holder_from(&seen))),
    };
    if let Verdict::Active(why) = &seen.verdict {
        if !force {
            return Err(refuse(format!("{why}; it is not stale (use --force only if you know its holder is gone)")));
        }
        if os_holder(&target.path).is_some() {
            return Err(refuse(format!("{why}; --force cannot break an OS lock")));
        }
    }
    if break_stale(target, opts, &seen, force)? {
        Ok(Broken::Broken { reason: seen.verdict.reason().to_owned() })
    } else {
        Err(refuse("it changed while being checked (another process broke, released or re-took it); look again".into()))
    }
}

/// Removes the soft lock judged stale in `seen`, if it is still that very lock. Only one
/// breaker at a time (under `X.lock.break`). `Ok(false)`: not removed (someone else is
/// breaking it, or it changed), look again.
fn break_stale(target: &LockTarget, opts: &LockOptions, seen: &Examined, force: bool) -> Result<bool, Error> {
    let Some(_turn) = BreakTurn::take(target, opts)? else { return Ok(false) };
    let Some(now) = examine(target, opts, true)? else { return Ok(false) };
    if now.id != seen.id || now.fingerprint != seen.fingerprint || !(force || now.verdict.is_stale()) {
        return Ok(false);
    }
    // Removed only while we hold its OS lock too (where the file system has OS locks): an
    // OS-lock user who opened this file meanwhile then either holds it (we leave it alone) or
    // waits, and finds the path replaced once it gets it. A probe alone would leave a window in
    // which it locks the file we are about to remove, and a new soft lock makes two holders.
    let _os_lock = match LockFile::open_existing(&target.path) {
        Ok(file) => match file.try_lock(LockMode::Exclusive) {
            Ok(true) if file.id().is_ok_and(|id| id == now.id) => Some(file),
            Ok(_) => return Ok(false),
            Err(e) if buildlock_sys::lock_unsupported(&e) => None,
            Err(e) => return Err(Error::io("lock", &target.path, e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io("open", &target.path, e)),
    };
    match fs::remove_file(&target.path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io("remove the stale lock", &target.path, e)),
    }
    let pid_file_is_its = now.meta_from_pid_file
        || matches!((meta::read(&target.meta_path).valid(), now.meta.valid()), (Some(a), Some(b)) if a.id == b.id);
    if pid_file_is_its {
        let _ = fs::remove_file(&target.meta_path);
    }
    let how = if force && !now.verdict.is_stale() { "Forcibly removed lock" } else { "Removed stale lock" };
    tracing::warn!("{how} {} ({})", target.path.display(), now.verdict.reason());
    if now.verdict.is_stale() {
        let rule = crate::recovery::rule_of(&now.meta);
        crate::recovery::recovered(&target.path, &now.meta, rule, now.verdict.reason());
    }
    Ok(true)
}

/// The right to break `X.lock`: the soft lock `X.lock.break`, held for the microseconds a
/// break takes. A breaker that died holding it is itself judged stale like any soft lock.
struct BreakTurn {
    path: PathBuf,
    id: String,
}

impl BreakTurn {
    fn take(target: &LockTarget, opts: &LockOptions) -> Result<Option<BreakTurn>, Error> {
        let mut path = target.path.clone().into_os_string();
        path.push(".break");
        let path = PathBuf::from(path);
        for _ in 0..2 {
            let ours = Metadata::for_current_process(LockMode::Exclusive, "soft", "breaking a stale lock", None);
            if create_exclusive(&path, &ours)?.is_some() {
                return Ok(Some(BreakTurn { path, id: ours.id.unwrap_or_default() }));
            }
            match examine_path(&path, None, opts, false)? {
                None => continue,
                Some(other) if other.verdict.is_stale() => {
                    tracing::warn!("Removed stale break marker {} ({})", path.display(), other.verdict.reason());
                    remove_if_same(&path, &other);
                }
                Some(_) => return Ok(None), // another breaker is at work: let it finish
            }
        }
        Ok(None)
    }
}

impl Drop for BreakTurn {
    fn drop(&mut self) {
        let _ = meta::remove_if_ours(&self.path, &self.id);
    }
}

/// Removes the file at `path` only if it is the one `seen` describes: move it aside first, then
/// look at what was moved, and put it back if it was another.
fn remove_if_same(path: &Path, seen: &Examined) {
    let aside = meta::temp_path(path);
    if fs::rename(path, &aside).is_err() {
        return;
    }
    let moved_id = buildlock_sys::path_id(&aside).ok();
    let moved_meta = meta::read(&aside);
    let same = moved_id == Some(seen.id) && moved_meta.valid().and_then(|m| m.id.clone()) == seen.fingerprint.0;
    if !same {
        let _ = fs::hard_link(&aside, path);
    }
    let _ = fs::remove_file(&aside);
}
