//! The bodies of the API's write requests, shared by the HTTP API, the CLI
//! and the library. Unknown fields are refused, so a misspelt option is an
//! error, not a silent default.

use serde::{Deserialize, Deserializer, Serialize};

/// `POST /api/vms`: define a simulated VM and (by default) start it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub name: String,
    /// Node name or id; default: the answering node.
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Page writes per second of the guest's workload (0: idle).
    #[serde(default)]
    pub dirty_pages_per_sec: u64,
    /// `uniform`, `hot_set` (80% of writes to 10% of pages) or `sequential`.
    #[serde(default)]
    pub pattern: Option<String>,
    /// `shared` (a cluster-shared volume, the default) or `local` (the disk
    /// moves with the VM).
    #[serde(default)]
    pub storage: Option<String>,
    /// `sim` (a simulated guest, the default) or `kvm` (a real KVM guest; refused
    /// by nodes without usable KVM).
    #[serde(default)]
    pub backend: Option<String>,
    #[serde(default)]
    pub processor_compatibility: bool,
    /// TCP connections the guest holds open from boot (offloaded to the NIC
    /// on nodes that support it).
    #[serde(default)]
    pub tcp_connections: u32,
    #[serde(default = "yes")]
    pub start: bool,
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
        }
    }
}

/// `POST /api/vms/{vm}/start`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartVm {
    /// Node name or id; default: the VM's owner.
    #[serde(default)]
    pub node: Option<String>,
}

/// `PATCH /api/vms/{vm}`: settings of a VM that is off.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmPatch {
    /// Start with the cluster's common CPU baseline (only while the VM is off).
    #[serde(default)]
    pub processor_compatibility: Option<bool>,
}

/// `POST /api/vms/{vm}/move`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveVm {
    /// Node name or id; default: chosen by placement.
    #[serde(default)]
    pub target: Option<String>,
    /// Compare memory digests of source and target in the blackout.
    #[serde(default)]
    pub verify: bool,
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
    #[serde(default)]
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
    #[serde(default)]
    pub downtime_limit_ms: Option<u32>,
    /// `null` removes the cap.
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub bandwidth_cap_bytes_per_sec: Option<Option<u64>>,
    #[serde(default)]
    pub max_migrations_per_node: Option<u32>,
    /// `off`, `manual` or `automatic`.
    #[serde(default)]
    pub pro_tip_mode: Option<String>,
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
pub fn check_name(what: &str, name: &str) -> Result<(), crate::ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
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
        Err(crate::ApiError::bad_request(
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
        let c: CreateVm = serde_json::from_str(r#"{"name": "web-1"}"#).unwrap();
        assert!(c.start && c.memory_mib == 64);
        assert!(check_name("VM", "web-1").is_ok());
        assert!(check_name("VM", "-x").is_err());
        assert!(check_name("VM", "a b").is_err());
    }
}
