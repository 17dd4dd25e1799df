//! Forwarding: an operation that must be carried out by a particular node —
//! joining, starting, stopping, moving or cancelling the move of a VM it owns,
//! draining it under a limit of its own, resuming it from maintenance — travels to that node over the
//! `ferry-control` RPC service (see [`crate::peer`]), and [`Node::serve`]
//! carries it out where it lands. A move answers as soon as the store holds
//! the migration; progress follows on the event stream.

use super::forming::add_node;
use super::{Inner, Node, FORWARD_TIMEOUT};
use crate::error::ApiError;
use crate::events::Event;
use crate::peer::{self, Envelope, PeerReply, PeerRequest, PeerResult, Relayed};
use crate::views::{FailbackView, ReportView};
use ferry_actors::actors::{CancelMove, DrainNode, MoveVm, ResumeNode, StartVm};
use ferry_actors::migration::source::{MigrationError, MovePolicy, MoveRequest};
use ferry_actors::triggers::drain::{DrainOptions, FailbackReport};
use ferry_cluster::model::{ClusterState, MigrationTrigger};
use ferry_cluster::{Command, NodeId};
use ferry_transport::RpcHandler;
use std::future::Future;
use std::pin::Pin;
use std::sync::Weak;
use std::time::{Duration, Instant};

/// How long a start request waits for this node to finish joining (the
/// caller's own deadline is 5 s).
const RECONCILE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

impl Node {
    pub(super) async fn call_peer(
        &self,
        peer: NodeId,
        request: PeerRequest,
        timeout: Duration,
    ) -> Result<PeerReply, ApiError> {
        let addrs = self
            .inner
            .shared
            .directory
            .get(peer)
            .map(|a| a.rpc)
            .unwrap_or_default();
        if addrs.is_empty() {
            return Err(ApiError::unavailable(
                "node_unreachable",
                format!("node {peer} is not in this node's configuration"),
            ));
        }
        let bytes = ferry_transport::encode(&Envelope {
            version: peer::VERSION,
            request,
        });
        let reply = self
            .inner
            .shared
            .rpc
            .call(peer, &addrs, peer::SERVICE, bytes, timeout)
            .await
            .map_err(|e| ApiError::unavailable("node_unreachable", format!("node {peer}: {e}")))?;
        ferry_transport::decode::<PeerResult>(&reply)
            .map_err(|e| ApiError::internal(format!("malformed reply from node {peer}: {e}")))?
    }

    /// Carries out `request` here if `node` is this node, else on `node`.
    pub(super) async fn on_node(
        &self,
        node: NodeId,
        request: PeerRequest,
    ) -> Result<PeerReply, ApiError> {
        if node == self.id() {
            self.serve(self.id(), request).await
        } else {
            self.call_peer(node, request, FORWARD_TIMEOUT).await
        }
    }

    /// The operations peers (and this node) ask of this node.
    pub(super) async fn serve(&self, from: NodeId, request: PeerRequest) -> PeerResult {
        // A stranger's certificate admits it this far only to ask to join
        // (`membership.rs`).
        if from != self.id()
            && !matches!(request, PeerRequest::Join(_))
            && !self.is_member_node(from)
            && !self.members().raft.is_empty()
        {
            return Err(ApiError::new(
                403,
                "not_a_member",
                format!("node {from} is not a member of this cluster: it may only ask to join"),
            ));
        }
        match request {
            PeerRequest::Join(info) => {
                if info.id != from {
                    return Err(ApiError::new(
                        403,
                        "forbidden",
                        format!("node {from} asked to join as node {}", info.id),
                    ));
                }
                self.cluster().add_voter(info.id, info.rpc.clone()).await?;
                add_node(self.cluster(), info)
                    .await
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                Ok(PeerReply::Joined)
            }
            PeerRequest::StartVm { vm } => {
                let mut reconciled = self.inner.reconciled.subscribe();
                let ready = reconciled.wait_for(|r| *r);
                if !matches!(tokio::time::timeout(RECONCILE_WAIT, ready).await, Ok(Ok(_))) {
                    return Err(ApiError::conflict(
                        "node_joining",
                        format!(
                            "node {} is still joining the cluster; try again shortly",
                            self.id()
                        ),
                    ));
                }
                let epoch = self
                    .inner
                    .actor
                    .send(StartVm(vm))
                    .await
                    .map_err(|e| ApiError::internal(format!("node actor: {e}")))?
                    .map_err(|e| ApiError::conflict("start_failed", e))?;
                Ok(PeerReply::Started { epoch })
            }
            PeerRequest::StopVm { vm, epoch } => {
                self.write(Command::StopVm {
                    vm: vm.clone(),
                    epoch: Some(epoch),
                })
                .await?;
                self.inner.shared.release_vm_at(&vm, epoch);
                Ok(PeerReply::Stopped)
            }
            PeerRequest::Move {
                vm,
                target,
                trigger,
                verify,
                downtime_limit_ms,
            } => {
                let policy = MovePolicy::Cluster { downtime_limit_ms };
                let migration = self
                    .begin_move_here(&vm, target, trigger, verify, policy)
                    .await?;
                Ok(PeerReply::MoveBegun { migration })
            }
            PeerRequest::Cancel { vm } => {
                let was = self
                    .inner
                    .actor
                    .send(CancelMove(vm.clone()))
                    .await
                    .map_err(|e| ApiError::internal(format!("node actor: {e}")))?;
                if was {
                    Ok(PeerReply::Cancelled)
                } else {
                    Err(ApiError::conflict(
                        "not_migrating",
                        format!("no move of VM {vm:?} is under way on node {}", self.id()),
                    ))
                }
            }
            PeerRequest::Resume { failback } => {
                let report: FailbackReport = self
                    .inner
                    .actor
                    .send(ResumeNode {
                        failback,
                        verify: false,
                    })
                    .await
                    .map_err(|e| ApiError::internal(format!("node actor: {e}")))?
                    .map_err(|e| ApiError::conflict("resume_failed", e))?;
                Ok(PeerReply::Resumed(FailbackView::from_report(&report)))
            }
            PeerRequest::Drain { downtime_limit_ms } => {
                let options = DrainOptions {
                    policy: MovePolicy::downtime_limit_ms(downtime_limit_ms),
                    ..DrainOptions::default()
                };
                self.inner
                    .actor
                    .send(DrainNode(options))
                    .await
                    .map_err(|e| ApiError::internal(format!("node actor: {e}")))?
                    .map_err(|e| ApiError::conflict("drain_failed", e))?;
                Ok(PeerReply::DrainBegun)
            }
            PeerRequest::Relay(event) => {
                self.inner.hub.publish(match event {
                    Relayed::Progress(p) => Event::Progress(p),
                    Relayed::Report(r) => Event::Report(r),
                });
                Ok(PeerReply::Relayed)
            }
        }
    }

