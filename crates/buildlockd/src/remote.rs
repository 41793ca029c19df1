//! Remote leases: locks on a server (PostgreSQL) whose sessions the daemon holds for its clients.
//!
//! An `Acquire` with `remote` set is not put in the local queue (nor in its wait-for graph:
//! deadlock detection is for local locks only). The daemon knows the server only through
//! `buildlock_remote::Engine` (chosen by the URL's scheme, `buildlock_remote::from_url`) and
//! holds one `Box<dyn EngineSession>` per lease on its own runtime, in a task of its own
//! (`drive`): it takes a session kept from an earlier lease on the same server (`crate::pool`)
//! or connects within the connect timeout, waits in the server's lock queue (its
//! order is the server's), answers `Granted` with the token and a copy of the session's socket
//! (as a local lease's lock file is attached), then checks in every quarter of the remote
//! timeout. The client and the command `run` starts hold that copy, so the session (and lock)
//! outlives this daemon while they live, as a local lease's OS lock does.
//!
//! - `Release` unlocks on the server and closes the session at once, for every copy, or keeps
//!   it, unlocked, for the next lease when no other process can hold a copy (`crate::pool`);
//!   `Released` (if asked for) once the server has unlocked.
//! - When its connection has closed *and* its bound process (`Bind`, `run`'s command), if any,
//!   has exited (the rule of local leases), the lease ends here, but only the daemon's copy of
//!   the session closes (aborted: no word to the server); the server frees the lock when the
//!   last copy closes, which is at once unless a process that inherited one still runs.
//! - A lost session (server restart, network cut, a check-in unanswered) marks the lease lost
//!   and tells its client at once with `Reply::LeaseLost` (`run` then stops its command). A
//!   session that only looks lost (a check-in unanswered: the server may still hold the lock
//!   for it) is kept open until its holders have let go, so the server never frees the lock
//!   while the command may still run; the server or the network ends it otherwise, within the
//!   remote timeout. If the client is gone (a killed `run`), the daemon stops the bound
//!   command itself: SIGTERM to its group, SIGKILL after the stop grace (a quarter of the
//!   remote timeout), and the lease ends once the group is gone.
//! - `--max-hold` (`max_hold_ms`) is enforced as for local leases, on the lease's own task:
//!   past the limit (one grace later while `run` is still connected: it stops its command
//!   itself), the bound process's group gets SIGTERM, then SIGKILL after `kill_after`; the
//!   lease then ends once the bound process has exited and its group is gone, and the history
//!   records `stopped_max_hold`. Nothing is ever taken from a holder.
//! - Nothing here blocks the runtime: the URL (which may read `~/.pgpass`) is parsed in a
//!   blocking-pool thread, everything else is async; a failure is one `Error` reply to the
//!   lease's client and touches nothing else.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use buildlock_proto::{
    AcquireRequest, ErrorCode, ErrorReply, Holder, LeaseRef, LockInfo, Mode, Reply, WaitFor, Waiter,
};
use buildlock_queue::OwnerId;
use tokio::sync::oneshot;

use crate::server::Daemon;
use crate::state::{Outgoing, SendFd, State, Tx};

/// A remote lease's key: its connection and the id its client gave it.
type Key = (OwnerId, LeaseRef);

/// Every remote lease the daemon holds or waits for.
#[derive(Default)]
pub(crate) struct Books {
    leases: HashMap<Key, RemoteLease>,
}

impl Books {
    pub(crate) fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.leases.len()
    }

    pub(crate) fn contains(&self, owner: OwnerId, id: LeaseRef) -> bool {
        self.leases.contains_key(&(owner, id))
    }

    /// Held and waiting remote leases.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let held = self.leases.values().filter(|l| matches!(l.phase, Phase::Held { .. })).count();
        (held, self.leases.len() - held)
    }
}

struct RemoteLease {
    name: String,
    /// The server, as users see it (`postgres://host:port/db`, never the password).
    server: String,
    tx: Tx,
    mode: Mode,
    operation: String,
    command: String,
    /// The process named as the holder: the bound one, else the client.
    holder_pid: u32,
    bind_pid: Option<u32>,
    requested: Instant,
    phase: Phase,
    conn_open: bool,
    pid_running: bool,
    /// The bound process as identified when bound (pid and start time): only that very process
    /// (and its group) is ever signalled.
    bound: Option<buildlock_sys::ProcessIdentity>,
    /// Its `--max-hold`, and how far stopping its bound process has gone.
    max_hold: Option<MaxHold>,
    /// How long a bound command stopped for a lost lock gets between SIGTERM and SIGKILL.
    stop_grace: Duration,
    /// The client process (`run`), which stops its command when told of a loss. Its connection
    /// may outlive it (`run`'s command inherits a copy), so whether it lives is asked of it.
    client: buildlock_sys::ProcessIdentity,
    /// Fired (`Release`) to end the lock on the server at once, for every copy of the session,
    /// with whether the session may then be kept for another lease (`crate::pool`); dropped
    /// (its holders are gone) to close only the daemon's copy of the session, never telling the
    /// server: a process that still holds a copy of the socket (handed over with `Granted`)
    /// keeps the lock, which the server frees when the last copy closes.
    stop: oneshot::Sender<Stop>,
    /// The process whose group the kernel kills if the session fails or the server ends it:
    /// from the binding on when its client asked (`Bind.stop_on_loss`), else once nobody else is
    /// left to stop it (`run` gone). See [`drive`].
    guard: tokio::sync::watch::Sender<Option<Guarding>>,
}

