//! Reads: what this node's replica of the store shows — status, nodes, VMs,
//! networks, migrations with their rounds and reports, tips, settings — in the
//! shapes the API speaks, and the pre-move estimate. They answer from the
//! local replica without asking the leader, except `vm_fresh`, which first
//! waits for every write committed so far (to answer after an operation
//! another node carried out).

use super::Node;
use crate::error::ApiError;
use crate::views::{self, *};
use ferry_actors::measure::{self, BandwidthBasis, DirtyRateBasis, MeasureOptions, Measurements};
use ferry_actors::policy::convergence::ConvergenceConfig;
use ferry_actors::policy::estimate::estimate;
use ferry_actors::policy::placement::{self, Placement};
use ferry_cluster::model::{ClusterState, NodeState, TipState, Vm, VmState};
use ferry_cluster::CommandError;
use ferry_cluster::NodeId;
use std::collections::BTreeMap;

impl Node {
    pub fn status(&self) -> StatusView {
        let state = self.state();
        let metrics = self.cluster().metrics();
        StatusView {
            node: self.id(),
            name: self.inner.config.name.clone(),
            leader: metrics.current_leader,
            term: metrics.current_term,
            last_applied: metrics.last_applied.map(|l| l.index),
            voters: metrics.membership_config.membership().voter_ids().collect(),
            nodes: state.nodes.len(),
            nodes_up: state
                .nodes
                .values()
                .filter(|n| n.state == NodeState::Up)
                .count(),
            vms: state.vms.len(),
            vms_running: state
                .vms
                .values()
                .filter(|v| matches!(v.state, VmState::Running | VmState::Migrating))
                .count(),
            active_migrations: state.active_migrations().count(),
            pending_tips: state
                .tips
                .values()
                .filter(|t| t.state == TipState::Pending)
                .count(),
            version: env!("CARGO_PKG_VERSION").into(),
            failover: FailoverView::from_status(&self.failover_status()),
        }
    }

    pub fn nodes(&self) -> Vec<NodeView> {
        views::nodes(&self.state(), self.cluster().leader())
    }

    pub fn node(&self, r: &str) -> Result<NodeView, ApiError> {
        let state = self.state();
        let id = self.node_ref(&state, r)?;
        views::nodes(&state, self.cluster().leader())
            .into_iter()
            .find(|n| n.id == id)
            .ok_or_else(|| ApiError::not_found("unknown_node", format!("unknown node {r:?}")))
    }

    pub fn vms(&self) -> Vec<VmView> {
        views::vms(&self.state())
    }

    pub fn vm(&self, name: &str) -> Result<VmView, ApiError> {
        let state = self.state();
        let v = state
            .vms
            .get(name)
            .ok_or_else(|| ApiError::unknown_vm(name))?;
        Ok(views::vm(&state, v))
    }

    /// The VM as of every write committed so far (after an operation another
    /// node carried out).
    pub(super) async fn vm_fresh(&self, name: &str) -> Result<VmView, ApiError> {
        let state = self.fresh().await?;
        let v = state
            .vms
            .get(name)
            .ok_or_else(|| ApiError::unknown_vm(name))?;
        Ok(views::vm(&state, v))
    }

    pub fn networks(&self) -> Vec<NetworkView> {
        views::networks(&self.state())
    }

    pub fn migrations(&self) -> Vec<MigrationView> {
        let state = self.state();
        state
            .migrations
            .values()
            .rev()
            .map(|m| {
                let (rounds, report) = self.inner.hub.trace(m.id);
                views::migration(m, rounds, report)
            })
            .collect()
    }

    pub fn migration(&self, id: u64) -> Result<MigrationView, ApiError> {
        let state = self.state();
        let m = state.migrations.get(&id).ok_or_else(|| {
            ApiError::not_found("unknown_migration", format!("unknown migration {id}"))
        })?;
        let (rounds, report) = self.inner.hub.trace(id);
        Ok(views::migration(m, rounds, report))
    }

    pub fn tips(&self) -> Vec<TipView> {
        views::tips(&self.state())
    }

    pub fn settings(&self) -> SettingsView {
        views::settings(&self.state().settings)
    }

    /// The pre-move estimate for `vm` from measurements taken now on the
    /// node that runs it (see [`ferry_actors::measure`]): its dirty rate
    /// sampled from the guest's dirty log, the bandwidth to the node a move
    /// would go to (`to`, or where a move without one would go) from a recent
    /// move there or a probe, and the pages in use, under the cluster's
    /// downtime limit. Takes about half a second.
    pub async fn estimate(&self, vm: &str, to: Option<&str>) -> Result<EstimateView, ApiError> {
        let state = self.state();
        let v = state.vms.get(vm).ok_or_else(|| ApiError::unknown_vm(vm))?;
        let target = match to {
            Some(r) => {
                let node = self.node_ref(&state, r)?;
                if node == v.owner {
                    return Err(CommandError::SameSourceAndTarget { node }.into());
                }
                Some(node)
            }
            None => match placement::place(&state, v, &BTreeMap::new(), &BTreeMap::new()) {
                Placement::Target(node) => Some(node),
                Placement::Busy { eligible } => eligible.first().copied(),
                Placement::NoTarget { .. } => None,
            },
        };
        let config = ConvergenceConfig::for_move(&state.settings, None);
        let measured =
            measure::measure(self.shared(), vm, target, &MeasureOptions::default()).await;
        let m = measured.unwrap_or_else(|why| self.unmeasured(&state, v, target, why));
        self.estimate_view(&m, &config, &state)
    }

