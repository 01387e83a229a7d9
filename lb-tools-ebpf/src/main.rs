//! The tools' XDP programs, in their own object so that the agent's object holds the
//! load balancer only: the packet generator (BPF_PROG_RUN live frames, as
//! xdp-trafficgen does), a counting sink, and a pass program that gives a veth peer
//! NAPI. Loaded by `lb gen`, `lb bench`, `lb demo` and the tests, never by `lb run`.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::bpf_get_smp_processor_id,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{Counter, ETH_P_IP, ETH_P_IPV6, GEN_HDR_MAX, GEN_NO_CSUM, GEN_PORT_BASE, GenTemplate, xdp_action};

/// A pointer to a `T` at `offset` bytes into the frame, if the whole `T` is inside it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, ()> {
    if ctx.data() + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return Err(());
    }
    Ok((ctx.data() + offset) as *mut T)
}

/// Gives a veth peer NAPI so that it receives native-mode XDP_TX/redirected frames.
#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::PASS
}

#[map(name = "LB_GEN_TEMPLATE")]
static GEN_TEMPLATE: Array<GenTemplate> = Array::with_max_entries(1, 0);

#[map(name = "LB_GEN_SEQ")]
static GEN_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "LB_SINK_STATS")]
static SINK_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(1, 0);

/// Copies 8 template bytes at `off` back into the frame if both hold them.
#[inline(always)]
fn restore8(ctx: &XdpContext, t: &GenTemplate, off: usize) {
    if off + 8 > GEN_HDR_MAX || off as u32 >= t.hdr_len {
        return;
    }
    if let Ok(p) = ptr_at::<[u8; 8]>(ctx, off) {
        let mut w = [0u8; 8];
        w.copy_from_slice(&t.hdr[off..off + 8]);
        // SAFETY: ptr_at checked the 8 bytes are inside the frame.
        unsafe { *p = w };
    }
}

/// Replaces the big-endian 16-bit word at `off` with `f(old)`; returns the old word.
#[inline(always)]
fn replace16(ctx: &XdpContext, off: u32, f: impl FnOnce(u16) -> u16) -> Option<u16> {
    let off = off as usize;
    if off > GEN_HDR_MAX {
        return None;
    }
    let p = ptr_at::<[u8; 2]>(ctx, off).ok()?;
    // SAFETY: ptr_at checked the two bytes are inside the frame.
    let old = u16::from_be_bytes(unsafe { *p });
    unsafe { *p = f(old).to_be_bytes() };
    Some(old)
}

/// RFC 1624 incremental checksum update for one 16-bit word: HC' = ~(~HC + ~m + m').
#[inline(always)]
fn csum_replace(hc: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!hc) as u32 + (!old) as u32 + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Generates one frame: restores the template headers, sets the source address and port
/// of this frame's flow (fixing the L4 checksum incrementally, RFC 1624), sends it out (XDP_TX
/// from the ingress interface given to BPF_PROG_RUN).
#[xdp]
pub fn lb_gen(ctx: XdpContext) -> u32 {
    let Some(t) = GEN_TEMPLATE.get(0) else { return xdp_action::ABORTED };
    restore8(&ctx, t, 0);
    restore8(&ctx, t, 8);
    restore8(&ctx, t, 16);
    restore8(&ctx, t, 24);
    restore8(&ctx, t, 32);
    restore8(&ctx, t, 40);
    restore8(&ctx, t, 48);
    restore8(&ctx, t, 56);
    restore8(&ctx, t, 64);
    restore8(&ctx, t, 72);

    let Some(seq) = GEN_SEQ.get_ptr_mut(0) else { return xdp_action::ABORTED };
    // SAFETY: per-CPU value from a successful lookup.
    let n = unsafe {
        let n = *seq;
        *seq = n + 1;
        n
    };
    // SAFETY: no preconditions.
    let cpu = unsafe { bpf_get_smp_processor_id() } as u64;
    let flows = if t.flows == 0 { 1 } else { t.flows as u64 };
    let addrs = if t.addrs == 0 { 1 } else { t.addrs as u64 };
    let flow = n.wrapping_add(cpu.wrapping_mul(7919)) % flows;
    let port = GEN_PORT_BASE.wrapping_add((flow / addrs) as u16);
    let addr_delta = (flow % addrs) as u16;

    // Source port, then the low 16 bits of the source address; each change is folded
    // into the checksums that cover it.
    let Some(old_port) = replace16(&ctx, t.sport_off, |_| port) else { return xdp_action::ABORTED };
    let Some(old_addr) = replace16(&ctx, t.addr_off, |w| w.wrapping_add(addr_delta)) else {
        return xdp_action::ABORTED;
    };
    let new_addr = old_addr.wrapping_add(addr_delta);
    if t.csum_off != GEN_NO_CSUM {
        let fixed = replace16(&ctx, t.csum_off, |c| {
            let c = csum_replace(csum_replace(c, old_port, port), old_addr, new_addr);
            if c == 0 { 0xffff } else { c } // UDP: 0 means "no checksum"; TCP treats both alike
        });
        if fixed.is_none() {
            return xdp_action::ABORTED;
        }
    }
    if t.ip_csum_off != GEN_NO_CSUM && replace16(&ctx, t.ip_csum_off, |c| csum_replace(c, old_addr, new_addr)).is_none()
    {
        return xdp_action::ABORTED;
    }
    xdp_action::TX
}

/// Counts and drops IP frames; passes the rest (ARP, so the sink's host stays
/// reachable).
#[xdp]
pub fn lb_sink(ctx: XdpContext) -> u32 {
    let Ok(eth) = ptr_at::<network_types::eth::EthHdr>(&ctx, 0) else { return xdp_action::DROP };
    // SAFETY: ptr_at checked the header is inside the frame.
    let et = u16::from_be(unsafe { (*eth).ether_type });
    if et != ETH_P_IP && et != ETH_P_IPV6 {
        return xdp_action::PASS;
    }
    if let Some(c) = SINK_STATS.get_ptr_mut(0) {
        // SAFETY: per-CPU value from a successful lookup.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += (ctx.data_end() - ctx.data()) as u64;
        }
    }
    xdp_action::DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