/// For whom the kernel's guard on a remote lease's session is armed ([`drive`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Guarding {
    /// The bound process, whose group is killed.
    pid: u32,
    /// Its client (`run`) still lives and stops it first on a cut network: the socket's
    /// `TCP_USER_TIMEOUT` is then `3T/4` (the kernel acts only after `run` would have), else
    /// `T/4` as for any session this daemon checks in on.
    watched: bool,
}

/// How a remote lease was released (`Release`).
struct Stop {
    /// No other process can hold a copy of the session's socket: it may be kept for another
    /// lease (`crate::pool`).
    reuse: bool,
    /// Where to say `Released` once the server has unlocked (the client waits for it).
    answer: Option<Tx>,
}

/// A remote lease's `--max-hold`.
struct MaxHold {
    limit: Duration,
    kill_after: Duration,
    stage: Stage,
    /// The limit came while the client (`run`) was connected: it stops its command itself, so
    /// the daemon waits one grace (and a second) more.
    deferred: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Held within its limit (or not held yet).
    Running,
    /// SIGTERM sent to the bound process's group.
    Terminated,
    /// SIGKILL sent.
    Killed,
}

enum Phase {
    Waiting { holder: Option<buildlock_remote::Holder> },
    Held { token: u64, since: SystemTime },
    Lost,
}

impl RemoteLease {
    fn holder(&self) -> Holder {
        let (token, since) = match self.phase {
            Phase::Held { token, since } => (Some(token), Some(since)),
            _ => (None, None),
        };
        let what = if self.operation.is_empty() { &self.command } else { &self.operation };
        let mut description = format!("pid {}", self.holder_pid);
        if !what.is_empty() {
            description.push_str(&format!(" ({what})"));
        }
        description.push_str(&format!(", {}", self.mode));
        if let Some(t) = token {
            description.push_str(&format!(", token {t}"));
        }
        description.push_str(&format!(", on {}", self.server));
        if matches!(self.phase, Phase::Lost) {
            description.push_str(" (its session was lost)");
        }
        Holder {
            pid: Some(self.holder_pid),
            command: Some(self.command.clone()).filter(|c| !c.is_empty()),
            host: Some(buildlock_sys::hostname()),
            mode: Some(self.mode),
            since_unix_ms: since
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as i64),
            operation: Some(self.operation.clone()),
            token,
            outside: false,
            description,
            max_hold_ms: self.max_hold.as_ref().and_then(|m| u64::try_from(m.limit.as_millis()).ok()),
        }
    }

    /// `NAME on SERVER`: how `status` and the history name a remote lock.
    fn label(&self) -> String {
        format!("{} on {}", self.name, self.server)
    }

    /// Records `kind` for this lease in the lock history (off the grant path: queued).
    fn record(&self, kind: buildlock_history::Kind, detail: String) {
        let mut e = buildlock_history::Event::new(self.label(), kind);
        e.mode = self.mode.to_string();
        e.backend = self.server.clone();
        e.pid = Some(self.holder_pid);
        e.command = self.command.clone();
        e.operation = self.operation.clone();
        e.host = buildlock_sys::hostname();
        e.detail = detail;
        buildlock_history::background().record(e);
    }

    fn send(&self, reply: Reply) {
        let _ = self.tx.send(Outgoing { reply, fd: None });
    }
}

/// A holder on the server (any host), as the wire describes holders.
fn server_holder(h: &buildlock_remote::Holder) -> Holder {
    Holder {
        pid: h.pid,
        command: Some(h.command.clone()).filter(|c| !c.is_empty()),
        host: Some(h.host.clone()),
        mode: Some(match h.mode {
            buildlock_remote::Mode::Shared => Mode::Shared,
            buildlock_remote::Mode::Exclusive => Mode::Exclusive,
        }),
        since_unix_ms: None,
        operation: Some(h.operation.clone()),
        token: h.token,
        outside: false,
        description: h.describe(),
        max_hold_ms: None,
    }
}

fn error(lease: LeaseRef, code: ErrorCode, message: String) -> Reply {
    Reply::Error(ErrorReply { code, message, holder: None, lease })
}

/// The wire's error code for a remote failure.
fn code_of(e: &buildlock_remote::Error) -> ErrorCode {
    use buildlock_remote::Error as E;
    match e {
        E::Busy { timed_out: true, .. } => ErrorCode::Timeout,
        E::Busy { .. } => ErrorCode::WouldBlock,
        E::Auth { .. } | E::Privilege { .. } => ErrorCode::PermissionDenied,
        E::Settings(_) => ErrorCode::InvalidRequest,
        E::Unreachable { .. } | E::Lost { .. } | E::Server { .. } => ErrorCode::Io,
    }
}

