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
