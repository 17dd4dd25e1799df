//! The seed's ways a migration starts, and its rules for when one may, end to
//! end on local clusters (real QUIC and Raft, small simulated guests):
//! maintenance drain and failback, policy (PRO) tips, processor
//! compatibility, network roles and path fallback, offloaded TCP connections
//! and node-owned storage.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry_actors::actors::{CancelMove, DrainNode, MoveVm, ResumeNode, StartVm};
use ferry_actors::local::{vm_config, LocalNetwork, LocalOptions};
use ferry_actors::migration::source::{
    MigrationError, MoveRequest, OffloadReport, Phase, StorageReport,
};
use ferry_actors::node::{encode_program, now_ms, GuestProgram};
use ferry_actors::policy::drain::VmDrain;
use ferry_actors::policy::tips::{LoadReport, TipConfig, VmLoad};
use ferry_actors::triggers::drain::{self, DrainOptions};
use ferry_actors::triggers::tips::{self, Tips};
use ferry_cluster::command::CommandError;
use ferry_cluster::model::{
    DrainStatus, MigrationOutcome, MigrationTrigger, MigrationUse, NodeState, ProTipMode,
    StorageSpec, TipState,
};
use ferry_cluster::{ClusterState, Command, NodeId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

const SMALL: u64 = 16 * MIB;

/// Polls `cond` on node `node`'s replica of the store until it holds, at most
/// `within`.
async fn store_until(
    cluster: &TestCluster,
    node: NodeId,
    within: Duration,
    what: &str,
    cond: impl Fn(&ClusterState) -> bool,
) -> Arc<ClusterState> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let state = cluster.node(node).shared.cluster.read();
        if cond(&state) {
            return state;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Stops `vm` on `node`: recorded in the store, then the guest goes.
async fn stop_vm(cluster: &TestCluster, node: NodeId, vm: &str) {
    cluster
        .write(Command::StopVm {
            vm: vm.into(),
            epoch: None,
        })
        .await
        .unwrap();
    assert!(cluster.node(node).shared.release_vm(vm));
}

async fn start_on(cluster: &TestCluster, node: NodeId, vm: &str) -> Result<u64, String> {
    cluster
        .node(node)
        .actor
        .send(StartVm(vm.into()))
        .await
        .unwrap()
}

fn features(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The guest's NIC on `node`, read with the guest briefly paused.
fn nic_of(cluster: &TestCluster, node: NodeId, vm: &str) -> ferry_vmm::NicState {
    let guest = cluster.node(node).shared.guest(vm).unwrap();
    guest.pause().unwrap();
    let nic = guest.save_state().unwrap().nic;
    guest.resume().unwrap();
    nic
}

/// Samples node `node`'s store until stopped; returns the most migrations any
/// one node took part in at once, and whether a migration ever targeted
/// `paused` while it was paused.
struct LimitWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(u32, bool)>,
}

impl LimitWatch {
    fn start(cluster: &TestCluster, node: NodeId, paused: NodeId) -> LimitWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let store = cluster.node(node).shared.cluster.clone();
        let task = tokio::spawn(async move {
            let (mut most, mut landed) = (0, false);
            while !flag.load(Ordering::Acquire) {
                let s = store.read();
                for id in s.nodes.keys() {
                    most = most.max(s.node_load(*id).migrations);
                }
                let is_paused = s.nodes[&paused].state == NodeState::Paused;
                landed |= is_paused && s.active_migrations().any(|m| m.target == paused);
                drop(s);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (most, landed)
        });
        LimitWatch { stop, task }
    }

    async fn stop(self) -> (u32, bool) {
        self.stop.store(true, Ordering::Release);
        self.task.await.unwrap()
    }
}

// ---------------------------------------------------------------- maintenance

#[test]
fn a_drain_empties_a_node_of_six_vms_within_the_limit_and_failback_brings_them_home() {
    run(async {
        let cluster = TestCluster::start("drain", 3).await.unwrap();
        let names: Vec<String> = (1..=6).map(|i| format!("svc-{i}")).collect();
        for (i, name) in names.iter().enumerate() {
            cluster
                .start_vm(
                    name,
                    1,
                    SMALL + (i as u64) * MIB,
                    workload(2_000),
                    10 + i as u8,
                )
                .await
                .unwrap();
        }
        let clients: Vec<Client> = names
            .iter()
            .map(|n| Client::start(cluster.switch.clone(), n))
            .collect();
        let limit = cluster
            .node(1)
            .shared
            .cluster
            .read()
            .settings
            .max_migrations_per_node;
        let watch = LimitWatch::start(&cluster, 1, 1);

        let options = DrainOptions {
            verify: true,
            ..Default::default()
        };
        let mut progress = cluster
            .node(1)
            .actor
            .send(DrainNode(options))
            .await
            .unwrap()
            .unwrap();
        let report = drain::wait(&mut progress, Duration::from_secs(60))
            .await
            .unwrap();
        let (most, landed) = watch.stop().await;

        assert_eq!(report.outcome, Some(DrainStatus::Drained), "{report:?}");
        assert!(most <= limit, "{most} migrations at once, limit {limit}");
        assert!(!landed, "a migration targeted the paused node");
        let state = cluster.node(1).shared.cluster.read();
        assert_eq!(state.nodes[&1].state, NodeState::Paused);
        assert_eq!(state.nodes[&1].drain, DrainStatus::Drained);
        assert_eq!(state.vms_on(1).count(), 0, "the store shows node 1 empty");
        assert!(cluster.node(1).shared.running().is_empty());
        for name in &names {
            let VmDrain::Moved { target, epoch, .. } = report.vms[name] else {
                panic!("{name}: {:?}", report.vms[name])
            };
            assert_ne!(target, 1);
            assert_eq!(cluster.running(name), vec![(target, epoch)], "{name}");
            assert_eq!(state.vms[name].owner, target);
            let drained = state.migrations.values().any(|m| {
                m.vm == *name
                    && m.trigger == MigrationTrigger::Drain
                    && m.outcome == MigrationOutcome::Completed
            });
            assert!(drained, "{name} moved by the drain");
        }
        // Spread by placement: fewest VMs first.
        assert_eq!(state.vms_on(2).count(), 3);
        assert_eq!(state.vms_on(3).count(), 3);

        // While paused nothing lands on node 1: no start, no migration, no tip.
        cluster
            .write(Command::CreateVm {
                name: "late".into(),
                config: vm_config(SMALL, workload(100), 40),
                node: 1,
            })
            .await
            .unwrap();
        let start = start_on(&cluster, 1, "late").await;
        assert!(
            start.as_ref().is_err_and(|e| e.contains("maintenance")),
            "{start:?}"
        );
        let back = cluster
            .move_vm(
                MoveRequest::new(names[0].clone(), 1),
                state.vms[&names[0]].owner,
            )
            .await;
        assert!(
            matches!(
                back,
                Err(MigrationError::Rejected(CommandError::TargetPaused {
                    node: 1
                }))
            ),
            "{back:?}"
        );
        let tip = cluster
            .write(Command::RaiseTip {
                vm: names[0].clone(),
                target: 1,
                reason: "test".into(),
                at_ms: now_ms(),
                expires_at_ms: now_ms() + 60_000,
            })
            .await;
        assert!(tip.is_err_and(|e| e.contains("maintenance")));

        // Resume with failback: every drained VM comes home.
        let failback = cluster
            .node(1)
            .actor
            .send(ResumeNode {
                failback: true,
                verify: true,
            })
            .await
            .unwrap()
            .unwrap();
        assert!(failback.failed.is_empty(), "{failback:?}");
        assert_eq!(failback.moved.len(), 6);
        let state = cluster.node(1).shared.cluster.read();
        assert_eq!(state.nodes[&1].state, NodeState::Up);
        assert_eq!(state.nodes[&1].drain, DrainStatus::Idle);
        for (name, client) in names.iter().zip(clients) {
            assert_eq!(cluster.running(name), vec![(1, state.vms[name].epoch)]);
            let log = client.stop();
            assert_no_acked_append_lost(&cluster, 1, name, &log);
        }
        println!(
            "drain: 6 VMs off node 1, at most {most} migrations at once (limit {limit}); failback {:?}",
            failback.moved
        );
    });
}

#[test]
fn a_drain_names_the_vm_no_node_can_take_and_fails() {
    run(async {
        let mut options = LocalOptions::new(3);
        options.cpu_features = vec![
            features(&["sse4", "avx2", "avx512"]),
            features(&["sse4", "avx2"]),
            features(&["sse4", "avx2"]),
        ];
        let cluster = TestCluster::start_options("drain-stuck", options)
            .await
            .unwrap();
        // "pinned" starts with node 1's features; "portable" in
        // processor-compatibility mode, with the cluster's baseline.
        cluster
            .start_vm("pinned", 1, SMALL, workload(1_000), 1)
            .await
            .unwrap();
        cluster
            .write(Command::CreateVm {
                name: "portable".into(),
                config: vm_config(SMALL, workload(1_000), 2),
                node: 1,
            })
            .await
            .unwrap();
        cluster
            .write(Command::SetProcessorCompatibility {
                vm: "portable".into(),
                enabled: true,
            })
            .await
            .unwrap();
        start_on(&cluster, 1, "portable").await.unwrap();

        let mut progress = cluster
            .node(1)
            .actor
            .send(DrainNode(DrainOptions::default()))
            .await
            .unwrap()
            .unwrap();
        let report = drain::wait(&mut progress, Duration::from_secs(60))
            .await
            .unwrap();
        assert!(matches!(report.vms["portable"], VmDrain::Moved { .. }));
        let stuck = report.stuck();
        assert_eq!(stuck.len(), 1, "{report:?}");
        assert_eq!(stuck[0].vm, "pinned");
        for needle in [
            "node 2 (node-2) lacks CPU features [\"avx512\"]",
            "node 3 (node-3) lacks CPU features [\"avx512\"]",
        ] {
            assert!(stuck[0].reason.contains(needle), "{}", stuck[0].reason);
        }
        // The store says the drain failed, and why (on every replica).
        let failed = DrainStatus::Failed {
            stuck: stuck.clone(),
        };
        store_until(&cluster, 3, Duration::from_secs(5), "drain failed", |s| {
            s.nodes[&1].drain == failed
        })
        .await;
        // Nothing is lost: the stuck VM runs where it was.
        assert_eq!(cluster.running("pinned"), vec![(1, 1)]);
        println!("drain failed as it should: {}", stuck[0].reason);
    });
}

#[test]
fn a_node_paused_while_a_migration_copies_to_it_receives_nothing() {
    run(async {
        let cluster = TestCluster::start("paused-mid-copy", 3).await.unwrap();
        cluster
            .start_vm("bulk", 1, 128 * MIB, workload(5_000), 3)
            .await
            .unwrap();
        let client = Client::start(cluster.switch.clone(), "bulk");
        let mut events = cluster.node(1).shared.events.subscribe();
        let actor = cluster.node(1).actor.clone();
        let mut request = MoveRequest::new("bulk", 2);
        request.verify = true;
        let moving = tokio::spawn(async move { actor.send(MoveVm(request)).await.unwrap() });
        wait_progress(&mut events, |p| p.phase == Phase::Preparing).await;
        cluster
            .write(Command::PauseNode {
                node: 2,
                drain: false,
            })
            .await
            .unwrap();
        let outcome = moving.await.unwrap();
        assert!(
            matches!(&outcome, Err(MigrationError::Aborted(why)) if why.contains("maintenance")),
            "{outcome:?}"
        );
        assert_eq!(cluster.running("bulk"), vec![(1, 1)]);
        store_until(
            &cluster,
            2,
            Duration::from_secs(10),
            "target copy discarded",
            |_| !cluster.node(2).shared.holds("bulk"),
        )
        .await;
        let log = client.stop();
        assert_no_acked_append_lost(&cluster, 1, "bulk", &log);
    });
}

// ---------------------------------------------------------------- tips

fn tip_config(ttl: Duration) -> TipConfig {
    TipConfig {
        cpu_threshold: 0.8,
        memory_threshold: 0.9,
        sustain: Duration::from_millis(200),
        ttl,
        stale_after: Duration::from_secs(60),
        evaluate_every: Duration::from_millis(50),
        report_every: None,
    }
}

/// Starts the tip loop on every node and reports node 1 hot (its VM `vm`
/// using half of it) and the others cool, each node through its own loop.
async fn hot_node_one(cluster: &TestCluster, config: TipConfig, vm: &str) -> Vec<Arc<Tips>> {
    let tips: Vec<Arc<Tips>> = cluster
        .nodes
        .iter()
        .map(|n| Tips::start(n.shared.clone(), config.clone()))
        .collect();
    for (i, t) in tips.iter().enumerate() {
        let node = i as u64 + 1;
        let (cpu, vms) = if node == 1 {
            (
                0.95,
                BTreeMap::from([(
                    vm.to_string(),
                    VmLoad {
                        cpu: 0.5,
                        memory_bytes: SMALL,
                    },
                )]),
            )
        } else {
            (0.1 * node as f64, BTreeMap::new())
        };
        t.report(LoadReport {
            node,
            at_ms: now_ms(),
            cpu,
            memory: 0.1,
            vms,
        })
        .await
        .unwrap();
    }
    tips
}

async fn set_mode(cluster: &TestCluster, mode: ProTipMode) {
    let mut settings = cluster.node(1).shared.cluster.read().settings.clone();
    settings.pro_tip_mode = mode;
    cluster
        .write(Command::UpdateSettings { settings })
        .await
        .unwrap();
}

#[test]
fn a_manual_tip_moves_the_vm_once_a_user_accepts_it() {
    run(async {
        let cluster = TestCluster::start("tip-manual", 3).await.unwrap();
        cluster
            .start_vm("hot", 1, SMALL, workload(1_000), 1)
            .await
            .unwrap();
        let client = Client::start(cluster.switch.clone(), "hot");
        let _tips = hot_node_one(&cluster, tip_config(Duration::from_secs(60)), "hot").await;
        let state = store_until(&cluster, 1, Duration::from_secs(10), "a tip", |s| {
            !s.tips.is_empty()
        })
        .await;
        let tip = state.tips.values().next().unwrap().clone();
        assert_eq!((tip.vm.as_str(), tip.source, tip.target), ("hot", 1, 2));
        assert_eq!(tip.state, TipState::Pending);
        assert!(tip.reason.contains("node-1 CPU at 95%"), "{}", tip.reason);
        // Manual mode: it waits for a user.
        assert!(state.migrations.is_empty());
        assert_eq!(cluster.running("hot"), vec![(1, 1)]);

        tips::accept(&cluster.node(3).shared, tip.id).await.unwrap();
        let state = store_until(
            &cluster,
            1,
            Duration::from_secs(30),
            "the tip's move",
            |s| {
                s.migrations
                    .values()
                    .any(|m| m.trigger == MigrationTrigger::Tip(tip.id) && !m.is_active())
            },
        )
        .await;
        let m = state
            .migrations
            .values()
            .find(|m| m.trigger == MigrationTrigger::Tip(tip.id))
            .unwrap();
        assert_eq!(m.outcome, MigrationOutcome::Completed);
        assert_eq!(
            state.tips[&tip.id].state,
            TipState::Applied { migration: m.id }
        );
        // The commit is in the store; the target resumes once it sees it.
        store_until(&cluster, 2, Duration::from_secs(10), "resumed", |_| {
            cluster.running("hot") == vec![(2, 2)]
        })
        .await;
        let log = client.stop();
        assert_no_acked_append_lost(&cluster, 2, "hot", &log);
        println!("manual tip: {}", tip.reason);
    });
}

#[test]
fn an_automatic_tip_moves_the_vm_unasked() {
    run(async {
        let cluster = TestCluster::start("tip-auto", 3).await.unwrap();
        set_mode(&cluster, ProTipMode::Automatic).await;
        cluster
            .start_vm("hot", 1, SMALL, workload(1_000), 1)
            .await
            .unwrap();
        let client = Client::start(cluster.switch.clone(), "hot");
        let _tips = hot_node_one(&cluster, tip_config(Duration::from_secs(60)), "hot").await;
        let state = store_until(&cluster, 1, Duration::from_secs(30), "the VM moved", |s| {
            s.vms["hot"].owner != 1
        })
        .await;
        let tip = state.tips.values().next().unwrap();
        let TipState::Applied { migration } = tip.state else {
            panic!("{tip:?}")
        };
        assert_eq!(
            state.migrations[&migration].trigger,
            MigrationTrigger::Tip(tip.id)
        );
        assert_eq!(state.vms["hot"].owner, tip.target);
        store_until(
            &cluster,
            tip.target,
            Duration::from_secs(10),
            "resumed",
            |_| cluster.running("hot") == vec![(tip.target, 2)],
        )
        .await;
        let log = client.stop();
        assert_no_acked_append_lost(&cluster, tip.target, "hot", &log);
    });
}

#[test]
fn dismissed_and_expired_tips_move_nothing() {
    run(async {
        let cluster = TestCluster::start("tip-dismiss", 3).await.unwrap();
        cluster
            .start_vm("hot", 1, SMALL, workload(1_000), 1)
            .await
            .unwrap();
        let _tips = hot_node_one(&cluster, tip_config(Duration::from_millis(600)), "hot").await;
        let state = store_until(&cluster, 1, Duration::from_secs(10), "a tip", |s| {
            !s.tips.is_empty()
        })
        .await;
        let first = *state.tips.keys().next().unwrap();
        tips::dismiss(&cluster.node(2).shared, first).await.unwrap();
        // Node 1 stays hot: after another window the policy tips again; this
        // one nobody answers, and it expires.
        let state = store_until(
            &cluster,
            1,
            Duration::from_secs(10),
            "an expired tip",
            |s| {
                s.tips
                    .values()
                    .any(|t| t.id != first && t.state == TipState::Expired)
            },
        )
        .await;
        assert_eq!(state.tips[&first].state, TipState::Dismissed);
        let expired = state
            .tips
            .values()
            .find(|t| t.state == TipState::Expired)
            .unwrap()
            .id;
        // Too late to accept either.
        let late = tips::accept(&cluster.node(1).shared, expired).await;
        assert!(late.is_err(), "{late:?}");
        let late = tips::accept(&cluster.node(1).shared, first).await;
        assert!(late.is_err(), "{late:?}");
        let state = cluster.node(1).shared.cluster.read();
        assert!(state.migrations.is_empty(), "{:?}", state.migrations);
        assert_eq!(cluster.running("hot"), vec![(1, 1)]);
    });
}

// ---------------------------------------------------------------- processors

#[test]
fn a_move_to_a_node_without_the_vms_cpu_features_is_refused_until_compatibility_mode() {
    run(async {
        let mut options = LocalOptions::new(3);
        options.cpu_features = vec![
            features(&["sse4", "avx2", "avx512", "amx"]),
            features(&["sse4", "avx2"]),
            features(&["sse4", "avx2", "avx512"]),
        ];
        let cluster = TestCluster::start_options("cpu", options).await.unwrap();
        cluster
            .start_vm("calc", 1, SMALL, workload(2_000), 1)
            .await
            .unwrap();
        let state = cluster.node(1).shared.cluster.read();
        assert_eq!(
            state.vms["calc"].cpu_features,
            features(&["sse4", "avx2", "avx512", "amx"])
        );

        let mut request = MoveRequest::new("calc", 2);
        request.verify = true;
        let refused = cluster.move_vm(request.clone(), 1).await;
        match &refused {
            Err(MigrationError::Rejected(CommandError::MissingCpuFeatures {
                node: 2,
                missing,
            })) => {
                assert_eq!(missing, &vec!["amx".to_string(), "avx512".to_string()])
            }
            other => panic!("{other:?}"),
        }
        let text = refused.unwrap_err().to_string();
        assert!(text.contains("avx512") && text.contains("amx"), "{text}");
        // Refused before anything was copied: no migration, nothing on node 2.
        let state = cluster.node(1).shared.cluster.read();
        assert!(state.migrations.is_empty());
        assert!(!cluster.node(2).shared.holds("calc"));
        assert_eq!(cluster.running("calc"), vec![(1, 1)]);

        // The mode changes only while the VM is off.
        let running = cluster
            .write(Command::SetProcessorCompatibility {
                vm: "calc".into(),
                enabled: true,
            })
            .await;
        assert!(running.is_err_and(|e| e.contains("only while it is off")));
        stop_vm(&cluster, 1, "calc").await;
        cluster
            .write(Command::SetProcessorCompatibility {
                vm: "calc".into(),
                enabled: true,
            })
            .await
            .unwrap();
        start_on(&cluster, 1, "calc").await.unwrap();
        let state = cluster.node(1).shared.cluster.read();
        assert_eq!(state.vms["calc"].cpu_features, features(&["sse4", "avx2"]));
        let report = cluster.move_vm(request, 1).await.expect("now it moves");
        assert_eq!(cluster.running("calc"), vec![(2, report.epoch)]);
    });
}

// ---------------------------------------------------------------- networks

fn three_networks(nodes: u64, third_public: bool) -> LocalOptions {
    let mut options = LocalOptions::new(nodes);
    options.networks.push(LocalNetwork {
        name: "mig-3".into(),
        public: third_public,
    });
    options
}

fn networks_of(report: &ferry_actors::migration::source::MigrationReport) -> Vec<&str> {
    report.paths.iter().map(|p| p.network.as_str()).collect()
}

#[test]
fn network_roles_decide_which_networks_carry_a_migration_in_which_order() {
    run(async {
        let cluster = TestCluster::start_options("roles", three_networks(3, true))
            .await
            .unwrap();
        cluster
            .start_vm("web", 1, SMALL, workload(1_000), 1)
            .await
            .unwrap();
        let names = |s: &ClusterState| -> Vec<String> {
            s.migration_networks()
                .iter()
                .map(|n| n.name.clone())
                .collect()
        };
        // By default the private networks, not the public one.
        assert_eq!(
            names(&cluster.node(1).shared.cluster.read()),
            vec!["mig-1", "mig-2"]
        );
        let report = cluster
            .move_vm(MoveRequest::new("web", 2), 1)
            .await
            .unwrap();
        assert_eq!(networks_of(&report), vec!["mig-1", "mig-2"]);
        assert!(report.networks_skipped.is_empty());

        // A user allows the public network and puts it first: it and the next
        // allowed one carry the move; the third is a spare.
        for command in [
            Command::SetNetworkMigration {
                name: "mig-3".into(),
                migration: MigrationUse::Allow,
            },
            Command::OrderMigrationNetworks {
                order: vec!["mig-3".into(), "mig-2".into()],
            },
        ] {
            cluster.write(command).await.unwrap();
        }
        let report = cluster
            .move_vm(MoveRequest::new("web", 3), 2)
            .await
            .unwrap();
        assert_eq!(networks_of(&report), vec!["mig-3", "mig-2"]);
        assert_eq!(report.networks_skipped.len(), 1);
        assert_eq!(report.networks_skipped[0].0, "mig-1");
        assert!(report.networks_skipped[0].1.contains("spare"));

        // Deselecting networks: allowed while one is left, refused after.
        for name in ["mig-1", "mig-2"] {
            cluster
                .write(Command::SetNetworkMigration {
                    name: name.into(),
                    migration: MigrationUse::Forbid,
                })
                .await
                .unwrap();
        }
        for refused in [
            Command::SetNetworkMigration {
                name: "mig-3".into(),
                migration: MigrationUse::Forbid,
            },
            // Back to its role's default: public, so not allowed either.
            Command::SetNetworkMigration {
                name: "mig-3".into(),
                migration: MigrationUse::Default,
            },
        ] {
            let e = cluster.write(refused).await.unwrap_err();
            assert!(
                e.contains("would leave no network allowed for live migration"),
                "{e}"
            );
        }
        assert_eq!(names(&cluster.node(3).shared.cluster.read()), vec!["mig-3"]);
        let report = cluster
            .move_vm(MoveRequest::new("web", 1), 3)
            .await
            .unwrap();
        assert_eq!(networks_of(&report), vec!["mig-3"]);
        assert_eq!(cluster.running("web"), vec![(1, report.epoch)]);
    });
}

#[test]
fn an_unreachable_migration_network_is_replaced_by_the_next_allowed_one() {
    run(async {
        let cluster = TestCluster::start_options("fallback", three_networks(3, false))
            .await
            .unwrap();
        cluster
            .start_vm("db", 1, 32 * MIB, workload(2_000), 1)
            .await
            .unwrap();
        let client = Client::start(cluster.switch.clone(), "db");
        // Node 2 cannot be reached on mig-1: its traffic there goes to a
        // socket that never answers.
        let silent = std::net::UdpSocket::bind("127.1.0.102:0").unwrap();
        cluster
            .directory
            .redirect(2, "mig-1", Some(silent.local_addr().unwrap()));
        let mut request = MoveRequest::new("db", 2);
        request.verify = true;
        let report = cluster
            .move_vm(request, 1)
            .await
            .expect("moves without mig-1");
        assert_eq!(networks_of(&report), vec!["mig-2", "mig-3"]);
        assert_eq!(report.networks_skipped.len(), 1);
        assert_eq!(report.networks_skipped[0].0, "mig-1");
        assert!(
            report.networks_skipped[0].1.contains("unreachable"),
            "{:?}",
            report.networks_skipped
        );
        assert_eq!(cluster.running("db"), vec![(2, report.epoch)]);

        // When no allowed network reaches the target, the move aborts before
        // copying, saying so; the VM runs on.
        for net in ["mig-1", "mig-2", "mig-3"] {
            cluster
                .directory
                .redirect(3, net, Some(silent.local_addr().unwrap()));
        }
        let outcome = cluster.move_vm(MoveRequest::new("db", 3), 2).await;
        assert!(
            matches!(&outcome, Err(MigrationError::Aborted(why))
                if why.contains("no network allowed for live migration reaches node 3")),
            "{outcome:?}"
        );
        assert_eq!(cluster.running("db"), vec![(2, report.epoch)]);
        let log = client.stop();
        assert_no_acked_append_lost(&cluster, 2, "db", &log);
    });
}

// ---------------------------------------------------------------- offload, storage

#[test]
fn offloaded_connections_are_pushed_back_before_a_move_and_reoffloaded_only_where_supported() {
    run(async {
        let mut options = LocalOptions::new(3);
        options.tcp_offload = vec![true, false, true];
        let cluster = TestCluster::start_options("offload", options)
            .await
            .unwrap();
        let mut config = vm_config(SMALL, workload(1_000), 1);
        config.workload = encode_program(&GuestProgram {
            workload: workload(1_000),
            prefill_seed: Some(1),
            tcp_connections: 4,
        });
        cluster.start_vm_config("edge", 1, config).await.unwrap();
        let nic = nic_of(&cluster, 1, "edge");
        assert!(nic.offload_enabled);
        assert_eq!(nic.offloaded_connections, vec![1, 2, 3, 4]);

        // To a node without offload: pushed back, and they stay in software.
        let mut request = MoveRequest::new("edge", 2);
        request.verify = true;
        let report = cluster.move_vm(request, 1).await.unwrap();
        assert_eq!(
            report.offload,
            OffloadReport {
                pushed_back: 4,
                target_offload: false,
                reoffloaded: 0
            }
        );
        let nic = nic_of(&cluster, 2, "edge");
        assert!(!nic.offload_enabled);
        assert!(nic.offloaded_connections.is_empty());
        assert_eq!(nic.software_connections, vec![1, 2, 3, 4]);

        // On to a node with offload: offloaded again once it runs there.
        let mut request = MoveRequest::new("edge", 3);
        request.verify = true;
        let report = cluster.move_vm(request, 2).await.unwrap();
        assert_eq!(
            report.offload,
            OffloadReport {
                pushed_back: 0,
                target_offload: true,
                reoffloaded: 4
            }
        );
        let nic = nic_of(&cluster, 3, "edge");
        assert!(nic.offload_enabled);
        assert_eq!(nic.offloaded_connections, vec![1, 2, 3, 4]);
        assert!(nic.software_connections.is_empty());
    });
}

#[test]
fn a_node_owned_disk_changes_hands_in_the_switchover_commit_and_a_shared_one_costs_nothing() {
    run(async {
        let cluster = TestCluster::start("storage", 3).await.unwrap();
        let mut config = vm_config(64 * MIB, workload(20_000), 1);
        config.storage = StorageSpec::Local {
            size_bytes: 8 << 30,
        };
        cluster.start_vm_config("db", 1, config).await.unwrap();
        cluster
            .start_vm("web", 1, SMALL, workload(1_000), 2)
            .await
            .unwrap();
        assert_eq!(
            cluster.node(1).shared.cluster.read().vms["db"].disk_owner,
            Some(1)
        );
        // Whatever the store shows at any moment, the disk's owner is the VM's.
        let stop = Arc::new(AtomicBool::new(false));
        let mismatches = Arc::new(AtomicU32::new(0));
        let watch = {
            let (stop, mismatches) = (stop.clone(), mismatches.clone());
            let store = cluster.node(3).shared.cluster.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::Acquire) {
                    let s = store.read();
                    if s.vms["db"].disk_owner != Some(s.vms["db"].owner) {
                        mismatches.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(s);
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
            })
        };

        // A move that aborts leaves the disk where it was.
        let mut events = cluster.node(1).shared.events.subscribe();
        let actor = cluster.node(1).actor.clone();
        let moving =
            tokio::spawn(
                async move { actor.send(MoveVm(MoveRequest::new("db", 2))).await.unwrap() },
            );
        wait_progress(&mut events, |p| p.phase == Phase::Preparing).await;
        assert!(cluster
            .node(1)
            .actor
            .send(CancelMove("db".into()))
            .await
            .unwrap());
        assert!(matches!(
            moving.await.unwrap(),
            Err(MigrationError::Cancelled)
        ));
        assert_eq!(
            cluster.node(1).shared.cluster.read().vms["db"].disk_owner,
            Some(1)
        );

        let mut request = MoveRequest::new("db", 2);
        request.verify = true;
        let report = cluster.move_vm(request, 1).await.unwrap();
        assert!(
            matches!(
                report.storage,
                StorageReport::NodeOwned {
                    size_bytes: 0x2_0000_0000,
                    from: 1,
                    to: 2,
                    ..
                }
            ),
            "{:?}",
            report.storage
        );
        let state = cluster.node(2).shared.cluster.read();
        assert_eq!(
            (state.vms["db"].owner, state.vms["db"].disk_owner),
            (2, Some(2))
        );
        stop.store(true, Ordering::Release);
        watch.await.unwrap();
        assert_eq!(mismatches.load(Ordering::Relaxed), 0);

        // The disk is node 2's now: the VM can start there, not on node 1.
        stop_vm(&cluster, 2, "db").await;
        let wrong = start_on(&cluster, 1, "db").await;
        assert!(wrong.is_err_and(|e| e.contains("disk on node 2")));
        start_on(&cluster, 2, "db").await.unwrap();

        let report = cluster
            .move_vm(MoveRequest::new("web", 3), 1)
            .await
            .unwrap();
        assert_eq!(
            report.storage,
            StorageReport::Shared {
                volume: "csv-1".into()
            }
        );
        assert_eq!(
            cluster.node(3).shared.cluster.read().vms["web"].disk_owner,
            None
        );
    });
}
