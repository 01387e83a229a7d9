//! Slot and id reuse: a VIP slot or backend id freed by an update is never rewritten
//! while the datapath still uses it, also when every slot is in use. The real program
//! and maps, the agent's planning (`plan::build`) and map writes (`Dataplane::apply`),
//! frames through BPF_PROG_RUN.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::xdp_action;
use lb_tests::privileged;
use lb_userspace::{
    config::Config,
    control::plan::{self, Allocators, Plan},
    datapath::{Dataplane, DataplaneError, LoadOptions},
    host::{Interface, Resolved},
    testing::{
        netns::Netns,
        packet::{Frame, tcp_flags},
    },
};

const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// Group `a` (kept listener), `b` (the listener swapped out), `c` (swapped in).
const GROUPS: [(&str, [&str; 2]); 3] = [
    ("a", ["198.18.0.11", "198.18.0.12"]),
    ("b", ["198.18.0.21", "198.18.0.22"]),
    ("c", ["198.18.0.31", "198.18.0.32"]),
];
const VIP_A: &str = "198.18.1.100:80";
const VIP_B: &str = "198.18.1.101:80";
const VIP_C: &str = "198.18.1.102:80";

fn mac_of(ip: &str) -> [u8; 6] {
    let last = ip.rsplit('.').next().and_then(|o| o.parse::<u8>().ok()).expect("test address");
    [0x02, 0, 0, 0, 0x01, last]
}

/// Two listeners in two VIP slots (`max_vips = 2`): `a` and either `b` or `c`.
fn config(second: &str) -> Config {
    let vip = if second == "b" { VIP_B } else { VIP_C };
    let (addr, port) = vip.split_once(':').expect("vip");
    let mut text = format!(
        "[dataplane]\ninterfaces = [\"lo\"]\nring_size = 1009\nmax_vips = 2\nconn_table_size = 65536\n\
         [[listeners]]\nname = \"a\"\naddress = \"198.18.1.100\"\nport = 80\nprotocol = \"tcp\"\ntarget_group = \"a\"\n\
         [[listeners]]\nname = \"{second}\"\naddress = \"{addr}\"\nport = {port}\nprotocol = \"tcp\"\ntarget_group = \"{second}\"\n"
    );
    for (name, ips) in GROUPS {
        text += &format!(
            "[[target_groups]]\nname = \"{name}\"\ntargets = [{{ ip = \"{}\" }}, {{ ip = \"{}\" }}]\n",
            ips[0], ips[1]
        );
    }
    Config::parse(&text, Path::new("reuse.toml")).expect("config")
}

fn resolved() -> HashMap<IpAddr, Resolved> {
    let lo = Interface { name: "lo".into(), ifindex: 1, mac: LB_MAC, xdp_prog: None };
    GROUPS
        .iter()
        .flat_map(|(_, ips)| ips.iter())
        .map(|ip| {
            let addr: IpAddr = ip.parse().expect("ip");
            (addr, Resolved::on_link(addr, lo.clone(), mac_of(ip)))
        })
        .collect()
}

/// What the agent does for one change: plans until nothing waits for an id.
fn apply_change(dp: &mut Dataplane, ids: &mut Allocators, c: &Config, res: &HashMap<IpAddr, Resolved>) -> usize {
    let mut plans = 0;
    loop {
        let p = plan::build(c, res, ids).expect("plan");
        dp.apply(&p).expect("apply");
        plans += 1;
        if !p.deferred {
            return plans;
        }
        assert!(plans < 2, "a second plan never defers");
    }
}

