//! The replicated cluster model: one [`ClusterState`] value that every node holds a copy of.
//!
//! Everything the cluster decides lives here — its nodes and their maintenance state, the
//! networks and which of them carry live migrations, the VMs with their owner and ownership
//! epoch, the migrations with their phase and outcome, the policy tips and the settings. The
//! state changes only through [`crate::apply()`]; this module holds the plain data and the
//! read-only questions the rest of Ferry asks of it (which networks may carry a migration,
//! how loaded a node is, which baseline of CPU features every node offers).
//!
//! Every map is a `BTreeMap` so that iteration, serialization and therefore `apply` are
//! deterministic on every replica.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A node's identity in the cluster; the same number names it in Raft and in the transport.
pub type NodeId = u64;
/// A migration's identity, assigned by the state machine when the migration begins.
pub type MigrationId = u64;
/// A policy tip's identity, assigned by the state machine when the tip is raised.
pub type TipId = u64;

/// How many finished migrations (and resolved tips) the state keeps as history; older ones are
/// dropped, oldest first, so snapshots stay small.
pub const HISTORY_LIMIT: usize = 512;

/// The whole replicated state of a Ferry cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Cluster members by id.
    pub nodes: BTreeMap<NodeId, Node>,
    /// Networks by name.
    pub networks: BTreeMap<String, Network>,
    /// Every network's name, in the order in which live migration prefers them. Only the
    /// networks allowed for migration (see [`Network::allowed_for_migration`]) are used.
    pub migration_order: Vec<String>,
    /// Virtual machines by name.
    pub vms: BTreeMap<String, Vm>,
    /// Active migrations and recent history, by id.
    pub migrations: BTreeMap<MigrationId, Migration>,
    /// Policy tips (the seed's PRO tips), by id.
    pub tips: BTreeMap<TipId, Tip>,
    /// Cluster-wide settings.
    pub settings: Settings,
    /// The id the next migration gets.
    pub next_migration_id: MigrationId,
    /// The id the next tip gets.
    pub next_tip_id: TipId,
    /// Removed nodes, whose certificates issued before their removal every
    /// node refuses (`ferry_transport::revocation`). Kept out of the state's
    /// own encoding: a snapshot carries it after the rest
    /// (`store/state_machine.rs`), so a snapshot of the build before reads as
    /// an empty list, and the build before reads a newer one, ignoring it.
    #[serde(skip)]
    pub revoked: BTreeMap<NodeId, Revocation>,
}

/// A removed node's entry on the revocation list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The name the node had.
    pub name: String,
    /// When it was removed: its certificates issued (`notBefore`) up to then
    /// are refused.
    pub at_ms: u64,
}

/// A cluster member as the model sees it (its Raft membership is tracked by Raft itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    pub name: String,
    /// The node's address on each network it is attached to, by network name.
    pub addresses: BTreeMap<String, IpAddr>,
    /// The CPU features the node offers (from configuration, or CPUID on KVM nodes).
    pub cpu_features: BTreeSet<String>,
    pub capacity: Capacity,
    /// Whether the node's NICs can take offloaded TCP state back after a migration.
    pub tcp_offload: bool,
    pub state: NodeState,
    /// Progress of a maintenance drain, recorded by the node that runs it.
    pub drain: DrainStatus,
    /// Why and when the node was declared down, while it is [`NodeState::Down`].
    pub down: Option<Downed>,
}

/// Why a node is down: what the failure detector (or an operator, or the node's own
/// shutdown) said, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Downed {
    pub reason: String,
    pub at_ms: u64,
}

/// What a node can host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Guest memory the node can hold, in bytes.
    pub memory_bytes: u64,
    /// How many VMs may run on the node at once.
    pub max_vms: u32,
}

/// A node's life-cycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Serving: VMs may start on it and migrate to it.
    Up,
    /// Maintenance mode: running VMs stay (or drain away), but nothing new lands on it.
    Paused,
    /// Declared dead: its VMs need a restart elsewhere.
    Down,
}

/// Progress of a maintenance drain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DrainStatus {
    /// No drain was asked for.
    #[default]
    Idle,
    /// VMs are being moved off the node.
    Draining,
    /// Every VM left the node.
    Drained,
    /// Some VMs could not leave; each is named with the reason.
    Failed { stuck: Vec<StuckVm> },
}

/// A VM a drain could not move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StuckVm {
    pub vm: String,
    pub reason: String,
}

