//! Live migration end to end: three nodes in one process over real QUIC and
//! Raft, a simulated guest with a workload and a service client throughout.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry_actors::migration::source::{MovePolicy, MoveRequest};
use ferry_cluster::model::Settings;
use ferry_cluster::Command;

#[test]
fn a_migration_completes_with_memory_state_and_every_acknowledged_append() {
    run(async {
        let cluster = TestCluster::start("complete", 3).await.unwrap();
        cluster
            .start_vm("web-1", 1, 256 * MIB, workload(5_000), 1)
            .await
            .unwrap();
        let client = Client::start(cluster.switch.clone(), "web-1");
        let watch = TwiceWatch::start(&cluster, "web-1");
        // The client is being served before the move starts.
        appends_continue(&cluster, 1, "web-1").await;

        let mut request = MoveRequest::new("web-1", 2);
        request.verify = true;
        let report = cluster
            .move_vm(request, 1)
            .await
            .expect("migration completes");

        // Keep appending on the target for a while.
        let target = cluster
            .node(2)
            .shared
            .guest("web-1")
            .expect("the target runs the VM");
        let seen = target.service_records().unwrap().len();
        while target.service_records().unwrap().len() < seen + 50 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let log = client.stop();
        let (samples, violations) = watch.stop().await;

        let records = target.service_records().unwrap();
        let present: std::collections::HashSet<u64> = records.iter().map(|(s, _)| *s).collect();
        let lost: Vec<u64> = log
            .acked
            .iter()
            .filter(|s| !present.contains(s))
            .copied()
            .collect();
        assert!(lost.is_empty(), "acknowledged appends lost: {lost:?}");
        assert_eq!(
            records.len(),
            log.acked.len(),
            "nothing appended that was not acknowledged"
        );
        assert_eq!(
            cluster.switch.route("web-1"),
            Some((2, report.epoch)),
            "the switch points at the target"
        );
        assert!(
            !cluster.node(1).shared.holds("web-1"),
            "the source's copy is gone"
        );
        let state = cluster.node(3).shared.cluster.read();
        assert_eq!(state.vms["web-1"].owner, 2);
        assert_eq!(state.vms["web-1"].epoch, report.epoch);
        assert!(violations.is_empty(), "{violations:?}");
        assert!(samples > 10);
        println!(
            "migration: {} rounds, {} MiB, total {:?}, blackout {:?} (source), client refused at most {:?} ({} refusals)",
            report.rounds.len(),
            report.bytes >> 20,
            report.total,
            report.blackout,
            log.longest_refusal,
            log.refusals
        );
    });
}

#[test]
fn progress_comes_at_least_four_times_a_second_during_round_0() {
    use ferry_actors::migration::source::{Phase, Progress};
    run(async {
        let cluster = TestCluster::start("progress", 3).await.unwrap();
        // 64 MiB over two paths of 16 MiB/s each: round 0 lasts about 2 s,
        // long enough to count events per second of it.
        let proxies = proxy_paths(&cluster, 2).await;
        for proxy in &proxies {
            proxy.set_rate_limit(Some(16 * MIB));
        }
        cluster
            .start_vm("bar-1", 1, 64 * MIB, workload(1_000), 8)
            .await
            .unwrap();
        let mut events = cluster.node(1).shared.events.subscribe();
        let report = cluster
            .move_vm(MoveRequest::new("bar-1", 2), 1)
            .await
            .expect("migration completes");
        let mut seen = Vec::new();
        while let Ok(p) = events.try_recv() {
            seen.push(p);
        }
        assert!(
            seen.iter().any(|p| p.phase == Phase::Completed),
            "every event of the move was kept: {} seen",
            seen.len()
        );

        let round_0: Vec<_> = seen
            .iter()
            .filter(|p| p.phase == Phase::Copying && p.round == 0)
            .collect();
        let elapsed = report.rounds[0].elapsed;
        assert!(
            elapsed >= std::time::Duration::from_secs(1),
            "the rate limit makes round 0 last over a second (took {elapsed:?})"
        );
        let per_sec = round_0.len() as f64 / elapsed.as_secs_f64();
        println!(
            "progress_events_round0={} round0_s={:.2} progress_events_per_s_round0={per_sec:.1}",
            round_0.len(),
            elapsed.as_secs_f64()
        );
        assert!(
            per_sec >= 4.0,
            "{} events in a round 0 of {elapsed:?}",
            round_0.len()
        );

        // The samples say how far the round is: bytes only grow, pages left
        // only shrink, and the rate and the time left are known.
        let (samples, ends): (Vec<&Progress>, Vec<&Progress>) =
            round_0.iter().partition(|p| p.mid_round);
        assert_eq!(ends.len(), 1, "one event ends round 0");
        assert!(samples.windows(2).all(|w| {
            w[0].bytes_sent <= w[1].bytes_sent
                && w[0].round_bytes_sent <= w[1].round_bytes_sent
                && w[0].remaining_pages >= w[1].remaining_pages
        }));
        assert!(samples.iter().all(|p| p.bytes_sent == p.round_bytes_sent));
        let last = samples.last().expect("round 0 reported while it sent");
        assert!(last.rate > 0.0 && last.eta.is_some(), "{last:?}");
        assert!(last.bytes_sent <= ends[0].bytes_sent);
        assert_eq!(ends[0].round_bytes_sent, report.rounds[0].bytes);
    });
}

