//! Placement: which node a VM should move to, and over which networks.
//!
//! A drain, a policy tip and a failback all have to answer "where can this VM
//! go?" the same way, and the answer must be the one the cluster store will
//! accept. So this module is pure: it reads a [`ClusterState`] snapshot (plus
//! the moves its caller has started but the store does not show yet) and
//! returns a decision; it never touches a socket or a clock, and its tests
//! build states by hand.
//!
//! A node is **eligible** for a VM when it is up (not in maintenance, not
//! down), offers every CPU feature the VM was started with, has the memory and
//! a VM slot free (counting the memory reserved by migrations to it), and
//! shares at least one network allowed for live migration with the source.
//! Eligible nodes already in as many migrations as the cluster allows are
//! **busy**: the VM waits for them rather than being reported as stuck.
//!
//! Among the eligible, free nodes the rule is *fewest VMs first*, then most
//! free memory, then fewest migrations under way, then the lowest id (so every
//! replica of the decision agrees). Fewest VMs spreads a draining node's VMs
//! evenly, which is what a failover cluster does and what an operator expects
//! to see; memory breaks ties so that equal counts still balance the resource
//! that actually limits a host; the id keeps the choice deterministic. Callers
//! that place several VMs at once (a drain) place the largest first — first
//! fit decreasing — so a big VM is not left without room by small ones.
//!
//! The second half answers "over which networks": the networks allowed for
//! live migration in their configured order, mapped to the target's socket
//! address on each; the first two that are reachable carry the page stream
//! (the seed's two redundant private networks) and a reachable later one
//! takes the place of an unreachable earlier one.

use ferry_cluster::model::{ClusterState, NodeState, Vm};
use ferry_cluster::NodeId;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// How many networks carry one migration's page stream at once.
pub const REDUNDANT_PATHS: usize = 2;

/// Load a caller has committed to a node that the store does not show yet
/// (a move it is about to begin).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reservation {
    pub memory_bytes: u64,
    pub vms: u32,
    pub migrations: u32,
}

impl Reservation {
    /// What one more incoming VM of `memory_bytes` adds.
    pub fn incoming(memory_bytes: u64) -> Self {
        Reservation {
            memory_bytes,
            vms: 1,
            migrations: 1,
        }
    }

    pub fn add(&mut self, other: Reservation) {
        self.memory_bytes = self.memory_bytes.saturating_add(other.memory_bytes);
        self.vms += other.vms;
        self.migrations += other.migrations;
    }
}

/// Why a node cannot take a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unfit {
    /// It is where the VM runs.
    Source,
    /// In maintenance mode: nothing lands on it.
    Paused,
    Down,
    /// It lacks CPU features the VM was started with.
    MissingCpuFeatures(Vec<String>),
    LacksMemory {
        needed: u64,
        free: u64,
    },
    NoVmSlot {
        max_vms: u32,
    },
    /// It shares no network allowed for live migration with the source.
    NoMigrationNetwork,
    /// The caller ruled it out (a tip will not move load onto a node that
    /// would then be over its own threshold), with the caller's reason.
    Excluded(String),
}

impl fmt::Display for Unfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unfit::Source => f.write_str("runs the VM already"),
            Unfit::Paused => f.write_str("is in maintenance mode"),
            Unfit::Down => f.write_str("is down"),
            Unfit::MissingCpuFeatures(missing) => write!(f, "lacks CPU features {missing:?}"),
            Unfit::LacksMemory { needed, free } => write!(
                f,
                "lacks memory: needs {} MiB, has {} MiB free",
                needed >> 20,
                free >> 20
            ),
            Unfit::NoVmSlot { max_vms } => write!(f, "has no VM slot free (at most {max_vms})"),
            Unfit::NoMigrationNetwork => {
                f.write_str("shares no network allowed for live migration with the source")
            }
            Unfit::Excluded(why) => f.write_str(why),
        }
    }
}

/// One node's standing for a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub node: NodeId,
    pub name: String,
    /// `Ok` with the node's score when eligible, the reason otherwise.
    pub fit: Result<Score, Unfit>,
}

