//! A running KVM guest moved between two nodes over the page stream, with a
//! client appending to its service throughout. Skips (and says why) where
//! this host has no usable KVM, unless `FERRY_CI_PROVIDES` names `kvm`; fails
//! wherever Ferry's own guest does not run (`ferry_vmm::kvm::usable_or_skip`).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry_actors::local::vm_config;
use ferry_actors::migration::source::MoveRequest;
use ferry_cluster::model::Backend;

#[test]
fn a_running_kvm_guest_moves_between_nodes_over_the_page_stream() {
    if ferry_vmm::kvm::usable_or_skip(
        "a_running_kvm_guest_moves_between_nodes_over_the_page_stream",
    )
    .is_none()
    {
        return;
    }
    run(async {
        let cluster = TestCluster::start("kvm", 2).await.unwrap();
        let mut config = vm_config(64 * MIB, workload(20_000), 9);
        config.backend = Backend::Kvm;
        config.vcpus = 1;
        cluster.start_vm_config("kvm-1", 1, config).await.unwrap();
        let source = cluster.node(1).shared.guest("kvm-1").unwrap();
        assert_eq!(source.kind(), "kvm");
        let client = Client::start(cluster.switch.clone(), "kvm-1");
        // The client is being served before the move starts.
        let served = source.service_records().unwrap().len();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while source.service_records().unwrap().len() < served + 10 {
            assert!(
                std::time::Instant::now() < deadline,
                "the KVM guest's service does not answer"
            );
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }

        let mut request = MoveRequest::new("kvm-1", 2);
        // Digests of memory and device state are compared in the blackout;
        // a difference aborts the move.
        request.verify = true;
        let report = cluster
            .move_vm(request, 1)
            .await
            .expect("the KVM guest moves");

        let target = cluster.node(2).shared.guest("kvm-1").unwrap();
        assert_eq!(target.kind(), "kvm");
        let seen = target.service_records().unwrap().len();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while target.service_records().unwrap().len() < seen + 20 {
            assert!(
                std::time::Instant::now() < deadline,
                "the service does not answer on the target"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let log = client.stop();
        assert_no_acked_append_lost(&cluster, 2, "kvm-1", &log);
        let seqs: Vec<u64> = target
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
            !cluster.node(1).shared.holds("kvm-1"),
            "the source's copy is gone"
        );
        assert_eq!(cluster.running("kvm-1"), vec![(2, report.epoch)]);
        println!(
            "kvm move: {} rounds, {} MiB, total {:?}, blackout {:?} (with digests), client refused at most {:?}",
            report.rounds.len(),
            report.bytes >> 20,
            report.total,
            report.blackout,
            log.longest_refusal
        );
    });
}
