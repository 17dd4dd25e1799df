//! The state machine's rules, tested on the pure `apply` function: every refusal names its
//! reason and leaves the state exactly as it was; every accepted command has its effect.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ferry_cluster::apply;
use ferry_cluster::command::{Command, CommandError, Resource, Response};
use ferry_cluster::model::*;

const GIB: u64 = 1 << 30;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ok(state: &mut ClusterState, cmd: Command) -> Response {
    let name = cmd.name();
    match apply(state, cmd) {
        Ok(r) => r,
        Err(e) => panic!("{name} refused: {e}"),
    }
}

/// Apply a command that must be refused; check the state did not change; return the error.
fn refused(state: &mut ClusterState, cmd: Command) -> CommandError {
    let before = state.clone();
    let name = cmd.name();
    let err = match apply(state, cmd) {
        Ok(r) => panic!("{name} accepted ({r:?}), expected a refusal"),
        Err(e) => e,
    };
    assert_eq!(
        *state, before,
        "{name} was refused ({err}) but changed the state"
    );
    err
}

fn features(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn add_node(id: NodeId, features_: &[&str], memory: u64, max_vms: u32) -> Command {
    Command::AddNode {
        id,
        name: format!("node{id}"),
        addresses: BTreeMap::from([
            ("mig1".to_string(), ip(&format!("127.1.0.{id}"))),
            ("mig2".to_string(), ip(&format!("127.2.0.{id}"))),
            ("public".to_string(), ip(&format!("127.3.0.{id}"))),
        ]),
        cpu_features: features(features_),
        capacity: Capacity {
            memory_bytes: memory,
            max_vms,
        },
        tcp_offload: true,
    }
}

fn vm_config(mac_last: u8, memory: u64, storage: StorageSpec) -> VmConfig {
    VmConfig {
        failover: Default::default(),
        memory_bytes: memory,
        vcpus: 2,
        mac: MacAddr([0x52, 0x54, 0, 0, 0, mac_last]),
        backend: Backend::Sim,
        workload: vec![1, 2, 3],
        storage,
    }
}

fn shared() -> StorageSpec {
    StorageSpec::Shared {
        volume: "csv1".into(),
    }
}

/// Three networks (two private, one public), three nodes (node 3 lacks avx2 and has 2 GiB),
/// VM "a" running on node 1 in processor-compatibility mode, VM "b" running on node 1 with
/// a local disk and node 1's CPU features, VM "off" defined on node 2.
fn cluster() -> ClusterState {
    let mut s = ClusterState::default();
    for (name, subnet, gw) in [
        ("mig1", "127.1.0.0/16", None),
        ("mig2", "127.2.0.0/16", None),
        ("public", "127.3.0.0/16", Some(ip("127.3.0.254"))),
    ] {
        ok(
            &mut s,
            Command::DefineNetwork {
                name: name.into(),
                subnet: subnet.parse().unwrap(),
                gateway: gw,
            },
        );
    }
    ok(&mut s, add_node(1, &["sse4", "avx2"], 16 * GIB, 8));
    ok(&mut s, add_node(2, &["sse4", "avx2"], 16 * GIB, 8));
    ok(&mut s, add_node(3, &["sse4"], 2 * GIB, 8));
    ok(
        &mut s,
        Command::CreateVm {
            name: "a".into(),
            config: vm_config(1, GIB, shared()),
            node: 1,
        },
    );
    ok(
        &mut s,
        Command::CreateVm {
            name: "b".into(),
            config: vm_config(2, GIB, StorageSpec::Local { size_bytes: GIB }),
            node: 1,
        },
    );
    ok(
        &mut s,
        Command::CreateVm {
            name: "off".into(),
            config: vm_config(3, GIB, shared()),
            node: 2,
        },
    );
    ok(
        &mut s,
        Command::SetProcessorCompatibility {
            vm: "a".into(),
            enabled: true,
        },
    );
    ok(
        &mut s,
        Command::StartVm {
            vm: "a".into(),
            node: 1,
        },
    );
    ok(
        &mut s,
        Command::StartVm {
            vm: "b".into(),
            node: 1,
        },
    );
    s
}

fn begin(vm: &str, source: NodeId, target: NodeId) -> Command {
    Command::BeginMigration {
        vm: vm.into(),
        source,
        target,
        trigger: MigrationTrigger::User,
        at_ms: 1_000,
    }
}

fn begun(state: &mut ClusterState, vm: &str, source: NodeId, target: NodeId) -> (MigrationId, u64) {
    match ok(state, begin(vm, source, target)) {
        Response::MigrationBegun { id, epoch } => (id, epoch),
        r => panic!("unexpected {r:?}"),
    }
}

// ---------------------------------------------------------------- nodes

#[test]
fn add_node_refusals() {
    let mut s = cluster();
    assert!(matches!(
        refused(&mut s, add_node(1, &[], GIB, 1)),
        CommandError::NodeExists { node: 1 }
    ));
    let mut cmd = add_node(9, &[], GIB, 1);
    if let Command::AddNode { name, .. } = &mut cmd {
        *name = "node1".into();
    }
    assert!(matches!(
        refused(&mut s, cmd),
        CommandError::NodeNameTaken { node: 1, .. }
    ));
    let mut cmd = add_node(9, &[], GIB, 1);
    if let Command::AddNode { name, .. } = &mut cmd {
        *name = "".into();
    }
    assert!(matches!(
        refused(&mut s, cmd),
        CommandError::InvalidName { .. }
    ));
    assert!(matches!(
        refused(&mut s, add_node(9, &[], 0, 1)),
        CommandError::InvalidValue { field, .. } if field == "capacity.memory_bytes"
    ));
    assert!(matches!(
        refused(&mut s, add_node(9, &[], GIB, 0)),
        CommandError::InvalidValue { field, .. } if field == "capacity.max_vms"
    ));
    let mut cmd = add_node(9, &[], GIB, 1);
    if let Command::AddNode { addresses, .. } = &mut cmd {
        addresses.insert("nowhere".into(), ip("10.0.0.1"));
    }
    assert!(matches!(
        refused(&mut s, cmd),
        CommandError::UnknownNetwork { name } if name == "nowhere"
    ));
    let mut cmd = add_node(9, &[], GIB, 1);
    if let Command::AddNode { addresses, .. } = &mut cmd {
        addresses.insert("mig1".into(), ip("127.9.0.9"));
    }
    assert!(matches!(
        refused(&mut s, cmd),
        CommandError::AddressOutsideSubnet { network, .. } if network == "mig1"
    ));
    let mut cmd = add_node(9, &[], GIB, 1);
    if let Command::AddNode { addresses, .. } = &mut cmd {
        addresses.insert("mig1".into(), ip("127.1.0.2"));
    }
    assert!(matches!(
        refused(&mut s, cmd),
        CommandError::AddressInUse { node: 2, .. }
    ));
}

#[test]
fn remove_node_refusals_and_effect() {
    let mut s = cluster();
    assert!(matches!(
        refused(&mut s, Command::RemoveNode { node: 42 }),
        CommandError::UnknownNode { node: 42 }
    ));
    match refused(&mut s, Command::RemoveNode { node: 1 }) {
        CommandError::NodeHasVms { node: 1, vms } => assert_eq!(vms, vec!["a", "b"]),
        e => panic!("{e:?}"),
    }
    // Node 3 holds no VM but is the target of an active migration.
    let (id, _) = begun(&mut s, "a", 1, 3);
    match refused(&mut s, Command::RemoveNode { node: 3 }) {
        CommandError::NodeHasActiveMigrations {
            node: 3,
            migrations,
        } => {
            assert_eq!(migrations, vec![id])
        }
        e => panic!("{e:?}"),
    }
    ok(
        &mut s,
        Command::AbortMigration {
            migration: id,
            reason: "test".into(),
            at_ms: 2,
        },
    );
    ok(&mut s, Command::RemoveNode { node: 3 });
    assert!(!s.nodes.contains_key(&3));
}

#[test]
fn retiring_a_node_forgets_it_and_revokes_its_certificates() {
    let mut s = cluster();
    match refused(&mut s, Command::RetireNode { node: 1, at_ms: 5 }) {
        CommandError::NodeHasVms { node: 1, vms } => assert_eq!(vms, vec!["a", "b"]),
        e => panic!("{e:?}"),
    }
    assert!(matches!(
        refused(&mut s, Command::RetireNode { node: 42, at_ms: 5 }),
        CommandError::UnknownNode { node: 42 }
    ));
    ok(&mut s, Command::RetireNode { node: 3, at_ms: 7 });
    assert!(!s.nodes.contains_key(&3));
    assert_eq!(
        s.revoked.get(&3),
        Some(&Revocation {
            name: "node3".into(),
            at_ms: 7
        })
    );
    // Added again (with a certificate issued after its removal): a member
    // again, and the entry stays, so its old certificates stay refused.
    ok(&mut s, add_node(3, &["sse2"], 64 * GIB, 10));
    assert!(s.nodes.contains_key(&3));
    assert!(s.revoked.contains_key(&3));
}

#[test]
fn maintenance_mode() {
    let mut s = cluster();
    assert!(matches!(
        refused(&mut s, Command::ResumeNode { node: 2 }),
        CommandError::NodeNotPaused {
            node: 2,
            state: NodeState::Up
        }
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::RecordDrain {
                node: 2,
                status: DrainStatus::Drained
            }
        ),
        CommandError::NodeNotPaused { node: 2, .. }
    ));
    ok(
        &mut s,
        Command::PauseNode {
            node: 2,
            drain: true,
        },
    );
    assert_eq!(s.nodes[&2].state, NodeState::Paused);
    assert_eq!(s.nodes[&2].drain, DrainStatus::Draining);
    assert!(matches!(
        refused(
            &mut s,
            Command::PauseNode {
                node: 2,
                drain: false
            }
        ),
        CommandError::NodeAlreadyPaused { node: 2 }
    ));
    // Nothing lands on a paused node: no start, no migration.
    assert!(matches!(
        refused(
            &mut s,
            Command::StartVm {
                vm: "off".into(),
                node: 2
            }
        ),
        CommandError::NodePaused { node: 2 }
    ));
    assert!(matches!(
        refused(&mut s, begin("a", 1, 2)),
        CommandError::TargetPaused { node: 2 }
    ));
    let stuck = DrainStatus::Failed {
        stuck: vec![StuckVm {
            vm: "x".into(),
            reason: "no eligible target".into(),
        }],
    };
    ok(
        &mut s,
        Command::RecordDrain {
            node: 2,
            status: stuck.clone(),
        },
    );
    assert_eq!(s.nodes[&2].drain, stuck);
    ok(&mut s, Command::ResumeNode { node: 2 });
    assert_eq!(s.nodes[&2].state, NodeState::Up);
    assert_eq!(s.nodes[&2].drain, DrainStatus::Idle);
    // A paused source may still send VMs away (that is what a drain does).
    ok(
        &mut s,
        Command::PauseNode {
            node: 1,
            drain: true,
        },
    );
    begun(&mut s, "a", 1, 2);
}

