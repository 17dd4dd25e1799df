//! The source side of a live migration: prechecks, the record in the store,
//! pre-copy rounds over the page stream under the convergence policy, the
//! blackout, and the switchover commit.
//!
//! The rule that keeps a VM from running twice: only the source proposes the
//! switchover, so until it has sent that proposal it may always resume its
//! guest; once sent, it resumes only if the store says the migration was
//! aborted, and it waits (paused) for as long as the store cannot tell it.

use crate::history::{GuestPoint, HistoryEvent};
use crate::migration::progress::{RoundMeter, PROGRESS_EVERY};
use crate::migration::protocol::{self, Reply, Request};
use crate::node::{lock, now_ms, NodeShared, Role, PROBE_SERVICE};
use crate::policy::convergence::{ConvergenceConfig, ConvergencePolicy, Decision, RoundStats};
use crate::policy::placement::{self, NetworkPath};
use ferry_cluster::command::CommandError;
use ferry_cluster::model::{
    ClusterState, MigrationOutcome, MigrationPhase, MigrationTrigger, Settings, StorageSpec,
};
use ferry_cluster::{ClusterError, Command, NodeId, Response};
use ferry_transport::{CallOptions, PageStreamSender, PAGE_SIZE};
use ferry_vmm::guest::is_zero as is_zero_page;
use ferry_vmm::{DirtyBitmap, Guest};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Pages read from the guest and queued on the stream at a time (256 KiB).
mod stream;

const BATCH_PAGES: u64 = 256;
/// How long an abort waits for the store to record it before answering
/// (it keeps trying in the background after that).
const ABORT_RECORD_WAIT: Duration = Duration::from_secs(2);
/// Deadline of each control call to the target while the guest runs.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// A blackout may last the downtime limit (or the expected downtime the policy
/// accepted, if larger) plus this, from the pause until the guest runs again on
/// either node. Covers one network dying in the blackout: the page stream
/// drops a silent path in 300 ms and a call hedges onto the other in 120 ms.
/// Verifying the copy (`verify`) adds what it costs on top.
const BLACKOUT_SLACK: Duration = Duration::from_secs(1);
/// Part of the blackout budget kept for the switchover commit and the resume;
/// a blackout still copying past the rest of the budget aborts and resumes
/// the source instead.
const COMMIT_RESERVE: Duration = Duration::from_millis(300);
/// While the guest is paused a call waits this long on one path before the
/// same request also goes out on the next.
const BLACKOUT_HEDGE: Duration = Duration::from_millis(30);
/// How long a migration network of the target may take to answer a probe
/// before the next allowed network takes its place.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Tests only: the final round skips one dirty page, so the target resumes
/// with a stale page — the chaos checker must notice (`tests/chaos_injected.rs`).
/// The page left out is the first the guest dirtied since the last dirty-log
/// fetch (else the first of the final set: the lowest page, read first in
/// every round, so its last write came after its last copy). An empty final
/// set leaves nothing out (logged). Off unless a test sets it; process-wide.
#[doc(hidden)]
pub static INJECT_PAGE_COPY_BUG: AtomicBool = AtomicBool::new(false);

/// What the blackout's copy produced: pages sent, bytes sent, the device
/// state, and what became of the NIC offload.
type FinalRound = (u64, u64, ferry_vmm::DeviceState, OffloadReport);

/// A request to move a VM.
#[derive(Debug, Clone)]
pub struct MoveRequest {
    pub vm: String,
    pub target: NodeId,
    pub trigger: MigrationTrigger,
    /// Compare memory and device-state digests of source and target in the
    /// blackout (a full memory hash on each side: tests turn it on).
    pub verify: bool,
    /// Where the convergence policy's limits come from: by default the
    /// cluster's settings when the move begins.
    pub policy: MovePolicy,
}

impl MoveRequest {
    pub fn new(vm: impl Into<String>, target: NodeId) -> Self {
        MoveRequest {
            vm: vm.into(),
            target,
            trigger: MigrationTrigger::User,
            verify: false,
            policy: MovePolicy::default(),
        }
    }
}

/// The convergence configuration a move asks for. Resolved by the source job
/// when the move begins, so every kind of move — a user's, a drain's, a
/// tip's, a failback — obeys the cluster's downtime limit unless it says
/// otherwise.
#[derive(Debug, Clone, PartialEq)]
pub enum MovePolicy {
    /// The cluster's ([`ConvergenceConfig::for_move`]), with this move's own
    /// downtime limit in place of the cluster's where one is named.
    Cluster { downtime_limit_ms: Option<u32> },
    /// Exactly this configuration, whatever the settings say (tests and
    /// benchmarks that tune more than the settings hold).
    Explicit(ConvergenceConfig),
}

impl Default for MovePolicy {
    fn default() -> Self {
        MovePolicy::Cluster {
            downtime_limit_ms: None,
        }
    }
}

impl MovePolicy {
    /// This move's downtime limit in place of the cluster's.
    pub fn downtime_limit_ms(ms: u32) -> Self {
        MovePolicy::Cluster {
            downtime_limit_ms: Some(ms),
        }
    }

    /// The configuration under `settings`, the cluster's as the move begins.
    pub fn resolve(&self, settings: &Settings) -> ConvergenceConfig {
        match self {
            MovePolicy::Cluster { downtime_limit_ms } => {
                ConvergenceConfig::for_move(settings, *downtime_limit_ms)
            }
            MovePolicy::Explicit(config) => config.clone(),
        }
    }
}

/// Where a migration is, for progress displays.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Phase {
    Prechecks,
    Preparing,
    Copying,
    Blackout,
    SwitchingOver,
    Completed,
    Aborted,
}

/// A progress event. Each round (the blackout's included) reports at least
/// every [`PROGRESS_EVERY`] while it sends (`mid_round`), and once more when
/// it ends.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub migration: u64,
    pub vm: String,
    pub phase: Phase,
    pub round: u32,
    /// Bytes of page data sent in the whole move so far.
    pub bytes_sent: u64,
    /// Mid-round: pages of the round still to send. At a round's end: pages
    /// dirtied during it, which the next round sends.
    pub remaining_pages: u64,
    /// Pages per second dirtied during the last round.
    pub dirty_rate: f64,
    /// Bytes per second the stream delivered in the last round.
    pub bandwidth: f64,
    pub expected_downtime: Duration,
    pub throttle: f64,
    /// Whether the round was still sending: a sample, not the round's end.
    pub mid_round: bool,
    /// Bytes of page data sent in this round so far.
    pub round_bytes_sent: u64,
    /// Bytes per second sent over this round so far.
    pub rate: f64,
    /// Time until the round's last page is sent, at the round's pace so far
    /// (mid-round events only).
    pub eta: Option<Duration>,
}

