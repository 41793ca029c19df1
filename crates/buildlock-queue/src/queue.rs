//! The state machine: holders and FIFO wait queues per key, deadlines, and the event queue.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::hash::Hash;
use std::time::Instant;

use crate::types::{Event, LeaseId, LeaseView, Mode, OwnerId, Request, State, Wait};

/// One live lease (held or waiting).
#[derive(Debug)]
pub(crate) struct Entry<K> {
    pub(crate) key: K,
    owner: OwnerId,
    pub(crate) mode: Mode,
    pub(crate) state: State,
    /// Requested at while waiting, granted at once held.
    since: Instant,
    /// The `Until` deadline while waiting; cleared when granted (it no longer matters).
    deadline: Option<Instant>,
}

/// Holders and waiters of one key. Exists only while at least one of the two sets is non-empty.
#[derive(Debug, Default)]
pub(crate) struct KeyState {
    pub(crate) holders: BTreeSet<LeaseId>,
    /// The single holder is exclusive. Meaningless (and kept `false`) when `holders` is empty.
    exclusive: bool,
    /// The wait queue. Lease ids grow with arrival order, so id order is FIFO order, and a
    /// waiter leaving from the middle costs O(log n).
    pub(crate) waiters: BTreeSet<LeaseId>,
}

impl KeyState {
    /// Whether a lease in `mode` is compatible with the current holders (ignoring the queue).
    pub(crate) fn admits(&self, mode: Mode) -> bool {
        self.holders.is_empty() || (!self.exclusive && mode == Mode::Shared)
    }

    fn is_idle(&self) -> bool {
        self.holders.is_empty() && self.waiters.is_empty()
    }
}

/// The lock table: every key's holders and wait queue, as a pure state machine.
///
/// See the [crate documentation](crate) for the rules and the driving loop.
pub struct Queue<K> {
    next_id: u64,
    pub(crate) leases: HashMap<LeaseId, Entry<K>>,
    pub(crate) keys: HashMap<K, KeyState>,
    owners: HashMap<OwnerId, BTreeSet<LeaseId>>,
    /// `(deadline, lease)` of every waiter with a `Wait::Until`.
    deadlines: BTreeSet<(Instant, LeaseId)>,
    events: VecDeque<Event<K>>,
    held: usize,
    waiting: usize,
}

impl<K> Default for Queue<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: fmt::Debug> fmt::Debug for Queue<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("held", &self.held)
            .field("waiting", &self.waiting)
            .field("keys", &self.keys)
            .field("pending_events", &self.events.len())
            .finish_non_exhaustive()
    }
}

impl<K> Queue<K> {
    /// An empty queue. Lease ids start at 1.
    pub fn new() -> Self {
        Queue {
            next_id: 1,
            leases: HashMap::new(),
            keys: HashMap::new(),
            owners: HashMap::new(),
            deadlines: BTreeSet::new(),
            events: VecDeque::new(),
            held: 0,
            waiting: 0,
        }
    }

    /// The next event, oldest first. Call until `None` after every input.
    pub fn poll_event(&mut self) -> Option<Event<K>> {
        self.events.pop_front()
    }

    /// The earliest `Wait::Until` deadline among waiters: call
    /// [`handle_timeout`](Self::handle_timeout) then (or at once, if it is already past).
    /// `None` when no waiter has a deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.first().map(|&(deadline, _)| deadline)
    }

    /// `(held leases, waiting leases)` over all keys.
    pub fn counts(&self) -> (usize, usize) {
        (self.held, self.waiting)
    }

    /// No lease is held or waiting (pending events may remain).
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    fn next_lease_id(&mut self) -> LeaseId {
        let id = LeaseId(self.next_id);
        self.next_id += 1;
        id
    }
}

impl<K: Eq + Hash + Clone> Queue<K> {
    /// Asks for a lease. The outcome arrives through [`poll_event`](Self::poll_event):
    /// [`Event::Granted`] at once if the request may be granted now (compatible with the holders
    /// and nobody waiting on the key), [`Event::Denied`] at once for a `NoWait` request that may
    /// not, and otherwise nothing yet: the request is queued and later gets `Granted` or
    /// `Expired` (or nothing, if it is released first).
    ///
    /// A `Wait::Until(t)` with `t <= now` that cannot be granted at once is queued like any
    /// other; it expires at the next [`handle_timeout`](Self::handle_timeout) (and
    /// [`poll_timeout`](Self::poll_timeout) reports `t`, so the driver calls it straight away),
    /// unless it is granted before that.
    ///
    /// Requests are not reentrant: an owner asking again for a key it holds exclusively waits
    /// behind itself like anybody else.
    pub fn acquire(&mut self, now: Instant, req: Request<K>) -> LeaseId {
        let id = self.next_lease_id();
        let Request { key, owner, mode, wait } = req;
        let grantable = self.keys.get(&key).is_none_or(|ks| ks.waiters.is_empty() && ks.admits(mode));
        if !grantable && wait == Wait::NoWait {
            self.events.push_back(Event::Denied { lease: id, key, owner });
            return id;
        }

        let ks = self.keys.entry(key.clone()).or_default();
        let (state, deadline) = if grantable {
            ks.holders.insert(id);
            ks.exclusive = mode == Mode::Exclusive;
            self.held += 1;
            self.events.push_back(Event::Granted { lease: id, key: key.clone(), owner, mode });
            (State::Held, None)
        } else {
            ks.waiters.insert(id);
            self.waiting += 1;
            let deadline = wait.deadline();
            if let Some(deadline) = deadline {
                self.deadlines.insert((deadline, id));
            }
            (State::Waiting, deadline)
        };
        self.owners.entry(owner).or_default().insert(id);
        self.leases.insert(id, Entry { key, owner, mode, state, since: now, deadline });
        id
    }

