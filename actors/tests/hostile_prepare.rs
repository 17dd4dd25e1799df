//! A source that lies in `Prepare`: the target builds the machine the store
//! defines or nothing. A spec asking for `u32::MAX` vCPUs (which aborted the
//! process before), a terabyte of memory, another backend, or a migration
//! record of another VM is refused by name; the target keeps serving and
//! holds no copy; the honest spec of the same migration is then accepted.
//! And while a source keeps lying, hundreds of times, an honest move of
//! another VM between the same two nodes completes with every acknowledged
//! append, the process's memory and task count stay bounded, and the target
//! never holds the lied-about VM.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../tests/support/process.rs"]
mod process;

use common::*;
use ferry_actors::migration::protocol::{self, GuestSpec, Reply, Request};
use ferry_actors::migration::source::MoveRequest;
use ferry_actors::node::spec_of;
use ferry_cluster::model::MigrationTrigger;
use ferry_cluster::{Command, Response};
use process::{alive_tasks, assert_bounded, rss_bytes};
use std::time::Duration;

/// The tests of this binary run one at a time: one reads the process's
/// memory, which the other's guests would move.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Begins a migration of `vm` from node 1 to node 2 in the store and waits
/// until node 2's replica has it (it may trail the commit by a heartbeat), so
/// a Prepare naming it is judged by its spec, not refused as unknown.
async fn begin_seen_by_target(cluster: &TestCluster, vm: &str) -> (u64, u64) {
    let Response::MigrationBegun { id, epoch } = cluster
        .write(Command::BeginMigration {
            vm: vm.into(),
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
    (id, epoch)
}

#[test]
fn a_prepare_whose_spec_is_not_the_stores_is_refused_by_name() {
    let _serial = serial();
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
        let (id, epoch) = begin_seen_by_target(&cluster, "vm-1").await;
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

/// Memory of the honest VM that moves while the source lies.
const HONEST_MEMORY: u64 = 64 * MIB;
/// How far the process's resident memory may grow while the lies are
/// answered and the honest move runs: the target builds one honest copy
/// (`HONEST_MEMORY`), and its page stream, the QUIC buffers and the
/// allocator's slack come to about as much again; twice that is room for a
/// machine under load. Each lie asks for a terabyte of memory or `u32::MAX`
/// vCPUs: one built, or one pre-allocated buffer, is thousands of times this.
const RSS_GROWTH_BOUND: u64 = 4 * HONEST_MEMORY;
/// How many lies the attack sends at least: enough that one task, or one
/// guest, kept per lie would show far above [`TASK_GROWTH_BOUND`].
const MIN_LIES: u64 = 400;
/// How many of them go before the honest move starts, with nothing else
/// growing the process.
const LIES_ALONE: u64 = 200;
/// How far resident memory may grow while only the lies are answered: the
/// RPC streams' buffers and the refusals' logs, a few MiB at most.
const RSS_GROWTH_BOUND_LIES_ALONE: u64 = 32 * MIB;
/// How many more tasks than before the attack the runtime may hold at once:
/// the honest move's own (the source job, its paths, the page stream, RPC
/// handlers) and the lie in flight.
const TASK_GROWTH_BOUND: usize = 100;

#[test]
fn an_honest_move_completes_while_a_source_keeps_lying_in_prepare() {
    let _serial = serial();
    run(async {
        let cluster = TestCluster::start("hostile-prepare-load", 2).await.unwrap();
        cluster
            .start_vm("honest", 1, HONEST_MEMORY, workload(2_000), 1)
            .await
            .unwrap();
        cluster
            .start_vm("lied", 1, 32 * MIB, workload(0), 2)
            .await
            .unwrap();
        // The lies name a migration the store knows: the lied-about VM's,
        // from node 1 to node 2, so each is refused for its spec, not for
        // an unknown migration.
        let (id, epoch) = begin_seen_by_target(&cluster, "lied").await;
        let target = cluster.node(2).shared.clone();
        let state = cluster.node(1).shared.cluster.read();
        let lied = spec_of(&state.vms["lied"].config).unwrap();
        let honest = spec_of(&state.vms["honest"].config).unwrap();
        let lies: Vec<(&str, GuestSpec, &str)> = vec![
            (
                "lied",
                GuestSpec {
                    vcpus: u32::MAX,
                    ..lied.clone()
                },
                "vCPUs",
            ),
            (
                "lied",
                GuestSpec {
                    memory_bytes: 1 << 40,
                    ..lied.clone()
                },
                "memory",
            ),
            (
                "lied",
                GuestSpec {
                    backend: "kvm".into(),
                    ..lied.clone()
                },
                "backend",
            ),
            // The VM that moves honestly, named under the other VM's record.
            ("honest", honest, "does not match the store"),
        ];

        let client = Client::start(cluster.switch.clone(), "honest");
        let rss_before = rss_bytes();
        let tasks_before = alive_tasks();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let attack = tokio::spawn({
            let (rpc, target, addrs) = (
                cluster.node(1).rpc.clone(),
                target.clone(),
                target.rpc.local_addrs(),
            );
            let (stop, sent) = (stop.clone(), sent.clone());
            async move {
                let mut wrong = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    for (vm, spec, named) in &lies {
                        let request = Request::Prepare {
                            version: protocol::PROTOCOL_VERSION,
                            migration: id,
                            vm: vm.to_string(),
                            epoch,
                            spec: spec.clone(),
                        };
                        let reply = rpc
                            .call(
                                2,
                                &addrs,
                                protocol::SERVICE,
                                ferry_transport::encode(&request),
                                Duration::from_secs(10),
                            )
                            .await
                            .map_err(|e| e.to_string())
                            .and_then(|r| {
                                ferry_transport::decode::<Reply>(&r).map_err(|e| e.to_string())
                            });
                        match reply {
                            Ok(Reply::Refused { reason }) if reason.contains(named) => {}
                            other => wrong.push(format!("lie ({named}) answered {other:?}")),
                        }
                        if target.holds("lied") {
                            wrong.push(format!("the target holds a copy after a lie ({named})"));
                        }
                        sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                wrong
            }
        });
        // Samples what the attack could grow: memory, tasks, the target's guests.
        let rss_peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss_before));
        let sampler = tokio::spawn({
            let (stop, target, rss) = (stop.clone(), target.clone(), rss_peak.clone());
            async move {
                let (mut tasks, mut guests) = (0usize, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    rss.fetch_max(rss_bytes(), std::sync::atomic::Ordering::Relaxed);
                    tasks = tasks.max(alive_tasks());
                    if target.holds("lied") || target.running().len() > 1 {
                        guests.push(format!("{:?}", target.running()));
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                (tasks, guests)
            }
        });
        let lies_sent = || sent.load(std::sync::atomic::Ordering::Relaxed);
        let wait_lies = |n: u64| {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            async move {
                while lies_sent() < n {
                    assert!(std::time::Instant::now() < deadline, "the attack stalled");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        // The move starts under the attack and the attack outlasts it.
        wait_lies(LIES_ALONE).await;
        let rss_lies_alone = rss_peak.load(std::sync::atomic::Ordering::Relaxed);
        let during_move = lies_sent();
        let report = cluster
            .move_vm(MoveRequest::new("honest", 2), 1)
            .await
            .expect("the honest move completes under the attack");
        let during_move = lies_sent() - during_move;
        wait_lies(MIN_LIES).await;
        stop.store(true, std::sync::atomic::Ordering::Release);
        let wrong = attack.await.unwrap();
        let (tasks_peak, guests) = sampler.await.unwrap();
        let rss_peak = rss_peak.load(std::sync::atomic::Ordering::Relaxed);
        let lies = lies_sent();

        // The client is served on the target after the move and lost nothing.
        let guest = target
            .guest("honest")
            .expect("the target runs the honest VM");
        let seen = guest.service_records().unwrap().len();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while guest.service_records().unwrap().len() < seen + 20 {
            assert!(
                std::time::Instant::now() < deadline,
                "the target stopped serving"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let log = client.stop();
        assert_no_acked_append_lost(&cluster, 2, "honest", &log);
        assert!(
            wrong.is_empty(),
            "{} of {lies} lies: {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
        assert!(
            guests.is_empty(),
            "the target held more than the honest VM: {guests:?}"
        );
        assert!(!target.holds("lied"), "the target holds the lied-about VM");
        assert_eq!(cluster.node(2).shared.cluster.read().vms["honest"].owner, 2);
        let grew = rss_peak.saturating_sub(rss_before);
        let grew_lies_alone = rss_lies_alone.saturating_sub(rss_before);
        println!(
            "lying Prepares: {lies} refused ({during_move} during the move), honest move of {} MiB in {:?}, \
             {} appends acknowledged, RSS {} MiB before, +{} MiB after {LIES_ALONE} lies alone, peak {} MiB (+{} MiB), tasks {tasks_before} before, peak {tasks_peak}",
            HONEST_MEMORY >> 20,
            report.total,
            log.acked.len(),
            rss_before >> 20,
            grew_lies_alone >> 20,
            rss_peak >> 20,
            grew >> 20,
        );
        assert!(during_move > 0, "no lie was sent while the move ran");
        assert!(
            grew_lies_alone < RSS_GROWTH_BOUND_LIES_ALONE,
            "resident memory grew {} MiB over {LIES_ALONE} lies alone (bound {} MiB)",
            grew_lies_alone >> 20,
            RSS_GROWTH_BOUND_LIES_ALONE >> 20
        );
        assert_bounded(
            grew,
            RSS_GROWTH_BOUND,
            tasks_before,
            tasks_peak,
            TASK_GROWTH_BOUND,
            &format!("{lies} lies"),
        );
    });
}
