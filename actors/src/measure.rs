//! What a pre-move estimate is computed from, measured rather than assumed:
//! the guest's dirty rate sampled from its dirty log, the bandwidth to the
//! target from a recent move there or from a probe over the migration
//! networks, and how much of memory round 0 must send.
//!
//! Everything is measured on the node that runs the VM, which is the source
//! of the move it predicts: the dirty log is there, and so is the end of the
//! link the page stream leaves from. [`measure`] runs there, or asks that
//! node over the [`MEASURE_SERVICE`] RPC. The policy side, which plays a
//! modelled guest against the convergence policy, is
//! [`policy::estimate`](crate::policy::estimate); [`Measurements::factors`]
//! is what it is fed.
//!
//! - **Dirty rate**: [`NodeShared::sample_dirty_rate`] over
//!   [`MeasureOptions::window`]. Never while a migration of the VM runs (the
//!   log is the migration's then); the VM's configured rate stands in, and
//!   the estimate says so.
//! - **Bandwidth**: the page-data rate of the last move from this node to the
//!   target, if it ended within [`MeasureOptions::recent_move`] and under the
//!   same bandwidth cap; else a probe: the source reads guest pages as a move
//!   does and sends them over the migration networks' page stream into a
//!   scratch memory on the target ([`BANDWIDTH_PROBE_SERVICE`]), for up to
//!   [`MeasureOptions::probe_bytes`] or [`MeasureOptions::probe_time`]: the
//!   same reads, the same encryption, the same paths and the same writes into
//!   fresh guest memory on the far side, under the load the nodes carry now.
//!   Its first sixteenth shows what the stream takes to get going (counted in
//!   the setup), the rest its steady rate. Capped by the cluster's bandwidth
//!   cap. Only with no target to probe (a one-node cluster) is the bandwidth
//!   assumed.
//! - **Setup** (request to round 0: the store's record, the target's
//!   preparation, opening the paths; and the stream getting going): the last
//!   move's, else what the probe took to ready its own stream on the target
//!   and get it going, else an assumed allowance.

use crate::migration::source::MigrationReport;
use crate::node::{lock, spec_of, DirtySample, NodeShared};
use crate::policy::estimate::Factors;
use crate::policy::placement;
use ferry_cluster::NodeId;
use ferry_transport::{PageSink, PAGE_SIZE};
use ferry_vmm::memory::GuestMemory;
use ferry_vmm::{DirtyBitmap, Guest};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// RPC service of the node that runs a VM: measures the VM for a move
/// ([`measure_here`]) for a node asked for an estimate.
pub const MEASURE_SERVICE: &str = "migration-measure";
/// RPC service of a would-be target: takes a probe's page stream into
/// scratch memory and throws it away.
pub const BANDWIDTH_PROBE_SERVICE: &str = "migration-bandwidth-probe";

/// Bandwidth assumed when nothing was measured and nothing can be probed.
pub const ASSUMED_BANDWIDTH: f64 = 500e6;
/// Setup assumed when neither a move nor a probe measured one.
pub const ASSUMED_SETUP: Duration = Duration::from_millis(20);
/// Largest probe a target accepts (its scratch memory).
const MAX_PROBE_BYTES: u64 = 256 << 20;
/// Longest sampling window a node serves to a peer.
const MAX_WINDOW: Duration = Duration::from_secs(5);
/// Pages read from the guest and queued on the probe's stream at a time (as a
/// move does).
const PROBE_BATCH_PAGES: u64 = 256;
/// A probe's first part, which shows what the stream takes to get going, is
/// this fraction of it.
const PROBE_WARM_UP_PART: u64 = 16;
/// How long a target keeps a probe's stream open for the source to use it.
const PROBE_STREAM_LIFETIME: Duration = Duration::from_secs(30);
/// Deadline of each control call of a probe or a remote measurement, on top
/// of the time the measurement itself takes.
const CALL_SLACK: Duration = Duration::from_secs(5);
/// Page-stream ids of probes carry this bit; a migration's stream id is its
/// id in the store, which never comes near it.
pub const PROBE_STREAM_BIT: u64 = 1 << 63;
/// Probe streams opened by this process, for unique stream ids.
static PROBES: AtomicU64 = AtomicU64::new(0);
/// Measurements an estimate for a move may reuse instead of measuring again.
const REUSABLE_FOR: Duration = Duration::from_secs(60);

