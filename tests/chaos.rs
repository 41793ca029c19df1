//! The chaos harness: many processes taking and releasing the same locks, shared and
//! exclusive, while killers SIGKILL random workers (holders and waiters alike), `run` processes,
//! `acquire --pid` keepers or the daemon. Every holder checks inside its critical section that
//! nobody else is, and every holder logs when it is inside; the analysis of the log judges.
//!
//! Workers come in kinds, mixed in one run: `lib` (the library, in the worker's own process),
//! `soft` (the library with soft locks), `run` (a loop over `buildlock-client run L -- sh -c
//! 'SECTION & wait'`: the critical section lives in a grandchild of `run`), `keeper` (a loop over
//! `acquire --pid SELF`, the section, `release --pid SELF`) and `fasteners` (the Python
//! `fasteners` package, `tests/py/fasteners_tool.py chaos`; skipped with a notice when
//! `BUILDLOCK_TEST_PYTHON` is unset).
//!
//! A critical section (the same in every kind): log `G` (granted; after the lock is ours, so the
//! logged time is inside the true hold), write the marker `inside-L/PID-START.MODE`, take a
//! second, independent lock non-blocking (`flock(2)` on a per-lock check file: exclusive by
//! exclusive holders, shared by shared ones; `flock` never conflicts with the OFD/fcntl locks
//! buildlock and fasteners take, and the kernel drops it when a process dies), sleep a little,
//! unlock the check lock, remove the marker, log `R` (before the lock is released). So whenever a
//! process holds a check lock its marker exists. A failed check lists the markers and logs `V`.
//!
//! Two judgements, both over the whole log:
//!
//! - **Overlap:** each holder's logged span runs from its `G` to its `R`, or to the time the
//!   killer took just before sending SIGKILL (or to its panic). Every logged span lies inside the
//!   true hold, so two overlapping spans on one lock, one of them exclusive, are two holders at
//!   once: a violation, never excused.
//! - **Check:** a failed check is excused only when every conflicting marker belongs to a worker
//!   the killer had already sent SIGKILL to and the harness had not yet reaped (a dying process
//!   releases its files in no set order: its buildlock lock may go before its check lock). The
//!   harness logs the reap (`Q`), not just the kill. Markers of workers reaped before the check
//!   are left-overs and ignored; a failed check with nothing else to explain it is a violation.
//!   Every excusing worker must have been killed while holding that lock, and excused checks are
//!   at most the holder kills (both asserted).
//!
//! Release errors ("lost while held"), acquire errors and workers that exited badly are counted
//! and reported; the test fails on release errors, bad exits and panics.
//!
//! **Across hosts** (`chaos_remote_across_two_hosts`): the locks live on a PostgreSQL server the
//! harness starts (`tests/support/pg_server.rs`), and the workers run on two hosts, network
//! namespaces with a link each to the server (`tests/support/netns.rs`), each host with its own
//! daemon, runtime and lock directory; `lib` workers go through their host's daemon, `run`
//! workers too (`--remote-timeout 8`), and one section in twelve of a `run` worker lasts up to
//! twelve seconds, past the remote timeout (ended early, and logged, on the SIGTERM of a `run`
//! that lost its lock; the link killer cuts off the host of such a holder). Killers:
//! holders and waiters, a host's daemon, and a host's link (taken down for longer than the remote
//! timeout, then up). Leases lost that way are counted, not failures; two holders are. The
//! check files are on the file system both hosts share, so the check sees across them. Needs
//! root (skipped, saying so, otherwise); its length is `BUILDLOCK_CHAOS_REMOTE_SECS` (default 20).
//! `chaos_remote_across_two_hosts` is `#[ignore]`d (long); the one with daemon and `run` kills
//! (20 s) and the self-test run by default. The runs:
//!
//! ```text
//! BUILDLOCK_CHAOS_REMOTE_SECS=60 BUILDLOCK_CHAOS_WORKERS=10 cargo test --release --test chaos -- --nocapture --test-threads=1 --ignored --exact chaos_remote_across_two_hosts
//! ```
//!
//! Short runs (a few seconds per scenario) are part of the test suite. The long run:
//!
//! ```text
//! BUILDLOCK_CHAOS_SECS=600 BUILDLOCK_CHAOS_WORKERS=12 cargo test --release --test chaos -- --nocapture --test-threads=1
//! ```
// The independent check takes flock(2) locks on purpose, and the killers send real signals.
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use buildlock::{Backend, Connect, LockMode, LockTarget, Options, Wait};

#[path = "support/netns.rs"]
mod netns;
#[path = "support/pg_server.rs"]
mod pg_server;

/// The remote timeout of the scenario across hosts: the shortest allowed, so that a cut link
/// loses its leases within the run.
const REMOTE_TIMEOUT_SECS: u64 = 8;

const LOCKS: usize = 2;

/// Bounds every wait of the harness on a process: past it, the process is killed and the test
/// fails naming it. A bound on a failure, not a performance expectation
/// (`BUILDLOCK_CHAOS_HANG_SECS`, default 60).
fn hang() -> Duration {
    Duration::from_secs(env_num("BUILDLOCK_CHAOS_HANG_SECS", 60))
}

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

/// Waits for `child` at most [`hang`]; past it, kills it and says so, naming `what` and the
/// processes it was waiting for.
fn wait_bounded(child: &mut Child, what: &str) -> Result<ExitStatus, String> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Ok(st);
        }
        if start.elapsed() > hang() {
            let processes = tree(child.id(), 2);
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{what} (pid {}) did not exit within {:?}: killed it; its processes were:\n{processes}",
                child.id(),
                hang()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The kinds of worker; see the crate doc.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Lib,
    Soft,
    Run,
    Keeper,
    Fasteners,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Lib => "lib",
            Kind::Soft => "soft",
            Kind::Run => "run",
            Kind::Keeper => "keeper",
            Kind::Fasteners => "fasteners",
        }
    }

    fn parse(s: &str) -> Kind {
        [Kind::Lib, Kind::Soft, Kind::Run, Kind::Keeper, Kind::Fasteners]
            .into_iter()
            .find(|k| k.name() == s)
            .unwrap_or_else(|| panic!("unknown worker kind {s:?}"))
    }
}

