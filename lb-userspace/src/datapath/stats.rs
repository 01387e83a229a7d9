//! Counters summed over CPUs: global verdicts and drop reasons, per VIP, per backend.
//! Read from the maps of a loaded [`Dataplane`](crate::datapath::Dataplane) or from the
//! pins of a running agent; everything needed to label them is in the maps themselves,
//! except the target group of a backend, which only the agent knows (see
//! [`Snapshot::render_grouped`] and [`Grouped`]).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::Path,
};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray};
use lb_common::{Backend, BackendFlags, Counter, GlobalCounter, VipKey, VipMeta, maps};
use serde::Serialize;

use crate::{
    config::MacAddr,
    datapath::{DataplaneError, open_pinned},
};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VipStats {
    pub vip: String,
    pub slot: u32,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BackendStats {
    pub id: u32,
    pub ip: IpAddr,
    pub mac: String,
    pub ifindex: u32,
    pub packets: u64,
    pub bytes: u64,
}

/// Packets and bytes of one target group: the sums over its backends (one per target of
/// the group in the maps, draining ones included).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GroupStats {
    pub group: String,
    /// Its backends in the maps.
    pub targets: usize,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Snapshot {
    /// Every global counter by name, in index order.
    pub global: Vec<(String, u64)>,
    pub vips: Vec<VipStats>,
    pub backends: Vec<BackendStats>,
}

impl Snapshot {
    /// A global counter's value.
    pub fn global(&self, c: GlobalCounter) -> u64 {
        self.global.get(c as usize).map(|(_, v)| *v).unwrap_or(0)
    }

    pub fn backend(&self, ip: IpAddr) -> Option<&BackendStats> {
        self.backends.iter().find(|b| b.ip == ip)
    }

    /// Per-group sums over the backends, `group_of` naming a backend id's group (backends
    /// it names none for are left out), plus a zero row for each name in `also` without
    /// backends. Sorted by group name.
    pub fn groups<'a>(
        &self,
        group_of: impl Fn(u32) -> Option<&'a str>,
        also: impl IntoIterator<Item = &'a str>,
    ) -> Vec<GroupStats> {
        let mut sums: BTreeMap<&str, GroupStats> = BTreeMap::new();
        let empty = |g: &str| GroupStats { group: g.to_string(), targets: 0, packets: 0, bytes: 0 };
        for g in also {
            sums.entry(g).or_insert_with(|| empty(g));
        }
        for b in &self.backends {
            if let Some(g) = group_of(b.id) {
                let s = sums.entry(g).or_insert_with(|| empty(g));
                s.targets += 1;
                s.packets = s.packets.saturating_add(b.packets);
                s.bytes = s.bytes.saturating_add(b.bytes);
            }
        }
        sums.into_values().collect()
    }

    /// Reads the maps through `get` (a loaded object's maps or pinned ones).
    pub fn read<'a>(
        mut get: impl FnMut(&'static str) -> Result<&'a Map, DataplaneError>,
    ) -> Result<Snapshot, DataplaneError> {
        let err = |name: &'static str| move |source| DataplaneError::Map { name, source: Box::new(source) };

        let global_map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(get(maps::GLOBAL_STATS)?).map_err(err(maps::GLOBAL_STATS))?;
        let mut global = Vec::new();
        for &c in GlobalCounter::ALL {
            let v = global_map.get(&(c as u32), 0).map_err(err(maps::GLOBAL_STATS))?;
            global.push((c.name().to_string(), v.iter().sum()));
        }

        let vip_stats: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(get(maps::VIP_STATS)?).map_err(err(maps::VIP_STATS))?;
        let vip_map: BpfHashMap<&MapData, VipKey, VipMeta> =
            BpfHashMap::try_from(get(maps::VIPS)?).map_err(err(maps::VIPS))?;
        let mut vips = Vec::new();
        for entry in vip_map.iter() {
            let (key, meta) = entry.map_err(err(maps::VIPS))?;
            let c = sum(&vip_stats.get(&meta.id, 0).map_err(err(maps::VIP_STATS))?);
            vips.push(VipStats { vip: super::display_key(&key), slot: meta.id, packets: c.packets, bytes: c.bytes });
        }
        vips.sort_by_key(|v| v.slot);

        let backend_stats: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(get(maps::BACKEND_STATS)?).map_err(err(maps::BACKEND_STATS))?;
        let backend_map: Array<&MapData, Backend> =
            Array::try_from(get(maps::BACKENDS)?).map_err(err(maps::BACKENDS))?;
        let mut backends = Vec::new();
        for id in 1..backend_map.len() {
            let b = backend_map.get(&id, 0).map_err(err(maps::BACKENDS))?;
            if !b.flags.contains(BackendFlags::VALID) {
                continue;
            }
            let c = sum(&backend_stats.get(&id, 0).map_err(err(maps::BACKEND_STATS))?);
            backends.push(BackendStats {
                id,
                ip: lb_common::ip_from_addr(b.addr),
                mac: MacAddr(b.dst_mac).to_string(),
                ifindex: b.ifindex,
                packets: c.packets,
                bytes: c.bytes,
            });
        }
        Ok(Snapshot { global, vips, backends })
    }

    /// Reads the pinned maps of a running agent.
    pub fn read_pinned(dir: &Path) -> Result<Snapshot, DataplaneError> {
        let mut opened = Vec::new();
        for name in [maps::GLOBAL_STATS, maps::VIP_STATS, maps::VIPS, maps::BACKEND_STATS, maps::BACKENDS] {
            opened.push((name, open_pinned(dir, name)?));
        }
        Snapshot::read(|name| {
            opened.iter().find(|(n, _)| *n == name).map(|(_, m)| m).ok_or(DataplaneError::MissingMap { name })
        })
    }

    /// A table for terminals.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(out, "{:<32} {:>14} {:>16}", "VIP", "PACKETS", "BYTES");
        for v in &self.vips {
            let _ = writeln!(out, "{:<32} {:>14} {:>16}", v.vip, v.packets, v.bytes);
        }
        let _ = writeln!(out, "\n{:<5} {:<28} {:<18} {:>14} {:>16}", "ID", "BACKEND", "MAC", "PACKETS", "BYTES");
        for b in &self.backends {
            let _ = writeln!(out, "{:<5} {:<28} {:<18} {:>14} {:>16}", b.id, b.ip, b.mac, b.packets, b.bytes);
        }
        let _ = writeln!(out, "\n{:<24} {:>14}", "COUNTER", "VALUE");
        for (name, v) in &self.global {
            let _ = writeln!(out, "{name:<24} {v:>14}");
        }
        out
    }
}

