//! From a validated config and the resolved targets to the datapath's desired state:
//! VIP slots, backend ids, each VIP's Maglev ring. Pure: no aya, no system calls.
//!
//! Ids are stable across reloads: a target keeps its backend id and a listener its VIP
//! slot as long as they stay in the config, so counters and the connection table keep
//! meaning the same thing.
//!
//! Rings are memoised per target group ([`RingCache`], used by [`build_cached`]): a plan
//! after a change in one group builds only that group's Maglev ring; the others are
//! reused because their inputs (members, weights, ring size) are the same.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use lb_common::{Backend, BackendFlags, VipFlags, VipKey, addr_from_ip};

pub use super::ids::{Allocators, Ids};
use super::{
    fingerprint,
    health_state::TargetState,
    maglev::{self, MaglevError},
    zones::GroupZones,
};
use crate::config::{AllUnhealthy, Config, HashMode, TargetGroup};

// What the plan needs to know of the host; `crate::host` finds it out.

/// An interface of this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
    /// Id of an XDP program already attached, if any.
    pub xdp_prog: Option<u32>,
}

/// Where a target sits: the interface that reaches it and the MAC frames go to (the
/// target's own when it is on-link, else the next hop's toward it: tunnels only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub ip: IpAddr,
    pub dev: Interface,
    pub mac: [u8; 6],
    /// The host's source address toward the target (the route's): the outer source of
    /// tunnelled frames when no `outer_source` prefix is configured.
    pub src: Option<IpAddr>,
    /// MTU of the path to the target: the route's, else the interface's (0: unknown).
    pub mtu: u32,
}

impl Resolved {
    /// A target on `dev`'s segment with MAC `mac`, no source address or MTU known.
    pub fn on_link(ip: IpAddr, dev: Interface, mac: [u8; 6]) -> Resolved {
        Resolved { ip, dev, mac, src: None, mtu: 0 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("building the Maglev table of target group `{group}`")]
    Maglev {
        group: String,
        #[source]
        source: MaglevError,
    },
    #[error("target {ip} was not resolved (internal error: resolve every target before planning)")]
    Unresolved { ip: IpAddr },
    #[error("out of {what} slots ({max}): raise the limit or remove entries")]
    Exhausted { what: &'static str, max: u32 },
    #[error("internal error: listeners or targets still wait for ids after a second plan; nothing was changed")]
    StillDeferred,
    #[error(
        "target {ip} of group `{group}` is reached through a tunnel, but the host has no {family} source address toward it: add an address to {dev}, or set the group's `outer_source` to an {family} prefix"
    )]
    NoOuterSource { group: String, ip: IpAddr, dev: String, family: &'static str },
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlannedVip {
    pub name: String,
    pub key: VipKey,
    pub slot: u32,
    pub flags: VipFlags,
    /// Backend ids, `ring_size` of them; 0 where there is no backend.
    /// Shared by every VIP of the group (and with the group's `RingCache` entry).
    pub ring: Arc<[u32]>,
    /// [`fingerprint::of_ring`] of `ring`: equal on every node whose ring sends each
    /// slot to the same target, whatever ids the nodes gave their targets.
    pub fingerprint: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub vips: Vec<PlannedVip>,
    /// Backend id -> datapath entry.
    pub backends: BTreeMap<u32, (IpAddr, Backend)>,
    /// Backend id -> its target group.
    pub backend_groups: BTreeMap<u32, String>,
    /// Interfaces (ifindex) frames may be redirected to.
    pub tx_ports: Vec<u32>,
    /// VIP addresses that answer ICMP echo requests (map form, sorted): those of every
    /// listener with `icmp_echo` on.
    pub echo_addrs: Vec<lb_common::Addr>,
    /// Interfaces toward tunnelled targets (names, sorted): health probes of those
    /// targets are put into their tunnels there.
    pub tunnel_ifaces: Vec<String>,
    /// Some listeners or targets are left out: the only free ids are ones this plan
    /// frees (see [`Ids`]). Apply it, then build again to add them.
    pub deferred: bool,
}

/// A target as the plan sees it: what the agent knows of it now.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanTarget {
    pub ip: IpAddr,
    pub weight: u32,
    pub state: TargetState,
    /// Draining a target that was unhealthy: its flows stay re-picked.
    pub down: bool,
}

/// A target group's current targets (config plus runtime registrations).
#[derive(Debug, Clone, PartialEq)]
pub struct PlanGroup {
    pub name: String,
    pub targets: Vec<PlanTarget>,
}

/// Every configured target, healthy: the state without health checks.
pub fn static_groups(config: &Config) -> Vec<PlanGroup> {
    config
        .target_groups
        .iter()
        .map(|g| PlanGroup {
            name: g.name.clone(),
            targets: g
                .targets
                .iter()
                .map(|t| PlanTarget { ip: t.ip, weight: t.weight, state: TargetState::Healthy, down: false })
                .collect(),
        })
        .collect()
}

/// Builds the desired state with every configured target healthy.
pub fn build(config: &Config, resolved: &HashMap<IpAddr, Resolved>, ids: &mut Allocators) -> Result<Plan, PlanError> {
    build_with(config, &static_groups(config), resolved, ids)
}

/// How a target takes part, given its state and its group's. Only an unhealthy target
/// loses the flows it has (`DOWN`); an initial one has none to lose, or (re-registered,
/// health checks just enabled) has flows that were fine a moment ago.
fn role(t: &PlanTarget, group_has_healthy: bool, fail_open: bool) -> (bool /* in ring */, BackendFlags) {
    match t.state {
        TargetState::Healthy => (true, BackendFlags::VALID),
        TargetState::Draining if t.down => (false, BackendFlags::VALID | BackendFlags::DOWN),
        TargetState::Draining => (false, BackendFlags::VALID),
        TargetState::Initial | TargetState::Unhealthy if !group_has_healthy && fail_open => (true, BackendFlags::VALID),
        TargetState::Initial => (false, BackendFlags::VALID),
        TargetState::Unhealthy => (false, BackendFlags::VALID | BackendFlags::DOWN),
        TargetState::Unused => (false, BackendFlags::empty()),
    }
}

/// What a group's Maglev ring is built from: the ring size and the ring's members
/// (backend id, address, weight) in order. Equal inputs give an equal ring.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RingInputs {
    ring_size: u32,
    members: Vec<(u32, IpAddr, u32)>,
}

