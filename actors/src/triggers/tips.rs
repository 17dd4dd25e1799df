//! Policy tips, the I/O side: load reports, the leader's loop, and a user's
//! answer to a tip.
//!
//! - [`Tips`] is the loop around the pure [`TipPolicy`]. Every node runs one:
//!   it sends its own load ([`measure`]) to the Raft leader periodically (RPC
//!   service [`LOAD_SERVICE`]), and on the leader it evaluates the policy and
//!   writes the resulting `RaiseTip`/`ResolveTip` commands. Tips, their state
//!   and their outcome live in the cluster store, so they survive a leader
//!   change and every interface (CLI, HTTP API, dashboard) sees the same list.
//! - Applying a tip is the source node's job, driven by the store:
//!   [`tips_to_apply`](crate::policy::tips::tips_to_apply) says which tips a
//!   node should act on now — accepted ones ([`accept`]), and pending ones
//!   when the mode is automatic — and the node actor moves the VM with
//!   trigger `Tip(id)`. `BeginMigration` with that trigger marks the tip
//!   applied in the same commit, so a tip is applied at most once; a
//!   dismissed ([`dismiss`]) or expired tip is final and nothing acts on it.

use crate::migration::source::{MovePolicy, MoveRequest};
use crate::node::{lock, now_ms, NodeShared};
use crate::policy::tips::{LoadReport, TipAction, TipConfig, TipPolicy, VmLoad};
use ferry_cluster::model::{MigrationTrigger, TipState};
use ferry_cluster::{Command, NodeId, TipId};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// RPC service on which the leader takes load reports.
pub const LOAD_SERVICE: &str = "load";

/// Accepts a pending tip on a user's behalf: its source node then moves the VM.
pub async fn accept(node: &NodeShared, tip: TipId) -> Result<(), String> {
    resolve(node, tip, TipState::Accepted).await
}

/// Dismisses a pending tip: nothing will move for it.
pub async fn dismiss(node: &NodeShared, tip: TipId) -> Result<(), String> {
    resolve(node, tip, TipState::Dismissed).await
}