/// Where `lb stats` learnt the backends' groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupSource {
    /// Backend id -> group, from the agent's control API (`GET /v1/targets`).
    Agent(HashMap<u32, String>),
    /// No agent answered (the reason): backends are shown by id and address only.
    Unknown(String),
}

impl GroupSource {
    fn group_of(&self, id: u32) -> Option<&str> {
        match self {
            GroupSource::Agent(groups) => groups.get(&id).map(String::as_str),
            GroupSource::Unknown(_) => None,
        }
    }
}

/// A backend with its group, as `lb stats --json` prints it.
#[derive(Debug, Serialize)]
pub struct GroupedBackend<'a> {
    #[serde(flatten)]
    pub backend: &'a BackendStats,
    /// `null` when the group is unknown (no agent answered, or the agent no longer has
    /// this backend).
    pub group: Option<&'a str>,
}

/// `lb stats --json`: the snapshot's fields, each backend with its `group`, the
/// per-group sums (`null` without an agent), and `groups_from` (`agent`, or
/// `unknown (no agent): REASON`).
#[derive(Debug, Serialize)]
pub struct Grouped<'a> {
    pub global: &'a [(String, u64)],
    pub vips: &'a [VipStats],
    pub backends: Vec<GroupedBackend<'a>>,
    pub groups: Option<Vec<GroupStats>>,
    pub groups_from: String,
}

