//! One unit test per documented rule, named after it.

use super::{at, drain, expired, granted, req};
use crate::{Event, LeaseId, Mode, Queue, State, Wait};

use Mode::{Exclusive, Shared};
use Wait::{Forever, NoWait, Until};

const K: &str = "target";

#[test]
fn exclusive_granted_at_once_when_free() {
    let mut q = Queue::new();
    let a = q.acquire(at(0), req(K, 1, Exclusive, Forever));
    assert_eq!(drain(&mut q), vec![Event::Granted { lease: a, key: K, owner: 1, mode: Exclusive }]);
    let view = q.lease(a).unwrap();
    assert_eq!((view.state, view.since, view.position), (State::Held, at(0), None));
    assert_eq!(q.counts(), (1, 0));
    q.check_internals();
}

#[test]
fn shared_holders_coexist() {
    let mut q = Queue::new();
    let ids: Vec<LeaseId> = (1..=3).map(|o| q.acquire(at(o), req(K, o, Shared, NoWait))).collect();
    assert_eq!(granted(&drain(&mut q)), ids);
    assert_eq!(q.holders(&K).iter().map(|v| v.id).collect::<Vec<_>>(), ids);
    q.check_internals();
}

#[test]
fn exclusive_waits_for_shared_holders() {
    let mut q = Queue::new();
    let r = q.acquire(at(0), req(K, 1, Shared, Forever));
    let w = q.acquire(at(1), req(K, 2, Exclusive, Forever));
    assert_eq!(granted(&drain(&mut q)), vec![r]);
    assert_eq!(q.lease(w).unwrap().state, State::Waiting);
    assert!(q.release(r, at(2)));
    assert_eq!(granted(&drain(&mut q)), vec![w]);
    q.check_internals();
}

#[test]
fn shared_waits_for_exclusive_holder() {
    let mut q = Queue::new();
    let w = q.acquire(at(0), req(K, 1, Exclusive, Forever));
    let r = q.acquire(at(1), req(K, 2, Shared, Forever));
    assert_eq!(granted(&drain(&mut q)), vec![w]);
    assert_eq!(q.lease(r).unwrap().state, State::Waiting);
    q.check_internals();
}

#[test]
fn fifo_order_of_exclusive_waiters() {
    let mut q = Queue::new();
    let ids: Vec<LeaseId> = (0..5).map(|o| q.acquire(at(o), req(K, o, Exclusive, Forever))).collect();
    assert_eq!(granted(&drain(&mut q)), vec![ids[0]]);
    assert_eq!(q.waiters(&K).iter().map(|v| v.id).collect::<Vec<_>>(), ids[1..]);
    for (i, pair) in ids.windows(2).enumerate() {
        assert!(q.release(pair[0], at(10 + i as u64)));
        assert_eq!(granted(&drain(&mut q)), vec![pair[1]], "step {i}");
    }
    q.check_internals();
}

#[test]
fn readers_batched_when_writer_releases() {
    let mut q = Queue::new();
    let w = q.acquire(at(0), req(K, 1, Exclusive, Forever));
    let readers: Vec<LeaseId> = (2..=5).map(|o| q.acquire(at(o), req(K, o, Shared, Forever))).collect();
    drain(&mut q);
    assert!(q.release(w, at(9)));
    assert_eq!(granted(&drain(&mut q)), readers);
    assert!(q.holders(&K).iter().all(|v| v.since == at(9)));
    assert_eq!(q.counts(), (4, 0));
    q.check_internals();
}

#[test]
fn reader_batch_stops_at_next_writer() {
    let mut q = Queue::new();
    let w1 = q.acquire(at(0), req(K, 1, Exclusive, Forever));
    let r1 = q.acquire(at(1), req(K, 2, Shared, Forever));
    let r2 = q.acquire(at(2), req(K, 3, Shared, Forever));
    let w2 = q.acquire(at(3), req(K, 4, Exclusive, Forever));
    let r3 = q.acquire(at(4), req(K, 5, Shared, Forever));
    drain(&mut q);
    q.release(w1, at(5));
    assert_eq!(granted(&drain(&mut q)), vec![r1, r2]);
    assert_eq!(q.waiters(&K).iter().map(|v| v.id).collect::<Vec<_>>(), vec![w2, r3]);
    q.release(r1, at(6));
    assert_eq!(drain(&mut q), vec![]);
    q.release(r2, at(7));
    assert_eq!(granted(&drain(&mut q)), vec![w2]);
    q.release(w2, at(8));
    assert_eq!(granted(&drain(&mut q)), vec![r3]);
    q.check_internals();
}

