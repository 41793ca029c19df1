//! Daemon figures: uncontended acquire+release through `buildlockd`, the time from a holder's
//! SIGKILL to a waiter's grant, and the daemon's memory with many held leases.
//!
//! Run: `cargo bench --bench daemon` (add `-- --quick` for a short run). A private daemon is
//! started in a temporary runtime directory and stopped at the end. Nothing asserts on time.

use std::process::Command;
use std::time::{Duration, Instant};

use buildlock::{acquire, Connect, LockTarget, Options, Wait};
use common::{report, time_each};

mod common;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 10 } else { 1 };
    let dir = tempfile::tempdir().unwrap();
    let rt = dir.path().join("rt");
    let locks = dir.path().join("locks");
    std::env::set_var("BUILDLOCKD", env!("CARGO_BIN_EXE_buildlockd"));
    let pid = buildlock::start_daemon(Some(&rt)).expect("start buildlockd");
    let opts = Options { connect: Connect::DaemonOnly, runtime_dir: Some(rt.clone()), ..Options::default() };
    println!("{:<60} {:>12} {:>12} {:>8}", "scenario", "median", "p90", "n");

    let target = LockTarget::resolve("bench", &locks).unwrap();
    let nowait = Options { wait: Wait::NoWait, ..opts.clone() };
    report(
        "daemon acquire+release (shared connection, grant with fd, release)",
        time_each(5_000 / scale, || {
            let lease = acquire(&target, &nowait, &mut |_| {}).unwrap();
            assert!(lease.via_daemon());
            lease.release().unwrap();
        }),
    );

    let cli = env!("CARGO_BIN_EXE_buildlock-client");
    let mut samples = Vec::new();
    for _ in 0..(60 / scale.min(6)) {
        samples.push(kill_to_grant(cli, &rt, &locks, &opts));
    }
    report("SIGKILL of holder -> waiter granted, through the daemon", samples);

    // Many held leases. With one connection per process, each held lease costs the daemon one
    // descriptor (its copy of the lock file) and this process one (the copy it was handed): the
    // daemon raises its soft limit to the hard one at start, and so does this process here.
    let limit = buildlock_sys::ipc::raise_fd_limit().unwrap_or(1024);
    for wanted in [1_000usize, 10_000] {
        let fits = (limit.saturating_sub(128)) as usize / 1_000 * 1_000;
        let n = wanted.min(fits);
        if n < wanted {
            println!(
                "{:<60} needs {} descriptors, the hard limit is {limit}: measuring {n} instead",
                format!("daemon RSS with {wanted} held leases"),
                wanted + 128
            );
        }
        let before = rss_kib(pid);
        let start = Instant::now();
        let mut grants = Vec::with_capacity(n);
        let leases: Vec<_> = (0..n)
            .map(|i| {
                let target = LockTarget::resolve(&format!("m{i}"), &locks).unwrap();
                let t = Instant::now();
                let lease = acquire(&target, &nowait, &mut |_| {}).unwrap();
                grants.push(t.elapsed());
                lease
            })
            .collect();
        let took = start.elapsed();
        let after = rss_kib(pid);
        println!(
            "{:<60} {:>12} {:>12} {:>8}",
            format!("daemon RSS with {n} held leases (before: {before} KiB)"),
            format!("{after} KiB"),
            format!("{:.0} µs/grant", took.as_secs_f64() * 1e6 / n as f64),
            n
        );
        grants.sort();
        let p = |q: f64| grants[((grants.len() as f64 * q) as usize).min(grants.len() - 1)];
        println!(
            "{:<60} {:>12} {:>12} {:>8}",
            format!("grant latency while taking {n} leases: median / p99"),
            format!("{:.0} µs", p(0.5).as_secs_f64() * 1e6),
            format!("{:.0} µs", p(0.99).as_secs_f64() * 1e6),
            n
        );
        // With all of them held: one more lock, taken and released, many times.
        let extra = LockTarget::resolve("extra", &locks).unwrap();
        let mut samples = time_each(1_000 / scale, || {
            acquire(&extra, &nowait, &mut |_| {}).unwrap().release().unwrap();
        });
        samples.sort();
        let p99 = samples[(samples.len() * 99 / 100).min(samples.len() - 1)];
        println!(
            "{:<60} {:>12} {:>12} {:>8}",
            format!("acquire+release with {n} leases held: median / p99"),
            format!("{:.0} µs", samples[samples.len() / 2].as_secs_f64() * 1e6),
            format!("{:.0} µs", p99.as_secs_f64() * 1e6),
            samples.len()
        );
        drop(leases);
    }
    let _ = buildlock::ask_daemon(Some(&rt), &buildlock_proto::Request::Shutdown);
}

/// A CLI holder through the daemon, a library waiter queued behind it: SIGKILL the holder and
/// time the waiter's grant.
fn kill_to_grant(cli: &str, rt: &std::path::Path, locks: &std::path::Path, opts: &Options) -> Duration {
    let mut holder = Command::new(cli);
    holder.args(["--dir", locks.to_str().unwrap(), "--runtime-dir", rt.to_str().unwrap(), "run", "k"]);
    let target = LockTarget::resolve("k", locks).unwrap();
    let opts = opts.clone();
    common::kill_to_grant(holder, move || acquire(&target, &opts, &mut |_| {}).unwrap())
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
