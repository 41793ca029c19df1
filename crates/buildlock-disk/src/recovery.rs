//! Telling a listener (the lock history) about every stale lock recovered, and by which rule.
//!
//! The engine logs each recovery (`Recovered stale lock …`, `Removed stale lock …`); a process
//! that keeps history also installs a hook with [`on_recovery`], called at the same place with
//! the rule that found the lock stale and the metadata of the holder that left it. The hook must
//! not block: it runs while the lock is being taken (the library keeps the event in memory until
//! the lock is released; the daemon hands it to its writer thread).

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::meta::{MetaRead, Metadata};

/// Which of the seed's rules found a lock stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StaleRule {
    /// Its metadata names a process on this host that is dead.
    DeadPid,
    /// No metadata, and the lock file is older than the grace period.
    NoMetadataOld,
    /// Its holder cannot be checked (another host, no permission) and sent no heartbeat for
    /// the grace period.
    StoppedHeartbeat,
}

/// A stale lock that was recovered.
#[derive(Clone, Debug)]
pub struct Recovery {
    /// The lock file.
    pub path: PathBuf,
    pub rule: StaleRule,
    /// The holder that left it, if its metadata was readable.
    pub holder: Option<Metadata>,
    /// The log line's reason.
    pub reason: String,
}

static HOOK: OnceLock<fn(Recovery)> = OnceLock::new();

/// Calls `hook` for every stale lock this process recovers from now on (the first hook set
/// stays).
pub fn on_recovery(hook: fn(Recovery)) {
    let _ = HOOK.set(hook);
}

pub(crate) fn recovered(path: &std::path::Path, meta: &MetaRead, rule: StaleRule, reason: &str) {
    if let Some(hook) = HOOK.get() {
        hook(Recovery { path: path.to_owned(), rule, holder: meta.valid().cloned(), reason: reason.to_owned() });
    }
}

/// The rule behind a soft lock's stale verdict, from what was judged.
pub(crate) fn rule_of(meta: &MetaRead) -> StaleRule {
    match meta.valid() {
        None => StaleRule::NoMetadataOld,
        Some(m) if m.hostname.is_empty() || m.hostname == buildlock_sys::hostname() => {
            match buildlock_sys::process_state(&m.process()) {
                buildlock_sys::ProcessState::Dead => StaleRule::DeadPid,
                _ => StaleRule::StoppedHeartbeat,
            }
        }
        Some(_) => StaleRule::StoppedHeartbeat,
    }
}