#[test]
fn reader_queues_behind_waiting_writer() {
    let mut q = Queue::new();
    let r1 = q.acquire(at(0), req(K, 1, Shared, Forever));
    let w = q.acquire(at(1), req(K, 2, Exclusive, Forever));
    let r2 = q.acquire(at(2), req(K, 3, Shared, Forever));
    assert_eq!(granted(&drain(&mut q)), vec![r1]);
    assert_eq!(q.lease(r2).unwrap().state, State::Waiting);
    assert_eq!(q.lease(r2).unwrap().position, Some(1));
    q.release(r1, at(3));
    assert_eq!(granted(&drain(&mut q)), vec![w]);
    q.release(w, at(4));
    assert_eq!(granted(&drain(&mut q)), vec![r2]);
    q.check_internals();
}

#[test]
fn nowait_granted_when_free() {
    let mut q = Queue::new();
    let a = q.acquire(at(0), req(K, 1, Exclusive, NoWait));
    assert_eq!(granted(&drain(&mut q)), vec![a]);
    assert_eq!(q.lease(a).unwrap().state, State::Held);
}

#[test]
fn nowait_denied_when_busy_and_not_queued() {
    let mut q = Queue::new();
    let a = q.acquire(at(0), req(K, 1, Exclusive, Forever));
    let b = q.acquire(at(1), req(K, 2, Shared, NoWait));
    assert_eq!(
        drain(&mut q),
        vec![
            Event::Granted { lease: a, key: K, owner: 1, mode: Exclusive },
            Event::Denied { lease: b, key: K, owner: 2 }
        ]
    );
    assert!(q.lease(b).is_none());
    assert!(q.waiters(&K).is_empty());
    assert_eq!(q.counts(), (1, 0));
    assert!(!q.release(b, at(2)), "a denied lease is unknown");
    q.release(a, at(3));
    assert_eq!(drain(&mut q), vec![], "the denied request was never queued");
    q.check_internals();
}

#[test]
fn nowait_denied_when_someone_waits_even_if_compatible() {
    let mut q = Queue::new();
    q.acquire(at(0), req(K, 1, Shared, Forever));
    q.acquire(at(1), req(K, 2, Exclusive, Forever));
    let r = q.acquire(at(2), req(K, 3, Shared, NoWait));
    let events = drain(&mut q);
    assert_eq!(events.last(), Some(&Event::Denied { lease: r, key: K, owner: 3 }));
    assert_eq!(q.counts(), (1, 1));
}

#[test]
fn nowait_shared_joins_shared_holders() {
    let mut q = Queue::new();
    let r1 = q.acquire(at(0), req(K, 1, Shared, NoWait));
    let r2 = q.acquire(at(1), req(K, 2, Shared, NoWait));
    assert_eq!(granted(&drain(&mut q)), vec![r1, r2]);
}

#[test]
fn expired_waiter_unblocks_those_behind_it() {
    let mut q = Queue::new();
    let r1 = q.acquire(at(0), req(K, 1, Shared, Forever));
    let w = q.acquire(at(1), req(K, 2, Exclusive, Until(at(100))));
    let r2 = q.acquire(at(2), req(K, 3, Shared, Forever));
    let r3 = q.acquire(at(3), req(K, 4, Shared, Forever));
    assert_eq!(granted(&drain(&mut q)), vec![r1]);
    q.handle_timeout(at(100));
    assert_eq!(
        drain(&mut q),
        vec![
            Event::Expired { lease: w, key: K, owner: 2 },
            Event::Granted { lease: r2, key: K, owner: 3, mode: Shared },
            Event::Granted { lease: r3, key: K, owner: 4, mode: Shared },
        ]
    );
    assert_eq!(q.counts(), (3, 0));
    q.check_internals();
}

#[test]
fn expired_lease_is_forgotten() {
    let mut q = Queue::new();
    q.acquire(at(0), req(K, 1, Exclusive, Forever));
    let w = q.acquire(at(0), req(K, 2, Exclusive, Until(at(10))));
    q.handle_timeout(at(10));
    assert_eq!(expired(&drain(&mut q)), vec![w]);
    assert!(q.lease(w).is_none());
    assert!(!q.release(w, at(11)));
    assert!(q.owner_leases(2).is_empty());
    assert_eq!(q.poll_timeout(), None);
    q.check_internals();
}

