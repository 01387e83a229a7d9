//! What each embedded BPF object holds: the agent's object the load balancer only (and
//! its health probes' tunnel program), the
//! tools' object the generator, sink and pass programs (and none of the LB's maps), the
//! next object (the upgrade tests' second build) the load balancer with one extra counter,
//! the decap object (`lb decap`, shipped with the product) the decap program only.

use std::collections::BTreeSet;

use lb_common::{maps, programs};

fn contents(object: &[u8]) -> (BTreeSet<String>, BTreeSet<String>) {
    let obj = aya_obj::Object::parse(object).expect("the embedded object parses");
    (obj.programs.keys().cloned().collect(), obj.maps.keys().filter(|m| !m.starts_with('.')).cloned().collect())
}

#[test]
fn the_agents_object_holds_the_load_balancer_only() {
    let (progs, object_maps) = contents(lb_userspace::datapath::EBPF_OBJECT);
    // The LB and the tc program that puts its health probes into tunnels (same maps).
    assert_eq!(progs, BTreeSet::from([programs::LB.to_string(), programs::PROBE_ENCAP.to_string()]));
    let mut expected: BTreeSet<String> = maps::ALL.iter().map(|m| m.to_string()).collect();
    expected.insert("AYA_LOGS".into()); // aya-log's ring buffer (rare-event logs)
    assert_eq!(object_maps, expected);
}

#[test]
fn the_decap_object_holds_the_decap_program_only() {
    let (progs, object_maps) = contents(lb_userspace::datapath::decap::DECAP_OBJECT);
    assert_eq!(progs, BTreeSet::from([programs::DECAP.to_string()]));
    assert_eq!(object_maps, BTreeSet::from([maps::DECAP_ADDRS.to_string(), maps::DECAP_STATS.to_string()]));
    // And the LB's object carries none of it.
    let (lb_progs, lb_maps) = contents(lb_userspace::datapath::EBPF_OBJECT);
    assert!(!lb_progs.contains(programs::DECAP) && !lb_maps.contains(maps::DECAP_STATS));
}

#[test]
fn the_tools_object_holds_the_tools_programs_only() {
    let (progs, object_maps) = contents(lb_userspace::testing::programs::TOOLS_OBJECT);
    assert_eq!(progs, [programs::GEN, programs::SINK, programs::PASS].iter().map(|p| p.to_string()).collect());
    assert!(object_maps.iter().all(|m| !maps::ALL.contains(&m.as_str())), "{object_maps:?}");
}

/// A map's kernel-visible definition: type, key size, value size, max entries, flags.
fn definition(map: &aya_obj::Map) -> (u32, u32, u32, u32, u32) {
    (map.map_type(), map.key_size(), map.value_size(), map.max_entries(), map.map_flags())
}

/// The LB program's instructions, as (opcode, dst, src, offset, immediate) before
/// relocation.
fn lb_instructions(obj: &aya_obj::Object) -> Vec<(u8, u8, u8, i16, i32)> {
    let prog = &obj.programs[programs::LB];
    let function = &obj.functions[&prog.function_key()];
    function.instructions.iter().map(|i| (i.code, i.dst_reg(), i.src_reg(), i.off, i.imm)).collect()
}

#[test]
fn the_next_object_is_the_load_balancer_with_one_extra_counter() {
    let product = aya_obj::Object::parse(lb_userspace::datapath::EBPF_OBJECT).expect("the product object parses");
    let next = aya_obj::Object::parse(lb_userspace::testing::programs::NEXT_OBJECT).expect("the next object parses");
    let names = |o: &aya_obj::Object| o.programs.keys().cloned().collect::<BTreeSet<_>>();
    assert_eq!(names(&next), BTreeSet::from([programs::LB.to_string(), programs::PROBE_ENCAP.to_string()]));
    assert_eq!(names(&next), names(&product));

    // Every map of the product, with the same definition, plus `LB_NEXT_SEEN` only. The
    // sections each object has of its own (`.rodata`: `LB_RING_SIZE` and the log records'
    // strings, which name the crate) are left out: a load never shares them.
    let named = |o: &aya_obj::Object| o.maps.keys().filter(|m| !m.starts_with('.')).cloned().collect::<BTreeSet<_>>();
    for name in named(&product) {
        let map = &product.maps[&name];
        let twin = next.maps.get(&name).unwrap_or_else(|| panic!("the next object lacks map {name}"));
        assert_eq!(definition(twin), definition(map), "map {name}: type, key, value, max entries, flags");
        assert_eq!(format!("{:?}", twin.pinning()), format!("{:?}", map.pinning()), "map {name}: pinning");
    }
    let extra: BTreeSet<String> = named(&next).difference(&named(&product)).cloned().collect();
    assert_eq!(extra, BTreeSet::from([maps::NEXT_SEEN.to_string()]));
    let seen = &next.maps[maps::NEXT_SEEN];
    assert_eq!(definition(seen), (aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY as u32, 4, 8, 1, 0));

    // Different code: a different program (tag) for the same maps.
    assert_ne!(lb_instructions(&next), lb_instructions(&product), "the two builds' instructions differ");
}
