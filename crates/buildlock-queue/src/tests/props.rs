//! Property tests: random operation sequences over a few keys and owners, with the queue checked
//! against the rules and a record of every lease after each step.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

use super::{at, drain, req};
use crate::{Event, LeaseId, Mode, OwnerId, Queue, State, Wait};

const OWNERS: u64 = 5;

#[derive(Clone, Debug)]
enum WaitSpec {
    NoWait,
    Forever,
    /// `Until(now + ms)`; 0 is a deadline equal to now.
    In(u64),
    /// `Until(now - ms)`: a deadline already past.
    Ago(u64),
}

#[derive(Clone, Debug)]
enum Op {
    Acquire {
        key: u8,
        owner: OwnerId,
        exclusive: bool,
        wait: WaitSpec,
    },
    /// Release (or cancel) one of the live leases.
    Release(Index),
    /// Release any lease ever issued, usually a dead one (must return false then).
    ReleaseAny(Index),
    ReleaseOwner(OwnerId),
    /// Advance time by this many ms, then `handle_timeout`.
    Advance(u64),
}

fn op(keys: u8) -> impl Strategy<Value = Op> {
    let wait = prop_oneof![
        1 => Just(WaitSpec::NoWait),
        2 => Just(WaitSpec::Forever),
        3 => (0u64..40).prop_map(WaitSpec::In),
        1 => (0u64..10).prop_map(WaitSpec::Ago),
    ];
    prop_oneof![
        6 => (0..keys, 0..OWNERS, any::<bool>(), wait)
            .prop_map(|(key, owner, exclusive, wait)| Op::Acquire { key, owner, exclusive, wait }),
        3 => any::<Index>().prop_map(Op::Release),
        1 => any::<Index>().prop_map(Op::ReleaseAny),
        1 => (0..OWNERS).prop_map(Op::ReleaseOwner),
        3 => (0u64..20).prop_map(Op::Advance),
    ]
}

/// What the test knows of a live lease, learnt only from its own inputs and the events.
#[derive(Debug)]
struct Known {
    key: u8,
    owner: OwnerId,
    mode: Mode,
    held: bool,
    since: Instant,
    deadline: Option<Instant>,
}

#[derive(Default)]
struct Record {
    live: BTreeMap<LeaseId, Known>,
    issued: Vec<LeaseId>,
    /// Leases that had their one outcome event (Granted, Denied or Expired).
    outcome: HashSet<LeaseId>,
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut q: Queue<u8> = Queue::new();
    let mut rec = Record::default();
    let mut now = at(0);

