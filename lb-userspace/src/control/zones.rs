//! Zones in a plan (docs/scale-out.md#zones): with `node.zone` set, a target group
//! without `cross_zone` takes new flows on this node's zone's healthy targets while it
//! has one, else on every zone's (spill-over). A target's zone is its subnet's
//! (`config::zones`); a target in no zone counts as local.

use std::net::IpAddr;

use super::{health_state::TargetState, plan::PlanGroup};
use crate::config::{Config, zones::zone_of};

/// One group's zone view on this node.
pub struct GroupZones<'a> {
    config: &'a Config,
    /// This node's zone, if the group is zonal (zones on, no `cross_zone`).
    zone: Option<&'a str>,
    /// The zone has a healthy target of the group.
    local_healthy: bool,
    /// The group has a healthy target anywhere.
    any_healthy: bool,
}

impl<'a> GroupZones<'a> {
    pub fn new(config: &'a Config, group: &PlanGroup) -> GroupZones<'a> {
        let cross = config.target_group(&group.name).is_some_and(|g| g.cross_zone);
        let zone = config.node.zone.as_deref().filter(|_| !cross);
        let mut z = GroupZones { config, zone, local_healthy: false, any_healthy: false };
        for t in group.targets.iter().filter(|t| t.state == TargetState::Healthy) {
            z.any_healthy = true;
            z.local_healthy |= z.is_local(t.ip);
        }
        z
    }

    fn is_local(&self, ip: IpAddr) -> bool {
        self.zone.is_none_or(|z| zone_of(&self.config.zones, ip).is_none_or(|tz| tz == z))
    }

    /// `ip` is another zone's target while this zone has a healthy one: it keeps its
    /// flows but takes no new ones.
    pub fn other_zone(&self, ip: IpAddr) -> bool {
        self.local_healthy && !self.is_local(ip)
    }

    /// The group is zonal and its new flows spill over to other zones (healthy targets
    /// elsewhere, none here).
    pub fn spills(&self) -> bool {
        self.zone.is_some() && self.any_healthy && !self.local_healthy
    }
}

/// The groups of `groups` whose new flows spill over to other zones now.
pub fn spilling(config: &Config, groups: &[PlanGroup]) -> Vec<String> {
    groups.iter().filter(|g| GroupZones::new(config, g).spills()).map(|g| g.name.clone()).collect()
}
