//! The wait-for graph: the cycles it must find, the waits it must not call a deadlock, and a
//! property test against a brute-force graph that follows every wait.

use std::collections::{HashSet, VecDeque};

use proptest::collection::vec;
use proptest::prelude::*;

use super::{at, req};
use crate::{LeaseId, Link, Mode, OwnerId, Queue, State, Wait};

/// Parties are owners here (the daemon maps its leases to threads, bound processes and the
/// processes started below them): the cycle `asking` would close, as `(owner, holds, waits_for)`.
fn cycle_of(q: &Queue<&'static str>, key: &'static str, mode: Mode, asking: OwnerId) -> Option<Vec<Link3>> {
    let owner = |id| q.lease(id).expect("live").owner;
    let found = q.deadlock(&key, mode, |held| owner(held) == asking, |w, h| owner(w) == owner(h))?;
    Some(found.into_iter().map(|l| (owner(l.held), l.holds, l.waits_for)).collect())
}

type Link3 = (OwnerId, &'static str, &'static str);

fn take(q: &mut Queue<&'static str>, key: &'static str, owner: OwnerId, mode: Mode) -> LeaseId {
    q.acquire(at(0), req(key, owner, mode, Wait::Forever))
}

fn link(party: OwnerId, holds: &'static str, waits_for: &'static str) -> Link3 {
    (party, holds, waits_for)
}

#[test]
fn two_parties_each_holding_what_the_other_wants() {
    let mut q = Queue::new();
    take(&mut q, "A", 1, Mode::Exclusive);
    take(&mut q, "B", 2, Mode::Exclusive);
    take(&mut q, "A", 2, Mode::Exclusive); // 2 waits for A
    let cycle = cycle_of(&q, "B", Mode::Exclusive, 1);
    assert_eq!(cycle, Some(vec![link(1, "A", "B"), link(2, "B", "A")]));
    // Shared asks close it as well: 2 holds B exclusively.
    assert!(cycle_of(&q, "B", Mode::Shared, 1).is_some());
}

#[test]
fn three_parties_in_a_ring() {
    let mut q = Queue::new();
    take(&mut q, "A", 1, Mode::Exclusive);
    take(&mut q, "B", 2, Mode::Exclusive);
    take(&mut q, "C", 3, Mode::Shared);
    take(&mut q, "B", 1, Mode::Exclusive); // 1 waits for B
    take(&mut q, "C", 2, Mode::Exclusive); // 2 waits for C
    let cycle = cycle_of(&q, "A", Mode::Exclusive, 3);
    assert_eq!(cycle, Some(vec![link(3, "C", "A"), link(1, "A", "B"), link(2, "B", "C")]));
    // Another party asking for A only waits.
    assert_eq!(cycle_of(&q, "A", Mode::Exclusive, 4), None);
}

#[test]
fn a_party_asking_for_a_lock_it_holds() {
    let mut q = Queue::new();
    take(&mut q, "A", 1, Mode::Exclusive);
    assert_eq!(cycle_of(&q, "A", Mode::Exclusive, 1), Some(vec![link(1, "A", "A")]));
    assert_eq!(cycle_of(&q, "A", Mode::Shared, 1), Some(vec![link(1, "A", "A")]));
    // Behind another waiter too.
    take(&mut q, "A", 2, Mode::Exclusive);
    assert_eq!(cycle_of(&q, "A", Mode::Exclusive, 1), Some(vec![link(1, "A", "A")]));
}

#[test]
fn two_readers_that_both_ask_to_upgrade() {
    let mut q = Queue::new();
    take(&mut q, "A", 1, Mode::Shared);
    take(&mut q, "A", 2, Mode::Shared);
    // The first to ask waits for its own shared hold (and the other reader's).
    assert_eq!(cycle_of(&q, "A", Mode::Exclusive, 1), Some(vec![link(1, "A", "A")]));
    assert_eq!(cycle_of(&q, "A", Mode::Exclusive, 2), Some(vec![link(2, "A", "A")]));
    // A third reader joins without waiting: no cycle, nothing to wait for.
    assert_eq!(cycle_of(&q, "A", Mode::Shared, 3), None);
    // A stranger's exclusive ask only waits.
    assert_eq!(cycle_of(&q, "A", Mode::Exclusive, 3), None);
}