#[test]
fn node_down_and_up() {
    let mut s = cluster();
    let (to3, _) = begun(&mut s, "a", 1, 3);
    assert!(matches!(
        refused(&mut s, Command::MarkNodeUp { node: 1 }),
        CommandError::NodeNotDown { node: 1 }
    ));
    // The target dies: the migration aborts, the VM keeps running on the source.
    match ok(
        &mut s,
        Command::MarkNodeDown {
            node: 3,
            reason: "test".into(),
            at_ms: 5,
        },
    ) {
        Response::NodeMarkedDown {
            aborted,
            needs_restart,
        } => {
            assert_eq!(aborted, vec![to3]);
            assert!(needs_restart.is_empty());
        }
        r => panic!("{r:?}"),
    }
    assert_eq!(s.vms["a"].state, VmState::Running);
    assert_eq!(s.vms["a"].owner, 1);
    assert!(matches!(
        s.migrations[&to3].outcome,
        MigrationOutcome::Aborted { .. }
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::MarkNodeDown {
                node: 3,
                reason: "test".into(),
                at_ms: 6
            }
        ),
        CommandError::NodeDown { node: 3 }
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::PauseNode {
                node: 3,
                drain: false
            }
        ),
        CommandError::NodeDown { node: 3 }
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::StartVm {
                vm: "off".into(),
                node: 3
            }
        ),
        CommandError::NodeDown { node: 3 }
    ));
    assert!(matches!(
        refused(&mut s, begin("a", 1, 3)),
        CommandError::TargetDown { node: 3 }
    ));
    // The source dies mid-migration: aborted, and the VM is known to need a restart.
    let (to2, _) = begun(&mut s, "a", 1, 2);
    match ok(
        &mut s,
        Command::MarkNodeDown {
            node: 1,
            reason: "test".into(),
            at_ms: 7,
        },
    ) {
        Response::NodeMarkedDown {
            aborted,
            needs_restart,
        } => {
            assert_eq!(aborted, vec![to2]);
            assert_eq!(needs_restart, vec!["a", "b"]);
        }
        r => panic!("{r:?}"),
    }
    assert_eq!(s.vms["a"].state, VmState::NeedsRestart);
    assert_eq!(s.vms["a"].migration, None);
    // It restarts elsewhere, with a new epoch.
    let epoch = s.vms["a"].epoch;
    ok(
        &mut s,
        Command::StartVm {
            vm: "a".into(),
            node: 2,
        },
    );
    assert_eq!(s.vms["a"].owner, 2);
    assert_eq!(s.vms["a"].epoch, epoch + 1);
    // Why a node is down is kept until it is up again.
    assert_eq!(
        s.nodes[&3].down,
        Some(Downed {
            reason: "test".into(),
            at_ms: 5
        })
    );
    ok(&mut s, Command::MarkNodeUp { node: 3 });
    assert_eq!(s.nodes[&3].state, NodeState::Up);
    assert_eq!(s.nodes[&3].down, None);
}