    /// Ends a lease: a holder releases its key, or a waiter cancels its request. Whatever this
    /// makes grantable on the key (the head of the queue and the readers right behind it) is
    /// granted in the same call, with `since = now`. No event is emitted for `lease` itself.
    ///
    /// Returns `false` if the lease is unknown: never issued, denied, expired, or already
    /// released.
    pub fn release(&mut self, lease: LeaseId, now: Instant) -> bool {
        match self.remove(lease) {
            Some(entry) => {
                self.promote(&entry.key, now);
                true
            }
            None => false,
        }
    }

    /// The owner went away: drops all its holds and waits (without events for them), then grants
    /// whatever that made grantable on the affected keys. Its own leases are all removed before
    /// anything is granted, so none of them is granted on the way out.
    ///
    /// Returns the dropped leases in increasing id order (empty if the owner had none).
    pub fn release_owner(&mut self, owner: OwnerId, now: Instant) -> Vec<LeaseId> {
        let Some(ids) = self.owners.remove(&owner) else {
            return Vec::new();
        };
        let ids: Vec<LeaseId> = ids.into_iter().collect();
        let touched: Vec<K> = ids.iter().filter_map(|&id| self.remove(id)).map(|entry| entry.key).collect();
        for key in &touched {
            self.promote(key, now);
        }
        ids
    }

