//! What the bench binaries share: timing loops, the figures table, and the SIGKILL-to-grant
//! measurement.

#![allow(dead_code)] // each bench uses its own subset

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `f` `n` times after a tenth as many warm-up runs; one duration per run.
pub fn time_each(n: usize, mut f: impl FnMut()) -> Vec<Duration> {
    for _ in 0..(n / 10).max(1) {
        f();
    }
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect()
}

/// Prints one row: label, median, 90th percentile, sample count.
pub fn report(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    println!("{label:<60} {:>12} {:>12} {:>8}", fmt(at(0.5)), fmt(at(0.9)), samples.len());
}

/// "12.3 µs" or "4.56 ms".
pub fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.1} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

/// Starts `holder` (a `buildlock-client … run NAME` command; the command to run is appended
/// here and prints "locked" once it holds the lock) in a process group of its own, then `waiter`
/// in a thread (it must block until it is granted the same lock, returning whatever keeps it
/// held), SIGKILLs the holder's whole process group (`run` and its command, as a CI timeout or
/// Ctrl+C does: `run` alone killed leaves the lock to its command, which goes on) once the
/// waiter has had time to queue, reaps it at once (as the shell that started a build would), and
/// returns the time from the kill to the grant.
pub fn kill_to_grant<G: Send + 'static>(mut holder: Command, waiter: impl FnOnce() -> G + Send + 'static) -> Duration {
    use std::os::unix::process::CommandExt;
    let mut holder = holder
        .args(["--", "sh", "-c", "echo locked; exec sleep 1000"])
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start the holder");
    let mut line = String::new();
    BufReader::new(holder.stdout.take().expect("piped")).read_line(&mut line).expect("holder output");
    assert_eq!(line.trim(), "locked");
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let held = waiter();
        tx.send(Instant::now()).expect("bench alive");
        drop(held);
    });
    // Let the waiter reach its blocking wait (a bench may sleep; tests may not).
    std::thread::sleep(Duration::from_millis(100));
    let killed = Instant::now();
    #[allow(clippy::disallowed_methods)] // a bench's own signal, not locking code
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(holder.id() as i32), nix::sys::signal::SIGKILL)
        .expect("SIGKILL the holder's process group");
    holder.wait().expect("reap the holder");
    let granted = rx.recv().expect("the waiter was granted");
    thread.join().expect("waiter thread");
    granted - killed
}
