//! The daemon's shared state and what every request does to it.
//!
//! The queue (`buildlock-queue`) decides whose turn it is; this module carries the decision out:
//! takes the OS lock for the lease (through the lock file's waiter thread, `outside.rs`, when an
//! outside process holds it), writes the holder's metadata, hands the client a duplicate of the
//! locked descriptor, watches bound processes, and releases leases when their connection and
//! process are both gone. It also keeps the books for limits and idle exit.
//!
//! One `std::sync::Mutex` guards it all: every critical section is short and never awaits (the
//! only blocking call, waiting for an outside holder, runs in a waiter thread without it), so an
//! async mutex would only add cost.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use buildlock_disk::{LockTarget, Metadata, OsHold, OsLocked};
use buildlock_proto::{
    AcquireRequest, DaemonInfo, ErrorCode, ErrorReply, Holder, LockInfo, Mode, Reply, Request, WaitFor, Waiter,
};
use buildlock_queue::{Event, LeaseId, OwnerId, Queue, Wait};
use buildlock_sys::LockMode;
use tokio::sync::mpsc;

use crate::server::Daemon;

mod history;
pub(crate) use history::{flush as flush_history, start as start_history};

/// A reply on its way to a connection, with the descriptor that rides on it, if any.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) reply: Reply,
    pub(crate) fd: Option<OwnedFd>,
}

pub(crate) type Tx = mpsc::UnboundedSender<Outgoing>;

pub(crate) struct State {
    queue: Queue<PathBuf>,
    conns: HashMap<OwnerId, ConnEntry>,
    leases: HashMap<LeaseId, Lease>,
    next_owner: OwnerId,
    /// Connections accepted and not yet closed, those still in their handshake included (for
    /// the connection limit and idle exit; `conns` holds only those past the handshake).
    pub(crate) live_conns: usize,
    /// Since when the daemon has had no connection and no lease (bound processes included), for
    /// idle exit; `None` while it has any.
    pub(crate) idle_since: Option<Instant>,
    /// The lock files a waiter thread waits on for an outside holder (`outside.rs`), each with
    /// the leases waiting for it, first come first. An entry exists exactly while its thread
    /// runs.
    pub(crate) outside: HashMap<PathBuf, BTreeSet<LeaseId>>,
}

impl State {
    pub(crate) fn new() -> State {
        State {
            queue: Queue::new(),
            conns: HashMap::new(),
            leases: HashMap::new(),
            next_owner: 0,
            live_conns: 0,
            idle_since: Some(Instant::now()),
            outside: HashMap::new(),
        }
    }

    /// Starts or stops the idle clock after a change: it runs only while there is no
    /// connection (not even one in its handshake) and no lease (not even one kept for a bound
    /// process whose client has gone).
    pub(crate) fn note_activity(&mut self) {
        if self.live_conns > 0 || !self.leases.is_empty() {
            self.idle_since = None;
        } else if self.idle_since.is_none() {
            self.idle_since = Some(Instant::now());
        }
    }

    /// Takes `lease` out of every book (the lease map, its connection's set, the waiter
    /// thread's set), stopping its expiry timer. Not the queue: callers release it there.
    fn remove_lease(&mut self, lease: LeaseId) -> Option<Lease> {
        self.leave_outside(lease);
        let l = self.leases.remove(&lease)?;
        if let Some(c) = self.conns.get_mut(&l.owner) {
            c.leases.remove(&lease);
        }
        Some(l)
    }

    /// A lease stops waiting for an outside holder (given the lock, given up, refused).
    fn leave_outside(&mut self, lease: LeaseId) {
        let Some(l) = self.leases.get_mut(&lease) else { return };
        if let Phase::Outside { expiry } = &mut l.phase {
            if let Some(timer) = expiry.take() {
                timer.abort();
            }
            l.phase = Phase::Locking;
            if let Some(set) = self.outside.get_mut(&l.target.path) {
                set.remove(&lease);
            }
        }
    }
}

struct ConnEntry {
    tx: Tx,
    pid: u32,
    leases: HashSet<LeaseId>,
}

struct Lease {
    target: LockTarget,
    owner: OwnerId,
    /// The process named as the holder: the one the lease was bound to when asked for (a
    /// script's, through `acquire --pid`), else the client's.
    holder_pid: u32,
    mode: Mode,
    operation: String,
    command: String,
    bind_pid: Option<u32>,
    requested: Instant,
    /// How long the client will wait, which also bounds waiting for an outside holder.
    wait: Wait,
    phase: Phase,
    /// Its entry in the journal of bound leases, while it is bound and held.
    journal_key: Option<String>,
}

enum Phase {
    Waiting,
    /// The queue granted it; the OS lock is being taken without waiting, or claimed.
    Locking,
    /// The queue granted it, but a process outside the daemon holds the OS lock: the lock
    /// file's waiter thread gets it for the lease when the kernel says it is free.
    Outside {
        /// Refuses the lease at its deadline.
        expiry: Option<tokio::task::AbortHandle>,
    },
    Held {
        hold: Box<OsHold>,
        conn_open: bool,
        pid_running: bool,
        /// The client released it (rather than died): the lock ends for every copy of the
        /// descriptor, including those its command's background children inherited.
        released: bool,
    },
}

