//! What the API, the CLI and the dashboard show: JSON views of the cluster
//! store's model and of migration progress.
//!
//! The views are the public shape of the HTTP API, kept apart from the
//! store's internal types so the store can change without breaking scripts:
//! states are lower-case words, nodes are shown by id and name, times are
//! milliseconds.

use ferry_actors::migration::source::{Phase, Progress};
use ferry_cluster::model::{
    ClusterState, DrainStatus, MigrationOutcome, MigrationPhase, MigrationTrigger, MigrationUse,
    NetworkRole, NodeState, ProTipMode, Settings, StorageSpec, TipState, VmState,
};
use ferry_cluster::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: NodeId,
    pub name: String,
    /// `up`, `paused` (maintenance) or `down`.
    pub state: String,
    /// `idle`, `draining`, `drained` or `failed`.
    pub drain: String,
    /// VMs a failed drain could not move, with the reason.
    pub stuck: Vec<StuckView>,
    pub addresses: BTreeMap<String, String>,
    pub cpu_features: Vec<String>,
    pub memory_bytes: u64,
    pub max_vms: u32,
    pub tcp_offload: bool,
    /// VMs running on the node (incoming migrations included).
    pub vms: u32,
    pub memory_used_bytes: u64,
    pub active_migrations: u32,
    /// Whether this node is the Raft leader (as the answering node knows it).
    pub leader: bool,
    /// Why the node was declared down (by the failure detector, an
    /// operator, or its own shutdown); `None` unless it is down.
    pub down_reason: Option<String>,
    /// When it was declared down, in milliseconds since the Unix epoch.
    pub down_since_ms: Option<u64>,
}