/// What a worker process needs to know, from its environment.
struct Worker {
    dir: PathBuf,
    /// This worker's host's directory (its daemon's runtime and lock directories): the run's
    /// directory, except across hosts.
    host_dir: PathBuf,
    /// The remote backend's URL, across hosts.
    backend: Option<String>,
    /// Set by SIGTERM in a long section across hosts (`run` stopping its command).
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    log: PathBuf,
    daemon: bool,
    /// This process: pid and start time (pids are reused within a long run).
    incarnation: String,
    checks: Vec<std::fs::File>,
    rng: Rng,
    /// The kind, logged with each grant (a `run` grandchild logs `run`).
    kind: String,
}

impl Worker {
    fn from_env() -> Worker {
        let dir = PathBuf::from(std::env::var("CHAOS_DIR").expect("started by the harness"));
        let me = std::process::id();
        let incarnation = format!("{me}-{}", now_us());
        let log = dir.join("events");
        // A worker that dies of a panic must say so (with the time, before it is gone): it may
        // leave a marker behind, and the harness must know the process is no longer inside.
        {
            let (log, incarnation) = (log.clone(), incarnation.clone());
            std::panic::set_hook(Box::new(move |info| {
                let msg = info.to_string().replace('\n', " ");
                log_event(&log, &format!("X {incarnation} {} {msg}", now_us()));
            }));
        }
        let checks = (0..LOCKS)
            .map(|i| OpenOptions::new().create(true).append(true).open(dir.join(format!("check{i}"))).unwrap())
            .collect();
        let kind = std::env::var("CHAOS_KIND").unwrap_or_default().replace("section", "run");
        Worker {
            kind,
            host_dir: std::env::var_os("CHAOS_HOST_DIR").map_or_else(|| dir.clone(), PathBuf::from),
            backend: std::env::var("CHAOS_BACKEND").ok(),
            stop: None,
            daemon: std::env::var("CHAOS_DAEMON").is_ok(),
            rng: Rng::new(now_us() ^ u64::from(me) << 20),
            dir,
            log,
            incarnation,
            checks,
        }
    }

    fn event(&self, what: &str) {
        log_event(&self.log, what);
    }

    /// The critical section, run while holding `lock` (see the crate doc for the order).
    fn section(&mut self, lock: usize, shared: bool, max_sleep_us: u64) {
        let (inc, tag) = (self.incarnation.clone(), if shared { "s" } else { "x" });
        let host = std::env::var("CHAOS_HOST").unwrap_or_default();
        self.event(&format!("G {inc} {lock} {} {tag} {} {host}", now_us(), self.kind));
        let marker = self.dir.join(format!("inside-{lock}/{inc}.{tag}"));
        std::fs::write(&marker, "").expect("write the inside marker");
        let arg =
            if shared { nix::fcntl::FlockArg::LockSharedNonblock } else { nix::fcntl::FlockArg::LockExclusiveNonblock };
        #[allow(deprecated)]
        let alone = nix::fcntl::flock(self.checks[lock].as_raw_fd(), arg).is_ok();
        if !alone {
            let others = others_inside(&self.dir, lock, &format!("{inc}.{tag}"));
            self.event(&format!("V {inc} {lock} {} {others} {tag}", now_us()));
        }
        let pause = Duration::from_micros(self.rng.below(max_sleep_us));
        match &self.stop {
            None => std::thread::sleep(pause),
            Some(stop) => {
                let until = Instant::now() + pause;
                while Instant::now() < until && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        #[allow(deprecated)]
        let _ = nix::fcntl::flock(self.checks[lock].as_raw_fd(), nix::fcntl::FlockArg::Unlock);
        std::fs::remove_file(&marker).expect("remove the inside marker");
        // Whether the section was stopped (across hosts: by `run`, its lock lost).
        let stopped = self.stop.as_ref().is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed));
        self.event(&format!("R {inc} {lock} {}{}", now_us(), if stopped { " stopped" } else { "" }));
    }

    fn pick(&mut self) -> (usize, bool) {
        (self.rng.below(LOCKS as u64) as usize, self.rng.below(10) < 3)
    }

    /// `buildlock-client` for this run's directories and mode.
    fn cli(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_buildlock-client"));
        if let Some(url) = &self.backend {
            c.args(["--backend", url, "--remote-timeout", &REMOTE_TIMEOUT_SECS.to_string()]);
        }
        c.env("BUILDLOCK_DIR", self.host_dir.join("locks"))
            .env("BUILDLOCK_RUNTIME_DIR", self.host_dir.join("rt"))
            .env("BUILDLOCKD", env!("CARGO_BIN_EXE_buildlockd"))
            .env_remove("BUILDLOCK_NO_DAEMON")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if !self.daemon {
            c.env("BUILDLOCK_NO_DAEMON", "1");
        }
        c
    }

    /// Across hosts, a pause after a failed attempt: a cut-off host's attempts fail at once
    /// ("network is unreachable"), and retrying without one only fills the log.
    fn backoff(&mut self) {
        if self.backend.is_some() {
            std::thread::sleep(Duration::from_millis(20 + self.rng.below(30)));
        }
    }

    fn error(&self, what: &str) {
        let what = what.replace('\n', " ");
        self.event(&format!("E {} {} {what}", self.incarnation, now_us()));
    }
}

