//! A daemon started on demand takes nothing of its starter's with it: not its working
//! directory, not its umask, not the descriptors it inherited (such as the lock of an outer
//! `run` when a build recipe nests `buildlock-client run`).

use std::os::unix::fs::PermissionsExt;

use crate::util::Env;

/// The targets of the daemon's open descriptors.
fn open_files(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect()
}

#[test]
fn a_daemon_started_inside_a_build_keeps_none_of_the_builds_descriptors_nor_its_directory() {
    let env = Env::daemon();
    let me = env!("CARGO_BIN_EXE_buildlock-client");
    let workdir = env.path("work");
    std::fs::create_dir(&workdir).unwrap();
    // The outer build holds lock `outer` directly; its recipe runs a nested `run` that starts
    // the daemon, from another directory, with a umask that would make private files.
    let script = format!("cd {}; umask 077; {me} run inner -- true", workdir.display());
    env.run(&["--no-daemon", "run", "outer", "--", "sh", "-c", &script]).assert_code(0);
    let daemon = env.daemon_pid().expect("the nested run started a daemon");
    let files = open_files(daemon);
    assert!(!files.iter().any(|f| f.ends_with("outer.lock")), "the daemon kept the outer lock: {files:?}");
    assert!(!files.iter().any(|f| f.contains("/work")), "{files:?}");
    assert_eq!(std::fs::read_link(format!("/proc/{daemon}/cwd")).unwrap(), std::path::Path::new("/"));
    // The outer lock is free now that the outer build is done.
    env.run(&["--no-daemon", "run", "-n", "outer", "--", "true"]).assert_code(0);
    // Its starter's umask 077 is not the daemon's: the lock file it made is readable by others
    // (fasteners users of other accounts on a shared directory open it), its own files private.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&env.lock_file("inner")), 0o644);
    assert_eq!(mode(&env.runtime().join("buildlockd.pid")), 0o600);
}

#[test]
fn lock_files_the_daemon_creates_are_as_shared_as_their_directory() {
    let env = Env::daemon();
    let team = env.path("team");
    std::fs::create_dir(&team).unwrap();
    std::fs::set_permissions(&team, std::fs::Permissions::from_mode(0o775)).unwrap();
    let lock = team.join("cache.lock");
    env.run(&["run", lock.to_str().unwrap(), "--", "true"]).assert_code(0);
    let mode = std::fs::metadata(&lock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o664, "a group-writable directory's lock must be group-writable: {mode:o}");
    // Its fence file too, which every exclusive holder rewrites.
    let fence = team.join("cache.lock.fence");
    assert_eq!(std::fs::metadata(&fence).unwrap().permissions().mode() & 0o777, 0o664);
}
