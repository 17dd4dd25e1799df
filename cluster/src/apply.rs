//! The cluster state machine as one pure function: `apply(state, command) -> result`.
//!
//! No I/O, no clock, no randomness: every replica that applies the same commands in the same
//! order reaches the same state and gives the same answers. Each command is validated in full
//! before anything is changed, so a refused command leaves the state exactly as it was.

use std::collections::BTreeSet;

use crate::command::{Command, CommandError, Resource, Response};
use crate::model::{
    Capacity, ClusterState, Downed, DrainStatus, MigrationId, MigrationOutcome, MigrationPhase,
    MigrationTrigger, MigrationUse, Network, Node, NodeId, NodeState, ProTipMode, Revocation,
    Settings, StorageSpec, Subnet, Tip, TipId, TipState, Vm, VmConfig, VmState,
    FAILURE_DETECTION_MS, HISTORY_LIMIT, MAX_FAILOVER_PRIORITY,
};

type Result<T> = std::result::Result<T, CommandError>;

/// Apply one command to the state. On `Err` the state is unchanged.
pub fn apply(state: &mut ClusterState, command: Command) -> Result<Response> {
    match command {
        Command::AddNode {
            id,
            name,
            addresses,
            cpu_features,
            capacity,
            tcp_offload,
        } => {
            check_name(&name)?;
            if state.nodes.contains_key(&id) {
                return Err(CommandError::NodeExists { node: id });
            }
            if let Some(other) = state.nodes.values().find(|n| n.name == name) {
                return Err(CommandError::NodeNameTaken {
                    name,
                    node: other.id,
                });
            }
            check_capacity(&capacity)?;
            for (network, address) in &addresses {
                check_address(state, id, network, *address)?;
            }
            state.nodes.insert(
                id,
                Node {
                    id,
                    name,
                    addresses,
                    cpu_features,
                    capacity,
                    tcp_offload,
                    state: NodeState::Up,
                    drain: DrainStatus::Idle,
                    down: None,
                },
            );
            Ok(Response::Done)
        }
        Command::RemoveNode { node } => {
            removable(state, node)?;
            state.nodes.remove(&node);
            Ok(Response::Done)
        }
        Command::RetireNode { node, at_ms } => {
            let name = removable(state, node)?;
            state.nodes.remove(&node);
            state.revoked.insert(node, Revocation { name, at_ms });
            Ok(Response::Done)
        }
        Command::PauseNode { node, drain } => {
            let n = node_ref(state, node)?;
            match n.state {
                NodeState::Up => {}
                // A paused node may be asked to drain (again, after a failed drain);
                // anything else is a repeat.
                NodeState::Paused if drain && n.drain != DrainStatus::Draining => {}
                NodeState::Paused => return Err(CommandError::NodeAlreadyPaused { node }),
                NodeState::Down => return Err(CommandError::NodeDown { node }),
            }
            let n = node_mut(state, node)?;
            n.state = NodeState::Paused;
            n.drain = if drain {
                DrainStatus::Draining
            } else {
                DrainStatus::Idle
            };
            Ok(Response::Done)
        }
        Command::ResumeNode { node } => {
            let n = node_ref(state, node)?;
            if n.state != NodeState::Paused {
                return Err(CommandError::NodeNotPaused {
                    node,
                    state: n.state,
                });
            }
            let n = node_mut(state, node)?;
            n.state = NodeState::Up;
            n.drain = DrainStatus::Idle;
            Ok(Response::Done)
        }
        Command::RecordDrain { node, status } => {
            let n = node_ref(state, node)?;
            if n.state != NodeState::Paused {
                return Err(CommandError::NodeNotPaused {
                    node,
                    state: n.state,
                });
            }
            node_mut(state, node)?.drain = status;
            Ok(Response::Done)
        }
        Command::MarkNodeDown {
            node,
            reason,
            at_ms,
        } => {
            if node_ref(state, node)?.state == NodeState::Down {
                return Err(CommandError::NodeDown { node });
            }
            // Validation is over: from here on the command succeeds.
            let mut aborted = Vec::new();
            let involved = active_migrations_of(state, node);
            for id in involved {
                let Some(m) = state.migrations.get(&id) else {
                    continue;
                };
                let (vm_name, source) = (m.vm.clone(), m.source);
                finish_migration(
                    state,
                    id,
                    MigrationOutcome::Aborted {
                        reason: format!("node {node} is down"),
                    },
                    at_ms,
                );
                if let Some(vm) = state.vms.get_mut(&vm_name) {
                    vm.migration = None;
                    // The source keeps running the guest unless the source itself died.
                    vm.state = if source == node {
                        VmState::NeedsRestart
                    } else {
                        VmState::Running
                    };
                }
                aborted.push(id);
            }
            let mut needs_restart = Vec::new();
            for vm in state.vms.values_mut() {
                if vm.owner == node && vm.state != VmState::Off {
                    vm.state = VmState::NeedsRestart;
                    needs_restart.push(vm.name.clone());
                }
            }
            for tip in state.tips.values_mut() {
                if !tip.state.is_final() && (tip.source == node || tip.target == node) {
                    tip.state = TipState::Failed {
                        reason: format!("node {node} is down"),
                    };
                    tip.resolved_at_ms = Some(at_ms);
                }
            }
            let n = node_mut(state, node)?;
            n.state = NodeState::Down;
            n.drain = DrainStatus::Idle;
            n.down = Some(Downed { reason, at_ms });
            prune_history(state);
            Ok(Response::NodeMarkedDown {
                aborted,
                needs_restart,
            })
        }
        Command::MarkNodeUp { node } => {
            if node_ref(state, node)?.state != NodeState::Down {
                return Err(CommandError::NodeNotDown { node });
            }
            let n = node_mut(state, node)?;
            n.state = NodeState::Up;
            n.down = None;
            Ok(Response::Done)
        }
        Command::SetNodeAddress {
            node,
            network,
            address,
        } => {
            node_ref(state, node)?;
            match address {
                Some(address) => {
                    check_address(state, node, &network, address)?;
                    node_mut(state, node)?.addresses.insert(network, address);
                }
                None => {
                    network_ref(state, &network)?;
                    node_mut(state, node)?.addresses.remove(&network);
                }
            }
            Ok(Response::Done)
        }

        Command::DefineNetwork {
            name,
            subnet,
            gateway,
        } => {
            check_name(&name)?;
            if state.networks.contains_key(&name) {
                return Err(CommandError::NetworkExists { name });
            }
            check_subnet(state, &name, subnet)?;
            if let Some(gateway) = gateway {
                if !subnet.contains(gateway) {
                    return Err(CommandError::GatewayOutsideSubnet { gateway, subnet });
                }
            }
            state.migration_order.push(name.clone());
            state.networks.insert(
                name.clone(),
                Network {
                    name,
                    subnet,
                    gateway,
                    migration: MigrationUse::Default,
                },
            );
            Ok(Response::Done)
        }
        Command::RemoveNetwork { name } => {
            network_ref(state, &name)?;
            let nodes: Vec<NodeId> = state
                .nodes
                .values()
                .filter(|n| n.addresses.contains_key(&name))
                .map(|n| n.id)
                .collect();
            if !nodes.is_empty() {
                return Err(CommandError::NetworkInUse { name, nodes });
            }
            check_migration_network_left(state, &name, |_| None)?;
            state.networks.remove(&name);
            state.migration_order.retain(|n| *n != name);
            Ok(Response::Done)
        }
        Command::SetNetworkGateway { name, gateway } => {
            let net = network_ref(state, &name)?;
            if let Some(gateway) = gateway {
                if !net.subnet.contains(gateway) {
                    return Err(CommandError::GatewayOutsideSubnet {
                        gateway,
                        subnet: net.subnet,
                    });
                }
            }
            check_migration_network_left(state, &name, |n| {
                Some(Network {
                    gateway,
                    ..n.clone()
                })
            })?;
            network_mut(state, &name)?.gateway = gateway;
            Ok(Response::Done)
        }
        Command::SetNetworkMigration { name, migration } => {
            network_ref(state, &name)?;
            check_migration_network_left(state, &name, |n| {
                Some(Network {
                    migration,
                    ..n.clone()
                })
            })?;
            network_mut(state, &name)?.migration = migration;
            Ok(Response::Done)
        }
        Command::OrderMigrationNetworks { order } => {
            let mut seen = BTreeSet::new();
            for name in &order {
                network_ref(state, name)?;
                if !seen.insert(name.as_str()) {
                    return Err(CommandError::DuplicateNetworkInOrder { name: name.clone() });
                }
            }
            let rest: Vec<String> = state
                .migration_order
                .iter()
                .filter(|n| !seen.contains(n.as_str()))
                .cloned()
                .collect();
            state.migration_order = order.into_iter().chain(rest).collect();
            Ok(Response::Done)
        }

        Command::CreateVm { name, config, node } => {
            check_name(&name)?;
            if state.vms.contains_key(&name) {
                return Err(CommandError::VmExists { vm: name });
            }
            check_vm_config(&config)?;
            if let Some(other) = state.vms.values().find(|vm| vm.config.mac == config.mac) {
                return Err(CommandError::MacInUse {
                    mac: config.mac,
                    vm: other.name.clone(),
                });
            }
            node_ref(state, node)?;
            let disk_owner = match config.storage {
                StorageSpec::Shared { .. } => None,
                StorageSpec::Local { .. } => Some(node),
            };
            state.vms.insert(
                name.clone(),
                Vm {
                    name,
                    config,
                    owner: node,
                    state: VmState::Off,
                    epoch: 0,
                    processor_compatibility: false,
                    cpu_features: BTreeSet::new(),
                    disk_owner,
                    migration: None,
                },
            );
            Ok(Response::Done)
        }
        Command::DeleteVm { vm } => {
            let v = vm_ref(state, &vm)?;
            if matches!(v.state, VmState::Running | VmState::Migrating) {
                return Err(CommandError::VmNotOff { vm, state: v.state });
            }
            state.vms.remove(&vm);
            for tip in state.tips.values_mut() {
                if tip.vm == vm && !tip.state.is_final() {
                    tip.state = TipState::Failed {
                        reason: "VM deleted".into(),
                    };
                }
            }
            Ok(Response::Done)
        }
        Command::StartVm { vm, node } => {
            let v = vm_ref(state, &vm)?;
            if !matches!(v.state, VmState::Off | VmState::NeedsRestart) {
                return Err(CommandError::VmNotOff { vm, state: v.state });
            }
            if let Some(disk_owner) = v.disk_owner {
                if disk_owner != node {
                    return Err(CommandError::DiskOnOtherNode {
                        vm,
                        node,
                        disk_owner,
                    });
                }
            }
            let n = node_ref(state, node)?;
            match n.state {
                NodeState::Up => {}
                NodeState::Paused => return Err(CommandError::NodePaused { node }),
                NodeState::Down => return Err(CommandError::NodeDown { node }),
            }
            if let Some((resource, needed, available)) = lacks_capacity(state, node, v) {
                return Err(CommandError::NodeLacksCapacity {
                    node,
                    resource,
                    needed,
                    available,
                });
            }
            let cpu_features = if v.processor_compatibility {
                state.cpu_baseline()
            } else {
                n.cpu_features.clone()
            };
            let v = vm_mut(state, &vm)?;
            v.owner = node;
            v.state = VmState::Running;
            v.epoch += 1;
            v.cpu_features = cpu_features.clone();
            Ok(Response::VmStarted {
                node,
                epoch: v.epoch,
                cpu_features,
            })
        }
        Command::StopVm { vm, epoch } => {
            let v = vm_ref(state, &vm)?;
            if let Some(expected) = epoch {
                if expected != v.epoch {
                    return Err(CommandError::StaleEpoch {
                        expected,
                        current: v.epoch,
                    });
                }
            }
            match v.state {
                VmState::Running | VmState::NeedsRestart => {}
                VmState::Migrating => {
                    return Err(CommandError::VmMigrating {
                        vm,
                        migration: v.migration.unwrap_or_default(),
                    })
                }
                VmState::Off => return Err(CommandError::VmNotRunning { vm, state: v.state }),
            }
            vm_mut(state, &vm)?.state = VmState::Off;
            Ok(Response::Done)
        }
        Command::VmLost { vm, epoch } => {
            let v = vm_ref(state, &vm)?;
            if epoch != v.epoch {
                return Err(CommandError::StaleEpoch {
                    expected: epoch,
                    current: v.epoch,
                });
            }
            if v.state != VmState::Running {
                return Err(CommandError::VmNotRunning { vm, state: v.state });
            }
            vm_mut(state, &vm)?.state = VmState::NeedsRestart;
            Ok(Response::Done)
        }
        Command::SetProcessorCompatibility { vm, enabled } => {
            let v = vm_ref(state, &vm)?;
            if v.state != VmState::Off {
                return Err(CommandError::ProcessorCompatibilityWhileRunning {
                    vm,
                    state: v.state,
                });
            }
            vm_mut(state, &vm)?.processor_compatibility = enabled;
            Ok(Response::Done)
        }

        Command::BeginMigration {
            vm,
            source,
            target,
            trigger,
            at_ms,
        } => {
            let v = vm_ref(state, &vm)?;
            if let (VmState::Migrating, Some(migration)) = (v.state, v.migration) {
                return Err(CommandError::VmAlreadyMigrating { vm, migration });
            }
            if v.state != VmState::Running || v.owner != source {
                return Err(CommandError::VmNotRunningOnSource {
                    vm,
                    source_node: source,
                    owner: v.owner,
                    state: v.state,
                });
            }
            if source == target {
                return Err(CommandError::SameSourceAndTarget { node: target });
            }
            let tgt = node_ref(state, target)?;
            match tgt.state {
                NodeState::Up => {}
                NodeState::Paused => return Err(CommandError::TargetPaused { node: target }),
                NodeState::Down => return Err(CommandError::TargetDown { node: target }),
            }
            let missing: Vec<String> = v
                .cpu_features
                .iter()
                .filter(|f| !tgt.cpu_features.contains(*f))
                .cloned()
                .collect();
            if !missing.is_empty() {
                return Err(CommandError::MissingCpuFeatures {
                    node: target,
                    missing,
                });
            }
            if let Some((resource, needed, available)) = lacks_capacity(state, target, v) {
                return Err(CommandError::TargetLacksCapacity {
                    node: target,
                    resource,
                    needed,
                    available,
                });
            }
            let limit = state.settings.max_migrations_per_node;
            for node in [source, target] {
                if state.node_load(node).migrations >= limit {
                    return Err(CommandError::MigrationLimitReached { node, limit });
                }
            }
            if state.migration_paths(source, target).is_empty() {
                return Err(CommandError::NoCommonMigrationNetwork {
                    source_node: source,
                    target,
                });
            }
            if let MigrationTrigger::Tip(tip) = trigger {
                let t = tip_ref(state, tip)?;
                if t.state != TipState::Accepted && t.state != TipState::Pending {
                    return Err(CommandError::TipTransition {
                        id: tip,
                        from: t.state.clone(),
                        to: TipState::Applied {
                            migration: state.next_migration_id,
                        },
                    });
                }
            }
            let id = state.next_migration_id;
            let epoch = v.epoch;
            let memory_bytes = v.config.memory_bytes;
            state.next_migration_id += 1;
            state.migrations.insert(
                id,
                crate::model::Migration {
                    id,
                    vm: vm.clone(),
                    source,
                    target,
                    trigger,
                    phase: MigrationPhase::Requested,
                    outcome: MigrationOutcome::Active,
                    epoch,
                    memory_bytes,
                    begun_at_ms: at_ms,
                    updated_at_ms: at_ms,
                    ended_at_ms: None,
                },
            );
            let v = vm_mut(state, &vm)?;
            v.state = VmState::Migrating;
            v.migration = Some(id);
            if let MigrationTrigger::Tip(tip) = trigger {
                if let Some(t) = state.tips.get_mut(&tip) {
                    t.state = TipState::Applied { migration: id };
                    t.resolved_at_ms = Some(at_ms);
                }
            }
            Ok(Response::MigrationBegun { id, epoch })
        }
        Command::RecordMigrationPhase {
            migration,
            phase,
            at_ms,
        } => {
            let m = active_migration(state, migration)?;
            if phase == MigrationPhase::SwitchedOver || phase < m.phase {
                return Err(CommandError::PhaseRegression {
                    from: m.phase,
                    to: phase,
                });
            }
            let m = state
                .migrations
                .get_mut(&migration)
                .ok_or(CommandError::UnknownMigration { id: migration })?;
            m.phase = phase;
            m.updated_at_ms = at_ms;
            Ok(Response::Done)
        }
        Command::CommitSwitchover {
            migration,
            expected_epoch,
            at_ms,
        } => {
            let m = active_migration(state, migration)?;
            let vm_name = m.vm.clone();
            let target = m.target;
            let v = vm_ref(state, &vm_name)?;
            if v.epoch != expected_epoch {
                return Err(CommandError::StaleEpoch {
                    expected: expected_epoch,
                    current: v.epoch,
                });
            }
            // Nothing lands on a node in maintenance, not even a migration that was
            // already copying when the node was paused: the source must abort it.
            if node_ref(state, target)?.state == NodeState::Paused {
                return Err(CommandError::TargetPaused { node: target });
            }
            if let Some(m) = state.migrations.get_mut(&migration) {
                m.phase = MigrationPhase::SwitchedOver;
            }
            finish_migration(state, migration, MigrationOutcome::Completed, at_ms);
            let v = vm_mut(state, &vm_name)?;
            v.owner = target;
            v.epoch += 1;
            v.state = VmState::Running;
            v.migration = None;
            if v.disk_owner.is_some() {
                v.disk_owner = Some(target);
            }
            let epoch = v.epoch;
            prune_history(state);
            Ok(Response::SwitchedOver {
                vm: vm_name,
                owner: target,
                epoch,
            })
        }
        Command::AbortMigration {
            migration,
            reason,
            at_ms,
        } => {
            let m = active_migration(state, migration)?;
            let vm_name = m.vm.clone();
            vm_ref(state, &vm_name)?;
            finish_migration(
                state,
                migration,
                MigrationOutcome::Aborted { reason },
                at_ms,
            );
            let v = vm_mut(state, &vm_name)?;
            v.state = VmState::Running;
            v.migration = None;
            let owner = v.owner;
            prune_history(state);
            Ok(Response::MigrationAborted { vm: vm_name, owner })
        }

        Command::RaiseTip {
            vm,
            target,
            reason,
            at_ms,
            expires_at_ms,
        } => {
            if state.settings.pro_tip_mode == ProTipMode::Off {
                return Err(CommandError::ProTipsDisabled);
            }
            let v = vm_ref(state, &vm)?;
            if v.state != VmState::Running {
                return Err(CommandError::VmNotRunning { vm, state: v.state });
            }
            let source = v.owner;
            if source == target {
                return Err(CommandError::SameSourceAndTarget { node: target });
            }
            match node_ref(state, target)?.state {
                NodeState::Up => {}
                NodeState::Paused => return Err(CommandError::TargetPaused { node: target }),
                NodeState::Down => return Err(CommandError::TargetDown { node: target }),
            }
            if let Some(t) = state
                .tips
                .values()
                .find(|t| t.vm == vm && !t.state.is_final())
            {
                return Err(CommandError::TipAlreadyPending { vm, tip: t.id });
            }
            if expires_at_ms < at_ms {
                return Err(CommandError::InvalidValue {
                    field: "expires_at_ms".into(),
                    reason: "a tip cannot expire before it is raised".into(),
                });
            }
            let id = state.next_tip_id;
            state.next_tip_id += 1;
            state.tips.insert(
                id,
                Tip {
                    id,
                    vm,
                    source,
                    target,
                    reason,
                    state: TipState::Pending,
                    raised_at_ms: at_ms,
                    expires_at_ms,
                    resolved_at_ms: None,
                },
            );
            Ok(Response::TipRaised { id })
        }
        Command::ResolveTip {
            tip,
            state: to,
            at_ms,
        } => {
            let t = tip_ref(state, tip)?;
            let allowed = match (&t.state, &to) {
                (TipState::Pending, TipState::Pending) => false,
                (TipState::Pending, _) => true,
                (
                    TipState::Accepted,
                    TipState::Applied { .. } | TipState::Failed { .. } | TipState::Expired,
                ) => true,
                _ => false,
            };
            if !allowed {
                return Err(CommandError::TipTransition {
                    id: tip,
                    from: t.state.clone(),
                    to,
                });
            }
            if let TipState::Applied { migration } = to {
                if !state.migrations.contains_key(&migration) {
                    return Err(CommandError::UnknownMigration { id: migration });
                }
            }
            let t = state
                .tips
                .get_mut(&tip)
                .ok_or(CommandError::UnknownTip { id: tip })?;
            if to.is_final() {
                t.resolved_at_ms = Some(at_ms);
            }
            t.state = to;
            prune_history(state);
            Ok(Response::Done)
        }

        Command::UpdateSettings { settings } => {
            check_settings(&settings)?;
            state.settings = settings;
            Ok(Response::Done)
        }
    }
}

