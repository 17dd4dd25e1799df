//! [`Node`]: one Ferry node in this process, and every operation a user or
//! a control plane can ask of it. The HTTP API is a thin layer over these
//! methods, and a larger control plane can call them directly.
//!
//! A node is assembled from the parts below it, the way
//! `ferry_actors::local::LocalCluster` assembles its nodes: the transport
//! (`RpcNode`, one QUIC endpoint per network), the cluster store
//! (`ClusterNode`), the node's migration state (`NodeShared`) and its actor
//! (`NodeActor`). On top, this module adds what a long-running daemon needs:
//! a locked data directory, forming or joining the cluster, an address book
//! kept in step with the store's network roles, progress relayed between
//! nodes, forwarding of operations to the node that must carry them out, and
//! a clean shutdown.
//!
//! ```no_run
//! use ferry::{Node, NodeConfig, requests::CreateVm};
//!
//! fn main() -> anyhow::Result<()> {
//!     let config = NodeConfig::load("node-1/node.toml".as_ref())?;
//!     // Actors need an actix System; the page stream wants worker threads.
//!     ferry::actors::local::run(async move {
//!         let node = Node::start(config).await?;
//!         node.wait_ready(std::time::Duration::from_secs(30)).await?;
//!         node.create_vm(CreateVm::new("web-1")).await?;
//!         let started = node.move_vm("web-1", Default::default()).await?;
//!         let done = node
//!             .wait_migration(started.migration, std::time::Duration::from_secs(60))
//!             .await?;
//!         println!("{}: {}", done.vm, done.outcome);
//!         node.shutdown().await;
//!         Ok(())
//!     })?
//! }
//! ```

use crate::config::{NodeConfig, PeerEntry};
use crate::error::ApiError;
use crate::events::{Event, EventHub};
use crate::peer::{self, Envelope, JoinInfo, PeerReply, PeerRequest, PeerResult, Relayed};
use crate::requests::{self, check_name};
use crate::views::{self, *};
use actix::prelude::*;
use anyhow::{bail, Context as _};
use ferry_actors::actors::{CancelMove, MoveVm, NodeActor, ResumeNode, StartVm};
use ferry_actors::migration::source::{MigrationError, MoveRequest};
use ferry_actors::node::{encode_program, now_ms, Directory, GuestProgram, NodeShared, PeerAddrs};
use ferry_actors::policy::convergence::ConvergenceConfig;
use ferry_actors::policy::estimate::{estimate, Factors};
use ferry_actors::policy::placement::{self, Placement};
use ferry_actors::policy::tips::TipConfig;
use ferry_actors::switch::VirtualSwitch;
use ferry_actors::triggers::drain::FailbackReport;
use ferry_actors::triggers::tips::Tips;
use ferry_cluster::model::{
    Backend, Capacity, ClusterState, MacAddr, MigrationTrigger, NodeState, StorageSpec, Subnet,
    TipState, VmConfig, VmState,
};
use ferry_cluster::{ClusterError, ClusterNode, ClusterNodeConfig, Command, CommandError, NodeId};
use ferry_transport::{NetworkConfig, NodeCredentials, RpcHandler, RpcNode};
use ferry_vmm::{Pattern, Workload};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Bandwidth assumed for an estimate before this node has measured any.
const ASSUMED_BANDWIDTH: f64 = 500e6;
/// Deadline of a forwarded operation (a move answers once it has begun).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(20);

/// An exclusive lock on a data directory, held while the node runs.
struct DataDirLock {
    _file: std::fs::File,
}

fn lock_data_dir(dir: &Path) -> anyhow::Result<DataDirLock> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("ferry.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: `flock` only reads the descriptor, which `file` owns and keeps
    // open for as long as the returned lock lives.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        bail!(
            "data directory {} is in use by another ferry daemon (pid {})",
            dir.display(),
            holder.trim()
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    Ok(DataDirLock { _file: file })
}

#[derive(Default)]
pub(crate) struct ApiCounters {
    pub requests: AtomicU64,
    pub errors_4xx: AtomicU64,
    pub errors_5xx: AtomicU64,
}

struct Inner {
    config: NodeConfig,
    shared: Arc<NodeShared>,
    actor: Addr<NodeActor>,
    hub: Arc<EventHub>,
    runtime: tokio::runtime::Handle,
    peers: BTreeMap<NodeId, PeerEntry>,
    relay: tokio::sync::mpsc::Sender<Relayed>,
    tips: Mutex<Option<Arc<Tips>>>,
    stopping: AtomicBool,
    lock: Mutex<Option<DataDirLock>>,
    api: ApiCounters,
}

/// One Ferry node running in this process. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn node_ref(state: &ClusterState, r: &str) -> Result<NodeId, ApiError> {
    if let Some(n) = state.nodes.values().find(|n| n.name == r) {
        return Ok(n.id);
    }
    match r.parse::<NodeId>() {
        Ok(id) if state.nodes.contains_key(&id) => Ok(id),
        _ => Err(ApiError::not_found(
            "unknown_node",
            format!("unknown node {r:?}"),
        )),
    }
}

