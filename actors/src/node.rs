//! A Ferry node: the guests it hosts, how it starts, stops and loses them,
//! its view of the cluster store, and the appends clients make to its guests.
//!
//! [`NodeShared`] is the node's state behind one lock, reachable from the
//! actors (control) and from the transport's RPC handler (the target side of
//! the migration exchange, in [`migration::target`](crate::migration::target)).
//! The cluster store is the only arbiter of who runs
//! a VM: a target resumes only once the store shows the switchover committed
//! to it, and a source that issued the commit and did not hear back stays
//! paused until the store says how it ended.

use crate::history::{GuestObserver, GuestPoint, GuestSeen, HistoryEvent, Recorder};
use crate::migration::protocol::{self, GuestSpec};
use crate::migration::target::MigrationService;
use crate::switch::{ClientError, ServicePort, VirtualSwitch};
use ferry_cluster::model::VmConfig;
use ferry_cluster::{ClusterNode, Command, NodeId, Response};
use ferry_transport::{PageStreamReceiver, RpcNode};
use ferry_vmm::{Guest, RunLease, ServiceError, SimGuest, SimGuestConfig};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, for the store's records.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a node reaches a peer: the sockets its transport listens on, and
/// where to dial it on each network.
///
/// Which networks carry a migration, and in which order, is the cluster
/// store's decision (network roles, `migration_order`); the store also records
/// each node's IP on every network. What the store does not know is the port:
/// that is here. The page-stream path to a peer on network `N` is
/// `networks[N]` when set — an explicit mapping, which a test uses to send a
/// network's traffic through a chaos proxy — and otherwise the `rpc` socket
/// whose IP is the peer's address on `N` in the store.
#[derive(Debug, Clone, Default)]
pub struct PeerAddrs {
    /// The peer's transport sockets, one per network it is attached to, in
    /// order of preference for control traffic.
    pub rpc: Vec<SocketAddr>,
    /// Explicit page-stream sockets by network name (overrides `rpc`).
    pub networks: BTreeMap<String, SocketAddr>,
}

/// The node's address book. The embedding code fills it (from the cluster
/// store and configuration; a test points paths through chaos proxies).
#[derive(Default)]
pub struct Directory {
    peers: Mutex<HashMap<NodeId, PeerAddrs>>,
}

impl Directory {
    pub fn set(&self, node: NodeId, addrs: PeerAddrs) {
        lock(&self.peers).insert(node, addrs);
    }

    pub fn get(&self, node: NodeId) -> Option<PeerAddrs> {
        lock(&self.peers).get(&node).cloned()
    }

    /// Sends `node`'s traffic on `network` to `addr` from now on (or, with
    /// `None`, back to its transport socket on that network).
    pub fn redirect(&self, node: NodeId, network: &str, addr: Option<SocketAddr>) {
        let mut peers = lock(&self.peers);
        let peer = peers.entry(node).or_default();
        match addr {
            Some(addr) => peer.networks.insert(network.to_string(), addr),
            None => peer.networks.remove(network),
        };
    }

    /// Where to dial `node` on `network`, on which the store says its address
    /// is `ip` (see [`PeerAddrs`]).
    pub fn migration_addr(
        &self,
        node: NodeId,
        network: &str,
        ip: std::net::IpAddr,
    ) -> Option<SocketAddr> {
        let peers = lock(&self.peers);
        let peer = peers.get(&node)?;
        peer.networks
            .get(network)
            .copied()
            .or_else(|| peer.rpc.iter().find(|a| a.ip() == ip).copied())
    }
}

/// RPC service that answers an empty request with an empty reply: a source
/// probes each migration network of a target with it before choosing the
/// page-stream paths.
pub const PROBE_SERVICE: &str = "migration-probe";

