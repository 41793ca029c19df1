//! Direct-mode (on-disk protocol) figures: uncontended acquire+release, the CLI's cost per
//! `run`, and the time from a holder's SIGKILL to a waiter's grant.
//!
//! Run: `cargo bench --bench direct` (add `-- --quick` for a short run). Figures go to stdout as
//! a table; nothing here asserts on time.

use std::process::Command;
use std::time::Duration;

use buildlock_disk::{acquire, Backend, LockOptions, LockTarget, Wait};
use buildlock_sys::{LockFile, LockMode};
use common::{report, time_each};

mod common;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 10 } else { 1 };
    let dir = tempfile::tempdir().unwrap();
    println!("{:<58} {:>12} {:>12} {:>8}", "scenario", "median", "p90", "n");

    // The raw OS lock, descriptor kept open: the floor.
    let file = LockFile::open(&dir.path().join("raw.lock")).unwrap();
    report(
        "OFD lock + unlock, descriptor kept open",
        time_each(200_000 / scale, || {
            assert!(file.try_lock(LockMode::Exclusive).unwrap());
            file.unlock().unwrap();
        }),
    );

    for (label, name, backend) in [
        ("library acquire+release, OS lock (with metadata)", "os", Backend::Auto),
        ("library acquire+release, soft lock", "soft", Backend::Soft),
    ] {
        let target = LockTarget::resolve(name, dir.path()).unwrap();
        let opts = LockOptions { backend, operation: "bench".into(), ..LockOptions::default() };
        report(
            label,
            time_each(20_000 / scale, || {
                acquire(&target, &opts, Wait::NoWait, &mut |_, _| {}).unwrap().release().unwrap();
            }),
        );
    }

    let cli = env!("CARGO_BIN_EXE_buildlock-client");
    let lock = dir.path().join("cli.lock");
    report(
        "buildlock-client run NAME -- true (whole process)",
        time_each(400 / scale, || {
            let dir = dir.path().to_str().unwrap();
            let st = Command::new(cli).args(["--no-daemon", "--dir", dir, "run", "cli", "--", "true"]).status();
            assert!(st.unwrap().success());
        }),
    );
    if Command::new("flock").arg("--version").output().is_ok() {
        report(
            "flock(1) FILE true (reference)",
            time_each(400 / scale, || {
                assert!(Command::new("flock").arg(&lock).arg("true").status().unwrap().success());
            }),
        );
    }

    for (label, soft) in [
        ("SIGKILL of holder -> waiter granted, OS lock", false),
        ("SIGKILL of holder -> waiter granted, soft lock", true),
    ] {
        let mut samples = Vec::new();
        for _ in 0..(60 / scale.min(6)) {
            samples.push(kill_to_grant(cli, dir.path(), soft));
        }
        report(label, samples);
    }
}

/// A direct-mode CLI holder and a library waiter on the same lock: SIGKILL the holder and time
/// the waiter's grant.
fn kill_to_grant(cli: &str, dir: &std::path::Path, soft: bool) -> Duration {
    let mut holder = Command::new(cli);
    holder.args(["--no-daemon", "--dir", dir.to_str().unwrap()]);
    if soft {
        holder.arg("--soft");
    }
    // One lock per backend: an OS-lock file left behind reads as a fresh soft lock without
    // metadata, which soft locks give the whole grace period.
    let name = if soft { "kill-soft" } else { "kill-os" };
    holder.args(["run", name]);
    let target = LockTarget::resolve(name, dir).unwrap();
    let opts = LockOptions { backend: if soft { Backend::Soft } else { Backend::Auto }, ..LockOptions::default() };
    common::kill_to_grant(holder, move || acquire(&target, &opts, Wait::Forever, &mut |_, _| {}).unwrap())
}