#[test]
fn a_guest_dirtying_faster_than_a_round_converges_by_auto_converge() {
    run(async {
        let cluster = TestCluster::start("converge", 3).await.unwrap();
        // The bandwidth is capped so that the guest outruns the stream on any
        // machine: 150 000 pages/s is 600 MB/s of dirtying over all of a
        // 64 MiB guest, nine times the 64 MiB/s cap, so even a vCPU starved
        // to a third of its rate dirties faster than a round sends and only
        // throttling can make the remainder shrink.
        cluster
            .write(Command::UpdateSettings {
                settings: Settings {
                    bandwidth_cap_bytes_per_sec: Some(64 * MIB),
                    ..Settings::default()
                },
            })
            .await
            .unwrap();
        let fast = ferry_vmm::Workload {
            dirty_pages_per_sec: Some(150_000),
            pattern: ferry_vmm::Pattern::Uniform,
            seed: 3,
        };
        cluster
            .start_vm("busy", 1, 64 * MIB, fast, 2)
            .await
            .unwrap();
        let client = Client::start(cluster.switch.clone(), "busy");
        let mut request = MoveRequest::new("busy", 3);
        request.verify = true;
        // A tight blackout promise: the whole guest is dirty every round.
        // Throttle steps start high so that the test takes seconds, not the
        // twenty QEMU's gentle ramp would need at this bandwidth.
        let defaults = ferry_actors::policy::convergence::ConvergenceConfig::default();
        let policy = ferry_actors::policy::convergence::ConvergenceConfig {
            downtime_limit: std::time::Duration::from_millis(50),
            auto_converge: ferry_actors::policy::convergence::AutoConverge {
                initial_share: 0.90,
                increment: 0.03,
                ..defaults.auto_converge
            },
            ..defaults
        };
        request.policy = MovePolicy::Explicit(policy.clone());
        let report = cluster.move_vm(request, 1).await.expect("converges");
        let log = client.stop();
        assert_no_acked_append_lost(&cluster, 3, "busy", &log);
        let throttles: Vec<f64> = report.rounds.iter().map(|r| r.throttle).collect();
        assert!(
            throttles.iter().any(|t| *t > 0.0),
            "auto-converge throttled the guest: {throttles:?}"
        );
        assert!(
            report.rounds.len() as u32 <= policy.max_rounds,
            "within the round limit"
        );
        assert!(
            report.total <= policy.time_budget(64 * MIB),
            "within the time budget"
        );
        println!(
            "auto-converge: rounds {:?}, throttle per round {throttles:?}, total {:?}",
            report
                .rounds
                .iter()
                .map(|r| r.pages_sent)
                .collect::<Vec<_>>(),
            report.total
        );
    });
}