#[test]
fn a_cycle_through_the_queue_of_a_key() {
    // 1 holds A; 3 is queued for A; 2 holds B. When 1 waits for B and 2 asks for A, 2 waits
    // behind 3, who waits for 1, who waits for 2.
    let mut q = Queue::new();
    take(&mut q, "A", 1, Mode::Exclusive);
    take(&mut q, "A", 3, Mode::Exclusive);
    take(&mut q, "B", 2, Mode::Exclusive);
    assert_eq!(cycle_of(&q, "B", Mode::Exclusive, 1), None);
    take(&mut q, "B", 1, Mode::Exclusive);
    let cycle = cycle_of(&q, "A", Mode::Shared, 2);
    assert_eq!(cycle, Some(vec![link(2, "B", "A"), link(1, "A", "B")]));
}

#[test]
fn waits_that_end_are_not_deadlocks() {
    let mut q = Queue::new();
    // A chain: 1 holds A and waits for B; 2 holds B and waits for nothing.
    take(&mut q, "A", 1, Mode::Exclusive);
    take(&mut q, "B", 2, Mode::Exclusive);
    take(&mut q, "B", 1, Mode::Exclusive);
    assert_eq!(cycle_of(&q, "A", Mode::Exclusive, 3), None);
    assert_eq!(cycle_of(&q, "B", Mode::Exclusive, 3), None);
    // Readers sharing with readers never wait.
    take(&mut q, "C", 4, Mode::Shared);
    assert_eq!(cycle_of(&q, "C", Mode::Shared, 4), None);
    // A free lock.
    assert_eq!(cycle_of(&q, "D", Mode::Exclusive, 1), None);
    // A party that holds something nobody involved waits for.
    take(&mut q, "E", 5, Mode::Exclusive);
    assert_eq!(cycle_of(&q, "A", Mode::Exclusive, 5), None);
}

// --- Process trees: a process started below a holder acts for it ------------------------------

/// Owners as processes: 3 was started by 1, and 4 by 3.
fn parent(owner: OwnerId) -> Option<OwnerId> {
    match owner {
        3 => Some(1),
        4 => Some(3),
        _ => None,
    }
}

fn is_ancestor(a: OwnerId, mut of: OwnerId) -> bool {
    while let Some(p) = parent(of) {
        if p == a {
            return true;
        }
        of = p;
    }
    false
}

fn mine<K>(q: &Queue<K>, asking: OwnerId) -> impl Fn(LeaseId) -> bool + '_
where
    K: Eq + std::hash::Hash + Clone,
{
    move |held| {
        let o = q.lease(held).unwrap().owner;
        o == asking || is_ancestor(o, asking)
    }
}

fn acts_for<K>(q: &Queue<K>) -> impl Fn(LeaseId, LeaseId) -> bool + '_
where
    K: Eq + std::hash::Hash + Clone,
{
    move |w, h| {
        let (w, h) = (q.lease(w).unwrap().owner, q.lease(h).unwrap().owner);
        w == h || is_ancestor(h, w)
    }
}

#[test]
fn a_nested_run_acts_for_the_build_that_started_it() {
    // 1 (make) holds A; 2 holds B and waits for A; 4, started below 1, asks for B.
    let mut q = Queue::new();
    let a = take(&mut q, "A", 1, Mode::Exclusive);
    let b = take(&mut q, "B", 2, Mode::Exclusive);
    let w = take(&mut q, "A", 2, Mode::Exclusive);
    let found = q.deadlock(&"B", Mode::Exclusive, mine(&q, 4), acts_for(&q)).expect("a cycle");
    assert_eq!(
        found,
        vec![
            Link { held: a, holds: "A", waiting: None, waits_for: "B" },
            Link { held: b, holds: "B", waiting: Some(w), waits_for: "A" },
        ]
    );
    // 2 asking for what 4 (below 1) holds: 4's wait counts as 1's.
    let mut q = Queue::new();
    take(&mut q, "A", 2, Mode::Exclusive);
    take(&mut q, "B", 1, Mode::Exclusive);
    take(&mut q, "A", 4, Mode::Exclusive); // 4 waits for A on behalf of 1
    assert!(q.deadlock(&"B", Mode::Exclusive, mine(&q, 2), acts_for(&q)).is_some());
    // A process that is not below the holder only waits.
    assert!(q.deadlock(&"B", Mode::Exclusive, mine(&q, 5), acts_for(&q)).is_none());
}

