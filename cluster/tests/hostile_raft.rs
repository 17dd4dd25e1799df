//! Hostile peers on the cluster store's `"raft"` service, over the real QUIC
//! transport (issue 15, hole 6). A member with an honest certificate sends the
//! leader, hundreds of times each, an InstallSnapshot chunk at an offset of a
//! terabyte (refused by the snapshot size limit before openraft buffers it),
//! AppendEntries and Vote on behalf of another member (refused: a member
//! speaks only for itself), and a node whose certificate the CA signed but
//! that is not a member sends Vote and AppendEntries (refused: not a member).
//! Meanwhile an honest client writes through the store and every write
//! commits; afterwards the leader, every node's term, the membership and the
//! log are what the honest writes alone make them, and the process's memory
//! and task count stayed bounded.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../tests/support/process.rs"]
mod process;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ferry_cluster::command::Response;
use ferry_cluster::network::protocol::{self, RaftRequest};
use ferry_cluster::network::{MAX_SNAPSHOT_BYTES, RAFT_SERVICE};
use ferry_cluster::raft_types::TypeConfig;
use ferry_cluster::{ClusterNode, ClusterNodeConfig, NodeId};
use ferry_transport::{NetworkConfig, RpcNode};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{CommittedLeaderId, LogId, Vote};
use process::{alive_tasks, assert_bounded, rss_bytes};

/// The offset the hostile snapshot chunk claims: a terabyte.
const LIE_OFFSET: u64 = 1 << 40;
/// How many lies the attack sends at least: enough that a task or a buffer
/// kept per lie would show far above the bounds below.
const MIN_LIES: u64 = 1000;
/// How many honest writes commit at least while the attack runs.
const MIN_WRITES: u64 = 100;
/// How far the process's resident memory may grow under the attack: the
/// honest writes add kilobytes to three stores, and the stores' page caches
/// and the QUIC buffers some megabytes. Half of [`MAX_SNAPSHOT_BYTES`]: one
/// chunk taken at the largest offset allowed would already pass it, and the
/// lie asks for four thousand times that.
const RSS_GROWTH_BOUND: u64 = MAX_SNAPSHOT_BYTES / 2;
/// How many more tasks than before the attack the runtime may hold at once:
/// the handlers of the calls in flight and openraft's own.
const TASK_GROWTH_BOUND: usize = 100;

/// Starts member `id` of `c` and returns its transport too, which the test
/// then uses as that member would if it turned hostile.
async fn start_member(c: &mut QuicCluster, id: NodeId) -> Arc<RpcNode> {
    let listen = vec![format!("127.1.0.{id}:0").parse().unwrap()];
    let rpc = RpcNode::start(c.ca.issue(id).unwrap(), listen, NetworkConfig::loopback())
        .await
        .unwrap();
    let advertise = rpc.local_addrs();
    c.addrs.insert(id, advertise.clone());
    let config = ClusterNodeConfig::new(id, c.dir.node(id), rpc.clone(), advertise);
    c.nodes
        .insert(id, ClusterNode::start(config).await.unwrap());
    rpc
}

/// One hostile message, who sends it and the reason it must be refused with.
struct Lie {
    what: &'static str,
    from: Arc<RpcNode>,
    request: Vec<u8>,
    refused: String,
}

