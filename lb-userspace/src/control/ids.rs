//! VIP slot and backend id allocation, stable across reloads. Pure.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    net::IpAddr,
};

use lb_common::{MAX_BACKENDS, VipKey};

use super::plan::PlanError;

/// Hands out small integer ids that stay the same for the same key across rebuilds.
///
/// A freed id is reused as late as possible: ids never used go first, then the
/// longest-freed. And never in the same assignment that freed it: until the plan built
/// from that assignment is applied, the datapath still holds the old key's entry there
/// (a live VIP's rings, a backend that rings point at), so writing another key into the
/// slot would send its packets to the wrong place. Ids freed by one assignment are
/// *quarantined* and join the free queue at the next one. Call [`Ids::assign`] once per
/// applied plan (the agent commits allocators only after the maps took the plan).
#[derive(Debug, Clone)]
pub struct Ids<K> {
    assigned: HashMap<K, u32>,
    /// Free ids in the order they should be handed out.
    free: VecDeque<u32>,
    /// Ids freed by the last assignment, usable from the next one on.
    quarantined: Vec<u32>,
    /// How many ids there are in all.
    capacity: u32,
}

/// The outcome of one [`Ids::assign`].
#[derive(Debug, Clone)]
pub struct Assignment<K> {
    /// Key -> id, for every key that got one.
    pub ids: HashMap<K, u32>,
    /// Keys left without an id only because the free ids are quarantined: they get one
    /// in the next assignment, once the plan of this one is applied.
    pub deferred: usize,
}

impl<K: Eq + Hash + Clone> Ids<K> {
    /// Ids in `first..end`.
    pub fn new(first: u32, end: u32) -> Self {
        Ids { assigned: HashMap::new(), free: (first..end).collect(), quarantined: Vec::new(), capacity: end - first }
    }

    /// Assigns ids to exactly `keys`: kept keys keep theirs, removed keys free theirs
    /// (quarantined, see [`Ids`]), new keys take ids from the free queue, or are deferred
    /// when only quarantined ids are left. Nothing changes on error.
    pub fn assign<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a K>,
        what: &'static str,
    ) -> Result<Assignment<K>, PlanError>
    where
        K: 'a,
    {
        let keys: Vec<&K> = keys.into_iter().collect();
        let mut next: HashMap<K, u32> =
            keys.iter().filter_map(|k| self.assigned.get(*k).map(|id| ((*k).clone(), *id))).collect();
        // The last assignment's plan is applied by now: its freed ids are usable.
        let mut free = self.free.clone();
        free.extend(self.quarantined.iter().copied());
        let mut released: Vec<u32> =
            self.assigned.iter().filter(|(k, _)| !next.contains_key(*k)).map(|(_, id)| *id).collect();
        released.sort_unstable();
        let mut deferred = 0;
        for k in keys {
            if next.contains_key(k) {
                continue;
            }
            match free.pop_front() {
                Some(id) => {
                    next.insert(k.clone(), id);
                }
                None if deferred < released.len() => deferred += 1,
                None => return Err(PlanError::Exhausted { what, max: self.capacity }),
            }
        }
        self.assigned = next.clone();
        self.free = free;
        self.quarantined = released;
        Ok(Assignment { ids: next, deferred })
    }

    /// Ids in use.
    pub fn assigned(&self) -> &HashMap<K, u32> {
        &self.assigned
    }

    /// Ids that can be handed out now or after the next apply.
    pub fn available(&self) -> usize {
        self.free.len() + self.quarantined.len()
    }
}

/// Id allocators and backend generations, kept for the agent's lifetime.
#[derive(Debug, Clone)]
pub struct Allocators {
    pub vips: Ids<VipKey>,
    /// Backends are (target group, target address): a target in two groups is two
    /// backends, each with its own health, draining and counters (as in NLB).
    pub backends: Ids<(String, IpAddr)>,
    /// Generation of each backend's current id assignment (see `Backend::generation`);
    /// pruned to the assigned backends after every build.
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

    /// Forgets the generations of backends that no longer hold an id (a backend that
    /// comes back gets a new id assignment, hence a new generation, anyway).
    pub(crate) fn prune_generations(&mut self) {
        let assigned = &self.backends.assigned;
        self.gens.retain(|key, _| assigned.contains_key(key));
    }

    /// Backends whose generation is remembered (for tests of the pruning).
    pub fn generations_len(&self) -> usize {
        self.gens.len()
    }
}