async fn resolve(node: &NodeShared, tip: TipId, state: TipState) -> Result<(), String> {
    node.cluster
        .write(Command::ResolveTip {
            tip,
            state,
            at_ms: now_ms(),
        })
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The move the source node makes to apply tip `tip`: under the cluster's
/// downtime limit, like every other move.
pub(crate) fn tip_move(tip: TipId, vm: String, target: NodeId) -> MoveRequest {
    let mut request = MoveRequest::new(vm, target);
    request.trigger = MigrationTrigger::Tip(tip);
    request.policy = MovePolicy::default();
    request
}

/// A node's load as it can measure it: memory pressure from the guests it
/// runs against its capacity. The simulated backend has no CPU accounting, so
/// CPU shares are 0 here; a KVM node would take them from its vCPU threads,
/// and a control plane with its own monitoring reports through
/// [`Tips::report`].
pub fn measure(node: &NodeShared) -> LoadReport {
    let state = node.cluster.read();
    let capacity = state
        .nodes
        .get(&node.id)
        .map_or(1, |n| n.capacity.memory_bytes.max(1));
    let vms: BTreeMap<String, VmLoad> = node
        .running()
        .into_iter()
        .filter_map(|name| {
            let memory_bytes = state.vms.get(&name)?.config.memory_bytes;
            Some((
                name,
                VmLoad {
                    cpu: 0.0,
                    memory_bytes,
                },
            ))
        })
        .collect();
    let used: u64 = vms.values().map(|v| v.memory_bytes).sum();
    LoadReport {
        node: node.id,
        at_ms: now_ms(),
        cpu: 0.0,
        memory: (used as f64 / capacity as f64).min(1.0),
        vms,
    }
}

/// The policy loop of one node (see the module doc). Dropping it, or
/// [`Tips::stop`], ends its tasks.
pub struct Tips {
    node: Arc<NodeShared>,
    policy: Mutex<TipPolicy>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

const REPORT_TIMEOUT: Duration = Duration::from_secs(2);

impl Tips {
    /// Starts the loop on `node`: takes load reports (when leader), evaluates
    /// every `config.evaluate_every`, and reports this node's own load every
    /// `config.report_every`. Must run inside a tokio runtime.
    pub fn start(node: Arc<NodeShared>, config: TipConfig) -> Arc<Tips> {
        let tips = Arc::new(Tips {
            node: node.clone(),
            policy: Mutex::new(TipPolicy::new(config.clone())),
            tasks: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&tips);
        node.rpc.register(
            LOAD_SERVICE,
            ferry_transport::handler_fn(move |from, request| {
                let weak = weak.clone();
                async move {
                    let report: LoadReport =
                        ferry_transport::decode(&request).map_err(|e| e.to_string())?;
                    if report.node != from {
                        return Err(format!(
                            "node {from} may not report the load of node {}",
                            report.node
                        ));
                    }
                    report.check()?;
                    let tips = weak.upgrade().ok_or("tips are stopped")?;
                    tips.observe(report);
                    Ok(Vec::new())
                }
            }),
        );
        let mut tasks = Vec::new();
        let weak = Arc::downgrade(&tips);
        let every = config.evaluate_every;
        tasks.push(
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    let Some(tips) = Weak::upgrade(&weak) else {
                        return;
                    };
                    if tips.is_leader() {
                        if let Err(e) = tips.evaluate().await {
                            tracing::debug!(node = tips.node.id, "tip evaluation: {e}");
                        }
                    }
                }
            })
            .abort_handle(),
        );
        if let Some(every) = config.report_every {
            let weak = Arc::downgrade(&tips);
            tasks.push(
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    loop {
                        tick.tick().await;
                        let Some(tips) = Weak::upgrade(&weak) else {
                            return;
                        };
                        let report = measure(&tips.node);
                        if let Err(e) = tips.report(report).await {
                            tracing::debug!(node = tips.node.id, "load report: {e}");
                        }
                    }
                })
                .abort_handle(),
            );
        }
        *lock(&tips.tasks) = tasks;
        tips
    }

    fn is_leader(&self) -> bool {
        self.node.cluster.leader() == Some(self.node.id)
    }

    fn observe(&self, report: LoadReport) {
        lock(&self.policy).observe(report);
    }

    /// Sends a load report to the leader (or takes it, on the leader). The
    /// periodic reporter uses this; so can a control plane with its own
    /// monitoring, or a test. A node reports only its own load.
    pub async fn report(&self, report: LoadReport) -> Result<(), String> {
        report.check()?;
        if report.node != self.node.id {
            return Err(format!(
                "node {} may not report the load of node {}",
                self.node.id, report.node
            ));
        }
        let leader = self
            .node
            .cluster
            .leader()
            .ok_or("the cluster has no leader")?;
        if leader == self.node.id {
            self.observe(report);
            return Ok(());
        }
        let addrs = self
            .node
            .directory
            .get(leader)
            .map(|p| p.rpc)
            .ok_or_else(|| format!("leader {leader} is not in the directory"))?;
        self.node
            .rpc
            .call(
                leader,
                &addrs,
                LOAD_SERVICE,
                ferry_transport::encode(&report),
                REPORT_TIMEOUT,
            )
            .await
            .map(|_| ())
            .map_err(|e| format!("reporting to leader {leader}: {e}"))
    }

    /// Evaluates the policy now and writes what it decides (on the leader;
    /// elsewhere it does nothing). Returns what was written.
    pub async fn evaluate(&self) -> Result<Vec<TipAction>, String> {
        if !self.is_leader() {
            return Ok(Vec::new());
        }
        let state = self
            .node
            .cluster
            .read_linearizable()
            .await
            .map_err(|e| e.to_string())?;
        let now = now_ms();
        let actions = lock(&self.policy).decide(&state, now);
        let mut written = Vec::new();
        for action in actions {
            match self.node.cluster.write(action.command(now)).await {
                Ok(_) => written.push(action),
                // The store's rules win (a tip already pending for the VM, a
                // tip accepted a moment ago): skip it, the next pass sees why.
                Err(e) => tracing::debug!(?action, "tip action refused: {e}"),
            }
        }
        Ok(written)
    }

    /// Stops the loop's tasks.
    pub fn stop(&self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

impl Drop for Tips {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_cluster::model::Settings;

    #[test]
    fn a_tips_move_carries_the_clusters_downtime_limit() {
        let request = tip_move(7, "web".into(), 3);
        assert_eq!(request.trigger, MigrationTrigger::Tip(7));
        let settings = Settings {
            downtime_limit_ms: 50,
            ..Settings::default()
        };
        let config = request.policy.resolve(&settings);
        assert_eq!(config.downtime_limit, Duration::from_millis(50));
    }
}
