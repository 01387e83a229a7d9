//! Logs of rare datapath events through aya-log, at most one per CPU per second. Used
//! only on branches that drop a frame because of a configuration problem (a VIP with no
//! usable target, a redirect to an interface that is gone), never on the forwarding path.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::map, maps::PerCpuArray};

/// Per CPU: when this CPU last logged (ns since boot).
#[map(name = "LB_LOG_LIMIT")]
static LOG_LIMIT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

const INTERVAL_NS: u64 = 1_000_000_000;

/// Whether this CPU may log now; if so, the next second is used up.
#[inline(always)]
pub fn allowed() -> bool {
    let Some(last) = LOG_LIMIT.get_ptr_mut(0) else { return false };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: per-CPU value from a successful lookup; only this CPU touches it.
    unsafe {
        if *last != 0 && now.wrapping_sub(*last) < INTERVAL_NS {
            return false;
        }
        *last = now;
    }
    true
}