#[test]
fn a_stop_or_a_loss_names_the_epoch_it_means() {
    let mut s = cluster();
    let epoch = s.vms["a"].epoch;
    // A stop issued before the VM changed hands does not stop it where it runs now.
    assert!(matches!(
        refused(
            &mut s,
            Command::StopVm {
                vm: "a".into(),
                epoch: Some(epoch - 1)
            }
        ),
        CommandError::StaleEpoch { expected, current } if expected == epoch - 1 && current == epoch
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::VmLost {
                vm: "a".into(),
                epoch: epoch + 1
            }
        ),
        CommandError::StaleEpoch { .. }
    ));
    // The owner lost it: it needs a restart, once, at a new epoch.
    ok(
        &mut s,
        Command::VmLost {
            vm: "a".into(),
            epoch,
        },
    );
    assert_eq!(s.vms["a"].state, VmState::NeedsRestart);
    assert!(matches!(
        refused(
            &mut s,
            Command::VmLost {
                vm: "a".into(),
                epoch
            }
        ),
        CommandError::VmNotRunning { .. }
    ));
    ok(
        &mut s,
        Command::StartVm {
            vm: "a".into(),
            node: 2,
        },
    );
    assert_eq!(s.vms["a"].epoch, epoch + 1);
    assert!(matches!(
        refused(
            &mut s,
            Command::StartVm {
                vm: "a".into(),
                node: 3
            }
        ),
        CommandError::VmNotOff { .. }
    ));
    ok(
        &mut s,
        Command::StopVm {
            vm: "a".into(),
            epoch: Some(epoch + 1),
        },
    );
    assert_eq!(s.vms["a"].state, VmState::Off);
}

#[test]
fn failure_detection_and_failover_priority_have_bounds() {
    let mut s = cluster();
    for bad in [0, 999, 60_001] {
        let settings = Settings {
            failure_detection_ms: bad,
            ..Settings::default()
        };
        assert!(matches!(
            refused(&mut s, Command::UpdateSettings { settings }),
            CommandError::InvalidValue { field, .. } if field == "failure_detection_ms"
        ));
    }
    let mut config = vm_config(
        90,
        GIB,
        StorageSpec::Shared {
            volume: "csv".into(),
        },
    );
    config.failover.priority = MAX_FAILOVER_PRIORITY + 1;
    assert!(matches!(
        refused(
            &mut s,
            Command::CreateVm {
                name: "p".into(),
                config,
                node: 1
            }
        ),
        CommandError::InvalidValue { field, .. } if field == "failover.priority"
    ));
}

#[test]
fn node_addresses() {
    let mut s = cluster();
    assert!(matches!(
        refused(
            &mut s,
            Command::SetNodeAddress {
                node: 7,
                network: "mig1".into(),
                address: None
            }
        ),
        CommandError::UnknownNode { node: 7 }
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::SetNodeAddress {
                node: 1,
                network: "nope".into(),
                address: None
            }
        ),
        CommandError::UnknownNetwork { .. }
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::SetNodeAddress {
                node: 1,
                network: "mig1".into(),
                address: Some(ip("127.1.0.2"))
            }
        ),
        CommandError::AddressInUse { node: 2, .. }
    ));
    ok(
        &mut s,
        Command::SetNodeAddress {
            node: 1,
            network: "mig1".into(),
            address: Some(ip("127.1.0.11")),
        },
    );
    assert_eq!(s.nodes[&1].addresses["mig1"], ip("127.1.0.11"));
}

// ---------------------------------------------------------------- networks

#[test]
fn network_definition_refusals() {
    let mut s = cluster();
    let define = |name: &str, subnet: &str, gw: Option<&str>| Command::DefineNetwork {
        name: name.into(),
        subnet: Subnet {
            addr: ip(subnet.split('/').next().unwrap()),
            prefix: subnet.split('/').nth(1).unwrap().parse().unwrap(),
        },
        gateway: gw.map(ip),
    };
    assert!(matches!(
        refused(&mut s, define("mig1", "10.0.0.0/8", None)),
        CommandError::NetworkExists { .. }
    ));
    assert!(matches!(
        refused(&mut s, define("new", "10.0.0.0/40", None)),
        CommandError::InvalidSubnet { .. }
    ));
    assert!(matches!(
        refused(&mut s, define("new", "127.0.0.0/8", None)),
        CommandError::SubnetOverlaps { other, .. } if other == "mig1"
    ));
    assert!(matches!(
        refused(&mut s, define("new", "10.0.0.0/8", Some("11.0.0.1"))),
        CommandError::GatewayOutsideSubnet { .. }
    ));
    assert!(matches!(
        refused(&mut s, define("bad name", "10.0.0.0/8", None)),
        CommandError::InvalidName { .. }
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::SetNetworkGateway {
                name: "x".into(),
                gateway: None
            }
        ),
        CommandError::UnknownNetwork { .. }
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::SetNetworkGateway {
                name: "mig1".into(),
                gateway: Some(ip("127.2.0.1"))
            }
        ),
        CommandError::GatewayOutsideSubnet { .. }
    ));
    match refused(
        &mut s,
        Command::RemoveNetwork {
            name: "mig1".into(),
        },
    ) {
        CommandError::NetworkInUse { nodes, .. } => assert_eq!(nodes, vec![1, 2, 3]),
        e => panic!("{e:?}"),
    }
    assert!(matches!(
        refused(&mut s, Command::RemoveNetwork { name: "zz".into() }),
        CommandError::UnknownNetwork { .. }
    ));
    ok(&mut s, define("lab", "10.0.0.0/8", None));
    assert_eq!(s.migration_order.last().unwrap(), "lab");
    ok(&mut s, Command::RemoveNetwork { name: "lab".into() });
    assert!(!s.networks.contains_key("lab"));
    assert!(!s.migration_order.contains(&"lab".to_string()));
}

