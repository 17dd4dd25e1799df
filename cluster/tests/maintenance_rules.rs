//! The two maintenance rules `apply` gained for the drain: a paused node may be
//! asked to drain again (after a failed drain), and nothing lands on a paused
//! node — not even a migration that was already copying to it when it was
//! paused, whose switchover the store now refuses.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ferry_cluster::model::{
    Backend, Capacity, DrainStatus, MacAddr, MigrationOutcome, MigrationTrigger, NodeState,
    StorageSpec, StuckVm, Subnet, VmConfig, VmState,
};
use ferry_cluster::{apply, ClusterState, Command, CommandError, Response};

fn ok(s: &mut ClusterState, c: Command) -> Response {
    apply(s, c).unwrap()
}

fn refused(s: &mut ClusterState, c: Command) -> CommandError {
    let before = s.clone();
    let e = apply(s, c).unwrap_err();
    assert_eq!(*s, before, "a refused command changes nothing");
    e
}

/// Three nodes on one private network; VM "a" runs on node 1.
fn cluster() -> ClusterState {
    let mut s = ClusterState::default();
    ok(
        &mut s,
        Command::DefineNetwork {
            name: "mig".into(),
            subnet: Subnet {
                addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)),
                prefix: 24,
            },
            gateway: None,
        },
    );
    for id in 1..=3u64 {
        ok(
            &mut s,
            Command::AddNode {
                id,
                name: format!("n{id}"),
                addresses: BTreeMap::from([(
                    "mig".to_string(),
                    IpAddr::V4(Ipv4Addr::new(10, 0, 0, id as u8)),
                )]),
                cpu_features: Default::default(),
                capacity: Capacity {
                    memory_bytes: 1 << 34,
                    max_vms: 8,
                },
                tcp_offload: false,
            },
        );
    }
    ok(
        &mut s,
        Command::CreateVm {
            name: "a".into(),
            config: VmConfig {
                failover: Default::default(),
                memory_bytes: 1 << 28,
                vcpus: 1,
                mac: MacAddr([2, 0, 0, 0, 0, 1]),
                backend: Backend::Sim,
                workload: vec![],
                storage: StorageSpec::Local {
                    size_bytes: 1 << 30,
                },
            },
            node: 1,
        },
    );
    ok(
        &mut s,
        Command::StartVm {
            vm: "a".into(),
            node: 1,
        },
    );
    s
}

#[test]
fn a_paused_node_may_be_asked_to_drain_again_but_not_twice_at_once() {
    let mut s = cluster();
    ok(
        &mut s,
        Command::PauseNode {
            node: 2,
            drain: false,
        },
    );
    // Paused without drain: a drain may still be asked for.
    ok(
        &mut s,
        Command::PauseNode {
            node: 2,
            drain: true,
        },
    );
    assert_eq!(s.nodes[&2].drain, DrainStatus::Draining);
    assert_eq!(
        refused(
            &mut s,
            Command::PauseNode {
                node: 2,
                drain: true
            }
        ),
        CommandError::NodeAlreadyPaused { node: 2 }
    );
    ok(
        &mut s,
        Command::RecordDrain {
            node: 2,
            status: DrainStatus::Failed {
                stuck: vec![StuckVm {
                    vm: "x".into(),
                    reason: "no eligible target".into(),
                }],
            },
        },
    );
    // After a failed drain, a retry.
    ok(
        &mut s,
        Command::PauseNode {
            node: 2,
            drain: true,
        },
    );
    assert_eq!(s.nodes[&2].drain, DrainStatus::Draining);
    assert_eq!(s.nodes[&2].state, NodeState::Paused);
}

#[test]
fn the_switchover_to_a_node_paused_mid_copy_is_refused_and_the_vm_stays() {
    let mut s = cluster();
    let Response::MigrationBegun { id, epoch } = ok(
        &mut s,
        Command::BeginMigration {
            vm: "a".into(),
            source: 1,
            target: 2,
            trigger: MigrationTrigger::User,
            at_ms: 1,
        },
    ) else {
        panic!()
    };
    ok(
        &mut s,
        Command::PauseNode {
            node: 2,
            drain: false,
        },
    );
    let commit = Command::CommitSwitchover {
        migration: id,
        expected_epoch: epoch,
        at_ms: 2,
    };
    assert_eq!(
        refused(&mut s, commit.clone()),
        CommandError::TargetPaused { node: 2 }
    );
    // The source aborts; the VM and its disk stay on node 1.
    ok(
        &mut s,
        Command::AbortMigration {
            migration: id,
            reason: "target entered maintenance".into(),
            at_ms: 3,
        },
    );
    let vm = &s.vms["a"];
    assert_eq!(
        (vm.owner, vm.disk_owner, vm.state),
        (1, Some(1), VmState::Running)
    );
    assert!(matches!(
        s.migrations[&id].outcome,
        MigrationOutcome::Aborted { .. }
    ));
    // An aborted migration stays refused, for the old reason.
    assert!(matches!(
        refused(&mut s, commit),
        CommandError::MigrationNotActive { .. }
    ));
    // Resumed, the node takes the VM (and its disk) again.
    ok(&mut s, Command::ResumeNode { node: 2 });
    let Response::MigrationBegun { id, epoch } = ok(
        &mut s,
        Command::BeginMigration {
            vm: "a".into(),
            source: 1,
            target: 2,
            trigger: MigrationTrigger::User,
            at_ms: 4,
        },
    ) else {
        panic!()
    };
    ok(
        &mut s,
        Command::CommitSwitchover {
            migration: id,
            expected_epoch: epoch,
            at_ms: 5,
        },
    );
    assert_eq!((s.vms["a"].owner, s.vms["a"].disk_owner), (2, Some(2)));
}