/// `DELETE /api/nodes/{node}`'s answer: the node left the cluster and its
/// certificates issued up to `revoked_at_ms` are refused by every node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemovedNodeView {
    pub id: NodeId,
    pub name: String,
    pub revoked_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StuckView {
    pub vm: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmView {
    pub name: String,
    pub owner: NodeId,
    pub owner_name: String,
    /// `off`, `running`, `migrating` or `needs_restart`.
    pub state: String,
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub mac: String,
    /// `sim`, `kvm` or `qemu`.
    pub backend: String,
    pub epoch: u64,
    pub processor_compatibility: bool,
    pub cpu_features: Vec<String>,
    /// `shared:<volume>` or `local:<bytes>`.
    pub storage: String,
    pub migration: Option<u64>,
    /// Whether the cluster restarts it on another node when its node dies.
    pub restart: bool,
    /// Higher restarts first when a dead node's VMs compete for room.
    pub priority: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkView {
    pub name: String,
    pub subnet: String,
    pub gateway: Option<String>,
    /// `private` (no gateway) or `public`.
    pub role: String,
    /// The user's choice: `default`, `allow` or `forbid`.
    pub migration: String,
    /// Whether live migration uses it now.
    pub allowed: bool,
    /// Position in the migration order (0 first).
    pub order: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationView {
    pub id: u64,
    pub vm: String,
    pub source: NodeId,
    pub target: NodeId,
    /// `user`, `drain` or `tip:<id>`.
    pub trigger: String,
    /// Recorded phase: `requested`, `target_ready`, `copying`, `stop_and_copy`,
    /// `verified`, `switched_over`.
    pub phase: String,
    pub round: Option<u32>,
    /// `active`, `completed` or `aborted`.
    pub outcome: String,
    pub reason: Option<String>,
    pub begun_at_ms: u64,
    pub ended_at_ms: Option<u64>,
    /// The latest progress event, when this node has seen one.
    pub progress: Option<ProgressView>,
    /// Every round's progress event this node has seen (for charts).
    pub rounds: Vec<ProgressView>,
    /// What the source measured, once the move completed.
    pub report: Option<ReportView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TipView {
    pub id: u64,
    pub vm: String,
    pub source: NodeId,
    pub target: NodeId,
    pub reason: String,
    /// `pending`, `accepted`, `dismissed`, `expired`, `applied` or `failed`.
    pub state: String,
    pub migration: Option<u64>,
    pub failure: Option<String>,
    pub raised_at_ms: u64,
    pub expires_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettingsView {
    pub downtime_limit_ms: u32,
    pub bandwidth_cap_bytes_per_sec: Option<u64>,
    pub max_migrations_per_node: u32,
    /// `off`, `manual` or `automatic`.
    pub pro_tip_mode: String,
    /// How long a node may go without renewing its lease before the cluster
    /// declares it down and restarts its VMs elsewhere.
    pub failure_detection_ms: u32,
}

/// One progress event of a migration, as its source node reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressView {
    pub migration: u64,
    pub vm: String,
    /// The source node.
    pub node: NodeId,
    /// `prechecks`, `preparing`, `copying`, `blackout`, `switching_over`,
    /// `completed`, `aborted`.
    pub phase: String,
    pub round: u32,
    /// Bytes of page data sent in the whole move so far.
    pub bytes_sent: u64,
    /// Mid-round: pages of the round still to send. At a round's end: pages
    /// dirtied during it, which the next round sends.
    pub remaining_pages: u64,
    /// `remaining_pages` in bytes (at most: zero pages travel as markers).
    pub bytes_remaining: u64,
    /// Pages per second dirtied during the last round.
    pub dirty_rate: f64,
    /// Bytes per second the page stream delivered in the last round.
    pub bandwidth: f64,
    pub expected_downtime_ms: f64,
    pub throttle: f64,
    /// Whether the round was still sending (events come at least every
    /// 250 ms while it does); false on the event that ends a round.
    pub mid_round: bool,
    /// Bytes of page data sent in this round so far.
    pub round_bytes_sent: u64,
    /// Bytes per second sent over this round so far.
    pub rate: f64,
    /// Time until the round's last page is sent, at its pace so far
    /// (mid-round events, once a page went out).
    pub eta_ms: Option<f64>,
    /// Copied share so far: bytes sent / (bytes sent + pages still to send).
    pub percent: f64,
    pub at_ms: u64,
}

/// A completed migration, as its source measured it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportView {
    pub migration: u64,
    pub vm: String,
    pub source: NodeId,
    pub target: NodeId,
    pub rounds: u32,
    pub bytes: u64,
    pub final_pages: u64,
    pub total_ms: f64,
    pub blackout_ms: f64,
    pub epoch: u64,
    /// `job` (the source's own report) or `events` (rebuilt from the progress
    /// events this node saw: times at millisecond resolution, from the
    /// blackout event to the completion event).
    pub source_of_figures: String,
}

/// What resuming a node with failback did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FailbackView {
    /// VMs moved back, with the epoch they run at.
    pub moved: Vec<MovedBack>,
    /// VMs that stayed where the drain put them, with the reason.
    pub failed: Vec<StuckView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MovedBack {
    pub vm: String,
    pub epoch: u64,
}

impl FailbackView {
    pub fn from_report(r: &ferry_actors::triggers::drain::FailbackReport) -> FailbackView {
        FailbackView {
            moved: r
                .moved
                .iter()
                .map(|(vm, epoch)| MovedBack {
                    vm: vm.clone(),
                    epoch: *epoch,
                })
                .collect(),
            failed: r
                .failed
                .iter()
                .map(|(vm, reason)| StuckView {
                    vm: vm.clone(),
                    reason: reason.clone(),
                })
                .collect(),
        }
    }
}

/// `POST /api/nodes/{node}/resume`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumedView {
    pub node: NodeView,
    pub failback: FailbackView,
}

/// `GET /api/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    pub node: NodeId,
    pub name: String,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_applied: Option<u64>,
    pub voters: Vec<NodeId>,
    pub nodes: usize,
    pub nodes_up: usize,
    pub vms: usize,
    pub vms_running: usize,
    pub active_migrations: usize,
    pub pending_tips: usize,
    pub version: String,
    /// The answering node's lease.
    pub failover: FailoverView,
}

/// Where a node stands with failover: its lease (its guests run only while
/// it holds one) and how often it lost it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FailoverView {
    /// Whether the node holds its lease now.
    pub leased: bool,
    /// What is left of the lease, in milliseconds (0 without one).
    pub lease_left_ms: u64,
    /// Times its lease lapsed while it ran (its guests stopped).
    pub lapses: u64,
    /// Times the cluster declared it down and it dropped its guests.
    pub downs: u64,
}

impl FailoverView {
    pub fn from_status(s: &ferry_actors::triggers::failover::FailoverStatus) -> FailoverView {
        FailoverView {
            leased: s.leased,
            lease_left_ms: s.lease_left_ms,
            lapses: s.lapses,
            downs: s.downs,
        }
    }
}

