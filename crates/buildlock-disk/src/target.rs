//! Turning what a user typed (`libfastled_build`, `.build/x.lock`) into lock and metadata paths.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::Error;

/// Longest lock name accepted: the name plus `.lock.pid` and a temporary-file suffix must stay
/// below the usual 255-byte file-name limit.
pub const MAX_NAME_BYTES: usize = 160;

/// A resolved lock: the `.lock` file and its `.lock.pid` metadata file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockTarget {
    /// What the user named, for messages.
    pub name: String,
    /// The lock file.
    pub path: PathBuf,
    /// The metadata file: the lock file's path plus `.pid`.
    pub meta_path: PathBuf,
}

impl LockTarget {
    /// Resolves `arg`: a bare name (no `/`, not ending in `.lock`) is `<dir>/<name>.lock`;
    /// anything else is a path used as given.
    pub fn resolve(arg: &str, dir: &Path) -> Result<LockTarget, Error> {
        let bad = |reason: &str| Error::InvalidName { name: arg.to_owned(), reason: reason.to_owned() };
        if arg.is_empty() {
            return Err(bad("the name is empty"));
        }
        if arg.contains('\0') {
            return Err(bad("it contains a NUL byte"));
        }
        let is_path = arg.contains('/') || (cfg!(windows) && arg.contains('\\')) || arg.ends_with(".lock");
        let path = if is_path {
            let p = PathBuf::from(arg);
            // `x/.` and `x/..` name directories, although `Path` makes `x/.` look like `x`.
            let last = arg.rsplit(['/', std::path::MAIN_SEPARATOR]).next().unwrap_or("");
            let names_file = last != "." && last != "..";
            if arg.ends_with('/') || !names_file || p.file_name().is_none() {
                return Err(bad("a lock path must name a file, not a directory"));
            }
            p
        } else {
            if arg == "." || arg == ".." || arg.contains("..") {
                return Err(bad("names may not contain \"..\""));
            }
            if arg.len() > MAX_NAME_BYTES {
                return Err(bad(&format!("it is {} bytes long; the limit is {MAX_NAME_BYTES}", arg.len())));
            }
            if let Some(c) = arg.chars().find(|&c| c.is_control() || c == '\\' || c == ':' || invisible(c)) {
                return Err(bad(&format!("it contains the character {c:?}; use letters, digits, '-', '_' and '.'")));
            }
            if arg.starts_with('-') {
                return Err(bad("it starts with '-', which reads as an option; rename it"));
            }
            if arg.trim() != arg {
                return Err(bad("it starts or ends with white space"));
            }
            dir.join(format!("{arg}.lock"))
        };
        let name_len = path.file_name().map_or(0, |n| n.len());
        if name_len > MAX_NAME_BYTES + ".lock".len() {
            return Err(bad(&format!("its file name is {name_len} bytes long; the limit is {}", MAX_NAME_BYTES + 5)));
        }
        let mut meta = path.clone().into_os_string();
        meta.push(".pid");
        Ok(LockTarget { name: arg.to_owned(), path, meta_path: PathBuf::from(meta) })
    }

    /// The directory holding the lock file.
    pub fn dir(&self) -> &Path {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    }
}

