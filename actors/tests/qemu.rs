//! A QEMU VM running Linux moved between nodes: QEMU's own migration stream
//! carried by Ferry's multipath byte stream, the switchover fenced by the
//! store, a client appending to the guest's service the whole time; the
//! estimate's dirty rate measured by QEMU itself.
//!
//! Skips (and says why) where QEMU, a kernel or busybox is missing, unless
//! `FERRY_CI_PROVIDES` names `qemu` (`ferry_vmm::qemu::usable_or_skip`).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry_actors::local::vm_config;
use ferry_actors::migration::source::{MigrationError, MoveRequest, Phase};
use ferry_cluster::model::{Backend, Settings};
use ferry_cluster::Command;
use std::time::{Duration, Instant};

const VM: &str = "linux-1";

/// Whether QEMU guests run here (the boot image goes to a scratch dir).
fn qemu_or_skip(what: &str) -> bool {
    // One per test: the tests run at once, and each removes its own.
    let dir = std::env::temp_dir().join(format!("ferry-qemu-gate-{}-{what}", std::process::id()));
    let usable = ferry_vmm::qemu::usable_or_skip(what, &dir).is_some();
    let _ = std::fs::remove_dir_all(&dir);
    usable
}

/// A 256 MiB QEMU VM booted on node 1 whose service answers a client.
async fn cluster_with_linux(tag: &str, nodes: u64) -> (TestCluster, Client) {
    let cluster = TestCluster::start(tag, nodes).await.unwrap();
    let mut config = vm_config(256 * MIB, workload(0), 21);
    config.backend = Backend::Qemu;
    config.vcpus = 1;
    cluster.start_vm_config(VM, 1, config).await.unwrap();
    let source = cluster.node(1).shared.guest(VM).unwrap();
    assert_eq!(source.kind(), "qemu");
    let client = Client::start(cluster.switch.clone(), VM);
    wait_records(&cluster, 1, 10).await;
    (cluster, client)
}

/// Waits (bounded) until the guest on `node` holds `more` records beyond
/// what it holds now.
async fn wait_records(cluster: &TestCluster, node: u64, more: usize) {
    let guest = cluster.node(node).shared.guest(VM).unwrap();
    let start = guest.service_records().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while guest.service_records().unwrap().len() < start + more {
        assert!(
            Instant::now() < deadline,
            "the guest's service does not answer on node {node}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether process `pid` still exists (a zombie counts as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn qemu_pid(cluster: &TestCluster, node: u64) -> u32 {
    let guest = cluster.node(node).shared.guest(VM).unwrap();
    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // The guest's run directory names it on QEMU's command line.
    let dir = guest.as_stream().unwrap().run_dir();
    pids.into_iter()
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&*dir.to_string_lossy()))
                .unwrap_or(false)
        })
        .expect("the guest's QEMU process")
}

#[test]
fn a_linux_vm_moves_over_the_byte_stream_and_no_acknowledged_append_is_lost() {
    if !qemu_or_skip("a_linux_vm_moves_over_the_byte_stream_and_no_acknowledged_append_is_lost") {
        return;
    }
    run(async {
        let (cluster, client) = cluster_with_linux("qemu-move", 2).await;
        let source_pid = qemu_pid(&cluster, 1);
        // The estimate's dirty rate is QEMU's own measurement of the guest.
        let estimate = ferry_actors::measure::measure(
            &cluster.node(1).shared,
            VM,
            Some(2),
            &ferry_actors::measure::MeasureOptions::default(),
        )
        .await
        .unwrap();
        assert!(
            matches!(
                estimate.dirty_basis,
                ferry_actors::measure::DirtyRateBasis::Sampled(_)
            ),
            "{estimate:?}"
        );
        let watch = TwiceWatch::start(&cluster, VM);
        let mut events = cluster.node(1).shared.events.subscribe();
        let report = cluster
            .move_vm(MoveRequest::new(VM, 2), 1)
            .await
            .expect("the QEMU VM moves");
        // Progress came from QEMU's own figures while it copied.
        let mut copying = Vec::new();
        while let Ok(p) = events.try_recv() {
            if p.phase == Phase::Copying {
                copying.push(p);
            }
        }
        assert!(
            copying
                .iter()
                .any(|p| p.bytes_sent > 0 && p.remaining_pages > 0 && p.rate > 0.0),
            "no progress with QEMU's figures while it copied: {copying:?}"
        );
        wait_records(&cluster, 2, 20).await;
        let log = client.stop();
        let (samples, twice) = watch.stop().await;
        assert!(twice.is_empty(), "{twice:?}");
        assert!(samples > 10);
        assert_no_acked_append_lost(&cluster, 2, VM, &log);
        let seqs: Vec<u64> = cluster
            .node(2)
            .shared
            .guest(VM)
            .unwrap()
            .service_records()
            .unwrap()
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "the sequence continues without a gap"
        );
        assert!(
            !cluster.node(1).shared.holds(VM),
            "the source's copy is gone"
        );
        assert!(!alive(source_pid), "the source's QEMU process is gone");
        assert_eq!(cluster.running(VM), vec![(2, report.epoch)]);
        assert!(report.bytes > 1 << 20, "{report:?}");
        println!(
            "measured: 256 MiB Linux VM (QEMU) moved in {:?}, {} bytes of stream, blackout {:?} (source), the client refused for at most {:?}",
            report.total, report.bytes, report.blackout, log.longest_refusal
        );
    });
}

#[test]
fn a_linux_vm_whose_target_dies_mid_move_runs_on_at_its_source() {
    if !qemu_or_skip("a_linux_vm_whose_target_dies_mid_move_runs_on_at_its_source") {
        return;
    }
    run(async {
        let (cluster, client) = cluster_with_linux("qemu-target-dies", 2).await;
        let mut events = cluster.node(1).shared.events.subscribe();
        let shared = cluster.node(1).shared.clone();
        let target = cluster.node(2).shared.clone();
        // A cap slow enough that the target dies while QEMU still copies
        // (QEMU paces itself to it).
        cluster
            .write(Command::UpdateSettings {
                settings: Settings {
                    bandwidth_cap_bytes_per_sec: Some(4 * MIB),
                    ..Settings::default()
                },
            })
            .await
            .unwrap();
        let request = MoveRequest::new(VM, 2);
        let mover = tokio::spawn(async move {
            let node = shared;
            ferry_actors::migration::source::run(node, request, Default::default()).await
        });
        wait_progress(&mut events, |p| {
            p.phase == Phase::Copying && p.bytes_sent > 0
        })
        .await;
        target.kill().await;
        let outcome = mover.await.unwrap();
        assert!(
            matches!(outcome, Err(MigrationError::Aborted(_))),
            "{outcome:?}"
        );
        // The VM runs on at its source, and keeps serving.
        wait_records(&cluster, 1, 20).await;
        let log = client.stop();
        assert_no_acked_append_lost(&cluster, 1, VM, &log);
        assert_eq!(cluster.running(VM).len(), 1);
        assert_eq!(cluster.running(VM)[0].0, 1);
    });
}
