//! Counters summed over CPUs: global verdicts and drop reasons, per VIP, per backend.
//! Read from the maps of a loaded [`Dataplane`](crate::datapath::Dataplane) or from the
//! pins of a running agent; everything needed to label them is in the maps themselves.

use std::{net::IpAddr, path::Path};

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

fn sum(values: &aya::maps::PerCpuValues<Counter>) -> Counter {
    values
        .iter()
        .fold(Counter::default(), |acc, c| Counter { packets: acc.packets + c.packets, bytes: acc.bytes + c.bytes })
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
