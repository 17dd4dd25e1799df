//! The bodies of the API's write requests, shared by the HTTP API, the CLI
//! and the library. Unknown fields are refused, so a misspelt option is an
//! error, not a silent default.
//!
//! The limits a body is checked against ([`Request::validate`]) are the
//! constants below. The OpenAPI document (`src/web/openapi.json`) states the
//! same limits as `minimum`/`maximum`, `maxLength`, `pattern` and `enum`, and
//! a test in `src/api.rs` fails when the two disagree.

use crate::ApiError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt::Display;
use std::ops::RangeInclusive;

/// `CreateVm::memory_mib`.
pub const MEMORY_MIB: RangeInclusive<u64> = 8..=64 * 1024;
/// `CreateVm::vcpus`.
pub const VCPUS: RangeInclusive<u32> = 1..=64;
/// `CreateVm::dirty_pages_per_sec`.
pub const DIRTY_PAGES_PER_SEC: RangeInclusive<u64> = 0..=10_000_000;
/// `CreateVm::tcp_connections` (the guest opens them all at boot).
pub const TCP_CONNECTIONS: RangeInclusive<u32> = 0..=65_535;
/// `SettingsPatch::downtime_limit_ms`, and a move's or a drain's own
/// (`MoveVm::downtime_limit_ms`, `PauseNode::downtime_limit_ms`): the same
/// promise, so the same bounds.
pub const DOWNTIME_LIMIT_MS: RangeInclusive<u32> = 1..=u32::MAX;
/// `SettingsPatch::max_migrations_per_node`.
pub const MAX_MIGRATIONS_PER_NODE: RangeInclusive<u32> = 1..=u32::MAX;
/// `SettingsPatch::bandwidth_cap_bytes_per_sec` (`null`: no cap).
pub const BANDWIDTH_CAP_BYTES_PER_SEC: RangeInclusive<u64> = 1..=u64::MAX;
/// `Append::record`, in characters, as JSON Schema counts a string: the
/// guest's service takes records of at most [`ferry_vmm::service::MAX_RECORD`]
/// bytes, and a character is at most 4 bytes of UTF-8.
pub const RECORD_MAX_CHARS: usize = ferry_vmm::service::MAX_RECORD / 4;
/// `CreateVm::priority`: the store's own bound, so the API refuses what the
/// store would.
pub const PRIORITY: RangeInclusive<u32> = 0..=ferry_cluster::model::MAX_FAILOVER_PRIORITY;
/// `SettingsPatch::failure_detection_ms`: the store's own bounds.
pub const FAILURE_DETECTION_MS: RangeInclusive<u32> = ferry_cluster::model::FAILURE_DETECTION_MS;
/// `MarkNodeDown::reason`, in characters: it is kept in the store and shown
/// on every node's view, so a sentence, not a document.
pub const REASON_MAX_CHARS: usize = 200;

/// Every bounded integer field of a request body: (schema, field, min, max).
/// The OpenAPI check walks this list; validation uses the constants above.
pub const INTEGER_BOUNDS: &[(&str, &str, u64, u64)] = &[
    (
        "CreateVm",
        "memory_mib",
        *MEMORY_MIB.start(),
        *MEMORY_MIB.end(),
    ),
    (
        "CreateVm",
        "vcpus",
        *VCPUS.start() as u64,
        *VCPUS.end() as u64,
    ),
    (
        "CreateVm",
        "dirty_pages_per_sec",
        *DIRTY_PAGES_PER_SEC.start(),
        *DIRTY_PAGES_PER_SEC.end(),
    ),
    (
        "CreateVm",
        "tcp_connections",
        *TCP_CONNECTIONS.start() as u64,
        *TCP_CONNECTIONS.end() as u64,
    ),
    (
        "SettingsPatch",
        "downtime_limit_ms",
        *DOWNTIME_LIMIT_MS.start() as u64,
        *DOWNTIME_LIMIT_MS.end() as u64,
    ),
    (
        "MoveVm",
        "downtime_limit_ms",
        *DOWNTIME_LIMIT_MS.start() as u64,
        *DOWNTIME_LIMIT_MS.end() as u64,
    ),
    (
        "PauseNode",
        "downtime_limit_ms",
        *DOWNTIME_LIMIT_MS.start() as u64,
        *DOWNTIME_LIMIT_MS.end() as u64,
    ),
    (
        "SettingsPatch",
        "max_migrations_per_node",
        *MAX_MIGRATIONS_PER_NODE.start() as u64,
        *MAX_MIGRATIONS_PER_NODE.end() as u64,
    ),
    (
        "SettingsPatch",
        "bandwidth_cap_bytes_per_sec",
        *BANDWIDTH_CAP_BYTES_PER_SEC.start(),
        *BANDWIDTH_CAP_BYTES_PER_SEC.end(),
    ),
    (
        "CreateVm",
        "priority",
        *PRIORITY.start() as u64,
        *PRIORITY.end() as u64,
    ),
    (
        "SettingsPatch",
        "failure_detection_ms",
        *FAILURE_DETECTION_MS.start() as u64,
        *FAILURE_DETECTION_MS.end() as u64,
    ),
];

