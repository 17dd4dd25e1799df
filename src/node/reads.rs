//! Reads: what this node's replica of the store shows — status, nodes, VMs,
//! networks, migrations with their rounds and reports, tips, settings — in the
//! shapes the API speaks, and the pre-move estimate. They answer from the
//! local replica without asking the leader, except `vm_fresh`, which first
//! waits for every write committed so far (to answer after an operation
//! another node carried out).

use super::Node;
use crate::error::ApiError;
use crate::views::{self, *};
use ferry_actors::policy::convergence::ConvergenceConfig;
use ferry_actors::policy::estimate::{estimate, Factors};
use ferry_cluster::model::{NodeState, TipState, VmState};

/// Bandwidth assumed for an estimate before this node has measured any.
const ASSUMED_BANDWIDTH: f64 = 500e6;

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

    /// The pre-move estimate for `vm`, from its memory size, its workload's
    /// dirty rate and the bandwidth this node last measured (or an assumed
    /// 500 MB/s before any move), under the cluster's downtime limit.
    pub fn estimate(&self, vm: &str) -> Result<EstimateView, ApiError> {
        self.estimate_under(vm, None)
    }

    /// The estimate of a move of `vm` under its own downtime limit, if it
    /// names one (see [`requests::MoveVm`](crate::requests::MoveVm)).
    pub(super) fn estimate_under(
        &self,
        vm: &str,
        downtime_limit_ms: Option<u32>,
    ) -> Result<EstimateView, ApiError> {
        let state = self.state();
        let v = state.vms.get(vm).ok_or_else(|| ApiError::unknown_vm(vm))?;
        let dirty_rate = ferry_actors::node::spec_of(&v.config)
            .ok()
            .and_then(|s| s.workload.dirty_pages_per_sec)
            .unwrap_or(0) as f64;
        let (bandwidth, source) = match self.inner.hub.last_bandwidth() {
            Some(b) => (b, "measured"),
            None => (ASSUMED_BANDWIDTH, "assumed"),
        };
        let config = ConvergenceConfig::for_move(&state.settings, downtime_limit_ms);
        let e = estimate(
            &Factors {
                memory_bytes: v.config.memory_bytes,
                nonzero_pages: None,
                dirty_rate,
                bandwidth,
            },
            &config,
        )
        .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(EstimateView {
            total_ms: e.total.as_secs_f64() * 1e3,
            downtime_ms: e.downtime.as_secs_f64() * 1e3,
            rounds: e.rounds,
            converges: e.converges,
            needs_throttle: e.needs_throttle,
            memory_bytes: v.config.memory_bytes,
            dirty_rate,
            bandwidth,
            bandwidth_source: source.into(),
            summary: e.to_string(),
        })
    }
}
