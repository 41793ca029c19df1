//! [`Guard`]: a held lock, how it is watched while held, and its release.
//!
//! Soft locks get a keeper thread each, which refreshes the heartbeat (and watches). OS locks
//! that ask to be watched share one process-wide watcher thread, started on first use, which
//! looks at every watched lock file once a second: a thread per lease would cost more than the
//! lock itself.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use buildlock_sys::fs::FileStamp;
use buildlock_sys::{FileId, LockFile};

use crate::fence::FenceFile;
use crate::{meta, Error, LockTarget, Metadata};

/// A held lock. Dropping it releases the lock; [`Guard::release`] does the same and reports
/// problems.
#[derive(Debug)]
pub struct Guard {
    target: LockTarget,
    meta: Metadata,
    held: Option<Held>,
    id: FileId,
    lost: Arc<AtomicBool>,
    keeper: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
    /// Registration with the shared watcher; dropping it unregisters.
    _watched: Option<Arc<Watched>>,
    /// What release and the next acquisition reuse (boxed: a guard stays small).
    reuse: Option<Box<Reuse>>,
    /// The locked descriptor was lent out ([`Guard::os_file`]): it may live on in another
    /// process, so it is closed at release, never kept for reuse.
    lent: AtomicBool,
}

#[derive(Debug)]
pub(crate) enum Held {
    /// An OS lock; releasing is unlocking it, then closing the file.
    Os(LockFile),
    /// A soft lock: our own file at the lock path; releasing is removing it.
    Soft(File),
}

impl Guard {
    /// Wraps a freshly taken lock. `heartbeat` (soft locks) is how often to refresh the file's
    /// modification time; `watch` (OS locks) registers the lock with the shared watcher.
    pub(crate) fn new(
        target: &LockTarget,
        meta: Metadata,
        held: Held,
        id: FileId,
        heartbeat: Option<Duration>,
        watch: bool,
    ) -> Guard {
        let lost = Arc::new(AtomicBool::new(false));
        let (keeper, watched) = match (&held, heartbeat) {
            (Held::Soft(f), Some(interval)) => {
                let touch = f.try_clone().ok();
                let (tx, rx) = mpsc::channel::<()>();
                let (t, l) = (target.clone(), lost.clone());
                let handle = std::thread::Builder::new()
                    .name("buildlock-keeper".into())
                    .spawn(move || keep(t, id, touch, interval, rx, l))
                    .ok();
                (handle.map(|h| (tx, h)), None)
            }
            _ if watch => {
                let w = Arc::new(Watched { target: target.clone(), id, lost: lost.clone() });
                watch_shared(&w);
                (None, Some(w))
            }
            _ => (None, None),
        };
        Guard {
            target: target.clone(),
            meta,
            held: Some(held),
            id,
            lost,
            keeper,
            _watched: watched,
            reuse: None,
            lent: AtomicBool::new(false),
        }
    }

    /// What lets release remove the metadata without reading it, and the next acquisition skip
    /// opening files: the metadata file's stamp and the open fence file.
    pub(crate) fn set_reusable(&mut self, meta_stamp: Option<FileStamp>, fence: Option<FenceFile>) {
        self.reuse = Some(Box::new(Reuse { meta_stamp, fence }));
    }

    /// The metadata written for this holder.
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    /// The fencing token of this acquisition: larger than that of every earlier holder.
    pub fn token(&self) -> u64 {
        self.meta.token.unwrap_or(0)
    }

    /// The lock this guard holds.
    pub fn target(&self) -> &LockTarget {
        &self.target
    }

    /// The open lock file that carries an OS lock (`None` for soft locks), for passing to a
    /// command with `buildlock_sys::pass_to_child`: on Linux the command's copy then keeps the
    /// lock even if this process dies, and [`Guard::release`] still ends it for every copy.
    pub fn os_file(&self) -> Option<&File> {
        match &self.held {
            Some(Held::Os(f)) => {
                self.lent.store(true, Ordering::SeqCst);
                Some(f.file())
            }
            _ => None,
        }
    }