/// Who reads each guest's dirty log right now: the one exclusion between a
/// migration and a dirty-rate sample ([`NodeShared::sample_dirty_rate`]).
///
/// A guest has one dirty log, and fetching it clears it: two readers would
/// each miss the pages the other took. A migration's source must see every
/// page dirtied after it started the log, or the target resumes with stale
/// pages. So the log has one reader at a time:
///
/// - a source job claims the VM's log as it begins ([`DirtyLogClaim`], taken
///   in `migration::source::run` before anything else, so before its
///   `start_dirty_log`) and holds it until the job ends, however it ends;
/// - a sample starts only while no job holds the log, and looks again right
///   before it fetches. A claim taken in between voids the sample, which then
///   leaves the log alone and says so.
///
/// The claim, the sample's start and the sample's fetch each happen under
/// this one lock. So a sample's fetch either happens before a job claims the
/// log — and the job's own `start_dirty_log`, which comes later, drops
/// whatever the sample left — or never. The sample's own restart of the log
/// would harm only a job already running, and a running job holds its claim.
#[derive(Default)]
struct DirtyLogUsers {
    /// Source jobs of each VM holding its log (a count: a job refused by the
    /// store may overlap the one that runs, for a moment).
    migrations: HashMap<String, u32>,
    /// The sample under way of each VM, by ticket.
    samples: HashMap<String, u64>,
}

/// Who reads a guest's dirty log (see [`NodeShared::dirty_log_user`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyLogUser {
    /// A migration of the guest from this node, from its start to its end.
    Migration,
    /// A dirty-rate sample, for its window.
    Sample,
}

/// A source job's hold on a VM's dirty log (see [`DirtyLogUsers`]); released
/// when dropped.
pub(crate) struct DirtyLogClaim {
    node: Arc<NodeShared>,
    vm: String,
}

impl Drop for DirtyLogClaim {
    fn drop(&mut self) {
        let mut users = lock(&self.node.dirty_log);
        if let Some(n) = users.migrations.get_mut(&self.vm) {
            *n -= 1;
            if *n == 0 {
                users.migrations.remove(&self.vm);
            }
        }
    }
}

/// A dirty-rate sample's slot; frees it when dropped (a sample whose caller
/// gave up mid-window must not keep the next one out).
struct SampleSlot<'a> {
    node: &'a NodeShared,
    vm: &'a str,
    ticket: u64,
}

impl Drop for SampleSlot<'_> {
    fn drop(&mut self) {
        let mut users = lock(&self.node.dirty_log);
        if users.samples.get(self.vm) == Some(&self.ticket) {
            users.samples.remove(self.vm);
        }
    }
}

/// Pages a guest dirtied while a sample watched its dirty log.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DirtySample {
    /// Distinct pages dirtied during the window.
    pub pages: u64,
    /// From the log's start to its fetch.
    pub window: Duration,
}

impl DirtySample {
    /// Distinct pages dirtied per second.
    pub fn rate(&self) -> f64 {
        self.pages as f64 / self.window.as_secs_f64().max(1e-6)
    }
}

/// Why no dirty-rate sample was taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum SampleRefused {
    #[error("VM {0} does not run on this node")]
    NotHere(String),
    #[error("a migration of VM {0} is running and its dirty log is the migration's")]
    Migrating(String),
    #[error("a migration of VM {0} began during the sample; the log was left to it")]
    Interrupted(String),
    #[error("another sample of VM {0} is being taken")]
    Busy(String),
    #[error("the guest's dirty log: {0}")]
    Guest(String),
}

/// What this node does with a VM it holds.
pub(crate) enum Role {
    /// The store says this node runs it, at `epoch`.
    Owner { epoch: u64 },
    /// A migration `migration` is copying it here; it runs only after the
    /// switchover commits.
    Incoming {
        migration: u64,
        receiver: Option<PageStreamReceiver>,
        /// A stream guest's incoming byte stream, pumped into it.
        stream: Option<crate::migration::target::IncomingStream>,
        verified: bool,
        /// The digest this node computed when it verified the copy (with a
        /// digest to compare against); reported when the guest resumes.
        verified_digest: Option<ferry_vmm::MemoryDigest>,
    },
}

pub(crate) struct Hosted {
    pub guest: Arc<dyn Guest>,
    pub spec: GuestSpec,
    pub role: Role,
}

