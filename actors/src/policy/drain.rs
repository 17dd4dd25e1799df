//! The pure decision logic of a maintenance drain: which VMs leave a paused
//! node, for which targets, in which order, and what each move's outcome
//! means for the rest.
//!
//! [`DrainPlan`] takes a store snapshot and says which moves to start now
//! (placement with the largest VM first, never more than the
//! simultaneous-migration limit allows), and it takes each move's outcome
//! (moved; refused because a slot was taken — try again; failed — retry up to
//! [`DrainOptions::max_attempts`](crate::triggers::drain::DrainOptions::max_attempts)
//! times, then the VM is stuck). [`drain_requested`] says whether the store
//! asks a node to drain, [`drained_vms`] which VMs a failback would bring
//! back. The loop that starts the moves and records the outcome is
//! [`triggers::drain`](crate::triggers::drain).

use crate::migration::source::{MigrationError, MigrationReport};
use crate::policy::placement::{self, Placement, Reservation};
use ferry_cluster::model::{
    ClusterState, DrainStatus, MigrationOutcome, MigrationTrigger, NodeState, StuckVm, VmState,
};
use ferry_cluster::{CommandError, NodeId};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// Where one VM of a drain is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum VmDrain {
    /// Not started yet (no slot, or a move by someone else is under way).
    Waiting,
    Moving {
        target: NodeId,
        attempt: u32,
    },
    Moved {
        target: NodeId,
        migration: u64,
        epoch: u64,
    },
    /// It left the node another way (stopped, or moved by another request).
    Gone {
        reason: String,
    },
    /// It cannot leave; why.
    Stuck {
        reason: String,
    },
}

impl VmDrain {
    fn is_open(&self) -> bool {
        matches!(self, VmDrain::Waiting | VmDrain::Moving { .. })
    }
}

/// A drain's progress, per VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DrainReport {
    pub node: NodeId,
    pub vms: BTreeMap<String, VmDrain>,
    /// Set once the drain ended: `Drained`, or `Failed` with the stuck VMs;
    /// `Idle` when it was called off (the node was resumed).
    pub outcome: Option<DrainStatus>,
}

impl DrainReport {
    /// The VMs reported stuck, with the reason.
    pub fn stuck(&self) -> Vec<StuckVm> {
        self.vms
            .iter()
            .filter_map(|(vm, s)| match s {
                VmDrain::Stuck { reason } => Some(StuckVm {
                    vm: vm.clone(),
                    reason: reason.clone(),
                }),
                _ => None,
            })
            .collect()
    }
}

/// How one move of a drain ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoveOutcome {
    Moved {
        target: NodeId,
        migration: u64,
        epoch: u64,
    },
    /// Refused for a reason that passes (a migration slot was taken in the
    /// meantime): try again without counting an attempt.
    Retry,
    Failed(String),
}

impl MoveOutcome {
    /// Classifies a move's result.
    pub fn of(result: &Result<MigrationReport, MigrationError>) -> MoveOutcome {
        match result {
            Ok(r) => MoveOutcome::Moved {
                target: r.target,
                migration: r.migration,
                epoch: r.epoch,
            },
            Err(MigrationError::Rejected(CommandError::MigrationLimitReached { .. })) => {
                MoveOutcome::Retry
            }
            Err(e) => MoveOutcome::Failed(e.to_string()),
        }
    }
}

/// The pure decision logic of a drain (see the module doc).
#[derive(Debug, Clone)]
pub struct DrainPlan {
    node: NodeId,
    max_attempts: u32,
    vms: BTreeMap<String, VmDrain>,
    attempts: BTreeMap<String, u32>,
}

impl DrainPlan {
    pub fn new(node: NodeId, max_attempts: u32) -> Self {
        DrainPlan {
            node,
            max_attempts: max_attempts.max(1),
            vms: BTreeMap::new(),
            attempts: BTreeMap::new(),
        }
    }

