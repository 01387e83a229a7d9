//! What the kernel knows about interfaces, routes and neighbours, asked over rtnetlink
//! (`RTM_GETLINK`, `RTM_GETROUTE`, `RTM_GETNEIGH`). Used to check the configured
//! interfaces and to find, for each target, the interface it sits behind and its MAC.
//!
//! A netlink socket belongs to the network namespace of the thread that opens it. Every
//! lookup therefore opens its own connection when it runs, on the calling thread, and
//! drives that connection inside the same future (no task is spawned for it): a caller
//! on a thread that entered a namespace (`testing::netns::Netns::run`) asks that
//! namespace's kernel tables. The lookups are async so the agent awaits them without
//! blocking its event loop; [`blocking`] wraps them for the tools and tests.
//!
//! The pure part, turning the kernel's messages into [`Interface`], [`Route`] and a
//! neighbour's MAC, is in the `decode_*` functions, unit-tested with hand-built messages.

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    pin::pin,
    time::Duration,
};

use futures_util::{Stream, TryStreamExt};
use rtnetlink::{
    Handle,
    packet_route::{
        AddressFamily,
        link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage, LinkXdp, XdpAttached},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteType, RouteVia},
    },
};
use tokio::time::Instant;

use crate::config::MacAddr;

pub use crate::control::plan::{Interface, Resolved};

pub mod routes;

/// How long the kernel may take to answer one netlink request (it answers at once; this
/// only keeps a lost answer from hanging the agent's start-up).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Interface names are at most this long (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(
        "cannot open a netlink (NETLINK_ROUTE) socket to read interfaces, routes and neighbours; lb needs Linux with rtnetlink"
    )]
    Socket {
        #[source]
        source: io::Error,
    },
    #[error("the netlink request for {what} failed")]
    Request {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("the kernel's netlink answer for {what} has no {missing}")]
    Answer { what: String, missing: &'static str },
    #[error("cannot start the runtime for a blocking host lookup")]
    Runtime {
        #[source]
        source: io::Error,
    },
    #[error("no interface named `{name}` in this network namespace; the interfaces here are: {available}")]
    UnknownInterface { name: String, available: String },
    #[error("interface `{name}` is not an Ethernet interface (link type {link_type}); L2 forwarding needs Ethernet")]
    NotEthernet { name: String, link_type: String },
    #[error(
        "target {ip} is not on-link: the route to it goes via gateway {gateway} on {dev}. L2 direct server return needs every target on the same L2 segment as an LB interface; move the target, add an on-link route, or tunnel to it (`forwarding = \"ipip\"` or `\"gue\"` in its target group)"
    )]
    NotOnLink { ip: IpAddr, gateway: String, dev: String },
    #[error("target {ip} is an address of this host ({dev}); a target must be another machine")]
    LocalAddress { ip: IpAddr, dev: String },
    #[error("no route to target {ip}: {detail}")]
    NoRoute { ip: IpAddr, detail: String },
    #[error(
        "target {ip} did not answer ARP/neighbour discovery on {dev} within {waited:?}: check that it is up and on that segment, or set its `mac` in the config"
    )]
    Unresolved { ip: IpAddr, dev: String, waited: Duration },
}

/// How the kernel routes to an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The output interface's name.
    pub dev: String,
    /// The output interface's index.
    pub ifindex: u32,
    /// The gateway, if the address is not on-link.
    pub via: Option<IpAddr>,
    /// The source address the kernel would use.
    pub prefsrc: Option<IpAddr>,
    /// The destination is an address of this host.
    pub local: bool,
    /// The path MTU: the route's `mtu` metric, else the output interface's MTU.
    pub mtu: u32,
}

// ---------------------------------------------------------------------------------------
// Lookups (async)
// ---------------------------------------------------------------------------------------

/// Looks up an interface by name.
pub async fn interface(name: &str) -> Result<Interface, NetError> {
    with_netlink(|h| async move {
        let link = link_by_name(&h, name).await?;
        decode_link(&link, name)
    })
    .await
}

/// The route the kernel would use for `ip` (as `ip route get ip`).
pub async fn route(ip: IpAddr) -> Result<Route, NetError> {
    with_netlink(|h| async move { route_on(&h, ip).await.map(|(route, _)| route) }).await
}

