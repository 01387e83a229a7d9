//! The only module that touches `aya::Ebpf`: loads the XDP object (adopting the pinned
//! maps of a running datapath, see `pins.rs`), attaches it through pinned bpf_links,
//! and writes a [`Plan`] into the maps. The datapath outlives the `Dataplane`: dropping
//! it after [`Dataplane::commit`] leaves the program forwarding; [`Dataplane::detach`]
//! removes it.
//!
//! Map updates are ordered so that a packet never sees a dangling reference: backends
//! first, then each VIP's new ring into its spare ring slot, then the VIP entry switched
//! to it in one map update, and only then are removed backends invalidated.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuValues},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode as AyaXdpMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
    },
};
use aya_log::EbpfLogger;
use lb_common::{Backend, RINGS_PER_VIP, VipFilter, VipKey, VipMeta, globals, maps, programs};
use tracing::{debug, info, warn};

pub mod decap;
pub mod pins;
mod rings;
pub mod stats;
pub mod thread;

use self::rings::RingMemory;

/// The load balancer's XDP object (lb-ebpf), built by build.rs. It holds `lb_xdp` and
/// its maps only; the tools' programs are in `crate::testing::programs::TOOLS_OBJECT`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-xdp"));

use crate::{config::XdpMode, control::plan::Plan, host::Interface};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP object failed{hint}")]
    Load {
        #[source]
        source: Box<aya::EbpfError>,
        hint: &'static str,
    },
    #[error("the XDP object has no map `{name}` (lb-ebpf and lb-common disagree: rebuild)")]
    MissingMap { name: &'static str },
    #[error("the XDP object has no program `{name}` (rebuild)")]
    MissingProgram { name: &'static str },
    #[error("the kernel rejected the XDP program `{name}`{hint}")]
    Verify {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
        hint: &'static str,
    },
    #[error(
        "interface `{iface}` already has an XDP program attached (id {prog_id}): stop the agent that owns it, or detach it with `ip link set dev {iface} xdp off`"
    )]
    AlreadyAttached { iface: String, prog_id: u32 },
    #[error("attaching to `{iface}` in {mode} mode failed{hint}")]
    Attach {
        iface: String,
        mode: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
        hint: &'static str,
    },
    #[error("{count} decap addresses are more than the decap program holds ({max}): give fewer `--address`es")]
    TooManyDecapAddrs { count: usize, max: u32 },
    #[error("map `{name}`")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("adding interface {ifindex} to the redirect map")]
    TxPort {
        ifindex: u32,
        #[source]
        source: Box<aya::maps::xdp::XdpMapError>,
    },
    #[error("pinning map `{name}` at {path} failed; is a bpffs mounted there? (`mount -t bpf bpf /sys/fs/bpf`)")]
    Pin {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    #[error(
        "pin directory {path} is in use by another running agent: give this one its own `--pin-dir` (or `dataplane.pin_dir`)"
    )]
    PinDirBusy { path: PathBuf },
    #[error(
        "an agent is running on pin directory {path}: stop it first (SIGTERM, or `systemctl stop lb`), then detach"
    )]
    DetachBusy { path: PathBuf },
    #[error("pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the XDP object's log ring buffer (aya-log)")]
    Log {
        #[source]
        source: Box<aya_log::Error>,
    },
    #[error("mapping the rings map into memory failed")]
    Mmap {
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the datapath pinned at {path} cannot be adopted: {what}. Restart with `--fresh-maps` to replace its maps (the program keeps running, but the connection table starts empty: established flows may move), or run the lb that created it"
    )]
    Incompatible { path: PathBuf, what: String },
    #[error(
        "the datapath pinned at {path} was created with other sizes: {what}. Put the sizes back in the config to keep its connection table, or restart with `--fresh-maps` to resize (the connection table starts empty: established flows may move)"
    )]
    Resized { path: PathBuf, what: String },
    #[error("the XDP link pinned at {path}{hint}")]
    Link {
        path: PathBuf,
        #[source]
        source: Box<LinkError>,
        hint: &'static str,
    },
    #[error("replacing the program on the XDP link of `{iface}` failed{hint}")]
    Replace {
        iface: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
        hint: &'static str,
    },
    #[error("internal error: a planned ring has {len} slots, the maps were sized for {ring_size}; nothing was written")]
    RingLength { len: usize, ring_size: u32 },
    #[error("VIP slot {slot} is outside the {max_vips} slots the maps were sized for")]
    SlotOutOfRange { slot: u32, max_vips: u32 },
    #[error(
        "internal error: the plan reuses VIP slot {slot} while VIP {live} still uses it (ids freed by a plan are reusable only after it is applied); nothing was written"
    )]
    SlotInUse { slot: u32, live: String },
    #[error(
        "internal error: the plan rewrites backend {id} while rings still point at its previous target; nothing was written"
    )]
    BackendInUse { id: u32 },
}

/// Wait between switching VIPs away from backends and invalidating those backends.
const REMOVAL_GRACE: std::time::Duration = std::time::Duration::from_millis(1);

