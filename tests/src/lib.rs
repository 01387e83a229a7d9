//! Integration tests live in `tests/`: `packet.rs` (the XDP program under
//! BPF_PROG_RUN) and `e2e.rs` (namespaces, real traffic). Their shared helpers are part
//! of `lb_userspace::testing::topology`, which the demo uses too.
pub use lb_userspace::testing::topology::{REQUIRE_PRIVILEGES_ENV, privileged, traffic_lock};