/// Finds the interface that reaches `ip` on-link and the target's MAC: `mac` if given,
/// else the neighbour table, triggering ARP/NDP and waiting up to `wait` if needed.
pub async fn resolve_target(ip: IpAddr, mac: Option<MacAddr>, wait: Duration) -> Result<Resolved, NetError> {
    with_netlink(|h| async move {
        let (r, link) = route_on(&h, ip).await?;
        if r.local {
            return Err(NetError::LocalAddress { ip, dev: r.dev });
        }
        if let Some(gateway) = r.via {
            return Err(NetError::NotOnLink { ip, gateway: gateway.to_string(), dev: r.dev });
        }
        let dev = decode_link(&link, &r.dev)?;
        let mac = match mac {
            Some(mac) => mac.0,
            None => neighbour_wait(&h, ip, &dev, wait).await?,
        };
        Ok(Resolved { ip, dev, mac, src: r.prefsrc, mtu: r.mtu })
    })
    .await
}

/// A tunnelled target: wherever the routing table sends packets for `ip`, the next
/// hop's MAC (the gateway's, or `ip`'s own when on-link, ARP/NDP triggered and awaited
/// up to `wait` if needed), the output interface, the host's source address and the
/// path MTU.
pub async fn resolve_tunnelled(ip: IpAddr, wait: Duration) -> Result<Resolved, NetError> {
    with_netlink(|h| async move {
        let (r, link) = route_on(&h, ip).await?;
        if r.local {
            return Err(NetError::LocalAddress { ip, dev: r.dev });
        }
        let dev = decode_link(&link, &r.dev)?;
        let mac = neighbour_wait(&h, r.via.unwrap_or(ip), &dev, wait).await?;
        Ok(Resolved { ip, dev, mac, src: r.prefsrc, mtu: r.mtu })
    })
    .await
}

/// [`resolve_target`] for L2 direct server return, [`resolve_tunnelled`] for a target
/// reached through a tunnel.
pub async fn resolve(ip: IpAddr, mac: Option<MacAddr>, tunnelled: bool, wait: Duration) -> Result<Resolved, NetError> {
    if tunnelled { resolve_tunnelled(ip, wait).await } else { resolve_target(ip, mac, wait).await }
}

/// The MAC of the next hop towards `ip` (the gateway, or `ip` itself when on-link),
/// the interface it sits behind and the source address the kernel would use.
pub async fn next_hop(ip: IpAddr, wait: Duration) -> Result<(Interface, [u8; 6], Option<IpAddr>), NetError> {
    with_netlink(|h| async move {
        let (r, link) = route_on(&h, ip).await?;
        if r.local {
            return Err(NetError::LocalAddress { ip, dev: r.dev });
        }
        let dev = decode_link(&link, &r.dev)?;
        let mac = neighbour_wait(&h, r.via.unwrap_or(ip), &dev, wait).await?;
        Ok((dev, mac, r.prefsrc))
    })
    .await
}

/// Sends on `tx` whenever the kernel reports a change of links, addresses, routes or
/// neighbours (rtnetlink multicast groups) in the network namespace of the calling
/// thread, where the socket is opened. A full channel drops the notice: one pending is
/// enough to look again. The returned task ends once `tx`'s receiver is gone.
pub fn watch_changes(tx: tokio::sync::mpsc::Sender<()>) -> Result<tokio::task::JoinHandle<()>, NetError> {
    use rtnetlink::{
        constants::{
            RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE, RTMGRP_LINK, RTMGRP_NEIGH,
        },
        sys::{AsyncSocket, SocketAddr},
    };
    let (mut connection, handle, mut messages) =
        rtnetlink::new_connection().map_err(|source| NetError::Socket { source })?;
    let groups =
        RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE;
    connection
        .socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, groups))
        .map_err(|source| NetError::Request { what: "a subscription to route and neighbour changes".into(), source })?;
    Ok(tokio::spawn(async move {
        let _handle = handle; // keeps the connection open
        let mut connection = pin!(connection);
        loop {
            tokio::select! {
                () = &mut connection => return,
                m = futures_util::StreamExt::next(&mut messages) => {
                    if m.is_none() {
                        return;
                    }
                    if let Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) = tx.try_send(()) {
                        return;
                    }
                }
            }
        }
    }))
}

/// Blocking forms of the lookups, for tools and tests that are not async. Each runs the
/// async lookup to completion on a current-thread runtime on the calling thread (so in
/// that thread's network namespace). Called from inside a runtime, where blocking on a
/// second runtime is not allowed, it runs on a short-lived thread instead, which starts
/// in its creator's network namespace.
pub mod blocking {
    use std::{future::Future, net::IpAddr, time::Duration};

    use super::{Interface, NetError, Resolved, Route};
    use crate::config::MacAddr;