#[test]
fn network_roles_and_migration_use() {
    let mut s = cluster();
    let names = |s: &ClusterState| -> Vec<String> {
        s.migration_networks()
            .iter()
            .map(|n| n.name.clone())
            .collect()
    };
    // By default the private networks carry migrations, the public one does not.
    assert_eq!(s.networks["public"].role(), NetworkRole::Public);
    assert_eq!(names(&s), vec!["mig1", "mig2"]);
    // A user allows the public network, then deselects a private one.
    ok(
        &mut s,
        Command::SetNetworkMigration {
            name: "public".into(),
            migration: MigrationUse::Allow,
        },
    );
    assert_eq!(names(&s), vec!["mig1", "mig2", "public"]);
    ok(
        &mut s,
        Command::SetNetworkMigration {
            name: "mig1".into(),
            migration: MigrationUse::Forbid,
        },
    );
    assert_eq!(names(&s), vec!["mig2", "public"]);
    // Giving mig2 a gateway makes it public; it is no longer allowed by default.
    ok(
        &mut s,
        Command::SetNetworkGateway {
            name: "mig2".into(),
            gateway: Some(ip("127.2.0.254")),
        },
    );
    assert_eq!(s.networks["mig2"].role(), NetworkRole::Public);
    assert_eq!(names(&s), vec!["public"]);
    // The last allowed network cannot be forbidden, made public or removed.
    assert!(matches!(
        refused(
            &mut s,
            Command::SetNetworkMigration {
                name: "public".into(),
                migration: MigrationUse::Forbid,
            }
        ),
        CommandError::NoMigrationNetworkLeft { name } if name == "public"
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::SetNetworkMigration {
                name: "public".into(),
                migration: MigrationUse::Default,
            }
        ),
        CommandError::NoMigrationNetworkLeft { .. }
    ));
    ok(
        &mut s,
        Command::SetNetworkMigration {
            name: "mig1".into(),
            migration: MigrationUse::Default,
        },
    );
    // With "public" still allowed, mig1 may become public.
    ok(
        &mut s,
        Command::SetNetworkGateway {
            name: "mig1".into(),
            gateway: Some(ip("127.1.0.254")),
        },
    );
    assert_eq!(names(&s), vec!["public"]);
}

#[test]
fn last_private_network_cannot_lose_migration_role() {
    let mut s = ClusterState::default();
    ok(
        &mut s,
        Command::DefineNetwork {
            name: "only".into(),
            subnet: "10.1.0.0/16".parse().unwrap(),
            gateway: None,
        },
    );
    ok(
        &mut s,
        Command::DefineNetwork {
            name: "wan".into(),
            subnet: "10.2.0.0/16".parse().unwrap(),
            gateway: Some(ip("10.2.0.1")),
        },
    );
    assert!(matches!(
        refused(
            &mut s,
            Command::SetNetworkGateway {
                name: "only".into(),
                gateway: Some(ip("10.1.0.1")),
            }
        ),
        CommandError::NoMigrationNetworkLeft { name } if name == "only"
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::RemoveNetwork {
                name: "only".into()
            }
        ),
        CommandError::NoMigrationNetworkLeft { .. }
    ));
    // The public network may go: it carries no migrations.
    ok(&mut s, Command::RemoveNetwork { name: "wan".into() });
}

#[test]
fn migration_network_order() {
    let mut s = cluster();
    ok(
        &mut s,
        Command::SetNetworkMigration {
            name: "public".into(),
            migration: MigrationUse::Allow,
        },
    );
    ok(
        &mut s,
        Command::OrderMigrationNetworks {
            order: vec!["mig2".into(), "public".into()],
        },
    );
    assert_eq!(s.migration_order, vec!["mig2", "public", "mig1"]);
    let paths: Vec<_> = s
        .migration_paths(1, 2)
        .into_iter()
        .map(|(n, a, b)| (n.name.clone(), a, b))
        .collect();
    assert_eq!(
        paths,
        vec![
            ("mig2".into(), ip("127.2.0.1"), ip("127.2.0.2")),
            ("public".into(), ip("127.3.0.1"), ip("127.3.0.2")),
            ("mig1".into(), ip("127.1.0.1"), ip("127.1.0.2")),
        ]
    );
    assert!(matches!(
        refused(
            &mut s,
            Command::OrderMigrationNetworks {
                order: vec!["mig1".into(), "mig1".into()]
            }
        ),
        CommandError::DuplicateNetworkInOrder { name } if name == "mig1"
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::OrderMigrationNetworks {
                order: vec!["nope".into()]
            }
        ),
        CommandError::UnknownNetwork { .. }
    ));
}

// ---------------------------------------------------------------- VMs

#[test]
fn vm_life_cycle_refusals() {
    let mut s = cluster();
    let create = |name: &str, mac: u8, node: NodeId| Command::CreateVm {
        name: name.into(),
        config: vm_config(mac, GIB, shared()),
        node,
    };
    assert!(matches!(
        refused(&mut s, create("a", 9, 1)),
        CommandError::VmExists { .. }
    ));
    assert!(matches!(
        refused(&mut s, create("new", 1, 1)),
        CommandError::MacInUse { vm, .. } if vm == "a"
    ));
    assert!(matches!(
        refused(&mut s, create("new", 9, 77)),
        CommandError::UnknownNode { node: 77 }
    ));
    assert!(matches!(
        refused(&mut s, create("", 9, 1)),
        CommandError::InvalidName { .. }
    ));
    let mut bad = vm_config(9, GIB, shared());
    bad.vcpus = 0;
    assert!(matches!(
        refused(
            &mut s,
            Command::CreateVm {
                name: "new".into(),
                config: bad,
                node: 1
            }
        ),
        CommandError::InvalidValue { field, .. } if field == "vcpus"
    ));
    let mut bad = vm_config(9, GIB, shared());
    bad.mac = MacAddr([0x01, 0, 0, 0, 0, 9]);
    assert!(matches!(
        refused(
            &mut s,
            Command::CreateVm {
                name: "new".into(),
                config: bad,
                node: 1
            }
        ),
        CommandError::InvalidValue { field, .. } if field == "mac"
    ));
    assert!(matches!(
        refused(&mut s, Command::DeleteVm { vm: "a".into() }),
        CommandError::VmNotOff {
            state: VmState::Running,
            ..
        }
    ));
    assert!(matches!(
        refused(&mut s, Command::DeleteVm { vm: "zz".into() }),
        CommandError::UnknownVm { .. }
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::StartVm {
                vm: "a".into(),
                node: 1
            }
        ),
        CommandError::VmNotOff {
            state: VmState::Running,
            ..
        }
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::StopVm {
                vm: "off".into(),
                epoch: None
            }
        ),
        CommandError::VmNotRunning {
            state: VmState::Off,
            ..
        }
    ));
    // A VM on a node-local disk starts only where its disk is.
    ok(
        &mut s,
        Command::StopVm {
            vm: "b".into(),
            epoch: None,
        },
    );
    assert!(matches!(
        refused(
            &mut s,
            Command::StartVm {
                vm: "b".into(),
                node: 2
            }
        ),
        CommandError::DiskOnOtherNode {
            disk_owner: 1,
            node: 2,
            ..
        }
    ));
    let (id, _) = begun(&mut s, "a", 1, 2);
    assert!(matches!(
        refused(&mut s, Command::StopVm { vm: "a".into(), epoch: None }),
        CommandError::VmMigrating { migration, .. } if migration == id
    ));
    ok(&mut s, Command::DeleteVm { vm: "off".into() });
    assert!(!s.vms.contains_key("off"));
}