#[test]
fn deadline_equal_to_now_expires_but_not_before() {
    let mut q = Queue::new();
    q.acquire(at(0), req(K, 1, Exclusive, Forever));
    let w = q.acquire(at(0), req(K, 2, Exclusive, Until(at(10))));
    drain(&mut q);
    q.handle_timeout(at(9));
    assert_eq!(drain(&mut q), vec![]);
    assert_eq!(q.lease(w).unwrap().state, State::Waiting);
    q.handle_timeout(at(10));
    assert_eq!(expired(&drain(&mut q)), vec![w]);
}

#[test]
fn until_in_the_past_is_queued_then_expires_on_next_timeout() {
    let mut q = Queue::new();
    q.acquire(at(0), req(K, 1, Exclusive, Forever));
    let w = q.acquire(at(50), req(K, 2, Exclusive, Until(at(20))));
    assert_eq!(drain(&mut q).len(), 1, "only the first grant; no Denied for a past deadline");
    assert_eq!(q.lease(w).unwrap().state, State::Waiting);
    assert_eq!(q.poll_timeout(), Some(at(20)), "past deadline reported, so the driver fires at once");
    q.handle_timeout(at(50));
    assert_eq!(expired(&drain(&mut q)), vec![w]);
}

#[test]
fn until_in_the_past_is_granted_when_free() {
    let mut q = Queue::new();
    let a = q.acquire(at(50), req(K, 1, Exclusive, Until(at(20))));
    assert_eq!(granted(&drain(&mut q)), vec![a]);
    assert_eq!(q.poll_timeout(), None);
    q.handle_timeout(at(60));
    assert_eq!(drain(&mut q), vec![], "a holder never expires");
}

#[test]
fn late_waiter_granted_before_handle_timeout_stays_granted() {
    let mut q = Queue::new();
    let a = q.acquire(at(0), req(K, 1, Exclusive, Forever));
    let w = q.acquire(at(0), req(K, 2, Exclusive, Until(at(10))));
    drain(&mut q);
    // The driver has not called handle_timeout yet when the holder releases after the deadline.
    q.release(a, at(15));
    assert_eq!(granted(&drain(&mut q)), vec![w]);
    q.handle_timeout(at(15));
    assert_eq!(drain(&mut q), vec![]);
    assert_eq!(q.lease(w).unwrap().state, State::Held);
}

#[test]
fn granted_waiter_no_longer_expires() {
    let mut q = Queue::new();
    let a = q.acquire(at(0), req("a", 1, Exclusive, Forever));
    let w1 = q.acquire(at(0), req("a", 2, Exclusive, Until(at(10))));
    let w2 = q.acquire(at(0), req("a", 3, Exclusive, Until(at(5))));
    let w3 = q.acquire(at(0), req("a", 4, Exclusive, Forever));
    drain(&mut q);
    q.release(a, at(1));
    assert_eq!(granted(&drain(&mut q)), vec![w1]);
    q.handle_timeout(at(10));
    // w1 holds now (its deadline no longer matters); w2 expires; w3 still waits for w1.
    assert_eq!(drain(&mut q), vec![Event::Expired { lease: w2, key: "a", owner: 3 }]);
    q.release(w1, at(11));
    assert_eq!(granted(&drain(&mut q)), vec![w3]);
    q.check_internals();
}

#[test]
fn cancelled_waiter_unblocks_those_behind_it() {
    let mut q = Queue::new();
    let r1 = q.acquire(at(0), req(K, 1, Shared, Forever));
    let w = q.acquire(at(1), req(K, 2, Exclusive, Forever));
    let r2 = q.acquire(at(2), req(K, 3, Shared, Forever));
    drain(&mut q);
    assert!(q.release(w, at(3)), "a waiter cancels");
    assert_eq!(granted(&drain(&mut q)), vec![r2], "no event for the cancelled lease itself");
    assert_eq!(q.holders(&K).iter().map(|v| v.id).collect::<Vec<_>>(), vec![r1, r2]);
    q.check_internals();
}

#[test]
fn cancelling_a_waiter_clears_its_deadline() {
    let mut q = Queue::new();
    q.acquire(at(0), req(K, 1, Exclusive, Forever));
    let w = q.acquire(at(0), req(K, 2, Exclusive, Until(at(10))));
    assert!(q.release(w, at(1)));
    assert_eq!(q.poll_timeout(), None);
    q.handle_timeout(at(10));
    assert_eq!(drain(&mut q).len(), 1, "just the first grant, no Expired");
}