// ---- lookups ----

/// A node that may leave the cluster: it owns no VM or disk and takes part in
/// no migration. Its name.
fn removable(state: &ClusterState, node: NodeId) -> Result<String> {
    let name = node_ref(state, node)?.name.clone();
    let vms: Vec<String> = state
        .vms
        .values()
        .filter(|vm| vm.owner == node || vm.disk_owner == Some(node))
        .map(|vm| vm.name.clone())
        .collect();
    if !vms.is_empty() {
        return Err(CommandError::NodeHasVms { node, vms });
    }
    let migrations = active_migrations_of(state, node);
    if !migrations.is_empty() {
        return Err(CommandError::NodeHasActiveMigrations { node, migrations });
    }
    Ok(name)
}

fn node_ref(state: &ClusterState, node: NodeId) -> Result<&Node> {
    state
        .nodes
        .get(&node)
        .ok_or(CommandError::UnknownNode { node })
}

fn node_mut(state: &mut ClusterState, node: NodeId) -> Result<&mut Node> {
    state
        .nodes
        .get_mut(&node)
        .ok_or(CommandError::UnknownNode { node })
}

fn network_ref<'a>(state: &'a ClusterState, name: &str) -> Result<&'a Network> {
    state
        .networks
        .get(name)
        .ok_or_else(|| CommandError::UnknownNetwork { name: name.into() })
}

