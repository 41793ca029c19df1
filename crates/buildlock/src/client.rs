//! A blocking connection to `buildlockd`: handshake, requests, replies with their descriptors,
//! and starting the daemon on demand.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use buildlock_proto::{FrameDecoder, Reply, Request, Welcome};

use crate::Error;

/// How long to wait for a daemon started on demand to say it is ready. A bound on a failure
/// (a daemon that hangs before listening), not an expectation: on a loaded machine a dozen
/// clients starting debug builds at once can take seconds, so it is generous.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after starting a daemon that answered "running" (another one holds the instance
/// lock) before starting one again if still nothing listens.
const RESTART_AFTER: Duration = Duration::from_millis(100);

/// A connection to the daemon.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    decoder: FrameDecoder,
    fds: VecDeque<OwnedFd>,
    buf: Vec<u8>,
    welcome: Welcome,
}

/// Why no connection could be made.
#[derive(Debug)]
pub(crate) enum ConnectError {
    /// No daemon listens there (no socket, or a stale one).
    NotRunning(io::Error),
    /// Something answered but refused us or speaks another protocol; the text says what to do.
    Refused(String),
    /// The runtime directory or the process listening in it is not this user's own: nothing
    /// was sent, and no daemon may be started there. The text names the path and what to do.
    Untrusted(String),
    /// The daemon closed the connection (or reset it) before its `Welcome`: it is on its way
    /// out (idle exit, `daemon stop`), and the next one can be started once it is gone.
    Closing(String),
    Other(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::NotRunning(e) => write!(f, "no daemon is running ({e})"),
            ConnectError::Refused(m)
            | ConnectError::Untrusted(m)
            | ConnectError::Closing(m)
            | ConnectError::Other(m) => f.write_str(m),
        }
    }
}

impl Client {
    /// Connects to the daemon of `runtime_dir` and says hello.
    ///
    /// Before a byte is sent, the daemon is verified: `runtime_dir` must be a directory (not a
    /// symlink) owned by this user with no access for anyone else, and the process listening on
    /// the socket must run as this user. Whoever could create the directory first (it is under
    /// `/tmp` when `XDG_RUNTIME_DIR` is unset) could otherwise grant every lock and read every
    /// lock name and command line.
    pub(crate) fn connect(runtime_dir: &Path) -> Result<Client, ConnectError> {
        match std::fs::symlink_metadata(runtime_dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ConnectError::NotRunning(e)),
            _ => buildlock_sys::ipc::check_private_dir(runtime_dir).map_err(ConnectError::Untrusted)?,
        }
        let socket = buildlock_proto::transport::socket_path(runtime_dir);
        let stream = match UnixStream::connect(&socket) {
            Ok(s) => s,
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
                return Err(ConnectError::NotRunning(e))
            }
            Err(e) => return Err(ConnectError::Other(format!("cannot connect to {}: {e}", socket.display()))),
        };
        let uid = buildlock_sys::ipc::current_uid();
        match buildlock_sys::ipc::peer_uid(stream.as_fd()) {
            Ok(peer) if peer == uid => {}
            Ok(peer) => {
                return Err(ConnectError::Untrusted(format!(
                    "the process listening on {} runs as uid {peer}, not as you (uid {uid}): it is not your \
                     buildlockd, so nothing was sent to it; find out who made it (`ls -l {}`) and have it removed, \
                     or set BUILDLOCK_RUNTIME_DIR to a directory of yours with mode 700",
                    socket.display(),
                    socket.display()
                )))
            }
            Err(e) => {
                return Err(ConnectError::Untrusted(format!(
                    "cannot tell which user listens on {} ({e}), so nothing was sent to it",
                    socket.display()
                )))
            }
        }
        let mut client = Client {
            stream,
            decoder: FrameDecoder::new(),
            fds: VecDeque::new(),
            buf: vec![0; 16 * 1024],
            welcome: Welcome::new(0),
        };
        let hello = buildlock_proto::encode(&buildlock_proto::Hello::new(std::process::id()))
            .map_err(|e| ConnectError::Other(e.to_string()))?;
        client
            .stream
            .write_all(&hello)
            .map_err(|e| ConnectError::Closing(format!("cannot talk to buildlockd: {e}")))?;
        let frame = match client.next_frame(Some(Duration::from_secs(10))) {
            Ok(Some(f)) => f,
            Ok(None) => return Err(ConnectError::Other("buildlockd did not answer within 10 s".into())),
            Err(e) => return Err(ConnectError::Closing(format!("buildlockd closed the connection: {e}"))),
        };
        client.welcome = buildlock_proto::check_welcome(&frame).map_err(|e| ConnectError::Refused(e.to_string()))?;
        if let Some(refusal) = &client.welcome.error {
            return Err(ConnectError::Refused(format!("buildlockd refused the connection: {refusal}")));
        }
        Ok(client)
    }

    /// The daemon's pid.
    pub fn daemon_pid(&self) -> u32 {
        self.welcome.pid
    }

    /// The socket, what was read past the `Welcome`, and descriptors received with it: for the
    /// process's shared connection (`mux.rs`), which reads in a thread of its own.
    pub(crate) fn into_parts(self) -> (UnixStream, FrameDecoder, VecDeque<OwnedFd>) {
        (self.stream, self.decoder, self.fds)
    }

    pub(crate) fn send(&mut self, req: &Request) -> Result<(), Error> {
        let bytes = buildlock_proto::encode(req).map_err(|e| Error::Protocol(e.to_string()))?;
        self.stream.write_all(&bytes).map_err(|e| Error::Protocol(format!("cannot send to buildlockd: {e}")))
    }

    /// The next reply and the descriptor that came with it; `Ok(None)` if `timeout` passed first.
    pub(crate) fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<(Reply, Option<OwnedFd>)>, Error> {
        let Some(frame) = self.next_frame(timeout)? else { return Ok(None) };
        let reply: Reply = buildlock_proto::decode(&frame).map_err(|e| Error::Protocol(e.to_string()))?;
        let fd = match &reply {
            Reply::Granted { fd_attached: true, .. } => Some(self.fds.pop_front().ok_or_else(|| {
                Error::Protocol("buildlockd said it sent a lock descriptor, but none arrived".into())
            })?),
            _ => None,
        };
        Ok(Some((reply, fd)))
    }

    fn next_frame(&mut self, timeout: Option<Duration>) -> Result<Option<Vec<u8>>, Error> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(frame) = self.decoder.next_frame().map_err(|e| Error::Protocol(e.to_string()))? {
                return Ok(Some(frame));
            }
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Ok(None),
                },
                None => None,
            };
            self.stream.set_read_timeout(left).map_err(|e| Error::Protocol(e.to_string()))?;
            let mut fds = Vec::new();
            let got = buildlock_sys::ipc::recv_with_fds(self.stream.as_fd(), &mut self.buf, &mut fds);
            self.fds.extend(fds);
            match got {
                Ok(0) => return Err(Error::Protocol("buildlockd closed the connection".into())),
                Ok(n) => self.decoder.push(&self.buf[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Protocol(format!("lost the connection to buildlockd: {e}"))),
            }
        }
    }
}

