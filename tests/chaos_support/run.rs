//! One chaos run: a seed's fault schedule against a small cluster doing
//! migrations and a drain, then the history through the invariant checker.
//!
//! A run: three nodes on two migration networks (every link through a
//! proxy), three small guests (16–64 MiB) with workloads and a client each,
//! two lanes of moves plus one drain while the schedule's faults fire against
//! the migrations' phases. When the schedule is done (or the run's time is
//! up, and what is still broken is repaired) the run settles: every
//! migration ended, every VM running on its owner. The clients stop, the
//! final records are read, and the checker replays the history. A continuous
//! sampler watching where each VM runs is a second, independent witness of
//! "never twice".
//!
//! Odd seeds move with `verify` off ([`verifies`]): the engine then compares
//! no digests in the blackout, and a lost or stale page would not abort the
//! move; the witness's digests at every pause and resume (independent of the
//! engine) are what must catch it. Even seeds verify, and there a digest
//! mismatch abort is a bug, not an expected abort.
//!
//! A run also says what it exercised ([`Outcome::shortfalls`]): a seed that
//! completed no migration, left an invariant unchecked, saw more than half
//! of its phase-aimed faults fire late, or aborted a move for a reason
//! nobody expected, fails however clean its history.

use super::cluster::ChaosCluster;
use super::faults::{self, Driven, Landing};
use super::recording::{Aborted, Recording};
use ferry_actors::actors::{DrainNode, MoveVm, ResumeNode};
use ferry_actors::local::vm_config;
use ferry_actors::migration::source::{MovePolicy, MoveRequest};
use ferry_actors::switch::ClientError;
use ferry_actors::triggers::drain::DrainOptions;
use ferry_chaos::aborts::{self, Judged};
use ferry_chaos::checker::{self, Invariant, Report, Timed, Violation};
use ferry_chaos::schedule::{FaultKind, Phase, Schedule, ScheduleShape, SplitMix64, Trigger};
use ferry_chaos::trace::Trace;
use ferry_cluster::model::{Backend, NodeState, VmState};
use ferry_cluster::{Command, NodeId};
use ferry_vmm::{Pattern, Workload};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const NODES: u64 = 3;
const NETWORKS: u64 = 2;
const VMS: usize = 3;
/// Moves (and the drain) at least, over both lanes.
const MIN_OPS: usize = 8;
/// The workload stops starting moves after this long, schedule done or not.
const MAX_WORKLOAD: Duration = Duration::from_secs(25);
/// Longest a run may take to settle after the faults are repaired.
const SETTLE: Duration = Duration::from_secs(75);
/// Longest the workload waits for one move's answer.
const MOVE_WAIT: Duration = Duration::from_secs(100);

/// Disruptive faults per schedule: `FERRY_CHAOS_FAULTS`, or 4.
pub fn faults_per_run() -> usize {
    std::env::var("FERRY_CHAOS_FAULTS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(4)
}

/// The schedules the suite plans: the default kinds, four faults (see
/// [`faults_per_run`]), short holds so a run stays short.
pub fn shape() -> ScheduleShape {
    shape_with(faults_per_run())
}

/// [`shape`] with `faults` disruptive faults.
pub fn shape_with(faults: usize) -> ScheduleShape {
    ScheduleShape {
        nodes: (1..=NODES).collect(),
        networks: (1..=NETWORKS).collect(),
        faults,
        kinds: FaultKind::DISRUPTIVE.to_vec(),
        phase_share: 0.6,
        gap: (Duration::from_millis(50), Duration::from_millis(800)),
        hold: (Duration::from_millis(200), Duration::from_millis(1500)),
        max_overlap: 1,
    }
}

/// Whether seed `seed`'s moves (and its drain and failback) verify digests
/// in the blackout: even seeds do, odd seeds do not.
pub fn verifies(seed: u64) -> bool {
    seed % 2 == 0
}

/// A phase as the per-seed line names it.
pub fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::MidRound0 => "round0",
        Phase::MidDirtyRounds => "dirty",
        Phase::DuringBlackout => "blackout",
        Phase::AfterSwitchover => "switchover",
    }
}