/// How to measure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeasureOptions {
    /// How long the dirty log is watched.
    pub window: Duration,
    /// The most page data a probe sends (also the size of the scratch
    /// memory it fills on the target: each page goes to fresh memory there,
    /// as in a move).
    pub probe_bytes: u64,
    /// How long a probe sends at most once going (it then waits for what is
    /// in flight).
    pub probe_time: Duration,
    /// A move from this node to the target that ended within this long ago
    /// gives the bandwidth without a probe.
    pub recent_move: Duration,
}

impl Default for MeasureOptions {
    fn default() -> Self {
        MeasureOptions {
            window: Duration::from_millis(300),
            probe_bytes: 256 << 20,
            probe_time: Duration::from_millis(500),
            recent_move: Duration::from_secs(600),
        }
    }
}

/// Where an estimate's dirty rate came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DirtyRateBasis {
    /// Sampled from the guest's dirty log.
    Sampled(DirtySample),
    /// The VM's configured workload rate, because no sample could be taken.
    Configured { why: String },
}

/// Where an estimate's bandwidth came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BandwidthBasis {
    /// The page-data rate of the last move from `source` to `target`, which
    /// ended `age` ago.
    RecentMove {
        migration: u64,
        source: NodeId,
        target: NodeId,
        age: Duration,
    },
    /// A probe from `source` to `target` just now: `bytes` of guest pages in
    /// `elapsed` over the migration networks, once the stream was going; it
    /// took `ramp` longer to get going than its steady rate accounts for
    /// (counted in the setup).
    Probed {
        source: NodeId,
        target: NodeId,
        bytes: u64,
        elapsed: Duration,
        ramp: Duration,
    },
    /// The rate of the last copy round the asking node heard of, in any
    /// move in the cluster (what an estimate falls back on when the node
    /// that runs the VM could not measure).
    LastRoundSeen,
    /// Nothing measured: the reason.
    Assumed { why: String },
}

/// What the estimate of one move is computed from, and how each figure was
/// come by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurements {
    pub vm: String,
    /// The node that runs the VM (the move's source), where it was measured.
    pub node: NodeId,
    /// The move's target, if one was known (the probe's far end).
    pub target: Option<NodeId>,
    pub memory_bytes: u64,
    /// Pages that may hold data (round 0 sends no others), if the guest
    /// could tell.
    pub nonzero_pages: Option<u64>,
    /// Distinct pages dirtied per second.
    pub dirty_rate: f64,
    pub dirty_basis: DirtyRateBasis,
    /// Bytes per second, the cluster's cap applied.
    pub bandwidth: f64,
    pub bandwidth_basis: BandwidthBasis,
    /// The cluster's bandwidth cap, where it is below what was measured.
    pub capped_at: Option<u64>,
    /// Request to round 0.
    pub setup: Duration,
}

impl Measurements {
    /// The estimate's inputs.
    pub fn factors(&self) -> Factors {
        Factors {
            memory_bytes: self.memory_bytes,
            nonzero_pages: self.nonzero_pages,
            dirty_rate: self.dirty_rate,
            bandwidth: self.bandwidth,
            setup: self.setup,
        }
    }

