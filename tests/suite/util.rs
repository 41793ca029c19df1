//! Test harness: a fresh temporary directory per test, the real `buildlock-client` binary with a
//! scrubbed environment, and child processes whose output lines are waited on as events.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long to wait for an event before declaring the test hung. Generous: this bounds a
/// failure, it is not a performance expectation.
pub const HANG: Duration = Duration::from_secs(60);

pub struct Env {
    pub tmp: tempfile::TempDir,
    /// Whether the CLI goes through a daemon (started on demand in this test's runtime dir).
    pub daemon: bool,
}

impl Env {
    /// A test environment where the CLI uses the lock files directly (`BUILDLOCK_NO_DAEMON=1`).
    pub fn new() -> Env {
        Env::with_daemon(false)
    }

    /// A test environment where the CLI goes through its own daemon, started on demand in the
    /// test's private runtime directory and killed when the test ends.
    pub fn daemon() -> Env {
        Env::with_daemon(true)
    }

    fn with_daemon(daemon: bool) -> Env {
        let tmp = tempfile::Builder::new().prefix("buildlock-test").tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("home")).unwrap();
        Env { tmp, daemon }
    }

    /// The daemon's runtime directory.
    pub fn runtime(&self) -> PathBuf {
        self.tmp.path().join("rt")
    }

    /// The pid of the daemon serving this test, if one runs.
    pub fn daemon_pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.runtime().join("buildlockd.pid")).ok()?.trim().parse().ok()?;
        (!is_dead(pid)).then_some(pid)
    }

    /// The lock directory the CLI uses (`BUILDLOCK_DIR`).
    pub fn locks(&self) -> PathBuf {
        self.tmp.path().join("locks")
    }

    /// The lock file of the named lock.
    pub fn lock_file(&self, name: &str) -> PathBuf {
        self.locks().join(format!("{name}.lock"))
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// `buildlock-client` with only the environment the test sets.
    pub fn cli(&self) -> Command {
        self.scrubbed(Command::new(env!("CARGO_BIN_EXE_buildlock-client")))
    }

    /// [`Env::cli`], run as user `uid` (and group `uid`) through `setpriv`; the test makes the
    /// directories that user needs reachable.
    pub fn cli_as_user(&self, uid: u32) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={uid}")).arg(format!("--regid={uid}")).args(["--clear-groups", "--"]);
        c.arg(env!("CARGO_BIN_EXE_buildlock-client"));
        self.scrubbed(c)
    }

    /// This test binary re-run as the ignored test `name` (a worker the test drives through
    /// its stdin and stdout), with the CLI's environment.
    pub fn worker(&self, name: &str) -> Command {
        let mut c = self.scrubbed(Command::new(std::env::current_exe().unwrap()));
        c.args([name, "--exact", "--ignored", "--nocapture", "--test-threads=1"]);
        c
    }

    /// `c` (any command) with only the environment the test sets, in the test's directory.
    pub fn scrubbed_command(&self, c: Command) -> Command {
        self.scrubbed(c)
    }

    /// `c` with only the environment the test sets, in the test's directory.
    fn scrubbed(&self, mut c: Command) -> Command {
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.path("home"))
            .env("BUILDLOCK_DIR", self.locks())
            .env("BUILDLOCK_RUNTIME_DIR", self.runtime())
            .env("BUILDLOCKD", env!("CARGO_BIN_EXE_buildlockd"))
            // Each test's own lock history (`tests/suite/history.rs` reads it back).
            .env("BUILDLOCK_HISTORY", self.path("history.sqlite3"))
            .current_dir(self.tmp.path());
        if !self.daemon {
            c.env("BUILDLOCK_NO_DAEMON", "1");
        }
        c
    }

    /// Runs the CLI to completion with no input (bounded by [`HANG`]: a hang fails the test).
    #[track_caller]
    pub fn run(&self, args: &[&str]) -> Out {
        let mut c = self.cli();
        c.args(args);
        output_bounded(c, &format!("buildlock-client {}", args.join(" ")))
    }

    /// Starts the CLI with piped stdin, stdout and stderr.
    pub fn spawn(&self, args: &[&str]) -> Proc {
        let mut c = self.cli();
        c.args(args);
        Proc::spawn(c)
    }

    /// `run NAME -- sh -c 'echo locked; read x'`: holds the lock until released.
    pub fn hold(&self, extra: &[&str], name: &str) -> Proc {
        let mut args = vec!["run"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[name, "--", "sh", "-c", "echo locked; read x; echo released"]);
        let mut p = self.spawn(&args);
        p.expect_line("locked");
        if !extra.contains(&"--soft") {
            self.wait_for_handover(name, p.pid());
        }
        p
    }

    /// Waits until the metadata of lock `name` no longer names `run_pid`, the `run` process: it
    /// names `run`'s command once `run` has handed the lock over, a moment after starting it
    /// (or another holder: a shared lock keeps its first reader's). A missing or unreadable
    /// metadata file ends the wait too.
    pub fn wait_for_handover(&self, name: &str, run_pid: u32) {
        let meta = self.locks().join(format!("{name}.lock.pid"));
        let names_run = || {
            let is_file = std::fs::symlink_metadata(&meta).is_ok_and(|m| m.is_file());
            is_file
                && std::fs::read_to_string(&meta).is_ok_and(|text| {
                    serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|v| v["pid"] == run_pid)
                })
        };
        wait_until(|| !names_run());
    }

    /// The Python interpreter with `fasteners` (`BUILDLOCK_TEST_PYTHON`, else `python3`),
    /// running `tests/py/fasteners_tool.py`.
    pub fn fasteners(&self, args: &[&str]) -> Command {
        let python = std::env::var_os("BUILDLOCK_TEST_PYTHON").unwrap_or_else(|| "python3".into());
        let mut c = Command::new(python);
        c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/fasteners_tool.py")).args(args);
        c
    }

    /// A shell CMD that increments the number in the file `counter` (read-modify-write), and
    /// fails with 99 if another holder is inside at the same time (its `counter.inside` marker).
    pub fn increment_script(&self) -> String {
        format!(
            "mkdir {c}.inside || {{ echo TWO-HOLDERS; exit 99; }}; n=$(cat {c}); echo $((n+1)) > {c}; rmdir {c}.inside",
            c = self.path("counter").display()
        )
    }

    /// Writes `.lock.pid` metadata for the named lock.
    pub fn write_meta(&self, name: &str, json: &str) {
        std::fs::create_dir_all(self.locks()).unwrap();
        std::fs::write(self.locks().join(format!("{name}.lock.pid")), json).unwrap();
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // A daemon started for this test dies with it.
        if let Some(pid) = self.daemon_pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
        }
    }
}