fn network_mut<'a>(state: &'a mut ClusterState, name: &str) -> Result<&'a mut Network> {
    state
        .networks
        .get_mut(name)
        .ok_or_else(|| CommandError::UnknownNetwork { name: name.into() })
}

fn vm_ref<'a>(state: &'a ClusterState, vm: &str) -> Result<&'a Vm> {
    state
        .vms
        .get(vm)
        .ok_or_else(|| CommandError::UnknownVm { vm: vm.into() })
}

fn vm_mut<'a>(state: &'a mut ClusterState, vm: &str) -> Result<&'a mut Vm> {
    state
        .vms
        .get_mut(vm)
        .ok_or_else(|| CommandError::UnknownVm { vm: vm.into() })
}

fn tip_ref(state: &ClusterState, id: TipId) -> Result<&Tip> {
    state.tips.get(&id).ok_or(CommandError::UnknownTip { id })
}

fn active_migration(state: &ClusterState, id: MigrationId) -> Result<&crate::model::Migration> {
    let m = state
        .migrations
        .get(&id)
        .ok_or(CommandError::UnknownMigration { id })?;
    if !m.is_active() {
        return Err(CommandError::MigrationNotActive {
            id,
            outcome: m.outcome.clone(),
        });
    }
    Ok(m)
}

