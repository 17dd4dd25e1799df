//! The one error type of Ferry's interfaces: the HTTP API renders it as JSON
//! `{"code": …, "message": …}`, the CLI turns it into an exit code, and the
//! library returns it from every operation.
//!
//! Codes are stable, lower snake case, and meant for programs; the message is
//! for people and may change. A refusal by the cluster store keeps the name of
//! the store's own refusal (`CommandError::VmNotRunning` → `vm_not_running`),
//! so the list of codes grows with the store without a table to keep in step.
//! The codes the interfaces add themselves:
//!
//! | code | HTTP | meaning |
//! |---|---|---|
//! | `unauthorized` | 401 | no token, the wrong one, or a token in the URL outside the event stream |
//! | `https_required` | 400 | plain HTTP to the API's HTTPS port (answered before any handshake, `api_tls.rs`) |
//! | `forbidden` | 403 | the read-only token on a request that writes |
//! | `malformed_json` | 400 | the body is not JSON |
//! | `invalid_request` | 400 | JSON of the wrong shape: not an object, or missing, unknown, mistyped or `null` fields |
//! | `invalid_name` / `invalid_value` | 400 | a field's value is not acceptable |
//! | `payload_too_large` | 413 | a body over 64 KiB |
//! | `not_found` | 404 | no such route |
//! | `method_not_allowed` | 405 | the route exists, not with this method (`Allow` names its methods) |
//! | `unknown_vm`, `unknown_node`, `unknown_network`, `unknown_migration`, `unknown_tip` | 404 | the named thing does not exist |
//! | `no_eligible_target` | 409 | a move without a target found no node to take the VM |
//! | `not_migrating` | 409 | cancel, and no move of that VM is under way |
//! | `node_alive` | 409 | a node marked down renewed its lease within the failure-detection timeout: it may still run its VMs |
//! | `migration_refused` | 409 | the source refused the move before anything was copied |
//! | `start_failed` | 409 | the node could not boot the guest |
//! | `cluster_unavailable` | 503 | no Raft leader answered in time |
//! | `node_unreachable` | 503 | the node that must act could not be reached |
//! | `shutting_down` | 503 | this node is stopping |
//! | `internal` | 500 | a bug or a failed disk; the message says which |

use ferry_cluster::{ClusterError, CommandError};
use serde::{Deserialize, Serialize};

/// An error with a stable code, an HTTP status and a human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} [{code}]")]
pub struct ApiError {
    /// HTTP status the API answers with.
    pub status: u16,
    /// Stable machine-readable code (see the module docs).
    pub code: String,
    /// What went wrong, for a person.
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: code.to_string(),
            message: message.into(),
        }
    }

    pub fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(400, code, message)
    }

    pub fn not_found(code: &str, message: impl Into<String>) -> Self {
        Self::new(404, code, message)
    }

    pub fn conflict(code: &str, message: impl Into<String>) -> Self {
        Self::new(409, code, message)
    }

    pub fn unavailable(code: &str, message: impl Into<String>) -> Self {
        Self::new(503, code, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "internal", message)
    }

    pub fn unknown_vm(vm: &str) -> Self {
        Self::not_found("unknown_vm", format!("unknown VM {vm:?}"))
    }

    /// The JSON body the API sends: `{"code": …, "message": …}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code, "message": self.message })
    }
}

/// `VmNotRunning` → `vm_not_running`.
pub fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The variant name of a store refusal, as a code.
pub fn command_error_code(e: &CommandError) -> String {
    let name = match serde_json::to_value(e) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(serde_json::Value::Object(map)) => map.keys().next().cloned().unwrap_or_default(),
        _ => String::new(),
    };
    if name.is_empty() {
        "refused".into()
    } else {
        snake_case(&name)
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        let code = command_error_code(&e);
        let status = match e {
            CommandError::UnknownNode { .. }
            | CommandError::UnknownNetwork { .. }
            | CommandError::UnknownVm { .. }
            | CommandError::UnknownMigration { .. }
            | CommandError::UnknownTip { .. } => 404,
            CommandError::InvalidName { .. }
            | CommandError::InvalidValue { .. }
            | CommandError::InvalidSubnet { .. } => 400,
            _ => 409,
        };
        ApiError {
            status,
            code,
            message: e.to_string(),
        }
    }
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::Rejected(c) => c.into(),
            ClusterError::Unavailable(why) => {
                ApiError::unavailable("cluster_unavailable", format!("cluster unavailable: {why}"))
            }
            ClusterError::Shutdown => {
                ApiError::unavailable("shutting_down", "this node is shutting down")
            }
            other => ApiError::internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_refusals_keep_their_variant_name_as_code() {
        let e: ApiError = CommandError::UnknownVm { vm: "x".into() }.into();
        assert_eq!((e.status, e.code.as_str()), (404, "unknown_vm"));
        let e: ApiError = CommandError::ProTipsDisabled.into();
        assert_eq!((e.status, e.code.as_str()), (409, "pro_tips_disabled"));
        let e: ApiError = CommandError::NoMigrationNetworkLeft { name: "a".into() }.into();
        assert_eq!(e.code, "no_migration_network_left");
        let e: ApiError = ClusterError::Unavailable("no leader".into()).into();
        assert_eq!((e.status, e.code.as_str()), (503, "cluster_unavailable"));
    }
}
