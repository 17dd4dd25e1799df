//! Raft's network: RPCs between members, and client requests forwarded to the leader.
//!
//! The cluster store talks to its peers through [`ClusterTransport`], a small trait with the
//! shape of `ferry_transport::RpcNode` (request/response calls to a named service on a peer).
//! [`quic`] implements it over the real mutual-TLS QUIC transport; [`memory`] implements it
//! in-process for fast tests of the Raft wiring.
//!
//! Two services are registered on every node:
//! - `"raft"`: AppendEntries, Vote and InstallSnapshot, answered by the local Raft;
//! - `"cluster"`: client requests a follower forwards to the leader (writes, read-index,
//!   membership changes).
//!
//! Messages are defined in [`protocol`].

pub mod memory;
pub mod protocol;
pub mod quic;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use self::protocol::{RaftReply, RaftRequest};
use crate::model::NodeId;
use crate::raft_types::{Member, Raft, TypeConfig};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The service name of Raft's own RPCs.
pub const RAFT_SERVICE: &str = "raft";
/// The service name of client requests forwarded to the leader.
pub const CLUSTER_SERVICE: &str = "cluster";

/// Answers requests to one service. `from` is the authenticated peer.
pub trait ServiceHandler: Send + Sync + 'static {
    fn handle(&self, from: NodeId, request: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, String>>;
}

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The peer could not be reached (no connection, connection lost, endpoint closed).
    #[error("peer {peer} unreachable: {reason}")]
    Unreachable { peer: NodeId, reason: String },
    /// No answer within the timeout.
    #[error("call to peer {peer} timed out after {timeout:?}")]
    Timeout { peer: NodeId, timeout: Duration },
    /// The peer answered with an error (unknown service, handler failure).
    #[error("peer {peer} failed the request: {reason}")]
    Remote { peer: NodeId, reason: String },
}