impl Daemon {
    /// `Acquire` of a remote lock: booked, and its session started in a task of its own.
    pub(crate) fn acquire_remote(self: &Arc<Self>, owner: OwnerId, a: AcquireRequest) {
        let id = a.lease;
        let url = a.remote.clone().unwrap_or_default();
        let mut st = self.state();
        let Some((tx, client_pid)) = st.conns_tx(owner) else { return };
        let refuse = |msg: String, code| {
            let _ = tx.send(Outgoing { reply: error(id, code, msg), fd: None });
        };
        let max = self.config.limits.max_leases;
        if st.lease_count() >= max {
            return refuse(
                format!(
                    "buildlockd already holds or queues {max} leases for this user (its limit), so lock {} was not \
                     queued: release some, or raise the limit with `buildlockd --max-leases N` \
                     (BUILDLOCKD_MAX_LEASES) and restart the daemon (`buildlock-client daemon stop`)",
                    a.path
                ),
                ErrorCode::LimitExceeded,
            );
        }
        if id == 0 || st.lease_in_use(owner, id) {
            return refuse(
                format!(
                    "lease id {id} is {} on this connection, so lock {} was not queued: give every lease of a \
                     connection its own id (not 0)",
                    if id == 0 { "reserved" } else { "already in use" },
                    a.path
                ),
                ErrorCode::InvalidRequest,
            );
        }
        if a.path.is_empty() {
            return refuse("a remote lock needs a name (in `path`)".into(), ErrorCode::InvalidName);
        }
        let remote_timeout =
            a.remote_timeout_ms.map_or(buildlock_remote::DEFAULT_REMOTE_TIMEOUT, Duration::from_millis);
        let mode = match a.mode {
            Mode::Shared => buildlock_remote::Mode::Shared,
            Mode::Exclusive => buildlock_remote::Mode::Exclusive,
        };
        let wait = match a.wait {
            WaitFor::NoWait => buildlock_remote::Wait::NoWait,
            WaitFor::Millis(ms) => buildlock_remote::Wait::Timeout(Duration::from_millis(ms)),
            WaitFor::Forever => buildlock_remote::Wait::Forever,
        };
        let holder_pid = a.bind_pid.unwrap_or(client_pid);
        let mut req = buildlock_remote::Request::new(&a.path, mode, wait, &a.operation);
        req.pid = holder_pid;
        req.command = a.command.clone();
        let (stop_tx, stop) = oneshot::channel();
        let (guard_tx, guard) = tokio::sync::watch::channel(None);
        let lease = RemoteLease {
            name: a.path.clone(),
            // Until the URL is read (in a blocking-pool thread): never the URL itself.
            server: "its PostgreSQL server".into(),
            tx: tx.clone(),
            mode: a.mode,
            operation: a.operation,
            command: a.command,
            holder_pid,
            bind_pid: a.bind_pid,
            requested: Instant::now(),
            phase: Phase::Waiting { holder: None },
            conn_open: true,
            pid_running: a.bind_pid.is_some(),
            bound: a.bind_pid.map(buildlock_sys::identify),
            max_hold: a.max_hold_ms.map(|ms| MaxHold {
                limit: Duration::from_millis(ms),
                kill_after: Duration::from_millis(a.kill_after_ms.unwrap_or(10_000)),
                stage: Stage::Running,
                deferred: false,
            }),
            stop_grace: buildlock_remote::Bounds { remote_timeout }.stop_grace(),
            client: buildlock_sys::identify(client_pid),
            stop: stop_tx,
            guard: guard_tx,
        };
        st.remote.leases.insert((owner, id), lease);
        st.note_activity();
        drop(st);
        if let Some(pid) = a.bind_pid {
            self.watch_remote_pid((owner, id), pid);
        }
        tokio::spawn(drive(self.clone(), (owner, id), url, remote_timeout, req, stop, guard));
    }

    /// `Release` of a remote lease; `false` if `id` is not one. With `copies_closed` (the
    /// client closed its copy of the session's socket and passed none on), a lease never bound
    /// to another process leaves its session, unlocked, for the next lease (`crate::pool`).
    pub(crate) fn release_remote(
        self: &Arc<Self>,
        owner: OwnerId,
        id: LeaseRef,
        answer: bool,
        copies_closed: bool,
    ) -> bool {
        let mut st = self.state();
        let Some(l) = st.remote.leases.remove(&(owner, id)) else { return false };
        // Unlocked on the server at once, whoever else holds a copy of the session; `Released`
        // once it is, so that a client that waits for it finds the lock free on the server.
        let stop = Stop { reuse: copies_closed && l.bind_pid.is_none(), answer: answer.then(|| l.tx.clone()) };
        if let Err(stop) = l.stop.send(stop) {
            // Its task has ended already (the session was lost): nothing is held.
            if let Some(tx) = stop.answer {
                let _ = tx.send(Outgoing { reply: Reply::Released { lease: id, path: l.name.clone() }, fd: None });
            }
        }
        st.note_activity();
        true
    }