fn lock_mode(m: Mode) -> LockMode {
    match m {
        Mode::Shared => LockMode::Shared,
        Mode::Exclusive => LockMode::Exclusive,
    }
}

fn queue_mode(m: Mode) -> buildlock_queue::Mode {
    match m {
        Mode::Shared => buildlock_queue::Mode::Shared,
        Mode::Exclusive => buildlock_queue::Mode::Exclusive,
    }
}

fn error(code: ErrorCode, message: impl Into<String>, holder: Option<Holder>) -> Reply {
    Reply::Error(ErrorReply { code, message: message.into(), holder })
}

fn unix_ms(t: SystemTime) -> Option<i64> {
    t.duration_since(SystemTime::UNIX_EPOCH).ok().and_then(|d| i64::try_from(d.as_millis()).ok())
}

/// A proto holder from what the on-disk protocol knows (an outside holder).
pub(crate) fn holder_from_disk(h: &buildlock_disk::Holder, outside: bool) -> Holder {
    let m = h.meta.as_ref();
    Holder {
        pid: h.pid(),
        command: h.command.clone(),
        host: m.map(|m| m.hostname.clone()),
        mode: h.mode.or(m.and_then(|m| m.mode)).map(|m| match m {
            LockMode::Shared => Mode::Shared,
            LockMode::Exclusive => Mode::Exclusive,
        }),
        since_unix_ms: h.since().map(|t| t.as_millisecond()),
        operation: m.map(|m| m.operation.clone()),
        token: m.and_then(|m| m.token),
        outside,
        description: if outside { format!("{h} (not a buildlockd client)") } else { h.to_string() },
    }
}

impl Lease {
    /// Who holds this lease, described the way the on-disk protocol describes a holder (so a
    /// waiter reads the same line whether or not the holder goes through the daemon).
    fn holder(&self) -> Holder {
        let (meta, orphaned_by) = match &self.phase {
            // A bound process holds it for a client that is gone: `run` was killed, its command
            // still runs.
            Phase::Held { hold, conn_open: false, pid_running: true, .. } => {
                (hold.metadata().clone(), hold.metadata().via_pid)
            }
            Phase::Held { hold, .. } => (hold.metadata().clone(), None),
            // Granted by the queue, OS lock still being taken: what it will write.
            _ => (self.metadata(), None),
        };
        let disk = buildlock_disk::Holder {
            mode: Some(lock_mode(self.mode)),
            command: Some(self.command.clone()).filter(|c| !c.is_empty()),
            meta: Some(meta),
            orphaned_by,
            ..buildlock_disk::Holder::default()
        };
        holder_from_disk(&disk, false)
    }

    fn metadata(&self) -> Metadata {
        Metadata::for_process(
            buildlock_sys::identify(self.holder_pid),
            lock_mode(self.mode),
            "os",
            &self.operation,
            Some(self.command.clone()),
        )
    }
}

impl Daemon {
    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection from process `pid`; its replies go to `tx`.
    pub(crate) fn register(&self, tx: Tx, pid: u32) -> OwnerId {
        let mut st = self.state();
        st.next_owner += 1;
        let owner = st.next_owner;
        st.conns.insert(owner, ConnEntry { tx, pid, leases: HashSet::new() });
        st.idle_since = None;
        owner
    }

    fn send(st: &State, owner: OwnerId, reply: Reply, fd: Option<OwnedFd>) {
        if let Some(c) = st.conns.get(&owner) {
            let _ = c.tx.send(Outgoing { reply, fd });
        }
    }

    /// Carries out one request from connection `owner`.
    pub(crate) fn handle(self: &Arc<Self>, owner: OwnerId, req: Request) {
        match req {
            Request::Acquire(a) => self.acquire(owner, a),
            Request::Release { path } => self.release(owner, &path),
            Request::ReleasePid { path, pid } => self.release_pid(owner, &path, pid),
            Request::Bind { path, pid } => self.bind(owner, &path, pid),
            Request::Status { path } => {
                let reply = self.status(path.as_deref());
                Self::send(&self.state(), owner, reply, None);
            }
            Request::DaemonStatus => {
                let info = self.info();
                Self::send(&self.state(), owner, Reply::DaemonStatus(info), None);
            }
            Request::Shutdown => {
                Self::send(&self.state(), owner, Reply::ShuttingDown, None);
                tracing::info!("shutting down at the request of a client");
                self.shutdown();
            }
        }
    }