/// The pre-move estimate, with what it was computed from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EstimateView {
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub rounds: u32,
    pub converges: bool,
    pub needs_throttle: bool,
    pub memory_bytes: u64,
    /// Pages that may hold data, which round 0 sends (zero pages it skips),
    /// if the guest could tell.
    pub nonzero_pages: Option<u64>,
    /// Distinct pages dirtied per second.
    pub dirty_rate: f64,
    /// `sampled` (from the guest's dirty log just now) or `configured` (the
    /// VM's workload setting, when no sample could be taken).
    pub dirty_rate_source: String,
    /// Where the dirty rate came from, in words (the window sampled, or why
    /// no sample was taken).
    pub dirty_rate_basis: String,
    /// How long the dirty log was watched, when sampled.
    pub sample_window_ms: Option<f64>,
    /// Bytes per second, the cluster's bandwidth cap applied.
    pub bandwidth: f64,
    /// `measured` (in a recent move), `probed` (just now, over the migration
    /// networks to the target) or `assumed`.
    pub bandwidth_source: String,
    /// Where the bandwidth came from, in words.
    pub bandwidth_basis: String,
    /// Expected time from the request to round 0.
    pub setup_ms: f64,
    /// The node the estimated move goes to (the probe's far end), if any.
    pub target: Option<NodeId>,
    pub target_name: Option<String>,
    pub summary: String,
}

/// The answer to a move request: the migration is recorded and copying.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoveStarted {
    pub migration: u64,
    pub vm: String,
    pub source: NodeId,
    pub target: NodeId,
    pub target_name: String,
    pub estimate: Option<EstimateView>,
}

pub fn node_state(s: NodeState) -> &'static str {
    match s {
        NodeState::Up => "up",
        NodeState::Paused => "paused",
        NodeState::Down => "down",
    }
}

pub fn vm_state(s: VmState) -> &'static str {
    match s {
        VmState::Off => "off",
        VmState::Running => "running",
        VmState::Migrating => "migrating",
        VmState::NeedsRestart => "needs_restart",
    }
}

pub fn tip_mode(m: ProTipMode) -> &'static str {
    match m {
        ProTipMode::Off => "off",
        ProTipMode::Manual => "manual",
        ProTipMode::Automatic => "automatic",
    }
}

pub fn parse_tip_mode(s: &str) -> Option<ProTipMode> {
    match s {
        "off" => Some(ProTipMode::Off),
        "manual" => Some(ProTipMode::Manual),
        "automatic" => Some(ProTipMode::Automatic),
        _ => None,
    }
}

pub fn migration_use(m: MigrationUse) -> &'static str {
    match m {
        MigrationUse::Default => "default",
        MigrationUse::Allow => "allow",
        MigrationUse::Forbid => "forbid",
    }
}

pub fn parse_migration_use(s: &str) -> Option<MigrationUse> {
    match s {
        "default" => Some(MigrationUse::Default),
        "allow" => Some(MigrationUse::Allow),
        "forbid" => Some(MigrationUse::Forbid),
        _ => None,
    }
}

pub fn phase_name(p: &Phase) -> &'static str {
    match p {
        Phase::Prechecks => "prechecks",
        Phase::Preparing => "preparing",
        Phase::Copying => "copying",
        Phase::Blackout => "blackout",
        Phase::SwitchingOver => "switching_over",
        Phase::Completed => "completed",
        Phase::Aborted => "aborted",
    }
}

fn trigger(t: MigrationTrigger) -> String {
    match t {
        MigrationTrigger::User => "user".into(),
        MigrationTrigger::Drain => "drain".into(),
        MigrationTrigger::Tip(id) => format!("tip:{id}"),
    }
}

fn recorded_phase(p: MigrationPhase) -> (&'static str, Option<u32>) {
    match p {
        MigrationPhase::Requested => ("requested", None),
        MigrationPhase::TargetReady => ("target_ready", None),
        MigrationPhase::Copying { round } => ("copying", Some(round)),
        MigrationPhase::StopAndCopy => ("stop_and_copy", None),
        MigrationPhase::Verified => ("verified", None),
        MigrationPhase::SwitchedOver => ("switched_over", None),
    }
}