// --- Property test against a brute-force graph ---------------------------------------------

/// Every lease that must leave before `id` (or a new request in `mode` on `key`) is granted:
/// the incompatible holders, and the incompatible waiters ahead of it.
fn all_blockers(q: &Queue<u8>, key: u8, mode: Mode, me: Option<LeaseId>) -> Vec<LeaseId> {
    let clash = |m: Mode| !(m == Mode::Shared && mode == Mode::Shared);
    let holders = q.holders(&key).into_iter().filter(|l| clash(l.mode)).map(|l| l.id);
    let ahead = q.waiters(&key).into_iter().filter(|l| me.is_none_or(|me| l.id < me) && clash(l.mode)).map(|l| l.id);
    holders.chain(ahead).collect()
}

fn brute_force(q: &Queue<u8>, key: u8, mode: Mode, asking: OwnerId) -> bool {
    let (mine, acts_for) = (mine(q, asking), acts_for(q));
    let mut todo: VecDeque<LeaseId> = all_blockers(q, key, mode, None).into();
    let mut seen: HashSet<LeaseId> = todo.iter().copied().collect();
    let waiting: Vec<LeaseId> = q.keys().flat_map(|k| q.waiters(k)).map(|w| w.id).collect();
    while let Some(id) = todo.pop_front() {
        let l = q.lease(id).unwrap();
        let next = match l.state {
            State::Held if mine(id) => return true,
            State::Held => waiting.iter().copied().filter(|&w| acts_for(w, id)).collect(),
            State::Waiting => all_blockers(q, *l.key, l.mode, Some(id)),
        };
        todo.extend(next.into_iter().filter(|n| seen.insert(*n)));
    }
    false
}

/// A reported cycle is made of real holds and waits.
fn check_cycle(q: &Queue<u8>, key: u8, asking: OwnerId, cycle: &[Link<u8>]) {
    assert!(mine(q, asking)(cycle[0].held) && cycle[0].waiting.is_none() && cycle[0].waits_for == key);
    for (i, l) in cycle.iter().enumerate() {
        let held = q.lease(l.held).unwrap();
        assert!(held.state == State::Held && *held.key == l.holds, "{l:?}");
        if let Some(w) = l.waiting {
            let waiting = q.lease(w).unwrap();
            assert!(waiting.state == State::Waiting && *waiting.key == l.waits_for, "{l:?}");
            assert!(acts_for(q)(w, l.held), "{l:?}: the wait is not on behalf of the holder");
        }
        assert_eq!(i == 0, l.waiting.is_none());
        let next = &cycle[(i + 1) % cycle.len()];
        assert_eq!(next.holds, l.waits_for, "the next step holds what {l:?} waits for");
    }
}

proptest! {
    #[test]
    fn agrees_with_a_graph_of_every_wait(
        ops in vec((0u8..4, 0u64..6, any::<bool>(), any::<bool>()), 1..40),
        asks in vec((0u8..4, 0u64..6, any::<bool>()), 1..8),
    ) {
        let mut q: Queue<u8> = Queue::new();
        let mut live = Vec::new();
        for (key, owner, exclusive, release) in ops {
            if release && !live.is_empty() {
                let id = live.remove(usize::from(key) % live.len());
                q.release(id, at(1));
            } else {
                let mode = if exclusive { Mode::Exclusive } else { Mode::Shared };
                live.push(q.acquire(at(0), req(key, owner, mode, Wait::Forever)));
            }
            while q.poll_event().is_some() {}
        }
        for (key, asking, exclusive) in asks {
            let mode = if exclusive { Mode::Exclusive } else { Mode::Shared };
            let found = q.deadlock(&key, mode, mine(&q, asking), acts_for(&q));
            prop_assert_eq!(found.is_some(), brute_force(&q, key, mode, asking), "ask {} {:?} by {}", key, mode, asking);
            if let Some(cycle) = found {
                check_cycle(&q, key, asking, &cycle);
            }
        }
    }
}
