//! The `buildlockd` command: check the runtime directory, become the only daemon for it, bind
//! the socket, serve until stopped or idle.
//!
//! Exit codes: 0 after a clean stop, or at once when another daemon already serves the runtime
//! directory (it prints `running pid=N`); 2 for a bad setting (an unsafe runtime directory, a
//! socket that cannot be bound), with a message saying what to fix.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use buildlock_sys::{LockFile, LockMode};
use clap::Parser;

use crate::{serve, Config, Daemon, Limits};

#[derive(Parser, Debug)]
#[command(name = "buildlockd", version, about = "The buildlock per-user lock daemon")]
struct Args {
    /// Private directory for the socket, pid file and instance lock
    /// [default: $BUILDLOCK_RUNTIME_DIR, else $XDG_RUNTIME_DIR/buildlock, else a private temp dir]
    #[arg(long, value_name = "DIR")]
    runtime_dir: Option<PathBuf>,
    /// Exit after SECS with no client and no lease; 0 = never
    #[arg(long, value_name = "SECS", env = "BUILDLOCKD_IDLE_EXIT", default_value_t = 300)]
    idle_exit: u64,
    /// Once listening, go to the background (new session, stdin/stdout to /dev/null) and let
    /// the starting process return; how clients start the daemon on demand
    #[arg(long)]
    daemonize: bool,
    /// Refuse client connections past N open at once (clients then use the lock files directly)
    #[arg(long, value_name = "N", env = "BUILDLOCKD_MAX_CONNECTIONS", default_value_t = Limits::default().max_connections,
          value_parser = positive)]
    max_connections: usize,
    /// Refuse leases past N held or waited for, all clients together
    #[arg(long, value_name = "N", env = "BUILDLOCKD_MAX_LEASES", default_value_t = Limits::default().max_leases,
          value_parser = positive)]
    max_leases: usize,
    /// Refuse to wait for more than N lock files at once that processes outside the daemon hold
    /// (fasteners, direct mode); each costs a thread
    #[arg(long, value_name = "N", env = "BUILDLOCKD_MAX_OUTSIDE_WAITS",
          default_value_t = Limits::default().max_outside_waits, value_parser = positive)]
    max_outside_waits: usize,
}

/// A limit: a whole number of at least 1.
fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?} is not a whole number of at least 1")),
    }
}

/// Descriptors kept free of the limits' budget: the socket, the instance lock, logs, pidfds.
const FD_RESERVE: u64 = 64;

/// Fits the lease limit into the open-file limit `fds`, so that past it clients get the
/// limit's message rather than the daemon failing to open files: every connection, held lease
/// and waiter thread costs a descriptor (a lease waiting in the queue costs none, but the
/// limit counts it too).
fn fit_limits(mut limits: Limits, fds: u64) -> Limits {
    let fixed = (limits.max_connections + limits.max_outside_waits) as u64 + FD_RESERVE;
    let room = usize::try_from(fds.saturating_sub(fixed)).unwrap_or(usize::MAX).max(1);
    if limits.max_leases > room {
        let msg = format!(
            "the open-file limit ({fds}) leaves room for {room} leases, not the {} asked for: leases are \
             limited to {room}; raise the limit (`ulimit -n`, LimitNOFILE=) or lower --max-connections",
            limits.max_leases
        );
        // A warning when somebody asked for more; with the defaults, a note (`status` and a
        // client past the limit say it where it matters).
        if limits.max_leases == Limits::default().max_leases {
            tracing::info!("{msg}");
        } else {
            tracing::warn!("{msg}");
        }
        limits.max_leases = room;
        limits.open_files = Some(fds);
    }
    limits
}

