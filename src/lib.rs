//! `buildlock_cli`: the `buildlock-client` command line for buildlock locks, in the spirit of
//! `flock(1)`, as a library: [`main`] is the binary (`src/main.rs`), and [`main_from`] lets another
//! host run it (the Python package's `buildlock-client` command).
//!
//! ```text
//! buildlock-client [--dir DIR] [--no-daemon] [--soft] [--stale-after SECS] [--json] <command>
//!   run [-s|-x] [-n|-w SECS] [-E N] [-o TEXT] TARGET -- CMD [ARGS...]
//!   acquire [-s|-x] [-n|-w SECS] [-E N] [-o TEXT] [--pid PID] TARGET
//!   release [--pid PID] TARGET
//!   status [TARGET]
//!   break TARGET [--force]
//!   stats [TARGET] [--since 24h] [--prometheus]
//!   history TARGET [--since 24h] [--svg FILE]
//!   daemon start|stop|status|install|uninstall
//! ```
//!
//! By default locks go through the per-user daemon `buildlockd`, started on demand; with
//! `--no-daemon` (or when no daemon can be had, after a warning) through the lock files directly.
//!
//! Exit codes:
//! - `run`: CMD's own exit status, or 128+N if CMD died of signal N; 1 (or the `-E` value) when
//!   the lock is busy with `-n` or `-w` ran out; 124 when CMD was stopped for holding the lock
//!   past `--max-hold` (as `timeout(1)`); 122 when CMD was stopped because a remote lock was
//!   lost (the connection to the server broke; not with `--on-lost=warn`); 126 if CMD could not
//!   be executed, 127 if it was not found.
//! - `acquire`: 0 once the lock is held for PID; 1 (or `-E`) when busy or timed out.
//! - `run`, `acquire`: 3 when waiting would never end (a deadlock), with the cycle named.
//! - `release`: 0 when released, 1 when PID held no such lock.
//! - `break`: 0 when the lock is free afterwards, 1 when it was refused (a live holder).
//! - `daemon status`: 0 when a daemon runs, 1 when none does.
//! - any command: 2 for bad usage or input (a bad lock name, an unwritable directory).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use buildlock::Connect;
use buildlock_disk::{Backend, LockMode, LockOptions, LockTarget, DEFAULT_STALE_AFTER};
use clap::{ArgAction, Parser, Subcommand};

#[cfg(unix)]
mod daemon;
mod history;
#[cfg(unix)]
mod keep;
mod report;
mod run;
#[cfg(unix)]
mod service;

/// Exit code for bad usage or input, and for failures of buildlock itself.
const EXIT_USAGE: u8 = 2;
/// Exit code when waiting for the lock would never end (a deadlock: this thread, or a process
/// this one was started by, holds what the holders it would wait for wait for).
const EXIT_DEADLOCK: u8 = 3;

/// Prints a failure to take a lock and returns its exit code: `conflict` for a busy lock or a
/// wait that ran out, [`EXIT_DEADLOCK`] for a deadlock, [`EXIT_USAGE`] for the rest.
fn acquire_failed(e: &buildlock::Error, conflict: u8) -> ExitCode {
    match e {
        e if e.is_conflict() => {
            eprintln!("buildlock-client: {e}");
            ExitCode::from(conflict)
        }
        buildlock::Error::Deadlock(_) => {
            eprintln!("buildlock-client: {e}");
            ExitCode::from(EXIT_DEADLOCK)
        }
        e => fail(e),
    }
}