#[test]
fn start_checks_capacity_and_records_cpu_features() {
    let mut s = cluster();
    // Node 3 has 2 GiB: one 1 GiB VM fits, a 2 GiB one does not.
    ok(
        &mut s,
        Command::CreateVm {
            name: "big".into(),
            config: vm_config(10, 3 * GIB, shared()),
            node: 3,
        },
    );
    assert!(matches!(
        refused(&mut s, Command::StartVm { vm: "big".into(), node: 3 }),
        CommandError::NodeLacksCapacity { node: 3, resource: Resource::Memory, needed, available }
            if needed == 3 * GIB && available == 2 * GIB
    ));
    match ok(
        &mut s,
        Command::StartVm {
            vm: "off".into(),
            node: 1,
        },
    ) {
        Response::VmStarted {
            node, cpu_features, ..
        } => {
            assert_eq!(node, 1);
            assert_eq!(cpu_features, features(&["sse4", "avx2"]));
        }
        r => panic!("{r:?}"),
    }
    // VM slots count too.
    let mut s = cluster();
    ok(&mut s, add_node(4, &["sse4"], 64 * GIB, 1));
    ok(
        &mut s,
        Command::CreateVm {
            name: "c".into(),
            config: vm_config(11, GIB, shared()),
            node: 4,
        },
    );
    ok(
        &mut s,
        Command::StartVm {
            vm: "c".into(),
            node: 4,
        },
    );
    assert!(matches!(
        refused(
            &mut s,
            Command::StartVm {
                vm: "off".into(),
                node: 4
            }
        ),
        CommandError::NodeLacksCapacity {
            resource: Resource::VmSlots,
            ..
        }
    ));
}

#[test]
fn processor_compatibility_only_while_off() {
    let mut s = cluster();
    assert!(matches!(
        refused(
            &mut s,
            Command::SetProcessorCompatibility {
                vm: "a".into(),
                enabled: true
            }
        ),
        CommandError::ProcessorCompatibilityWhileRunning {
            state: VmState::Running,
            ..
        }
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::SetProcessorCompatibility {
                vm: "none".into(),
                enabled: true
            }
        ),
        CommandError::UnknownVm { .. }
    ));
    // Node 3 lacks avx2: "b" (started with node 1's features) cannot go there.
    match refused(&mut s, begin("b", 1, 3)) {
        CommandError::MissingCpuFeatures { node: 3, missing } => {
            assert_eq!(missing, vec!["avx2"])
        }
        e => panic!("{e:?}"),
    }
    // Off, switched to compatibility mode, restarted: it gets the common baseline.
    ok(
        &mut s,
        Command::StopVm {
            vm: "b".into(),
            epoch: None,
        },
    );
    ok(
        &mut s,
        Command::SetProcessorCompatibility {
            vm: "b".into(),
            enabled: true,
        },
    );
    match ok(
        &mut s,
        Command::StartVm {
            vm: "b".into(),
            node: 1,
        },
    ) {
        Response::VmStarted { cpu_features, .. } => {
            assert_eq!(cpu_features, features(&["sse4"]))
        }
        r => panic!("{r:?}"),
    }
    begun(&mut s, "b", 1, 3);
}

// ---------------------------------------------------------------- migrations

#[test]
fn begin_migration_refusals() {
    let mut s = cluster();
    assert!(matches!(
        refused(&mut s, begin("zz", 1, 2)),
        CommandError::UnknownVm { .. }
    ));
    assert!(matches!(
        refused(&mut s, begin("off", 2, 1)),
        CommandError::VmNotRunningOnSource {
            state: VmState::Off,
            ..
        }
    ));
    assert!(matches!(
        refused(&mut s, begin("a", 2, 3)),
        CommandError::VmNotRunningOnSource {
            source_node: 2,
            owner: 1,
            ..
        }
    ));
    assert!(matches!(
        refused(&mut s, begin("a", 1, 1)),
        CommandError::SameSourceAndTarget { node: 1 }
    ));
    assert!(matches!(
        refused(&mut s, begin("a", 1, 99)),
        CommandError::UnknownNode { node: 99 }
    ));
    // Capacity: node 3 has 2 GiB. Three 1 GiB VMs in compatibility mode (so node 3's CPU
    // suffices) head there; the third does not fit.
    let mut s2 = cluster();
    for (i, name) in ["x", "y", "z"].into_iter().enumerate() {
        ok(
            &mut s2,
            Command::CreateVm {
                name: name.into(),
                config: vm_config(20 + i as u8, GIB, shared()),
                node: 2,
            },
        );
        ok(
            &mut s2,
            Command::SetProcessorCompatibility {
                vm: name.into(),
                enabled: true,
            },
        );
        ok(
            &mut s2,
            Command::StartVm {
                vm: name.into(),
                node: 2,
            },
        );
    }
    begun(&mut s2, "x", 2, 3);
    begun(&mut s2, "y", 2, 3);
    // 2 GiB reserved on node 3 now; the limit of 2 migrations is also reached on node 2,
    // so raise the limit to see the capacity refusal.
    let mut settings = s2.settings.clone();
    settings.max_migrations_per_node = 5;
    ok(&mut s2, Command::UpdateSettings { settings });
    assert!(matches!(
        refused(&mut s2, begin("z", 2, 3)),
        CommandError::TargetLacksCapacity { node: 3, resource: Resource::Memory, needed, available: 0 }
            if needed == GIB
    ));
}