impl Node {
    /// Starts the node described by `config`: locks its data directory, opens
    /// its transport and cluster store, and forms the cluster (a bootstrap
    /// node on its first start) or asks a peer to let it join. Returns once
    /// the node runs; [`wait_ready`](Self::wait_ready) waits for it to be a
    /// member. Must run inside an actix System on a multi-threaded tokio
    /// runtime (see [`ferry_actors::local::run`]).
    pub async fn start(config: NodeConfig) -> anyhow::Result<Node> {
        config.check()?;
        let dir_lock = lock_data_dir(&config.data_dir)?;
        let pem = std::fs::read_to_string(&config.credentials)
            .with_context(|| format!("reading credentials {}", config.credentials.display()))?;
        let creds = NodeCredentials::from_pem(&pem)?;
        if creds.node_id != config.node_id {
            bail!(
                "credentials are for node {}, the configuration is for node {}",
                creds.node_id,
                config.node_id
            );
        }
        let loopback = config.listen_addrs().iter().all(|a| a.ip().is_loopback());
        let net = if loopback {
            NetworkConfig::loopback()
        } else {
            NetworkConfig::default()
        };
        let rpc = RpcNode::start(creds, config.listen_addrs(), net)
            .await
            .context("starting the transport")?;
        let cluster = ClusterNode::start(ClusterNodeConfig::new(
            config.node_id,
            config.data_dir.join("store"),
            rpc.clone(),
            rpc.local_addrs(),
        ))
        .await
        .context("opening the cluster store")?;
        let shared = NodeShared::new(
            rpc.clone(),
            cluster,
            VirtualSwitch::new(),
            Arc::new(Directory::default()),
        );
        let actor = NodeActor::new(shared.clone()).start();
        let (relay, relay_rx) = tokio::sync::mpsc::channel(256);
        let node = Node {
            inner: Arc::new(Inner {
                peers: config.peers.iter().map(|p| (p.id, p.clone())).collect(),
                config,
                shared,
                actor,
                hub: Arc::new(EventHub::default()),
                runtime: tokio::runtime::Handle::current(),
                relay,
                tips: Mutex::new(None),
                stopping: AtomicBool::new(false),
                lock: Mutex::new(Some(dir_lock)),
                api: ApiCounters::default(),
            }),
        };
        node.refresh_directory();
        rpc.register(
            peer::SERVICE,
            Arc::new(ControlService(Arc::downgrade(&node.inner))),
        );
        node.spawn_progress_forwarder();
        node.spawn_relay(relay_rx);
        node.spawn_store_watcher();
        *lock(&node.inner.tips) =
            Some(Tips::start(node.inner.shared.clone(), TipConfig::default()));
        let n = node.clone();
        tokio::spawn(async move { n.form_or_join().await });
        tracing::info!(
            node = node.id(),
            name = %node.inner.config.name,
            addrs = ?rpc.local_addrs(),
            "node started"
        );
        Ok(node)
    }

    pub fn id(&self) -> NodeId {
        self.inner.config.node_id
    }

    pub fn config(&self) -> &NodeConfig {
        &self.inner.config
    }

    /// The node's migration state (guests, transport, cluster store).
    pub fn shared(&self) -> &Arc<NodeShared> {
        &self.inner.shared
    }

    pub fn cluster(&self) -> &ClusterNode {
        &self.inner.shared.cluster
    }