    /// Names process `pid` (with `command`) as the holder in the metadata, this process as the
    /// one that handed the lock over (`run`, after passing the lock to its command). Does nothing
    /// when the metadata on disk is another holder's (a shared lock kept by an earlier reader).
    pub fn hand_over_to(&mut self, pid: u32, command: Option<String>) -> Result<(), Error> {
        if !matches!(self.held, Some(Held::Os(_))) {
            return Ok(());
        }
        self.lent.store(true, Ordering::SeqCst);
        let reuse = self.reuse.get_or_insert_with(|| Box::new(Reuse { meta_stamp: None, fence: None }));
        let via = buildlock_sys::current_pid();
        hand_over_metadata(&self.target, &mut self.meta, &mut reuse.meta_stamp, pid, command, via)
    }

    /// `"os"` or `"soft"`.
    pub fn kind(&self) -> &'static str {
        match self.held {
            Some(Held::Soft(_)) => "soft",
            _ => "os",
        }
    }

    /// Checks now that the lock file is still the one locked; `Err(Error::Lost)` if another
    /// process deleted or replaced it (from then on, others may hold the "same" lock).
    pub fn check(&self) -> Result<(), Error> {
        if self.lost.load(Ordering::SeqCst) || !still_ours(&self.target, self.id) {
            self.lost.store(true, Ordering::SeqCst);
            return Err(self.lost_error());
        }
        Ok(())
    }

    /// Whether the lock file was found deleted or replaced while held.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    fn lost_error(&self) -> Error {
        Error::Lost {
            name: self.target.name.clone(),
            path: self.target.path.clone(),
            reason: "another process deleted or replaced the lock file, so another holder may have run \
                     at the same time; find the tool that removes lock files it does not hold"
                .into(),
        }
    }

    /// Releases the lock: removes our metadata, then unlocks (OS) or removes our file (soft).
    /// The OS lock is unlocked explicitly, not just closed, so that it ends even where a copy of
    /// the descriptor lives on in a process the holder passed it to (a command's background
    /// child). Reports [`Error::Lost`] if the lock file was replaced while held.
    pub fn release(mut self) -> Result<(), Error> {
        self.release_inner()
    }

    fn release_inner(&mut self) -> Result<(), Error> {
        let Some(held) = self.held.take() else { return Ok(()) };
        if let Some((stop, handle)) = self.keeper.take() {
            drop(stop);
            let _ = handle.join();
        }
        let result = self.check();
        if result.is_ok() {
            // Metadata goes first, while we still hold the lock, so nobody sees ours on a lock
            // they hold; then the lock itself.
            let stamp = self.reuse.as_ref().and_then(|r| r.meta_stamp.as_ref());
            remove_own_metadata(&self.target, &self.meta, stamp)?;
            if let Held::Soft(_) = held {
                match std::fs::remove_file(&self.target.path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io("remove the soft lock", &self.target.path, e)),
                }
            }
        }
        if let Held::Os(file) = held {
            unlock_every_copy(&self.target, &file);
            // Kept open for the next acquisition only if it never left this guard and is
            // still the lock file at the path.
            if result.is_ok() && !self.lent.load(Ordering::SeqCst) {
                let locked = crate::os::Locked { file, id: self.id };
                crate::os::idle::put(&self.target.path, locked, self.reuse.take().and_then(|r| r.fence));
            }
        }
        result
    }
}

/// Rewrites the metadata `meta` of a held lock to name process `to` (with `command`) as its
/// holder and `via` as the process that handed it over. Does nothing when the metadata on disk
/// is another holder's (`meta` has no id: a shared lock kept by an earlier reader).
pub(crate) fn hand_over_metadata(
    target: &LockTarget,
    meta: &mut Metadata,
    stamp: &mut Option<FileStamp>,
    to: u32,
    command: Option<String>,
    via: u32,
) -> Result<(), Error> {
    if meta.id.is_none() {
        return Ok(());
    }
    let handed = meta.handed_over(buildlock_sys::identify(to), command, via);
    // Replaces ours unconditionally, as before: we hold the lock and wrote what is there. An
    // exclusive holder's is replaced by its kept hand-over file, rewritten.
    let written = if meta.mode == Some(buildlock_sys::LockMode::Exclusive) && stamp.is_some() {
        meta::replace_exclusive(&target.meta_path, &handed).map(Some)
    } else {
        meta::install(&target.meta_path, &handed, &mut || true)
    };
    *stamp = written.map_err(|e| Error::io("write the metadata file", &target.meta_path, e))?;
    *meta = handed;
    Ok(())
}

