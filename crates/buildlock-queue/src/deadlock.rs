//! The wait-for graph: would a request close a cycle of waits that can never end?
//!
//! The queue knows leases, keys and owners; *who acts for whom* is for the driver to say: a
//! thread of a client, the process a lease is bound to, and, since nested `run`s inside a build
//! recipe are how builds deadlock, any process started below a holder, which acts for it. So the
//! driver passes two functions, and the graph is walked from the queue's own state at the moment
//! of asking: nothing is stored, nothing can go stale.
//!
//! A lease waits for the leases that must leave before it can be granted. Under strict FIFO
//! (the crate's rule 1) these are the holders and everybody queued ahead; it is enough to follow
//! one chain per key, since the rest is reached through it:
//!
//! - an exclusive waiter waits for the waiter right ahead of it, or, first in line, for the
//!   holders;
//! - a shared waiter waits for the nearest exclusive waiter ahead of it, or, with none, for the
//!   (exclusive) holder.
//!
//! A held lease waits for whatever the waiting leases that act for its holder wait for. A
//! request closes a cycle when following its waits reaches a lease held by (or for) the asker:
//! a thread asking for a lock it holds exclusively, two readers that both ask to upgrade (the
//! first to ask already waits for its own shared hold), a nested `run` asking for what a waiter
//! of its parent's lock holds, or the classic A→B, B→A across processes. Each edge is a real
//! wait, so a cycle found is a real deadlock, as far as the driver's "acts for" is true.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;

use crate::queue::Queue;
use crate::types::{LeaseId, Mode, State};

/// One step of a deadlock cycle: the holder of lease `held` (on `holds`) waits, through the
/// lease `waiting` that acts for it (`None`: the request being asked), for `waits_for`, which
/// the next step's `held` holds (the last step's is held by the first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link<K> {
    pub held: LeaseId,
    pub holds: K,
    pub waiting: Option<LeaseId>,
    pub waits_for: K,
}

/// A node of the walk: the new request (not in the queue yet), or a live lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Node {
    Request,
    Lease(LeaseId),
}

impl<K: Eq + Hash + Clone> Queue<K> {
    /// The cycle that a request for `key` in `mode` would close if it were queued now, or `None`
    /// if it would not (including when it would be granted at once).
    ///
    /// `mine(held)`: the held lease is held by the asker, or by a process the asker acts for.
    /// `acts_for(waiting, held)`: the waiting lease waits on behalf of the holder of `held` (the
    /// same thread or bound process, or a process started below it).
    ///
    /// The cycle starts with the asker's own hold and follows the waits round. Costs a walk over
    /// the leases reached, each held one checked against every waiting lease: call it only for a
    /// request that must wait.
    pub fn deadlock(
        &self,
        key: &K,
        mode: Mode,
        mine: impl Fn(LeaseId) -> bool,
        acts_for: impl Fn(LeaseId, LeaseId) -> bool,
    ) -> Option<Vec<Link<K>>> {
        let ks = self.keys.get(key)?;
        if ks.waiters.is_empty() && ks.admits(mode) {
            return None;
        }
        let waiting: Vec<LeaseId> = self.keys.values().flat_map(|ks| ks.waiters.iter().copied()).collect();
        // Breadth-first, so the cycle reported is a shortest one.
        let mut came_from: HashMap<Node, Node> = HashMap::new();
        let mut seen: HashSet<Node> = HashSet::from([Node::Request]);
        let mut todo = VecDeque::from([Node::Request]);
        while let Some(node) = todo.pop_front() {
            let next: Vec<LeaseId> = match node {
                Node::Request => self.blockers(key, mode, None),
                Node::Lease(id) => {
                    let entry = &self.leases[&id];
                    match entry.state {
                        State::Waiting => self.blockers(&entry.key, entry.mode, Some(id)),
                        State::Held if mine(id) => return Some(self.cycle(&came_from, id, key)),
                        State::Held => waiting.iter().copied().filter(|&w| acts_for(w, id)).collect(),
                    }
                }
            };
            for id in next {
                let n = Node::Lease(id);
                if seen.insert(n) {
                    came_from.insert(n, node);
                    todo.push_back(n);
                }
            }
        }
        None
    }

    /// The leases a lease in `mode` on `key` waits for directly (see the module docs), queued
    /// behind every waiter (`me: None`, a new request) or behind those ahead of `me`.
    fn blockers(&self, key: &K, mode: Mode, me: Option<LeaseId>) -> Vec<LeaseId> {
        let Some(ks) = self.keys.get(key) else { return Vec::new() };
        let mut ahead = match me {
            Some(id) => ks.waiters.range(..id),
            None => ks.waiters.range(..),
        };
        let chain = match mode {
            Mode::Exclusive => ahead.next_back().copied(),
            Mode::Shared => ahead.rev().find(|id| self.leases[id].mode == Mode::Exclusive).copied(),
        };
        match chain {
            Some(id) => vec![id],
            None if ks.admits(mode) => Vec::new(),
            None => ks.holders.iter().copied().collect(),
        }
    }

    /// The cycle from the new request to `closing` (a lease held by or for the asker), as links.
    fn cycle(&self, came_from: &HashMap<Node, Node>, closing: LeaseId, key: &K) -> Vec<Link<K>> {
        let mut path = vec![closing];
        let mut node = Node::Lease(closing);
        while let Some(&prev) = came_from.get(&node) {
            if let Node::Lease(id) = prev {
                path.push(id);
            }
            node = prev;
        }
        path.reverse();
        // Request -> (queue of `key`)... -> held h0 -> waiting w0 (acts for h0's holder) ->
        // (queue of w0's key)... -> held h1 -> ... -> closing. A held lease is always followed by
        // the waiting lease acting for it; waiting leases reached through a queue stay on its key.
        let key_of = |id: &LeaseId| self.leases[id].key.clone();
        let mut links = vec![Link { held: closing, holds: key_of(&closing), waiting: None, waits_for: key.clone() }];
        for (i, id) in path.iter().enumerate() {
            if self.leases[id].state == State::Held && *id != closing {
                let w = path[i + 1];
                links.push(Link { held: *id, holds: key_of(id), waiting: Some(w), waits_for: key_of(&w) });
            }
        }
        links
    }
}
