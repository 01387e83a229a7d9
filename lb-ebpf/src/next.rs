//! `lb-xdp-next`: the load balancer of `main.rs` built again with one extra counter,
//! the "build B" of the upgrade tests (a program whose instructions, hence whose tag,
//! differ from the product's while it uses the same maps and forwards the same way).
//!
//! The extra counter, `LB_NEXT_SEEN`, counts every frame the program sees. Only this
//! object has it: it is defined here, not in `maps.rs`, so the product object does not.
#![no_std]
#![no_main]

mod encap;
mod icmp;
mod log;
mod maps;
mod parse;
mod probe;
mod ptr;

use aya_ebpf::{macros::map, maps::PerCpuArray};

include!("program.rs");

/// Per CPU: frames this build has seen (`lb_common::maps::NEXT_SEEN`, test-only).
#[map(name = "LB_NEXT_SEEN")]
static NEXT_SEEN: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Counts the frame into `LB_NEXT_SEEN`.
#[inline(always)]
fn on_frame() {
    if let Some(p) = NEXT_SEEN.get_ptr_mut(0) {
        // SAFETY: pointer from a successful per-CPU array lookup; only this CPU touches it.
        unsafe { *p += 1 }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
