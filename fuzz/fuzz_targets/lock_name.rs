//! Checks that `LockTarget::resolve` never panics and keeps bare names inside the lock dir.
//!
//! A bare name it accepts (no '/', not ending in ".lock") must land exactly at
//! `/locks/<name>.lock` with no `..` component; for every accepted name `meta_path` is the path
//! plus ".pid".
#![no_main]

use std::ffi::OsString;
use std::path::{Component, Path};

use buildlock_disk::{LockTarget, MAX_NAME_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Invalid UTF-8 is skipped rather than replaced: a command-line argument reaches `resolve`
    // only as a `&str`, and lossy replacement would just fuzz U+FFFD.
    let Ok(name) = std::str::from_utf8(data) else {
        return;
    };
    let dir = Path::new("/locks");
    let Ok(target) = LockTarget::resolve(name, dir) else {
        return;
    };
    assert_eq!(target.name, name);

    // For every accepted name: meta_path is the path plus ".pid", and the path names a file.
    let mut meta = OsString::from(target.path.as_os_str());
    meta.push(".pid");
    assert_eq!(target.meta_path.as_os_str(), meta, "meta_path is not path + .pid");
    assert!(target.path.file_name().is_some(), "accepted a path with no file name: {name:?}");

    let bare = !name.contains('/') && !name.ends_with(".lock");
    if !bare {
        return;
    }
    assert!(name.len() <= MAX_NAME_BYTES, "accepted a {}-byte name", name.len());
    assert_eq!(target.path.parent(), Some(dir), "bare name {name:?} escaped the lock dir: {:?}", target.path);
    let expected_file = format!("{name}.lock");
    assert_eq!(
        target.path.file_name().and_then(|f| f.to_str()),
        Some(expected_file.as_str()),
        "bare name {name:?} gave file {:?}",
        target.path
    );
    assert!(
        !target.path.components().any(|c| c == Component::ParentDir),
        "bare name {name:?} gave a path with '..': {:?}",
        target.path
    );
    // The lock file's own name must not itself be "." or ".." in disguise.
    assert!(expected_file != "." && expected_file != "..");
    assert_eq!(target.dir(), dir);
});
