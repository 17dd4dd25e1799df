//! Maintenance drain, the I/O side: a node paused for maintenance moves every
//! VM it runs to other nodes by live migration, and says which ones it could
//! not move and why; resuming it may bring them back (failback).
//!
//! The drain is driven by the cluster store: `PauseNode { drain: true }`
//! (through any node, the CLI or the HTTP API) puts the node in maintenance
//! mode with drain status `Draining`, and the node's own actor, seeing that,
//! runs the drain — the node being drained is the source of every move, so it
//! is the one that can run them. The outcome is recorded back in the store
//! (`Drained`, or `Failed` naming every VM left behind with its reason), so
//! nothing is silently left behind and every interface can show it.
//!
//! The decisions are the pure [`DrainPlan`]. [`run`] is the loop around it that
//! starts the moves through the node actor, waits for their outcomes or for
//! store changes, and publishes a [`DrainReport`] after every step;
//! [`fail_back`] and [`serve_failback`] are the two ends of bringing VMs back.
//!
//! While a node is paused nothing lands on it: the store refuses to start a
//! VM there, to begin a migration to it, and to commit the switchover of a
//! migration that was already copying to it when it was paused.

use crate::actors::{MoveVm, NodeActor};
use crate::migration::source::{MigrationError, MovePolicy, MoveRequest};
use crate::node::NodeShared;
use crate::policy::drain::{drain_requested, DrainPlan, DrainReport, MoveOutcome};
use actix::Addr;
use ferry_cluster::model::{DrainStatus, MigrationTrigger};
use ferry_cluster::{Command, NodeId};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// RPC service through which a resuming node asks a VM's owner to move the VM
/// back to it (failback).
pub const FAILBACK_SERVICE: &str = "maintenance";

/// How a drain moves VMs.
#[derive(Debug, Clone)]
pub struct DrainOptions {
    /// Compare memory and device-state digests of source and target in each
    /// blackout (see [`MoveRequest::verify`]).
    pub verify: bool,
    /// The convergence policy of every move: by default the cluster's, with
    /// its downtime limit as the settings say when each move begins.
    pub policy: MovePolicy,
    /// Moves tried per VM before it is reported stuck.
    pub max_attempts: u32,
}

impl Default for DrainOptions {
    fn default() -> Self {
        DrainOptions {
            verify: false,
            policy: MovePolicy::default(),
            max_attempts: 3,
        }
    }
}

/// How long the loop waits for a move or a store change before looking again.
const RECHECK: Duration = Duration::from_millis(250);