/// A node's shared state.
pub struct NodeShared {
    pub id: NodeId,
    pub rpc: Arc<RpcNode>,
    pub cluster: ClusterNode,
    pub switch: Arc<VirtualSwitch>,
    pub directory: Arc<Directory>,
    pub(crate) vms: Mutex<HashMap<String, Hosted>>,
    /// Progress of every migration this node runs as the source.
    pub events: tokio::sync::broadcast::Sender<crate::migration::source::Progress>,
    /// Set by `kill`: the node is gone and answers nothing.
    dead: std::sync::atomic::AtomicBool,
    /// Where this node reports its history, if anywhere (see [`crate::history`]).
    history: RwLock<Option<Recorder>>,
    /// Shown every guest at its pause and resume points, if set (see
    /// [`crate::history`]).
    observer: RwLock<Option<GuestObserver>>,
    /// Every guest of this node runs only while this holds. Unlimited unless
    /// a failover loop ([`crate::triggers::failover`]) ties it to the node's
    /// lease with the cluster, so a node that lost touch with the quorum has
    /// stopped its guests before the cluster restarts them elsewhere.
    run_lease: RunLease,
    /// VMs being booted here now, by [`Self::start_vm`] or because the store
    /// started them here ([`Self::adopt_start`]): one boot per VM.
    starting: Mutex<HashSet<String>>,
    /// Whether this node boots VMs the store starts here by itself (see
    /// [`Self::begin_adopting`]).
    adopting: std::sync::atomic::AtomicBool,
    /// Who reads each guest's dirty log (see [`DirtyLogUsers`]).
    dirty_log: Mutex<DirtyLogUsers>,
    next_sample: AtomicU64,
    /// What this node measured for estimates: its moves, the links it
    /// probed, the estimates it asked for (see [`crate::measure`]).
    pub(crate) measured: crate::measure::Book,
    /// Where this node keeps its guests' disks; none: guests get no disk
    /// (see [`crate::disks`]).
    pub(crate) disk_dirs: RwLock<Option<crate::disks::DiskDirs>>,
}

/// What a simulated guest runs, stored opaquely in the VM's config.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct GuestProgram {
    pub workload: ferry_vmm::Workload,
    /// Memory contents at first boot (see `SimGuestConfig::prefill_seed`).
    pub prefill_seed: Option<u64>,
    /// TCP connections the guest holds open from boot; on a node whose NIC
    /// offloads TCP they are offloaded (see `NicState`).
    pub tcp_connections: u32,
}

/// What a guest booted here starts with: its virtual NIC, and its CPU.
#[derive(Debug, Clone, Default)]
pub(crate) struct NicBoot {
    /// The node's NIC offloads TCP state.
    pub offload: bool,
    pub connections: u32,
    /// Processor compatibility: the features the store fixed for this start
    /// (the cluster's baseline), which a KVM guest's CPUID is masked to.
    /// `None`: the node's own CPUID.
    pub cpu_features: Option<std::collections::BTreeSet<String>>,
}

/// Reads the guest program out of the store's VM config.
pub fn program_of(config: &VmConfig) -> Result<GuestProgram, String> {
    bincode::serde::decode_from_slice::<GuestProgram, _>(
        &config.workload,
        bincode::config::standard().with_limit::<4096>(),
    )
    .map(|(program, _)| program)
    .map_err(|e| format!("the VM's workload is not readable: {e}"))
}

/// Builds a guest spec from the store's VM config.
pub fn spec_of(config: &VmConfig) -> Result<GuestSpec, String> {
    let GuestProgram {
        workload,
        prefill_seed,
        ..
    } = program_of(config)?;
    let backend = match config.backend {
        ferry_cluster::model::Backend::Sim => "sim",
        ferry_cluster::model::Backend::Kvm => "kvm",
        ferry_cluster::model::Backend::Qemu => "qemu",
    };
    let sim = SimGuestConfig::new(config.memory_bytes, workload);
    Ok(GuestSpec {
        memory_bytes: config.memory_bytes,
        vcpus: config.vcpus,
        mac: config.mac.0,
        backend: backend.into(),
        workload,
        service_pages: sim.service_pages,
        prefill_seed,
    })
}

/// Encodes a guest program for a `VmConfig`.
pub fn encode_program(program: &GuestProgram) -> Vec<u8> {
    bincode::serde::encode_to_vec(program, bincode::config::standard()).unwrap_or_default()
}

