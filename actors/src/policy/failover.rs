//! Failover decisions, plain data: a node's lease, the leader's failure
//! detector, and where each VM of a dead node starts again.
//!
//! The rule that keeps a VM from running twice is a lease. A node may run
//! guests only until `sent + lease`, where `sent` is when it sent the last
//! renewal that the Raft leader confirmed with a quorum. The leader declares a
//! node down only after hearing nothing from it for `detection`, which is
//! longer than `lease`. Since the leader heard the renewal after it was sent,
//! `sent + lease < heard + detection`: the node has stopped its guests before
//! anyone may restart them. A new leader knows no renewals, so it counts from
//! when it became leader; its election came after every renewal an older
//! leader confirmed (that quorum and the new leader's voters overlap), so the
//! bound still holds. Both sides read only their own monotonic clock; the
//! margin `detection - lease` absorbs the rate at which two clocks drift and
//! is half of `detection` by default.
//!
//! A renewal and a condemnation must not cross: once the detector decides to
//! mark a node down it refuses that node's renewals ([`Detector::condemn`])
//! until the store shows it down, and a node that the store shows down gets
//! no lease until it has thrown away its guests and said it is up again.
//!
//! [`restarts`] orders a dead node's VMs by failover priority and places each
//! on a live node with room, counting the ones placed before it.

use crate::policy::placement::Reservation;
use ferry_cluster::model::{ClusterState, NodeState, Settings, Vm, VmState};
use ferry_cluster::NodeId;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// The failover clock, derived from the cluster's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    /// Silence after which the leader declares a node down.
    pub detection: Duration,
    /// How long a confirmed renewal lets a node run its guests.
    pub lease: Duration,
    /// How often a node renews: several tries fit in one lease, so a lost
    /// renewal or a leader election does not fence a healthy node.
    pub renew_every: Duration,
}

impl LeaseTiming {
    pub fn from_settings(settings: &Settings) -> Self {
        let detection = Duration::from_millis(u64::from(settings.failure_detection_ms));
        let lease = detection / 2;
        LeaseTiming {
            detection,
            lease,
            renew_every: (lease / 6).max(Duration::from_millis(20)),
        }
    }
}

/// A node's own lease: until when it may run guests.
#[derive(Debug, Clone, Default)]
pub struct Lease {
    until: Option<Instant>,
}

impl Lease {
    /// The leader confirmed a renewal this node sent at `sent`.
    pub fn confirmed(&mut self, sent: Instant, lease: Duration) {
        let until = sent + lease;
        self.until = Some(self.until.map_or(until, |u| u.max(until)));
    }

    /// The node learned it is declared down: nothing it holds may run.
    pub fn revoke(&mut self) {
        self.until = None;
    }

    pub fn until(&self) -> Option<Instant> {
        self.until
    }

    pub fn holds_at(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }
}

/// What the leader answers a renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Renewal {
    /// Confirmed: run on until `sent + lease`.
    Leased,
    /// The store declares (or is about to declare) the node down: it must
    /// throw away its guests and mark itself up before it gets a lease again.
    Down,
}

/// A node the detector finds silent for too long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspect {
    pub node: NodeId,
    pub silent_for: Duration,
}

/// The leader's memory of renewals.
#[derive(Debug, Clone)]
pub struct Detector {
    /// When this node became leader: a node it never heard from counts from here.
    since: Instant,
    heard: BTreeMap<NodeId, Instant>,
    condemned: BTreeSet<NodeId>,
}

impl Detector {
    pub fn new(leader_since: Instant) -> Self {
        Detector {
            since: leader_since,
            heard: BTreeMap::new(),
            condemned: BTreeSet::new(),
        }
    }

    /// A confirmed renewal from `node` arrived at `now`. Answers what the
    /// node gets, given whether the store shows it down.
    pub fn renewed(&mut self, node: NodeId, now: Instant, down_in_store: bool) -> Renewal {
        let last = self.heard.entry(node).or_insert(now);
        *last = (*last).max(now);
        if down_in_store || self.condemned.contains(&node) {
            Renewal::Down
        } else {
            Renewal::Leased
        }
    }

