//! [`ClusterNode`]: one node's handle on the cluster store — start it, write commands, read
//! the state, watch what gets applied, change the membership, stop it.
//!
//! Callers do not care who leads: a write (or a linearizable read, or a membership change) on
//! a follower is forwarded to the leader over the `"cluster"` service, and retried across
//! leader changes until it succeeds or the write timeout passes. Each write carries a request
//! id the state machine remembers, so a retry after an uncertain outcome is applied once.
//! After a write returns, this node's own [`ClusterNode::read`] already reflects it (the
//! write waits, within its timeout, for the local replica to apply the entry).

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{ChangeMembers, SnapshotPolicy};
use tokio::sync::broadcast;

use crate::command::{Command, CommandError, Response};
use crate::model::{ClusterState, NodeId};
use crate::network::protocol::{self, ClientReply, ClientRequest};
use crate::network::{
    BoxFuture, ClusterTransport, NetworkFactory, RaftService, ServiceHandler, CLUSTER_SERVICE,
    RAFT_SERVICE,
};
use crate::raft_types::{Member, Proposal, Raft, RaftMetrics, RequestId};
use crate::store::{Applied, ClosedSignal, Db, LogStore, SmShared, StateMachineStore, StoreStats};

/// Raft's timing. The defaults suit a LAN: a leader's death is noticed within 150–300 ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftTiming {
    /// How often the leader sends heartbeats (also the timeout of one AppendEntries RPC).
    pub heartbeat: Duration,
    /// A follower that hears no leader for a random time in `[election_min, election_max)`
    /// starts an election.
    pub election_min: Duration,
    pub election_max: Duration,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming {
            heartbeat: Duration::from_millis(50),
            election_min: Duration::from_millis(150),
            election_max: Duration::from_millis(300),
        }
    }
}

/// When snapshots are taken and how much log is kept behind them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSettings {
    /// Take a snapshot after this many entries since the last one.
    pub every_entries: u64,
    /// Keep this many entries before the snapshot, so a briefly lagging follower catches up
    /// from the log rather than a snapshot.
    pub keep_entries: u64,
}

impl Default for SnapshotSettings {
    fn default() -> Self {
        SnapshotSettings {
            every_entries: 2000,
            keep_entries: 500,
        }
    }
}

/// Everything a node needs to start.
#[derive(Clone)]
pub struct ClusterNodeConfig {
    pub node_id: NodeId,
    /// Where the log, the vote and snapshots live; created if missing.
    pub data_dir: PathBuf,
    /// How this node reaches its peers (the QUIC `RpcNode` in production).
    pub transport: Arc<dyn ClusterTransport>,
    /// The addresses peers reach this node's transport at; recorded in the membership.
    pub advertise: Vec<SocketAddr>,
    pub timing: RaftTiming,
    pub snapshot: SnapshotSettings,
    /// How long a write (or linearizable read, or membership change) keeps trying to find a
    /// leader before it reports the cluster unavailable.
    pub write_timeout: Duration,
    /// How many applied changes a subscriber may fall behind by before it sees `Lagged`.
    pub events_capacity: usize,
}

impl ClusterNodeConfig {
    /// A configuration for a node on the QUIC transport, advertising the transport's bound
    /// addresses.
    pub fn with_rpc(
        node_id: NodeId,
        data_dir: impl Into<PathBuf>,
        rpc: Arc<ferry_transport::RpcNode>,
    ) -> Self {
        let advertise = rpc.local_addrs();
        Self::new(node_id, data_dir, rpc, advertise)
    }

    /// A configuration with the default timing and snapshot policy.
    pub fn new(
        node_id: NodeId,
        data_dir: impl Into<PathBuf>,
        transport: Arc<dyn ClusterTransport>,
        advertise: Vec<SocketAddr>,
    ) -> Self {
        ClusterNodeConfig {
            node_id,
            data_dir: data_dir.into(),
            transport,
            advertise,
            timing: RaftTiming::default(),
            snapshot: SnapshotSettings::default(),
            write_timeout: Duration::from_secs(5),
            events_capacity: 4096,
        }
    }
}