/// One round as the report shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub round: u32,
    pub pages_sent: u64,
    pub zero_pages: u64,
    pub pages_dirtied: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    pub throttle: f64,
}

/// What a completed migration did.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    pub migration: u64,
    pub vm: String,
    pub source: NodeId,
    pub target: NodeId,
    pub trigger: MigrationTrigger,
    pub rounds: Vec<RoundReport>,
    pub final_pages: u64,
    pub bytes: u64,
    /// From the request to the target running the VM (the source's copy is
    /// destroyed right after).
    pub total: Duration,
    /// From the source's pause to the target's resume, as the source saw it.
    pub blackout: Duration,
    pub epoch: u64,
    /// The networks that carried the page stream, in order.
    pub paths: Vec<PathReport>,
    /// Allowed networks that did not carry it, and why (unreachable, or
    /// beyond the two redundant paths).
    pub networks_skipped: Vec<(String, String)>,
    pub offload: OffloadReport,
    pub storage: StorageReport,
}

/// One network that carried a migration's page stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PathReport {
    pub network: String,
    pub addr: std::net::SocketAddr,
}

/// What happened to the guest's offloaded TCP connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OffloadReport {
    /// Connections the NIC held that were pushed back into the guest's
    /// software stack before the state left the source.
    pub pushed_back: usize,
    /// Whether the target's NIC offloads TCP.
    pub target_offload: bool,
    /// Connections offloaded again on the target after the move (all the
    /// guest's connections when the target offloads, none otherwise).
    pub reoffloaded: usize,
}

/// What the move cost in storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum StorageReport {
    /// On a cluster-shared volume: nothing moved.
    Shared { volume: String },
    /// On a node-owned disk: copied live next to memory (where the nodes
    /// keep disks, see `crate::disks`), and its ownership moved to the
    /// target in the switchover commit, inside the blackout.
    NodeOwned {
        size_bytes: u64,
        from: NodeId,
        to: NodeId,
        copy: DiskCopyReport,
    },
}

/// What copying a node-owned disk took, apart from memory. Disk blocks go in
/// the same rounds as memory pages (one copy space, `ferry_vmm::with_disk`);
/// these count the ones past memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DiskCopyReport {
    /// Disk blocks sent over the whole move (every round, the blackout's
    /// too), in bytes; 0 where the guest has no disk to copy.
    pub bytes: u64,
    /// Of those, sent in the blackout.
    pub final_bytes: u64,
    /// Blocks the guest wrote to its disk while the move ran (to the pause).
    pub blocks_written: u64,
}

/// Why a migration did not complete. Every variant means the VM runs on the
/// source.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MigrationError {
    #[error("refused before anything was copied: {0}")]
    Refused(String),
    /// The cluster store refused to begin it (target paused, missing CPU
    /// features, no capacity, the simultaneous-migration limit …); nothing
    /// was copied.
    #[error("refused by the cluster store before anything was copied: {0}")]
    Rejected(CommandError),
    #[error("aborted, the VM runs on the source: {0}")]
    Aborted(String),
    #[error("cancelled by the user; the VM runs on the source")]
    Cancelled,
}

/// A job's cancel switch.
#[derive(Clone, Default)]
pub struct JobHandle {
    pub cancel: Arc<AtomicBool>,
}

/// The networks carrying a migration's page stream, and the allowed networks
/// left out with the reason.
type ChosenPaths = (Vec<PathReport>, Vec<(String, String)>);

struct Job {
    node: Arc<NodeShared>,
    req: MoveRequest,
    /// `req.policy` resolved against the settings as the move began.
    config: ConvergenceConfig,
    handle: JobHandle,
    migration: u64,
    epoch: u64,
    guest: Arc<dyn Guest>,
    target_rpc: Vec<std::net::SocketAddr>,
    /// The page-stream paths chosen, and the allowed networks left out.
    paths: std::sync::Mutex<ChosenPaths>,
    /// The device state as saved before the offload push-back, to put back
    /// if the move aborts after the blackout began.
    unpushed: std::sync::Mutex<Option<ferry_vmm::DeviceState>>,
    /// What the copy of a disk that moves with the guest took so far.
    disk_copy: std::sync::Mutex<DiskCopyReport>,
    /// The digest taken in the blackout (when verifying), for the history.
    digest_at_pause: std::sync::Mutex<Option<ferry_vmm::MemoryDigest>>,
}

