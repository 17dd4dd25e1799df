//! Nodes in and out of a running cluster, driven as an operator does (issue
//! 17, must-show 1; issue 15, must-show 2): three daemons, `ferry node add
//! node-4`, its daemon started, a VM moved onto it and drained off, `ferry
//! node remove node-4`; then a client presenting node-4's certificate is
//! refused by every service of a remaining node, a stranger's certificate
//! (signed by the CA, never a member) by every cluster service, and the
//! refusal survives a restart of that node (the revocation is in the store).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry::transport::{NetworkConfig, NodeCredentials, RpcError, RpcNode};
use ferry::views::{StatusView, VmView};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Every service a node serves to its peers (the constants live in the
/// crates that register them).
const SERVICES: &[&str] = &[
    "raft",
    "cluster",
    "ferry-control",
    "migration",
    "migration-probe",
    "migration-measure",
    "migration-bandwidth-probe",
    "maintenance",
    "liveness",
    "load",
];

fn append(config: &Path, vm: &str, text: &str) -> (u64, u64) {
    let r = cli(config, &["vm", "append", vm, text, "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    (v["seq"].as_u64().unwrap(), v["node"].as_u64().unwrap())
}

fn wait_members(config: &Path, n: usize) {
    let api = client(config);
    wait_for(&format!("{n} voters"), Duration::from_secs(30), || {
        let s: StatusView = api.get("/api/status").ok()?;
        (s.voters.len() == n && s.nodes == n).then_some(())
    });
}

/// A transport presenting `creds`, on a loopback address of its own.
async fn impostor(creds: NodeCredentials, ip: &str) -> Arc<RpcNode> {
    let addr: SocketAddr = format!("{ip}:0").parse().unwrap();
    RpcNode::start(creds, vec![addr], NetworkConfig::loopback())
        .await
        .unwrap()
}

/// Calls every service of node `to` at `addrs`; each answer.
async fn call_every_service(
    from: &RpcNode,
    to: u64,
    addrs: &[SocketAddr],
) -> Vec<(&'static str, Result<Vec<u8>, RpcError>)> {
    let mut out = Vec::new();
    for s in SERVICES {
        let r = from
            .call(to, addrs, s, vec![0], Duration::from_secs(3))
            .await;
        out.push((*s, r));
    }
    out
}

fn node1_addrs(config: &Path) -> Vec<SocketAddr> {
    ferry::NodeConfig::load(config).unwrap().listen_addrs()
}

fn assert_revoked(answers: &[(&str, Result<Vec<u8>, RpcError>)]) {
    for (service, r) in answers {
        match r {
            Err(RpcError::PeerIdentity(msg)) => {
                assert!(msg.to_lowercase().contains("revoked"), "{service}: {msg}")
            }
            other => panic!("{service}: a revoked certificate was not refused: {other:?}"),
        }
    }
}

#[test]
fn a_fourth_node_joins_takes_a_vm_leaves_and_its_certificate_is_refused() {
    let dir = TempDir::new("node-membership");
    let mut d = Daemons::init(&dir.0, 3, 61, 62);
    for i in 0..3 {
        d.spawn(i);
    }
    let c1 = d.configs[0].clone();
    wait_members(&c1, 3);

    // Clear refusals first: a taken name, an invalid one, no CA key.
    let r = cli(&c1, &["node", "add", "node-2"]);
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.stderr.contains("is taken") && r.stderr.contains("[name_taken]"),
        "{r:?}"
    );
    let r = cli(&c1, &["node", "add", "no good"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("invalid node name"), "{r:?}");
    let elsewhere = dir.0.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let r = cli(
        &c1,
        &[
            "node",
            "add",
            "node-4",
            "--cluster-dir",
            elsewhere.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("cannot read the cluster CA's"), "{r:?}");

    // Add node-4 and start its daemon: a learner, then a voter.
    let r = cli(&c1, &["node", "add", "node-4"]);
    assert_eq!(r.code, 0, "{r:?}");
    let c4 = dir.0.join("node-4").join("node.toml");
    assert!(r.stdout.contains(c4.to_str().unwrap()), "{r:?}");
    d.configs.push(c4.clone());
    d.children.push(None);
    d.spawn(3);
    // Through the new node's configuration, `status --wait` waits for all
    // four (its peers and itself) and for its lease, so VMs may run there:
    // then node 1 sees four voters too.
    let r = cli(&c4, &["status", "--wait", "--timeout-s", "30"]);
    assert_eq!(r.code, 0, "{r:?}\n{}", d.log(3));
    let s: StatusView = client(&c1).get("/api/status").unwrap();
    assert_eq!((s.voters.len(), s.nodes), (4, 4), "{s:?}");

    // A VM moved onto it with the CLI, its service answering there.
    let r = cli(
        &c1,
        &[
            "vm",
            "create",
            "web-1",
            "--node",
            "node-1",
            "--memory-mib",
            "64",
            "--dirty-pages-per-sec",
            "2000",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let (seq, node) = append(&c1, "web-1", "on node 1");
    assert_eq!(node, 1);
    let r = cli(&c1, &["vm", "move", "web-1", "--to", "node-4"]);
    assert_eq!(r.code, 0, "{r:?}\n{}", d.log(3));
    let api = client(&c1);
    let vm: VmView = api.get("/api/vms/web-1").unwrap();
    assert_eq!((vm.owner, vm.state.as_str()), (4, "running"), "{vm:?}");
    let r = cli(&c1, &["vm", "append", "web-1", "on node 4", "--json"]);
    assert_eq!(
        r.code,
        0,
        "{r:?}\nnode-4:\n{}\nnode-1:\n{}",
        d.log(3),
        d.log(0)
    );
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        (v["seq"].as_u64(), v["node"].as_u64()),
        (Some(seq + 1), Some(4))
    );

    // Removal is refused while it owns the VM, naming it and the way out.
    let r = cli(&c1, &["node", "remove", "node-4"]);
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.stderr.contains("web-1") && r.stderr.contains("--drain"),
        "{r:?}"
    );

    // Drained off, then removed.
    let r = cli(&c1, &["node", "pause", "node-4", "--drain"]);
    assert_eq!(r.code, 0, "{r:?}\n{}", d.log(3));
    let vm: VmView = api.get("/api/vms/web-1").unwrap();
    assert_ne!(vm.owner, 4, "{vm:?}");
    assert_eq!(append(&c1, "web-1", "drained").0, seq + 2);
    let r = cli(&c1, &["node", "remove", "node-4"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("removed node-4 (id 4)"), "{r:?}");
    wait_members(&c1, 3);

    let creds4 = NodeCredentials::from_pem(
        &std::fs::read_to_string(dir.0.join("node-4").join("node.pem")).unwrap(),
    )
    .unwrap();
    let ca = ferry::enroll::load_ca(&dir.0).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addrs1 = node1_addrs(&c1);
    rt.block_on(async {
        // node-4's certificate: refused by every service, in the handshake.
        let four = impostor(creds4.clone(), "127.61.0.44").await;
        let answers = call_every_service(&four, 1, &addrs1).await;
        if let Some((_, Err(e))) = answers.first() {
            println!("node-4's certificate, refused: {e}");
        }
        assert_revoked(&answers);
        four.shutdown().await;

        // A certificate the CA signed for a node that never joined: the
        // handshake passes, every cluster service refuses it, and the
        // control service lets it do nothing but ask to join.
        let stranger = impostor(ca.issue(9).unwrap(), "127.61.0.99").await;
        for (service, r) in call_every_service(&stranger, 1, &addrs1).await {
            match (service, r) {
                // Admitted, to ask to join; a real request is checked below.
                ("ferry-control", _) => {}
                (_, Err(RpcError::Remote(msg))) => assert!(
                    msg.contains("refused: node 9 is not a member of this cluster"),
                    "{service}: {msg}"
                ),
                (_, other) => panic!("{service}: a stranger was not refused: {other:?}"),
            }
        }
        let cancel = ferry::transport::encode(&ferry::peer::Envelope {
            version: ferry::peer::VERSION,
            request: ferry::peer::PeerRequest::Cancel { vm: "web-1".into() },
        });
        match stranger
            .call(1, &addrs1, "ferry-control", cancel, Duration::from_secs(3))
            .await
        {
            Err(RpcError::Remote(msg)) => assert!(msg.contains("not_a_member"), "{msg}"),
            Ok(bytes) => {
                let reply: ferry::peer::PeerResult = ferry::transport::decode(&bytes).unwrap();
                let e = reply.unwrap_err();
                assert_eq!(e.code, "not_a_member", "{e:?}");
            }
            other => panic!("the stranger's cancel was not refused: {other:?}"),
        }
        stranger.shutdown().await;
    });

    // node-1 restarted: the revocation comes back from its store.
    assert_eq!(d.terminate(0), Some(0), "{}", d.log(0));
    d.spawn(0);
    let c2 = d.configs[1].clone();
    wait_for("node-1 back up", Duration::from_secs(30), || {
        let s: StatusView = client(&c2).get("/api/status").ok()?;
        let nodes: Vec<ferry::views::NodeView> = client(&c2).get("/api/nodes").ok()?;
        (s.voters.len() == 3 && nodes.iter().all(|n| n.state == "up")).then_some(())
    });
    rt.block_on(async {
        let four = impostor(creds4, "127.61.0.45").await;
        assert_revoked(&call_every_service(&four, 1, &addrs1).await);
        four.shutdown().await;
    });
}