    fn acquire(self: &Arc<Self>, owner: OwnerId, a: AcquireRequest) {
        let target = match validate_path(&a.path) {
            Ok(t) => t,
            Err(msg) => return Self::send(&self.state(), owner, error(ErrorCode::InvalidName, msg, None), None),
        };
        let now = Instant::now();
        let wait = match a.wait {
            WaitFor::NoWait => Wait::NoWait,
            // A deadline past what the clock can represent is as good as none.
            WaitFor::Millis(ms) => {
                now.checked_add(std::time::Duration::from_millis(ms)).map_or(Wait::Forever, Wait::Until)
            }
            WaitFor::Forever => Wait::Forever,
        };
        let mut st = self.state();
        let Some(client_pid) = st.conns.get(&owner).map(|c| c.pid) else { return };
        let max = self.config.limits.max_leases;
        if st.leases.len() >= max {
            let msg = format!(
                "buildlockd already holds or queues {max} leases for this user (its limit), so lock {} was not \
                 queued: release some, or raise the limit with `buildlockd --max-leases N` \
                 (BUILDLOCKD_MAX_LEASES) and restart the daemon (`buildlock-client daemon stop`)",
                a.path
            );
            tracing::warn!("{msg}");
            return Self::send(&st, owner, error(ErrorCode::LimitExceeded, msg, None), None);
        }
        let already = st.leases.values().any(|l| l.owner == owner && l.target.path == target.path);
        if already {
            let msg = format!("this connection already holds or waits for {}; release it first", a.path);
            return Self::send(&st, owner, error(ErrorCode::InvalidRequest, msg, None), None);
        }
        let key = target.path.clone();
        let lease = st.queue.acquire(now, buildlock_queue::Request::new(key, owner, queue_mode(a.mode), wait));
        st.leases.insert(
            lease,
            Lease {
                target,
                owner,
                holder_pid: a.bind_pid.unwrap_or(client_pid),
                mode: a.mode,
                operation: a.operation,
                command: a.command,
                bind_pid: a.bind_pid,
                requested: now,
                wait,
                phase: Phase::Waiting,
                journal_key: None,
            },
        );
        if let Some(c) = st.conns.get_mut(&owner) {
            c.leases.insert(lease);
        }
        self.pump(&mut st);
        // Still queued behind daemon clients: say so, and who holds it.
        if let Some(l) = st.leases.get(&lease) {
            if matches!(l.phase, Phase::Waiting) {
                l.record(buildlock_history::Kind::Requested);
                // 1 = next; 0 is kept for "granted by the queue, waiting for an outside holder".
                let position = st.queue.lease(lease).and_then(|v| v.position).map_or(0, |p| p as u32 + 1);
                let holder = Self::current_holder(&st, &l.target.path);
                let path = l.target.path.display().to_string();
                Self::send(&st, owner, Reply::Waiting { path, position, holder }, None);
            }
        }
    }

    /// The first daemon-client holder of `path`, if any.
    ///
    /// A lease the queue granted whose OS lock is still being taken is not the holder yet:
    /// the kernel says who is (a process outside the daemon, or the children of a killed
    /// `run`'s command, which keep an inherited descriptor).
    fn current_holder(st: &State, path: &Path) -> Option<Holder> {
        let lease = st.queue.holders(&path.to_path_buf()).first().and_then(|v| st.leases.get(&v.id))?;
        match lease.phase {
            Phase::Locking | Phase::Outside { .. } => {
                Some(holder_from_disk(&buildlock_disk::describe_holder(&lease.target), true))
            }
            _ => Some(lease.holder()),
        }
    }

    /// Processes the queue's decisions.
    fn pump(self: &Arc<Self>, st: &mut State) {
        while let Some(ev) = st.queue.poll_event() {
            match ev {
                Event::Granted { lease, .. } => {
                    let Some(l) = st.leases.get_mut(&lease) else { continue };
                    l.phase = Phase::Locking;
                    let (target, mode, meta, wait) = (l.target.clone(), lock_mode(l.mode), l.metadata(), l.wait);
                    let d = self.clone();
                    tokio::spawn(async move { d.lock_and_grant(lease, target, mode, meta, wait) });
                }
                Event::Denied { lease, owner, key } => Self::refuse(st, lease, owner, &key, false),
                Event::Expired { lease, owner, key } => Self::refuse(st, lease, owner, &key, true),
            }
        }
        st.note_activity();
        self.timer.notify_one();
    }

    /// Answers a request that could not wait (`-n`) or waited too long, naming the holder.
    fn refuse(st: &mut State, lease: LeaseId, owner: OwnerId, key: &Path, timed_out: bool) {
        let Some(l) = st.remove_lease(lease) else { return };
        l.record(if timed_out { buildlock_history::Kind::TimedOut } else { buildlock_history::Kind::Busy });
        let holder = Self::current_holder(st, key)
            .unwrap_or_else(|| holder_from_disk(&buildlock_disk::describe_holder(&l.target), true));
        let who = holder.description.clone();
        let reply = if timed_out {
            let waited = buildlock_disk::stale::secs(l.requested.elapsed());
            error(
                ErrorCode::Timeout,
                format!("timed out after {waited} waiting for lock {}, held by {who}", key.display()),
                Some(holder),
            )
        } else {
            error(ErrorCode::WouldBlock, format!("lock {} is held by {who}", key.display()), Some(holder))
        };
        Self::send(st, owner, reply, None);
    }

