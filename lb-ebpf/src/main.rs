//! The XDP load balancer.
//!
//! Packet path: parse (Ethernet, one 802.1Q tag, IPv4/IPv6, TCP/UDP) -> known flows
//! (not SYNs) straight from the connection table while their VIP epoch is current ->
//! otherwise VIP lookup (exact port, then all-ports) -> connection table -> Maglev ring
//! on a miss (SYNs not remembered) -> rewrite the MACs (L2 direct server return) ->
//! XDP_TX or DevMap redirect. Every exit bumps exactly one verdict counter. See
//! ARCHITECTURE.md for the why of each choice.
//!
//! Invariants: no panics (every read is bounds-checked, no indexing), no allocation,
//! no loops; every name, capacity, flag and counter index comes from `lb_common`.
//!
//! The code is in `program.rs`, shared with `next.rs` (the upgrade tests' second build).
#![no_std]
#![no_main]

mod log;
mod maps;
mod parse;

include!("program.rs");

/// The product build does nothing more per frame.
#[inline(always)]
fn on_frame() {}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