    /// `"sampled"` or `"configured"`.
    pub fn dirty_source(&self) -> &'static str {
        match self.dirty_basis {
            DirtyRateBasis::Sampled(_) => "sampled",
            DirtyRateBasis::Configured { .. } => "configured",
        }
    }

    /// `"measured"` (a recent move), `"probed"` or `"assumed"`.
    pub fn bandwidth_source(&self) -> &'static str {
        match self.bandwidth_basis {
            BandwidthBasis::RecentMove { .. } | BandwidthBasis::LastRoundSeen => "measured",
            BandwidthBasis::Probed { .. } => "probed",
            BandwidthBasis::Assumed { .. } => "assumed",
        }
    }

    /// The dirty rate's basis in words.
    pub fn dirty_words(&self) -> String {
        match &self.dirty_basis {
            DirtyRateBasis::Sampled(s) => format!(
                "sampled from the guest's dirty log over {:.0} ms ({} pages)",
                s.window.as_secs_f64() * 1e3,
                s.pages
            ),
            DirtyRateBasis::Configured { why } => {
                format!("the VM's configured rate (not sampled: {why})")
            }
        }
    }

    /// The bandwidth's basis in words.
    pub fn bandwidth_words(&self) -> String {
        let mut words = match &self.bandwidth_basis {
            BandwidthBasis::RecentMove {
                migration,
                source,
                target,
                age,
            } => format!(
                "measured in migration {migration} from node {source} to node {target}, {:.0} s ago",
                age.as_secs_f64()
            ),
            BandwidthBasis::Probed {
                source,
                target,
                bytes,
                elapsed,
                ramp,
            } => format!(
                "probed just now: {:.1} MiB from node {source} to node {target} in {:.0} ms once going, {:.0} ms to get going",
                *bytes as f64 / (1 << 20) as f64,
                elapsed.as_secs_f64() * 1e3,
                ramp.as_secs_f64() * 1e3
            ),
            BandwidthBasis::LastRoundSeen => {
                "measured in the last copy round of a move this node heard of".into()
            }
            BandwidthBasis::Assumed { why } => format!("assumed ({why})"),
        };
        if let Some(cap) = self.capped_at {
            words.push_str(&format!(
                ", capped at {:.0} MiB/s by the cluster's bandwidth cap",
                cap as f64 / (1 << 20) as f64
            ));
        }
        words
    }
}

impl fmt::Display for Measurements {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} MiB", self.memory_bytes >> 20,)?;
        if let Some(pages) = self.nonzero_pages {
            write!(
                f,
                " ({} MiB in use)",
                pages.saturating_mul(PAGE_SIZE as u64) >> 20
            )?;
        }
        write!(
            f,
            ", {:.0} pages/s dirtied ({}), {:.0} MiB/s ({}), setup {:.0} ms",
            self.dirty_rate,
            self.dirty_words(),
            self.bandwidth / (1 << 20) as f64,
            self.bandwidth_words(),
            self.setup.as_secs_f64() * 1e3
        )
    }
}

/// What a completed move from this node measured of its link.
#[derive(Debug, Clone)]
struct MoveMeasured {
    migration: u64,
    ended: Instant,
    /// Page data over the time of the copy rounds.
    bandwidth: f64,
    setup: Duration,
    /// The cluster's cap while it ran.
    cap: Option<u64>,
}

/// A node's memory of what it measured (kept in [`NodeShared`]).
#[derive(Default)]
pub(crate) struct Book {
    /// The last completed move from this node to each target.
    moves: Mutex<HashMap<NodeId, MoveMeasured>>,
    /// The last measurements this node asked for, per VM.
    asked: Mutex<HashMap<String, (Instant, Measurements)>>,
    /// The probe stream this node serves to each peer: one each, so a member
    /// that asks for probe after probe holds one probe's scratch memory, not
    /// one per request for [`PROBE_STREAM_LIFETIME`] each.
    probes_served: Mutex<HashMap<NodeId, tokio::task::AbortHandle>>,
}