#[test]
fn target_killed_mid_migration_aborts_and_the_vm_runs_on_the_source() {
    run(async {
        let cluster = TestCluster::start("target-killed", 3).await.unwrap();
        cluster
            .start_vm("db-1", 1, 256 * MIB, workload(20_000), 3)
            .await
            .unwrap();
        let client = Client::start(cluster.switch.clone(), "db-1");
        let moving = start_move(&cluster, "db-1", 1, 2).await;
        wait_for_target_shell(&cluster, 2, "db-1").await;
        cluster.node(2).shared.kill().await;
        let outcome = moving.await.unwrap();
        assert!(
            matches!(
                outcome,
                Err(ferry_actors::migration::source::MigrationError::Aborted(_))
            ),
            "{outcome:?}"
        );
        assert_eq!(
            cluster.running("db-1"),
            vec![(1, 1)],
            "runs on the source only, at its epoch"
        );
        appends_continue(&cluster, 1, "db-1").await;
        let log = client.stop();
        assert_no_acked_append_lost(&cluster, 1, "db-1", &log);
        println!("target killed: {outcome:?}");
    });
}

#[test]
fn a_user_cancel_mid_migration_aborts_cleanly() {
    run(async {
        let cluster = TestCluster::start("cancel", 3).await.unwrap();
        cluster
            .start_vm("app-1", 1, 256 * MIB, workload(20_000), 4)
            .await
            .unwrap();
        let client = Client::start(cluster.switch.clone(), "app-1");
        let moving = start_move(&cluster, "app-1", 1, 2).await;
        wait_for_target_shell(&cluster, 2, "app-1").await;
        assert!(cluster
            .node(1)
            .actor
            .send(ferry_actors::actors::CancelMove("app-1".into()))
            .await
            .unwrap());
        let outcome = moving.await.unwrap();
        assert!(
            matches!(
                outcome,
                Err(ferry_actors::migration::source::MigrationError::Cancelled)
            ),
            "{outcome:?}"
        );
        assert_eq!(cluster.running("app-1"), vec![(1, 1)]);
        // The store records the abort and the target let go of its copy.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let state = cluster.node(1).shared.cluster.read();
            let aborted = state.migrations.values().any(|m| {
                m.vm == "app-1"
                    && matches!(
                        m.outcome,
                        ferry_cluster::model::MigrationOutcome::Aborted { .. }
                    )
            });
            if aborted && !cluster.node(2).shared.holds("app-1") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "abort not recorded or target copy not discarded"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let log = client.stop();
        assert_no_acked_append_lost(&cluster, 1, "app-1", &log);
        // The VM can move again afterwards.
        let report = cluster
            .move_vm(MoveRequest::new("app-1", 2), 1)
            .await
            .expect("a later move works");
        assert_eq!(report.target, 2);
    });
}

#[test]
fn raft_leader_killed_mid_migration_keeps_the_guarantees() {
    run(async {
        let cluster = TestCluster::start("leader-killed", 3).await.unwrap();
        // Source and target are 1 and 2; make 3 the leader, then kill it.
        let leader = cluster.node(1).shared.cluster.leader().unwrap();
        cluster
            .start_vm("api-1", 1, 128 * MIB, workload(20_000), 5)
            .await
            .unwrap();
        let (source, target) = match leader {
            1 => (2, 3),
            2 => (1, 3),
            _ => (1, 2),
        };
        if source != 1 {
            cluster
                .move_vm(MoveRequest::new("api-1", source), 1)
                .await
                .expect("set-up move");
        }
        let client = Client::start(cluster.switch.clone(), "api-1");
        let watch = TwiceWatch::start(&cluster, "api-1");
        let mut events = cluster.node(source).shared.events.subscribe();
        let moving = {
            let actor = cluster.node(source).actor.clone();
            let mut request = MoveRequest::new("api-1", target);
            request.verify = true;
            tokio::spawn(async move {
                actor
                    .send(ferry_actors::actors::MoveVm(request))
                    .await
                    .unwrap()
            })
        };
        wait_progress(&mut events, |p| {
            p.phase == ferry_actors::migration::source::Phase::Preparing
        })
        .await;
        cluster.node(leader).shared.kill().await;
        let outcome = moving.await.unwrap();
        let log = client.stop();
        let (_, violations) = watch.stop().await;
        assert!(violations.is_empty(), "{violations:?}");
        let runs = cluster.running("api-1");
        assert_eq!(runs.len(), 1, "runs exactly once: {runs:?}");
        let owner = runs[0].0;
        match &outcome {
            Ok(report) => assert_eq!((owner, runs[0].1), (target, report.epoch)),
            Err(_) => assert_eq!(owner, source),
        }
        assert_no_acked_append_lost(&cluster, owner, "api-1", &log);
        println!(
            "leader {leader} killed mid-migration {source}->{target}: {:?}",
            outcome.map(|r| r.total)
        );
    });
}