    /// How long the leader has heard nothing from `node` (counting from its
    /// election for a node it never heard).
    pub fn silent_for(&self, node: NodeId, now: Instant) -> Duration {
        let last = self.heard.get(&node).copied().unwrap_or(self.since);
        now.saturating_duration_since(last.max(self.since))
    }

    pub fn is_condemned(&self, node: NodeId) -> bool {
        self.condemned.contains(&node)
    }

    /// Nodes that are not down in `state`, not this leader, not already
    /// condemned, and silent for at least `detection` at `now`.
    pub fn suspects(
        &self,
        state: &ClusterState,
        leader: NodeId,
        now: Instant,
        detection: Duration,
    ) -> Vec<Suspect> {
        state
            .nodes
            .values()
            .filter(|n| n.id != leader && n.state != NodeState::Down)
            .filter(|n| !self.condemned.contains(&n.id))
            .filter_map(|n| {
                let silent_for = self.silent_for(n.id, now);
                (silent_for >= detection).then_some(Suspect {
                    node: n.id,
                    silent_for,
                })
            })
            .collect()
    }

    /// The leader decided to mark `node` down: refuse its renewals from now on.
    pub fn condemn(&mut self, node: NodeId) {
        self.condemned.insert(node);
    }

    /// The mark-down did not commit: the node may renew again. (It was
    /// refused renewals meanwhile, so its lease has only got shorter.)
    pub fn pardon(&mut self, node: NodeId) {
        self.condemned.remove(&node);
    }

    /// The store shows `node` down (at `now`): the store refuses it from
    /// here on, and its silence counts afresh once it says it is up again.
    pub fn settled(&mut self, node: NodeId, now: Instant) {
        self.condemned.remove(&node);
        self.heard.insert(node, now);
    }
}

/// Where one VM that needs a restart starts again, or why it cannot yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restart {
    pub vm: String,
    pub target: Result<NodeId, String>,
}

/// The VMs that need a restart and may be restarted, highest failover
/// priority first (then by name, so every leader decides alike), each placed
/// on the up node with the fewest VMs, then the most free memory, then the
/// lowest id, counting the VMs placed before it. `skip` leaves out VMs the
/// caller is already restarting. A restart is a cold start, so the VM's old
/// CPU features do not bind the target (it starts with the target's, or the
/// baseline in compatibility mode).
pub fn restarts(state: &ClusterState, skip: &BTreeSet<String>) -> Vec<Restart> {
    let mut due: Vec<&Vm> = state
        .vms
        .values()
        .filter(|vm| vm.state == VmState::NeedsRestart && vm.config.failover.restart)
        .filter(|vm| !skip.contains(&vm.name))
        .collect();
    due.sort_by(|a, b| {
        b.config
            .failover
            .priority
            .cmp(&a.config.failover.priority)
            .then_with(|| a.name.cmp(&b.name))
    });
    let mut pending: BTreeMap<NodeId, Reservation> = BTreeMap::new();
    due.into_iter()
        .map(|vm| {
            let target = restart_target(state, vm, &pending);
            if let Ok(node) = target {
                pending.entry(node).or_default().add(Reservation {
                    memory_bytes: vm.config.memory_bytes,
                    vms: 1,
                    migrations: 0,
                });
            }
            Restart {
                vm: vm.name.clone(),
                target,
            }
        })
        .collect()
}