/// Records what a completed move from `node` measured, for the estimates of
/// the next moves to the same target.
pub(crate) fn note_move(node: &NodeShared, report: &MigrationReport) {
    let copy: Duration = report.rounds.iter().map(|r| r.elapsed).sum();
    let bytes: u64 = report.rounds.iter().map(|r| r.bytes).sum();
    if copy.is_zero() || bytes == 0 {
        return;
    }
    let setup = report
        .total
        .saturating_sub(report.blackout)
        .saturating_sub(copy);
    let cap = node.cluster.read().settings.bandwidth_cap_bytes_per_sec;
    lock(&node.measured.moves).insert(
        report.target,
        MoveMeasured {
            migration: report.migration,
            ended: Instant::now(),
            bandwidth: bytes as f64 / copy.as_secs_f64(),
            setup,
            cap,
        },
    );
}

/// The measurements this node took for `vm` within the last minute, for a
/// move to `target` (any, if `None`): what a move request's estimate uses,
/// as it cannot wait for a fresh sample.
pub fn recent(node: &NodeShared, vm: &str, target: Option<NodeId>) -> Option<Measurements> {
    lock(&node.measured.asked)
        .get(vm)
        .filter(|(at, m)| at.elapsed() < REUSABLE_FOR && (target.is_none() || m.target == target))
        .map(|(_, m)| m.clone())
}

/// Measures `vm` for a move to `target` on the node that runs it: here, or
/// over [`MEASURE_SERVICE`]. Remembered for [`recent`].
pub async fn measure(
    node: &Arc<NodeShared>,
    vm: &str,
    target: Option<NodeId>,
    opts: &MeasureOptions,
) -> Result<Measurements, String> {
    let owner = node
        .cluster
        .read()
        .vms
        .get(vm)
        .map(|v| v.owner)
        .ok_or_else(|| format!("unknown VM {vm}"))?;
    let measured = if owner == node.id {
        measure_here(node, vm, target, opts).await?
    } else {
        let request = MeasureRequest {
            vm: vm.into(),
            target,
            opts: opts.clone(),
        };
        let addrs = node.directory.get(owner).map(|p| p.rpc).unwrap_or_default();
        let deadline = opts.window.max(opts.probe_time * 4) + CALL_SLACK;
        let reply = node
            .rpc
            .call(
                owner,
                &addrs,
                MEASURE_SERVICE,
                ferry_transport::encode(&request),
                deadline,
            )
            .await
            .map_err(|e| format!("node {owner}, which runs {vm}: {e}"))?;
        ferry_transport::decode::<Result<Measurements, String>>(&reply)
            .map_err(|e| format!("malformed measurements from node {owner}: {e}"))??
    };
    lock(&node.measured.asked).insert(vm.to_string(), (Instant::now(), measured.clone()));
    Ok(measured)
}

/// Measures `vm`, which this node runs, for a move to `target`: the dirty
/// rate and the bandwidth at once.
pub async fn measure_here(
    node: &Arc<NodeShared>,
    vm: &str,
    target: Option<NodeId>,
    opts: &MeasureOptions,
) -> Result<Measurements, String> {
    let guest = node
        .guest(vm)
        .ok_or_else(|| format!("VM {vm} does not run on node {}", node.id))?;
    let state = node.cluster.read();
    let configured = state
        .vms
        .get(vm)
        .and_then(|v| spec_of(&v.config).ok())
        .and_then(|s| s.workload.dirty_pages_per_sec);
    let cap = state.settings.bandwidth_cap_bytes_per_sec;
    drop(state);
    let memory_bytes = guest.page_count() * PAGE_SIZE as u64;
    let mut candidates = DirtyBitmap::new(guest.page_count());
    let nonzero_pages = guest
        .nonzero_candidates(&mut candidates)
        .ok()
        .map(|()| candidates.count());

    let (sample, (bandwidth, bandwidth_basis, setup)) = tokio::join!(
        node.sample_dirty_rate(vm, opts.window),
        link(node, guest.as_ref(), target, cap, opts),
    );
    let (dirty_rate, dirty_basis) = match sample {
        Ok(s) => (s.rate(), DirtyRateBasis::Sampled(s)),
        Err(why) => (
            configured.unwrap_or(0) as f64,
            DirtyRateBasis::Configured {
                why: why.to_string(),
            },
        ),
    };
    let capped_at = cap.filter(|&c| (c as f64) < bandwidth);
    Ok(Measurements {
        vm: vm.into(),
        node: node.id,
        target,
        memory_bytes,
        nonzero_pages,
        dirty_rate,
        dirty_basis,
        bandwidth: capped_at.map_or(bandwidth, |c| c as f64),
        bandwidth_basis,
        capped_at,
        setup,
    })
}