fn sim_config(spec: &GuestSpec) -> SimGuestConfig {
    SimGuestConfig {
        memory_bytes: spec.memory_bytes,
        vcpus: spec.vcpus,
        workload: spec.workload,
        service_pages: spec.service_pages,
        mac: spec.mac,
        prefill_seed: spec.prefill_seed,
    }
}

/// Builds a guest from its spec, bound to the node's run lease (see
/// [`NodeShared::run_lease`]): it runs only while the node holds its lease.
pub(crate) fn build_guest(
    spec: &GuestSpec,
    boot: Option<NicBoot>,
    lease: &RunLease,
) -> Result<Arc<dyn Guest>, String> {
    let guest = build_unbound(spec, boot)?;
    guest.bind_lease(lease.clone());
    Ok(guest)
}

fn build_unbound(spec: &GuestSpec, boot: Option<NicBoot>) -> Result<Arc<dyn Guest>, String> {
    match spec.backend.as_str() {
        "sim" => {
            let config = sim_config(spec);
            let guest = match boot {
                // An incoming guest's NIC comes with its device state.
                None => SimGuest::incoming(config),
                Some(nic) => SimGuest::boot(config)
                    .inspect(|g| g.open_connections(nic.offload, 1..=u64::from(nic.connections))),
            };
            Ok(guest.map_err(|e| e.to_string())?)
        }
        #[cfg(target_os = "linux")]
        "kvm" => {
            // A node without usable KVM refuses here with the probe's reason.
            let mut config = ferry_vmm::KvmGuestConfig::new(spec.memory_bytes, spec.workload);
            config.vcpus = spec.vcpus;
            config.service_pages = spec.service_pages;
            config.mac = spec.mac;
            config.prefill_seed = spec.prefill_seed;
            let guest = match boot {
                // An incoming guest's CPUID comes with its device state.
                None => ferry_vmm::KvmGuest::incoming(config),
                Some(nic) => {
                    config.cpu_features = nic.cpu_features;
                    ferry_vmm::KvmGuest::boot(config)
                }
            };
            Ok(guest.map_err(|e| e.to_string())?)
        }
        "qemu" => crate::qemu::build(
            spec,
            boot.as_ref().is_some_and(|b| b.cpu_features.is_some()),
            boot.is_none(),
        ),
        other => Err(format!("this node cannot run {other} guests")),
    }
}

impl NodeShared {
    pub fn new(
        rpc: Arc<RpcNode>,
        cluster: ClusterNode,
        switch: Arc<VirtualSwitch>,
        directory: Arc<Directory>,
    ) -> Arc<NodeShared> {
        let node = Arc::new(NodeShared {
            id: rpc.node_id(),
            rpc,
            cluster,
            switch,
            directory,
            vms: Mutex::new(HashMap::new()),
            events: tokio::sync::broadcast::channel(1024).0,
            dead: std::sync::atomic::AtomicBool::new(false),
            history: RwLock::new(None),
            observer: RwLock::new(None),
            run_lease: RunLease::unlimited(),
            starting: Mutex::new(HashSet::new()),
            adopting: std::sync::atomic::AtomicBool::new(false),
            dirty_log: Mutex::new(DirtyLogUsers::default()),
            next_sample: AtomicU64::new(1),
            measured: crate::measure::Book::default(),
            disk_dirs: RwLock::new(None),
        });
        node.rpc.register(
            protocol::SERVICE,
            Arc::new(MigrationService(Arc::downgrade(&node))),
        );
        node.rpc.register(
            PROBE_SERVICE,
            ferry_transport::handler_fn(|_, _| async { Ok(Vec::new()) }),
        );
        crate::measure::register(&node);
        node.switch
            .attach(node.id, Arc::new(Port(Arc::downgrade(&node))));
        node
    }

    /// Claims `vm`'s dirty log for a source job until the claim is dropped:
    /// no sample reads the log meanwhile, and one under way is voided (see
    /// [`DirtyLogUsers`]).
    pub(crate) fn claim_dirty_log(self: &Arc<Self>, vm: &str) -> DirtyLogClaim {
        let mut users = lock(&self.dirty_log);
        *users.migrations.entry(vm.to_string()).or_insert(0) += 1;
        users.samples.remove(vm);
        DirtyLogClaim {
            node: self.clone(),
            vm: vm.to_string(),
        }
    }

