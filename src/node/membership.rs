//! Membership as the transport enforces it, and a node leaving for good.
//!
//! Every request, one-way message and page-stream path another node sends
//! passes [`admit`] first (installed as the transport's `Admission`): a
//! caller must be a current member — in the Raft membership (voters and
//! learners: a joining node is a learner before it votes) or in the store's
//! node list. A stranger (a certificate the CA signed, for no member) may
//! only ask to join (the control service, which refuses it anything else) or
//! append to a VM's service as any client may (the `migration` service's
//! `Append`, which a probe outside the cluster uses); a node that has no
//! membership yet (still joining) hears anyone, since its future leader is
//! how it learns one.
//!
//! The store's revocation list (`Command::RetireNode`) goes to the transport
//! after every change and at start, so a restarted node refuses removed
//! nodes before it hears from any peer; the transport then refuses their
//! certificates in the handshake and closes their open connections.
//!
//! The address book is kept in step with the store too: a node added after
//! `cluster init` is in no other node's configuration, so its transport
//! sockets come from the Raft membership.

use super::{Inner, Node};
use crate::error::ApiError;
use crate::views::RemovedNodeView;
use ferry_actors::node::{now_ms, PeerAddrs};
use ferry_cluster::model::ClusterState;
use ferry_cluster::{ClusterError, Command, NodeId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Weak;

/// Who this node counts as members when a call arrives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Members {
    /// Raft's voters and learners.
    pub raft: BTreeSet<NodeId>,
    /// The store's nodes.
    pub model: BTreeSet<NodeId>,
    /// Removed nodes: id → removal time (ms).
    pub revoked: BTreeMap<NodeId, u64>,
}

/// What a stranger asks for, as far as the gate cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ask {
    /// A client's append to a VM's service.
    ClientAppend,
    Other,
}

/// Whether `peer`, asking `ask`, may call `service` on a node that counts
/// `members`.
pub(crate) fn admit(
    peer: NodeId,
    service: &str,
    ask: Ask,
    members: &Members,
) -> Result<(), String> {
    if members.raft.is_empty() && members.model.is_empty() {
        return Ok(());
    }
    if members.raft.contains(&peer) || members.model.contains(&peer) {
        return Ok(());
    }
    if service == crate::peer::SERVICE {
        return Ok(());
    }
    if service == ferry_actors::migration::protocol::SERVICE && ask == Ask::ClientAppend {
        return Ok(());
    }
    Err(match members.revoked.get(&peer) {
        Some(at_ms) => format!(
            "node {peer} was removed from the cluster (at {at_ms} ms since the Unix epoch): \
             the {service} service refuses it"
        ),
        None => {
            format!("node {peer} is not a member of this cluster: the {service} service refuses it")
        }
    })
}

/// The transport's gate: [`admit`] against this node's view of the store.
pub(super) struct MembershipGate(pub(super) Weak<Inner>);

impl ferry_transport::Admission for MembershipGate {
    fn admit(&self, peer: NodeId, service: &str, request: &[u8]) -> Result<(), String> {
        let Some(inner) = self.0.upgrade() else {
            return Err("this node is shutting down".into());
        };
        let node = Node { inner };
        let members = node.members();
        // Members pass without their requests being read (a `Complete` in
        // the blackout is not decoded twice); only a stranger's is looked at.
        let ask = if members.raft.contains(&peer) || members.model.contains(&peer) {
            Ask::Other
        } else {
            ask_of(service, request)
        };
        admit(peer, service, ask, &members)
    }
}

fn ask_of(service: &str, request: &[u8]) -> Ask {
    use ferry_actors::migration::protocol::{Request, SERVICE};
    if service != SERVICE {
        return Ask::Other;
    }
    match ferry_transport::decode::<Request>(request) {
        Ok(Request::Append { .. }) => Ask::ClientAppend,
        _ => Ask::Other,
    }
}

impl Node {
    pub(crate) fn members(&self) -> Members {
        let state = self.state();
        let metrics = self.cluster().metrics();
        Members {
            raft: metrics
                .membership_config
                .membership()
                .nodes()
                .map(|(id, _)| *id)
                .collect(),
            model: state.nodes.keys().copied().collect(),
            revoked: state.revoked.iter().map(|(id, r)| (*id, r.at_ms)).collect(),
        }
    }

    /// Whether `peer` is a member now (Raft or store).
    pub(crate) fn is_member_node(&self, peer: NodeId) -> bool {
        let m = self.members();
        m.raft.contains(&peer) || m.model.contains(&peer)
    }