/// An IP subnet, `addr/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Subnet {
    /// The largest valid prefix length for this subnet's address family.
    pub fn max_prefix(&self) -> u8 {
        match self.addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        }
    }

    /// Whether the prefix length fits the address family.
    pub fn is_valid(&self) -> bool {
        self.prefix <= self.max_prefix()
    }

    fn masked(addr: IpAddr, prefix: u8) -> Option<u128> {
        match addr {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                let mask = if prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(prefix.min(32)))
                };
                Some(u128::from(bits & mask))
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                let mask = if prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(prefix.min(128)))
                };
                Some(bits & mask)
            }
        }
    }

    /// Whether `ip` lies inside this subnet.
    pub fn contains(&self, ip: IpAddr) -> bool {
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        Self::masked(ip, self.prefix) == Self::masked(self.addr, self.prefix)
    }

    /// Whether the two subnets share any address.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        if self.addr.is_ipv4() != other.addr.is_ipv4() {
            return false;
        }
        let p = self.prefix.min(other.prefix);
        Self::masked(self.addr, p) == Self::masked(other.addr, p)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The text is not `address/prefix`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a subnet (address/prefix): {0:?}")]
pub struct SubnetParseError(pub String);

impl FromStr for Subnet {
    type Err = SubnetParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || SubnetParseError(s.to_string());
        let (addr, prefix) = s.split_once('/').ok_or_else(err)?;
        let subnet = Subnet {
            addr: addr.parse().map_err(|_| err())?,
            prefix: prefix.parse().map_err(|_| err())?,
        };
        if subnet.is_valid() {
            Ok(subnet)
        } else {
            Err(err())
        }
    }
}

/// A network's role, derived from whether it has a gateway (as in a failover cluster).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetworkRole {
    /// No gateway: a cluster-internal network, used for live migration by default.
    Private,
    /// Has a gateway: reaches clients, used for live migration only when a user allows it.
    Public,
}

/// A user's choice about carrying live migrations on a network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationUse {
    /// Follow the role: private networks carry migrations, public ones do not.
    #[default]
    Default,
    /// Carry migrations whatever the role.
    Allow,
    /// Never carry migrations.
    Forbid,
}

/// A network the cluster's nodes are attached to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    pub subnet: Subnet,
    pub gateway: Option<IpAddr>,
    pub migration: MigrationUse,
}

impl Network {
    /// Public when a gateway is defined, private otherwise.
    pub fn role(&self) -> NetworkRole {
        if self.gateway.is_some() {
            NetworkRole::Public
        } else {
            NetworkRole::Private
        }
    }

    /// Whether live migration traffic may use this network.
    pub fn allowed_for_migration(&self) -> bool {
        match self.migration {
            MigrationUse::Default => self.role() == NetworkRole::Private,
            MigrationUse::Allow => true,
            MigrationUse::Forbid => false,
        }
    }
}

/// A six-byte Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Which virtual machine monitor runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backend {
    /// The simulated guest (memory and a workload, no hardware virtualization).
    Sim,
    /// A KVM guest.
    Kvm,
    /// A QEMU process running a Linux guest; it migrates itself as one byte
    /// stream, which Ferry carries and fences.
    Qemu,
}

/// Where a VM's disk lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StorageSpec {
    /// On a cluster-shared volume: every node reaches it, nothing moves with the VM.
    Shared { volume: String },
    /// On the owning node's local disk: its ownership moves with the VM at switchover.
    Local { size_bytes: u64 },
}

/// What a VM is made of; fixed when it is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub mac: MacAddr,
    pub backend: Backend,
    /// The workload the guest runs, opaque to the cluster store (the `vmm` crate reads it).
    pub workload: Vec<u8>,
    pub storage: StorageSpec,
    /// What happens to the VM when its node dies.
    pub failover: Failover,
}

/// A VM's failover choice: whether the cluster restarts it on another node when its node
/// dies (a cold start: its memory died with the node), and in which order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failover {
    /// Restart it elsewhere; otherwise it stays `NeedsRestart` until a user acts.
    pub restart: bool,
    /// Higher restarts first when a node's VMs compete for the survivors' room.
    pub priority: u32,
}

impl Default for Failover {
    fn default() -> Self {
        Failover {
            restart: true,
            priority: 0,
        }
    }
}

/// The highest failover priority a VM may have.
pub const MAX_FAILOVER_PRIORITY: u32 = 1000;

/// A VM's life-cycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Defined but not running anywhere.
    Off,
    /// Running on its owner.
    Running,
    /// Running on its owner (the source) while a migration copies it to a target.
    Migrating,
    /// Its owner died while it ran: it must be started again (§5.2: never lost silently).
    NeedsRestart,
}