#[test]
fn simultaneous_migration_limit() {
    let mut s = cluster();
    ok(
        &mut s,
        Command::CreateVm {
            name: "c".into(),
            config: vm_config(12, GIB, shared()),
            node: 1,
        },
    );
    ok(
        &mut s,
        Command::StartVm {
            vm: "c".into(),
            node: 1,
        },
    );
    begun(&mut s, "a", 1, 2);
    begun(&mut s, "b", 1, 2);
    assert!(matches!(
        refused(&mut s, begin("c", 1, 2)),
        CommandError::MigrationLimitReached { node: 1, limit: 2 }
    ));
    let mut settings = s.settings.clone();
    settings.max_migrations_per_node = 3;
    ok(&mut s, Command::UpdateSettings { settings });
    begun(&mut s, "c", 1, 2);
}

#[test]
fn vm_already_migrating_and_no_common_network() {
    let mut s = cluster();
    let (id, _) = begun(&mut s, "a", 1, 2);
    assert!(matches!(
        refused(&mut s, begin("a", 1, 2)),
        CommandError::VmAlreadyMigrating { migration, .. } if migration == id
    ));
    // Node 5 has no address on any migration network.
    ok(
        &mut s,
        Command::AddNode {
            id: 5,
            name: "node5".into(),
            addresses: BTreeMap::from([("public".to_string(), ip("127.3.0.5"))]),
            cpu_features: features(&["sse4", "avx2"]),
            capacity: Capacity {
                memory_bytes: 8 * GIB,
                max_vms: 4,
            },
            tcp_offload: false,
        },
    );
    assert!(matches!(
        refused(&mut s, begin("b", 1, 5)),
        CommandError::NoCommonMigrationNetwork {
            source_node: 1,
            target: 5
        }
    ));
}

#[test]
fn switchover_moves_ownership_and_disk() {
    let mut s = cluster();
    let (id, epoch) = begun(&mut s, "b", 1, 2);
    assert_eq!(s.vms["b"].state, VmState::Migrating);
    assert_eq!(
        s.node_load(2).memory_bytes,
        GIB,
        "memory reserved on the target"
    );
    ok(
        &mut s,
        Command::RecordMigrationPhase {
            migration: id,
            phase: MigrationPhase::Copying { round: 3 },
            at_ms: 2,
        },
    );
    assert!(matches!(
        refused(
            &mut s,
            Command::RecordMigrationPhase {
                migration: id,
                phase: MigrationPhase::Copying { round: 1 },
                at_ms: 3,
            }
        ),
        CommandError::PhaseRegression { .. }
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::RecordMigrationPhase {
                migration: id,
                phase: MigrationPhase::SwitchedOver,
                at_ms: 3,
            }
        ),
        CommandError::PhaseRegression { .. }
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::RecordMigrationPhase {
                migration: 999,
                phase: MigrationPhase::Verified,
                at_ms: 3,
            }
        ),
        CommandError::UnknownMigration { id: 999 }
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::CommitSwitchover {
                migration: id,
                expected_epoch: epoch + 7,
                at_ms: 4,
            }
        ),
        CommandError::StaleEpoch { expected, current } if expected == epoch + 7 && current == epoch
    ));
    match ok(
        &mut s,
        Command::CommitSwitchover {
            migration: id,
            expected_epoch: epoch,
            at_ms: 4,
        },
    ) {
        Response::SwitchedOver {
            vm,
            owner,
            epoch: e,
        } => {
            assert_eq!((vm.as_str(), owner, e), ("b", 2, epoch + 1));
        }
        r => panic!("{r:?}"),
    }
    let vm = &s.vms["b"];
    assert_eq!(
        (vm.owner, vm.epoch, vm.state),
        (2, epoch + 1, VmState::Running)
    );
    assert_eq!(
        vm.disk_owner,
        Some(2),
        "a node-local disk moves with the VM"
    );
    let m = &s.migrations[&id];
    assert_eq!(m.outcome, MigrationOutcome::Completed);
    assert_eq!(m.phase, MigrationPhase::SwitchedOver);
    assert_eq!(m.ended_at_ms, Some(4));
    assert_eq!(s.node_load(1).memory_bytes, GIB, "only 'a' left on node 1");
    // After the commit neither a second switchover nor an abort is possible.
    assert!(matches!(
        refused(
            &mut s,
            Command::CommitSwitchover {
                migration: id,
                expected_epoch: epoch,
                at_ms: 5,
            }
        ),
        CommandError::MigrationNotActive {
            outcome: MigrationOutcome::Completed,
            ..
        }
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::AbortMigration {
                migration: id,
                reason: "late".into(),
                at_ms: 5,
            }
        ),
        CommandError::MigrationNotActive {
            outcome: MigrationOutcome::Completed,
            ..
        }
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::CommitSwitchover {
                migration: 4242,
                expected_epoch: 0,
                at_ms: 5,
            }
        ),
        CommandError::UnknownMigration { id: 4242 }
    ));
}

#[test]
fn abort_keeps_vm_on_source_and_blocks_switchover() {
    let mut s = cluster();
    let (id, epoch) = begun(&mut s, "a", 1, 2);
    match ok(
        &mut s,
        Command::AbortMigration {
            migration: id,
            reason: "paths lost".into(),
            at_ms: 9,
        },
    ) {
        Response::MigrationAborted { vm, owner } => assert_eq!((vm.as_str(), owner), ("a", 1)),
        r => panic!("{r:?}"),
    }
    let vm = &s.vms["a"];
    assert_eq!((vm.owner, vm.epoch, vm.state), (1, epoch, VmState::Running));
    assert_eq!(s.node_load(2).memory_bytes, 0, "reservation released");
    assert!(matches!(
        refused(
            &mut s,
            Command::CommitSwitchover {
                migration: id,
                expected_epoch: epoch,
                at_ms: 10,
            }
        ),
        CommandError::MigrationNotActive {
            outcome: MigrationOutcome::Aborted { .. },
            ..
        }
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::AbortMigration {
                migration: id,
                reason: "again".into(),
                at_ms: 10,
            }
        ),
        CommandError::MigrationNotActive { .. }
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::RecordMigrationPhase {
                migration: id,
                phase: MigrationPhase::Verified,
                at_ms: 10,
            }
        ),
        CommandError::MigrationNotActive { .. }
    ));
    // The same VM can be moved again, and the earlier epoch is stale for the new move only
    // if ownership changed in between — it did not.
    let (id2, epoch2) = begun(&mut s, "a", 1, 2);
    assert_eq!(epoch2, epoch);
    assert_ne!(id2, id);
}