/// The worker: run as `chaos_worker` in a child process (see `spawn_worker`).
#[test]
#[ignore = "run by the chaos harness in its worker processes"]
fn chaos_worker() {
    let kind = std::env::var("CHAOS_KIND").expect("started by the harness");
    let mut w = Worker::from_env();
    // A grandchild of `run`: one critical section.
    if kind == "section" {
        let s = std::env::var("CHAOS_SECTION").unwrap();
        let (lock, mode) = s.split_once(' ').unwrap();
        let mut max_us = 5000;
        if w.backend.is_some() {
            // Across hosts, one section in twelve is long, past the remote timeout: a cut link
            // must stop it before the other host is granted the lock. `run` stops it with
            // SIGTERM: it ends the section (and logs it) at once.
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone()).unwrap();
            w.stop = Some(stop);
            if w.rng.below(12) == 0 {
                max_us = (REMOTE_TIMEOUT_SECS + 4) * 1_000_000;
            }
        }
        w.section(lock.parse().unwrap(), mode == "s", max_us);
        return;
    }
    let kind = Kind::parse(&kind);
    let deadline = Instant::now() + Duration::from_millis(env_num("CHAOS_MILLIS", 1000));
    let unlocked = std::env::var("CHAOS_NO_LOCK").is_ok();
    let opts = Options {
        connect: if w.daemon && kind != Kind::Soft { Connect::DaemonOnly } else { Connect::Direct },
        backend: if kind == Kind::Soft { Backend::Soft } else { Backend::Auto },
        // An OS-lock user leaves an empty lock file behind, which a soft user takes for a lock
        // until it is older than this: the default (120 s) would stall soft workers for the run.
        stale_after: if kind == Kind::Soft { Duration::from_secs(1) } else { buildlock::DEFAULT_STALE_AFTER },
        runtime_dir: Some(w.host_dir.join("rt")),
        remote: w.backend.as_ref().map(|url| {
            let engine = buildlock_remote::from_url(url).unwrap();
            engine.with_remote_timeout(Duration::from_secs(REMOTE_TIMEOUT_SECS)).unwrap()
        }),
        operation: format!("chaos worker {}", w.incarnation),
        ..Options::default()
    };
    while Instant::now() < deadline {
        let (lock, shared) = w.pick();
        let name = format!("l{lock}");
        let mode = if shared { "-s" } else { "-x" };
        match kind {
            Kind::Lib | Kind::Soft => {
                let target = LockTarget::resolve(&name, &w.host_dir.join("locks")).unwrap();
                let mode = if shared { LockMode::Shared } else { LockMode::Exclusive };
                let opts = Options { mode, wait: Wait::Forever, ..opts.clone() };
                // The checker's own test: without the lock, it must see two holders.
                let lease = if unlocked {
                    None
                } else {
                    match buildlock::acquire(&target, &opts, &mut |_| {}) {
                        Ok(l) => Some(l),
                        Err(e) => {
                            // The daemon was killed under us: say so and try again.
                            w.error(&format!("acquire: {e}"));
                            w.backoff();
                            continue;
                        }
                    }
                };
                // Across hosts, an acquire costs round trips to the server (and a new session
                // when none is kept): longer sections, or the killer seldom finds a holder inside.
                w.section(lock, shared, if w.backend.is_some() { 30_000 } else { 3000 });
                if let Some(Err(e)) = lease.map(|l| l.release()) {
                    w.error(&format!("release: {e}"));
                }
            }
            Kind::Run => {
                let section = format!("{lock} {}", if shared { "s" } else { "x" });
                let exe = std::env::current_exe().unwrap();
                let out = w
                    .cli()
                    .args(["run", mode, &name, "--", "sh", "-c"])
                    .arg("\"$0\" chaos_worker --exact --ignored --nocapture --test-threads=1 & wait")
                    .arg(exe)
                    .env("CHAOS_KIND", "section")
                    .env("CHAOS_SECTION", section)
                    .output()
                    .unwrap();
                // Killed by the run-killer: expected. Anything else is worth a look.
                if out.status.signal().is_none() && !out.status.success() {
                    w.error(&format!("run: {}: {}", out.status, String::from_utf8_lossy(&out.stderr)));
                    w.backoff();
                }
            }
            Kind::Keeper => {
                let me = std::process::id().to_string();
                let out = w.cli().args(["acquire", mode, "--pid", &me, &name]).output().unwrap();
                if !out.status.success() {
                    // A keeper killed before it took the lock.
                    w.error(&format!("acquire: {}: {}", out.status, String::from_utf8_lossy(&out.stderr)));
                    continue;
                }
                w.section(lock, shared, 3000);
                let out = w.cli().args(["release", "--pid", &me, &name]).output().unwrap();
                if !out.status.success() {
                    w.error(&format!("release: {}: {}", out.status, String::from_utf8_lossy(&out.stderr)));
                }
            }
            Kind::Fasteners => unreachable!("a Python process"),
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

/// Which processes the killer may SIGKILL.
#[derive(Clone, Copy, Default)]
struct Killers {
    /// Pool workers (holders and waiters of every kind).
    workers: bool,
    /// `buildlock-client run` processes (children of `run` workers), not their commands.
    runs: bool,
    /// `acquire --pid` keepers.
    keepers: bool,
    /// The daemon (across hosts: one host's).
    daemon: bool,
    /// Across hosts: a host's link, taken down for longer than the remote timeout, then up.
    links: bool,
}

/// The server and the two hosts of the scenario across hosts.
struct Remote {
    pg: pg_server::PgServer,
    hosts: [netns::NetHost; 2],
}

impl Remote {
    /// Two hosts and a server listening on each host's link, or `None` (saying why) when this
    /// machine cannot make them.
    fn start() -> Option<Remote> {
        let hosts = [netns::NetHost::create()?, netns::NetHost::create()?];
        let listen = format!("{},{}", hosts[0].server_ip, hosts[1].server_ip);
        let pg = pg_server::PgServer::start_listening(Some((&listen, netns::HOSTS_CIDR)))?;
        Some(Remote { pg, hosts })
    }

    /// Host `h`'s URL for the server: over its own link.
    fn url(&self, h: usize) -> String {
        self.pg.url_with(&self.hosts[h].server_ip, "sslmode=disable&connect_timeout=4")
    }
}

struct Scenario {
    name: &'static str,
    daemon: bool,
    kinds: Vec<Kind>,
    killers: Killers,
    /// Workers take no lock: the checker's self-test.
    no_lock: bool,
    secs: u64,
    /// Across hosts: the locks live on this server, worker `i` runs on host `i % 2`.
    remote: Option<Remote>,
}

impl Scenario {
    fn new(name: &'static str, daemon: bool, kinds: &[Kind], killers: Killers) -> Scenario {
        let mut kinds = kinds.to_vec();
        if kinds.contains(&Kind::Fasteners) && std::env::var_os("BUILDLOCK_TEST_PYTHON").is_none() {
            println!("chaos[{name}]: BUILDLOCK_TEST_PYTHON is unset: no fasteners workers in this run");
            kinds.retain(|k| *k != Kind::Fasteners);
        }
        Scenario {
            name,
            daemon,
            kinds,
            killers,
            no_lock: false,
            secs: env_num("BUILDLOCK_CHAOS_SECS", 4),
            remote: None,
        }
    }
}

fn worker_command(dir: &Path, s: &Scenario, kind: Kind, millis: u64, slot: usize) -> Command {
    let mut c = if kind == Kind::Fasteners {
        let mut c = Command::new(std::env::var_os("BUILDLOCK_TEST_PYTHON").unwrap());
        c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/fasteners_tool.py")).args([
            "chaos",
            &dir.display().to_string(),
            &LOCKS.to_string(),
            &millis.to_string(),
        ]);
        c
    } else {
        let exe = std::env::current_exe().unwrap();
        let mut c = match &s.remote {
            Some(r) => r.hosts[slot % 2].command(exe),
            None => Command::new(exe),
        };
        c.args(["chaos_worker", "--exact", "--ignored", "--nocapture", "--test-threads=1"]);
        c
    };
    if let Some(r) = &s.remote {
        let host_dir = dir.join(format!("host{}", slot % 2));
        c.env("CHAOS_HOST_DIR", &host_dir)
            .env("CHAOS_HOST", format!("host{}", slot % 2))
            .env("CHAOS_BACKEND", r.url(slot % 2))
            .env("BUILDLOCK_HISTORY", host_dir.join("history.sqlite3"));
    }
    if s.remote.is_none() {
        // The run's own lock history, not the user's (workers killed mid-write included).
        c.env("BUILDLOCK_HISTORY", dir.join("history.sqlite3"));
    }
    c.env("CHAOS_DIR", dir)
        .env("CHAOS_KIND", kind.name())
        .env("CHAOS_MILLIS", millis.to_string())
        .env("BUILDLOCKD", env!("CARGO_BIN_EXE_buildlockd"))
        .env_remove("BUILDLOCK_NO_DAEMON")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if s.daemon {
        c.env("CHAOS_DAEMON", "1");
    }
    if s.no_lock {
        c.env("CHAOS_NO_LOCK", "1");
    }
    c
}

