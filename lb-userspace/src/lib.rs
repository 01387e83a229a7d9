//! The load balancer's userspace, one folder per layer. Dependencies point one way:
//!
//! - `config`: the TOML schema and its validation. Pure.
//! - `control`: decisions: Maglev, the plan (desired datapath state), id allocation,
//!   the target registry, the health state machine. Pure: no I/O, no aya.
//! - `datapath`: the only product code that touches aya: loading, map writes, pins,
//!   stats, the datapath thread.
//! - `host`: facts about this host: interfaces, routes, neighbours (netlink).
//! - `health`: health probes and the monitors that run them.
//! - `api`: the control API: request/response types, server, client.
//! - `http`: the HTTP/1.1 server loop the API and the metrics endpoint share.
//! - `metrics`: the Prometheus endpoint.
//! - `state_file`: the agent's saved state (what a restart resumes), read and written
//!   atomically.
//! - `agent`: the event loop that owns the state and ties the layers together.
//! - `top`: `lb top`, a live view of a running agent (its pins and control API).
//! - `tools` and `testing` (feature `tools`): `lb gen`, `lb bench`, `lb demo`, and the
//!   namespaces, topologies and packet builders they and the tests share. The agent
//!   never uses them.

pub mod agent;
pub mod api;
pub mod config;
pub mod control;
pub mod datapath;
pub mod health;
pub mod host;
pub mod http;
pub mod metrics;
pub mod state_file;
#[cfg(test)]
mod test_rng;
#[cfg(feature = "tools")]
pub mod testing;
#[cfg(feature = "tools")]
pub mod tools;
pub mod top;
