//! A local cluster: Ferry nodes in one process, over real QUIC and Raft, each
//! with an address on two private migration networks (127.1.0.i and
//! 127.2.0.i, all on loopback) or on the networks [`LocalOptions`] lists. The end-to-end tests, the benchmarks and the
//! `local_cluster` example drive Ferry through it, and a control plane that
//! embeds Ferry can start its nodes the same way.

use crate::actors::{MoveVm, NodeActor, StartVm};
use crate::migration::source::{MigrationError, MigrationReport, MoveRequest};
use crate::node::{encode_program, Directory, GuestProgram, NodeShared, PeerAddrs};
use crate::switch::{ClientError, VirtualSwitch};
use actix::prelude::*;
use ferry_cluster::model::{Backend, Capacity, MacAddr, StorageSpec, Subnet, VmConfig};
use ferry_cluster::{ClusterNode, ClusterNodeConfig, ClusterTransport, Command, NodeId};
use ferry_transport::{ClusterCa, NetworkConfig, RpcNode};
use ferry_vmm::Workload;
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;

/// Errors of the local cluster, as text for the person running it.
pub type LocalError = String;

fn err(what: &str) -> impl Fn(&dyn std::fmt::Display) -> LocalError + '_ {
    move |e| format!("{what}: {e}")
}

/// Runs `f` inside an actix system whose tokio runtime is multi-threaded, so
/// the page stream and Raft run on worker threads while actors run here.
///
/// One worker per core (two at least): a move's paths, the guest copy on both
/// ends and Raft all run on them, so a larger machine moves faster.
pub fn run<T, F: std::future::Future<Output = T>>(f: F) -> std::io::Result<T> {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    let system = actix_rt::System::with_tokio_rt(move || runtime);
    Ok(system.block_on(f))
}

/// One node of a local cluster.
pub struct LocalNode {
    pub id: NodeId,
    pub shared: Arc<NodeShared>,
    pub actor: Addr<NodeActor>,
    pub rpc: Arc<RpcNode>,
}

pub struct LocalCluster {
    pub nodes: Vec<LocalNode>,
    pub switch: Arc<VirtualSwitch>,
    pub directory: Arc<Directory>,
    pub dir: PathBuf,
}

fn ip(net: u8, node: u64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, net, 0, node as u8))
}

impl LocalCluster {
    /// Starts `n` nodes, forms the Raft cluster and records the model:
    /// two private migration networks and the nodes on them.
    pub async fn start(tag: &str, n: u64) -> Result<LocalCluster, LocalError> {
        Self::start_with(tag, n, |_, rpc| rpc).await
    }

    /// Like [`start`](Self::start), with the transport each node's cluster
    /// store uses chosen by `store_transport` (a test wraps the real one to
    /// partition a node from the store while its other traffic flows).
    pub async fn start_with(
        tag: &str,
        n: u64,
        store_transport: impl Fn(NodeId, Arc<RpcNode>) -> Arc<dyn ClusterTransport>,
    ) -> Result<LocalCluster, LocalError> {
        Self::start_full(tag, LocalOptions::new(n), store_transport).await
    }

    /// Like [`start`](Self::start), with the networks and the nodes' CPU
    /// features and NIC offload chosen by `options`.
    pub async fn start_options(
        tag: &str,
        options: LocalOptions,
    ) -> Result<LocalCluster, LocalError> {
        Self::start_full(tag, options, |_, rpc| rpc).await
    }