/// The lies a member (`member`, not the leader) and a stranger (`stranger`,
/// never a member) tell the leader, all at a term far above `term`: accepted,
/// any of them would change the leader's term or buffer a terabyte.
fn lies(
    (member, member_rpc): (NodeId, &Arc<RpcNode>),
    other: NodeId,
    (stranger, stranger_rpc): (NodeId, &Arc<RpcNode>),
    term: u64,
) -> Vec<Lie> {
    let term = term + 100;
    let log_id = |by| Some(LogId::new(CommittedLeaderId::new(term, by), 1 << 40));
    let encode = |r: &RaftRequest| protocol::encode(r).unwrap();
    let snapshot = RaftRequest::InstallSnapshot(InstallSnapshotRequest::<TypeConfig> {
        vote: Vote::new_committed(term, member),
        meta: Default::default(),
        offset: LIE_OFFSET,
        data: vec![0xab; 64],
        done: false,
    });
    let append = |by| {
        RaftRequest::AppendEntries(AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(term, by),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: log_id(by),
        })
    };
    let vote = |by| {
        RaftRequest::Vote(VoteRequest {
            vote: Vote::new(term, by),
            last_log_id: log_id(by),
        })
    };
    vec![
        Lie {
            what: "snapshot chunk at a terabyte",
            from: member_rpc.clone(),
            request: encode(&snapshot),
            refused: format!("goes past the {MAX_SNAPSHOT_BYTES} byte limit"),
        },
        Lie {
            what: "AppendEntries on behalf of another member",
            from: member_rpc.clone(),
            request: encode(&append(other)),
            refused: format!("node {member} sent a Raft message on behalf of node {other}"),
        },
        Lie {
            what: "Vote on behalf of another member",
            from: member_rpc.clone(),
            request: encode(&vote(other)),
            refused: format!("node {member} sent a Raft message on behalf of node {other}"),
        },
        Lie {
            what: "Vote from a stranger",
            from: stranger_rpc.clone(),
            request: encode(&vote(stranger)),
            refused: format!("node {stranger} is not a member"),
        },
        Lie {
            what: "AppendEntries from a stranger",
            from: stranger_rpc.clone(),
            request: encode(&append(stranger)),
            refused: format!("node {stranger} is not a member"),
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_raft_messages_are_refused_while_honest_writes_commit() {
    let mut c = QuicCluster::new("hostile-raft");
    let mut rpcs = std::collections::BTreeMap::new();
    for id in 1..=3 {
        rpcs.insert(id, start_member(&mut c, id).await);
    }
    c.node(1).initialize().await.unwrap();
    for id in 2..=3 {
        let addrs = c.addrs[&id].clone();
        c.node(1).add_voter(id, addrs).await.unwrap();
    }
    let leader_id = c.leader().await;
    let leader = c.node(leader_id);
    for cmd in base_model(3) {
        leader.write(cmd).await.unwrap();
    }
    let mut others = (1..=3).filter(|id| *id != leader_id);
    let (member, other) = (others.next().unwrap(), others.next().unwrap());
    // Node 4's certificate is the CA's, but node 4 was never added.
    let stranger = 4;
    let stranger_rpc = RpcNode::start(
        c.ca.issue(stranger).unwrap(),
        vec!["127.1.0.4:0".parse().unwrap()],
        NetworkConfig::loopback(),
    )
    .await
    .unwrap();

    let before = leader.metrics();
    let terms_before: Vec<u64> = c
        .running()
        .iter()
        .map(|n| n.metrics().current_term)
        .collect();
    let lies = lies(
        (member, &rpcs[&member]),
        other,
        (stranger, &stranger_rpc),
        before.current_term,
    );
    let rss_before = rss_bytes();
    let tasks_before = alive_tasks();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let attack = tokio::spawn({
        let (stop, sent) = (stop.clone(), sent.clone());
        let addrs = c.addrs[&leader_id].clone();
        async move {
            let mut wrong = Vec::new();
            while !stop.load(Ordering::Acquire) {
                for lie in &lies {
                    let answer = lie
                        .from
                        .call(
                            leader_id,
                            &addrs,
                            RAFT_SERVICE,
                            lie.request.clone(),
                            Duration::from_secs(10),
                        )
                        .await;
                    match answer {
                        Err(e) if e.to_string().contains(&lie.refused) => {}
                        other => wrong.push(format!("{}: answered {other:?}", lie.what)),
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            wrong
        }
    });
    let sampler = tokio::spawn({
        let stop = stop.clone();
        async move {
            let (mut rss, mut tasks) = (0u64, 0usize);
            while !stop.load(Ordering::Acquire) {
                rss = rss.max(rss_bytes());
                tasks = tasks.max(alive_tasks());
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (rss, tasks)
        }
    });

    // The honest client writes through the leader until the attack has sent
    // its lies; every write must commit.
    let mut honest = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut writes = 0u64;
    while writes < MIN_WRITES || sent.load(Ordering::Relaxed) < MIN_LIES {
        assert!(
            Instant::now() < deadline,
            "the attack or the writes stalled"
        );
        let name = format!("honest-{writes}");
        let node = 1 + writes % 3;
        match leader.write(create_vm(&name, writes as u32, node)).await {
            Ok(Response::Done) => {}
            other => panic!("honest write {writes} under the attack: {other:?}"),
        }
        honest.insert(name);
        writes += 1;
    }
    stop.store(true, Ordering::Release);
    let wrong = attack.await.unwrap();
    let (rss_peak, tasks_peak) = sampler.await.unwrap();
    let lies_sent = sent.load(Ordering::Relaxed);
    let grew = rss_peak.saturating_sub(rss_before);
    println!(
        "hostile raft: {lies_sent} lies sent, {writes} honest writes committed, \
         RSS {} MiB before, peak {} MiB (+{} MiB), tasks {tasks_before} before, peak {tasks_peak}",
        rss_before >> 20,
        rss_peak >> 20,
        grew >> 20
    );
    assert!(
        wrong.is_empty(),
        "{} of {lies_sent} lies not refused by name: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );

    // The cluster is as the honest writes alone left it.
    let after = leader.metrics();
    let terms_after: Vec<u64> = c
        .running()
        .iter()
        .map(|n| n.metrics().current_term)
        .collect();
    assert_eq!(terms_after, terms_before, "a forged message moved a term");
    for node in c.running() {
        assert_eq!(
            node.leader(),
            Some(leader_id),
            "node {} lost its leader",
            node.id()
        );
    }
    assert_eq!(
        after
            .membership_config
            .membership()
            .voter_ids()
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([1, 2, 3]),
        "the membership changed"
    );
    assert_eq!(
        after.last_log_index,
        before.last_log_index.map(|i| i + writes),
        "the leader's log holds more than the honest writes"
    );
    let want = leader.read_linearizable().await.unwrap();
    let held: BTreeSet<String> = want
        .vms
        .keys()
        .filter(|name| name.starts_with("honest-"))
        .cloned()
        .collect();
    assert_eq!(
        held, honest,
        "the store holds other VMs than the honest writes"
    );
    assert_eq!(
        want.vms.len(),
        honest.len(),
        "the store holds VMs nobody wrote"
    );
    for node in c.running() {
        wait_until(
            Duration::from_secs(10),
            "every node to apply the writes",
            || {
                let (node, want) = (node.clone(), want.clone());
                async move { *node.read() == *want }
            },
        )
        .await;
    }

    assert_bounded(
        grew,
        RSS_GROWTH_BOUND,
        tasks_before,
        tasks_peak,
        TASK_GROWTH_BOUND,
        &format!("{lies_sent} lies"),
    );
    stranger_rpc.shutdown().await;
    c.shutdown_all().await;
}