/// A virtual machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub name: String,
    pub config: VmConfig,
    /// The node that runs it (or would, when started). Only the owner may run the guest.
    pub owner: NodeId,
    pub state: VmState,
    /// Grows by one every time the VM starts or changes hands; a switchover must name the
    /// epoch it expects, so a stale one is refused.
    pub epoch: u64,
    /// Processor-compatibility mode: start with the cluster's common CPU baseline.
    pub processor_compatibility: bool,
    /// The CPU features the guest was started with; a target must offer all of them.
    pub cpu_features: BTreeSet<String>,
    /// The node holding the VM's disk, when it is on node-local storage.
    pub disk_owner: Option<NodeId>,
    /// The active migration, if any.
    pub migration: Option<MigrationId>,
}

/// What started a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationTrigger {
    /// A user asked for this VM to move.
    User,
    /// The source node is draining for maintenance.
    Drain,
    /// A policy tip, accepted or applied automatically.
    Tip(TipId),
}

/// How far a migration has come. Phases only move forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum MigrationPhase {
    /// Committed, nothing done yet.
    Requested,
    /// The target created the VM shell and reserved its memory.
    TargetReady,
    /// Pre-copy round `n` (round 0 sends every non-zero page).
    Copying { round: u32 },
    /// The source paused the guest and sends the last pages and device state.
    StopAndCopy,
    /// The target verified what it holds; ready to switch over.
    Verified,
    /// Ownership moved to the target (set only by the switchover commit).
    SwitchedOver,
}

/// How a migration ended, or that it has not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationOutcome {
    Active,
    /// The switchover committed: the target owns the VM.
    Completed,
    /// Given up before the switchover: the VM stays with the source.
    Aborted {
        reason: String,
    },
}

/// One live migration of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    pub id: MigrationId,
    pub vm: String,
    pub source: NodeId,
    pub target: NodeId,
    pub trigger: MigrationTrigger,
    pub phase: MigrationPhase,
    pub outcome: MigrationOutcome,
    /// The VM's ownership epoch when the migration began; the switchover must present it.
    pub epoch: u64,
    /// Memory reserved on the target while the migration is active.
    pub memory_bytes: u64,
    /// Caller-supplied wall-clock times, in milliseconds since the Unix epoch.
    pub begun_at_ms: u64,
    pub updated_at_ms: u64,
    pub ended_at_ms: Option<u64>,
}

impl Migration {
    pub fn is_active(&self) -> bool {
        self.outcome == MigrationOutcome::Active
    }
}

/// Whether policy tips are raised, and who applies them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProTipMode {
    /// No tips are raised.
    Off,
    /// A tip waits for a user to accept or dismiss it; it expires otherwise.
    #[default]
    Manual,
    /// A tip is applied as soon as it is raised.
    Automatic,
}

/// A tip's life cycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TipState {
    Pending,
    Accepted,
    Dismissed,
    Expired,
    /// A migration was begun for it.
    Applied {
        migration: MigrationId,
    },
    /// It could not be applied.
    Failed {
        reason: String,
    },
}

impl TipState {
    /// Whether nothing more can happen to the tip.
    pub fn is_final(&self) -> bool {
        !matches!(self, TipState::Pending | TipState::Accepted)
    }
}

/// A policy tip: move this VM there, because of that.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tip {
    pub id: TipId,
    pub vm: String,
    pub source: NodeId,
    pub target: NodeId,
    pub reason: String,
    pub state: TipState,
    pub raised_at_ms: u64,
    pub expires_at_ms: u64,
    pub resolved_at_ms: Option<u64>,
}

/// Cluster-wide settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// The longest pause a migration may impose on a guest, in milliseconds.
    pub downtime_limit_ms: u32,
    /// A cap on migration traffic per migration, in bytes per second (`None`: no cap).
    pub bandwidth_cap_bytes_per_sec: Option<u64>,
    /// How many migrations a node may take part in at once (as source or target).
    pub max_migrations_per_node: u32,
    pub pro_tip_mode: ProTipMode,
    /// How long a node may stay silent (no lease renewal reaching the leader) before the
    /// cluster declares it down and restarts its VMs elsewhere, in milliseconds. A node
    /// fences itself (its guests stop) well before this: see `ferry_actors`' failover.
    pub failure_detection_ms: u32,
}

/// Bounds of [`Settings::failure_detection_ms`]: under a second a busy node would be
/// suspected for a scheduling hiccup; over a minute a dead node's VMs wait too long.
pub const FAILURE_DETECTION_MS: std::ops::RangeInclusive<u32> = 1000..=60_000;