/// Unlocks the open file description of `file`, which ends the lock for every descriptor that
/// shares it (those a command passed to its children included). Closing would not: a copy
/// elsewhere keeps it.
pub(crate) fn unlock_every_copy(target: &LockTarget, file: &LockFile) {
    if let Err(e) = file.unlock() {
        tracing::debug!("unlocking {}: {e}; closing it instead", target.path.display());
    }
}

/// Removes the `.lock.pid` that `meta` wrote, only if it still names this acquisition: what
/// another process put there meanwhile (a planted FIFO, another tool's file, a later holder's
/// metadata after ours was replaced) is left alone.
pub(crate) fn remove_own_metadata(
    target: &LockTarget,
    meta: &Metadata,
    stamp: Option<&FileStamp>,
) -> Result<(), Error> {
    let Some(id) = &meta.id else { return Ok(()) };
    let exclusive = meta.mode == Some(buildlock_sys::LockMode::Exclusive);
    meta::remove_if_ours_stamped(&target.meta_path, id, stamp, exclusive)
        .map(drop)
        .map_err(|e| Error::io("remove the metadata file", &target.meta_path, e))
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = self.release_inner() {
            tracing::error!("{e}");
        }
    }
}

/// What an OS-lock guard keeps to save system calls.
#[derive(Debug)]
struct Reuse {
    /// The metadata file as written, so that release removes exactly it without reading it.
    meta_stamp: Option<FileStamp>,
    /// The open fence file, kept with the lock file for the next acquisition.
    fence: Option<FenceFile>,
}

/// A lock file watched by the shared watcher.
#[derive(Debug)]
struct Watched {
    target: LockTarget,
    id: FileId,
    lost: Arc<AtomicBool>,
}

/// Every watched lock of this process; entries die with their guards.
static WATCHED: std::sync::Mutex<Vec<std::sync::Weak<Watched>>> = std::sync::Mutex::new(Vec::new());

/// Registers `w` with the process-wide watcher thread, starting it on first use.
fn watch_shared(w: &Arc<Watched>) {
    WATCHED.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::downgrade(w));
    start_watcher();
}

/// Starts the process-wide watcher thread, if it has not started yet: before a wait, so that
/// the lock, once granted, is not kept waiting for a thread to start.
pub(crate) fn start_watcher() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let _ = std::thread::Builder::new().name("buildlock-watcher".into()).spawn(|| loop {
            std::thread::sleep(Duration::from_secs(1));
            let live: Vec<Arc<Watched>> = {
                let mut list = WATCHED.lock().unwrap_or_else(|e| e.into_inner());
                list.retain(|w| w.strong_count() > 0);
                list.iter().filter_map(std::sync::Weak::upgrade).collect()
            };
            for w in live {
                if !w.lost.load(Ordering::SeqCst) && !still_ours(&w.target, w.id) {
                    report_lost(&w.target, &w.lost);
                }
            }
        });
    });
}

fn report_lost(target: &LockTarget, lost: &AtomicBool) {
    if !lost.swap(true, Ordering::SeqCst) {
        tracing::error!(
            "lock {} ({}) was deleted or replaced by another process while held; \
             another holder may now run at the same time",
            target.name,
            target.path.display()
        );
    }
}

fn still_ours(target: &LockTarget, id: FileId) -> bool {
    buildlock_sys::path_id(&target.path).is_ok_and(|now| now == id)
}

/// A soft lock's keeper thread: every `interval`, check the lock file is still ours and refresh
/// its heartbeat. Stops when the guard drops its sender.
fn keep(
    target: LockTarget,
    id: FileId,
    touch: Option<File>,
    interval: Duration,
    stop: mpsc::Receiver<()>,
    lost: Arc<AtomicBool>,
) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(interval) {
        if !still_ours(&target, id) {
            report_lost(&target, &lost);
            return;
        }
        if let Some(f) = &touch {
            if let Err(e) = f.set_modified(SystemTime::now()) {
                tracing::warn!("cannot refresh the heartbeat of {}: {e}", target.path.display());
            }
        }
    }
}
