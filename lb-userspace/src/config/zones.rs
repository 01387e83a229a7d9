//! Zones (NLB's availability zones): `[node] zone` names this LB node's zone and
//! `[[zones]]` says which target subnets are in which zone, so a target's zone follows
//! from its address (as an NLB target's zone follows from its subnet), for configured
//! and registered targets alike. Without `node.zone` zones are off.

use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Serialize};

/// This LB node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Node {
    /// This node's zone, one of `[[zones]]`. Set: new flows go to the healthy targets of
    /// this zone (of groups without `cross_zone`), and listeners with a `zone` are
    /// announced only by that zone's nodes.
    pub zone: Option<String>,
}

/// A zone and the target subnets in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Zone {
    pub name: String,
    /// `ADDRESS/LENGTH`, IPv4 or IPv6, e.g. "198.18.0.0/25".
    pub subnets: Vec<Subnet>,
}

/// An IP prefix, written `198.18.0.0/25` or `fd00:18::/64`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet {
    pub addr: IpAddr,
    pub len: u8,
}

impl Subnet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let mask = |bits: u32, len: u8| if len == 0 { 0 } else { u128::MAX << (bits - u32::from(len)) };
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let m = mask(32, self.len) as u32;
                u32::from(a) & m == u32::from(b) & m
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let m = mask(128, self.len);
                u128::from(a) & m == u128::from(b) & m
            }
            _ => false,
        }
    }
}

impl FromStr for Subnet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a subnet: write ADDRESS/LENGTH, e.g. 198.18.0.0/25 or fd00:18::/64");
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("`{s}`: the prefix length is at most {max}"));
        }
        Ok(Subnet { addr, len })
    }
}

impl TryFrom<String> for Subnet {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Subnet> for String {
    fn from(s: Subnet) -> String {
        s.to_string()
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl fmt::Debug for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZoneConfigError {
    #[error("zone name `{name}` is used twice in [[zones]]")]
    Duplicate { name: String },
    #[error("zone `{name}` has no subnets: list the target subnets in it, e.g. subnets = [\"198.18.0.0/25\"]")]
    NoSubnets { name: String },
    #[error("{what} names zone `{zone}`, which is not defined: add a [[zones]] entry named `{zone}` or fix the name")]
    Unknown { what: String, zone: String },
}

/// The zone of the most specific subnet holding `ip`, if any.
pub fn zone_of(zones: &[Zone], ip: IpAddr) -> Option<&str> {
    zones
        .iter()
        .flat_map(|z| z.subnets.iter().map(move |s| (s, z.name.as_str())))
        .filter(|(s, _)| s.contains(ip))
        .max_by_key(|(s, _)| s.len)
        .map(|(_, name)| name)
}

/// Checks `[[zones]]`, `node.zone` and the listeners' zones (`listener_zones`: what
/// names each, and the zone).
pub fn validate<'a>(
    zones: &[Zone],
    node: &'a Node,
    listener_zones: impl IntoIterator<Item = (String, &'a str)>,
) -> Result<(), ZoneConfigError> {
    let mut seen = std::collections::HashSet::new();
    for z in zones {
        if !seen.insert(z.name.as_str()) {
            return Err(ZoneConfigError::Duplicate { name: z.name.clone() });
        }
        if z.subnets.is_empty() {
            return Err(ZoneConfigError::NoSubnets { name: z.name.clone() });
        }
    }
    let named = node.zone.as_deref().map(|z| ("node.zone".to_string(), z)).into_iter().chain(listener_zones);
    for (what, zone) in named {
        if !seen.contains(zone) {
            return Err(ZoneConfigError::Unknown { what, zone: zone.to_string() });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(name: &str, subnets: &[&str]) -> Zone {
        Zone { name: name.into(), subnets: subnets.iter().map(|s| s.parse().expect("subnet")).collect() }
    }

    #[test]
    fn a_targets_zone_is_its_most_specific_subnets() {
        let zones = [zone("a", &["198.18.0.0/24", "fd00:18::/64"]), zone("b", &["198.18.0.16/28"])];
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        assert_eq!(zone_of(&zones, ip("198.18.0.11")), Some("a"));
        assert_eq!(zone_of(&zones, ip("198.18.0.17")), Some("b"), "the longer prefix wins");
        assert_eq!(zone_of(&zones, ip("fd00:18::11")), Some("a"));
        assert_eq!(zone_of(&zones, ip("198.18.1.1")), None);
        assert_eq!(zone_of(&[zone("all", &["0.0.0.0/0"])], ip("198.18.1.1")), Some("all"));
    }

    #[test]
    fn subnets_parse_and_zones_validate() {
        assert!("198.18.0.0/33".parse::<Subnet>().is_err());
        assert!("198.18.0.0".parse::<Subnet>().expect_err("no length").contains("ADDRESS/LENGTH"));
        assert_eq!("fd00::/8".parse::<Subnet>().expect("subnet").to_string(), "fd00::/8");
        let zones = [zone("a", &["198.18.0.0/25"]), zone("b", &["198.18.0.128/25"])];
        let node = Node { zone: Some("a".into()) };
        assert_eq!(validate(&zones, &node, []), Ok(()));
        let err = validate(&zones, &Node { zone: Some("c".into()) }, []).expect_err("unknown");
        assert!(err.to_string().contains("node.zone names zone `c`"), "{err}");
        let err = validate(&zones, &node, [("listener `web-c`".to_string(), "c")]).expect_err("unknown");
        assert!(err.to_string().starts_with("listener `web-c` names zone `c`"), "{err}");
        assert!(matches!(validate(&[zone("a", &[])], &node, []), Err(ZoneConfigError::NoSubnets { .. })));
        let twice = [zone("a", &["198.18.0.0/25"]), zone("a", &["198.18.0.128/25"])];
        assert!(matches!(validate(&twice, &node, []), Err(ZoneConfigError::Duplicate { .. })));
    }
}
