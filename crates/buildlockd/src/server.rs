//! The accept loop, the deadline timer, idle exit and shutdown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::net::UnixListener;
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
    stopping: AtomicBool,
    stop: Notify,
}

impl Daemon {
    pub fn new(config: Config) -> Arc<Daemon> {
        let state = State::new();
        let journal = crate::journal::Journal::new(&config.runtime_dir);
        Arc::new(Daemon {
            journal,
            config,
            started: SystemTime::now(),
            state: Mutex::new(state),
            timer: Notify::new(),
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
        })
    }

    /// Asks the daemon to stop (from a request, a signal or idleness).
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stop.notify_waiters();
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
                Ok((stream, _)) => {
                    tokio::spawn(crate::conn::handle(daemon.clone(), stream));
                }
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
        if daemon.idle_for(idle) {
            tracing::info!("idle for {}s: exiting", idle.as_secs());
            daemon.shutdown();
            return;
        }
    }
}
