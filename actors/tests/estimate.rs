//! Estimates from measurements (issue 17): the dirty rate sampled from the
//! guest's dirty log, never while a migration of the guest holds the log; the
//! bandwidth probed over the migration networks, then taken from the last
//! move; the cluster's cap applied; and the node that runs the VM measuring
//! for any node that asks.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry_actors::actors::MoveVm;
use ferry_actors::local::vm_config;
use ferry_actors::measure::{self, BandwidthBasis, DirtyRateBasis, MeasureOptions};
use ferry_actors::migration::source::{MoveRequest, Phase};
use ferry_actors::node::{encode_program, DirtyLogUser, GuestProgram, SampleRefused};
use ferry_cluster::model::Settings;
use ferry_cluster::Command;
use ferry_vmm::Workload;
use std::time::Duration;

/// A VM of `memory` bytes running `workload` on node 1, its memory not
/// prefilled (a test has no use for the second it takes).
async fn start(cluster: &TestCluster, vm: &str, memory: u64, workload: Workload, mac: u8) {
    let mut config = vm_config(memory, workload, mac);
    config.workload = encode_program(&GuestProgram {
        workload,
        prefill_seed: None,
        tcp_connections: 0,
    });
    cluster.start_vm_config(vm, 1, config).await.unwrap();
}

