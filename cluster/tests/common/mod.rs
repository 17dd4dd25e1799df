//! Helpers shared by the Raft integration tests: temporary data directories, commands that
//! build a small cluster model, and bounded waits on conditions.
#![allow(clippy::unwrap_used, dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_cluster::command::Command;
use ferry_cluster::model::{Backend, Capacity, MacAddr, StorageSpec, VmConfig};
use ferry_cluster::{ClusterNode, NodeId};

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let unique = format!(
            "ferry-cluster-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        let p = std::env::temp_dir().join(unique);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn node(&self, id: NodeId) -> PathBuf {
        self.0.join(format!("node{id}"))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Poll `cond` every 10 ms until it holds; panic with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wait until every node in `nodes` agrees on one leader among them; return it.
pub async fn wait_leader(nodes: &[&ClusterNode], timeout: Duration) -> NodeId {
    let deadline = Instant::now() + timeout;
    loop {
        let leaders: BTreeSet<Option<NodeId>> = nodes.iter().map(|n| n.leader()).collect();
        if leaders.len() == 1 {
            if let Some(Some(l)) = leaders.into_iter().next() {
                if nodes.iter().any(|n| n.id() == l) {
                    return l;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no common leader within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A network definition command for network `k` (127.k.0.0/16, no gateway).
pub fn define_network(k: u8) -> Command {
    Command::DefineNetwork {
        name: format!("net{k}"),
        subnet: format!("127.{k}.0.0/16").parse().unwrap(),
        gateway: None,
    }
}

/// Register node `id` in the model with an address on networks 1 and 2.
pub fn add_node(id: NodeId) -> Command {
    Command::AddNode {
        id,
        name: format!("node{id}"),
        addresses: BTreeMap::from([
            ("net1".to_string(), format!("127.1.0.{id}").parse().unwrap()),
            ("net2".to_string(), format!("127.2.0.{id}").parse().unwrap()),
        ]),
        cpu_features: ["sse4".to_string()].into_iter().collect(),
        capacity: Capacity {
            memory_bytes: 1 << 40,
            max_vms: 100_000,
        },
        tcp_offload: false,
    }
}

/// Define VM `name` (1 MiB, shared storage) on `node`; `n` makes its MAC unique.
pub fn create_vm(name: &str, n: u32, node: NodeId) -> Command {
    let b = n.to_be_bytes();
    Command::CreateVm {
        name: name.into(),
        config: VmConfig {
            failover: Default::default(),
            memory_bytes: 1 << 20,
            vcpus: 1,
            mac: MacAddr([0x52, 0x54, b[0], b[1], b[2], b[3]]),
            backend: Backend::Sim,
            workload: Vec::new(),
            storage: StorageSpec::Shared {
                volume: "csv".into(),
            },
        },
        node,
    }
}

/// The model setup most tests start from: two networks, nodes 1..=n registered.
pub fn base_model(n: NodeId) -> Vec<Command> {
    let mut cmds = vec![define_network(1), define_network(2)];
    cmds.extend((1..=n).map(add_node));
    cmds
}

// ---------------------------------------------------------------- real QUIC clusters

use std::collections::BTreeMap as Map;
use std::net::SocketAddr;
use std::sync::Arc;

use ferry_cluster::{ClusterNodeConfig, SnapshotSettings};
use ferry_transport::{ClusterCa, NetworkConfig, RpcNode};

/// Nodes of one cluster, each with its own `RpcNode` on 127.1.0.<id> (port picked by the OS
/// on first start, reused on restart) and its own data directory.
pub struct QuicCluster {
    pub ca: ClusterCa,
    pub dir: TempDir,
    pub nodes: Map<NodeId, ClusterNode>,
    pub addrs: Map<NodeId, Vec<SocketAddr>>,
    pub snapshot: SnapshotSettings,
}

impl QuicCluster {
    pub fn new(tag: &str) -> QuicCluster {
        QuicCluster {
            ca: ClusterCa::generate("ferry-test").unwrap(),
            dir: TempDir::new(tag),
            nodes: Map::new(),
            addrs: Map::new(),
            snapshot: SnapshotSettings::default(),
        }
    }

    /// Start (or restart) node `id` from its data directory.
    pub async fn start(&mut self, id: NodeId) -> ClusterNode {
        let listen = self
            .addrs
            .get(&id)
            .cloned()
            .unwrap_or_else(|| vec![format!("127.1.0.{id}:0").parse().unwrap()]);
        // A restarted node rebinds its old port; allow the previous socket a moment to go.
        let deadline = Instant::now() + Duration::from_secs(5);
        let rpc = loop {
            match RpcNode::start(
                self.ca.issue(id).unwrap(),
                listen.clone(),
                NetworkConfig::loopback(),
            )
            .await
            {
                Ok(rpc) => break rpc,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "cannot start transport of node {id}: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let advertise = rpc.local_addrs();
        self.addrs.insert(id, advertise.clone());
        let transport: Arc<dyn ferry_cluster::ClusterTransport> = rpc;
        let mut cfg = ClusterNodeConfig::new(id, self.dir.node(id), transport, advertise);
        cfg.snapshot = self.snapshot;
        let node = ClusterNode::start(cfg).await.unwrap();
        self.nodes.insert(id, node.clone());
        node
    }

    /// Start nodes 1..=n, bootstrap on node 1, join the others as voters.
    pub async fn start_voters(&mut self, n: NodeId) {
        for id in 1..=n {
            self.start(id).await;
        }
        self.node(1).initialize().await.unwrap();
        for id in 2..=n {
            let addrs = self.addrs[&id].clone();
            self.node(1).add_voter(id, addrs).await.unwrap();
        }
        let all: Vec<ClusterNode> = self.nodes.values().cloned().collect();
        let refs: Vec<&ClusterNode> = all.iter().collect();
        wait_leader(&refs, Duration::from_secs(10)).await;
    }

    pub fn node(&self, id: NodeId) -> ClusterNode {
        self.nodes[&id].clone()
    }

    /// Kill node `id` (Raft stops, its endpoint closes); it stays in `addrs` for a restart.
    pub async fn kill(&mut self, id: NodeId) {
        let node = self.nodes.remove(&id).unwrap();
        node.shutdown().await.unwrap();
    }

    pub fn running(&self) -> Vec<ClusterNode> {
        self.nodes.values().cloned().collect()
    }

    pub async fn leader(&self) -> NodeId {
        let all = self.running();
        let refs: Vec<&ClusterNode> = all.iter().collect();
        wait_leader(&refs, Duration::from_secs(10)).await
    }

    pub async fn shutdown_all(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.kill(id).await;
        }
    }
}