    async fn start_full(
        tag: &str,
        options: LocalOptions,
        store_transport: impl Fn(NodeId, Arc<RpcNode>) -> Arc<dyn ClusterTransport>,
    ) -> Result<LocalCluster, LocalError> {
        let n = options.nodes;
        let nets = options.networks.len() as u8;
        let dir = std::env::temp_dir().join(format!("ferry-local-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = ClusterCa::generate(tag).map_err(|e| err("cluster CA")(&e))?;
        let switch = VirtualSwitch::new();
        let directory = Arc::new(Directory::default());
        let mut nodes = Vec::new();
        for id in 1..=n {
            let creds = ca.issue(id).map_err(|e| err("node certificate")(&e))?;
            let listen = (1..=nets).map(|k| SocketAddr::new(ip(k, id), 0)).collect();
            let network = options
                .network_configs
                .get(id as usize - 1)
                .cloned()
                .flatten()
                .unwrap_or_else(NetworkConfig::loopback);
            let rpc = RpcNode::start(creds, listen, network)
                .await
                .map_err(|e| err("transport")(&e))?;
            let config = ClusterNodeConfig::new(
                id,
                dir.join(format!("node-{id}")),
                store_transport(id, rpc.clone()),
                rpc.local_addrs(),
            );
            let cluster = ClusterNode::start(config)
                .await
                .map_err(|e| err("cluster store")(&e))?;
            let shared = NodeShared::new(rpc.clone(), cluster, switch.clone(), directory.clone());
            // Each node's own disks apart, one shared volume folder for all:
            // all under the cluster's folder, removed with it.
            shared.set_disk_dirs(crate::disks::DiskDirs {
                local: dir.join(format!("disks-{id}")),
                shared: Some(dir.join("shared-volumes")),
            });
            // A fresh node: nothing from before to tell apart from a restart
            // the store places here.
            shared.begin_adopting();
            let actor = NodeActor::new(shared.clone()).start();
            nodes.push(LocalNode {
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
                    networks: options
                        .networks
                        .iter()
                        .map(|net| net.name.clone())
                        .zip(addrs.iter().copied())
                        .collect(),
                    rpc: addrs,
                },
            );
        }
        let first = nodes.first().ok_or("a cluster needs at least one node")?;
        first
            .shared
            .cluster
            .initialize()
            .await
            .map_err(|e| err("bootstrap")(&e))?;
        for node in &nodes[1..] {
            first
                .shared
                .cluster
                .add_voter(node.id, node.rpc.local_addrs())
                .await
                .map_err(|e| err("join")(&e))?;
        }
        let cluster = LocalCluster {
            nodes,
            switch,
            directory,
            dir,
        };
        for (k, net) in (1u8..).zip(&options.networks) {
            cluster
                .write(Command::DefineNetwork {
                    name: net.name.clone(),
                    subnet: Subnet {
                        addr: IpAddr::V4(Ipv4Addr::new(127, k, 0, 0)),
                        prefix: 16,
                    },
                    gateway: net
                        .public
                        .then_some(IpAddr::V4(Ipv4Addr::new(127, k, 0, 254))),
                })
                .await?;
        }
        for id in 1..=n {
            let i = id as usize - 1;
            cluster
                .write(Command::AddNode {
                    id,
                    name: format!("node-{id}"),
                    addresses: (1u8..)
                        .zip(&options.networks)
                        .map(|(k, net)| (net.name.clone(), ip(k, id)))
                        .collect(),
                    cpu_features: options
                        .cpu_features
                        .get(i)
                        .cloned()
                        .unwrap_or_else(ferry_vmm::cpu::host_features),
                    capacity: Capacity {
                        memory_bytes: 64 << 30,
                        max_vms: 32,
                    },
                    tcp_offload: options.tcp_offload.get(i).copied().unwrap_or(false),
                })
                .await?;
        }
        Ok(cluster)
    }

    /// Node `id` (1-based). Panics on an id the cluster was not started with.
    pub fn node(&self, id: NodeId) -> &LocalNode {
        &self.nodes[id as usize - 1]
    }

    /// Writes through any live node (followers forward to the leader).
    pub async fn write(&self, command: Command) -> Result<ferry_cluster::Response, LocalError> {
        let node = self
            .nodes
            .iter()
            .find(|n| !n.shared.is_dead())
            .ok_or("every node is dead")?;
        node.shared
            .cluster
            .write(command)
            .await
            .map_err(|e| e.to_string())
    }

    /// Defines a simulated VM and starts it on `node`.
    pub async fn start_vm(
        &self,
        name: &str,
        node: NodeId,
        memory: u64,
        workload: Workload,
        mac: u8,
    ) -> Result<u64, LocalError> {
        self.start_vm_config(name, node, vm_config(memory, workload, mac))
            .await
    }

    /// Defines a VM with `config` and starts it on `node`.
    pub async fn start_vm_config(
        &self,
        name: &str,
        node: NodeId,
        config: VmConfig,
    ) -> Result<u64, LocalError> {
        self.write(Command::CreateVm {
            name: name.into(),
            config,
            node,
        })
        .await?;
        self.node(node)
            .actor
            .send(StartVm(name.into()))
            .await
            .map_err(|e| err("node actor")(&e))?
    }

    pub async fn move_vm(
        &self,
        request: MoveRequest,
        from: NodeId,
    ) -> Result<MigrationReport, MigrationError> {
        self.node(from)
            .actor
            .send(MoveVm(request))
            .await
            .unwrap_or_else(|e| Err(MigrationError::Aborted(format!("node actor: {e}"))))
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

/// The config of a simulated VM as [`LocalCluster::start_vm`] defines it: two
/// vCPUs, memory prefilled from `mac`, its disk on the shared volume `csv-1`,
/// no TCP connections. Change what a test needs before starting it.
pub fn vm_config(memory: u64, workload: Workload, mac: u8) -> VmConfig {
    VmConfig {
        failover: Default::default(),
        memory_bytes: memory,
        vcpus: 2,
        mac: MacAddr([2, 0, 0, 0, 0, mac]),
        backend: Backend::Sim,
        workload: encode_program(&GuestProgram {
            workload,
            prefill_seed: Some(u64::from(mac)),
            tcp_connections: 0,
        }),
        storage: StorageSpec::Shared {
            volume: "csv-1".into(),
        },
    }
}

/// A network of a local cluster: network `k` (1-based) is 127.k.0.0/16 and
/// node `i` is 127.k.0.i on it.
#[derive(Debug, Clone)]
pub struct LocalNetwork {
    pub name: String,
    /// With a gateway (127.k.0.254): a public network, which live migration
    /// does not use unless a user allows it.
    pub public: bool,
}

/// What a local cluster is made of.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    pub nodes: u64,
    pub networks: Vec<LocalNetwork>,
    /// Node `i`'s CPU features at index `i - 1`; when missing, this
    /// processor's (`ferry_vmm::cpu::host_features`), as a daemon reports.
    pub cpu_features: Vec<BTreeSet<String>>,
    /// Whether node `i`'s NIC offloads TCP, at index `i - 1` (no when missing).
    pub tcp_offload: Vec<bool>,
    /// Node `i`'s transport settings at index `i - 1` (`NetworkConfig::loopback()`
    /// when missing or `None`): a test runs a node as a build of another wire
    /// version this way (`NetworkConfig::speak_versions`).
    pub network_configs: Vec<Option<NetworkConfig>>,
}

impl LocalOptions {
    /// `nodes` nodes on two private networks, `mig-1` and `mig-2`.
    pub fn new(nodes: u64) -> Self {
        LocalOptions {
            nodes,
            networks: ["mig-1", "mig-2"]
                .iter()
                .map(|name| LocalNetwork {
                    name: name.to_string(),
                    public: false,
                })
                .collect(),
            cpu_features: Vec::new(),
            tcp_offload: Vec::new(),
            network_configs: Vec::new(),
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
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
    /// Errors other than refusals (no route, for one).
    pub errors: Vec<String>,
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
                    Err(e) => {
                        log.errors.push(e.to_string());
                        std::thread::sleep(Duration::from_millis(1));
                    }
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
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}
