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

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use buildlock_disk::{LockTarget, Metadata, OsHold, OsLocked};
use buildlock_proto::{
    AcquireRequest, DaemonInfo, ErrorCode, ErrorReply, Holder, LeaseRef, LockInfo, Mode, Reply, Request, WaitFor,
    Waiter,
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
    pub(crate) fd: Option<SendFd>,
}

/// A descriptor to send with a reply (`Granted`), kept open until sent: the lock file the daemon
/// holds (shared, no `dup`), or a copy of a remote lease's server session socket.
#[derive(Debug, Clone)]
pub(crate) enum SendFd {
    Lock(Arc<buildlock_sys::LockFile>),
    Socket(Arc<std::fs::File>),
}

impl std::os::fd::AsFd for SendFd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            SendFd::Lock(f) => f.file().as_fd(),
            SendFd::Socket(s) => s.as_fd(),
        }
    }
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
    /// Leases the queue granted whose OS lock is still to be taken: taken as soon as the state
    /// lock is released, by the guard that held it (no task per grant).
    to_lock: Vec<LeaseId>,
    /// When held leases with a `--max-hold` are next due to be stopped (SIGTERM, then SIGKILL),
    /// for the daemon's one timer.
    hold_deadlines: BTreeSet<(Instant, LeaseId)>,
    /// Remote leases (locks on a PostgreSQL server), kept apart from the queue (`remote.rs`).
    pub(crate) remote: crate::remote::Books,
}

