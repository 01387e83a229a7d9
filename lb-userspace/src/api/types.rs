//! The control API's requests and answers as they go over the wire (JSON). The agent
//! builds the answers and the CLI reads them, from these same types.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::control::{health_state::TargetState, registry::Source};

/// Body of `POST /v1/targets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub group: String,
    /// `IP`, `IP:port` or `[IPv6]:port`.
    pub target: String,
    /// 1..=1000; 1 if absent (or `null`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// Body of `DELETE /v1/targets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeregisterRequest {
    pub group: String,
    /// `IP` (a port, if given, is ignored).
    pub target: String,
}

/// Query string of `GET /v1/targets` (`?group=NAME`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetsQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// Answer of `GET /v1/status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusResponse {
    pub pid: u32,
    pub uptime_secs: u64,
    /// The config file the agent runs.
    pub config: String,
    pub interfaces: Vec<String>,
    pub pin_dir: String,
    pub listeners: Vec<ListenerInfo>,
    pub target_groups: Vec<GroupInfo>,
    /// How long the last health/drain-driven change took to reach the datapath, in ms
    /// (`null` before the first one).
    pub last_datapath_update_ms: Option<f64>,
    pub datapath: DatapathStatus,
    /// The last change of a target's state (health, or the end of a drain); `null`
    /// before the first one (and from agents without this field).
    #[serde(default)]
    pub last_change: Option<LastChange>,
    /// VIP announcement (`[announce]`): `null` when off (and from older agents).
    #[serde(default)]
    pub announce: Option<AnnounceStatus>,
}

/// `announce` in [`StatusResponse`], and the answer of `POST /v1/node/drain`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AnnounceStatus {
    /// The kernel routing table the routes are in (`announce.table`).
    pub table: u32,
    /// `serving` (announcing what it can serve), `draining` (routes withdrawn, still
    /// forwarding what arrives until the drain delay ends) or `drained` (the delay is
    /// over: safe to stop or detach).
    pub node: NodeState,
    /// While draining: seconds until the drain delay ends; else `null`.
    pub drain_remaining_secs: Option<f64>,
    /// The VIP addresses announced now (routes in `table`).
    pub announced: Vec<IpAddr>,
    /// The last failure to write the routes (retried every 100 ms); `null` if none.
    pub error: Option<String>,
}

/// A node's part in announcing VIPs, see [`AnnounceStatus`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    #[default]
    Serving,
    Draining,
    Drained,
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeState::Serving => "serving",
            NodeState::Draining => "draining",
            NodeState::Drained => "drained",
        })
    }
}

/// Body of `POST /v1/node/drain`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// Undo a drain: announce again what this node can serve.
    #[serde(default)]
    pub cancel: bool,
}

/// `last_change` in [`StatusResponse`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LastChange {
    /// What changed, e.g. `web 198.18.0.11: healthy -> unhealthy (connection refused)`
    /// or `web 198.18.0.12: deregistration delay over, removed`.
    pub change: String,
    /// Seconds since the change, when answered.
    pub secs_ago: f64,
}

/// The datapath in [`StatusResponse`], as this agent found it when it started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatapathStatus {
    /// `fresh` (created by this agent), `adopted` (left running by a previous agent:
    /// connection table, ids and rings kept) or `replaced` (`--fresh-maps`).
    pub maps: String,
    /// For adopted maps: how the previous agent ended, from its state file, e.g.
    /// `stopped at 2026-12-01T23:10:04Z` or `last seen at ... (killed or crashed)`.
    pub previous_agent: Option<String>,
}

/// A listener in [`StatusResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerInfo {
    pub name: String,
    /// `address:port/protocol`, e.g. `198.18.1.100:80/tcp`.
    pub vip: String,
    pub target_group: String,
    /// Fingerprint of the Maglev ring its new flows are hashed on, over target
    /// identities (16 hex digits): equal on every LB node that sends each flow to the
    /// same target. `null` while the listener is not in the datapath (and from older
    /// agents).
    #[serde(default)]
    pub ring_fingerprint: Option<String>,
}

/// A target group in [`StatusResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    pub group: String,
    /// Its targets that are healthy.
    pub healthy: usize,
    /// Its targets in any state.
    pub targets: usize,
    /// With zones (`node.zone`): this node's zone has no healthy target of the group,
    /// so its new flows spill over to the other zones. Absent from older agents.
    #[serde(default)]
    pub zone_spill: bool,
}

/// Answer of `GET /v1/targets`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetList {
    pub targets: Vec<TargetInfo>,
}

/// A target in [`TargetList`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetInfo {
    pub group: String,
    /// The target's address (without port).
    pub target: IpAddr,
    /// Its own (health-check) port, `null` if none.
    pub port: Option<u16>,
    pub weight: u32,
    pub state: TargetState,
    /// Why it is in its state (the last probe's result, or why it is not checked).
    pub reason: String,
    /// Where it was declared: `config` or `api`.
    pub source: Source,
    /// While draining: seconds until it is removed; else `null`.
    pub drain_remaining_secs: Option<f64>,
    /// Duration of its last health check in ms; `null` before the first one and in
    /// groups without health check.
    pub last_check_latency_ms: Option<f64>,
    /// Its datapath backend id (the `id` of `lb stats`), `null` while it is not in the
    /// datapath. Absent from older agents' answers (read as `null`).
    #[serde(default)]
    pub backend_id: Option<u32>,
}

/// Answer of `POST /v1/targets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub group: String,
    pub target: IpAddr,
    pub weight: u32,
    /// `healthy` at once in groups without health check, else `initial`.
    pub state: TargetState,
}

/// Answer of `DELETE /v1/targets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeregisterResponse {
    pub group: String,
    pub target: IpAddr,
    pub state: DeregisteredState,
    /// The group's deregistration delay: how long existing flows continue.
    pub deregistration_delay_secs: u64,
}

/// A target's state right after its deregistration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeregisteredState {
    /// Its existing flows continue until the group's deregistration delay ends.
    Draining,
    /// Gone at once: the group's deregistration delay is 0.
    Removed,
}

/// Answer of `POST /v1/reload`: the new config was applied whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadResponse {
    pub reloaded: bool,
}

/// Body of every refusal: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// See [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable and machine-readable, e.g. `bad_request`, `not_found`, `conflict`.
    pub code: String,
    /// For people: the cause and the fix.
    pub message: String,
}

impl std::fmt::Display for DeregisteredState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeregisteredState::Draining => "draining",
            DeregisteredState::Removed => "removed",
        })
    }
}