#[test]
fn a_sample_counts_the_pages_a_guest_dirties_per_second() {
    run(async {
        let cluster = TestCluster::start("sample-rate", 2).await.unwrap();
        // 4096 writes a second scattered over 1 GiB: in a 400 ms window two
        // writes land on the same page about once in 160, so the distinct
        // pages are the writes.
        let rate = 4096;
        start(&cluster, "busy", 1024 * MIB, Workload::uniform(rate, 3), 1).await;
        start(&cluster, "idle", 64 * MIB, Workload::idle(), 2).await;
        let node = &cluster.node(1).shared;

        let sample = node
            .sample_dirty_rate("busy", Duration::from_millis(400))
            .await
            .unwrap();
        assert!(sample.window >= Duration::from_millis(400), "{sample:?}");
        let error = sample.rate() / rate as f64 - 1.0;
        assert!(
            error.abs() <= 0.20,
            "sampled {:.0} pages/s of {rate} ({sample:?})",
            sample.rate()
        );

        let idle = node
            .sample_dirty_rate("idle", Duration::from_millis(200))
            .await
            .unwrap();
        assert_eq!(idle.pages, 0, "an idle guest dirties nothing");

        // Only the node that runs a VM samples it; any node may ask it to.
        assert_eq!(
            cluster
                .node(2)
                .shared
                .sample_dirty_rate("busy", Duration::from_millis(10))
                .await,
            Err(SampleRefused::NotHere("busy".into()))
        );
        let asked = measure::measure(
            &cluster.node(2).shared,
            "busy",
            None,
            &MeasureOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(asked.node, 1, "measured where the VM runs");
        assert!(
            matches!(asked.dirty_basis, DirtyRateBasis::Sampled(_)),
            "{asked:?}"
        );
        assert!(
            (asked.dirty_rate / rate as f64 - 1.0).abs() <= 0.20,
            "{asked}"
        );
        assert_eq!(asked.memory_bytes, 1024 * MIB);
        assert!(
            asked.nonzero_pages.is_some_and(|p| p < 1024 * MIB / 4096),
            "memory not prefilled: round 0 skips the pages never written ({asked})"
        );
        assert_eq!(
            measure::recent(&cluster.node(2).shared, "busy", None).as_ref(),
            Some(&asked),
            "the asking node keeps what it measured for a move's estimate"
        );
    });
}

#[test]
fn a_migration_keeps_its_dirty_log_while_estimates_are_asked_for() {
    run(async {
        let cluster = TestCluster::start("sample-exclusion", 3).await.unwrap();
        // Slow paths, so the move lasts a while; a fast writer, so a stolen
        // dirty bit would leave a stale page that the digest check catches.
        let proxies = proxy_paths(&cluster, 2).await;
        for proxy in &proxies {
            proxy.set_rate_limit(Some(16 * MIB));
        }
        // Prefilled: every page crosses, so the move lasts about 2 s.
        cluster
            .start_vm("web-1", 1, 64 * MIB, workload(3_000), 1)
            .await
            .unwrap();
        let node = cluster.node(1).shared.clone();

        // A sample under way when the move begins is voided, and leaves the
        // log to the move.
        let early = tokio::spawn({
            let node = node.clone();
            async move {
                node.sample_dirty_rate("web-1", Duration::from_millis(1500))
                    .await
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while node.dirty_log_user("web-1") != Some(DirtyLogUser::Sample) {
            assert!(std::time::Instant::now() < deadline, "the sample began");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }

        let mut events = node.events.subscribe();
        let mut request = MoveRequest::new("web-1", 2);
        request.verify = true;
        let moving = tokio::spawn(cluster.node(1).actor.send(MoveVm(request)));
        wait_progress(&mut events, |p| p.phase == Phase::Copying).await;
        assert_eq!(
            node.dirty_log_user("web-1"),
            Some(DirtyLogUser::Migration),
            "the move holds the log"
        );

        // While the move copies, estimates keep coming, from this node and
        // another; none reads the log.
        let mut asked = 0;
        while !moving.is_finished() {
            let here = node
                .sample_dirty_rate("web-1", Duration::from_millis(50))
                .await;
            if !moving.is_finished() {
                assert!(
                    matches!(
                        here,
                        Err(SampleRefused::Migrating(_) | SampleRefused::Interrupted(_))
                            | Err(SampleRefused::NotHere(_))
                    ),
                    "{here:?}"
                );
            }
            let from = if asked % 2 == 0 { 1 } else { 3 };
            // Probing node 3, whose paths the slowed move does not share.
            let m = measure::measure(
                &cluster.node(from).shared,
                "web-1",
                Some(3),
                &MeasureOptions {
                    window: Duration::from_millis(50),
                    probe_bytes: 1 << 20,
                    ..MeasureOptions::default()
                },
            )
            .await;
            if let Ok(m) = m {
                if m.node == 1 && !moving.is_finished() {
                    assert!(
                        matches!(&m.dirty_basis, DirtyRateBasis::Configured { why } if why.contains("migration")),
                        "{m:?}"
                    );
                    assert_eq!(m.dirty_rate, 3_000.0, "the configured rate stands in");
                }
            }
            asked += 1;
        }
        let report = moving
            .await
            .unwrap()
            .unwrap()
            .expect("the move lands, its copy verified");
        assert!(
            asked >= 3,
            "estimates were asked for during the move ({asked})"
        );
        assert_eq!(
            early.await.unwrap(),
            Err(SampleRefused::Interrupted("web-1".into()))
        );
        assert_eq!(
            node.dirty_log_user("web-1"),
            None,
            "released when the move ended"
        );
        assert_eq!(cluster.node(3).shared.cluster.read().vms["web-1"].owner, 2);
        println!(
            "moved with {asked} estimates asked for meanwhile: {} rounds, total {:?}",
            report.rounds.len(),
            report.total
        );

        // On the target, the guest is sampled as any other.
        let after = cluster
            .node(2)
            .shared
            .sample_dirty_rate("web-1", Duration::from_millis(200))
            .await
            .unwrap();
        assert!(after.pages > 0, "{after:?}");
    });
}

/// Hostile input (issue 15): a member that asks for probe after probe and
/// never sends makes the target hold one probe's scratch memory, not one per
/// request, and an honest estimate is probed as before.
#[test]
fn a_member_asking_for_probe_after_probe_holds_one() {
    run(async {
        let cluster = TestCluster::start("probe-flood", 2).await.unwrap();
        start(&cluster, "db-1", 64 * MIB, Workload::idle(), 1).await;
        let addrs = cluster.node(2).rpc.local_addrs();
        // Small probes: the bound is on how many a peer holds, whatever their
        // size (at most 256 MiB each), and each one's scratch memory is
        // faulted in by a thread while it lives, which at full size would
        // slow this binary's other tests for seconds.
        for i in 0..200u64 {
            let request = measure::ProbeRequest {
                stream_id: measure::PROBE_STREAM_BIT | (1 << 40) | i,
                bytes: 4 * MIB,
            };
            cluster
                .node(1)
                .rpc
                .call(
                    2,
                    &addrs,
                    measure::BANDWIDTH_PROBE_SERVICE,
                    ferry_transport::encode(&request),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
        assert_eq!(measure::probes_served(&cluster.node(2).shared), 1);
        let opts = MeasureOptions {
            probe_time: Duration::from_millis(300),
            ..MeasureOptions::default()
        };
        let honest = measure::measure(&cluster.node(1).shared, "db-1", Some(2), &opts)
            .await
            .unwrap();
        assert!(
            matches!(
                honest.bandwidth_basis,
                BandwidthBasis::Probed { target: 2, .. }
            ),
            "{honest:?}"
        );
        assert!(measure::probes_served(&cluster.node(2).shared) <= 1);
    });
}

#[test]
fn the_bandwidth_is_probed_then_taken_from_the_last_move_and_capped() {
    run(async {
        let cluster = TestCluster::start("probe", 2).await.unwrap();
        // Two paths of 24 MiB/s each.
        let proxies = proxy_paths(&cluster, 2).await;
        for proxy in &proxies {
            proxy.set_rate_limit(Some(24 * MIB));
        }
        start(&cluster, "db-1", 64 * MIB, Workload::uniform(500, 5), 1).await;
        let node = &cluster.node(1).shared;
        let opts = MeasureOptions {
            probe_time: Duration::from_millis(600),
            ..MeasureOptions::default()
        };

        let probed = measure::measure(node, "db-1", Some(2), &opts)
            .await
            .unwrap();
        assert!(
            matches!(
                probed.bandwidth_basis,
                BandwidthBasis::Probed { target: 2, .. }
            ),
            "{probed:?}"
        );
        let link = 48.0 * MIB as f64;
        assert!(
            (probed.bandwidth / link - 1.0).abs() <= 0.30,
            "probed {:.1} MiB/s over a 48 MiB/s link ({probed})",
            probed.bandwidth / MIB as f64
        );
        println!("{probed}");

        // After a move there, the next estimate for that link uses the move's
        // rate instead of probing again.
        let report = cluster
            .move_vm(MoveRequest::new("db-1", 2), 1)
            .await
            .unwrap();
        start(&cluster, "db-2", 64 * MIB, Workload::idle(), 2).await;
        let after = measure::measure(node, "db-2", Some(2), &opts)
            .await
            .unwrap();
        let copy: Duration = report.rounds.iter().map(|r| r.elapsed).sum();
        let bytes: u64 = report.rounds.iter().map(|r| r.bytes).sum();
        match after.bandwidth_basis {
            BandwidthBasis::RecentMove {
                migration,
                target: 2,
                ..
            } => assert_eq!(migration, report.migration),
            ref other => panic!("{other:?}"),
        }
        assert!((after.bandwidth - bytes as f64 / copy.as_secs_f64()).abs() < 1.0);
        assert!(after.bandwidth_words().contains("measured in migration"));

        // The cluster's cap bounds what a move can get, and the estimate.
        cluster
            .write(Command::UpdateSettings {
                settings: Settings {
                    bandwidth_cap_bytes_per_sec: Some(8 * MIB),
                    ..Settings::default()
                },
            })
            .await
            .unwrap();
        let capped = measure::measure(node, "db-2", Some(2), &opts)
            .await
            .unwrap();
        assert_eq!(capped.bandwidth, (8 * MIB) as f64);
        assert_eq!(capped.capped_at, Some(8 * MIB));
        assert!(
            matches!(capped.bandwidth_basis, BandwidthBasis::Probed { .. }),
            "a move under another cap does not count: {capped:?}"
        );
        assert!(capped.bandwidth_words().contains("capped at 8 MiB/s"));

        // With no node to move to there is nothing to probe.
        let alone = measure::measure(node, "db-2", None, &opts).await.unwrap();
        assert!(
            matches!(alone.bandwidth_basis, BandwidthBasis::Assumed { .. }),
            "{alone:?}"
        );
    });
}