    /// The moves to start now, as (VM, target). Learns the node's VMs from
    /// `state` and marks the ones no node can take as stuck.
    pub fn step(&mut self, state: &ClusterState) -> Vec<(String, NodeId)> {
        // VMs running here join the plan; VMs that left another way leave it.
        for vm in state.vms_on(self.node) {
            if matches!(vm.state, VmState::Running | VmState::Migrating) {
                self.vms.entry(vm.name.clone()).or_insert(VmDrain::Waiting);
            }
        }
        for (name, s) in self.vms.iter_mut() {
            if *s != VmDrain::Waiting {
                continue;
            }
            match state.vms.get(name) {
                None => {
                    *s = VmDrain::Gone {
                        reason: "deleted".into(),
                    }
                }
                Some(vm) if vm.owner != self.node => {
                    *s = VmDrain::Gone {
                        reason: format!("moved to node {} by another request", vm.owner),
                    }
                }
                Some(vm) if !matches!(vm.state, VmState::Running | VmState::Migrating) => {
                    *s = VmDrain::Gone {
                        reason: format!("{:?}", vm.state).to_lowercase(),
                    }
                }
                Some(_) => {}
            }
        }
        // Moves this plan started that the store does not show yet hold a
        // slot and a reservation all the same.
        let mut pending: BTreeMap<NodeId, Reservation> = BTreeMap::new();
        for (name, s) in &self.vms {
            if let VmDrain::Moving { target, .. } = s {
                let shown = state
                    .vms
                    .get(name)
                    .is_some_and(|v| v.state == VmState::Migrating);
                if !shown {
                    let memory = state.vms.get(name).map_or(0, |v| v.config.memory_bytes);
                    pending
                        .entry(*target)
                        .or_default()
                        .add(Reservation::incoming(memory));
                    pending.entry(self.node).or_default().add(Reservation {
                        migrations: 1,
                        ..Default::default()
                    });
                }
            }
        }
        let waiting: BTreeSet<String> = self
            .vms
            .iter()
            .filter(|(_, s)| **s == VmDrain::Waiting)
            .map(|(n, _)| n.clone())
            .collect();
        let mut starts = Vec::new();
        for vm in placement::largest_first(state, &waiting) {
            if vm.state == VmState::Migrating {
                // Someone else's move; see how it ends.
                continue;
            }
            match placement::place(state, vm, &pending, &BTreeMap::new()) {
                Placement::Target(target) => {
                    pending
                        .entry(target)
                        .or_default()
                        .add(Reservation::incoming(vm.config.memory_bytes));
                    pending.entry(self.node).or_default().add(Reservation {
                        migrations: 1,
                        ..Default::default()
                    });
                    let attempt = self.attempts.get(&vm.name).copied().unwrap_or(0) + 1;
                    self.attempts.insert(vm.name.clone(), attempt);
                    self.vms
                        .insert(vm.name.clone(), VmDrain::Moving { target, attempt });
                    starts.push((vm.name.clone(), target));
                }
                Placement::Busy { .. } => {}
                none @ Placement::NoTarget { .. } => {
                    self.vms.insert(
                        vm.name.clone(),
                        VmDrain::Stuck {
                            reason: none.explain(),
                        },
                    );
                }
            }
        }
        starts
    }

    /// Takes the outcome of a move this plan started.
    pub fn finished(&mut self, vm: &str, outcome: MoveOutcome) {
        let attempt = self.attempts.get(vm).copied().unwrap_or(0);
        let next = match outcome {
            MoveOutcome::Moved {
                target,
                migration,
                epoch,
            } => VmDrain::Moved {
                target,
                migration,
                epoch,
            },
            MoveOutcome::Retry => {
                self.attempts
                    .insert(vm.to_string(), attempt.saturating_sub(1));
                VmDrain::Waiting
            }
            MoveOutcome::Failed(reason) if attempt >= self.max_attempts => VmDrain::Stuck {
                reason: format!("{attempt} attempts failed, the last: {reason}"),
            },
            MoveOutcome::Failed(_) => VmDrain::Waiting,
        };
        self.vms.insert(vm.to_string(), next);
    }

    /// Whether every VM has been dealt with.
    pub fn is_done(&self) -> bool {
        self.vms.values().all(|s| !s.is_open())
    }

    /// The status to record once done.
    pub fn status(&self) -> DrainStatus {
        let stuck = self.report(None).stuck();
        if stuck.is_empty() {
            DrainStatus::Drained
        } else {
            DrainStatus::Failed { stuck }
        }
    }

    pub fn report(&self, outcome: Option<DrainStatus>) -> DrainReport {
        DrainReport {
            node: self.node,
            vms: self.vms.clone(),
            outcome,
        }
    }
}

/// Whether the store asks `node` to drain.
pub fn drain_requested(state: &ClusterState, node: NodeId) -> bool {
    state
        .nodes
        .get(&node)
        .is_some_and(|n| n.state == NodeState::Paused && n.drain == DrainStatus::Draining)
}

