//! The OS-lock backend: the kernel decides who holds a lock; files only explain.
//!
//! Acquiring: open `X.lock` (never writing into it), take the OS lock, then check that the
//! locked file is still the one at the path (a tool may have deleted it; the next locker would
//! create a new file and a second holder would appear) and retry if not. Then write `X.lock.pid`.
//!
//! Waiting forever: a helper thread blocks in the kernel (`F_OFD_SETLKW`), so a waiter is woken
//! the moment the holder releases or dies, without polling, while the calling thread reports the
//! holder about once a second. (The daemon, which waits for many clients, shares one such thread
//! per lock: [`crate::wait_lock`].)
//!
//! Waiting with a deadline or a [`crate::Cancel`]: the calling thread tries again and again,
//! 0.5 ms apart at first, then up to 10 ms apart. The kernel takes a blocked lock request back
//! only on a signal, and a helper left blocked in it after its caller gave up would take the
//! lock when it came free, if only for a moment: enough for a `-n` attempt elsewhere to fail,
//! or for a later acquisition by this very process to be refused.

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use buildlock_sys::fs::FileStamp;
use buildlock_sys::{FileId, LockFile, LockMode, Probe, ProcessState};

use crate::fence::FenceFile;

use crate::guard::{Guard, Held};
use crate::meta::{self, MetaRead, Metadata};
use crate::retry::{Retry, Stop, REPORT_EVERY};
use crate::{soft, Error, Holder, LockOptions, LockTarget, Wait};

/// How often to look again at a lock held by a soft-lock holder (no kernel wake-up exists).
const SOFT_HOLDER_POLL: Duration = Duration::from_millis(20);
/// A wait that may end early tries again after this long at first, doubling up to `POLL_MAX`.
const POLL_FIRST: Duration = Duration::from_micros(500);
const POLL_MAX: Duration = Duration::from_millis(10);

// Returned once per acquisition and unpacked at once: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Outcome {
    Locked(Guard),
    /// The file system refuses OS locks; the caller falls back to soft locks.
    Unsupported(std::io::Error),
}

enum Attempt {
    Locked(Locked),
    Busy,
    Unsupported(std::io::Error),
}

pub(crate) fn acquire(
    target: &LockTarget,
    opts: &LockOptions,
    wait: Wait,
    on_wait: &mut dyn FnMut(&Holder, Duration),
) -> Result<Outcome, Error> {
    let (file, fence) = match try_idle(target, opts) {
        Some(Reused::Locked(file, fence)) => (file, fence),
        // The fence file kept with the idle lock file serves the grant, if still fresh then.
        Some(Reused::Busy(fence)) => (wait_after_busy(target, opts, wait, on_wait)?, fence.filter(FenceFile::is_fresh)),
        None => match try_lock(target, opts)? {
            Attempt::Locked(file) => (file, None),
            Attempt::Unsupported(e) => return Ok(Outcome::Unsupported(e)),
            Attempt::Busy => (wait_after_busy(target, opts, wait, on_wait)?, None),
        },
    };
    Ok(Outcome::Locked(take_over(target, opts, file, fence)?))
}

fn wait_after_busy(
    target: &LockTarget,
    opts: &LockOptions,
    wait: Wait,
    on_wait: &mut dyn FnMut(&Holder, Duration),
) -> Result<Locked, Error> {
    let deadline = match wait {
        Wait::NoWait => return Err(busy(target, opts, None)),
        Wait::Timeout(t) => Some(Instant::now() + t),
        Wait::Forever => None,
    };
    if opts.watch {
        crate::guard::start_watcher();
    }
    match (deadline, &opts.cancel) {
        (None, None) if opts.wait_here => block_until_locked(target, opts),
        (None, None) => wait_for(target, opts, on_wait),
        _ => poll_until_locked(target, opts, deadline, on_wait),
    }
}

enum Reused {
    Locked(Locked, Option<FenceFile>),
    /// Held by somebody else: the idle lock file is back in the cache, its fence file (if any)
    /// is for the wait's grant, which then opens none.
    Busy(Option<FenceFile>),
}

/// One non-blocking attempt on the lock file this process kept open from its last acquisition
/// of `target` ([`idle`]), if it has one: no `open`, no `fstat`, no `close`. `None`: no such
/// file, or it is no longer the one at the path (it is closed then), so open the path afresh.
fn try_idle(target: &LockTarget, opts: &LockOptions) -> Option<Reused> {
    let (locked, fence) = idle::take(&target.path)?;
    match locked.file.try_lock(opts.mode) {
        Ok(true) => match check_locked(target, opts, &locked.file) {
            Checked::Ok(id) if id == locked.id => Some(Reused::Locked(locked, fence)),
            // Replaced (or a live soft lock): closing drops our lock on the old file.
            Checked::Ok(_) | Checked::Replaced => None,
            Checked::SoftHolder => {
                drop(locked);
                Some(Reused::Busy(fence))
            }
        },
        // Busy: is that the lock at the path, or an old file somebody else still keeps open?
        Ok(false) if buildlock_sys::path_id(&target.path).is_ok_and(|now| now == locked.id) => {
            idle::put(&target.path, locked, None);
            Some(Reused::Busy(fence))
        }
        Ok(false) | Err(_) => None,
    }
}

/// Opens the lock file of `target`, creating it, and its directory only when that is missing:
/// no `mkdir` on the way of every acquisition.
fn open_lock_file(target: &LockTarget) -> Result<LockFile, Error> {
    match LockFile::open(&target.path) {
        // A missing directory, or a file where one should be: `create_dir_all` says which.
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
            buildlock_sys::fs::create_dir_all(target.dir())
                .map_err(|e| Error::io("create the lock directory", target.dir(), e))?;
            LockFile::open(&target.path)
        }
        other => other,
    }
    .map_err(|e| Error::io("open the lock file", &target.path, e))
}

