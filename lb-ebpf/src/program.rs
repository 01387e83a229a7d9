// The LB program's code, shared by both crate roots: `main.rs` (the product, `lb-xdp`)
// and `next.rs` (`lb-xdp-next`, the same program with one extra counter, the "build B"
// of the upgrade tests). Included with `include!`, so it has no inner attributes; each
// root declares the modules (`encap`, `icmp`, `log`, `maps`, `parse`, `probe`, `ptr`) and
// defines `on_frame`, which `lb_xdp` calls once per frame after counting it as received.

use aya_ebpf::{macros::xdp, programs::XdpContext};
use aya_log_ebpf::warn;
use lb_common::{
    Backend, BackendFlags, FlowValue, GlobalCounter as C, VipFlags, VipKey, VipMeta, flow_hash, xdp_action,
};
use network_types::eth::EthHdr;

use crate::{
    maps::{BACKENDS, CONNS, RINGS, TX_PORTS, count, ring_size},
    parse::{Parsed, ptr_at},
};

/// A verdict and the counter that records why.
type Verdict = (u32, C);

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    count(C::Rx);
    on_frame();
    let (action, why) = process(&ctx);
    count(why);
    action
}

#[inline(always)]
fn process(ctx: &XdpContext) -> Verdict {
    let flow = match parse::parse(ctx) {
        Parsed::Flow(flow) => flow,
        Parsed::Echo(echo) => return icmp::echo(ctx, &echo),
        Parsed::Pass(why) => return (xdp_action::PASS, why),
        Parsed::Drop(why) => return (xdp_action::DROP, why),
    };
    let Some(vip) = lookup_vip(&flow.key.dst, flow.key.dport, flow.key.proto) else {
        return (xdp_action::PASS, C::PassNotVip);
    };
    let frame_len = (ctx.data_end() - ctx.data()) as u64;

    let Some((id, backend)) = pick_backend(&flow.key, &vip) else {
        if log::allowed() {
            warn!(ctx, "VIP slot {} has no usable target: frame dropped (drop_no_backend)", vip.id);
        }
        return (xdp_action::DROP, C::DropNoBackend);
    };
    let verdict = forward(ctx, &flow, id, &backend);
    if verdict.1 == C::DropRedirectFailed && log::allowed() {
        warn!(
            ctx,
            "redirect of backend {} to ifindex {} failed: frame dropped (drop_redirect_failed); is the interface gone?",
            id,
            backend.ifindex
        );
    }
    if matches!(verdict.1, C::Tx | C::Redirect) {
        maps::vip_stats(vip.id, frame_len);
        maps::backend_stats(id, frame_len);
        if vip.flags.contains(VipFlags::FAIL_OPEN) {
            count(C::FailOpen);
        }
        if flow.icmp_error {
            count(C::IcmpErrorForwarded);
        }
    }
    verdict
}

/// Exact (address, port, protocol) first, then the all-ports VIP (port 0).
#[inline(always)]
fn lookup_vip(addr: &lb_common::Addr, port: u16, proto: u8) -> Option<VipMeta> {
    let mut key = VipKey { addr: *addr, port, proto, _pad: 0 };
    if let Some(meta) = maps::VIPS.get_ptr(&key) {
        // SAFETY: the pointer comes from a successful map lookup.
        return Some(unsafe { *meta });
    }
    key.port = 0;
    // SAFETY: as above.
    maps::VIPS.get_ptr(&key).map(|meta| unsafe { *meta })
}

#[inline(always)]
fn backend(id: u32) -> Option<Backend> {
    let b = *BACKENDS.get(id)?;
    if b.flags.contains(BackendFlags::VALID) { Some(b) } else { None }
}

/// Known flow: its remembered backend (if that backend is still configured).
/// New flow: the VIP's Maglev ring at hash % M, remembered in the connection table if
/// this CPU's new-flow admission cap allows (else counted `conn_admission_skipped`).
/// A known flow re-picked from the ring overwrites its own entry: no cap, no eviction.
#[inline(always)]
fn pick_backend(key: &lb_common::FlowKey, vip: &VipMeta) -> Option<(u32, Backend)> {
    let mut known = false;
    if let Some(v) = CONNS.get_ptr(key) {
        known = true;
        // SAFETY: the pointer comes from a successful map lookup.
        let remembered = unsafe { *v };
        if let Some(b) = backend(remembered.backend) {
            if b.generation == remembered.generation {
                if !b.flags.contains(BackendFlags::DOWN) {
                    count(C::ConnHit);
                    return Some((remembered.backend, b));
                }
                count(C::ConnRepicked);
            }
        }
        // The remembered backend was removed (its slot may hold another one now):
        // pick again below.
    }
    count(C::ConnMiss);
    let m = ring_size();
    if m == 0 {
        return None;
    }
    let hash = flow_hash(key, vip.flags.contains(VipFlags::HASH_SRC_ONLY));
    let slot = vip.ring.wrapping_mul(m).wrapping_add(hash % m);
    let id = *RINGS.get(slot)?;
    let b = backend(id)?;
    if !known && !maps::admit_new_flow() {
        count(C::ConnAdmissionSkipped);
        return Some((id, b));
    }
    if CONNS.insert(key, FlowValue { backend: id, generation: b.generation }, 0).is_err() {
        count(C::ConnInsertFailed);
    }
    Some((id, b))
}

/// L2 direct server return: only the MACs change; the IP header (client source address
/// included) is left exactly as received. Tunnels (`encap.rs`): the packet goes inside
/// an outer header to the next hop.
#[inline(always)]
fn forward(ctx: &XdpContext, flow: &parse::Flow, id: u32, b: &Backend) -> Verdict {
    if b.encap != lb_common::encap::NONE {
        match encap::encapsulate(ctx.ctx, id, encap::pack(flow)) {
            encap::outcome::SENT => {}
            encap::outcome::TOO_BIG_ANSWERED => return (xdp_action::TX, C::IcmpTooBig),
            encap::outcome::TOO_BIG_DROPPED => return (xdp_action::DROP, C::DropTooBig),
            _ => return (xdp_action::DROP, C::DropEncapFailed),
        }
    } else {
        let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
            return (xdp_action::DROP, C::DropTruncEth);
        };
        // SAFETY: ptr_at checked that a whole EthHdr lies inside the frame.
        unsafe {
            (*eth).dst_addr = b.dst_mac;
            (*eth).src_addr = b.src_mac;
        }
    }
    if b.ifindex as usize == ctx.ingress_ifindex() {
        return (xdp_action::TX, C::Tx);
    }
    match TX_PORTS.redirect(b.ifindex, xdp_action::DROP as u64) {
        Ok(action) => (action, C::Redirect),
        Err(_) => (xdp_action::DROP, C::DropRedirectFailed),
    }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
