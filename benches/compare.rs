//! buildlock's side of the comparison with flock(1), Python `fasteners` and `filelock`
//! (`scripts/compare.py` runs this and measures the others on the same machine).
//!
//! Run: `cargo bench --bench compare` (after `--`: `--quick` for a short run, `--only SCENARIO`
//! for one scenario, `--mode direct|daemon` for one mode; `cli_run` always runs both). Prints one JSON object per line on stdout:
//! `{"scenario", "impl", "median_us", "p90_us", "n", ...}`; progress goes to stderr. Nothing here
//! asserts on time. Scenarios, each direct (on-disk protocol) and through a private daemon:
//!
//! - `uncontended`: library acquire+release of one exclusive lock nobody else wants; in direct
//!   mode also the layer below (`buildlock_disk::acquire`) with and without the keeper thread
//!   (`watch`) that the library's direct leases run, to show where the time goes; in daemon mode
//!   also a bare one-byte round trip to another process over a Unix socket, the floor of any
//!   request to the daemon.
//! - `handoff`: the holder (a thread of this process) releases while a waiter (a child process:
//!   this binary re-executed in `--handoff-waiter` mode) is blocked; from just before
//!   `release()` to the waiter's grant. The two sides are in different processes, so they
//!   timestamp with the system-wide realtime clock (`SystemTime`), read just before the release
//!   and just after the grant.
//! - `kill_to_grant`: a `buildlock-client run` holder is SIGKILLed while a library waiter (a
//!   thread of this process) is blocked; from `kill()` to the grant (`Instant`, one process).
//! - `contention8`: 8 threads, each with its own leases, acquire and release one exclusive lock
//!   for a fixed wall time; throughput, each one's share, fairness (min share / max share) and
//!   mutual-exclusion violations seen by a shared "inside" flag (must be 0). `median_us`/`p90_us`
//!   are the time from asking for the lock to getting it.
//! - `cli_run`: wall time of `buildlock-client run NAME -- true`, with `flock(1) FILE true`
//!   (interleaved with it, same harness) as the reference.
//!
//! Loop mode, for counting system calls (`scripts/syscalls.py`):
//! `--loop uncontended --mode direct|daemon --iterations N` runs N library acquire+release of
//! one uncontended lock and prints nothing per operation (in daemon mode, with a private daemon
//! this process starts and stops, so `strace -f` sees both sides). Two runs with different N
//! give the cost per operation without the start-up.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use buildlock::{acquire, Connect, LockTarget, Options, Wait};
use common::time_each;
use serde_json::{json, Value};

mod common;

const SCENARIOS: [&str; 5] = ["uncontended", "handoff", "kill_to_grant", "contention8", "cli_run"];

/// Environment variables of buildlock that must not leak into the processes started here.
const SCRUB: [&str; 7] = [
    "BUILDLOCK_NO_DAEMON",
    "BUILDLOCK_SOFT",
    "BUILDLOCK_DIR",
    "BUILDLOCK_RUNTIME_DIR",
    "BUILDLOCK_STALE_AFTER",
    "BUILDLOCK_LOG",
    "BUILDLOCK_JSON",
];

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Direct,
    Daemon,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "buildlock direct",
            Mode::Daemon => "buildlock daemon",
        }
    }

    fn arg(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Daemon => "daemon",
        }
    }
}

struct Ctx {
    quick: bool,
    locks: PathBuf,
    rt: PathBuf,
    cli: &'static str,
}

impl Ctx {
    fn options(&self, mode: Mode) -> Options {
        let connect = if mode == Mode::Direct { Connect::Direct } else { Connect::DaemonOnly };
        Options { connect, runtime_dir: Some(self.rt.clone()), operation: "bench".into(), ..Options::default() }
    }

    fn target(&self, name: &str) -> LockTarget {
        LockTarget::resolve(name, &self.locks).unwrap()
    }

    /// `buildlock-client` with this bench's lock and runtime directories, in `mode`.
    fn cli(&self, mode: Mode) -> Command {
        let mut cmd = Command::new(self.cli);
        for var in SCRUB {
            cmd.env_remove(var);
        }
        cmd.args(["--dir", self.locks.to_str().unwrap(), "--runtime-dir", self.rt.to_str().unwrap()]);
        if mode == Mode::Direct {
            cmd.env("BUILDLOCK_NO_DAEMON", "1").arg("--no-daemon");
        }
        cmd
    }

