//! The load balancer's userspace: config, Maglev, target resolution, the dataplane
//! (the one module that touches aya), the agent, stats, packet builders, and the
//! namespace topology used by the demo and the tests.
//!
//! Architecture invariant: only `dataplane` (and `stats`, reading maps it is handed)
//! use aya; everything else is plain Rust that unit tests run without privileges.

pub mod agent;
pub mod api;
pub mod bench;
pub mod config;
pub mod dataplane;
pub mod generator;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod netinfo;
pub mod netns;
pub mod packet;
pub mod plan;
pub mod stats;
pub mod targets;
pub mod topology;

/// The XDP object built by build.rs from lb-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-xdp"));
