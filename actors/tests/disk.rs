//! Virtual disks through the migration engine, three nodes in one process:
//! a node-local disk copied live next to memory while the guest writes it,
//! an aborted move that keeps the source's disk and drops the target's
//! partial copy, and a shared disk that only changes hands.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry_actors::actors::{CancelMove, MoveVm};
use ferry_actors::disks::encode_program_with_disk;
use ferry_actors::history::{GuestPoint, GuestSeen};
use ferry_actors::local::vm_config;
use ferry_actors::migration::source::{MigrationError, MoveRequest, Phase, StorageReport};
use ferry_actors::node::GuestProgram;
use ferry_cluster::model::{Backend, Settings, StorageSpec, VmConfig};
use ferry_cluster::Command;
use ferry_vmm::DiskWorkload;
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;

/// A VM of `memory` whose disk is node-local, `disk` bytes, prefilled and
/// written at `blocks_per_sec` while it runs.
fn local_disk_vm(memory: u64, disk: u64, prefill_blocks: u64, blocks_per_sec: u64) -> VmConfig {
    let mut config = vm_config(memory, workload(2_000), 1);
    config.storage = StorageSpec::Local { size_bytes: disk };
    config.workload = encode_program_with_disk(
        &GuestProgram {
            workload: workload(2_000),
            prefill_seed: Some(1),
            tcp_connections: 0,
        },
        &DiskWorkload {
            blocks_per_sec,
            prefill_blocks,
            seed: 7,
        },
    );
    config
}

