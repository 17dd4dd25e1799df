//! Cluster-wide operations: maintenance mode for a node (pause, with a drain
//! its own actor runs; resume, with failback, carried out by the node itself),
//! an operator's "this node is down" and abort of a migration, network roles
//! and the migration order, a user's answer to a policy tip, and the cluster
//! settings. Each validates its request against a fresh read of the store
//! before writing.

use super::Node;
use crate::error::ApiError;
use crate::peer::{PeerReply, PeerRequest};
use crate::requests::{self, Request};
use crate::views::{self, *};
use ferry_actors::node::now_ms;
use ferry_cluster::model::{NodeState, TipState};
use ferry_cluster::{Command, CommandError};
use std::time::Duration;

impl Node {
    /// Puts a node in maintenance mode; with `drain`, its running VMs are
    /// moved off by live migration (the node reports the drain's progress in
    /// the store: `draining`, then `drained` or `failed` naming each VM left).
    /// The drain's moves obey the cluster's downtime limit, or the request's.
    pub async fn pause_node(
        &self,
        node: &str,
        req: requests::PauseNode,
    ) -> Result<NodeView, ApiError> {
        req.validate()?;
        let state = self.fresh().await?;
        let id = self.node_ref(&state, node)?;
        match req.downtime_limit_ms.filter(|_| req.drain) {
            None => {
                self.write(Command::PauseNode {
                    node: id,
                    drain: req.drain,
                })
                .await?;
            }
            // The store holds no per-drain limit: the node that runs the
            // drain takes it with the request, then pauses itself.
            Some(downtime_limit_ms) => {
                let reply = self
                    .on_node(id, PeerRequest::Drain { downtime_limit_ms })
                    .await?;
                let PeerReply::DrainBegun = reply else {
                    return Err(ApiError::internal(format!("unexpected reply {reply:?}")));
                };
                // The node wrote the pause: show it as the store has it now.
                self.fresh().await?;
            }
        }
        self.node(&id.to_string())
    }

    /// Takes a node out of maintenance mode; with `failback`, the VMs its
    /// drain moved away come back (each moved by its current owner). The
    /// node itself carries this out: the request goes to it.
    pub async fn resume_node(
        &self,
        node: &str,
        req: requests::ResumeNode,
    ) -> Result<ResumedView, ApiError> {
        let state = self.fresh().await?;
        let id = self.node_ref(&state, node)?;
        let n = &state.nodes[&id];
        if n.state != NodeState::Paused {
            return Err(CommandError::NodeNotPaused {
                node: id,
                state: n.state,
            }
            .into());
        }
        let reply = if id == self.id() {
            self.serve(
                id,
                PeerRequest::Resume {
                    failback: req.failback,
                },
            )
            .await?
        } else {
            self.call_peer(
                id,
                PeerRequest::Resume {
                    failback: req.failback,
                },
                Duration::from_secs(3600),
            )
            .await?
        };
        let PeerReply::Resumed(failback) = reply else {
            return Err(ApiError::internal(format!("unexpected reply {reply:?}")));
        };
        Ok(ResumedView {
            node: self.node(&id.to_string())?,
            failback,
        })
    }

    /// An operator declares a node down, so the cluster restarts its VMs
    /// elsewhere. The Raft leader decides, and keeps the fencing guarantee:
    /// without `confirmed_dead` a node is declared down only once the leader
    /// has heard no lease renewal from it for the failure-detection timeout
    /// (its lease has ended, so its guests have stopped); a node that renewed
    /// more recently is refused, 409 `node_alive`. With `confirmed_dead` the
    /// operator vouches the node can run nothing, and it is declared down at
    /// once: if that is wrong, its VMs may briefly run twice.
    pub async fn mark_node_down(
        &self,
        node: &str,
        req: requests::MarkNodeDown,
    ) -> Result<NodeView, ApiError> {
        req.validate()?;
        if self.stopping() {
            return Err(ApiError::unavailable(
                "shutting_down",
                "this node is shutting down",
            ));
        }
        let state = self.fresh().await?;
        let id = self.node_ref(&state, node)?;
        let reason = req.reason.as_deref().unwrap_or("no reason given");
        match self
            .failover()
            .mark_down(id, reason, req.confirmed_dead)
            .await
        {
            Ok(said) => tracing::info!(node = id, "{said}"),
            // The failover loop answers in sentences; this one is the
            // fencing refusal, the only one an operator can act on by
            // waiting or by confirming the node is dead.
            Err(why) if why.contains("renewed its lease") => {
                return Err(ApiError::conflict("node_alive", why))
            }
            Err(why) => {
                return Err(ApiError::unavailable(
                    "cluster_unavailable",
                    format!("could not declare node {id} down: {why}"),
                ))
            }
        }
        // The leader wrote it: show it as the store has it now.
        self.fresh().await?;
        self.node(&id.to_string())
    }