#[test]
fn release_last_holder_grants_head_in_same_call() {
    let mut q = Queue::new();
    let r1 = q.acquire(at(0), req(K, 1, Shared, Forever));
    let r2 = q.acquire(at(0), req(K, 2, Shared, Forever));
    let w = q.acquire(at(1), req(K, 3, Exclusive, Forever));
    drain(&mut q);
    q.release(r1, at(2));
    assert_eq!(drain(&mut q), vec![], "one reader still holds");
    q.release(r2, at(3));
    assert_eq!(drain(&mut q), vec![Event::Granted { lease: w, key: K, owner: 3, mode: Exclusive }]);
    assert_eq!(q.lease(w).unwrap().since, at(3));
}

#[test]
fn release_unknown_lease_returns_false() {
    let mut q: Queue<&str> = Queue::new();
    assert!(!q.release(LeaseId(42), at(0)));
    let a = q.acquire(at(0), req(K, 1, Exclusive, Forever));
    assert!(q.release(a, at(1)));
    assert!(!q.release(a, at(2)), "double release");
    assert_eq!(drain(&mut q).len(), 1);
}

#[test]
fn release_owner_drops_holds_and_waits() {
    let mut q = Queue::new();
    let held_a = q.acquire(at(0), req("a", 7, Exclusive, Forever));
    let held_b = q.acquire(at(0), req("b", 7, Shared, Forever));
    let other_b = q.acquire(at(0), req("b", 8, Exclusive, Until(at(100))));
    let wait_b = q.acquire(at(0), req("b", 7, Shared, Until(at(50))));
    let other_a = q.acquire(at(1), req("a", 9, Shared, Forever));
    drain(&mut q);
    assert_eq!(q.owner_leases(7), vec![held_a, held_b, wait_b]);

    assert_eq!(q.release_owner(7, at(2)), vec![held_a, held_b, wait_b]);
    assert_eq!(granted(&drain(&mut q)), vec![other_a, other_b]);
    for id in [held_a, held_b, wait_b] {
        assert!(q.lease(id).is_none());
    }
    assert!(q.owner_leases(7).is_empty());
    assert_eq!(q.counts(), (2, 0));
    assert_eq!(q.poll_timeout(), None);
    assert!(q.release_owner(7, at(3)).is_empty());
    q.check_internals();
}

#[test]
fn release_owner_grants_none_of_its_own_leases() {
    let mut q = Queue::new();
    let a = q.acquire(at(0), req(K, 1, Exclusive, Forever));
    let again = q.acquire(at(1), req(K, 1, Exclusive, Forever));
    let other = q.acquire(at(2), req(K, 2, Exclusive, Forever));
    drain(&mut q);
    assert_eq!(q.release_owner(1, at(3)), vec![a, again]);
    assert_eq!(drain(&mut q), vec![Event::Granted { lease: other, key: K, owner: 2, mode: Exclusive }]);
}

#[test]
fn owner_asking_again_for_its_exclusive_key_waits() {
    let mut q = Queue::new();
    let a = q.acquire(at(0), req(K, 1, Exclusive, Forever));
    let again = q.acquire(at(1), req(K, 1, Shared, Forever));
    assert_eq!(granted(&drain(&mut q)), vec![a]);
    assert_eq!(q.lease(again).unwrap().state, State::Waiting);
}

#[test]
fn empty_keys_are_forgotten() {
    let mut q = Queue::new();
    let a = q.acquire(at(0), req("a", 1, Exclusive, Forever));
    let b = q.acquire(at(0), req("b", 1, Shared, Forever));
    let c = q.acquire(at(0), req("c", 2, Exclusive, Forever));
    let c2 = q.acquire(at(0), req("c", 3, Exclusive, Until(at(5))));
    q.acquire(at(0), req("d", 3, Exclusive, NoWait));
    q.acquire(at(0), req("d", 4, Exclusive, NoWait)); // denied: must not create anything
    let mut keys: Vec<&str> = q.keys().copied().collect();
    keys.sort();
    assert_eq!(keys, ["a", "b", "c", "d"]);

    q.release(a, at(1));
    q.release(b, at(1));
    q.handle_timeout(at(5)); // c2 expires, c still holds
    q.release_owner(3, at(6)); // d's holder
    assert_eq!(q.keys().collect::<Vec<_>>(), [&"c"]);
    assert!(q.holders(&"a").is_empty() && q.waiters(&"a").is_empty());
    assert!(q.lease(c2).is_none());
    q.release(c, at(7));
    assert_eq!(q.keys().count(), 0);
    assert_eq!(q.internal_sizes(), (0, 0, 0, 0));
    assert!(q.is_empty());
    q.check_internals();
}