/// Runs a drain of `shared`'s node to its end (see the module doc), moving VMs
/// through `actor`, publishing progress on `progress`.
pub async fn run(
    shared: Arc<NodeShared>,
    actor: Addr<NodeActor>,
    options: DrainOptions,
    progress: watch::Sender<DrainReport>,
) {
    let node = shared.id;
    let mut changes = shared.cluster.subscribe();
    let mut plan = DrainPlan::new(node, options.max_attempts);
    let mut moves = tokio::task::JoinSet::new();
    tracing::info!(node, "drain started");
    loop {
        let state = match shared.cluster.read_linearizable().await {
            Ok(s) => s,
            Err(e) => {
                if shared.is_dead() {
                    return;
                }
                tracing::debug!(node, "drain waits for the store: {e}");
                tokio::time::sleep(RECHECK).await;
                continue;
            }
        };
        if !drain_requested(&state, node) {
            // Called off (resumed) or down: let moves under way finish on
            // their own, start no more.
            moves.detach_all();
            progress.send_replace(plan.report(Some(DrainStatus::Idle)));
            tracing::info!(node, "drain called off");
            return;
        }
        for (vm, target) in plan.step(&state) {
            let request = drain_move(&vm, target, &options);
            let actor = actor.clone();
            moves.spawn(async move {
                let result = actor
                    .send(MoveVm(request))
                    .await
                    .unwrap_or_else(|e| Err(MigrationError::Aborted(format!("node actor: {e}"))));
                (vm, MoveOutcome::of(&result))
            });
        }
        progress.send_replace(plan.report(None));
        if plan.is_done() && moves.is_empty() {
            let status = plan.status();
            let mut recorded = false;
            for _ in 0..20 {
                match shared
                    .cluster
                    .write(Command::RecordDrain {
                        node,
                        status: status.clone(),
                    })
                    .await
                {
                    Ok(_) | Err(ferry_cluster::ClusterError::Rejected(_)) => {
                        recorded = true;
                        break;
                    }
                    Err(_) if shared.is_dead() => return,
                    Err(_) => tokio::time::sleep(RECHECK).await,
                }
            }
            if !recorded {
                tracing::warn!(node, "drain outcome not recorded in the store");
            }
            tracing::info!(node, ?status, "drain ended");
            progress.send_replace(plan.report(Some(status)));
            return;
        }
        tokio::select! {
            Some(done) = moves.join_next() => {
                if let Ok((vm, outcome)) = done {
                    tracing::info!(node, %vm, ?outcome, "drain move ended");
                    plan.finished(&vm, outcome);
                }
            }
            change = changes.recv() => {
                if let Err(tokio::sync::broadcast::error::RecvError::Closed) = change {
                    // The store stopped: look again at the pace of a recheck.
                    tokio::time::sleep(RECHECK).await;
                }
            }
            _ = tokio::time::sleep(RECHECK) => {}
        }
    }
}

/// The move a drain makes of `vm` to `target`.
fn drain_move(vm: &str, target: NodeId, options: &DrainOptions) -> MoveRequest {
    let mut request = MoveRequest::new(vm, target);
    request.trigger = MigrationTrigger::Drain;
    request.verify = options.verify;
    request.policy = options.policy.clone();
    request
}

/// Waits until the drain published on `progress` ends, at most `timeout`.
pub async fn wait(
    progress: &mut watch::Receiver<DrainReport>,
    timeout: Duration,
) -> Result<DrainReport, String> {
    let ended = tokio::time::timeout(timeout, progress.wait_for(|r| r.outcome.is_some()))
        .await
        .map_err(|_| format!("the drain did not end within {timeout:?}"))?
        .map_err(|_| "the drain stopped without an outcome".to_string())?;
    Ok(ended.clone())
}

/// A request to move a VM back to the node that drained it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailbackRequest {
    pub vm: String,
    pub verify: bool,
}

/// The answer: the move's migration id and the new epoch, or why not.
pub type FailbackReply = Result<(u64, u64), String>;

/// What a failback did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FailbackReport {
    /// VMs back on the node, with the epoch they run at.
    pub moved: Vec<(String, u64)>,
    /// VMs that stayed where they were, with the reason.
    pub failed: Vec<(String, String)>,
}

const FAILBACK_TIMEOUT: Duration = Duration::from_secs(600);

/// Serves [`FAILBACK_SERVICE`] on `shared`'s transport: a node resuming from
/// maintenance asks this one (the VM's owner) to move a VM back to it.
pub fn serve_failback(shared: &Arc<NodeShared>, actor: Addr<NodeActor>) {
    let me = shared.id;
    shared.rpc.register(
        FAILBACK_SERVICE,
        ferry_transport::handler_fn(move |from, request| {
            let actor = actor.clone();
            async move {
                let request: FailbackRequest =
                    ferry_transport::decode(&request).map_err(|e| e.to_string())?;
                let req = failback_move(&request, from);
                let reply: FailbackReply = match actor.send(MoveVm(req)).await {
                    Ok(Ok(report)) => Ok((report.migration, report.epoch)),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(format!("node {me}'s actor: {e}")),
                };
                Ok(ferry_transport::encode(&reply))
            }
        }),
    );
}

