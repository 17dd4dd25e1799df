//! A cluster for chaos runs: Ferry nodes in this process over real QUIC and
//! Raft, with every link between two nodes going through a chaos proxy, and
//! nodes that can be killed and restarted from their data directories.
//!
//! Like `ferry_actors::local::LocalCluster`, but built for faults:
//! - **All traffic crosses proxies.** Node `a` reaches node `b` on network
//!   `k` through its own proxy `(a → b, k)` — page streams and probes (its
//!   directory says so), control calls (the directory's RPC addresses) and
//!   Raft (the store transport rewrites the peer's addresses). A link is one
//!   node's attachment to one network, so a fault on link `(n, k)` applies to
//!   every proxy with `n` at either end on `k`; a partition cuts all of a
//!   node's links.
//! - **Restart.** A killed node (`NodeShared::kill`: transport and store
//!   closed, every guest gone) comes back on the same addresses from its data
//!   directory, as a new incarnation with no guests.
//! - **History.** Every incarnation of every node reports to the run's
//!   [`Recording`], and shows it every guest it pauses or resumes.

use super::recording::Recording;
use actix::prelude::*;
use ferry_actors::actors::{NodeActor, StartVm};
use ferry_actors::node::{Directory, NodeShared, PeerAddrs};
use ferry_actors::switch::VirtualSwitch;
use ferry_chaos::checker::Outcome;
use ferry_chaos::proxy::{Faults, LinkProxy};
use ferry_cluster::model::{Capacity, MigrationOutcome, Subnet};
use ferry_cluster::network::{BoxFuture, CallError, ServiceHandler};
use ferry_cluster::{
    ClusterError, ClusterNode, ClusterNodeConfig, ClusterTransport, Command, NodeId, Response,
};
use ferry_transport::{ClusterCa, NetworkConfig, RpcNode};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Second octet of network `k`'s subnet (127.(60+k).0.0/16): apart from the
/// other tests' networks, so runs never collide.
const NET_BASE: u8 = 60;

pub fn network_name(k: u64) -> String {
    format!("mig-{k}")
}

fn node_ip(k: u64, node: NodeId) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, NET_BASE + k as u8, 0, node as u8))
}

fn proxy_ip(k: u64, from: NodeId, to: NodeId) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        NET_BASE + k as u8,
        1,
        (10 * from + to) as u8,
    ))
}

/// Where node `a` sends to node `b`, per network (in network order).
#[derive(Default)]
pub struct Routes {
    table: BTreeMap<(NodeId, NodeId), Vec<SocketAddr>>,
}

/// The store transport of one node: the real one, with every peer reached
/// through this node's proxies.
struct RoutedTransport {
    me: NodeId,
    inner: Arc<RpcNode>,
    routes: Arc<Routes>,
}

impl ClusterTransport for RoutedTransport {
    fn call<'a>(
        &'a self,
        peer: NodeId,
        _addrs: &'a [SocketAddr],
        service: &'static str,
        request: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<u8>, CallError>> {
        let addrs = self
            .routes
            .table
            .get(&(self.me, peer))
            .cloned()
            .unwrap_or_default();
        Box::pin(async move {
            ClusterTransport::call(self.inner.as_ref(), peer, &addrs, service, request, timeout)
                .await
        })
    }

    fn register(&self, service: &'static str, handler: Arc<dyn ServiceHandler>) {
        ClusterTransport::register(self.inner.as_ref(), service, handler)
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        ClusterTransport::shutdown(self.inner.as_ref())
    }
}

/// A link's shaping (delay, loss, rate).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Shape {
    pub delay: Duration,
    pub loss_pct: f64,
    pub rate: Option<u64>,
}

/// What is broken on the links: the proxies' faults follow from it.
#[derive(Debug, Default)]
pub struct LinkState {
    pub cut: BTreeSet<(NodeId, u64)>,
    pub shaped: BTreeMap<(NodeId, u64), Shape>,
    pub partitioned: BTreeSet<NodeId>,
}

impl LinkState {
    fn faults(&self, a: NodeId, b: NodeId, k: u64) -> Faults {
        let cut = [a, b]
            .iter()
            .any(|&n| self.cut.contains(&(n, k)) || self.partitioned.contains(&n));
        let mut f = Faults {
            cut,
            ..Faults::default()
        };
        for n in [a, b] {
            if let Some(s) = self.shaped.get(&(n, k)) {
                f.delay += s.delay;
                f.loss = f.loss.max(s.loss_pct / 100.0);
                f.rate_bytes_per_sec = match (f.rate_bytes_per_sec, s.rate) {
                    (Some(x), Some(y)) => Some(x.min(y)),
                    (x, y) => x.or(y),
                };
            }
        }
        f
    }

