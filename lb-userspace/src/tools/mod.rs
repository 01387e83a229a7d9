//! The tools in the `lb` binary besides the agent: `lb gen`, `lb bench`, `lb demo`.
//! They load their own BPF object (`TOOLS_OBJECT`), never the agent's.

pub mod bench;
pub mod demo;
pub mod generator;
pub mod health_load;