    /// [`super::interface`].
    pub fn interface(name: &str) -> Result<Interface, NetError> {
        run(super::interface(name))
    }

    /// [`super::route`].
    pub fn route(ip: IpAddr) -> Result<Route, NetError> {
        run(super::route(ip))
    }

    /// [`super::resolve_target`].
    pub fn resolve_target(ip: IpAddr, mac: Option<MacAddr>, wait: Duration) -> Result<Resolved, NetError> {
        run(super::resolve_target(ip, mac, wait))
    }

    /// [`super::resolve_tunnelled`].
    pub fn resolve_tunnelled(ip: IpAddr, wait: Duration) -> Result<Resolved, NetError> {
        run(super::resolve_tunnelled(ip, wait))
    }

    /// [`super::next_hop`].
    pub fn next_hop(ip: IpAddr, wait: Duration) -> Result<(Interface, [u8; 6], Option<IpAddr>), NetError> {
        run(super::next_hop(ip, wait))
    }

    pub(crate) fn run<T: Send>(lookup: impl Future<Output = Result<T, NetError>> + Send) -> Result<T, NetError> {
        fn on_this_thread<T>(lookup: impl Future<Output = Result<T, NetError>>) -> Result<T, NetError> {
            tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
                .map_err(|source| NetError::Runtime { source })?
                .block_on(lookup)
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return on_this_thread(lookup);
        }
        std::thread::scope(|s| s.spawn(move || on_this_thread(lookup)).join())
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

// ---------------------------------------------------------------------------------------
// Netlink requests
// ---------------------------------------------------------------------------------------

/// Opens an rtnetlink connection on the calling thread and runs `work` with it, driving
/// the connection in the same future.
async fn with_netlink<T, F, Fut>(work: F) -> Result<T, NetError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, NetError>>,
{
    let (connection, handle, _unsolicited) =
        rtnetlink::new_connection().map_err(|source| NetError::Socket { source })?;
    let mut work = pin!(work(handle));
    let mut connection = pin!(connection);
    tokio::select! {
        biased;
        result = &mut work => return result,
        // The connection ends once no handle is left (or its socket failed); a request
        // made after that fails on its own, so `work` still decides the outcome.
        () = &mut connection => {}
    }
    work.await
}

/// Collects the kernel's answer to one request. Kernel errors come back as the errno
/// they carry (`ENODEV`, `ENETUNREACH`, ...).
async fn ask<M>(answer: impl Stream<Item = Result<M, rtnetlink::Error>>) -> Result<Vec<M>, io::Error> {
    match tokio::time::timeout(ANSWER_TIMEOUT, answer.try_collect::<Vec<M>>()).await {
        Ok(Ok(messages)) => Ok(messages),
        Ok(Err(rtnetlink::Error::NetlinkError(e))) => Err(e.to_io()),
        Ok(Err(rtnetlink::Error::RequestFailed)) => Err(io::Error::other("the netlink connection closed")),
        Ok(Err(e)) => Err(io::Error::other(e.to_string())),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {ANSWER_TIMEOUT:?}"))),
    }
}

async fn link_by_name(h: &Handle, name: &str) -> Result<LinkMessage, NetError> {
    if name.is_empty() || name.len() > MAX_IFNAME {
        return Err(unknown_interface(h, name).await);
    }
    match ask(h.link().get().match_name(name.to_string()).execute()).await {
        Ok(links) => match links.into_iter().next() {
            Some(link) => Ok(link),
            None => Err(unknown_interface(h, name).await),
        },
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Err(unknown_interface(h, name).await),
        Err(source) => Err(NetError::Request { what: format!("interface `{name}`"), source }),
    }
}

async fn link_by_index(h: &Handle, ifindex: u32) -> Result<LinkMessage, NetError> {
    let what = || format!("interface index {ifindex}");
    let links = ask(h.link().get().match_index(ifindex).execute())
        .await
        .map_err(|source| NetError::Request { what: what(), source })?;
    links.into_iter().next().ok_or_else(|| NetError::Answer { what: what(), missing: "interface" })
}

async fn unknown_interface(h: &Handle, name: &str) -> NetError {
    NetError::UnknownInterface { name: name.to_string(), available: interface_names(h).await }
}

/// Names of all interfaces in this network namespace (for error messages).
async fn interface_names(h: &Handle) -> String {
    match ask(h.link().get().execute()).await {
        Ok(links) => links.iter().filter_map(link_name).collect::<Vec<_>>().join(", "),
        Err(_) => "unknown".to_string(),
    }
}

/// The route to `ip` and its output interface's link message.
async fn route_on(h: &Handle, ip: IpAddr) -> Result<(Route, LinkMessage), NetError> {
    let answers = ask(h.route().get(route_request(ip)).execute())
        .await
        .map_err(|e| NetError::NoRoute { ip, detail: e.to_string() })?;
    let answer =
        answers.first().ok_or_else(|| NetError::NoRoute { ip, detail: "the kernel returned no route".into() })?;
    let facts = decode_route(answer, ip)?;
    let link = link_by_index(h, facts.oif).await?;
    let dev = link_name(&link)
        .ok_or_else(|| NetError::Answer { what: format!("interface index {}", facts.oif), missing: "name" })?
        .to_string();
    let local = facts.local || link.header.flags.contains(LinkFlags::Loopback);
    let mtu = facts.mtu.or_else(|| link_mtu(&link)).unwrap_or(0);
    Ok((Route { dev, ifindex: facts.oif, via: facts.via, prefsrc: facts.prefsrc, local, mtu }, link))
}

/// The `RTM_GETROUTE` request of `ip route get ip`: the full-length destination and
/// nothing else, so the kernel resolves the route a packet to `ip` would take (source
/// address, gateway and output interface; type `local` for an address of this host).
fn route_request(ip: IpAddr) -> RouteMessage {
    let mut msg = RouteMessage::default();
    let (family, len) = match ip {
        IpAddr::V4(_) => (AddressFamily::Inet, 32),
        IpAddr::V6(_) => (AddressFamily::Inet6, 128),
    };
    msg.header.address_family = family;
    msg.header.destination_prefix_length = len;
    msg.attributes.push(RouteAttribute::Destination(RouteAddress::from(ip)));
    msg
}

/// Polls the neighbour table for `ip` on `dev` until it has a usable MAC, sending a
/// datagram to `ip` every second (so the kernel sends ARP/NDP), for up to `wait`.
async fn neighbour_wait(h: &Handle, ip: IpAddr, dev: &Interface, wait: Duration) -> Result<[u8; 6], NetError> {
    let start = Instant::now();
    let mut last_poke: Option<Instant> = None;
    loop {
        if let Some(mac) = neighbour(h, ip, dev).await? {
            return Ok(mac);
        }
        if start.elapsed() >= wait {
            return Err(NetError::Unresolved { ip, dev: dev.name.clone(), waited: wait });
        }
        if last_poke.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            poke(ip);
            last_poke = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The neighbour table's usable MAC for `ip` on `dev`, if any: an `RTM_GETNEIGH` dump of
/// the address family, which the kernel filters by interface (`NDA_IFINDEX`).
async fn neighbour(h: &Handle, ip: IpAddr, dev: &Interface) -> Result<Option<[u8; 6]>, NetError> {
    let family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    let mut request = h.neighbours().get().set_address_family(family);
    request.message_mut().attributes.push(NeighbourAttribute::IfIndex(dev.ifindex));
    let entries = ask(request.execute())
        .await
        .map_err(|source| NetError::Request { what: format!("the neighbour table of {}", dev.name), source })?;
    Ok(entries.iter().find_map(|e| decode_neighbour(e, ip, dev.ifindex)))
}

/// Makes the kernel resolve `ip`: a datagram to its discard port needs its MAC first.
/// The socket does not block: the datagram waits in the kernel for the resolution.
fn poke(ip: IpAddr) {
    let bind: SocketAddr = match ip {
        IpAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        IpAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    if let Ok(sock) = UdpSocket::bind(bind)
        && sock.set_nonblocking(true).is_ok()
    {
        let _ = sock.send_to(b"lb neighbour probe", SocketAddr::new(ip, 9));
    }
}

// ---------------------------------------------------------------------------------------
// Decoding (pure)
// ---------------------------------------------------------------------------------------

fn link_mtu(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(mtu) => Some(*mtu),
        _ => None,
    })
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
}

/// An interface from its `RTM_NEWLINK` message; `name` is the name it was asked by.
fn decode_link(link: &LinkMessage, name: &str) -> Result<Interface, NetError> {
    let missing = |missing| NetError::Answer { what: format!("interface `{name}`"), missing };
    if link.header.link_layer_type != LinkLayerType::Ether {
        let link_type = link.header.link_layer_type.to_string().to_lowercase();
        return Err(NetError::NotEthernet { name: name.to_string(), link_type });
    }
    if link.header.index == 0 {
        return Err(missing("ifindex"));
    }
    let mac = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(mac) => <[u8; 6]>::try_from(mac.as_slice()).ok(),
            _ => None,
        })
        .ok_or_else(|| missing("MAC address"))?;
    let xdp_prog = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Xdp(xdp) => xdp_prog(xdp),
        _ => None,
    });
    Ok(Interface { name: name.to_string(), ifindex: link.header.index, mac, xdp_prog })
}