    /// Whether `node` can reach no other node at all.
    pub fn isolated(&self, node: NodeId, networks: &[u64]) -> bool {
        self.partitioned.contains(&node) || networks.iter().all(|k| self.cut.contains(&(node, *k)))
    }
}

/// One incarnation of a node.
#[derive(Clone)]
pub struct Live {
    pub shared: Arc<NodeShared>,
    pub actor: Addr<NodeActor>,
    pub incarnation: u64,
}

pub struct Slot {
    pub id: NodeId,
    /// The addresses its transport listens on: kept across restarts unless a
    /// dead incarnation still holds them (see [`ChaosCluster::restart`]).
    listen: Mutex<Vec<SocketAddr>>,
    pub directory: Arc<Directory>,
    pub live: Mutex<Option<Live>>,
    incarnations: Mutex<u64>,
}

pub struct ChaosCluster {
    ca: ClusterCa,
    pub dir: PathBuf,
    pub switch: Arc<VirtualSwitch>,
    pub slots: Vec<Slot>,
    pub networks: Vec<u64>,
    routes: Arc<Routes>,
    proxies: BTreeMap<(NodeId, NodeId, u64), LinkProxy>,
    pub links: Mutex<LinkState>,
    pub recording: Arc<Recording>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub type Error = String;

/// Longest a restart waits for a killed node's addresses to be free again
/// before it takes fresh ports.
const REBIND: Duration = Duration::from_secs(10);

impl Slot {
    pub fn listen(&self) -> Vec<SocketAddr> {
        lock(&self.listen).clone()
    }
}

impl ChaosCluster {
    /// Starts `n` nodes on `networks` networks, forms the Raft cluster and
    /// records the model (networks, nodes).
    pub async fn start(
        tag: &str,
        n: u64,
        networks: u64,
        seed: u64,
        recording: Arc<Recording>,
    ) -> Result<ChaosCluster, Error> {
        let dir =
            std::env::temp_dir().join(format!("ferry-chaos-{tag}-{}-{seed}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = ClusterCa::generate(tag).map_err(|e| e.to_string())?;
        let nets: Vec<u64> = (1..=networks).collect();
        let ids: Vec<NodeId> = (1..=n).collect();

        // Transports first: the proxies need their addresses.
        let mut rpcs = BTreeMap::new();
        for &id in &ids {
            let listen = nets
                .iter()
                .map(|&k| SocketAddr::new(node_ip(k, id), 0))
                .collect();
            let rpc = RpcNode::start(
                ca.issue(id).map_err(|e| e.to_string())?,
                listen,
                NetworkConfig::loopback(),
            )
            .await
            .map_err(|e| format!("transport of node {id}: {e}"))?;
            rpcs.insert(id, rpc);
        }
        let mut proxies = BTreeMap::new();
        let mut routes = Routes::default();
        for &a in &ids {
            for &b in ids.iter().filter(|&&b| b != a) {
                let mut addrs = Vec::new();
                for (i, &k) in nets.iter().enumerate() {
                    let forward = rpcs[&b].local_addrs()[i];
                    let proxy = LinkProxy::start(
                        SocketAddr::new(proxy_ip(k, a, b), 0),
                        forward,
                        seed ^ (a << 16) ^ (b << 8) ^ k,
                    )
                    .await
                    .map_err(|e| format!("proxy {a}->{b} on network {k}: {e}"))?;
                    addrs.push(proxy.local_addr());
                    proxies.insert((a, b, k), proxy);
                }
                routes.table.insert((a, b), addrs);
            }
        }
        let routes = Arc::new(routes);
        let mut cluster = ChaosCluster {
            ca,
            dir,
            switch: VirtualSwitch::new(),
            slots: Vec::new(),
            networks: nets.clone(),
            routes,
            proxies,
            links: Mutex::new(LinkState::default()),
            recording,
        };
        for &id in &ids {
            let directory = Arc::new(Directory::default());
            for &peer in ids.iter().filter(|&&p| p != id) {
                let via = cluster.routes.table[&(id, peer)].clone();
                directory.set(
                    peer,
                    PeerAddrs {
                        networks: nets
                            .iter()
                            .map(|&k| network_name(k))
                            .zip(via.iter().copied())
                            .collect(),
                        rpc: via,
                    },
                );
            }
            cluster.slots.push(Slot {
                id,
                listen: Mutex::new(rpcs[&id].local_addrs()),
                directory,
                live: Mutex::new(None),
                incarnations: Mutex::new(0),
            });
        }
        for &id in &ids {
            cluster.bring_up(id, rpcs[&id].clone()).await?;
        }

        let first = cluster.live(1).ok_or("node 1 is not up")?;
        first
            .shared
            .cluster
            .initialize()
            .await
            .map_err(|e| format!("bootstrap: {e}"))?;
        for slot in &cluster.slots[1..] {
            first
                .shared
                .cluster
                .add_voter(slot.id, slot.listen())
                .await
                .map_err(|e| format!("join of node {}: {e}", slot.id))?;
        }
        for &k in &nets {
            cluster
                .write(Command::DefineNetwork {
                    name: network_name(k),
                    subnet: Subnet {
                        addr: IpAddr::V4(Ipv4Addr::new(127, NET_BASE + k as u8, 0, 0)),
                        prefix: 16,
                    },
                    gateway: None,
                })
                .await?;
        }
        for &id in &ids {
            cluster
                .write(Command::AddNode {
                    id,
                    name: format!("node-{id}"),
                    addresses: nets
                        .iter()
                        .map(|&k| (network_name(k), node_ip(k, id)))
                        .collect(),
                    cpu_features: BTreeSet::new(),
                    capacity: Capacity {
                        memory_bytes: 8 << 30,
                        max_vms: 16,
                    },
                    tcp_offload: false,
                })
                .await?;
        }
        Ok(cluster)
    }

    /// Starts the store, node state and actor of `id` on `rpc` (a new
    /// incarnation) and makes it report to the recording.
    async fn bring_up(&self, id: NodeId, rpc: Arc<RpcNode>) -> Result<(), Error> {
        let slot = self.slot(id);
        let transport: Arc<dyn ClusterTransport> = Arc::new(RoutedTransport {
            me: id,
            inner: rpc.clone(),
            routes: self.routes.clone(),
        });
        let config = ClusterNodeConfig::new(
            id,
            self.dir.join(format!("node-{id}")),
            transport,
            slot.listen(),
        );
        let store = ClusterNode::start(config)
            .await
            .map_err(|e| format!("store of node {id}: {e}"))?;
        let shared = NodeShared::new(rpc, store, self.switch.clone(), slot.directory.clone());
        let incarnation = {
            let mut n = lock(&slot.incarnations);
            *n += 1;
            *n
        };
        shared.set_history(self.recording.recorder(id, incarnation));
        shared.set_guest_observer(self.recording.observer(id, incarnation));
        let actor = NodeActor::new(shared.clone()).start();
        *lock(&slot.live) = Some(Live {
            shared,
            actor,
            incarnation,
        });
        Ok(())
    }

    pub fn slot(&self, id: NodeId) -> &Slot {
        &self.slots[id as usize - 1]
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.slots.iter().map(|s| s.id).collect()
    }

    /// The live incarnation of `id`, if it is up.
    pub fn live(&self, id: NodeId) -> Option<Live> {
        lock(&self.slot(id).live).clone()
    }

    pub fn live_nodes(&self) -> Vec<(NodeId, Live)> {
        self.slots
            .iter()
            .filter_map(|s| lock(&s.live).clone().map(|l| (s.id, l)))
            .collect()
    }

    /// Live nodes that can reach the others (not partitioned, not fully cut).
    pub fn reachable_nodes(&self) -> Vec<(NodeId, Live)> {
        let links = lock(&self.links);
        self.live_nodes()
            .into_iter()
            .filter(|(id, _)| !links.isolated(*id, &self.networks))
            .collect()
    }

    /// Writes through the first reachable node that answers, trying each in
    /// turn until `within` has passed.
    pub async fn write_within(
        &self,
        command: Command,
        within: Duration,
    ) -> Result<Response, ClusterError> {
        let deadline = Instant::now() + within;
        let mut last = ClusterError::Unavailable("no live node".into());
        loop {
            for (_, live) in self.reachable_nodes() {
                match live
                    .shared
                    .cluster
                    .write_within(command.clone(), Duration::from_secs(3))
                    .await
                {
                    Ok(r) => return Ok(r),
                    Err(e @ ClusterError::Rejected(_)) => return Err(e),
                    Err(e) => last = e,
                }
                if Instant::now() > deadline {
                    return Err(last);
                }
            }
            if Instant::now() > deadline {
                return Err(last);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn write(&self, command: Command) -> Result<Response, Error> {
        self.write_within(command, Duration::from_secs(20))
            .await
            .map_err(|e| e.to_string())
    }

    /// The state as a reachable node's replica has it, including every write
    /// committed before the call.
    pub async fn fresh_state(
        &self,
        within: Duration,
    ) -> Option<Arc<ferry_cluster::model::ClusterState>> {
        let deadline = Instant::now() + within;
        loop {
            for (_, live) in self.reachable_nodes() {
                if let Ok(s) = live
                    .shared
                    .cluster
                    .read_linearizable_within(Duration::from_secs(2))
                    .await
                {
                    return Some(s);
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Re-applies the link state to every proxy.
    pub fn apply_links(&self) {
        let links = lock(&self.links);
        for (&(a, b, k), proxy) in &self.proxies {
            proxy.set_faults(links.faults(a, b, k));
        }
    }

    pub fn edit_links(&self, edit: impl FnOnce(&mut LinkState)) {
        edit(&mut lock(&self.links));
        self.apply_links();
    }

    /// Kills node `id` the way a crash would (see `NodeShared::kill`), then
    /// acts as the cluster's failure detector: marks it down in the store,
    /// records which VMs the store says must be restarted, and restarts them
    /// on other nodes.
    pub async fn kill(&self, id: NodeId) -> Result<(), Error> {
        let Some(live) = lock(&self.slot(id).live).take() else {
            return Ok(());
        };
        self.recording.node_died(id);
        live.shared.kill().await;
        match self
            .write_within(
                Command::MarkNodeDown {
                    node: id,
                    reason: "killed by the chaos schedule".into(),
                    at_ms: ferry_actors::node::now_ms(),
                },
                Duration::from_secs(30),
            )
            .await
        {
            Ok(_) | Err(ClusterError::Rejected(ferry_cluster::CommandError::NodeDown { .. })) => {}
            Err(e) => return Err(format!("marking node {id} down: {e}")),
        }
        // Every migration the dead node took part in has ended in the store
        // now: record how, for those whose source cannot say any more.
        if let Some(state) = self.fresh_state(Duration::from_secs(10)).await {
            self.resolve_dead_sources(&state);
        }
        self.restart_lost_vms(Duration::from_secs(20)).await;
        Ok(())
    }

    /// Records the store's outcome of every open migration whose source
    /// incarnation died before its job could report; returns what cannot be
    /// resolved (still active in the store, or gone from it).
    pub fn resolve_dead_sources(&self, state: &ferry_cluster::model::ClusterState) -> Vec<String> {
        let mut wrong = Vec::new();
        for (id, begun) in self.recording.open_migrations() {
            if self.recording.incarnation(begun.source) == Some(begun.incarnation) {
                continue;
            }
            match state.migrations.get(&id) {
                Some(m) if !m.is_active() => {
                    let (outcome, target) = match m.outcome {
                        MigrationOutcome::Completed => {
                            (Outcome::Completed, Some((m.target, m.epoch + 1)))
                        }
                        _ => (Outcome::Aborted, None),
                    };
                    self.recording
                        .store_outcome(id, outcome, target, m.ended_at_ms);
                }
                Some(_) => wrong.push(format!(
                    "migration {id} of {}: still active in the store after its source died",
                    begun.vm
                )),
                None => wrong.push(format!(
                    "migration {id} of {}: not in the store any more",
                    begun.vm
                )),
            }
        }
        wrong
    }

    /// Records every VM the store says needs a restart and starts it on a
    /// node that is up, within `within` (what fails stays for later).
    pub async fn restart_lost_vms(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        let mut started = 0;
        loop {
            let Some(state) = self.fresh_state(Duration::from_secs(5)).await else {
                return started;
            };
            let lost: Vec<String> = state
                .vms
                .values()
                .filter(|v| v.state == ferry_cluster::model::VmState::NeedsRestart)
                .map(|v| v.name.clone())
                .collect();
            if lost.is_empty() {
                return started;
            }
            for vm in &lost {
                self.recording.needs_restart(vm);
            }
            let up: Vec<NodeId> = state
                .nodes
                .values()
                .filter(|n| n.state == ferry_cluster::model::NodeState::Up)
                .map(|n| n.id)
                .collect();
            for (i, vm) in lost.iter().enumerate() {
                let candidates: Vec<(NodeId, Live)> = self
                    .reachable_nodes()
                    .into_iter()
                    .filter(|(id, _)| up.contains(id))
                    .collect();
                if candidates.is_empty() {
                    break;
                }
                let (_, live) = &candidates[i % candidates.len()];
                if let Ok(Ok(Ok(_))) = tokio::time::timeout(
                    Duration::from_secs(10),
                    live.actor.send(StartVm(vm.clone())),
                )
                .await
                {
                    started += 1;
                }
            }
            if Instant::now() > deadline {
                return started;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Points every proxy toward node `id` at `listen`, its new addresses (one
    /// per network, in network order).
    fn retarget(&self, id: NodeId, listen: Vec<SocketAddr>) {
        for ((_, to, network), proxy) in &self.proxies {
            if *to != id {
                continue;
            }
            if let Some(addr) = self
                .networks
                .iter()
                .position(|k| k == network)
                .and_then(|i| listen.get(i))
            {
                proxy.retarget(*addr);
            }
        }
        *lock(&self.slot(id).listen) = listen;
    }

    /// Brings node `id` back from its data directory on the same addresses,
    /// with no guests, and marks it up in the store.
    pub async fn restart(&self, id: NodeId) -> Result<(), Error> {
        if self.live(id).is_some() {
            return Ok(());
        }
        let slot = self.slot(id);
        // `RpcNode::shutdown` says the addresses are free when it returns, but
        // in one process a task the dead incarnation left behind (a job
        // still inside a 10 s control call, holding a QUIC connection) can
        // keep the UDP socket bound for a while: wait for it.
        let started = Instant::now();
        let deadline = started + REBIND;
        let listen = slot.listen();
        let credentials = || self.ca.issue(id).map_err(|e| e.to_string());
        let rpc = loop {
            match RpcNode::start(credentials()?, listen.clone(), NetworkConfig::loopback()).await {
                Ok(rpc) => break rpc,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => {
                    // Still held after REBIND (a dead incarnation's task that
                    // never ends keeps a connection, and with it the socket):
                    // a real node would come back on its port once its process
                    // is gone, so this is the harness's artefact, not a fault.
                    // Its peers reach it through the proxies only, which can
                    // follow it to fresh ports.
                    self.recording.note_harness(format!(
                        "node {id}: its addresses were still busy {REBIND:?} after it was killed \
                         ({e}); restarted on fresh ports"
                    ));
                    let fresh: Vec<SocketAddr> =
                        listen.iter().map(|a| SocketAddr::new(a.ip(), 0)).collect();
                    let rpc = RpcNode::start(credentials()?, fresh, NetworkConfig::loopback())
                        .await
                        .map_err(|e| format!("restarting the transport of node {id}: {e}"))?;
                    self.retarget(id, rpc.local_addrs());
                    break rpc;
                }
            }
        };
        if started.elapsed() > Duration::from_millis(100) {
            self.recording.note_harness(format!(
                "node {id}: its addresses were busy for {:?} after it was killed",
                started.elapsed()
            ));
        }
        self.recording.node_restarted(id);
        self.bring_up(id, rpc).await?;
        match self
            .write_within(Command::MarkNodeUp { node: id }, Duration::from_secs(30))
            .await
        {
            Ok(_) | Err(ClusterError::Rejected(_)) => Ok(()),
            Err(e) => Err(format!("marking node {id} up: {e}")),
        }
    }

    /// The Raft leader as the live nodes see it, waiting up to `within`.
    pub async fn leader(&self, within: Duration) -> Option<NodeId> {
        let deadline = Instant::now() + within;
        loop {
            let live = self.live_nodes();
            let seen: Vec<NodeId> = live
                .iter()
                .filter_map(|(_, l)| l.shared.cluster.leader())
                .filter(|l| live.iter().any(|(id, _)| id == l))
                .collect();
            if let Some(first) = seen.first() {
                if seen.iter().all(|l| l == first) {
                    return Some(*first);
                }
            }
            if Instant::now() > deadline {
                return seen.first().copied();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Which live nodes run `vm` right now (unpaused owner role), with epochs.
    pub fn running(&self, vm: &str) -> Vec<(NodeId, u64)> {
        self.live_nodes()
            .into_iter()
            .filter_map(|(id, l)| l.shared.running_epoch(vm).map(|e| (id, e)))
            .collect()
    }

    /// Kills every node (no failure detection, no restarts): the end of a run.
    pub async fn shutdown(&self) {
        for slot in &self.slots {
            let live = lock(&slot.live).take();
            if let Some(live) = live {
                live.shared.kill().await;
            }
        }
    }
}

impl Drop for ChaosCluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