/// A finished command's status and output, with readable assertion helpers.
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Out {
    fn from(o: Output) -> Out {
        Out {
            status: o.status,
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Out {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    #[track_caller]
    pub fn assert_code(&self, want: i32) -> &Self {
        assert_eq!(self.code(), want, "exit code\n--- stdout\n{}--- stderr\n{}", self.stdout, self.stderr);
        self
    }

    #[track_caller]
    pub fn assert_stderr_has(&self, needle: &str) -> &Self {
        assert!(self.stderr.contains(needle), "stderr lacks {needle:?}\n--- stderr\n{}", self.stderr);
        self
    }

    #[track_caller]
    pub fn assert_stdout_has(&self, needle: &str) -> &Self {
        assert!(self.stdout.contains(needle), "stdout lacks {needle:?}\n--- stdout\n{}", self.stdout);
        self
    }
}

/// A running child whose stdout and stderr lines arrive as events.
pub struct Proc {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    stderr_lines: Receiver<String>,
}

fn pump(r: impl Read + Send + 'static, tx: mpsc::Sender<String>, all: Option<Arc<Mutex<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if let Some(all) = &all {
                let mut a = all.lock().unwrap();
                a.push_str(&line);
                a.push('\n');
            }
            if tx.send(line).is_err() && all.is_none() {
                break;
            }
        }
    });
}