fn restart_target(
    state: &ClusterState,
    vm: &Vm,
    pending: &BTreeMap<NodeId, Reservation>,
) -> Result<NodeId, String> {
    let mut why = Vec::new();
    let mut best: Option<(u32, u64, NodeId)> = None;
    for node in state.nodes.values() {
        if node.state != NodeState::Up {
            why.push(format!("node {} is {:?}", node.id, node.state));
            continue;
        }
        // A local disk lives on one node: only there can the VM start.
        if vm.disk_owner.is_some_and(|d| d != node.id) {
            continue;
        }
        let mut load = state.node_load(node.id);
        let extra = pending.get(&node.id).copied().unwrap_or_default();
        load.memory_bytes = load.memory_bytes.saturating_add(extra.memory_bytes);
        load.vms += extra.vms;
        let free = node.capacity.memory_bytes.saturating_sub(load.memory_bytes);
        if vm.config.memory_bytes > free {
            why.push(format!("node {} has {free} bytes free", node.id));
            continue;
        }
        if load.vms >= node.capacity.max_vms {
            why.push(format!("node {} has no VM slot free", node.id));
            continue;
        }
        let key = (load.vms, u64::MAX - free, node.id);
        if best.is_none_or(|b| key < b) {
            best = Some(key);
        }
    }
    match best {
        Some((_, _, node)) => Ok(node),
        None if vm.disk_owner.is_some() => Err(format!(
            "its disk is on node {} and that node cannot take it ({})",
            vm.disk_owner.unwrap_or_default(),
            why.join("; ")
        )),
        None => Err(format!("no node can take it: {}", why.join("; "))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ferry_cluster::apply;
    use ferry_cluster::model::{Capacity, Failover, MacAddr, StorageSpec, VmConfig};
    use ferry_cluster::Command;

    const GIB: u64 = 1 << 30;

    fn cluster(nodes: u64, memory: u64) -> ClusterState {
        let mut s = ClusterState::default();
        apply(
            &mut s,
            Command::DefineNetwork {
                name: "mig".into(),
                subnet: "127.1.0.0/16".parse().unwrap(),
                gateway: None,
            },
        )
        .unwrap();
        for id in 1..=nodes {
            apply(
                &mut s,
                Command::AddNode {
                    id,
                    name: format!("n{id}"),
                    addresses: [("mig".to_string(), format!("127.1.0.{id}").parse().unwrap())]
                        .into(),
                    cpu_features: Default::default(),
                    capacity: Capacity {
                        memory_bytes: memory,
                        max_vms: 8,
                    },
                    tcp_offload: false,
                },
            )
            .unwrap();
        }
        s
    }

    fn run(s: &mut ClusterState, name: &str, node: NodeId, memory: u64, failover: Failover) {
        let mac = s.vms.len() as u8 + 1;
        apply(
            s,
            Command::CreateVm {
                name: name.into(),
                config: VmConfig {
                    memory_bytes: memory,
                    vcpus: 1,
                    mac: MacAddr([2, 0, 0, 0, 0, mac]),
                    backend: ferry_cluster::model::Backend::Sim,
                    workload: Vec::new(),
                    storage: StorageSpec::Shared {
                        volume: "csv".into(),
                    },
                    failover,
                },
                node,
            },
        )
        .unwrap();
        apply(
            s,
            Command::StartVm {
                vm: name.into(),
                node,
            },
        )
        .unwrap();
    }

    fn down(s: &mut ClusterState, node: NodeId) {
        apply(
            s,
            Command::MarkNodeDown {
                node,
                reason: "silent".into(),
                at_ms: 1,
            },
        )
        .unwrap();
    }

    #[test]
    fn the_lease_ends_before_the_leader_may_declare_the_node_down() {
        let timing = LeaseTiming::from_settings(&Settings::default());
        assert!(timing.lease < timing.detection);
        assert!(timing.renew_every * 4 < timing.lease);
        let t0 = Instant::now();
        let mut lease = Lease::default();
        assert!(!lease.holds_at(t0), "no lease before the first renewal");
        // Sent at t0, heard by the leader 40 ms later.
        lease.confirmed(t0, timing.lease);
        let mut detector = Detector::new(t0);
        let heard = t0 + Duration::from_millis(40);
        assert_eq!(detector.renewed(7, heard, false), Renewal::Leased);
        let s = cluster(7, 4 * GIB);
        // Every instant at which the detector would suspect node 7 comes
        // after the lease ended.
        let first_suspicion = (0..10_000u64)
            .map(|ms| t0 + Duration::from_millis(ms))
            .find(|&t| {
                detector
                    .suspects(&s, 1, t, timing.detection)
                    .iter()
                    .any(|x| x.node == 7)
            })
            .unwrap();
        assert!(!lease.holds_at(first_suspicion));
        assert!(lease.holds_at(t0 + timing.lease - Duration::from_millis(1)));
        // An older renewal confirmed late never shortens the lease.
        lease.confirmed(t0 - Duration::from_millis(500), timing.lease);
        assert_eq!(lease.until(), Some(t0 + timing.lease));
        lease.revoke();
        assert!(!lease.holds_at(t0));
    }

    #[test]
    fn a_new_leader_counts_silence_from_its_election() {
        let s = cluster(3, 4 * GIB);
        let elected = Instant::now();
        let d = Detector::new(elected);
        let detection = Duration::from_secs(3);
        assert!(d
            .suspects(&s, 1, elected + detection / 2, detection)
            .is_empty());
        let later = d.suspects(&s, 1, elected + detection, detection);
        let nodes: Vec<NodeId> = later.iter().map(|x| x.node).collect();
        // Never itself.
        assert_eq!(nodes, vec![2, 3]);
    }

    #[test]
    fn a_condemned_node_gets_no_lease_until_the_store_shows_it_down_and_up() {
        let mut s = cluster(3, 4 * GIB);
        let t0 = Instant::now();
        let detection = Duration::from_secs(3);
        let mut d = Detector::new(t0);
        d.renewed(2, t0, false);
        d.renewed(3, t0, false);
        let t1 = t0 + detection;
        let suspects = d.suspects(&s, 1, t1, detection);
        assert_eq!(suspects.len(), 2);
        d.condemn(2);
        // A renewal racing the mark-down is refused, though it is recorded.
        assert_eq!(d.renewed(2, t1, false), Renewal::Down);
        assert!(d.suspects(&s, 1, t1, detection).iter().all(|x| x.node != 2));
        // The write failed: node 2 renews again.
        d.pardon(2);
        assert_eq!(d.renewed(2, t1, false), Renewal::Leased);
        // Node 3 is marked down; the store refuses it now.
        d.condemn(3);
        down(&mut s, 3);
        d.settled(3, t1);
        assert_eq!(d.renewed(3, t1, true), Renewal::Down);
        assert!(d
            .suspects(&s, 1, t1 + 2 * detection, detection)
            .iter()
            .all(|x| x.node != 3));
        // Up again: its silence counts from its last renewal.
        apply(&mut s, Command::MarkNodeUp { node: 3 }).unwrap();
        assert_eq!(d.renewed(3, t1 + detection, false), Renewal::Leased);
        assert!(d
            .suspects(&s, 1, t1 + detection, detection)
            .iter()
            .all(|x| x.node != 3));
    }

    #[test]
    fn restarts_go_by_priority_onto_the_emptiest_live_nodes() {
        let mut s = cluster(3, 6 * GIB);
        let high = Failover {
            restart: true,
            priority: 10,
        };
        run(&mut s, "a-low", 1, GIB, Failover::default());
        run(&mut s, "b-high", 1, 2 * GIB, high);
        run(
            &mut s,
            "c-off",
            1,
            GIB,
            Failover {
                restart: false,
                priority: 50,
            },
        );
        run(&mut s, "d-low", 1, GIB, Failover::default());
        run(&mut s, "busy", 2, 3 * GIB, Failover::default());
        down(&mut s, 1);
        let plan = restarts(&s, &BTreeSet::new());
        let order: Vec<&str> = plan.iter().map(|r| r.vm.as_str()).collect();
        // The VM left off is not restarted; the rest by priority, then name.
        assert_eq!(order, vec!["b-high", "a-low", "d-low"]);
        // Node 3 is empty: "b-high" goes there. Both nodes then run one VM,
        // node 3 with more memory free (4 GiB against 3): "a-low" goes there
        // too; now node 2 has fewer VMs, so "d-low" goes to node 2.
        let targets: Vec<Result<NodeId, String>> = plan.iter().map(|r| r.target.clone()).collect();
        assert_eq!(targets, vec![Ok(3), Ok(3), Ok(2)]);
        // Already being restarted: skipped.
        let skip: BTreeSet<String> = ["b-high".to_string()].into();
        assert_eq!(restarts(&s, &skip)[0].vm, "a-low");
    }

    #[test]
    fn a_vm_no_live_node_can_take_says_why() {
        let mut s = cluster(2, 2 * GIB);
        run(&mut s, "big", 1, 2 * GIB, Failover::default());
        run(&mut s, "other", 2, GIB, Failover::default());
        down(&mut s, 1);
        let plan = restarts(&s, &BTreeSet::new());
        let why = plan[0].target.clone().unwrap_err();
        assert!(why.contains("node 1 is Down"), "{why}");
        assert!(why.contains("node 2 has 1073741824 bytes free"), "{why}");
    }
}