/// What the ranking compares, lower is better (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Score {
    pub vms: u32,
    /// Free memory after the move, negated through `u64::MAX - free`.
    pub memory_taken: u64,
    pub migrations: u32,
    pub node: NodeId,
}

/// The placement decision for one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Move it here now.
    Target(NodeId),
    /// Eligible nodes exist, but they (or the source) are at the
    /// simultaneous-migration limit: try again when a migration ends.
    Busy { eligible: Vec<NodeId> },
    /// No node can take it; every other node with the reason.
    NoTarget {
        reasons: Vec<(NodeId, String, Unfit)>,
    },
}

impl Placement {
    /// A sentence naming every node and why it cannot take the VM (for
    /// [`Placement::NoTarget`]), as a drain reports a stuck VM.
    pub fn explain(&self) -> String {
        match self {
            Placement::Target(node) => format!("node {node} can take it"),
            Placement::Busy { eligible } => {
                format!("nodes {eligible:?} can take it once a migration slot frees")
            }
            Placement::NoTarget { reasons } if reasons.is_empty() => {
                "no eligible target: the cluster has no other node".into()
            }
            Placement::NoTarget { reasons } => {
                let each: Vec<String> = reasons
                    .iter()
                    .map(|(id, name, why)| format!("node {id} ({name}) {why}"))
                    .collect();
                format!("no eligible target: {}", each.join("; "))
            }
        }
    }
}

/// Every node's standing for `vm`, best first (eligible ones ranked, then the
/// others by id). `pending` adds load the store does not show yet; `exclude`
/// rules nodes out with the caller's reason.
pub fn rank(
    state: &ClusterState,
    vm: &Vm,
    pending: &BTreeMap<NodeId, Reservation>,
    exclude: &BTreeMap<NodeId, String>,
) -> Vec<Candidate> {
    let source = vm.owner;
    let mut out: Vec<Candidate> = state
        .nodes
        .values()
        .map(|node| Candidate {
            node: node.id,
            name: node.name.clone(),
            fit: fit(state, vm, node.id, pending, exclude),
        })
        .filter(|c| c.node != source)
        .collect();
    out.sort_by(|a, b| match (&a.fit, &b.fit) {
        (Ok(x), Ok(y)) => x.cmp(y),
        (Ok(_), Err(_)) => std::cmp::Ordering::Less,
        (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
        (Err(_), Err(_)) => a.node.cmp(&b.node),
    });
    out
}

fn fit(
    state: &ClusterState,
    vm: &Vm,
    target: NodeId,
    pending: &BTreeMap<NodeId, Reservation>,
    exclude: &BTreeMap<NodeId, String>,
) -> Result<Score, Unfit> {
    let node = state.nodes.get(&target).ok_or(Unfit::Down)?;
    if target == vm.owner {
        return Err(Unfit::Source);
    }
    match node.state {
        NodeState::Up => {}
        NodeState::Paused => return Err(Unfit::Paused),
        NodeState::Down => return Err(Unfit::Down),
    }
    let missing: Vec<String> = vm
        .cpu_features
        .iter()
        .filter(|f| !node.cpu_features.contains(*f))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(Unfit::MissingCpuFeatures(missing));
    }
    let mut load = state.node_load(target);
    let extra = pending.get(&target).copied().unwrap_or_default();
    load.memory_bytes = load.memory_bytes.saturating_add(extra.memory_bytes);
    load.vms += extra.vms;
    load.migrations += extra.migrations;
    let free = node.capacity.memory_bytes.saturating_sub(load.memory_bytes);
    if vm.config.memory_bytes > free {
        return Err(Unfit::LacksMemory {
            needed: vm.config.memory_bytes,
            free,
        });
    }
    if load.vms >= node.capacity.max_vms {
        return Err(Unfit::NoVmSlot {
            max_vms: node.capacity.max_vms,
        });
    }
    if state.migration_paths(vm.owner, target).is_empty() {
        return Err(Unfit::NoMigrationNetwork);
    }
    if let Some(why) = exclude.get(&target) {
        return Err(Unfit::Excluded(why.clone()));
    }
    Ok(Score {
        vms: load.vms,
        memory_taken: u64::MAX - (free - vm.config.memory_bytes),
        migrations: load.migrations,
        node: target,
    })
}

