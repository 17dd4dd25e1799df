//! The Raft wiring over the in-process network: bootstrap, join, forwarding, watching.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use ferry_cluster::network::memory::MemNetwork;
use ferry_cluster::{Change, ClusterNode, ClusterNodeConfig, Command, Response};

async fn start(net: &MemNetwork, dir: &TempDir, id: u64) -> ClusterNode {
    let transport = net.endpoint(id);
    let cfg = ClusterNodeConfig::new(id, dir.node(id), transport, vec![]);
    ClusterNode::start(cfg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_forward_and_watch() {
    let dir = TempDir::new("mem3");
    let net = MemNetwork::new();
    let n1 = start(&net, &dir, 1).await;
    let n2 = start(&net, &dir, 2).await;
    let n3 = start(&net, &dir, 3).await;
    n1.initialize().await.unwrap();
    // Joining works from any member: a node that is not the leader forwards.
    n1.add_voter(2, vec![]).await.unwrap();
    n2.add_voter(3, vec![]).await.unwrap();
    let leader = wait_leader(&[&n1, &n2, &n3], Duration::from_secs(5)).await;
    assert_eq!(leader, 1);

    let mut events = n3.subscribe();
    for cmd in base_model(3) {
        n3.write(cmd).await.unwrap();
    }
    // Read-your-writes on the follower that wrote.
    assert_eq!(n3.read().nodes.len(), 3);
    let r = n2.write(create_vm("vm1", 1, 1)).await.unwrap();
    assert_eq!(r, Response::Done);
    let err = n2.write(create_vm("vm1", 2, 1)).await.unwrap_err();
    assert!(matches!(
        err,
        ferry_cluster::ClusterError::Rejected(ferry_cluster::CommandError::VmExists { .. })
    ));
    // An oversized command is refused before it reaches the log.
    let mut huge = create_vm("huge", 3, 1);
    if let Command::CreateVm { config, .. } = &mut huge {
        config.workload = vec![0; ferry_cluster::node::MAX_COMMAND_BYTES + 1];
    }
    let err = n2.write(huge).await.unwrap_err();
    assert!(matches!(
        err,
        ferry_cluster::ClusterError::Rejected(ferry_cluster::CommandError::InvalidValue { field, .. }) if field == "command"
    ));
    let s = n1.read_linearizable().await.unwrap();
    assert!(s.vms.contains_key("vm1"));
    assert!(!s.vms.contains_key("huge"));
    let s = n3.read_linearizable().await.unwrap();
    assert!(s.vms.contains_key("vm1"));

    // Every applied command arrives in log order, refusals included.
    let mut seen = Vec::new();
    let mut last = 0;
    while seen.len() < 7 {
        let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(ev.index > last, "events in log order");
        last = ev.index;
        if let Change::Command { command, result } = ev.change {
            seen.push((command.name(), result.is_ok()));
        }
    }
    assert_eq!(
        seen,
        vec![
            ("DefineNetwork", true),
            ("DefineNetwork", true),
            ("AddNode", true),
            ("AddNode", true),
            ("AddNode", true),
            ("CreateVm", true),
            ("CreateVm", false),
        ]
    );

    // The leader goes; the others elect a new one and keep committing.
    n1.shutdown().await.unwrap();
    n2.write(Command::PauseNode {
        node: 1,
        drain: false,
    })
    .await
    .unwrap();
    let l = wait_leader(&[&n2, &n3], Duration::from_secs(5)).await;
    assert_ne!(l, 1);
    // Node 1 comes back from its data directory and catches up.
    let n1 = start(&net, &dir, 1).await;
    wait_until(Duration::from_secs(10), "node 1 to catch up", || {
        let n1 = n1.clone();
        async move {
            n1.read()
                .nodes
                .get(&1)
                .is_some_and(|n| n.state == ferry_cluster::model::NodeState::Paused)
        }
    })
    .await;
    for n in [&n1, &n2, &n3] {
        n.shutdown().await.unwrap();
    }
}

/// Membership: a fourth node joins as a learner (it receives the log but does not vote), is
/// promoted to voter, and a voter is removed; writes keep committing throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_as_learner_promote_and_remove() {
    let dir = TempDir::new("mem-members");
    let net = MemNetwork::new();
    let mut nodes = Vec::new();
    for id in 1..=4 {
        nodes.push(start(&net, &dir, id).await);
    }
    let (n1, n2, n3, n4) = (&nodes[0], &nodes[1], &nodes[2], &nodes[3]);
    n1.initialize().await.unwrap();
    n1.add_voter(2, vec![]).await.unwrap();
    n1.add_voter(3, vec![]).await.unwrap();
    for cmd in base_model(4) {
        n2.write(cmd).await.unwrap();
    }
    n3.add_learner(4, vec![]).await.unwrap();
    let voters = |n: &ClusterNode| -> Vec<u64> {
        n.metrics()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    };
    let learners = |n: &ClusterNode| -> Vec<u64> {
        n.metrics()
            .membership_config
            .membership()
            .learner_ids()
            .collect()
    };
    assert_eq!(voters(n1), vec![1, 2, 3]);
    assert_eq!(learners(n1), vec![4]);
    // The learner receives the log, and its writes are forwarded like anyone's.
    wait_until(
        Duration::from_secs(5),
        "the learner to apply the log",
        || {
            let n4 = n4.clone();
            async move { n4.read().nodes.len() == 4 }
        },
    )
    .await;
    n4.write(create_vm("from-learner", 1, 4)).await.unwrap();
    assert!(n4.read().vms.contains_key("from-learner"));

    n2.add_voter(4, vec![]).await.unwrap();
    assert_eq!(voters(n1), vec![1, 2, 3, 4]);
    n4.remove_member(3).await.unwrap();
    wait_until(
        Duration::from_secs(5),
        "node 3 to leave the membership",
        || {
            let n1 = n1.clone();
            async move { voters(&n1) == vec![1, 2, 4] && learners(&n1).is_empty() }
        },
    )
    .await;
    n3.shutdown().await.unwrap();
    n1.write(create_vm("after-removal", 2, 1)).await.unwrap();
    for n in [n1, n2, n4] {
        let s = n.read_linearizable().await.unwrap();
        assert!(s.vms.contains_key("after-removal"));
    }
    for n in [n1, n2, n4] {
        n.shutdown().await.unwrap();
    }
}

/// Without a quorum a write reports the cluster unavailable (not a refusal), within the
/// write timeout; once a majority is back, writes succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_quorum_is_unavailable_not_rejected() {
    let dir = TempDir::new("mem-quorum");
    let net = MemNetwork::new();
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start(&net, &dir, id).await);
    }
    nodes[0].initialize().await.unwrap();
    nodes[0].add_voter(2, vec![]).await.unwrap();
    nodes[0].add_voter(3, vec![]).await.unwrap();
    nodes[0].write(define_network(1)).await.unwrap();

    net.set_reachable(2, false);
    net.set_reachable(3, false);
    // On the leader (its proposal never commits) and on a cut-off follower (no leader).
    for n in &nodes[..2] {
        let t = std::time::Instant::now();
        let err = n
            .write_within(define_network(2), Duration::from_millis(400))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ferry_cluster::ClusterError::Unavailable(_)),
            "node {}: {err:?}",
            n.id()
        );
        assert!(t.elapsed() < Duration::from_secs(3));
        let err = n
            .read_linearizable_within(Duration::from_millis(400))
            .await
            .unwrap_err();
        assert!(matches!(err, ferry_cluster::ClusterError::Unavailable(_)));
    }
    net.set_reachable(2, true);
    // The write above may or may not have been committed by a later leader; either way the
    // retry below settles it (a second DefineNetwork of net2 would be refused as a duplicate).
    let r = nodes[1].write(define_network(3)).await;
    assert_eq!(r.unwrap(), Response::Done);
    net.set_reachable(3, true);
    for n in &nodes {
        n.shutdown().await.unwrap();
    }
}