    fn scale(&self, full: usize, quick: usize) -> usize {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--handoff-waiter") {
        return handoff_waiter(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("--echo") {
        return echo();
    }
    if let Some(i) = args.iter().position(|a| a == "--loop") {
        return loop_mode(&args, args.get(i + 1).map(String::as_str));
    }
    let quick = args.iter().any(|a| a == "--quick");
    let only = args.iter().position(|a| a == "--only").map(|i| match args.get(i + 1) {
        Some(s) if SCENARIOS.contains(&s.as_str()) => s.clone(),
        other => {
            eprintln!("compare: --only needs one of {}, got {other:?}", SCENARIOS.join(", "));
            std::process::exit(2);
        }
    });
    let run = |s: &str| only.as_deref().is_none_or(|o| o == s);
    // `--mode direct|daemon`: one mode only (for profiling one path with strace or perf).
    let modes: Vec<Mode> = match args.iter().position(|a| a == "--mode").map(|i| args.get(i + 1).map(String::as_str)) {
        None => vec![Mode::Direct, Mode::Daemon],
        Some(Some("direct")) => vec![Mode::Direct],
        Some(Some("daemon")) => vec![Mode::Daemon],
        Some(other) => {
            eprintln!("compare: --mode needs direct or daemon, got {other:?}");
            std::process::exit(2);
        }
    };

    let dir = tempfile::tempdir().unwrap();
    let rt = dir.path().join("rt");
    let locks = dir.path().join("locks");
    std::fs::create_dir_all(&locks).unwrap();
    for var in SCRUB {
        std::env::remove_var(var);
    }
    std::env::set_var("BUILDLOCKD", env!("CARGO_BIN_EXE_buildlockd"));
    // Should this process die before its shutdown request, the daemon goes by itself.
    std::env::set_var("BUILDLOCKD_IDLE_EXIT", "120");
    buildlock::start_daemon(Some(&rt)).expect("start buildlockd");
    let ctx = Ctx { quick, locks, rt: rt.clone(), cli: env!("CARGO_BIN_EXE_buildlock-client") };

    for &mode in &modes {
        if run("uncontended") {
            uncontended(&ctx, mode);
        }
        if run("handoff") {
            handoff(&ctx, mode);
        }
        if run("kill_to_grant") {
            kill_to_grant(&ctx, mode);
        }
        if run("contention8") {
            contention(&ctx, mode, 8);
        }
    }
    if run("cli_run") {
        cli_run(&ctx);
    }
    let _ = buildlock::ask_daemon(Some(&rt), &buildlock_proto::Request::Shutdown);
}

/// `--loop uncontended --mode direct|daemon --iterations N`: N operations, nothing printed per
/// operation, for `strace -f -c` (see `scripts/syscalls.py`).
fn loop_mode(args: &[String], scenario: Option<&str>) {
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).map(String::as_str);
    if scenario != Some("uncontended") {
        eprintln!("compare: --loop needs uncontended, got {scenario:?}");
        std::process::exit(2);
    }
    let mode = match value("--mode") {
        Some("direct") => Mode::Direct,
        Some("daemon") => Mode::Daemon,
        other => {
            eprintln!("compare: --loop needs --mode direct or --mode daemon, got {other:?}");
            std::process::exit(2);
        }
    };
    let Some(n) = value("--iterations").and_then(|v| v.parse::<usize>().ok()) else {
        eprintln!("compare: --loop needs --iterations N (a whole number)");
        std::process::exit(2);
    };
    let dir = tempfile::tempdir().unwrap();
    let rt = dir.path().join("rt");
    let locks = dir.path().join("locks");
    std::fs::create_dir_all(&locks).unwrap();
    for var in SCRUB {
        std::env::remove_var(var);
    }
    if mode == Mode::Daemon {
        std::env::set_var("BUILDLOCKD", env!("CARGO_BIN_EXE_buildlockd"));
        std::env::set_var("BUILDLOCKD_IDLE_EXIT", "120");
        buildlock::start_daemon(Some(&rt)).expect("start buildlockd");
    }
    let ctx = Ctx { quick: true, locks, rt: rt.clone(), cli: env!("CARGO_BIN_EXE_buildlock-client") };
    let target = ctx.target("uncontended");
    let opts = Options { wait: Wait::NoWait, ..ctx.options(mode) };
    for _ in 0..n {
        let lease = acquire(&target, &opts, &mut |_| {}).unwrap();
        assert_eq!(lease.via_daemon(), mode == Mode::Daemon);
        lease.release().unwrap();
    }
    if mode == Mode::Daemon {
        let _ = buildlock::ask_daemon(Some(&rt), &buildlock_proto::Request::Shutdown);
    }
}

fn progress(what: &str, mode: Mode) {
    eprintln!("compare: {what}, {}", mode.name());
}

/// Prints one result line.
fn emit(scenario: &str, imp: &str, samples: &mut [Duration], extra: Value) {
    samples.sort();
    let at = |q: f64| samples.get(((samples.len().max(1) - 1) as f64 * q) as usize).map(|d| us(*d));
    let mut v = json!({
        "scenario": scenario,
        "impl": imp,
        "median_us": at(0.5),
        "p90_us": at(0.9),
        "n": samples.len(),
    });
    if let (Value::Object(v), Value::Object(extra)) = (&mut v, extra) {
        v.extend(extra);
    }
    println!("{v}");
    std::io::stdout().flush().unwrap();
}

fn us(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e7).round() / 10.0
}