    /// Hands the store's revocation list to the transport when it changed,
    /// and points the address book at members no configuration names.
    pub(super) fn sync_membership(&self) {
        let state = self.state();
        let revoked: BTreeMap<NodeId, u64> = state
            .revoked
            .iter()
            .map(|(id, r)| (*id, r.at_ms / 1000))
            .collect();
        let rpc = &self.inner.shared.rpc;
        if rpc.revocations().snapshot() != revoked {
            tracing::info!(node = self.id(), revoked = ?revoked.keys().collect::<Vec<_>>(), "revocation list changed");
            rpc.set_revoked(revoked);
        }
        let metrics = self.cluster().metrics();
        for (id, member) in metrics.membership_config.membership().nodes() {
            if *id == self.id() || self.inner.peers.contains_key(id) {
                continue;
            }
            let known = self.inner.shared.directory.get(*id);
            if known.as_ref().map(|k| &k.rpc) != Some(&member.addrs) {
                self.inner.shared.directory.set(
                    *id,
                    PeerAddrs {
                        rpc: member.addrs.clone(),
                        networks: known.map(|k| k.networks).unwrap_or_default(),
                    },
                );
            }
        }
    }

    /// Removes a node for good (`ferry node remove`): refused while it owns
    /// VMs or takes part in a migration; otherwise the store forgets it and
    /// revokes its certificates, then it leaves the Raft membership. Every
    /// node then refuses its certificate and closes its connections. Run
    /// again after a partial failure, it finishes the job.
    pub async fn remove_node(&self, r: &str) -> Result<RemovedNodeView, ApiError> {
        let state = self.fresh().await?;
        let id = match self.node_ref(&state, r) {
            Ok(id) => id,
            // Retired in the store but still in Raft (a removal cut short).
            Err(unknown) => retired_id(&state, r).ok_or(unknown)?,
        };
        if id == self.id() {
            return Err(ApiError::conflict(
                "node_answers_request",
                format!(
                    "node {r:?} answers this request: ask another node's API to remove it \
                     (--api, or FERRY_CONFIG of another node)"
                ),
            ));
        }
        if state.nodes.contains_key(&id) {
            let written = self
                .write(Command::RetireNode {
                    node: id,
                    at_ms: now_ms(),
                })
                .await;
            if let Err(e) = written {
                return Err(match e.code.as_str() {
                    "node_has_vms" | "node_has_active_migrations" => ApiError {
                        message: format!(
                            "{}; move them away first: `ferry node pause {r} --drain`",
                            e.message
                        ),
                        ..e
                    },
                    _ => e,
                });
            }
        }
        self.cluster()
            .remove_member(id)
            .await
            .map_err(|e| match e {
                ClusterError::Membership(why) => {
                    ApiError::conflict("membership_change_failed", why)
                }
                other => other.into(),
            })?;
        let state = self.fresh().await?;
        self.sync_membership();
        let revocation = state.revoked.get(&id);
        Ok(RemovedNodeView {
            id,
            name: revocation.map_or_else(|| r.to_string(), |v| v.name.clone()),
            revoked_at_ms: revocation.map_or(0, |v| v.at_ms),
        })
    }
}

/// A node the store retired, by name or id.
fn retired_id(state: &ClusterState, r: &str) -> Option<NodeId> {
    state
        .revoked
        .iter()
        .find(|(id, v)| v.name == r || id.to_string() == r)
        .map(|(id, _)| *id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members() -> Members {
        Members {
            raft: BTreeSet::from([1, 2, 3]),
            model: BTreeSet::from([1, 2, 3]),
            revoked: BTreeMap::from([(4, 1_000)]),
        }
    }

    #[test]
    fn members_are_served_and_others_only_may_ask_to_join_or_append() {
        let m = members();
        let other = Ask::Other;
        assert_eq!(admit(2, "raft", other, &m), Ok(()));
        assert_eq!(admit(2, "migration", other, &m), Ok(()));
        let stranger = admit(9, "migration", other, &m).unwrap_err();
        assert!(stranger.contains("node 9 is not a member"), "{stranger}");
        let removed = admit(4, "cluster", other, &m).unwrap_err();
        assert!(removed.contains("node 4 was removed"), "{removed}");
        // Asking to join goes through; the control service refuses the rest.
        assert_eq!(admit(9, crate::peer::SERVICE, other, &m), Ok(()));
        // A client's append to a VM's service, on that service only.
        assert_eq!(admit(9, "migration", Ask::ClientAppend, &m), Ok(()));
        assert!(admit(9, "raft", Ask::ClientAppend, &m).is_err());
    }

    #[test]
    fn only_an_append_reads_as_a_clients() {
        use ferry_actors::migration::protocol::{Request, SERVICE};
        let append = ferry_transport::encode(&Request::Append {
            vm: "web-1".into(),
            record: b"x".to_vec(),
        });
        assert_eq!(ask_of(SERVICE, &append), Ask::ClientAppend);
        assert_eq!(ask_of("raft", &append), Ask::Other);
        assert_eq!(ask_of(SERVICE, &[0xff, 0xff]), Ask::Other);
    }

    #[test]
    fn a_learner_is_a_member_and_a_node_not_yet_joined_hears_anyone() {
        let mut m = members();
        m.raft.insert(5);
        assert_eq!(admit(5, "raft", Ask::Other, &m), Ok(()));
        assert_eq!(admit(7, "raft", Ask::Other, &Members::default()), Ok(()));
    }
}
