//! Plain data of the queue's interface: requests in, events out, read-only views of leases.

use std::fmt;
use std::time::Instant;

/// Who asked for a lease: typically one client connection of the daemon. Opaque to the queue;
/// it only groups leases so [`Queue::release_owner`](crate::Queue::release_owner) can drop them
/// together.
pub type OwnerId = u64;

/// Identifies one request, from [`Queue::acquire`](crate::Queue::acquire) until it is released,
/// cancelled, denied or expired.
///
/// Ids are handed out in increasing order and never reused by a queue, so comparing two ids
/// compares the order in which their requests arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub u64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lease#{}", self.0)
    }
}

/// How a lease holds its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// A reader: any number of shared holders may hold a key together.
    Shared,
    /// A writer: the only holder of its key.
    Exclusive,
}

impl Mode {
    /// Whether a lease in this mode may hold a key together with one in `other`: only shared with
    /// shared.
    pub fn is_compatible_with(self, other: Mode) -> bool {
        self == Mode::Shared && other == Mode::Shared
    }
}

/// How long a request is prepared to wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Wait {
    /// Granted at once or [`Event::Denied`]; never queued.
    NoWait,
    /// Queued if need be; [`Event::Expired`] once a `handle_timeout(now)` sees `deadline <= now`.
    Until(Instant),
    /// Queued until granted, released (cancelled) or its owner goes away.
    Forever,
}

impl Wait {
    /// The deadline of [`Wait::Until`], `None` for the others.
    pub fn deadline(self) -> Option<Instant> {
        match self {
            Wait::Until(deadline) => Some(deadline),
            Wait::NoWait | Wait::Forever => None,
        }
    }
}

/// One request for a lease on `key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request<K> {
    /// The lock's name.
    pub key: K,
    /// Who asks (see [`OwnerId`]).
    pub owner: OwnerId,
    /// Shared or exclusive.
    pub mode: Mode,
    /// How long to wait if it cannot be granted at once.
    pub wait: Wait,
}

impl<K> Request<K> {
    /// Shorthand for the struct literal.
    pub fn new(key: K, owner: OwnerId, mode: Mode, wait: Wait) -> Self {
        Request { key, owner, mode, wait }
    }
}

/// What the queue tells its driver, via [`Queue::poll_event`](crate::Queue::poll_event), in the
/// order things happened. Each lease gets at most one event, and it is the lease's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<K> {
    /// The lease now holds `key` (at once on `acquire`, or later when it reached the head of the
    /// queue). It stays held until [`Queue::release`](crate::Queue::release) or
    /// [`Queue::release_owner`](crate::Queue::release_owner).
    Granted { lease: LeaseId, key: K, owner: OwnerId, mode: Mode },
    /// A [`Wait::NoWait`] request that could not be granted at once. It was never queued and the
    /// queue has already forgotten it.
    Denied { lease: LeaseId, key: K, owner: OwnerId },
    /// A waiter's [`Wait::Until`] deadline passed; it left the queue and is forgotten.
    Expired { lease: LeaseId, key: K, owner: OwnerId },
}

impl<K> Event<K> {
    /// The lease the event is about.
    pub fn lease(&self) -> LeaseId {
        match self {
            Event::Granted { lease, .. } | Event::Denied { lease, .. } | Event::Expired { lease, .. } => *lease,
        }
    }

    /// The key the event is about.
    pub fn key(&self) -> &K {
        match self {
            Event::Granted { key, .. } | Event::Denied { key, .. } | Event::Expired { key, .. } => key,
        }
    }

    /// The owner of the lease the event is about.
    pub fn owner(&self) -> OwnerId {
        match self {
            Event::Granted { owner, .. } | Event::Denied { owner, .. } | Event::Expired { owner, .. } => *owner,
        }
    }
}

/// Where a live lease stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// It holds its key.
    Held,
    /// It is in its key's wait queue.
    Waiting,
}

/// A read-only look at one live lease, for status displays and the driver's bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseView<'a, K> {
    pub id: LeaseId,
    pub key: &'a K,
    pub owner: OwnerId,
    pub mode: Mode,
    pub state: State,
    /// When it was requested while [`State::Waiting`]; when it was granted once [`State::Held`].
    pub since: Instant,
    /// 0-based place in its key's wait queue while waiting (0 = next in line); `None` when held.
    pub position: Option<usize>,
}