/// One non-blocking attempt, retried only while the lock file keeps being replaced under us.
fn try_lock(target: &LockTarget, opts: &LockOptions) -> Result<Attempt, Error> {
    loop {
        let file = open_lock_file(target)?;
        match file.try_lock(opts.mode) {
            Ok(true) => {}
            Ok(false) => return Ok(Attempt::Busy),
            Err(e) if buildlock_sys::lock_unsupported(&e) => return Ok(Attempt::Unsupported(e)),
            Err(e) => return Err(Error::io("lock", &target.path, e)),
        }
        match check_locked(target, opts, &file) {
            Checked::Ok(id) => return Ok(Attempt::Locked(Locked { file, id })),
            Checked::Replaced => continue,
            Checked::SoftHolder => return Ok(Attempt::Busy),
        }
    }
}

/// A lock file with our OS lock on it, and its identity as checked against the path.
#[derive(Debug)]
pub(crate) struct Locked {
    pub(crate) file: LockFile,
    pub(crate) id: FileId,
}

enum Checked {
    /// Locked, on the file at the path (its id).
    Ok(FileId),
    /// The path now names another file; lock that one instead.
    Replaced,
    /// The file is a live soft lock of a process using `--soft`; treat as held.
    SoftHolder,
}

/// After the OS lock is taken: is it on the file at the path, and is that file not somebody's
/// live soft lock?
fn check_locked(target: &LockTarget, opts: &LockOptions, file: &LockFile) -> Checked {
    // One `lstat` of the path: its id, and its size (the same file's, when the ids match).
    let (id, len) = match (file.id(), buildlock_sys::fs::path_stamp(&target.path)) {
        (Ok(a), Ok(b)) if a == b.id => (a, b.len),
        _ => {
            tracing::debug!("{} was replaced while we locked it; retrying", target.path.display());
            return Checked::Replaced;
        }
    };
    // OS-lock files are always empty; content means a soft lock (ours or another tool's).
    if len > 0 && soft::verdict_of_file(target, opts, file.file()).is_some_and(|v| !v.is_stale()) {
        return Checked::SoftHolder;
    }
    Checked::Ok(id)
}

/// Blocks until the lock is ours, in a helper thread that is never abandoned: the caller waits
/// as long as it does, reporting the holder about once a second.
fn wait_for(
    target: &LockTarget,
    opts: &LockOptions,
    on_wait: &mut dyn FnMut(&Holder, Duration),
) -> Result<Locked, Error> {
    let start = Instant::now();
    let (tx, rx) = mpsc::sync_channel(1);
    let (t, o) = (target.clone(), opts.clone());
    std::thread::Builder::new()
        .name("buildlock-wait".into())
        .spawn(move || {
            // If the receiver has gone (the caller panicked in `on_wait`), the send fails, the
            // file drops and the lock is released at once.
            let _ = tx.send(block_until_locked(&t, &o));
        })
        .map_err(|e| Error::io("start a waiting thread for", &target.path, e))?;
    loop {
        match rx.recv_timeout(REPORT_EVERY) {
            Ok(result) => return result,
            Err(mpsc::RecvTimeoutError::Timeout) => on_wait(&describe_holder(target, opts), start.elapsed()),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Error::io("wait for", &target.path, std::io::Error::other("the waiting thread died")));
            }
        }
    }
}

/// Tries the lock again and again, in the calling thread, until it is ours, the deadline passes
/// (the last try is at the deadline) or the wait is cancelled; nothing is left behind.
fn poll_until_locked(
    target: &LockTarget,
    opts: &LockOptions,
    deadline: Option<Instant>,
    on_wait: &mut dyn FnMut(&Holder, Duration),
) -> Result<Locked, Error> {
    let mut retry = Retry::new(POLL_FIRST, POLL_MAX, deadline, opts.cancel.as_ref());
    loop {
        // The caller's try just failed: pause (or stop) first.
        match retry.pause(|waited| on_wait(&describe_holder(target, opts), waited)) {
            Ok(()) => {}
            Err(Stop::TimedOut(waited)) => return Err(busy(target, opts, Some(waited))),
            Err(Stop::Cancelled) => {
                return Err(Error::Cancelled { name: target.name.clone(), path: target.path.clone() })
            }
        }
        match try_lock(target, opts)? {
            Attempt::Locked(locked) => return Ok(locked),
            Attempt::Busy => {}
            Attempt::Unsupported(e) => return Err(Error::io("lock", &target.path, e)),
        }
    }
}

fn block_until_locked(target: &LockTarget, opts: &LockOptions) -> Result<Locked, Error> {
    loop {
        let file = open_lock_file(target)?;
        file.lock(opts.mode).map_err(|e| Error::io("lock", &target.path, e))?;
        match check_locked(target, opts, &file) {
            Checked::Ok(id) => return Ok(Locked { file, id }),
            Checked::Replaced => continue,
            Checked::SoftHolder => {
                drop(file);
                std::thread::sleep(SOFT_HOLDER_POLL);
            }
        }
    }
}

/// The lock is ours: account for leftover metadata, write ours, and wrap it in a guard.
fn take_over(target: &LockTarget, opts: &LockOptions, file: Locked, fence: Option<FenceFile>) -> Result<Guard, Error> {
    let mut ours = Metadata::for_current_process(opts.mode, "os", &opts.operation, opts.command.clone());
    ours.max_hold_ms = opts.max_hold.and_then(|d| u64::try_from(d.as_millis()).ok());
    let mut fence = fence;
    let hold = claim_with(target, opts.mode, file, ours, &mut fence)?;
    // Made just now, so never shared yet.
    let file = Arc::into_inner(hold.file).expect("a fresh hold's lock file is not shared");
    let mut guard = Guard::new(target, hold.meta, Held::Os(file), hold.id, None, opts.watch);
    guard.set_reusable(hold.meta_stamp, fence);
    Ok(guard)
}

