//! The chaos harness: many processes taking and releasing the same locks, shared and
//! exclusive, while a killer SIGKILLs random workers (holders and waiters alike) and, in daemon
//! mode, the daemon itself. Every holder checks inside its critical section that nobody else is.
//!
//! The check uses a second, independent lock: `flock(2)` on a per-lock check file, taken
//! non-blocking (exclusive by exclusive holders, shared by shared ones). `flock` locks never
//! conflict with the OFD/fcntl locks buildlock takes, and the kernel drops them when a process
//! dies, so a killed holder leaves nothing stale behind; a failed non-blocking `flock` while we
//! hold the buildlock lock is two holders at once. The check file is opened first, so it has the
//! A dying process releases its files in no guaranteed order, so a killed holder may still hold
//! its check lock for a moment after its buildlock lock is gone. Each holder therefore also
//! leaves a marker (`inside-L/PID-START.MODE`) while inside; a failed check lists the markers,
//! and counts as a violation unless every other holder it conflicts with (any, for a writer;
//! writers, for a reader) had already been SIGKILLed (or died of a panic) before we were
//! granted the lock (a killed process runs no more code, so it cannot be inside a critical
//! section). A failed check with no marker to explain it counts as a violation too.
//!
//! Short runs (a few seconds per mode) are part of the test suite. The long run:
//!
//! ```text
//! BUILDLOCK_CHAOS_SECS=600 BUILDLOCK_CHAOS_WORKERS=12 cargo test --release --test chaos -- --nocapture
//! ```
//!
//! Each run prints: operations, kills (of holders, of waiters, of the daemon), violations (must
//! be 0) and the worst time from a holder's (or the daemon's) death to the next grant.
// The independent check takes flock(2) locks on purpose, and the killer sends real signals.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use buildlock::{Connect, LockMode, LockTarget, Options, Wait};

const LOCKS: usize = 2;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_micros() as u64
}

/// A tiny deterministic generator (xorshift), seeded per process: no dependency needed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// One line per event, appended atomically (short O_APPEND writes) by every process.
fn log_event(log: &Path, line: &str) {
    let mut f = OpenOptions::new().create(true).append(true).open(log).unwrap();
    f.write_all(format!("{line}\n").as_bytes()).unwrap();
}