/// The VMs a failback would bring back to `node`: those whose last completed
/// migration was a drain away from it, still running where it put them.
pub fn drained_vms(state: &ClusterState, node: NodeId) -> Vec<(String, NodeId)> {
    let mut last: BTreeMap<&str, &ferry_cluster::model::Migration> = BTreeMap::new();
    for m in state.migrations.values() {
        if m.outcome == MigrationOutcome::Completed {
            last.insert(m.vm.as_str(), m);
        }
    }
    last.into_iter()
        .filter(|(_, m)| m.trigger == MigrationTrigger::Drain && m.source == node)
        .filter_map(|(name, m)| {
            let vm = state.vms.get(name)?;
            (vm.owner == m.target && vm.state == VmState::Running)
                .then(|| (name.to_string(), vm.owner))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_cluster::apply;
    use ferry_cluster::model::{Capacity, MacAddr, StorageSpec, Subnet, VmConfig};
    use ferry_cluster::Command;
    use std::net::{IpAddr, Ipv4Addr};

    const MIB: u64 = 1 << 20;

    fn cluster(nodes: u64) -> ClusterState {
        let mut s = ClusterState::default();
        apply(
            &mut s,
            Command::DefineNetwork {
                name: "mig".into(),
                subnet: Subnet {
                    addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)),
                    prefix: 16,
                },
                gateway: None,
            },
        )
        .unwrap();
        for id in 1..=nodes {
            apply(
                &mut s,
                Command::AddNode {
                    id,
                    name: format!("node-{id}"),
                    addresses: BTreeMap::from([(
                        "mig".to_string(),
                        IpAddr::V4(Ipv4Addr::new(10, 0, 0, id as u8)),
                    )]),
                    cpu_features: ["sse4".to_string()].into(),
                    capacity: Capacity {
                        memory_bytes: 1024 * MIB,
                        max_vms: 16,
                    },
                    tcp_offload: false,
                },
            )
            .unwrap();
        }
        s
    }

    fn run_vm(s: &mut ClusterState, name: &str, memory: u64, mac: u8) {
        apply(
            s,
            Command::CreateVm {
                name: name.into(),
                config: VmConfig {
                    failover: Default::default(),
                    memory_bytes: memory,
                    vcpus: 1,
                    mac: MacAddr([2, 0, 0, 0, 0, mac]),
                    backend: ferry_cluster::model::Backend::Sim,
                    workload: vec![],
                    storage: StorageSpec::Shared {
                        volume: "csv".into(),
                    },
                },
                node: 1,
            },
        )
        .unwrap();
        apply(
            s,
            Command::StartVm {
                vm: name.into(),
                node: 1,
            },
        )
        .unwrap();
    }

    /// Plays the store's side of the moves a plan starts: begins each, and
    /// completes them when told.
    fn begin(s: &mut ClusterState, vm: &str, target: NodeId) -> u64 {
        match apply(
            s,
            Command::BeginMigration {
                vm: vm.into(),
                source: 1,
                target,
                trigger: MigrationTrigger::Drain,
                at_ms: 1,
            },
        )
        .unwrap()
        {
            ferry_cluster::Response::MigrationBegun { id, .. } => id,
            r => panic!("{r:?}"),
        }
    }

    fn commit(s: &mut ClusterState, id: u64) -> MoveOutcome {
        let epoch = s.vms[&s.migrations[&id].vm].epoch;
        let target = s.migrations[&id].target;
        apply(
            s,
            Command::CommitSwitchover {
                migration: id,
                expected_epoch: epoch,
                at_ms: 2,
            },
        )
        .unwrap();
        MoveOutcome::Moved {
            target,
            migration: id,
            epoch: epoch + 1,
        }
    }

    fn pause(s: &mut ClusterState) {
        apply(
            s,
            Command::PauseNode {
                node: 1,
                drain: true,
            },
        )
        .unwrap();
    }

    #[test]
    fn a_drain_never_starts_more_moves_than_the_limit_and_empties_the_node() {
        let mut s = cluster(3);
        for i in 0..6u8 {
            run_vm(&mut s, &format!("vm-{i}"), (32 + u64::from(i)) * MIB, i + 1);
        }
        pause(&mut s);
        assert!(drain_requested(&s, 1));
        let mut plan = DrainPlan::new(1, 3);
        let mut moving: Vec<(String, u64)> = Vec::new();
        let mut rounds = 0;
        loop {
            rounds += 1;
            assert!(rounds < 20, "the drain makes progress");
            for (vm, target) in plan.step(&s) {
                moving.push((vm.clone(), begin(&mut s, &vm, target)));
            }
            if plan.is_done() {
                break;
            }
            let limit = s.settings.max_migrations_per_node;
            assert!(s.node_load(1).migrations <= limit);
            assert!(moving.len() as u32 <= limit, "{moving:?}");
            // The oldest move completes.
            if !moving.is_empty() {
                let (vm, id) = moving.remove(0);
                let outcome = commit(&mut s, id);
                plan.finished(&vm, outcome);
            }
        }
        assert_eq!(plan.status(), DrainStatus::Drained);
        assert_eq!(s.vms_on(1).count(), 0);
        // Largest first, spread evenly: three VMs on each of nodes 2 and 3.
        assert_eq!(s.vms_on(2).count(), 3);
        assert_eq!(s.vms_on(3).count(), 3);
        assert_eq!(drained_vms(&s, 1).len(), 6);
        assert!(drained_vms(&s, 2).is_empty());
    }

    #[test]
    fn a_vm_without_an_eligible_target_is_stuck_by_name_and_the_drain_fails() {
        let mut s = cluster(2);
        s.nodes.get_mut(&1).unwrap().capacity.memory_bytes = 4096 * MIB;
        run_vm(&mut s, "ok", 64 * MIB, 1);
        // Only node 1 has room for "huge".
        run_vm(&mut s, "huge", 2000 * MIB, 2);
        pause(&mut s);
        let mut plan = DrainPlan::new(1, 3);
        let starts = plan.step(&s);
        assert_eq!(starts, vec![("ok".to_string(), 2)]);
        let id = begin(&mut s, "ok", 2);
        let outcome = commit(&mut s, id);
        plan.finished("ok", outcome);
        assert!(plan.step(&s).is_empty());
        assert!(plan.is_done());
        let DrainStatus::Failed { stuck } = plan.status() else {
            panic!("{:?}", plan.status())
        };
        assert_eq!(stuck.len(), 1);
        assert_eq!(stuck[0].vm, "huge");
        assert!(
            stuck[0].reason.contains("node 2 (node-2) lacks memory"),
            "{}",
            stuck[0].reason
        );
    }

    #[test]
    fn failures_retry_up_to_the_limit_and_a_taken_slot_is_not_a_failure() {
        let mut s = cluster(2);
        run_vm(&mut s, "flaky", 64 * MIB, 1);
        pause(&mut s);
        let mut plan = DrainPlan::new(1, 2);
        assert_eq!(plan.step(&s).len(), 1);
        plan.finished("flaky", MoveOutcome::Retry);
        assert_eq!(plan.step(&s).len(), 1);
        plan.finished("flaky", MoveOutcome::Failed("target unreachable".into()));
        assert!(!plan.is_done());
        assert_eq!(plan.step(&s).len(), 1);
        plan.finished("flaky", MoveOutcome::Failed("target unreachable".into()));
        assert!(plan.is_done());
        let DrainStatus::Failed { stuck } = plan.status() else {
            panic!()
        };
        assert_eq!(stuck[0].vm, "flaky");
        assert!(
            stuck[0].reason.starts_with("2 attempts failed"),
            "{}",
            stuck[0].reason
        );
    }

    #[test]
    fn a_vm_stopped_or_moved_by_someone_else_leaves_the_plan() {
        let mut s = cluster(2);
        run_vm(&mut s, "a", 64 * MIB, 1);
        run_vm(&mut s, "b", 64 * MIB, 2);
        s.settings.max_migrations_per_node = 1;
        // A user's move of "b" is under way when the drain begins.
        let user = begin(&mut s, "b", 2);
        pause(&mut s);
        let mut plan = DrainPlan::new(1, 3);
        assert!(plan.step(&s).is_empty(), "the only slot is taken");
        apply(
            &mut s,
            Command::StopVm {
                vm: "a".into(),
                epoch: None,
            },
        )
        .unwrap();
        commit(&mut s, user);
        assert!(plan.step(&s).is_empty());
        assert!(plan.is_done());
        assert_eq!(plan.status(), DrainStatus::Drained);
        let report = plan.report(None);
        assert!(matches!(report.vms["a"], VmDrain::Gone { .. }));
        assert!(matches!(report.vms["b"], VmDrain::Gone { .. }));
    }
}