const PERMISSION_HINT: &str = " (permission denied: run as root or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)";

/// `hint` if the error chain holds EPERM/EACCES.
pub(crate) fn permission_hint(e: &(dyn std::error::Error + 'static)) -> &'static str {
    match errno(e) {
        Some(libc::EPERM) | Some(libc::EACCES) => PERMISSION_HINT,
        _ => "",
    }
}

/// Sizes fixed at load time.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub ring_size: u32,
    pub max_vips: u32,
    pub conn_table_size: u32,
    /// `LB_NEW_FLOW_CAP`: new flows per second per CPU that may enter the connection
    /// table (0 = no cap). A global of the program, not of the maps: an adopting agent
    /// may change it.
    pub new_flow_cap_per_cpu: u32,
}

/// What is in the maps now, so that the next apply writes only differences. The rings'
/// contents are read from their memory mapping instead.
#[derive(Debug, Default)]
struct Applied {
    vips: HashMap<VipKey, VipMeta>,
    /// Ring index -> the planned table last stored there. Plans share one table per
    /// group, so a VIP whose ring is the very table it already runs is unchanged without
    /// comparing 65,537 slots. A ring not listed is compared through the mapping.
    sources: HashMap<u32, std::sync::Arc<[u32]>>,
    backends: BTreeMap<u32, Backend>,
    tx_ports: BTreeSet<u32>,
    /// The [`VipFilter`] epoch last written.
    vip_epoch: u32,
    /// VIP addresses that answer pings (`LB_ECHO`).
    echo: BTreeSet<lb_common::Addr>,
    /// VIP slots and backend ids the last apply took out of the datapath, and when.
    freed: Option<(std::time::Instant, BTreeSet<u32>, BTreeSet<u32>)>,
}

/// Counts of what one apply changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyReport {
    pub vips_switched: usize,
    pub vips_removed: usize,
    pub ring_slots_written: usize,
    pub backends_written: usize,
    pub backends_removed: usize,
}

impl std::ops::AddAssign for ApplyReport {
    fn add_assign(&mut self, o: ApplyReport) {
        self.vips_switched += o.vips_switched;
        self.vips_removed += o.vips_removed;
        self.ring_slots_written += o.ring_slots_written;
        self.backends_written += o.backends_written;
        self.backends_removed += o.backends_removed;
    }
}

/// Where the maps came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Created by this load: nothing was pinned.
    Fresh,
    /// The pinned maps of a datapath that was running: connection table, rings,
    /// backends and counters kept.
    Adopted,
    /// Created by this load to replace pinned ones (`--fresh-maps`).
    Replaced,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Fresh => "fresh",
            Origin::Adopted => "adopted",
            Origin::Replaced => "replaced",
        }
    }
}

/// One interface's XDP attachment: a bpf_link, pinned at `path` once committed.
struct Attachment {
    iface: String,
    path: PathBuf,
    link: FdLink,
    /// Created by this agent (removed again if the start fails); else adopted.
    created: bool,
}

pub struct Dataplane {
    ebpf: Ebpf,
    opts: LoadOptions,
    applied: Applied,
    rings: RingMemory,
    links: Vec<Attachment>,
    /// The pin directory and its exclusive lock (one agent per directory).
    pin_dir: Option<(PathBuf, std::fs::File)>,
    origin: Origin,
    /// Maps and links are pinned: the datapath now outlives this value.
    committed: bool,
    logger: Option<DatapathLogger>,
    /// Interfaces the health-probe encapsulation (`lb_probe_encap`, tc egress) is
    /// attached to. Not pinned: it ends with this value (probes end with the agent).
    probe_ifaces: BTreeSet<String>,
}

/// Reads the program's aya-log records into the `log` crate (bridged to tracing).
pub type DatapathLogger = EbpfLogger<&'static dyn log::Log>;