/// Each target group's last Maglev ring and the inputs it was built from. A pure memo:
/// a ring is reused only for equal inputs, so a plan built with a cache equals the one
/// built without. Keep one per agent and pass it to every [`build_cached`].
#[derive(Debug, Clone, Default)]
pub struct RingCache {
    /// Group -> the inputs, the ring and its fingerprint.
    groups: HashMap<String, (RingInputs, Arc<[u32]>, u64)>,
    builds: u64,
    reused: u64,
}

impl RingCache {
    /// Rings built (cache misses) since creation.
    pub fn builds(&self) -> u64 {
        self.builds
    }

    /// Rings reused (cache hits) since creation.
    pub fn reused(&self) -> u64 {
        self.reused
    }

    /// Makes sure `group`'s cached ring is the one for `inputs`, building it if needed.
    /// On error the group's entry is unchanged.
    fn update(&mut self, group: &str, inputs: RingInputs) -> Result<(), PlanError> {
        if self.groups.get(group).is_some_and(|(cached, ..)| *cached == inputs) {
            self.reused += 1;
            return Ok(());
        }
        let names: Vec<String> = inputs.members.iter().map(|(_, ip, _)| ip.to_string()).collect();
        let mb: Vec<maglev::Backend<'_>> = inputs
            .members
            .iter()
            .zip(&names)
            .map(|((id, _, weight), name)| maglev::Backend { id: *id, key: name, weight: *weight })
            .collect();
        let ring = maglev::build(&mb, inputs.ring_size)
            .map_err(|source| PlanError::Maglev { group: group.to_owned(), source })?;
        self.builds += 1;
        let targets: HashMap<u32, IpAddr> = inputs.members.iter().map(|(id, ip, _)| (*id, *ip)).collect();
        let fingerprint = fingerprint::of_ring(&ring, &targets);
        self.groups.insert(group.to_owned(), (inputs, ring.into(), fingerprint));
        Ok(())
    }

    fn ring(&self, group: &str) -> Option<(&Arc<[u32]>, u64)> {
        self.groups.get(group).map(|(_, ring, fingerprint)| (ring, *fingerprint))
    }
}

/// Builds the desired state from the listeners and settings of `config` and the
/// targets of `groups`. Rings hold healthy targets (all non-draining ones when none is
/// healthy and the group fails open); unhealthy targets stay valid but `DOWN`, so their
/// flows are re-picked; draining targets stay valid and keep their flows.
/// `resolved` must hold every target in `groups`. Builds every ring; see
/// [`build_cached`] to rebuild only the groups that changed.
pub fn build_with(
    config: &Config,
    groups: &[PlanGroup],
    resolved: &HashMap<IpAddr, Resolved>,
    ids: &mut Allocators,
) -> Result<Plan, PlanError> {
    build_cached(config, groups, resolved, ids, &mut RingCache::default())
}