impl Proc {
    pub fn spawn(mut c: Command) -> Proc {
        c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let (tx, lines) = mpsc::channel();
        pump(child.stdout.take().unwrap(), tx, None);
        let stderr = Arc::new(Mutex::new(String::new()));
        let (etx, stderr_lines) = mpsc::channel();
        pump(child.stderr.take().unwrap(), etx, Some(stderr.clone()));
        let stdin = child.stdin.take();
        Proc { child, stdin, lines, stderr, stderr_lines }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pid of this `run`'s CMD (its child), which the lock's metadata names as the holder.
    #[track_caller]
    pub fn cmd_pid(&self) -> u32 {
        let pid = self.pid();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
        children.split_whitespace().next().and_then(|c| c.parse().ok()).expect("run has started no command")
    }

    /// The next stdout line, or `None` at end of output.
    pub fn next_line(&mut self) -> Option<String> {
        match self.lines.recv_timeout(HANG) {
            Ok(l) => Some(l),
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("no output within {HANG:?}; stderr:\n{}", self.stderr()),
        }
    }

    /// Waits for the stdout line `want`, skipping others.
    #[track_caller]
    pub fn expect_line(&mut self, want: &str) {
        loop {
            match self.next_line() {
                Some(l) if l == want => return,
                Some(_) => {}
                None => panic!("output ended before {want:?}; stderr:\n{}", self.stderr()),
            }
        }
    }

    /// Waits for a stderr line containing `needle` and returns it.
    #[track_caller]
    pub fn expect_stderr(&mut self, needle: &str) -> String {
        loop {
            match self.stderr_lines.recv_timeout(HANG) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(e) => panic!("no stderr line with {needle:?} ({e:?}); stderr:\n{}", self.stderr()),
            }
        }
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends a line to the child's stdin (`read x` returns).
    pub fn send_line(&mut self) {
        if let Some(s) = &mut self.stdin {
            let _ = s.write_all(b"go\n");
            let _ = s.flush();
        }
    }

    /// Sends the line `text` to the child's stdin.
    pub fn send(&mut self, text: &str) {
        let s = self.stdin.as_mut().expect("stdin open");
        s.write_all(format!("{text}\n").as_bytes()).unwrap();
        s.flush().unwrap();
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
    }

    /// Waits for exit (bounded by [`HANG`]: past it, kills the child and fails the test).
    #[track_caller]
    pub fn wait(&mut self) -> ExitStatus {
        self.stdin.take();
        match wait_bounded(&mut self.child) {
            Ok(st) => st,
            Err(e) => panic!("waiting for pid {} to exit: {e}; stderr:\n{}", self.child.id(), self.stderr()),
        }
    }

    /// Releases a `hold`er and waits for it to exit successfully.
    #[track_caller]
    pub fn release(mut self) {
        self.send_line();
        self.expect_line("released");
        let st = self.wait();
        assert!(st.success(), "holder exited with {st}; stderr:\n{}", self.stderr());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for `child` to exit, at most [`HANG`]; past it, kills it and says so.
pub fn wait_bounded(child: &mut Child) -> Result<ExitStatus, String> {
    let start = std::time::Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Ok(st);
        }
        if start.elapsed() > HANG {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("still running after {HANG:?}: killed"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Runs `c` with no input to completion, output collected, bounded by [`HANG`]: a hang kills it
/// and fails the test naming `what`.
#[track_caller]
pub fn output_bounded(mut c: Command, what: &str) -> Out {
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let read = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = read(child.stdout.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let stderr = read(child.stderr.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let status = match wait_bounded(&mut child) {
        Ok(st) => st,
        Err(e) => panic!("{what}: {e}"),
    };
    // A grandchild may keep the pipes open after the child exits: that is not ours to wait for
    // past the bound either.
    let join = |h: std::thread::JoinHandle<Vec<u8>>| {
        let start = std::time::Instant::now();
        while !h.is_finished() {
            assert!(start.elapsed() < HANG, "{what}: its output was still open {HANG:?} after it exited");
            std::thread::sleep(Duration::from_millis(2));
        }
        h.join().unwrap()
    };
    Out::from(Output { status, stdout: join(stdout), stderr: join(stderr) })
}

/// Whether a process is gone (exited and reaped, or a zombie).
pub fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Waits (bounded by [`HANG`]) for `pid` to die: for the kernel's asynchronous signal delivery,
/// which gives no event to wait on from an unrelated process.
#[track_caller]
pub fn wait_dead(pid: u32) {
    let start = std::time::Instant::now();
    while !is_dead(pid) {
        assert!(start.elapsed() < HANG, "pid {pid} still alive after {HANG:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (bounded by [`HANG`]) until `ready()` holds: for a change another process makes that
/// gives no event to wait on (an `exec` seen in `/proc`).
#[track_caller]
pub fn wait_until(mut ready: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !ready() {
        assert!(start.elapsed() < HANG, "condition not met within {HANG:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The pid of a process that has exited (and so is dead, and not recycled this soon).
pub fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

/// Sets a file's modification time `secs` seconds into the past.
pub fn age_file(path: &Path, secs: u64) {
    let f = std::fs::File::options().append(true).open(path).unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(secs)).unwrap();
}

/// A request a test writes by hand: an exclusive lease `lease` on `path`, waiting `wait`, from
/// a thread of its own ([`fake_thread`]), nothing else set (struct update for the rest).
pub fn acquire_request(lease: u64, path: String, wait: buildlock_proto::WaitFor) -> buildlock_proto::AcquireRequest {
    buildlock_proto::AcquireRequest {
        lease,
        path,
        mode: buildlock_proto::Mode::Exclusive,
        wait,
        operation: String::new(),
        command: String::new(),
        bind_pid: None,
        thread: fake_thread(),
        max_hold_ms: None,
        kill_after_ms: None,
        remote: None,
        remote_timeout_ms: None,
    }
}

/// A thread id for a request a test writes by hand: each call another, as if each connection
/// the test opens were a thread of its own (requests of one thread for a lock it holds are
/// refused as deadlocks).
pub fn fake_thread() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1 << 40);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