#[test]
fn poll_timeout_is_earliest_deadline() {
    let mut q = Queue::new();
    assert_eq!(q.poll_timeout(), None);
    let a = q.acquire(at(0), req("a", 1, Exclusive, Until(at(1))));
    assert_eq!(q.poll_timeout(), None, "a holder has no deadline");
    q.acquire(at(0), req("b", 1, Exclusive, Forever));
    let w30 = q.acquire(at(0), req("a", 2, Exclusive, Until(at(30))));
    let w10 = q.acquire(at(0), req("b", 3, Exclusive, Until(at(10))));
    q.acquire(at(0), req("a", 4, Exclusive, Forever));
    let w20 = q.acquire(at(0), req("a", 5, Exclusive, Until(at(20))));
    assert_eq!(q.poll_timeout(), Some(at(10)));
    assert_eq!(q.deadline(w20), Some(at(20)));
    q.release(w10, at(1)); // cancel
    assert_eq!(q.poll_timeout(), Some(at(20)));
    q.release(a, at(2)); // w30 is granted: its deadline goes
    assert_eq!(granted(&drain(&mut q)).last(), Some(&w30));
    assert_eq!(q.deadline(w30), None);
    assert_eq!(q.poll_timeout(), Some(at(20)));
    q.handle_timeout(at(20));
    assert_eq!(expired(&drain(&mut q)), vec![w20]);
    assert_eq!(q.poll_timeout(), None, "only Forever waiters left");
    q.check_internals();
}

#[test]
fn events_are_fifo() {
    let mut q = Queue::new();
    let a = q.acquire(at(0), req("a", 1, Exclusive, Forever));
    let b = q.acquire(at(0), req("a", 2, Exclusive, NoWait));
    let c = q.acquire(at(0), req("b", 3, Shared, Forever));
    let d = q.acquire(at(0), req("a", 4, Exclusive, Forever));
    q.release(a, at(1));
    assert_eq!(drain(&mut q).iter().map(Event::lease).collect::<Vec<_>>(), vec![a, b, c, d]);
    assert_eq!(q.poll_event(), None);
}

#[test]
fn lease_view_reports_state_since_and_position() {
    let mut q = Queue::new();
    let a = q.acquire(at(0), req(K, 1, Exclusive, Forever));
    let b = q.acquire(at(3), req(K, 2, Shared, Forever));
    let c = q.acquire(at(4), req(K, 3, Exclusive, Until(at(99))));
    let vb = q.lease(b).unwrap();
    assert_eq!(
        (*vb.key, vb.owner, vb.mode, vb.state, vb.since, vb.position),
        (K, 2, Shared, State::Waiting, at(3), Some(0))
    );
    assert_eq!(q.lease(c).unwrap().position, Some(1));
    assert_eq!(q.waiters(&K).iter().map(|v| (v.id, v.position)).collect::<Vec<_>>(), vec![(b, Some(0)), (c, Some(1))]);
    q.release(a, at(7));
    let vb = q.lease(b).unwrap();
    assert_eq!((vb.state, vb.since, vb.position), (State::Held, at(7), None), "since = grant time once held");
    assert_eq!(q.lease(c).unwrap().position, Some(0));
    assert!(q.lease(LeaseId(999)).is_none());
}

#[test]
fn keys_are_independent() {
    let mut q = Queue::new();
    let a = q.acquire(at(0), req("a", 1, Exclusive, Forever));
    let b = q.acquire(at(0), req("b", 1, Exclusive, NoWait));
    let a2 = q.acquire(at(0), req("a", 2, Exclusive, Forever));
    assert_eq!(granted(&drain(&mut q)), vec![a, b]);
    q.release(b, at(1));
    assert_eq!(drain(&mut q), vec![], "releasing b does not touch a's queue");
    q.release(a, at(2));
    assert_eq!(granted(&drain(&mut q)), vec![a2]);
}

#[test]
fn counts_track_held_and_waiting() {
    let mut q = Queue::new();
    q.acquire(at(0), req("a", 1, Shared, Forever));
    q.acquire(at(0), req("a", 2, Shared, Forever));
    q.acquire(at(0), req("a", 3, Exclusive, Forever));
    q.acquire(at(0), req("b", 3, Exclusive, Forever));
    q.acquire(at(0), req("b", 4, Shared, Until(at(5))));
    q.acquire(at(0), req("b", 5, Shared, NoWait));
    assert_eq!(q.counts(), (3, 2));
    q.handle_timeout(at(5));
    assert_eq!(q.counts(), (3, 1));
    q.release_owner(3, at(6));
    assert_eq!(q.counts(), (2, 0));
    q.check_internals();
}