/// Request/response messaging between cluster nodes.
pub trait ClusterTransport: Send + Sync + 'static {
    /// Send `request` to `service` on `peer` (at any of `addrs`) and wait for the answer.
    fn call<'a>(
        &'a self,
        peer: NodeId,
        addrs: &'a [SocketAddr],
        service: &'static str,
        request: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<u8>, CallError>>;

    /// Answer requests to `service` with `handler` (replacing any earlier handler).
    fn register(&self, service: &'static str, handler: Arc<dyn ServiceHandler>);

    /// Close the endpoint: peers see this node gone.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}

/// Makes a [`PeerClient`] per Raft peer.
pub struct NetworkFactory {
    transport: Arc<dyn ClusterTransport>,
}

impl NetworkFactory {
    pub fn new(transport: Arc<dyn ClusterTransport>) -> Self {
        NetworkFactory { transport }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerClient {
        PeerClient {
            transport: self.transport.clone(),
            target,
            addrs: node.addrs.clone(),
        }
    }
}

/// Sends Raft RPCs to one peer.
pub struct PeerClient {
    transport: Arc<dyn ClusterTransport>,
    target: NodeId,
    addrs: Vec<SocketAddr>,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, Member, RaftError<NodeId, E>>;

impl PeerClient {
    /// Map a failed call: an unreachable peer makes openraft back off before retrying.
    async fn call<E: std::error::Error>(
        &self,
        req: RaftRequest,
        option: &RPCOption,
    ) -> Result<RaftReply, RpcErr<E>> {
        let bytes = protocol::encode(&req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let reply = match self
            .transport
            .call(
                self.target,
                &self.addrs,
                RAFT_SERVICE,
                bytes,
                option.hard_ttl(),
            )
            .await
        {
            Ok(r) => r,
            Err(e @ CallError::Unreachable { .. }) => {
                return Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(e) => return Err(RPCError::Network(NetworkError::new(&e))),
        };
        protocol::decode(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }

    fn unexpected<E: std::error::Error>(&self) -> RpcErr<E> {
        let e = protocol::ProtocolError::Unexpected("reply of the wrong kind");
        RPCError::Network(NetworkError::new(&e))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        match self.call(RaftRequest::AppendEntries(rpc), &option).await? {
            RaftReply::AppendEntries(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(self.unexpected()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        match self
            .call(RaftRequest::InstallSnapshot(rpc), &option)
            .await?
        {
            RaftReply::InstallSnapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(self.unexpected()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        match self.call(RaftRequest::Vote(rpc), &option).await? {
            RaftReply::Vote(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(self.unexpected()),
        }
    }

    fn backoff(&self) -> Backoff {
        // A peer that is down is retried often enough to notice its return within a few
        // heartbeats, but not in a busy loop.
        Backoff::new(std::iter::repeat(Duration::from_millis(100)))
    }
}

/// Answers `"raft"` requests with the local Raft.
pub(crate) struct RaftService {
    pub(crate) raft: Raft,
}

/// Largest snapshot a node takes from a leader: the cluster's state is
/// kilobytes to a few megabytes. openraft writes a chunk at the offset it
/// names, so an unchecked offset of a terabyte would grow the buffer to match.
pub const MAX_SNAPSHOT_BYTES: u64 = 256 << 20;

/// Whether a Raft message from transport-verified node `from`, claiming to come
/// from `claimed` (the vote's leader or candidate), may reach the local Raft
/// whose membership names `members`: a member speaks only for itself, and a
/// node that is not a member (a removed one, whose certificate the CA once
/// signed) is not heard at all. A node with no membership yet (joining, before
/// its first log entries) hears anyone: its leader is how it learns one.
pub fn caller_allowed(
    from: NodeId,
    claimed: Option<NodeId>,
    members: &[NodeId],
) -> Result<(), String> {
    if claimed != Some(from) {
        return Err(format!(
            "node {from} sent a Raft message on behalf of {}",
            claimed.map_or("nobody".to_string(), |c| format!("node {c}"))
        ));
    }
    if !members.is_empty() && !members.contains(&from) {
        return Err(format!("node {from} is not a member of this cluster"));
    }
    Ok(())
}

/// Whether transport-verified node `from` may forward client requests
/// (writes, reads, membership changes) to a node whose membership (voters and
/// learners) names `members`: only a member may; a node with no membership
/// yet has none to check against.
pub fn forwarder_allowed(from: NodeId, members: &[NodeId]) -> Result<(), String> {
    if !members.is_empty() && !members.contains(&from) {
        return Err(format!(
            "node {from} is not a member of this cluster: it may not write to its store"
        ));
    }
    Ok(())
}

/// The ids in `raft`'s current membership, voters and learners.
pub(crate) fn members_of(raft: &Raft) -> Vec<NodeId> {
    raft.metrics()
        .borrow()
        .membership_config
        .membership()
        .nodes()
        .map(|(id, _)| *id)
        .collect()
}

/// Whether a snapshot chunk at `offset` of `len` bytes stays within
/// [`MAX_SNAPSHOT_BYTES`].
pub fn snapshot_chunk_allowed(offset: u64, len: usize) -> Result<(), String> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= MAX_SNAPSHOT_BYTES => Ok(()),
        _ => Err(format!(
            "snapshot chunk at offset {offset} of {len} bytes goes past the {MAX_SNAPSHOT_BYTES} byte limit"
        )),
    }
}

impl RaftService {
    fn check(&self, from: NodeId, vote: &crate::raft_types::Vote) -> Result<(), String> {
        caller_allowed(from, vote.leader_id().voted_for(), &members_of(&self.raft))
    }
}

impl ServiceHandler for RaftService {
    fn handle(&self, from: NodeId, request: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, String>> {
        Box::pin(async move {
            let req: RaftRequest = protocol::decode(&request).map_err(|e| e.to_string())?;
            let reply = match req {
                RaftRequest::AppendEntries(rpc) => {
                    self.check(from, &rpc.vote)?;
                    RaftReply::AppendEntries(self.raft.append_entries(rpc).await)
                }
                RaftRequest::Vote(rpc) => {
                    self.check(from, &rpc.vote)?;
                    RaftReply::Vote(self.raft.vote(rpc).await)
                }
                RaftRequest::InstallSnapshot(rpc) => {
                    self.check(from, &rpc.vote)?;
                    snapshot_chunk_allowed(rpc.offset, rpc.data.len())?;
                    RaftReply::InstallSnapshot(self.raft.install_snapshot(rpc).await)
                }
            };
            protocol::encode(&reply).map_err(|e| e.to_string())
        })
    }
}

#[cfg(test)]
mod caller_tests {
    use super::*;

    #[test]
    fn a_member_speaks_only_for_itself_and_strangers_are_not_heard() {
        let members = [1, 2, 3];
        assert_eq!(caller_allowed(2, Some(2), &members), Ok(()));
        let forged = caller_allowed(2, Some(3), &members).unwrap_err();
        assert!(forged.contains("on behalf of node 3"), "{forged}");
        let removed = caller_allowed(4, Some(4), &members).unwrap_err();
        assert!(removed.contains("not a member"), "{removed}");
        assert!(caller_allowed(2, None, &members).is_err());
        // A node with no membership yet hears its future leader.
        assert_eq!(caller_allowed(4, Some(4), &[]), Ok(()));
    }

    #[test]
    fn only_members_forward_requests() {
        assert_eq!(forwarder_allowed(2, &[1, 2, 3]), Ok(()));
        let removed = forwarder_allowed(4, &[1, 2, 3]).unwrap_err();
        assert!(removed.contains("not a member"), "{removed}");
        assert_eq!(forwarder_allowed(4, &[]), Ok(()));
    }

    #[test]
    fn snapshot_chunks_stay_under_the_limit() {
        assert_eq!(snapshot_chunk_allowed(0, 1 << 20), Ok(()));
        assert!(snapshot_chunk_allowed(1 << 40, 10).is_err());
        assert!(snapshot_chunk_allowed(u64::MAX, 10).is_err());
        assert!(snapshot_chunk_allowed(MAX_SNAPSHOT_BYTES, 1).is_err());
    }
}
