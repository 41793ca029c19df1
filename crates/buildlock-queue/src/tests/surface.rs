//! The parts of the interface the rule tests do not reach: how ids and the queue print, the
//! accessors of `Event`, and `Mode`'s compatibility table.

use super::{at, drain, req};
use crate::{Event, LeaseId, Mode, Queue, Wait};

use Mode::{Exclusive, Shared};

#[test]
fn lease_ids_print_as_lease_number() {
    assert_eq!(LeaseId(7).to_string(), "lease#7");
    assert_eq!(format!("{}", LeaseId(u64::MAX)), format!("lease#{}", u64::MAX));
}

#[test]
fn queue_debug_shows_counts_and_pending_events() {
    let mut q = Queue::new();
    q.acquire(at(0), req("k", 1, Exclusive, Wait::Forever));
    q.acquire(at(0), req("k", 2, Shared, Wait::Forever));
    let text = format!("{q:?}");
    for part in ["Queue", "held: 1", "waiting: 1", "pending_events: 1", "\"k\""] {
        assert!(text.contains(part), "{part:?} missing from {text}");
    }
}

#[test]
fn event_accessors_name_lease_key_and_owner() {
    let mut q = Queue::new();
    let a = q.acquire(at(0), req("a", 11, Exclusive, Wait::Forever));
    let b = q.acquire(at(0), req("a", 12, Exclusive, Wait::NoWait));
    let c = q.acquire(at(0), req("a", 13, Shared, Wait::Until(at(5))));
    q.handle_timeout(at(5));
    let events = drain(&mut q);
    assert!(matches!(events[..], [Event::Granted { .. }, Event::Denied { .. }, Event::Expired { .. }]), "{events:?}");
    let seen: Vec<_> = events.iter().map(|e| (e.lease(), *e.key(), e.owner())).collect();
    assert_eq!(seen, vec![(a, "a", 11), (b, "a", 12), (c, "a", 13)]);
}

#[test]
fn only_shared_is_compatible_with_shared() {
    assert!(Shared.is_compatible_with(Shared));
    assert!(!Shared.is_compatible_with(Exclusive));
    assert!(!Exclusive.is_compatible_with(Shared));
    assert!(!Exclusive.is_compatible_with(Exclusive));
}