    for op in ops {
        let mut nowait_request = None;
        let mut timeout_step = false;
        match op {
            Op::Acquire { key, owner, exclusive, wait } => {
                let wait = match wait {
                    WaitSpec::NoWait => Wait::NoWait,
                    WaitSpec::Forever => Wait::Forever,
                    WaitSpec::In(ms) => Wait::Until(now + Duration::from_millis(ms)),
                    WaitSpec::Ago(ms) => Wait::Until(now.checked_sub(Duration::from_millis(ms)).unwrap_or(now)),
                };
                let mode = if exclusive { Mode::Exclusive } else { Mode::Shared };
                let id = q.acquire(now, req(key, owner, mode, wait));
                prop_assert!(rec.issued.last().is_none_or(|&last| id > last), "ids grow with arrival");
                rec.issued.push(id);
                let known = Known { key, owner, mode, held: false, since: now, deadline: wait.deadline() };
                rec.live.insert(id, known);
                if wait == Wait::NoWait {
                    nowait_request = Some(id);
                }
            }
            Op::Release(index) => {
                if !rec.live.is_empty() {
                    let id = *rec.live.keys().nth(index.index(rec.live.len())).unwrap();
                    prop_assert!(q.release(id, now), "release of live {id}");
                    rec.live.remove(&id);
                }
            }
            Op::ReleaseAny(index) => {
                if !rec.issued.is_empty() {
                    let id = rec.issued[index.index(rec.issued.len())];
                    prop_assert_eq!(q.release(id, now), rec.live.remove(&id).is_some());
                }
            }
            Op::ReleaseOwner(owner) => {
                let expected: Vec<LeaseId> =
                    rec.live.iter().filter(|(_, known)| known.owner == owner).map(|(&id, _)| id).collect();
                prop_assert_eq!(q.release_owner(owner, now), expected.clone());
                for id in expected {
                    rec.live.remove(&id);
                }
            }
            Op::Advance(ms) => {
                now += Duration::from_millis(ms);
                q.handle_timeout(now);
                timeout_step = true;
            }
        }

        for event in drain(&mut q) {
            // (4) at most one outcome per lease, consistent with what we know and with `lease()`.
            prop_assert!(rec.outcome.insert(event.lease()), "second outcome event: {:?}", event);
            match event {
                Event::Granted { lease, key, owner, mode } => {
                    let known = rec.live.get_mut(&lease).ok_or_else(|| fail(format!("grant of dead {lease}")))?;
                    prop_assert!(!known.held);
                    prop_assert_eq!((known.key, known.owner, known.mode), (key, owner, mode));
                    known.held = true;
                    known.since = now;
                    known.deadline = None;
                    let view = q.lease(lease).ok_or_else(|| fail(format!("granted {lease} has no view")))?;
                    prop_assert_eq!((view.state, view.since, view.position), (State::Held, now, None));
                    // (2) no overtaking: nothing that asked earlier on this key is still waiting.
                    let overtaken: Vec<LeaseId> = q.waiters(&key).iter().map(|w| w.id).filter(|&w| w < lease).collect();
                    prop_assert!(overtaken.is_empty(), "{} overtook {:?}", lease, overtaken);
                }
                Event::Denied { lease, key, owner } => {
                    prop_assert_eq!(nowait_request, Some(lease), "only the NoWait request just made may be denied");
                    let known = rec.live.remove(&lease).unwrap();
                    prop_assert_eq!((known.key, known.owner), (key, owner));
                    prop_assert!(q.lease(lease).is_none());
                }
                Event::Expired { lease, key, owner } => {
                    prop_assert!(timeout_step, "expiry outside handle_timeout");
                    let known = rec.live.remove(&lease).ok_or_else(|| fail(format!("expiry of dead {lease}")))?;
                    prop_assert!(!known.held, "a holder expired");
                    prop_assert!(known.deadline.is_some_and(|d| d <= now), "expired before its deadline");
                    prop_assert_eq!((known.key, known.owner), (key, owner));
                    prop_assert!(q.lease(lease).is_none());
                }
            }
        }
        if let Some(id) = nowait_request {
            prop_assert!(rec.outcome.contains(&id), "NoWait {} left without an answer", id);
        }
        if timeout_step {
            let overdue = rec.live.values().any(|k| !k.held && k.deadline.is_some_and(|d| d <= now));
            prop_assert!(!overdue, "a waiter past its deadline survived handle_timeout");
        }
        check_state(&q, &rec)?;
    }
    Ok(())
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

/// The invariants that hold between any two steps.
fn check_state(q: &Queue<u8>, rec: &Record) -> Result<(), TestCaseError> {
    q.check_internals();

    // Every live lease we know matches its view; every dead one has none.
    for (&id, known) in &rec.live {
        let view = q.lease(id).ok_or_else(|| fail(format!("live {id} has no view")))?;
        prop_assert_eq!((*view.key, view.owner, view.mode), (known.key, known.owner, known.mode));
        prop_assert_eq!(view.state, if known.held { State::Held } else { State::Waiting });
        prop_assert_eq!(view.since, known.since);
        prop_assert_eq!(q.deadline(id), known.deadline);
    }
    for id in &rec.issued {
        prop_assert_eq!(q.lease(*id).is_some(), rec.live.contains_key(id));
    }
    for owner in 0..OWNERS {
        let expected: Vec<LeaseId> = rec.live.iter().filter(|(_, k)| k.owner == owner).map(|(&id, _)| id).collect();
        prop_assert_eq!(q.owner_leases(owner), expected);
    }

    // (6) exactly the keys with live leases are retained.
    let keys: BTreeSet<u8> = q.keys().copied().collect();
    prop_assert_eq!(keys.len(), q.keys().count());
    let live_keys: BTreeSet<u8> = rec.live.values().map(|k| k.key).collect();
    prop_assert_eq!(&keys, &live_keys);

    let (mut held, mut waiting) = (0, 0);
    for key in &keys {
        let holders = q.holders(key);
        let waiters = q.waiters(key);
        prop_assert!(!holders.is_empty() || !waiters.is_empty(), "key {} retained with no leases", key);
        held += holders.len();
        waiting += waiters.len();

        // (1) an exclusive holder is alone.
        if holders.iter().any(|h| h.mode == Mode::Exclusive) {
            prop_assert_eq!(holders.len(), 1, "exclusive holder shares key {}", key);
        }
        // Holders and waiters are what we know, waiters in arrival order with positions 0, 1, ...
        let known_held: Vec<LeaseId> =
            rec.live.iter().filter(|(_, k)| k.key == *key && k.held).map(|(&id, _)| id).collect();
        let known_waiting: Vec<LeaseId> =
            rec.live.iter().filter(|(_, k)| k.key == *key && !k.held).map(|(&id, _)| id).collect();
        prop_assert_eq!(holders.iter().map(|v| v.id).collect::<Vec<_>>(), known_held);
        prop_assert_eq!(waiters.iter().map(|v| v.id).collect::<Vec<_>>(), known_waiting);
        for (pos, w) in waiters.iter().enumerate() {
            prop_assert_eq!(w.position, Some(pos));
            prop_assert_eq!(q.lease(w.id).unwrap().position, Some(pos));
        }
        // (3) progress: the head waiter is not compatible with the holders.
        if let Some(head) = waiters.first() {
            let compatible = holders.iter().all(|h| h.mode.is_compatible_with(head.mode));
            prop_assert!(!compatible, "head waiter {} on key {} is grantable but waits", head.id, key);
        }
    }

    // (5) counts match the views and what we know.
    prop_assert_eq!(q.counts(), (held, waiting));
    let known_held = rec.live.values().filter(|k| k.held).count();
    prop_assert_eq!(q.counts(), (known_held, rec.live.len() - known_held));
    prop_assert_eq!(q.is_empty(), rec.live.is_empty());

    // The next timeout is the earliest deadline of a waiter.
    let earliest = rec.live.values().filter(|k| !k.held).filter_map(|k| k.deadline).min();
    prop_assert_eq!(q.poll_timeout(), earliest);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_operations_keep_the_rules(ops in (2u8..=3).prop_flat_map(|keys| vec(op(keys), 1..150))) {
        run(ops)?;
    }
}
