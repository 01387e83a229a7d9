//! The `[announce]` table: VIP announcement through a routing daemon. The agent keeps
//! one route per announced VIP address in kernel routing table `table` (see
//! `host::routes`); the daemon (BIRD, docs/scale-out.md) exports that table over BGP.

use serde::{Deserialize, Serialize};

/// Default routing table of the announcement routes.
pub const DEFAULT_TABLE: u32 = 100;
/// Default time `lb drain-node` keeps forwarding after withdrawing the routes.
pub const DEFAULT_DRAIN_DELAY_SECS: u64 = 30;
/// Largest `drain_delay_secs`.
pub const MAX_DRAIN_DELAY_SECS: u64 = 3600;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Announce {
    /// Keep the announcement routes up to date. Off: the agent touches no route.
    pub enabled: bool,
    /// Kernel routing table of the routes (not 0, 253, 254, 255): give it to the
    /// daemon's `kernel table`, and to nothing else.
    pub table: u32,
    /// How long `lb drain-node` keeps forwarding the flows that still arrive after
    /// withdrawing every route: the time the routers need to move them (BGP update or
    /// hold time, plus margin).
    pub drain_delay_secs: u64,
}

impl Default for Announce {
    fn default() -> Self {
        Announce { enabled: false, table: DEFAULT_TABLE, drain_delay_secs: DEFAULT_DRAIN_DELAY_SECS }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnounceConfigError {
    #[error(
        "announce.table = {table} is a table the kernel uses itself (0 unspec, 253 default, 254 main, 255 local): pick a table of its own, e.g. {DEFAULT_TABLE}"
    )]
    ReservedTable { table: u32 },
    #[error("announce.drain_delay_secs = {value} is out of range: use 0..={MAX_DRAIN_DELAY_SECS}")]
    DrainDelay { value: u64 },
}

impl Announce {
    pub fn validate(&self) -> Result<(), AnnounceConfigError> {
        if matches!(self.table, 0 | 253 | 254 | 255) {
            return Err(AnnounceConfigError::ReservedTable { table: self.table });
        }
        if self.drain_delay_secs > MAX_DRAIN_DELAY_SECS {
            return Err(AnnounceConfigError::DrainDelay { value: self.drain_delay_secs });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_tables_and_long_delays_are_refused() {
        assert!(Announce::default().validate().is_ok());
        for table in [0, 253, 254, 255] {
            let a = Announce { table, ..Announce::default() };
            assert_eq!(a.validate(), Err(AnnounceConfigError::ReservedTable { table }));
        }
        let a = Announce { drain_delay_secs: 3601, ..Announce::default() };
        assert!(a.validate().expect_err("too long").to_string().contains("0..=3600"));
    }
}
