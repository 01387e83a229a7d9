//! Pure decisions: what the datapath should hold, given the config and what the agent
//! knows of its targets. No I/O, no aya; everything here is unit-tested.

pub mod announce;
pub mod fingerprint;
pub mod health_state;
pub mod ids;
pub mod maglev;
pub mod plan;
pub mod registry;
pub mod zones;
