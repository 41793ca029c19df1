//! The OS-lock backend: the kernel decides who holds a lock; files only explain.
//!
//! Acquiring: open `X.lock` (never writing into it), take the OS lock, then check that the
//! locked file is still the one at the path (a tool may have deleted it; the next locker would
//! create a new file and a second holder would appear) and retry if not. Then write `X.lock.pid`.
//!
//! Waiting: a helper thread blocks in the kernel (`F_OFD_SETLKW`), so a waiter is woken the
//! moment the holder releases or dies, without polling. The calling thread keeps the clock: it
//! reports the holder about once a second and gives up at the deadline. A helper abandoned at a
//! timeout stays blocked in the kernel until the lock is next free, then lets go at once. (The
//! daemon, which waits for many clients, shares one such thread per lock: [`crate::wait_lock`].)

use std::sync::mpsc;
use std::time::{Duration, Instant};

use buildlock_sys::{FileId, LockFile, LockMode, Probe, ProcessState};

use crate::guard::{Guard, Held};
use crate::meta::{self, MetaRead, Metadata};
use crate::{soft, Error, Holder, LockOptions, LockTarget, Wait};

/// How often a waiter re-reads who holds the lock and reports it.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// How often to look again at a lock held by a soft-lock holder (no kernel wake-up exists).
const SOFT_HOLDER_POLL: Duration = Duration::from_millis(20);

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
    let file = match try_lock(target, opts)? {
        Attempt::Locked(file) => file,
        Attempt::Unsupported(e) => return Ok(Outcome::Unsupported(e)),
        Attempt::Busy => {
            let deadline = match wait {
                Wait::NoWait => return Err(busy(target, opts, None)),
                Wait::Timeout(t) => Some(Instant::now() + t),
                Wait::Forever => None,
            };
            wait_for(target, opts, deadline, on_wait)?
        }
    };
    Ok(Outcome::Locked(take_over(target, opts, file)?))
}

