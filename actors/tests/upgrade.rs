//! A cluster in the middle of a rolling upgrade: one node speaks only wire version 2
//! (the build before listed chunks, through the test-only `speak_versions`; in the
//! second test with that build's hello too, from before version ranges), the others
//! speak this build's 2 to 3. The cluster store runs across them, and a VM moves onto
//! the old node and off it again, to and from nodes of this build, with its memory
//! verified after every move.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry_actors::local::LocalOptions;
use ferry_actors::migration::source::MoveRequest;
use ferry_transport::NetworkConfig;

#[test]
fn vms_move_both_ways_between_a_version_2_node_and_this_build() {
    let mut old = NetworkConfig::loopback();
    old.speak_versions = Some((2, 2));
    moves_both_ways("upgrade", old);
}

#[test]
fn vms_move_both_ways_between_a_version_2_build_from_before_ranges_and_this_build() {
    let mut old = NetworkConfig::loopback();
    old.speak_versions = Some((2, 2));
    old.hello_without_range = true;
    moves_both_ways("upgrade-legacy", old);
}

/// Node 2 runs with `old`; nodes 1 and 3 are this build.
fn moves_both_ways(tag: &str, old: NetworkConfig) {
    let legacy = old.hello_without_range;
    run(async move {
        let mut options = LocalOptions::new(3);
        options.network_configs = vec![None, Some(old), None];
        let cluster = TestCluster::start_options(tag, options).await.unwrap();
        cluster
            .start_vm("web-1", 1, 64 * MIB, workload(5_000), 1)
            .await
            .unwrap();
        let client = Client::start(cluster.switch.clone(), "web-1");

        // New to old, old to new, and back again through the other new node.
        let mut last = 1;
        for (from, to) in [(1, 2), (2, 3), (3, 2), (2, 1)] {
            let mut request = MoveRequest::new("web-1", to);
            // The target compares a digest of every page with the paused source's.
            request.verify = true;
            let report = cluster
                .move_vm(request, from)
                .await
                .unwrap_or_else(|e| panic!("move from node {from} to node {to}: {e:?}"));
            assert_eq!(
                cluster.running("web-1"),
                vec![(to, report.epoch)],
                "after the move from node {from} to node {to}"
            );
            // Later rounds carry the scattered pages the workload dirtied: to or from
            // the old node they must go as plain chunks, which it alone reads.
            let dirtied: u64 = report.rounds.iter().map(|r| r.pages_dirtied).sum();
            assert!(
                report.rounds.len() >= 2 && dirtied > 0,
                "a move with dirty rounds: {:?}",
                report.rounds
            );
            println!(
                "node {from} -> node {to}: {} rounds, {} pages dirtied, blackout {:?}",
                report.rounds.len(),
                dirtied,
                report.blackout
            );
            last = to;
        }
        let log = client.stop();
        assert_no_acked_append_lost(&cluster, last, "web-1", &log);

        // Nobody broke the protocol (a listed chunk on a version-2 path is a
        // protocol error on the receiver). Only a node from before ranges refused
        // hellos: the range it cannot read, before it was offered version 2 alone.
        for node in &cluster.nodes {
            let stats = node.rpc.stats();
            let refusals = node.rpc.recent_refusals();
            assert_eq!(stats.protocol_errors, 0, "node {}: {refusals:?}", node.id);
            // A hedged call abandoning a handshake is no refusal of a hello.
            let hellos: Vec<&String> = refusals
                .iter()
                .filter(|r| r.contains(": bad hello: "))
                .collect();
            if legacy && node.id == 2 {
                assert!(
                    hellos
                        .iter()
                        .all(|r| r.contains("trailing bytes") || r.contains("protocol version")),
                    "{refusals:?}"
                );
            } else {
                assert!(hellos.is_empty(), "node {}: {refusals:?}", node.id);
            }
        }
    });
}