/// Runs the source side of a migration to its end.
pub async fn run(
    node: Arc<NodeShared>,
    req: MoveRequest,
    handle: JobHandle,
) -> Result<MigrationReport, MigrationError> {
    let started = Instant::now();
    // Prechecks that need this node's view; the store re-checks the rest.
    let guest = node.guest(&req.vm).ok_or_else(|| {
        MigrationError::Refused(format!("VM {} does not run on node {}", req.vm, node.id))
    })?;
    // The guest's dirty log is this job's from here to its end: no dirty-rate
    // sample reads it meanwhile (see `node::DirtyLogUsers`).
    let _dirty_log = node.claim_dirty_log(&req.vm);
    let peer = node.directory.get(req.target).ok_or_else(|| {
        MigrationError::Refused(format!(
            "node {} is not in this node's directory",
            req.target
        ))
    })?;
    let config = req.policy.resolve(&node.cluster.read().settings);
    ConvergencePolicy::new(config.clone(), guest.page_count() * PAGE_SIZE as u64)
        .map_err(|e| MigrationError::Refused(e.to_string()))?;
    let at_ms = now_ms();
    let begun = node
        .cluster
        .write(Command::BeginMigration {
            vm: req.vm.clone(),
            source: node.id,
            target: req.target,
            trigger: req.trigger,
            at_ms,
        })
        .await;
    let (migration, epoch) = match begun {
        Ok(Response::MigrationBegun { id, epoch }) => (id, epoch),
        Ok(other) => {
            return Err(MigrationError::Refused(format!(
                "unexpected answer {other:?}"
            )))
        }
        Err(ClusterError::Rejected(e)) => return Err(MigrationError::Rejected(e)),
        Err(e) => {
            abort_if_begun(node.clone(), req.vm.clone(), req.target, at_ms);
            return Err(MigrationError::Refused(e.to_string()));
        }
    };
    node.record(|| HistoryEvent::MigrationBegun {
        migration,
        vm: req.vm.clone(),
        source: node.id,
        target: req.target,
        budget: config.time_budget(guest.page_count() * PAGE_SIZE as u64),
    });
    let job = Job {
        node,
        req,
        config,
        handle,
        migration,
        epoch,
        guest,
        target_rpc: peer.rpc,
        paths: Default::default(),
        unpushed: Default::default(),
        digest_at_pause: Default::default(),
        disk_copy: Default::default(),
    };
    job.progress(Phase::Preparing, 0, 0, 0, None, 0.0);
    let paths = match job.choose_paths().await {
        Ok(p) => p,
        Err(reason) => return Err(job.abort(reason, false).await),
    };
    // A guest that moves as one byte stream (QEMU) runs its own rounds.
    let outcome = if job.guest.as_stream().is_some() {
        job.stream_and_switch(&paths, started).await
    } else {
        let sender = match job.prepare(&paths).await {
            Ok(s) => s,
            Err(reason) => return Err(job.abort(reason, false).await),
        };
        job.precopy_and_switch(sender, started).await
    };
    match outcome {
        Ok(report) => {
            crate::measure::note_move(&job.node, &report);
            job.node.record(|| HistoryEvent::MigrationEnded {
                migration,
                vm: report.vm.clone(),
                completed: true,
                reason: None,
            });
            Ok(report)
        }
        Err(Failure::BeforeCommit { reason, paused }) => Err(job.abort(reason, paused).await),
        Err(Failure::Cancelled { paused }) => {
            let _ = job.abort("cancelled by the user".into(), paused).await;
            Err(MigrationError::Cancelled)
        }
        Err(Failure::Superseded) => {
            let reason = "the store moved the VM on without this migration".to_string();
            tracing::warn!(migration, %reason, "dropping the source copy");
            job.release_source_copy();
            job.progress(Phase::Aborted, 0, 0, 0, None, 0.0);
            job.node.record(|| HistoryEvent::MigrationEnded {
                migration,
                vm: job.req.vm.clone(),
                completed: false,
                reason: Some(reason.clone()),
            });
            Err(MigrationError::Aborted(reason))
        }
    }
}

/// How long after an unanswered `BeginMigration` the store is watched for
/// the migration it may have recorded.
const ORPHAN_WATCH: Duration = Duration::from_secs(30);