/// One non-blocking attempt, retried only while the lock file keeps being replaced under us.
fn try_lock(target: &LockTarget, opts: &LockOptions) -> Result<Attempt, Error> {
    loop {
        let file = LockFile::open(&target.path).map_err(|e| Error::io("open the lock file", &target.path, e))?;
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
struct Locked {
    file: LockFile,
    id: FileId,
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
    let id = match (file.id(), buildlock_sys::path_id(&target.path)) {
        (Ok(a), Ok(b)) if a == b => a,
        _ => {
            tracing::debug!("{} was replaced while we locked it; retrying", target.path.display());
            return Checked::Replaced;
        }
    };
    // OS-lock files are always empty; content means a soft lock (ours or another tool's).
    if file.file().metadata().is_ok_and(|m| m.len() > 0)
        && soft::verdict_of_file(target, opts, file.file()).is_some_and(|v| !v.is_stale())
    {
        return Checked::SoftHolder;
    }
    Checked::Ok(id)
}

/// Blocks until the lock is ours or the deadline passes.
fn wait_for(
    target: &LockTarget,
    opts: &LockOptions,
    deadline: Option<Instant>,
    on_wait: &mut dyn FnMut(&Holder, Duration),
) -> Result<Locked, Error> {
    let start = Instant::now();
    let (tx, rx) = mpsc::sync_channel(1);
    let (t, o) = (target.clone(), opts.clone());
    std::thread::Builder::new()
        .name("buildlock-wait".into())
        .spawn(move || {
            // If the receiver has gone (timeout), the send fails, the file drops and the lock
            // is released at once.
            let _ = tx.send(block_until_locked(&t, &o));
        })
        .map_err(|e| Error::io("start a waiting thread for", &target.path, e))?;
    loop {
        let now = Instant::now();
        let step = match deadline {
            Some(d) if d <= now => return Err(busy(target, opts, Some(now - start))),
            Some(d) => (d - now).min(REPORT_EVERY),
            None => REPORT_EVERY,
        };
        match rx.recv_timeout(step) {
            Ok(result) => return result,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if deadline.is_none_or(|d| Instant::now() < d) {
                    on_wait(&describe_holder(target, opts), start.elapsed());
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Error::io("wait for", &target.path, std::io::Error::other("the waiting thread died")));
            }
        }
    }
}

fn block_until_locked(target: &LockTarget, opts: &LockOptions) -> Result<Locked, Error> {
    loop {
        let file = LockFile::open(&target.path).map_err(|e| Error::io("open the lock file", &target.path, e))?;
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
fn take_over(target: &LockTarget, opts: &LockOptions, file: Locked) -> Result<Guard, Error> {
    let ours = Metadata::for_current_process(opts.mode, "os", &opts.operation, opts.command.clone());
    let hold = claim(target, opts.mode, file, ours)?;
    Ok(Guard::new(target, hold.meta, Held::Os(hold.file), hold.id, None, opts.watch))
}

/// An OS lock on a lock file, with metadata naming its holder: what a daemon takes on behalf of
/// a client and hands over (see [`crate::try_lock_for`]).
#[derive(Debug)]
pub struct OsHold {
    target: LockTarget,
    file: LockFile,
    id: FileId,
    meta: Metadata,
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

    /// A duplicate of the locked file, to hand to the holder (Linux: the duplicate shares the
    /// open file description, so it holds the same lock until every copy is closed).
    #[cfg(target_os = "linux")]
    pub fn try_clone_file(&self) -> std::io::Result<std::fs::File> {
        self.file.file().try_clone()
    }

    /// Names process `to` (with `command`) as the holder in the metadata, `via` as the process
    /// that handed it the lock (a daemon lease bound to the command that `run` started).
    /// Does nothing when the metadata on disk is another holder's (a shared lock kept by an
    /// earlier reader).
    pub fn hand_over_to(&mut self, to: u32, command: Option<String>, via: u32) -> Result<(), Error> {
        crate::guard::hand_over_metadata(&self.target, &mut self.meta, to, command, via)
    }

    /// Lets go of our copy: removes the holder's metadata, then closes the file. Copies handed
    /// out keep the lock until they are closed too (a holder that died leaves the lock with the
    /// processes it passed it to, as it should: they may still be working).
    pub fn release(self) -> Result<(), Error> {
        if self.is_intact() {
            crate::guard::remove_own_metadata(&self.target, &self.meta)?;
        }
        Ok(())
    }

    /// Ends the lock for every copy of the descriptor: removes the holder's metadata, then
    /// unlocks the open file description that all copies share (Linux), then closes ours. For a
    /// holder's explicit release: a background process its command left behind with a copy
    /// must not keep the lock.
    pub fn release_all(self) -> Result<(), Error> {
        let removed =
            if self.is_intact() { crate::guard::remove_own_metadata(&self.target, &self.meta) } else { Ok(()) };
        crate::guard::unlock_every_copy(&self.target, &self.file);
        removed
    }
}

/// Records `ours` as the holder of the lock just taken on `file` (with its fencing token).
fn claim(target: &LockTarget, mode: LockMode, locked: Locked, mut ours: Metadata) -> Result<OsHold, Error> {
    let Locked { file, id } = locked;
    // An error here drops `file`, and with it the lock: nothing was written yet.
    ours.token = Some(crate::fence::next_token(target, mode == LockMode::Exclusive)?);
    let previous = meta::read(&target.meta_path);
    let keep_previous = mode == LockMode::Shared
        && previous.valid().is_some_and(|m| {
            m.mode == Some(LockMode::Shared) && buildlock_sys::process_state(&m.process()) == ProcessState::Alive
        });
    if keep_previous {
        // Another live reader's metadata stays; ours would replace it and vanish with us.
        ours.id = None;
    } else if let MetaRead::Corrupt(why) = &previous {
        // Not metadata we recognise (somebody's file, a FIFO, a directory): never replaced. The
        // lock is ours all the same; it just has nothing on disk naming its holder.
        crate::warn_once(&target.meta_path, || {
            format!(
                "{} is not lock metadata ({why}); it is left alone, so lock {} is held without metadata \
                 naming its holder: remove that file if nothing else uses it",
                target.meta_path.display(),
                target.path.display()
            )
        });
        ours.id = None;
    } else {
        if mode == LockMode::Exclusive {
            report_leftover(target, &previous);
        }
        if let Err(e) = meta::write_atomic(&target.meta_path, &ours) {
            // Typically another user's leftover in a sticky directory (/tmp), which we may not
            // replace. The kernel's lock is what excludes others: hold it without metadata.
            let whose = match &previous {
                MetaRead::Valid(m) => format!(" (left by pid {})", m.pid),
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
    Ok(OsHold { target: target.clone(), file, id, meta: ours })
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
