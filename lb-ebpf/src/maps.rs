//! The program's maps, one definition each. Names, capacities and layouts come from
//! `lb_common`; the agent resizes `LB_RINGS` and `LB_CONNS` at load time from its config.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    AdmissionWindow, Backend, Counter, DEFAULT_CONN_TABLE_SIZE, DEFAULT_MAX_VIPS, DEFAULT_NEW_FLOW_CAP_PER_CPU,
    DEFAULT_RING_SIZE, DatapathInfo, FlowKey, FlowValue, GlobalCounter, MAX_BACKENDS, MAX_TX_PORTS, MAX_VIPS,
    NEW_FLOW_WINDOW_NS, RINGS_PER_VIP, VipFilter, VipKey, VipMeta,
};

/// VIPs keyed by (address, port, protocol).
#[map(name = "LB_VIPS")]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS, 0);

/// Maglev rings, `RINGS_PER_VIP` per VIP slot, `LB_RING_SIZE` backend ids each.
/// Memory-mappable: the agent reads and writes rings in place, not a syscall per slot.
#[map(name = "LB_RINGS")]
pub static RINGS: Array<u32> =
    Array::with_max_entries(RINGS_PER_VIP * DEFAULT_MAX_VIPS * DEFAULT_RING_SIZE, BPF_F_MMAPABLE);

/// Backend id -> MACs, interface, flags. Id 0 is never valid.
#[map(name = "LB_BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Known flows -> backend id (and their VIP). One table and one LRU for every CPU: a
/// flow keeps its backend whichever CPU its packets land on, and any CPU may use the
/// whole table (per-CPU LRU lists would split it, see ARCHITECTURE.md).
#[map(name = "LB_CONNS")]
pub static CONNS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(DEFAULT_CONN_TABLE_SIZE, 0);

/// The VIP epoch and address filter (1 entry), written by the agent after each change
/// of `LB_VIPS`.
#[map(name = "LB_VIP_FILTER")]
static VIP_FILTER: Array<VipFilter> = Array::with_max_entries(1, 0);

#[inline(always)]
pub fn vip_filter() -> Option<&'static VipFilter> {
    VIP_FILTER.get(0)
}

/// Interfaces (by ifindex) that frames may be redirected to.
#[map(name = "LB_TX_PORTS")]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_TX_PORTS, 0);

/// The layout version and sizes of these maps; read by the agent only (adoption check).
#[map(name = "LB_INFO")]
static INFO: Array<DatapathInfo> = Array::with_max_entries(1, 0);

#[map(name = "LB_GLOBAL_STATS")]
static GLOBAL_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(GlobalCounter::COUNT, 0);

#[map(name = "LB_VIP_STATS")]
static VIP_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

#[map(name = "LB_BACKEND_STATS")]
static BACKEND_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Maglev ring size M, set by the agent at load time.
#[unsafe(no_mangle)]
static LB_RING_SIZE: u32 = DEFAULT_RING_SIZE;

#[inline(always)]
pub fn ring_size() -> u32 {
    // SAFETY: a plain read of a global the loader initialised; volatile so that the
    // compiler does not fold in the default value.
    unsafe { core::ptr::read_volatile(&LB_RING_SIZE) }
}

/// Per CPU: the current one-second window of new flows admitted into `LB_CONNS`.
#[map(name = "LB_NEW_FLOWS")]
static NEW_FLOWS: PerCpuArray<AdmissionWindow> = PerCpuArray::with_max_entries(1, 0);

/// New flows per second per CPU that may enter the connection table (0 = no cap), set by
/// the agent at load time.
#[unsafe(no_mangle)]
static LB_NEW_FLOW_CAP: u32 = DEFAULT_NEW_FLOW_CAP_PER_CPU;

/// Whether a new flow may be inserted into the connection table now: fewer than
/// `LB_NEW_FLOW_CAP` new flows were admitted on this CPU in the current window (fixed
/// one-second windows, opened by the first new flow after the previous one ended).
#[inline(always)]
pub fn admit_new_flow() -> bool {
    // SAFETY: as in `ring_size`.
    let cap = unsafe { core::ptr::read_volatile(&LB_NEW_FLOW_CAP) } as u64;
    if cap == 0 {
        return true;
    }
    let Some(w) = NEW_FLOWS.get_ptr_mut(0) else { return true };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: per-CPU value from a successful lookup; only this CPU touches it (XDP runs
    // with preemption disabled).
    unsafe {
        if (*w).start_ns == 0 || now.wrapping_sub((*w).start_ns) >= NEW_FLOW_WINDOW_NS {
            (*w).start_ns = now;
            (*w).admitted = 0;
        }
        if (*w).admitted >= cap {
            return false;
        }
        (*w).admitted += 1;
    }
    true
}

/// Bumps a global counter. Per-CPU values: no atomics needed.
#[inline(always)]
pub fn count(c: GlobalCounter) {
    if let Some(p) = GLOBAL_STATS.get_ptr_mut(c as u32) {
        // SAFETY: pointer from a successful per-CPU array lookup.
        unsafe { *p += 1 }
    }
}

#[inline(always)]
fn add(map: &PerCpuArray<Counter>, index: u32, bytes: u64) {
    if let Some(p) = map.get_ptr_mut(index) {
        // SAFETY: pointer from a successful per-CPU array lookup.
        unsafe {
            (*p).packets += 1;
            (*p).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn vip_stats(vip: u32, bytes: u64) {
    add(&VIP_STATS, vip, bytes)
}

#[inline(always)]
pub fn backend_stats(backend: u32, bytes: u64) {
    add(&BACKEND_STATS, backend, bytes)
}