/// Where `vm` should move now. See the module doc for the rule.
pub fn place(
    state: &ClusterState,
    vm: &Vm,
    pending: &BTreeMap<NodeId, Reservation>,
    exclude: &BTreeMap<NodeId, String>,
) -> Placement {
    let ranked = rank(state, vm, pending, exclude);
    let limit = state.settings.max_migrations_per_node;
    let eligible: Vec<&Candidate> = ranked.iter().filter(|c| c.fit.is_ok()).collect();
    if eligible.is_empty() {
        return Placement::NoTarget {
            reasons: ranked
                .into_iter()
                .filter_map(|c| c.fit.err().map(|why| (c.node, c.name, why)))
                .collect(),
        };
    }
    let source_busy = {
        let extra = pending.get(&vm.owner).copied().unwrap_or_default();
        state.node_load(vm.owner).migrations + extra.migrations >= limit
    };
    let free = eligible
        .iter()
        .find(|c| matches!(&c.fit, Ok(score) if score.migrations < limit));
    match free {
        Some(c) if !source_busy => Placement::Target(c.node),
        _ => Placement::Busy {
            eligible: eligible.iter().map(|c| c.node).collect(),
        },
    }
}

/// A network live migration may use between two nodes, with where the target
/// listens on it (`None`: this node knows no address for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPath {
    pub network: String,
    /// The target's address on the network, as the store records it.
    pub ip: IpAddr,
    /// The socket to dial for it.
    pub addr: Option<SocketAddr>,
}

/// The allowed migration networks between `source` and `target` in their
/// configured order, each mapped to a socket by `resolve(network, ip)`.
pub fn candidate_paths(
    state: &ClusterState,
    source: NodeId,
    target: NodeId,
    resolve: impl Fn(&str, IpAddr) -> Option<SocketAddr>,
) -> Vec<NetworkPath> {
    state
        .migration_paths(source, target)
        .into_iter()
        .map(|(net, _, ip)| NetworkPath {
            network: net.name.clone(),
            ip,
            addr: resolve(&net.name, ip),
        })
        .collect()
}

/// Picks the page-stream paths: the first [`REDUNDANT_PATHS`] candidates that
/// are reachable, in order. `reachable[i]` says whether candidate `i` answered
/// (a candidate without an address never does). Returns the indices used.
pub fn pick_paths(candidates: &[NetworkPath], reachable: &[bool]) -> Vec<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(i, c)| c.addr.is_some() && reachable.get(*i).copied().unwrap_or(false))
        .map(|(i, _)| i)
        .take(REDUNDANT_PATHS)
        .collect()
}