/// Why a cluster operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// The command was committed and refused by the state machine; nothing changed.
    #[error("command refused: {0}")]
    Rejected(#[from] CommandError),
    /// No leader could serve the request in time (no quorum, election under way, partition).
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    /// A membership change was refused (for example another one is in progress).
    #[error("membership change failed: {0}")]
    Membership(String),
    /// The node's store failed.
    #[error("storage failed: {0}")]
    Storage(String),
    /// Raft could not start or stopped with an error.
    #[error("raft failed: {0}")]
    Raft(String),
    /// This node was shut down.
    #[error("this cluster node is shut down")]
    Shutdown,
}

impl From<std::io::Error> for ClusterError {
    fn from(e: std::io::Error) -> Self {
        ClusterError::Storage(e.to_string())
    }
}

struct Inner {
    id: NodeId,
    raft: Raft,
    sm: Arc<SmShared>,
    transport: Arc<dyn ClusterTransport>,
    advertise: Vec<SocketAddr>,
    write_timeout: Duration,
    session: u64,
    seq: AtomicU64,
    stopped: AtomicBool,
    db_closed: ClosedSignal,
}

/// One node of the cluster store. Cheap to clone; all clones drive the same node.
#[derive(Clone)]
pub struct ClusterNode {
    inner: Arc<Inner>,
}

/// The pause between retries while no leader is known.
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// The largest encoded command accepted; with at most 128 entries per
/// AppendEntries this keeps every Raft message far below the transport's frame limit.
pub const MAX_COMMAND_BYTES: usize = 64 << 10;
const MAX_PAYLOAD_ENTRIES: u64 = 128;

/// The longest a single forwarded request waits before it is retried.
const FORWARD_ATTEMPT: Duration = Duration::from_secs(2);

