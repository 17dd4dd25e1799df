//! A source that lies in `Prepare`: the target builds the machine the store
//! defines or nothing. A spec asking for `u32::MAX` vCPUs (which aborted the
//! process before), a terabyte of memory, another backend, or a migration
//! record of another VM is refused by name; the target keeps serving and
//! holds no copy; the honest spec of the same migration is then accepted.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry_actors::migration::protocol::{self, GuestSpec, Reply, Request};
use ferry_actors::node::spec_of;
use ferry_cluster::model::MigrationTrigger;
use ferry_cluster::{Command, Response};
use std::time::Duration;

#[test]
fn a_prepare_whose_spec_is_not_the_stores_is_refused_by_name() {
    run(async {
        let cluster = TestCluster::start("hostile-prepare", 2).await.unwrap();
        cluster
            .start_vm("vm-1", 1, 64 * MIB, workload(0), 1)
            .await
            .unwrap();
        cluster
            .start_vm("vm-2", 1, 32 * MIB, workload(0), 2)
            .await
            .unwrap();
        let Response::MigrationBegun { id, epoch } = cluster
            .write(Command::BeginMigration {
                vm: "vm-1".into(),
                source: 1,
                target: 2,
                trigger: MigrationTrigger::User,
                at_ms: 1,
            })
            .await
            .unwrap()
        else {
            panic!("the store did not begin the migration");
        };
        // The target's replica may trail the commit by a heartbeat.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !cluster
            .node(2)
            .shared
            .cluster
            .read()
            .migrations
            .contains_key(&id)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "node 2 never saw migration {id}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let honest = spec_of(&cluster.node(1).shared.cluster.read().vms["vm-1"].config).unwrap();
        let target = cluster.node(2);
        let addrs = target.rpc.local_addrs();
        let prepare = |vm: &str, spec: GuestSpec| Request::Prepare {
            version: protocol::PROTOCOL_VERSION,
            migration: id,
            vm: vm.into(),
            epoch,
            spec,
        };
        let call = |request: Request| {
            let rpc = cluster.node(1).rpc.clone();
            let addrs = addrs.clone();
            async move {
                let reply = rpc
                    .call(
                        2,
                        &addrs,
                        protocol::SERVICE,
                        ferry_transport::encode(&request),
                        Duration::from_secs(10),
                    )
                    .await
                    .unwrap();
                ferry_transport::decode::<Reply>(&reply).unwrap()
            }
        };

        let lies = [
            (
                "vm-1",
                GuestSpec {
                    vcpus: u32::MAX,
                    ..honest.clone()
                },
                "vCPUs",
            ),
            (
                "vm-1",
                GuestSpec {
                    memory_bytes: 1 << 40,
                    ..honest.clone()
                },
                "memory",
            ),
            (
                "vm-1",
                GuestSpec {
                    backend: "kvm".into(),
                    ..honest.clone()
                },
                "backend",
            ),
            // The migration record is vm-1's, not vm-2's.
            ("vm-2", honest.clone(), "does not match the store"),
        ];
        for (vm, spec, named) in lies {
            match call(prepare(vm, spec)).await {
                Reply::Refused { reason } => {
                    assert!(reason.contains(named), "{named}: {reason}")
                }
                other => panic!("a lying Prepare ({named}) was answered {other:?}"),
            }
            assert!(
                target.shared.guest(vm).is_none(),
                "the target built a guest for a refused Prepare ({named})"
            );
        }
        // Still serving: the honest spec of the same migration is accepted.
        assert_eq!(call(prepare("vm-1", honest)).await, Reply::Prepared);
        let _ = call(Request::Abandon {
            migration: id,
            reason: "test over".into(),
        })
        .await;
    });
}