    /// Takes the OS lock for a lease the queue granted, then hands it to the client. When a
    /// holder outside the daemon (fasteners, direct mode, an inherited descriptor) has it,
    /// `NoWait` is refused at once; anything else waits for the lock file's waiter thread.
    fn lock_and_grant(self: Arc<Self>, lease: LeaseId, target: LockTarget, mode: LockMode, meta: Metadata, wait: Wait) {
        // The non-blocking attempt runs inline: a few tens of microseconds of file system
        // calls, cheaper than a hop to another thread and back.
        let result = match buildlock_disk::try_lock_for(&target, mode, meta) {
            Ok(Some(hold)) => Ok(hold),
            Ok(None) => {
                let outside = holder_from_disk(&buildlock_disk::describe_holder(&target), true);
                let mut st = self.state();
                if wait == Wait::NoWait {
                    return self.refuse_outside(&mut st, lease, &target, outside, false);
                }
                return self.wait_outside(&mut st, lease, &target, wait, outside);
            }
            Err(e) => Err(e),
        };
        self.deliver(lease, result);
    }

    /// Puts a granted lease in line for the OS lock of `target`, which `outside` holds:
    /// starts the file's waiter thread if none runs (within the limit), arms the deadline, and
    /// tells the client who it waits for.
    fn wait_outside(
        self: &Arc<Self>,
        st: &mut State,
        lease: LeaseId,
        target: &LockTarget,
        wait: Wait,
        outside: Holder,
    ) {
        // Gone meanwhile (its client closed): nothing to wait for.
        if !st.leases.get(&lease).is_some_and(|l| matches!(l.phase, Phase::Locking)) {
            return;
        }
        let path = &target.path;
        if !st.outside.contains_key(path) {
            let max = self.config.limits.max_outside_waits;
            if st.outside.len() >= max {
                let msg = format!(
                    "lock {} is held by {}, and buildlockd already waits for {max} lock files held by \
                     processes outside it (its limit; each costs a thread): try again once some are \
                     released, or raise the limit with `buildlockd --max-outside-waits N` \
                     (BUILDLOCKD_MAX_OUTSIDE_WAITS) and restart the daemon",
                    path.display(),
                    outside.description
                );
                tracing::warn!("{msg}");
                return self.refuse_with(st, lease, error(ErrorCode::LimitExceeded, msg, Some(outside)));
            }
            if let Err(e) = crate::outside::spawn_waiter(self.clone(), target.clone()) {
                let msg = format!(
                    "lock {} is held by {}, and buildlockd cannot start a thread to wait for it: {e}",
                    path.display(),
                    outside.description
                );
                tracing::warn!("{msg}");
                return self.refuse_with(st, lease, error(ErrorCode::Io, msg, Some(outside)));
            }
            st.outside.insert(path.clone(), BTreeSet::new());
        }
        st.outside.get_mut(path).expect("ensured above").insert(lease);
        let expiry = wait.deadline().map(|at| {
            let d = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                d.outside_expired(lease);
            })
            .abort_handle()
        });
        let l = st.leases.get_mut(&lease).expect("checked above");
        l.phase = Phase::Outside { expiry };
        let owner = l.owner;
        l.record(buildlock_history::Kind::Requested);
        let reply = Reply::Waiting { path: path.display().to_string(), position: 0, holder: Some(outside) };
        Self::send(st, owner, reply, None);
    }

    /// A lease waiting for an outside holder reached its deadline.
    fn outside_expired(self: &Arc<Self>, lease: LeaseId) {
        let mut st = self.state();
        let Some(l) = st.leases.get(&lease) else { return };
        if !matches!(l.phase, Phase::Outside { .. }) {
            return;
        }
        let target = l.target.clone();
        let outside = holder_from_disk(&buildlock_disk::describe_holder(&target), true);
        self.refuse_outside(&mut st, lease, &target, outside, true);
    }

    /// For the waiter thread of `path`: the mode to wait for next (the first waiting lease's);
    /// `None` when no lease waits any more, and then the thread's entry is gone and it ends.
    pub(crate) fn outside_wanted(&self, path: &Path) -> Option<LockMode> {
        let mut st = self.state();
        loop {
            let first = st.outside.get(path).and_then(|set| set.first().copied());
            let Some(first) = first else {
                st.outside.remove(path);
                return None;
            };
            match st.leases.get(&first) {
                Some(l) if matches!(l.phase, Phase::Outside { .. }) => return Some(lock_mode(l.mode)),
                _ => {
                    if let Some(set) = st.outside.get_mut(path) {
                        set.remove(&first);
                    }
                }
            }
        }
    }

    /// For the waiter thread of `target`: the kernel gave it the OS lock (in the mode it asked
    /// for). The first lease still waiting in that mode gets it; with none, it is dropped (and
    /// so unlocked) at once.
    pub(crate) fn outside_locked(
        self: &Arc<Self>,
        target: &LockTarget,
        locked: Result<OsLocked, buildlock_disk::Error>,
    ) {
        let mut st = self.state();
        let locked = match locked {
            Ok(locked) => locked,
            Err(e) => {
                tracing::warn!("cannot wait for lock {}: {e}", target.path.display());
                let waiting: Vec<LeaseId> =
                    st.outside.get(&target.path).map(|set| set.iter().copied().collect()).unwrap_or_default();
                for lease in waiting {
                    self.refuse_with(&mut st, lease, error(ErrorCode::Io, e.to_string(), None));
                }
                return;
            }
        };
        let mode = match locked.mode() {
            LockMode::Shared => Mode::Shared,
            LockMode::Exclusive => Mode::Exclusive,
        };
        let taker = st
            .outside
            .get(&target.path)
            .and_then(|set| set.iter().copied().find(|id| st.leases.get(id).is_some_and(|l| l.mode == mode)));
        let Some(lease) = taker else { return };
        st.leave_outside(lease);
        let meta = st.leases.get(&lease).expect("in the waiting set").metadata();
        drop(st);
        self.deliver(lease, locked.claim_for(meta));
    }

    /// Refuses a lease the queue granted because a holder outside the daemon has the lock.
    fn refuse_outside(
        self: &Arc<Self>,
        st: &mut State,
        lease: LeaseId,
        target: &LockTarget,
        holder: Holder,
        timed_out: bool,
    ) {
        let Some(l) = st.leases.get(&lease) else { return };
        l.record(if timed_out { buildlock_history::Kind::TimedOut } else { buildlock_history::Kind::Busy });
        let who = holder.description.clone();
        let path = target.path.display();
        let reply = if timed_out {
            let waited = buildlock_disk::stale::secs(l.requested.elapsed());
            error(
                ErrorCode::Timeout,
                format!("timed out after {waited} waiting for lock {path}, held by {who}"),
                Some(holder),
            )
        } else {
            error(ErrorCode::WouldBlock, format!("lock {path} is held by {who}"), Some(holder))
        };
        self.refuse_with(st, lease, reply);
    }

    /// Ends a lease the queue granted but the daemon could not give, answering `reply`.
    fn refuse_with(self: &Arc<Self>, st: &mut State, lease: LeaseId, reply: Reply) {
        let Some(l) = st.remove_lease(lease) else { return };
        st.queue.release(lease, Instant::now());
        Self::send(st, l.owner, reply, None);
        self.pump(st);
    }

    fn deliver(self: &Arc<Self>, lease: LeaseId, result: Result<OsHold, buildlock_disk::Error>) {
        let mut st = self.state();
        // Given up meanwhile (its client closed): let go at once.
        let Some(owner) = st.leases.get(&lease).filter(|l| matches!(l.phase, Phase::Locking)).map(|l| l.owner) else {
            if let Ok(hold) = result {
                release_hold(hold);
            }
            return;
        };
        match result {
            Ok(hold) => {
                let fd = hand_over(&hold);
                let token = hold.token();
                let conn_open = st.conns.contains_key(&owner);
                let l = st.leases.get_mut(&lease).expect("looked up above");
                let bind = l.bind_pid;
                let path = l.target.path.display().to_string();
                l.phase = Phase::Held { hold: Box::new(hold), conn_open, pid_running: bind.is_some(), released: false };
                l.record(buildlock_history::Kind::Granted);
                let fd_attached = fd.is_some();
                Self::send(&st, owner, Reply::Granted { path, token, fd_attached }, fd);
                if let Some(pid) = bind {
                    if let Some(l) = st.leases.get_mut(&lease) {
                        self.journal_lease(l);
                    }
                    self.watch_pid(lease, pid);
                }
                if !conn_open {
                    self.maybe_release(&mut st, lease);
                }
            }
            Err(e) => {
                tracing::warn!("cannot take the OS lock for a client: {e}");
                self.refuse_with(&mut st, lease, error(ErrorCode::Io, e.to_string(), None));
            }
        }
    }

    /// Releases `lease` if nothing keeps it any more: its connection is gone (or released it)
    /// and its bound process, if any, has exited.
    fn maybe_release(self: &Arc<Self>, st: &mut State, lease: LeaseId) {
        let done = match st.leases.get(&lease).map(|l| &l.phase) {
            Some(Phase::Held { conn_open, pid_running, .. }) => !conn_open && !pid_running,
            _ => false,
        };
        if !done {
            return;
        }
        let l = st.remove_lease(lease).expect("checked above");
        l.record(buildlock_history::Kind::Released);
        if let Some(key) = &l.journal_key {
            self.journal.forget(key);
        }
        if let Phase::Held { hold, released, .. } = l.phase {
            // Metadata first, then the lock. Released by the client: unlocked for every copy
            // (the client closed its own before asking). Its client and bound process gone
            // instead: only our copy is closed, so processes that inherited the descriptor
            // (a killed `run`'s command's children) keep the lock, and the next waiter is
            // granted when the kernel says it is free.
            let result = if released { hold.release_all() } else { hold.release() };
            if let Err(e) = result {
                tracing::warn!("{e}");
            }
        }
        st.queue.release(lease, Instant::now());
        self.pump(st);
    }

    fn release(self: &Arc<Self>, owner: OwnerId, path: &str) {
        let mut st = self.state();
        let found =
            st.leases.iter().find(|(_, l)| l.owner == owner && l.target.path == Path::new(path)).map(|(id, _)| *id);
        let Some(lease) = found else {
            let msg = format!("this connection holds no lease on {path}");
            return Self::send(&st, owner, error(ErrorCode::NotHeld, msg, None), None);
        };
        self.drop_lease(&mut st, lease, true);
        Self::send(&st, owner, Reply::Released { path: path.to_owned() }, None);
    }

    /// Ends `lease` at its owner's wish or death: a waiter leaves the queue, a lock being taken
    /// is abandoned, a held lease loses its connection (`explicit`: and its bound process).
    fn drop_lease(self: &Arc<Self>, st: &mut State, lease: LeaseId, explicit: bool) {
        let Some(l) = st.leases.get_mut(&lease) else { return };
        match &mut l.phase {
            // A lock being taken inline is let go by `deliver`; a waiter thread finds the
            // lease gone from its set.
            Phase::Waiting | Phase::Locking | Phase::Outside { .. } => {
                st.remove_lease(lease);
                st.queue.release(lease, Instant::now());
                self.pump(st);
            }
            Phase::Held { conn_open, pid_running, released, .. } => {
                *conn_open = false;
                if explicit {
                    *pid_running = false;
                    *released = true;
                }
                self.maybe_release(st, lease);
            }
        }
    }

    fn release_pid(self: &Arc<Self>, owner: OwnerId, path: &str, pid: u32) {
        let mut st = self.state();
        let found = st
            .leases
            .iter()
            .find(|(_, l)| l.bind_pid == Some(pid) && l.target.path == Path::new(path))
            .map(|(id, l)| (*id, l.owner));
        let Some((lease, holder_conn)) = found else {
            let msg = format!("no lease on {path} is bound to pid {pid}");
            return Self::send(&st, owner, error(ErrorCode::NotHeld, msg, None), None);
        };
        // Tell the connection that held it (an `acquire --pid` keeper), so it lets go too.
        if holder_conn != owner {
            Self::send(&st, holder_conn, Reply::Released { path: path.to_owned() }, None);
        }
        self.drop_lease(&mut st, lease, true);
        Self::send(&st, owner, Reply::Released { path: path.to_owned() }, None);
    }

    fn bind(self: &Arc<Self>, owner: OwnerId, path: &str, pid: u32) {
        let mut st = self.state();
        let found = st.leases.iter_mut().find(|(_, l)| {
            l.owner == owner && l.target.path == Path::new(path) && matches!(l.phase, Phase::Held { .. })
        });
        let Some((&lease, l)) = found else {
            let msg = format!("this connection holds no lease on {path} to bind");
            return Self::send(&st, owner, error(ErrorCode::NotHeld, msg, None), None);
        };
        l.bind_pid = Some(pid);
        let via = l.holder_pid;
        l.holder_pid = pid;
        if let Phase::Held { pid_running, hold, .. } = &mut l.phase {
            *pid_running = true;
            // The metadata names the process that now holds the lock and outlives the client
            // if it is killed (`run`'s command), so that no tool takes it for a dead holder.
            if let Err(e) = hold.hand_over_to(pid, None, via) {
                tracing::warn!("{e}");
            }
        }
        self.journal_lease(l);
        self.watch_pid(lease, pid);
        Self::send(&st, owner, Reply::Bound { path: path.to_owned(), pid }, None);
    }

    /// Journals a held, bound lease (or updates its entry), so that a daemon started after
    /// both its client and this one died can recover it.
    fn journal_lease(&self, l: &mut Lease) {
        if let Phase::Held { hold, .. } = &l.phase {
            let key = self.journal.record(&l.target.path, hold.metadata());
            // Its key follows its holder and token: an entry for the old ones is stale.
            if let Some(old) = l.journal_key.take().filter(|old| Some(old) != key.as_ref()) {
                self.journal.forget(&old);
            }
            l.journal_key = key;
        }
    }

    /// Before serving anyone: the bound leases a crashed daemon journaled. For each whose bound
    /// process still lives, the lock is re-taken for it, unless a copy of the old descriptor
    /// still holds it (its keeper, or the processes `run`'s command passed it to, survived).
    /// When another process took the lock meanwhile, or holds it now, the loss is recorded
    /// beside the lock (`buildlock_disk::lost`) for `status`, acquirers and the script's
    /// `release`, and logged.
    pub(crate) fn recover(self: &Arc<Self>) {
        for entry in self.journal.entries() {
            self.recover_one(entry);
        }
    }

    fn recover_one(self: &Arc<Self>, entry: crate::journal::Entry) {
        let crate::journal::Entry { key, path, meta } = entry;
        let Ok(target) = validate_path(&path.display().to_string()) else {
            return self.journal.forget(&key);
        };
        if buildlock_sys::process_state(&meta.process()) == buildlock_sys::ProcessState::Dead {
            return self.journal.forget(&key);
        }
        let mode = meta.mode.unwrap_or(LockMode::Exclusive);
        let last_token = buildlock_disk::fence::current(&target);
        let lost = |reason: String| {
            tracing::warn!("lease on {} bound to pid {} was lost: {reason}", target.path.display(), meta.pid);
            history::lost(&target, &meta, &reason);
            let record = buildlock_disk::lost::LostLease::of(&meta, reason);
            if let Err(e) = buildlock_disk::lost::record(&target, &record) {
                tracing::warn!("cannot record the loss beside {}: {e}", target.path.display());
            }
        };
        let both_died = "its client and the daemon both died while it was held";
        match buildlock_disk::try_lock_for(&target, mode, meta.clone()) {
            Ok(Some(hold)) => {
                if meta.token.is_some_and(|t| last_token > t) {
                    lost(format!(
                        "{both_died}, and another process held the lock before a new daemon took it back for pid {} \
                         (fencing token {last_token} > {})",
                        meta.pid,
                        meta.token.unwrap_or(0)
                    ));
                } else {
                    tracing::info!(
                        "recovered the lease on {} bound to pid {} ({both_died}; nobody took it meanwhile)",
                        target.path.display(),
                        meta.pid
                    );
                }
                self.adopt(target, key, meta, hold);
            }
            Ok(None) => match buildlock_disk::meta::read(&target.meta_path) {
                // A surviving copy of the old descriptor holds it: nothing was lost.
                buildlock_disk::MetaRead::Valid(now) if now.id.is_some() && now.id == meta.id => {
                    tracing::info!("the lease on {} bound to pid {} is still held", target.path.display(), meta.pid);
                }
                _ => {
                    let holder = buildlock_disk::describe_holder(&target);
                    lost(format!("{both_died}, and {holder} took the lock before a new daemon started"));
                    self.journal.forget(&key);
                }
            },
            Err(e) => {
                lost(format!("{both_died}, and a new daemon could not take the lock back: {e}"));
                self.journal.forget(&key);
            }
        }
    }

    /// Books a recovered lease as held for its bound process, with no connection.
    fn adopt(self: &Arc<Self>, target: LockTarget, key: String, meta: Metadata, hold: OsHold) {
        let mut st = self.state();
        st.next_owner += 1;
        let owner = st.next_owner;
        let now = Instant::now();
        let mode = match meta.mode {
            Some(LockMode::Shared) => Mode::Shared,
            _ => Mode::Exclusive,
        };
        let pid = meta.pid;
        let lease = st
            .queue
            .acquire(now, buildlock_queue::Request::new(target.path.clone(), owner, queue_mode(mode), Wait::NoWait));
        let mut granted = false;
        while let Some(ev) = st.queue.poll_event() {
            granted |= matches!(ev, Event::Granted { lease: l, .. } if l == lease);
        }
        if !granted {
            // Two journaled leases that cannot both hold (the OS lock said they can): keep the
            // OS lock for this one's process, but say so.
            tracing::warn!("the recovered lease on {} conflicts with another recovered lease", target.path.display());
        }
        let mut l = Lease {
            target,
            owner,
            holder_pid: pid,
            mode,
            operation: meta.operation.clone(),
            command: meta.command.clone().unwrap_or_default(),
            bind_pid: Some(pid),
            requested: now,
            wait: Wait::NoWait,
            phase: Phase::Held { hold: Box::new(hold), conn_open: false, pid_running: true, released: false },
            journal_key: Some(key),
        };
        self.journal_lease(&mut l);
        st.leases.insert(lease, l);
        st.note_activity();
        self.watch_pid(lease, pid);
    }

    /// Watches `pid` (pidfd on Linux, else polling) and releases the lease once it has exited
    /// and its connection is gone.
    fn watch_pid(self: &Arc<Self>, lease: LeaseId, pid: u32) {
        let d = self.clone();
        tokio::spawn(async move {
            wait_for_exit(pid).await;
            let mut st = d.state();
            let still_bound = st.leases.get(&lease).is_some_and(|l| l.bind_pid == Some(pid));
            if still_bound {
                if let Some(Phase::Held { pid_running, .. }) = st.leases.get_mut(&lease).map(|l| &mut l.phase) {
                    *pid_running = false;
                }
                d.maybe_release(&mut st, lease);
            }
        });
    }

    /// Connection `owner` closed: everything it waited for is cancelled, everything it held is
    /// released (once bound processes have exited).
    pub(crate) fn disconnected(self: &Arc<Self>, owner: OwnerId) {
        let mut st = self.state();
        let Some(conn) = st.conns.remove(&owner) else { return };
        for lease in conn.leases {
            self.drop_lease(&mut st, lease, false);
        }
        st.note_activity();
    }

    /// Expires waiters whose deadline passed; returns the next deadline.
    pub(crate) fn on_timer(self: &Arc<Self>) -> Option<Instant> {
        let mut st = self.state();
        st.queue.handle_timeout(Instant::now());
        self.pump(&mut st);
        st.queue.poll_timeout()
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.state().queue.poll_timeout()
    }

    fn status(&self, path: Option<&str>) -> Reply {
        let st = self.state();
        let mut keys: Vec<PathBuf> = match path {
            Some(p) => vec![PathBuf::from(p)],
            None => st.queue.keys().cloned().collect(),
        };
        keys.sort();
        let locks = keys
            .iter()
            .map(|key| {
                // Granted by the queue but still waiting for the OS lock: a waiter, whoever
                // the kernel says holds it.
                let (held, locking): (Vec<_>, Vec<_>) = st
                    .queue
                    .holders(key)
                    .into_iter()
                    .filter_map(|v| st.leases.get(&v.id).map(|l| (v, l)))
                    .partition(|(_, l)| !matches!(l.phase, Phase::Locking | Phase::Outside { .. }));
                let mut holders: Vec<Holder> = held.iter().map(|(_, l)| l.holder()).collect();
                if holders.is_empty() && (path.is_some() || !locking.is_empty()) {
                    if let Ok(t) = validate_path(&key.display().to_string()) {
                        if let Ok(s) = buildlock_disk::status(&t, &Default::default()) {
                            holders.extend(s.holder.as_ref().map(|h| holder_from_disk(h, true)));
                        }
                    }
                }
                let waiters = locking
                    .into_iter()
                    .chain(st.queue.waiters(key).into_iter().filter_map(|v| st.leases.get(&v.id).map(|l| (v, l))))
                    .map(|(v, l)| Waiter {
                        pid: l.holder_pid,
                        mode: l.mode,
                        waited_ms: v.since.elapsed().as_millis() as u64,
                        operation: l.operation.clone(),
                    })
                    .collect();
                LockInfo { path: key.display().to_string(), holders, waiters }
            })
            .collect();
        Reply::Status { locks }
    }

    fn info(&self) -> DaemonInfo {
        let st = self.state();
        let (leases, waiters) = st.queue.counts();
        DaemonInfo {
            pid: std::process::id(),
            version: buildlock_proto::PROTOCOL_VERSION,
            build: buildlock_proto::BUILD.to_owned(),
            started_unix_ms: unix_ms(self.started).unwrap_or(0),
            runtime_dir: self.config.runtime_dir.display().to_string(),
            socket: self.config.socket_path().display().to_string(),
            connections: st.conns.len() as u32,
            leases: leases as u32,
            waiters: waiters as u32,
            idle_exit_ms: self.config.idle_exit.map(|d| d.as_millis() as u64),
        }
    }

    /// Stops the daemon if it has had no connection (not even one in its handshake) and no
    /// lease (not even one kept for a bound process) for `idle`. Decided under the state lock,
    /// as admission is (`Daemon::admit`): a connection is either admitted first, and the daemon
    /// stays, or finds it stopping and is closed, and its client starts the next daemon.
    pub(crate) fn stop_if_idle(&self, idle: std::time::Duration) -> bool {
        let st = self.state();
        let idle = st.live_conns == 0 && st.leases.is_empty() && st.idle_since.is_some_and(|t| t.elapsed() >= idle);
        if idle {
            self.shutdown();
        }
        idle
    }
}