/// The link to `target`: a recent move's figures, else a probe's, else
/// assumed ones. (bandwidth before the cap, basis, setup)
async fn link(
    node: &Arc<NodeShared>,
    guest: &dyn Guest,
    target: Option<NodeId>,
    cap: Option<u64>,
    opts: &MeasureOptions,
) -> (f64, BandwidthBasis, Duration) {
    let Some(target) = target else {
        return (
            ASSUMED_BANDWIDTH,
            BandwidthBasis::Assumed {
                why: "no node to move to, so none to probe".into(),
            },
            ASSUMED_SETUP,
        );
    };
    let recent = lock(&node.measured.moves)
        .get(&target)
        .filter(|m| m.ended.elapsed() < opts.recent_move && m.cap == cap)
        .cloned();
    if let Some(m) = recent {
        return (
            m.bandwidth,
            BandwidthBasis::RecentMove {
                migration: m.migration,
                source: node.id,
                target,
                age: m.ended.elapsed(),
            },
            m.setup,
        );
    }
    match probe(node, guest, target, opts).await {
        Ok(p) => (
            p.bytes as f64 / p.elapsed.as_secs_f64().max(1e-6),
            BandwidthBasis::Probed {
                source: node.id,
                target,
                bytes: p.bytes,
                elapsed: p.elapsed,
                ramp: p.ramp,
            },
            p.setup.saturating_add(p.ramp),
        ),
        Err(why) => (
            ASSUMED_BANDWIDTH,
            BandwidthBasis::Assumed {
                why: format!("no move to node {target} measured, and the probe failed: {why}"),
            },
            ASSUMED_SETUP,
        ),
    }
}

/// What a probe measured.
struct Probe {
    /// Sent after the warm-up.
    bytes: u64,
    /// From the first page after the warm-up until the target applied the
    /// last.
    elapsed: Duration,
    /// What the warm-up took beyond its bytes at the steady rate.
    ramp: Duration,
    /// From asking the target to take the stream until it was open.
    setup: Duration,
}

#[derive(Serialize, Deserialize)]
struct MeasureRequest {
    vm: String,
    target: Option<NodeId>,
    opts: MeasureOptions,
}

/// What a source asks of [`BANDWIDTH_PROBE_SERVICE`]: to take stream
/// `stream_id` (with [`PROBE_STREAM_BIT`] set) of up to `bytes` of pages.
#[derive(Serialize, Deserialize)]
pub struct ProbeRequest {
    pub stream_id: u64,
    pub bytes: u64,
}