    /// `Bind` of a remote lease (what `run` does with its command): the lease then lasts until
    /// that process has exited too. With `stop_on_loss` (`run --on-lost=stop`), the kernel
    /// guards that process's group from now on ([`drive`]): should `run` and this daemon be
    /// killed together, neither would live to arm it for the other. `false` if `id` is not a
    /// remote lease.
    pub(crate) fn bind_remote(self: &Arc<Self>, owner: OwnerId, id: LeaseRef, pid: u32, stop_on_loss: bool) -> bool {
        let mut st = self.state();
        let Some(l) = st.remote.leases.get_mut(&(owner, id)) else { return false };
        if !matches!(l.phase, Phase::Held { .. }) {
            let msg = format!("this connection holds no granted lease {id} to bind to pid {pid}");
            l.send(error(id, ErrorCode::NotHeld, msg));
            return true;
        }
        l.bind_pid = Some(pid);
        l.bound = Some(buildlock_sys::identify(pid));
        l.holder_pid = pid;
        l.pid_running = true;
        if stop_on_loss && l.conn_open {
            l.guard.send_replace(Some(Guarding { pid, watched: true }));
        }
        l.send(Reply::Bound { lease: id, path: l.name.clone(), pid });
        drop(st);
        self.watch_remote_pid((owner, id), pid);
        true
    }

    /// Connection `owner` closed: its remote leases end, except those bound to a process that
    /// still runs (a killed `run`'s command), which end when it exits.
    pub(crate) fn remote_disconnected(st: &mut State, owner: OwnerId) {
        let keys: Vec<Key> = st.remote.leases.keys().filter(|k| k.0 == owner).copied().collect();
        for key in keys {
            let Some(l) = st.remote.leases.get_mut(&key) else { continue };
            l.conn_open = false;
            let keep = l.pid_running && matches!(l.phase, Phase::Held { .. } | Phase::Lost);
            if !keep {
                st.remote.leases.remove(&key);
            } else {
                // Held by a command whose `run` is gone: this daemon watches the session for it
                // now, and should it die too, the kernel does.
                l.guard.send_replace(l.bind_pid.map(|pid| Guarding { pid, watched: false }));
                if matches!(l.phase, Phase::Lost) {
                    // Lost while its `run` lived, which is gone now: stop the command here.
                    stop_for_loss(l);
                }
            }
        }
    }

    /// Lease `key` lost its session, or looks to have (a check-in unanswered): its client is
    /// told at once; with no client left (now, or when it exits), its bound command is stopped
    /// here; with neither, it ends (the session with it).
    fn remote_lost(self: &Arc<Self>, key: Key, why: &str) {
        let mut st = self.state();
        let Some(l) = st.remote.leases.get_mut(&key) else { return };
        tracing::warn!("remote lock {} was lost: {why}", l.label());
        l.phase = Phase::Lost;
        l.send(Reply::LeaseLost { lease: key.1, path: l.name.clone(), reason: why.to_owned() });
        let client_alive = buildlock_sys::process_state(&l.client) == buildlock_sys::ProcessState::Alive;
        if l.conn_open && client_alive {
            // `run` stops its command; should it die first, the daemon does.
            if l.pid_running {
                let (d, client) = (self.clone(), l.client.pid);
                tokio::spawn(async move {
                    crate::state::wait_for_exit(client).await;
                    let st = d.state();
                    if let Some(l) = st.remote.leases.get(&key).filter(|l| l.pid_running) {
                        stop_for_loss(l);
                    }
                });
            }
            return;
        }
        if l.pid_running {
            stop_for_loss(l);
        } else if !l.conn_open {
            st.remote.leases.remove(&key);
            st.note_activity();
        }
    }

    fn watch_remote_pid(self: &Arc<Self>, key: Key, pid: u32) {
        let d = self.clone();
        tokio::spawn(async move {
            crate::state::wait_for_exit(pid).await;
            // Stopped past its max-hold: the group it leads may outlive it (a child that ignores
            // SIGTERM); the lock is released only once the group is gone (SIGKILL follows).
            let stopped = |d: &Daemon| {
                d.state().remote.leases.get(&key).is_some_and(|l| {
                    l.bind_pid == Some(pid)
                        && (matches!(l.phase, Phase::Lost)
                            || l.max_hold.as_ref().is_some_and(|m| m.stage != Stage::Running))
                })
            };
            // Polled: a group has no descriptor to wait on. Only after a max-hold stop, or a
            // loss (its session may still hold the lock until the whole group is gone).
            while stopped(&d) && matches!(buildlock_sys::signal_group(pid, None), Ok(true)) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let mut st = d.state();
            let Some(l) = st.remote.leases.get_mut(&key) else { return };
            if l.bind_pid != Some(pid) {
                return;
            }
            l.pid_running = false;
            if !l.conn_open {
                st.remote.leases.remove(&key);
                st.note_activity();
            }
        });
    }