/// The VMs running on `node`, largest first (the order a drain places them).
pub fn largest_first<'a>(state: &'a ClusterState, names: &BTreeSet<String>) -> Vec<&'a Vm> {
    let mut vms: Vec<&Vm> = names.iter().filter_map(|n| state.vms.get(n)).collect();
    vms.sort_by(|a, b| {
        b.config
            .memory_bytes
            .cmp(&a.config.memory_bytes)
            .then_with(|| a.name.cmp(&b.name))
    });
    vms
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_cluster::model::{
        Capacity, MacAddr, MigrationTrigger, StorageSpec, Subnet, VmConfig,
    };
    use ferry_cluster::{apply, Command};
    use std::net::Ipv4Addr;

    const MIB: u64 = 1 << 20;

    fn features(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// Nodes 1..=n on networks mig-1 and mig-2, each with `memory` and
    /// `features[i]`; VMs are added by the tests.
    fn cluster(n: u64, memory: u64, cpu: &[&[&str]]) -> ClusterState {
        let mut s = ClusterState::default();
        for k in [1u8, 2] {
            apply(
                &mut s,
                Command::DefineNetwork {
                    name: format!("mig-{k}"),
                    subnet: Subnet {
                        addr: IpAddr::V4(Ipv4Addr::new(10, k, 0, 0)),
                        prefix: 16,
                    },
                    gateway: None,
                },
            )
            .unwrap();
        }
        for id in 1..=n {
            apply(
                &mut s,
                Command::AddNode {
                    id,
                    name: format!("node-{id}"),
                    addresses: [1u8, 2]
                        .iter()
                        .map(|k| {
                            (
                                format!("mig-{k}"),
                                IpAddr::V4(Ipv4Addr::new(10, *k, 0, id as u8)),
                            )
                        })
                        .collect(),
                    cpu_features: features(cpu.get(id as usize - 1).copied().unwrap_or(&[])),
                    capacity: Capacity {
                        memory_bytes: memory,
                        max_vms: 4,
                    },
                    tcp_offload: false,
                },
            )
            .unwrap();
        }
        s
    }

    fn run_vm(s: &mut ClusterState, name: &str, node: NodeId, memory: u64, mac: u8) {
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

    fn none() -> (BTreeMap<NodeId, Reservation>, BTreeMap<NodeId, String>) {
        (BTreeMap::new(), BTreeMap::new())
    }

    #[test]
    fn fewest_vms_first_then_most_free_memory_then_lowest_id() {
        let mut s = cluster(4, 1024 * MIB, &[]);
        run_vm(&mut s, "a", 1, 64 * MIB, 1);
        run_vm(&mut s, "b", 2, 64 * MIB, 2);
        run_vm(&mut s, "c", 3, 256 * MIB, 3);
        let (p, x) = none();
        // Node 4 has no VM: it wins.
        assert_eq!(place(&s, &s.vms["a"], &p, &x), Placement::Target(4));
        run_vm(&mut s, "d", 4, 512 * MIB, 4);
        // 2, 3 and 4 hold one VM each; 2 has the most memory free.
        assert_eq!(place(&s, &s.vms["a"], &p, &x), Placement::Target(2));
        // Equal everything: the lowest id.
        let mut t = cluster(3, 1024 * MIB, &[]);
        run_vm(&mut t, "a", 1, 64 * MIB, 1);
        assert_eq!(place(&t, &t.vms["a"], &p, &x), Placement::Target(2));
        // A reservation the store does not show yet counts.
        let pending = BTreeMap::from([(2, Reservation::incoming(64 * MIB))]);
        assert_eq!(place(&t, &t.vms["a"], &pending, &x), Placement::Target(3));
    }

    #[test]
    fn ineligible_nodes_are_named_with_their_reason() {
        let mut s = cluster(
            4,
            256 * MIB,
            &[
                &["sse4", "avx512"],
                &["sse4"],
                &["sse4", "avx512"],
                &["sse4", "avx512"],
            ],
        );
        run_vm(&mut s, "big", 1, 200 * MIB, 1);
        run_vm(&mut s, "filler", 3, 100 * MIB, 2);
        apply(
            &mut s,
            Command::PauseNode {
                node: 4,
                drain: false,
            },
        )
        .unwrap();
        let (p, x) = none();
        let placement = place(&s, &s.vms["big"], &p, &x);
        let Placement::NoTarget { reasons } = &placement else {
            panic!("{placement:?}")
        };
        assert_eq!(
            reasons
                .iter()
                .map(|(n, _, why)| (*n, why.clone()))
                .collect::<Vec<_>>(),
            vec![
                (2, Unfit::MissingCpuFeatures(vec!["avx512".into()])),
                (
                    3,
                    Unfit::LacksMemory {
                        needed: 200 * MIB,
                        free: 156 * MIB
                    }
                ),
                (4, Unfit::Paused),
            ]
        );
        let text = placement.explain();
        assert!(
            text.contains("node 2 (node-2) lacks CPU features [\"avx512\"]"),
            "{text}"
        );
        assert!(text.contains("maintenance"), "{text}");
    }

    #[test]
    fn a_node_without_a_shared_migration_network_or_slot_is_ineligible() {
        let mut s = cluster(3, 1024 * MIB, &[]);
        run_vm(&mut s, "a", 1, 64 * MIB, 1);
        for net in ["mig-1", "mig-2"] {
            apply(
                &mut s,
                Command::SetNodeAddress {
                    node: 2,
                    network: net.into(),
                    address: None,
                },
            )
            .unwrap();
        }
        s.nodes.get_mut(&3).unwrap().capacity.max_vms = 1;
        run_vm(&mut s, "b", 3, 64 * MIB, 2);
        let (p, x) = none();
        let Placement::NoTarget { reasons } = place(&s, &s.vms["a"], &p, &x) else {
            panic!()
        };
        assert_eq!(reasons[0].2, Unfit::NoMigrationNetwork);
        assert_eq!(reasons[1].2, Unfit::NoVmSlot { max_vms: 1 });
    }

    #[test]
    fn at_the_migration_limit_the_vm_waits_instead_of_failing() {
        let mut s = cluster(3, 1024 * MIB, &[]);
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            run_vm(&mut s, name, 1, 64 * MIB, i as u8 + 1);
        }
        for (vm, target) in [("a", 2), ("b", 3)] {
            apply(
                &mut s,
                Command::BeginMigration {
                    vm: vm.into(),
                    source: 1,
                    target,
                    trigger: MigrationTrigger::Drain,
                    at_ms: 1,
                },
            )
            .unwrap();
        }
        let (p, x) = none();
        // The source takes part in two migrations, the default limit.
        assert_eq!(
            place(&s, &s.vms["c"], &p, &x),
            Placement::Busy {
                eligible: vec![2, 3]
            }
        );
        s.settings.max_migrations_per_node = 3;
        // Nodes 2 and 3 are equal (one incoming each): the lower id.
        assert_eq!(place(&s, &s.vms["c"], &p, &x), Placement::Target(2));
        // An excluded node is ineligible, with the caller's reason.
        let x = BTreeMap::from([(2, "over its CPU threshold".to_string())]);
        assert_eq!(place(&s, &s.vms["c"], &p, &x), Placement::Target(3));
    }

    #[test]
    fn the_first_two_reachable_networks_carry_the_stream() {
        let path = |name: &str, port: Option<u16>| NetworkPath {
            network: name.into(),
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            addr: port.map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p)),
        };
        let c = vec![
            path("a", Some(1)),
            path("b", Some(2)),
            path("c", Some(3)),
            path("d", None),
        ];
        assert_eq!(pick_paths(&c, &[true, true, true, true]), vec![0, 1]);
        // "a" is unreachable: "c" takes its place.
        assert_eq!(pick_paths(&c, &[false, true, true, true]), vec![1, 2]);
        // Only one left: one path.
        assert_eq!(pick_paths(&c, &[false, false, true, false]), vec![2]);
        // An unknown address never counts, whatever the probe said.
        assert_eq!(
            pick_paths(&c, &[false, false, false, true]),
            Vec::<usize>::new()
        );
    }

    #[test]
    fn candidate_paths_follow_the_configured_order_of_allowed_networks() {
        let mut s = cluster(2, 1024 * MIB, &[]);
        apply(
            &mut s,
            Command::OrderMigrationNetworks {
                order: vec!["mig-2".into()],
            },
        )
        .unwrap();
        let resolve = |net: &str, ip: IpAddr| (net == "mig-1").then(|| SocketAddr::new(ip, 7));
        let c = candidate_paths(&s, 1, 2, resolve);
        assert_eq!(
            c.iter().map(|p| p.network.as_str()).collect::<Vec<_>>(),
            vec!["mig-2", "mig-1"]
        );
        assert_eq!(c[0].addr, None);
        assert_eq!(c[1].addr, Some("10.1.0.2:7".parse().unwrap()));
    }

    #[test]
    fn a_drain_places_the_largest_vm_first() {
        let mut s = cluster(2, 4096 * MIB, &[]);
        run_vm(&mut s, "small", 1, 32 * MIB, 1);
        run_vm(&mut s, "big", 1, 512 * MIB, 2);
        run_vm(&mut s, "mid", 1, 128 * MIB, 3);
        let names: BTreeSet<String> = s.vms.keys().cloned().collect();
        let order: Vec<&str> = largest_first(&s, &names)
            .iter()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(order, vec!["big", "mid", "small"]);
    }
}