/// The worker: run as `chaos_worker` in a child process (see `spawn_worker`).
#[test]
#[ignore = "run by the chaos harness in its worker processes"]
fn chaos_worker() {
    let dir = PathBuf::from(std::env::var("CHAOS_DIR").expect("started by the harness"));
    let daemon = std::env::var("CHAOS_DAEMON").is_ok();
    let deadline = Instant::now() + Duration::from_millis(env_num("CHAOS_MILLIS", 1000));
    let log = dir.join("events");
    let me = std::process::id();
    // Pids are reused within a long run: markers name this incarnation (pid and start time).
    let incarnation = format!("{me}-{}", now_us());
    // A worker that dies of a panic must say so (with the time, before it is gone): it may
    // leave a marker behind, and the harness must know the process is no longer inside.
    {
        let (log, incarnation) = (log.clone(), incarnation.clone());
        std::panic::set_hook(Box::new(move |info| {
            let msg = info.to_string().replace('\n', " ");
            log_event(&log, &format!("X {incarnation} {} {msg}", now_us()));
        }));
    }
    // The check files first: lowest descriptors, dropped first when we die.
    let checks: Vec<_> = (0..LOCKS)
        .map(|i| OpenOptions::new().create(true).append(true).open(dir.join(format!("check{i}"))).unwrap())
        .collect();
    let opts = Options {
        connect: if daemon { Connect::DaemonOnly } else { Connect::Direct },
        runtime_dir: Some(dir.join("rt")),
        operation: format!("chaos worker {me}"),
        ..Options::default()
    };
    let mut rng = Rng::new(now_us() ^ u64::from(me) << 20);
    while Instant::now() < deadline {
        let lock = rng.below(LOCKS as u64) as usize;
        let shared = rng.below(10) < 3;
        let target = LockTarget::resolve(&format!("l{lock}"), &dir.join("locks")).unwrap();
        let mode = if shared { LockMode::Shared } else { LockMode::Exclusive };
        let opts = Options { mode, wait: Wait::Forever, ..opts.clone() };
        // The checker's own test: without the lock, it must see two holders.
        let unlocked = std::env::var("CHAOS_NO_LOCK").is_ok();
        let lease = match if unlocked { Ok(None) } else { buildlock::acquire(&target, &opts, &mut |_| {}).map(Some) } {
            Ok(l) => l,
            Err(e) => {
                // The daemon was killed under us: say so and try again (a new one starts).
                log_event(&log, &format!("E {me} {lock} {} {e}", now_us()));
                continue;
            }
        };
        log_event(&log, &format!("G {me} {lock} {} {}", now_us(), if shared { "s" } else { "x" }));
        let arg =
            if shared { nix::fcntl::FlockArg::LockSharedNonblock } else { nix::fcntl::FlockArg::LockExclusiveNonblock };
        #[allow(deprecated)]
        let inside_alone = nix::fcntl::flock(checks[lock].as_raw_fd(), arg).is_ok();
        // Named `pid-start.mode`: readers may legitimately be inside together.
        let mode_tag = if shared { "s" } else { "x" };
        let marker = dir.join(format!("inside-{lock}/{incarnation}.{mode_tag}"));
        if !inside_alone {
            let others = others_inside(&dir, lock, &format!("{incarnation}.{mode_tag}"));
            log_event(&log, &format!("V {me} {lock} {} {others} {mode_tag}", now_us()));
        }
        std::fs::write(&marker, "").expect("write the inside marker");
        std::thread::sleep(Duration::from_micros(rng.below(3000)));
        std::fs::remove_file(&marker).expect("remove the inside marker");
        #[allow(deprecated)]
        let _ = nix::fcntl::flock(checks[lock].as_raw_fd(), nix::fcntl::FlockArg::Unlock);
        log_event(&log, &format!("R {me} {lock} {}", now_us()));
        if let Some(Err(e)) = lease.map(|l| l.release()) {
            log_event(&log, &format!("E {me} {lock} {} release: {e}", now_us()));
        }
    }
}

/// The markers (`pid-start.mode`, comma-separated) other than `me` inside `lock` now.
fn others_inside(dir: &Path, lock: usize, me: &str) -> String {
    let pids: Vec<String> = std::fs::read_dir(dir.join(format!("inside-{lock}")))
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let pids: Vec<String> = pids.into_iter().filter(|p| p != me).collect();
    if pids.is_empty() {
        "-".into()
    } else {
        pids.join(",")
    }
}

fn worker_command(dir: &Path, daemon: bool, millis: u64) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["chaos_worker", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("CHAOS_DIR", dir)
        .env("CHAOS_MILLIS", millis.to_string())
        .env("BUILDLOCKD", env!("CARGO_BIN_EXE_buildlockd"))
        .env_remove("BUILDLOCK_NO_DAEMON")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if daemon {
        c.env("CHAOS_DAEMON", "1");
    }
    c
}

struct Report {
    operations: usize,
    holder_kills: usize,
    waiter_kills: usize,
    daemon_kills: usize,
    violations: Vec<String>,
    /// Worst time from a holder's death to the next grant of its lock.
    worst_holder_kill_to_grant: Option<Duration>,
    /// Failed checks explained by a holder that was already SIGKILLed and still releasing.
    dying_overlaps: usize,
    /// Worst time from the daemon's death to the next grant of any lock.
    worst_kill_to_grant: Option<Duration>,
    /// The events within 20 ms of the first violation, for diagnosis.
    context: String,
    /// Workers that died of a panic (a harness or library bug), with the message.
    panics: Vec<String>,
}

fn run_chaos(daemon: bool) -> Report {
    run_chaos_with(daemon, env_num("BUILDLOCK_CHAOS_SECS", 4), true, false)
}

