//! The typed commands that change the cluster state, their responses and their refusals.
//!
//! A command is what a client proposes; Raft orders and replicates it; [`crate::apply()`]
//! validates it against the state and either changes the state and answers with a
//! [`Response`], or refuses with a [`CommandError`] and changes nothing. The refusal is part of
//! the replicated result, so every replica agrees on it.
//!
//! Times are data: a command that records when something happened carries the caller's
//! wall-clock reading (`at_ms`, milliseconds since the Unix epoch); `apply` never reads a clock.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::model::{
    Capacity, DrainStatus, MacAddr, MigrationId, MigrationOutcome, MigrationPhase,
    MigrationTrigger, MigrationUse, NodeId, NodeState, Settings, Subnet, TipId, TipState, VmConfig,
    VmState,
};

/// A change to the cluster state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    // ---- nodes ----
    /// Register a node. Its addresses must lie on defined networks.
    AddNode {
        id: NodeId,
        name: String,
        addresses: BTreeMap<String, IpAddr>,
        cpu_features: BTreeSet<String>,
        capacity: Capacity,
        tcp_offload: bool,
    },
    /// Forget a node. Refused while it owns VMs or disks or takes part in a migration.
    RemoveNode {
        node: NodeId,
    },
    /// Put a node in maintenance mode; with `drain`, its VMs are to be moved off.
    PauseNode {
        node: NodeId,
        drain: bool,
    },
    /// Take a node out of maintenance mode.
    ResumeNode {
        node: NodeId,
    },
    /// Record a maintenance drain's progress (only while the node is paused).
    RecordDrain {
        node: NodeId,
        status: DrainStatus,
    },
    /// Declare a node dead: its active migrations abort, its running VMs need a restart.
    /// Only safe once the node can no longer run them (its lease has expired, or it is
    /// known to be stopped): the failure detector and a node's own shutdown write it.
    MarkNodeDown {
        node: NodeId,
        reason: String,
        at_ms: u64,
    },
    /// Declare a dead node alive again.
    MarkNodeUp {
        node: NodeId,
    },
    /// Set (or with `None`, remove) a node's address on a network.
    SetNodeAddress {
        node: NodeId,
        network: String,
        address: Option<IpAddr>,
    },

    // ---- networks ----
    /// Define a network. It joins the end of the migration order.
    DefineNetwork {
        name: String,
        subnet: Subnet,
        gateway: Option<IpAddr>,
    },
    /// Remove a network no node is attached to.
    RemoveNetwork {
        name: String,
    },
    /// Set or clear a network's gateway, which makes it public or private.
    SetNetworkGateway {
        name: String,
        gateway: Option<IpAddr>,
    },
    /// Allow or forbid live migration on a network, or return it to its role's default.
    SetNetworkMigration {
        name: String,
        migration: MigrationUse,
    },
    /// Put the named networks first in the migration order, in this order; the rest follow in
    /// their previous order.
    OrderMigrationNetworks {
        order: Vec<String>,
    },

    // ---- VMs ----
    /// Define a VM, off, placed on `node`.
    CreateVm {
        name: String,
        config: VmConfig,
        node: NodeId,
    },
    /// Delete a VM that is not running.
    DeleteVm {
        vm: String,
    },
    /// Start a VM on `node` (its owner from then on); records the CPU features it gets.
    StartVm {
        vm: String,
        node: NodeId,
    },
    /// Stop a running VM (or acknowledge one that needs a restart). With `epoch`, only the
    /// VM as it was at that epoch: a stop issued before a switchover or a restart must not
    /// stop the VM that now runs elsewhere.
    StopVm {
        vm: String,
        epoch: Option<u64>,
    },
    /// The owner lost a running VM (it restarted and the guest's memory went with the
    /// process): the VM needs a restart. Only at `epoch`, only by a running VM.
    VmLost {
        vm: String,
        epoch: u64,
    },
    /// Turn processor-compatibility mode on or off; only while the VM is off.
    SetProcessorCompatibility {
        vm: String,
        enabled: bool,
    },

    // ---- migrations ----
    /// Begin a live migration of a running VM from `source` to `target`.
    BeginMigration {
        vm: String,
        source: NodeId,
        target: NodeId,
        trigger: MigrationTrigger,
        at_ms: u64,
    },
    /// Record how far an active migration has come.
    RecordMigrationPhase {
        migration: MigrationId,
        phase: MigrationPhase,
        at_ms: u64,
    },
    /// The single point where a VM changes hands: owner = target, epoch + 1.
    CommitSwitchover {
        migration: MigrationId,
        expected_epoch: u64,
        at_ms: u64,
    },
    /// Give up an active migration; the VM stays with the source.
    AbortMigration {
        migration: MigrationId,
        reason: String,
        at_ms: u64,
    },

    // ---- policy tips ----
    /// Raise a tip: move `vm` to `target`, because of `reason`.
    RaiseTip {
        vm: String,
        target: NodeId,
        reason: String,
        at_ms: u64,
        expires_at_ms: u64,
    },
    /// Move a tip on in its life cycle (accept, dismiss, expire, applied, failed).
    ResolveTip {
        tip: TipId,
        state: TipState,
        at_ms: u64,
    },

    // ---- settings ----
    UpdateSettings {
        settings: Settings,
    },
    // ---- added after the first release: new variants go last, so the log
    // entries of the build before keep their encoding ----
    /// Remove a node for good (`ferry node remove`): refused, like
    /// `RemoveNode`, while it owns VMs or disks or takes part in a migration;
    /// then forgotten, and its certificates issued up to `at_ms` revoked.
    RetireNode {
        node: NodeId,
        at_ms: u64,
    },
}

