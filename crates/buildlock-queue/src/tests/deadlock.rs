//! The wait-for graph: the cycles it must find, the waits it must not call a deadlock, and a
//! property test against a brute-force graph that follows every wait.

use std::collections::{HashMap, HashSet, VecDeque};

use proptest::collection::vec;
use proptest::prelude::*;

use super::{at, req};
use crate::{LeaseId, Link, Mode, OwnerId, Queue, State, Wait};

/// Parties are owners here (the daemon maps its leases to threads and bound processes).
fn party<'a>(q: &'a Queue<&'static str>) -> impl Fn(LeaseId) -> OwnerId + 'a {
    move |id| q.lease(id).expect("live").owner
}

fn take(q: &mut Queue<&'static str>, key: &'static str, owner: OwnerId, mode: Mode) -> LeaseId {
    q.acquire(at(0), req(key, owner, mode, Wait::Forever))
}

fn link(party: OwnerId, holds: &'static str, waits_for: &'static str) -> Link<&'static str, OwnerId> {
    Link { party, holds, waits_for }
}

#[test]
fn two_parties_each_holding_what_the_other_wants() {
    let mut q = Queue::new();
    take(&mut q, "A", 1, Mode::Exclusive);
    take(&mut q, "B", 2, Mode::Exclusive);
    take(&mut q, "A", 2, Mode::Exclusive); // 2 waits for A
    let cycle = q.deadlock(&"B", Mode::Exclusive, &1, party(&q));
    assert_eq!(cycle, Some(vec![link(1, "A", "B"), link(2, "B", "A")]));
    // Shared asks close it as well: 2 holds B exclusively.
    assert!(q.deadlock(&"B", Mode::Shared, &1, party(&q)).is_some());
}

#[test]
fn three_parties_in_a_ring() {
    let mut q = Queue::new();
    take(&mut q, "A", 1, Mode::Exclusive);
    take(&mut q, "B", 2, Mode::Exclusive);
    take(&mut q, "C", 3, Mode::Shared);
    take(&mut q, "B", 1, Mode::Exclusive); // 1 waits for B
    take(&mut q, "C", 2, Mode::Exclusive); // 2 waits for C
    let cycle = q.deadlock(&"A", Mode::Exclusive, &3, party(&q));
    assert_eq!(cycle, Some(vec![link(3, "C", "A"), link(1, "A", "B"), link(2, "B", "C")]));
    // Another party asking for A only waits.
    assert_eq!(q.deadlock(&"A", Mode::Exclusive, &4, party(&q)), None);
}

#[test]
fn a_party_asking_for_a_lock_it_holds() {
    let mut q = Queue::new();
    take(&mut q, "A", 1, Mode::Exclusive);
    assert_eq!(q.deadlock(&"A", Mode::Exclusive, &1, party(&q)), Some(vec![link(1, "A", "A")]));
    assert_eq!(q.deadlock(&"A", Mode::Shared, &1, party(&q)), Some(vec![link(1, "A", "A")]));
    // Behind another waiter too.
    take(&mut q, "A", 2, Mode::Exclusive);
    assert_eq!(q.deadlock(&"A", Mode::Exclusive, &1, party(&q)), Some(vec![link(1, "A", "A")]));
}

#[test]
fn two_readers_that_both_ask_to_upgrade() {
    let mut q = Queue::new();
    take(&mut q, "A", 1, Mode::Shared);
    take(&mut q, "A", 2, Mode::Shared);
    // The first to ask waits for its own shared hold (and the other reader's).
    assert_eq!(q.deadlock(&"A", Mode::Exclusive, &1, party(&q)), Some(vec![link(1, "A", "A")]));
    assert_eq!(q.deadlock(&"A", Mode::Exclusive, &2, party(&q)), Some(vec![link(2, "A", "A")]));
    // A third reader joins without waiting: no cycle, nothing to wait for.
    assert_eq!(q.deadlock(&"A", Mode::Shared, &3, party(&q)), None);
    // A stranger's exclusive ask only waits.
    assert_eq!(q.deadlock(&"A", Mode::Exclusive, &3, party(&q)), None);
}

