//! The target side of the tunnels: the decap program (`lb-decap`, its own object), loaded
//! and attached by `lb decap`. It strips the outer header of IPIP / IP6IP6 / GUE packets
//! to the host's decap addresses and passes the inner packet to the stack (see
//! lb-ebpf/src/decap.rs). Nothing is pinned: the program lives as long as the [`Decap`]
//! (the `lb decap` process); dropping it detaches it.

use std::net::IpAddr;

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{Xdp, XdpMode as AyaXdpMode},
};
use lb_common::{Addr, DecapCounter, addr_from_ip, globals, maps, programs};
use tracing::{info, warn};

use super::{DataplaneError, attach_hint, load_program, permission_hint, xdp_mut, xdp_ref};
use crate::{config::XdpMode, host::Interface};

/// The decap program's object, built by build.rs from lb-ebpf's `lb-decap` bin. Part of
/// the product (targets run it), apart from the load balancer's object.
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap"));

/// The loaded decap program and the interfaces it is attached to.
pub struct Decap {
    ebpf: Ebpf,
}

impl Decap {
    /// Loads and verifies the program for `addrs` (the host's addresses whose tunnelled
    /// packets are stripped) and GUE on UDP port `gue_port`.
    pub fn load(addrs: &[IpAddr], gue_port: u16) -> Result<Decap, DataplaneError> {
        if addrs.len() > DecapCounter::MAX_ADDRS as usize {
            return Err(DataplaneError::TooManyDecapAddrs { count: addrs.len(), max: DecapCounter::MAX_ADDRS });
        }
        let port = gue_port.to_be();
        let mut ebpf = EbpfLoader::new()
            .override_global(globals::DECAP_GUE_PORT, &port, true)
            .load(DECAP_OBJECT)
            .map_err(|source| {
                let hint = permission_hint(&source);
                DataplaneError::Load { source: Box::new(source), hint }
            })?;
        load_program(&mut ebpf, programs::DECAP)?;
        let name = maps::DECAP_ADDRS;
        let map = ebpf.map_mut(name).ok_or(DataplaneError::MissingMap { name })?;
        let mut table: BpfHashMap<&mut MapData, Addr, u32> =
            BpfHashMap::try_from(map).map_err(|source| DataplaneError::Map { name, source: Box::new(source) })?;
        for a in addrs {
            table
                .insert(addr_from_ip(*a), 0, 0)
                .map_err(|source| DataplaneError::Map { name, source: Box::new(source) })?;
        }
        Ok(Decap { ebpf })
    }

    /// The program (for BPF_PROG_RUN in tests).
    pub fn program(&self) -> Result<&Xdp, DataplaneError> {
        xdp_ref(&self.ebpf, programs::DECAP)
    }

    /// Attaches to `iface`; returns the mode used. Detached when `self` is dropped.
    pub fn attach(&mut self, iface: &Interface, mode: XdpMode) -> Result<&'static str, DataplaneError> {
        if let Some(prog_id) = iface.xdp_prog {
            return Err(DataplaneError::AlreadyAttached { iface: iface.name.clone(), prog_id });
        }
        let prog = xdp_mut(&mut self.ebpf, programs::DECAP)?;
        let attempt = |prog: &mut Xdp, m: AyaXdpMode, label: &'static str| {
            prog.attach_to_if_index(iface.ifindex, m).map_err(|source| {
                let hint = attach_hint(&source);
                DataplaneError::Attach { iface: iface.name.clone(), mode: label, source: Box::new(source), hint }
            })
        };
        let used = match mode {
            XdpMode::Native => attempt(prog, AyaXdpMode::Driver, "native").map(|_| "native")?,
            XdpMode::Generic => attempt(prog, AyaXdpMode::Skb, "generic").map(|_| "generic")?,
            XdpMode::Auto => match attempt(prog, AyaXdpMode::Driver, "native") {
                Ok(_) => "native",
                Err(e) => {
                    warn!(interface = %iface.name, error = %e, "native XDP failed; falling back to generic mode");
                    attempt(prog, AyaXdpMode::Skb, "generic").map(|_| "generic")?
                }
            },
        };
        info!(interface = %iface.name, mode = used, "decap program attached");
        Ok(used)
    }

    /// The program's counters, summed over CPUs, in [`DecapCounter::ALL`] order.
    pub fn counters(&self) -> Result<Vec<(DecapCounter, u64)>, DataplaneError> {
        let name = maps::DECAP_STATS;
        let map = self.ebpf.map(name).ok_or(DataplaneError::MissingMap { name })?;
        let stats: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|source| DataplaneError::Map { name, source: Box::new(source) })?;
        DecapCounter::ALL
            .iter()
            .map(|&c| {
                let values: PerCpuValues<u64> = stats
                    .get(&(c as u32), 0)
                    .map_err(|source| DataplaneError::Map { name, source: Box::new(source) })?;
                Ok((c, values.iter().sum()))
            })
            .collect()
    }
}