fn run_chaos_with(daemon: bool, secs: u64, kill: bool, no_lock: bool) -> Report {
    let workers = env_num("BUILDLOCK_CHAOS_WORKERS", 6) as usize;
    let tmp = tempfile::Builder::new().prefix("buildlock-chaos").tempdir().unwrap();
    let dir = tmp.path().to_owned();
    std::fs::create_dir(dir.join("locks")).unwrap();
    for i in 0..LOCKS {
        std::fs::create_dir(dir.join(format!("inside-{i}"))).unwrap();
    }
    let log = dir.join("events");
    let end = Instant::now() + Duration::from_secs(secs);
    let left = || end.saturating_duration_since(Instant::now()).as_millis() as u64;
    let spawn = |millis| {
        let mut c = worker_command(&dir, daemon, millis);
        if no_lock {
            c.env("CHAOS_NO_LOCK", "1");
        }
        c.spawn().unwrap()
    };
    let mut pool: Vec<Child> = (0..workers).map(|_| spawn(left())).collect();
    let mut rng = Rng::new(now_us());
    let mut next_daemon_kill = Instant::now() + Duration::from_millis(700);
    while kill && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20 + rng.below(80)));
        // SIGKILL a random worker, holder or waiter, and replace it.
        let i = rng.below(pool.len() as u64) as usize;
        let pid = pool[i].id();
        // The time is taken before the signal is sent: the victim is dead by then at the latest.
        let at = now_us();
        if pool[i].kill().is_ok() {
            log_event(&log, &format!("K {pid} {at}"));
        }
        let _ = pool[i].wait();
        pool[i] = spawn(left());
        if daemon && Instant::now() >= next_daemon_kill {
            next_daemon_kill = Instant::now() + Duration::from_millis(500 + rng.below(1000));
            if let Some(d) =
                std::fs::read_to_string(dir.join("rt/buildlockd.pid")).ok().and_then(|p| p.trim().parse::<i32>().ok())
            {
                let at = now_us();
                if nix::sys::signal::kill(nix::unistd::Pid::from_raw(d), nix::sys::signal::SIGKILL).is_ok() {
                    log_event(&log, &format!("D {d} {at}"));
                }
            }
        }
    }
    for mut w in pool {
        let _ = w.wait();
    }
    if let Some(d) =
        std::fs::read_to_string(dir.join("rt/buildlockd.pid")).ok().and_then(|p| p.trim().parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(d), nix::sys::signal::SIGKILL);
    }
    let events = std::fs::read_to_string(&log).unwrap_or_default();
    if let Ok(keep) = std::env::var("CHAOS_KEEP_LOG") {
        let _ = std::fs::write(keep, &events);
    }
    analyse(&events)
}