// --- uncontended -------------------------------------------------------------------------------

fn uncontended(ctx: &Ctx, mode: Mode) {
    progress("uncontended acquire+release", mode);
    let target = ctx.target("uncontended");
    let opts = Options { wait: Wait::NoWait, ..ctx.options(mode) };
    let n = match mode {
        Mode::Direct => ctx.scale(20_000, 2_000),
        Mode::Daemon => ctx.scale(5_000, 500),
    };
    let mut samples = time_each(n, || {
        let lease = acquire(&target, &opts, &mut |_| {}).unwrap();
        assert_eq!(lease.via_daemon(), mode == Mode::Daemon);
        lease.release().unwrap();
    });
    emit("uncontended", mode.name(), &mut samples, json!({"what": "acquire+release, in-process library call"}));
    if mode == Mode::Daemon {
        round_trip_floor(ctx);
    }
    if mode == Mode::Direct {
        // The layer below, for the breakdown: the on-disk protocol without and with the keeper
        // thread (`watch`) that the library's direct leases run.
        for (imp, watch) in [("buildlock-disk, watch off", false), ("buildlock-disk, watch on", true)] {
            let opts = buildlock_disk::LockOptions { watch, operation: "bench".into(), ..Default::default() };
            let mut samples = time_each(ctx.scale(10_000, 1_000), || {
                buildlock_disk::acquire(&target, &opts, Wait::NoWait, &mut |_, _| {}).unwrap().release().unwrap();
            });
            let what = "acquire+release, buildlock_disk::acquire: the layer under the library's direct mode";
            emit("uncontended", imp, &mut samples, json!({"what": what}));
        }
    }
}

/// The floor under the daemon path: one byte to another process over a Unix socket and one
/// byte back (the child: this binary in `--echo` mode), with no work on either side. An
/// acquire+release through the daemon is one such round trip plus the daemon's work on the
/// lock files, so its ratio to direct mode cannot go below (this + direct) / direct.
fn round_trip_floor(ctx: &Ctx) {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg("--echo")
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut byte = [0u8; 1];
    let mut samples = time_each(ctx.scale(5_000, 500), || {
        ours.write_all(b"x").unwrap();
        ours.read_exact(&mut byte).unwrap();
    });
    drop(ours);
    child.wait().unwrap();
    let what = "one byte to another process and back over a Unix socket: the floor of any round trip to the daemon";
    emit("uncontended", "unix socket round trip", &mut samples, json!({"what": what}));
}

/// `--echo`: writes back every byte read on stdin (a Unix socket), until it closes.
fn echo() {
    use std::io::Read;
    use std::os::fd::AsFd;
    let stdin = std::io::stdin();
    let mut sock = std::fs::File::from(stdin.as_fd().try_clone_to_owned().unwrap());
    let mut byte = [0u8; 1];
    while sock.read_exact(&mut byte).is_ok() {
        if sock.write_all(&byte).is_err() {
            break;
        }
    }
}

// --- handoff -----------------------------------------------------------------------------------

/// Microseconds since the epoch: the one clock two processes share here.
fn wall_us() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64() * 1e6
}