/// Waits until the guest of `vm` on `node` has `n` service records.
async fn records_reach(cluster: &TestCluster, node: u64, vm: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let guest = cluster.node(node).shared.guest(vm).unwrap();
    while guest.service_records().unwrap().len() < n {
        assert!(
            Instant::now() < deadline,
            "no appends served on node {node}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn sequences(records: &[(u64, Vec<u8>)]) -> HashSet<u64> {
    records.iter().map(|(s, _)| *s).collect()
}

#[test]
fn a_1_gib_local_disk_written_during_the_move_arrives_whole_and_leaves_the_source() {
    run(local_disk_move("disk-local", Backend::Sim));
}

#[test]
fn a_kvm_guests_1_gib_local_disk_moves_the_same_way() {
    if ferry_vmm::kvm::usable_or_skip("a_kvm_guests_1_gib_local_disk_moves_the_same_way").is_none()
    {
        return;
    }
    run(local_disk_move("disk-kvm", Backend::Kvm));
}

/// Moves a guest of `backend` with a 1 GiB local disk, written (blocks and
/// service appends) throughout, from node 1 to node 2, and checks the disk
/// arrived whole and left the source.
async fn local_disk_move(tag: &str, backend: Backend) {
    let cluster = TestCluster::start(tag, 3).await.unwrap();
    // Disk digests taken by the nodes themselves, at the source's pause
    // and just before the target resumes (nothing runs in between).
    let digests: Arc<Mutex<Vec<(GuestPoint, u64, u128)>>> = Arc::default();
    for node in &cluster.nodes {
        let digests = digests.clone();
        node.shared
            .set_guest_observer(Arc::new(move |seen: GuestSeen<'_>| {
                if let Some(d) = seen.guest.with_disk() {
                    let digest = d.disk().digest().unwrap();
                    digests
                        .lock()
                        .unwrap()
                        .push((seen.point, seen.node, digest));
                }
            }));
    }
    let mut config = local_disk_vm(64 * MIB, GIB, 4096, 2_000);
    config.backend = backend;
    if backend == Backend::Kvm {
        config.vcpus = 1;
    }
    cluster.start_vm_config("db", 1, config).await.unwrap();
    assert_eq!(
        cluster.node(1).shared.guest("db").unwrap().kind(),
        if backend == Backend::Kvm {
            "kvm"
        } else {
            "sim"
        }
    );
    let source_disk = cluster.node(1).shared.disk("db").unwrap();
    assert_eq!(source_disk.size_bytes(), GIB);
    let source_path = source_disk.path().to_path_buf();
    drop(source_disk);
    let client = Client::start(cluster.switch.clone(), "db");
    records_reach(&cluster, 1, "db", 20).await;

    let mut request = MoveRequest::new("db", 2);
    request.verify = true;
    let report = cluster
        .move_vm(request, 1)
        .await
        .expect("the move completes");
    records_reach(&cluster, 2, "db", 20 + 50).await;
    let log = client.stop();

    // Equal disks: the engine's verified digest folds the disk in, and
    // the disks' own digests at pause and at resume agree.
    let seen = digests.lock().unwrap().clone();
    let at_pause: Vec<_> = seen.iter().filter(|s| s.0 == GuestPoint::Paused).collect();
    let at_resume: Vec<_> = seen
        .iter()
        .filter(|s| s.0 == GuestPoint::Resuming)
        .collect();
    assert_eq!((at_pause.len(), at_resume.len()), (1, 1), "{seen:?}");
    assert_eq!((at_pause[0].1, at_resume[0].1), (1, 2));
    assert_eq!(at_pause[0].2, at_resume[0].2, "disk digests differ");

    // Every acknowledged append is on the target's disk, written through.
    let target_disk = cluster.node(2).shared.disk("db").unwrap();
    let on_disk = sequences(&target_disk.records().unwrap());
    let lost: Vec<u64> = log
        .acked
        .iter()
        .filter(|s| !on_disk.contains(s))
        .copied()
        .collect();
    assert!(!log.acked.is_empty());
    assert!(
        lost.is_empty(),
        "acknowledged appends not on the disk: {lost:?}"
    );
    assert_no_acked_append_lost(&cluster, 2, "db", &log);

    // The disk moved: the source's file is gone, the target's is there.
    assert!(!source_path.exists(), "the source's disk was not removed");
    assert!(target_disk.path().exists());
    assert_ne!(target_disk.path(), source_path);
    let StorageReport::NodeOwned { copy, from, to, .. } = report.storage else {
        panic!("a local disk reports as node-owned: {:?}", report.storage);
    };
    assert_eq!((from, to), (1, 2));
    assert!(
        copy.bytes >= 4096 * 4096,
        "the prefilled blocks were copied: {copy:?}"
    );
    assert!(
        copy.blocks_written > 0,
        "the disk was written during the move"
    );
    let memory_bytes = report.bytes.saturating_sub(copy.bytes);
    println!(
            "local disk move ({backend:?}): 64 MiB memory, 1 GiB disk: total {:?}, blackout {:?}, {} rounds; \
             memory {:.1} MiB, disk {:.1} MiB ({} KiB in the blackout), {} blocks written during the move",
            report.total,
            report.blackout,
            report.rounds.len(),
            memory_bytes as f64 / MIB as f64,
            copy.bytes as f64 / MIB as f64,
            copy.final_bytes >> 10,
            copy.blocks_written,
        );
}

#[test]
fn an_aborted_move_keeps_the_source_disk_and_drops_the_targets_partial_copy() {
    run(async {
        let cluster = TestCluster::start("disk-abort", 3).await.unwrap();
        // Slow enough that the cancel lands while round 0 runs.
        cluster
            .write(Command::UpdateSettings {
                settings: Settings {
                    bandwidth_cap_bytes_per_sec: Some(8 * MIB),
                    ..Settings::default()
                },
            })
            .await
            .unwrap();
        cluster
            .start_vm_config("db", 1, local_disk_vm(32 * MIB, 256 * MIB, 2048, 500))
            .await
            .unwrap();
        let source_path = cluster
            .node(1)
            .shared
            .disk("db")
            .unwrap()
            .path()
            .to_path_buf();
        let client = Client::start(cluster.switch.clone(), "db");
        let mut events = cluster.node(1).shared.events.subscribe();
        let actor = cluster.node(1).actor.clone();
        let moving =
            tokio::spawn(async move { actor.send(MoveVm(MoveRequest::new("db", 2))).await });
        wait_progress(&mut events, |p| p.phase == Phase::Copying).await;
        let target_path = cluster
            .node(2)
            .shared
            .disk("db")
            .expect("the target's copy")
            .path()
            .to_path_buf();
        assert!(target_path.exists());
        assert!(cluster
            .node(1)
            .actor
            .send(CancelMove("db".into()))
            .await
            .unwrap());
        let outcome = moving.await.unwrap().unwrap();
        assert!(
            matches!(outcome, Err(MigrationError::Cancelled)),
            "{outcome:?}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while cluster.node(2).shared.holds("db") {
            assert!(Instant::now() < deadline, "the target kept its copy");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            !target_path.exists(),
            "the target's partial disk was not removed"
        );
        assert!(source_path.exists(), "the source's disk must stay");
        // The VM runs on with its disk: appends keep landing on it.
        let before = client_records(&cluster, 1);
        records_reach(&cluster, 1, "db", before + 20).await;
        let log = client.stop();
        let on_disk = sequences(
            &cluster
                .node(1)
                .shared
                .disk("db")
                .unwrap()
                .records()
                .unwrap(),
        );
        assert!(log.acked.iter().all(|s| on_disk.contains(s)));
        assert_eq!(
            cluster.node(1).shared.cluster.read().vms["db"].disk_owner,
            Some(1)
        );
    });
}

fn client_records(cluster: &TestCluster, node: u64) -> usize {
    let guest = cluster.node(node).shared.guest("db").unwrap();
    guest.service_records().unwrap().len()
}

#[test]
fn a_shared_disk_is_not_copied_and_the_same_file_continues_on_the_target() {
    run(async {
        let cluster = TestCluster::start("disk-shared", 3).await.unwrap();
        let memory = 32 * MIB;
        // The default VM: its disk on the shared volume `csv-1`.
        cluster
            .start_vm("web", 1, memory, workload(2_000), 2)
            .await
            .unwrap();
        let source_disk = cluster.node(1).shared.disk("web").unwrap();
        let identity = std::fs::metadata(source_disk.path()).unwrap().ino();
        let path = source_disk.path().to_path_buf();
        drop(source_disk);
        let client = Client::start(cluster.switch.clone(), "web");
        let guest = cluster.node(1).shared.guest("web").unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while guest.service_records().unwrap().len() < 20 {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(guest);
        let mut request = MoveRequest::new("web", 3);
        request.verify = true;
        let report = cluster
            .move_vm(request, 1)
            .await
            .expect("the move completes");
        assert_eq!(
            report.storage,
            StorageReport::Shared {
                volume: "csv-1".into()
            }
        );
        // Only memory is in the copy space.
        let moved = cluster.node(3).shared.guest("web").unwrap();
        assert_eq!(moved.page_count(), memory / 4096);
        drop(moved);
        let target_disk = cluster.node(3).shared.disk("web").unwrap();
        assert_eq!(target_disk.path(), path);
        assert_eq!(
            std::fs::metadata(&path).unwrap().ino(),
            identity,
            "the same file"
        );
        let guest = cluster.node(3).shared.guest("web").unwrap();
        let seen = guest.service_records().unwrap().len();
        while guest.service_records().unwrap().len() < seen + 20 {
            assert!(Instant::now() < deadline + Duration::from_secs(20));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let log = client.stop();
        let on_disk = sequences(&target_disk.records().unwrap());
        let lost: Vec<u64> = log
            .acked
            .iter()
            .filter(|s| !on_disk.contains(s))
            .copied()
            .collect();
        assert!(
            lost.is_empty(),
            "acknowledged appends not on the shared disk: {lost:?}"
        );
        assert!(path.exists(), "a shared disk stays where it is");
    });
}
