//! What outlives the agent, under its pin directory: every map (`LB_*`, named as in
//! `lb_common::maps`) and one XDP bpf_link per interface (`link-<interface>`). While
//! those pins exist the program keeps forwarding with the maps' last contents, with or
//! without an agent.
//!
//! A starting agent adopts them only if they are what this build would create: the
//! layout version in `LB_INFO` equals `lb_common::LAYOUT_VERSION`, the sizes equal the
//! config's, and every map's type, key and value size, capacity and flags equal the
//! embedded object's. Otherwise it refuses before anything is written, naming the
//! choice (`--fresh-maps`, or the sizes to put back).

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::maps::{Array, Map, MapData};
use lb_common::{DatapathInfo, LAYOUT_VERSION, maps};
use tracing::{info, warn};

use super::{DataplaneError, LoadOptions};

/// File name prefix of the pinned XDP links, followed by the interface name.
pub const LINK_PREFIX: &str = "link-";

/// The pin path of the XDP link on `iface`.
pub fn link_path(dir: &Path, iface: &str) -> PathBuf {
    dir.join(format!("{LINK_PREFIX}{iface}"))
}

/// Creates `dir` and takes the exclusive lock that makes one agent per pin directory.
pub(super) fn lock(dir: &Path) -> Result<File, DataplaneError> {
    std::fs::create_dir_all(dir).map_err(|source| DataplaneError::PinDir { path: dir.to_owned(), source })?;
    let lock = File::open(dir).map_err(|source| DataplaneError::PinDir { path: dir.to_owned(), source })?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(DataplaneError::PinDirBusy { path: dir.to_owned() });
    }
    Ok(lock)
}

/// What `dir` holds of a previous datapath.
#[derive(Debug, Default)]
pub(super) struct Found {
    /// `LB_INFO`'s contents, if pinned.
    pub info: Option<DatapathInfo>,
    /// Map pins present.
    pub maps: Vec<&'static str>,
}

impl Found {
    pub(super) fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }
}

pub(super) fn look(dir: &Path) -> Result<Found, DataplaneError> {
    let maps: Vec<&'static str> = maps::ALL.into_iter().filter(|m| dir.join(m).exists()).collect();
    let info = if maps.contains(&maps::INFO) { Some(read_info(dir)?) } else { None };
    Ok(Found { info, maps })
}

/// Reads the pinned `LB_INFO`: what the maps under `dir` were created with.
pub fn read_info(dir: &Path) -> Result<DatapathInfo, DataplaneError> {
    let map = super::open_pinned(dir, maps::INFO)?;
    let err = |source| DataplaneError::Map { name: maps::INFO, source: Box::new(source) };
    let info: Array<MapData, DatapathInfo> = Array::try_from(map).map_err(err)?;
    info.get(&0, 0).map_err(err)
}

/// Writes `LB_INFO` of freshly created maps.
pub(super) fn write_info(map: &mut Map, opts: &LoadOptions) -> Result<(), DataplaneError> {
    let err = |source| DataplaneError::Map { name: maps::INFO, source: Box::new(source) };
    let mut info: Array<&mut MapData, DatapathInfo> = Array::try_from(map).map_err(err)?;
    let value = DatapathInfo {
        layout_version: LAYOUT_VERSION,
        ring_size: opts.ring_size,
        max_vips: opts.max_vips,
        conn_table_size: opts.conn_table_size,
    };
    info.set(0, value, 0).map_err(err)
}

