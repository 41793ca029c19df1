//! One connection to the daemon per process, shared by all its threads and leases.
//!
//! Every lease of a process rides on one connection (per runtime directory), made lazily by the
//! first acquisition, verified as strictly as any (`Client::connect`), and kept while the
//! process lives: its death closes the connection, and the daemon releases all its leases at
//! once. Leases are named by an id this process gives them (`LeaseRef`, protocol 3).
//!
//! Threads write requests under a mutex. Replies are read by the threads waiting for them, one at
//! a time (leader/followers, no thread of our own): the first waiter takes the reading role,
//! reads what arrives and routes each reply, with the descriptor that came with it, to the
//! mailbox of the lease it names, waking that lease's thread; when its own reply has come it
//! hands the role to another waiter. So a lone thread reads its own answer with no thread hop,
//! and a thread blocked on a busy lock reads for everyone meanwhile. A reply nobody waits for
//! (the answer to a pipelined `Release` or `Bind`) is dropped when read, and logged if it is an
//! error. No lock another thread needs to send is held while reading, so a waiter holds up
//! nobody's release. When the connection breaks (the daemon died), every waiter is woken with
//! the reason, and the next acquisition makes a new connection.
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
    /// What the thread in the reading role uses (see `Routes::reading`): never contended.
    reader: Mutex<ReadState>,
    routes: Mutex<Routes>,
    next_id: AtomicU64,
}

#[derive(Debug)]
struct ReadState {
    stream: UnixStream,
    decoder: FrameDecoder,
    fds: VecDeque<OwnedFd>,
    buf: Vec<u8>,
}

#[derive(Debug, Default)]
struct Routes {
    /// Replies for the leases a thread waits on, each with the condition variable its thread
    /// sleeps on (so that a reply wakes only the thread it is for).
    mailboxes: HashMap<LeaseRef, Mailbox>,
    /// Why the connection is over, once it is.
    broken: Option<String>,
    /// A waiting thread is reading the socket; the others sleep until their reply is routed
    /// to them or the role is free.
    reading: bool,
    /// Leases the daemon said were lost (`Reply::LeaseLost`, unsolicited), with why, until
    /// they are released.
    lost: HashMap<LeaseRef, String>,
}

#[derive(Debug, Default)]
struct Mailbox {
    replies: VecDeque<Delivery>,
    wake: Arc<Condvar>,
    /// Its thread sleeps on `wake` (so it can be handed the reading role).
    sleeping: bool,
}

/// How long one read blocks before its reader looks at its own deadline again.
const READ_SLICE: Duration = Duration::from_secs(1);