    /// Who reads `vm`'s dirty log now, if anyone.
    pub fn dirty_log_user(&self, vm: &str) -> Option<DirtyLogUser> {
        let users = lock(&self.dirty_log);
        if users.migrations.contains_key(vm) {
            Some(DirtyLogUser::Migration)
        } else if users.samples.contains_key(vm) {
            Some(DirtyLogUser::Sample)
        } else {
            None
        }
    }

    /// Samples how fast the guest of `vm` dirties memory: restarts its dirty
    /// log, waits `window`, and counts the distinct pages the log then holds.
    ///
    /// Only for a VM this node runs (owner role), and never while a migration
    /// of it runs here: a migration holds the log from its start to its end,
    /// and one that begins during the window voids the sample, which then
    /// does not touch the log (see [`DirtyLogUsers`]). Harmless otherwise: a
    /// migration restarts the log when it begins.
    pub async fn sample_dirty_rate(
        &self,
        vm: &str,
        window: Duration,
    ) -> Result<DirtySample, SampleRefused> {
        let guest = self
            .guest(vm)
            .ok_or_else(|| SampleRefused::NotHere(vm.into()))?;
        if guest.as_stream().is_some() {
            return self.sample_stream_dirty_rate(vm, guest, window).await;
        }
        // Allocated before the lock is taken: the fetch under it is short.
        let mut bitmap = ferry_vmm::DirtyBitmap::new(guest.page_count());
        let ticket = self
            .next_sample
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = {
            let mut users = lock(&self.dirty_log);
            if users.migrations.contains_key(vm) {
                return Err(SampleRefused::Migrating(vm.into()));
            }
            if users.samples.contains_key(vm) {
                return Err(SampleRefused::Busy(vm.into()));
            }
            guest
                .start_dirty_log()
                .map_err(|e| SampleRefused::Guest(e.to_string()))?;
            users.samples.insert(vm.to_string(), ticket);
            Instant::now()
        };
        let _slot = SampleSlot {
            node: self,
            vm,
            ticket,
        };
        tokio::time::sleep(window).await;
        let mut users = lock(&self.dirty_log);
        if users.samples.get(vm) != Some(&ticket) {
            // A migration claimed the log since (and dropped our slot).
            return Err(SampleRefused::Interrupted(vm.into()));
        }
        guest
            .fetch_and_clear_dirty(&mut bitmap)
            .map_err(|e| SampleRefused::Guest(e.to_string()))?;
        let window = started.elapsed();
        users.samples.remove(vm);
        drop(users);
        Ok(DirtySample {
            pages: bitmap.count(),
            window,
        })
    }

    /// A stream guest (QEMU) measures its dirty rate itself, with no log of
    /// Ferry's to share; only not while it migrates.
    async fn sample_stream_dirty_rate(
        &self,
        vm: &str,
        guest: Arc<dyn Guest>,
        window: Duration,
    ) -> Result<DirtySample, SampleRefused> {
        if lock(&self.dirty_log).migrations.contains_key(vm) {
            return Err(SampleRefused::Migrating(vm.into()));
        }
        let started = Instant::now();
        let rate = tokio::task::spawn_blocking(move || match guest.as_stream() {
            Some(s) => s.dirty_rate(window).map_err(|e| e.to_string()),
            None => Err("not a stream guest".into()),
        })
        .await
        .map_err(|e| SampleRefused::Guest(e.to_string()))?
        .map_err(SampleRefused::Guest)?;
        let window = started.elapsed();
        Ok(DirtySample {
            pages: (rate * window.as_secs_f64() / ferry_vmm::PAGE_SIZE as f64) as u64,
            window,
        })
    }