    /// Lease `key` is past its `--max-hold` (or its grace after SIGTERM), as `stop_overdue` of
    /// local leases: SIGTERM to its bound process's group, then SIGKILL. Returns when to look
    /// again.
    fn stop_overdue_remote(&self, key: Key) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        let mut st = self.state();
        let l = st.remote.leases.get_mut(&key)?;
        if !matches!(l.phase, Phase::Held { .. }) {
            return None;
        }
        let conn_open = l.conn_open;
        let mh = l.max_hold.as_mut()?;
        // `run` alive stops its own command first (and says so, and exits 124); the daemon is
        // the safety net for a `run` that was killed, or is stuck.
        if mh.stage == Stage::Running && conn_open && !mh.deferred {
            mh.deferred = true;
            return Some(now + mh.kill_after + Duration::from_secs(1));
        }
        let (sig, next) = match mh.stage {
            Stage::Running => (crate::state::nix_sig::TERM, Stage::Terminated),
            Stage::Terminated => (crate::state::nix_sig::KILL, Stage::Killed),
            Stage::Killed => return None,
        };
        mh.stage = next;
        let (limit, kill_after) = (mh.limit, mh.kill_after);
        let (Some(pid), Some(bound)) = (l.bind_pid, l.bound.clone()) else {
            tracing::warn!(
                "remote lock {} has been held for {limit:?}, past its max-hold, by pid {}, which is not bound to                  it: nothing to stop",
                l.label(),
                l.holder_pid
            );
            return None;
        };
        // The bound process, proven the same (its start time), leads a group of its own (`run`
        // starts it so): the whole group is stopped. SIGKILL also reaches a group whose leader
        // died of the SIGTERM: its number stays its own while any member lives.
        let alive = buildlock_sys::process_state(&bound) == buildlock_sys::ProcessState::Alive;
        let group = matches!(buildlock_sys::signal_group(pid, None), Ok(true));
        let left = alive || (next == Stage::Killed && group);
        if !left {
            return None;
        }
        let what = if next == Stage::Terminated { "SIGTERM" } else { "SIGKILL" };
        if next == Stage::Terminated {
            l.record(
                buildlock_history::Kind::StoppedMaxHold,
                format!(
                    "held past its max-hold of {limit:?}: SIGTERM to pid {pid}'s group, SIGKILL after {kill_after:?}"
                ),
            );
        }
        tracing::warn!(
            "remote lock {} has been held past its max-hold ({limit:?}) by pid {pid} ({}): {what} to its process group",
            l.label(),
            l.command
        );
        crate::state::signal_bound(pid, sig, alive);
        (next == Stage::Terminated).then(|| now + kill_after)
    }

    /// The remote locks this daemon holds or waits for, one `LockInfo` per lock and server;
    /// `path` reads `NAME on postgres://host:port/db`.
    pub(crate) fn remote_status(st: &State, path: Option<&str>) -> Vec<LockInfo> {
        let mut by_lock: std::collections::BTreeMap<String, LockInfo> = Default::default();
        let mut outside: HashMap<String, Holder> = HashMap::new();
        let mut leases: Vec<&RemoteLease> = st.remote.leases.values().collect();
        leases.sort_by_key(|l| l.requested);
        for l in leases {
            let label = l.label();
            if path.is_some_and(|p| p != label && p != l.name) {
                continue;
            }
            let info = by_lock.entry(label.clone()).or_insert_with(|| LockInfo {
                path: label,
                holders: Vec::new(),
                waiters: Vec::new(),
            });
            match &l.phase {
                Phase::Waiting { holder } => {
                    info.waiters.push(Waiter {
                        pid: l.holder_pid,
                        mode: l.mode,
                        waited_ms: l.requested.elapsed().as_millis() as u64,
                        operation: l.operation.clone(),
                    });
                    if let Some(h) = holder {
                        outside.entry(l.label()).or_insert_with(|| server_holder(h));
                    }
                }
                _ => info.holders.push(l.holder()),
            }
        }
        // Held by another host (or a session outside this daemon): as the server said to its
        // waiters here, when no lease of this daemon holds it.
        for (label, h) in outside {
            if let Some(info) = by_lock.get_mut(&label).filter(|i| i.holders.is_empty()) {
                info.holders.push(h);
            }
        }
        by_lock.into_values().collect()
    }
}

/// The lease `key`'s session, from connecting to the end, through the engine its URL names.
async fn drive(
    daemon: Arc<Daemon>,
    key: Key,
    url: String,
    remote_timeout: Duration,
    req: buildlock_remote::Request,
    mut stop: oneshot::Receiver<Stop>,
    guard: tokio::sync::watch::Receiver<Option<Guarding>>,
) {
    let name = req.name.clone();
    run_lease(daemon, key, url, remote_timeout, req, &mut stop, guard).await;
    // A `Release` not looked at (the lease failed or was lost meanwhile) is answered here; one
    // from now on by `release_remote` itself.
    stop.close();
    released(stop.try_recv().ok(), key.1, &name);
}