fn active_migrations_of(state: &ClusterState, node: NodeId) -> Vec<MigrationId> {
    state
        .active_migrations()
        .filter(|m| m.source == node || m.target == node)
        .map(|m| m.id)
        .collect()
}

// ---- checks ----

fn check_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > 128 {
        "longer than 128 bytes"
    } else if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        "contains whitespace or control characters"
    } else {
        return Ok(());
    };
    Err(CommandError::InvalidName {
        name: name.into(),
        reason: reason.into(),
    })
}

fn invalid(field: &str, reason: &str) -> CommandError {
    CommandError::InvalidValue {
        field: field.into(),
        reason: reason.into(),
    }
}

fn check_capacity(capacity: &Capacity) -> Result<()> {
    if capacity.memory_bytes == 0 {
        return Err(invalid("capacity.memory_bytes", "must be positive"));
    }
    if capacity.max_vms == 0 {
        return Err(invalid("capacity.max_vms", "must be positive"));
    }
    Ok(())
}

fn check_vm_config(config: &VmConfig) -> Result<()> {
    if config.memory_bytes == 0 {
        return Err(invalid("memory_bytes", "must be positive"));
    }
    if config.vcpus == 0 {
        return Err(invalid("vcpus", "must be positive"));
    }
    if config.mac.0[0] & 1 == 1 {
        return Err(invalid("mac", "must be a unicast address"));
    }
    if let StorageSpec::Shared { volume } = &config.storage {
        if volume.is_empty() {
            return Err(invalid("storage.volume", "empty"));
        }
    }
    if config.failover.priority > MAX_FAILOVER_PRIORITY {
        return Err(invalid(
            "failover.priority",
            &format!("at most {MAX_FAILOVER_PRIORITY}"),
        ));
    }
    Ok(())
}

