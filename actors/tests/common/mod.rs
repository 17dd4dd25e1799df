//! A cluster of Ferry nodes in one process, over real QUIC and Raft, for the
//! end-to-end migration tests. Each node has an address on two migration
//! networks (127.1.0.i and 127.2.0.i); page-stream paths to a node can be put
//! through chaos proxies so a test can cut them.
#![allow(clippy::unwrap_used, dead_code)]

use actix::prelude::*;
use ferry_actors::actors::{MoveVm, NodeActor, StartVm};
use ferry_actors::job::{MigrationError, MigrationReport, MoveRequest};
use ferry_actors::node::{encode_program, Directory, GuestProgram, NodeShared, PeerAddrs};
use ferry_actors::switch::{ClientError, VirtualSwitch};
use ferry_cluster::model::{Backend, Capacity, MacAddr, StorageSpec, Subnet, VmConfig};
use ferry_cluster::{ClusterNode, ClusterNodeConfig, Command, NodeId};
use ferry_transport::{ClusterCa, NetworkConfig, RpcNode};
use ferry_vmm::{Pattern, Workload};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;

/// Runs `f` inside an actix system whose tokio runtime is multi-threaded, so
/// the page stream and Raft run on worker threads while actors run here.
pub fn run<F: std::future::Future<Output = ()>>(f: F) {
    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    });
    system.block_on(f);
}

pub struct TestNode {
    pub id: NodeId,
    pub shared: Arc<NodeShared>,
    pub actor: Addr<NodeActor>,
    pub rpc: Arc<RpcNode>,
}

pub struct TestCluster {
    pub nodes: Vec<TestNode>,
    pub switch: Arc<VirtualSwitch>,
    pub directory: Arc<Directory>,
    pub dir: PathBuf,
}

fn ip(net: u8, node: u64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, net, 0, node as u8))
}