/// Forwards the program's log records to the agent's log as they arrive. Runs until
/// the ring buffer's descriptor fails (the program is gone) or the task is aborted.
pub async fn forward_logs(logger: DatapathLogger) {
    // SAFETY: the descriptor is the logger's ring buffer map, which the logger owns and
    // keeps open, unchanged, until it is dropped together with the `AsyncFd`.
    let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => return warn!(error = %e, "datapath logs unavailable"),
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else { return };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

impl Dataplane {
    /// Loads the object with new maps sized from `opts`, and verifies the LB program.
    /// Nothing is pinned: the datapath lives as long as this value (tests, benchmarks).
    pub fn load(opts: LoadOptions) -> Result<Self, DataplaneError> {
        Self::load_with(EBPF_OBJECT, opts, None)
    }

    /// The agent's load: takes the lock on `pin_dir`, then adopts the datapath pinned
    /// there if it is compatible (see `pins.rs`), or creates new maps when there is none
    /// or `fresh_maps` is set. Refuses pinned maps it cannot adopt before anything is
    /// written. `object` is the BPF object to load ([`EBPF_OBJECT`] but in upgrade tests).
    pub fn open(
        object: &'static [u8],
        opts: LoadOptions,
        pin_dir: &Path,
        fresh_maps: bool,
    ) -> Result<Self, DataplaneError> {
        let lock = pins::lock(pin_dir)?;
        let found = pins::look(pin_dir)?;
        let origin = if found.is_empty() {
            Origin::Fresh
        } else if fresh_maps {
            warn!(pin_dir = %pin_dir.display(), "--fresh-maps: replacing the pinned maps; the connection table starts empty");
            Origin::Replaced
        } else {
            pins::check(object, &opts, pin_dir, &found)?;
            Origin::Adopted
        };
        let mut dp = Self::load_with(object, opts, (origin == Origin::Adopted).then_some(pin_dir))?;
        dp.pin_dir = Some((pin_dir.to_owned(), lock));
        dp.origin = origin;
        if origin == Origin::Adopted {
            dp.recover()?;
            info!(
                pin_dir = %pin_dir.display(),
                vips = dp.applied.vips.len(),
                backends = dp.applied.backends.len(),
                "adopted the running datapath's maps (connection table kept)"
            );
        }
        Ok(dp)
    }

    /// VIP slots and backend ids the maps use now.
    pub fn live_ids(&self) -> (Vec<u32>, Vec<u32>) {
        (self.applied.vips.values().map(|m| m.id).collect(), self.applied.backends.keys().copied().collect())
    }

    /// Where the maps came from.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    fn load_with(object: &[u8], opts: LoadOptions, adopt: Option<&Path>) -> Result<Self, DataplaneError> {
        let ring_entries = RINGS_PER_VIP * opts.max_vips * opts.ring_size;
        let mut loader = EbpfLoader::new();
        loader
            .override_global(globals::RING_SIZE, &opts.ring_size, true)
            .override_global(globals::NEW_FLOW_CAP, &opts.new_flow_cap_per_cpu, true)
            .map_max_entries(maps::RINGS, ring_entries)
            .map_max_entries(maps::CONNS, opts.conn_table_size);
        let pin_paths: Vec<(&'static str, PathBuf)> =
            adopt.map(|dir| maps::ALL.iter().map(|&name| (name, dir.join(name))).collect()).unwrap_or_default();
        for (name, path) in &pin_paths {
            // Reuses the map pinned there (checked compatible by `pins::check`).
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object).map_err(|source| {
            let hint = permission_hint(&source);
            DataplaneError::Load { source: Box::new(source), hint }
        })?;
        for name in maps::ALL {
            if ebpf.map(name).is_none() {
                return Err(DataplaneError::MissingMap { name });
            }
        }
        if adopt.is_none() {
            let info = ebpf.map_mut(maps::INFO).ok_or(DataplaneError::MissingMap { name: maps::INFO })?;
            pins::write_info(info, &opts)?;
        }
        let rings = RingMemory::map(
            ebpf.map(maps::RINGS).ok_or(DataplaneError::MissingMap { name: maps::RINGS })?,
            ring_entries,
        )?;
        // Takes the program's log ring buffer; it must outlive the program's load.
        let logger = EbpfLogger::init(&mut ebpf).map_err(|source| DataplaneError::Log { source: Box::new(source) })?;
        load_program(&mut ebpf, programs::LB)?;
        Ok(Dataplane {
            ebpf,
            opts,
            applied: Applied::default(),
            rings,
            links: Vec::new(),
            pin_dir: None,
            origin: Origin::Fresh,
            probe_ifaces: BTreeSet::new(),
            committed: false,
            logger: Some(logger),
        })
    }

    /// Reads what adopted maps hold into `applied`, so the first apply writes only what
    /// differs from the desired state.
    fn recover(&mut self) -> Result<(), DataplaneError> {
        let err = |name| move |source| DataplaneError::Map { name, source: Box::new(source) };
        let mut applied = Applied::default();
        let vips: BpfHashMap<&MapData, VipKey, VipMeta> =
            BpfHashMap::try_from(self.map(maps::VIPS)?).map_err(err(maps::VIPS))?;
        for entry in vips.iter() {
            let (key, meta) = entry.map_err(err(maps::VIPS))?;
            applied.vips.insert(key, meta);
        }
        let filter: Array<&MapData, VipFilter> =
            Array::try_from(self.map(maps::VIP_FILTER)?).map_err(err(maps::VIP_FILTER))?;
        applied.vip_epoch = filter.get(&0, 0).map_err(err(maps::VIP_FILTER))?.epoch;
        let backends: Array<&MapData, Backend> =
            Array::try_from(self.map(maps::BACKENDS)?).map_err(err(maps::BACKENDS))?;
        for id in 1..backends.len() {
            let b = backends.get(&id, 0).map_err(err(maps::BACKENDS))?;
            if b != Backend::default() {
                applied.backends.insert(id, b);
            }
        }
        let ports: DevMapHash<&MapData> =
            DevMapHash::try_from(self.map(maps::TX_PORTS)?).map_err(err(maps::TX_PORTS))?;
        for key in ports.keys() {
            applied.tx_ports.insert(key.map_err(err(maps::TX_PORTS))?);
        }
        let echo: BpfHashMap<&MapData, lb_common::Addr, u32> =
            BpfHashMap::try_from(self.map(maps::ECHO)?).map_err(err(maps::ECHO))?;
        for key in echo.keys() {
            applied.echo.insert(key.map_err(err(maps::ECHO))?);
        }
        self.applied = applied;
        Ok(())
    }

    /// The reader of the program's rare-event logs (see lb-ebpf's `log.rs`), for
    /// [`forward_logs`]. Left unread, the ring buffer fills and further records are lost.
    pub fn take_logger(&mut self) -> Option<DatapathLogger> {
        self.logger.take()
    }

    /// The loaded LB program (for BPF_PROG_RUN).
    pub fn program(&self) -> Result<&Xdp, DataplaneError> {
        xdp_ref(&self.ebpf, programs::LB)
    }

    /// Pins the LB program at `path`, so another process or thread can run it
    /// (BPF_PROG_RUN, `bpftool prog run pinned PATH`) while this one updates the maps.
    pub fn pin_program(&mut self, path: &Path) -> Result<(), DataplaneError> {
        xdp_mut(&mut self.ebpf, programs::LB)?.pin(path).map_err(|source| DataplaneError::Pin {
            name: programs::LB,
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// A map of the loaded object, by its lb-common name.
    pub fn map(&self, name: &'static str) -> Result<&Map, DataplaneError> {
        self.ebpf.map(name).ok_or(DataplaneError::MissingMap { name })
    }

    /// Attaches the LB program to `iface` through a bpf_link. If the pin directory holds
    /// this interface's link (a datapath left running), the program on it is replaced
    /// atomically (`BPF_LINK_UPDATE`): no frame meets an interface without a program.
    /// Returns the mode used ("kept" for a replaced link, which keeps its mode).
    pub fn attach(&mut self, iface: &Interface, mode: XdpMode) -> Result<&'static str, DataplaneError> {
        let path = match &self.pin_dir {
            Some((dir, _)) => pins::link_path(dir, &iface.name),
            None => PathBuf::new(),
        };
        if !path.as_os_str().is_empty()
            && path.exists()
            && let Some(used) = self.replace_on_link(iface, &path)?
        {
            return Ok(used);
        }
        if let Some(prog_id) = iface.xdp_prog {
            return Err(DataplaneError::AlreadyAttached { iface: iface.name.clone(), prog_id });
        }
        let prog = xdp_mut(&mut self.ebpf, programs::LB)?;
        let attempt = |prog: &mut Xdp, m: AyaXdpMode, label: &'static str| {
            prog.attach_to_if_index(iface.ifindex, m).map_err(|source| {
                let hint = attach_hint(&source);
                DataplaneError::Attach { iface: iface.name.clone(), mode: label, source: Box::new(source), hint }
            })
        };
        let (id, used) = match mode {
            XdpMode::Native => (attempt(prog, AyaXdpMode::Driver, "native")?, "native"),
            XdpMode::Generic => (attempt(prog, AyaXdpMode::Skb, "generic")?, "generic"),
            XdpMode::Auto => match attempt(prog, AyaXdpMode::Driver, "native") {
                Ok(id) => (id, "native"),
                Err(e) => {
                    warn!(interface = %iface.name, error = %e, "native XDP failed; falling back to generic mode");
                    (attempt(prog, AyaXdpMode::Skb, "generic")?, "generic")
                }
            },
        };
        let link_err = |source| DataplaneError::Link { path: path.clone(), source: Box::new(source), hint: "" };
        let link = prog.take_link(id).map_err(|source| DataplaneError::Attach {
            iface: iface.name.clone(),
            mode: used,
            source: Box::new(source),
            hint: "",
        })?;
        let link = FdLink::try_from(link).map_err(link_err)?;
        // Pinned at once; removed again if the start fails before `commit`.
        let link = match &self.pin_dir {
            Some(_) => FdLink::from(link.pin(&path).map_err(|source| DataplaneError::Pin {
                name: "XDP link",
                path: path.clone(),
                source: Box::new(source),
            })?),
            None => link,
        };
        info!(interface = %iface.name, ifindex = iface.ifindex, mode = used, "XDP program attached");
        self.links.push(Attachment { iface: iface.name.clone(), path, link, created: true });
        Ok(used)
    }

    /// Puts this program on the pinned link at `path`, if that link is the one on
    /// `iface`. Returns `None` (and removes the pin) for a link whose interface is gone.
    fn replace_on_link(&mut self, iface: &Interface, path: &Path) -> Result<Option<&'static str>, DataplaneError> {
        let link_err = |source| DataplaneError::Link { path: path.to_owned(), source: Box::new(source), hint: "" };
        let pinned = PinnedLink::from_pin(path).map_err(link_err)?;
        let link = FdLink::from(pinned);
        let running = link.info().map_err(link_err)?.program_id();
        if iface.xdp_prog != Some(running) {
            // The interface was recreated (the link died with it) or holds another program.
            warn!(interface = %iface.name, path = %path.display(), "removing the pin of a link that is no longer on this interface");
            std::fs::remove_file(path).map_err(|source| DataplaneError::PinDir { path: path.to_owned(), source })?;
            return Ok(None);
        }
        let link = XdpLink::try_from(link).map_err(link_err)?;
        let prog = xdp_mut(&mut self.ebpf, programs::LB)?;
        let replace_err = |source: aya::programs::ProgramError| {
            let hint = permission_hint(&source);
            DataplaneError::Replace { iface: iface.name.clone(), source: Box::new(source), hint }
        };
        let id = prog.attach_to_link(link).map_err(replace_err)?;
        let link = FdLink::try_from(prog.take_link(id).map_err(replace_err)?).map_err(link_err)?;
        let new_id = prog.info().map(|i| i.id()).unwrap_or_default();
        info!(interface = %iface.name, old_program = running, new_program = new_id, "XDP program replaced in place on the running link");
        self.links.push(Attachment { iface: iface.name.clone(), path: path.to_owned(), link, created: false });
        Ok(Some("kept"))
    }

    /// Makes the datapath outlive this value: pins new maps (replacing the pins of maps
    /// `--fresh-maps` dropped) and removes the links of interfaces no longer attached.
    /// Until then, dropping it removes the links this load created.
    pub fn commit(&mut self) -> Result<(), DataplaneError> {
        let Some((dir, _)) = &self.pin_dir else { return Ok(()) };
        let dir = dir.clone();
        if self.origin != Origin::Adopted {
            for name in maps::ALL {
                let path = dir.join(name);
                if path.exists() {
                    std::fs::remove_file(&path)
                        .map_err(|source| DataplaneError::PinDir { path: path.clone(), source })?;
                }
                self.map(name)?.pin(&path).map_err(|source| DataplaneError::Pin {
                    name,
                    path,
                    source: Box::new(source),
                })?;
            }
        }
        let attached: BTreeSet<PathBuf> = self.links.iter().map(|a| a.path.clone()).collect();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.filter_map(Result::ok) {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(pins::LINK_PREFIX) && !attached.contains(&e.path()) {
                    info!(path = %e.path().display(), "detaching from an interface no longer configured");
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        self.committed = true;
        Ok(())
    }

    /// Removes the datapath: detaches from every interface and removes the pins.
    pub fn detach(&mut self) -> Result<pins::Detached, DataplaneError> {
        let links = std::mem::take(&mut self.links);
        let mut out = pins::Detached::default();
        for a in links {
            drop(a.link);
            let _ = std::fs::remove_file(&a.path);
            info!(interface = %a.iface, "XDP program detached");
            out.links.push(a.iface);
        }
        if let Some((dir, _)) = &self.pin_dir {
            let rest = pins::remove_all(dir)?;
            out.links.extend(rest.links);
            out.maps = rest.maps;
        }
        self.committed = false;
        Ok(out)
    }

    /// Refuses a plan whose rings do not fit the maps, or that would write a slot or id
    /// the datapath still uses for something else (see `control::ids`), and waits out the
    /// grace period of slots and ids the previous apply freed, before anything is written.
    fn check_plan(&self, plan: &Plan) -> Result<(), DataplaneError> {
        let live: HashMap<u32, &VipKey> = self.applied.vips.iter().map(|(k, m)| (m.id, k)).collect();
        for vip in &plan.vips {
            if vip.ring.len() != self.opts.ring_size as usize {
                return Err(DataplaneError::RingLength { len: vip.ring.len(), ring_size: self.opts.ring_size });
            }
            if let Some(&other) = live.get(&vip.slot).filter(|k| ***k != vip.key) {
                return Err(DataplaneError::SlotInUse { slot: vip.slot, live: display_key(other) });
            }
        }
        for (id, (_, b)) in &plan.backends {
            if self.applied.backends.get(id).is_some_and(|old| old.generation != b.generation) {
                return Err(DataplaneError::BackendInUse { id: *id });
            }
        }
        if let Some((at, vip_slots, backend_ids)) = &self.applied.freed {
            let reused = plan.vips.iter().any(|v| vip_slots.contains(&v.slot))
                || plan.backends.keys().any(|id| backend_ids.contains(id));
            if reused && let Some(left) = REMOVAL_GRACE.checked_sub(at.elapsed()) {
                std::thread::sleep(left);
            }
        }
        Ok(())
    }

    /// Writes `plan` into the maps, changing only what differs from the last apply.
    pub fn apply(&mut self, plan: &Plan) -> Result<ApplyReport, DataplaneError> {
        self.check_plan(plan)?;
        let mut report = ApplyReport::default();
        let m = self.opts.ring_size;
        let mut freed_slots = BTreeSet::new();
        let mut freed_ids = BTreeSet::new();

        // 1. Redirect ports and backends that the new rings may point at.
        {
            let mut ports: DevMapHash<&mut MapData> = typed(self.ebpf.map_mut(maps::TX_PORTS), maps::TX_PORTS)?;
            for &ifindex in &plan.tx_ports {
                if !self.applied.tx_ports.contains(&ifindex) {
                    ports
                        .insert(ifindex, ifindex, None, 0)
                        .map_err(|source| DataplaneError::TxPort { ifindex, source: Box::new(source) })?;
                    self.applied.tx_ports.insert(ifindex);
                }
            }
        }
        for (&id, (_, b)) in &plan.backends {
            // A slot given to a new backend starts its counters from zero.
            if self.applied.backends.get(&id).is_none_or(|old| old.generation != b.generation) {
                self.zero_counter(maps::BACKEND_STATS, id)?;
            }
        }
        {
            let mut backends: Array<&mut MapData, Backend> = typed(self.ebpf.map_mut(maps::BACKENDS), maps::BACKENDS)?;
            for (&id, (_, b)) in &plan.backends {
                if self.applied.backends.get(&id) != Some(b) {
                    backends
                        .set(id, b, 0)
                        .map_err(|source| DataplaneError::Map { name: maps::BACKENDS, source: Box::new(source) })?;
                    self.applied.backends.insert(id, *b);
                    report.backends_written += 1;
                }
            }
        }

        // 2. Each VIP: new ring into the spare slot, then one VIPS update switches to it.
        for vip in &plan.vips {
            if vip.slot >= self.opts.max_vips {
                return Err(DataplaneError::SlotOutOfRange { slot: vip.slot, max_vips: self.opts.max_vips });
            }
            let current = self.applied.vips.get(&vip.key).copied();
            let target_ring = match current {
                Some(meta) if meta.id == vip.slot => {
                    let same_table =
                        self.applied.sources.get(&meta.ring).is_some_and(|t| std::sync::Arc::ptr_eq(t, &vip.ring));
                    let unchanged = meta.flags == vip.flags
                        && (same_table || self.rings.holds((meta.ring * m) as usize, &vip.ring));
                    if unchanged {
                        continue;
                    }
                    if meta.ring == vip.slot * RINGS_PER_VIP { meta.ring + 1 } else { vip.slot * RINGS_PER_VIP }
                }
                _ => {
                    // A new VIP (or one moved to another slot) starts its counters from zero.
                    self.zero_counter(maps::VIP_STATS, vip.slot)?;
                    vip.slot * RINGS_PER_VIP
                }
            };
            report.ring_slots_written += self.write_ring(target_ring, &vip.ring, m)?;
            let meta = VipMeta { id: vip.slot, ring: target_ring, flags: vip.flags, _pad: 0 };
            let mut vips: BpfHashMap<&mut MapData, VipKey, VipMeta> = typed(self.ebpf.map_mut(maps::VIPS), maps::VIPS)?;
            vips.insert(vip.key, meta, 0)
                .map_err(|source| DataplaneError::Map { name: maps::VIPS, source: Box::new(source) })?;
            self.applied.vips.insert(vip.key, meta);
            report.vips_switched += 1;
            debug!(vip = %vip.name, ring = target_ring, "VIP switched to new ring");
            if current.is_none_or(|meta| meta.id != vip.slot) {
                // A new VIP: fill its spare ring too, so that its first change (a target
                // turning unhealthy, say) writes only the slots that change.
                report.ring_slots_written += self.write_ring(target_ring + 1, &vip.ring, m)?;
            }
        }

        // 3. VIPs no longer configured.
        let keep: std::collections::HashSet<VipKey> = plan.vips.iter().map(|v| v.key).collect();
        let stale: Vec<VipKey> = self.applied.vips.keys().filter(|k| !keep.contains(k)).copied().collect();
        if !stale.is_empty() {
            let mut vips: BpfHashMap<&mut MapData, VipKey, VipMeta> = typed(self.ebpf.map_mut(maps::VIPS), maps::VIPS)?;
            for key in stale {
                vips.remove(&key)
                    .map_err(|source| DataplaneError::Map { name: maps::VIPS, source: Box::new(source) })?;
                if let Some(meta) = self.applied.vips.remove(&key) {
                    freed_slots.insert(meta.id);
                }
                report.vips_removed += 1;
            }
        }

        // 3b. After any change of LB_VIPS: a new epoch (entries read under the old one
        // look their VIP up again) and the filter of the VIP addresses now configured.
        if report.vips_switched > 0 || report.vips_removed > 0 {
            self.write_vip_filter(self.applied.vip_epoch.wrapping_add(1))?;
        }

        // 4. Backends no longer configured: no ring points at them any more. A packet
        // that read a VIP's old ring just before the switch may still be about to read
        // one: program runs last microseconds, so a short grace period lets them finish.
        let stale: Vec<u32> =
            self.applied.backends.keys().filter(|id| !plan.backends.contains_key(id)).copied().collect();
        if !stale.is_empty() {
            if report.vips_switched > 0 {
                std::thread::sleep(REMOVAL_GRACE);
            }
            let mut backends: Array<&mut MapData, Backend> = typed(self.ebpf.map_mut(maps::BACKENDS), maps::BACKENDS)?;
            for id in stale {
                backends
                    .set(id, Backend::default(), 0)
                    .map_err(|source| DataplaneError::Map { name: maps::BACKENDS, source: Box::new(source) })?;
                self.applied.backends.remove(&id);
                freed_ids.insert(id);
                report.backends_removed += 1;
            }
        }

        // 5. Redirect ports no longer needed.
        let stale: Vec<u32> = self.applied.tx_ports.iter().filter(|i| !plan.tx_ports.contains(i)).copied().collect();
        if !stale.is_empty() {
            let mut ports: DevMapHash<&mut MapData> = typed(self.ebpf.map_mut(maps::TX_PORTS), maps::TX_PORTS)?;
            for ifindex in stale {
                ports
                    .remove(ifindex)
                    .map_err(|source| DataplaneError::Map { name: maps::TX_PORTS, source: Box::new(source) })?;
                self.applied.tx_ports.remove(&ifindex);
            }
        }
        self.applied.freed = (!freed_slots.is_empty() || !freed_ids.is_empty())
            .then(|| (std::time::Instant::now(), freed_slots, freed_ids));
        // 6. VIP addresses that answer pings.
        if self.applied.echo.iter().ne(plan.echo_addrs.iter()) {
            let mut echo: BpfHashMap<&mut MapData, lb_common::Addr, u32> =
                typed(self.ebpf.map_mut(maps::ECHO), maps::ECHO)?;
            let err = |source| DataplaneError::Map { name: maps::ECHO, source: Box::new(source) };
            for a in &plan.echo_addrs {
                if !self.applied.echo.contains(a) {
                    echo.insert(a, 0, 0).map_err(err)?;
                }
            }
            for a in self.applied.echo.iter().filter(|a| !plan.echo_addrs.contains(a)) {
                echo.remove(a).map_err(err)?;
            }
            self.applied.echo = plan.echo_addrs.iter().copied().collect();
        }
        // 7. Health probes of tunnelled targets take their tunnels: the probe
        // encapsulation on every interface toward one. A failure is logged, not fatal:
        // the datapath is complete, and probes that do not reach their target fail.
        for iface in &plan.tunnel_ifaces {
            if !self.probe_ifaces.contains(iface)
                && let Err(e) = self.attach_probe_encap(iface)
            {
                let mut why = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    why = format!("{why}: {c}");
                    cause = c.source();
                }
                tracing::error!(interface = %iface, error = %why, "health probes of tunnelled targets will not take their tunnels");
            }
        }
        Ok(report)
    }

    /// Loads `lb_probe_encap` (once) and attaches it to `iface`'s egress (tcx).
    fn attach_probe_encap(&mut self, iface: &str) -> Result<(), DataplaneError> {
        let name = programs::PROBE_ENCAP;
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram { name })?
            .try_into()
            .map_err(|source| DataplaneError::Verify { name, source: Box::new(source), hint: "" })?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| {
                let hint = permission_hint(&source);
                DataplaneError::Verify { name, source: Box::new(source), hint }
            })?;
        }
        prog.attach(iface, TcAttachType::Egress).map_err(|source| DataplaneError::Attach {
            iface: iface.to_string(),
            mode: "tc egress",
            source: Box::new(source),
            hint: "",
        })?;
        debug!(interface = %iface, "health-probe encapsulation attached (tc egress)");
        self.probe_ifaces.insert(iface.to_string());
        Ok(())
    }

    /// Sets a per-CPU `Counter` entry to zero on every CPU.
    /// Writes [`maps::VIP_FILTER`]: `epoch` and the addresses of the applied VIPs.
    fn write_vip_filter(&mut self, epoch: u32) -> Result<(), DataplaneError> {
        let mut filter = VipFilter { epoch, ..VipFilter::default() };
        for key in self.applied.vips.keys() {
            filter.insert(&key.addr);
        }
        let mut map: Array<&mut MapData, VipFilter> = typed(self.ebpf.map_mut(maps::VIP_FILTER), maps::VIP_FILTER)?;
        map.set(0, filter, 0)
            .map_err(|source| DataplaneError::Map { name: maps::VIP_FILTER, source: Box::new(source) })?;
        self.applied.vip_epoch = epoch;
        Ok(())
    }

    fn zero_counter(&mut self, name: &'static str, index: u32) -> Result<(), DataplaneError> {
        let err = |source| DataplaneError::Map { name, source: Box::new(source) };
        let cpus = aya::util::nr_cpus().map_err(|(_, io)| {
            err(aya::maps::MapError::SyscallError(aya::sys::SyscallError { call: "nr_cpus", io_error: io }))
        })?;
        let mut map: PerCpuArray<&mut MapData, lb_common::Counter> = typed(self.ebpf.map_mut(name), name)?;
        let zeros = PerCpuValues::try_from(vec![lb_common::Counter::default(); cpus]).map_err(|io_error| {
            err(aya::maps::MapError::SyscallError(aya::sys::SyscallError { call: "per-cpu values", io_error }))
        })?;
        map.set(index, zeros, 0).map_err(err)
    }

    /// Writes the slots of ring `ring` that differ from what it holds. Returns how many.
    fn write_ring(&mut self, ring: u32, table: &std::sync::Arc<[u32]>, m: u32) -> Result<usize, DataplaneError> {
        let written = self
            .rings
            .store((ring * m) as usize, table)
            .ok_or(DataplaneError::RingLength { len: table.len(), ring_size: m })?;
        self.applied.sources.insert(ring, table.clone());
        Ok(written)
    }
}