#[derive(Parser, Debug)]
#[command(name = "buildlock-client", version, about = "Hold buildlock locks around commands, show and break them")]
struct Cli {
    /// Directory for named locks [default: $BUILDLOCK_DIR, else the per-user data directory]
    #[arg(long, global = true, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Use the on-disk protocol directly, without the daemon [env: BUILDLOCK_NO_DAEMON]
    #[arg(long, global = true)]
    no_daemon: bool,
    /// The daemon's runtime directory [default: $BUILDLOCK_RUNTIME_DIR, else
    /// $XDG_RUNTIME_DIR/buildlock, else a private directory under the temp dir]
    #[arg(long, global = true, value_name = "DIR", env = "BUILDLOCK_RUNTIME_DIR", hide_env = true)]
    runtime_dir: Option<PathBuf>,
    /// Use soft locks (the lock is the file's existence), for file systems without OS locks
    /// [env: BUILDLOCK_SOFT]
    #[arg(long, global = true, env = "BUILDLOCK_SOFT", hide_env = true)]
    soft: bool,
    /// Seconds after which a lock nobody can vouch for is stale (soft locks) [env: BUILDLOCK_STALE_AFTER]
    #[arg(long, global = true, value_name = "SECS", env = "BUILDLOCK_STALE_AFTER", hide_env = true, value_parser = parse_secs)]
    stale_after: Option<Duration>,
    /// Machine-readable output (status, break, stats, history)
    #[arg(long, global = true)]
    json: bool,
    /// Take locks on this PostgreSQL server (`postgres://user@host/db?sslmode=...`), shared by
    /// every host that uses it; `local` for the lock directory. Without it, the config file's
    /// `[[locks]]` entries route by name [env: BUILDLOCK_BACKEND]
    #[arg(long, global = true, value_name = "URL", env = "BUILDLOCK_BACKEND", hide_env = true)]
    backend: Option<String>,
    /// Remote locks: how long a dead or cut-off host may keep its locks on the server; a holder
    /// notices a lost connection within half of it (docs/REMOTE.md) [default: 30s]
    #[arg(long, global = true, value_name = "DURATION", env = "BUILDLOCK_REMOTE_TIMEOUT", hide_env = true, value_parser = parse_duration)]
    remote_timeout: Option<Duration>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run CMD while holding the lock TARGET; release it when CMD exits
    Run(RunArgs),
    /// Take TARGET for process PID (a shell script: `acquire --pid $$`); it is released when PID
    /// exits or on `release`
    Acquire(AcquireArgs),
    /// Release the lock TARGET held for process PID
    Release {
        /// The process the lock was taken for [default: the parent of this command, e.g. the shell]
        #[arg(long, value_name = "PID")]
        pid: Option<u32>,
        target: String,
    },
    /// Start, stop or look at the daemon
    Daemon {
        #[command(subcommand)]
        action: DaemonAction,
    },
    /// (internal) hold a lock for a process; started by `acquire`
    #[command(name = "__keep", hide = true)]
    Keep(AcquireArgs),
    /// (internal) a keeper's second holder of a lock taken directly; started by `__keep`
    #[command(name = "__keep-shadow", hide = true)]
    KeepShadow {
        #[arg(long)]
        pid: u32,
        /// The inherited descriptor of the locked file
        #[arg(long)]
        fd: i32,
        target: String,
    },
    /// Show who holds TARGET, or every lock in the lock directory
    Status {
        /// A lock name (in the lock directory) or a path to a .lock file
        target: Option<String>,
    },
    /// Remove a stale lock; refuse if a live process holds it
    Break {
        target: String,
        /// Break a soft lock even if its holder seems alive (you know it is gone). Never breaks
        /// an OS lock.
        #[arg(long)]
        force: bool,
    },
    /// Figures from the lock history: acquisitions, waits, holds, timeouts, stale recoveries,
    /// the longest holders (every lock, or TARGET)
    Stats {
        /// A lock name (in the lock directory) or a path to a .lock file
        target: Option<String>,
        /// How far back to look: 90s, 30m, 24h, 7d, 2w, or all
        #[arg(long, value_name = "SPAN", default_value = "24h", value_parser = history::parse_since)]
        since: history::Since,
        /// The Prometheus text format (for node_exporter's textfile collector)
        #[arg(long, conflicts_with = "json")]
        prometheus: bool,
    },
    /// The events of TARGET from the lock history, oldest first, or a timeline (--svg)
    History {
        /// A lock name (in the lock directory) or a path to a .lock file
        target: String,
        /// How far back to look: 90s, 30m, 24h, 7d, 2w, or all
        #[arg(long, value_name = "SPAN", default_value = "24h", value_parser = history::parse_since)]
        since: history::Since,
        /// Draw the events as an SVG timeline into FILE: one row per holder or waiter
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug, Clone, Copy)]
enum DaemonAction {
    /// Start the daemon if none runs
    Start,
    /// Ask the daemon to exit (Linux: held locks stay with their holders' copies; elsewhere they end)
    Stop,
    /// Is a daemon running, and what is it doing
    Status,
    /// Let the service manager start the daemon (systemd user units or a launchd agent)
    Install(ManagerArgs),
    /// Undo `install`
    Uninstall(ManagerArgs),
}