fn check_settings(settings: &Settings) -> Result<()> {
    if settings.downtime_limit_ms == 0 {
        return Err(invalid("downtime_limit_ms", "must be positive"));
    }
    if settings.max_migrations_per_node == 0 {
        return Err(invalid("max_migrations_per_node", "must be at least 1"));
    }
    if !FAILURE_DETECTION_MS.contains(&settings.failure_detection_ms) {
        return Err(invalid(
            "failure_detection_ms",
            &format!(
                "must be {} to {} ms",
                FAILURE_DETECTION_MS.start(),
                FAILURE_DETECTION_MS.end()
            ),
        ));
    }
    if settings.bandwidth_cap_bytes_per_sec == Some(0) {
        return Err(invalid(
            "bandwidth_cap_bytes_per_sec",
            "must be positive (or no cap)",
        ));
    }
    Ok(())
}

/// A node's address on a network: the network exists, the address lies in its subnet and no
/// other node uses it.
fn check_address(
    state: &ClusterState,
    node: NodeId,
    network: &str,
    address: std::net::IpAddr,
) -> Result<()> {
    let net = network_ref(state, network)?;
    if !net.subnet.contains(address) {
        return Err(CommandError::AddressOutsideSubnet {
            network: network.into(),
            address,
            subnet: net.subnet,
        });
    }
    if let Some(other) = state
        .nodes
        .values()
        .find(|n| n.id != node && n.addresses.values().any(|a| *a == address))
    {
        return Err(CommandError::AddressInUse {
            address,
            node: other.id,
        });
    }
    Ok(())
}