/// A `BeginMigration` whose answer this node never got (no leader, a
/// partition) may still have committed — or commit later, if the request is
/// still on its way to the leader. Left alone, such a migration would stay
/// active with no job behind it, holding the VM in `Migrating` for good (the
/// chaos suite found this). Watch the store for a while and abort it if it
/// shows up; it is recognized by VM, source, target and the proposal's time.
fn abort_if_begun(node: Arc<NodeShared>, vm: String, target: NodeId, at_ms: u64) {
    tokio::spawn(async move {
        let deadline = Instant::now() + ORPHAN_WATCH;
        while Instant::now() < deadline && !node.is_dead() {
            if let Ok(state) = node.cluster.read_linearizable().await {
                let orphan = state
                    .migrations
                    .values()
                    .find(|m| {
                        m.vm == vm
                            && m.source == node.id
                            && m.target == target
                            && m.begun_at_ms == at_ms
                    })
                    .map(|m| (m.id, m.is_active()));
                match orphan {
                    Some((_, false)) => return,
                    Some((migration, true)) => {
                        match node
                            .cluster
                            .write(Command::AbortMigration {
                                migration,
                                reason: "its source never learned that it began".into(),
                                at_ms: now_ms(),
                            })
                            .await
                        {
                            Ok(_) | Err(ClusterError::Rejected(_) | ClusterError::Shutdown) => {
                                tracing::info!(migration, %vm, "aborted a migration whose beginning went unanswered");
                                return;
                            }
                            Err(_) => {}
                        }
                    }
                    None => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

/// Whether `target` answers on `path` within [`PROBE_TIMEOUT`].
async fn probe(
    rpc: Arc<ferry_transport::RpcNode>,
    target: NodeId,
    path: NetworkPath,
) -> Result<(), String> {
    let addr = path.addr.ok_or_else(|| {
        format!(
            "no socket known for node {target} at {} on this network",
            path.ip
        )
    })?;
    rpc.call(target, &[addr], PROBE_SERVICE, Vec::new(), PROBE_TIMEOUT)
        .await
        .map(|_| ())
        .map_err(|e| format!("unreachable at {addr}: {e}"))
}

enum Failure {
    BeforeCommit {
        reason: String,
        paused: bool,
    },
    Cancelled {
        paused: bool,
    },
    /// The store no longer lets this job's guest run (the VM moved on,
    /// was restarted elsewhere, or deleted): drop the copy, resume nothing.
    Superseded,
}

impl Job {
    fn progress(
        &self,
        phase: Phase,
        round: u32,
        bytes_sent: u64,
        remaining: u64,
        policy: Option<&ConvergencePolicy>,
        throttle: f64,
    ) {
        self.emit(self.event(phase, round, bytes_sent, remaining, policy, throttle));
    }

    fn emit(&self, event: Progress) {
        let _ = self.node.events.send(event);
    }

    /// A progress event with no figures of a round in progress.
    fn event(
        &self,
        phase: Phase,
        round: u32,
        bytes_sent: u64,
        remaining: u64,
        policy: Option<&ConvergencePolicy>,
        throttle: f64,
    ) -> Progress {
        Progress {
            migration: self.migration,
            vm: self.req.vm.clone(),
            phase,
            round,
            bytes_sent,
            remaining_pages: remaining,
            dirty_rate: policy.and_then(|p| p.dirty_rate()).unwrap_or(0.0),
            bandwidth: policy.and_then(|p| p.bandwidth()).unwrap_or(0.0),
            expected_downtime: policy.map(|p| p.expected_downtime()).unwrap_or_default(),
            throttle,
            mid_round: false,
            round_bytes_sent: 0,
            rate: 0.0,
            eta: None,
        }
    }

    /// The page-stream paths: the allowed migration networks in the store's
    /// order, each probed on the target's address; the first two that answer
    /// carry the stream (see [`placement::pick_paths`]).
    async fn choose_paths(&self) -> Result<Vec<std::net::SocketAddr>, String> {
        let state = self.node.cluster.read();
        let target = self.req.target;
        let directory = self.node.directory.clone();
        let candidates = placement::candidate_paths(&state, self.node.id, target, |net, ip| {
            directory.migration_addr(target, net, ip)
        });
        drop(state);
        // Probe every candidate at once: an unreachable network costs one
        // probe timeout, not one per network.
        let probes: Vec<_> = candidates
            .iter()
            .map(|c| tokio::spawn(probe(self.node.rpc.clone(), target, c.clone())))
            .collect();
        let mut answers: Vec<Result<(), String>> = Vec::new();
        for p in probes {
            answers.push(
                p.await
                    .unwrap_or_else(|e| Err(format!("probe failed: {e}"))),
            );
        }
        let reachable: Vec<bool> = answers.iter().map(|a| a.is_ok()).collect();
        let used = placement::pick_paths(&candidates, &reachable);
        let mut chosen = Vec::new();
        let mut skipped = Vec::new();
        for (i, (c, answer)) in candidates.iter().zip(&answers).enumerate() {
            match (used.contains(&i), c.addr, answer) {
                (true, Some(addr), _) => chosen.push(PathReport {
                    network: c.network.clone(),
                    addr,
                }),
                (_, _, Err(why)) => skipped.push((c.network.clone(), why.clone())),
                _ => skipped.push((
                    c.network.clone(),
                    format!(
                        "reachable; a spare beyond the {} redundant paths",
                        placement::REDUNDANT_PATHS
                    ),
                )),
            }
        }
        if chosen.is_empty() {
            let why: Vec<String> = skipped.iter().map(|(n, r)| format!("{n}: {r}")).collect();
            return Err(format!(
                "no network allowed for live migration reaches node {target} ({})",
                if why.is_empty() {
                    "none is shared".to_string()
                } else {
                    why.join("; ")
                }
            ));
        }
        if !skipped.is_empty() {
            tracing::info!(
                migration = self.migration,
                ?chosen,
                ?skipped,
                "migration paths"
            );
        }
        let addrs = chosen.iter().map(|p| p.addr).collect();
        *lock(&self.paths) = (chosen, skipped);
        Ok(addrs)
    }

    async fn call(&self, request: &Request) -> Result<Reply, String> {
        self.call_with(request, CallOptions::new(CONTROL_TIMEOUT))
            .await
    }

    /// A control call with its own budget. Every request is safe to repeat:
    /// the transport sends copies on other networks with the same id, and the
    /// target runs it once.
    async fn call_with(&self, request: &Request, opts: CallOptions) -> Result<Reply, String> {
        let bytes = self
            .node
            .rpc
            .call_with(
                self.req.target,
                &self.target_rpc,
                protocol::SERVICE,
                ferry_transport::encode(request),
                opts,
            )
            .await
            .map_err(|e| format!("target unreachable: {e}"))?;
        ferry_transport::decode::<Reply>(&bytes)
            .map_err(|e| format!("malformed reply from the target: {e}"))
    }

    async fn prepare(&self, paths: &[std::net::SocketAddr]) -> Result<PageStreamSender, String> {
        self.ask_prepare().await?;
        self.node
            .rpc
            .open_page_stream(self.req.target, paths, self.migration)
            .await
            .map_err(|e| format!("page stream: {e}"))
    }

    /// Asks the target to `Prepare` a guest shell for the move.
    async fn ask_prepare(&self) -> Result<(), String> {
        let spec = lock(&self.node.vms)
            .get(&self.req.vm)
            .map(|h| h.spec.clone())
            .ok_or_else(|| format!("VM {} vanished from this node", self.req.vm))?;
        let request = Request::Prepare {
            version: protocol::PROTOCOL_VERSION,
            migration: self.migration,
            vm: self.req.vm.clone(),
            epoch: self.epoch,
            spec,
        };
        // The target checks the migration against its own replica, which may
        // trail the commit by a heartbeat: retry that refusal briefly.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match self.call(&request).await? {
                Reply::Prepared => break,
                Reply::Refused { reason }
                    if reason.contains("not (yet)") && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Reply::Refused { reason } => return Err(format!("target refused: {reason}")),
                other => return Err(format!("unexpected reply {other:?}")),
            }
        }
        self.record_phase(MigrationPhase::TargetReady);
        Ok(())
    }

    /// Records a phase in the store without waiting: progress bookkeeping must
    /// not slow the copy down, and losing one record is harmless.
    fn record_phase(&self, phase: MigrationPhase) {
        let cluster = self.node.cluster.clone();
        let migration = self.migration;
        tokio::spawn(async move {
            let _ = cluster
                .write(Command::RecordMigrationPhase {
                    migration,
                    phase,
                    at_ms: now_ms(),
                })
                .await;
        });
    }

    fn cancelled(&self) -> bool {
        self.handle.cancel.load(Ordering::Acquire)
    }

    /// Sends the pages marked in `pages`; returns (pages sent, zero pages, bytes).
    /// Reports progress at least every [`PROGRESS_EVERY`] while it runs:
    /// `base` is the event as the round began (phase, round, the move's bytes
    /// before it), filled in with the round's figures so far.
    async fn send_round(
        &self,
        sender: &PageStreamSender,
        round: u32,
        pages: &DirtyBitmap,
        base: &Progress,
    ) -> Result<(u64, u64, u64), Failure> {
        let meter = std::sync::Mutex::new(RoundMeter::new(
            Instant::now(),
            pages.count(),
            PROGRESS_EVERY,
        ));
        let report_if_due = || {
            let now = Instant::now();
            let sample = {
                let mut meter = lock(&meter);
                meter.due(now).then(|| meter.sample(now))
            };
            if let Some(s) = sample {
                self.emit(Progress {
                    bytes_sent: base.bytes_sent + s.bytes_sent,
                    remaining_pages: s.remaining_pages,
                    mid_round: true,
                    round_bytes_sent: s.bytes_sent,
                    rate: s.rate,
                    eta: s.eta,
                    ..base.clone()
                });
            }
        };
        // The send loop checks after every run of pages; the ticker covers a
        // send or the barrier that waits (a full window, a path being
        // dropped), so the events keep coming while nothing moves.
        let ticker = async {
            loop {
                let due = lock(&meter).next_due();
                tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
                report_if_due();
            }
        };
        let send = self.send_pages(sender, round, pages, |count, bytes| {
            lock(&meter).advance(count, bytes);
            report_if_due();
        });
        tokio::select! {
            done = send => done,
            _ = ticker => unreachable!("the ticker never ends"),
        }
    }

    /// [`send_round`](Self::send_round)'s copy: reads the pages in batches of
    /// up to [`BATCH_PAGES`], sends the non-zero ones (and, after round 0,
    /// markers for the zero ones), and waits until the target applied them
    /// all. `sent_run` hears of each batch (pages, bytes of data).
    ///
    /// Each page is copied once, from guest memory straight into the buffer
    /// that goes to the wire (not zeroed first); zero pages are found in that
    /// buffer and squeezed out in place. Scattered dirty pages share a batch,
    /// so a dirty round goes out in chunks as full as round 0's.
    async fn send_pages(
        &self,
        sender: &PageStreamSender,
        round: u32,
        pages: &DirtyBitmap,
        sent_run: impl Fn(u64, u64),
    ) -> Result<(u64, u64, u64), Failure> {
        let (mut sent, mut zero, mut bytes) = (0, 0, 0);
        let paused = self.guest.is_paused();
        let fail = |reason: String| Failure::BeforeCommit { reason, paused };
        // The cluster's bandwidth cap, read each round: a change applies to moves
        // already running from their next round.
        let cap = self
            .node
            .cluster
            .read()
            .settings
            .bandwidth_cap_bytes_per_sec;
        sender.set_rate_limit(cap);
        let mut runs = pages.runs(BATCH_PAGES).peekable();
        while runs.peek().is_some() {
            if self.cancelled() {
                return Err(Failure::Cancelled { paused });
            }
            let mut batch = Vec::new();
            let mut count = 0;
            while let Some((first, n)) = runs.next_if(|(_, n)| count + n <= BATCH_PAGES) {
                batch.push((first, n));
                count += n;
            }
            let read = read_batch(self.guest.as_ref(), &batch).map_err(|e| fail(e.to_string()))?;
            let data_bytes = read.data.len() as u64;
            if !read.data_pages.is_empty() {
                sender
                    .send_listed(round, &read.data_pages, Some(read.data))
                    .await
                    .map_err(|e| fail(e.to_string()))?;
            }
            // A fresh target is zero already; later rounds must clear pages
            // that held data before.
            if round > 0 && !read.zero_pages.is_empty() {
                sender
                    .send_listed(round, &read.zero_pages, None)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
            }
            sent += read.data_pages.len() as u64;
            zero += read.zero_pages.len() as u64;
            bytes += data_bytes;
            sent_run(count, data_bytes);
        }
        sender
            .barrier(round)
            .await
            .map_err(|e| fail(e.to_string()))?;
        Ok((sent, zero, bytes))
    }

    async fn precopy_and_switch(
        &self,
        sender: PageStreamSender,
        started: Instant,
    ) -> Result<MigrationReport, Failure> {
        let memory = self.guest.page_count() * PAGE_SIZE as u64;
        let mut policy = ConvergencePolicy::new(self.config.clone(), memory).map_err(|e| {
            Failure::BeforeCommit {
                reason: e.to_string(),
                paused: false,
            }
        })?;
        let mut pages = DirtyBitmap::new(self.guest.page_count());
        let mut rounds = Vec::new();
        let mut throttle = 0.0;
        let mut total_bytes = 0;
        let not_paused = |e: ferry_vmm::GuestError| Failure::BeforeCommit {
            reason: e.to_string(),
            paused: false,
        };

        self.guest.start_dirty_log().map_err(not_paused)?;
        // A disk copied with the guest: its blocks follow memory's pages.
        let disk = self
            .guest
            .with_disk()
            .filter(|d| d.copied_blocks() > 0)
            .map(|d| (d.memory_pages(), d.disk().clone()));
        let written_before = disk.as_ref().map_or(0, |(_, d)| d.blocks_written());
        let disk_bytes = |pages: &DirtyBitmap| {
            disk.as_ref().map_or(0, |(from, _)| {
                ferry_vmm::with_disk::count_from(pages, *from) * PAGE_SIZE as u64
            })
        };
        self.guest
            .nonzero_candidates(&mut pages)
            .map_err(not_paused)?;
        let mut round = 0u32;
        let expected_downtime = loop {
            self.record_phase(MigrationPhase::Copying { round });
            self.node.record(|| HistoryEvent::CopyRound {
                migration: self.migration,
                vm: self.req.vm.clone(),
                round,
            });
            let t = Instant::now();
            let base = self.event(
                Phase::Copying,
                round,
                total_bytes,
                pages.count(),
                Some(&policy),
                throttle,
            );
            lock(&self.disk_copy).bytes += disk_bytes(&pages);
            let (sent, zero, bytes) = self.send_round(&sender, round, &pages, &base).await?;
            let elapsed = t.elapsed();
            total_bytes += bytes;
            self.guest
                .fetch_and_clear_dirty(&mut pages)
                .map_err(not_paused)?;
            let dirtied = pages.count();
            rounds.push(RoundReport {
                round,
                pages_sent: sent,
                zero_pages: zero,
                pages_dirtied: dirtied,
                bytes,
                elapsed,
                throttle,
            });
            let decision = policy.decide(RoundStats {
                round,
                pages_sent: sent + zero,
                pages_dirtied: dirtied,
                bytes_sent: bytes,
                elapsed,
                throttle,
            });
            let mut ended = self.event(
                Phase::Copying,
                round,
                total_bytes,
                dirtied,
                Some(&policy),
                throttle,
            );
            ended.round_bytes_sent = bytes;
            ended.rate = bytes as f64 / elapsed.as_secs_f64().max(1e-9);
            self.emit(ended);
            match decision {
                Decision::AnotherRound => {}
                Decision::Throttle { share } => {
                    throttle = share;
                    self.guest.set_throttle(share).map_err(not_paused)?;
                }
                Decision::StopAndCopy {
                    expected_downtime, ..
                } => break expected_downtime,
                Decision::GiveUp { reason } => {
                    let _ = self.guest.set_throttle(0.0);
                    return Err(Failure::BeforeCommit {
                        reason: format!("did not converge: {reason}"),
                        paused: false,
                    });
                }
            }
            round += 1;
        };

        // Blackout.
        let blackout = Instant::now();
        self.guest.pause().map_err(not_paused)?;
        if let Some((_, d)) = &disk {
            let written = d.blocks_written().saturating_sub(written_before);
            lock(&self.disk_copy).blocks_written = written;
        }
        self.node.record(|| HistoryEvent::SourcePaused {
            migration: self.migration,
            vm: self.req.vm.clone(),
            node: self.node.id,
        });
        self.node.observe(
            GuestPoint::Paused,
            self.migration,
            &self.req.vm,
            self.guest.as_ref(),
        );
        // Announced once the guest is paused: a watcher that sees this event
        // knows no vCPU of the source runs.
        self.progress(
            Phase::Blackout,
            round,
            total_bytes,
            pages.count(),
            Some(&policy),
            throttle,
        );
        let paused_err = |reason: String| Failure::BeforeCommit {
            reason,
            paused: true,
        };
        // The blackout's budget: past it, everything before the commit gives
        // up and the guest resumes here (see BLACKOUT_SLACK). Verifying adds
        // what it costs, measured: our digest, the target's, and as much again.
        let budget = policy.config().downtime_limit.max(expected_downtime) + BLACKOUT_SLACK;
        let budget_deadline =
            tokio::time::Instant::from_std(blackout + budget.saturating_sub(COMMIT_RESERVE));
        let over_budget = |budget: Duration| {
            paused_err(format!(
                "the blackout ran past its budget of {budget:?} before the switchover"
            ))
        };
        let base = self.event(
            Phase::Blackout,
            round + 1,
            total_bytes,
            0,
            Some(&policy),
            throttle,
        );
        let (final_sent, final_bytes, state, offload) = tokio::time::timeout_at(
            budget_deadline,
            self.final_round(&sender, &mut pages, &base),
        )
        .await
        .map_err(|_| over_budget(budget))??;
        let final_round = round + 1;
        {
            let mut copy = lock(&self.disk_copy);
            copy.final_bytes = disk_bytes(&pages);
            copy.bytes += copy.final_bytes;
        }
        total_bytes += final_bytes;
        let verifying = Instant::now();
        let digest = self.pause_digest().map_err(paused_err)?;
        // As on the target: a node stopped during the hash hashed discarded
        // memory, and its digest would pass for a bad copy.
        if self.node.is_dead() {
            return Err(paused_err("this node stopped during the blackout".into()));
        }
        let verify_cost = verifying.elapsed() * 3;
        let copy_deadline = budget_deadline + verify_cost;
        if self.cancelled() {
            return Err(Failure::Cancelled { paused: true });
        }
        let left = copy_deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(over_budget(budget + verify_cost));
        }
        match self
            .call_with(
                &Request::Complete {
                    migration: self.migration,
                    device_state: state.encode(),
                    digest,
                    last_round: final_round,
                },
                CallOptions::new(left).hedge_after(BLACKOUT_HEDGE),
            )
            .await
            .map_err(paused_err)?
        {
            Reply::Verified { .. } => {}
            Reply::Refused { reason } => {
                return Err(paused_err(format!("target could not verify: {reason}")))
            }
            other => return Err(paused_err(format!("unexpected reply {other:?}"))),
        }
        // Everything was verified; the stream's own goodbye must not stretch
        // the blackout.
        let _ = tokio::time::timeout(BLACKOUT_HEDGE, sender.finish()).await;
        if self.cancelled() {
            return Err(Failure::Cancelled { paused: true });
        }

        // Switchover: from here on the source never resumes on its own.
        self.progress(
            Phase::SwitchingOver,
            final_round,
            total_bytes,
            0,
            Some(&policy),
            throttle,
        );
        tracing::debug!(
            migration = self.migration,
            ?expected_downtime,
            "committing switchover"
        );
        let epoch = self.switch_over().await?;
        let blackout = blackout.elapsed();
        // The move is done when the target runs the VM; destroying the
        // source's copy (giving its memory back takes tens of milliseconds
        // per GiB) is cleanup after it.
        let total = started.elapsed();
        if self.release_source_copy() {
            // The disk now lives on the target; this node's copy goes.
            crate::disks::remove_copied_disk(self.guest.as_ref());
        }
        self.progress(
            Phase::Completed,
            final_round,
            total_bytes,
            0,
            Some(&policy),
            0.0,
        );
        let (paths, networks_skipped) = lock(&self.paths).clone();
        Ok(MigrationReport {
            migration: self.migration,
            vm: self.req.vm.clone(),
            source: self.node.id,
            target: self.req.target,
            trigger: self.req.trigger,
            rounds,
            final_pages: final_sent,
            bytes: total_bytes,
            total,
            blackout,
            epoch,
            paths,
            networks_skipped,
            offload,
            storage: self.storage_report(),
        })
    }

    /// The switchover, once the target verified its copy: the commit through
    /// the store, then `Resume` to the target. Returns the VM's new epoch.
    async fn switch_over(&self) -> Result<u64, Failure> {
        // A node that died meanwhile (in this process: `NodeShared::kill`,
        // which marks the node dead before it discards its guests' memory)
        // proposes nothing: the pages read since may be the discarded
        // memory's zeros. Seen alive here, the node died after every read.
        if self.node.is_dead() {
            return Err(Failure::BeforeCommit {
                reason: "this node stopped before the switchover".into(),
                paused: true,
            });
        }
        let epoch = self.commit().await?;
        self.node.record(|| HistoryEvent::SwitchoverCommitted {
            migration: self.migration,
            vm: self.req.vm.clone(),
            owner: self.req.target,
            epoch,
        });
        // The target also resumes by itself once it sees the commit; this
        // call only makes it immediate. The source's copy goes either way:
        // it is older than whatever the target may have run and acknowledged
        // since (ARCHITECTURE.md, "the source's copy after the switchover").
        let _ = self
            .call_with(
                &Request::Resume {
                    migration: self.migration,
                    epoch,
                },
                CallOptions::new(CONTROL_TIMEOUT).hedge_after(BLACKOUT_HEDGE),
            )
            .await;
        Ok(epoch)
    }

    /// The blackout's copy: the last dirty pages and the device state.
    /// `base` is its progress event (phase blackout, the final round).
    async fn final_round(
        &self,
        sender: &PageStreamSender,
        pages: &mut DirtyBitmap,
        base: &Progress,
    ) -> Result<FinalRound, Failure> {
        let paused_err = |reason: String| Failure::BeforeCommit {
            reason,
            paused: true,
        };
        let mut last = DirtyBitmap::new(self.guest.page_count());
        self.guest
            .fetch_and_clear_dirty(&mut last)
            .map_err(|e| paused_err(e.to_string()))?;
        pages.union_with(&last);
        if INJECT_PAGE_COPY_BUG.load(Ordering::Relaxed) {
            match last.iter().next().or_else(|| pages.iter().next()) {
                Some(page) => {
                    pages.words_mut()[(page / 64) as usize] &= !(1u64 << (page % 64));
                    tracing::warn!(
                        migration = self.migration,
                        page,
                        "INJECT_PAGE_COPY_BUG: left a dirty page out of the final round"
                    );
                }
                None => tracing::warn!(
                    migration = self.migration,
                    "INJECT_PAGE_COPY_BUG: the final dirty set is empty, nothing left out"
                ),
            }
        }
        // The guest is paused: the last pages go on every path, so a network
        // that died silently costs the blackout nothing instead of its
        // dead-path deadline.
        sender.hedge(true);
        let (final_sent, _, final_bytes) = self.send_round(sender, base.round, pages, base).await?;
        let mut state = self
            .guest
            .save_state()
            .map_err(|e| paused_err(e.to_string()))?;
        let offload = self.push_back_offload(&mut state).map_err(paused_err)?;
        Ok((final_sent, final_bytes, state, offload))
    }

    /// When verifying, the digest of the paused guest that the target must
    /// reproduce.
    fn pause_digest(&self) -> Result<Option<ferry_vmm::MemoryDigest>, String> {
        if !self.req.verify {
            return Ok(None);
        }
        let digest = self.guest.digest().map_err(|e| e.to_string())?;
        *lock(&self.digest_at_pause) = Some(digest);
        self.node.record(|| HistoryEvent::DigestAtPause {
            vm: self.req.vm.clone(),
            node: self.node.id,
            digest,
        });
        Ok(Some(digest))
    }

    /// Pushes the NIC's offloaded TCP connections back into the guest's
    /// software stack (the guest is paused): the offload engine's state
    /// belongs to this host's NIC and cannot travel. The guest's own state is
    /// changed too, so its digest matches what the target restores; the state
    /// as it was is kept to put back if the move aborts.
    fn push_back_offload(
        &self,
        state: &mut ferry_vmm::DeviceState,
    ) -> Result<OffloadReport, String> {
        let original = state.clone();
        let pushed_back = state.nic.push_back();
        if pushed_back > 0 {
            self.guest
                .restore_state(state)
                .map_err(|e| format!("pushing offloaded connections back: {e}"))?;
            *lock(&self.unpushed) = Some(original);
        }
        let target_offload = self
            .node
            .cluster
            .read()
            .nodes
            .get(&self.req.target)
            .is_some_and(|n| n.tcp_offload);
        Ok(OffloadReport {
            pushed_back,
            target_offload,
            reoffloaded: if target_offload {
                state.nic.software_connections.len()
            } else {
                0
            },
        })
    }

    fn storage_report(&self) -> StorageReport {
        let state = self.node.cluster.read();
        match state.vms.get(&self.req.vm).map(|v| &v.config.storage) {
            Some(StorageSpec::Local { size_bytes }) => StorageReport::NodeOwned {
                size_bytes: *size_bytes,
                from: self.node.id,
                to: self.req.target,
                copy: *lock(&self.disk_copy),
            },
            Some(StorageSpec::Shared { volume }) => StorageReport::Shared {
                volume: volume.clone(),
            },
            None => StorageReport::Shared {
                volume: String::new(),
            },
        }
    }

    /// Proposes the switchover and learns its outcome, however long that takes.
    async fn commit(&self) -> Result<u64, Failure> {
        let command = Command::CommitSwitchover {
            migration: self.migration,
            expected_epoch: self.epoch,
            at_ms: now_ms(),
        };
        match self.node.cluster.write(command).await {
            Ok(Response::SwitchedOver { epoch, .. }) => return Ok(epoch),
            Ok(other) => tracing::warn!(?other, "unexpected answer to the switchover"),
            Err(ClusterError::Rejected(CommandError::MigrationNotActive { .. })) => {}
            // Any other refusal is a committed "no" to this very proposal
            // while the migration is still active (`MigrationNotActive` is
            // checked first), so the switchover did not happen: abort. The
            // target entering maintenance mode mid-copy ends here.
            Err(ClusterError::Rejected(e)) => {
                return Err(Failure::BeforeCommit {
                    reason: format!("the store refused the switchover: {e}"),
                    paused: true,
                })
            }
            Err(e) => {
                tracing::warn!(migration = self.migration, error = %e, "switchover outcome unknown; staying paused")
            }
        }
        // The proposal may or may not have committed. Only the store can say;
        // until it does, the guest stays paused.
        loop {
            if self.node.is_dead() {
                return Err(Failure::BeforeCommit {
                    reason: "node stopped".into(),
                    paused: true,
                });
            }
            let state = match self.node.cluster.read_linearizable().await {
                Ok(s) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match state
                .migrations
                .get(&self.migration)
                .map(|m| m.outcome.clone())
            {
                Some(MigrationOutcome::Completed) => {
                    let epoch = state
                        .vms
                        .get(&self.req.vm)
                        .map(|v| v.epoch)
                        .unwrap_or(self.epoch + 1);
                    return Ok(epoch);
                }
                Some(MigrationOutcome::Aborted { reason }) => {
                    return Err(Failure::BeforeCommit {
                        reason: format!("aborted by the store: {reason}"),
                        paused: true,
                    })
                }
                Some(MigrationOutcome::Active) => {
                    // Still active: our proposal was lost. Propose again.
                    let command = Command::CommitSwitchover {
                        migration: self.migration,
                        expected_epoch: self.epoch,
                        at_ms: now_ms(),
                    };
                    match self.node.cluster.write(command).await {
                        Ok(Response::SwitchedOver { epoch, .. }) => return Ok(epoch),
                        Err(ClusterError::Rejected(e))
                            if !matches!(e, CommandError::MigrationNotActive { .. }) =>
                        {
                            return Err(Failure::BeforeCommit {
                                reason: format!("the store refused the switchover: {e}"),
                                paused: true,
                            })
                        }
                        _ => {}
                    }
                }
                // The record was pruned from the history: the VM's own
                // record tells whether it still is this job's to resume.
                None => return self.outcome_without_record(&state),
            }
        }
    }

    /// The migration's record is gone (the store keeps only so much
    /// history): had it committed, the VM would have a later epoch or
    /// another owner. Only a VM still at this job's epoch, on this node, and
    /// in no migration may resume here; anything else is someone else's now.
    fn outcome_without_record(&self, state: &ClusterState) -> Result<u64, Failure> {
        match state.vms.get(&self.req.vm) {
            Some(vm)
                if vm.owner == self.node.id && vm.epoch == self.epoch && vm.migration.is_none() =>
            {
                Err(Failure::BeforeCommit {
                    reason: "the migration ended without a switchover (its record is pruned)"
                        .into(),
                    paused: true,
                })
            }
            // Committed and moved on, or restarted elsewhere: either way not
            // this copy's to run.
            _ => Err(Failure::Superseded),
        }
    }

    /// Returns whether the copy was this job's (and is gone now).
    fn release_source_copy(&self) -> bool {
        // Only this job's copy: while the job waited for the store, the VM may
        // have been restarted on this node as a new guest, which stays.
        let ours = {
            let mut vms = lock(&self.node.vms);
            match vms.get(&self.req.vm) {
                Some(h)
                    if matches!(h.role, Role::Owner { .. })
                        && Arc::ptr_eq(&h.guest, &self.guest) =>
                {
                    vms.remove(&self.req.vm).is_some()
                }
                _ => false,
            }
        };
        self.guest.destroy();
        if ours {
            self.node.record(|| HistoryEvent::CopyDestroyed {
                vm: self.req.vm.clone(),
                node: self.node.id,
            });
        }
        ours
    }

    /// Gives up before any switchover commit: the target discards its copy, the
    /// store records the abort, the source runs on.
    async fn abort(&self, reason: String, paused: bool) -> MigrationError {
        tracing::info!(migration = self.migration, %reason, "aborting migration");
        // Told in the background: the target may be the reason for the abort
        // (unreachable), and the guest must not wait for it to resume here.
        // The target never resumes its copy without a committed switchover.
        let (rpc, target, addrs) = (
            self.node.rpc.clone(),
            self.req.target,
            self.target_rpc.clone(),
        );
        let abandon = ferry_transport::encode(&Request::Abandon {
            migration: self.migration,
            reason: reason.clone(),
        });
        tokio::spawn(async move {
            let _ = rpc
                .call(target, &addrs, protocol::SERVICE, abandon, CONTROL_TIMEOUT)
                .await;
        });
        let _ = self.guest.set_throttle(0.0);
        if paused || self.guest.is_paused() {
            // For the history: the guest as it paused (before its NIC takes
            // offloaded connections back), only when a digest was taken then.
            if self.node.records_history() && lock(&self.digest_at_pause).is_some() {
                if let Ok(digest) = self.guest.digest() {
                    self.node.record(|| HistoryEvent::DigestAtResume {
                        vm: self.req.vm.clone(),
                        node: self.node.id,
                        digest,
                    });
                }
            }
            // The source's NIC takes its offloaded connections back.
            if let Some(original) = lock(&self.unpushed).take() {
                if let Err(e) = self.guest.restore_state(&original) {
                    tracing::warn!(migration = self.migration, "NIC offload not restored: {e}");
                }
            }
            self.node.observe(
                GuestPoint::Resuming,
                self.migration,
                &self.req.vm,
                self.guest.as_ref(),
            );
            // Safe: this job never proposed the switchover (see module doc).
            if self.guest.resume().is_ok() {
                self.node.record(|| HistoryEvent::SourceResumed {
                    migration: self.migration,
                    vm: self.req.vm.clone(),
                    node: self.node.id,
                    epoch: self.epoch,
                });
            }
        }
        // Record the abort before answering, so a caller that moves the VM
        // again right away does not find it still migrating. If the store is
        // unreachable now, keep trying in the background so the migration
        // slot is released eventually; the guest already runs either way.
        let cluster = self.node.cluster.clone();
        let migration = self.migration;
        let why = reason.clone();
        let node = self.node.clone();
        let recorded = cluster
            .write_within(
                Command::AbortMigration {
                    migration,
                    reason: why.clone(),
                    at_ms: now_ms(),
                },
                ABORT_RECORD_WAIT,
            )
            .await;
        let settled = matches!(
            recorded,
            Ok(_) | Err(ClusterError::Rejected(_)) | Err(ClusterError::Shutdown)
        );
        tokio::spawn(async move {
            if settled {
                return;
            }
            // Until the store has it (or the migration ended otherwise): an
            // active record with no job behind it would hold the VM in
            // `Migrating` and the migration slots for good.
            let mut wait = Duration::from_millis(100);
            loop {
                if node.is_dead() {
                    return;
                }
                let state = cluster.read();
                if state
                    .migrations
                    .get(&migration)
                    .is_some_and(|m| !m.is_active())
                {
                    return;
                }
                drop(state);
                match cluster
                    .write(Command::AbortMigration {
                        migration,
                        reason: why.clone(),
                        at_ms: now_ms(),
                    })
                    .await
                {
                    Ok(_) | Err(ClusterError::Rejected(_)) | Err(ClusterError::Shutdown) => return,
                    Err(_) => {
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(2));
                    }
                }
            }
        });
        self.progress(Phase::Aborted, 0, 0, 0, None, 0.0);
        self.node.record(|| HistoryEvent::MigrationEnded {
            migration: self.migration,
            vm: self.req.vm.clone(),
            completed: false,
            reason: Some(reason.clone()),
        });
        MigrationError::Aborted(reason)
    }
}

/// One batch of pages read for the wire: the pages with data and their
/// contents (in page order), and the pages found all zero.
struct ReadBatch {
    data_pages: Vec<u64>,
    data: bytes::Bytes,
    zero_pages: Vec<u64>,
}

/// Reads the runs `batch` (ascending, `(first, count)`) into one buffer and
/// squeezes the zero pages out of it in place.
fn read_batch(guest: &dyn Guest, batch: &[(u64, u64)]) -> ferry_vmm::GuestResult<ReadBatch> {
    let total: u64 = batch.iter().map(|(_, n)| n).sum();
    let len = total as usize * PAGE_SIZE;
    let mut buf = bytes::BytesMut::with_capacity(len);
    let mut at = 0;
    for (first, n) in batch {
        let run = *n as usize * PAGE_SIZE;
        guest.read_pages_uninit(*first, &mut buf.spare_capacity_mut()[at..at + run])?;
        at += run;
    }
    // SAFETY: the reads above initialised all `len` bytes.
    unsafe { buf.set_len(len) };
    let mut data_pages = Vec::with_capacity(total as usize);
    let mut zero_pages = Vec::new();
    let mut kept = 0;
    let pages = batch.iter().flat_map(|(first, n)| *first..first + n);
    for (i, page) in pages.enumerate() {
        let from = i * PAGE_SIZE;
        if is_zero_page(&buf[from..from + PAGE_SIZE]) {
            zero_pages.push(page);
            continue;
        }
        if kept != i {
            buf.copy_within(from..from + PAGE_SIZE, kept * PAGE_SIZE);
        }
        data_pages.push(page);
        kept += 1;
    }
    buf.truncate(kept * PAGE_SIZE);
    Ok(ReadBatch {
        data_pages,
        data: buf.freeze(),
        zero_pages,
    })
}