/// Every connection this process made, one per runtime directory.
static MUXES: Mutex<Vec<Arc<Mux>>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Mux {
    /// This process's connection to the daemon of `runtime_dir`, made (and the daemon started,
    /// if `autostart`) when there is none yet, or when the last one broke or was the parent's.
    pub(crate) fn get(runtime_dir: &Path, autostart: bool) -> Result<Arc<Mux>, String> {
        let me = buildlock_sys::current_pid();
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
        reader.set_read_timeout(Some(READ_SLICE))?;
        Ok(Arc::new(Mux {
            pid,
            runtime_dir: runtime_dir.to_owned(),
            writer: Mutex::new(stream),
            reader: Mutex::new(ReadState { stream: reader, decoder, fds, buf: vec![0u8; 16 * 1024] }),
            routes: Mutex::new(Routes::default()),
            next_id: AtomicU64::new(1),
        }))
    }

    /// A new descriptor of the connection (close-on-exec), for a command to inherit: the daemon
    /// sees the connection end only once every copy is closed.
    pub(crate) fn connection_copy(&self) -> io::Result<std::fs::File> {
        let copy = lock(&self.writer).try_clone()?;
        Ok(std::fs::File::from(std::os::fd::OwnedFd::from(copy)))
    }

    /// Whether this process made the connection (false in a forked child).
    pub(crate) fn is_mine(&self) -> bool {
        self.pid == buildlock_sys::current_pid()
    }

    /// Whether the connection is over (the daemon closed it, died, or it broke).
    pub(crate) fn is_broken(&self) -> bool {
        lock(&self.routes).broken.is_some()
    }

    /// Whether the daemon has gone: the connection broke, or the socket says the peer closed.
    pub(crate) fn daemon_gone(&self) -> bool {
        self.is_broken() || buildlock_sys::ipc::peer_closed(lock(&self.writer).as_fd())
    }

    /// Whether the daemon said lease `id` was lost (`Reply::LeaseLost`), or the connection is
    /// over: `Some(why)`. Reads what the daemon sent meanwhile, without blocking (unless another
    /// thread is reading already, which routes it), so a holder that polls sees a loss at once.
    pub(crate) fn poll_lost(&self, id: LeaseRef) -> Option<String> {
        let mut routes = lock(&self.routes);
        if !routes.reading && !routes.lost.contains_key(&id) && routes.broken.is_none() {
            routes.reading = true;
            drop(routes);
            let ready = {
                let rs = lock(&self.reader);
                // Whole frames read earlier were routed then: only new bytes can say anything.
                buildlock_sys::ipc::wait_readable(&[rs.stream.as_fd()], Some(Duration::ZERO)).is_ok_and(|r| r.is_some())
            };
            let got = if ready { Some(self.read_some()) } else { None };
            routes = lock(&self.routes);
            routes.reading = false;
            match got {
                Some(Ok(deliveries)) => route(&mut routes, deliveries),
                Some(Err(why)) => Self::break_routes(&mut routes, why),
                None => {}
            }
            hand_over(&routes, id);
        }
        if let Some(why) = routes.lost.get(&id) {
            return Some(why.clone());
        }
        routes
            .broken
            .as_ref()
            .map(|why| format!("the connection to buildlockd, which held the server session, is gone ({why})"))
    }

    /// Whether the daemon said lease `id` was lost (`Reply::LeaseLost`), as read so far.
    pub(crate) fn told_lost(&self, id: LeaseRef) -> bool {
        lock(&self.routes).lost.contains_key(&id)
    }

    /// Forgets what was recorded about lease `id` (it is released).
    pub(crate) fn forget(&self, id: LeaseRef) {
        lock(&self.routes).lost.remove(&id);
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
        Self::break_routes(&mut routes, why);
    }

    fn break_routes(routes: &mut Routes, why: String) {
        if routes.broken.is_none() {
            routes.broken = Some(why);
        }
        for mailbox in routes.mailboxes.values() {
            mailbox.wake.notify_one();
        }
    }

    /// Reads once from the socket (blocking up to `READ_SLICE`) and routes every whole reply
    /// read. Called only by the thread in the reading role, without the routes lock.
    fn read_some(&self) -> Result<Vec<Delivery>, String> {
        let mut rs = lock(&self.reader);
        let rs = &mut *rs;
        let mut out = Vec::new();
        loop {
            match rs.decoder.next_frame() {
                Ok(Some(frame)) => {
                    let reply: Reply = buildlock_proto::decode(&frame)
                        .map_err(|e| format!("buildlockd sent a reply this client cannot read: {e}"))?;
                    let fd =
                        match &reply {
                            Reply::Granted { fd_attached: true, .. } => Some(rs.fds.pop_front().ok_or_else(|| {
                                "buildlockd said it sent a lock descriptor, but none arrived".to_owned()
                            })?),
                            _ => None,
                        };
                    out.push((reply, fd));
                    continue;
                }
                Ok(None) if !out.is_empty() => return Ok(out),
                Ok(None) => {}
                Err(e) => return Err(format!("buildlockd sent a bad frame: {e}")),
            }
            let mut got = Vec::new();
            match buildlock_sys::ipc::recv_with_fds(rs.stream.as_fd(), &mut rs.buf, &mut got) {
                Ok(0) => return Err("buildlockd closed the connection".to_owned()),
                Ok(n) => {
                    rs.fds.extend(got);
                    rs.decoder.push(&rs.buf[..n]);
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Ok(out),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("lost the connection to buildlockd: {e}")),
            }
        }
    }
}