/// `CreateVm::pattern`.
pub const PATTERNS: &[&str] = &["uniform", "hot_set", "sequential"];
/// `CreateVm::storage`.
pub const STORAGES: &[&str] = &["shared", "local"];
/// `CreateVm::backend`.
pub const BACKENDS: &[&str] = &["sim", "kvm", "qemu"];
/// `NetworkPatch::migration`.
pub const MIGRATION_USES: &[&str] = &["default", "allow", "forbid"];
/// `SettingsPatch::pro_tip_mode`.
pub const TIP_MODES: &[&str] = &["off", "manual", "automatic"];

/// Every string field with a fixed set of values: (schema, field, values).
pub const ENUMS: &[(&str, &str, &[&str])] = &[
    ("CreateVm", "pattern", PATTERNS),
    ("CreateVm", "storage", STORAGES),
    ("CreateVm", "backend", BACKENDS),
    ("NetworkPatch", "migration", MIGRATION_USES),
    ("SettingsPatch", "pro_tip_mode", TIP_MODES),
];

/// Longest name a VM may have (see [`check_name`]).
pub const NAME_MAX_LEN: usize = 63;
/// [`check_name`]'s rule as a regular expression (for the OpenAPI document).
pub const NAME_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._-]*$";

/// Every string field with a longest length, in characters: (schema, field, max).
pub const MAX_CHARS: &[(&str, &str, usize)] = &[
    ("CreateVm", "name", NAME_MAX_LEN),
    ("Append", "record", RECORD_MAX_CHARS),
    ("MarkNodeDown", "reason", REASON_MAX_CHARS),
    ("RemoveNode", "confirm", NAME_MAX_LEN),
];

/// A request body: parsed by [`crate::api::parse_json`] and then checked by
/// [`Request::validate`] (every check that needs no read of the store), so
/// the API and the library refuse the same bodies with the same error.
pub trait Request: DeserializeOwned {
    /// Its schema in the OpenAPI document, `#/components/schemas/<SCHEMA>`.
    const SCHEMA: &'static str;

    fn validate(&self) -> Result<(), ApiError> {
        Ok(())
    }
}

fn in_range<T: PartialOrd + Display>(
    field: &str,
    value: &T,
    range: &RangeInclusive<T>,
) -> Result<(), ApiError> {
    if range.contains(value) {
        return Ok(());
    }
    Err(ApiError::bad_request(
        "invalid_value",
        format!(
            "{field} must be between {} and {}, not {value}",
            range.start(),
            range.end()
        ),
    ))
}

fn one_of(field: &str, value: Option<&str>, values: &[&str]) -> Result<(), ApiError> {
    match value {
        Some(v) if !values.contains(&v) => Err(ApiError::bad_request(
            "invalid_value",
            format!("{field} {v:?} is not one of {}", values.join(", ")),
        )),
        _ => Ok(()),
    }
}

/// `POST /api/vms`: define a simulated VM and (by default) start it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub name: String,
    /// Node name or id; default: the answering node.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub node: Option<String>,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Page writes per second of the guest's workload (0: idle).
    #[serde(default)]
    pub dirty_pages_per_sec: u64,
    /// `uniform`, `hot_set` (80% of writes to 10% of pages) or `sequential`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub pattern: Option<String>,
    /// `shared` (a cluster-shared volume, the default) or `local` (the disk
    /// moves with the VM).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub storage: Option<String>,
    /// `sim` (a simulated guest, the default) or `kvm` (a real KVM guest; refused
    /// by nodes without usable KVM).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub backend: Option<String>,
    #[serde(default)]
    pub processor_compatibility: bool,
    /// TCP connections the guest holds open from boot (offloaded to the NIC
    /// on nodes that support it).
    #[serde(default)]
    pub tcp_connections: u32,
    #[serde(default = "yes")]
    pub start: bool,
    /// Restart it on another node (a cold start) when its node dies;
    /// `false`: it waits, `needs_restart`, for a user.
    #[serde(default = "yes")]
    pub restart: bool,
    /// Higher restarts first when a dead node's VMs compete for room.
    #[serde(default)]
    pub priority: u32,
}

fn default_memory_mib() -> u64 {
    64
}
fn default_vcpus() -> u32 {
    1
}
fn yes() -> bool {
    true
}