impl Drop for Dataplane {
    /// After [`Dataplane::commit`] the pins keep the datapath running; before it (a
    /// start that failed), the links this load created are removed, which detaches
    /// them, and maps never pinned go away with their last descriptor.
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for a in self.links.iter().filter(|a| a.created) {
            let _ = std::fs::remove_file(&a.path);
            info!(interface = %a.iface, "XDP program detached (the start did not complete)");
        }
    }
}

fn typed<'a, T>(map: Option<&'a mut Map>, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<&'a mut Map, Error = aya::maps::MapError>,
{
    let map = map.ok_or(DataplaneError::MissingMap { name })?;
    T::try_from(map).map_err(|source| DataplaneError::Map { name, source: Box::new(source) })
}

pub(crate) fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), DataplaneError> {
    xdp_mut(ebpf, name)?.load().map_err(|source| {
        let hint = verify_hint(&source);
        DataplaneError::Verify { name, source: Box::new(source), hint }
    })
}

/// Why a program load failed. The verifier refuses a program with EACCES, as a missing
/// capability does: with a verifier log, the log is the cause, not a permission.
fn verify_hint(e: &aya::programs::ProgramError) -> &'static str {
    match e {
        aya::programs::ProgramError::LoadError { verifier_log, .. } if !verifier_log.to_string().trim().is_empty() => {
            " (the verifier refused it, see its log: is the program built for this kernel?)"
        }
        _ => permission_hint(e),
    }
}