impl Snapshot {
    /// The snapshot with each backend's group from `source`.
    pub fn grouped<'a>(&'a self, source: &'a GroupSource) -> Grouped<'a> {
        let (groups, groups_from) = match source {
            GroupSource::Agent(_) => (Some(self.groups(|id| source.group_of(id), [])), "agent".to_string()),
            GroupSource::Unknown(why) => (None, format!("unknown (no agent): {why}")),
        };
        Grouped {
            global: &self.global,
            vips: &self.vips,
            backends: self
                .backends
                .iter()
                .map(|b| GroupedBackend { backend: b, group: source.group_of(b.id) })
                .collect(),
            groups,
            groups_from,
        }
    }

    /// A table for terminals, with per-group sums and each backend's group when the
    /// agent answered; otherwise the backends by id and address, and a note.
    pub fn render_grouped(&self, source: &GroupSource) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(out, "{:<32} {:>14} {:>16}", "VIP", "PACKETS", "BYTES");
        for v in &self.vips {
            let _ = writeln!(out, "{:<32} {:>14} {:>16}", v.vip, v.packets, v.bytes);
        }
        match source {
            GroupSource::Agent(_) => {
                let _ = writeln!(out, "\n{:<24} {:>7} {:>14} {:>16}", "GROUP", "TARGETS", "PACKETS", "BYTES");
                for g in self.groups(|id| source.group_of(id), []) {
                    let _ = writeln!(out, "{:<24} {:>7} {:>14} {:>16}", g.group, g.targets, g.packets, g.bytes);
                }
            }
            GroupSource::Unknown(why) => {
                let _ = writeln!(out, "\ngroup unknown (no agent): {why}");
            }
        }
        let _ = writeln!(
            out,
            "\n{:<5} {:<16} {:<28} {:<18} {:>14} {:>16}",
            "ID", "GROUP", "BACKEND", "MAC", "PACKETS", "BYTES"
        );
        for b in &self.backends {
            let group = source.group_of(b.id).unwrap_or("-");
            let _ =
                writeln!(out, "{:<5} {:<16} {:<28} {:<18} {:>14} {:>16}", b.id, group, b.ip, b.mac, b.packets, b.bytes);
        }
        let _ = writeln!(out, "\n{:<24} {:>14}", "COUNTER", "VALUE");
        for (name, v) in &self.global {
            let _ = writeln!(out, "{name:<24} {v:>14}");
        }
        out
    }
}

fn sum(values: &aya::maps::PerCpuValues<Counter>) -> Counter {
    values.iter().fold(Counter::default(), |acc, c| acc.plus(*c))
}

/// How full the connection table ([`maps::CONNS`]) is.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct ConnFill {
    /// Entries counted.
    pub entries: u64,
    /// The table's size (`conn_table_size`).
    pub capacity: u32,
    /// False if the count stopped at its time budget: `entries` is then a lower bound.
    pub complete: bool,
}

/// Counts the entries of the pinned connection table under `dir`, one key lookup
/// (`bpf_map_get_next_key`) per entry, stopping after `budget`. The table changes while
/// it is walked: the count is close, not exact.
pub fn conn_fill_pinned(dir: &Path, budget: std::time::Duration) -> Result<ConnFill, DataplaneError> {
    let name = maps::CONNS;
    let err = |source| DataplaneError::Map { name, source: Box::new(source) };
    let map = open_pinned(dir, name)?;
    let Map::LruHashMap(data) = &map else {
        return Err(DataplaneError::MissingMap { name });
    };
    let capacity = data.info().map_err(err)?.max_entries();
    let conns: BpfHashMap<&MapData, lb_common::FlowKey, lb_common::FlowValue> =
        BpfHashMap::try_from(&map).map_err(err)?;
    let deadline = std::time::Instant::now() + budget;
    let mut entries = 0u64;
    for key in conns.keys() {
        key.map_err(err)?;
        entries += 1;
        // Checking the clock every 1024 keys keeps its cost out of the walk.
        if entries.is_multiple_of(1024) && std::time::Instant::now() >= deadline {
            return Ok(ConnFill { entries, capacity, complete: false });
        }
    }
    Ok(ConnFill { entries, capacity, complete: true })
}