/// [`build_with`], taking each group's ring from `cache` when its inputs are unchanged
/// and storing the rings it builds there. Groups no longer in `groups` leave the cache.
/// The result is the same as [`build_with`]'s for the same arguments.
pub fn build_cached(
    config: &Config,
    groups: &[PlanGroup],
    resolved: &HashMap<IpAddr, Resolved>,
    ids: &mut Allocators,
    cache: &mut RingCache,
) -> Result<Plan, PlanError> {
    let ring_size = config.dataplane.ring_size;
    let keys: Vec<VipKey> =
        config.listeners.iter().map(|l| VipKey::new(l.address, l.port, l.protocol.number())).collect();
    let members: Vec<(String, IpAddr)> = groups
        .iter()
        .flat_map(|g| g.targets.iter().filter(|t| t.state != TargetState::Unused).map(|t| (g.name.clone(), t.ip)))
        .collect();

    // Work on copies so that a failure leaves the allocators as they were.
    let mut next_ids = ids.clone();
    let slots = next_ids.vips.assign(&keys, "VIP")?;
    let backend_ids = next_ids.backends.assign(&members, "backend")?;
    let deferred = slots.deferred + backend_ids.deferred > 0;
    let (slots, backend_ids) = (slots.ids, backend_ids.ids);

    let mut backends = BTreeMap::new();
    let mut backend_groups = BTreeMap::new();
    let mut tunnel_ifaces = std::collections::BTreeSet::new();
    // Group -> whether it fails open now; its ring is in `cache`.
    let mut fail_open_now: HashMap<&str, bool> = HashMap::new();
    for g in groups {
        let fail_open = config.target_group(&g.name).is_none_or(|c| c.on_all_unhealthy == AllUnhealthy::FailOpen);
        let has_healthy = g.targets.iter().any(|t| t.state == TargetState::Healthy);
        // Zones: new flows go to this node's zone's healthy targets while it has one.
        let zones = GroupZones::new(config, g);
        let mut in_ring = Vec::new();
        for t in g.targets.iter().filter(|t| t.state != TargetState::Unused) {
            let key = (g.name.clone(), t.ip);
            // No id yet (only quarantined ones are free): in the next plan.
            let Some(&id) = backend_ids.get(&key) else { continue };
            let r = resolved.get(&t.ip).ok_or(PlanError::Unresolved { ip: t.ip })?;
            let (ring_member, flags) = role(t, has_healthy, fail_open);
            let mut b = Backend {
                addr: addr_from_ip(t.ip),
                dst_mac: r.mac,
                src_mac: r.dev.mac,
                ifindex: r.dev.ifindex,
                flags,
                generation: next_ids.generation(key.clone(), id),
                ..Backend::default()
            };
            if let Some(group) = config.target_group(&g.name) {
                tunnel(&mut b, group, r)?;
                if group.forwarding.is_tunnel() {
                    tunnel_ifaces.insert(r.dev.name.clone());
                }
            }
            backends.insert(id, (t.ip, b));
            backend_groups.insert(id, g.name.clone());
            if ring_member && !zones.other_zone(t.ip) {
                in_ring.push((id, t.ip, t.weight));
            }
        }
        let ring_fails_open = !has_healthy && fail_open && !in_ring.is_empty();
        cache.update(&g.name, RingInputs { ring_size, members: in_ring })?;
        fail_open_now.insert(&g.name, ring_fails_open);
    }
    cache.groups.retain(|name, _| fail_open_now.contains_key(name.as_str()));
    let mut tx_ports: Vec<u32> = backends.values().map(|(_, b)| b.ifindex).collect();
    tx_ports.sort_unstable();
    tx_ports.dedup();

    let mut vips = Vec::with_capacity(config.listeners.len());
    for (l, key) in config.listeners.iter().zip(keys) {
        let group = l.target_group.as_str();
        let (ring, fingerprint, fail_open) = match (cache.ring(group), fail_open_now.get(group)) {
            (Some((ring, fingerprint)), Some(fail_open)) => (ring.clone(), fingerprint, fail_open),
            _ => {
                let empty = vec![0; ring_size as usize];
                let fingerprint = fingerprint::of_ring(&empty, &HashMap::new());
                (Arc::from(empty), fingerprint, &false)
            }
        };
        let mut flags = match l.hash {
            HashMode::FiveTuple => VipFlags::empty(),
            HashMode::SourceIp => VipFlags::HASH_SRC_ONLY,
        };
        if *fail_open {
            flags |= VipFlags::FAIL_OPEN;
        }
        // No slot yet (only quarantined ones are free): in the next plan.
        let Some(&slot) = slots.get(&key) else { continue };
        vips.push(PlannedVip { name: l.name.clone(), key, slot, flags, ring, fingerprint });
    }
    next_ids.prune_generations();
    *ids = next_ids;
    let tunnel_ifaces = tunnel_ifaces.into_iter().collect();
    let mut echo_addrs: Vec<lb_common::Addr> =
        config.listeners.iter().filter(|l| l.icmp_echo).map(|l| addr_from_ip(l.address)).collect();
    echo_addrs.sort_unstable();
    echo_addrs.dedup();
    Ok(Plan { vips, backends, backend_groups, tx_ports, echo_addrs, tunnel_ifaces, deferred })
}

/// Fills in how `b` reaches its target through `group`'s tunnel, if it has one: the
/// mode, the outer source (a prefix's base and host bits, or the host's own address),
/// the GUE port and the path MTU.
fn tunnel(b: &mut Backend, group: &TargetGroup, r: &Resolved) -> Result<(), PlanError> {
    b.encap = group.forwarding.encap();
    if !group.forwarding.is_tunnel() {
        return Ok(());
    }
    let family = if r.ip.is_ipv4() { "IPv4" } else { "IPv6" };
    let (src, host_bits) = match group.outer_source_for(r.ip) {
        Some(prefix) => (prefix.network(), u32::from(prefix.max_prefix_len() - prefix.prefix_len())),
        None => match r.src {
            Some(src) if src.is_ipv4() == r.ip.is_ipv4() => (src, 0),
            _ => {
                return Err(PlanError::NoOuterSource {
                    group: group.name.clone(),
                    ip: r.ip,
                    dev: r.dev.name.clone(),
                    family,
                });
            }
        },
    };
    b.outer_src = addr_from_ip(src);
    b.outer_src_mask = outer_src_mask(host_bits);
    b.gue_port = group.gue_port().to_be();
    b.mtu = u16::try_from(r.mtu).unwrap_or(u16::MAX);
    Ok(())
}

