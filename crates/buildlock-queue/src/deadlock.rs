//! The wait-for graph: would a request close a cycle of waits that can never end?
//!
//! The queue knows leases, keys and owners; who *waits* for whom is a question about parties
//! (a thread of a client process, or the process a lease is bound to), which only the driver can
//! name. So the driver passes a function from lease to party, and the graph is walked from the
//! queue's own state at the moment of asking: nothing is stored, nothing can go stale.
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
//! Each of these edges is a real wait, so a cycle found is a real deadlock: no false positives.
//! A party that holds a lease waits for whatever its own waiting leases wait for. A request
//! closes a cycle when following its waits reaches a lease that its own party holds: a thread
//! asking for a lock it holds exclusively, two readers that both ask to upgrade (the first to ask
//! already waits for its own shared hold), or the classic A→B, B→A across processes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;

use crate::queue::Queue;
use crate::types::{LeaseId, Mode, State};

/// One party in a deadlock cycle: it holds `holds` and waits for `waits_for`, which the next
/// party in the cycle holds (the last one's is held by the first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link<K, P> {
    pub party: P,
    pub holds: K,
    pub waits_for: K,
}

/// A node of the walk: the new request (not in the queue yet), or a live lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Node {
    Request,
    Lease(LeaseId),
}

impl<K: Eq + Hash + Clone> Queue<K> {
    /// The cycle that a request by `asking` for `key` in `mode` would close if it were queued
    /// now, or `None` if it would not (including when it would be granted at once).
    /// `party_of` names the party of each live lease.
    ///
    /// The cycle starts with `asking` (what it holds, and `key`) and follows the waits round.
    /// Costs one pass over the waiting leases plus the walk: call it only for a request that
    /// must wait.
    pub fn deadlock<P: Eq + Hash + Clone>(
        &self,
        key: &K,
        mode: Mode,
        asking: &P,
        party_of: impl Fn(LeaseId) -> P,
    ) -> Option<Vec<Link<K, P>>> {
        let ks = self.keys.get(key)?;
        if ks.waiters.is_empty() && ks.admits(mode) {
            return None;
        }
        // The waiting leases of each party: a holder waits for what they wait for.
        let mut waiting: HashMap<P, Vec<LeaseId>> = HashMap::new();
        for ks in self.keys.values() {
            for &id in &ks.waiters {
                waiting.entry(party_of(id)).or_default().push(id);
            }
        }
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
                        State::Held => {
                            let party = party_of(id);
                            if party == *asking {
                                return Some(self.cycle(&came_from, id, key, &party_of));
                            }
                            waiting.get(&party).cloned().unwrap_or_default()
                        }
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

    /// The cycle from the new request to `closing` (a lease held by the asking party), as links.
    fn cycle<P>(
        &self,
        came_from: &HashMap<Node, Node>,
        closing: LeaseId,
        key: &K,
        party_of: &impl Fn(LeaseId) -> P,
    ) -> Vec<Link<K, P>> {
        // The path back to the request, then forwards. Only held leases name a party's hold;
        // waiting leases on the path are a key's queue (which stays on that key) or the wait of
        // the party whose held lease came just before.
        let mut path = vec![closing];
        let mut node = Node::Lease(closing);
        while let Some(&prev) = came_from.get(&node) {
            if let Node::Lease(id) = prev {
                path.push(id);
            }
            node = prev;
        }
        path.reverse();
        let held: Vec<LeaseId> = path.into_iter().filter(|id| self.leases[id].state == State::Held).collect();
        // held[i]'s party waits for the key of held[i + 1]; the asking party (holder of the last)
        // waits for `key`, which held[0] holds.
        let last = *held.last().expect("the closing lease is held");
        let mut links =
            vec![Link { party: party_of(last), holds: self.leases[&last].key.clone(), waits_for: key.clone() }];
        for pair in held.windows(2) {
            links.push(Link {
                party: party_of(pair[0]),
                holds: self.leases[&pair[0]].key.clone(),
                waits_for: self.leases[&pair[1]].key.clone(),
            });
        }
        links
    }
}