/// A lock path from a client: absolute, and a valid lock target.
fn validate_path(path: &str) -> Result<LockTarget, String> {
    if !Path::new(path).is_absolute() {
        return Err(format!("lock path {path:?} is not absolute; clients send absolute paths"));
    }
    LockTarget::resolve(path, Path::new("/")).map_err(|e| e.to_string())
}

/// The descriptor to hand the client: a duplicate sharing the lock (Linux). Elsewhere the
/// daemon's own copy is the only one and `None` is sent.
fn hand_over(hold: &OsHold) -> Option<OwnedFd> {
    #[cfg(target_os = "linux")]
    {
        match hold.try_clone_file() {
            Ok(f) => Some(OwnedFd::from(f)),
            Err(e) => {
                tracing::warn!("cannot duplicate the lock descriptor: {e}; the daemon alone holds the lock");
                None
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = hold;
        None
    }
}

fn release_hold(hold: OsHold) {
    if let Err(e) = hold.release() {
        tracing::warn!("{e}");
    }
}

/// Resolves when process `pid` has exited.
async fn wait_for_exit(pid: u32) {
    match buildlock_sys::ipc::pidfd_open(pid) {
        Ok(Some(fd)) => {
            // SAFETY: the AsyncFd owns `fd` (an OwnedFd) for its whole life, so the descriptor
            // stays open and refers to the same pidfd until the AsyncFd is dropped.
            let registered =
                unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) };
            if let Ok(afd) = registered {
                let _ = afd.readable().await;
                return;
            }
        }
        Err(_) => return, // no such process: it has exited already
        Ok(None) => {}
    }
    let id = buildlock_sys::identify(pid);
    while buildlock_sys::process_state(&id) != buildlock_sys::ProcessState::Dead {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