/// An OS lock on a lock file, with metadata naming its holder: what a daemon takes on behalf of
/// a client and hands over (see [`crate::try_lock_for`]).
#[derive(Debug)]
pub struct OsHold {
    target: LockTarget,
    /// Shared only with replies being sent ([`OsHold::shared_file`]).
    file: Arc<LockFile>,
    id: FileId,
    meta: Metadata,
    /// The metadata file as written, to remove exactly it without reading it back.
    meta_stamp: Option<FileStamp>,
}

impl OsHold {
    /// The fencing token of this acquisition.
    pub fn token(&self) -> u64 {
        self.meta.token.unwrap_or(0)
    }

    /// The metadata written for the holder.
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    pub fn target(&self) -> &LockTarget {
        &self.target
    }

    /// Whether the lock file at the path is still the one locked.
    pub fn is_intact(&self) -> bool {
        buildlock_sys::path_id(&self.target.path).is_ok_and(|now| now == self.id)
    }

    /// The locked file, to send to the holder (`SCM_RIGHTS`) without a `dup`: the receiver
    /// gets a descriptor of its own for the same open file description, which shares the lock
    /// (Linux). The copy kept here keeps our descriptor open until the reply has gone; an
    /// explicit release unlocks the open file description whatever copies are still open.
    #[cfg(target_os = "linux")]
    pub fn shared_file(&self) -> Arc<LockFile> {
        self.file.clone()
    }

    /// The locked file's identity, as checked against the path when it was locked.
    pub fn file_id(&self) -> FileId {
        self.id
    }

    /// Names process `to` (with `command`) as the holder in the metadata, `via` as the process
    /// that handed it the lock (a daemon lease bound to the command that `run` started).
    /// Does nothing when the metadata on disk is another holder's (a shared lock kept by an
    /// earlier reader).
    pub fn hand_over_to(&mut self, to: u32, command: Option<String>, via: u32) -> Result<(), Error> {
        crate::guard::hand_over_metadata(&self.target, &mut self.meta, &mut self.meta_stamp, to, command, via)
    }

    /// Lets go of our copy: removes the holder's metadata, then closes the file. Copies handed
    /// out keep the lock until they are closed too (a holder that died leaves the lock with the
    /// processes it passed it to, as it should: they may still be working).
    pub fn release(self) -> Result<(), Error> {
        if self.is_intact() {
            crate::guard::remove_own_metadata(&self.target, &self.meta, self.meta_stamp.as_ref())?;
        }
        Ok(())
    }

    /// Ends the lock for every copy of the descriptor: removes the holder's metadata, then
    /// unlocks the open file description that all copies share (Linux), then closes ours. For a
    /// holder's explicit release: a background process its command left behind with a copy
    /// must not keep the lock.
    pub fn release_all(self) -> Result<(), Error> {
        let removed = if self.is_intact() {
            crate::guard::remove_own_metadata(&self.target, &self.meta, self.meta_stamp.as_ref())
        } else {
            Ok(())
        };
        crate::guard::unlock_every_copy(&self.target, &self.file);
        removed
    }
}

/// Records `ours` as the holder of the lock just taken on `file` (with its fencing token): the
/// daemon's grants. The fence file comes from, and goes back to, a small cache of open ones
/// ([`crate::fence::kept`]): a lock granted again and again costs no `open`, `fstat` and
/// `close` of it each time, and no descriptor stays open per held lock.
fn claim(target: &LockTarget, mode: LockMode, locked: Locked, ours: Metadata) -> Result<OsHold, Error> {
    let mut fence = if mode == LockMode::Exclusive { crate::fence::kept::take(&target.path) } else { None };
    let hold = claim_with(target, mode, locked, ours, &mut fence);
    if let Some(f) = fence {
        crate::fence::kept::put(&target.path, f);
    }
    hold
}

/// [`claim`], advancing the token through `fence` if it is open (it is opened if not, and left
/// open for the caller to keep).
///
/// The metadata goes in with one `renameat2(RENAME_NOREPLACE)` when no file is there (the usual
/// case: the last holder removed its own); only if one is there is it read, to report a
/// leftover, keep another live reader's, or leave alone a file that is not metadata.
fn claim_with(
    target: &LockTarget,
    mode: LockMode,
    locked: Locked,
    mut ours: Metadata,
    fence: &mut Option<FenceFile>,
) -> Result<OsHold, Error> {
    let Locked { file, id } = locked;
    // An error here drops `file`, and with it the lock: nothing was written yet.
    ours.token = Some(if mode == LockMode::Exclusive {
        if fence.is_none() {
            *fence = FenceFile::open(target).ok();
        }
        match fence {
            Some(f) => f.advance(target)?,
            None => crate::fence::next_token(target, true)?,
        }
    } else {
        crate::fence::next_token(target, false)?
    });
    let mut previous = None;
    let mut may_replace = || {
        let read = meta::read(&target.meta_path);
        let keep_previous = mode == LockMode::Shared
            && read.valid().is_some_and(|m| {
                m.mode == Some(LockMode::Shared) && buildlock_sys::process_state(&m.process()) == ProcessState::Alive
            });
        let replace = !keep_previous && read.is_recognised();
        if replace && mode == LockMode::Exclusive {
            report_leftover(target, &read);
        }
        previous = Some(read);
        replace
    };
    let mut meta_stamp = None;
    let installed = if mode == LockMode::Exclusive {
        meta::install_exclusive(&target.meta_path, &ours, &mut may_replace)
    } else {
        meta::install(&target.meta_path, &ours, &mut may_replace)
    };
    match installed {
        Ok(Some(stamp)) => meta_stamp = Some(stamp),
        // Another live reader's metadata stays (ours would replace it and vanish with us), or
        // the file is not metadata we recognise (somebody's file, a FIFO, a directory): never
        // replaced. The lock is ours all the same.
        Ok(None) => {
            if let Some(MetaRead::Corrupt(why)) = &previous {
                crate::warn_once(&target.meta_path, || {
                    format!(
                        "{} is not lock metadata ({why}); it is left alone, so lock {} is held without metadata \
                         naming its holder: remove that file if nothing else uses it",
                        target.meta_path.display(),
                        target.path.display()
                    )
                });
            }
            ours.id = None;
        }
        Err(e) => {
            // Typically another user's leftover in a sticky directory (/tmp), which we may not
            // replace. The kernel's lock is what excludes others: hold it without metadata.
            let whose = match &previous {
                Some(MetaRead::Valid(m)) => format!(" (left by pid {})", m.pid),
                _ => String::new(),
            };
            crate::warn_once(&target.meta_path, || {
                format!(
                    "cannot write the metadata file {}{whose}: {e}; lock {} is held without metadata naming \
                     its holder (in a shared directory such as /tmp, the file's owner can remove it)",
                    target.meta_path.display(),
                    target.path.display()
                )
            });
            ours.id = None;
        }
    }
    Ok(OsHold { target: target.clone(), file: Arc::new(file), id, meta: ours, meta_stamp })
}

