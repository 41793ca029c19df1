//! The locks this process holds on the files directly, by thread: a thread that asks for a lock
//! it already holds (exclusively, or shared when it asks for exclusive) would wait for itself
//! forever, since an OS lock conflicts with every other open of its file, this process's
//! included. Direct mode cannot see other processes' waits (the daemon can); this is the one
//! deadlock it can see, and it refuses it at once.
//!
//! Locks are known by their path as the caller named them (after lexical clean-up), which costs
//! no system call: two spellings of one lock through different symbolic links are not matched.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use buildlock_disk::LockMode;

/// How many holds are registered: the common case (none) costs one atomic load.
static COUNT: AtomicUsize = AtomicUsize::new(0);
static HELD: Mutex<Option<HashMap<PathBuf, Vec<Hold>>>> = Mutex::new(None);

#[derive(Debug, Clone, Copy)]
struct Hold {
    /// The process and thread that took it: a forked child's thread is another, even where it
    /// inherits the same thread-local values.
    pid: u32,
    thread: u64,
    mode: LockMode,
    id: u64,
}

/// A registered hold; dropping it unregisters it.
#[derive(Debug)]
pub(crate) struct Registered {
    path: PathBuf,
    id: u64,
}

fn key(path: &Path) -> PathBuf {
    path.components().filter(|c| !matches!(c, Component::CurDir)).collect()
}

/// `Err(mode held)` if the calling thread holds `path` in a mode that `mode` must wait for.
pub(crate) fn check(path: &Path, mode: LockMode) -> Result<(), LockMode> {
    if COUNT.load(Ordering::Acquire) == 0 {
        return Ok(());
    }
    let (pid, me) = (buildlock_sys::current_pid(), buildlock_sys::current_thread_id());
    let held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    let conflict = held.as_ref().and_then(|m| m.get(&key(path))).and_then(|holds| {
        holds
            .iter()
            .find(|h| h.pid == pid && h.thread == me && (h.mode == LockMode::Exclusive || mode == LockMode::Exclusive))
            .map(|h| h.mode)
    });
    conflict.map_or(Ok(()), Err)
}

/// Notes that the calling thread now holds `path` in `mode`.
pub(crate) fn register(path: &Path, mode: LockMode) -> Registered {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    let id = NEXT.fetch_add(1, Ordering::Relaxed) as u64;
    let path = key(path);
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    held.get_or_insert_with(HashMap::new).entry(path.clone()).or_default().push(Hold {
        pid: buildlock_sys::current_pid(),
        thread: buildlock_sys::current_thread_id(),
        mode,
        id,
    });
    COUNT.fetch_add(1, Ordering::Release);
    Registered { path, id }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(map) = held.as_mut() {
            if let Some(holds) = map.get_mut(&self.path) {
                if let Some(i) = holds.iter().position(|h| h.id == self.id) {
                    holds.swap_remove(i);
                    COUNT.fetch_sub(1, Ordering::Release);
                }
                if holds.is_empty() {
                    map.remove(&self.path);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_is_refused_what_it_holds_and_others_are_not() {
        let path = Path::new("/tmp/held-test/./a.lock");
        let hold = register(path, LockMode::Exclusive);
        assert_eq!(check(Path::new("/tmp/held-test/a.lock"), LockMode::Shared), Err(LockMode::Exclusive));
        assert_eq!(check(path, LockMode::Exclusive), Err(LockMode::Exclusive));
        // Another thread may wait for it: that wait ends when this thread releases.
        std::thread::spawn(move || assert_eq!(check(Path::new("/tmp/held-test/a.lock"), LockMode::Exclusive), Ok(())))
            .join()
            .unwrap();
        drop(hold);
        assert_eq!(check(path, LockMode::Exclusive), Ok(()));
    }

    #[test]
    fn shared_holders_may_share_but_not_upgrade() {
        let path = Path::new("/tmp/held-test/b.lock");
        let hold = register(path, LockMode::Shared);
        assert_eq!(check(path, LockMode::Shared), Ok(()));
        assert_eq!(check(path, LockMode::Exclusive), Err(LockMode::Shared));
        drop(hold);
        assert_eq!(check(path, LockMode::Exclusive), Ok(()));
    }
}