/// The move an owner makes of a VM back to `home`, the node that drained it:
/// under the cluster's downtime limit, like every other move.
fn failback_move(request: &FailbackRequest, home: NodeId) -> MoveRequest {
    let mut req = MoveRequest::new(request.vm.clone(), home);
    req.verify = request.verify;
    req.policy = MovePolicy::default();
    req
}

/// Moves `vms` (name, current owner) back to `shared`'s node, each by its
/// owner, at most the simultaneous-migration limit at once.
pub async fn fail_back(
    shared: &Arc<NodeShared>,
    vms: Vec<(String, NodeId)>,
    verify: bool,
) -> FailbackReport {
    let limit = shared
        .cluster
        .read()
        .settings
        .max_migrations_per_node
        .max(1) as usize;
    let mut report = FailbackReport::default();
    let mut queue = vms.into_iter();
    let mut running = tokio::task::JoinSet::new();
    loop {
        while running.len() < limit {
            let Some((vm, owner)) = queue.next() else {
                break;
            };
            let shared = shared.clone();
            running.spawn(async move {
                let reply = ask_owner(&shared, &vm, owner, verify).await;
                (vm, reply)
            });
        }
        match running.join_next().await {
            Some(Ok((vm, Ok((_, epoch))))) => report.moved.push((vm, epoch)),
            Some(Ok((vm, Err(why)))) => report.failed.push((vm, why)),
            Some(Err(e)) => report.failed.push(("?".into(), e.to_string())),
            None => break,
        }
    }
    report.moved.sort();
    report.failed.sort();
    report
}

async fn ask_owner(
    shared: &NodeShared,
    vm: &str,
    owner: NodeId,
    verify: bool,
) -> Result<(u64, u64), String> {
    let addrs = shared
        .directory
        .get(owner)
        .map(|p| p.rpc)
        .ok_or_else(|| format!("node {owner} is not in the directory"))?;
    let request = FailbackRequest {
        vm: vm.to_string(),
        verify,
    };
    // A slot may be taken for a moment (the limit counts this node too).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let bytes = shared
            .rpc
            .call(
                owner,
                &addrs,
                FAILBACK_SERVICE,
                ferry_transport::encode(&request),
                FAILBACK_TIMEOUT,
            )
            .await
            .map_err(|e| format!("asking node {owner}: {e}"))?;
        let reply: FailbackReply =
            ferry_transport::decode(&bytes).map_err(|e| format!("reply of node {owner}: {e}"))?;
        match reply {
            Err(why)
                if why.contains("migrations, the limit")
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(RECHECK).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_cluster::model::Settings;

    fn settings_50_ms() -> Settings {
        Settings {
            downtime_limit_ms: 50,
            ..Settings::default()
        }
    }

    #[test]
    fn a_drains_moves_carry_the_clusters_downtime_limit() {
        let request = drain_move("web", 2, &DrainOptions::default());
        assert_eq!(request.trigger, MigrationTrigger::Drain);
        let config = request.policy.resolve(&settings_50_ms());
        assert_eq!(config.downtime_limit, Duration::from_millis(50));
    }

    #[test]
    fn a_drain_may_name_its_own_downtime_limit() {
        let options = DrainOptions {
            policy: MovePolicy::downtime_limit_ms(20),
            ..DrainOptions::default()
        };
        let config = drain_move("web", 2, &options)
            .policy
            .resolve(&settings_50_ms());
        assert_eq!(config.downtime_limit, Duration::from_millis(20));
    }

    #[test]
    fn a_failback_carries_the_clusters_downtime_limit() {
        let request = FailbackRequest {
            vm: "web".into(),
            verify: true,
        };
        let req = failback_move(&request, 1);
        assert_eq!((req.target, req.verify), (1, true));
        let config = req.policy.resolve(&settings_50_ms());
        assert_eq!(config.downtime_limit, Duration::from_millis(50));
    }
}