/// Takes the OS lock without waiting, for the process `meta` names. `Ok(None)`: busy.
pub(crate) fn try_lock_for(target: &LockTarget, mode: LockMode, meta: Metadata) -> Result<Option<OsHold>, Error> {
    let opts = LockOptions { mode, ..LockOptions::default() };
    match try_lock(target, &opts)? {
        Attempt::Locked(file) => Ok(Some(claim(target, mode, file, meta)?)),
        Attempt::Busy => Ok(None),
        Attempt::Unsupported(e) => Err(Error::io("lock", &target.path, e)),
    }
}

/// An OS lock taken on a lock file by [`crate::wait_lock`], not yet claimed for anyone: no
/// metadata written, no fencing token drawn. Dropping it unlocks.
#[derive(Debug)]
pub struct OsLocked {
    target: LockTarget,
    mode: LockMode,
    locked: Locked,
}

impl OsLocked {
    /// The mode the lock was taken in.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// Makes the lock the holding of the process `meta` names: writes its metadata (with a
    /// fencing token), as [`crate::try_lock_for`] does.
    pub fn claim_for(self, meta: Metadata) -> Result<OsHold, Error> {
        claim(&self.target, self.mode, self.locked, meta)
    }
}

/// Takes the OS lock, blocking in the kernel until it is free.
pub(crate) fn wait_lock(target: &LockTarget, mode: LockMode) -> Result<OsLocked, Error> {
    let opts = LockOptions { mode, ..LockOptions::default() };
    let locked = block_until_locked(target, &opts)?;
    Ok(OsLocked { target: target.clone(), mode, locked })
}

/// With the lock taken exclusively, any metadata present was left by a holder that is gone.
fn report_leftover(target: &LockTarget, previous: &MetaRead) {
    match previous {
        MetaRead::Missing | MetaRead::Corrupt(_) => {}
        MetaRead::Valid(m) => match buildlock_sys::process_state(&m.process()) {
            ProcessState::Dead => {
                tracing::warn!(
                    "Recovered stale lock {} (holder pid {} is dead; it was killed before releasing)",
                    target.path.display(),
                    m.pid
                );
                let reason = format!("holder pid {} is dead", m.pid);
                crate::recovery::recovered(&target.path, previous, crate::recovery::StaleRule::DeadPid, &reason);
            }
            _ => tracing::info!(
                "Replaced metadata of lock {}: pid {} no longer holds the lock",
                target.path.display(),
                m.pid
            ),
        },
    }
}

/// The error for a busy lock: `WouldBlock`, or `Timeout` after `waited`.
fn busy(target: &LockTarget, opts: &LockOptions, waited: Option<Duration>) -> Error {
    let holder = Box::new(describe_holder(target, opts));
    let (name, path) = (target.name.clone(), target.path.clone());
    match waited {
        None => Error::WouldBlock { name, path, holder },
        Some(waited) => Error::Timeout { name, path, waited, holder },
    }
}

#[allow(clippy::large_enum_variant)]
pub(crate) enum ProbeOutcome {
    Free,
    Held(Holder),
    Unsupported,
}

/// Looks at the OS lock without taking it.
pub(crate) fn probe(target: &LockTarget) -> Result<ProbeOutcome, Error> {
    let file = match LockFile::open_existing(&target.path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ProbeOutcome::Free),
        Err(e) => return Err(Error::io("open the lock file", &target.path, e)),
    };
    match file.probe() {
        Ok(Probe::Free) => Ok(ProbeOutcome::Free),
        Ok(Probe::Held { mode, pid }) => Ok(ProbeOutcome::Held(holder_from(target, Some(mode), pid))),
        Err(e) if buildlock_sys::lock_unsupported(&e) => Ok(ProbeOutcome::Unsupported),
        Err(e) => Err(Error::io("query the lock on", &target.path, e)),
    }
}

/// Who holds a busy lock, as well as can be told.
pub(crate) fn describe_holder(target: &LockTarget, opts: &LockOptions) -> Holder {
    match probe(target) {
        Ok(ProbeOutcome::Held(h)) => h,
        // Held by a soft-lock user, or released since we looked.
        _ => soft::describe_holder(target, opts),
    }
}

