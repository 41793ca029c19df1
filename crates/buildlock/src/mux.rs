//! One connection to the daemon per process, shared by all its threads and leases.
//!
//! Every lease of a process rides on one connection (per runtime directory), made lazily by the
//! first acquisition, verified as strictly as any (`Client::connect`), and kept while the
//! process lives: its death closes the connection, and the daemon releases all its leases at
//! once. Leases are named by an id this process gives them (`LeaseRef`, protocol 3).
//!
//! Threads write requests under a mutex; one reader thread per connection reads every reply and
//! routes it, with the descriptor that came with it, to the mailbox of the thread waiting for
//! that lease. A reply nobody waits for (the answer to a pipelined `Release` or `Bind`) is
//! dropped, and logged if it is an error. A waiter never holds a lock another thread needs to
//! send, so a thread blocked on a busy lock holds up nobody's release. When the connection
//! breaks (the daemon died), every waiter is woken with the reason, and the next acquisition
//! makes a new connection.
//!
//! **Fork.** A connection belongs to the process that made it. A forked child never writes on
//! its parent's connection ([`Mux::send`] refuses it): the child's own acquisitions make a
//! connection of their own, and the parent's leases, copied into the child's memory, do nothing
//! on the wire there.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use buildlock_proto::{FrameDecoder, LeaseRef, Reply, Request};

use crate::client::Client;
use crate::Error;

/// A reply and the descriptor that came with it.
pub(crate) type Delivery = (Reply, Option<OwnedFd>);

/// A process's connection to the daemon of one runtime directory.
#[derive(Debug)]
pub(crate) struct Mux {
    /// The process that made it: only it may write on it.
    pid: u32,
    runtime_dir: PathBuf,
    writer: Mutex<UnixStream>,
    routes: Mutex<Routes>,
    next_id: AtomicU64,
}

#[derive(Debug, Default)]
struct Routes {
    /// Replies for the leases a thread waits on, each with the condition variable its thread
    /// sleeps on (so that a reply wakes only the thread it is for).
    mailboxes: HashMap<LeaseRef, Mailbox>,
    /// Why the connection is over, once it is.
    broken: Option<String>,
}

#[derive(Debug, Default)]
struct Mailbox {
    replies: VecDeque<Delivery>,
    wake: Arc<Condvar>,
}

/// Every connection this process made, one per runtime directory.
static MUXES: Mutex<Vec<Arc<Mux>>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Mux {
    /// This process's connection to the daemon of `runtime_dir`, made (and the daemon started,
    /// if `autostart`) when there is none yet, or when the last one broke or was the parent's.
    pub(crate) fn get(runtime_dir: &Path, autostart: bool) -> Result<Arc<Mux>, String> {
        let me = buildlock_sys::ipc::current_pid();
        let mut all = lock(&MUXES);
        // The parent's connections (after fork) and broken ones are forgotten here, never
        // closed: the parent's still belongs to the parent.
        all.retain(|m| m.pid == me && !m.is_broken());
        if let Some(m) = all.iter().find(|m| m.runtime_dir == runtime_dir) {
            return Ok(m.clone());
        }
        let client = crate::client::connect_or_start(runtime_dir, autostart)?;
        let mux = Mux::start(client, runtime_dir, me).map_err(|e| format!("cannot use the connection: {e}"))?;
        all.push(mux.clone());
        Ok(mux)
    }

    fn start(client: Client, runtime_dir: &Path, pid: u32) -> io::Result<Arc<Mux>> {
        let (stream, decoder, fds) = client.into_parts();
        let reader = stream.try_clone()?;
        reader.set_read_timeout(None)?;
        let mux = Arc::new(Mux {
            pid,
            runtime_dir: runtime_dir.to_owned(),
            writer: Mutex::new(stream),
            routes: Mutex::new(Routes::default()),
            next_id: AtomicU64::new(1),
        });
        let weak = Arc::downgrade(&mux);
        std::thread::Builder::new()
            .name("buildlockd-reader".into())
            .stack_size(64 * 1024)
            .spawn(move || read_loop(weak, reader, decoder, fds))?;
        Ok(mux)
    }

    /// Whether this process made the connection (false in a forked child).
    pub(crate) fn is_mine(&self) -> bool {
        self.pid == buildlock_sys::ipc::current_pid()
    }

    /// Whether the connection is over (the daemon closed it, died, or it broke).
    pub(crate) fn is_broken(&self) -> bool {
        lock(&self.routes).broken.is_some()
    }

    /// Whether the daemon has gone: the connection broke, or the socket says the peer closed.
    pub(crate) fn daemon_gone(&self) -> bool {
        self.is_broken() || buildlock_sys::ipc::peer_closed(lock(&self.writer).as_fd())
    }

    /// A new lease id, unique on this connection.
    pub(crate) fn next_id(&self) -> LeaseRef {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends one request. Refused in a forked child, and once the connection is broken.
    pub(crate) fn send(&self, req: &Request) -> Result<(), Error> {
        if !self.is_mine() {
            return Err(Error::Protocol(
                "this connection to buildlockd belongs to the parent process (this one was forked from it)".into(),
            ));
        }
        if let Some(why) = &lock(&self.routes).broken {
            return Err(Error::Protocol(why.clone()));
        }
        let bytes = buildlock_proto::encode(req).map_err(|e| Error::Protocol(e.to_string()))?;
        lock(&self.writer).write_all(&bytes).map_err(|e| {
            // The daemon is gone: say so to every waiter now, and let the next acquisition make
            // a new connection, rather than wait for the reader to see the end of the stream.
            let why = format!("cannot send to buildlockd: {e}");
            self.mark_broken(why.clone());
            Error::Protocol(why)
        })
    }

    /// Starts collecting the replies about lease `id` for the calling thread; they are kept
    /// until the returned guard is dropped.
    pub(crate) fn listen(self: &Arc<Self>, id: LeaseRef) -> Listener {
        lock(&self.routes).mailboxes.entry(id).or_default();
        Listener { mux: self.clone(), id }
    }

    fn mark_broken(&self, why: String) {
        let mut routes = lock(&self.routes);
        if routes.broken.is_none() {
            routes.broken = Some(why);
        }
        for mailbox in routes.mailboxes.values() {
            mailbox.wake.notify_one();
        }
    }
}

/// The replies about one lease, for the thread that waits for them.
pub(crate) struct Listener {
    mux: Arc<Mux>,
    id: LeaseRef,
}

impl Listener {
    /// The next reply about the lease; `Ok(None)` if `timeout` passed first; an error once the
    /// connection is broken.
    pub(crate) fn recv(&self, timeout: Option<Duration>) -> Result<Option<Delivery>, Error> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut routes = lock(&self.mux.routes);
        loop {
            let broken = routes.broken.clone();
            let mailbox = routes.mailboxes.entry(self.id).or_default();
            if let Some(d) = mailbox.replies.pop_front() {
                return Ok(Some(d));
            }
            if let Some(why) = broken {
                return Err(Error::Protocol(why));
            }
            let wake = mailbox.wake.clone();
            routes = match deadline {
                None => wake.wait(routes).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let Some(left) = d.checked_duration_since(Instant::now()).filter(|l| !l.is_zero()) else {
                        return Ok(None);
                    };
                    wake.wait_timeout(routes, left).unwrap_or_else(|e| e.into_inner()).0
                }
            };
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // What is left (a late reply) is dropped with it, descriptors closed.
        lock(&self.mux.routes).mailboxes.remove(&self.id);
    }
}