impl ProgressView {
    pub fn from_progress(node: NodeId, p: &Progress, at_ms: u64) -> ProgressView {
        let remaining = p
            .remaining_pages
            .saturating_mul(ferry_transport::PAGE_SIZE as u64);
        let percent = match p.phase {
            Phase::Completed | Phase::SwitchingOver => 100.0,
            _ if p.bytes_sent == 0 => 0.0,
            _ => 100.0 * p.bytes_sent as f64 / (p.bytes_sent + remaining) as f64,
        };
        ProgressView {
            migration: p.migration,
            vm: p.vm.clone(),
            node,
            phase: phase_name(&p.phase).into(),
            round: p.round,
            bytes_sent: p.bytes_sent,
            remaining_pages: p.remaining_pages,
            bytes_remaining: remaining,
            dirty_rate: finite(p.dirty_rate),
            bandwidth: finite(p.bandwidth),
            expected_downtime_ms: p.expected_downtime.as_secs_f64() * 1e3,
            throttle: finite(p.throttle),
            mid_round: p.mid_round,
            round_bytes_sent: p.round_bytes_sent,
            rate: finite(p.rate),
            eta_ms: p.eta.map(|d| d.as_secs_f64() * 1e3),
            percent,
            at_ms,
        }
    }

    /// Whether the migration ended with this event.
    pub fn is_final(&self) -> bool {
        self.phase == "completed" || self.phase == "aborted"
    }
}

fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

impl ReportView {
    pub fn from_report(r: &ferry_actors::migration::source::MigrationReport) -> ReportView {
        ReportView {
            migration: r.migration,
            vm: r.vm.clone(),
            source: r.source,
            target: r.target,
            rounds: r.rounds.len() as u32,
            bytes: r.bytes,
            final_pages: r.final_pages,
            total_ms: r.total.as_secs_f64() * 1e3,
            blackout_ms: r.blackout.as_secs_f64() * 1e3,
            epoch: r.epoch,
            source_of_figures: "job".into(),
        }
    }

    /// A report rebuilt from the progress events of a completed migration
    /// whose source did not send one (moves started by a drain or a tip).
    pub fn from_events(
        m: &ferry_cluster::model::Migration,
        events: &[ProgressView],
    ) -> Option<ReportView> {
        let done = events.iter().find(|p| p.phase == "completed")?;
        let blackout = events.iter().find(|p| p.phase == "blackout")?;
        let first = events.first()?;
        Some(ReportView {
            migration: m.id,
            vm: m.vm.clone(),
            source: m.source,
            target: m.target,
            rounds: events
                .iter()
                .filter(|p| p.phase == "copying" && !p.mid_round)
                .count() as u32,
            bytes: done.bytes_sent,
            final_pages: blackout.remaining_pages,
            total_ms: done.at_ms.saturating_sub(m.begun_at_ms.min(first.at_ms)) as f64,
            blackout_ms: done.at_ms.saturating_sub(blackout.at_ms) as f64,
            epoch: m.epoch + 1,
            source_of_figures: "events".into(),
        })
    }
}

pub fn node_name(state: &ClusterState, id: NodeId) -> String {
    state
        .nodes
        .get(&id)
        .map(|n| n.name.clone())
        .unwrap_or_else(|| format!("node {id}"))
}

pub fn nodes(state: &ClusterState, leader: Option<NodeId>) -> Vec<NodeView> {
    state
        .nodes
        .values()
        .map(|n| {
            let load = state.node_load(n.id);
            let (drain, stuck) = match &n.drain {
                DrainStatus::Idle => ("idle", Vec::new()),
                DrainStatus::Draining => ("draining", Vec::new()),
                DrainStatus::Drained => ("drained", Vec::new()),
                DrainStatus::Failed { stuck } => (
                    "failed",
                    stuck
                        .iter()
                        .map(|s| StuckView {
                            vm: s.vm.clone(),
                            reason: s.reason.clone(),
                        })
                        .collect(),
                ),
            };
            NodeView {
                id: n.id,
                name: n.name.clone(),
                state: node_state(n.state).into(),
                drain: drain.into(),
                stuck,
                addresses: n
                    .addresses
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_string()))
                    .collect(),
                cpu_features: n.cpu_features.iter().cloned().collect(),
                memory_bytes: n.capacity.memory_bytes,
                max_vms: n.capacity.max_vms,
                tcp_offload: n.tcp_offload,
                vms: load.vms,
                memory_used_bytes: load.memory_bytes,
                active_migrations: load.migrations,
                leader: leader == Some(n.id),
                down_reason: n.down.as_ref().map(|d| d.reason.clone()),
                down_since_ms: n.down.as_ref().map(|d| d.at_ms),
            }
        })
        .collect()
}