#[derive(Default)]
struct Report {
    operations: usize,
    /// Grants by worker kind.
    by_kind: std::collections::BTreeMap<String, usize>,
    /// Kills of pool workers that held a lock (by the log), of other workers, of `run`
    /// processes, of keepers, of the daemon.
    holder_kills: usize,
    waiter_kills: usize,
    run_kills: usize,
    keeper_kills: usize,
    daemon_kills: usize,
    /// Across hosts: links taken down, and sections stopped by a `run` that lost its lock.
    link_cuts: usize,
    stopped: usize,
    /// Sections whose process died inside, not by the killer's hand (`D`: across hosts, a
    /// command the kernel's guard or a daemon killed, its lock lost).
    died_inside: usize,
    /// Failed checks no dying holder explains.
    violations: Vec<String>,
    /// Overlapping logged spans on one lock, one of them exclusive.
    overlaps: Vec<String>,
    /// Failed checks explained by a killed, not yet reaped holder, and those holders.
    excused: usize,
    excusing: BTreeSet<String>,
    /// Excusing holders the log does not show as killed while holding that lock.
    bad_excuses: Vec<String>,
    /// Worst time from a holder's death to the next grant of its lock.
    worst_holder_kill_to_grant: Option<Duration>,
    /// Worst time from the daemon's death to the next grant of any lock.
    worst_kill_to_grant: Option<Duration>,
    /// The events around the first violation, for diagnosis.
    context: String,
    /// Workers that died of a panic (a harness or library bug), with the message.
    panics: Vec<String>,
    /// `E` lines: failed acquires and failed releases.
    acquire_errors: Vec<String>,
    release_errors: Vec<String>,
    /// Workers the killer did not kill that exited other than with success.
    bad_exits: Vec<String>,
    /// Spans never closed by a release, a kill or a panic.
    unclosed: usize,
    /// Workers that did not exit when they should have (killed after [`hang`]).
    hangs: Vec<String>,
}

fn daemon_pid(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("rt/buildlockd.pid")).ok().and_then(|p| p.trim().parse::<i32>().ok())
}

/// Logs `D inc lock t` for each section whose process is found dead while its marker is still
/// there (it never released: killed with SIGKILL, by the kernel's guard or a daemon stopping a
/// command whose lock was lost), once: `t` is when the harness saw it, no earlier than the death,
/// so the span it ends is never shorter than the true one.
fn note_deaths_inside(dir: &Path, log: &Path, seen: &mut HashSet<String>) {
    for m in markers(dir) {
        let at = now_us();
        if !seen.contains(&m.inc) && !alive(m.pid) && m.entry.path().exists() {
            log_event(log, &format!("D {} {} {at}", m.inc, m.lock));
            seen.insert(m.inc);
        }
    }
}

/// Waits (at most 30 s) until no live process is inside a critical section: a killed worker's
/// `run` and its command carry on without the pool knowing them, and a section they end after
/// the log is read would count as never closed.
fn wait_for_sections(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while markers(dir).iter().any(|m| alive(m.pid) && m.entry.path().exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A critical section's marker (`inside-L/PID-START.MODE`): who is inside lock `lock`.
struct Marker {
    lock: usize,
    /// The incarnation, `PID-START`.
    inc: String,
    pid: u32,
    entry: std::fs::DirEntry,
}

/// The markers inside every lock.
fn markers(dir: &Path) -> Vec<Marker> {
    (0..LOCKS)
        .flat_map(|lock| {
            let entries = std::fs::read_dir(dir.join(format!("inside-{lock}"))).into_iter().flatten().flatten();
            entries.map(move |entry| (lock, entry))
        })
        .filter_map(|(lock, entry)| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let inc = name.rsplit_once('.').map_or(name.as_str(), |(i, _)| i).to_owned();
            let pid = inc.split('-').next()?.parse().ok()?;
            Some(Marker { lock, inc, pid, entry })
        })
        .collect()
}

/// Whether process `pid` lives (a zombie does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()))
        .is_some_and(|state| !matches!(state, 'Z' | 'X'))
}

/// The daemons of the run: its own, or each host's.
fn daemon_pids(dir: &Path) -> Vec<i32> {
    [dir.to_owned(), dir.join("host0"), dir.join("host1")].iter().filter_map(|d| daemon_pid(d)).collect()
}

/// The pids of the children of `pid`, of all its threads (`/proc/PID/task/*/children`).
fn children(pid: u32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| c.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<i32>>())
        .collect()
}

/// `pid` and its descendants with their command lines, for a hang report.
fn tree(pid: u32, depth: usize) -> String {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut out = format!("{:depth$}{pid} {}\n", "", String::from_utf8_lossy(&cmd).replace('\0', " "));
    for c in children(pid) {
        out.push_str(&tree(c as u32, depth + 2));
    }
    out
}