/// The lease a reply is about, 0 for none.
fn lease_of(reply: &Reply) -> LeaseRef {
    match reply {
        Reply::Granted { lease, .. }
        | Reply::Waiting { lease, .. }
        | Reply::Released { lease, .. }
        | Reply::LeaseLost { lease, .. }
        | Reply::Bound { lease, .. } => *lease,
        Reply::Error(e) => e.lease,
        Reply::Status { .. } | Reply::DaemonStatus(_) | Reply::ShuttingDown => 0,
    }
}

/// The reader thread: every reply to its lease's mailbox, until the connection ends. It holds
/// only a weak reference, so it never keeps a connection alive on its own; its copy of the
/// socket closes when it ends.
fn read_loop(mux: std::sync::Weak<Mux>, stream: UnixStream, mut decoder: FrameDecoder, mut fds: VecDeque<OwnedFd>) {
    let mut buf = vec![0u8; 16 * 1024];
    let why = loop {
        let frame = match decoder.next_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                let mut got = Vec::new();
                match buildlock_sys::ipc::recv_with_fds(stream.as_fd(), &mut buf, &mut got) {
                    Ok(0) => break "buildlockd closed the connection".to_owned(),
                    Ok(n) => {
                        fds.extend(got);
                        decoder.push(&buf[..n]);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => break format!("lost the connection to buildlockd: {e}"),
                }
            }
            Err(e) => break format!("buildlockd sent a bad frame: {e}"),
        };
        let reply: Reply = match buildlock_proto::decode(&frame) {
            Ok(r) => r,
            Err(e) => break format!("buildlockd sent a reply this client cannot read: {e}"),
        };
        let fd = match &reply {
            Reply::Granted { fd_attached: true, .. } => match fds.pop_front() {
                Some(fd) => Some(fd),
                None => break "buildlockd said it sent a lock descriptor, but none arrived".to_owned(),
            },
            _ => None,
        };
        let Some(mux) = mux.upgrade() else { return };
        let id = lease_of(&reply);
        let mut routes = lock(&mux.routes);
        match routes.mailboxes.get_mut(&id) {
            Some(mailbox) if id != 0 => {
                mailbox.replies.push_back((reply, fd));
                mailbox.wake.notify_one();
            }
            // The answer to a pipelined request: nobody waits for it.
            _ => match reply {
                Reply::Error(e) => tracing::warn!("buildlockd: {}", e.message),
                other => tracing::debug!("buildlockd answered {other:?}"),
            },
        }
    };
    tracing::debug!("{why}");
    if let Some(mux) = mux.upgrade() {
        mux.mark_broken(why);
    }
}
