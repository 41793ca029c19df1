//! The accept loop (with admission: the connection limit, and no new connection once
//! stopping), the deadline timer, idle exit and shutdown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use buildlock_proto::{FrameDecoder, Welcome};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

use crate::state::State;
use crate::Config;

/// The running daemon: its configuration and shared state.
pub struct Daemon {
    pub(crate) config: Config,
    pub(crate) started: SystemTime,
    pub(crate) state: Mutex<State>,
    /// Bound leases, for recovery after a double crash (see `journal`).
    pub(crate) journal: crate::journal::Journal,
    /// Woken when the queue's next deadline may have changed.
    pub(crate) timer: Notify,
    /// Itself, for the state guard, which carries out the grants decided under the lock once
    /// it is released (`state::StateGuard`).
    pub(crate) me: std::sync::Weak<Daemon>,
    /// Idle server sessions of remote leases, kept for the next lease on the same server.
    pub(crate) pool: Arc<crate::pool::Pool>,
    stopping: AtomicBool,
    stop: Notify,
}

impl Daemon {
    pub fn new(config: Config) -> Arc<Daemon> {
        crate::state::start_history();
        let state = State::new();
        let journal = crate::journal::Journal::new(&config.runtime_dir);
        Arc::new_cyclic(|me| Daemon {
            me: me.clone(),
            journal,
            config,
            started: SystemTime::now(),
            state: Mutex::new(state),
            timer: Notify::new(),
            pool: Default::default(),
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
        })
    }

    /// Asks the daemon to stop (from a request, a signal or idleness). Takes no lock, so a
    /// signal stops the daemon whatever else is stuck.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stop.notify_waiters();
    }

    /// Counts a just-accepted connection, from before its handshake until it closes, or says
    /// why it is not served: the daemon is stopping (`None`: close it, its client will start the
    /// next daemon) or the connection limit is reached (`Some(message)` for the client).
    fn admit(self: &Arc<Self>) -> Result<ConnSlot, Option<String>> {
        let mut st = self.state();
        if self.stopping.load(Ordering::SeqCst) {
            return Err(None);
        }
        let max = self.config.limits.max_connections;
        if st.live_conns >= max {
            let msg = format!(
                "buildlockd already serves {max} connections for this user (its limit): close some clients, or \
                 raise the limit with `buildlockd --max-connections N` (BUILDLOCKD_MAX_CONNECTIONS) and restart \
                 the daemon (`buildlock-client daemon stop`)"
            );
            tracing::warn!("refused a connection: {msg}");
            return Err(Some(msg));
        }
        st.live_conns += 1;
        st.note_activity();
        Ok(ConnSlot(self.clone()))
    }

    async fn stopped(&self) {
        while !self.stopping.load(Ordering::SeqCst) {
            let notified = self.stop.notified();
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            notified.await;
        }
    }
}

/// Serves connections on `listener` until [`Daemon::shutdown`] is called or the daemon has been
/// idle for `config.idle_exit`. Takes a bound listener so tests can run a daemon in-process.
pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    let timer = tokio::spawn(run_timer(daemon.clone()));
    let idle = daemon.config.idle_exit.map(|idle| tokio::spawn(watch_idle(daemon.clone(), idle)));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match daemon.admit() {
                    Ok(slot) => {
                        let d = daemon.clone();
                        tokio::spawn(async move {
                            crate::conn::handle(d, stream).await;
                            drop(slot);
                        });
                    }
                    // Stopping: closed before the handshake, which its client takes for a
                    // daemon on its way out.
                    Err(None) => drop(stream),
                    Err(Some(msg)) => {
                        tokio::spawn(refuse(stream, msg));
                    }
                },
                Err(e) => {
                    // EMFILE and friends: say so, breathe, keep serving the others.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = daemon.stopped() => break,
        }
    }
    timer.abort();
    if let Some(idle) = idle {
        idle.abort();
    }
}

/// Expires waiters at their deadlines.
async fn run_timer(daemon: Arc<Daemon>) {
    loop {
        let next = daemon.next_deadline();
        let changed = daemon.timer.notified();
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => { daemon.on_timer(); }
                    _ = changed => {}
                }
            }
            None => changed.await,
        }
    }
}

async fn watch_idle(daemon: Arc<Daemon>, idle: Duration) {
    let step = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        tokio::time::sleep(step).await;
        if daemon.stop_if_idle(idle) {
            tracing::info!("idle for {}s: exiting", idle.as_secs());
            return;
        }
    }
}

/// A connection counted from its accept to its close (`State::live_conns`).
struct ConnSlot(Arc<Daemon>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut st = self.0.state();
        st.live_conns -= 1;
        st.note_activity();
    }
}

/// How long a refused connection may take to say hello before it is just closed.
const REFUSE_HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// Answers a connection the daemon will not serve: reads its hello (so that the client is
/// reading when the answer comes, rather than writing into a closed socket), then sends a
/// refusing `Welcome` carrying `msg`, and closes.
async fn refuse(mut stream: UnixStream, msg: String) {
    let mut decoder = FrameDecoder::new();
    let mut buf = [0u8; 512];
    let hello = async {
        loop {
            match decoder.next_frame() {
                Ok(Some(_)) => return true,
                Ok(None) => {}
                Err(_) => return false,
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => decoder.push(&buf[..n]),
            }
        }
    };
    if !matches!(tokio::time::timeout(REFUSE_HELLO_TIMEOUT, hello).await, Ok(true)) {
        return;
    }
    if let Ok(bytes) = buildlock_proto::encode(&Welcome::refused(std::process::id(), msg)) {
        let _ = stream.write_all(&bytes).await;
    }
}