impl TestCluster {
    /// Starts `n` nodes, forms the Raft cluster and records the model:
    /// two private migration networks and the nodes on them.
    pub async fn start(tag: &str, n: u64) -> TestCluster {
        let dir = std::env::temp_dir().join(format!("ferry-e2e-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = ClusterCa::generate("e2e").unwrap();
        let switch = VirtualSwitch::new();
        let directory = Arc::new(Directory::default());
        let mut nodes = Vec::new();
        for id in 1..=n {
            let creds = ca.issue(id).unwrap();
            let listen = vec![SocketAddr::new(ip(1, id), 0), SocketAddr::new(ip(2, id), 0)];
            let rpc = RpcNode::start(creds, listen, NetworkConfig::loopback())
                .await
                .unwrap();
            let config = ClusterNodeConfig::new(
                id,
                dir.join(format!("node-{id}")),
                rpc.clone(),
                rpc.local_addrs(),
            );
            let cluster = ClusterNode::start(config).await.unwrap();
            let shared = NodeShared::new(rpc.clone(), cluster, switch.clone(), directory.clone());
            let actor = NodeActor::new(shared.clone()).start();
            nodes.push(TestNode {
                id,
                shared,
                actor,
                rpc,
            });
        }
        for node in &nodes {
            let addrs = node.rpc.local_addrs();
            directory.set(
                node.id,
                PeerAddrs {
                    rpc: addrs.clone(),
                    migration: addrs,
                },
            );
        }
        nodes[0].shared.cluster.initialize().await.unwrap();
        for node in &nodes[1..] {
            nodes[0]
                .shared
                .cluster
                .add_voter(node.id, node.rpc.local_addrs())
                .await
                .unwrap();
        }
        let cluster = TestCluster {
            nodes,
            switch,
            directory,
            dir,
        };
        for k in [1u8, 2] {
            cluster
                .write(Command::DefineNetwork {
                    name: format!("mig-{k}"),
                    subnet: Subnet {
                        addr: IpAddr::V4(Ipv4Addr::new(127, k, 0, 0)),
                        prefix: 16,
                    },
                    gateway: None,
                })
                .await;
        }
        for id in 1..=n {
            cluster
                .write(Command::AddNode {
                    id,
                    name: format!("node-{id}"),
                    addresses: BTreeMap::from([
                        ("mig-1".to_string(), ip(1, id)),
                        ("mig-2".to_string(), ip(2, id)),
                    ]),
                    cpu_features: BTreeSet::new(),
                    capacity: Capacity {
                        memory_bytes: 64 << 30,
                        max_vms: 32,
                    },
                    tcp_offload: false,
                })
                .await;
        }
        cluster
    }

    pub fn node(&self, id: NodeId) -> &TestNode {
        &self.nodes[id as usize - 1]
    }

    /// Writes through any live node (followers forward to the leader).
    pub async fn write(&self, command: Command) -> ferry_cluster::Response {
        let node = self.nodes.iter().find(|n| !n.shared.is_dead()).unwrap();
        node.shared.cluster.write(command).await.unwrap()
    }

    /// Defines a simulated VM and starts it on `node`.
    pub async fn start_vm(
        &self,
        name: &str,
        node: NodeId,
        memory: u64,
        workload: Workload,
        mac: u8,
    ) {
        self.write(Command::CreateVm {
            name: name.into(),
            config: VmConfig {
                memory_bytes: memory,
                vcpus: 2,
                mac: MacAddr([2, 0, 0, 0, 0, mac]),
                backend: Backend::Sim,
                workload: encode_program(&GuestProgram {
                    workload,
                    prefill_seed: Some(u64::from(mac)),
                }),
                storage: StorageSpec::Shared {
                    volume: "csv-1".into(),
                },
            },
            node,
        })
        .await;
        self.node(node)
            .actor
            .send(StartVm(name.into()))
            .await
            .unwrap()
            .unwrap();
    }

    pub async fn move_vm(
        &self,
        request: MoveRequest,
        from: NodeId,
    ) -> Result<MigrationReport, MigrationError> {
        self.node(from).actor.send(MoveVm(request)).await.unwrap()
    }

    /// The nodes on which `vm` is running right now (unpaused, owner role),
    /// with the epoch each runs it at.
    pub fn running(&self, vm: &str) -> Vec<(NodeId, u64)> {
        self.nodes
            .iter()
            .filter_map(|n| n.shared.running_epoch(vm).map(|e| (n.id, e)))
            .collect()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn workload(pages_per_sec: u64) -> Workload {
    Workload {
        dirty_pages_per_sec: Some(pages_per_sec),
        pattern: Pattern::HotSet {
            write_percent: 80,
            page_percent: 10,
        },
        seed: 17,
    }
}

/// A client appending to a VM's service through the switch the whole time.
pub struct Client {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<ClientLog>>,
}

#[derive(Debug, Default)]
pub struct ClientLog {
    pub acked: Vec<u64>,
    /// The longest stretch during which every append was refused.
    pub longest_refusal: Duration,
    pub refusals: u64,
}

impl Client {
    pub fn start(switch: Arc<VirtualSwitch>, vm: &str) -> Client {
        let stop = Arc::new(AtomicBool::new(false));
        let vm = vm.to_string();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut log = ClientLog::default();
            let mut refused_since: Option<Instant> = None;
            let mut n = 0u64;
            while !flag.load(Ordering::Acquire) {
                match switch.append(&vm, format!("order-{n}").as_bytes()) {
                    Ok(seq) => {
                        if let Some(since) = refused_since.take() {
                            log.longest_refusal = log.longest_refusal.max(since.elapsed());
                        }
                        log.acked.push(seq);
                        n += 1;
                        std::thread::sleep(Duration::from_micros(500));
                    }
                    Err(
                        e @ (ClientError::Service { .. }
                        | ClientError::NotHere { .. }
                        | ClientError::Unreachable { .. }),
                    ) => {
                        assert!(
                            e.is_transient() || matches!(e, ClientError::Unreachable { .. }),
                            "client error {e}"
                        );
                        log.refusals += 1;
                        refused_since.get_or_insert_with(Instant::now);
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    Err(e) => panic!("client error {e}"),
                }
            }
            log
        });
        Client {
            stop,
            thread: Some(thread),
        }
    }

    pub fn stop(mut self) -> ClientLog {
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// Samples, until stopped, where a VM runs; records any moment it ran on two
/// nodes at once, and any node that ran it at an epoch other than the store's
/// owner epoch at that time.
pub struct TwiceWatch {
    stop: Arc<AtomicBool>,
    violations: Arc<Mutex<Vec<String>>>,
    thread: Option<tokio::task::JoinHandle<u64>>,
}

impl TwiceWatch {
    pub fn start(cluster: &TestCluster, vm: &str) -> TwiceWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let violations = Arc::new(Mutex::new(Vec::new()));
        let nodes: Vec<(NodeId, Arc<NodeShared>)> = cluster
            .nodes
            .iter()
            .map(|n| (n.id, n.shared.clone()))
            .collect();
        let (flag, out, vm) = (stop.clone(), violations.clone(), vm.to_string());
        let thread = tokio::spawn(async move {
            let mut samples = 0;
            while !flag.load(Ordering::Acquire) {
                let running: Vec<(NodeId, u64)> = nodes
                    .iter()
                    .filter_map(|(id, n)| n.running_epoch(&vm).map(|e| (*id, e)))
                    .collect();
                if running.len() > 1 {
                    out.lock()
                        .unwrap()
                        .push(format!("{vm} running on {running:?} at once"));
                }
                samples += 1;
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            samples
        });
        TwiceWatch {
            stop,
            violations,
            thread: Some(thread),
        }
    }

    /// Stops watching; returns the number of samples and any violation.
    pub async fn stop(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Release);
        let samples = self.thread.take().unwrap().await.unwrap();
        let violations = self.violations.lock().unwrap().clone();
        (samples, violations)
    }
}

/// Waits (bounded) for a progress event of the source node matching `pred`.
pub async fn wait_progress(
    events: &mut tokio::sync::broadcast::Receiver<ferry_actors::job::Progress>,
    pred: impl Fn(&ferry_actors::job::Progress) -> bool,
) -> ferry_actors::job::Progress {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(p)) if pred(&p) => return p,
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => panic!("progress feed closed: {e}"),
            Err(_) => panic!("no matching progress event within 30 s"),
        }
    }
}

/// Checks that every acknowledged append is in the records `vm` holds on `node`.
pub fn assert_no_acked_append_lost(cluster: &TestCluster, node: NodeId, vm: &str, log: &ClientLog) {
    let guest = cluster
        .node(node)
        .shared
        .guest(vm)
        .expect("the VM runs on the node");
    let present: std::collections::HashSet<u64> = guest
        .service_records()
        .unwrap()
        .iter()
        .map(|(s, _)| *s)
        .collect();
    let lost: Vec<u64> = log
        .acked
        .iter()
        .filter(|s| !present.contains(s))
        .copied()
        .collect();
    assert!(lost.is_empty(), "acknowledged appends lost: {lost:?}");
    assert!(!log.acked.is_empty(), "the client got acknowledgements");
}

/// Puts the page-stream paths to `target` through one chaos proxy per
/// migration network, returned in network order.
pub async fn proxy_paths(
    cluster: &TestCluster,
    target: NodeId,
) -> Vec<ferry_chaos::proxy::LinkProxy> {
    let node = cluster.node(target);
    let mut proxies = Vec::new();
    for (k, addr) in node.rpc.local_addrs().into_iter().enumerate() {
        let listen = SocketAddr::new(ip(k as u8 + 1, 100 + target), 0);
        proxies.push(
            ferry_chaos::proxy::LinkProxy::start(listen, addr, 7 + k as u64)
                .await
                .unwrap(),
        );
    }
    let mut peer = cluster.directory.get(target).unwrap();
    peer.migration = proxies.iter().map(|p| p.local_addr()).collect();
    cluster.directory.set(target, peer);
    proxies
}
