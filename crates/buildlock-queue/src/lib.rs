//! buildlock's per-lock wait queue: who holds each named lock, who waits for it, in what order.
//!
//! The daemon grants leases on named locks to its clients and queues the rest fairly. This crate
//! is the decision part of that, written sans-IO (in the manner of `quinn-proto`): a pure state
//! machine that is fed inputs by method calls and hands back outputs to be acted upon. A thin
//! async driver, elsewhere, owns the sockets and the timer, and does the talking.
//!
//! **Architecture invariant:** the queue knows nothing about sockets, files, processes or clocks.
//! It does no I/O, spawns no threads, never blocks and never reads the time: every method that
//! needs "now" takes it as an [`Instant`](std::time::Instant) argument, so tests drive it with
//! `base + Duration` and the same inputs always give the same outputs.
//!
//! # Main types
//!
//! - [`Queue<K>`]: the lock table, keyed by any `K: Eq + Hash + Clone` (the lock's name).
//! - Inputs: [`Queue::acquire`] with a [`Request`] (key, [`OwnerId`], [`Mode`], [`Wait`]),
//!   [`Queue::release`] (release a hold or cancel a wait), [`Queue::release_owner`] (a client
//!   went away), [`Queue::handle_timeout`] (time has passed).
//! - Outputs: [`Queue::poll_event`] yields [`Event`]s (`Granted`, `Denied`, `Expired`) in the
//!   order they happened; [`Queue::poll_timeout`] says when `handle_timeout` is next due.
//! - Views: [`Queue::lease`], [`Queue::holders`], [`Queue::waiters`], [`Queue::keys`] and
//!   [`Queue::counts`] describe the current state ([`LeaseView`], [`State`]) for status displays.
//! - The wait-for graph: [`Queue::deadlock`] says whether a request would close a cycle of waits
//!   (and which [`Link`]s make it), from the queue's state and the driver's word on who acts for whom.
//!
//! Each request gets a [`LeaseId`] at once, whatever becomes of it; ids grow with arrival order.
//! A key with no holders and no waiters is forgotten, so memory stays proportional to the live
//! leases.
//!
//! # Fairness rules
//!
//! Per key, independently of every other key:
//!
//! 1. **Strict first come, first served.** A request is granted only if it is compatible with the
//!    current holders *and* nobody is waiting ahead of it. Nobody is ever overtaken.
//! 2. **Compatibility.** Shared is compatible with shared; exclusive with nothing.
//! 3. **Readers are batched.** When the head of the queue can be granted, every consecutive
//!    shared waiter right behind it is granted in the same step (up to the next writer).
//! 4. **No writer starvation.** Follows from rule 1: a new shared request that arrives while
//!    readers hold the key but a writer waits queues behind the writer.
//! 5. **`NoWait`** is granted if it may be granted at once under the rules above, and otherwise
//!    [`Event::Denied`] and never queued.
//! 6. **Deadlines.** A waiter with `Wait::Until(deadline)` whose deadline is `<= now` at
//!    [`Queue::handle_timeout`] gets [`Event::Expired`] and leaves. Expiry happens only there: a
//!    waiter granted before the driver calls `handle_timeout` is granted, even if late. An
//!    `acquire` with a deadline already past is treated like any other: granted if it may be
//!    granted at once, otherwise queued, and it expires at the next `handle_timeout`
//!    (`poll_timeout` reports the past deadline, so that is straight away).
//! 7. **Leaving unblocks.** Whenever a lease leaves (release, cancel, expiry, owner gone) and that
//!    makes the head of the queue grantable, it (and its reader batch) is granted in the same
//!    call, with `since` = that call's `now`. In particular releasing the last holder grants the
//!    head of the queue at once.
//!
//! Owners are only labels: requests are not reentrant, and an owner asking again for a key it
//! holds exclusively simply waits (behind itself). [`Queue::release_owner`] removes all of an
//! owner's leases before granting anything, so none of them is granted on the way out.
//!
//! # Driving it
//!
//! After any input, drain [`Queue::poll_event`] and act on each event (tell the owner), then
//! re-arm one timer at [`Queue::poll_timeout`]; when it fires, call [`Queue::handle_timeout`]
//! with the current time and drain again.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use buildlock_queue::{Event, Mode, Queue, Request, Wait};
//!
//! let t0 = Instant::now(); // the driver reads the clock, the queue never does
//! let secs = |s| t0 + Duration::from_secs(s);
//! let mut q = Queue::new();
//!
//! // A writer gets the lock at once; a second writer waits up to 5 s; a reader waits forever.
//! let a = q.acquire(t0, Request::new("libfoo_build", 1, Mode::Exclusive, Wait::Forever));
//! let b = q.acquire(t0, Request::new("libfoo_build", 2, Mode::Exclusive, Wait::Until(secs(5))));
//! let c = q.acquire(t0, Request::new("libfoo_build", 3, Mode::Shared, Wait::Forever));
//! assert_eq!(q.poll_event(), Some(Event::Granted { lease: a, key: "libfoo_build", owner: 1, mode: Mode::Exclusive }));
//! assert_eq!(q.poll_event(), None);
//! assert_eq!(q.poll_timeout(), Some(secs(5)));
//!
//! // The timer fires: b gives up, and c still waits for a.
//! q.handle_timeout(secs(5));
//! assert_eq!(q.poll_event(), Some(Event::Expired { lease: b, key: "libfoo_build", owner: 2 }));
//! assert_eq!(q.poll_event(), None);
//! assert_eq!(q.waiters(&"libfoo_build")[0].id, c);
//!
//! // a releases: c is granted in the same call.
//! assert!(q.release(a, secs(7)));
//! assert_eq!(q.poll_event(), Some(Event::Granted { lease: c, key: "libfoo_build", owner: 3, mode: Mode::Shared }));
//! assert_eq!(q.lease(c).unwrap().since, secs(7));
//! assert_eq!(q.counts(), (1, 0));
//! assert_eq!(q.poll_timeout(), None);
//! ```

mod deadlock;
mod queue;
mod types;

pub use deadlock::Link;
pub use queue::Queue;
pub use types::{Event, LeaseId, LeaseView, Mode, OwnerId, Request, State, Wait};

#[cfg(test)]
mod tests;
