//! Leaving the cluster gracefully (SIGTERM, `ferry node stop`): the node's
//! VMs move away live first when the cluster can take them; whatever could
//! not move is stopped with the node, and the node declares itself down so
//! the cluster restarts those VMs elsewhere at once instead of after the
//! failure-detection timeout. The node writes what it did to
//! [`report_path`] and to its log, where `ferry node stop` reads it.
//!
//! If the store cannot be reached (the last node of a cluster going down,
//! say), the store keeps saying the VMs run here: when the node starts again
//! it tells the store it lost them, and the cluster starts each of them
//! again, once (cluster cold start).

use super::Node;
use ferry_actors::actors::DrainNode;
use ferry_actors::migration::source::MovePolicy;
use ferry_actors::node::now_ms;
use ferry_actors::policy::drain::VmDrain;
use ferry_actors::triggers::drain::DrainOptions;
use ferry_cluster::model::DrainStatus;
use ferry_cluster::Command;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long a shutdown waits for its VMs to move away.
const DRAIN_LIMIT: Duration = Duration::from_secs(90);
/// How long it waits for the store to take its last word.
const STORE_WAIT: Duration = Duration::from_secs(3);

/// What a node did on its way out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownReport {
    pub node: String,
    /// VMs moved away live, with the node each went to.
    pub moved: Vec<MovedAway>,
    /// VMs that could not move and stopped with the node, with the reason;
    /// the cluster restarts them elsewhere (memory lost) when it can.
    pub stopped: Vec<StoppedVm>,
    /// Whether the store took the node's "down": if not, the cluster marks
    /// it down by itself after the failure-detection timeout, or — with no
    /// quorum left — restarts its VMs when the cluster starts again.
    pub marked_down: bool,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedAway {
    pub vm: String,
    pub to: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoppedVm {
    pub vm: String,
    pub reason: String,
}

impl ShutdownReport {
    /// One line per VM, for logs and the CLI.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for m in &self.moved {
            out.push(format!("{} moved live to node {}", m.vm, m.to));
        }
        for s in &self.stopped {
            out.push(format!(
                "{} stopped with the node ({}); the cluster restarts it elsewhere unless it was \
                 created not to be restarted",
                s.vm, s.reason
            ));
        }
        if self.moved.is_empty() && self.stopped.is_empty() {
            out.push("no VMs ran here".into());
        }
        out.push(if self.marked_down {
            format!("node {} left the cluster (marked down until it starts again)", self.node)
        } else {
            format!(
                "node {} could not tell the cluster it left (no quorum?): the cluster notices by itself",
                self.node
            )
        });
        out
    }
}

/// Where a node writes its last shutdown report.
pub fn report_path(data_dir: &Path) -> PathBuf {
    data_dir.join("shutdown-report.json")
}

impl Node {
    /// Moves this node's VMs away live, as far as the cluster can take them
    /// (a maintenance drain), within [`DRAIN_LIMIT`]. Returns the drain's last
    /// report, or why it could not run.
    async fn drain_for_shutdown(&self) -> Result<ferry_actors::policy::drain::DrainReport, String> {
        if self.inner.shared.running().is_empty() {
            return Err("no VMs ran here".into());
        }
        let options = DrainOptions {
            verify: false,
            policy: MovePolicy::default(),
            max_attempts: 2,
        };
        let mut progress = self
            .inner
            .actor
            .send(DrainNode(options))
            .await
            .map_err(|e| format!("node actor: {e}"))??;
        let deadline = Instant::now() + DRAIN_LIMIT;
        loop {
            let report = progress.borrow().clone();
            if report.outcome.is_some() {
                return Ok(report);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(report);
            }
            if tokio::time::timeout(left, progress.changed())
                .await
                .is_err()
            {
                return Ok(progress.borrow().clone());
            }
        }
    }

    /// The graceful half of [`Node::shutdown`]: drain, then stop what is
    /// left and tell the store this node is down. Returns what it did.
    pub(super) async fn leave_cluster(&self) -> ShutdownReport {
        let mut report = ShutdownReport {
            node: self.inner.config.name.clone(),
            ..Default::default()
        };
        match self.drain_for_shutdown().await {
            Ok(drain) => {
                for (vm, how) in &drain.vms {
                    match how {
                        VmDrain::Moved { target, .. } => report.moved.push(MovedAway {
                            vm: vm.clone(),
                            to: *target,
                        }),
                        VmDrain::Stuck { reason } | VmDrain::Gone { reason } => {
                            if self.inner.shared.holds(vm) {
                                report.stopped.push(StoppedVm {
                                    vm: vm.clone(),
                                    reason: reason.clone(),
                                })
                            }
                        }
                        VmDrain::Waiting | VmDrain::Moving { .. } => {}
                    }
                }
                if !matches!(drain.outcome, Some(DrainStatus::Drained)) {
                    tracing::warn!(
                        node = self.id(),
                        "the drain before shutdown did not move every VM"
                    );
                }
            }
            Err(why) => tracing::info!(node = self.id(), "no drain before shutdown: {why}"),
        }
        // From here on nothing new starts here; what still runs stops.
        self.inner.stopping.store(true, Ordering::Release);
        for vm in self.inner.shared.running() {
            if !report.stopped.iter().any(|s| s.vm == vm) {
                report.stopped.push(StoppedVm {
                    vm: vm.clone(),
                    reason: "no other node could take it in time".into(),
                });
            }
        }
        self.inner.failover.stop();
        self.inner.shared.run_lease().revoke();
        self.inner.shared.drop_all_guests();
        report.marked_down = self
            .cluster()
            .write_within(
                Command::MarkNodeDown {
                    node: self.id(),
                    reason: "shut down by its operator".into(),
                    at_ms: now_ms(),
                },
                STORE_WAIT,
            )
            .await
            .is_ok();
        report.at_ms = now_ms();
        for line in report.lines() {
            tracing::info!(node = self.id(), "shutdown: {line}");
        }
        let path = report_path(&self.inner.config.data_dir);
        if let Ok(json) = serde_json::to_vec_pretty(&report) {
            if let Err(e) = std::fs::write(&path, json) {
                tracing::warn!("writing {}: {e}", path.display());
            }
        }
        report
    }
}