/// Builds a [`Holder`] from what the OS said and what the metadata says, noting contradictions.
fn holder_from(target: &LockTarget, mode: Option<LockMode>, os_pid: Option<u32>) -> Holder {
    let mut holder = Holder { mode, os_pid, ..Holder::default() };
    match meta::read(&target.meta_path) {
        MetaRead::Valid(m) => match buildlock_sys::process_state(&m.process()) {
            ProcessState::Dead if m.hostname == buildlock_sys::hostname() => {
                let named = match &m.command {
                    Some(cmd) => format!("pid {} ({})", m.pid, crate::shorten(cmd, 60)),
                    None => format!("pid {}", m.pid),
                };
                find_inheritors(target, &mut holder);
                holder.note = Some(if holder.inheritors.is_empty() {
                    format!("the metadata names {named}, which is dead: it is left over, and the holder wrote none")
                } else {
                    format!("inherited from {named}, which has exited")
                });
            }
            _ => {
                let here = m.hostname == buildlock_sys::hostname();
                let live = here.then(|| buildlock_sys::command_line(m.pid)).flatten();
                holder.command = live.or_else(|| m.command.clone());
                holder.orphaned_by = m.via_pid.filter(|&via| {
                    here && buildlock_sys::process_state(&buildlock_sys::ProcessIdentity {
                        pid: via,
                        start_time: None,
                        boot_id: None,
                    }) == ProcessState::Dead
                });
                holder.meta = Some(m);
            }
        },
        MetaRead::Corrupt(why) => {
            holder.note = Some(format!("its metadata is unreadable ({why})"));
            find_inheritors(target, &mut holder);
        }
        MetaRead::Missing => find_inheritors(target, &mut holder),
    }
    holder
}

/// For a holder no metadata names: the OS's word (process-bound locks), else the processes
/// found holding a descriptor of the lock file, with the first one's command line.
fn find_inheritors(target: &LockTarget, holder: &mut Holder) {
    if holder.os_pid.is_none() {
        holder.inheritors = buildlock_sys::lock_holders(&target.path).unwrap_or_default();
    }
    holder.command = holder.os_pid.or(holder.inheritors.first().copied()).and_then(buildlock_sys::command_line);
}

/// For `status` of a free lock: what leftover metadata, if any, means.
pub(crate) fn leftover_metadata_note(target: &LockTarget) -> String {
    match meta::read(&target.meta_path) {
        MetaRead::Missing => "not held".into(),
        MetaRead::Corrupt(why) => format!("not held; leftover metadata is unreadable ({why})"),
        MetaRead::Valid(m) => {
            format!(
                "not held; leftover metadata names pid {} since {}",
                m.pid,
                m.timestamp.map_or("?".into(), crate::describe_time)
            )
        }
    }
}

