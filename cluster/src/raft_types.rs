//! The types openraft is instantiated with, and the envelope a command travels in.
//!
//! A [`Proposal`] wraps a [`Command`] with a [`RequestId`] unique to the proposing client, so
//! that a write retried after an uncertain outcome (the leader died before answering, a
//! forward timed out) is applied once: the state machine remembers the results of recent
//! requests and answers a repeat with the first result.

use std::io::Cursor;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::command::{ApplyResult, Command};
use crate::model::NodeId;

/// How a Raft member is reached: the transport addresses of its RPC endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub addrs: Vec<SocketAddr>,
}

/// Identifies one client request across retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId {
    /// The node whose client proposed it.
    pub origin: NodeId,
    /// A value chosen afresh each time that node starts, so counters never repeat.
    pub session: u64,
    /// Counts the node's requests within the session.
    pub seq: u64,
}

/// What a Raft log entry carries: one command and the id of the request that proposed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub id: RequestId,
    pub command: Command,
}

openraft::declare_raft_types!(
    /// Ferry's openraft configuration.
    pub TypeConfig:
        D = Proposal,
        R = ApplyResult,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log position: (leader term, index).
pub type LogId = openraft::LogId<NodeId>;
/// A Raft vote.
pub type Vote = openraft::Vote<NodeId>;
/// The membership as of some log position.
pub type StoredMembership = openraft::StoredMembership<NodeId, Member>;
/// A snapshot's description.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Member>;
/// Raft's view of itself: term, leader, last log, membership, ...
pub type RaftMetrics = openraft::RaftMetrics<NodeId, Member>;
/// A storage failure as openraft reports it.
pub type StorageError = openraft::StorageError<NodeId>;
