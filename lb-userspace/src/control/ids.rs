//! VIP slot and backend id allocation, stable across reloads. Pure.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    net::IpAddr,
};

use lb_common::{MAX_BACKENDS, VipKey, addr_from_ip, ip_from_addr};
use serde::{Deserialize, Serialize};

use super::plan::PlanError;
use crate::config::vip_display;

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

    /// Ids in `first..end` with `assigned` in use, as a restarted agent resumes them:
    /// the free queue is every other id in ascending order, nothing is quarantined (the
    /// saved assignment's plan was applied before it was saved). Refuses an id outside
    /// `first..end` or given to two keys.
    pub fn restore(
        first: u32,
        end: u32,
        assigned: HashMap<K, u32>,
        what: &'static str,
    ) -> Result<Self, RestoreIdsError> {
        let mut used = std::collections::BTreeSet::new();
        for &id in assigned.values() {
            if !(first..end).contains(&id) {
                return Err(RestoreIdsError::OutOfRange { what, id, first, end });
            }
            if !used.insert(id) {
                return Err(RestoreIdsError::DuplicateId { what, id });
            }
        }
        let free = (first..end).filter(|id| !used.contains(id)).collect();
        Ok(Ids { assigned, free, quarantined: Vec::new(), capacity: end - first })
    }

    /// Moves `ids` that are free to the back of the free queue: they are handed out
    /// last. For ids the datapath still uses that the restored state does not know.
    pub fn hold_back(&mut self, ids: &[u32]) {
        let held: Vec<u32> = self.free.iter().copied().filter(|id| ids.contains(id)).collect();
        self.free.retain(|id| !held.contains(id));
        self.free.extend(held);
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

/// Why saved ids could not be restored. The caller names the file they came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreIdsError {
    #[error("saved {what} id {id} is out of range {first}..{end} (was max_vips lowered?)")]
    OutOfRange { what: &'static str, id: u32, first: u32, end: u32 },
    #[error("saved {what} id {id} is given twice")]
    DuplicateId { what: &'static str, id: u32 },
    #[error("saved {what} {key} appears twice")]
    DuplicateKey { what: &'static str, key: String },
}

/// A VIP slot in an [`AllocatorsSnapshot`]: the VIP (address, port in host order, IP
/// protocol number) and its slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedVipSlot {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: u8,
    pub slot: u32,
}

/// A backend id in an [`AllocatorsSnapshot`]: the (target group, address) holding it
/// and the generation of that assignment (`None` if no plan gave it one yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedBackendId {
    pub group: String,
    pub ip: IpAddr,
    pub id: u32,
    pub generation: Option<u32>,
}

/// What [`Allocators`] must remember across a restart so that a restarted agent keeps
/// every VIP's slot and every backend's id and generation (flows stay where they are).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocatorsSnapshot {
    /// Sorted by slot.
    pub vips: Vec<SavedVipSlot>,
    /// Sorted by id.
    pub backends: Vec<SavedBackendId>,
    /// The generation the next new backend assignment gets.
    pub next_generation: u32,
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

    /// What to save to resume these allocators after a restart ([`Allocators::restore`]).
    /// Take it after the plan built from them is applied.
    pub fn snapshot(&self) -> AllocatorsSnapshot {
        let mut vips: Vec<SavedVipSlot> = self
            .vips
            .assigned
            .iter()
            .map(|(key, &slot)| SavedVipSlot {
                address: ip_from_addr(key.addr),
                port: u16::from_be(key.port),
                protocol: key.proto,
                slot,
            })
            .collect();
        vips.sort_unstable_by_key(|v| v.slot);
        let mut backends: Vec<SavedBackendId> = self
            .backends
            .assigned
            .iter()
            .map(|(key, &id)| SavedBackendId {
                group: key.0.clone(),
                ip: key.1,
                id,
                generation: self.gens.get(key).filter(|(held, _)| *held == id).map(|(_, g)| *g),
            })
            .collect();
        backends.sort_unstable_by_key(|b| b.id);
        AllocatorsSnapshot { vips, backends, next_generation: self.next_gen }
    }

    /// Allocators with `max_vips` VIP slots resuming `snapshot`: the same slots, ids and
    /// generations (see [`Ids::restore`] for the free ids). Refuses ids out of range
    /// (e.g. a slot at or above a lowered `max_vips`) and ids or keys given twice.
    /// Keys the config no longer has free their ids at the next plan, as on a reload.
    pub fn restore(max_vips: u32, snapshot: &AllocatorsSnapshot) -> Result<Allocators, RestoreIdsError> {
        let mut vips = HashMap::new();
        for v in &snapshot.vips {
            let key = VipKey { addr: addr_from_ip(v.address), port: v.port.to_be(), proto: v.protocol, _pad: 0 };
            if vips.insert(key, v.slot).is_some() {
                return Err(RestoreIdsError::DuplicateKey {
                    what: "VIP",
                    key: vip_display(v.address, v.port, v.protocol),
                });
            }
        }
        let mut backends = HashMap::new();
        let mut gens = HashMap::new();
        for b in &snapshot.backends {
            let key = (b.group.clone(), b.ip);
            if backends.insert(key.clone(), b.id).is_some() {
                return Err(RestoreIdsError::DuplicateKey {
                    what: "backend",
                    key: format!("{} in group `{}`", b.ip, b.group),
                });
            }
            if let Some(g) = b.generation {
                gens.insert(key, (b.id, g));
            }
        }
        Ok(Allocators {
            vips: Ids::restore(0, max_vips, vips, "VIP")?,
            backends: Ids::restore(1, MAX_BACKENDS, backends, "backend")?,
            gens,
            // Generation 0 is never handed out (see `generation`).
            next_gen: snapshot.next_generation.max(1),
        })
    }

    /// [`Ids::hold_back`] for VIP slots and backend ids.
    pub fn hold_back(&mut self, vip_slots: &[u32], backend_ids: &[u32]) {
        self.vips.hold_back(vip_slots);
        self.backends.hold_back(backend_ids);
    }

    /// Backends whose generation is remembered (for tests of the pruning).
    pub fn generations_len(&self) -> usize {
        self.gens.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restored_ids_keep_assignments_and_free_the_rest_in_order() {
        let assigned: HashMap<&str, u32> = [("a", 3), ("b", 1)].into_iter().collect();
        let mut ids = Ids::restore(1, 5, assigned, "x").expect("restore");
        assert_eq!(ids.available(), 2);
        let next = ids.assign(&["a", "b", "c", "d"], "x").expect("assign").ids;
        assert_eq!((next["a"], next["b"], next["c"], next["d"]), (3, 1, 2, 4));
        assert_eq!(
            Ids::restore(1, 5, [("a", 5)].into_iter().collect(), "x").map(|_| ()),
            Err(RestoreIdsError::OutOfRange { what: "x", id: 5, first: 1, end: 5 })
        );
        assert_eq!(
            Ids::restore(1, 5, [("a", 0)].into_iter().collect(), "x").map(|_| ()),
            Err(RestoreIdsError::OutOfRange { what: "x", id: 0, first: 1, end: 5 })
        );
        assert_eq!(
            Ids::restore(1, 5, [("a", 2), ("b", 2)].into_iter().collect(), "x").map(|_| ()),
            Err(RestoreIdsError::DuplicateId { what: "x", id: 2 })
        );
    }

    #[test]
    fn allocators_snapshot_is_structural_and_refuses_bad_ids() {
        let snap = AllocatorsSnapshot {
            vips: vec![SavedVipSlot { address: "198.18.1.100".parse().expect("ip"), port: 80, protocol: 6, slot: 1 }],
            backends: vec![SavedBackendId {
                group: "g".into(),
                ip: "fd00::11".parse().expect("ip"),
                id: 7,
                generation: Some(4),
            }],
            next_generation: 5,
        };
        let json = serde_json::to_value(&snap).expect("json");
        assert_eq!(
            json["vips"][0],
            serde_json::json!({ "address": "198.18.1.100", "port": 80, "protocol": 6, "slot": 1 })
        );
        assert_eq!(json["backends"][0]["ip"], "fd00::11");
        let ids = Allocators::restore(2, &snap).expect("restore");
        let key = VipKey::new("198.18.1.100".parse().expect("ip"), 80, 6);
        assert_eq!(ids.vips.assigned().get(&key), Some(&1));
        assert_eq!(ids.snapshot(), snap, "restore then snapshot is the identity");

        let err = Allocators::restore(1, &snap).expect_err("slot 1 with max_vips 1");
        assert_eq!(err, RestoreIdsError::OutOfRange { what: "VIP", id: 1, first: 0, end: 1 });
        assert!(err.to_string().contains("out of range 0..1"), "{err}");
        let mut big = snap.clone();
        big.backends[0].id = MAX_BACKENDS;
        assert!(matches!(Allocators::restore(2, &big), Err(RestoreIdsError::OutOfRange { what: "backend", .. })));
        let mut twice = snap.clone();
        twice.vips.push(SavedVipSlot { slot: 0, ..snap.vips[0].clone() });
        let err = Allocators::restore(2, &twice).expect_err("a VIP twice");
        assert_eq!(err.to_string(), "saved VIP 198.18.1.100:80/tcp appears twice");
    }

    #[test]
    fn held_back_ids_are_handed_out_last() {
        let mut ids: Ids<u8> = Ids::new(1, 5);
        ids.hold_back(&[1, 2]);
        let a = ids.assign(&[10, 11, 12, 13], "id").expect("assign");
        assert_eq!((a.ids[&10], a.ids[&11], a.ids[&12], a.ids[&13]), (3, 4, 1, 2));
    }
}
