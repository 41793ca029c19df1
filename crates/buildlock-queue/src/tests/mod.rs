//! Tests: one unit test per rule, a simulated-time scenario, a 10,000-lease smoke test,
//! property tests over random operation sequences, and the small parts of the interface.

use std::time::{Duration, Instant};

use crate::{Event, LeaseId, Mode, OwnerId, Queue, Request, Wait};

mod deadlock;
mod props;
mod rules;
mod sim;
mod surface;

/// A fixed origin for the tests' time; everything else is `base() + Duration`.
fn base() -> Instant {
    use std::sync::OnceLock;
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// `base() + ms` milliseconds.
fn at(ms: u64) -> Instant {
    base() + Duration::from_millis(ms)
}

fn req<K>(key: K, owner: OwnerId, mode: Mode, wait: Wait) -> Request<K> {
    Request::new(key, owner, mode, wait)
}

/// Every pending event, in order.
fn drain<K>(q: &mut Queue<K>) -> Vec<Event<K>> {
    std::iter::from_fn(|| q.poll_event()).collect()
}

/// The leases of the `Granted` events, in order.
fn granted<K>(events: &[Event<K>]) -> Vec<LeaseId> {
    events.iter().filter(|e| matches!(e, Event::Granted { .. })).map(Event::lease).collect()
}

/// The leases of the `Expired` events, in order.
fn expired<K>(events: &[Event<K>]) -> Vec<LeaseId> {
    events.iter().filter(|e| matches!(e, Event::Expired { .. })).map(Event::lease).collect()
}