/// `max_vips` equal to the number of listeners, updates that swap one listener, frames
/// to both VIPs all the while: the kept VIP's frames only ever reach its own group, and
/// the swapped-out VIP's frames reach its own group or (once removed) the host, never
/// the group of the listener that takes its slot.
#[test]
fn swapping_a_listener_with_every_vip_slot_in_use_never_misroutes() {
    if !privileged("swapping_a_listener_with_every_vip_slot_in_use_never_misroutes") {
        return;
    }
    let ns = Netns::create(&format!("lbt{}-reuse", std::process::id())).expect("netns");
    ns.run(|| {
        let res = resolved();
        let group_of_mac: HashMap<[u8; 6], &str> =
            GROUPS.iter().flat_map(|(g, ips)| ips.iter().map(move |ip| (mac_of(ip), *g))).collect();
        let mut dp = Dataplane::load(LoadOptions {
            ring_size: 1009,
            max_vips: 2,
            conn_table_size: 65536,
            new_flow_cap_per_cpu: 0,
        })
        .expect("load");
        let mut ids = Allocators::new(2);
        assert_eq!(apply_change(&mut dp, &mut ids, &config("b"), &res), 1);
        let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/lbt{}-reuse-prog", std::process::id()));
        let _ = std::fs::remove_file(&pin);
        dp.pin_program(&pin).expect("pin program");
        let runner = aya::programs::Xdp::from_pin(&pin, aya_obj::programs::XdpAttachType::Interface).expect("from pin");
        let _ = std::fs::remove_file(&pin);

        const SWAPS: u64 = 60;
        let done = AtomicBool::new(false);
        let swaps = AtomicU64::new(0);
        let (mut frames, mut passed) = (0u64, 0u64);
        std::thread::scope(|s| {
            s.spawn(|| {
                for k in 1..=SWAPS {
                    let plans = apply_change(&mut dp, &mut ids, &config(if k % 2 == 1 { "c" } else { "b" }), &res);
                    assert_eq!(plans, 2, "the swapped-in listener waits one plan for the freed slot");
                    swaps.store(k, Ordering::SeqCst);
                }
                done.store(true, Ordering::SeqCst);
            });
            let mut out = vec![0u8; 128];
            let mut i: u32 = 0;
            while !done.load(Ordering::SeqCst) {
                i += 1;
                let src = SocketAddr::new(
                    IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 100 + (i >> 16) as u8, (i >> 8) as u8)),
                    i as u16,
                );
                for (vip, own) in [(VIP_A, "a"), (VIP_B, "b")] {
                    let f = Frame::tcp(src, vip.parse().expect("vip"), tcp_flags::SYN)
                        .with_macs(LB_MAC, CLIENT_MAC)
                        .build()
                        .expect("frame");
                    let mut o = TestRunOptions::new();
                    o.data_in = Some(&f);
                    o.data_out = Some(&mut out);
                    let r = runner.test_run(o).expect("BPF_PROG_RUN");
                    if r.return_value == xdp_action::PASS && own == "b" {
                        passed += 1; // VIP b is not configured at this moment
                        continue;
                    }
                    assert_eq!(r.return_value, xdp_action::TX, "frame {i} to {vip}");
                    let mac: [u8; 6] = out[..6].try_into().expect("mac");
                    assert_eq!(group_of_mac[&mac], own, "frame {i} to {vip} reached another group's target");
                    frames += 1;
                }
            }
        });
        eprintln!("{frames} frames forwarded and {passed} passed during {} swaps", swaps.load(Ordering::SeqCst));
        assert!(frames > 0 && passed > 0, "traffic did not overlap the swaps: the test proved nothing");
    })
    .expect("netns");
}

/// Defence in depth: a plan that writes a VIP slot or a backend id another entry still
/// uses is refused before anything is written.
#[test]
fn the_datapath_refuses_a_slot_or_id_still_in_use() {
    if !privileged("the_datapath_refuses_a_slot_or_id_still_in_use") {
        return;
    }
    let ns = Netns::create(&format!("lbt{}-refuse", std::process::id())).expect("netns");
    ns.run(|| {
        let res = resolved();
        let mut dp = Dataplane::load(LoadOptions {
            ring_size: 1009,
            max_vips: 2,
            conn_table_size: 1024,
            new_flow_cap_per_cpu: 0,
        })
        .expect("load");
        let mut ids = Allocators::new(2);
        let p1 = plan::build(&config("b"), &res, &mut ids).expect("plan");
        dp.apply(&p1).expect("apply");

        // VIP c in VIP b's slot, in one plan: refused, b untouched.
        let mut bad: Plan = p1.clone();
        bad.vips[1].key = lb_common::VipKey::new("198.18.1.102".parse().expect("ip"), 80, lb_common::IPPROTO_TCP);
        let err = dp.apply(&bad).expect_err("slot in use");
        assert!(matches!(err, DataplaneError::SlotInUse { slot, .. } if slot == p1.vips[1].slot), "{err}");
        assert!(err.to_string().contains("198.18.1.101:80/tcp"), "{err}");

        // Another target in a backend id that rings point at: refused.
        let mut bad = p1.clone();
        let (&id, (_, b)) = bad.backends.iter_mut().next().expect("a backend");
        b.generation += 1000;
        b.dst_mac = [0x02, 0, 0, 0, 0x09, 0x09];
        let err = dp.apply(&bad).expect_err("backend in use");
        assert!(matches!(err, DataplaneError::BackendInUse { id: i } if i == id), "{err}");

        // The plan that was there still applies with nothing to write.
        let report = dp.apply(&p1).expect("apply");
        assert_eq!((report.ring_slots_written, report.backends_written, report.vips_switched), (0, 0, 0));
    })
    .expect("netns");
}