/// Reads the event log: `G pid lock t mode`, `R pid lock t`, `V pid lock t`, `K pid t`,
/// `D pid t`, `E ...`.
fn analyse(events: &str) -> Report {
    let mut lines: Vec<Vec<&str>> = events.lines().map(|l| l.split(' ').collect()).collect();
    let t = |f: &Vec<&str>| -> u64 {
        let i = if matches!(f[0], "K" | "D" | "X") { 2 } else { 3 };
        f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    lines.sort_by_key(|f| t(f));
    let mut holding: HashMap<&str, &str> = HashMap::new(); // pid -> lock
    let mut report = Report {
        operations: 0,
        holder_kills: 0,
        waiter_kills: 0,
        daemon_kills: 0,
        violations: Vec::new(),
        worst_holder_kill_to_grant: None,
        dying_overlaps: 0,
        worst_kill_to_grant: None,
        context: String::new(),
        panics: Vec::new(),
    };
    let mut kills: HashMap<&str, Vec<u64>> = HashMap::new();
    for f in lines.iter().filter(|f| f[0] == "K") {
        kills.entry(f[1]).or_default().push(f.get(2).and_then(|t| t.parse().ok()).unwrap_or(u64::MAX));
    }
    // Workers that died of a panic (`X incarnation t message`): gone from that time on.
    let mut panicked: HashMap<&str, u64> = HashMap::new();
    for f in lines.iter().filter(|f| f[0] == "X") {
        panicked.insert(f[1], f.get(2).and_then(|t| t.parse().ok()).unwrap_or(u64::MAX));
        report.panics.push(f.join(" "));
    }
    // Whether incarnation `pid-start` was SIGKILLed after it started and before `before`.
    let killed_before = |incarnation: &str, before: u64| -> bool {
        let Some((pid, start)) = incarnation.split_once('-') else { return false };
        let start: u64 = start.parse().unwrap_or(u64::MAX);
        kills.get(pid).is_some_and(|ks| ks.iter().any(|&k| k >= start && k < before))
            || panicked.get(incarnation).is_some_and(|&p| p < before)
    };
    let mut granted_at: HashMap<&str, u64> = HashMap::new();
    // (lock or "*" for any, time of death) awaiting the next grant.
    let mut pending: Vec<(Option<&str>, &str, u64)> = Vec::new();
    for f in &lines {
        match f[0] {
            "G" => {
                report.operations += 1;
                holding.insert(f[1], f[2]);
                granted_at.insert(f[1], t(f));
                let now = t(f);
                pending.retain(|(lock, victim, at)| {
                    let matches = lock.is_none_or(|l| l == f[2]) && *victim != f[1];
                    if matches {
                        let d = Duration::from_micros(now.saturating_sub(*at));
                        let worst = if lock.is_some() {
                            &mut report.worst_holder_kill_to_grant
                        } else {
                            &mut report.worst_kill_to_grant
                        };
                        *worst = Some(worst.map_or(d, |w| w.max(d)));
                    }
                    !matches
                });
            }
            "R" => {
                holding.remove(f[1]);
            }
            "V" => {
                // Two holders, unless every other holder that conflicts with us (any, for a
                // writer; writers, for a reader) had been killed before our grant.
                let granted = granted_at.get(f[1]).copied().unwrap_or(u64::MAX);
                let reader = f.get(5) == Some(&"s");
                let others: Vec<(&str, &str)> =
                    f.get(4).map(|o| o.split(',').filter_map(|m| m.rsplit_once('.')).collect()).unwrap_or_default();
                let conflicting: Vec<&str> =
                    others.iter().filter(|(_, mode)| !reader || *mode == "x").map(|(inc, _)| *inc).collect();
                let dying = !conflicting.is_empty() && conflicting.iter().all(|o| killed_before(o, granted));
                if dying {
                    report.dying_overlaps += 1;
                } else {
                    if report.violations.is_empty() {
                        let at = t(f);
                        for g in lines.iter().filter(|g| t(g).abs_diff(at) < 20_000) {
                            report.context.push_str(&format!("  {:+8} us  {}\n", t(g) as i64 - at as i64, g.join(" ")));
                        }
                    }
                    report.violations.push(f.join(" "));
                }
            }
            "K" => match holding.remove(f[1]) {
                Some(lock) => {
                    report.holder_kills += 1;
                    pending.push((Some(lock), f[1], t(f)));
                }
                None => report.waiter_kills += 1,
            },
            "D" => {
                report.daemon_kills += 1;
                pending.push((None, "", t(f)));
            }
            _ => {}
        }
    }
    report
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("n/a".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
}

fn check(mode: &str, r: &Report) {
    println!(
        "chaos[{mode}]: {} operations, {} kills ({} holders, {} waiters, {} daemon), {} violations \
         ({} checks overlapped a killed holder still releasing), worst holder-kill-to-grant {}, \
         worst daemon-kill-to-grant {}",
        r.operations,
        r.holder_kills + r.waiter_kills + r.daemon_kills,
        r.holder_kills,
        r.waiter_kills,
        r.daemon_kills,
        r.violations.len(),
        r.dying_overlaps,
        ms(r.worst_holder_kill_to_grant),
        ms(r.worst_kill_to_grant),
    );
    assert!(r.panics.is_empty(), "workers panicked: {:?}", r.panics);
    assert!(
        r.violations.is_empty(),
        "two holders at once: {:?}\nevents around the first:\n{}",
        r.violations,
        r.context
    );
    assert!(r.operations > 0, "no lock was ever granted");
    assert!(r.holder_kills > 0, "the killer never hit a holder");
}

#[test]
fn the_checker_sees_two_holders_when_there_is_no_lock() {
    let r = run_chaos_with(false, 1, false, true);
    assert!(
        !r.violations.is_empty(),
        "the check never fired although nothing was locked ({} operations)",
        r.operations
    );
}

#[test]
fn chaos_direct_mode() {
    check("direct", &run_chaos(false));
}

#[test]
fn chaos_through_the_daemon_with_daemon_kills() {
    let r = run_chaos(true);
    assert!(r.daemon_kills > 0, "the daemon was never killed");
    check("daemon", &r);
}