async fn run_lease(
    daemon: Arc<Daemon>,
    key: Key,
    url: String,
    remote_timeout: Duration,
    req: buildlock_remote::Request,
    stop: &mut oneshot::Receiver<Stop>,
    mut guard: tokio::sync::watch::Receiver<Option<Guarding>>,
) {
    let fail = |e: buildlock_remote::Error| {
        let e = match e {
            // Nothing was held yet: the connection ended while connecting or waiting.
            buildlock_remote::Error::Lost { server, why, .. } => buildlock_remote::Error::Server {
                server,
                why: format!("{why}; lock {} was not taken, try again", req.name),
            },
            other => other,
        };
        let mut st = daemon.state();
        if let Some(l) = st.remote.leases.remove(&key) {
            l.send(error(key.1, code_of(&e), e.to_string()));
        }
        st.note_activity();
    };
    let pool_key: crate::pool::Key = (url.clone(), remote_timeout);
    // A session kept from an earlier lease on this server, if one is idle: no connection, no
    // authentication, no parsing of the URL.
    let pooled = daemon.pool.take(&pool_key);
    let server = match &pooled {
        Some((engine, _)) => engine.clone(),
        // Parsing the URL may read ~/.pgpass: not on the runtime's thread.
        None => {
            let parsed = tokio::task::spawn_blocking(move || {
                buildlock_remote::from_url(&url).and_then(|s| s.with_remote_timeout(remote_timeout))
            })
            .await;
            match parsed {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return fail(e),
                Err(e) => return fail(buildlock_remote::Error::Settings(format!("cannot read the backend URL: {e}"))),
            }
        }
    };
    if let Some(l) = daemon.state().remote.leases.get_mut(&key) {
        l.server = server.display();
    }
    let mut told = false;
    let mut on_wait = |h: &buildlock_remote::Holder| {
        let mut st = daemon.state();
        let Some(l) = st.remote.leases.get_mut(&key) else { return };
        if !told {
            told = true;
            let holder = server_holder(h);
            l.send(Reply::Waiting { lease: key.1, path: l.name.clone(), position: 1, holder: Some(holder) });
        }
        l.phase = Phase::Waiting { holder: Some(h.clone()) };
    };
    // The kept session first; should its first request fail for any other reason than a busy
    // lock (the server restarted or the network failed while it was idle, unnoticed), a new one.
    let mut pooled = pooled.map(|(_, s)| s);
    let (mut session, acquired) = loop {
        let (mut session, from_pool) = match pooled.take() {
            Some(s) => (s, true),
            None => tokio::select! {
                r = &mut *stop => return released(r.ok(), key.1, &req.name),
                r = server.connect() => match r {
                    Ok(s) => (s, false),
                    Err(e) => return fail(e),
                },
            },
        };
        let acquired = tokio::select! {
            r = &mut *stop => {
                released(r.ok(), key.1, &req.name);
                None
            }
            r = session.acquire(&req, &mut on_wait) => Some(r),
        };
        match acquired {
            Some(Err(e)) if from_pool && !matches!(e, buildlock_remote::Error::Busy { .. }) => {
                tracing::debug!("a kept session of {} failed ({e}); taking a new one", server.display());
                session.abort();
            }
            acquired => break (session, acquired),
        }
    };
    let token = match acquired {
        // Its client gave up (released, or died) while it waited: the session ends now, and
        // the server drops it from its queue.
        None => return session.abort(),
        // A busy lock: nothing was taken, nor any copy of the socket handed out, so the session
        // is kept for the next lease.
        Some(Err(e @ buildlock_remote::Error::Busy { .. })) if session.reusable() => {
            daemon.pool.put(pool_key, server, session);
            return fail(e);
        }
        Some(Err(e)) => {
            session.abort();
            return fail(e);
        }
        Some(Ok(token)) => token,
    };
    // Past `--max-hold`, `stop_overdue_remote` (then again after its grace).
    let mut overdue = None;
    {
        let mut st = daemon.state();
        // Gone meanwhile (released, or its holders died): ended below.
        if let Some(l) = st.remote.leases.get_mut(&key) {
            overdue = l.max_hold.as_ref().map(|m| tokio::time::Instant::now() + m.limit);
            l.phase = Phase::Held { token, since: SystemTime::now() };
            // A copy of the session's socket rides on the grant, as a local lease's lock file
            // does: the client (and the command it starts) then holds the session too, so the
            // lock outlives this daemon for as long as a holder lives.
            let fd = match session.socket().map(std::fs::File::try_clone) {
                Some(Ok(copy)) => Some(SendFd::Socket(Arc::new(copy))),
                Some(Err(e)) => {
                    tracing::warn!("cannot copy the server session's socket of remote lock {}: {e}", l.label());
                    None
                }
                None => None,
            };
            let fd_attached = fd.is_some();
            let reply = Reply::Granted { lease: key.1, path: l.name.clone(), token, fd_attached, file: None };
            let _ = l.tx.send(Outgoing { reply, fd });
        }
    }
    let every = server.heartbeat();
    let mut closed = session.closed();
    // A check-in went unanswered: the holder is told, but the session is kept, since the server
    // may still hold the lock for it; it ends when the holders have let go (`stop`), or when the
    // server or the network ends it (within the remote timeout).
    let mut suspect = false;
    // The kernel's guard of a bound command: armed on the session's socket for that command's
    // group, it kills the group the moment the session fails or the server ends it, even with
    // this daemon and `run` dead by then (`buildlock_sys::ipc::arm_kill_switch`). Armed from
    // the binding when `run` asked (it stops its command on a loss), else once `run` is gone
    // (this daemon is then the command's last watcher). Disarmed while this task talks on the
    // session (an answer would fire it), and at release. Only this task touches it: no race.
    let mut guarded: Option<u32> = None;
    // While the guard is armed: a process that arms it again if this daemon dies, disarmed or
    // not (a daemon killed during a check-in left the command unguarded), with the socket's
    // `TCP_USER_TIMEOUT` back at `T/4`: with the daemon gone, a living `run` sets its own.
    let mut keeper: Option<buildlock_sys::ipc::GuardKeeper> = None;
    let bounds = buildlock_remote::Bounds { remote_timeout };
    let mut guard_open = true;
    let ended = loop {
        tokio::select! {
            r = &mut *stop => break match r {
                Ok(s) => Ended::Released(s),
                Err(_) => Ended::HoldersGone,
            },
            _ = until(overdue) => overdue = daemon.stop_overdue_remote(key),
            _ = closed.changed() => {
                break Ended::Lost(closed.borrow().clone().unwrap_or_else(|| "the connection ended".into()));
            }
            changed = guard.changed(), if guard_open => {
                // Closed: the lease is gone from the daemon's table, and `stop` says how.
                guard_open = changed.is_ok();
                let now = *guard.borrow_and_update();
                if let Some(Guarding { pid, watched }) = now {
                    let timeout = if watched { bounds.unwatched_user_timeout() } else { bounds.user_timeout() };
                    set_user_timeout(&*session, &req.name, timeout);
                    if guarded.is_none() {
                        set_guard(&*session, &req.name, Some(pid));
                        keeper = keep_guard(&*session, &req.name, bounds.user_timeout());
                    }
                    guarded = Some(pid);
                    tracing::debug!(
                        "remote lock {}: the kernel guards pid {pid}'s group on the session ({})",
                        req.name,
                        if watched { "its run watches it too" } else { "nobody else watches it" }
                    );
                }
            }
            _ = tokio::time::sleep(every), if !suspect => {
                if guarded.is_some() {
                    set_guard(&*session, &req.name, None);
                    die_in_check_in_for_tests();
                }
                let answered = tokio::time::timeout(every, session.heartbeat()).await;
                // Armed again even on a failed check-in: the command is being stopped anyway.
                if guarded.is_some() {
                    set_guard(&*session, &req.name, guarded);
                }
                if let Err(why) = checked_in(answered, every) {
                    suspect = true;
                    daemon.remote_lost(key, &why);
                }
            }
        }
    };
    // The lease has ended: the keeper goes, and its copy of the session's socket with it,
    // before ours can be the last. (Were this task dropped instead, with the daemon shutting
    // down, the keeper would arm the guard: the command is then as alone as after a kill.)
    if let Some(keeper) = keeper {
        keeper.dismiss();
    }
    if matches!(ended, Ended::Released(_)) && guarded.is_some() {
        set_guard(&*session, &req.name, None);
    }
    match ended {
        Ended::HoldersGone => {
            // Only the daemon's copy closes, without a word to the server (an abort sends no
            // Terminate): a process still holding a copy (a command's child) keeps the lock,
            // and the server frees it when the last copy closes, at once once none is left.
            session.abort();
            // The connection's task is gone (what tells `closed` with it) before the client is
            // dropped, so it cannot say goodbye to the server for us; bounded in time.
            let mut gone = session.closed();
            let _ = tokio::time::timeout(every, gone.wait_for(|_| false)).await;
            drop(session);
        }
        Ended::Released(Stop { reuse, answer }) => {
            // Released: on the server at once, for every copy, bounded in time.
            if let Ok(Err(e)) = tokio::time::timeout(every, session.release()).await {
                tracing::warn!("{e}");
            }
            // Unlocked on the server (or the session is ending, which unlocks it).
            released(Some(Stop { reuse, answer }), key.1, &req.name);
            if reuse && session.reusable() {
                // Unlocked, and no copy of its socket left elsewhere: kept for the next lease.
                daemon.pool.put(pool_key, server, session);
            } else {
                // Ended for every copy (the server is told), bounded by the engine (a second).
                session.close().await;
            }
        }
        Ended::Lost(why) => {
            // The server has freed the lock (or will, the connection being gone).
            session.abort();
            if !suspect {
                daemon.remote_lost(key, &why);
            }
        }
    }
}

