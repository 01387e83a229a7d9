//! The tools' XDP object (lb-tools-ebpf): `lb_gen`, `lb_sink`, `lb_pass`, loaded by the
//! tools and the test rigs only; and the LB's second build (`lb-xdp-next`) for the
//! upgrade tests.

use aya::{
    Ebpf,
    maps::MapData,
    programs::{Xdp, XdpMode as AyaXdpMode},
};
use lb_common::maps;

use crate::datapath::{DataplaneError, load_program, permission_hint, xdp_mut, xdp_ref};

/// The tools' XDP object, built by build.rs from lb-tools-ebpf.
pub static TOOLS_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-tools"));

/// lb-xdp built again with one extra counter: the "build B" of the upgrade tests. Built
/// by build.rs from lb-ebpf's `lb-xdp-next` bin: the same program (`lb_xdp`) and maps as
/// [`EBPF_OBJECT`](crate::datapath::EBPF_OBJECT), plus `LB_NEXT_SEEN`
/// ([`maps::NEXT_SEEN`]), which counts every frame it sees.
pub static NEXT_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-xdp-next"));

/// One of the tools' programs (`lb_pass`, `lb_sink`), loaded on its own. Attached in native mode if asked; detached on drop.
pub struct AuxProgram {
    ebpf: Ebpf,
    name: &'static str,
}

impl AuxProgram {
    /// Loads `name` (one of `lb_common::programs`).
    pub fn load(name: &'static str) -> Result<Self, DataplaneError> {
        let mut ebpf = Ebpf::load(TOOLS_OBJECT).map_err(|source| {
            let hint = permission_hint(&source);
            DataplaneError::Load { source: Box::new(source), hint }
        })?;
        load_program(&mut ebpf, name)?;
        Ok(AuxProgram { ebpf, name })
    }

    /// Loads `name` and attaches it to `ifindex` in native mode.
    pub fn attach(name: &'static str, ifindex: u32) -> Result<Self, DataplaneError> {
        let mut aux = AuxProgram::load(name)?;
        xdp_mut(&mut aux.ebpf, name)?.attach_to_if_index(ifindex, AyaXdpMode::Driver).map_err(|source| {
            DataplaneError::Attach {
                iface: format!("ifindex {ifindex}"),
                mode: "native",
                source: Box::new(source),
                hint: "",
            }
        })?;
        Ok(aux)
    }

    pub fn program(&self) -> Result<&Xdp, DataplaneError> {
        xdp_ref(&self.ebpf, self.name)
    }

    /// What an `lb_sink` counted, summed over CPUs.
    pub fn sink_count(&self) -> Result<lb_common::Counter, DataplaneError> {
        let name = maps::SINK_STATS;
        let map = self.ebpf.map(name).ok_or(DataplaneError::MissingMap { name })?;
        let arr: aya::maps::PerCpuArray<&MapData, lb_common::Counter> =
            map.try_into().map_err(|source| DataplaneError::Map { name, source: Box::new(source) })?;
        let v = arr.get(&0, 0).map_err(|source| DataplaneError::Map { name, source: Box::new(source) })?;
        Ok(v.iter().fold(lb_common::Counter::default(), |a, c| a.plus(*c)))
    }
}