/// Starts a move of `vm` from `source` to `target` in the background, and
/// returns once its page stream is being set up.
async fn start_move(
    cluster: &TestCluster,
    vm: &str,
    source: u64,
    target: u64,
) -> tokio::task::JoinHandle<
    Result<
        ferry_actors::migration::source::MigrationReport,
        ferry_actors::migration::source::MigrationError,
    >,
> {
    let mut events = cluster.node(source).shared.events.subscribe();
    let actor = cluster.node(source).actor.clone();
    let mut request = MoveRequest::new(vm, target);
    request.verify = true;
    let moving = tokio::spawn(async move {
        actor
            .send(ferry_actors::actors::MoveVm(request))
            .await
            .unwrap()
    });
    wait_progress(&mut events, |p| {
        p.phase == ferry_actors::migration::source::Phase::Preparing
    })
    .await;
    moving
}

#[test]
fn one_path_cut_mid_migration_completes_on_the_other() {
    run(async {
        let cluster = TestCluster::start("one-path", 3).await.unwrap();
        let proxies = proxy_paths(&cluster, 2).await;
        cluster
            .start_vm("web-2", 1, 256 * MIB, workload(5_000), 6)
            .await
            .unwrap();
        let client = Client::start(cluster.switch.clone(), "web-2");
        let moving = start_move(&cluster, "web-2", 1, 2).await;
        // Let round 0 get going on both paths, then cut one.
        wait_for_traffic(&proxies[0], 16 << 20).await;
        proxies[0].cut();
        let cut_at = proxies[1].stats().forwarded_bytes;
        let report = moving
            .await
            .unwrap()
            .expect("completes on the surviving path");
        let log = client.stop();
        assert!(
            proxies[1].stats().forwarded_bytes > cut_at + (16 << 20),
            "the rest went over path 2"
        );
        assert_no_acked_append_lost(&cluster, 2, "web-2", &log);
        assert_eq!(cluster.running("web-2"), vec![(2, report.epoch)]);
        println!(
            "one path cut: completed in {:?}, blackout {:?}",
            report.total, report.blackout
        );
    });
}

#[test]
fn both_paths_cut_mid_migration_aborts_and_the_vm_runs_on_the_source() {
    run(async {
        let cluster = TestCluster::start("both-paths", 3).await.unwrap();
        let proxies = proxy_paths(&cluster, 2).await;
        cluster
            .start_vm("web-3", 1, 256 * MIB, workload(5_000), 7)
            .await
            .unwrap();
        let client = Client::start(cluster.switch.clone(), "web-3");
        let moving = start_move(&cluster, "web-3", 1, 2).await;
        wait_for_traffic(&proxies[0], 8 << 20).await;
        let cut = std::time::Instant::now();
        proxies[0].cut();
        proxies[1].cut();
        let outcome = moving.await.unwrap();
        let took = cut.elapsed();
        assert!(
            matches!(
                outcome,
                Err(ferry_actors::migration::source::MigrationError::Aborted(_))
            ),
            "{outcome:?}"
        );
        assert!(
            took < std::time::Duration::from_secs(15),
            "the abort came in bounded time: {took:?}"
        );
        assert_eq!(cluster.running("web-3"), vec![(1, 1)]);
        appends_continue(&cluster, 1, "web-3").await;
        let log = client.stop();
        assert_no_acked_append_lost(&cluster, 1, "web-3", &log);
        println!("both paths cut: aborted {took:?} after the cut: {outcome:?}");
    });
}

