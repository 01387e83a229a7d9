//! Test rigs shared by the tests, the demo and the benchmarks: network namespaces,
//! topologies with real services, packet builders and parsers.

pub mod agent;
pub mod netns;
pub mod packet;
pub mod programs;
pub mod routed;
pub mod scale_out;
pub mod topology;