/// What one run did and found.
pub struct Outcome {
    pub seed: u64,
    /// What ran the VMs: simulated guests, or KVM guests (`run_seed_on`).
    pub backend: Backend,
    pub schedule: Schedule,
    /// Whether the moves verified digests in the blackout ([`verifies`]).
    pub verify: bool,
    /// Steps of the schedule that fired (the rest were stopped and repaired).
    pub fired: usize,
    /// Where every step of the schedule landed against its aim, in step
    /// order (the unfired ones too).
    pub landed: Vec<Landing>,
    /// Every aborted migration, its reason and its kind.
    pub aborts: Vec<(Aborted, Judged)>,
    /// Times a VM was lost with its node and had to be restarted.
    pub restarts: usize,
    /// Faults injected, by kind (fired steps and the repairs run at the end).
    pub injected: BTreeMap<FaultKind, usize>,
    pub completed: usize,
    pub aborted: usize,
    pub report: Report,
    /// Double-run checks by the sampler.
    pub samples: u64,
    pub history: Vec<Timed>,
    pub vm_names: BTreeMap<u64, String>,
    pub log: Vec<String>,
    pub elapsed: Duration,
    /// Where each fired step fired, and what the run broke: replays this path.
    pub trace: Trace,
    /// When this run replayed a trace: that trace, and where it could not
    /// follow it.
    pub replayed: Option<(Trace, Vec<String>)>,
}

impl Outcome {
    /// No violation, and every resume was compared with its own pause.
    pub fn is_clean(&self) -> bool {
        self.report.is_clean() && self.report.is_complete()
    }

    /// Phase-aimed steps that fired in their phase, and all phase-aimed
    /// steps (fired or not).
    pub fn in_phase(&self) -> (usize, usize) {
        let aimed = self.landed.iter().filter(|l| l.aimed().is_some()).count();
        let hit = self.landed.iter().filter(|l| l.in_phase()).count();
        (hit, aimed)
    }

    /// The disruptive faults by where they were aimed and landed:
    /// `round0: cut_link; blackout: kill_node(late); timed: loss`.
    pub fn faults_by_phase(&self) -> String {
        let mut by: BTreeMap<Option<Phase>, Vec<String>> = BTreeMap::new();
        for (step, landing) in self.schedule.steps.iter().zip(&self.landed) {
            let kind = step.fault.kind();
            if kind.is_repair() {
                continue;
            }
            let note = match landing {
                Landing::Late(_) => "(late)",
                Landing::NotFired(_) => "(not fired)",
                Landing::InPhase(_) | Landing::Timed => "",
            };
            by.entry(landing.aimed())
                .or_default()
                .push(format!("{kind}{note}"));
        }
        // Phases in migration order, the timed steps last.
        let mut parts: Vec<String> = Phase::ALL
            .iter()
            .filter_map(|p| {
                by.get(&Some(*p))
                    .map(|f| format!("{}: {}", phase_name(*p), f.join(", ")))
            })
            .collect();
        if let Some(timed) = by.get(&None) {
            parts.push(format!("timed: {}", timed.join(", ")));
        }
        parts.join("; ")
    }

