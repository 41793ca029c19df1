//! Shared and hostile lock directories: links, FIFOs and directories planted where buildlock
//! reads or writes, forged keeper files, and another user's leftovers in a sticky directory.
//! Whatever is planted, nothing is written through a link, nothing hangs, no unrelated process
//! is signalled, and other locks are served meanwhile.

use std::os::unix::fs::{symlink, FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use crate::stale::hostname;
use crate::util::{dead_pid, output_bounded, Env};

const PRECIOUS: &str = "precious contents\n";

/// A file of the user's that a planted link points at.
fn victim(env: &Env) -> std::path::PathBuf {
    let v = env.path("victim");
    std::fs::write(&v, PRECIOUS).unwrap();
    v
}

#[track_caller]
fn assert_untouched(victim: &Path) {
    assert_eq!(std::fs::read_to_string(victim).unwrap(), PRECIOUS, "{} was written through a link", victim.display());
}

fn is_symlink(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink())
}

fn mkfifo(p: &Path) {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
}

/// A `sleep` that the test owns: an unrelated live process.
struct Sleeper(std::process::Child);

impl Sleeper {
    fn start() -> Sleeper {
        Sleeper(Command::new("sleep").arg("1000").spawn().unwrap())
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    #[track_caller]
    fn assert_alive(&mut self) {
        assert!(self.0.try_wait().unwrap().is_none(), "the unrelated process was signalled");
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Field 22 of `/proc/PID/stat`: the start time a keeper file records.
fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(')').unwrap().1.split_whitespace().nth(19).unwrap().parse().unwrap()
}

#[test]
fn links_at_the_metadata_and_fence_files_are_never_written_through() {
    for env in [Env::new(), Env::daemon()] {
        let victim = victim(&env);
        std::fs::create_dir_all(env.locks()).unwrap();
        let (meta, fence) = (env.locks().join("x.lock.pid"), env.locks().join("x.lock.fence"));
        symlink(&victim, &meta).unwrap();
        symlink(&victim, &fence).unwrap();
        for _ in 0..2 {
            env.run(&["run", "-n", "x", "--", "echo", "ran"]).assert_code(0).assert_stdout_has("ran");
        }
        env.run(&["break", "x"]).assert_code(2).assert_stderr_has("symbolic link");
        assert_untouched(&victim);
        assert!(is_symlink(&meta) && is_symlink(&fence), "a planted link was removed");
    }
}

#[test]
fn a_link_at_the_lock_file_is_refused_and_never_locked_or_written() {
    for env in [Env::new(), Env::daemon()] {
        let victim = victim(&env);
        std::fs::create_dir_all(env.locks()).unwrap();
        symlink(&victim, env.lock_file("x")).unwrap();
        let out = env.run(&["run", "-n", "x", "--", "echo", "ran"]);
        assert_ne!(out.code(), 0, "locked through a link:\n{}", out.stderr);
        out.assert_stderr_has("symbolic link");
        assert!(!out.stdout.contains("ran"));
        env.run(&["--soft", "run", "-n", "x", "--", "true"]).assert_code(2).assert_stderr_has("symbolic link");
        env.run(&["--soft", "break", "--force", "x"]).assert_code(2).assert_stderr_has("symbolic link");
        env.run(&["break", "x"]).assert_code(2).assert_stderr_has("symbolic link");
        assert_untouched(&victim);
        assert!(is_symlink(&env.lock_file("x")));
        // Another lock in the same directory is served as usual.
        env.run(&["run", "-n", "y", "--", "true"]).assert_code(0);
    }
}

#[test]
fn a_link_at_the_keeper_file_is_replaced_not_written_through() {
    let env = Env::new();
    let victim = victim(&env);
    let script = Sleeper::start();
    std::fs::create_dir_all(env.locks()).unwrap();
    let keeper = env.locks().join(format!("x.lock.keeper-{}", script.pid()));
    symlink(&victim, &keeper).unwrap();
    env.run(&["acquire", "--pid", &script.pid().to_string(), "x"]).assert_code(0);
    assert_untouched(&victim);
    assert!(!is_symlink(&keeper), "the keeper wrote through its link");
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(1);
    env.run(&["release", "--pid", &script.pid().to_string(), "x"]).assert_code(0);
    env.run(&["run", "-n", "x", "--", "true"]).assert_code(0);
    assert_untouched(&victim);
}

#[test]
fn a_forged_keeper_file_never_gets_an_unrelated_process_signalled() {
    let env = Env::new();
    let mut sleeper = Sleeper::start();
    let pid = sleeper.pid().to_string();
    std::fs::create_dir_all(env.locks()).unwrap();
    let keeper = env.locks().join(format!("x.lock.keeper-{pid}"));
    // Naming the live process exactly (pid and start time), and with no start time.
    for forged in [format!("{pid} {}\n", start_time(sleeper.pid())), format!("{pid} 0\n")] {
        std::fs::write(&keeper, &forged).unwrap();
        env.run(&["release", "--pid", &pid, "x"])
            .assert_code(1)
            .assert_stderr_has("that process is left alone")
            .assert_stderr_has("is not held for pid");
        sleeper.assert_alive();
        assert_eq!(std::fs::read_to_string(&keeper).unwrap(), forged);
    }
    // A FIFO there never hangs `release`.
    std::fs::remove_file(&keeper).unwrap();
    mkfifo(&keeper);
    env.run(&["release", "--pid", &pid, "x"]).assert_code(1).assert_stderr_has("is not a keeper file");
    sleeper.assert_alive();
}

#[test]
fn a_fifo_or_directory_at_the_metadata_path_never_hangs_nor_blocks_the_lock() {
    for kind in ["fifo", "dir"] {
        let env = Env::new();
        std::fs::create_dir_all(env.locks()).unwrap();
        let meta = env.locks().join("x.lock.pid");
        match kind {
            "fifo" => mkfifo(&meta),
            _ => std::fs::create_dir(&meta).unwrap(),
        }
        env.run(&["run", "-n", "x", "--", "echo", "ran"])
            .assert_code(0)
            .assert_stdout_has("ran")
            .assert_stderr_has("is not lock metadata");
        let holder = env.hold(&[], "x");
        env.run(&["run", "-n", "x", "--", "true"]).assert_code(1);
        env.run(&["status", "x"]).assert_code(0).assert_stdout_has("held");
        holder.release();
        env.run(&["status", "x"]).assert_code(0).assert_stdout_has("unreadable");
        env.run(&["break", "x"]).assert_code(2).assert_stderr_has("is not lock metadata");
        env.run(&["--soft", "run", "-n", "x", "--", "true"]).assert_code(2).assert_stderr_has("x.lock.pid");
        let ft = std::fs::symlink_metadata(&meta).unwrap().file_type();
        assert!(if kind == "fifo" { ft.is_fifo() } else { ft.is_dir() }, "{kind} was replaced");
    }
}

#[test]
fn a_fifo_at_one_locks_metadata_never_stalls_the_daemon_for_another() {
    let env = Env::daemon();
    std::fs::create_dir_all(env.locks()).unwrap();
    let meta = env.locks().join("a.lock.pid");
    mkfifo(&meta);
    env.run(&["run", "-n", "a", "--", "echo", "ran"]).assert_code(0).assert_stdout_has("ran");
    let holder = env.hold(&[], "b");
    env.run(&["run", "-n", "b", "--", "true"]).assert_code(1);
    let a = env.hold(&[], "a");
    env.run(&["status", "a"]).assert_code(0).assert_stdout_has("held");
    env.run(&["run", "-n", "a", "--", "true"]).assert_code(1);
    a.release();
    holder.release();
    env.run(&["run", "-n", "b", "--", "echo", "ran"]).assert_code(0).assert_stdout_has("ran");
    assert!(std::fs::symlink_metadata(&meta).unwrap().file_type().is_fifo());
}

#[test]
fn another_users_leftover_metadata_in_a_sticky_directory_does_not_block_a_free_lock() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: acting as two users needs root (setpriv)");
        return;
    }
    let env = Env::new();
    std::fs::set_permissions(env.tmp.path(), PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::create_dir(env.locks()).unwrap();
    std::fs::set_permissions(env.locks(), PermissionsExt::from_mode(0o1777)).unwrap();
    // Root's leftovers: metadata of a process that is gone, and a fence file.
    let leftover = format!(r#"{{"pid": {}, "timestamp": 1.0, "hostname": "{}"}}"#, dead_pid(), hostname());
    env.write_meta("x", &leftover);
    std::fs::write(env.locks().join("x.lock.fence"), "00000000000000000042\n").unwrap();
    let meta = env.locks().join("x.lock.pid");
    let as_nobody = || {
        let mut c = env.cli_as_user(65534);
        c.args(["run", "-n", "x", "--", "echo", "ran"]);
        c
    };
    output_bounded(as_nobody(), "run as nobody")
        .assert_code(0)
        .assert_stdout_has("ran")
        .assert_stderr_has(&format!("cannot write the metadata file {}", meta.display()));
    assert_eq!(std::fs::read_to_string(&meta).unwrap(), leftover);
    // And again: the lock is free every time, not only once.
    output_bounded(as_nobody(), "run as nobody").assert_code(0).assert_stdout_has("ran");
}

#[test]
fn status_of_every_lock_lists_them_all_past_a_file_that_is_not_a_lock() {
    let env = Env::new();
    let holder = env.hold(&[], "b");
    let victim = env.path("Makefile");
    std::fs::write(&victim, "all: build\n").unwrap();
    std::os::unix::fs::symlink(&victim, env.locks().join("a.lock")).unwrap();
    let out = env.run(&["status"]);
    // The link that is not a lock is named, and does not hide the held lock after it.
    out.assert_code(2).assert_stderr_has("a.lock").assert_stdout_has("b (").assert_stdout_has("held");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "all: build\n");
    holder.release();
}
