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
//!
//! The operations are grouped by concern in private child modules, each an
//! `impl Node` block: `forming` (bootstrapping or joining the cluster),
//! `background` (the tasks a node runs), `forward` (the control service and
//! forwarding to the node that must act), `reads`, `vms` (VM writes) and
//! `cluster_ops` (nodes, networks, tips, settings). This file holds the node
//! itself: starting it, its accessors, the data-directory lock and shutdown.

use crate::config::{NodeConfig, PeerEntry};
use crate::error::ApiError;
use crate::events::{Event, EventHub};
use crate::peer::{self, Relayed};
use actix::prelude::*;
use anyhow::{bail, Context as _};
use ferry_actors::actors::NodeActor;
use ferry_actors::node::{Directory, NodeShared};
use ferry_actors::policy::tips::TipConfig;
use ferry_actors::switch::VirtualSwitch;
use ferry_actors::triggers::failover::{FailoverLoop, FailoverStatus};
use ferry_actors::triggers::tips::Tips;
use ferry_cluster::model::ClusterState;
use ferry_cluster::{ClusterNode, ClusterNodeConfig, Command, NodeId};
use ferry_transport::{NetworkConfig, NodeCredentials, RpcNode};
use forward::ControlService;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod background;
mod cluster_ops;
mod forming;
mod forward;
mod membership;
mod reads;
mod shutdown;
mod vms;

pub use shutdown::{report_path, MovedAway, ShutdownReport, StoppedVm};

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
    /// Lease renewals, fencing, and (on the leader) failure detection and
    /// restarts: see `ferry_actors::triggers::failover`.
    failover: Arc<FailoverLoop>,
    /// Set when a shutdown begins (a second one returns at once).
    shut: AtomicBool,
    stopping: AtomicBool,
    lock: Mutex<Option<DataDirLock>>,
    api: ApiCounters,
    /// True once this node is a member and has reconciled the store with what
    /// runs here after a restart (`forming`). VMs start here only after that,
    /// so the reconcile never mistakes a VM starting now for one from before.
    reconciled: tokio::sync::watch::Sender<bool>,
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
    /// The node a user names (by name or id). One the configuration lists
    /// but the store does not know yet is still joining (or its daemon is not
    /// running): said so, rather than "unknown".
    pub(crate) fn node_ref(&self, state: &ClusterState, r: &str) -> Result<NodeId, ApiError> {
        node_ref(state, r).map_err(|unknown| {
            let configured = self
                .inner
                .peers
                .values()
                .any(|p| p.name == r || p.id.to_string() == r);
            if configured {
                // Same status and code (it is not in the cluster), a message
                // that says what to do.
                ApiError {
                    message: format!(
                        "node {r:?} is not a member of the cluster yet: it is still joining, or \
                         its daemon is not running (`ferry status --wait` waits for every node)"
                    ),
                    ..unknown
                }
            } else {
                unknown
            }
        })
    }

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
        certificate_usable(&creds, &config.name, ferry_actors::node::now_ms() / 1000)?;
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
        // Node-local disks live with the node's data; no shared volume is
        // reachable from a daemon yet (ARCHITECTURE.md, *Virtual disks*).
        shared.set_disk_dirs(ferry_actors::disks::DiskDirs {
            local: config.data_dir.join("disks"),
            shared: None,
        });
        let actor = NodeActor::new(shared.clone()).start();
        let failover = FailoverLoop::start(shared.clone());
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
                failover,
                shut: AtomicBool::new(false),
                stopping: AtomicBool::new(false),
                lock: Mutex::new(Some(dir_lock)),
                api: ApiCounters::default(),
                reconciled: tokio::sync::watch::channel(false).0,
            }),
        };
        node.refresh_directory();
        // The store on disk may already revoke nodes: refuse them before any
        // peer is heard.
        node.sync_membership();
        rpc.set_admission(Arc::new(membership::MembershipGate(Arc::downgrade(
            &node.inner,
        ))));
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

    fn stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::Acquire)
    }

    /// Where this node stands with the cluster's failover: its lease, and
    /// how often it lapsed or was declared down.
    pub fn failover_status(&self) -> FailoverStatus {
        self.inner.failover.status()
    }

    pub(crate) fn failover(&self) -> &FailoverLoop {
        &self.inner.failover
    }

    /// Stops the node gracefully: its VMs move away live as far as the
    /// cluster can take them, what is left stops with it and the node tells
    /// the store it is down, so the cluster restarts those VMs elsewhere
    /// (see `shutdown.rs`); then the transport and the store close and the
    /// data directory is unlocked. Returns what it did.
    pub async fn shutdown(&self) -> ShutdownReport {
        if self.inner.shut.swap(true, Ordering::AcqRel) {
            return ShutdownReport {
                node: self.inner.config.name.clone(),
                ..Default::default()
            };
        }
        tracing::info!(node = self.id(), "shutting down");
        if let Some(tips) = lock(&self.inner.tips).take() {
            tips.stop();
        }
        let report = self.leave_cluster().await;
        self.inner.shared.kill().await;
        lock(&self.inner.lock).take();
        report
    }
}

/// Refuses to start on an expired (or not yet valid) certificate, which every
/// peer would refuse, with what to do; warns when it expires within 30 days.
fn certificate_usable(creds: &NodeCredentials, name: &str, now_s: u64) -> anyhow::Result<()> {
    let v = creds.validity()?;
    let now = now_s as i64;
    let renew = format!("renew it with `ferry node renew-cert {name}` where the cluster CA is");
    if now > v.not_after_s {
        bail!(
            "the node certificate expired {} s ago (not valid after Unix time {}): peers refuse it; {renew}",
            now - v.not_after_s,
            v.not_after_s
        );
    }
    if now < v.not_before_s {
        bail!(
            "the node certificate is not valid before Unix time {} ({} s from now): check this machine's clock",
            v.not_before_s,
            v.not_before_s - now
        );
    }
    if v.not_after_s - now < 30 * 86_400 {
        tracing::warn!(
            not_after = v.not_after_s,
            "the node certificate expires in {} days; {renew}",
            (v.not_after_s - now) / 86_400
        );
    }
    Ok(())
}

/// `POST /api/vms/{vm}/append`'s answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AppendView {
    pub vm: String,
    pub node: NodeId,
    pub seq: u64,
}

/// Paths of a node's files, for tools and tests.
pub fn lock_path(data_dir: &Path) -> PathBuf {
    data_dir.join("ferry.lock")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ferry_transport::identity::Validity;
    use ferry_transport::ClusterCa;

    #[test]
    fn a_daemon_refuses_an_expired_or_not_yet_valid_certificate() {
        let ca = ClusterCa::generate("c").unwrap();
        let creds = ca.issue_with(2, Validity::from_unix(1_000, 2_000)).unwrap();
        assert!(certificate_usable(&creds, "node-2", 1_500).is_ok());
        let expired = certificate_usable(&creds, "node-2", 2_500).unwrap_err();
        assert!(
            expired.to_string().contains("expired 500 s ago")
                && expired.to_string().contains("ferry node renew-cert node-2"),
            "{expired}"
        );
        let early = certificate_usable(&creds, "node-2", 900).unwrap_err();
        assert!(early.to_string().contains("not valid before"), "{early}");
    }
}