impl CreateVm {
    pub fn new(name: impl Into<String>) -> CreateVm {
        CreateVm {
            name: name.into(),
            node: None,
            memory_mib: default_memory_mib(),
            vcpus: default_vcpus(),
            dirty_pages_per_sec: 0,
            pattern: None,
            storage: None,
            backend: None,
            processor_compatibility: false,
            tcp_connections: 0,
            start: true,
            restart: true,
            priority: 0,
        }
    }
}

/// `POST /api/vms/{vm}/start`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartVm {
    /// Node name or id; default: the VM's owner.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub node: Option<String>,
}

/// `PATCH /api/vms/{vm}`: settings of a VM that is off.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmPatch {
    /// Start with the cluster's common CPU baseline (only while the VM is off).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub processor_compatibility: Option<bool>,
}

/// `POST /api/vms/{vm}/move`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveVm {
    /// Node name or id; default: chosen by placement.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub target: Option<String>,
    /// Compare memory digests of source and target in the blackout.
    #[serde(default)]
    pub verify: bool,
    /// This move's downtime limit in place of the cluster's
    /// (`Settings::downtime_limit_ms`); default: the cluster's.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub downtime_limit_ms: Option<u32>,
}

/// `POST /api/vms/{vm}/append`: a client's write to the guest's service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Append {
    pub record: String,
}

/// `POST /api/nodes/{node}/pause`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PauseNode {
    /// Move every running VM off the node (maintenance drain).
    #[serde(default)]
    pub drain: bool,
    /// The drain's moves' downtime limit in place of the cluster's (without
    /// `drain` nothing moves, and it has nothing to limit).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub downtime_limit_ms: Option<u32>,
}

/// `POST /api/nodes/{node}/resume`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeNode {
    /// Move back the VMs the node's drain moved away (failback).
    #[serde(default)]
    pub failback: bool,
}

/// `PATCH /api/networks/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkPatch {
    /// `default`, `allow` or `forbid`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub migration: Option<String>,
    /// A gateway makes the network public; `null` removes it.
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub gateway: Option<Option<String>>,
}

/// `PUT /api/networks/order`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOrder {
    pub order: Vec<String>,
}

/// `PATCH /api/settings`: only the fields present change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsPatch {
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub downtime_limit_ms: Option<u32>,
    /// `null` removes the cap.
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub bandwidth_cap_bytes_per_sec: Option<Option<u64>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_migrations_per_node: Option<u32>,
    /// `off`, `manual` or `automatic`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub pro_tip_mode: Option<String>,
    /// How long a node may go without renewing its lease before the cluster
    /// declares it down and restarts its VMs elsewhere.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub failure_detection_ms: Option<u32>,
}

/// `POST /api/nodes/{node}/down`: an operator declares a node down, so its
/// VMs restart elsewhere (see [`crate::Node::mark_node_down`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarkNodeDown {
    /// Why, for the node's view and the log (at most 200 characters).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub reason: Option<String>,
    /// The operator vouches that the node can run nothing (powered off, its
    /// process killed): it is declared down at once, even if it renewed its
    /// lease recently.
    #[serde(default)]
    pub confirmed_dead: bool,
}

/// `POST /api/nodes/{node}/remove`: remove a node for good and revoke its
/// certificate (see [`crate::Node::remove_node`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveNode {
    /// The node's name again: a guard against removing one by accident.
    pub confirm: String,
}

impl Request for CreateVm {
    const SCHEMA: &'static str = "CreateVm";

    fn validate(&self) -> Result<(), ApiError> {
        check_name("VM", &self.name)?;
        in_range("memory_mib", &self.memory_mib, &MEMORY_MIB)?;
        in_range("vcpus", &self.vcpus, &VCPUS)?;
        in_range(
            "dirty_pages_per_sec",
            &self.dirty_pages_per_sec,
            &DIRTY_PAGES_PER_SEC,
        )?;
        in_range("tcp_connections", &self.tcp_connections, &TCP_CONNECTIONS)?;
        in_range("priority", &self.priority, &PRIORITY)?;
        one_of("pattern", self.pattern.as_deref(), PATTERNS)?;
        one_of("storage", self.storage.as_deref(), STORAGES)?;
        one_of("backend", self.backend.as_deref(), BACKENDS)
    }
}

impl Request for StartVm {
    const SCHEMA: &'static str = "StartVm";
}

impl Request for VmPatch {
    const SCHEMA: &'static str = "VmPatch";
}

impl Request for MoveVm {
    const SCHEMA: &'static str = "MoveVm";

    fn validate(&self) -> Result<(), ApiError> {
        if let Some(d) = &self.downtime_limit_ms {
            in_range("downtime_limit_ms", d, &DOWNTIME_LIMIT_MS)?;
        }
        Ok(())
    }
}

impl Request for Append {
    const SCHEMA: &'static str = "Append";

    fn validate(&self) -> Result<(), ApiError> {
        let chars = self.record.chars().count();
        if chars > RECORD_MAX_CHARS {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("record has {chars} characters, more than {RECORD_MAX_CHARS}"),
            ));
        }
        Ok(())
    }
}

