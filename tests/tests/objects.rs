//! What each embedded BPF object holds: the agent's object the load balancer only, the
//! tools' object the generator, sink and pass programs (and none of the LB's maps).

use std::collections::BTreeSet;

use lb_common::{maps, programs};

fn contents(object: &[u8]) -> (BTreeSet<String>, BTreeSet<String>) {
    let obj = aya_obj::Object::parse(object).expect("the embedded object parses");
    (obj.programs.keys().cloned().collect(), obj.maps.keys().filter(|m| !m.starts_with('.')).cloned().collect())
}

#[test]
fn the_agents_object_holds_the_load_balancer_only() {
    let (progs, object_maps) = contents(lb_userspace::datapath::EBPF_OBJECT);
    assert_eq!(progs, BTreeSet::from([programs::LB.to_string()]));
    let mut expected: BTreeSet<String> = maps::ALL.iter().map(|m| m.to_string()).collect();
    expected.insert("AYA_LOGS".into()); // aya-log's ring buffer (rare-event logs)
    assert_eq!(object_maps, expected);
}

#[test]
fn the_tools_object_holds_the_tools_programs_only() {
    let (progs, object_maps) = contents(lb_userspace::testing::programs::TOOLS_OBJECT);
    assert_eq!(progs, [programs::GEN, programs::SINK, programs::PASS].iter().map(|p| p.to_string()).collect());
    assert!(object_maps.iter().all(|m| !maps::ALL.contains(&m.as_str())), "{object_maps:?}");
}
