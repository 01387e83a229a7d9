//! The agent's saved state: what it learnt at runtime (registrations, deregistrations
//! and their drains, health states, VIP slots and backend ids), kept in one JSON file
//! (`dataplane.state_dir`/`state.json`) so that a restarted agent resumes it. This module
//! only reads and writes the file; `control::registry` and `control::ids` take and
//! restore the snapshots it holds.
//!
//! [`save`] replaces the file atomically: a reader (or a crash) sees the old file or the
//! new one, never a mix.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

pub use crate::config::DEFAULT_STATE_DIR;
use crate::control::{
    ids::AllocatorsSnapshot,
    registry::{RegistrySnapshot, unix_ms},
};

/// The file's name in the state directory.
pub const STATE_FILE_NAME: &str = "state.json";
/// The `format` tag of a state file.
pub const STATE_FORMAT: &str = "lb-agent-state";
/// The file format version this lb writes, and the newest it reads.
pub const STATE_VERSION: u32 = 1;

/// The contents of a state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    /// Always [`STATE_FORMAT`].
    pub format: String,
    /// [`STATE_VERSION`] when written by this lb.
    pub version: u32,
    /// When it was written, in milliseconds since the Unix epoch.
    pub saved_at_unix_ms: u64,
    /// Set by an agent that stopped cleanly (SIGTERM/SIGINT), when it stopped; absent if
    /// it was killed or crashed after its last save.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at_unix_ms: Option<u64>,
    pub registry: RegistrySnapshot,
    pub ids: AllocatorsSnapshot,
}

impl SavedState {
    /// A state of this format and version, saved at `now_wall`.
    pub fn new(registry: RegistrySnapshot, ids: AllocatorsSnapshot, now_wall: SystemTime) -> SavedState {
        SavedState {
            format: STATE_FORMAT.to_owned(),
            version: STATE_VERSION,
            saved_at_unix_ms: unix_ms(now_wall),
            stopped_at_unix_ms: None,
            registry,
            ids,
        }
    }
}

/// The state file in `state_dir`.
pub fn path_in(state_dir: &Path) -> PathBuf {
    state_dir.join(STATE_FILE_NAME)
}

/// Why the state file could not be read or written. Each message names the file and
/// what to do.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error(
        "cannot read the agent state file {path}: fix its permissions, or move it away to start from the config alone"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the agent state file {path} is corrupt: move it away to start from the config alone, or restore a backup")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{path} is not an lb agent state file (format {found}, expected \"{STATE_FORMAT}\"): move it away, or point dataplane.state_dir elsewhere"
    )]
    Foreign { path: PathBuf, found: String },
    #[error(
        "the agent state file {path} was written by a newer lb (version {found}, this one reads up to {STATE_VERSION}): run that version, or move the file away"
    )]
    Newer { path: PathBuf, found: u64 },
    #[error(
        "cannot write the agent state file {path} ({step}): make dataplane.state_dir a writable directory on a local file system"
    )]
    Write {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Reads the state file at `path`: `Ok(None)` if there is none (a first start).
pub fn load(path: &Path) -> Result<Option<SavedState>, StateFileError> {
    let text = match fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateFileError::Read { path: path.to_owned(), source }),
    };
    let corrupt = |source| StateFileError::Corrupt { path: path.to_owned(), source };
    let value: serde_json::Value = serde_json::from_slice(&text).map_err(corrupt)?;
    match value.get("format") {
        Some(serde_json::Value::String(f)) if f == STATE_FORMAT => {}
        other => {
            let found = other.map_or_else(|| "missing".to_owned(), |v| v.to_string());
            return Err(StateFileError::Foreign { path: path.to_owned(), found });
        }
    }
    if let Some(found) = value.get("version").and_then(serde_json::Value::as_u64)
        && found > u64::from(STATE_VERSION)
    {
        return Err(StateFileError::Newer { path: path.to_owned(), found });
    }
    let state: SavedState = serde_json::from_value(value).map_err(corrupt)?;
    if state.version == 0 {
        return Err(corrupt(serde::de::Error::custom("version 0 does not exist")));
    }
    Ok(Some(state))
}