/// Connects to the daemon, starting it first if none runs (`autostart`).
///
/// A daemon on its way out (idle exit, `daemon stop`) closes connections before their
/// handshake, and then its socket: this waits for it to go and starts (or, without
/// `autostart`, looks for) the next one, rather than giving up on the daemon. The same when a
/// daemon just started says another one runs (a rival won the race, or one is exiting).
pub(crate) fn connect_or_start(runtime_dir: &Path, autostart: bool) -> Result<Client, String> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    // When a daemon was last started: a rival's answer ("running") is given a moment to start
    // listening (or, if it is exiting, to go) before another start is tried.
    let mut started: Option<Instant> = None;
    loop {
        match Client::connect(runtime_dir) {
            Ok(c) => return Ok(c),
            Err(ConnectError::NotRunning(e)) if autostart => {
                // A service manager owns the socket: starting our own daemon would fight it.
                let marker = runtime_dir.join(buildlock_proto::transport::MANAGED_MARKER);
                if let Ok(manager) = std::fs::read_to_string(&marker) {
                    let manager = manager.trim();
                    let how = match manager {
                        "systemd" => "systemctl --user start buildlockd.socket",
                        "launchd" => "launchctl kickstart gui/$(id -u)/dev.buildlock.buildlockd",
                        _ => "start it with your service manager",
                    };
                    return Err(format!(
                        "buildlockd is managed by {manager} ({}) but its socket does not answer ({e}); run `{how}`, \
                         or `buildlock-client daemon uninstall` to let clients start it on demand",
                        marker.display()
                    ));
                }
                if Instant::now() >= deadline {
                    return Err(format!("started buildlockd but cannot connect: {e}"));
                }
                if started.is_none_or(|t| t.elapsed() >= RESTART_AFTER) {
                    tracing::debug!("no daemon listening ({e}); starting one");
                    // Ours is listening when this returns. When a rival won the race
                    // ("running"), the winner may not be listening yet, or may be a daemon
                    // on its way out that still holds the instance lock.
                    start_daemon(runtime_dir)?;
                    started = Some(Instant::now());
                } else {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
            }
            Err(ConnectError::Closing(e)) if Instant::now() < deadline => {
                tracing::debug!("buildlockd is closing ({e}); waiting for the next one");
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) if started.is_some() => return Err(format!("started buildlockd but cannot connect: {e}")),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The `buildlockd` to start: `$BUILDLOCKD`, else the one beside this executable, else `PATH`.
pub fn daemon_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("BUILDLOCKD").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(beside) = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("buildlockd"))) {
        if beside.is_file() {
            return beside;
        }
    }
    PathBuf::from("buildlockd")
}

/// Starts a daemon for `runtime_dir` in the background and waits until it listens. Its stderr
/// goes to `<runtime dir>/buildlockd.log`; it inherits nothing else of ours.
fn start_daemon(runtime_dir: &Path) -> Result<(), String> {
    buildlock_sys::ipc::ensure_private_dir(runtime_dir)?;
    let log_path = runtime_dir.join("buildlockd.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let bin = daemon_binary();
    let mut child = Command::new(&bin)
        .arg("--runtime-dir")
        .arg(runtime_dir)
        .arg("--daemonize")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .env_remove("BUILDLOCK_LOG")
        .spawn()
        .map_err(|e| {
            format!("cannot start {}: {e} (install buildlockd or set BUILDLOCKD to its path)", bin.display())
        })?;
    // The foreground process prints one line ("ready ..." or "running ...") and exits; the
    // daemon itself lives on in the background. Read that line with a deadline.
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = io::BufRead::read_line(&mut io::BufReader::new(stdout), &mut line);
        let _ = tx.send(line);
    });
    let line = match rx.recv_timeout(START_TIMEOUT) {
        Ok(line) => line,
        Err(_) => {
            let _ = child.kill();
            String::new()
        }
    };
    let status = child.wait().map_err(|e| e.to_string())?;
    if line.starts_with("ready") || line.starts_with("running") {
        return Ok(());
    }
    Err(format!("{} did not start ({status}); see {}", bin.display(), log_path.display()))
}