/// Puts each reply in the mailbox of the lease it names, waking that lease's thread; a reply
/// nobody waits for is dropped (an error logged).
fn route(routes: &mut Routes, deliveries: Vec<Delivery>) {
    for (reply, fd) in deliveries {
        let id = lease_of(&reply);
        if let Reply::LeaseLost { reason, .. } = &reply {
            routes.lost.insert(id, reason.clone());
        }
        match routes.mailboxes.get_mut(&id) {
            Some(mailbox) if id != 0 => {
                mailbox.replies.push_back((reply, fd));
                // Its thread, if asleep; awake, it looks at its mailbox before it sleeps (the
                // flag is set and cleared under the routes lock), so no wake-up is lost and
                // the reading thread's own replies cost no futex call.
                if mailbox.sleeping {
                    mailbox.wake.notify_one();
                }
            }
            // The answer to a pipelined request: nobody waits for it.
            _ => match reply {
                Reply::Error(e) => tracing::warn!("buildlockd: {}", e.message),
                other => tracing::debug!("buildlockd answered {other:?}"),
            },
        }
    }
}

/// Offers the free reading role to one sleeping waiter other than `me`.
fn hand_over(routes: &Routes, me: LeaseRef) {
    if routes.reading {
        return;
    }
    if let Some(m) = routes.mailboxes.iter().find(|(id, m)| **id != me && m.sleeping).map(|(_, m)| m) {
        m.wake.notify_one();
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
        let result = loop {
            let broken = routes.broken.clone();
            let mailbox = routes.mailboxes.entry(self.id).or_default();
            if let Some(d) = mailbox.replies.pop_front() {
                break Ok(Some(d));
            }
            if let Some(why) = broken {
                break Err(Error::Protocol(why));
            }
            let left = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(Instant::now()).filter(|l| !l.is_zero()) {
                    Some(left) => Some(left),
                    None => break Ok(None),
                },
            };
            if !routes.reading {
                // Our turn to read, for everyone.
                routes.reading = true;
                drop(routes);
                let got = self.mux.read_some();
                routes = lock(&self.mux.routes);
                routes.reading = false;
                match got {
                    Ok(deliveries) => route(&mut routes, deliveries),
                    Err(why) => Mux::break_routes(&mut routes, why),
                }
                continue;
            }
            let mailbox = routes.mailboxes.entry(self.id).or_default();
            let wake = mailbox.wake.clone();
            mailbox.sleeping = true;
            routes = match left {
                None => wake.wait(routes).unwrap_or_else(|e| e.into_inner()),
                Some(left) => wake.wait_timeout(routes, left).unwrap_or_else(|e| e.into_inner()).0,
            };
            if let Some(m) = routes.mailboxes.get_mut(&self.id) {
                m.sleeping = false;
            }
        };
        // Leaving: whoever still waits may read now.
        hand_over(&routes, self.id);
        result
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

#[cfg(test)]
mod tests {
    use super::*;
    use buildlock_proto::{ErrorCode, ErrorReply};

    fn granted(lease: LeaseRef) -> Reply {
        Reply::Granted { lease, path: "/l.lock".into(), token: 1, fd_attached: false, file: None }
    }

    #[test]
    fn each_reply_goes_to_the_mailbox_of_the_lease_it_names_and_others_are_dropped() {
        let mut routes = Routes::default();
        routes.mailboxes.insert(1, Mailbox::default());
        routes.mailboxes.insert(2, Mailbox::default());
        let error = Reply::Error(ErrorReply { code: ErrorCode::NotHeld, message: "m".into(), holder: None, lease: 9 });
        let released = Reply::Released { lease: 0, path: "/l.lock".into() };
        route(&mut routes, vec![(granted(2), None), (error, None), (granted(1), None), (released, None)]);
        let ids = |id: LeaseRef| routes.mailboxes[&id].replies.iter().map(|(r, _)| lease_of(r)).collect::<Vec<_>>();
        assert_eq!(ids(1), [1]);
        assert_eq!(ids(2), [2]);
        assert_eq!(routes.mailboxes.len(), 2, "no mailbox is made for a reply nobody waits for");
    }

    #[test]
    fn an_unsolicited_lease_lost_is_recorded_for_a_lease_nobody_waits_on() {
        let mut routes = Routes::default();
        let lost = Reply::LeaseLost { lease: 4, path: "deploy".into(), reason: "server restarted".into() };
        route(&mut routes, vec![(lost, None), (granted(5), None)]);
        assert_eq!(routes.lost.get(&4).map(String::as_str), Some("server restarted"));
        assert!(!routes.lost.contains_key(&5));
    }
}