impl Command {
    /// The command's name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Command::AddNode { .. } => "AddNode",
            Command::RemoveNode { .. } => "RemoveNode",
            Command::PauseNode { .. } => "PauseNode",
            Command::ResumeNode { .. } => "ResumeNode",
            Command::RecordDrain { .. } => "RecordDrain",
            Command::MarkNodeDown { .. } => "MarkNodeDown",
            Command::MarkNodeUp { .. } => "MarkNodeUp",
            Command::SetNodeAddress { .. } => "SetNodeAddress",
            Command::DefineNetwork { .. } => "DefineNetwork",
            Command::RemoveNetwork { .. } => "RemoveNetwork",
            Command::SetNetworkGateway { .. } => "SetNetworkGateway",
            Command::SetNetworkMigration { .. } => "SetNetworkMigration",
            Command::OrderMigrationNetworks { .. } => "OrderMigrationNetworks",
            Command::CreateVm { .. } => "CreateVm",
            Command::DeleteVm { .. } => "DeleteVm",
            Command::StartVm { .. } => "StartVm",
            Command::StopVm { .. } => "StopVm",
            Command::VmLost { .. } => "VmLost",
            Command::SetProcessorCompatibility { .. } => "SetProcessorCompatibility",
            Command::BeginMigration { .. } => "BeginMigration",
            Command::RecordMigrationPhase { .. } => "RecordMigrationPhase",
            Command::CommitSwitchover { .. } => "CommitSwitchover",
            Command::AbortMigration { .. } => "AbortMigration",
            Command::RaiseTip { .. } => "RaiseTip",
            Command::ResolveTip { .. } => "ResolveTip",
            Command::UpdateSettings { .. } => "UpdateSettings",
            Command::RetireNode { .. } => "RetireNode",
        }
    }
}

/// What an accepted command reports back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Accepted; nothing more to say.
    Done,
    /// A node was declared dead.
    NodeMarkedDown {
        /// Migrations it took part in, now aborted.
        aborted: Vec<MigrationId>,
        /// VMs that ran on it and must be restarted elsewhere.
        needs_restart: Vec<String>,
    },
    /// A VM started.
    VmStarted {
        node: NodeId,
        epoch: u64,
        cpu_features: BTreeSet<String>,
    },
    /// A migration was recorded; the job may start copying.
    MigrationBegun { id: MigrationId, epoch: u64 },
    /// The switchover committed: `owner` now owns the VM, at `epoch`.
    SwitchedOver {
        vm: String,
        owner: NodeId,
        epoch: u64,
    },
    /// The migration was aborted; the VM stays with `owner`.
    MigrationAborted { vm: String, owner: NodeId },
    /// A tip was raised.
    TipRaised { id: TipId },
}

/// The resource a node lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resource {
    /// Guest memory, in bytes.
    Memory,
    /// VM slots.
    VmSlots,
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Memory => f.write_str("memory bytes"),
            Resource::VmSlots => f.write_str("VM slots"),
        }
    }
}

