//! The control exchange between Ferry nodes, in one file: what one node asks
//! another to do on behalf of an API client, and the progress it relays.
//!
//! A VM's guest lives in one process, its owner's; so starting, stopping,
//! moving or cancelling the move of a VM must happen on the owner (or, for a
//! start, on the node chosen to run it). The node that received the API
//! request validates it, then forwards the operation here, over the mutual-TLS
//! transport; the peer's node id comes from its certificate.
//!
//! ```text
//! api node                          owner node
//!   Envelope{version, StartVm}  ──▶  boot the guest, record it in the store
//!   Envelope{version, Move}     ──▶  start the job; answer once the store holds the migration
//!   Envelope{version, Cancel}   ──▶  cancel the job
//!   Envelope{version, Resume}   ──▶  leave maintenance; with failback, bring drained VMs back
//!   Envelope{version, Join}     ──▶  (any member) add the sender as a voter and record it
//!   Envelope{version, Relay}    ──▷  one-way: a progress event or report of a local job
//! ```

use crate::error::ApiError;
use crate::views::{FailbackView, ProgressView, ReportView};
use ferry_cluster::model::{Capacity, MigrationTrigger};
use ferry_cluster::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

/// RPC service name of this exchange.
pub const SERVICE: &str = "ferry-control";

/// Version of this exchange that a node sends. 2: a move and a drain carry
/// their own downtime limit. 3: a stop carries the epoch it means.
pub const VERSION: u32 = 3;
/// The oldest version a node still serves; it refuses the others by version,
/// before reading the rest. Version 2 is not read back: its stop carried no
/// epoch, and a stop without one could land on the VM after a switchover. The
/// next change of this exchange keeps version 3's decoder and raises this to 3
/// at most (ARCHITECTURE.md, *Upgrades*).
pub const MIN_VERSION: u32 = 3;

/// Whether a node serves an envelope of `version`.
pub fn supported(version: u32) -> bool {
    (MIN_VERSION..=VERSION).contains(&version)
}

/// The versions a node serves, for messages: "3", or "3 to 4".
pub fn versions_served() -> String {
    if MIN_VERSION == VERSION {
        VERSION.to_string()
    } else {
        format!("{MIN_VERSION} to {VERSION}")
    }
}

/// The version an encoded [`Envelope`] claims, read before anything after it
/// (`None`: not even that much is there).
pub fn envelope_version(bytes: &[u8]) -> Option<u32> {
    ferry_transport::codec::decode_standard::<u32>(bytes, 16)
        .ok()
        .map(|(v, _)| v)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u32,
    pub request: PeerRequest,
}

/// What a joining node tells the cluster about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinInfo {
    pub id: NodeId,
    pub name: String,
    /// Its transport addresses, for the Raft membership.
    pub rpc: Vec<SocketAddr>,
    /// Its address per network, for the cluster model.
    pub addresses: BTreeMap<String, IpAddr>,
    pub cpu_features: BTreeSet<String>,
    pub capacity: Capacity,
    pub tcp_offload: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerRequest {
    Join(JoinInfo),
    StartVm {
        vm: String,
    },
    /// Stop the VM as it was at `epoch` (what the caller saw): a stop that
    /// crosses a switchover or a restart is refused, not applied to the VM
    /// where it runs now.
    StopVm {
        vm: String,
        epoch: u64,
    },
    Move {
        vm: String,
        target: NodeId,
        trigger: MigrationTrigger,
        verify: bool,
        /// The move's own downtime limit; `None`: the cluster's.
        downtime_limit_ms: Option<u32>,
    },
    Cancel {
        vm: String,
    },
    /// Take the receiving node out of maintenance, with failback if asked.
    Resume {
        failback: bool,
    },
    Relay(Relayed),
    /// Pause the receiving node and drain it, each move under this downtime
    /// limit (a drain under the cluster's limit is only a store write).
    Drain {
        downtime_limit_ms: u32,
    },
}

/// Events a node relays to its peers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Relayed {
    Progress(ProgressView),
    Report(ReportView),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerReply {
    Joined,
    Started { epoch: u64 },
    Stopped,
    MoveBegun { migration: u64 },
    Cancelled,
    Resumed(FailbackView),
    Relayed,
    DrainBegun,
}

/// The answer on the wire.
pub type PeerResult = Result<PeerReply, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_read_before_the_request() {
        for version in [VERSION, 2, 7, 300, u32::MAX] {
            let bytes = ferry_transport::encode(&Envelope {
                version,
                request: PeerRequest::StartVm { vm: "web".into() },
            });
            assert_eq!(envelope_version(&bytes), Some(version));
            // Whatever follows the version, it is judged first.
            assert_eq!(envelope_version(&bytes[..bytes.len() - 3]), Some(version));
        }
        assert_eq!(envelope_version(&[]), None);
        assert!(supported(VERSION) && supported(MIN_VERSION));
        assert!(!supported(MIN_VERSION - 1) && !supported(VERSION + 1));
    }
}
