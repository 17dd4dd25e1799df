//! Live migration end to end: three nodes in one process over real QUIC and
//! Raft, a simulated guest with a workload and a service client throughout.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry_actors::job::MoveRequest;

#[test]
fn a_migration_completes_with_memory_state_and_every_acknowledged_append() {
    run(async {
        let cluster = TestCluster::start("complete", 3).await;
        cluster.start_vm("web-1", 1, 256 * MIB, workload(5_000), 1).await;
        let client = Client::start(cluster.switch.clone(), "web-1");
        let watch = TwiceWatch::start(&cluster, "web-1");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;

        let mut request = MoveRequest::new("web-1", 2);
        request.verify = true;
        let report = cluster.move_vm(request, 1).await.expect("migration completes");

        // Keep appending on the target for a while.
        let target = cluster.node(2).shared.guest("web-1").expect("the target runs the VM");
        let seen = target.service_records().unwrap().len();
        while target.service_records().unwrap().len() < seen + 50 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let log = client.stop();
        let (samples, violations) = watch.stop().await;

        let records = target.service_records().unwrap();
        let present: std::collections::HashSet<u64> = records.iter().map(|(s, _)| *s).collect();
        let lost: Vec<u64> = log.acked.iter().filter(|s| !present.contains(s)).copied().collect();
        assert!(lost.is_empty(), "acknowledged appends lost: {lost:?}");
        assert_eq!(records.len(), log.acked.len(), "nothing appended that was not acknowledged");
        assert_eq!(cluster.switch.route("web-1"), Some((2, report.epoch)), "the switch points at the target");
        assert!(!cluster.node(1).shared.holds("web-1"), "the source's copy is gone");
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
