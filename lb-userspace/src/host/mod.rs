//! What the kernel knows about interfaces, routes and neighbours, read through iproute2's
//! JSON output (`ip -j`). Used to check the configured interfaces and to find, for each
//! target, the interface it sits behind and its MAC address.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::config::MacAddr;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot run `ip` (iproute2); install the iproute2 package")]
    IpCommand {
        #[source]
        source: std::io::Error,
    },
    #[error("`ip {args}` failed: {stderr}")]
    IpFailed { args: String, stderr: String },
    #[error("`ip {args}` printed JSON this lb does not understand: {detail}")]
    IpOutput { args: String, detail: String },
    #[error("no interface named `{name}` in this network namespace; the interfaces here are: {available}")]
    UnknownInterface { name: String, available: String },
    #[error("interface `{name}` is not an Ethernet interface (link type {link_type}); L2 forwarding needs Ethernet")]
    NotEthernet { name: String, link_type: String },
    #[error(
        "target {ip} is not on-link: the route to it goes via gateway {gateway} on {dev}. L2 direct server return needs every target on the same L2 segment as an LB interface; move the target or add an on-link route"
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

pub use crate::control::plan::{Interface, Resolved};

fn ip_json(args: &[&str]) -> Result<Value, NetError> {
    let out = Command::new("ip").arg("-j").args(args).output().map_err(|source| NetError::IpCommand { source })?;
    let joined = args.join(" ");
    if !out.status.success() {
        return Err(NetError::IpFailed {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_str(&text).map_err(|e| NetError::IpOutput { args: joined, detail: e.to_string() })
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    s.parse::<MacAddr>().ok().map(|m| m.0)
}

/// Names of all interfaces in this network namespace (for error messages).
fn interface_names() -> String {
    match ip_json(&["link", "show"]) {
        Ok(Value::Array(links)) => links.iter().filter_map(|l| l["ifname"].as_str()).collect::<Vec<_>>().join(", "),
        _ => "unknown".to_string(),
    }
}

/// Looks up an interface by name.
pub fn interface(name: &str) -> Result<Interface, NetError> {
    let links = match ip_json(&["link", "show", "dev", name]) {
        Ok(v) => v,
        Err(NetError::IpFailed { stderr, .. }) if stderr.contains("does not exist") => {
            return Err(NetError::UnknownInterface { name: name.to_string(), available: interface_names() });
        }
        Err(e) => return Err(e),
    };
    let link = links
        .get(0)
        .ok_or_else(|| NetError::UnknownInterface { name: name.to_string(), available: interface_names() })?;
    parse_link(link, name)
}

fn parse_link(link: &Value, name: &str) -> Result<Interface, NetError> {
    let bad = |detail: &str| NetError::IpOutput { args: format!("link show dev {name}"), detail: detail.to_string() };
    let link_type = link["link_type"].as_str().unwrap_or("unknown");
    if link_type != "ether" {
        return Err(NetError::NotEthernet { name: name.to_string(), link_type: link_type.to_string() });
    }
    let ifindex = link["ifindex"].as_u64().ok_or_else(|| bad("no ifindex"))? as u32;
    let mac = link["address"].as_str().and_then(parse_mac).ok_or_else(|| bad("no MAC address"))?;
    let xdp = &link["xdp"];
    let xdp_prog = if xdp.is_null() {
        None
    } else {
        Some(xdp["prog"]["id"].as_u64().or_else(|| xdp["attached"][0]["prog"]["id"].as_u64()).unwrap_or(0) as u32)
    };
    Ok(Interface { name: name.to_string(), ifindex, mac, xdp_prog })
}

/// How the kernel routes to an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dev: String,
    /// The gateway, if the address is not on-link.
    pub via: Option<IpAddr>,
    /// The source address the kernel would use.
    pub prefsrc: Option<IpAddr>,
    /// The destination is an address of this host.
    pub local: bool,
}

/// `ip route get ip`.
pub fn route(ip: IpAddr) -> Result<Route, NetError> {
    let ip_s = ip.to_string();
    let routes = ip_json(&["route", "get", &ip_s]).map_err(|e| NetError::NoRoute { ip, detail: e.to_string() })?;
    let r = routes.get(0).ok_or(NetError::NoRoute { ip, detail: "empty answer".into() })?;
    let dev = r["dev"].as_str().unwrap_or_default().to_string();
    Ok(Route {
        local: r["type"].as_str() == Some("local") || dev == "lo",
        via: r["gateway"].as_str().and_then(|g| g.parse().ok()),
        prefsrc: r["prefsrc"].as_str().and_then(|g| g.parse().ok()),
        dev,
    })
}

/// Finds the interface that reaches `ip` on-link and the target's MAC: `mac` if given,
/// else the neighbour table, triggering ARP/NDP and waiting up to `wait` if needed.
pub fn resolve_target(ip: IpAddr, mac: Option<MacAddr>, wait: Duration) -> Result<Resolved, NetError> {
    let r = route(ip)?;
    if r.local {
        return Err(NetError::LocalAddress { ip, dev: r.dev });
    }
    if let Some(gateway) = r.via {
        return Err(NetError::NotOnLink { ip, gateway: gateway.to_string(), dev: r.dev });
    }
    let dev = interface(&r.dev)?;
    let mac = match mac {
        Some(mac) => mac.0,
        None => neighbour_mac(ip, &dev.name, wait)?,
    };
    Ok(Resolved { ip, dev, mac })
}

/// The MAC of the next hop towards `ip` (the gateway, or `ip` itself when on-link),
/// the interface it sits behind and the source address the kernel would use.
pub fn next_hop(ip: IpAddr, wait: Duration) -> Result<(Interface, [u8; 6], Option<IpAddr>), NetError> {
    let r = route(ip)?;
    if r.local {
        return Err(NetError::LocalAddress { ip, dev: r.dev });
    }
    let dev = interface(&r.dev)?;
    let mac = neighbour_mac(r.via.unwrap_or(ip), &dev.name, wait)?;
    Ok((dev, mac, r.prefsrc))
}

/// The neighbour table's MAC for `ip` on `dev`, triggering resolution and waiting up to
/// `wait` for it.
pub fn neighbour_mac(ip: IpAddr, dev: &str, wait: Duration) -> Result<[u8; 6], NetError> {
    let start = Instant::now();
    let mut last_poke: Option<Instant> = None;
    loop {
        if let Some(mac) = neighbour(ip, dev)? {
            return Ok(mac);
        }
        if start.elapsed() >= wait {
            return Err(NetError::Unresolved { ip, dev: dev.to_string(), waited: wait });
        }
        if last_poke.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            poke(ip);
            last_poke = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The neighbour table's usable MAC for `ip` on `dev`, if any.
fn neighbour(ip: IpAddr, dev: &str) -> Result<Option<[u8; 6]>, NetError> {
    let ip_s = ip.to_string();
    let entries = ip_json(&["neigh", "show", "to", &ip_s, "dev", dev])?;
    let Value::Array(entries) = entries else { return Ok(None) };
    for e in entries {
        let states: Vec<&str> =
            e["state"].as_array().map(|s| s.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        if states.iter().any(|s| matches!(*s, "INCOMPLETE" | "FAILED" | "NOARP")) {
            continue;
        }
        if let Some(mac) = e["lladdr"].as_str().and_then(parse_mac) {
            return Ok(Some(mac));
        }
    }
    Ok(None)
}

/// Makes the kernel resolve `ip`: a datagram to its discard port needs its MAC first.
fn poke(ip: IpAddr) {
    let bind: SocketAddr = match ip {
        IpAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        IpAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    if let Ok(sock) = UdpSocket::bind(bind) {
        let _ = sock.send_to(b"lb neighbour probe", SocketAddr::new(ip, 9));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_link_json() {
        let v: Value = serde_json::from_str(
            r#"{"ifindex":7,"ifname":"veth0","link_type":"ether","address":"02:00:5e:00:53:01",
                "xdp":{"mode":1,"prog":{"id":42}}}"#,
        )
        .expect("json");
        let i = parse_link(&v, "veth0").expect("link");
        assert_eq!(i.ifindex, 7);
        assert_eq!(i.mac, [2, 0, 0x5e, 0, 0x53, 1]);
        assert_eq!(i.xdp_prog, Some(42));
    }

    #[test]
    fn rejects_non_ethernet() {
        let v: Value = serde_json::from_str(r#"{"ifindex":1,"link_type":"loopback","address":"00:00:00:00:00:00"}"#)
            .expect("json");
        assert!(matches!(parse_link(&v, "lo"), Err(NetError::NotEthernet { .. })));
    }
}
