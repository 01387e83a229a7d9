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
    parse::{Flow, Parsed, ptr_at},
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
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    let filter = maps::vip_filter();
    let epoch = filter.map_or(0, |f| f.epoch);

    // No VIP has this address (host traffic): to the kernel without a lookup.
    if filter.is_some_and(|f| !f.may_contain(&flow.key.dst)) {
        return (xdp_action::PASS, C::PassNotVip);
    }
    // Known flows first: a segment other than a SYN is looked up in the connection table
    // before the VIP; an entry whose VIP facts are of the current epoch needs no VIP
    // lookup at all.
    let mut prior = None;
    if !flow.syn && filter.is_some() {
        let entry = CONNS.get_ptr_mut(&flow.key);
        if let Some(p) = entry {
            // SAFETY: the pointer comes from a successful map lookup.
            let e = unsafe { *p };
            if e.vip_epoch == epoch
                && let Some(b) = usable(&e)
            {
                count(C::ConnHit);
                return deliver(ctx, &flow, e.vip as u32, e.fail_open != 0, e.backend, &b, frame_len);
            }
        }
        prior = Some(entry);
    }

    let Some(vip) = lookup_vip(&flow.key.dst, flow.key.dport, flow.key.proto) else {
        return (xdp_action::PASS, C::PassNotVip);
    };
    let Some((id, backend)) = pick_backend(&flow, &vip, epoch, prior) else {
        if log::allowed() {
            warn!(ctx, "VIP slot {} has no usable target: frame dropped (drop_no_backend)", vip.id);
        }
        return (xdp_action::DROP, C::DropNoBackend);
    };
    deliver(ctx, &flow, vip.id, vip.flags.contains(VipFlags::FAIL_OPEN), id, &backend, frame_len)
}

/// Forwards to backend `id` and counts a forwarded frame for its VIP and backend.
#[inline(always)]
fn deliver(
    ctx: &XdpContext,
    flow: &Flow,
    vip: u32,
    fail_open: bool,
    id: u32,
    backend: &Backend,
    frame_len: u64,
) -> Verdict {
    let verdict = forward(ctx, flow, id, backend);
    if verdict.1 == C::DropRedirectFailed && log::allowed() {
        warn!(
            ctx,
            "redirect of backend {} to ifindex {} failed: frame dropped (drop_redirect_failed); is the interface gone?",
            id,
            backend.ifindex
        );
    }
    if matches!(verdict.1, C::Tx | C::Redirect) {
        maps::vip_stats(vip, frame_len);
        maps::backend_stats(id, frame_len);
        if fail_open {
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

/// The remembered backend of a connection-table entry, if it is still the same one
/// (configured, same generation), down or not.
#[inline(always)]
fn remembered(e: &FlowValue) -> Option<Backend> {
    backend(e.backend).filter(|b| b.generation == e.generation)
}

/// [`remembered`], if not down.
#[inline(always)]
fn usable(e: &FlowValue) -> Option<Backend> {
    remembered(e).filter(|b| !b.flags.contains(BackendFlags::DOWN))
}

/// Backend id of the VIP's ring slot for this flow (`flow_hash % M`).
#[inline(always)]
fn ring_pick(key: &lb_common::FlowKey, vip: &VipMeta) -> Option<u32> {
    let m = ring_size();
    if m == 0 {
        return None;
    }
    let hash = flow_hash(key, vip.flags.contains(VipFlags::HASH_SRC_ONLY));
    let slot = vip.ring.wrapping_mul(m).wrapping_add(hash % m);
    let p = RINGS.get_ptr(slot)?;
    // SAFETY: pointer from a successful array lookup. Volatile: the load must be issued
    // here, before the connection-table lookup, even though a hit never uses it.
    Some(unsafe { core::ptr::read_volatile(p) })
}

/// Known flow: its remembered backend (if that backend is still configured).
/// New flow: the VIP's Maglev ring at hash % M, remembered in the connection table if
/// this CPU's new-flow admission cap allows (else counted `conn_admission_skipped`).
/// A known flow re-picked from the ring overwrites its own entry: no cap, no eviction.
///
/// `prior`: the connection-table lookup `process` already made (`None`: not made).
/// Otherwise the ring slot is read *before* the lookup: for a new flow both are cache
/// misses, and issued in this order the CPU overlaps them (the ring read would
/// otherwise wait for the table's chain walk).
///
/// A TCP SYN that misses the table is forwarded by the ring but not remembered
/// (`conn_syn`): the connection enters the table with its next segment (the handshake's
/// ACK), which misses, picks the same ring slot and is inserted. A flood of SYNs from
/// spoofed sources, whose handshakes never complete, thus evicts nothing and costs no
/// insert (see ARCHITECTURE.md, "New flows").
#[inline(always)]
fn pick_backend(
    flow: &Flow,
    vip: &VipMeta,
    epoch: u32,
    prior: Option<Option<*mut FlowValue>>,
) -> Option<(u32, Backend)> {
    let key = &flow.key;
    let (early, entry) = match prior {
        Some(entry) => (None, entry),
        None => (Some(ring_pick(key, vip)?), CONNS.get_ptr_mut(key)),
    };
    let fail_open = vip.flags.contains(VipFlags::FAIL_OPEN) as u8;
    let known = entry.is_some();
    if let Some(p) = entry {
        // SAFETY: the pointer comes from a successful map lookup.
        let e = unsafe { *p };
        match remembered(&e) {
            Some(b) if !b.flags.contains(BackendFlags::DOWN) => {
                count(C::ConnHit);
                if e.vip_epoch != epoch || e.vip as u32 != vip.id || e.fail_open != fail_open {
                    // SAFETY: as above; a plain store into the entry (its VIP facts).
                    unsafe {
                        (*p).vip_epoch = epoch;
                        (*p).vip = vip.id as u16;
                        (*p).fail_open = fail_open;
                    }
                }
                return Some((e.backend, b));
            }
            Some(_) => count(C::ConnRepicked),
            // The remembered backend was removed (its slot may hold another one now).
            None => {}
        }
        // Pick again below.
    }
    count(if known || !flow.syn { C::ConnMiss } else { C::ConnSyn });
    let id = match early {
        Some(id) => id,
        None => ring_pick(key, vip)?,
    };
    let b = backend(id)?;
    if !known {
        // Neither a SYN nor an ICMP error about a flow makes the flow known.
        if flow.syn || flow.icmp_error {
            return Some((id, b));
        }
        if !maps::admit_new_flow() {
            count(C::ConnAdmissionSkipped);
            return Some((id, b));
        }
    }
    let value =
        FlowValue { backend: id, generation: b.generation, vip_epoch: epoch, vip: vip.id as u16, fail_open, _pad: 0 };
    if CONNS.insert(key, value, 0).is_err() {
        count(C::ConnInsertFailed);
    }
    Some((id, b))
}

/// L2 direct server return: only the MACs change; the IP header (client source address
/// included) is left exactly as received. Tunnels (`encap.rs`): the packet goes inside
/// an outer header to the next hop.
#[inline(always)]
fn forward(ctx: &XdpContext, flow: &Flow, id: u32, b: &Backend) -> Verdict {
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