/// The mask over an address's last 32 bits that `host_bits` host bits give.
pub fn outer_src_mask(host_bits: u32) -> u32 {
    if host_bits >= 32 { u32::MAX } else { (1u32 << host_bits) - 1 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::Interface;
    use std::{collections::BTreeSet, path::Path, time::Instant};

    fn resolved(config: &Config) -> HashMap<IpAddr, Resolved> {
        let dev = Interface { name: "eth0".into(), ifindex: 2, mac: [2, 0, 0, 0, 0, 1], xdp_prog: None };
        config
            .target_groups
            .iter()
            .flat_map(|g| g.targets.iter())
            .map(|t| (t.ip, Resolved::on_link(t.ip, dev.clone(), [2, 0, 0, 0, 0, 9])))
            .collect()
    }

    fn config(targets: &str) -> Config {
        let text = format!(
            r#"
            [dataplane]
            interfaces = ["eth0"]
            ring_size = 1009
            [[listeners]]
            name = "a"
            address = "198.18.1.100"
            port = 80
            protocol = "tcp"
            target_group = "g"
            [[listeners]]
            name = "b"
            address = "fd00::100"
            port = 0
            protocol = "udp"
            target_group = "g"
            hash = "source-ip"
            [[target_groups]]
            name = "g"
            targets = [{targets}]
            "#
        );
        Config::parse(&text, Path::new("t.toml")).expect("config")
    }

    /// `config`'s group `g` with extra settings (after its `targets` line).
    fn tunnel_config(targets: &str, settings: &str) -> Config {
        let c = config(targets);
        let mut text = toml::to_string(&c).expect("serialise");
        text.push('\n');
        let mut c: Config = toml::from_str(&text).expect("parse back");
        let extra: TargetGroup =
            toml::from_str(&format!("name = \"g\"\ntargets = [{targets}]\n{settings}")).expect("group");
        c.target_groups[0] = extra;
        c.validate().expect("valid");
        c
    }

    #[test]
    fn tunnelled_backends_carry_mode_source_port_and_mtu() {
        let targets = r#"{ ip = "198.18.5.11" }, { ip = "fd00:5::11" }"#;
        let mut res = resolved(&config(targets));
        for r in res.values_mut() {
            r.src =
                Some(if r.ip.is_ipv4() { "198.18.4.1".parse().expect("ip") } else { "fd00:4::1".parse().expect("ip") });
            r.mtu = 1480;
        }
        let backend = |p: &Plan, ip: &str| {
            let ip: IpAddr = ip.parse().expect("ip");
            p.backends.values().find(|(i, _)| *i == ip).map(|(_, b)| *b).expect("backend")
        };
        let v4_map = |s: &str| addr_from_ip(s.parse().expect("ip"));

        // GUE, a configured IPv4 prefix, the LB's own IPv6 address.
        let c = tunnel_config(targets, "forwarding = \"gue\"\ngue_port = 7000\nouter_source = [\"198.18.200.0/24\"]");
        let p = build(&c, &res, &mut Allocators::new(8)).expect("plan");
        let b4 = backend(&p, "198.18.5.11");
        assert_eq!(b4.encap, lb_common::encap::GUE);
        assert_eq!((b4.outer_src, b4.outer_src_mask), (v4_map("198.18.200.0"), 0xff));
        assert_eq!(u16::from_be(b4.gue_port), 7000);
        assert_eq!(b4.mtu, 1480);
        assert_eq!(b4.dst_mac, [2, 0, 0, 0, 0, 9], "the next hop's MAC");
        let b6 = backend(&p, "fd00:5::11");
        assert_eq!((b6.outer_src, b6.outer_src_mask), (v4_map("fd00:4::1"), 0), "the LB's address, fixed");

        // IPIP: a /128 is one fixed address; a /64 varies in its last 32 bits.
        let c =
            tunnel_config(targets, "forwarding = \"ipip\"\nouter_source = [\"fd00:200::/64\", \"198.18.200.7/32\"]");
        let p = build(&c, &res, &mut Allocators::new(8)).expect("plan");
        let (b4, b6) = (backend(&p, "198.18.5.11"), backend(&p, "fd00:5::11"));
        assert_eq!((b4.encap, b4.outer_src, b4.outer_src_mask), (lb_common::encap::IPIP, v4_map("198.18.200.7"), 0));
        assert_eq!((b6.outer_src, b6.outer_src_mask), (v4_map("fd00:200::"), u32::MAX));
        assert_eq!(u16::from_be(b6.gue_port), lb_common::DEFAULT_GUE_PORT, "unused by ipip, but the default");

        // L2 DSR: nothing of the above.
        let c = config(targets);
        let p = build(&c, &res, &mut Allocators::new(8)).expect("plan");
        let b = backend(&p, "198.18.5.11");
        assert_eq!((b.encap, b.outer_src, b.outer_src_mask, b.gue_port), (lb_common::encap::NONE, [0; 16], 0, 0));

        // No prefix and no source address of the target's family: a clear error.
        res.values_mut().for_each(|r| r.src = None);
        let c = tunnel_config(targets, "forwarding = \"ipip\"\nouter_source = [\"198.18.200.0/24\"]");
        let err = build(&c, &res, &mut Allocators::new(8)).expect_err("no IPv6 source").to_string();
        assert!(
            err.contains("fd00:5::11") && err.contains("IPv6 source address") && err.contains("outer_source"),
            "{err}"
        );
    }

    #[test]
    fn outer_source_masks() {
        assert_eq!(outer_src_mask(0), 0);
        assert_eq!(outer_src_mask(8), 0xff);
        assert_eq!(outer_src_mask(31), 0x7fff_ffff);
        assert_eq!(outer_src_mask(32), u32::MAX);
        assert_eq!(outer_src_mask(64), u32::MAX);
    }

    #[test]
    fn ids_are_stable_across_rebuilds() {
        let mut ids = Allocators::new(8);
        let c1 = config(r#"{ ip = "198.18.0.11" }, { ip = "198.18.0.12" }"#);
        let p1 = build(&c1, &resolved(&c1), &mut ids).expect("plan");
        let c2 = config(r#"{ ip = "198.18.0.12" }, { ip = "198.18.0.13" }"#);
        let p2 = build(&c2, &resolved(&c2), &mut ids).expect("plan");
        let id_of = |p: &Plan, ip: &str| {
            let ip: IpAddr = ip.parse().expect("ip");
            p.backends.iter().find(|(_, (i, _))| *i == ip).map(|(id, _)| *id)
        };
        assert_eq!(id_of(&p1, "198.18.0.12"), id_of(&p2, "198.18.0.12"));
        // .11's id was freed; .13 gets a never-used id, not .11's.
        assert_ne!(id_of(&p1, "198.18.0.11"), id_of(&p2, "198.18.0.13"));
        assert_eq!(p1.vips[0].slot, p2.vips[0].slot);
        let generation_of = |p: &Plan, ip: &str| {
            let ip: IpAddr = ip.parse().expect("ip");
            p.backends.values().find(|(i, _)| *i == ip).map(|(_, b)| b.generation)
        };
        assert_eq!(
            generation_of(&p1, "198.18.0.12"),
            generation_of(&p2, "198.18.0.12"),
            "a kept backend keeps its generation"
        );
    }

    #[test]
    fn freed_ids_are_reused_last_and_never_in_the_assignment_that_frees_them() {
        let mut ids: Ids<u32> = Ids::new(1, 4);
        let a = ids.assign(&[10, 11, 12], "x").expect("ids").ids;
        // 11 leaves, 13 arrives: no never-used id is left and 11's is still in the
        // datapath until this assignment's plan is applied, so 13 waits.
        let b = ids.assign(&[10, 12, 13], "x").expect("ids");
        assert_eq!((b.deferred, b.ids.get(&13)), (1, None));
        assert_eq!(b.ids[&10], a[&10]);
        // The next assignment (after the apply) gives 13 the id 11 had.
        let c = ids.assign(&[10, 12, 13], "x").expect("ids");
        assert_eq!((c.deferred, c.ids[&13]), (0, a[&11]));
        // Both 10 and 12 leave; 20 and 21 wait, then get them in the order freed.
        assert_eq!(ids.assign(&[13, 20, 21], "x").expect("ids").deferred, 2);
        let d = ids.assign(&[13, 20, 21], "x").expect("ids").ids;
        assert_eq!((d[&20], d[&21]), (a[&10], a[&12]));
        // More keys than ids: exhausted, not deferred; nothing changes.
        assert!(matches!(ids.assign(&[1, 2, 3, 4], "x"), Err(PlanError::Exhausted { max: 3, .. })));
        assert_eq!(ids.assigned().len(), 3);
    }

    /// `max_vips` equal to the number of listeners, a reload that swaps one listener:
    /// the new listener waits for the old one's slot to leave the datapath, then gets it.
    #[test]
    fn swapping_a_listener_with_every_vip_slot_in_use_takes_two_plans() {
        let mut ids = Allocators::new(2);
        let c1 = config(r#"{ ip = "198.18.0.11" }"#);
        let p1 = build(&c1, &resolved(&c1), &mut ids).expect("plan");
        assert!(!p1.deferred);
        let mut c2 = c1.clone();
        c2.listeners[1].address = "198.18.1.200".parse().expect("ip");
        let step = build(&c2, &resolved(&c2), &mut ids).expect("plan");
        assert!(step.deferred, "the swapped-in listener waits");
        assert_eq!(step.vips.len(), 1);
        assert_eq!(step.vips[0], p1.vips[0], "the kept listener is untouched");
        let done = build(&c2, &resolved(&c2), &mut ids).expect("plan");
        assert!(!done.deferred);
        assert_eq!(done.vips.len(), 2);
        assert_eq!(done.vips[1].slot, p1.vips[1].slot, "it gets the freed slot, one plan later");
    }

    /// Every backend slot in use, one target swapped for another: the new target waits
    /// one plan, then takes the freed id with a new generation; generations of removed
    /// backends are forgotten.
    #[test]
    fn swapping_a_target_with_every_backend_slot_in_use_takes_two_plans() {
        let n = lb_common::MAX_BACKENDS - 1;
        let ip = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0xc612_0000 + i));
        let group = |ips: Vec<IpAddr>| PlanGroup {
            name: "g".into(),
            targets: ips
                .into_iter()
                .map(|ip| PlanTarget { ip, weight: 1, state: TargetState::Healthy, down: false })
                .collect(),
        };
        let mut c = config(r#"{ ip = "198.18.0.11" }"#);
        c.dataplane.ring_size = 8191; // more slots than backends
        let mut all: Vec<IpAddr> = (1..=n).map(ip).collect();
        let mut res = resolved(&c);
        let dev = Interface { name: "eth0".into(), ifindex: 2, mac: [2, 0, 0, 0, 0, 1], xdp_prog: None };
        for &a in all.iter().chain([ip(n + 1)].iter()) {
            res.insert(a, Resolved::on_link(a, dev.clone(), [2, 0, 0, 0, 1, 1]));
        }
        let mut ids = Allocators::new(8);
        let p1 = build_with(&c, &[group(all.clone())], &res, &mut ids).expect("plan");
        assert_eq!(p1.backends.len() as u32, n);
        let gone = all.remove(0);
        let old_id = *p1.backends.iter().find(|(_, (i, _))| *i == gone).map(|(id, _)| id).expect("id");
        all.push(ip(n + 1));
        let step = build_with(&c, &[group(all.clone())], &res, &mut ids).expect("plan");
        assert!(step.deferred);
        assert!(!step.backends.contains_key(&old_id), "the freed id is not rewritten while rings point at it");
        assert!(step.vips.iter().all(|v| v.ring.iter().all(|id| *id != old_id)));
        assert_eq!(ids.generations_len() as u32, n - 1, "the removed backend's generation is forgotten");
        let done = build_with(&c, &[group(all)], &res, &mut ids).expect("plan");
        assert!(!done.deferred);
        let (new_ip, b) = done.backends[&old_id];
        assert_eq!(new_ip, ip(n + 1));
        assert_ne!(b.generation, p1.backends[&old_id].1.generation);
    }

    #[test]
    fn plan_fills_vips_and_backends() {
        let mut ids = Allocators::new(8);
        let c = config(r#"{ ip = "198.18.0.11" }, { ip = "198.18.0.12", weight = 3 }"#);
        let p = build(&c, &resolved(&c), &mut ids).expect("plan");
        assert_eq!(p.vips.len(), 2);
        assert_eq!(p.vips[0].key.port, 80u16.to_be());
        assert_eq!(p.vips[1].key.port, 0);
        assert_eq!(p.vips[1].flags, VipFlags::HASH_SRC_ONLY);
        assert_eq!(p.vips[0].ring.len(), 1009);
        assert!(p.vips[0].ring.iter().all(|id| p.backends.contains_key(id)));
        assert_eq!(p.tx_ports, vec![2]);
        let (ip, b) = p.backends.values().next().expect("backend");
        assert_eq!(lb_common::ip_from_addr(b.addr), *ip);
    }

    fn with_states(config: &Config, states: &[TargetState]) -> Vec<PlanGroup> {
        let mut groups = static_groups(config);
        for (t, st) in groups[0].targets.iter_mut().zip(states) {
            t.state = *st;
        }
        groups
    }

    fn backend_of<'a>(p: &'a Plan, ip: &str) -> Option<(u32, &'a Backend)> {
        let ip: IpAddr = ip.parse().expect("ip");
        p.backends.iter().find(|(_, (i, _))| *i == ip).map(|(id, (_, b))| (*id, b))
    }

    #[test]
    fn health_states_decide_ring_membership_and_flags() {
        use TargetState::*;
        let c = config(r#"{ ip = "198.18.0.11" }, { ip = "198.18.0.12" }, { ip = "198.18.0.13" }"#);
        let p =
            build_with(&c, &with_states(&c, &[Healthy, Unhealthy, Draining]), &resolved(&c), &mut Allocators::new(8))
                .expect("plan");
        let (h, hb) = backend_of(&p, "198.18.0.11").expect("healthy");
        let (_, ub) = backend_of(&p, "198.18.0.12").expect("unhealthy");
        let (d, db) = backend_of(&p, "198.18.0.13").expect("draining");
        assert!(p.vips[0].ring.iter().all(|id| *id == h), "only the healthy target takes new flows");
        assert_eq!(hb.flags, BackendFlags::VALID);
        assert_eq!(ub.flags, BackendFlags::VALID | BackendFlags::DOWN, "unhealthy: flows re-picked");
        assert_eq!(db.flags, BackendFlags::VALID, "draining: existing flows stay");
        assert!(!p.vips[0].ring.contains(&d));
        assert!(!p.vips[0].flags.contains(VipFlags::FAIL_OPEN));
    }

    #[test]
    fn initial_targets_keep_flows_and_unhealthy_drains_stay_down() {
        use TargetState::*;
        let c = config(r#"{ ip = "198.18.0.11" }, { ip = "198.18.0.12" }, { ip = "198.18.0.13" }"#);
        let mut groups = with_states(&c, &[Healthy, Initial, Draining]);
        groups[0].targets[2].down = true;
        let p = build_with(&c, &groups, &resolved(&c), &mut Allocators::new(8)).expect("plan");
        let (i, ib) = backend_of(&p, "198.18.0.12").expect("initial");
        let (_, db) = backend_of(&p, "198.18.0.13").expect("draining");
        assert_eq!(ib.flags, BackendFlags::VALID, "an initial target takes no new flows but keeps any it has");
        assert!(!p.vips[0].ring.contains(&i));
        assert_eq!(
            db.flags,
            BackendFlags::VALID | BackendFlags::DOWN,
            "draining an unhealthy target keeps its flows away"
        );
    }

    #[test]
    fn all_unhealthy_fails_open_or_drops() {
        use TargetState::*;
        let c = config(r#"{ ip = "198.18.0.11" }, { ip = "198.18.0.12" }"#);
        let p = build_with(&c, &with_states(&c, &[Unhealthy, Initial]), &resolved(&c), &mut Allocators::new(8))
            .expect("plan");
        assert!(p.vips.iter().all(|v| v.flags.contains(VipFlags::FAIL_OPEN)), "fail-open is the default");
        assert!(
            p.backends.values().all(|(_, b)| b.flags == BackendFlags::VALID),
            "fail-open keeps flows where they are"
        );
        let mut ids: Vec<u32> = p.vips[0].ring.to_vec();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 2, "both targets take new flows");

        let mut drop_c = c.clone();
        drop_c.target_groups[0].on_all_unhealthy = crate::config::AllUnhealthy::Drop;
        let p = build_with(
            &drop_c,
            &with_states(&drop_c, &[Unhealthy, Unhealthy]),
            &resolved(&drop_c),
            &mut Allocators::new(8),
        )
        .expect("plan");
        assert!(p.vips[0].ring.iter().all(|id| *id == 0), "drop: an empty ring");
        assert!(!p.vips[0].flags.contains(VipFlags::FAIL_OPEN));
    }

    #[test]
    fn a_target_in_two_groups_is_two_backends() {
        let text = toml::to_string(&config(r#"{ ip = "198.18.0.11" }"#)).expect("serialize")
            + "\n[[target_groups]]\nname = \"h\"\ntargets = [{ ip = \"198.18.0.11\" }]\n";
        let c = Config::parse(&text, Path::new("t.toml")).expect("config");
        let p = build(&c, &resolved(&c), &mut Allocators::new(8)).expect("plan");
        assert_eq!(p.backends.len(), 2);
        let groups: Vec<&String> = p.backend_groups.values().collect();
        assert_eq!(groups, vec!["g", "h"]);
    }

    fn two_groups(ring_size: u32) -> Config {
        let text = format!(
            r#"
            [dataplane]
            interfaces = ["eth0"]
            ring_size = {ring_size}
            [[listeners]]
            name = "a"
            address = "198.18.1.100"
            port = 80
            protocol = "tcp"
            target_group = "g"
            [[listeners]]
            name = "b"
            address = "198.18.1.100"
            port = 443
            protocol = "tcp"
            target_group = "g"
            [[listeners]]
            name = "c"
            address = "198.18.1.101"
            port = 80
            protocol = "tcp"
            target_group = "h"
            [[target_groups]]
            name = "g"
            targets = [{{ ip = "198.18.0.11" }}, {{ ip = "198.18.0.12" }}, {{ ip = "198.18.0.13", weight = 2 }}]
            [[target_groups]]
            name = "h"
            targets = [{{ ip = "198.18.0.21" }}, {{ ip = "198.18.0.22" }}]
            "#
        );
        Config::parse(&text, Path::new("t.toml")).expect("config")
    }

    #[test]
    fn cached_rings_give_the_full_plan_and_rebuild_only_changed_groups() {
        use TargetState::*;
        let (c, small) = (two_groups(1009), two_groups(251));
        let groups = |g: &[TargetState], h: &[TargetState], h_weight: u32| {
            let mut groups = static_groups(&c);
            for (t, st) in groups[0].targets.iter_mut().zip(g) {
                t.state = *st;
            }
            for (t, st) in groups[1].targets.iter_mut().zip(h) {
                t.state = *st;
                t.weight = h_weight;
            }
            groups
        };
        let steps: Vec<(&str, &Config, Vec<PlanGroup>, u64)> = vec![
            ("first plan: every ring built", &c, groups(&[Healthy; 3], &[Healthy; 2], 1), 2),
            ("a target of g turns unhealthy", &c, groups(&[Unhealthy, Healthy, Healthy], &[Healthy; 2], 1), 1),
            ("nothing changed", &c, groups(&[Unhealthy, Healthy, Healthy], &[Healthy; 2], 1), 0),
            ("a weight in h changes", &c, groups(&[Unhealthy, Healthy, Healthy], &[Healthy; 2], 3), 1),
            (
                "g drains one, h fails open: same h ring",
                &c,
                groups(&[Unhealthy, Draining, Healthy], &[Unhealthy; 2], 3),
                1,
            ),
            ("g has no healthy target: fails open", &c, groups(&[Unhealthy, Draining, Initial], &[Healthy; 2], 3), 1),
            ("another ring size: every ring built", &small, groups(&[Healthy; 3], &[Healthy; 2], 1), 2),
            ("h's targets unused: an empty ring", &small, groups(&[Healthy; 3], &[Unused; 2], 1), 1),
        ];
        let resolved = resolved(&c);
        let (mut cached_ids, mut full_ids) = (Allocators::new(8), Allocators::new(8));
        let mut cache = RingCache::default();
        for (what, config, groups, builds) in steps {
            let before = cache.builds();
            let cached = build_cached(config, &groups, &resolved, &mut cached_ids, &mut cache).expect("plan");
            let full = build_with(config, &groups, &resolved, &mut full_ids).expect("plan");
            assert_eq!(cached, full, "{what}");
            assert_eq!(cache.builds() - before, builds, "{what}: rings built");
        }
        // A group that leaves the plan leaves the cache.
        let only_g: Vec<PlanGroup> = static_groups(&small).into_iter().take(1).collect();
        build_cached(&small, &only_g, &resolved, &mut cached_ids, &mut cache).expect("plan");
        assert_eq!(cache.groups.keys().collect::<Vec<_>>(), vec!["g"]);
        assert!(cache.reused() > 0);
    }

    /// Two nodes with one config: node B learnt other targets first (so its ids
    /// differ), lists the group's targets in another order and registered them in
    /// another order through a registry. Each VIP's ring sends every slot to the same
    /// target on both, and the fingerprints agree; a change of membership changes them.
    #[test]
    fn rings_and_fingerprints_agree_across_nodes_whatever_the_ids_and_orders() {
        use crate::control::registry::Registry;
        let c = two_groups(1009);
        let mut res = resolved(&c);
        let dev = Interface { name: "eth0".into(), ifindex: 2, mac: [2, 0, 0, 0, 0, 1], xdp_prog: None };
        let runtime: Vec<IpAddr> = (31..39).map(|i| format!("198.18.0.{i}").parse().expect("ip")).collect();
        for ip in &runtime {
            res.insert(*ip, Resolved::on_link(*ip, dev.clone(), [2, 0, 0, 0, 1, 1]));
        }
        let now = Instant::now();
        let node = |order: &[usize], burn_ids: usize, reverse_groups: bool| {
            let mut ids = Allocators::new(8);
            if burn_ids > 0 {
                // Ids taken by targets this node saw first and that left since.
                let other = PlanGroup {
                    name: "g".into(),
                    targets: runtime[..burn_ids]
                        .iter()
                        .map(|ip| PlanTarget { ip: *ip, weight: 1, state: TargetState::Healthy, down: false })
                        .collect(),
                };
                build_with(&c, &[other], &res, &mut ids).expect("plan");
                build_with(&c, &[], &res, &mut ids).expect("plan");
            }
            let mut registry = Registry::default();
            registry.sync(&c, now);
            for &i in order {
                registry.register(("g".into(), runtime[i]), 1 + (i as u32 % 3), None);
                registry.sync(&c, now);
            }
            let mut groups = registry.plan_groups(&c);
            if reverse_groups {
                groups.reverse();
                for g in &mut groups {
                    g.targets.reverse();
                }
            }
            build_with(&c, &groups, &res, &mut ids).expect("plan")
        };
        let by_target = |p: &Plan, v: &PlannedVip| -> Vec<Option<IpAddr>> {
            v.ring.iter().map(|id| p.backends.get(id).map(|(ip, _)| *ip)).collect()
        };
        let a = node(&[0, 1, 2, 3, 4, 5, 6, 7], 0, false);
        assert_eq!(a.backends.len(), 5 + 8, "the registered targets are in the plan");
        assert!(a.vips[0].ring.iter().any(|id| a.backends[id].0 == runtime[7]), "and in the ring");
        let b = node(&[7, 3, 5, 1, 0, 6, 2, 4], 5, true);
        let ids_of = |p: &Plan| p.backends.iter().map(|(id, (ip, _))| (*ip, *id)).collect::<BTreeMap<_, _>>();
        assert_ne!(ids_of(&a), ids_of(&b), "the nodes gave their targets other ids");
        for (va, vb) in a.vips.iter().zip(&b.vips) {
            assert_eq!(va.name, vb.name);
            assert_eq!(by_target(&a, va), by_target(&b, vb), "VIP {}: every slot, the same target", va.name);
            assert_eq!(va.fingerprint, vb.fingerprint, "VIP {}", va.name);
        }
        assert_eq!(a.vips[0].fingerprint, a.vips[1].fingerprint, "two VIPs of one group share the ring");
        assert_ne!(a.vips[0].fingerprint, a.vips[2].fingerprint, "another group, another ring");
        let fewer = node(&[0, 1, 2, 3, 4, 5, 6], 0, false);
        assert_ne!(fewer.vips[0].fingerprint, a.vips[0].fingerprint, "one target less");
        assert_eq!(fewer.vips[2].fingerprint, a.vips[2].fingerprint, "the other group is unchanged");
    }

    /// Node in zone a, targets .11/.12 in a, .21/.22 in b: new flows go to a's healthy
    /// targets, spill over to every zone's healthy ones when a has none, and come back;
    /// `cross_zone` spreads over all; a target in no zone counts as local.
    #[test]
    fn zonal_rings_prefer_this_zone_and_spill_over() {
        use TargetState::*;
        let mut c =
            config(r#"{ ip = "198.18.0.11" }, { ip = "198.18.0.12" }, { ip = "198.18.0.21" }, { ip = "198.18.0.22" }"#);
        c.node.zone = Some("a".into());
        let zone = |name: &str, subnet: &str| crate::config::Zone {
            name: name.into(),
            subnets: vec![subnet.parse().expect("subnet")],
        };
        c.zones = vec![zone("a", "198.18.0.8/29"), zone("b", "198.18.0.16/28")];
        c.validate().expect("valid zones");
        let res = resolved(&c);
        let ring_targets = |c: &Config, states: &[TargetState]| -> (BTreeSet<String>, Vec<String>) {
            let p = build_with(c, &with_states(c, states), &res, &mut Allocators::new(8)).expect("plan");
            let ips = p.vips[0].ring.iter().map(|id| p.backends[id].0.to_string()).collect();
            (ips, crate::control::zones::spilling(c, &with_states(c, states)))
        };
        let set = |l: &[&str]| -> BTreeSet<String> { l.iter().map(|s| s.to_string()).collect() };
        let (ring, spill) = ring_targets(&c, &[Healthy; 4]);
        assert_eq!((ring, spill.len()), (set(&["198.18.0.11", "198.18.0.12"]), 0), "zone a only");
        let (ring, spill) = ring_targets(&c, &[Healthy, Unhealthy, Healthy, Healthy]);
        assert_eq!(ring, set(&["198.18.0.11"]), "a's other healthy target");
        assert!(spill.is_empty());
        let (ring, spill) = ring_targets(&c, &[Unhealthy, Initial, Healthy, Healthy]);
        assert_eq!((ring, spill), (set(&["198.18.0.21", "198.18.0.22"]), vec!["g".to_string()]), "spill-over");
        let (ring, _) = ring_targets(&c, &[Unhealthy, Unhealthy, Unhealthy, Unhealthy]);
        assert_eq!(ring.len(), 4, "nothing healthy anywhere: fail-open over every zone");
        let mut cross = c.clone();
        cross.target_groups[0].cross_zone = true;
        assert_eq!(ring_targets(&cross, &[Healthy; 4]).0.len(), 4, "cross_zone spreads over both zones");
        let mut nozone = c.clone();
        nozone.node.zone = None;
        assert_eq!(ring_targets(&nozone, &[Healthy; 4]).0.len(), 4, "zones off without node.zone");
        let mut unzoned = c.clone();
        unzoned.zones[1].subnets = vec!["198.18.0.21/32".parse().expect("subnet")];
        let (ring, _) = ring_targets(&unzoned, &[Healthy; 4]);
        assert_eq!(ring, set(&["198.18.0.11", "198.18.0.12", "198.18.0.22"]), "a target in no zone is local");
    }

    #[test]
    fn exhausted_slots_leave_allocators_unchanged() {
        let mut ids = Allocators::new(1);
        let c = config(r#"{ ip = "198.18.0.11" }"#);
        assert!(matches!(build(&c, &resolved(&c), &mut ids), Err(PlanError::Exhausted { what: "VIP", .. })));
        assert!(ids.vips.assigned().is_empty() && ids.backends.assigned().is_empty());
        assert_eq!(ids.vips.available(), 1, "the free queue is untouched");
    }
}
