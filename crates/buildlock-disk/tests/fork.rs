//! A process that forks after using a lock, and a child that then takes the same lock: what a
//! process remembers between acquisitions (its pid and identity, the lock file it kept open)
//! must not leak into the child. Its own binary: forking is safest with one test thread.

#![cfg(target_os = "linux")]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use buildlock_disk::{acquire, meta, Error, LockOptions, LockTarget, Wait};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

#[test]
fn a_forked_child_that_locks_names_itself_and_shares_nothing_with_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let target = LockTarget::resolve("forked", dir.path()).unwrap();
    let opts = LockOptions::default();
    // The parent locks first: its pid, identity and the idle lock file are now remembered.
    let guard = acquire(&target, &opts, Wait::NoWait, &mut |_, _| {}).unwrap();
    assert_eq!(guard.metadata().pid, std::process::id());
    guard.release().unwrap();

    let (mut parent_end, mut child_end) = UnixStream::pair().unwrap();
    // SAFETY: the test binary runs this one test; the child only locks, reads files, writes to
    // its socket and exits with `_exit`, never returning into the test harness.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            drop(parent_end);
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let guard = acquire(&target, &opts, Wait::NoWait, &mut |_, _| {}).unwrap();
                let me = buildlock_sys::identify(nix::unistd::getpid().as_raw() as u32);
                let m = meta::read(&target.meta_path).valid().cloned().expect("metadata written");
                assert_eq!(m.pid, me.pid, "the child's metadata names another process");
                assert_eq!(m.start_time, me.start_time, "the child's metadata has another start time");
                assert_eq!(guard.metadata().pid, me.pid);
                child_end.write_all(b"h").unwrap();
                let mut go = [0u8];
                child_end.read_exact(&mut go).unwrap();
                guard.release().unwrap();
            }))
            .map_or(1, |()| 0);
            // SAFETY: ends the child at once, without running the parent's destructors twice.
            unsafe { nix::libc::_exit(code) };
        }
        ForkResult::Parent { child } => {
            // Only the child's copy of its end stays open: its exit is EOF here.
            drop(child_end);
            let mut held = [0u8];
            let got = parent_end.read(&mut held).unwrap();
            // While the child holds it, the parent (which kept its lock file open) must not get it:
            // had the child reused the parent's open file description, the lock would be shared.
            let busy = if got == 1 { acquire(&target, &opts, Wait::NoWait, &mut |_, _| {}).err() } else { None };
            let _ = parent_end.write_all(b"g");
            let status = waitpid(child, None).unwrap();
            assert_eq!(got, 1, "the child failed before it held the lock ({status:?})");
            assert!(matches!(busy, Some(Error::WouldBlock { .. })), "the parent got the lock the child held: {busy:?}");
            assert_eq!(status, WaitStatus::Exited(child, 0), "the child's checks failed");
            // And the parent locks as itself afterwards.
            let guard = acquire(&target, &opts, Wait::NoWait, &mut |_, _| {}).unwrap();
            assert_eq!(meta::read(&target.meta_path).valid().map(|m| m.pid), Some(std::process::id()));
            guard.release().unwrap();
        }
    }
}