    /// Starts the source side of a move of `vm`, which this node runs, and
    /// answers once the store holds the migration (or the job refused).
    async fn begin_move_here(
        &self,
        vm: &str,
        target: NodeId,
        trigger: MigrationTrigger,
        verify: bool,
        policy: MovePolicy,
    ) -> Result<u64, ApiError> {
        let first_new = self.state().next_migration_id;
        let mut request = MoveRequest::new(vm, target);
        request.trigger = trigger;
        request.verify = verify;
        // Resolved against the cluster's settings by the job as it begins.
        request.policy = policy;
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let inner = self.inner.clone();
        self.inner.runtime.spawn(async move {
            let result = inner
                .actor
                .send(MoveVm(request))
                .await
                .unwrap_or_else(|e| Err(MigrationError::Aborted(format!("node actor: {e}"))));
            if let Ok(report) = &result {
                let view = ReportView::from_report(report);
                inner.hub.publish(Event::Report(view.clone()));
                let _ = inner.relay.try_send(Relayed::Report(view));
            }
            let _ = tx.send(result);
        });
        let me = self.id();
        let begun = |state: &ClusterState| {
            state
                .migrations
                .range(first_new..)
                .find(|(_, m)| m.vm == vm && m.source == me)
                .map(|(id, _)| *id)
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(id) = begun(&self.state()) {
                return Ok(id);
            }
            match tokio::time::timeout(Duration::from_millis(5), &mut rx).await {
                Ok(Ok(Ok(report))) => return Ok(report.migration),
                Ok(Ok(Err(MigrationError::Refused(why)))) => {
                    return Err(ApiError::conflict("migration_refused", why))
                }
                Ok(Ok(Err(MigrationError::Rejected(e)))) => return Err(e.into()),
                Ok(Ok(Err(e))) => {
                    return begun(&self.state())
                        .ok_or_else(|| ApiError::conflict("migration_refused", e.to_string()))
                }
                Ok(Err(_)) => return Err(ApiError::internal("the move task vanished")),
                Err(_) if Instant::now() > deadline => {
                    return Err(ApiError::unavailable(
                        "cluster_unavailable",
                        "the migration was not recorded in time",
                    ))
                }
                Err(_) => {}
            }
        }
    }
}

/// The `ferry-control` service of this node (see [`crate::peer`]).
pub(super) struct ControlService(pub(super) Weak<Inner>);

impl RpcHandler for ControlService {
    fn handle(
        &self,
        from: NodeId,
        request: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + '_>> {
        Box::pin(async move {
            let inner = self.0.upgrade().ok_or("node is shutting down")?;
            let node = Node { inner };
            // The version first: an envelope of a version this node does not
            // read is refused by its version, whatever its layout.
            let version = peer::envelope_version(&request).ok_or("malformed control envelope")?;
            let result: PeerResult = if !peer::supported(version) {
                Err(ApiError::bad_request(
                    "protocol_version",
                    format!(
                        "control protocol version {version} is not supported (this node speaks {})",
                        peer::versions_served()
                    ),
                ))
            } else {
                let envelope: Envelope =
                    ferry_transport::decode(&request).map_err(|e| e.to_string())?;
                node.serve(from, envelope.request).await
            };
            Ok(ferry_transport::encode(&result))
        })
    }
}