/// Characters that print as nothing or reorder the text around them (zero-width spaces,
/// bidirectional overrides, the byte-order mark): a name holding one looks like another name.
fn invisible(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

/// The lock directory: `explicit` (from `--dir`), else `BUILDLOCK_DIR`, else the per-user data
/// directory (`~/.local/share/buildlock/locks` on Linux).
pub fn lock_dir(explicit: Option<&Path>) -> Result<PathBuf, Error> {
    choose_lock_dir(explicit, std::env::var_os("BUILDLOCK_DIR"))
}

/// [`lock_dir`] with the value of `BUILDLOCK_DIR` passed in (an empty one counts as unset).
fn choose_lock_dir(explicit: Option<&Path>, from_env: Option<OsString>) -> Result<PathBuf, Error> {
    if let Some(d) = explicit {
        return Ok(d.to_owned());
    }
    if let Some(d) = from_env.filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    directories::ProjectDirs::from("", "", "buildlock").map(|p| p.data_dir().join("locks")).ok_or(Error::NoLockDir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(arg: &str) -> Result<LockTarget, Error> {
        LockTarget::resolve(arg, Path::new("/locks"))
    }

    #[test]
    fn names_go_in_the_lock_dir_and_paths_are_used_as_given() {
        let t = resolve("libfastled_build").unwrap();
        assert_eq!(t.path, Path::new("/locks/libfastled_build.lock"));
        assert_eq!(t.meta_path, Path::new("/locks/libfastled_build.lock.pid"));
        assert_eq!(resolve("x.y-z").unwrap().path, Path::new("/locks/x.y-z.lock"));
        assert_eq!(resolve(".build/a.lock").unwrap().path, Path::new(".build/a.lock"));
        assert_eq!(resolve("a.lock").unwrap().path, Path::new("a.lock"));
        assert_eq!(resolve("/tmp/some/file").unwrap().meta_path, Path::new("/tmp/some/file.pid"));
        assert_eq!(resolve("a.lock").unwrap().dir(), Path::new("."));
        assert_eq!(resolve("libfastled_build").unwrap().dir(), Path::new("/locks"));
        assert_eq!(resolve(".build/a.lock").unwrap().dir(), Path::new(".build"));
    }

    #[cfg(unix)]
    #[test]
    fn a_backslash_makes_a_name_not_a_path_on_unix() {
        let err = resolve("dir\\x").unwrap_err().to_string();
        assert!(err.contains("character"), "{err}");
    }

    #[test]
    fn a_path_with_a_too_long_file_name_is_refused() {
        let limit = MAX_NAME_BYTES + ".lock".len();
        let ok = format!("/tmp/{}", "x".repeat(limit));
        assert_eq!(resolve(&ok).unwrap().path, Path::new(&ok));
        let err = resolve(&format!("/tmp/{}", "x".repeat(limit + 1))).unwrap_err().to_string();
        assert!(err.contains(&format!("{} bytes long; the limit is {limit}", limit + 1)), "{err}");
    }

    #[test]
    fn lock_dir_prefers_the_option_then_a_non_empty_variable() {
        let opt = Path::new("/from/option");
        let env = || Some(OsString::from("/from/env"));
        assert_eq!(choose_lock_dir(Some(opt), env()).unwrap(), opt);
        assert_eq!(lock_dir(Some(opt)).unwrap(), opt);
        assert_eq!(choose_lock_dir(None, env()).unwrap(), Path::new("/from/env"));
        // Empty or unset: the per-user default, never the empty path.
        let default = choose_lock_dir(None, None);
        assert_eq!(choose_lock_dir(None, Some(OsString::new())).ok(), default.as_ref().ok().cloned());
        match default {
            Ok(d) => assert!(d.ends_with("buildlock/locks"), "{}", d.display()),
            Err(e) => assert!(matches!(e, Error::NoLockDir), "{e}"),
        }
    }

    #[test]
    fn bad_names_are_refused_with_a_reason() {
        for (arg, why) in [
            ("", "empty"),
            (".", ".."),
            ("..", ".."),
            ("a..b", ".."),
            ("a\0b", "NUL"),
            ("tab\there", "character"),
            ("c:x", "character"),
            ("dir/", "directory"),
            ("x/.", "directory"),
            ("/tmp/..", "directory"),
            ("-rf", "option"),
            (" ", "white space"),
            ("name ", "white space"),
            ("evil\u{202E}kcol", "character"),
            ("zero\u{200B}width", "character"),
        ] {
            let err = resolve(arg).unwrap_err().to_string();
            assert!(err.contains(why), "{arg:?}: {err}");
        }
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        assert!(resolve(&long).unwrap_err().to_string().contains("limit"));
        assert!(resolve(&"x".repeat(MAX_NAME_BYTES)).is_ok());
    }
}
