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

/// Version of this exchange; a node refuses any other. 2: a move and a
/// drain carry their own downtime limit.
pub const VERSION: u32 = 3;

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