/// The id of the XDP program attached, if one is (0 if the kernel names none). With
/// programs in several modes (`XDP_ATTACHED_MULTI`), the first of driver, generic and
/// offloaded.
fn xdp_prog(xdp: &[LinkXdp]) -> Option<u32> {
    let attached = xdp.iter().find_map(|x| match x {
        LinkXdp::Attached(a) => Some(*a),
        _ => None,
    });
    if matches!(attached, None | Some(XdpAttached::None)) {
        return None;
    }
    let id = |pick: fn(&LinkXdp) -> Option<u32>| xdp.iter().find_map(pick);
    let prog = id(|x| if let LinkXdp::ProgId(i) = x { Some(*i) } else { None })
        .or_else(|| id(|x| if let LinkXdp::DrvProgId(i) = x { Some(*i) } else { None }))
        .or_else(|| id(|x| if let LinkXdp::SkbProgId(i) = x { Some(*i) } else { None }))
        .or_else(|| id(|x| if let LinkXdp::HwProgId(i) = x { Some(*i) } else { None }));
    Some(prog.unwrap_or(0))
}

/// What a route answer says, before its output interface is looked up.
#[derive(Debug, PartialEq, Eq)]
struct RouteFacts {
    oif: u32,
    via: Option<IpAddr>,
    prefsrc: Option<IpAddr>,
    local: bool,
    /// The route's `mtu` metric, if it has one.
    mtu: Option<u32>,
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The facts of the kernel's answer to [`route_request`] for `ip`. Routes that deliver
/// nowhere (`unreachable`, `blackhole`, `prohibit`, `throw`) are [`NetError::NoRoute`].
fn decode_route(r: &RouteMessage, ip: IpAddr) -> Result<RouteFacts, NetError> {
    let kind = match r.header.kind {
        RouteType::Unreachable => Some("unreachable"),
        RouteType::BlackHole => Some("blackhole"),
        RouteType::Prohibit => Some("prohibit"),
        RouteType::Throw => Some("throw"),
        _ => None,
    };
    if let Some(kind) = kind {
        return Err(NetError::NoRoute { ip, detail: format!("the route to it is of type {kind}") });
    }
    let mut facts =
        RouteFacts { oif: 0, via: None, prefsrc: None, local: r.header.kind == RouteType::Local, mtu: None };
    for a in &r.attributes {
        match a {
            RouteAttribute::Oif(oif) => facts.oif = *oif,
            RouteAttribute::Gateway(g) => facts.via = route_ip(g).or(facts.via),
            RouteAttribute::Via(RouteVia::Inet(v4)) => facts.via = Some(IpAddr::V4(*v4)),
            RouteAttribute::Via(RouteVia::Inet6(v6)) => facts.via = Some(IpAddr::V6(*v6)),
            RouteAttribute::PrefSource(s) => facts.prefsrc = route_ip(s),
            RouteAttribute::Metrics(metrics) => {
                facts.mtu = metrics.iter().find_map(|m| if let RouteMetric::Mtu(mtu) = m { Some(*mtu) } else { None })
            }
            _ => {}
        }
    }
    if facts.oif == 0 {
        return Err(NetError::NoRoute { ip, detail: "the kernel's route names no output interface".into() });
    }
    Ok(facts)
}

/// The MAC of a neighbour entry for `ip` on `ifindex`, if the entry is usable: resolved
/// (`REACHABLE`, `STALE`, `DELAY`, `PROBE`) or static (`PERMANENT`), with an Ethernet
/// address. `INCOMPLETE`, `FAILED`, `NOARP` and `NONE` entries are not (as with `ip
/// neigh show`, which hides `NOARP` and `NONE` entries, and the earlier code, which
/// skipped the rest).
fn decode_neighbour(n: &NeighbourMessage, ip: IpAddr, ifindex: u32) -> Option<[u8; 6]> {
    if n.header.ifindex != ifindex {
        return None;
    }
    let usable = matches!(
        n.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
    );
    if !usable {
        return None;
    }
    let is_ip = n.attributes.iter().any(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => IpAddr::V4(*v4) == ip,
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => IpAddr::V6(*v6) == ip,
        _ => false,
    });
    if !is_ip {
        return None;
    }
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(mac) => <[u8; 6]>::try_from(mac.as_slice()).ok(),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_core::Parseable;