#[derive(clap::Args, Debug, Clone, Copy)]
struct ManagerArgs {
    /// systemd's user manager [default on Linux]
    #[arg(long, conflicts_with = "launchd")]
    systemd: bool,
    /// launchd [default on macOS]
    #[arg(long)]
    launchd: bool,
}

#[derive(clap::Args, Debug, Clone)]
struct AcquireArgs {
    #[command(flatten)]
    lock: LockArgs,
    /// The process to hold the lock for [default: the parent of this command, e.g. the shell]
    #[arg(long, value_name = "PID")]
    pid: Option<u32>,
    /// A lock name (in the lock directory) or a path to a .lock file
    target: String,
}

/// How to take a lock: shared by `run` and `acquire`.
#[derive(clap::Args, Debug, Clone)]
struct LockArgs {
    /// Take a shared (reader) lock
    #[arg(short, long, conflicts_with = "exclusive")]
    shared: bool,
    /// Take an exclusive (writer) lock [default]
    #[arg(short = 'x', long)]
    exclusive: bool,
    /// Fail at once if the lock is busy
    #[arg(short = 'n', long = "nonblock", conflicts_with = "wait")]
    nonblock: bool,
    /// Wait at most SECS seconds for the lock (fractions allowed; `inf`, or more than the
    /// clock can count, waits forever)
    #[arg(short, long, value_name = "SECS", value_parser = parse_wait)]
    wait: Option<Duration>,
    /// Exit code when the lock is busy (-n) or the wait times out (-w)
    #[arg(short = 'E', long, value_name = "N", default_value_t = 1)]
    conflict_exit_code: u8,
    /// What the holder is doing, shown to waiters [default: the command line]
    #[arg(short, long, value_name = "TEXT")]
    operation: Option<String>,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    lock: LockArgs,
    /// A lock name (in the lock directory) or a path to a .lock file
    target: String,
    /// Stop CMD if it holds the lock longer than this (seconds, or `90s`, `30m`, `1h30m`):
    /// SIGTERM to its process group, SIGKILL after `--kill-after`; the lock is released once
    /// they are gone, and `run` exits with 124. CMD runs in its own process group then (like
    /// `timeout(1)`); `run` passes Ctrl+C on to it.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    max_hold: Option<Duration>,
    /// With a max-hold (`--max-hold`, or `max_hold` for the lock in the config file): how long
    /// CMD has after SIGTERM before SIGKILL [default: 10 s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    kill_after: Option<Duration>,
    /// Remote locks: what to do when the connection to the server is lost while CMD runs:
    /// `stop` CMD (SIGTERM to its process group, SIGKILL after a grace period; exit 122), or
    /// `warn` and let it run on
    #[arg(long, value_name = "WHAT", default_value = "stop", value_parser = ["stop", "warn"])]
    on_lost: String,
    /// The command to run and its arguments, after `--`
    #[arg(last = true, required = true, value_name = "CMD", action = ArgAction::Append)]
    cmd: Vec<OsString>,
}