pub fn vm(state: &ClusterState, v: &ferry_cluster::model::Vm) -> VmView {
    VmView {
        name: v.name.clone(),
        owner: v.owner,
        owner_name: node_name(state, v.owner),
        state: vm_state(v.state).into(),
        memory_bytes: v.config.memory_bytes,
        vcpus: v.config.vcpus,
        mac: v.config.mac.to_string(),
        backend: match v.config.backend {
            ferry_cluster::model::Backend::Sim => "sim",
            ferry_cluster::model::Backend::Kvm => "kvm",
            ferry_cluster::model::Backend::Qemu => "qemu",
        }
        .into(),
        epoch: v.epoch,
        processor_compatibility: v.processor_compatibility,
        cpu_features: v.cpu_features.iter().cloned().collect(),
        storage: match &v.config.storage {
            StorageSpec::Shared { volume } => format!("shared:{volume}"),
            StorageSpec::Local { size_bytes } => format!("local:{size_bytes}"),
        },
        migration: v.migration,
        restart: v.config.failover.restart,
        priority: v.config.failover.priority,
    }
}

pub fn vms(state: &ClusterState) -> Vec<VmView> {
    state.vms.values().map(|v| vm(state, v)).collect()
}

pub fn networks(state: &ClusterState) -> Vec<NetworkView> {
    let mut out: Vec<NetworkView> = state
        .networks
        .values()
        .map(|n| NetworkView {
            name: n.name.clone(),
            subnet: n.subnet.to_string(),
            gateway: n.gateway.map(|g| g.to_string()),
            role: match n.role() {
                NetworkRole::Private => "private".into(),
                NetworkRole::Public => "public".into(),
            },
            migration: migration_use(n.migration).into(),
            allowed: n.allowed_for_migration(),
            order: state
                .migration_order
                .iter()
                .position(|x| x == &n.name)
                .unwrap_or(usize::MAX),
        })
        .collect();
    out.sort_by_key(|n| n.order);
    out
}

/// A migration from the store, with what this node saw of its progress.
pub fn migration(
    m: &ferry_cluster::model::Migration,
    rounds: Vec<ProgressView>,
    report: Option<ReportView>,
) -> MigrationView {
    let (phase, round) = recorded_phase(m.phase);
    let report = match (&m.outcome, report) {
        (MigrationOutcome::Completed, None) => ReportView::from_events(m, &rounds),
        (_, r) => r,
    };
    let (outcome, reason) = match &m.outcome {
        MigrationOutcome::Active => ("active", None),
        MigrationOutcome::Completed => ("completed", None),
        MigrationOutcome::Aborted { reason } => ("aborted", Some(reason.clone())),
    };
    MigrationView {
        id: m.id,
        vm: m.vm.clone(),
        source: m.source,
        target: m.target,
        trigger: trigger(m.trigger),
        phase: phase.into(),
        round,
        outcome: outcome.into(),
        reason,
        begun_at_ms: m.begun_at_ms,
        ended_at_ms: m.ended_at_ms,
        progress: rounds.last().cloned(),
        rounds,
        report,
    }
}

pub fn tips(state: &ClusterState) -> Vec<TipView> {
    state
        .tips
        .values()
        .map(|t| {
            let (s, migration, failure) = match &t.state {
                TipState::Pending => ("pending", None, None),
                TipState::Accepted => ("accepted", None, None),
                TipState::Dismissed => ("dismissed", None, None),
                TipState::Expired => ("expired", None, None),
                TipState::Applied { migration } => ("applied", Some(*migration), None),
                TipState::Failed { reason } => ("failed", None, Some(reason.clone())),
            };
            TipView {
                id: t.id,
                vm: t.vm.clone(),
                source: t.source,
                target: t.target,
                reason: t.reason.clone(),
                state: s.into(),
                migration,
                failure,
                raised_at_ms: t.raised_at_ms,
                expires_at_ms: t.expires_at_ms,
            }
        })
        .collect()
}

pub fn settings(s: &Settings) -> SettingsView {
    SettingsView {
        downtime_limit_ms: s.downtime_limit_ms,
        bandwidth_cap_bytes_per_sec: s.bandwidth_cap_bytes_per_sec,
        max_migrations_per_node: s.max_migrations_per_node,
        pro_tip_mode: tip_mode(s.pro_tip_mode).into(),
        failure_detection_ms: s.failure_detection_ms,
    }
}
