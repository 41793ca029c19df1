//! Where the daemon's socket lives: the names shared by `buildlockd` (which binds it) and the
//! clients (which connect to it), so that the two can never disagree.

use std::path::{Path, PathBuf};

/// File name of the daemon's Unix stream socket inside its runtime directory.
pub const SOCKET_NAME: &str = "buildlockd.sock";

/// Environment variable that overrides the runtime directory (tests, several independent daemons).
pub const RUNTIME_DIR_ENV: &str = "BUILDLOCK_RUNTIME_DIR";

/// Sub-directory of `$XDG_RUNTIME_DIR` used as the runtime directory when
/// [`RUNTIME_DIR_ENV`] is not set.
pub const XDG_SUBDIR: &str = "buildlock";

/// A file in the runtime directory saying a service manager (systemd, launchd) owns the daemon's
/// socket: clients then never start a daemon of their own. Its content names the manager.
pub const MANAGED_MARKER: &str = "buildlockd.managed";

/// The socket path for a runtime directory: `<runtime_dir>/buildlockd.sock`.
pub fn socket_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join(SOCKET_NAME)
}

/// The daemon's journal of bound leases, one file per lease, inside the runtime directory.
pub const JOURNAL_DIR: &str = "leases";

/// The journal entry of the lease on lock file `path` with fencing token `token`, bound to
/// process `pid`. Both sides compute it: the daemon writes and removes it, and a client that
/// releases the lease while the daemon is gone removes it, so that a later daemon does not
/// take back a lock that was released.
pub fn journal_entry(runtime_dir: &Path, path: &Path, token: u64, pid: u32) -> PathBuf {
    let name: String = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    runtime_dir.join(JOURNAL_DIR).join(format!("{name}-{token}-{pid}.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_is_inside_the_runtime_dir() {
        assert_eq!(
            socket_path(Path::new("/run/user/1000/buildlock")),
            PathBuf::from("/run/user/1000/buildlock/buildlockd.sock")
        );
    }
}