/// Writes `state` to `path` atomically: to a temporary file in the same directory
/// (mode 0600), synced to disk, renamed over `path`, then the directory synced so the
/// rename lasts. Creates the directory (mode 0700) if missing. On error `path` is
/// unchanged and the temporary file removed.
pub fn save(path: &Path, state: &SavedState) -> Result<(), StateFileError> {
    let write_err = |step, source| StateFileError::Write { path: path.to_owned(), step, source };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        write_err("naming the file", io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))
    })?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| write_err("creating its directory", e))?;
    let json = serde_json::to_vec_pretty(state)
        .map_err(|e| write_err("encoding", io::Error::new(io::ErrorKind::InvalidData, e)))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| ("creating the temporary file", e))?;
        f.write_all(&json).and_then(|()| f.write_all(b"\n")).map_err(|e| ("writing the temporary file", e))?;
        f.sync_all().map_err(|e| ("syncing the temporary file", e))?;
        fs::rename(&tmp, path).map_err(|e| ("renaming the temporary file over it", e))
    })();
    if let Err((step, e)) = written {
        let _ = fs::remove_file(&tmp);
        return Err(write_err(step, e));
    }
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| write_err("syncing its directory", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{
        health_state::TargetState,
        ids::{SavedBackendId, SavedVipSlot},
        registry::{SavedRegistration, SavedTarget, Source},
    };
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// A fresh directory under the system's temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("lb-state-test-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn sample(weight: u32) -> SavedState {
        let ip = "198.18.0.21".parse().expect("ip");
        SavedState::new(
            RegistrySnapshot {
                registered: vec![SavedRegistration { group: "web".into(), ip, weight, port: Some(8080) }],
                deregistered: vec![],
                targets: vec![SavedTarget {
                    group: "web".into(),
                    ip,
                    state: TargetState::Healthy,
                    checked: true,
                    reason: Some("connected".into()),
                    drained_unhealthy: false,
                    drain_until_unix_ms: None,
                    weight,
                    port: Some(8080),
                    mac: None,
                    source: Source::Api,
                }],
            },
            AllocatorsSnapshot {
                vips: vec![SavedVipSlot {
                    address: "198.18.1.100".parse().expect("ip"),
                    port: 80,
                    protocol: 6,
                    slot: 0,
                }],
                backends: vec![SavedBackendId { group: "web".into(), ip, id: 1, generation: Some(1) }],
                next_generation: 2,
            },
            SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123),
        )
    }

    #[test]
    fn save_then_load_round_trips_atomically_and_leaves_no_temp_file() {
        let dir = TempDir::new("round-trip");
        let state_dir = dir.0.join("nested");
        let path = path_in(&state_dir);
        assert!(load(&path).expect("no file is not an error").is_none());
        save(&path, &sample(1)).expect("save");
        let mode = fs::metadata(&state_dir).expect("dir").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "the directory is created private");
        assert_eq!(fs::metadata(&path).expect("file").permissions().mode() & 0o777, 0o600);
        assert_eq!(load(&path).expect("load"), Some(sample(1)));
        // A second save renames a new file over the old one (a new inode: the old file
        // was never written in place) and leaves nothing else in the directory.
        let inode = fs::metadata(&path).expect("file").ino();
        save(&path, &sample(7)).expect("save again");
        assert_eq!(load(&path).expect("load"), Some(sample(7)));
        assert_ne!(fs::metadata(&path).expect("file").ino(), inode);
        let names: Vec<String> = fs::read_dir(&state_dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![STATE_FILE_NAME.to_owned()]);
        // Field names are part of the format.
        let json: serde_json::Value = serde_json::from_slice(&fs::read(&path).expect("read")).expect("json");
        assert_eq!(json["format"], "lb-agent-state");
        assert_eq!(json["version"], 1);
        assert_eq!(json["saved_at_unix_ms"], 1_700_000_000_123u64);
        assert_eq!(json["registry"]["targets"][0]["state"], "healthy");
        assert_eq!(json["ids"]["vips"][0]["address"], "198.18.1.100");
    }

    #[test]
    fn a_failed_save_leaves_the_old_file() {
        let dir = TempDir::new("failed-save");
        let path = path_in(&dir.0);
        save(&path, &sample(1)).expect("save");
        // The temporary file's name taken by a directory: the write fails early.
        fs::create_dir(dir.0.join(".state.json.tmp")).expect("block the temp name");
        let err = save(&path, &sample(2)).expect_err("blocked");
        assert!(matches!(err, StateFileError::Write { step: "creating the temporary file", .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
        assert_eq!(load(&path).expect("load"), Some(sample(1)));
    }

    #[test]
    fn bad_files_give_errors_that_name_the_file_and_the_fix() {
        let dir = TempDir::new("bad");
        fs::create_dir_all(&dir.0).expect("dir");
        let path = path_in(&dir.0);
        let write = |text: &str| fs::write(&path, text).expect("write");
        let shown = path.display().to_string();

        write("{ not json");
        let err = load(&path).expect_err("corrupt");
        assert!(matches!(err, StateFileError::Corrupt { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&shown) && msg.contains("move it away") && msg.contains("restore a backup"), "{msg}");

        let mut missing = serde_json::to_value(sample(1)).expect("json");
        missing.as_object_mut().expect("object").remove("ids");
        write(&missing.to_string());
        assert!(matches!(load(&path), Err(StateFileError::Corrupt { .. })), "a missing field is corrupt");

        let mut zero = serde_json::to_value(sample(1)).expect("json");
        zero["version"] = 0.into();
        write(&zero.to_string());
        assert!(matches!(load(&path), Err(StateFileError::Corrupt { .. })), "version 0 does not exist");

        write(r#"{ "format": "something-else", "version": 1 }"#);
        let err = load(&path).expect_err("foreign");
        assert!(matches!(&err, StateFileError::Foreign { found, .. } if found == "\"something-else\""), "{err:?}");
        assert!(err.to_string().contains(&shown), "{err}");
        write("[1, 2, 3]");
        assert!(matches!(load(&path), Err(StateFileError::Foreign { .. })), "valid JSON without the tag");

        let mut newer = serde_json::to_value(sample(1)).expect("json");
        newer["version"] = 2.into();
        newer["registry"] = "a shape this lb does not know".into();
        write(&newer.to_string());
        let err = load(&path).expect_err("newer");
        assert!(matches!(err, StateFileError::Newer { found: 2, .. }), "{err:?}");
        assert!(err.to_string().contains("version 2, this one reads up to 1): run that version"), "{err}");

        fs::remove_file(&path).expect("remove");
        fs::create_dir(&path).expect("a directory where the file should be");
        assert!(matches!(load(&path), Err(StateFileError::Read { .. })));
    }
}