/// Removes `X.lock.pid` when no lock file exists (nothing can hold it), or while we hold the
/// lock: only if it is empty or metadata we recognise ([`Error::NotALock`] otherwise).
pub(crate) fn remove_leftover_metadata(target: &LockTarget) -> Result<Option<String>, Error> {
    let previous = meta::read(&target.meta_path);
    if let MetaRead::Corrupt(why) = previous {
        return Err(Error::not_lock_metadata(&target.meta_path, why));
    }
    report_leftover(target, &previous);
    match std::fs::remove_file(&target.meta_path) {
        Ok(()) => Ok(Some(format!("removed leftover metadata {}", target.meta_path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("remove", &target.meta_path, e)),
    }
}

pub(crate) fn break_lock(target: &LockTarget, opts: &LockOptions, force: bool) -> Result<crate::Broken, Error> {
    let exclusive = LockOptions { mode: LockMode::Exclusive, ..opts.clone() };
    match try_lock(target, &exclusive)? {
        Attempt::Locked(file) => {
            // Free: the only thing to clean is leftover metadata, removed while we hold the lock.
            let cleaned = remove_leftover_metadata(target)?;
            drop(file);
            Ok(crate::Broken::NotHeld { cleaned })
        }
        Attempt::Unsupported(_) => soft::break_lock(target, opts, force),
        Attempt::Busy => {
            let holder = describe_holder(target, opts);
            let stop = match holder.pid() {
                Some(pid) => format!("stop pid {pid} and the kernel releases its lock"),
                None => "stop the process holding it (see `fuser` or `lsof` on the lock file)".into(),
            };
            let forced = if force { "; --force cannot break an OS lock" } else { "" };
            Err(Error::Refused {
                name: target.name.clone(),
                path: target.path.clone(),
                reason: format!("a live process holds its OS lock ({holder}); {stop}{forced}"),
                holder: Some(Box::new(holder)),
            })
        }
    }
}

/// Lock files kept open between two acquisitions of the same lock by this process (Linux, where
/// the lock belongs to the open file description): the next acquisition takes the lock on the
/// open file and checks with one `lstat` that it is still the file at the path, instead of
/// opening, `fstat`ing and closing it again. The fence file rides along.
///
/// Only files whose descriptor never left the guard are kept (not one handed to a command or
/// another process). They are unlocked while kept. A kept file no longer at the path (deleted,
/// replaced, its directory recreated) is closed at its next use and the path opened afresh. In
/// the child of a `fork` they are closed at once (`buildlock_sys::CloseInChild`) and forgotten:
/// a child must never share the open file description its parent locks next.
pub(crate) mod idle {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use buildlock_sys::CloseInChild;

    use super::Locked;
    use crate::fence::FenceFile;

    /// At most this many idle lock files per process (the oldest goes first).
    const MAX_IDLE: usize = 16;

    // Fields drop in order: the fork registrations go before their descriptors close, so a
    // fork in between can never close a reused descriptor number in its child.
    struct Entry {
        _lock_in_child: CloseInChild,
        _fence_in_child: Option<CloseInChild>,
        pid: u32,
        path: PathBuf,
        locked: Locked,
        fence: Option<FenceFile>,
    }

    static IDLE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

    fn entries() -> std::sync::MutexGuard<'static, Vec<Entry>> {
        let mut idle = IDLE.lock().unwrap_or_else(|e| e.into_inner());
        let pid = buildlock_sys::current_pid();
        if idle.iter().any(|e| e.pid != pid) {
            // A forked child: the fork handler closed these descriptors; closing them again
            // could close files that reuse their numbers.
            for e in std::mem::take(&mut *idle) {
                if e.pid == pid {
                    idle.push(e);
                } else {
                    std::mem::forget(e);
                }
            }
        }
        idle
    }

    /// The idle lock file of `path` (and its fence file), if this process kept one.
    pub(crate) fn take(path: &Path) -> Option<(Locked, Option<FenceFile>)> {
        if !cfg!(target_os = "linux") {
            return None;
        }
        let mut idle = entries();
        let i = idle.iter().position(|e| e.path == path)?;
        let Entry { _lock_in_child, _fence_in_child, locked, fence, .. } = idle.swap_remove(i);
        drop((_lock_in_child, _fence_in_child));
        Some((locked, fence.filter(FenceFile::is_fresh)))
    }

    /// Keeps the unlocked lock file of `path` open for the next acquisition.
    pub(crate) fn put(path: &Path, locked: Locked, fence: Option<FenceFile>) {
        if !cfg!(target_os = "linux") {
            return;
        }
        let Some(lock_in_child) = CloseInChild::register(locked.file.file()) else { return };
        let (fence, fence_in_child) = match fence.and_then(|f| CloseInChild::register(f.file()).map(|c| (f, c))) {
            Some((f, c)) => (Some(f), Some(c)),
            None => (None, None),
        };
        let entry = Entry {
            _lock_in_child: lock_in_child,
            _fence_in_child: fence_in_child,
            pid: buildlock_sys::current_pid(),
            path: path.to_owned(),
            locked,
            fence,
        };
        let mut idle = entries();
        if let Some(i) = idle.iter().position(|e| e.path == path) {
            // Two threads held the lock in turn through two files: keep one.
            idle.swap_remove(i);
        } else if idle.len() >= MAX_IDLE {
            idle.remove(0);
        }
        idle.push(entry);
    }

    /// Whether this process keeps the lock file of `path` open (for tests).
    #[cfg(test)]
    pub(crate) fn keeps(path: &Path) -> bool {
        entries().iter().any(|e| e.path == path)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::{acquire, Wait};

    fn take(target: &LockTarget) -> Guard {
        acquire(target, &LockOptions::default(), Wait::NoWait, &mut |_, _| {}).unwrap()
    }

    /// The lock is the one at the path: another open file description of it cannot lock it.
    fn assert_held_at_path(target: &LockTarget) {
        let other = LockFile::open(&target.path).unwrap();
        assert!(!other.try_lock(LockMode::Exclusive).unwrap(), "the lock at {} is not held", target.path.display());
    }

    #[test]
    fn a_kept_lock_file_is_reused_and_one_whose_directory_was_recreated_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let locks = dir.path().join("locks");
        let target = LockTarget::resolve("x", &locks).unwrap();
        take(&target).release().unwrap();
        assert!(idle::keeps(&target.path), "the lock file was not kept for the next acquisition");
        let kept = crate::fence::current(&target);

        // The directory removed and made again: the kept file is not the one at the path any more.
        std::fs::remove_dir_all(&locks).unwrap();
        std::fs::create_dir_all(&locks).unwrap();
        let guard = take(&target);
        assert_held_at_path(&target);
        let meta = crate::meta::read(&target.meta_path);
        assert_eq!(meta.valid().map(|m| m.pid), Some(std::process::id()), "{meta:?}");
        assert!(guard.token() > kept, "the token went backwards: {} after {kept}", guard.token());
        guard.release().unwrap();

        // And the directory removed, not made again: it is created, as on a first acquisition.
        std::fs::remove_dir_all(&locks).unwrap();
        let guard = take(&target);
        assert_held_at_path(&target);
        guard.release().unwrap();
    }

    #[test]
    fn grants_for_the_daemon_keep_the_fence_file_and_tokens_still_grow_when_it_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let target = LockTarget::resolve("granted", dir.path()).unwrap();
        let grant = || {
            let meta = Metadata::for_current_process(LockMode::Exclusive, "os", "grant", None);
            try_lock_for(&target, LockMode::Exclusive, meta).unwrap().expect("the lock is free")
        };
        let first = grant();
        assert!(crate::fence::kept::keeps(&target.path), "the fence file was not kept for the next grant");
        let t1 = first.token();
        first.release_all().unwrap();
        let second = grant();
        assert!(second.token() > t1, "token {} after {t1}", second.token());
        assert_eq!(crate::fence::current(&target), second.token(), "the kept fence file was not written");
        let t2 = second.token();
        second.release_all().unwrap();
        // Somebody replaces the fence file with an older number: the kept file is no longer the
        // one at the path, yet the next token still exceeds every earlier one.
        let fence = crate::fence::fence_path(&target);
        std::fs::remove_file(&fence).unwrap();
        std::fs::write(&fence, "00000000000000000001\n").unwrap();
        let third = grant();
        assert!(third.token() > t2, "token {} after {t2}", third.token());
        third.release_all().unwrap();
    }

    /// Lines of /proc/locks for requests blocked on `target`'s lock file ("->" lines).
    fn blocked_requests(target: &LockTarget) -> Vec<String> {
        let ino = format!(":{} ", buildlock_sys::path_id(&target.path).unwrap().ino);
        std::fs::read_to_string("/proc/locks")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("->") && l.contains(ino.as_str()))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_timed_out_wait_leaves_no_request_in_the_kernel_to_take_the_lock_later() {
        let dir = tempfile::tempdir().unwrap();
        let target = LockTarget::resolve("timed", dir.path()).unwrap();
        let holder = take(&target);
        let err = acquire(&target, &LockOptions::default(), Wait::Timeout(Duration::from_millis(30)), &mut |_, _| {})
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        // A waiter blocked in the kernel after its caller gave up would take the lock the moment
        // it came free, and this process's next attempt below could fail.
        assert_eq!(blocked_requests(&target), Vec::<String>::new(), "a request was left blocked on the lock");
        holder.release().unwrap();
        take(&target).release().unwrap();
    }

    #[test]
    fn a_cancelled_wait_returns_and_takes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = LockTarget::resolve("cancelled", dir.path()).unwrap();
        let holder = take(&target);
        let cancel = crate::Cancel::new();
        let (t, c) = (target.clone(), cancel.clone());
        let (tried, first_try) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let opts = LockOptions { cancel: Some(c), wait_here: true, ..LockOptions::default() };
            tried.send(()).unwrap();
            acquire(&t, &opts, Wait::Forever, &mut |_, _| {}).map(|_| ()).unwrap_err()
        });
        first_try.recv().unwrap();
        cancel.cancel();
        let err = waiter.join().unwrap();
        assert!(matches!(err, Error::Cancelled { .. }), "{err}");
        assert!(err.to_string().contains("cancelled"), "{err}");
        assert_eq!(blocked_requests(&target), Vec::<String>::new(), "a request was left blocked on the lock");
        holder.release().unwrap();
        // Free at once, for this process too.
        let again = acquire(&target, &LockOptions::default(), Wait::NoWait, &mut |_, _| {}).unwrap();
        again.release().unwrap();
    }

    #[test]
    fn a_cancelled_wait_for_a_soft_lock_returns_and_takes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = LockTarget::resolve("soft-cancelled", dir.path()).unwrap();
        let soft = LockOptions { backend: crate::Backend::Soft, ..LockOptions::default() };
        let holder = crate::acquire(&target, &soft, Wait::NoWait, &mut |_, _| {}).unwrap();
        let cancel = crate::Cancel::new();
        let (t, c, o) = (target.clone(), cancel.clone(), soft.clone());
        let (tried, first_try) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let opts = LockOptions { cancel: Some(c), ..o };
            tried.send(()).unwrap();
            crate::acquire(&t, &opts, Wait::Forever, &mut |_, _| {}).map(|_| ()).unwrap_err()
        });
        first_try.recv().unwrap();
        cancel.cancel();
        let err = waiter.join().unwrap();
        assert!(matches!(err, Error::Cancelled { .. }), "{err}");
        holder.release().unwrap();
        crate::acquire(&target, &soft, Wait::NoWait, &mut |_, _| {}).unwrap().release().unwrap();
    }

    #[test]
    fn waiting_here_blocks_the_calling_thread_until_the_holder_releases() {
        let dir = tempfile::tempdir().unwrap();
        let target = LockTarget::resolve("here", dir.path()).unwrap();
        let holder = take(&target);
        let released = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (t, r) = (target.clone(), released.clone());
        let waiter = std::thread::spawn(move || {
            let opts = LockOptions { wait_here: true, ..LockOptions::default() };
            let mut reports = 0;
            let guard = acquire(&t, &opts, Wait::Forever, &mut |_, _| reports += 1).unwrap();
            // Granted only once the holder had let go (its flag is set before it releases).
            assert!(r.load(std::sync::atomic::Ordering::SeqCst), "granted while the holder still held the lock");
            assert_held_at_path(&t);
            guard.release().unwrap();
            reports
        });
        // Until the kernel lists the waiter as blocked on the lock file.
        while blocked_requests(&target).is_empty() && !waiter.is_finished() {
            std::thread::yield_now();
        }
        assert!(!waiter.is_finished(), "the waiter did not wait for the held lock");
        released.store(true, std::sync::atomic::Ordering::SeqCst);
        holder.release().unwrap();
        assert_eq!(waiter.join().unwrap(), 0, "a wait in the calling thread makes no reports");
    }

    #[test]
    fn a_lent_descriptor_is_never_kept() {
        let dir = tempfile::tempdir().unwrap();
        let target = LockTarget::resolve("lent", dir.path()).unwrap();
        let guard = take(&target);
        assert!(guard.os_file().is_some());
        guard.release().unwrap();
        assert!(!idle::keeps(&target.path), "a descriptor a command may hold was kept for reuse");
    }

    #[test]
    fn metadata_is_removed_at_release_and_a_leftover_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let target = LockTarget::resolve("m", dir.path()).unwrap();
        for _ in 0..3 {
            let guard = take(&target);
            let id = guard.metadata().id.clone().unwrap();
            assert_eq!(crate::meta::read(&target.meta_path).valid().and_then(|m| m.id.clone()), Some(id));
            guard.release().unwrap();
            assert!(!target.meta_path.exists(), "metadata left behind after release");
        }
        // A dead holder's leftover is replaced by ours (RENAME_NOREPLACE fails, then a read).
        let mut dead = Metadata::for_current_process(LockMode::Exclusive, "os", "dead", None);
        dead.pid = u32::MAX - 1;
        crate::meta::write_atomic(&target.meta_path, &dead).unwrap();
        let guard = take(&target);
        assert_eq!(crate::meta::read(&target.meta_path).valid().map(|m| m.pid), Some(std::process::id()));
        guard.release().unwrap();
        // Exclusive holders keep their metadata file for the next one, which rewrites it in place
        // (padding a shorter text with spaces) before renaming it back.
        let spare = crate::meta::spare_path(&target.meta_path);
        assert!(spare.exists(), "no spare metadata file kept at {}", spare.display());
        let long = acquire(
            &target,
            &LockOptions { operation: "x".repeat(300), ..LockOptions::default() },
            Wait::NoWait,
            &mut |_, _| {},
        )
        .unwrap();
        long.release().unwrap();
        let guard = take(&target);
        assert_eq!(crate::meta::read(&target.meta_path).valid().map(|m| m.operation.clone()), Some(String::new()));
        guard.release().unwrap();
        // A link or a hard link planted at the spare's name is never written through.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        for plant in [std::os::unix::fs::symlink::<&std::path::Path, &std::path::Path>, |a, b| std::fs::hard_link(a, b)]
        {
            let _ = std::fs::remove_file(&spare);
            plant(&victim, &spare).unwrap();
            let guard = take(&target);
            assert_eq!(crate::meta::read(&target.meta_path).valid().map(|m| m.pid), Some(std::process::id()));
            guard.release().unwrap();
            assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
            assert!(!target.meta_path.exists());
        }
        // Our metadata replaced by another file while held: release leaves that file alone.
        let guard = take(&target);
        crate::meta::write_atomic(&target.meta_path, &dead).unwrap();
        guard.release().unwrap();
        assert_eq!(crate::meta::read(&target.meta_path).valid().map(|m| m.pid), Some(u32::MAX - 1));
    }

    /// An exclusive holder's metadata is its spare file under a second name: linked at the
    /// acquisition, the name removed at the release, no file made or freed. A holder that died
    /// holding leaves the two names on one file: the next holder never writes into that file
    /// (readers of the old metadata would see it change), it replaces it as any leftover.
    #[test]
    fn exclusive_metadata_is_the_spare_linked_and_a_dead_holders_linked_file_is_never_written_through() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let target = LockTarget::resolve("l", dir.path()).unwrap();
        let spare = crate::meta::spare_path(&target.meta_path);
        let stat = |p: &std::path::Path| std::fs::symlink_metadata(p).map(|m| (m.ino(), m.nlink()));
        take(&target).release().unwrap();
        let (kept, links) = stat(&spare).expect("a spare after the first release");
        assert_eq!(links, 1);
        for _ in 0..3 {
            let guard = take(&target);
            assert_eq!(stat(&target.meta_path).unwrap(), (kept, 2), "the metadata is not the spare linked");
            assert_eq!(stat(&spare).unwrap(), (kept, 2));
            assert_eq!(crate::meta::read(&target.meta_path).valid().map(|m| m.pid), Some(std::process::id()));
            guard.release().unwrap();
            assert!(!target.meta_path.exists(), "metadata left behind after release");
            assert_eq!(stat(&spare).unwrap(), (kept, 1), "the spare was not kept as it was");
        }
        // Died holding: its metadata is the spare under both names.
        let mut dead = Metadata::for_current_process(LockMode::Exclusive, "os", "dead", None);
        dead.pid = u32::MAX - 1;
        let dead_text = dead.to_json();
        std::fs::write(&spare, &dead_text).unwrap();
        std::fs::hard_link(&spare, &target.meta_path).unwrap();
        let opened_by_a_reader = std::fs::File::open(&target.meta_path).unwrap();
        let guard = take(&target);
        assert_eq!(crate::meta::read(&target.meta_path).valid().map(|m| m.pid), Some(std::process::id()));
        let mut seen = String::new();
        std::io::Read::read_to_string(&mut &opened_by_a_reader, &mut seen).unwrap();
        assert_eq!(seen, dead_text, "the dead holder's file was written through");
        assert_eq!(stat(&spare).unwrap(), (kept, 1), "the dead holder's file is not the spare alone");
        guard.release().unwrap();
        assert!(!target.meta_path.exists());
        // Back to linking the spare.
        let guard = take(&target);
        assert_eq!(stat(&target.meta_path).unwrap(), (kept, 2));
        guard.release().unwrap();
        assert_eq!(stat(&spare).unwrap(), (kept, 1));
    }

    /// The files of a hand-over (`run` naming its command) and of the release that follows:
    /// after the first time, none is created or deleted, the metadata always names the holder,
    /// and a link planted at the kept file's name is never written through.
    #[test]
    fn a_hand_over_reuses_its_kept_file_and_never_writes_through_a_planted_link() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let target = LockTarget::resolve("h", dir.path()).unwrap();
        let next = crate::meta::next_path(&target.meta_path);
        let spare = crate::meta::spare_path(&target.meta_path);
        let hand_over = |to: u32| {
            let mut guard = take(&target);
            guard.hand_over_to(to, Some("make".into())).unwrap();
            let meta = crate::meta::read(&target.meta_path);
            assert_eq!(meta.valid().map(|m| (m.pid, m.command.clone())), Some((to, Some("make".into()))), "{meta:?}");
            guard.release().unwrap();
            assert!(!target.meta_path.exists(), "metadata left behind after release");
        };
        let me = std::process::id();
        hand_over(me);
        let inodes = |p: &std::path::Path| std::fs::symlink_metadata(p).unwrap().ino();
        let kept = (inodes(&next), inodes(&spare));
        for _ in 0..3 {
            hand_over(me);
            let now = (inodes(&next), inodes(&spare));
            assert!(now == kept || now == (kept.1, kept.0), "new files were made: {kept:?} then {now:?}");
        }
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        for plant in [std::os::unix::fs::symlink::<&std::path::Path, &std::path::Path>, |a, b| std::fs::hard_link(a, b)]
        {
            std::fs::remove_file(&next).unwrap();
            plant(&victim, &next).unwrap();
            hand_over(me);
            assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        }
    }
}