/// The pids of the live `acquire --pid` keepers (from their `*.keeper-PID` files).
fn keepers(dir: &Path) -> Vec<i32> {
    std::fs::read_dir(dir.join("locks"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().contains(".keeper-"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.split_whitespace().next()?.parse().ok())
                // The keeper itself (`__keep`), not a second holder (`__keep-shadow`) that took over
                // from a killed one: killing both holders of one lease loses it by design, whatever
                // the code does, and only a loaded machine gives the killer time for both.
                .filter(|pid: &i32| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == b"__keep"))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn sigkill(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).is_ok()
}

fn run_chaos(s: &Scenario) -> Report {
    let workers = env_num("BUILDLOCK_CHAOS_WORKERS", 6) as usize;
    let tmp = tempfile::Builder::new().prefix("buildlock-chaos").tempdir().unwrap();
    let dir = tmp.path().to_owned();
    std::fs::create_dir(dir.join("locks")).unwrap();
    if s.remote.is_some() {
        for h in 0..2 {
            std::fs::create_dir_all(dir.join(format!("host{h}/locks"))).unwrap();
        }
    }
    for i in 0..LOCKS {
        std::fs::create_dir(dir.join(format!("inside-{i}"))).unwrap();
    }
    let log = dir.join("events");
    let end = Instant::now() + Duration::from_secs(s.secs);
    let left = || end.saturating_duration_since(Instant::now()).as_millis() as u64;
    let spawn = |slot: usize, kind: Kind| (worker_command(&dir, s, kind, left(), slot).spawn().unwrap(), kind);
    let mut pool: Vec<(Child, Kind)> = (0..workers).map(|i| spawn(i, s.kinds[i % s.kinds.len()])).collect();
    // Across hosts: the host cut off, and until when.
    let mut cut: Option<(usize, Instant)> = None;
    let mut next_link_cut = Instant::now() + Duration::from_millis(4000);
    let mut rng = Rng::new(now_us());
    let mut next_daemon_kill = Instant::now() + Duration::from_millis(700);
    let k = s.killers;
    let mut hangs = Vec::new();
    let mut died = HashSet::new();
    let mut hit_a_holder = false;
    while (k.workers || k.runs || k.keepers || k.daemon || k.links) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20 + rng.below(80)));
        note_deaths_inside(&dir, &log, &mut died);
        if k.workers {
            // SIGKILL a random worker, holder or waiter, reap it and replace it. The time is
            // taken before the signal is sent: the victim is dead by then at the latest.
            // Half the time a worker inside a critical section (by its marker), if any (across
            // hosts, see below).
            let inside: Vec<usize> =
                markers(&dir).iter().filter_map(|m| pool.iter().position(|w| w.0.id() == m.pid)).collect();
            let holder = inside.get(rng.below(inside.len().max(1) as u64) as usize).copied();
            let i = if s.remote.is_none() {
                match holder {
                    Some(h) if rng.below(2) == 0 => h,
                    _ => rng.below(pool.len() as u64) as usize,
                }
            } else {
                // Across hosts, acquires cost round trips to the server and holders are few: a
                // holder a quarter of the times there is one (every time until one was hit, or a
                // short run could end without a holder killed), anyone one time in twelve.
                match rng.below(12) {
                    _ if !hit_a_holder && holder.is_some() => holder.unwrap_or_default(),
                    0..=2 if holder.is_some() => holder.unwrap_or_default(),
                    3 => rng.below(pool.len() as u64) as usize,
                    _ => usize::MAX,
                }
            };
            hit_a_holder |= i != usize::MAX && Some(i) == holder;
            if i != usize::MAX {
                let pid = pool[i].0.id();
                let at = now_us();
                if pool[i].0.kill().is_ok() {
                    log_event(&log, &format!("K {pid} {at} worker"));
                }
                match wait_bounded(&mut pool[i].0, "a killed worker") {
                    Ok(st) => log_event(&log, &format!("Q {pid} {} {st}", now_us())),
                    Err(e) => hangs.push(e),
                }
                pool[i] = spawn(i, pool[i].1);
            }
        }
        // Across hosts, a `run` killed mid-hold leaves its command to hold the lock until its
        // session is lost (and nobody then tells the command): rarely, so that cut links find
        // `run`s to stop their commands.
        if k.runs && (s.remote.is_none() || rng.below(6) == 0) {
            let runs: Vec<i32> = pool.iter().filter(|w| w.1 == Kind::Run).flat_map(|w| children(w.0.id())).collect();
            if !runs.is_empty() {
                let pid = runs[rng.below(runs.len() as u64) as usize];
                let at = now_us();
                if sigkill(pid) {
                    log_event(&log, &format!("K {pid} {at} run"));
                }
            }
        }
        if k.keepers {
            let ks = keepers(&dir);
            if !ks.is_empty() {
                let pid = ks[rng.below(ks.len() as u64) as usize];
                let at = now_us();
                if sigkill(pid) {
                    log_event(&log, &format!("K {pid} {at} keeper"));
                }
            }
        }
        if let (true, Some(r)) = (k.links, &s.remote) {
            match cut {
                Some((h, until)) if Instant::now() >= until => {
                    r.hosts[h].reconnect();
                    log_event(&log, &format!("K host{h} {} relink", now_us()));
                    cut = None;
                    // While a host is cut off, the locks its sessions hold or were granted in
                    // the server's queue stay taken until the bound: long quiet spells between.
                    next_link_cut = Instant::now() + Duration::from_millis(6000 + rng.below(6000));
                }
                None if Instant::now() >= next_link_cut => {
                    // The host of a worker in a long section (inside for 0.3 s already: the
                    // link must be cut under a holder that the loss must stop), else either
                    // after a while. Down past the server's bound (T + T/10), so the host's
                    // sessions are lost.
                    let long = |e: &std::fs::DirEntry| {
                        e.metadata()
                            .and_then(|m| m.modified())
                            .is_ok_and(|t| t.elapsed().is_ok_and(|d| d > Duration::from_millis(300)))
                    };
                    let inside: Vec<u32> =
                        markers(&dir).into_iter().filter(|m| long(&m.entry)).map(|m| m.pid).collect();
                    let holding = (0..2).find(|&h| inside.iter().any(|&p| r.hosts[h].runs(p)));
                    let late = Instant::now() >= next_link_cut + Duration::from_millis(5000);
                    let Some(h) = holding.or(late.then(|| rng.below(2) as usize)) else { continue };
                    let why = if holding.is_some() { "holder" } else { "any" };
                    log_event(&log, &format!("K host{h} {} link {why}", now_us()));
                    r.hosts[h].cut();
                    cut = Some((h, Instant::now() + Duration::from_millis(REMOTE_TIMEOUT_SECS * 1250)));
                }
                _ => {}
            }
        }
        if k.daemon && s.daemon && Instant::now() >= next_daemon_kill {
            let gap = if s.remote.is_some() { 2000 } else { 500 };
            next_daemon_kill = Instant::now() + Duration::from_millis(gap + rng.below(2 * gap));
            let daemons = daemon_pids(&dir);
            if let Some(&d) = daemons.get(rng.below(daemons.len().max(1) as u64) as usize) {
                let at = now_us();
                if sigkill(d) {
                    log_event(&log, &format!("K {d} {at} daemon"));
                }
            }
        }
    }
    if let (Some((h, _)), Some(r)) = (cut, &s.remote) {
        r.hosts[h].reconnect();
    }
    for (mut w, kind) in pool {
        let pid = w.id();
        match wait_bounded(&mut w, &format!("a {} worker at the end of the run", kind.name())) {
            Ok(st) => log_event(&log, &format!("Q {pid} {} {st}", now_us())),
            Err(e) => hangs.push(e),
        }
    }
    for d in daemon_pids(&dir) {
        sigkill(d);
    }
    wait_for_sections(&dir);
    note_deaths_inside(&dir, &log, &mut died);
    let events = std::fs::read_to_string(&log).unwrap_or_default();
    if let Ok(keep) = std::env::var("CHAOS_KEEP_LOG") {
        let _ = std::fs::write(format!("{keep}.{}", s.name), &events);
    }
    Report { hangs, ..analyse(&events) }
}