/// Says `Released` for lease `id` if its `Release` asked for an answer.
fn released(stop: Option<Stop>, id: LeaseRef, name: &str) {
    if let Some(tx) = stop.and_then(|s| s.answer) {
        let _ = tx.send(Outgoing { reply: Reply::Released { lease: id, path: name.to_owned() }, fd: None });
    }
}

/// Arms (`Some(pid)`) or disarms the kernel's guard on `session`'s socket (see [`drive`]).
fn set_guard(session: &dyn buildlock_remote::EngineSession, name: &str, on: Option<u32>) {
    #[cfg(unix)]
    if let Some(sock) = session.socket() {
        use std::os::fd::AsFd;
        let done = match on {
            Some(pid) => buildlock_sys::ipc::arm_kill_switch(sock.as_fd(), pid).map(drop),
            None => buildlock_sys::ipc::disarm_kill_switch(sock.as_fd()),
        };
        if let Err(e) = done {
            tracing::warn!("cannot set the kernel's guard on the session of remote lock {name}: {e}");
        }
    }
    #[cfg(not(unix))]
    let _ = (session, name, on);
}

/// Sets the `TCP_USER_TIMEOUT` of `session`'s socket (see [`Guarding::watched`]).
fn set_user_timeout(session: &dyn buildlock_remote::EngineSession, name: &str, timeout: Duration) {
    #[cfg(unix)]
    if let Some(sock) = session.socket() {
        use std::os::fd::AsFd;
        if let Err(e) = buildlock_sys::ipc::set_tcp_user_timeout(sock.as_fd(), timeout) {
            tracing::debug!("cannot set TCP_USER_TIMEOUT on the session of remote lock {name}: {e}");
        }
    }
    #[cfg(not(unix))]
    let _ = (session, name, timeout);
}

