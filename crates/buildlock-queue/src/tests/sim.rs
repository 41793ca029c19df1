//! Scenario tests: simulated time driven like the daemon would, and 10,000-lease smoke tests.

use std::collections::HashSet;

use super::{at, drain, expired, granted, req};
use crate::{Event, LeaseId, Mode, Queue, State, Wait};

/// Three writers with different deadlines wait behind a holder; time advances in 5 ms steps and,
/// like the driver, `handle_timeout` runs whenever `poll_timeout` is due. Exactly the writers
/// whose deadline passed before they were granted expire, each in the step its deadline is
/// reached.
#[test]
fn simulated_time_three_writers_with_different_deadlines() {
    let mut q = Queue::new();
    let holder = q.acquire(at(0), req("k", 1, Mode::Exclusive, Wait::Forever));
    let w30 = q.acquire(at(0), req("k", 2, Mode::Exclusive, Wait::Until(at(30))));
    let w10 = q.acquire(at(1), req("k", 3, Mode::Exclusive, Wait::Until(at(10))));
    let w20 = q.acquire(at(2), req("k", 4, Mode::Exclusive, Wait::Until(at(20))));
    assert_eq!(granted(&drain(&mut q)), vec![holder]);

    // (time in ms, leases Expired, leases Granted) at each step.
    let release_holder_at = 25;
    let mut timeline = Vec::new();
    for now_ms in (0..=40).step_by(5) {
        let now = at(now_ms);
        if now_ms == release_holder_at {
            assert!(q.release(holder, now));
        }
        if q.poll_timeout().is_some_and(|t| t <= now) {
            q.handle_timeout(now);
        }
        let events = drain(&mut q);
        timeline.push((now_ms, expired(&events), granted(&events)));
        q.check_internals();
    }
    let expected: Vec<(u64, Vec<LeaseId>, Vec<LeaseId>)> = vec![
        (0, vec![], vec![]),
        (5, vec![], vec![]),
        (10, vec![w10], vec![]),
        (15, vec![], vec![]),
        (20, vec![w20], vec![]),
        (25, vec![], vec![w30]), // granted 5 ms before its deadline
        (30, vec![], vec![]),    // so it does not expire
        (35, vec![], vec![]),
        (40, vec![], vec![]),
    ];
    assert_eq!(timeline, expected);
    assert_eq!(q.lease(w30).map(|v| (v.state, v.since)), Some((State::Held, at(25))));
    assert_eq!(q.poll_timeout(), None);
}

/// Same writers, the holder never releases, and the driver checks timers at odd moments: all
/// three expire in deadline order, each exactly at the first `handle_timeout` at or after it.
#[test]
fn simulated_time_all_writers_expire_in_deadline_order() {
    let mut q = Queue::new();
    q.acquire(at(0), req("k", 1, Mode::Exclusive, Wait::Forever));
    let w30 = q.acquire(at(0), req("k", 2, Mode::Exclusive, Wait::Until(at(30))));
    let w10 = q.acquire(at(0), req("k", 3, Mode::Exclusive, Wait::Until(at(10))));
    let w20 = q.acquire(at(0), req("k", 4, Mode::Exclusive, Wait::Until(at(20))));
    drain(&mut q);

    let mut seen = Vec::new();
    for now_ms in [3, 9, 10, 19, 31, 50] {
        q.handle_timeout(at(now_ms));
        seen.push((now_ms, expired(&drain(&mut q))));
    }
    assert_eq!(seen, vec![(3, vec![]), (9, vec![]), (10, vec![w10]), (19, vec![]), (31, vec![w20, w30]), (50, vec![])]);
    assert_eq!(q.counts(), (1, 0));
}

/// 10,000 leases over 1,000 keys and 97 owners, mixed modes and deadlines; then everything goes
/// (half the owners disconnect, the rest release lease by lease, some leases expire) and every
/// internal map must be empty.
#[test]
fn smoke_ten_thousand_leases_many_keys() {
    const N: u64 = 10_000;
    let mut q = Queue::new();
    let mut ids = Vec::new();
    for i in 0..N {
        let mode = if i % 7 == 0 { Mode::Exclusive } else { Mode::Shared };
        let wait = if i % 3 == 0 { Wait::Until(at(1_000 + i)) } else { Wait::Forever };
        ids.push(q.acquire(at(i / 100), req(i % 1_000, i % 97, mode, wait)));
    }
    let (held, waiting) = q.counts();
    assert_eq!(held + waiting, N as usize);
    assert_eq!(q.keys().count(), 1_000);
    q.check_internals();

    let mut granted_once = HashSet::new();
    let mut check_events = |q: &mut Queue<u64>| {
        for event in drain(q) {
            assert!(!matches!(event, Event::Denied { .. }));
            assert!(granted_once.insert(event.lease()), "second outcome for {}", event.lease());
        }
    };
    check_events(&mut q);

    let now = at(500);
    for owner in (0..97).step_by(2) {
        q.release_owner(owner, now);
        check_events(&mut q);
    }
    q.check_internals();
    q.handle_timeout(at(1_000 + N / 2)); // the first half of the remaining deadlines pass
    check_events(&mut q);
    q.check_internals();
    for (n, &id) in ids.iter().enumerate() {
        q.release(id, at(20_000));
        check_events(&mut q);
        if n % 2_500 == 0 {
            q.check_internals();
        }
    }

    assert_eq!(q.counts(), (0, 0));
    assert_eq!(q.keys().count(), 0);
    assert_eq!(q.poll_timeout(), None);
    assert_eq!(q.internal_sizes(), (0, 0, 0, 0));
    assert!(q.is_empty());
    q.check_internals();
}

/// 10,000 writers queued on one key, cancelled from the back and the middle: the queue keeps
/// FIFO order and stays fast (removal from the middle is not linear).
#[test]
fn smoke_ten_thousand_waiters_on_one_key() {
    let mut q = Queue::new();
    let ids: Vec<LeaseId> =
        (0..10_000).map(|i| q.acquire(at(0), req("one", i, Mode::Exclusive, Wait::Until(at(1 + i))))).collect();
    assert_eq!(q.counts(), (1, 9_999));
    assert_eq!(q.lease(ids[9_999]).unwrap().position, Some(9_998));
    for &id in ids.iter().skip(1).step_by(2) {
        assert!(q.release(id, at(0)));
    }
    assert_eq!(q.counts(), (1, 4_999));
    q.check_internals();
    // Holder 0 releases; next in line is ids[2] (ids[1] was cancelled).
    q.release(ids[0], at(0));
    assert_eq!(granted(&drain(&mut q)), vec![ids[0], ids[2]]);
    q.handle_timeout(at(20_000));
    assert_eq!(expired(&drain(&mut q)).len(), 4_998);
    q.release(ids[2], at(20_000));
    assert_eq!(q.internal_sizes(), (0, 0, 0, 0));
}