/// The waiter side of `handoff`, a child process: on "go", says "waiting", blocks in
/// `acquire`, says "granted <wall µs>"; on "release", releases and says "released".
fn handoff_waiter(args: &[String]) {
    let [mode, locks, name, rt, how] = args else { panic!("--handoff-waiter MODE LOCKS NAME RT builder|on_wait") };
    let connect = if mode == "direct" { Connect::Direct } else { Connect::DaemonOnly };
    let opts = Options { connect, runtime_dir: Some(PathBuf::from(rt)), ..Options::default() };
    let target = LockTarget::resolve(name, Path::new(locks)).unwrap();
    // The documented way: the builder, with no wait reports asked for.
    let mut lock = buildlock::Lock::path(&target.path).options(opts.clone());
    let mut out = std::io::stdout().lock();
    let mut lease = None;
    for line in std::io::stdin().lock().lines() {
        match line.unwrap().as_str() {
            "go" => {
                writeln!(out, "waiting").unwrap();
                out.flush().unwrap();
                let l = match how.as_str() {
                    "builder" => lock.acquire().unwrap(),
                    _ => acquire(&target, &opts, &mut |_| {}).unwrap(),
                };
                let t = wall_us();
                writeln!(out, "granted {t:.1}").unwrap();
                out.flush().unwrap();
                lease = Some(l);
            }
            "release" => {
                lease.take().unwrap().release().unwrap();
                writeln!(out, "released").unwrap();
                out.flush().unwrap();
            }
            other => panic!("handoff waiter: unexpected {other:?}"),
        }
    }
}

struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    fn say(&mut self, what: &str) {
        writeln!(self.stdin, "{what}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn hear(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "handoff waiter died");
        line.trim_end().to_owned()
    }
}

/// `handoff`, with the waiter taking the lock through the builder without `on_wait` (the
/// documented way: in direct mode it blocks in its own thread) and, as `on_wait`, through
/// `acquire` with a wait-report callback (a waiting thread of the library's reports, then hands
/// the lock over: one more wake-up).
fn handoff(ctx: &Ctx, mode: Mode) {
    for how in ["builder", "on_wait"] {
        handoff_with(ctx, mode, how);
    }
}

fn handoff_with(ctx: &Ctx, mode: Mode, how: &str) {
    progress(&format!("handoff (release -> next waiter's grant), waiter: {how}"), mode);
    let name = format!("handoff-{}-{how}", mode.arg());
    let target = ctx.target(&name);
    let opts = ctx.options(mode);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--handoff-waiter", mode.arg(), ctx.locks.to_str().unwrap(), &name, ctx.rt.to_str().unwrap(), how])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut peer =
        Peer { stdin: child.stdin.take().unwrap(), stdout: BufReader::new(child.stdout.take().unwrap()), child };
    let n = ctx.scale(200, 30);
    let (mut samples, mut early) = (Vec::new(), 0);
    for i in 0..n + 5 {
        let lease = acquire(&target, &opts, &mut |_| {}).unwrap();
        peer.say("go");
        assert_eq!(peer.hear(), "waiting");
        // Let the waiter reach its blocking wait (in the kernel, or in the daemon's queue).
        std::thread::sleep(Duration::from_millis(15));
        let released = wall_us();
        lease.release().unwrap();
        let granted: f64 = peer.hear().strip_prefix("granted ").unwrap().parse().unwrap();
        peer.say("release");
        assert_eq!(peer.hear(), "released");
        if i < 5 {
            continue; // warm up
        }
        if granted < released {
            early += 1; // granted before we released: a violation (or a clock step)
        } else {
            samples.push(Duration::from_secs_f64((granted - released) / 1e6));
        }
    }
    drop(peer.stdin);
    peer.child.wait().unwrap();
    let (imp, what) = match how {
        "builder" => (mode.name().to_owned(), "waiter: Lock builder without on_wait"),
        _ => (format!("{}, waiter with on_wait", mode.name()), "waiter: acquire() with an on_wait callback"),
    };
    emit(
        "handoff",
        &imp,
        &mut samples,
        json!({
            "violations": early,
            "what": format!("holder thread here releases, waiter is another process ({what}); SystemTime on both sides"),
        }),
    );
}

// --- kill_to_grant -----------------------------------------------------------------------------

fn kill_to_grant(ctx: &Ctx, mode: Mode) {
    progress("SIGKILL of holder -> waiter granted", mode);
    let name = format!("kill-{}", mode.arg());
    let n = ctx.scale(60, 10);
    let mut samples: Vec<Duration> = (0..n).map(|_| kill_once(ctx, mode, &name)).collect();
    emit(
        "kill_to_grant",
        mode.name(),
        &mut samples,
        json!({"what": "buildlock-client run holder SIGKILLed; library waiter thread here; Instant"}),
    );
}

fn kill_once(ctx: &Ctx, mode: Mode, name: &str) -> Duration {
    let mut holder = ctx.cli(mode);
    holder.args(["run", name]);
    let (target, opts) = (ctx.target(name), ctx.options(mode));
    common::kill_to_grant(holder, move || acquire(&target, &opts, &mut |_| {}).unwrap())
}