impl Request for PauseNode {
    const SCHEMA: &'static str = "PauseNode";

    fn validate(&self) -> Result<(), ApiError> {
        if let Some(d) = &self.downtime_limit_ms {
            in_range("downtime_limit_ms", d, &DOWNTIME_LIMIT_MS)?;
        }
        Ok(())
    }
}

impl Request for ResumeNode {
    const SCHEMA: &'static str = "ResumeNode";
}

impl Request for NetworkPatch {
    const SCHEMA: &'static str = "NetworkPatch";

    fn validate(&self) -> Result<(), ApiError> {
        one_of("migration", self.migration.as_deref(), MIGRATION_USES)?;
        if let Some(Some(g)) = &self.gateway {
            if g.parse::<std::net::IpAddr>().is_err() {
                return Err(ApiError::bad_request(
                    "invalid_value",
                    format!("gateway {g:?} is not an IPv4 or IPv6 address"),
                ));
            }
        }
        Ok(())
    }
}

impl Request for NetworkOrder {
    const SCHEMA: &'static str = "NetworkOrder";
}

impl Request for SettingsPatch {
    const SCHEMA: &'static str = "SettingsPatch";

    fn validate(&self) -> Result<(), ApiError> {
        if let Some(d) = &self.downtime_limit_ms {
            in_range("downtime_limit_ms", d, &DOWNTIME_LIMIT_MS)?;
        }
        if let Some(Some(b)) = &self.bandwidth_cap_bytes_per_sec {
            in_range(
                "bandwidth_cap_bytes_per_sec",
                b,
                &BANDWIDTH_CAP_BYTES_PER_SEC,
            )?;
        }
        if let Some(m) = &self.max_migrations_per_node {
            in_range("max_migrations_per_node", m, &MAX_MIGRATIONS_PER_NODE)?;
        }
        if let Some(f) = &self.failure_detection_ms {
            in_range("failure_detection_ms", f, &FAILURE_DETECTION_MS)?;
        }
        one_of("pro_tip_mode", self.pro_tip_mode.as_deref(), TIP_MODES)
    }
}

impl Request for RemoveNode {
    const SCHEMA: &'static str = "RemoveNode";

    fn validate(&self) -> Result<(), ApiError> {
        check_name("node", &self.confirm)
    }
}

impl Request for MarkNodeDown {
    const SCHEMA: &'static str = "MarkNodeDown";

    fn validate(&self) -> Result<(), ApiError> {
        let chars = self.reason.as_deref().map_or(0, |r| r.chars().count());
        if chars > REASON_MAX_CHARS {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("reason has {chars} characters, more than {REASON_MAX_CHARS}"),
            ));
        }
        Ok(())
    }
}

/// The body of operations that take none (stop, cancel, a tip's accept or
/// dismiss): nothing, or `{}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

impl Request for Empty {
    const SCHEMA: &'static str = "Empty";
}

/// An optional field: missing → `None` (the default); a value → `Some(v)`;
/// `null` is refused (the document does not declare it nullable: leave the
/// field out instead).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// Missing → `None`; `null` → `Some(None)`; a value → `Some(Some(v))`.
fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Names of VMs (and what the API accepts as one): 1–63 characters of
/// letters, digits, `.`, `_` and `-`, starting with a letter or digit.
pub fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX_LEN
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_name",
            format!(
                "invalid {what} name {name:?}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn patches_tell_null_from_missing() {
        let p: SettingsPatch =
            serde_json::from_str(r#"{"bandwidth_cap_bytes_per_sec": null}"#).unwrap();
        assert_eq!(p.bandwidth_cap_bytes_per_sec, Some(None));
        let p: SettingsPatch = serde_json::from_str("{}").unwrap();
        assert_eq!(p.bandwidth_cap_bytes_per_sec, None);
        assert!(serde_json::from_str::<SettingsPatch>(r#"{"downtime": 3}"#).is_err());
        // An optional field is a value or absent; null is refused, and what
        // the CLI sends leaves absent fields out.
        assert!(serde_json::from_str::<MoveVm>(r#"{"target": null}"#).is_err());
        let sent = serde_json::to_value(CreateVm::new("web-1")).unwrap();
        assert!(sent.get("node").is_none() && sent.get("pattern").is_none());
        let c: CreateVm = serde_json::from_str(r#"{"name": "web-1"}"#).unwrap();
        assert!(c.start && c.memory_mib == 64);
        assert!(c.restart && c.priority == 0);
        assert_eq!(c, CreateVm::new("web-1"));
        assert!(check_name("VM", "web-1").is_ok());
        assert!(check_name("VM", "-x").is_err());
        assert!(check_name("VM", "a b").is_err());
    }
}