    use super::*;

    // Messages as the kernel sends them (after the netlink header), built by hand.

    /// One netlink attribute: length, type, payload padded to 4 bytes.
    fn nla(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(4 + payload.len() as u16).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(payload);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    const ARPHRD_ETHER: u16 = 1;
    const ARPHRD_LOOPBACK: u16 = 772;
    const IFF_UP: u32 = 0x1;
    const IFF_LOOPBACK: u32 = 0x8;
    const IFLA_ADDRESS: u16 = 1;
    const IFLA_IFNAME: u16 = 3;
    const IFLA_XDP: u16 = 43;
    const IFLA_XDP_ATTACHED: u16 = 2;
    const IFLA_XDP_PROG_ID: u16 = 4;
    const IFLA_XDP_DRV_PROG_ID: u16 = 5;
    const NLA_F_NESTED: u16 = 0x8000;

    /// `ifinfomsg` plus attributes.
    fn link_bytes(link_type: u16, index: u32, flags: u32, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut v = vec![0u8 /* AF_UNSPEC */, 0];
        v.extend_from_slice(&link_type.to_ne_bytes());
        v.extend_from_slice(&index.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        attrs.iter().for_each(|a| v.extend_from_slice(a));
        v
    }

    fn link(bytes: &[u8]) -> LinkMessage {
        LinkMessage::parse(bytes).expect("link message")
    }

    fn name_attr(name: &str) -> Vec<u8> {
        let mut s = name.as_bytes().to_vec();
        s.push(0);
        nla(IFLA_IFNAME, &s)
    }

    fn xdp_attr(inner: &[Vec<u8>]) -> Vec<u8> {
        nla(IFLA_XDP | NLA_F_NESTED, &inner.concat())
    }

    #[test]
    fn decodes_an_ethernet_link_with_xdp() {
        let bytes = link_bytes(
            ARPHRD_ETHER,
            7,
            IFF_UP,
            &[
                name_attr("veth0"),
                nla(IFLA_ADDRESS, &[2, 0, 0x5e, 0, 0x53, 1]),
                xdp_attr(&[nla(IFLA_XDP_ATTACHED, &[1 /* DRV */]), nla(IFLA_XDP_PROG_ID, &42u32.to_ne_bytes())]),
            ],
        );
        let l = link(&bytes);
        assert_eq!(link_name(&l), Some("veth0"));
        let i = decode_link(&l, "veth0").expect("link");
        assert_eq!(
            i,
            Interface { name: "veth0".into(), ifindex: 7, mac: [2, 0, 0x5e, 0, 0x53, 1], xdp_prog: Some(42) }
        );
    }

    #[test]
    fn xdp_prog_of_each_attach_state() {
        let none = [LinkXdp::Attached(XdpAttached::None)];
        assert_eq!(xdp_prog(&none), None);
        assert_eq!(xdp_prog(&[]), None);
        let multi = [LinkXdp::Attached(XdpAttached::Multiple), LinkXdp::SkbProgId(9), LinkXdp::DrvProgId(8)];
        assert_eq!(xdp_prog(&multi), Some(8), "driver mode first");
        assert_eq!(xdp_prog(&[LinkXdp::Attached(XdpAttached::SocketBuffer)]), Some(0), "attached, id not given");
        // From the wire: multi mode carries the per-mode ids, not IFLA_XDP_PROG_ID.
        let bytes = link_bytes(
            ARPHRD_ETHER,
            3,
            IFF_UP,
            &[
                nla(IFLA_ADDRESS, &[2, 0, 0, 0, 0, 3]),
                xdp_attr(&[nla(IFLA_XDP_ATTACHED, &[4 /* MULTI */]), nla(IFLA_XDP_DRV_PROG_ID, &5u32.to_ne_bytes())]),
            ],
        );
        assert_eq!(decode_link(&link(&bytes), "eth0").expect("link").xdp_prog, Some(5));
        let bytes = link_bytes(
            ARPHRD_ETHER,
            3,
            IFF_UP,
            &[nla(IFLA_ADDRESS, &[2, 0, 0, 0, 0, 3]), xdp_attr(&[nla(IFLA_XDP_ATTACHED, &[0])])],
        );
        assert_eq!(decode_link(&link(&bytes), "eth0").expect("link").xdp_prog, None);
    }

    #[test]
    fn rejects_non_ethernet_and_incomplete_links() {
        let lo = link_bytes(ARPHRD_LOOPBACK, 1, IFF_UP | IFF_LOOPBACK, &[name_attr("lo"), nla(IFLA_ADDRESS, &[0; 6])]);
        match decode_link(&link(&lo), "lo") {
            Err(NetError::NotEthernet { name, link_type }) => {
                assert_eq!((name.as_str(), link_type.as_str()), ("lo", "loopback"))
            }
            other => panic!("{other:?}"),
        }
        let no_mac = link_bytes(ARPHRD_ETHER, 4, IFF_UP, &[name_attr("eth1")]);
        assert!(matches!(decode_link(&link(&no_mac), "eth1"), Err(NetError::Answer { missing: "MAC address", .. })));
        let short_mac = link_bytes(ARPHRD_ETHER, 4, IFF_UP, &[nla(IFLA_ADDRESS, &[1, 2, 3, 4])]);
        assert!(matches!(decode_link(&link(&short_mac), "eth1"), Err(NetError::Answer { .. })));
    }

    const RTA_DST: u16 = 1;
    const RTA_OIF: u16 = 4;
    const RTA_GATEWAY: u16 = 5;
    const RTA_PREFSRC: u16 = 7;
    const RTA_TABLE: u16 = 15;
    const RTN_UNICAST: u8 = 1;
    const RTN_LOCAL: u8 = 2;
    const RTN_UNREACHABLE: u8 = 7;
    const AF_INET: u8 = 2;
    const AF_INET6: u8 = 10;

    /// `rtmsg` (a route get answer: table main, scope universe, RTM_F_CLONED) plus
    /// attributes.
    fn route_bytes(family: u8, dst_len: u8, kind: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut v = vec![family, dst_len, 0, 0, 254, 0, 0, kind];
        v.extend_from_slice(&0x200u32.to_ne_bytes());
        attrs.iter().for_each(|a| v.extend_from_slice(a));
        v
    }

    fn route_msg(bytes: &[u8]) -> RouteMessage {
        RouteMessage::parse(bytes).expect("route message")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn octets(ip: IpAddr) -> Vec<u8> {
        match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        }
    }

    #[test]
    fn decodes_on_link_and_gateway_routes() {
        let t = ip("198.18.0.11");
        let bytes = route_bytes(
            AF_INET,
            32,
            RTN_UNICAST,
            &[
                nla(RTA_TABLE, &254u32.to_ne_bytes()),
                nla(RTA_DST, &octets(t)),
                nla(RTA_OIF, &2u32.to_ne_bytes()),
                nla(RTA_PREFSRC, &octets(ip("198.18.0.1"))),
            ],
        );
        let facts = decode_route(&route_msg(&bytes), t).expect("route");
        assert_eq!(facts, RouteFacts { oif: 2, via: None, prefsrc: Some(ip("198.18.0.1")), local: false, mtu: None });

        let t = ip("fd00:19::5");
        let bytes = route_bytes(
            AF_INET6,
            128,
            RTN_UNICAST,
            &[
                nla(RTA_DST, &octets(t)),
                nla(RTA_GATEWAY, &octets(ip("fd00:18::11"))),
                nla(RTA_OIF, &3u32.to_ne_bytes()),
                nla(RTA_PREFSRC, &octets(ip("fd00:18::1"))),
            ],
        );
        let facts = decode_route(&route_msg(&bytes), t).expect("route");
        assert_eq!(facts.via, Some(ip("fd00:18::11")));
        assert_eq!(facts.oif, 3);
    }

    #[test]
    fn decodes_local_and_refuses_unreachable_routes() {
        let t = ip("198.18.0.1");
        let bytes = route_bytes(AF_INET, 32, RTN_LOCAL, &[nla(RTA_DST, &octets(t)), nla(RTA_OIF, &1u32.to_ne_bytes())]);
        assert!(decode_route(&route_msg(&bytes), t).expect("route").local);

        let t = ip("fd00:99::1");
        let bytes =
            route_bytes(AF_INET6, 128, RTN_UNREACHABLE, &[nla(RTA_DST, &octets(t)), nla(RTA_OIF, &1u32.to_ne_bytes())]);
        match decode_route(&route_msg(&bytes), t) {
            Err(e @ NetError::NoRoute { .. }) => assert!(e.to_string().contains("of type unreachable"), "{e}"),
            other => panic!("{other:?}"),
        }
        let no_oif = route_bytes(AF_INET, 32, RTN_UNICAST, &[nla(RTA_DST, &octets(ip("198.18.0.9")))]);
        assert!(matches!(decode_route(&route_msg(&no_oif), ip("198.18.0.9")), Err(NetError::NoRoute { .. })));
    }

    #[test]
    fn route_request_is_a_full_length_lookup() {
        let r = route_request(ip("fd00:18::11"));
        assert_eq!(r.header.address_family, AddressFamily::Inet6);
        assert_eq!(r.header.destination_prefix_length, 128);
        assert_eq!(r.attributes, vec![RouteAttribute::Destination(RouteAddress::from(ip("fd00:18::11")))]);
        let r = route_request(ip("198.18.0.11"));
        assert_eq!((r.header.address_family, r.header.destination_prefix_length), (AddressFamily::Inet, 32));
    }

    const NDA_DST: u16 = 1;
    const NDA_LLADDR: u16 = 2;

    /// `ndmsg` plus destination and link-layer address.
    fn neigh_bytes(family: u8, ifindex: u32, state: u16, dst: IpAddr, lladdr: Option<&[u8]>) -> Vec<u8> {
        let mut v = vec![family, 0, 0, 0];
        v.extend_from_slice(&ifindex.to_ne_bytes());
        v.extend_from_slice(&state.to_ne_bytes());
        v.extend_from_slice(&[0, 1 /* RTN_UNICAST */]);
        v.extend_from_slice(&nla(NDA_DST, &octets(dst)));
        if let Some(mac) = lladdr {
            v.extend_from_slice(&nla(NDA_LLADDR, mac));
        }
        v
    }

    fn neigh(bytes: &[u8]) -> NeighbourMessage {
        NeighbourMessage::parse(bytes).expect("neighbour message")
    }

    #[test]
    fn neighbour_states() {
        let t = ip("198.18.0.11");
        let mac = [2, 0, 0, 0, 0, 11];
        let at = |state: u16| decode_neighbour(&neigh(&neigh_bytes(AF_INET, 2, state, t, Some(&mac))), t, 2);
        // REACHABLE, STALE, DELAY, PROBE, PERMANENT
        for state in [0x02, 0x04, 0x08, 0x10, 0x80] {
            assert_eq!(at(state), Some(mac), "state {state:#x}");
        }
        // INCOMPLETE, FAILED, NOARP, NONE
        for state in [0x01, 0x20, 0x40, 0x00] {
            assert_eq!(at(state), None, "state {state:#x}");
        }
    }

    #[test]
    fn neighbour_must_match_address_and_interface() {
        let t = ip("fd00:18::11");
        let mac = [2, 0, 0, 0, 0, 11];
        let reachable = neigh(&neigh_bytes(AF_INET6, 2, 0x02, t, Some(&mac)));
        assert_eq!(decode_neighbour(&reachable, t, 2), Some(mac));
        assert_eq!(decode_neighbour(&reachable, t, 3), None, "another interface");
        assert_eq!(decode_neighbour(&reachable, ip("fd00:18::12"), 2), None, "another address");
        let no_lladdr = neigh(&neigh_bytes(AF_INET6, 2, 0x02, t, None));
        assert_eq!(decode_neighbour(&no_lladdr, t, 2), None);
    }

    // The kernel's own answers, in whatever network namespace the tests run in: every
    // namespace has `lo`, and reading it needs no privileges.

    #[test]
    fn asks_the_kernel_outside_and_inside_a_runtime() {
        let check = || {
            match blocking::interface("lo") {
                Err(NetError::NotEthernet { link_type, .. }) => assert_eq!(link_type, "loopback"),
                other => panic!("{other:?}"),
            }
            match blocking::interface("lb-no-such0") {
                Err(e @ NetError::UnknownInterface { .. }) => {
                    let text = e.to_string();
                    assert!(text.contains("no interface named `lb-no-such0`") && text.contains("lo"), "{text}");
                }
                other => panic!("{other:?}"),
            }
            assert!(matches!(blocking::interface("a-name-longer-than-15"), Err(NetError::UnknownInterface { .. })));
            let r = blocking::route(ip("127.0.0.1")).expect("route to loopback");
            assert!(r.local && r.dev == "lo" && r.via.is_none(), "{r:?}");
            assert!(matches!(
                blocking::resolve_target(ip("127.0.0.1"), None, Duration::ZERO),
                Err(NetError::LocalAddress { .. })
            ));
        };
        check();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async { check() });
    }
}
