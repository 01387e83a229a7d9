//! The tools in the `lb` binary besides the agent: `lb gen`, `lb bench`, `lb demo`.
//! Their own programs (generator, sink, pass) are in the tools' BPF object
//! (`testing::programs::TOOLS_OBJECT`); `lb bench` also loads the agent's object to
//! measure it, and `lb demo` runs the agent. The agent never uses this module.

pub mod bench;
pub mod demo;
pub mod demo_nodes;
pub mod encap_bench;
pub mod generator;
pub mod health_load;
pub mod restart_bench;