    /// An operator's abort of a migration, written to the store directly: it
    /// needs neither the source nor the target, so it ends a move stuck
    /// behind a dead source. It is always safe: the store orders it against
    /// the switchover's commit and exactly one of them wins; the source
    /// resumes the VM only if the store says aborted, the target runs it only
    /// on a committed switchover. (`cancel_move` is the gentler way while the
    /// source is alive: it asks the source to stop.)
    pub async fn abort_migration(&self, id: u64) -> Result<MigrationView, ApiError> {
        let state = self.fresh().await?;
        if !state.migrations.contains_key(&id) {
            return Err(CommandError::UnknownMigration { id }.into());
        }
        self.write(Command::AbortMigration {
            migration: id,
            reason: "aborted by an operator".into(),
            at_ms: now_ms(),
        })
        .await?;
        // The write may have committed on the leader before this replica
        // applied it: answer with the outcome, not the move still active.
        self.fresh().await?;
        self.migration(id)
    }

    /// Changes a network's role (gateway) or its use for live migration.
    pub async fn set_network(
        &self,
        name: &str,
        patch: requests::NetworkPatch,
    ) -> Result<NetworkView, ApiError> {
        patch.validate()?;
        let migration = match &patch.migration {
            None => None,
            Some(m) => Some(views::parse_migration_use(m).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_value",
                    format!("migration {m:?} is not default, allow or forbid"),
                )
            })?),
        };
        let gateway = match &patch.gateway {
            None => None,
            Some(None) => Some(None),
            Some(Some(g)) => Some(Some(g.parse().map_err(|_| {
                ApiError::bad_request("invalid_value", format!("gateway {g:?} is not an address"))
            })?)),
        };
        let state = self.fresh().await?;
        if !state.networks.contains_key(name) {
            return Err(CommandError::UnknownNetwork { name: name.into() }.into());
        }
        if let Some(gateway) = gateway {
            self.write(Command::SetNetworkGateway {
                name: name.into(),
                gateway,
            })
            .await?;
        }
        if let Some(migration) = migration {
            self.write(Command::SetNetworkMigration {
                name: name.into(),
                migration,
            })
            .await?;
        }
        views::networks(&self.state())
            .into_iter()
            .find(|n| n.name == name)
            .ok_or_else(|| CommandError::UnknownNetwork { name: name.into() }.into())
    }

    /// Puts the named networks first in the migration order.
    pub async fn order_networks(&self, order: Vec<String>) -> Result<Vec<NetworkView>, ApiError> {
        let state = self.fresh().await?;
        if let Some(n) = order.iter().find(|n| !state.networks.contains_key(*n)) {
            return Err(CommandError::UnknownNetwork { name: n.clone() }.into());
        }
        self.write(Command::OrderMigrationNetworks { order })
            .await?;
        Ok(self.networks())
    }

    /// Accepts (the policy applies it) or dismisses a pending tip.
    pub async fn resolve_tip(&self, id: u64, accept: bool) -> Result<TipView, ApiError> {
        let state = self.fresh().await?;
        if !state.tips.contains_key(&id) {
            return Err(CommandError::UnknownTip { id }.into());
        }
        self.write(Command::ResolveTip {
            tip: id,
            state: if accept {
                TipState::Accepted
            } else {
                TipState::Dismissed
            },
            at_ms: now_ms(),
        })
        .await?;
        views::tips(&self.state())
            .into_iter()
            .find(|t| t.id == id)
            .ok_or_else(|| CommandError::UnknownTip { id }.into())
    }

    pub async fn update_settings(
        &self,
        patch: requests::SettingsPatch,
    ) -> Result<SettingsView, ApiError> {
        patch.validate()?;
        let mut settings = self.fresh().await?.settings.clone();
        if let Some(d) = patch.downtime_limit_ms {
            settings.downtime_limit_ms = d;
        }
        if let Some(b) = patch.bandwidth_cap_bytes_per_sec {
            settings.bandwidth_cap_bytes_per_sec = b;
        }
        if let Some(m) = patch.max_migrations_per_node {
            settings.max_migrations_per_node = m;
        }
        if let Some(f) = patch.failure_detection_ms {
            settings.failure_detection_ms = f;
        }
        if let Some(mode) = &patch.pro_tip_mode {
            settings.pro_tip_mode = views::parse_tip_mode(mode).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_value",
                    format!("pro_tip_mode {mode:?} is not off, manual or automatic"),
                )
            })?;
        }
        self.write(Command::UpdateSettings { settings }).await?;
        Ok(self.settings())
    }
}