/// One holder's logged hold of a lock.
struct Span<'a> {
    who: &'a str,
    lock: &'a str,
    exclusive: bool,
    from: u64,
    to: u64,
}

/// Reads the event log (see the crate doc): `G inc lock t mode`, `R inc lock t`,
/// `V inc lock t markers mode`, `X inc t msg`, `E inc t msg`, `K pid t what`, `Q pid t status`,
/// `D inc lock t` (the harness saw the section's process dead inside: the span ends then at the
/// latest).
fn analyse(events: &str) -> Report {
    let mut lines: Vec<Vec<&str>> = events.lines().map(|l| l.split(' ').collect()).collect();
    let t = |f: &Vec<&str>| -> u64 {
        let i = if matches!(f[0], "K" | "Q" | "X" | "E") { 2 } else { 3 };
        f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    lines.sort_by_key(|f| t(f));
    let mut report = Report::default();
    // Incarnations (`pid-start`) by pid, to name the process a `K` or `Q` (by pid) hit: the
    // latest one started before it.
    let mut incarnations: HashMap<&str, Vec<(u64, &str)>> = HashMap::new();
    for f in lines.iter().filter(|f| matches!(f[0], "G" | "R" | "V" | "X" | "E")) {
        if let Some((pid, start)) = f[1].split_once('-') {
            let v = incarnations.entry(pid).or_default();
            if !v.iter().any(|(_, i)| *i == f[1]) {
                v.push((start.parse().unwrap_or(0), f[1]));
            }
        }
    }
    let incarnation_at = |pid: &str, at: u64| -> Option<&str> {
        incarnations.get(pid)?.iter().filter(|(start, _)| *start <= at).max_by_key(|(start, _)| *start).map(|(_, i)| *i)
    };
    let mut killed_at: HashMap<&str, u64> = HashMap::new();
    let mut reaped_at: HashMap<&str, u64> = HashMap::new();
    for f in &lines {
        match (f[0], f.get(3)) {
            // An incarnation dies once: its first kill and reap are its own. A later `K` or `Q`
            // for the same pid is a recycled pid's, whose process logged no event of its own (a
            // `run` worker's critical sections are its grandchildren's): it must not move the
            // older incarnation's reap past checks its left-over marker has nothing to do with.
            ("K", Some(&"worker")) => {
                if let Some(i) = incarnation_at(f[1], t(f)) {
                    killed_at.entry(i).or_insert(t(f));
                }
            }
            ("Q", _) => {
                if let Some(i) = incarnation_at(f[1], t(f)) {
                    reaped_at.entry(i).or_insert(t(f));
                }
                // Only the killer sends SIGKILL to pool workers.
                let status = f[3..].join(" ");
                if !status.contains("exit status: 0") && !status.contains("SIGKILL") {
                    report.bad_exits.push(f.join(" "));
                }
            }
            _ => {}
        }
    }
    // Spans, and the holders killed while holding: (incarnation, lock).
    let mut open: HashMap<&str, (&str, bool, u64)> = HashMap::new();
    let mut spans: Vec<Span> = Vec::new();
    let mut killed_holding: BTreeSet<(String, String)> = BTreeSet::new();
    let mut pending: Vec<(Option<&str>, &str, u64)> = Vec::new();
    for f in &lines {
        match f[0] {
            "G" => {
                report.operations += 1;
                *report.by_kind.entry(f.get(5).unwrap_or(&"?").to_string()).or_default() += 1;
                open.insert(f[1], (f[2], f.get(4) == Some(&"x"), t(f)));
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
            "D" => {
                if let Some((lock, exclusive, from)) = open.remove(f[1]) {
                    report.died_inside += 1;
                    spans.push(Span { who: f[1], lock, exclusive, from, to: t(f) });
                }
            }
            "R" | "X" => {
                if f.get(4) == Some(&"stopped") {
                    report.stopped += 1;
                }
                if f[0] == "X" {
                    report.panics.push(f.join(" "));
                }
                if let Some((lock, exclusive, from)) = open.remove(f[1]) {
                    spans.push(Span { who: f[1], lock, exclusive, from, to: t(f) });
                }
            }
            "K" => match f.get(3).copied() {
                Some("worker") => match incarnation_at(f[1], t(f)).and_then(|i| open.remove_entry(i)) {
                    Some((who, (lock, exclusive, from))) => {
                        report.holder_kills += 1;
                        killed_holding.insert((who.to_owned(), lock.to_owned()));
                        spans.push(Span { who, lock, exclusive, from, to: t(f) });
                        pending.push((Some(lock), who, t(f)));
                    }
                    None => report.waiter_kills += 1,
                },
                Some("run") => report.run_kills += 1,
                Some("keeper") => report.keeper_kills += 1,
                Some("daemon") => {
                    report.daemon_kills += 1;
                    pending.push((None, "", t(f)));
                }
                Some("link") => report.link_cuts += 1,
                _ => {}
            },
            "E" => {
                let msg = f[3..].join(" ");
                if msg.starts_with("release") {
                    report.release_errors.push(f.join(" "));
                } else {
                    report.acquire_errors.push(f.join(" "));
                }
            }
            _ => {}
        }
    }
    report.unclosed = open.len();
    // Overlap: any two spans on one lock, one exclusive, that share a moment.
    let mut context_at = None;
    for lock in 0..LOCKS {
        let lock = lock.to_string();
        let mut mine: Vec<&Span> = spans.iter().filter(|s| s.lock == lock).collect();
        mine.sort_by_key(|s| s.from);
        let mut active: Vec<&Span> = Vec::new();
        for s in mine {
            active.retain(|a| a.to > s.from);
            for a in &active {
                if a.exclusive || s.exclusive {
                    context_at.get_or_insert(s.from);
                    report.overlaps.push(format!(
                        "lock {lock}: {} {} [{}, {}] and {} {} [{}, {}]",
                        a.who,
                        if a.exclusive { "x" } else { "s" },
                        a.from,
                        a.to,
                        s.who,
                        if s.exclusive { "x" } else { "s" },
                        s.from,
                        s.to
                    ));
                }
            }
            active.push(s);
        }
    }
    // Failed checks.
    for f in lines.iter().filter(|f| f[0] == "V") {
        let at = t(f);
        let reader = f.get(5) == Some(&"s");
        let others: Vec<(&str, &str)> =
            f.get(4).map(|o| o.split(',').filter_map(|m| m.rsplit_once('.')).collect()).unwrap_or_default();
        // Conflicting (any, for a writer; writers, for a reader), not left over by a worker
        // reaped before the check.
        let conflicting: Vec<&str> = others
            .iter()
            .filter(|(_, mode)| !reader || *mode == "x")
            .map(|(inc, _)| *inc)
            .filter(|inc| reaped_at.get(inc).is_none_or(|&r| r > at))
            .collect();
        let dying = |inc: &&str| killed_at.get(inc).is_some_and(|&k| k <= at);
        if !conflicting.is_empty() && conflicting.iter().all(dying) {
            report.excused += 1;
            for inc in conflicting {
                report.excusing.insert(inc.to_owned());
                if !killed_holding.contains(&(inc.to_owned(), f[2].to_owned())) {
                    report.bad_excuses.push(format!("{inc} (for {})", f.join(" ")));
                }
            }
        } else {
            context_at.get_or_insert(at);
            report.violations.push(f.join(" "));
        }
    }
    if let Some(at) = context_at {
        for g in lines.iter().filter(|g| t(g).abs_diff(at) < 30_000) {
            report.context.push_str(&format!("  {:+8} us  {}\n", t(g) as i64 - at as i64, g.join(" ")));
        }
    }
    report
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("n/a".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
}

fn print(name: &str, r: &Report) {
    println!(
        "chaos[{name}]: {} operations ({}); kills: {} holders, {} waiters, {} run, {} keepers, {} daemon; \
         {} links ({} sections stopped on a lost lock, {} killed inside); {} violations, {} overlapping spans; {} failed checks excused (a killed holder not yet reaped: {} \
         holders); {} acquire errors, {} release errors, {} bad exits, {} panics, {} unclosed spans, {} hangs; \
         worst holder-kill-to-grant {}, worst daemon-kill-to-grant {}",
        r.operations,
        r.by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", "),
        r.holder_kills,
        r.waiter_kills,
        r.run_kills,
        r.keeper_kills,
        r.daemon_kills,
        r.link_cuts,
        r.stopped,
        r.died_inside,
        r.violations.len(),
        r.overlaps.len(),
        r.excused,
        r.excusing.len(),
        r.acquire_errors.len(),
        r.release_errors.len(),
        r.bad_exits.len(),
        r.panics.len(),
        r.unclosed,
        r.hangs.len(),
        ms(r.worst_holder_kill_to_grant),
        ms(r.worst_kill_to_grant),
    );
    for (what, list) in
        [("release errors", &r.release_errors), ("acquire errors", &r.acquire_errors), ("bad exits", &r.bad_exits)]
    {
        if !list.is_empty() {
            println!("chaos[{name}]: {what} (first 5 of {}): {:#?}", list.len(), &list[..list.len().min(5)]);
        }
    }
}

fn first<T: std::fmt::Debug>(v: &[T]) -> &[T] {
    &v[..v.len().min(10)]
}

#[track_caller]
fn check(s: &Scenario, r: &Report) {
    print(s.name, r);
    assert!(r.hangs.is_empty(), "{}", r.hangs.join("\n"));
    assert!(r.panics.is_empty(), "workers panicked: {:?}", r.panics);
    assert!(
        r.violations.is_empty() && r.overlaps.is_empty(),
        "two holders at once: {} failed checks {:?}, {} overlapping spans {:?}\nevents around the first:\n{}",
        r.violations.len(),
        first(&r.violations),
        r.overlaps.len(),
        first(&r.overlaps),
        r.context
    );
    assert!(r.bad_excuses.is_empty(), "failed checks excused by holders not killed holding: {:?}", r.bad_excuses);
    assert!(r.excused <= r.holder_kills, "{} failed checks excused by only {} holder kills", r.excused, r.holder_kills);
    // Across hosts, a cut link loses the leases it carried, and their holders are told:
    // expected, as long as nobody else held the lock meanwhile (above). (A killed daemon loses
    // none: its clients hold copies of the sessions.)
    let lost = |e: &&String| s.remote.is_some() && e.contains("was lost while held");
    let unexpected: Vec<&String> = r.release_errors.iter().filter(|e| !lost(e)).collect();
    assert!(unexpected.is_empty(), "locks lost while held: {:?}", first(&unexpected));
    assert!(r.bad_exits.is_empty(), "workers exited badly: {:?}", first(&r.bad_exits));
    assert_eq!(r.unclosed, 0, "spans never closed");
    assert!(r.operations > 0, "no lock was ever granted");
    let k = s.killers;
    assert!(!k.workers || r.holder_kills > 0, "the killer never hit a holder");
    assert!(!k.runs || r.run_kills > 0, "the killer never hit a run process");
    assert!(!k.keepers || r.keeper_kills > 0, "the killer never hit a keeper");
    assert!(!(k.daemon && s.daemon) || r.daemon_kills > 0, "the daemon was never killed");
    assert!(!k.links || r.link_cuts > 0, "no link was ever cut");
}

const ALL_KILLERS: Killers = Killers { workers: true, runs: false, keepers: false, daemon: true, links: false };

#[test]
fn the_checker_sees_two_holders_when_there_is_no_lock() {
    // With the killer on, as in the real runs: its excuses must not hide the second holders.
    // Both judgements must fire; a run too loaded to make any is run again, longer.
    let mut secs = 1;
    loop {
        let mut s = Scenario::new("no lock", false, &[Kind::Lib], Killers { workers: true, ..Killers::default() });
        s.no_lock = true;
        s.secs = secs;
        let r = run_chaos(&s);
        print(s.name, &r);
        if r.operations >= 200 || secs >= 16 {
            assert!(!r.violations.is_empty(), "the check never fired although nothing was locked");
            assert!(!r.overlaps.is_empty(), "no overlapping spans although nothing was locked");
            assert!(r.excused <= r.holder_kills);
            return;
        }
        secs *= 2;
    }
}

#[test]
fn chaos_direct_mode() {
    let s = Scenario::new(
        "direct",
        false,
        &[Kind::Lib, Kind::Run, Kind::Keeper, Kind::Fasteners],
        Killers { workers: true, ..Killers::default() },
    );
    check(&s, &run_chaos(&s));
}

#[test]
fn chaos_through_the_daemon_with_daemon_kills() {
    let s = Scenario::new("daemon", true, &[Kind::Lib, Kind::Run, Kind::Keeper, Kind::Fasteners], ALL_KILLERS);
    check(&s, &run_chaos(&s));
}

#[test]
fn chaos_kill_only_the_daemon() {
    let s = Scenario::new(
        "daemon only",
        true,
        &[Kind::Lib, Kind::Run, Kind::Keeper, Kind::Fasteners],
        Killers { daemon: true, ..Killers::default() },
    );
    check(&s, &run_chaos(&s));
}

/// Killing `run` alone must not free the lock while its command's children still run
/// (issue 8, section 1).
#[test]
fn chaos_kill_run_processes() {
    for daemon in [false, true] {
        let s = Scenario::new(
            if daemon { "run killer, daemon" } else { "run killer, direct" },
            daemon,
            &[Kind::Run, Kind::Lib],
            Killers { runs: true, ..Killers::default() },
        );
        check(&s, &run_chaos(&s));
    }
}

/// Killing an `acquire --pid` keeper must not free the lock while its bound process lives.
#[test]
fn chaos_kill_keepers() {
    for daemon in [true, false] {
        let s = Scenario::new(
            if daemon { "keeper killer, daemon" } else { "keeper killer, direct" },
            daemon,
            &[Kind::Keeper, Kind::Lib],
            Killers { keepers: true, ..Killers::default() },
        );
        check(&s, &run_chaos(&s));
    }
}

/// Soft-lock users and OS-lock users on one lock (issue 8, section 7).
#[test]
fn chaos_soft_and_os_locks_mixed() {
    let s = Scenario::new(
        "soft and os",
        false,
        &[Kind::Soft, Kind::Lib, Kind::Soft, Kind::Run],
        Killers { workers: true, ..Killers::default() },
    );
    check(&s, &run_chaos(&s));
}

/// Workers on two hosts (network namespaces, each with its own daemon) on locks of a PostgreSQL
/// server, with kills of holders and waiters and links cut (under a long holder) and restored;
/// see the crate doc. `BUILDLOCK_CHAOS_REMOTE_SECS` sets its length (default 20: one cut link).
/// Ignored by default: long, and on a loaded machine it can meet a known gap (a check-in answered
/// late is taken for a loss, and the daemon then closes a session the server still honoured;
/// docs/RELIABILITY.md).
#[test]
#[ignore = "long (30 s and more): run it with --ignored (docs/RELIABILITY.md)"]
fn chaos_remote_across_two_hosts() {
    let Some(remote) = Remote::start() else { return };
    let mut s = Scenario::new(
        "remote, two hosts",
        true,
        &[Kind::Lib, Kind::Run],
        Killers { workers: true, links: true, ..Killers::default() },
    );
    s.secs = env_num("BUILDLOCK_CHAOS_REMOTE_SECS", 20);
    s.remote = Some(remote);
    check(&s, &run_chaos(&s));
}

/// [`chaos_remote_across_two_hosts`] with kills of a host's daemon and of `run` processes as
/// well. It found two holders in four gaps, closed (docs/RELIABILITY.md, which also names the
/// narrower windows still open: `run` and its daemon killed within a millisecond or so of each
/// other, `run` killed before it binds the lease): a killed daemon
/// freed its remote locks before its clients stopped (its clients now hold copies of the
/// sessions' sockets), a killed `run`'s command was not stopped when its lease was lost (the
/// daemon now stops it), when a holding host's `run` *and* its daemon were both killed and the
/// link then cut, nobody was left to stop the command (the last of the two now arms the
/// kernel's guard on the session), and when that last one was the daemon and it died during a
/// check-in (for which it disarms the guard: the answer would fire it), the guard stayed
/// disarmed (a process of its own now arms it again when the daemon dies). 20 s by default
/// (root only: skipped, saying so, without); `BUILDLOCK_CHAOS_REMOTE_SECS=60` for the recorded
/// runs.
#[test]
fn chaos_remote_across_two_hosts_with_daemon_and_run_kills() {
    let Some(remote) = Remote::start() else { return };
    let mut s = Scenario::new(
        "remote, two hosts, daemon and run kills",
        true,
        &[Kind::Lib, Kind::Run],
        Killers { workers: true, runs: true, daemon: true, links: true, ..Killers::default() },
    );
    s.secs = env_num("BUILDLOCK_CHAOS_REMOTE_SECS", 20);
    s.remote = Some(remote);
    check(&s, &run_chaos(&s));
}

/// The checker's self-test across hosts: the check files on the file system both hosts share
/// see holders on both, so with no lock taken it must see two holders at once.
#[test]
fn the_checker_sees_two_holders_across_hosts_when_there_is_no_lock() {
    let Some(remote) = Remote::start() else { return };
    let mut s = Scenario::new("no lock, two hosts", true, &[Kind::Lib], Killers::default());
    s.no_lock = true;
    s.secs = 2;
    s.remote = Some(remote);
    let r = run_chaos(&s);
    print(s.name, &r);
    assert!(!r.violations.is_empty(), "the check never fired although nothing was locked");
    assert!(!r.overlaps.is_empty(), "no overlapping spans although nothing was locked");
}