    /// Expires every waiter whose deadline is `<= now` (one [`Event::Expired`] each, earliest
    /// deadline first), then grants whatever their leaving made grantable (those `Granted`
    /// events follow the `Expired` ones). Expiry happens only here: a waiter granted before
    /// `handle_timeout` runs is granted even if its deadline had passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<LeaseId> = self.deadlines.range(..=(now, LeaseId(u64::MAX))).map(|&(_, id)| id).collect();
        let mut touched = Vec::with_capacity(due.len());
        for id in due {
            if let Some(entry) = self.remove(id) {
                self.events.push_back(Event::Expired { lease: id, key: entry.key.clone(), owner: entry.owner });
                touched.push(entry.key);
            }
        }
        for key in &touched {
            self.promote(key, now);
        }
    }

    /// A live (held or waiting) lease.
    pub fn lease(&self, id: LeaseId) -> Option<LeaseView<'_, K>> {
        let entry = self.leases.get(&id)?;
        let position = match entry.state {
            State::Held => None,
            State::Waiting => Some(self.keys[&entry.key].waiters.range(..id).count()),
        };
        Some(view(id, entry, position))
    }

    /// The holders of `key`, in increasing id order (all shared, or a single exclusive one).
    pub fn holders(&self, key: &K) -> Vec<LeaseView<'_, K>> {
        self.keys
            .get(key)
            .map(|ks| ks.holders.iter().map(|&id| view(id, &self.leases[&id], None)).collect())
            .unwrap_or_default()
    }

    /// The waiters of `key`, in queue order (`position` 0, 1, 2, ...).
    pub fn waiters(&self, key: &K) -> Vec<LeaseView<'_, K>> {
        self.keys
            .get(key)
            .map(|ks| ks.waiters.iter().enumerate().map(|(pos, &id)| view(id, &self.leases[&id], Some(pos))).collect())
            .unwrap_or_default()
    }

    /// Keys with at least one holder or waiter, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &K> + '_ {
        self.keys.keys()
    }

    /// The `Wait::Until` deadline of a waiting lease; `None` if it is held, waits forever, or is
    /// unknown.
    pub fn deadline(&self, id: LeaseId) -> Option<Instant> {
        self.leases.get(&id).and_then(|entry| entry.deadline)
    }

    /// The live leases of `owner`, in increasing id order.
    pub fn owner_leases(&self, owner: OwnerId) -> Vec<LeaseId> {
        self.owners.get(&owner).map(|ids| ids.iter().copied().collect()).unwrap_or_default()
    }

    /// Forgets a live lease everywhere (key, owner, deadline, counters; the key and owner
    /// entries too once they become empty). Grants nothing and emits nothing.
    fn remove(&mut self, id: LeaseId) -> Option<Entry<K>> {
        let entry = self.leases.remove(&id)?;
        let ks = self.keys.get_mut(&entry.key).expect("a live lease's key has state");
        match entry.state {
            State::Held => {
                ks.holders.remove(&id);
                if ks.holders.is_empty() {
                    ks.exclusive = false;
                }
                self.held -= 1;
            }
            State::Waiting => {
                ks.waiters.remove(&id);
                self.waiting -= 1;
                if let Some(deadline) = entry.deadline {
                    self.deadlines.remove(&(deadline, id));
                }
            }
        }
        if ks.is_idle() {
            self.keys.remove(&entry.key);
        }
        // Absent when `release_owner` took the whole set out first.
        if let Some(ids) = self.owners.get_mut(&entry.owner) {
            ids.remove(&id);
            if ids.is_empty() {
                self.owners.remove(&entry.owner);
            }
        }
        Some(entry)
    }

    /// Grants the head of `key`'s queue while it is compatible with the holders: a writer alone,
    /// or a run of consecutive readers (the reader batch). Stops at the first waiter that must
    /// keep waiting, so nobody is overtaken.
    fn promote(&mut self, key: &K, now: Instant) {
        let Some(ks) = self.keys.get_mut(key) else {
            return;
        };
        while let Some(&head) = ks.waiters.first() {
            let entry = self.leases.get_mut(&head).expect("a waiter is a live lease");
            if !ks.admits(entry.mode) {
                break;
            }
            ks.waiters.pop_first();
            ks.holders.insert(head);
            ks.exclusive = entry.mode == Mode::Exclusive;
            entry.state = State::Held;
            entry.since = now;
            if let Some(deadline) = entry.deadline.take() {
                self.deadlines.remove(&(deadline, head));
            }
            self.waiting -= 1;
            self.held += 1;
            self.events.push_back(Event::Granted {
                lease: head,
                key: entry.key.clone(),
                owner: entry.owner,
                mode: entry.mode,
            });
        }
    }

    /// Checks every internal cross-reference; panics on the first inconsistency.
    #[cfg(test)]
    pub(crate) fn check_internals(&self) {
        let mut held = 0;
        let mut waiting = 0;
        let mut with_deadline = 0;
        for (&id, entry) in &self.leases {
            assert!(id.0 < self.next_id, "{id} from the future");
            let ks = self.keys.get(&entry.key).expect("lease's key has state");
            assert!(self.owners.get(&entry.owner).is_some_and(|ids| ids.contains(&id)), "{id} not under its owner");
            match entry.state {
                State::Held => {
                    held += 1;
                    assert!(ks.holders.contains(&id) && !ks.waiters.contains(&id));
                    assert!(entry.deadline.is_none());
                }
                State::Waiting => {
                    waiting += 1;
                    assert!(ks.waiters.contains(&id) && !ks.holders.contains(&id));
                    if let Some(deadline) = entry.deadline {
                        with_deadline += 1;
                        assert!(self.deadlines.contains(&(deadline, id)));
                    }
                }
            }
        }
        assert_eq!((held, waiting), (self.held, self.waiting));
        assert_eq!(with_deadline, self.deadlines.len());
        let mut in_keys = 0;
        for (key, ks) in &self.keys {
            assert!(!ks.is_idle(), "idle key retained");
            in_keys += ks.holders.len() + ks.waiters.len();
            for id in ks.holders.iter().chain(&ks.waiters) {
                assert!(self.leases[id].key == *key);
            }
            let exclusive = ks.holders.iter().filter(|id| self.leases[id].mode == Mode::Exclusive).count();
            assert!(exclusive == 0 || ks.holders.len() == 1, "exclusive holder shares its key");
            assert_eq!(ks.exclusive, exclusive == 1);
        }
        assert_eq!(in_keys, self.leases.len());
        let in_owners: usize = self.owners.values().map(|ids| ids.len()).sum();
        assert_eq!(in_owners, self.leases.len());
        assert!(self.owners.values().all(|ids| !ids.is_empty()), "empty owner retained");
    }

    /// Sizes of the internal maps: `(leases, keys, owners, deadlines)`.
    #[cfg(test)]
    pub(crate) fn internal_sizes(&self) -> (usize, usize, usize, usize) {
        (self.leases.len(), self.keys.len(), self.owners.len(), self.deadlines.len())
    }
}

fn view<K>(id: LeaseId, entry: &Entry<K>, position: Option<usize>) -> LeaseView<'_, K> {
    LeaseView {
        id,
        key: &entry.key,
        owner: entry.owner,
        mode: entry.mode,
        state: entry.state,
        since: entry.since,
        position,
    }
}