// --- contention --------------------------------------------------------------------------------

fn contention(ctx: &Ctx, mode: Mode, threads: usize) {
    progress(&format!("{threads} contenders"), mode);
    let secs = if ctx.quick { 1.0 } else { 3.0 };
    let target = ctx.target(&format!("contention-{}", mode.arg()));
    let opts = ctx.options(mode);
    let inside = Arc::new(AtomicBool::new(false));
    let violations = Arc::new(AtomicU64::new(0));
    let counter = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (target, opts) = (target.clone(), opts.clone());
            let (inside, violations, counter) = (inside.clone(), violations.clone(), counter.clone());
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut waits = Vec::new();
                barrier.wait();
                let deadline = Instant::now() + Duration::from_secs_f64(secs);
                loop {
                    let asked = Instant::now();
                    let lease = acquire(&target, &opts, &mut |_| {}).unwrap();
                    let granted = Instant::now();
                    if inside.swap(true, Ordering::SeqCst) {
                        violations.fetch_add(1, Ordering::SeqCst);
                    }
                    // The critical section: a read-modify-write that a second holder would break.
                    counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                    inside.store(false, Ordering::SeqCst);
                    lease.release().unwrap();
                    if granted >= deadline {
                        break;
                    }
                    waits.push(granted - asked);
                }
                waits
            })
        })
        .collect();
    barrier.wait();
    let per: Vec<Vec<Duration>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ops: Vec<usize> = per.iter().map(Vec::len).collect();
    let total: usize = ops.iter().sum();
    // Every grant (including the last one of each thread, past the deadline) added one.
    let lost_updates = (total + threads) as u64 - counter.load(Ordering::SeqCst);
    let shares: Vec<f64> = ops.iter().map(|&o| o as f64 / total.max(1) as f64).collect();
    let (min, max) = (ops.iter().min().copied().unwrap_or(0), ops.iter().max().copied().unwrap_or(0));
    let mut waits: Vec<Duration> = per.into_iter().flatten().collect();
    emit(
        "contention8",
        mode.name(),
        &mut waits,
        json!({
            "contenders": threads,
            "kind": "threads, each its own leases",
            "duration_s": secs,
            "ops": total,
            "ops_per_s": (total as f64 / secs).round(),
            "ops_each": ops,
            "shares": shares,
            "fairness": if max == 0 { 0.0 } else { min as f64 / max as f64 },
            "violations": violations.load(Ordering::SeqCst) + lost_updates,
            "what": "median/p90: time from asking for the lock to getting it",
        }),
    );
}

// --- cli_run -----------------------------------------------------------------------------------

fn cli_run(ctx: &Ctx) {
    eprintln!("compare: buildlock-client run NAME -- true, direct and daemon, and flock(1) FILE true");
    let n = ctx.scale(300, 40);
    let has_flock = Command::new("flock").arg("--version").output().is_ok_and(|o| o.status.success());
    let flock_file = ctx.locks.join("flock-cli.lock");
    let mut samples = [Vec::new(), Vec::new(), Vec::new()];
    // Warm up, then take the three in turn so that the machine's noise falls on all alike.
    for i in 0..n + n / 10 {
        for (k, mode) in [Mode::Direct, Mode::Daemon].into_iter().enumerate() {
            let t = Instant::now();
            let st = ctx.cli(mode).args(["run", &format!("cli-{}", mode.arg()), "--", "true"]).status().unwrap();
            let took = t.elapsed();
            assert!(st.success(), "buildlock-client run failed: {st}");
            if i >= n / 10 {
                samples[k].push(took);
            }
        }
        if has_flock {
            let t = Instant::now();
            assert!(Command::new("flock").arg(&flock_file).arg("true").status().unwrap().success());
            if i >= n / 10 {
                samples[2].push(t.elapsed());
            }
        }
    }
    let [direct, daemon, flock] = &mut samples;
    let what = "whole process, std::process::Command, taken in turn with the other two";
    emit(
        "cli_run",
        Mode::Direct.name(),
        direct,
        json!({"harness": "rust", "command": "buildlock-client --no-daemon run NAME -- true", "what": what}),
    );
    emit(
        "cli_run",
        Mode::Daemon.name(),
        daemon,
        json!({"harness": "rust", "command": "buildlock-client run NAME -- true (daemon running)", "what": what}),
    );
    if has_flock {
        emit("cli_run", "flock(1)", flock, json!({"harness": "rust", "command": "flock FILE true", "what": what}));
    }
}