/// Why pinned maps cannot be adopted; the error's message names the way out.
pub(super) fn check(object: &[u8], opts: &LoadOptions, dir: &Path, found: &Found) -> Result<(), DataplaneError> {
    let incompatible = |what: String| DataplaneError::Incompatible { path: dir.to_owned(), what };
    let Some(info) = found.info else {
        return Err(incompatible(format!(
            "it holds {} but no {} (left by an lb from before layout versions, or by another program)",
            found.maps.join(", "),
            maps::INFO
        )));
    };
    if info.layout_version != LAYOUT_VERSION {
        let age = if info.layout_version > LAYOUT_VERSION { "a newer" } else { "an older" };
        return Err(incompatible(format!(
            "its maps have layout version {} ({age} lb), this lb has version {LAYOUT_VERSION}",
            info.layout_version
        )));
    }
    let sizes = [
        ("ring_size", info.ring_size, opts.ring_size),
        ("max_vips", info.max_vips, opts.max_vips),
        ("conn_table_size", info.conn_table_size, opts.conn_table_size),
    ];
    let differ: Vec<String> = sizes
        .iter()
        .filter(|(_, running, wanted)| running != wanted)
        .map(|(name, running, wanted)| format!("dataplane.{name} is {running} there, {wanted} in the config"))
        .collect();
    if !differ.is_empty() {
        return Err(DataplaneError::Resized { path: dir.to_owned(), what: differ.join("; ") });
    }
    let obj = aya_obj::Object::parse(object).map_err(|e| incompatible(format!("the embedded object: {e}")))?;
    for name in maps::ALL {
        let Some(def) = obj.maps.get(name) else { return Err(DataplaneError::MissingMap { name }) };
        if !found.maps.contains(&name) {
            return Err(incompatible(format!("map {name} is missing")));
        }
        let err = |source| DataplaneError::Map { name, source: Box::new(source) };
        let pinned = MapData::from_pin(dir.join(name)).and_then(|m| m.info()).map_err(err)?;
        let max_entries = match name {
            maps::RINGS => lb_common::RINGS_PER_VIP * opts.max_vips * opts.ring_size,
            maps::CONNS => opts.conn_table_size,
            _ => def.max_entries(),
        };
        let pinned_type = pinned.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        let want = (def.map_type(), def.key_size(), def.value_size(), max_entries, def.map_flags());
        // The kernel adds BPF_F_RDONLY_PROG to devmaps itself.
        let flags = pinned.map_flags() & !aya_obj::generated::BPF_F_RDONLY_PROG;
        let have = (pinned_type, pinned.key_size(), pinned.value_size(), pinned.max_entries(), flags);
        if want != have {
            return Err(incompatible(format!(
                "map {name} is (type, key size, value size, entries, flags) {have:?}, this lb expects {want:?}"
            )));
        }
    }
    Ok(())
}

/// What [`detach_pinned`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Detached {
    /// Interfaces whose XDP link was removed (the program stopped there).
    pub links: Vec<String>,
    /// Map pins removed.
    pub maps: usize,
}

/// Removes a datapath that runs without an agent: its links (each removal detaches the
/// program from that interface) and its map pins, then the directory. Refuses while an
/// agent holds the directory. A directory that does not exist is nothing to do.
pub fn detach_pinned(dir: &Path) -> Result<Detached, DataplaneError> {
    if !dir.exists() {
        return Ok(Detached::default());
    }
    let _lock = lock(dir).map_err(|e| match e {
        DataplaneError::PinDirBusy { path } => DataplaneError::DetachBusy { path },
        e => e,
    })?;
    remove_all(dir)
}

/// Removes every link and map pin under `dir`, then `dir`. The caller holds the lock.
pub(super) fn remove_all(dir: &Path) -> Result<Detached, DataplaneError> {
    let mut out = Detached::default();
    let entries = std::fs::read_dir(dir).map_err(|source| DataplaneError::PinDir { path: dir.to_owned(), source })?;
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if let Some(iface) = name.strip_prefix(LINK_PREFIX) {
            std::fs::remove_file(&path).map_err(|source| DataplaneError::PinDir { path: path.clone(), source })?;
            info!(interface = iface, "XDP program detached");
            out.links.push(iface.to_owned());
        } else if maps::ALL.contains(&name.as_str()) {
            std::fs::remove_file(&path).map_err(|source| DataplaneError::PinDir { path: path.clone(), source })?;
            out.maps += 1;
        } else {
            warn!(path = %path.display(), "leaving a file that is not lb's in the pin directory");
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        warn!(path = %dir.display(), error = %e, "pin directory not removed");
    }
    Ok(out)
}