/// Sends guest pages to `target` over the migration networks (the first two
/// the store allows, as a move takes them) into fresh memory there, up to
/// `opts.probe_bytes`: a sixteenth to get the stream going, then the rest
/// for at most `opts.probe_time`, each timed until the target applied its
/// last page.
async fn probe(
    node: &Arc<NodeShared>,
    guest: &dyn Guest,
    target: NodeId,
    opts: &MeasureOptions,
) -> Result<Probe, String> {
    let state = node.cluster.read();
    let directory = node.directory.clone();
    let candidates = placement::candidate_paths(&state, node.id, target, |net, ip| {
        directory.migration_addr(target, net, ip)
    });
    drop(state);
    let reachable = vec![true; candidates.len()];
    let paths: Vec<_> = placement::pick_paths(&candidates, &reachable)
        .into_iter()
        .filter_map(|i| candidates[i].addr)
        .collect();
    if paths.is_empty() {
        return Err(format!("no migration network reaches node {target}"));
    }
    let rpc_addrs = directory.get(target).map(|p| p.rpc).unwrap_or_default();
    let pages = (opts.probe_bytes.min(MAX_PROBE_BYTES) / PAGE_SIZE as u64)
        .min(guest.page_count())
        .max(1);
    let serial = PROBES.fetch_add(1, Ordering::Relaxed) & ((1 << 40) - 1);
    let stream_id = PROBE_STREAM_BIT | (node.id << 40) | serial;

    let asked = Instant::now();
    let request = ProbeRequest {
        stream_id,
        bytes: pages * PAGE_SIZE as u64,
    };
    node.rpc
        .call(
            target,
            &rpc_addrs,
            BANDWIDTH_PROBE_SERVICE,
            ferry_transport::encode(&request),
            CALL_SLACK,
        )
        .await
        .map_err(|e| format!("node {target} did not take the probe: {e}"))?;
    let sender = node
        .rpc
        .open_page_stream(target, &paths, stream_id)
        .await
        .map_err(|e| format!("probe stream: {e}"))?;
    let setup = asked.elapsed();

    // The first part shows what the stream takes to get going, the rest its
    // steady rate: a move's round 0 pays the first once and the second for
    // every byte.
    let warm_up = (pages / PROBE_WARM_UP_PART).clamp(1, pages);
    let started = Instant::now();
    send_probe_pages(&sender, guest, 0, 0..warm_up, None).await?;
    sender
        .barrier(0)
        .await
        .map_err(|e| format!("probe stream: {e}"))?;
    let warmed = started.elapsed();
    let steady = Instant::now();
    let sent = send_probe_pages(
        &sender,
        guest,
        1,
        warm_up..pages,
        Some(steady + opts.probe_time),
    )
    .await?;
    sender
        .barrier(1)
        .await
        .map_err(|e| format!("probe stream: {e}"))?;
    let elapsed = steady.elapsed();
    let _ = sender.finish().await;
    // A guest too small for a steady part: its whole probe is the rate.
    let (bytes, elapsed) = if sent == 0 {
        (warm_up * PAGE_SIZE as u64, warmed)
    } else {
        (sent * PAGE_SIZE as u64, elapsed)
    };
    let rate = bytes as f64 / elapsed.as_secs_f64().max(1e-6);
    let ramp = warmed.saturating_sub(Duration::from_secs_f64(
        (warm_up * PAGE_SIZE as u64) as f64 / rate,
    ));
    Ok(Probe {
        bytes,
        elapsed,
        ramp,
        setup,
    })
}

/// Reads `pages` of the guest as a move does (into the buffer that goes to
/// the wire) and queues them on the probe's stream in `round`, until `until`
/// passes. Returns the pages queued.
async fn send_probe_pages(
    sender: &ferry_transport::PageStreamSender,
    guest: &dyn Guest,
    round: u32,
    pages: std::ops::Range<u64>,
    until: Option<Instant>,
) -> Result<u64, String> {
    let mut first = pages.start;
    while first < pages.end && until.is_none_or(|t| Instant::now() < t) {
        let n = PROBE_BATCH_PAGES.min(pages.end - first);
        let len = n as usize * PAGE_SIZE;
        let mut buf = bytes::BytesMut::with_capacity(len);
        guest
            .read_pages_uninit(first, &mut buf.spare_capacity_mut()[..len])
            .map_err(|e| format!("reading guest pages: {e}"))?;
        // SAFETY: the read above initialised all `len` bytes.
        unsafe { buf.set_len(len) };
        let listed: Vec<u64> = (first..first + n).collect();
        sender
            .send_listed(round, &listed, Some(buf.freeze()))
            .await
            .map_err(|e| format!("probe stream: {e}"))?;
        first += n;
    }
    Ok(first - pages.start)
}