/// A duration: seconds (`90`, `2.5`), or a friendly span (`90s`, `30m`, `1h30m`, `2 hours`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(d) = parse_secs(s) {
        return Ok(d);
    }
    let d: jiff::SignedDuration = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: give seconds (`90`) or a span such as `90s`, `30m`, `1h30m`"))?;
    Duration::try_from(d).map_err(|_| format!("{s:?} is negative: give a duration from 0 up"))
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is not a number of seconds from 0 up"))
}

/// A `-w` value: seconds from 0 up; `inf` and values too large for a `Duration` (more than
/// 584 billion years) become `Duration::MAX`, which [`LockArgs::wait`] reads as "forever".
fn parse_wait(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if secs.is_nan() {
        return Err(format!("{s:?} is not a number of seconds"));
    }
    if secs < 0.0 {
        return Err(format!("{s:?} is negative: give the seconds to wait, from 0 up (`-n` fails at once)"));
    }
    Ok(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
}

/// What every command needs: where locks live and how to take them.
struct Context {
    dir: PathBuf,
    opts: LockOptions,
    json: bool,
    connect: Connect,
    runtime_dir: PathBuf,
    /// `--backend`/`BUILDLOCK_BACKEND`, for every lock.
    backend: Option<String>,
    remote_timeout: Duration,
    config: buildlock::config::Config,
}

impl Context {
    fn target(&self, arg: &str) -> Result<LockTarget, buildlock_disk::Error> {
        LockTarget::resolve(arg, &self.dir)
    }

    /// The backend URL lock `name` lives on: `--backend`, else the config file's first match;
    /// `None` for the lock directory.
    fn backend_url(&self, name: &str) -> Option<&str> {
        self.config.backend_url(name, self.backend.as_deref())
    }

    /// The server settings for lock `name`, if it is remote.
    fn remote_for(&self, name: &str) -> Result<Option<std::sync::Arc<dyn buildlock_remote::Engine>>, String> {
        self.config.remote_for(name, self.backend.as_deref(), self.remote_timeout).map_err(|e| e.to_string())
    }
}

/// The command line, with the process's own arguments.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// The command line, with `args` (the first is the program name). A host that is not this
/// package's binary says first, with [`set_self_command`], how to run this command line again
/// (`acquire` starts its keeper that way).
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    init_logging();
    let dir = match buildlock_disk::lock_dir(cli.dir.as_deref()) {
        Ok(d) => d,
        Err(e) => return fail(&e),
    };
    let opts = LockOptions {
        backend: if cli.soft { Backend::Soft } else { Backend::Auto },
        stale_after: cli.stale_after.unwrap_or(DEFAULT_STALE_AFTER),
        ..LockOptions::default()
    };
    // Soft locks exist only in the on-disk protocol.
    let connect = if cli.soft { Connect::Direct } else { Connect::from_env(cli.no_daemon) };
    let runtime_dir = cli.runtime_dir.unwrap_or_else(default_runtime_dir);
    let config = match buildlock::config::Config::load() {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let remote_timeout = cli.remote_timeout.unwrap_or(buildlock_remote::DEFAULT_REMOTE_TIMEOUT);
    let cx = Context { dir, opts, json: cli.json, connect, runtime_dir, backend: cli.backend, remote_timeout, config };
    if matches!(cli.command, Command::Status { .. } | Command::Stats { .. } | Command::History { .. }) {
        // They only print (often into `head` or `less`), and hold no lock.
        buildlock_sys::end_on_closed_pipe();
    }
    match cli.command {
        Command::Run(args) => run::run(&cx, args),
        #[cfg(unix)]
        Command::Acquire(args) => keep::acquire(&cx, args),
        #[cfg(unix)]
        Command::Keep(args) => keep::keep(&cx, args),
        #[cfg(unix)]
        Command::KeepShadow { pid, fd, target } => keep::shadow(&cx, pid, fd, &target),
        #[cfg(unix)]
        Command::Release { pid, target } => keep::release(&cx, pid, &target),
        #[cfg(unix)]
        Command::Daemon { action } => daemon::daemon(&cx, action),
        #[cfg(not(unix))]
        Command::Acquire(_)
        | Command::Keep(_)
        | Command::KeepShadow { .. }
        | Command::Release { .. }
        | Command::Daemon { .. } => fail(&"this command needs the daemon, which is not available on this platform yet"),
        Command::Status { target } => report::status(&cx, target.as_deref()),
        Command::Break { target, force } => report::break_lock(&cx, &target, force),
        Command::Stats { target, since, prometheus } => history::stats(&cx, target.as_deref(), since.0, prometheus),
        Command::History { target, since, svg } => history::history(&cx, &target, since.0, svg),
    }
}

/// How to run this command line again, when this process is not its own binary.
static SELF_COMMAND: std::sync::OnceLock<Vec<OsString>> = std::sync::OnceLock::new();

/// Says how to run this command line again: a program and the arguments that come before the
/// command line's own (e.g. a Python interpreter and its console script). Set once.
pub fn set_self_command(argv: Vec<OsString>) {
    let _ = SELF_COMMAND.set(argv);
}

/// A command that runs this command line again: [`set_self_command`]'s, else this executable.
fn self_command() -> std::io::Result<std::process::Command> {
    match SELF_COMMAND.get().and_then(|a| a.split_first()) {
        Some((program, args)) => {
            let mut cmd = std::process::Command::new(program);
            cmd.args(args);
            Ok(cmd)
        }
        None => Ok(std::process::Command::new(std::env::current_exe()?)),
    }
}

/// The number an [`ExitCode`] from [`main_from`] stands for (std does not tell it).
pub fn exit_status(code: ExitCode) -> u8 {
    (0..=u8::MAX).find(|&n| ExitCode::from(n) == code).unwrap_or(EXIT_USAGE)
}

#[cfg(unix)]
fn default_runtime_dir() -> PathBuf {
    buildlock_sys::ipc::default_runtime_dir()
}

/// No daemon (and so no runtime directory) on this platform yet; the value is never used.
#[cfg(not(unix))]
fn default_runtime_dir() -> PathBuf {
    std::env::temp_dir().join("buildlock")
}

/// Log lines read like the rest of our messages: `buildlock-client: warning: ...`.
/// `BUILDLOCK_LOG` (e.g. `debug`) changes the level; the default shows warnings and errors.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BUILDLOCK_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(LogFormat)
        .try_init()
        .ok();
}

