//! VIP announcement routes: one `blackhole` route per announced VIP address (/32 or
//! /128) in a dedicated kernel routing table, marked with lb's route protocol number
//! ([`RTPROT_LB`]), over rtnetlink (`RTM_NEWROUTE`, `RTM_DELROUTE`, `RTM_GETROUTE` dump).
//! A routing daemon (BIRD's `kernel` protocol with `learn`) imports that table and
//! announces it over BGP; docs/scale-out.md has the daemon's config.
//!
//! The table is only a list of prefixes for the daemon: no `ip rule` points at it, so the
//! routes never forward anything on this host (the XDP program does), and `blackhole`
//! keeps it so even if one did. Only routes with protocol [`RTPROT_LB`] are read or
//! removed: anything else in the table is left alone.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures_util::FutureExt;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType},
};

use super::{NetError, ask, with_netlink};

/// The route protocol number lb's announcement routes carry (`ip route show table T
/// proto 251`). Not assigned in iproute2's `rt_protos`.
pub const RTPROT_LB: u8 = 251;

/// What [`sync`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteChanges {
    pub added: Vec<IpAddr>,
    pub removed: Vec<IpAddr>,
}

/// The addresses lb announces now in `table` (its routes there).
pub async fn announced(table: u32) -> Result<BTreeSet<IpAddr>, NetError> {
    with_netlink(|h| async move { list(&h, table).await }).await
}

/// Makes lb's routes in `table` exactly `want`: adds the missing ones, removes the
/// others. Withdrawals first, so a failure half-way never leaves more announced than
/// before and `want` together.
pub async fn sync(table: u32, want: &BTreeSet<IpAddr>) -> Result<RouteChanges, NetError> {
    with_netlink(|h| async move {
        let have = list(&h, table).await?;
        let mut changes = RouteChanges::default();
        for ip in have.difference(want) {
            let what = format!("withdrawing the route of {ip} from table {table}");
            ask(h.route().del(message(*ip, table)).execute().into_stream())
                .await
                .map_err(|source| NetError::Request { what, source })?;
            changes.removed.push(*ip);
        }
        for ip in want.difference(&have) {
            let what = format!("adding the route of {ip} to table {table}");
            ask(h.route().add(message(*ip, table)).replace().execute().into_stream())
                .await
                .map_err(|source| NetError::Request { what, source })?;
            changes.added.push(*ip);
        }
        Ok(changes)
    })
    .await
}

/// The announcement route of `ip` in `table`: a host route, `blackhole`, lb's protocol.
fn message(ip: IpAddr, table: u32) -> RouteMessage {
    let len = if ip.is_ipv4() { 32 } else { 128 };
    let builder = RouteMessageBuilder::<IpAddr>::new();
    // A host prefix of the address's own family is always valid.
    let builder = match builder.destination_prefix(ip, len) {
        Ok(b) => b,
        Err(_) => RouteMessageBuilder::<IpAddr>::new(),
    };
    builder.table_id(table).protocol(RouteProtocol::Other(RTPROT_LB)).kind(RouteType::BlackHole).build()
}

async fn list(h: &Handle, table: u32) -> Result<BTreeSet<IpAddr>, NetError> {
    let mut out = BTreeSet::new();
    let v4 = RouteMessageBuilder::<Ipv4Addr>::new().table_id(table).build();
    let v6 = RouteMessageBuilder::<Ipv6Addr>::new().table_id(table).build();
    for query in [v4, v6] {
        let what = format!("listing the routes of table {table}");
        let routes = ask(h.route().get(query).execute()).await.map_err(|source| NetError::Request { what, source })?;
        out.extend(routes.iter().filter_map(|r| decode_announcement(r, table)));
    }
    Ok(out)
}

/// The announced address `r` stands for, if it is one of lb's host routes in `table`.
pub(crate) fn decode_announcement(r: &RouteMessage, table: u32) -> Option<IpAddr> {
    let table_of = r
        .attributes
        .iter()
        .find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None })
        .unwrap_or(u32::from(r.header.table));
    if table_of != table || r.header.protocol != RouteProtocol::Other(RTPROT_LB) {
        return None;
    }
    let ip = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })?;
    let full = if ip.is_ipv4() { 32 } else { 128 };
    (r.header.destination_prefix_length == full).then_some(ip)
}

/// [`sync`] and [`announced`] for callers without a runtime (`lb detach`, tests).
pub mod blocking {
    use super::*;

    pub fn sync(table: u32, want: &BTreeSet<IpAddr>) -> Result<RouteChanges, NetError> {
        crate::host::blocking::run(super::sync(table, want))
    }

    pub fn announced(table: u32) -> Result<BTreeSet<IpAddr>, NetError> {
        crate::host::blocking::run(super::announced(table))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lbs_host_routes_in_the_table_are_announcements() {
        let ip: IpAddr = "198.18.1.100".parse().expect("ip");
        let six: IpAddr = "fd00:18:1::100".parse().expect("ip");
        assert_eq!(decode_announcement(&message(ip, 100), 100), Some(ip));
        assert_eq!(decode_announcement(&message(six, 4000), 4000), Some(six), "a table id above 255");
        assert_eq!(decode_announcement(&message(ip, 100), 101), None, "another table");
        let mut other = message(ip, 100);
        other.header.protocol = RouteProtocol::Static;
        assert_eq!(decode_announcement(&other, 100), None, "someone else's route");
        let mut wide = message(ip, 100);
        wide.header.destination_prefix_length = 24;
        assert_eq!(decode_announcement(&wide, 100), None, "not a host route");
    }
}