    /// The estimate of a move of `vm` to `target` under its own downtime
    /// limit, if it names one (see [`requests::MoveVm`](crate::requests::MoveVm)):
    /// from this node's measurements of the last minute, if it took any (a
    /// move does not wait for a fresh sample; the link's figures count only
    /// if they were for that target), else from the configured dirty rate
    /// and the last bandwidth seen.
    pub(super) fn estimate_under(
        &self,
        vm: &str,
        target: NodeId,
        downtime_limit_ms: Option<u32>,
    ) -> Result<EstimateView, ApiError> {
        let state = self.state();
        let v = state.vms.get(vm).ok_or_else(|| ApiError::unknown_vm(vm))?;
        let config = ConvergenceConfig::for_move(&state.settings, downtime_limit_ms);
        let m = match measure::recent(self.shared(), vm, None) {
            Some(m) if m.target == Some(target) => m,
            // The sample holds for any target; the link measured does not.
            Some(m) => Measurements {
                nonzero_pages: m.nonzero_pages,
                dirty_rate: m.dirty_rate,
                dirty_basis: m.dirty_basis,
                ..self.unmeasured(&state, v, Some(target), String::new())
            },
            None => self.unmeasured(
                &state,
                v,
                Some(target),
                "no sample of the last minute; a move does not wait for one".into(),
            ),
        };
        self.estimate_view(&m, &config, &state)
    }

    /// What stands in for measurements that could not be taken (`why`): the
    /// VM's configured dirty rate, and the bandwidth of the last copy round
    /// this node saw, or an assumed one.
    fn unmeasured(
        &self,
        state: &ClusterState,
        v: &Vm,
        target: Option<NodeId>,
        why: String,
    ) -> Measurements {
        let dirty_rate = ferry_actors::node::spec_of(&v.config)
            .ok()
            .and_then(|s| s.workload.dirty_pages_per_sec)
            .unwrap_or(0) as f64;
        let (bandwidth, bandwidth_basis) = match self.inner.hub.last_bandwidth() {
            Some(b) => (b, BandwidthBasis::LastRoundSeen),
            None => (
                measure::ASSUMED_BANDWIDTH,
                BandwidthBasis::Assumed {
                    why: "no move measured yet".into(),
                },
            ),
        };
        let cap = state.settings.bandwidth_cap_bytes_per_sec;
        let capped_at = cap.filter(|&c| (c as f64) < bandwidth);
        Measurements {
            vm: v.name.clone(),
            node: v.owner,
            target,
            memory_bytes: v.config.memory_bytes,
            nonzero_pages: None,
            dirty_rate,
            dirty_basis: DirtyRateBasis::Configured { why },
            bandwidth: capped_at.map_or(bandwidth, |c| c as f64),
            bandwidth_basis,
            capped_at,
            setup: measure::ASSUMED_SETUP,
        }
    }

    fn estimate_view(
        &self,
        m: &Measurements,
        config: &ConvergenceConfig,
        state: &ClusterState,
    ) -> Result<EstimateView, ApiError> {
        let e = estimate(&m.factors(), config).map_err(|e| ApiError::internal(e.to_string()))?;
        let sample_window_ms = match &m.dirty_basis {
            DirtyRateBasis::Sampled(s) => Some(s.window.as_secs_f64() * 1e3),
            DirtyRateBasis::Configured { .. } => None,
        };
        Ok(EstimateView {
            total_ms: e.total.as_secs_f64() * 1e3,
            downtime_ms: e.downtime.as_secs_f64() * 1e3,
            rounds: e.rounds,
            converges: e.converges,
            needs_throttle: e.needs_throttle,
            memory_bytes: m.memory_bytes,
            nonzero_pages: m.nonzero_pages,
            dirty_rate: m.dirty_rate,
            dirty_rate_source: m.dirty_source().into(),
            dirty_rate_basis: m.dirty_words(),
            sample_window_ms,
            bandwidth: m.bandwidth,
            bandwidth_source: m.bandwidth_source().into(),
            bandwidth_basis: m.bandwidth_words(),
            setup_ms: m.setup.as_secs_f64() * 1e3,
            target: m.target,
            target_name: m.target.map(|t| views::node_name(state, t)),
            summary: e.to_string(),
        })
    }
}