struct LogFormat;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for LogFormat
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        cx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut w: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let level = match *event.metadata().level() {
            tracing::Level::ERROR => "error",
            tracing::Level::WARN => "warning",
            tracing::Level::INFO => "info",
            tracing::Level::DEBUG => "debug",
            tracing::Level::TRACE => "trace",
        };
        write!(w, "buildlock-client: {level}: ")?;
        cx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// Prints `err` and returns the usage/input exit code.
fn fail(err: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("buildlock-client: error: {err}");
    ExitCode::from(EXIT_USAGE)
}

impl LockArgs {
    fn mode(&self) -> LockMode {
        if self.shared {
            LockMode::Shared
        } else {
            LockMode::Exclusive
        }
    }

    fn wait(&self) -> buildlock::Wait {
        match (self.nonblock, self.wait) {
            (true, _) => buildlock::Wait::NoWait,
            (false, Some(Duration::MAX)) => buildlock::Wait::Forever,
            (false, Some(t)) => buildlock::Wait::Timeout(t),
            (false, None) => buildlock::Wait::Forever,
        }
    }

    /// Library options for taking the lock, with `command` as the holder's command line.
    fn options(&self, cx: &Context, command: String) -> buildlock::Options {
        buildlock::Options {
            mode: self.mode(),
            wait: self.wait(),
            operation: self.operation.clone().unwrap_or_else(|| command.clone()),
            command: Some(command),
            connect: cx.connect,
            runtime_dir: Some(cx.runtime_dir.clone()),
            backend: cx.opts.backend,
            stale_after: cx.opts.stale_after,
            ..buildlock::Options::default()
        }
    }
}