fn attach_hint(e: &aya::programs::ProgramError) -> &'static str {
    let p = permission_hint(e);
    if !p.is_empty() {
        return p;
    }
    match errno(e) {
        Some(libc::EBUSY) | Some(libc::EEXIST) => {
            " (another XDP program is attached: detach it with `ip link set dev IFACE xdp off` or stop its owner)"
        }
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => {
            " (the driver may lack native XDP: try `--xdp-mode generic` or `--xdp-mode auto`)"
        }
        _ => "",
    }
}

/// The first OS error number in `e`'s chain.
fn errno(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(code) = err.downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error) {
            return Some(code);
        }
        cur = err.source();
    }
    None
}

/// The XDP program `name` of `ebpf`.
pub(crate) fn xdp_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DataplaneError> {
    ebpf.program_mut(name)
        .ok_or(DataplaneError::MissingProgram { name })?
        .try_into()
        .map_err(|source| DataplaneError::Verify { name, source: Box::new(source), hint: "" })
}

pub(crate) fn xdp_ref<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a Xdp, DataplaneError> {
    ebpf.program(name)
        .ok_or(DataplaneError::MissingProgram { name })?
        .try_into()
        .map_err(|source| DataplaneError::Verify { name, source: Box::new(source), hint: "" })
}