/// Why a command was refused. The state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    // ---- names and input ----
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("invalid {field}: {reason}")]
    InvalidValue { field: String, reason: String },

    // ---- nodes ----
    #[error("unknown node {node}")]
    UnknownNode { node: NodeId },
    #[error("node {node} already exists")]
    NodeExists { node: NodeId },
    #[error("node name {name:?} is taken by node {node}")]
    NodeNameTaken { name: String, node: NodeId },
    #[error("address {address} is outside network {network}'s subnet {subnet}")]
    AddressOutsideSubnet {
        network: String,
        address: IpAddr,
        subnet: Subnet,
    },
    #[error("address {address} is already used by node {node}")]
    AddressInUse { address: IpAddr, node: NodeId },
    #[error("node {node} is already in maintenance mode")]
    NodeAlreadyPaused { node: NodeId },
    #[error("node {node} is not in maintenance mode (it is {state:?})")]
    NodeNotPaused { node: NodeId, state: NodeState },
    #[error("node {node} is in maintenance mode")]
    NodePaused { node: NodeId },
    #[error("node {node} is down")]
    NodeDown { node: NodeId },
    #[error("node {node} is not down")]
    NodeNotDown { node: NodeId },
    #[error("node {node} still holds VMs {vms:?}")]
    NodeHasVms { node: NodeId, vms: Vec<String> },
    #[error("node {node} takes part in migrations {migrations:?}")]
    NodeHasActiveMigrations {
        node: NodeId,
        migrations: Vec<MigrationId>,
    },
    #[error("node {node} lacks capacity: needs {needed} {resource}, has {available}")]
    NodeLacksCapacity {
        node: NodeId,
        resource: Resource,
        needed: u64,
        available: u64,
    },

    // ---- networks ----
    #[error("unknown network {name:?}")]
    UnknownNetwork { name: String },
    #[error("network {name:?} already exists")]
    NetworkExists { name: String },
    #[error("invalid subnet {subnet}")]
    InvalidSubnet { subnet: Subnet },
    #[error("subnet {subnet} overlaps network {other:?}")]
    SubnetOverlaps { subnet: Subnet, other: String },
    #[error("gateway {gateway} is outside subnet {subnet}")]
    GatewayOutsideSubnet { gateway: IpAddr, subnet: Subnet },
    #[error("network {name:?} is in use by nodes {nodes:?}")]
    NetworkInUse { name: String, nodes: Vec<NodeId> },
    #[error("the change to network {name:?} would leave no network allowed for live migration")]
    NoMigrationNetworkLeft { name: String },
    #[error("network {name:?} appears twice in the migration order")]
    DuplicateNetworkInOrder { name: String },

    // ---- VMs ----
    #[error("unknown VM {vm:?}")]
    UnknownVm { vm: String },
    #[error("VM {vm:?} already exists")]
    VmExists { vm: String },
    #[error("MAC address {mac} is already used by VM {vm:?}")]
    MacInUse { mac: MacAddr, vm: String },
    #[error("VM {vm:?} is {state:?}, not off")]
    VmNotOff { vm: String, state: VmState },
    #[error("VM {vm:?} is {state:?}, not running")]
    VmNotRunning { vm: String, state: VmState },
    #[error("VM {vm:?} is being migrated (migration {migration})")]
    VmMigrating { vm: String, migration: MigrationId },
    #[error("VM {vm:?} has its disk on node {disk_owner}, not on node {node}")]
    DiskOnOtherNode {
        vm: String,
        node: NodeId,
        disk_owner: NodeId,
    },
    #[error(
        "processor compatibility of VM {vm:?} can change only while it is off (it is {state:?})"
    )]
    ProcessorCompatibilityWhileRunning { vm: String, state: VmState },

    // ---- migrations ----
    #[error("VM {vm:?} is not running on node {source_node} (owner {owner}, {state:?})")]
    VmNotRunningOnSource {
        vm: String,
        source_node: NodeId,
        owner: NodeId,
        state: VmState,
    },
    #[error("VM {vm:?} is already being migrated (migration {migration})")]
    VmAlreadyMigrating { vm: String, migration: MigrationId },
    #[error("source and target are the same node {node}")]
    SameSourceAndTarget { node: NodeId },
    #[error("target node {node} is in maintenance mode")]
    TargetPaused { node: NodeId },
    #[error("target node {node} is down")]
    TargetDown { node: NodeId },
    #[error("target node {node} lacks capacity: needs {needed} {resource}, has {available}")]
    TargetLacksCapacity {
        node: NodeId,
        resource: Resource,
        needed: u64,
        available: u64,
    },
    #[error("target node {node} lacks CPU features {missing:?}")]
    MissingCpuFeatures { node: NodeId, missing: Vec<String> },
    #[error("node {node} already takes part in {limit} migrations, the limit")]
    MigrationLimitReached { node: NodeId, limit: u32 },
    #[error("nodes {source_node} and {target} share no network allowed for live migration")]
    NoCommonMigrationNetwork { source_node: NodeId, target: NodeId },
    #[error("unknown migration {id}")]
    UnknownMigration { id: MigrationId },
    #[error("migration {id} is no longer active ({outcome:?})")]
    MigrationNotActive {
        id: MigrationId,
        outcome: MigrationOutcome,
    },
    #[error("stale epoch: expected {expected}, the VM is at {current}")]
    StaleEpoch { expected: u64, current: u64 },
    #[error("migration phase cannot go from {from:?} to {to:?}")]
    PhaseRegression {
        from: MigrationPhase,
        to: MigrationPhase,
    },

    // ---- tips ----
    #[error("policy tips are turned off")]
    ProTipsDisabled,
    #[error("unknown tip {id}")]
    UnknownTip { id: TipId },
    #[error("tip {id} cannot go from {from:?} to {to:?}")]
    TipTransition {
        id: TipId,
        from: TipState,
        to: TipState,
    },
    #[error("VM {vm:?} already has pending tip {tip}")]
    TipAlreadyPending { vm: String, tip: TipId },
}

/// The result of applying one command, as replicated.
pub type ApplyResult = Result<Response, CommandError>;