/// Starts the process that arms the kernel's guard on `session`'s socket again if this daemon
/// dies, its `TCP_USER_TIMEOUT` then `user_timeout`
/// (`buildlock_sys::ipc::keep_guard_after_death`); `None` where there is none.
fn keep_guard(
    session: &dyn buildlock_remote::EngineSession,
    name: &str,
    user_timeout: Duration,
) -> Option<buildlock_sys::ipc::GuardKeeper> {
    #[cfg(unix)]
    if let Some(sock) = session.socket() {
        use std::os::fd::AsFd;
        return match buildlock_sys::ipc::keep_guard_after_death(sock.as_fd(), Some(user_timeout)) {
            Ok(keeper) => keeper,
            Err(e) => {
                tracing::warn!(
                    "remote lock {name}: cannot start the process that keeps the kernel's guard armed if this daemon \
                     dies: {e}; the guard holds while the daemon lives"
                );
                None
            }
        };
    }
    let _ = (session, name, user_timeout);
    None
}

/// Test builds only: `BUILDLOCK_TEST_DIE_IN_CHECK_IN` kills the daemon (SIGKILL) right after it
/// disarmed the kernel's guard of a command for a check-in, the window in which a daemon
/// killed once left the command unguarded.
fn die_in_check_in_for_tests() {
    #[cfg(all(debug_assertions, unix))]
    if std::env::var_os("BUILDLOCK_TEST_DIE_IN_CHECK_IN").is_some() {
        let _ = buildlock_sys::send_signal(std::process::id(), crate::state::nix_sig::KILL);
    }
}

/// How a held lease's session ended.
enum Ended {
    /// Its client released it (`Release`).
    Released(Stop),
    /// Its holders are gone (connection closed, bound process exited), or it was forgotten.
    HoldersGone,
    /// The session was lost (the server or the network ended it).
    Lost(String),
}

/// How a check-in given `every` to answer went: why it failed, if it did.
fn checked_in(
    answered: Result<Result<(), buildlock_remote::Error>, tokio::time::error::Elapsed>,
    every: Duration,
) -> Result<(), String> {
    match answered {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("checking in failed: {e}")),
        Err(_) => Err(format!(
            "the server did not answer within {}s (network cut off, or the server hangs)",
            every.as_secs_f64()
        )),
    }
}

/// A lost lease's bound command, whose `run` is gone, is stopped here as `run` would have:
/// SIGTERM to its group, SIGKILL after the stop grace. Only the very process bound (its start
/// time) and its group are signalled.
fn stop_for_loss(l: &RemoteLease) {
    let (Some(pid), Some(bound)) = (l.bind_pid, l.bound.clone()) else { return };
    if buildlock_sys::process_state(&bound) != buildlock_sys::ProcessState::Alive {
        return;
    }
    let grace = l.stop_grace;
    tracing::warn!(
        "remote lock {} was lost while its holder's `run` is gone: SIGTERM to pid {pid}'s group ({}), SIGKILL \
         after {grace:?}",
        l.label(),
        l.command
    );
    crate::state::signal_bound(pid, crate::state::nix_sig::TERM, true);
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        if matches!(buildlock_sys::signal_group(pid, None), Ok(true)) {
            let _ = buildlock_sys::signal_group(pid, Some(crate::state::nix_sig::KILL));
        }
    });
}

/// Sleeps until `due`, or for ever.
async fn until(due: Option<tokio::time::Instant>) {
    match due {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
