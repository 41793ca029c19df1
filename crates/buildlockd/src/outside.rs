//! Waiting for a process outside the daemon (`fasteners`, a direct-mode client, the children of
//! a killed `run`'s command that kept an inherited descriptor) to let go of a lock file.
//!
//! The kernel is the only one that knows when such a holder lets go, and the only prompt way to
//! hear it is to block in `F_OFD_SETLKW`, which takes a thread. So each lock file being waited
//! for gets one thread (never one per lease): it blocks until the OS lock is free, then gives
//! it to the first lease still waiting for that file in that mode (`Daemon::outside_locked`),
//! and blocks again while any lease is left; it ends once none is. A lease that gives up
//! (deadline, disconnect) just leaves the set; a thread nobody waits on any more stays blocked
//! until the file is next free, takes the lock, finds no taker, drops it at once and ends. The
//! number of such threads is capped (`Limits::max_outside_waits`).
//!
//! The threads are plain `std` threads, not tokio's blocking pool: the runtime never waits for
//! them, so the daemon exits at once whatever they are blocked on.

use std::sync::Arc;

use buildlock_disk::LockTarget;

use crate::server::Daemon;

/// Stack for a waiter thread: it only locks, parses and writes small files.
const STACK: usize = 512 * 1024;

/// Starts the waiter thread of `target`'s lock file. Call from inside the runtime, with the
/// file's entry about to be made in the state's `outside` map (the thread reads it).
pub(crate) fn spawn_waiter(daemon: Arc<Daemon>, target: LockTarget) -> std::io::Result<()> {
    let rt = tokio::runtime::Handle::current();
    std::thread::Builder::new().name("buildlockd-wait".into()).stack_size(STACK).spawn(move || {
        // Granting from here spawns tasks (pid watchers, the next grants): in the daemon's runtime.
        let _rt = rt.enter();
        while let Some(mode) = daemon.outside_wanted(&target.path) {
            let locked = buildlock_disk::wait_lock(&target, mode);
            daemon.outside_locked(&target, locked);
        }
    })?;
    Ok(())
}