    /// Progress, reports and store changes, as the event stream carries them.
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.inner.hub.subscribe()
    }

    pub(crate) fn hub(&self) -> &EventHub {
        &self.inner.hub
    }

    pub(crate) fn api_counters(&self) -> &ApiCounters {
        &self.inner.api
    }

    /// The tokio runtime the node's tasks run on. The HTTP server's workers
    /// run their own; operations are sent here (see [`Self::run_here`]).
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.inner.runtime
    }

    /// Runs `f` on the node's runtime and waits for it from any runtime.
    pub async fn run_here<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, ApiError>> + Send + 'static,
    ) -> Result<T, ApiError> {
        self.inner
            .runtime
            .spawn(f)
            .await
            .unwrap_or_else(|e| Err(ApiError::internal(format!("operation failed: {e}"))))
    }

    /// The state as this node's replica has applied it.
    pub fn state(&self) -> Arc<ClusterState> {
        self.cluster().read()
    }

    /// The state including every write committed before the call.
    async fn fresh(&self) -> Result<Arc<ClusterState>, ApiError> {
        Ok(self
            .cluster()
            .read_linearizable_within(Duration::from_secs(3))
            .await?)
    }

    async fn write(&self, command: Command) -> Result<ferry_cluster::Response, ApiError> {
        if self.inner.stopping.load(Ordering::Acquire) {
            return Err(ApiError::unavailable(
                "shutting_down",
                "this node is shutting down",
            ));
        }
        Ok(self.cluster().write(command).await?)
    }

    /// Waits until this node is a voting member that the cluster model lists.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.is_member() && self.state().nodes.contains_key(&self.id()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("node {} did not join the cluster in {timeout:?}", self.id());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn is_member(&self) -> bool {
        self.cluster()
            .metrics()
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == self.id())
    }

    // ---- forming the cluster ----

    fn join_info(&self) -> anyhow::Result<JoinInfo> {
        let c = &self.inner.config;
        Ok(JoinInfo {
            id: c.node_id,
            name: c.name.clone(),
            rpc: self.inner.shared.rpc.local_addrs(),
            addresses: c
                .networks
                .iter()
                .map(|n| (n.name.clone(), n.address.ip()))
                .collect(),
            cpu_features: c.cpu_features.iter().cloned().collect(),
            capacity: Capacity {
                memory_bytes: c.capacity.memory_mib.saturating_mul(1 << 20),
                max_vms: c.capacity.max_vms,
            },
            tcp_offload: c.tcp_offload,
        })
    }

    async fn form_or_join(&self) {
        let result = if self.inner.config.bootstrap {
            self.bootstrap().await
        } else {
            self.join().await
        };
        match result {
            Ok(()) => {
                tracing::info!(node = self.id(), "member of the cluster");
                self.reconcile().await;
            }
            Err(e) => {
                tracing::error!(node = self.id(), error = %e, "could not form or join the cluster")
            }
        }
    }

    /// First node: initialize Raft (a no-op when the store already belongs to
    /// a cluster), then record the networks and this node if missing.
    async fn bootstrap(&self) -> anyhow::Result<()> {
        self.cluster().initialize().await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.bootstrap_model().await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline && !self.stopping() => {
                    tracing::debug!(error = %e, "bootstrap: retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn bootstrap_model(&self) -> anyhow::Result<()> {
        let state = self.cluster().read_linearizable().await?;
        for n in &self.inner.config.networks {
            if !state.networks.contains_key(&n.name) {
                let subnet: Subnet = n.subnet.parse()?;
                ignore_exists(
                    self.cluster()
                        .write(Command::DefineNetwork {
                            name: n.name.clone(),
                            subnet,
                            gateway: n.gateway,
                        })
                        .await,
                )?;
            }
        }
        if !state.nodes.contains_key(&self.id()) {
            add_node(self.cluster(), self.join_info()?).await?;
        }
        Ok(())
    }

    /// Other nodes: ask the peers, in turn, to add this node, until it is a
    /// voter and recorded in the model.
    async fn join(&self) -> anyhow::Result<()> {
        let info = self.join_info()?;
        let mut peers: Vec<&PeerEntry> = self.inner.peers.values().collect();
        peers.sort_by_key(|p| p.id);
        let mut last = String::from("no peer configured");
        loop {
            if self.stopping() {
                bail!("stopped before joining: {last}");
            }
            if self.is_member() && self.state().nodes.contains_key(&self.id()) {
                return Ok(());
            }
            for p in &peers {
                match self
                    .call_peer(p.id, PeerRequest::Join(info.clone()), FORWARD_TIMEOUT)
                    .await
                {
                    Ok(_) => break,
                    Err(e) => last = format!("{}: {}", p.name, e.message),
                }
            }
            tracing::debug!(node = self.id(), %last, "joining");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// After a restart nothing runs here, whatever the store last said: moves
    /// this node was the source of are aborted, and VMs it ran are recorded
    /// as stopped, so the store tells the truth again.
    async fn reconcile(&self) {
        let Ok(state) = self.fresh().await else {
            return;
        };
        for m in state.active_migrations() {
            if m.source == self.id() {
                let _ = self
                    .cluster()
                    .write(Command::AbortMigration {
                        migration: m.id,
                        reason: "the source node restarted".into(),
                        at_ms: now_ms(),
                    })
                    .await;
            }
        }
        for vm in state.vms_on(self.id()) {
            if matches!(vm.state, VmState::Running | VmState::Migrating)
                && !self.inner.shared.holds(&vm.name)
            {
                tracing::warn!(vm = %vm.name, "VM was running here before a restart; recording it stopped");
                let _ = self
                    .cluster()
                    .write(Command::StopVm {
                        vm: vm.name.clone(),
                    })
                    .await;
            }
        }
    }

    // ---- background tasks ----

    fn spawn_progress_forwarder(&self) {
        let mut rx = self.inner.shared.events.subscribe();
        let node = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let p = match rx.recv().await {
                    Ok(p) => p,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let Some(inner) = node.upgrade() else { return };
                let view = ProgressView::from_progress(inner.config.node_id, &p, now_ms());
                inner.hub.publish(Event::Progress(view.clone()));
                let _ = inner.relay.try_send(Relayed::Progress(view));
            }
        });
    }

    fn spawn_relay(&self, mut rx: tokio::sync::mpsc::Receiver<Relayed>) {
        let node = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let Some(inner) = node.upgrade() else { return };
                let bytes = ferry_transport::encode(&Envelope {
                    version: peer::VERSION,
                    request: PeerRequest::Relay(event),
                });
                for p in inner.peers.values() {
                    let addrs: Vec<SocketAddr> = p.addresses.values().copied().collect();
                    let send = inner
                        .shared
                        .rpc
                        .send(p.id, &addrs, peer::SERVICE, bytes.clone());
                    let _ = tokio::time::timeout(Duration::from_millis(300), send).await;
                }
            }
        });
    }

    fn spawn_store_watcher(&self) {
        let mut rx = self.cluster().subscribe();
        let node = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let applied = match rx.recv().await {
                    Ok(a) => Some(a),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => None,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let Some(inner) = node.upgrade() else { return };
                let node = Node { inner };
                if let Some(applied) = applied {
                    let event = match applied.change {
                        ferry_cluster::Change::Command { command, result } => Event::Change {
                            command: command.name().into(),
                            ok: result.is_ok(),
                            error: result.err().map(|e| e.to_string()),
                        },
                        ferry_cluster::Change::Membership { .. } => Event::Change {
                            command: "Membership".into(),
                            ok: true,
                            error: None,
                        },
                        ferry_cluster::Change::Snapshot => Event::Change {
                            command: "Snapshot".into(),
                            ok: true,
                            error: None,
                        },
                    };
                    node.inner.hub.publish(event);
                }
            }
        });
    }

    /// Points the address book at the peers: their transport sockets for
    /// control calls, and the socket on each network for the page stream
    /// (which networks a migration uses, in which order, the store decides).
    fn refresh_directory(&self) {
        for p in self.inner.peers.values() {
            let rpc: Vec<SocketAddr> = self
                .inner
                .config
                .networks
                .iter()
                .filter_map(|n| p.addresses.get(&n.name).copied())
                .collect();
            self.inner.shared.directory.set(
                p.id,
                PeerAddrs {
                    rpc,
                    networks: p.addresses.clone(),
                },
            );
        }
    }

    fn stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::Acquire)
    }

    // ---- forwarding ----

    async fn call_peer(
        &self,
        peer: NodeId,
        request: PeerRequest,
        timeout: Duration,
    ) -> Result<PeerReply, ApiError> {
        let addrs = self
            .inner
            .shared
            .directory
            .get(peer)
            .map(|a| a.rpc)
            .unwrap_or_default();
        if addrs.is_empty() {
            return Err(ApiError::unavailable(
                "node_unreachable",
                format!("node {peer} is not in this node's configuration"),
            ));
        }
        let bytes = ferry_transport::encode(&Envelope {
            version: peer::VERSION,
            request,
        });
        let reply = self
            .inner
            .shared
            .rpc
            .call(peer, &addrs, peer::SERVICE, bytes, timeout)
            .await
            .map_err(|e| ApiError::unavailable("node_unreachable", format!("node {peer}: {e}")))?;
        ferry_transport::decode::<PeerResult>(&reply)
            .map_err(|e| ApiError::internal(format!("malformed reply from node {peer}: {e}")))?
    }

    /// Carries out `request` here if `node` is this node, else on `node`.
    async fn on_node(&self, node: NodeId, request: PeerRequest) -> Result<PeerReply, ApiError> {
        if node == self.id() {
            self.serve(self.id(), request).await
        } else {
            self.call_peer(node, request, FORWARD_TIMEOUT).await
        }
    }

    /// The operations peers (and this node) ask of this node.
    async fn serve(&self, from: NodeId, request: PeerRequest) -> PeerResult {
        match request {
            PeerRequest::Join(info) => {
                if info.id != from {
                    return Err(ApiError::new(
                        403,
                        "forbidden",
                        format!("node {from} asked to join as node {}", info.id),
                    ));
                }
                self.cluster().add_voter(info.id, info.rpc.clone()).await?;
                add_node(self.cluster(), info)
                    .await
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                Ok(PeerReply::Joined)
            }
            PeerRequest::StartVm { vm } => {
                let epoch = self
                    .inner
                    .actor
                    .send(StartVm(vm))
                    .await
                    .map_err(|e| ApiError::internal(format!("node actor: {e}")))?
                    .map_err(|e| ApiError::conflict("start_failed", e))?;
                Ok(PeerReply::Started { epoch })
            }
            PeerRequest::StopVm { vm } => {
                self.write(Command::StopVm { vm: vm.clone() }).await?;
                self.inner.shared.release_vm(&vm);
                Ok(PeerReply::Stopped)
            }
            PeerRequest::Move {
                vm,
                target,
                trigger,
                verify,
            } => {
                let migration = self.begin_move_here(&vm, target, trigger, verify).await?;
                Ok(PeerReply::MoveBegun { migration })
            }
            PeerRequest::Cancel { vm } => {
                let was = self
                    .inner
                    .actor
                    .send(CancelMove(vm.clone()))
                    .await
                    .map_err(|e| ApiError::internal(format!("node actor: {e}")))?;
                if was {
                    Ok(PeerReply::Cancelled)
                } else {
                    Err(ApiError::conflict(
                        "not_migrating",
                        format!("no move of VM {vm:?} is under way on node {}", self.id()),
                    ))
                }
            }
            PeerRequest::Resume { failback } => {
                let report: FailbackReport = self
                    .inner
                    .actor
                    .send(ResumeNode {
                        failback,
                        verify: false,
                    })
                    .await
                    .map_err(|e| ApiError::internal(format!("node actor: {e}")))?
                    .map_err(|e| ApiError::conflict("resume_failed", e))?;
                Ok(PeerReply::Resumed(FailbackView::from_report(&report)))
            }
            PeerRequest::Relay(event) => {
                self.inner.hub.publish(match event {
                    Relayed::Progress(p) => Event::Progress(p),
                    Relayed::Report(r) => Event::Report(r),
                });
                Ok(PeerReply::Relayed)
            }
        }
    }

    /// Starts the source side of a move of `vm`, which this node runs, and
    /// answers once the store holds the migration (or the job refused).
    async fn begin_move_here(
        &self,
        vm: &str,
        target: NodeId,
        trigger: MigrationTrigger,
        verify: bool,
    ) -> Result<u64, ApiError> {
        let state = self.state();
        let first_new = state.next_migration_id;
        let mut request = MoveRequest::new(vm, target);
        request.trigger = trigger;
        request.verify = verify;
        request.policy = ConvergenceConfig {
            downtime_limit: Duration::from_millis(u64::from(state.settings.downtime_limit_ms)),
            ..ConvergenceConfig::default()
        };
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let inner = self.inner.clone();
        self.inner.runtime.spawn(async move {
            let result = inner
                .actor
                .send(MoveVm(request))
                .await
                .unwrap_or_else(|e| Err(MigrationError::Aborted(format!("node actor: {e}"))));
            if let Ok(report) = &result {
                let view = ReportView::from_report(report);
                inner.hub.publish(Event::Report(view.clone()));
                let _ = inner.relay.try_send(Relayed::Report(view));
            }
            let _ = tx.send(result);
        });
        let me = self.id();
        let begun = |state: &ClusterState| {
            state
                .migrations
                .range(first_new..)
                .find(|(_, m)| m.vm == vm && m.source == me)
                .map(|(id, _)| *id)
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(id) = begun(&self.state()) {
                return Ok(id);
            }
            match tokio::time::timeout(Duration::from_millis(5), &mut rx).await {
                Ok(Ok(Ok(report))) => return Ok(report.migration),
                Ok(Ok(Err(MigrationError::Refused(why)))) => {
                    return Err(ApiError::conflict("migration_refused", why))
                }
                Ok(Ok(Err(MigrationError::Rejected(e)))) => return Err(e.into()),
                Ok(Ok(Err(e))) => {
                    return begun(&self.state())
                        .ok_or_else(|| ApiError::conflict("migration_refused", e.to_string()))
                }
                Ok(Err(_)) => return Err(ApiError::internal("the move task vanished")),
                Err(_) if Instant::now() > deadline => {
                    return Err(ApiError::unavailable(
                        "cluster_unavailable",
                        "the migration was not recorded in time",
                    ))
                }
                Err(_) => {}
            }
        }
    }

    // ---- reads ----

    pub fn status(&self) -> StatusView {
        let state = self.state();
        let metrics = self.cluster().metrics();
        StatusView {
            node: self.id(),
            name: self.inner.config.name.clone(),
            leader: metrics.current_leader,
            term: metrics.current_term,
            last_applied: metrics.last_applied.map(|l| l.index),
            voters: metrics.membership_config.membership().voter_ids().collect(),
            nodes: state.nodes.len(),
            nodes_up: state
                .nodes
                .values()
                .filter(|n| n.state == NodeState::Up)
                .count(),
            vms: state.vms.len(),
            vms_running: state
                .vms
                .values()
                .filter(|v| matches!(v.state, VmState::Running | VmState::Migrating))
                .count(),
            active_migrations: state.active_migrations().count(),
            pending_tips: state
                .tips
                .values()
                .filter(|t| t.state == TipState::Pending)
                .count(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    pub fn nodes(&self) -> Vec<NodeView> {
        views::nodes(&self.state(), self.cluster().leader())
    }

    pub fn node(&self, r: &str) -> Result<NodeView, ApiError> {
        let state = self.state();
        let id = node_ref(&state, r)?;
        views::nodes(&state, self.cluster().leader())
            .into_iter()
            .find(|n| n.id == id)
            .ok_or_else(|| ApiError::not_found("unknown_node", format!("unknown node {r:?}")))
    }

    pub fn vms(&self) -> Vec<VmView> {
        views::vms(&self.state())
    }

    pub fn vm(&self, name: &str) -> Result<VmView, ApiError> {
        let state = self.state();
        let v = state
            .vms
            .get(name)
            .ok_or_else(|| ApiError::unknown_vm(name))?;
        Ok(views::vm(&state, v))
    }

    /// The VM as of every write committed so far (after an operation another
    /// node carried out).
    async fn vm_fresh(&self, name: &str) -> Result<VmView, ApiError> {
        let state = self.fresh().await?;
        let v = state
            .vms
            .get(name)
            .ok_or_else(|| ApiError::unknown_vm(name))?;
        Ok(views::vm(&state, v))
    }

    pub fn networks(&self) -> Vec<NetworkView> {
        views::networks(&self.state())
    }

    pub fn migrations(&self) -> Vec<MigrationView> {
        let state = self.state();
        state
            .migrations
            .values()
            .rev()
            .map(|m| {
                let (rounds, report) = self.inner.hub.trace(m.id);
                views::migration(m, rounds, report)
            })
            .collect()
    }

    pub fn migration(&self, id: u64) -> Result<MigrationView, ApiError> {
        let state = self.state();
        let m = state.migrations.get(&id).ok_or_else(|| {
            ApiError::not_found("unknown_migration", format!("unknown migration {id}"))
        })?;
        let (rounds, report) = self.inner.hub.trace(id);
        Ok(views::migration(m, rounds, report))
    }

    pub fn tips(&self) -> Vec<TipView> {
        views::tips(&self.state())
    }

    pub fn settings(&self) -> SettingsView {
        views::settings(&self.state().settings)
    }

    /// The pre-move estimate for `vm`, from its memory size, its workload's
    /// dirty rate and the bandwidth this node last measured (or an assumed
    /// 500 MB/s before any move).
    pub fn estimate(&self, vm: &str) -> Result<EstimateView, ApiError> {
        let state = self.state();
        let v = state.vms.get(vm).ok_or_else(|| ApiError::unknown_vm(vm))?;
        let dirty_rate = ferry_actors::node::spec_of(&v.config)
            .ok()
            .and_then(|s| s.workload.dirty_pages_per_sec)
            .unwrap_or(0) as f64;
        let (bandwidth, source) = match self.inner.hub.last_bandwidth() {
            Some(b) => (b, "measured"),
            None => (ASSUMED_BANDWIDTH, "assumed"),
        };
        let config = ConvergenceConfig {
            downtime_limit: Duration::from_millis(u64::from(state.settings.downtime_limit_ms)),
            ..ConvergenceConfig::default()
        };
        let e = estimate(
            &Factors {
                memory_bytes: v.config.memory_bytes,
                nonzero_pages: None,
                dirty_rate,
                bandwidth,
            },
            &config,
        )
        .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(EstimateView {
            total_ms: e.total.as_secs_f64() * 1e3,
            downtime_ms: e.downtime.as_secs_f64() * 1e3,
            rounds: e.rounds,
            converges: e.converges,
            needs_throttle: e.needs_throttle,
            memory_bytes: v.config.memory_bytes,
            dirty_rate,
            bandwidth,
            bandwidth_source: source.into(),
            summary: e.to_string(),
        })
    }

    // ---- writes ----

    /// Defines a simulated VM on a node and, unless `start` is false, starts it.
    pub async fn create_vm(&self, req: requests::CreateVm) -> Result<VmView, ApiError> {
        check_name("VM", &req.name)?;
        if !(8..=64 * 1024).contains(&req.memory_mib) {
            return Err(ApiError::bad_request(
                "invalid_value",
                "memory_mib must be between 8 and 65536",
            ));
        }
        if !(1..=64).contains(&req.vcpus) {
            return Err(ApiError::bad_request(
                "invalid_value",
                "vcpus must be between 1 and 64",
            ));
        }
        if req.dirty_pages_per_sec > 10_000_000 {
            return Err(ApiError::bad_request(
                "invalid_value",
                "dirty_pages_per_sec must be at most 10000000",
            ));
        }
        let pattern = match req.pattern.as_deref() {
            None | Some("hot_set") => Pattern::HotSet {
                write_percent: 80,
                page_percent: 10,
            },
            Some("uniform") => Pattern::Uniform,
            Some("sequential") => Pattern::Sequential,
            Some(other) => {
                return Err(ApiError::bad_request(
                    "invalid_value",
                    format!("pattern {other:?} is not uniform, hot_set or sequential"),
                ))
            }
        };
        let memory_bytes = req.memory_mib << 20;
        let storage = match req.storage.as_deref() {
            None | Some("shared") => StorageSpec::Shared {
                volume: "csv-1".into(),
            },
            Some("local") => StorageSpec::Local {
                size_bytes: memory_bytes,
            },
            Some(other) => {
                return Err(ApiError::bad_request(
                    "invalid_value",
                    format!("storage {other:?} is not shared or local"),
                ))
            }
        };
        let backend = match req.backend.as_deref() {
            None | Some("sim") => Backend::Sim,
            Some("kvm") => Backend::Kvm,
            Some(other) => {
                return Err(ApiError::bad_request(
                    "invalid_value",
                    format!("backend {other:?} is not sim or kvm"),
                ))
            }
        };
        let state = self.fresh().await?;
        let node = match &req.node {
            Some(r) => node_ref(&state, r)?,
            None => self.id(),
        };
        if state.vms.contains_key(&req.name) {
            return Err(CommandError::VmExists { vm: req.name }.into());
        }
        let seed = req.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let used: BTreeSet<MacAddr> = state.vms.values().map(|v| v.config.mac).collect();
        let mac = (0u64..)
            .map(|i| {
                let x = seed.wrapping_add(i).to_be_bytes();
                MacAddr([0x02, 0xfe, x[4], x[5], x[6], x[7]])
            })
            .find(|m| !used.contains(m))
            .unwrap_or(MacAddr([0x02, 0xfe, 0, 0, 0, 1]));
        let config = VmConfig {
            memory_bytes,
            vcpus: req.vcpus,
            mac,
            backend,
            workload: encode_program(&GuestProgram {
                workload: Workload {
                    dirty_pages_per_sec: Some(req.dirty_pages_per_sec),
                    pattern,
                    seed,
                },
                prefill_seed: Some(seed),
                tcp_connections: req.tcp_connections,
            }),
            storage,
        };
        self.write(Command::CreateVm {
            name: req.name.clone(),
            config,
            node,
        })
        .await?;
        if req.processor_compatibility {
            self.write(Command::SetProcessorCompatibility {
                vm: req.name.clone(),
                enabled: true,
            })
            .await?;
        }
        if req.start {
            return self
                .start_vm(
                    &req.name,
                    requests::StartVm {
                        node: Some(node.to_string()),
                    },
                )
                .await;
        }
        self.vm(&req.name)
    }

    /// Starts a VM that is off, on its owner or on the node named.
    pub async fn start_vm(&self, vm: &str, req: requests::StartVm) -> Result<VmView, ApiError> {
        let state = self.fresh().await?;
        let v = state.vms.get(vm).ok_or_else(|| ApiError::unknown_vm(vm))?;
        if v.state != VmState::Off {
            return Err(CommandError::VmNotOff {
                vm: vm.into(),
                state: v.state,
            }
            .into());
        }
        let node = match &req.node {
            Some(r) => node_ref(&state, r)?,
            None => v.owner,
        };
        self.on_node(node, PeerRequest::StartVm { vm: vm.into() })
            .await?;
        self.vm_fresh(vm).await
    }

    /// Stops a running VM (on its owner) and records it off.
    pub async fn stop_vm(&self, vm: &str) -> Result<VmView, ApiError> {
        let state = self.fresh().await?;
        let v = state.vms.get(vm).ok_or_else(|| ApiError::unknown_vm(vm))?;
        if v.state == VmState::NeedsRestart {
            self.write(Command::StopVm { vm: vm.into() }).await?;
        } else {
            self.on_node(v.owner, PeerRequest::StopVm { vm: vm.into() })
                .await?;
        }
        self.vm_fresh(vm).await
    }

    /// Changes a VM's settings; processor compatibility only while it is off
    /// (the store refuses otherwise).
    pub async fn update_vm(&self, vm: &str, patch: requests::VmPatch) -> Result<VmView, ApiError> {
        let state = self.fresh().await?;
        if !state.vms.contains_key(vm) {
            return Err(ApiError::unknown_vm(vm));
        }
        if let Some(enabled) = patch.processor_compatibility {
            self.write(Command::SetProcessorCompatibility {
                vm: vm.into(),
                enabled,
            })
            .await?;
        }
        self.vm(vm)
    }

    /// Deletes a VM that is off.
    pub async fn delete_vm(&self, vm: &str) -> Result<(), ApiError> {
        let state = self.fresh().await?;
        if !state.vms.contains_key(vm) {
            return Err(ApiError::unknown_vm(vm));
        }
        self.write(Command::DeleteVm { vm: vm.into() }).await?;
        Ok(())
    }

    /// Moves a running VM live to the node named, or to the one placement
    /// picks. Answers once the migration is recorded; follow it with
    /// [`wait_migration`](Self::wait_migration) or the event stream.
    pub async fn move_vm(&self, vm: &str, req: requests::MoveVm) -> Result<MoveStarted, ApiError> {
        let state = self.fresh().await?;
        let v = state.vms.get(vm).ok_or_else(|| ApiError::unknown_vm(vm))?;
        if let Some(m) = v.migration {
            return Err(CommandError::VmAlreadyMigrating {
                vm: vm.into(),
                migration: m,
            }
            .into());
        }
        if v.state != VmState::Running {
            return Err(CommandError::VmNotRunning {
                vm: vm.into(),
                state: v.state,
            }
            .into());
        }
        let target = match &req.target {
            Some(r) => node_ref(&state, r)?,
            None => match placement::place(&state, v, &BTreeMap::new(), &BTreeMap::new()) {
                Placement::Target(node) => node,
                p @ Placement::Busy { .. } => {
                    return Err(ApiError::conflict("targets_busy", p.explain()))
                }
                p @ Placement::NoTarget { .. } => {
                    return Err(ApiError::conflict("no_eligible_target", p.explain()))
                }
            },
        };
        let source = v.owner;
        if target == source {
            return Err(CommandError::SameSourceAndTarget { node: source }.into());
        }
        let estimate = self.estimate(vm).ok();
        let reply = self
            .on_node(
                source,
                PeerRequest::Move {
                    vm: vm.into(),
                    target,
                    trigger: MigrationTrigger::User,
                    verify: req.verify,
                },
            )
            .await?;
        let PeerReply::MoveBegun { migration } = reply else {
            return Err(ApiError::internal(format!("unexpected reply {reply:?}")));
        };
        Ok(MoveStarted {
            migration,
            vm: vm.into(),
            source,
            target,
            target_name: views::node_name(&state, target),
            estimate,
        })
    }

    /// Waits until `migration` completes or aborts (or `timeout` passes) and
    /// returns it as the store and the event stream know it.
    pub async fn wait_migration(
        &self,
        migration: u64,
        timeout: Duration,
    ) -> Result<MigrationView, ApiError> {
        let deadline = Instant::now() + timeout;
        loop {
            let view = self.migration(migration)?;
            let reported = view.report.is_some() || view.outcome != "completed";
            if view.outcome != "active" && (reported || Instant::now() > deadline) {
                return Ok(view);
            }
            if Instant::now() > deadline {
                return Err(ApiError::new(
                    504,
                    "timeout",
                    format!("migration {migration} still active after {timeout:?}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Cancels the move of `vm` under way; the VM stays on its source.
    pub async fn cancel_move(&self, vm: &str) -> Result<(), ApiError> {
        let state = self.fresh().await?;
        let v = state.vms.get(vm).ok_or_else(|| ApiError::unknown_vm(vm))?;
        let source = v
            .migration
            .and_then(|m| state.migrations.get(&m))
            .map(|m| m.source)
            .ok_or_else(|| {
                ApiError::conflict("not_migrating", format!("VM {vm:?} is not being moved"))
            })?;
        self.on_node(source, PeerRequest::Cancel { vm: vm.into() })
            .await?;
        Ok(())
    }

    /// A client's write to the VM's service, delivered to the node that runs
    /// it; answers with the sequence number the guest acknowledged.
    pub async fn append(&self, vm: &str, record: &[u8]) -> Result<AppendView, ApiError> {
        let state = self.state();
        let v = state.vms.get(vm).ok_or_else(|| ApiError::unknown_vm(vm))?;
        let owner = v.owner;
        let refused = |reason: String| ApiError::unavailable("service_unavailable", reason);
        let seq = if owner == self.id() {
            self.inner
                .shared
                .switch
                .append(vm, record)
                .map_err(|e| refused(e.to_string()))?
        } else {
            use ferry_actors::migration::protocol::{Reply, Request, SERVICE};
            let addrs = self
                .inner
                .shared
                .directory
                .get(owner)
                .map(|a| a.rpc)
                .unwrap_or_default();
            let bytes = ferry_transport::encode(&Request::Append {
                vm: vm.into(),
                record: record.to_vec(),
            });
            let reply = self
                .inner
                .shared
                .rpc
                .call(owner, &addrs, SERVICE, bytes, Duration::from_secs(5))
                .await
                .map_err(|e| ApiError::unavailable("node_unreachable", e.to_string()))?;
            match ferry_transport::decode::<Reply>(&reply) {
                Ok(Reply::Appended { seq }) => seq,
                Ok(Reply::Refused { reason }) => return Err(refused(reason)),
                Ok(other) => return Err(ApiError::internal(format!("unexpected reply {other:?}"))),
                Err(e) => return Err(ApiError::internal(e.to_string())),
            }
        };
        Ok(AppendView {
            vm: vm.into(),
            node: owner,
            seq,
        })
    }

    /// Puts a node in maintenance mode; with `drain`, its running VMs are
    /// moved off by live migration (the node reports the drain's progress in
    /// the store: `draining`, then `drained` or `failed` naming each VM left).
    pub async fn pause_node(
        &self,
        node: &str,
        req: requests::PauseNode,
    ) -> Result<NodeView, ApiError> {
        let state = self.fresh().await?;
        let id = node_ref(&state, node)?;
        self.write(Command::PauseNode {
            node: id,
            drain: req.drain,
        })
        .await?;
        self.node(&id.to_string())
    }

    /// Takes a node out of maintenance mode; with `failback`, the VMs its
    /// drain moved away come back (each moved by its current owner). The
    /// node itself carries this out: the request goes to it.
    pub async fn resume_node(
        &self,
        node: &str,
        req: requests::ResumeNode,
    ) -> Result<ResumedView, ApiError> {
        let state = self.fresh().await?;
        let id = node_ref(&state, node)?;
        let n = &state.nodes[&id];
        if n.state != NodeState::Paused {
            return Err(CommandError::NodeNotPaused {
                node: id,
                state: n.state,
            }
            .into());
        }
        let reply = if id == self.id() {
            self.serve(
                id,
                PeerRequest::Resume {
                    failback: req.failback,
                },
            )
            .await?
        } else {
            self.call_peer(
                id,
                PeerRequest::Resume {
                    failback: req.failback,
                },
                Duration::from_secs(3600),
            )
            .await?
        };
        let PeerReply::Resumed(failback) = reply else {
            return Err(ApiError::internal(format!("unexpected reply {reply:?}")));
        };
        Ok(ResumedView {
            node: self.node(&id.to_string())?,
            failback,
        })
    }

    /// Changes a network's role (gateway) or its use for live migration.
    pub async fn set_network(
        &self,
        name: &str,
        patch: requests::NetworkPatch,
    ) -> Result<NetworkView, ApiError> {
        let migration = match &patch.migration {
            None => None,
            Some(m) => Some(views::parse_migration_use(m).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_value",
                    format!("migration {m:?} is not default, allow or forbid"),
                )
            })?),
        };
        let gateway = match &patch.gateway {
            None => None,
            Some(None) => Some(None),
            Some(Some(g)) => Some(Some(g.parse().map_err(|_| {
                ApiError::bad_request("invalid_value", format!("gateway {g:?} is not an address"))
            })?)),
        };
        let state = self.fresh().await?;
        if !state.networks.contains_key(name) {
            return Err(CommandError::UnknownNetwork { name: name.into() }.into());
        }
        if let Some(gateway) = gateway {
            self.write(Command::SetNetworkGateway {
                name: name.into(),
                gateway,
            })
            .await?;
        }
        if let Some(migration) = migration {
            self.write(Command::SetNetworkMigration {
                name: name.into(),
                migration,
            })
            .await?;
        }
        views::networks(&self.state())
            .into_iter()
            .find(|n| n.name == name)
            .ok_or_else(|| CommandError::UnknownNetwork { name: name.into() }.into())
    }

    /// Puts the named networks first in the migration order.
    pub async fn order_networks(&self, order: Vec<String>) -> Result<Vec<NetworkView>, ApiError> {
        let state = self.fresh().await?;
        if let Some(n) = order.iter().find(|n| !state.networks.contains_key(*n)) {
            return Err(CommandError::UnknownNetwork { name: n.clone() }.into());
        }
        self.write(Command::OrderMigrationNetworks { order })
            .await?;
        Ok(self.networks())
    }

    /// Accepts (the policy applies it) or dismisses a pending tip.
    pub async fn resolve_tip(&self, id: u64, accept: bool) -> Result<TipView, ApiError> {
        let state = self.fresh().await?;
        if !state.tips.contains_key(&id) {
            return Err(CommandError::UnknownTip { id }.into());
        }
        self.write(Command::ResolveTip {
            tip: id,
            state: if accept {
                TipState::Accepted
            } else {
                TipState::Dismissed
            },
            at_ms: now_ms(),
        })
        .await?;
        views::tips(&self.state())
            .into_iter()
            .find(|t| t.id == id)
            .ok_or_else(|| CommandError::UnknownTip { id }.into())
    }

    pub async fn update_settings(
        &self,
        patch: requests::SettingsPatch,
    ) -> Result<SettingsView, ApiError> {
        let mut settings = self.fresh().await?.settings.clone();
        if let Some(d) = patch.downtime_limit_ms {
            settings.downtime_limit_ms = d;
        }
        if let Some(b) = patch.bandwidth_cap_bytes_per_sec {
            settings.bandwidth_cap_bytes_per_sec = b;
        }
        if let Some(m) = patch.max_migrations_per_node {
            settings.max_migrations_per_node = m;
        }
        if let Some(mode) = &patch.pro_tip_mode {
            settings.pro_tip_mode = views::parse_tip_mode(mode).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_value",
                    format!("pro_tip_mode {mode:?} is not off, manual or automatic"),
                )
            })?;
        }
        self.write(Command::UpdateSettings { settings }).await?;
        Ok(self.settings())
    }

    // ---- shutdown ----

    /// Stops the node cleanly: VMs it runs are stopped and recorded off (drain
    /// first to keep them running elsewhere), the transport and the store
    /// close, and the data directory is unlocked.
    pub async fn shutdown(&self) {
        if self.inner.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::info!(node = self.id(), "shutting down");
        if let Some(tips) = lock(&self.inner.tips).take() {
            tips.stop();
        }
        for vm in self.inner.shared.running() {
            let _ = self
                .cluster()
                .write_within(Command::StopVm { vm: vm.clone() }, Duration::from_secs(2))
                .await;
            self.inner.shared.release_vm(&vm);
        }
        self.inner.shared.kill().await;
        lock(&self.inner.lock).take();
    }
}

/// `POST /api/vms/{vm}/append`'s answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AppendView {
    pub vm: String,
    pub node: NodeId,
    pub seq: u64,
}

fn ignore_exists(r: Result<ferry_cluster::Response, ClusterError>) -> Result<(), ClusterError> {
    match r {
        Ok(_)
        | Err(ClusterError::Rejected(CommandError::NetworkExists { .. }))
        | Err(ClusterError::Rejected(CommandError::NodeExists { .. })) => Ok(()),
        Err(e) => Err(e),
    }
}

async fn add_node(cluster: &ClusterNode, info: JoinInfo) -> Result<(), ClusterError> {
    ignore_exists(
        cluster
            .write(Command::AddNode {
                id: info.id,
                name: info.name,
                addresses: info.addresses,
                cpu_features: info.cpu_features,
                capacity: info.capacity,
                tcp_offload: info.tcp_offload,
            })
            .await,
    )
}

/// The `ferry-control` service of this node (see [`crate::peer`]).
struct ControlService(Weak<Inner>);

impl RpcHandler for ControlService {
    fn handle(
        &self,
        from: NodeId,
        request: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + '_>> {
        Box::pin(async move {
            let inner = self.0.upgrade().ok_or("node is shutting down")?;
            let node = Node { inner };
            let envelope: Envelope =
                ferry_transport::decode(&request).map_err(|e| e.to_string())?;
            let result: PeerResult = if envelope.version != peer::VERSION {
                Err(ApiError::bad_request(
                    "protocol_version",
                    format!(
                        "control protocol version {} is not supported (this node speaks {})",
                        envelope.version,
                        peer::VERSION
                    ),
                ))
            } else {
                node.serve(from, envelope.request).await
            };
            Ok(ferry_transport::encode(&result))
        })
    }
}

/// Paths of a node's files, for tools and tests.
pub fn lock_path(data_dir: &Path) -> PathBuf {
    data_dir.join("ferry.lock")
}
