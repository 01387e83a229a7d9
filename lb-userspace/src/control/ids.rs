//! VIP slot and backend id allocation, stable across reloads. Pure.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    net::IpAddr,
};

use lb_common::{MAX_BACKENDS, VipKey};

use super::plan::PlanError;

/// Hands out small integer ids that stay the same for the same key across rebuilds.
/// A freed id goes to the back of the free queue: ids never used go first, then the
/// longest-freed, so an id is reused as late as possible.
#[derive(Debug, Clone)]
pub struct Ids<K> {
    pub(crate) assigned: HashMap<K, u32>,
    /// Free ids in the order they should be handed out.
    pub(crate) free: VecDeque<u32>,
}

impl<K: Eq + Hash + Clone> Ids<K> {
    /// Ids in `first..end`.
    pub fn new(first: u32, end: u32) -> Self {
        Ids { assigned: HashMap::new(), free: (first..end).collect() }
    }

    /// Assigns ids to exactly `keys`: kept keys keep theirs, removed keys free theirs,
    /// new keys take ids from the free queue. Nothing changes on error.
    pub fn assign<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a K>,
        what: &'static str,
    ) -> Result<HashMap<K, u32>, PlanError>
    where
        K: 'a,
    {
        let keys: Vec<&K> = keys.into_iter().collect();
        let mut next: HashMap<K, u32> =
            keys.iter().filter_map(|k| self.assigned.get(*k).map(|id| ((*k).clone(), *id))).collect();
        let mut free = self.free.clone();
        // Ids of removed keys join the back of the queue.
        let mut released: Vec<u32> =
            self.assigned.iter().filter(|(k, _)| !next.contains_key(*k)).map(|(_, id)| *id).collect();
        released.sort_unstable();
        free.extend(released);
        let capacity = (free.len() + next.len()) as u32;
        for k in keys {
            if !next.contains_key(k) {
                let id = free.pop_front().ok_or(PlanError::Exhausted { what, max: capacity })?;
                next.insert(k.clone(), id);
            }
        }
        self.assigned = next.clone();
        self.free = free;
        Ok(next)
    }
}

/// Id allocators and backend generations, kept for the agent's lifetime.
#[derive(Debug, Clone)]
pub struct Allocators {
    pub vips: Ids<VipKey>,
    /// Backends are (target group, target address): a target in two groups is two
    /// backends, each with its own health, draining and counters (as in NLB).
    pub backends: Ids<(String, IpAddr)>,
    /// Generation of each backend's current id assignment (see `Backend::generation`).
    gens: HashMap<(String, IpAddr), (u32, u32)>,
    next_gen: u32,
}

impl Allocators {
    pub fn new(max_vips: u32) -> Self {
        Allocators {
            vips: Ids::new(0, max_vips),
            backends: Ids::new(1, MAX_BACKENDS),
            gens: HashMap::new(),
            next_gen: 1,
        }
    }

    /// The generation of `ip` holding `id`: unchanged while it keeps the id, new when
    /// it gets one.
    pub(crate) fn generation(&mut self, key: (String, IpAddr), id: u32) -> u32 {
        match self.gens.get(&key) {
            Some((held, g)) if *held == id => *g,
            _ => {
                let g = self.next_gen;
                self.next_gen = self.next_gen.wrapping_add(1).max(1);
                self.gens.insert(key, (id, g));
                g
            }
        }
    }
}
