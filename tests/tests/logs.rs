//! The datapath's rare-event logs (aya-log): a configuration problem that drops frames
//! is logged, at most once per CPU per second, however many frames it drops.

use std::{
    path::Path,
    sync::{Mutex, OnceLock},
};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{GlobalCounter as C, xdp_action};
use lb_tests::privileged;
use lb_userspace::{
    config::Config,
    control::plan::{self, Allocators},
    datapath::{Dataplane, LoadOptions, stats::Snapshot},
    testing::{
        netns::Netns,
        packet::{Frame, tcp_flags},
    },
};

/// Keeps every record logged through the `log` crate (what aya-log writes to).
struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        if let Ok(mut v) = self.0.lock() {
            v.push(format!("{} {}", record.level(), record.args()));
        }
    }
    fn flush(&self) {}
}

fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let c: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
        log::set_logger(c).expect("the only logger of this test binary");
        log::set_max_level(log::LevelFilter::Trace);
        c
    })
}

#[test]
fn a_vip_without_usable_targets_is_logged_once_per_cpu_per_second() {
    if !privileged("a_vip_without_usable_targets_is_logged_once_per_cpu_per_second") {
        return;
    }
    let capture = capture();
    let ns = Netns::create(&format!("lbt{}-logs", std::process::id())).expect("netns");
    ns.run(|| {
        let text = "[dataplane]\ninterfaces = [\"lo\"]\nring_size = 251\nmax_vips = 2\nconn_table_size = 1024\n\
                    [[listeners]]\nname = \"empty\"\naddress = \"198.18.1.100\"\nport = 80\nprotocol = \"tcp\"\ntarget_group = \"none\"\n\
                    [[target_groups]]\nname = \"none\"\ntargets = []\n";
        let c = Config::parse(text, Path::new("logs.toml")).expect("config");
        let mut dp = Dataplane::load(LoadOptions { ring_size: 251, max_vips: 2, conn_table_size: 1024, new_flow_cap_per_cpu: 0 }).expect("load");
        dp.apply(&plan::build(&c, &Default::default(), &mut Allocators::new(2)).expect("plan")).expect("apply");
        let mut logger = dp.take_logger().expect("the program logs");
        const FRAMES: u16 = 200;
        for i in 0..FRAMES {
            let f = Frame::tcp(format!("198.18.0.2:{}", 20000 + i).parse().expect("src"), "198.18.1.100:80".parse().expect("vip"), tcp_flags::SYN)
                .build()
                .expect("frame");
            let mut o = TestRunOptions::new();
            o.data_in = Some(&f);
            let r = dp.program().expect("program").test_run(o).expect("BPF_PROG_RUN");
            assert_eq!(r.return_value, xdp_action::DROP);
        }
        let drops = Snapshot::read(|name| dp.map(name)).expect("stats").global(C::DropNoBackend);
        assert_eq!(drops, u64::from(FRAMES));
        logger.flush();
        let logged: Vec<String> = capture.0.lock().expect("lock").clone();
        let ours: Vec<&String> = logged.iter().filter(|l| l.contains("has no usable target")).collect();
        let cpus = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
        assert!(!ours.is_empty() && ours.len() <= cpus, "{} records for {FRAMES} drops: {logged:?}", ours.len());
        assert!(ours[0].starts_with("WARN VIP slot 0 has no usable target"), "{}", ours[0]);
    })
    .expect("netns");
}