#[test]
fn source_partitioned_from_the_store_at_switchover_never_runs_the_vm_twice() {
    run(async {
        let partition = std::sync::Arc::new(Partition::default());
        let p = partition.clone();
        let cluster = TestCluster::start_with("partition", 3, move |me, rpc| {
            std::sync::Arc::new(PartitionedTransport {
                me,
                inner: rpc,
                partition: p.clone(),
            })
        })
        .await
        .unwrap();
        // Large enough that verifying digests keeps the blackout open for a while
        // after the event below, so the cut lands before the switchover.
        cluster
            .start_vm("ledger", 1, 256 * MIB, workload(5_000), 8)
            .await
            .unwrap();
        let client = Client::start(cluster.switch.clone(), "ledger");
        let watch = TwiceWatch::start(&cluster, "ledger");
        let mut events = cluster.node(1).shared.events.subscribe();
        let moving = {
            let actor = cluster.node(1).actor.clone();
            let mut request = MoveRequest::new("ledger", 2);
            request.verify = true;
            tokio::spawn(async move {
                actor
                    .send(ferry_actors::actors::MoveVm(request))
                    .await
                    .unwrap()
            })
        };
        // The blackout has begun: cut the source off from the store before it
        // can propose the switchover.
        wait_progress(&mut events, |p| {
            p.phase == ferry_actors::migration::source::Phase::Blackout
        })
        .await;
        partition.isolate(1);
        // While the source is cut off, the majority decides. As long as the
        // target's replica shows the migration undecided, neither side may run the VM;
        // once it shows an outcome (the commit may have landed just before
        // the cut), only the owner it names may.
        let cut = std::time::Instant::now();
        while cut.elapsed() < std::time::Duration::from_millis(1500) {
            // Sampled before the state: the target resumes only after its own
            // replica applied the commit, so a running target is always
            // explained by the target's replica read afterwards.
            let running = cluster.running("ledger");
            let state = cluster.node(2).shared.cluster.read();
            let vm = &state.vms["ledger"];
            let undecided = vm.migration.is_some();
            if undecided {
                assert!(
                    running.is_empty(),
                    "the VM ran while its owner was undecided: {running:?}"
                );
            } else {
                assert!(
                    running
                        .iter()
                        .all(|(node, epoch)| (*node, *epoch) == (vm.owner, vm.epoch)),
                    "the VM ran off its owner: {running:?}, owner {} at epoch {}",
                    vm.owner,
                    vm.epoch
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        partition.heal();
        let outcome = moving.await.unwrap();
        let report = outcome
            .expect("after the partition heals, the source learns and completes the switchover");
        let log = client.stop();
        let (samples, violations) = watch.stop().await;
        assert!(violations.is_empty(), "{violations:?}");
        assert_eq!(
            cluster.running("ledger"),
            vec![(2, report.epoch)],
            "runs once, on the target, at the new epoch"
        );
        let state = cluster.node(3).shared.cluster.read();
        assert_eq!(
            (state.vms["ledger"].owner, state.vms["ledger"].epoch),
            (2, report.epoch)
        );
        assert_no_acked_append_lost(&cluster, 2, "ledger", &log);
        println!("partitioned source: completed after heal, blackout {:?}, {samples} samples, no double run", report.blackout);
    });
}

/// Waits (bounded) until `node` holds the VM's shell: the copy has begun.
async fn wait_for_target_shell(cluster: &TestCluster, node: u64, vm: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !cluster.node(node).shared.holds(vm) {
        assert!(
            std::time::Instant::now() < deadline,
            "the target never prepared {vm}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// Waits (bounded) until the VM's service on `node` takes more appends.
async fn appends_continue(cluster: &TestCluster, node: u64, vm: &str) {
    let guest = cluster
        .node(node)
        .shared
        .guest(vm)
        .expect("the VM runs there");
    let seen = guest.service_records().unwrap().len();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while guest.service_records().unwrap().len() < seen + 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "the service stopped answering on node {node}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// Waits (bounded) until `proxy` has carried `bytes`: the copy is under way on that path.
async fn wait_for_traffic(proxy: &ferry_chaos::proxy::LinkProxy, bytes: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while proxy.stats().forwarded_bytes < bytes {
        assert!(
            std::time::Instant::now() < deadline,
            "no traffic on the path"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}