#[test]
fn a_cycle_through_the_queue_of_a_key() {
    // 1 holds A; 3 is queued for A; 2 holds B. When 1 waits for B and 2 asks for A, 2 waits
    // behind 3, who waits for 1, who waits for 2.
    let mut q = Queue::new();
    take(&mut q, "A", 1, Mode::Exclusive);
    take(&mut q, "A", 3, Mode::Exclusive);
    take(&mut q, "B", 2, Mode::Exclusive);
    assert_eq!(q.deadlock(&"B", Mode::Exclusive, &1, party(&q)), None);
    take(&mut q, "B", 1, Mode::Exclusive);
    let cycle = q.deadlock(&"A", Mode::Shared, &2, party(&q));
    assert_eq!(cycle, Some(vec![link(2, "B", "A"), link(1, "A", "B")]));
}

#[test]
fn waits_that_end_are_not_deadlocks() {
    let mut q = Queue::new();
    // A chain: 1 holds A and waits for B; 2 holds B and waits for nothing.
    take(&mut q, "A", 1, Mode::Exclusive);
    take(&mut q, "B", 2, Mode::Exclusive);
    take(&mut q, "B", 1, Mode::Exclusive);
    assert_eq!(q.deadlock(&"A", Mode::Exclusive, &3, party(&q)), None);
    assert_eq!(q.deadlock(&"B", Mode::Exclusive, &3, party(&q)), None);
    // Readers sharing with readers never wait.
    take(&mut q, "C", 4, Mode::Shared);
    assert_eq!(q.deadlock(&"C", Mode::Shared, &4, party(&q)), None);
    // A free lock.
    assert_eq!(q.deadlock(&"D", Mode::Exclusive, &1, party(&q)), None);
    // A party that holds something nobody involved waits for.
    take(&mut q, "E", 5, Mode::Exclusive);
    assert_eq!(q.deadlock(&"A", Mode::Exclusive, &5, party(&q)), None);
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
    let mut todo: VecDeque<LeaseId> = all_blockers(q, key, mode, None).into();
    let mut seen: HashSet<LeaseId> = todo.iter().copied().collect();
    let waiting: HashMap<OwnerId, Vec<LeaseId>> = q.keys().fold(HashMap::new(), |mut m, k| {
        for w in q.waiters(k) {
            m.entry(w.owner).or_default().push(w.id);
        }
        m
    });
    while let Some(id) = todo.pop_front() {
        let l = q.lease(id).unwrap();
        let next = match l.state {
            State::Held if l.owner == asking => return true,
            State::Held => waiting.get(&l.owner).cloned().unwrap_or_default(),
            State::Waiting => all_blockers(q, *l.key, l.mode, Some(id)),
        };
        todo.extend(next.into_iter().filter(|n| seen.insert(*n)));
    }
    false
}

/// A reported cycle is made of real holds and waits.
fn check_cycle(q: &Queue<u8>, key: u8, asking: OwnerId, cycle: &[Link<u8, OwnerId>]) {
    assert_eq!(cycle[0].party, asking);
    assert_eq!(cycle[0].waits_for, key);
    for (i, l) in cycle.iter().enumerate() {
        assert!(q.holders(&l.holds).iter().any(|h| h.owner == l.party), "{l:?} does not hold");
        if i > 0 {
            assert!(q.waiters(&l.waits_for).iter().any(|w| w.owner == l.party), "{l:?} does not wait");
        }
        let next = &cycle[(i + 1) % cycle.len()];
        assert_eq!(next.holds, l.waits_for, "the next party holds what {l:?} waits for");
    }
}

proptest! {
    #[test]
    fn agrees_with_a_graph_of_every_wait(
        ops in vec((0u8..4, 0u64..5, any::<bool>(), any::<bool>()), 1..40),
        asks in vec((0u8..4, 0u64..5, any::<bool>()), 1..8),
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
            let found = q.deadlock(&key, mode, &asking, |id| q.lease(id).unwrap().owner);
            prop_assert_eq!(found.is_some(), brute_force(&q, key, mode, asking), "ask {} {:?} by {}", key, mode, asking);
            if let Some(cycle) = found {
                check_cycle(&q, key, asking, &cycle);
            }
        }
    }
}