    pub fn is_dead(&self) -> bool {
        // SeqCst with `kill`'s store: a job that reads "alive" after its
        // last page read knows the guest's memory was not yet discarded.
        self.dead.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The lease every guest of this node is bound to.
    pub fn run_lease(&self) -> &RunLease {
        &self.run_lease
    }

    /// Reports this node's history to `recorder` from now on (see
    /// [`crate::history`]).
    pub fn set_history(&self, recorder: Recorder) {
        *self.history.write().unwrap_or_else(|p| p.into_inner()) = Some(recorder);
    }

    /// Shows this node's guests to `observer` at their pause and resume
    /// points from now on (see [`crate::history`]).
    pub fn set_guest_observer(&self, observer: GuestObserver) {
        *self.observer.write().unwrap_or_else(|p| p.into_inner()) = Some(observer);
    }

    /// Shows `guest` to the observer, if one is set and the node is alive.
    pub(crate) fn observe(&self, point: GuestPoint, migration: u64, vm: &str, guest: &dyn Guest) {
        if self.is_dead() {
            return;
        }
        let observer = self
            .observer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(observer) = observer {
            observer(GuestSeen {
                point,
                migration,
                vm,
                node: self.id,
                guest,
            });
        }
    }

    /// Whether a history recorder is set (and the node alive to report).
    pub(crate) fn records_history(&self) -> bool {
        !self.is_dead()
            && self
                .history
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
    }

    /// Reports the event `event` builds, if a recorder is set and the node
    /// has not been killed.
    pub(crate) fn record(&self, event: impl FnOnce() -> HistoryEvent) {
        if self.is_dead() {
            return;
        }
        let recorder = self
            .history
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(recorder) = recorder {
            recorder(event());
        }
    }

    /// The guest this node runs for `vm`, if it owns it.
    pub fn guest(&self, vm: &str) -> Option<Arc<dyn Guest>> {
        lock(&self.vms)
            .get(vm)
            .filter(|h| matches!(h.role, Role::Owner { .. }))
            .map(|h| h.guest.clone())
    }

    /// The ownership epoch at which this node runs `vm`, if it runs it and its
    /// vCPUs are not paused (what the "never twice" invariant looks at).
    pub fn running_epoch(&self, vm: &str) -> Option<u64> {
        match lock(&self.vms).get(vm) {
            Some(Hosted {
                role: Role::Owner { epoch },
                guest,
                ..
            }) if !guest.is_paused() && self.run_lease.holds() => Some(*epoch),
            _ => None,
        }
    }

    /// Names of the VMs this node runs (owner role).
    pub fn running(&self) -> Vec<String> {
        lock(&self.vms)
            .iter()
            .filter(|(_, h)| matches!(h.role, Role::Owner { .. }))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Whether this node holds `vm` at all (owner or incoming).
    pub fn holds(&self, vm: &str) -> bool {
        lock(&self.vms).contains_key(vm)
    }

    /// Stops `vm` here if this node runs it (owner role): the guest is
    /// destroyed and its route withdrawn. The caller records the stop in the
    /// store first. Returns whether there was a guest to stop.
    pub fn release_vm(&self, vm: &str) -> bool {
        self.release(vm, None)
    }

    /// [`Self::release_vm`], only if this node runs `vm` at `epoch`: a stop
    /// meant for the VM before a switchover or a restart leaves a later
    /// incarnation alone.
    pub fn release_vm_at(&self, vm: &str, epoch: u64) -> bool {
        self.release(vm, Some(epoch))
    }

    fn release(&self, vm: &str, at: Option<u64>) -> bool {
        let hosted = {
            let mut vms = lock(&self.vms);
            match vms.get(vm).map(|h| &h.role) {
                Some(Role::Owner { epoch }) if at.is_none_or(|a| a == *epoch) => vms.remove(vm),
                _ => None,
            }
        };
        match hosted {
            Some(h) => {
                h.guest.destroy();
                self.record(|| HistoryEvent::CopyDestroyed {
                    vm: vm.into(),
                    node: self.id,
                });
                self.switch.withdraw(vm);
                true
            }
            None => false,
        }
    }

    /// Starts `vm` here: the store records this node as its owner first, then
    /// the guest boots and its address is announced.
    pub async fn start_vm(&self, vm: &str) -> Result<u64, String> {
        let Some(_booting) = Booting::claim(self, vm) else {
            return Err(format!("VM {vm} is already starting on this node"));
        };
        // Linearizable: the VM may have been created through another node a
        // moment ago, and this replica may not have applied that yet.
        let state = self
            .cluster
            .read_linearizable()
            .await
            .map_err(|e| e.to_string())?;
        let config = state
            .vms
            .get(vm)
            .ok_or_else(|| format!("unknown VM {vm}"))?
            .config
            .clone();
        let spec = spec_of(&config)?;
        let compatible = state.vms.get(vm).is_some_and(|v| v.processor_compatibility);
        let mut nic = NicBoot {
            offload: state.nodes.get(&self.id).is_some_and(|n| n.tcp_offload),
            connections: program_of(&config).map_or(0, |p| p.tcp_connections),
            cpu_features: None,
        };
        let epoch = match self
            .cluster
            .write(Command::StartVm {
                vm: vm.into(),
                node: self.id,
            })
            .await
        {
            Ok(Response::VmStarted {
                epoch,
                cpu_features,
                ..
            }) => {
                nic.cpu_features = compatible.then_some(cpu_features);
                epoch
            }
            Ok(other) => return Err(format!("unexpected answer {other:?}")),
            Err(e) => return Err(e.to_string()),
        };
        self.boot(vm, epoch, spec, nic).await
    }

    /// Boots `vm` here as its owner at `epoch`, which the store has recorded,
    /// and announces it; a guest that cannot boot is recorded stopped.
    async fn boot(
        &self,
        vm: &str,
        epoch: u64,
        spec: GuestSpec,
        nic: NicBoot,
    ) -> Result<u64, String> {
        // Off the runtime's workers: a boot can take seconds (a QEMU guest's
        // kernel under TCG).
        let built = {
            let (spec, lease) = (spec.clone(), self.run_lease.clone());
            tokio::task::spawn_blocking(move || build_guest(&spec, Some(nic), &lease))
                .await
                .unwrap_or_else(|e| Err(format!("the boot failed: {e}")))
        };
        let guest = match built.and_then(|g| self.with_planned_disk(vm, g, false)) {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(%vm, epoch, "the guest did not boot: {e}");
                let _ = self
                    .cluster
                    .write(Command::StopVm {
                        vm: vm.into(),
                        epoch: Some(epoch),
                    })
                    .await;
                return Err(e);
            }
        };
        let stale = lock(&self.vms).insert(
            vm.into(),
            Hosted {
                guest,
                spec,
                role: Role::Owner { epoch },
            },
        );
        // A copy this node still held (say, a paused source whose migration
        // the store has since settled elsewhere) is superseded: the store
        // started the VM here afresh at `epoch`.
        if let Some(old) = stale {
            old.guest.destroy();
        }
        self.record(|| HistoryEvent::VmStarted {
            vm: vm.into(),
            node: self.id,
            epoch,
        });
        self.switch.announce(vm, self.id, epoch);
        Ok(epoch)
    }

    /// From now on, boot the VMs the store starts on this node without this
    /// node asking (failover restarts), including any it shows here now. A
    /// restarted daemon calls this only after it has told the store which
    /// VMs it lost with its process, so a VM from before the restart is
    /// never mistaken for one placed here since.
    pub fn begin_adopting(self: &Arc<Self>) {
        self.adopting
            .store(true, std::sync::atomic::Ordering::Release);
        self.adopt_orphans();
    }

    /// Boots every VM the store runs on this node that this node does not
    /// hold (after a lagged view of the store, or when adopting begins).
    pub(crate) fn adopt_orphans(self: &Arc<Self>) {
        if !self.adopting.load(std::sync::atomic::Ordering::Acquire) || self.is_dead() {
            return;
        }
        let state = self.cluster.read();
        for vm in state.vms_on(self.id) {
            if vm.state == ferry_cluster::model::VmState::Running && !self.holds(&vm.name) {
                self.spawn_adopt(vm.name.clone(), vm.epoch);
            }
        }
    }

    /// [`Self::adopt_start`] in the background, if this node adopts.
    pub(crate) fn spawn_adopt(self: &Arc<Self>, vm: String, epoch: u64) {
        if !self.adopting.load(std::sync::atomic::Ordering::Acquire) || self.is_dead() {
            return;
        }
        let node = self.clone();
        tokio::spawn(async move {
            if let Err(e) = node.adopt_start(&vm, epoch).await {
                tracing::warn!(%vm, epoch, "could not start the VM placed here: {e}");
            }
        });
    }

    /// The store started `vm` on this node at `epoch` without this node
    /// asking (a failover restart by the leader): boot it, unless this node
    /// boots it already or the store has moved on since.
    pub async fn adopt_start(&self, vm: &str, epoch: u64) -> Result<(), String> {
        let Some(_booting) = Booting::claim(self, vm) else {
            return Ok(());
        };
        if matches!(lock(&self.vms).get(vm), Some(Hosted { role: Role::Owner { epoch: e }, .. }) if *e >= epoch)
        {
            return Ok(());
        }
        let state = self.cluster.read();
        let Some(v) = state.vms.get(vm) else {
            return Ok(());
        };
        if v.owner != self.id
            || v.epoch != epoch
            || v.state != ferry_cluster::model::VmState::Running
        {
            return Ok(());
        }
        let spec = spec_of(&v.config)?;
        let nic = NicBoot {
            offload: state.nodes.get(&self.id).is_some_and(|n| n.tcp_offload),
            connections: program_of(&v.config).map_or(0, |p| p.tcp_connections),
            cpu_features: v.processor_compatibility.then(|| v.cpu_features.clone()),
        };
        drop(state);
        tracing::info!(%vm, epoch, "starting a VM the cluster restarted here");
        self.boot(vm, epoch, spec, nic).await.map(|_| ())
    }

    /// Throws away every guest this node holds, running or incoming: the
    /// store has declared the node down, so each of them is being (or has
    /// been) restarted elsewhere. Returns the VMs dropped.
    pub fn drop_all_guests(&self) -> Vec<String> {
        let hosted: Vec<(String, Hosted)> = lock(&self.vms).drain().collect();
        let mut names = Vec::new();
        for (vm, h) in hosted {
            h.guest.destroy();
            if matches!(h.role, Role::Owner { .. }) {
                self.record(|| HistoryEvent::CopyDestroyed {
                    vm: vm.clone(),
                    node: self.id,
                });
                self.switch.withdraw(&vm);
            }
            names.push(vm);
        }
        names
    }

    /// Simulates the node dying: the transport and the store stop, every guest
    /// vanishes with its memory.
    pub async fn kill(&self) {
        self.dead.store(true, std::sync::atomic::Ordering::SeqCst);
        self.switch.detach(self.id);
        let hosted: Vec<Hosted> = lock(&self.vms).drain().map(|(_, h)| h).collect();
        for h in hosted {
            h.guest.destroy();
        }
        self.rpc.shutdown().await;
        let _ = self.cluster.shutdown().await;
    }

    pub(crate) fn append(&self, vm: &str, record: &[u8]) -> Result<u64, ClientError> {
        if self.is_dead() {
            return Err(ClientError::Unreachable {
                vm: vm.into(),
                node: self.id,
            });
        }
        let guest = self.guest(vm).ok_or(ClientError::NotHere {
            vm: vm.into(),
            node: self.id,
        })?;
        guest
            .service_append(record)
            .map_err(|error| ClientError::Service {
                vm: vm.into(),
                error,
            })
    }
}

/// A claim on booting one VM on a node; released when dropped.
struct Booting<'a> {
    node: &'a NodeShared,
    vm: String,
}

impl<'a> Booting<'a> {
    fn claim(node: &'a NodeShared, vm: &str) -> Option<Self> {
        lock(&node.starting)
            .insert(vm.to_string())
            .then(|| Booting {
                node,
                vm: vm.to_string(),
            })
    }
}

impl Drop for Booting<'_> {
    fn drop(&mut self) {
        lock(&self.node.starting).remove(&self.vm);
    }
}

/// The switch's port into this node.
struct Port(std::sync::Weak<NodeShared>);

impl ServicePort for Port {
    fn append(&self, vm: &str, record: &[u8]) -> Result<u64, ClientError> {
        match self.0.upgrade() {
            Some(node) => node.append(vm, record),
            None => Err(ClientError::Service {
                vm: vm.into(),
                error: ServiceError::NotRunning,
            }),
        }
    }
}
