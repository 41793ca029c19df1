//! Direct-mode events held back in memory reach the spool at the process's exit, once, and a
//! forked child never writes its parent's (it starts with none of them). One test in this
//! binary: the fork happens with no other thread of the test's own at work.

use buildlock_history::{record_direct, spool_path, Event, Kind};

fn lines_with(spool: &std::path::Path, marker: &str) -> usize {
    std::fs::read_to_string(spool).unwrap_or_default().lines().filter(|l| l.contains(marker)).count()
}

#[test]
fn held_back_events_are_written_once_by_their_own_process() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("history.sqlite3");
    std::env::set_var("BUILDLOCK_HISTORY", &db);
    let spool = spool_path(&db);

    // Held back: nothing in the spool yet.
    record_direct(vec![Event::new("/l/parent.lock", Kind::Granted)]);
    assert_eq!(lines_with(&spool, "parent.lock"), 0, "written at once, not held back");

    // SAFETY: the child only records (its own, fresh queue), then exits through `exit`, which
    // runs the history's exit handler; nothing it touches is held by another thread here.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            record_direct(vec![Event::new("/l/child.lock", Kind::Granted)]);
            std::process::exit(0);
        }
        nix::unistd::ForkResult::Parent { child } => {
            let status = nix::sys::wait::waitpid(child, None).unwrap();
            assert!(matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)), "{status:?}");
        }
    }
    // The child wrote its own event at its exit, and not the parent's.
    assert_eq!(lines_with(&spool, "child.lock"), 1);
    assert_eq!(lines_with(&spool, "parent.lock"), 0, "the child wrote its parent's event");

    // The parent's goes out when it asks (as at its exit), once.
    record_direct(Vec::new());
    assert_eq!(lines_with(&spool, "parent.lock"), 1);
    assert_eq!(lines_with(&spool, "child.lock"), 1);
}