/// The listening socket a service manager passed us, and which manager it was.
fn activated_listener() -> Result<Option<(std::os::unix::net::UnixListener, &'static str)>, String> {
    #[cfg(target_os = "linux")]
    {
        let l = buildlock_sys::ipc::systemd_listener().map_err(|e| format!("bad LISTEN_FDS from systemd: {e}"))?;
        Ok(l.map(|l| (l, "systemd")))
    }
    #[cfg(target_os = "macos")]
    {
        // Not started by launchd (or no `Sockets` entry): bind our own.
        match buildlock_sys::ipc::launch_activate_socket("Listeners") {
            Ok(mut fds) if !fds.is_empty() => {
                Ok(Some((std::os::unix::net::UnixListener::from(fds.remove(0)), "launchd")))
            }
            _ => Ok(None),
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    {
        Ok(None)
    }
}

fn notify_systemd(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// Runs the daemon; returns its exit code.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// [`main`] with `args` (the first is the program name), for a host that is not the
/// `buildlockd` binary (the Python package's `buildlockd` command).
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = Args::parse_from(args);
    let filter = tracing_subscriber::EnvFilter::try_from_env("BUILDLOCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("buildlockd: error: {msg}");
            ExitCode::from(2)
        }
    }
}

/// Writes one of the daemon's own files (pid file, marker): `rw-------`, by rename.
fn write_private(path: &std::path::Path, text: &str) -> Result<(), String> {
    buildlock_sys::fs::replace_file_with_mode(path, text.as_bytes(), 0o600)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn run(args: Args) -> Result<(), String> {
    // Whatever umask our starter had is not ours to inherit: every file this daemon creates
    // gets an explicit mode (its own files private, lock files as shared as their directory).
    buildlock_sys::ipc::set_umask(0);
    let runtime_dir = args.runtime_dir.unwrap_or_else(buildlock_sys::ipc::default_runtime_dir);
    buildlock_sys::ipc::ensure_private_dir(&runtime_dir)?;
    let config = Config {
        runtime_dir: runtime_dir.clone(),
        idle_exit: (args.idle_exit > 0).then(|| Duration::from_secs(args.idle_exit)),
        limits: Limits {
            max_connections: args.max_connections,
            max_leases: args.max_leases,
            max_outside_waits: args.max_outside_waits,
            open_files: None,
        },
    };
    // One daemon per runtime directory: whoever holds this lock is it. Taken before the socket
    // is touched, so a stale socket is only ever removed by the one daemon allowed to bind.
    let instance_path = runtime_dir.join("buildlockd.lock");
    let instance =
        LockFile::open(&instance_path).map_err(|e| format!("cannot open {}: {e}", instance_path.display()))?;
    let pid_path = runtime_dir.join("buildlockd.pid");
    if !instance.try_lock(LockMode::Exclusive).map_err(|e| format!("cannot lock {}: {e}", instance_path.display()))? {
        let other = std::fs::read_to_string(&pid_path).unwrap_or_default();
        let other = other.trim();
        tracing::info!("another buildlockd (pid {other}) serves {}; exiting", runtime_dir.display());
        println!("running pid={other}");
        return Ok(());
    }
    write_private(&pid_path, &format!("{}\n", std::process::id()))?;
    let socket = config.socket_path();
    let (listener, manager) = match activated_listener()? {
        // The service manager owns the socket: use it, never remove it, and leave a note so
        // that clients do not start a second daemon beside it.
        Some((listener, manager)) => {
            let marker = runtime_dir.join(buildlock_proto::transport::MANAGED_MARKER);
            write_private(&marker, &format!("{manager}\n"))?;
            tracing::info!("using the socket {manager} passed us");
            (listener, Some(manager))
        }
        None => {
            match std::fs::remove_file(&socket) {
                Ok(()) => tracing::info!("removed stale socket {}", socket.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot remove stale socket {}: {e}", socket.display())),
            }
            let listener = std::os::unix::net::UnixListener::bind(&socket)
                .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
            let _ = std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600));
            (listener, None)
        }
    };
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;

    if args.daemonize && manager.is_none() {
        // Single-threaded still: no runtime, no signal thread yet. The socket is listening, so
        // clients may connect as soon as the parent says "ready"; they queue in the backlog.
        use std::os::fd::AsFd;
        let keep = [listener.as_fd(), instance.file().as_fd()];
        if let Some(child) = buildlock_sys::ipc::fork_into_background(&keep).map_err(|e| format!("cannot fork: {e}"))? {
            println!("ready pid={child} socket={}", socket.display());
            std::process::exit(0);
        }
        // The child. On Linux the instance lock is an open-file-description lock, shared with
        // the parent that just exited, so it is still held. POSIX record locks (macOS) are not
        // inherited: take it again (untested).
        #[cfg(not(target_os = "linux"))]
        instance.lock(LockMode::Exclusive).map_err(|e| format!("cannot lock {}: {e}", instance_path.display()))?;
        write_private(&pid_path, &format!("{}\n", std::process::id()))?;
    }
    // One descriptor per held lease (and per client): thousands of leases need more than the
    // usual soft limit of 1024.
    let mut config = config;
    match buildlock_sys::ipc::raise_fd_limit() {
        Ok(n) => {
            tracing::debug!("open-file limit: {n}");
            config.limits = fit_limits(config.limits, n);
        }
        Err(e) => tracing::warn!("cannot read the open-file limit: {e}"),
    }
    tracing::debug!("limits: {:?}", config.limits);
    let daemon = Daemon::new(config);
    let d = daemon.clone();
    if let Err(e) = ctrlc::set_handler(move || d.shutdown()) {
        tracing::warn!("cannot handle SIGINT/SIGTERM: {e}");
    }
    tracing::info!(
        "buildlockd {} (protocol {}) pid {} listening on {}",
        buildlock_proto::BUILD,
        buildlock_proto::PROTOCOL_VERSION,
        std::process::id(),
        socket.display()
    );
    if !args.daemonize {
        // Whoever started us waits for this line.
        println!("ready pid={} socket={}", std::process::id(), socket.display());
        let _ = std::io::stdout().flush();
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(async {
        let listener = tokio::net::UnixListener::from_std(listener).map_err(|e| e.to_string())?;
        // Bound leases a crashed predecessor journaled, before anyone is served: clients that
        // connect meanwhile wait in the listen backlog.
        daemon.recover();
        if manager == Some("systemd") {
            notify_systemd(&[sd_notify::NotifyState::Ready]);
        }
        serve(listener, daemon).await;
        Ok::<(), String>(())
    })?;
    // Dropping a runtime waits for its blocking tasks. The daemon has none (threads waiting in
    // the kernel for an outside holder are its own, and end with the process), but never let
    // one hold the exit up.
    rt.shutdown_timeout(Duration::from_millis(200));
    crate::state::flush_history();
    if manager == Some("systemd") {
        notify_systemd(&[sd_notify::NotifyState::Stopping]);
    }
    // Still holding the instance lock: the pid file, and a socket we bound ourselves, are ours
    // to remove. A socket the service manager gave us stays: it starts us again through it.
    if manager.is_none() {
        let _ = std::fs::remove_file(&socket);
    }
    let _ = std::fs::remove_file(&pid_path);
    tracing::info!("stopped");
    drop(instance);
    Ok(())
}