    /// Checks made per invariant: `one_running_copy=…, no_lost_VM=…`.
    pub fn checks_by_invariant(&self) -> String {
        Invariant::ALL
            .iter()
            .map(|i| {
                format!(
                    "{}={}",
                    i.to_string().replace(' ', "_"),
                    self.report.checked.get(i).copied().unwrap_or(0)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Aborts by kind: `unreachable=1 store_refused=2`.
    pub fn aborts_by_kind(&self) -> BTreeMap<aborts::AbortKind, usize> {
        let mut kinds = BTreeMap::new();
        for (_, judged) in &self.aborts {
            *kinds.entry(judged.kind).or_insert(0) += 1;
        }
        kinds
    }

    /// Why this seed fails although (or besides) its history being clean:
    /// it exercised too little, or it aborted a move for an unexpected
    /// reason. Empty for a seed that did what a chaos seed is for.
    ///
    /// Every invariant is required per seed, because a seed that completed
    /// a migration always has something to check for each: one running
    /// copy at every start, resume and ownership commit (and each sampler
    /// look), no lost VM for every VM at the end (three, death or not), same
    /// digest for every resume the witness compared (each completed move's
    /// target resume), no lost append for every acknowledged append (the
    /// clients append the whole run and after it settles), migrations end
    /// for every migration that ended. None of them needs a fault to be
    /// exercised. What does need one — a VM actually lost with its node and
    /// restarted — is required across the run instead (`tests/chaos.rs`).
    ///
    /// At least half of the phase-aimed steps must land in their phase, in a
    /// seed that aims two or more. With real timing a phase may not come in
    /// time and the step fires late: seed 23 partitions node 2 right after a
    /// switchover, both lanes then wait on that node for seconds, and its
    /// blackout step fires late — a strict majority (2 of 2) would fail such
    /// a seed for the schedule's own doing. A seed that aims one step and
    /// sees it fire late is counted, not failed (the 1000-seed soak found
    /// seed 424: a partition just before its one round-0 step held every
    /// move back past the step's wait); the run as a whole must land half of
    /// its aimed steps and hit every phase (`tests/chaos.rs`). A seed where
    /// most of several fired late tested something other than it meant to.
    pub fn shortfalls(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.completed == 0 {
            out.push("no migration completed".to_string());
        }
        for invariant in Invariant::ALL {
            if self.report.checked.get(&invariant).copied().unwrap_or(0) == 0 {
                out.push(format!("{invariant} was never checked"));
            }
        }
        let (hit, aimed) = self.in_phase();
        if aimed >= 2 && hit * 2 < aimed {
            out.push(format!(
                "only {hit} of its {aimed} phase-aimed faults fired in their phase (half must)"
            ));
        }
        for (abort, judged) in &self.aborts {
            if let Some(problem) = &judged.problem {
                out.push(format!(
                    "migration {} of {}: {problem}",
                    abort.migration, abort.vm
                ));
            }
        }
        out
    }

    /// The invariants this run broke.
    pub fn broken(&self) -> BTreeSet<Invariant> {
        self.report.violations.iter().map(|v| v.invariant).collect()
    }

    /// Writes the trace where `cargo test` keeps test files (elsewhere, the
    /// system's temporary directory); returns the path.
    pub fn save_trace(&self) -> std::io::Result<std::path::PathBuf> {
        let dir = option_env!("CARGO_TARGET_TMPDIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let path = dir.join(format!("chaos-trace-seed-{}.txt", self.seed));
        std::fs::write(&path, format!("{}\n", self.trace))?;
        Ok(path)
    }

    /// For a replay: whether it broke again what the trace says the
    /// original broke, and where it could not follow the trace.
    pub fn replay_verdict(&self) -> Option<String> {
        let (trace, diverged) = self.replayed.as_ref()?;
        let names = |set: &mut dyn Iterator<Item = Invariant>| {
            let names: Vec<String> = set.map(|i| i.to_string()).collect();
            if names.is_empty() {
                "nothing".to_string()
            } else {
                names.join(", ")
            }
        };
        let broken = self.broken();
        let expected: BTreeSet<Invariant> = trace.expect.iter().copied().collect();
        let mut out = if expected.is_empty() {
            format!(
                "replay of a clean run's trace: this run broke {}",
                names(&mut broken.iter().copied())
            )
        } else if expected.is_subset(&broken) {
            format!(
                "replay REPRODUCED the violation: broke {} again",
                names(&mut expected.iter().copied())
            )
        } else {
            format!(
                "replay did NOT reproduce the violation: the trace expected {}, this run broke {}",
                names(&mut expected.iter().copied()),
                names(&mut broken.iter().copied())
            )
        };
        let followed = self.trace.fired.len() - diverged.len().min(self.trace.fired.len());
        out.push_str(&format!(
            "\n  followed {followed} of the trace's {} steps at their recorded points",
            trace.fired.len()
        ));
        for d in diverged {
            out.push_str(&format!("\n  diverged: {d}"));
        }
        Some(out)
    }

    /// What a failing seed prints: how to replay it, its schedule, the
    /// violations, and the history around the first one.
    pub fn describe(&self) -> String {
        let verdict = match (self.is_clean(), self.report.is_complete()) {
            (true, true) => "passed",
            (true, false) => "INCOMPLETE (resumes not comparable)",
            (false, _) => "FAILED",
        };
        let faults = match self.trace.faults {
            4 => String::new(),
            n => format!("FERRY_CHAOS_FAULTS={n} "),
        };
        let mut out = format!(
            "chaos seed {} {verdict} (verify={})\n  replay this path: FERRY_CHAOS_TRACE={} cargo test --release --test chaos -- --nocapture\n  (the seed alone: {faults}FERRY_CHAOS_SEED={}; it may take another path)\n",
            self.seed,
            if self.verify { "on" } else { "off" },
            self.trace,
            self.seed
        );
        if let Some(verdict) = self.replay_verdict() {
            out.push_str(&format!("{verdict}\n"));
        }
        out.push_str(&format!("{}{}", self.schedule, self.report));
        out.push_str("fault trace:\n");
        for fired in &self.trace.fired {
            let fault = self.schedule.steps.get(fired.step).map(|s| s.fault);
            let at = match fired.at {
                ferry_chaos::trace::FiredAt::Phase {
                    migration,
                    phase,
                    delay,
                    offset,
                } => format!(
                    "{:>8.3} s  migration {migration} {phase} +{} ms",
                    offset.as_secs_f64(),
                    delay.as_millis()
                ),
                ferry_chaos::trace::FiredAt::Offset(offset) => {
                    format!("{:>8.3} s  at that offset", offset.as_secs_f64())
                }
            };
            let node = fired
                .node
                .map(|n| format!(" (node {n})"))
                .unwrap_or_default();
            match fault {
                Some(fault) => {
                    out.push_str(&format!("  step {:>2} {at}: {fault}{node}\n", fired.step))
                }
                None => out.push_str(&format!(
                    "  step {:>2} {at}: not in the schedule\n",
                    fired.step
                )),
            }
        }
        out.push_str(&format!(
            "fired {} of {} steps; VMs {:?}\n",
            self.fired,
            self.schedule.steps.len(),
            self.vm_names
        ));
        for (abort, judged) in &self.aborts {
            out.push_str(&format!(
                "  abort: migration {} of {} [{}]: {}{}\n",
                abort.migration,
                abort.vm,
                judged.kind,
                abort.reason,
                judged
                    .problem
                    .as_ref()
                    .map(|p| format!(" — {p}"))
                    .unwrap_or_default()
            ));
        }
        for shortfall in self.shortfalls() {
            out.push_str(&format!("  shortfall: {shortfall}\n"));
        }
        for line in &self.log {
            out.push_str(&format!("  log: {line}\n"));
        }
        if let Some(first) = self.report.violations.first() {
            let from = first.index.saturating_sub(30);
            let to = (first.index + 10).min(self.history.len());
            out.push_str(&format!("history #{from}..#{to}:\n"));
            for (i, t) in self.history.iter().enumerate().take(to).skip(from) {
                if !matches!(t.event, checker::Event::AppendAcked { .. }) {
                    out.push_str(&format!(
                        "  #{i} {:>8.3} s {:?}\n",
                        t.at.as_secs_f64(),
                        t.event
                    ));
                }
            }
        }
        out
    }
}

/// A client appending to one VM's service through the virtual switch the
/// whole run, recording each acknowledgement in the history.
struct Client {
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Client {
    fn start(cluster: &ChaosCluster, vm: &str) -> Client {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), acks.clone());
        let switch = cluster.switch.clone();
        let recording = cluster.recording.clone();
        let vm = vm.to_string();
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !flag.load(Ordering::Acquire) {
                let generation = recording.generation(&vm);
                match switch.append(&vm, format!("o-{n}").as_bytes()) {
                    Ok(seq) => {
                        if recording.acked(&vm, seq, generation) {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        n += 1;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    // Refused (blackout, node gone, no route yet): try again.
                    Err(
                        ClientError::Service { .. }
                        | ClientError::NotHere { .. }
                        | ClientError::Unreachable { .. }
                        | ClientError::NoRoute(_),
                    ) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        Client {
            stop,
            acks,
            thread: Some(thread),
        }
    }

    fn acks(&self) -> u64 {
        self.acks.load(Ordering::Relaxed)
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Watches where every VM runs, every millisecond: two live nodes running
/// the same VM at once (confirmed by a second look) is a violation.
fn start_sampler(
    cluster: Arc<ChaosCluster>,
    vms: Vec<String>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    tokio::spawn(async move {
        let mut samples = 0u64;
        let mut found = Vec::new();
        while !stop.load(Ordering::Acquire) {
            for vm in &vms {
                samples += 1;
                let running = cluster.running(vm);
                if running.len() > 1 {
                    // A node read just before it paused and another just after
                    // it resumed can look like two; look again.
                    let again = cluster.running(vm);
                    let both: Vec<_> = running.iter().filter(|r| again.contains(r)).collect();
                    if both.len() > 1 {
                        found.push(format!(
                            "at {:.3} s vm {vm} runs on {both:?} at once",
                            cluster.recording.elapsed().as_secs_f64()
                        ));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        (samples, found)
    })
}

/// What the workload's lanes share.
struct Lanes<'a> {
    cluster: &'a ChaosCluster,
    seed: u64,
    /// VMs a lane is moving now.
    busy: Mutex<BTreeSet<String>>,
    /// Moves and drains started so far, over all lanes.
    ops: AtomicU64,
    schedule_done: &'a AtomicBool,
    log: &'a Mutex<Vec<String>>,
    /// Whether moves verify digests in the blackout.
    verify: bool,
}

/// One lane of the workload: moves, and (with `drain_at`) one drain, until
/// the schedule is done and enough was done, or the time is up.
async fn lane(lanes: &Lanes<'_>, lane: u64, drain_at: Option<u64>) {
    let Lanes {
        cluster,
        seed,
        busy,
        ops,
        schedule_done,
        log,
        verify,
    } = lanes;
    let verify = *verify;
    let (cluster, seed, schedule_done, log) = (*cluster, *seed, *schedule_done, *log);
    let mut rng = SplitMix64::new(seed ^ (0x5eed_0000 + lane));
    let started = Instant::now();
    let note = |s: String| {
        log.lock().unwrap().push(format!(
            "{:>7.3} s lane {lane}: {s}",
            cluster.recording.elapsed().as_secs_f64()
        ))
    };
    let mut mine = 0u64;
    loop {
        let done = schedule_done.load(Ordering::Acquire)
            && ops.load(Ordering::Acquire) >= MIN_OPS as u64
            && drain_at.is_none_or(|d| mine > d);
        if done || started.elapsed() > MAX_WORKLOAD {
            return;
        }
        let Some(state) = cluster.fresh_state(Duration::from_secs(2)).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let live: Vec<NodeId> = cluster
            .reachable_nodes()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let up: Vec<NodeId> = live
            .iter()
            .copied()
            .filter(|id| {
                state
                    .nodes
                    .get(id)
                    .is_some_and(|n| n.state == NodeState::Up)
            })
            .collect();

        if drain_at == Some(mine) {
            mine += 1;
            ops.fetch_add(1, Ordering::AcqRel);
            let Some(&node) = rng.pick(&up) else {
                continue;
            };
            let Some(live) = cluster.live(node) else {
                continue;
            };
            note(format!("drain node {node}"));
            let options = DrainOptions {
                verify,
                ..DrainOptions::default()
            };
            let drained = tokio::time::timeout(MOVE_WAIT, async {
                let mut progress = live
                    .actor
                    .send(DrainNode(options))
                    .await
                    .map_err(|e| e.to_string())??;
                ferry_actors::triggers::drain::wait(&mut progress, MOVE_WAIT).await
            })
            .await;
            note(format!("drain of node {node}: {drained:?}"));
            let failback = rng.chance(0.5);
            // Out of maintenance mode again (through whatever incarnation is
            // alive now), with or without bringing the VMs back.
            let resumed = match cluster.live(node) {
                Some(live) => tokio::time::timeout(
                    MOVE_WAIT,
                    live.actor.send(ResumeNode { failback, verify }),
                )
                .await
                .map(|r| r.map(|r| r.map(|f| (f.moved.len(), f.failed.len())))),
                None => Ok(Ok(Err("node is down".into()))),
            };
            note(format!(
                "resume node {node} (failback {failback}): {resumed:?}"
            ));
            continue;
        }

        let candidates: Vec<(String, NodeId)> = state
            .vms
            .values()
            .filter(|v| v.state == VmState::Running && live.contains(&v.owner))
            .filter(|v| !busy.lock().unwrap().contains(&v.name))
            .map(|v| (v.name.clone(), v.owner))
            .collect();
        let Some((vm, source)) = rng.pick(&candidates).cloned() else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let targets: Vec<NodeId> = up.iter().copied().filter(|&n| n != source).collect();
        let Some(&target) = rng.pick(&targets) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Some(live) = cluster.live(source) else {
            continue;
        };
        busy.lock().unwrap().insert(vm.clone());
        mine += 1;
        ops.fetch_add(1, Ordering::AcqRel);
        let mut request = MoveRequest::new(vm.clone(), target);
        request.verify = verify;
        // Tight blackout promises make dirty rounds (and throttling) likely.
        request.policy = MovePolicy::downtime_limit_ms([15, 30, 100, 300][rng.below(4) as usize]);
        let result = tokio::time::timeout(MOVE_WAIT, live.actor.send(MoveVm(request))).await;
        let said = match &result {
            Ok(Ok(Ok(r))) => format!("completed, epoch {}, {:?}", r.epoch, r.total),
            Ok(Ok(Err(e))) => format!("{e}"),
            Ok(Err(e)) => format!("actor gone: {e}"),
            Err(_) => format!("no answer within {MOVE_WAIT:?}"),
        };
        note(format!("move {vm} {source}->{target}: {said}"));
        busy.lock().unwrap().remove(&vm);
        if !matches!(result, Ok(Ok(Ok(_)))) {
            // Refused or failed: give the cluster a moment before the next.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Waits until the cluster is quiet and whole: every migration ended (the
/// store's word taken for those whose source died), every VM running on its
/// owner at the store's epoch. Returns what is still wrong at the deadline.
async fn settle(cluster: &ChaosCluster, within: Duration) -> Vec<String> {
    cluster.edit_links(|l| *l = Default::default());
    let deadline = Instant::now() + within;
    loop {
        let mut wrong = Vec::new();
        for id in cluster.ids() {
            if cluster.live(id).is_none() {
                if let Err(e) = cluster.restart(id).await {
                    wrong.push(e);
                }
            }
        }
        cluster.restart_lost_vms(Duration::from_secs(5)).await;
        match cluster.fresh_state(Duration::from_secs(5)).await {
            None => wrong.push("the store does not answer".into()),
            Some(state) => {
                wrong.extend(cluster.resolve_dead_sources(&state));
                for (id, begun) in cluster.recording.open_migrations() {
                    wrong.push(format!(
                        "migration {id} of {}: its job has not ended",
                        begun.vm
                    ));
                }
                for m in state.active_migrations() {
                    wrong.push(format!("migration {} of {} is still active", m.id, m.vm));
                }
                for vm in state.vms.values() {
                    let running = cluster.running(&vm.name);
                    let fine = match vm.state {
                        VmState::Running => running == vec![(vm.owner, vm.epoch)],
                        _ => false,
                    };
                    if !fine {
                        wrong.push(format!(
                            "vm {}: the store says {:?} on node {} at epoch {}; it runs on {running:?}",
                            vm.name, vm.state, vm.owner, vm.epoch
                        ));
                    }
                }
            }
        }
        if wrong.is_empty() || Instant::now() > deadline {
            return wrong;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs seed `seed` to its end and checks its history: simulated guests, or
/// what `FERRY_CHAOS_BACKEND` names (`kvm`).
pub fn run_seed(seed: u64) -> Result<Outcome, String> {
    run_seed_on(seed, backend_from_env())
}

/// Runs seed `seed` with every VM on `backend`.
pub fn run_seed_on(seed: u64, backend: Backend) -> Result<Outcome, String> {
    run_path(seed, faults_per_run(), None, backend)
}

/// Replays `trace`: its seed's schedule, each step fired where the trace
/// says it fired (on the backend `FERRY_CHAOS_BACKEND` names).
pub fn replay(trace: Trace) -> Result<Outcome, String> {
    run_path(trace.seed, trace.faults, Some(trace), backend_from_env())
}

/// `FERRY_CHAOS_BACKEND=kvm` runs every VM as a KVM guest; simulated otherwise.
pub fn backend_from_env() -> Backend {
    match std::env::var("FERRY_CHAOS_BACKEND").as_deref() {
        Ok("kvm") => Backend::Kvm,
        _ => Backend::Sim,
    }
}

fn run_path(
    seed: u64,
    faults: usize,
    replay: Option<Trace>,
    backend: Backend,
) -> Result<Outcome, String> {
    let started = Instant::now();
    let schedule = Schedule::plan(seed, &shape_with(faults));
    ferry_actors::local::run(run(seed, schedule, replay, started, backend))
        .map_err(|e| format!("seed {seed}: actix system: {e}"))?
}

async fn run(
    seed: u64,
    schedule: Schedule,
    replay: Option<Trace>,
    started: Instant,
    backend: Backend,
) -> Result<Outcome, String> {
    let recording = Recording::new();
    let cluster = Arc::new(
        ChaosCluster::start("chaos", NODES, NETWORKS, seed, recording.clone())
            .await
            .map_err(|e| format!("seed {seed}: starting the cluster: {e}"))?,
    );
    let mut rng = SplitMix64::new(seed ^ 0x0076_6d73);
    let mut vms = Vec::new();
    for i in 0..VMS {
        let name = format!("vm-{}", i + 1);
        let memory = [16, 32, 64][rng.below(3) as usize] * MIB;
        // Busy enough that most moves need dirty rounds, some throttling.
        let workload = Workload {
            dirty_pages_per_sec: Some([2_000, 5_000, 10_000, 20_000][rng.below(4) as usize]),
            pattern: if rng.chance(0.7) {
                Pattern::HotSet {
                    write_percent: 80,
                    page_percent: 10,
                }
            } else {
                Pattern::Uniform
            },
            seed: seed.wrapping_add(i as u64),
        };
        let mut config = vm_config(memory, workload, i as u8 + 1);
        config.vcpus = 1;
        config.backend = backend;
        let node = i as u64 % NODES + 1;
        cluster
            .write(Command::CreateVm {
                name: name.clone(),
                config,
                node,
            })
            .await
            .map_err(|e| format!("seed {seed}: creating {name}: {e}"))?;
        let live = cluster.live(node).ok_or("node down at start")?;
        live.actor
            .send(ferry_actors::actors::StartVm(name.clone()))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("seed {seed}: starting {name}: {e}"))?;
        vms.push(name);
    }
    let clients: Vec<Client> = vms.iter().map(|vm| Client::start(&cluster, vm)).collect();
    let sampling = Arc::new(AtomicBool::new(false));
    let sampler = start_sampler(cluster.clone(), vms.clone(), sampling.clone());

    let log = Mutex::new(Vec::new());
    let stop_faults = AtomicBool::new(false);
    let schedule_done = AtomicBool::new(false);
    let lanes = Lanes {
        cluster: &cluster,
        seed,
        busy: Mutex::new(BTreeSet::new()),
        ops: AtomicU64::new(0),
        schedule_done: &schedule_done,
        log: &log,
        verify: verifies(seed),
    };
    let drain_at = rng.below(3);
    let workload = async {
        tokio::join!(lane(&lanes, 0, Some(drain_at)), lane(&lanes, 1, None));
        // No more moves: whatever the schedule still waits for will not come.
        stop_faults.store(true, Ordering::Release);
    };
    let (faults, ()) = tokio::join!(
        faults::drive(
            &cluster,
            &schedule,
            replay.as_ref(),
            &stop_faults,
            &schedule_done,
            &log
        ),
        workload
    );
    let Driven {
        fired,
        injected,
        path,
        mut landed,
        diverged,
    } = faults.map_err(|e| format!("seed {seed}: injecting faults: {e}"))?;
    landed.extend(
        schedule.steps[fired..]
            .iter()
            .map(|s| Landing::not_fired(s.trigger)),
    );

    let mut wrong = settle(&cluster, SETTLE).await;
    // The services answer after the storm: a few more acknowledgements each.
    let before: Vec<u64> = clients.iter().map(Client::acks).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while clients.iter().zip(&before).any(|(c, b)| c.acks() < b + 20) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (vm, (c, b)) in vms.iter().zip(clients.iter().zip(&before)) {
        if c.acks() < b + 20 {
            wrong.push(format!(
                "vm {vm}: its service took {} appends after the run settled",
                c.acks() - b
            ));
        }
    }
    for c in clients {
        c.stop();
    }
    for vm in &vms {
        if let Some((node, _)) = cluster.running(vm).first() {
            if let Some(guest) = cluster.live(*node).and_then(|l| l.shared.guest(vm)) {
                match guest.service_records() {
                    Ok(records) => cluster
                        .recording
                        .final_records(vm, records.iter().map(|(s, _)| *s).collect()),
                    Err(e) => wrong.push(format!("vm {vm}: records unreadable: {e}")),
                }
            }
        }
    }
    sampling.store(true, Ordering::Release);
    let (samples, doubles) = sampler.await.map_err(|e| e.to_string())?;
    cluster.shutdown().await;

    let history = recording.events();
    let mut report = checker::check(&history);
    let at_end = history.len().saturating_sub(1);
    let mut extra = |invariant: Invariant, index: usize, message: String| {
        report.violations.push(Violation {
            invariant,
            index,
            at: history.get(index).map_or(Duration::ZERO, |t| t.at),
            message,
        })
    };
    for message in doubles {
        extra(
            Invariant::OneRunningCopy,
            at_end,
            format!("sampler: {message}"),
        );
    }
    for (index, message) in recording.notes() {
        extra(
            Invariant::MigrationsEnd,
            index,
            format!("harness: {message}"),
        );
    }
    for message in wrong {
        let invariant = if message.contains("migration") {
            Invariant::MigrationsEnd
        } else {
            Invariant::NoLostVm
        };
        extra(invariant, at_end, format!("after settling: {message}"));
    }
    *report.checked.entry(Invariant::OneRunningCopy).or_insert(0) += samples;
    let (completed, aborted) = recording.outcomes();
    // Aborts are judged against the faults that actually fired.
    let fired_kinds: BTreeSet<FaultKind> = schedule.steps[..fired]
        .iter()
        .map(|s| s.fault.kind())
        .collect();
    let aborts: Vec<(Aborted, Judged)> = recording
        .aborts()
        .into_iter()
        .map(|a| {
            let judged = aborts::judge(&a.reason, &fired_kinds);
            (a, judged)
        })
        .collect();
    let restarts = history
        .iter()
        .filter(|t| matches!(t.event, checker::Event::VmNeedsRestart { .. }))
        .count();
    let mut log = log.into_inner().unwrap_or_default();
    log.extend(recording.remarks());
    let trace = Trace {
        seed,
        faults: schedule.shape.faults,
        expect: report
            .violations
            .iter()
            .map(|v| v.invariant)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        fired: path,
    };
    Ok(Outcome {
        seed,
        backend,
        schedule,
        verify: verifies(seed),
        fired,
        landed,
        aborts,
        restarts,
        injected,
        completed,
        aborted,
        report,
        samples,
        history,
        vm_names: recording.vm_names(),
        log,
        elapsed: started.elapsed(),
        trace,
        replayed: replay.map(|t| (t, diverged)),
    })
}

/// The phases a schedule aims at, for choosing seeds that cover them.
pub fn phases_of(schedule: &Schedule) -> BTreeSet<Phase> {
    schedule
        .steps
        .iter()
        .filter_map(|s| match s.trigger {
            Trigger::Phase { phase, .. } => Some(phase),
            Trigger::After(_) => None,
        })
        .collect()
}