fn check_subnet(state: &ClusterState, name: &str, subnet: Subnet) -> Result<()> {
    if !subnet.is_valid() {
        return Err(CommandError::InvalidSubnet { subnet });
    }
    if let Some(other) = state
        .networks
        .values()
        .find(|n| n.name != name && n.subnet.overlaps(&subnet))
    {
        return Err(CommandError::SubnetOverlaps {
            subnet,
            other: other.name.clone(),
        });
    }
    Ok(())
}

/// Refuse a change to network `name` (its new value, or `None` for removal) that would take
/// the count of networks allowed for live migration from some to none.
fn check_migration_network_left(
    state: &ClusterState,
    name: &str,
    change: impl Fn(&Network) -> Option<Network>,
) -> Result<()> {
    let before = state
        .networks
        .values()
        .filter(|n| n.allowed_for_migration())
        .count();
    let after = state
        .networks
        .values()
        .filter_map(|n| {
            if n.name == name {
                change(n)
            } else {
                Some(n.clone())
            }
        })
        .filter(|n| n.allowed_for_migration())
        .count();
    if before > 0 && after == 0 {
        return Err(CommandError::NoMigrationNetworkLeft { name: name.into() });
    }
    Ok(())
}

/// What the node would lack to take `vm` on, if anything: (resource, needed, available).
fn lacks_capacity(state: &ClusterState, node: NodeId, vm: &Vm) -> Option<(Resource, u64, u64)> {
    let capacity = state.nodes.get(&node)?.capacity;
    let load = state.node_load(node);
    let free_memory = capacity.memory_bytes.saturating_sub(load.memory_bytes);
    if vm.config.memory_bytes > free_memory {
        return Some((Resource::Memory, vm.config.memory_bytes, free_memory));
    }
    let free_slots = capacity.max_vms.saturating_sub(load.vms);
    if free_slots == 0 {
        return Some((Resource::VmSlots, 1, 0));
    }
    None
}

// ---- effects ----

fn finish_migration(
    state: &mut ClusterState,
    id: MigrationId,
    outcome: MigrationOutcome,
    at_ms: u64,
) {
    if let Some(m) = state.migrations.get_mut(&id) {
        m.outcome = outcome;
        m.updated_at_ms = at_ms;
        m.ended_at_ms = Some(at_ms);
    }
}

/// Keep at most [`HISTORY_LIMIT`] finished migrations and resolved tips, dropping the oldest
/// (lowest id) first. Active ones are never dropped.
fn prune_history(state: &mut ClusterState) {
    let finished: Vec<MigrationId> = state
        .migrations
        .values()
        .filter(|m| !m.is_active())
        .map(|m| m.id)
        .collect();
    if finished.len() > HISTORY_LIMIT {
        for id in &finished[..finished.len() - HISTORY_LIMIT] {
            state.migrations.remove(id);
        }
    }
    let resolved: Vec<TipId> = state
        .tips
        .values()
        .filter(|t| t.state.is_final())
        .map(|t| t.id)
        .collect();
    if resolved.len() > HISTORY_LIMIT {
        for id in &resolved[..resolved.len() - HISTORY_LIMIT] {
            state.tips.remove(id);
        }
    }
}