impl ClusterNode {
    /// Open the node's store in `config.data_dir` and start Raft. A node with state on disk
    /// resumes where it stopped; a fresh node waits to be initialized or added by a leader.
    pub async fn start(config: ClusterNodeConfig) -> Result<ClusterNode, ClusterError> {
        let db = Db::open(&config.data_dir)?;
        let db_closed = db.closed_signal();
        let log = LogStore::new(db.clone());
        let sm = StateMachineStore::open(db, config.events_capacity)?;
        let shared = sm.shared();

        let raft_config = openraft::Config {
            cluster_name: "ferry".into(),
            heartbeat_interval: millis(config.timing.heartbeat),
            election_timeout_min: millis(config.timing.election_min),
            election_timeout_max: millis(config.timing.election_max),
            install_snapshot_timeout: 2000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot.every_entries),
            max_in_snapshot_log_to_keep: config.snapshot.keep_entries,
            snapshot_max_chunk_size: 1 << 20,
            max_payload_entries: MAX_PAYLOAD_ENTRIES,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ClusterError::Raft(e.to_string()))?;

        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            NetworkFactory::new(config.transport.clone()),
            log,
            sm,
        )
        .await
        .map_err(|e| ClusterError::Raft(e.to_string()))?;

        config
            .transport
            .register(RAFT_SERVICE, Arc::new(RaftService { raft: raft.clone() }));
        config.transport.register(
            CLUSTER_SERVICE,
            Arc::new(ClientService { raft: raft.clone() }),
        );

        let session = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Ok(ClusterNode {
            inner: Arc::new(Inner {
                id: config.node_id,
                raft,
                sm: shared,
                transport: config.transport,
                advertise: config.advertise,
                write_timeout: config.write_timeout,
                session,
                seq: AtomicU64::new(0),
                stopped: AtomicBool::new(false),
                db_closed,
            }),
        })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// Bootstrap a new cluster with this node as its only member. Does nothing on a node
    /// that already belongs to a cluster.
    pub async fn initialize(&self) -> Result<(), ClusterError> {
        let members = BTreeMap::from([(
            self.inner.id,
            Member {
                addrs: self.inner.advertise.clone(),
            },
        )]);
        match self.inner.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(ClusterError::Raft(e.to_string())),
        }
    }

    /// Add a node to the cluster: first as a learner, which catches up with the log, then as
    /// a voter. Works from any member.
    pub async fn add_voter(&self, id: NodeId, addrs: Vec<SocketAddr>) -> Result<(), ClusterError> {
        self.membership(ClientRequest::AddVoter {
            id,
            member: Member { addrs },
        })
        .await
    }

    /// Add a node as a learner only: it receives the log but does not vote.
    pub async fn add_learner(
        &self,
        id: NodeId,
        addrs: Vec<SocketAddr>,
    ) -> Result<(), ClusterError> {
        self.membership(ClientRequest::AddLearner {
            id,
            member: Member { addrs },
        })
        .await
    }

    /// Remove a node (voter or learner) from the cluster.
    pub async fn remove_member(&self, id: NodeId) -> Result<(), ClusterError> {
        self.membership(ClientRequest::Remove { id }).await
    }

    /// Propose a command and wait for its result. Forwarded to the leader if need be; when
    /// it returns `Ok`, this node's [`read`](Self::read) already shows the change.
    pub async fn write(&self, command: Command) -> Result<Response, ClusterError> {
        self.write_within(command, self.inner.write_timeout).await
    }

    /// [`write`](Self::write) with its own bound on waiting for a leader.
    pub async fn write_within(
        &self,
        command: Command,
        timeout: Duration,
    ) -> Result<Response, ClusterError> {
        let proposal = Proposal {
            id: RequestId {
                origin: self.inner.id,
                session: self.inner.session,
                seq: self.inner.seq.fetch_add(1, Ordering::Relaxed),
            },
            command,
        };
        let size = protocol::encode(&proposal)
            .map_err(|e| ClusterError::Raft(e.to_string()))?
            .len();
        if size > MAX_COMMAND_BYTES {
            return Err(ClusterError::Rejected(CommandError::InvalidValue {
                field: "command".into(),
                reason: format!("{size} bytes encoded, more than {MAX_COMMAND_BYTES}"),
            }));
        }
        let deadline = Instant::now() + timeout;
        match self
            .until_served(deadline, ClientRequest::Write(proposal))
            .await?
        {
            (ClientReply::Written { index, result }, _) => {
                self.wait_applied(index, deadline).await;
                result.map_err(ClusterError::Rejected)
            }
            (other, _) => Err(unexpected(other)),
        }
    }

    /// The state as this node has applied it (may trail the leader by a moment).
    pub fn read(&self) -> Arc<ClusterState> {
        self.inner.sm.state()
    }

    /// The state including every write committed before this call (confirms the leader with
    /// a quorum, then waits for this node to apply up to the leader's commit index).
    pub async fn read_linearizable(&self) -> Result<Arc<ClusterState>, ClusterError> {
        self.read_linearizable_within(self.inner.write_timeout)
            .await
    }

    /// [`read_linearizable`](Self::read_linearizable) with its own bound.
    pub async fn read_linearizable_within(
        &self,
        timeout: Duration,
    ) -> Result<Arc<ClusterState>, ClusterError> {
        let deadline = Instant::now() + timeout;
        match self
            .until_served(deadline, ClientRequest::ReadIndex)
            .await?
        {
            (ClientReply::ReadIndex { index }, _) => {
                if let Some(index) = index {
                    if !self.wait_applied(index, deadline).await {
                        return Err(ClusterError::Unavailable(format!(
                            "did not apply up to index {index} in time"
                        )));
                    }
                }
                Ok(self.read())
            }
            (other, _) => Err(unexpected(other)),
        }
    }

    /// Every change applied from now on, in log order. A subscriber that falls more than
    /// `events_capacity` changes behind gets `RecvError::Lagged` and should re-read the state.
    pub fn subscribe(&self) -> broadcast::Receiver<Applied> {
        self.inner.sm.subscribe()
    }

    /// The index of the last log entry this node applied.
    pub fn applied_index(&self) -> Option<u64> {
        self.inner
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map(|l| l.index)
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.inner.raft.metrics().borrow().current_leader
    }

    /// Raft's metrics: term, leader, last log and applied index, membership, snapshot.
    pub fn metrics(&self) -> RaftMetrics {
        self.inner.raft.metrics().borrow().clone()
    }

    /// A watch on Raft's metrics, to wait for a condition without polling.
    pub fn metrics_watch(&self) -> tokio::sync::watch::Receiver<RaftMetrics> {
        self.inner.raft.metrics()
    }

    /// Counters of the store (snapshots built and installed, commands applied).
    pub fn stats(&self) -> StoreStats {
        self.inner.sm.stats()
    }

    /// The underlying Raft handle, for what this API does not cover.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// Stop the node as a crash would look to its peers: Raft stops, the transport closes.
    /// Returns once the store is closed, so the data directory can be reopened at once.
    pub async fn shutdown(&self) -> Result<(), ClusterError> {
        if self.inner.stopped.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let stopped = self.inner.raft.shutdown().await;
        self.inner.transport.shutdown().await;
        // The store closes when Raft's tasks have dropped their handles.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.inner.db_closed.is_closed() {
            if Instant::now() > deadline {
                return Err(ClusterError::Storage(
                    "store did not close within 10 s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stopped.map_err(|e| ClusterError::Raft(e.to_string()))
    }

    async fn membership(&self, request: ClientRequest) -> Result<(), ClusterError> {
        let deadline = Instant::now() + self.inner.write_timeout;
        match self.until_served(deadline, request).await? {
            (ClientReply::MembershipChanged { index }, _) => {
                self.wait_applied(index, deadline).await;
                Ok(())
            }
            (other, _) => Err(unexpected(other)),
        }
    }

    /// Wait (until `deadline`) for this node to apply `index`; whether it did.
    async fn wait_applied(&self, index: u64, deadline: Instant) -> bool {
        let timeout = deadline.saturating_duration_since(Instant::now());
        self.inner
            .raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "read your writes")
            .await
            .is_ok()
    }

    /// Send `request` to the leader (this node or another) until it is served or refused
    /// for good, or `deadline` passes. Returns the reply and the node that served it.
    async fn until_served(
        &self,
        deadline: Instant,
        request: ClientRequest,
    ) -> Result<(ClientReply, NodeId), ClusterError> {
        let bytes = protocol::encode(&request).map_err(|e| ClusterError::Raft(e.to_string()))?;
        let mut metrics = self.inner.raft.metrics();
        let mut last_problem = String::from("no leader elected");
        loop {
            if self.inner.stopped.load(Ordering::SeqCst) {
                return Err(ClusterError::Shutdown);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClusterError::Unavailable(last_problem));
            }
            let (leader, addrs) = {
                let m = metrics.borrow_and_update();
                let leader = m.current_leader;
                let addrs = leader
                    .and_then(|l| m.membership_config.membership().get_node(&l).cloned())
                    .map(|n| n.addrs)
                    .unwrap_or_default();
                (leader, addrs)
            };
            let reply = match leader {
                None => None,
                Some(l) if l == self.inner.id => {
                    let served = serve(&self.inner.raft, clone_request(&request));
                    match tokio::time::timeout(deadline - now, served).await {
                        Ok(reply) => Some(reply),
                        Err(_) => Some(ClientReply::Unavailable(
                            "leader did not commit in time".into(),
                        )),
                    }
                }
                Some(l) => {
                    let attempt = (deadline - now).min(FORWARD_ATTEMPT);
                    let call = self.inner.transport.call(
                        l,
                        &addrs,
                        CLUSTER_SERVICE,
                        bytes.clone(),
                        attempt,
                    );
                    // Give up on this leader as soon as Raft learns of another.
                    let changed = metrics.wait_for(|m| m.current_leader != Some(l));
                    tokio::select! {
                        r = call => Some(match r {
                            Ok(b) => protocol::decode::<ClientReply>(&b)
                                .unwrap_or_else(|e| ClientReply::Unavailable(e.to_string())),
                            Err(e) => ClientReply::Unavailable(e.to_string()),
                        }),
                        _ = changed => None,
                    }
                }
            };
            match reply {
                Some(ClientReply::NotLeader { leader }) => {
                    last_problem = format!("leader moved (to {leader:?})");
                }
                Some(ClientReply::Unavailable(why)) => last_problem = why,
                Some(ClientReply::Failed(why)) => return Err(ClusterError::Membership(why)),
                Some(reply) => return Ok((reply, leader.unwrap_or_default())),
                None => {}
            }
            // Wait for news of a leader, briefly.
            let pause = deadline
                .saturating_duration_since(Instant::now())
                .min(RETRY_PAUSE);
            let _ = tokio::time::timeout(pause, metrics.changed()).await;
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn unexpected(reply: ClientReply) -> ClusterError {
    ClusterError::Raft(format!("unexpected reply {reply:?}"))
}

fn clone_request(r: &ClientRequest) -> ClientRequest {
    match r {
        ClientRequest::Write(p) => ClientRequest::Write(p.clone()),
        ClientRequest::ReadIndex => ClientRequest::ReadIndex,
        ClientRequest::AddVoter { id, member } => ClientRequest::AddVoter {
            id: *id,
            member: member.clone(),
        },
        ClientRequest::AddLearner { id, member } => ClientRequest::AddLearner {
            id: *id,
            member: member.clone(),
        },
        ClientRequest::Remove { id } => ClientRequest::Remove { id: *id },
    }
}

/// Serve a client request on this node, as the leader (or answer who is).
async fn serve(raft: &Raft, request: ClientRequest) -> ClientReply {
    match request {
        ClientRequest::Write(proposal) => match raft.client_write(proposal).await {
            Ok(resp) => ClientReply::Written {
                index: resp.log_id.index,
                result: resp.data,
            },
            Err(e) => write_error(e),
        },
        ClientRequest::ReadIndex => match raft.ensure_linearizable().await {
            Ok(read_log_id) => ClientReply::ReadIndex {
                index: read_log_id.map(|l| l.index),
            },
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                ClientReply::NotLeader {
                    leader: f.leader_id,
                }
            }
            Err(e) => ClientReply::Unavailable(e.to_string()),
        },
        ClientRequest::AddVoter { id, member } => {
            if let Err(e) = raft.add_learner(id, member, true).await {
                return write_error(e);
            }
            change(raft, ChangeMembers::AddVoterIds(BTreeSet::from([id]))).await
        }
        ClientRequest::AddLearner { id, member } => {
            match raft.add_learner(id, member, true).await {
                Ok(resp) => ClientReply::MembershipChanged {
                    index: resp.log_id.index,
                },
                Err(e) => write_error(e),
            }
        }
        ClientRequest::Remove { id } => {
            let is_voter = raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == id);
            let changes = if is_voter {
                ChangeMembers::RemoveVoters(BTreeSet::from([id]))
            } else {
                ChangeMembers::RemoveNodes(BTreeSet::from([id]))
            };
            change(raft, changes).await
        }
    }
}

async fn change(raft: &Raft, changes: ChangeMembers<NodeId, Member>) -> ClientReply {
    match raft.change_membership(changes, false).await {
        Ok(resp) => ClientReply::MembershipChanged {
            index: resp.log_id.index,
        },
        Err(e) => write_error(e),
    }
}

fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, Member>>) -> ClientReply {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ClientReply::NotLeader {
            leader: f.leader_id,
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            ClientReply::Failed(e.to_string())
        }
        // The core stopped or dropped the request (e.g. it lost leadership): the outcome is
        // unknown, and a retry is safe because the request id makes it apply once.
        RaftError::Fatal(f) => ClientReply::Unavailable(f.to_string()),
    }
}

/// Answers `"cluster"` requests forwarded by other nodes.
struct ClientService {
    raft: Raft,
}

impl ServiceHandler for ClientService {
    fn handle(&self, from: NodeId, request: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, String>> {
        Box::pin(async move {
            crate::network::forwarder_allowed(from, &crate::network::members_of(&self.raft))?;
            let request: ClientRequest = protocol::decode(&request).map_err(|e| e.to_string())?;
            let reply = serve(&self.raft, request).await;
            protocol::encode(&reply).map_err(|e| e.to_string())
        })
    }
}
