//! Which VIP addresses this node announces to the routers (docs/scale-out.md). Pure:
//! the agent writes the answer as routes (`host::routes`) for its routing daemon.
//!
//! An address is announced while this node can serve it: the agent runs with the
//! datapath attached (it calls this only then), the node is not drained
//! (`lb drain-node`), and at least one listener on that address is in the datapath
//! with a healthy target in its group. A listener with a `zone` (a per-zone address)
//! counts only on the nodes of that zone (`node.zone`). A group that fails open forwards what still
//! arrives but does not attract traffic: a node whose targets are all unhealthy leaves
//! the flows to nodes that see healthy ones. While the agent is down the routes stay
//! as they were: the datapath keeps forwarding with the last state.

use std::{
    collections::{BTreeSet, HashSet},
    net::IpAddr,
};

use super::plan::PlannedVip;
use crate::config::Config;

/// The addresses to announce: those of `config`'s listeners that are planned (in
/// `planned`, by name) and whose group is in `healthy_groups`; none if `!serving`.
pub fn wanted(
    config: &Config,
    planned: &[PlannedVip],
    healthy_groups: &HashSet<&str>,
    serving: bool,
) -> BTreeSet<IpAddr> {
    if !serving {
        return BTreeSet::new();
    }
    let planned: HashSet<&str> = planned.iter().map(|v| v.name.as_str()).collect();
    config
        .listeners
        .iter()
        .filter(|l| planned.contains(l.name.as_str()) && healthy_groups.contains(l.target_group.as_str()))
        .filter(|l| l.zone.is_none() || l.zone == config.node.zone)
        .map(|l| l.address)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{path::Path, sync::Arc};

    use super::*;

    fn config() -> Config {
        let text = r#"
            [dataplane]
            interfaces = ["eth0"]
            [[listeners]]
            name = "web"
            address = "198.18.1.100"
            port = 80
            protocol = "tcp"
            target_group = "web"
            [[listeners]]
            name = "dns"
            address = "198.18.1.100"
            port = 53
            protocol = "udp"
            target_group = "dns"
            [[listeners]]
            name = "web6"
            address = "fd00:18:1::100"
            port = 80
            protocol = "tcp"
            target_group = "web"
            [[listeners]]
            name = "api"
            address = "198.18.1.101"
            port = 80
            protocol = "tcp"
            target_group = "dns"
            [[target_groups]]
            name = "web"
            targets = [{ ip = "198.18.0.11" }]
            [[target_groups]]
            name = "dns"
            targets = [{ ip = "198.18.0.12" }]
        "#;
        Config::parse(text, Path::new("t.toml")).expect("config")
    }

    fn planned(names: &[&str]) -> Vec<PlannedVip> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| PlannedVip {
                name: n.to_string(),
                key: lb_common::VipKey::new("198.18.1.100".parse().expect("ip"), 80, 6),
                slot: i as u32,
                flags: lb_common::VipFlags::empty(),
                ring: Arc::from(vec![1u32; 3]),
                fingerprint: 0,
            })
            .collect()
    }

    fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().map(|s| s.parse().expect("ip")).collect()
    }

    #[test]
    fn an_address_is_announced_while_one_of_its_listeners_can_be_served() {
        let c = config();
        let all = planned(&["web", "dns", "web6", "api"]);
        let both = HashSet::from(["web", "dns"]);
        assert_eq!(wanted(&c, &all, &both, true), ips(&["198.18.1.100", "198.18.1.101", "fd00:18:1::100"]));
        // dns has no healthy target: .101 (dns only) goes, .100 stays for web.
        assert_eq!(wanted(&c, &all, &HashSet::from(["web"]), true), ips(&["198.18.1.100", "fd00:18:1::100"]));
        // web has none: .100 stays for dns, web6 goes.
        assert_eq!(wanted(&c, &all, &HashSet::from(["dns"]), true), ips(&["198.18.1.100", "198.18.1.101"]));
        assert_eq!(wanted(&c, &all, &HashSet::new(), true), ips(&[]), "no healthy target anywhere");
        // A listener not in the datapath yet (waiting for a slot) is not announced.
        assert_eq!(wanted(&c, &planned(&["web", "dns"]), &both, true), ips(&["198.18.1.100"]));
        assert_eq!(wanted(&c, &all, &both, false), ips(&[]), "a drained node announces nothing");
    }

    #[test]
    fn a_per_zone_address_is_announced_by_its_zones_nodes_only() {
        let mut c = config();
        c.listeners[3].zone = Some("a".into()); // "api", alone on 198.18.1.101
        let all = planned(&["web", "dns", "web6", "api"]);
        let both = HashSet::from(["web", "dns"]);
        let with_zone = |zone: Option<&str>| {
            let mut c = c.clone();
            c.node.zone = zone.map(str::to_owned);
            wanted(&c, &all, &both, true)
        };
        assert!(with_zone(Some("a")).contains(&"198.18.1.101".parse().expect("ip")));
        assert_eq!(with_zone(Some("b")), ips(&["198.18.1.100", "fd00:18:1::100"]), "zone b");
        assert_eq!(with_zone(None), ips(&["198.18.1.100", "fd00:18:1::100"]), "a node in no zone");
    }
}