#[test]
fn switchover_abort_race_exactly_one_wins() {
    for switch_first in [true, false] {
        let mut s = cluster();
        let (id, epoch) = begun(&mut s, "a", 1, 2);
        let switch = Command::CommitSwitchover {
            migration: id,
            expected_epoch: epoch,
            at_ms: 5,
        };
        let abort = Command::AbortMigration {
            migration: id,
            reason: "cancel".into(),
            at_ms: 5,
        };
        let (first, second) = if switch_first {
            (switch, abort)
        } else {
            (abort, switch)
        };
        ok(&mut s, first);
        assert!(matches!(
            refused(&mut s, second),
            CommandError::MigrationNotActive { id: i, .. } if i == id
        ));
        let vm = &s.vms["a"];
        if switch_first {
            assert_eq!((vm.owner, vm.epoch), (2, epoch + 1));
        } else {
            assert_eq!((vm.owner, vm.epoch), (1, epoch));
        }
    }
}

// ---------------------------------------------------------------- tips and settings

#[test]
fn tips() {
    let mut s = cluster();
    let raise = |vm: &str, target: NodeId| Command::RaiseTip {
        vm: vm.into(),
        target,
        reason: "node 1 CPU over 90% for 5 min".into(),
        at_ms: 100,
        expires_at_ms: 400,
    };
    assert!(matches!(
        refused(&mut s, raise("off", 1)),
        CommandError::VmNotRunning { .. }
    ));
    assert!(matches!(
        refused(&mut s, raise("a", 1)),
        CommandError::SameSourceAndTarget { .. }
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::RaiseTip {
                vm: "a".into(),
                target: 2,
                reason: "x".into(),
                at_ms: 100,
                expires_at_ms: 50,
            }
        ),
        CommandError::InvalidValue { .. }
    ));
    let id = match ok(&mut s, raise("a", 2)) {
        Response::TipRaised { id } => id,
        r => panic!("{r:?}"),
    };
    assert_eq!(s.tips[&id].source, 1);
    assert!(matches!(
        refused(&mut s, raise("a", 2)),
        CommandError::TipAlreadyPending { tip, .. } if tip == id
    ));
    assert!(matches!(
        refused(
            &mut s,
            Command::ResolveTip {
                tip: 77,
                state: TipState::Accepted,
                at_ms: 1
            }
        ),
        CommandError::UnknownTip { id: 77 }
    ));
    ok(
        &mut s,
        Command::ResolveTip {
            tip: id,
            state: TipState::Accepted,
            at_ms: 150,
        },
    );
    let migration = match ok(
        &mut s,
        Command::BeginMigration {
            vm: "a".into(),
            source: 1,
            target: 2,
            trigger: MigrationTrigger::Tip(id),
            at_ms: 160,
        },
    ) {
        Response::MigrationBegun { id, .. } => id,
        r => panic!("{r:?}"),
    };
    assert_eq!(s.tips[&id].state, TipState::Applied { migration });
    assert!(matches!(
        refused(
            &mut s,
            Command::ResolveTip {
                tip: id,
                state: TipState::Dismissed,
                at_ms: 170
            }
        ),
        CommandError::TipTransition { .. }
    ));
    // A dismissed tip cannot be applied.
    let id2 = match ok(&mut s, raise("b", 2)) {
        Response::TipRaised { id } => id,
        r => panic!("{r:?}"),
    };
    ok(
        &mut s,
        Command::ResolveTip {
            tip: id2,
            state: TipState::Dismissed,
            at_ms: 200,
        },
    );
    assert!(matches!(
        refused(
            &mut s,
            Command::BeginMigration {
                vm: "b".into(),
                source: 1,
                target: 2,
                trigger: MigrationTrigger::Tip(id2),
                at_ms: 210,
            }
        ),
        CommandError::TipTransition { .. }
    ));
    // Mode off: no tips.
    let mut settings = s.settings.clone();
    settings.pro_tip_mode = ProTipMode::Off;
    ok(&mut s, Command::UpdateSettings { settings });
    assert!(matches!(
        refused(&mut s, raise("b", 3)),
        CommandError::ProTipsDisabled
    ));
}

#[test]
fn settings_validation() {
    let mut s = cluster();
    assert_eq!(s.settings.downtime_limit_ms, 300);
    assert_eq!(s.settings.max_migrations_per_node, 2);
    for (field, change) in [
        (
            "downtime_limit_ms",
            Settings {
                downtime_limit_ms: 0,
                ..Settings::default()
            },
        ),
        (
            "max_migrations_per_node",
            Settings {
                max_migrations_per_node: 0,
                ..Settings::default()
            },
        ),
        (
            "bandwidth_cap_bytes_per_sec",
            Settings {
                bandwidth_cap_bytes_per_sec: Some(0),
                ..Settings::default()
            },
        ),
    ] {
        assert!(matches!(
            refused(&mut s, Command::UpdateSettings { settings: change }),
            CommandError::InvalidValue { field: f, .. } if f == field
        ));
    }
    let settings = Settings {
        downtime_limit_ms: 100,
        bandwidth_cap_bytes_per_sec: Some(1 << 30),
        max_migrations_per_node: 4,
        pro_tip_mode: ProTipMode::Automatic,
        failure_detection_ms: 5000,
    };
    ok(
        &mut s,
        Command::UpdateSettings {
            settings: settings.clone(),
        },
    );
    assert_eq!(s.settings, settings);
}

#[test]
fn history_is_bounded() {
    let mut s = cluster();
    for i in 0..(HISTORY_LIMIT + 20) {
        let (id, _) = begun(&mut s, "a", 1, 2);
        ok(
            &mut s,
            Command::AbortMigration {
                migration: id,
                reason: format!("{i}"),
                at_ms: i as u64,
            },
        );
    }
    assert_eq!(s.migrations.len(), HISTORY_LIMIT);
    assert_eq!(
        *s.migrations.keys().next().unwrap(),
        20,
        "the oldest were dropped"
    );
}

// ---------------------------------------------------------------- random sequences

mod random {
    use super::*;
    use proptest::prelude::*;