/// A VIP key as people read it (`198.18.1.100:80/tcp`).
pub(crate) fn display_key(key: &VipKey) -> String {
    crate::config::vip_display(lb_common::ip_from_addr(key.addr), u16::from_be(key.port), key.proto)
}

/// Opens a pinned map of a running agent.
pub fn open_pinned(dir: &Path, name: &'static str) -> Result<Map, DataplaneError> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| DataplaneError::Map { name, source: Box::new(source) })?;
    Map::from_map_data(data).map_err(|source| DataplaneError::Map { name, source: Box::new(source) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aya::programs::ProgramError;

    fn load_error(errno: i32, log: &str) -> ProgramError {
        ProgramError::LoadError {
            io_error: std::io::Error::from_raw_os_error(errno),
            verifier_log: aya_obj::VerifierLog::new(log.into()),
        }
    }

    #[test]
    fn a_refusal_by_the_verifier_is_not_called_a_permission_problem() {
        let refused = verify_hint(&load_error(libc::EACCES, "combined stack size of 2 calls is 576. Too large\n"));
        assert!(refused.contains("verifier refused"), "{refused}");
        assert_eq!(verify_hint(&load_error(libc::EPERM, "")), PERMISSION_HINT);
        assert_eq!(verify_hint(&load_error(libc::EACCES, "  \n")), PERMISSION_HINT);
        assert_eq!(verify_hint(&load_error(libc::EINVAL, "")), "");
    }
}
