//! The blocking facade for the library and the CLI: [`acquire`] returns a [`Lease`] whose
//! session lives on a thread of its own (a current-thread runtime) that checks in with the
//! server every quarter of the remote timeout and records at once when the connection is lost.

use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::engine::{Engine, EngineSession};
use crate::{Error, Holder, LockEntry, Request};

/// A lock held on the server. Dropping it releases it; [`Lease::release`] does too and reports
/// problems.
#[derive(Debug)]
pub struct Lease {
    name: String,
    server: String,
    token: u64,
    lost: Arc<Mutex<Option<String>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), Error>>>,
    socket: Option<File>,
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Settings(format!("cannot start the remote backend's runtime: {e}")))
}

/// Takes lock `req.name` on the server `engine`; `on_wait` is called about once a second
/// while waiting, with the holder and the time waited.
pub fn acquire(engine: &dyn Engine, req: &Request, on_wait: &mut dyn FnMut(&Holder, Duration)) -> Result<Lease, Error> {
    let rt = runtime()?;
    let started = Instant::now();
    let (session, token) = rt
        .block_on(async {
            let mut session = engine.connect().await?;
            // The engine's future is `Send`, `on_wait` need not be: holders come over a channel
            // and `on_wait` is called here, each before the wait goes on.
            let (tx, mut rx) = mpsc::unbounded_channel();
            let mut send = move |h: &Holder| drop(tx.send(h.clone()));
            let token = {
                let acquired = session.acquire(req, &mut send);
                tokio::pin!(acquired);
                loop {
                    tokio::select! {
                        biased;
                        Some(h) = rx.recv() => on_wait(&h, started.elapsed()),
                        r = &mut acquired => break r,
                    }
                }
            }?;
            Ok::<_, Error>((session, token))
        })
        .map_err(|e| match e {
            // Nothing was held yet: the connection ended while connecting or waiting.
            Error::Lost { server, why, .. } => {
                Error::Server { server, why: format!("{why}; lock {} was not taken, try again", req.name) }
            }
            other => other,
        })?;
    let socket = session
        .socket()
        .map(File::try_clone)
        .transpose()
        .map_err(|e| Error::Settings(format!("cannot duplicate the server connection's socket: {e}")))?;
    let lost = Arc::new(Mutex::new(None));
    let (stop, stopped) = oneshot::channel();
    let name = req.name.clone();
    let every = engine.heartbeat();
    let thread = {
        let (lost, name) = (lost.clone(), name.clone());
        std::thread::Builder::new()
            .name("buildlock-remote".into())
            .spawn(move || rt.block_on(keep(session, name, every, stopped, lost)))
            .map_err(|e| Error::Settings(format!("cannot start the remote lease's thread: {e}")))?
    };
    Ok(Lease { name, server: engine.display(), token, lost, stop: Some(stop), thread: Some(thread), socket })
}

/// Holds the lock until told to release it, checking in every `every` with a deadline of
/// `every`; a lost connection is recorded in `lost` the moment it is seen.
async fn keep(
    mut session: Box<dyn EngineSession>,
    name: String,
    every: Duration,
    mut stop: oneshot::Receiver<()>,
    lost: Arc<Mutex<Option<String>>>,
) -> Result<(), Error> {
    let mut closed = session.closed();
    let record = |why: String| {
        tracing::debug!("remote lock {name} lost: {why}");
        *lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    };
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = closed.changed() => {
                let why = closed.borrow().clone().unwrap_or_else(|| "the connection ended".into());
                record(why);
                // Wait for the release (which reports the loss) without checking in again.
                let _ = (&mut stop).await;
                return Ok(());
            }
            _ = tokio::time::sleep(every) => {
                match tokio::time::timeout(every, session.heartbeat()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        record(format!("checking in failed: {e}"));
                        let _ = (&mut stop).await;
                        return Ok(());
                    }
                    Err(_) => {
                        record(format!(
                            "the server did not answer within {}s (network cut off, or the server hangs)",
                            every.as_secs_f64()
                        ));
                        let _ = (&mut stop).await;
                        return Ok(());
                    }
                }
            }
        }
    }
    let released = session.release().await;
    session.close().await;
    released
}

impl Lease {
    /// The fencing token: larger than that of every earlier exclusive holder of this lock on
    /// this server, from any host; shared holders get the current value.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The server, as users see it (`postgres://host:port/db`).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// A duplicate of the server connection's socket, for a command to inherit: the session
    /// (and so the lock) then lasts while any copy is open, even if this process is killed.
    /// `None` for an engine whose sessions a socket alone does not keep alive.
    pub fn socket(&self) -> Option<&File> {
        self.socket.as_ref()
    }

    /// `Err(Error::Lost)` once the connection to the server was seen to break.
    pub fn check(&self) -> Result<(), Error> {
        match &*self.lost.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(why) => Err(Error::Lost { lock: self.name.clone(), server: self.server.clone(), why: why.clone() }),
            None => Ok(()),
        }
    }

    /// Releases the lock; reports if it was lost while held.
    pub fn release(mut self) -> Result<(), Error> {
        self.release_inner()
    }

    fn release_inner(&mut self) -> Result<(), Error> {
        let Some(thread) = self.thread.take() else { return Ok(()) };
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let released = thread.join().unwrap_or_else(|_| {
            Err(Error::Lost {
                lock: self.name.clone(),
                server: self.server.clone(),
                why: "the thread that kept the session panicked".into(),
            })
        });
        self.check()?;
        released.map_err(|e| match e {
            Error::Lost { lock, server, why } if lock.is_empty() => {
                Error::Lost { lock: self.name.clone(), server, why }
            }
            other => other,
        })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Err(e) = self.release_inner() {
            tracing::error!("{e}");
        }
    }
}

/// Holders and waiters of every remote lock (or of `name`) on the server, from every host.
pub fn status(engine: &dyn Engine, name: Option<&str>) -> Result<Vec<LockEntry>, Error> {
    runtime()?.block_on(async { engine.connect().await?.status(name).await })
}