    fn node() -> impl Strategy<Value = NodeId> {
        1u64..=4
    }
    fn vm() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["a", "b", "c", "d"]).prop_map(String::from)
    }
    fn network() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["mig1", "mig2", "public", "n4"]).prop_map(String::from)
    }

    /// A step: a plain command, or one resolved against the state when it is applied (so
    /// that migrations, which need the current owner, epoch and id, happen often).
    #[derive(Debug, Clone)]
    enum Step {
        Plain(Command),
        BeginFromOwner { vm: String, target: NodeId },
        CommitLatest { stale: bool },
        AbortLatest,
        PhaseLatest { round: u32 },
    }

    impl Step {
        fn resolve(&self, s: &ClusterState) -> Command {
            let latest = s.migrations.keys().next_back().copied().unwrap_or(0);
            match self {
                Step::Plain(c) => c.clone(),
                Step::BeginFromOwner { vm, target } => {
                    let source = s.vms.get(vm).map_or(1, |v| v.owner);
                    begin(vm, source, *target)
                }
                Step::CommitLatest { stale } => {
                    let epoch = s
                        .migrations
                        .get(&latest)
                        .and_then(|m| s.vms.get(&m.vm))
                        .map_or(0, |v| v.epoch);
                    Command::CommitSwitchover {
                        migration: latest,
                        expected_epoch: if *stale { epoch + 1 } else { epoch },
                        at_ms: 2,
                    }
                }
                Step::AbortLatest => Command::AbortMigration {
                    migration: latest,
                    reason: "random".into(),
                    at_ms: 3,
                },
                Step::PhaseLatest { round } => Command::RecordMigrationPhase {
                    migration: latest,
                    phase: MigrationPhase::Copying { round: *round },
                    at_ms: 4,
                },
            }
        }
    }

    fn step() -> impl Strategy<Value = Step> {
        let plain = prop_oneof![
            (node(), 0u64..3).prop_map(|(id, mem)| add_node(id, &["sse4"], mem * GIB, 2)),
            node().prop_map(|node| Command::RemoveNode { node }),
            (node(), any::<bool>()).prop_map(|(node, drain)| Command::PauseNode { node, drain }),
            node().prop_map(|node| Command::ResumeNode { node }),
            node().prop_map(|node| Command::MarkNodeDown {
                node,
                reason: "test".into(),
                at_ms: 1
            }),
            node().prop_map(|node| Command::MarkNodeUp { node }),
            (network(), any::<bool>()).prop_map(|(name, gw)| Command::SetNetworkGateway {
                gateway: gw.then(|| ip(&format!("127.{}.0.254", 1 + name.len() % 3))),
                name,
            }),
            (network(), 0u8..3).prop_map(|(name, m)| Command::SetNetworkMigration {
                name,
                migration: [
                    MigrationUse::Default,
                    MigrationUse::Allow,
                    MigrationUse::Forbid
                ][m as usize],
            }),
            network().prop_map(|name| Command::RemoveNetwork { name }),
            (vm(), 0u8..6, node(), any::<bool>()).prop_map(|(name, mac, node, local)| {
                Command::CreateVm {
                    name,
                    config: vm_config(
                        mac,
                        GIB / 2,
                        if local {
                            StorageSpec::Local { size_bytes: GIB }
                        } else {
                            shared()
                        },
                    ),
                    node,
                }
            }),
            vm().prop_map(|vm| Command::DeleteVm { vm }),
            vm().prop_map(|vm| Command::StopVm { vm, epoch: None }),
            (vm(), 0u64..3).prop_map(|(vm, epoch)| Command::VmLost { vm, epoch }),
            (vm(), any::<bool>())
                .prop_map(|(vm, enabled)| Command::SetProcessorCompatibility { vm, enabled }),
        ];
        prop_oneof![
            4 => plain.prop_map(Step::Plain),
            3 => (vm(), node()).prop_map(|(vm, node)| Step::Plain(Command::StartVm { vm, node })),
            4 => (vm(), node()).prop_map(|(vm, target)| Step::BeginFromOwner { vm, target }),
            2 => any::<bool>().prop_map(|stale| Step::CommitLatest { stale }),
            1 => Just(Step::AbortLatest),
            1 => (0u32..4).prop_map(|round| Step::PhaseLatest { round }),
        ]
    }

    fn check_invariants(s: &ClusterState) {
        let mut active_per_vm = BTreeMap::new();
        for m in s.active_migrations() {
            *active_per_vm.entry(m.vm.clone()).or_insert(0) += 1;
            let vm = &s.vms[&m.vm];
            assert_eq!(
                vm.state,
                VmState::Migrating,
                "active migration {m:?} of a non-migrating VM"
            );
            assert_eq!(vm.migration, Some(m.id));
            assert_eq!(vm.owner, m.source);
        }
        assert!(active_per_vm.values().all(|n| *n == 1));
        for vm in s.vms.values() {
            assert!(
                s.nodes.contains_key(&vm.owner),
                "{} owned by a missing node",
                vm.name
            );
            if let Some(d) = vm.disk_owner {
                assert!(s.nodes.contains_key(&d));
            }
            if vm.state == VmState::Migrating {
                assert!(active_per_vm.contains_key(&vm.name));
            } else {
                assert_eq!(vm.migration, None);
            }
            if matches!(vm.state, VmState::Running | VmState::Migrating) {
                assert_ne!(
                    s.nodes[&vm.owner].state,
                    NodeState::Down,
                    "{} runs on a dead node",
                    vm.name
                );
            }
        }
        for (id, n) in &s.nodes {
            if n.state != NodeState::Down {
                let load = s.node_load(*id);
                assert!(
                    load.memory_bytes <= n.capacity.memory_bytes,
                    "node {id} over capacity"
                );
                assert!(load.vms <= n.capacity.max_vms);
            }
        }
        let mut order = s.migration_order.clone();
        order.sort();
        assert_eq!(order, s.networks.keys().cloned().collect::<Vec<_>>());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any sequence of commands: a refusal changes nothing, epochs never go back, and the
        /// state stays consistent (one active migration per migrating VM, no VM on a dead
        /// node, no node over capacity).
        #[test]
        fn random_commands_keep_the_state_consistent(steps in prop::collection::vec(step(), 1..80)) {
            let mut s = cluster();
            let mut epochs: BTreeMap<String, u64> = BTreeMap::new();
            for step in steps {
                let cmd = step.resolve(&s);
                let before = s.clone();
                if apply(&mut s, cmd.clone()).is_err() {
                    prop_assert_eq!(&s, &before, "refused {:?} changed the state", cmd);
                }
                check_invariants(&s);
                for vm in s.vms.values() {
                    let e = epochs.entry(vm.name.clone()).or_insert(vm.epoch);
                    if before.vms.contains_key(&vm.name) {
                        prop_assert!(vm.epoch >= *e, "epoch of {} went back", vm.name);
                    }
                    *e = vm.epoch;
                }
            }
        }
    }
}