/// A probe's far end: fresh memory mapped, and populated in the background,
/// as a receiving guest's is when the target prepares for a move (before the
/// stream opens), and written as a migration writes it.
struct ScratchSink(GuestMemory);

impl PageSink for ScratchSink {
    fn apply(&self, first: u64, count: u32, data: Option<&[u8]>) -> Result<(), String> {
        match data {
            Some(bytes) => self.0.write(first, bytes),
            None => self.0.zero(first, u64::from(count)),
        }
        .map_err(|e| e.to_string())
    }
}

/// Registers the measurement services on `node`.
pub(crate) fn register(node: &Arc<NodeShared>) {
    let weak = Arc::downgrade(node);
    node.rpc.register(
        MEASURE_SERVICE,
        ferry_transport::handler_fn(move |_, bytes| {
            let weak = weak.clone();
            async move {
                let reply = serve_measure(weak, &bytes).await;
                Ok(ferry_transport::encode(&reply))
            }
        }),
    );
    let weak = Arc::downgrade(node);
    node.rpc.register(
        BANDWIDTH_PROBE_SERVICE,
        ferry_transport::handler_fn(move |from, bytes| {
            let weak = weak.clone();
            async move { serve_probe(weak, from, &bytes) }
        }),
    );
}

async fn serve_measure(node: Weak<NodeShared>, bytes: &[u8]) -> Result<Measurements, String> {
    let node = node
        .upgrade()
        .filter(|n| !n.is_dead())
        .ok_or("the node is shutting down")?;
    let mut request: MeasureRequest =
        ferry_transport::decode(bytes).map_err(|e| format!("malformed request: {e}"))?;
    request.opts.window = request.opts.window.min(MAX_WINDOW);
    request.opts.probe_time = request.opts.probe_time.min(MAX_WINDOW);
    measure_here(&node, &request.vm, request.target, &request.opts).await
}

/// Probe streams `node` serves now (at most one per peer).
pub fn probes_served(node: &NodeShared) -> usize {
    lock(&node.measured.probes_served)
        .values()
        .filter(|p| !p.is_finished())
        .count()
}

/// Takes a probe's stream into scratch memory, kept until the stream ends
/// (or [`PROBE_STREAM_LIFETIME`] passes), then thrown away.
fn serve_probe(node: Weak<NodeShared>, from: NodeId, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let node = node
        .upgrade()
        .filter(|n| !n.is_dead())
        .ok_or("the node is shutting down")?;
    let request: ProbeRequest =
        ferry_transport::decode(bytes).map_err(|e| format!("malformed request: {e}"))?;
    if request.stream_id & PROBE_STREAM_BIT == 0 {
        return Err(format!("{} is not a probe's stream id", request.stream_id));
    }
    let memory = request
        .bytes
        .clamp(PAGE_SIZE as u64, MAX_PROBE_BYTES)
        .next_multiple_of(PAGE_SIZE as u64);
    let sink =
        ScratchSink(GuestMemory::new(memory, true).map_err(|e| format!("scratch memory: {e}"))?);
    let receiver = node
        .rpc
        .accept_page_stream(request.stream_id, from, Arc::new(sink))
        .map_err(|e| format!("probe stream: {e}"))?;
    let serving = tokio::spawn(async move {
        // The receiver holds the scratch memory; both go when it does.
        let _ = tokio::time::timeout(PROBE_STREAM_LIFETIME, receiver.wait()).await;
        drop(receiver);
    });
    // A peer's new probe ends its last one (and frees its scratch memory): an
    // honest source runs one probe at a time.
    let replaced = lock(&node.measured.probes_served).insert(from, serving.abort_handle());
    if let Some(previous) = replaced {
        previous.abort();
    }
    Ok(Vec::new())
}