/// The state, locked. When it is released, the grants decided meanwhile are carried out (the
/// OS lock taken and the descriptor handed over), outside the lock, on the same thread.
pub(crate) struct StateGuard<'a> {
    daemon: &'a Daemon,
    guard: Option<std::sync::MutexGuard<'a, State>>,
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.guard.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.guard.as_mut().expect("held until dropped")
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        let Some(mut guard) = self.guard.take() else { return };
        if guard.to_lock.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut guard.to_lock);
        drop(guard);
        let Some(daemon) = self.daemon.me.upgrade() else { return };
        for lease in pending {
            daemon.clone().lock_and_grant(lease);
        }
    }
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
            to_lock: Vec::new(),
            hold_deadlines: BTreeSet::new(),
            remote: Default::default(),
        }
    }

    /// Starts or stops the idle clock after a change: it runs only while there is no
    /// connection (not even one in its handshake) and no lease (not even one kept for a bound
    /// process whose client has gone).
    pub(crate) fn note_activity(&mut self) {
        if self.live_conns > 0 || !self.leases.is_empty() || !self.remote.is_empty() {
            self.idle_since = None;
        } else if self.idle_since.is_none() {
            self.idle_since = Some(Instant::now());
        }
    }

    /// Connection `owner`'s reply channel and client pid, if it is open.
    pub(crate) fn conns_tx(&self, owner: OwnerId) -> Option<(Tx, u32)> {
        self.conns.get(&owner).map(|c| (c.tx.clone(), c.pid))
    }

    /// Leases held or queued, local and remote (for the lease limit).
    pub(crate) fn lease_count(&self) -> usize {
        self.leases.len() + self.remote.len()
    }

    /// Whether connection `owner` already has a lease (local or remote) with id `id`.
    pub(crate) fn lease_in_use(&self, owner: OwnerId, id: LeaseRef) -> bool {
        self.conns.get(&owner).is_some_and(|c| c.leases.contains_key(&id)) || self.remote.contains(owner, id)
    }

    /// Takes `lease` out of every book (the lease map, its connection's set, the waiter
    /// thread's set), stopping its expiry timer. Not the queue: callers release it there.
    fn remove_lease(&mut self, lease: LeaseId) -> Option<Lease> {
        self.leave_outside(lease);
        let l = self.leases.remove(&lease)?;
        if let Some(mh) = &l.max_hold {
            self.hold_deadlines.remove(&(mh.due, lease));
        }
        if let Some(c) = self.conns.get_mut(&l.owner) {
            c.leases.remove(&l.client_ref);
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
    /// The client process's identity (pid and start time), read once for all its leases'
    /// metadata.
    ident: buildlock_sys::ProcessIdentity,
    /// Its leases (held or waited for), by the id the client gave each.
    leases: HashMap<LeaseRef, LeaseId>,
}

struct Lease {
    target: LockTarget,
    owner: OwnerId,
    /// The id its client gave it on its connection (protocol 3): replies name it.
    client_ref: LeaseRef,
    /// The process named as the holder: the one the lease was bound to when asked for (a
    /// script's, through `acquire --pid`), else the client's.
    holder_pid: u32,
    /// `holder_pid`'s identity, when already known (the client's, read at connection).
    holder_ident: Option<buildlock_sys::ProcessIdentity>,
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
    /// The asking thread (`AcquireRequest::thread`), and the processes the asking (or bound)
    /// process was started by, read when it had to wait: whom it acts for (deadlock detection).
    thread: u64,
    ancestors: Vec<u32>,
    /// Its `--max-hold`, and where stopping its bound process stands.
    max_hold: Option<MaxHold>,
}

/// A lease's `--max-hold`: due at `due` (once held) for SIGTERM, then for SIGKILL.
struct MaxHold {
    limit: std::time::Duration,
    kill_after: std::time::Duration,
    due: Instant,
    stage: HoldStage,
    /// The limit came while the client (`run`) was still connected: it stops its command
    /// itself, so the daemon waits one grace (and a second) more before it does.
    deferred: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum HoldStage {
    /// Not held yet, or held within its limit.
    Running,
    /// SIGTERM sent; SIGKILL at `due`.
    Terminated,
    /// SIGKILL sent.
    Killed,
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

fn error(lease: LeaseRef, code: ErrorCode, message: impl Into<String>, holder: Option<Holder>) -> Reply {
    Reply::Error(ErrorReply { code, message: message.into(), holder, lease })
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
        max_hold_ms: None,
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
        let mut holder = holder_from_disk(&disk, false);
        if let Some(mh) = &self.max_hold {
            holder.max_hold_ms = u64::try_from(mh.limit.as_millis()).ok();
            if mh.stage != HoldStage::Running {
                holder.description.push_str(&format!(
                    "; held past its max-hold ({}), being stopped",
                    buildlock_disk::stale::secs(mh.limit)
                ));
            }
        }
        holder
    }

    fn metadata(&self) -> Metadata {
        let ident = match &self.holder_ident {
            Some(ident) if ident.pid == self.holder_pid => ident.clone(),
            _ => buildlock_sys::identify(self.holder_pid),
        };
        let mut m =
            Metadata::for_process(ident, lock_mode(self.mode), "os", &self.operation, Some(self.command.clone()));
        m.max_hold_ms = self.max_hold.as_ref().and_then(|mh| u64::try_from(mh.limit.as_millis()).ok());
        m
    }
}

impl Daemon {
    pub(crate) fn state(&self) -> StateGuard<'_> {
        StateGuard { daemon: self, guard: Some(self.state.lock().unwrap_or_else(|e| e.into_inner())) }
    }

    /// A new connection from process `pid`; its replies go to `tx`.
    pub(crate) fn register(&self, tx: Tx, pid: u32) -> OwnerId {
        let ident = buildlock_sys::identify(pid);
        let mut st = self.state();
        st.next_owner += 1;
        let owner = st.next_owner;
        st.conns.insert(owner, ConnEntry { tx, pid, ident, leases: HashMap::new() });
        st.idle_since = None;
        owner
    }

    fn send(st: &State, owner: OwnerId, reply: Reply, fd: Option<SendFd>) {
        if let Some(c) = st.conns.get(&owner) {
            let _ = c.tx.send(Outgoing { reply, fd });
        }
    }

    /// Carries out one request from connection `owner`.
    pub(crate) fn handle(self: &Arc<Self>, owner: OwnerId, req: Request) {
        match req {
            Request::Acquire(a) if a.remote.is_some() => self.acquire_remote(owner, a),
            Request::Acquire(a) => self.acquire(owner, a),
            Request::Release { lease, answer, copies_closed }
                if self.release_remote(owner, lease, answer, copies_closed) => {}
            Request::Release { lease, answer, .. } => self.release(owner, lease, answer),
            Request::ReleasePid { path, pid } => self.release_pid(owner, &path, pid),
            Request::Bind { lease, pid, stop_on_loss } if self.bind_remote(owner, lease, pid, stop_on_loss) => {}
            Request::Bind { lease, pid, .. } => self.bind(owner, lease, pid),
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
        let id = a.lease;
        let target = match validate_path(&a.path) {
            Ok(t) => t,
            Err(msg) => return Self::send(&self.state(), owner, error(id, ErrorCode::InvalidName, msg, None), None),
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
        let Some((client_pid, client_ident)) = st.conns.get(&owner).map(|c| (c.pid, c.ident.clone())) else {
            return;
        };
        let max = self.config.limits.max_leases;
        if st.lease_count() >= max {
            let msg = match self.config.limits.open_files {
                Some(fds) => format!(
                    "buildlockd already holds or queues {max} leases, all that its open-file limit ({fds} \
                     descriptors: one per held lease and per connection) leaves room for, so lock {} was not \
                     queued: release some, or raise the daemon's hard limit (`ulimit -Hn` where it starts, \
                     LimitNOFILE= for a service) and restart it (`buildlock-client daemon stop`)",
                    a.path
                ),
                None => format!(
                    "buildlockd already holds or queues {max} leases for this user (its limit), so lock {} was not \
                 queued: release some, or raise the limit with `buildlockd --max-leases N` \
                 (BUILDLOCKD_MAX_LEASES) and restart the daemon (`buildlock-client daemon stop`)",
                    a.path
                ),
            };
            tracing::warn!("{msg}");
            return Self::send(&st, owner, error(id, ErrorCode::LimitExceeded, msg, None), None);
        }
        let in_use = st.lease_in_use(owner, id);
        if id == 0 || in_use {
            let msg = format!(
                "lease id {id} is {} on this connection, so lock {} was not queued: give every lease of a \
                 connection its own id (not 0)",
                if id == 0 { "reserved" } else { "already in use" },
                a.path
            );
            return Self::send(&st, owner, error(id, ErrorCode::InvalidRequest, msg, None), None);
        }
        let key = target.path.clone();
        let asker = a.bind_pid.unwrap_or(client_pid);
        let ancestors = std::cell::OnceCell::new();
        if wait != Wait::NoWait {
            let cycle = st.queue.deadlock(
                &key,
                queue_mode(a.mode),
                |held| {
                    st.leases.get(&held).is_some_and(|l| {
                        let same_thread = l.bind_pid.is_some() || a.bind_pid.is_some() || l.thread == a.thread;
                        (l.holder_pid == asker && same_thread)
                            || (l.bind_pid.is_some()
                                && ancestors.get_or_init(|| buildlock_sys::ancestors(asker)).contains(&l.holder_pid))
                    })
                },
                |waiting, held| Self::acts_for(&st, waiting, held),
            );
            if let Some(cycle) = cycle {
                let msg = Self::describe_cycle(&st, &key, asker, &a.command, &cycle);
                tracing::info!("refused a request that would deadlock: {msg}");
                history::deadlock(&key, a.mode, asker, &a.command, &a.operation, &msg);
                return Self::send(&st, owner, error(id, ErrorCode::Deadlock, msg, None), None);
            }
        }
        let lease = st.queue.acquire(now, buildlock_queue::Request::new(key, owner, queue_mode(a.mode), wait));
        let max_hold = a.max_hold_ms.map(|ms| MaxHold {
            limit: std::time::Duration::from_millis(ms),
            kill_after: std::time::Duration::from_millis(a.kill_after_ms.unwrap_or(10_000)),
            due: now,
            stage: HoldStage::Running,
            deferred: false,
        });
        st.leases.insert(
            lease,
            Lease {
                target,
                owner,
                client_ref: id,
                holder_pid: a.bind_pid.unwrap_or(client_pid),
                holder_ident: a.bind_pid.is_none().then_some(client_ident),
                mode: a.mode,
                operation: a.operation,
                command: a.command,
                bind_pid: a.bind_pid,
                requested: now,
                wait,
                phase: Phase::Waiting,
                journal_key: None,
                thread: a.thread,
                ancestors: ancestors.get().cloned().unwrap_or_default(),
                max_hold,
            },
        );
        if let Some(c) = st.conns.get_mut(&owner) {
            c.leases.insert(id, lease);
        }
        self.pump(&mut st);
        // Still queued behind daemon clients: say so, and who holds it. Whom it acts for is
        // known from now on (deadlock detection for those who come after it).
        if let Some(l) = st.leases.get_mut(&lease) {
            if matches!(l.phase, Phase::Waiting) && l.ancestors.is_empty() {
                l.ancestors = buildlock_sys::ancestors(asker);
            }
        }
        if let Some(l) = st.leases.get(&lease) {
            if matches!(l.phase, Phase::Waiting) {
                l.record(buildlock_history::Kind::Requested);
                // 1 = next; 0 is kept for "granted by the queue, waiting for an outside holder".
                let position = st.queue.lease(lease).and_then(|v| v.position).map_or(0, |p| p as u32 + 1);
                let holder = Self::current_holder(&st, &l.target.path);
                let path = l.target.path.display().to_string();
                Self::send(&st, owner, Reply::Waiting { lease: id, path, position, holder }, None);
            }
        }
    }

    /// Whether the waiting lease `waiting` waits on behalf of the holder of `held`: the same
    /// thread (or, for leases bound to a process, the same process), or a process started below
    /// a process a lease is bound to (a nested `run` in a build recipe acts for the build: the
    /// command `run` started, or a script that took the lock with `acquire --pid`, waits for
    /// what it starts). A process holding a lease through the library, which may go on to
    /// release it while its children wait, is not taken to wait for them.
    fn acts_for(st: &State, waiting: LeaseId, held: LeaseId) -> bool {
        let (Some(w), Some(h)) = (st.leases.get(&waiting), st.leases.get(&held)) else { return false };
        if w.holder_pid == h.holder_pid {
            return w.bind_pid.is_some() || h.bind_pid.is_some() || w.thread == h.thread;
        }
        h.bind_pid.is_some() && w.ancestors.contains(&h.holder_pid)
    }

    /// The deadlock a request would close, for a person: who holds what and waits for what.
    fn describe_cycle(
        st: &State,
        key: &Path,
        asker: u32,
        command: &str,
        cycle: &[buildlock_queue::Link<PathBuf>],
    ) -> String {
        let name = |p: &Path| {
            let file = p.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            file.strip_suffix(".lock").map(str::to_owned).unwrap_or(file)
        };
        // The process's own command line: a lease's command is what it runs (`run`'s CMD), and
        // the process asking may be the `run` that will start it.
        let who = |pid: u32, command: &str| {
            let command = buildlock_sys::command_line(pid)
                .or_else(|| Some(command.to_owned()).filter(|c| !c.is_empty()))
                .unwrap_or_else(|| "?".into());
            format!("pid {pid} ({command})")
        };
        let mut steps = Vec::new();
        for link in cycle {
            let Some(h) = st.leases.get(&link.held) else { continue };
            let holder = who(h.holder_pid, &h.command);
            let (waiter_pid, waiter_command) = match link.waiting.and_then(|w| st.leases.get(&w)) {
                Some(w) => (w.holder_pid, w.command.as_str()),
                None => (asker, command),
            };
            let (holds, waits) = (name(&link.holds), name(&link.waits_for));
            steps.push(if waiter_pid == h.holder_pid {
                format!("{holder} holds {holds} and waits for {waits}")
            } else {
                format!(
                    "{holder} holds {holds}, and {}, which it started, waits for {waits}",
                    who(waiter_pid, waiter_command)
                )
            });
        }
        let advice = if cycle.len() == 1 {
            "It holds the lock already: a command run under the lock must not take it again (or ask for \
             exclusive while it holds it shared)"
        } else {
            "Take the locks in the same order everywhere, or release one before asking for the other"
        };
        format!("waiting for lock {} would never end (deadlock): {}. {advice}", key.display(), steps.join("; "))
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
                    st.to_lock.push(lease);
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
                l.client_ref,
                ErrorCode::Timeout,
                format!("timed out after {waited} waiting for lock {}, held by {who}", key.display()),
                Some(holder),
            )
        } else {
            error(l.client_ref, ErrorCode::WouldBlock, format!("lock {} is held by {who}", key.display()), Some(holder))
        };
        Self::send(st, owner, reply, None);
    }

    /// Takes the OS lock for a lease the queue granted, then hands it to the client. When a
    /// holder outside the daemon (fasteners, direct mode, an inherited descriptor) has it,
    /// `NoWait` is refused at once; anything else waits for the lock file's waiter thread.
    fn lock_and_grant(self: Arc<Self>, lease: LeaseId) {
        let st = self.state();
        // Given up meanwhile (its client closed, before the lock was released).
        let Some(l) = st.leases.get(&lease).filter(|l| matches!(l.phase, Phase::Locking)) else { return };
        let (target, mode, meta, wait) = (l.target.clone(), lock_mode(l.mode), l.metadata(), l.wait);
        drop(st);
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
                return self.refuse_with(st, lease, error(0, ErrorCode::LimitExceeded, msg, Some(outside)));
            }
            if let Err(e) = crate::outside::spawn_waiter(self.clone(), target.clone()) {
                let msg = format!(
                    "lock {} is held by {}, and buildlockd cannot start a thread to wait for it: {e}",
                    path.display(),
                    outside.description
                );
                tracing::warn!("{msg}");
                return self.refuse_with(st, lease, error(0, ErrorCode::Io, msg, Some(outside)));
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
        let (owner, id) = (l.owner, l.client_ref);
        l.record(buildlock_history::Kind::Requested);
        let reply = Reply::Waiting { lease: id, path: path.display().to_string(), position: 0, holder: Some(outside) };
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
                    self.refuse_with(&mut st, lease, error(0, ErrorCode::Io, e.to_string(), None));
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
                0,
                ErrorCode::Timeout,
                format!("timed out after {waited} waiting for lock {path}, held by {who}"),
                Some(holder),
            )
        } else {
            error(0, ErrorCode::WouldBlock, format!("lock {path} is held by {who}"), Some(holder))
        };
        self.refuse_with(st, lease, reply);
    }

    /// Ends a lease the queue granted but the daemon could not give, answering `reply` (an
    /// error, which is made to name the lease).
    fn refuse_with(self: &Arc<Self>, st: &mut State, lease: LeaseId, mut reply: Reply) {
        let Some(l) = st.remove_lease(lease) else { return };
        if let Reply::Error(e) = &mut reply {
            e.lease = l.client_ref;
        }
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
                let file = fd.as_ref().map(|_| {
                    let id = hold.file_id();
                    buildlock_proto::FileRef { dev: id.dev, ino: id.ino }
                });
                let token = hold.token();
                let conn_open = st.conns.contains_key(&owner);
                let l = st.leases.get_mut(&lease).expect("looked up above");
                let bind = l.bind_pid;
                let path = l.target.path.display().to_string();
                let id = l.client_ref;
                l.phase = Phase::Held { hold: Box::new(hold), conn_open, pid_running: bind.is_some(), released: false };
                l.record(buildlock_history::Kind::Granted);
                if let Some(mh) = &mut l.max_hold {
                    mh.due = Instant::now() + mh.limit;
                    let due = mh.due;
                    st.hold_deadlines.insert((due, lease));
                    self.timer.notify_one();
                }
                let fd_attached = fd.is_some();
                Self::send(&st, owner, Reply::Granted { lease: id, path, token, fd_attached, file }, fd);
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
            Err(e) if out_of_descriptors(&e) => {
                let limit = buildlock_sys::ipc::fd_limit().map_or_else(|| "?".to_owned(), |n| n.to_string());
                let path = st.leases.get(&lease).map(|l| l.target.path.display().to_string()).unwrap_or_default();
                let msg = format!(
                    "buildlockd has run out of file descriptors (its open-file limit is {limit}: one per held \
                     lease and per connection), so lock {path} was not granted; every other lease is kept. \
                     Release some leases, or raise the daemon's hard limit (`ulimit -Hn` where it starts, \
                     LimitNOFILE= for a service) and restart it (`buildlock-client daemon stop`): {e}"
                );
                tracing::warn!("{msg}");
                self.refuse_with(&mut st, lease, error(0, ErrorCode::LimitExceeded, msg, None));
            }
            Err(e) => {
                tracing::warn!("cannot take the OS lock for a client: {e}");
                self.refuse_with(&mut st, lease, error(0, ErrorCode::Io, e.to_string(), None));
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

    fn release(self: &Arc<Self>, owner: OwnerId, id: LeaseRef, answer: bool) {
        let mut st = self.state();
        let found = st.conns.get(&owner).and_then(|c| c.leases.get(&id)).copied();
        let Some(lease) = found else {
            let msg = format!("this connection holds no lease {id} (released already, or never granted)");
            return Self::send(&st, owner, error(id, ErrorCode::NotHeld, msg, None), None);
        };
        let path = st.leases.get(&lease).map(|l| l.target.path.display().to_string()).unwrap_or_default();
        self.drop_lease(&mut st, lease, true);
        if answer {
            Self::send(&st, owner, Reply::Released { lease: id, path }, None);
        }
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
            .map(|(id, l)| (*id, l.owner, l.client_ref));
        let Some((lease, holder_conn, id)) = found else {
            let msg = format!("no lease on {path} is bound to pid {pid}");
            return Self::send(&st, owner, error(0, ErrorCode::NotHeld, msg, None), None);
        };
        // Tell the connection that held it (an `acquire --pid` keeper), so it lets go too.
        if holder_conn != owner {
            Self::send(&st, holder_conn, Reply::Released { lease: id, path: path.to_owned() }, None);
        }
        self.drop_lease(&mut st, lease, true);
        Self::send(&st, owner, Reply::Released { lease: 0, path: path.to_owned() }, None);
    }

    fn bind(self: &Arc<Self>, owner: OwnerId, id: LeaseRef, pid: u32) {
        let mut st = self.state();
        let found = st.conns.get(&owner).and_then(|c| c.leases.get(&id)).copied();
        let held = found.filter(|lease| st.leases.get(lease).is_some_and(|l| matches!(l.phase, Phase::Held { .. })));
        let Some(lease) = held else {
            let msg = format!("this connection holds no granted lease {id} to bind to pid {pid}");
            return Self::send(&st, owner, error(id, ErrorCode::NotHeld, msg, None), None);
        };
        let l = st.leases.get_mut(&lease).expect("checked above");
        let path = l.target.path.display().to_string();
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
        die_after_journaling_a_bind_for_tests();
        Self::send(&st, owner, Reply::Bound { lease: id, path, pid }, None);
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
        let tried = buildlock_disk::try_lock_for(&target, mode, meta.clone());
        // Its client, alive, gave the lease up meanwhile: it removes the entry before its copy
        // of the descriptor closes, so an entry gone now was never lost (nothing to take back).
        if !self.journal.has(&key) {
            tracing::info!(
                "the lease on {} bound to pid {} was given up by its client",
                target.path.display(),
                meta.pid
            );
            return;
        }
        match tried {
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
            // No connection holds it: no client names it.
            client_ref: 0,
            holder_pid: pid,
            holder_ident: None,
            mode,
            operation: meta.operation.clone(),
            command: meta.command.clone().unwrap_or_default(),
            bind_pid: Some(pid),
            requested: now,
            wait: Wait::NoWait,
            phase: Phase::Held { hold: Box::new(hold), conn_open: false, pid_running: true, released: false },
            journal_key: Some(key),
            thread: 0,
            ancestors: Vec::new(),
            max_hold: None,
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
        for lease in conn.leases.into_values() {
            self.drop_lease(&mut st, lease, false);
        }
        Self::remote_disconnected(&mut st, owner);
        st.note_activity();
    }

    /// Expires waiters whose deadline passed and stops holders past their `--max-hold`;
    /// returns the next deadline.
    pub(crate) fn on_timer(self: &Arc<Self>) -> Option<Instant> {
        let mut st = self.state();
        let now = Instant::now();
        st.queue.handle_timeout(now);
        self.pump(&mut st);
        while let Some(&(due, lease)) = st.hold_deadlines.first() {
            if due > now {
                break;
            }
            st.hold_deadlines.pop_first();
            Self::stop_overdue(&mut st, lease, now);
        }
        Self::next(&st)
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        Self::next(&self.state())
    }

    fn next(st: &State) -> Option<Instant> {
        let hold = st.hold_deadlines.first().map(|&(due, _)| due);
        match (st.queue.poll_timeout(), hold) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A held lease is past its `--max-hold` (or its grace after SIGTERM): its bound process's
    /// group gets SIGTERM (then SIGKILL). The lease ends as any bound lease does, once that
    /// process has exited and its client is gone or has released it; the next waiter gets the
    /// lock when the kernel says the group's copies of the descriptor are gone too.
    fn stop_overdue(st: &mut State, lease: LeaseId, now: Instant) {
        let Some(l) = st.leases.get_mut(&lease) else { return };
        let conn_open = matches!(l.phase, Phase::Held { conn_open: true, .. });
        let Some(mh) = &mut l.max_hold else { return };
        // `run` alive stops its own command first (and says so, and exits 124); the daemon is
        // the safety net for a `run` that was killed, or is stuck.
        if mh.stage == HoldStage::Running && conn_open && !mh.deferred {
            mh.deferred = true;
            mh.due = now + mh.kill_after + std::time::Duration::from_secs(1);
            let due = mh.due;
            st.hold_deadlines.insert((due, lease));
            return;
        }
        let (sig, next) = match mh.stage {
            HoldStage::Running => (nix_sig::TERM, HoldStage::Terminated),
            HoldStage::Terminated => (nix_sig::KILL, HoldStage::Killed),
            HoldStage::Killed => return,
        };
        mh.stage = next;
        let Some(pid) = l.bind_pid else {
            tracing::warn!(
                "lock {} has been held for {:?}, past its max-hold, by pid {}, which is not bound to it: nothing \
                 to stop",
                l.target.path.display(),
                mh.limit,
                l.holder_pid
            );
            return;
        };
        // The bound process, proven the same (its start time), leads a group of its own
        // (`run --max-hold` starts it so): the whole group is stopped. Otherwise only it.
        let alive = match &l.phase {
            Phase::Held { hold, .. } => {
                buildlock_sys::process_state(&hold.metadata().process()) == buildlock_sys::ProcessState::Alive
            }
            _ => false,
        };
        if !alive {
            return;
        }
        let what = if sig == nix_sig::TERM { "SIGTERM" } else { "SIGKILL" };
        if next == HoldStage::Terminated {
            l.record(buildlock_history::Kind::StoppedMaxHold);
        }
        let Some(mh) = &mut l.max_hold else { return };
        tracing::warn!(
            "lock {} has been held past its max-hold ({:?}) by pid {pid} ({}): {what} to its process group",
            l.target.path.display(),
            mh.limit,
            l.command
        );
        signal_bound(pid, sig, true);
        if next == HoldStage::Terminated {
            mh.due = now + mh.kill_after;
            let due = mh.due;
            st.hold_deadlines.insert((due, lease));
        }
    }

    fn status(&self, path: Option<&str>) -> Reply {
        let st = self.state();
        let mut keys: Vec<PathBuf> = match path {
            Some(p) if Path::new(p).is_absolute() => vec![PathBuf::from(p)],
            // A remote lock's name (`remote.rs`).
            Some(_) => Vec::new(),
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
        let mut locks: Vec<LockInfo> = locks;
        // Remote locks are named `NAME on postgres://...`, never by an absolute path.
        if !path.is_some_and(|p| Path::new(p).is_absolute()) {
            locks.extend(Self::remote_status(&st, path));
        }
        Reply::Status { locks }
    }

    fn info(&self) -> DaemonInfo {
        let st = self.state();
        let (leases, waiters) = st.queue.counts();
        let (remote_held, remote_waiting) = st.remote.counts();
        let (leases, waiters) = (leases + remote_held, waiters + remote_waiting);
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
        let idle = st.live_conns == 0
            && st.leases.is_empty()
            && st.remote.is_empty()
            && st.idle_since.is_some_and(|t| t.elapsed() >= idle);
        if idle {
            self.shutdown();
        }
        idle
    }
}

/// A lock path from a client: absolute, and a valid lock target.
/// The two signals `--max-hold` sends (Unix numbers; the daemon runs on Unix only).
pub(crate) mod nix_sig {
    pub(crate) const TERM: i32 = 15;
    pub(crate) const KILL: i32 = 9;
}

fn validate_path(path: &str) -> Result<LockTarget, String> {
    if !Path::new(path).is_absolute() {
        return Err(format!("lock path {path:?} is not absolute; clients send absolute paths"));
    }
    LockTarget::resolve(path, Path::new("/")).map_err(|e| e.to_string())
}

/// Test builds only: with `BUILDLOCK_TEST_DIE_AFTER_JOURNALING_A_BIND=DIR`, the first daemon to
/// journal a binding creates `DIR/journaled`, waits for the FIFO `DIR/go`, and dies (SIGKILL)
/// before confirming it (`buildlock_sys::pause_once_for_tests`): the window in which its client
/// gives the lease up while the journal keeps it.
fn die_after_journaling_a_bind_for_tests() {
    #[cfg(all(debug_assertions, unix))]
    if buildlock_sys::pause_once_for_tests("BUILDLOCK_TEST_DIE_AFTER_JOURNALING_A_BIND", "journaled") {
        let _ = buildlock_sys::send_signal(std::process::id(), nix_sig::KILL);
    }
}

/// The descriptor to hand the client (Linux): the daemon's own, shared until it is sent, with
/// no `dup` (the client receives a descriptor of its own for the same open file description,
/// and so shares the lock). Elsewhere the daemon's copy is the only one and `None` is sent.
fn hand_over(hold: &OsHold) -> Option<SendFd> {
    #[cfg(target_os = "linux")]
    {
        Some(SendFd::Lock(hold.shared_file()))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = hold;
        None
    }
}

/// Whether `e` is the process (or the system) out of file descriptors.
fn out_of_descriptors(e: &buildlock_disk::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.downcast_ref::<std::io::Error>().is_some_and(buildlock_sys::ipc::is_out_of_descriptors) {
            return true;
        }
        source = err.source();
    }
    false
}

fn release_hold(hold: OsHold) {
    if let Err(e) = hold.release() {
        tracing::warn!("{e}");
    }
}

/// Resolves when process `pid` has exited.
pub(crate) async fn wait_for_exit(pid: u32) {
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

/// Sends `sig` to the process group that the bound process `pid` leads (`run` starts its command
/// so), or to `pid` alone when no such group is left and `leader_alive` says it still runs; a
/// failure is logged. What `--max-hold` and a lost remote lease stop a command with.
pub(crate) fn signal_bound(pid: u32, sig: i32, leader_alive: bool) {
    let sent = match buildlock_sys::signal_group(pid, Some(sig)) {
        Ok(true) => Ok(()),
        _ if leader_alive => buildlock_sys::send_signal(pid, sig),
        _ => Ok(()),
    };
    if let Err(e) = sent {
        tracing::warn!("cannot stop pid {pid}: {e}");
    }
}