impl Default for Settings {
    fn default() -> Self {
        Settings {
            downtime_limit_ms: 300,
            bandwidth_cap_bytes_per_sec: None,
            max_migrations_per_node: 2,
            pro_tip_mode: ProTipMode::Manual,
            failure_detection_ms: 3000,
        }
    }
}

/// How much of a node is in use: running VMs plus memory reserved for incoming migrations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeLoad {
    pub memory_bytes: u64,
    pub vms: u32,
    /// Active migrations the node takes part in, as source or target.
    pub migrations: u32,
}

impl ClusterState {
    /// The networks live migration may use, in the configured order.
    pub fn migration_networks(&self) -> Vec<&Network> {
        self.migration_order
            .iter()
            .filter_map(|name| self.networks.get(name))
            .filter(|n| n.allowed_for_migration())
            .collect()
    }

    /// The allowed migration networks on which both nodes have an address, in order, with the
    /// two nodes' addresses on each.
    pub fn migration_paths(&self, a: NodeId, b: NodeId) -> Vec<(&Network, IpAddr, IpAddr)> {
        let (Some(na), Some(nb)) = (self.nodes.get(&a), self.nodes.get(&b)) else {
            return Vec::new();
        };
        self.migration_networks()
            .into_iter()
            .filter_map(|net| {
                let aa = na.addresses.get(&net.name)?;
                let ab = nb.addresses.get(&net.name)?;
                Some((net, *aa, *ab))
            })
            .collect()
    }

    /// What a node currently holds: VMs running on it, memory reserved for migrations to it.
    pub fn node_load(&self, node: NodeId) -> NodeLoad {
        let mut load = NodeLoad::default();
        for vm in self.vms.values() {
            if vm.owner == node && matches!(vm.state, VmState::Running | VmState::Migrating) {
                load.memory_bytes = load.memory_bytes.saturating_add(vm.config.memory_bytes);
                load.vms += 1;
            }
        }
        for m in self.active_migrations() {
            if m.target == node {
                load.memory_bytes = load.memory_bytes.saturating_add(m.memory_bytes);
                load.vms += 1;
                load.migrations += 1;
            } else if m.source == node {
                load.migrations += 1;
            }
        }
        load
    }

    /// Migrations that have neither completed nor aborted.
    pub fn active_migrations(&self) -> impl Iterator<Item = &Migration> {
        self.migrations.values().filter(|m| m.is_active())
    }

    /// The CPU features every node offers: what a VM in processor-compatibility mode gets.
    pub fn cpu_baseline(&self) -> BTreeSet<String> {
        let mut nodes = self.nodes.values();
        let Some(first) = nodes.next() else {
            return BTreeSet::new();
        };
        let mut common = first.cpu_features.clone();
        for n in nodes {
            common.retain(|f| n.cpu_features.contains(f));
        }
        common
    }

    /// The VMs owned by a node (in any state).
    pub fn vms_on(&self, node: NodeId) -> impl Iterator<Item = &Vm> {
        self.vms.values().filter(move |vm| vm.owner == node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_contains_and_overlaps() {
        let s: Subnet = "127.1.0.0/16".parse().unwrap();
        assert!(s.contains("127.1.0.3".parse().unwrap()));
        assert!(!s.contains("127.2.0.3".parse().unwrap()));
        assert!(!s.contains("::1".parse().unwrap()));
        let t: Subnet = "127.0.0.0/8".parse().unwrap();
        assert!(s.overlaps(&t) && t.overlaps(&s));
        let u: Subnet = "127.2.0.0/16".parse().unwrap();
        assert!(!s.overlaps(&u));
        assert!("10.0.0.0/33".parse::<Subnet>().is_err());
        assert!("10.0.0.0".parse::<Subnet>().is_err());
        let all: Subnet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert_eq!(s.to_string(), "127.1.0.0/16");
    }

    #[test]
    fn network_role_follows_gateway() {
        let mut n = Network {
            name: "a".into(),
            subnet: "10.0.0.0/24".parse().unwrap(),
            gateway: None,
            migration: MigrationUse::Default,
        };
        assert_eq!(n.role(), NetworkRole::Private);
        assert!(n.allowed_for_migration());
        n.gateway = Some("10.0.0.1".parse().unwrap());
        assert_eq!(n.role(), NetworkRole::Public);
        assert!(!n.allowed_for_migration());
        n.migration = MigrationUse::Allow;
        assert!(n.allowed_for_migration());
    }
}
