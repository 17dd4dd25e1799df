//! The fault driver of a chaos run: fires a schedule's steps against the
//! cluster, in order, each when its trigger comes, and writes down where each
//! one fired (the run's [`Trace`]).
//!
//! A phase step fires when any migration next reaches its phase, in real
//! time, so the same seed can take another path. In a replay the driver
//! follows a trace instead: a step that fired at migration `m`'s phase waits
//! for that very migration to reach it, a timed step fires at its recorded
//! offset, and a leader kill kills the node that was the leader then. Where
//! the replay cannot follow (migration `m` never reaches the phase, the
//! original stopped before a step), it says so in its divergences.
//!
//! Each fired step is also told apart by where it landed ([`Landing`]): in
//! the phase it was aimed at, or late — its phase did not come within
//! [`PHASE_WAIT`] and it fired anyway. The suite counts them: a seed whose
//! phase steps mostly fired late did not test what it meant to.

use super::cluster::{ChaosCluster, Shape};
use ferry_chaos::schedule::{Fault, FaultKind, Phase, Schedule, Trigger};
use ferry_chaos::trace::{Fired, FiredAt, Trace};
use ferry_cluster::NodeId;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest the driver waits for a phase a step aims at.
pub const PHASE_WAIT: Duration = Duration::from_secs(4);

/// Where a step of the schedule fired, against where it was aimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landing {
    /// A timed step (`Trigger::After`): fired at its offset.
    Timed,
    /// A phase step that fired when a migration reached its phase.
    InPhase(Phase),
    /// A phase step whose phase did not come in time (no migration reached
    /// it within [`PHASE_WAIT`], or in a replay the traced migration did
    /// not): fired anyway, at an offset.
    Late(Phase),
    /// Never fired: the workload ended first and the run repaired what the
    /// steps before it broke. `Some` for a phase step.
    NotFired(Option<Phase>),
}

impl Landing {
    /// The phase the step was aimed at, if it was.
    pub fn aimed(self) -> Option<Phase> {
        match self {
            Landing::Timed | Landing::NotFired(None) => None,
            Landing::InPhase(p) | Landing::Late(p) | Landing::NotFired(Some(p)) => Some(p),
        }
    }

    pub fn in_phase(self) -> bool {
        matches!(self, Landing::InPhase(_))
    }

    /// How a step that did not fire is described.
    pub fn not_fired(trigger: Trigger) -> Landing {
        match trigger {
            Trigger::Phase { phase, .. } => Landing::NotFired(Some(phase)),
            Trigger::After(_) => Landing::NotFired(None),
        }
    }
}

/// What the driver did.
pub struct Driven {
    /// Steps of the schedule fired, from the first.
    pub fired: usize,
    /// Faults injected, by kind (fired steps and the repairs at the end).
    pub injected: BTreeMap<FaultKind, usize>,
    /// Where each step fired.
    pub path: Vec<Fired>,
    /// Where each fired step landed against its aim, in step order.
    pub landed: Vec<Landing>,
    /// Where a replay could not follow its trace.
    pub diverged: Vec<String>,
}

/// Applies one fault. `killed_leader` remembers whom `KillLeader` killed;
/// `leader` (a replay) names the node to kill for it. Returns the node a
/// leader kill hit.
async fn fire(
    cluster: &ChaosCluster,
    fault: Fault,
    killed_leader: &mut Option<NodeId>,
    leader: Option<NodeId>,
    log: &Mutex<Vec<String>>,
) -> Result<Option<NodeId>, String> {
    let note = |s: String| {
        log.lock().unwrap().push(format!(
            "{:>7.3} s {s}",
            cluster.recording.elapsed().as_secs_f64()
        ))
    };
    note(format!("fault: {fault}"));
    match fault {
        Fault::CutLink { node, network } => cluster.edit_links(|l| {
            l.cut.insert((node, network));
        }),
        Fault::RestoreLink { node, network } => cluster.edit_links(|l| {
            l.cut.remove(&(node, network));
            l.shaped.remove(&(node, network));
        }),
        Fault::Delay { node, network, ms } => cluster.edit_links(|l| {
            l.shaped
                .entry((node, network))
                .or_insert_with(Shape::default)
                .delay = Duration::from_millis(u64::from(ms));
        }),
        Fault::Loss { node, network, pct } => cluster.edit_links(|l| {
            l.shaped
                .entry((node, network))
                .or_insert_with(Shape::default)
                .loss_pct = f64::from(pct);
        }),
        Fault::RateLimit {
            node,
            network,
            bytes_per_sec,
        } => cluster.edit_links(|l| {
            l.shaped
                .entry((node, network))
                .or_insert_with(Shape::default)
                .rate = Some(bytes_per_sec);
        }),
        Fault::PartitionNode { node } => cluster.edit_links(|l| {
            l.partitioned.insert(node);
        }),
        Fault::HealPartition { node } => cluster.edit_links(|l| {
            l.partitioned.remove(&node);
        }),
        Fault::KillNode { node } => cluster.kill(node).await?,
        Fault::RestartNode { node } => cluster.restart(node).await?,
        Fault::KillLeader => {
            let target = match leader {
                Some(node) => {
                    note(format!(
                        "replay: killing node {node}, the leader in the trace"
                    ));
                    Some(node)
                }
                None => cluster.leader(Duration::from_secs(10)).await,
            };
            match target {
                Some(node) => {
                    note(format!("the leader is node {node}"));
                    *killed_leader = Some(node);
                    cluster.kill(node).await?;
                    return Ok(Some(node));
                }
                None => note("no leader to kill".into()),
            }
        }
        Fault::RestartLeader => {
            if let Some(node) = killed_leader.take() {
                cluster.restart(node).await?;
            }
        }
    }
    Ok(None)
}

/// Waits until `until` (or `stop`). Returns false if stopped.
async fn wait_until(until: Instant, stop: &AtomicBool) -> bool {
    while Instant::now() < until {
        if stop.load(Ordering::Acquire) {
            return false;
        }
        tokio::time::sleep(
            until
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(20)),
        )
        .await;
    }
    !stop.load(Ordering::Acquire)
}

/// Where a step armed now fires, following the schedule: the first
/// migration to reach the step's phase (or the time it waits for), and
/// whether that was the phase it was aimed at. `None` when stopped.
async fn next_point(
    cluster: &ChaosCluster,
    trigger: Trigger,
    stop: &AtomicBool,
    log: &Mutex<Vec<String>>,
) -> Option<(FiredAt, Landing)> {
    let recording = &cluster.recording;
    match trigger {
        Trigger::After(d) => wait_until(Instant::now() + d, stop)
            .await
            .then(|| (FiredAt::Offset(recording.elapsed()), Landing::Timed)),
        Trigger::Phase { phase, delay } => {
            let mut hits = recording.phases();
            let armed = Instant::now();
            let migration = loop {
                if stop.load(Ordering::Acquire) {
                    return None;
                }
                // A phase may not come while the faults so far hold (every
                // VM on a partitioned node): fire on time rather than stall.
                if armed.elapsed() > PHASE_WAIT {
                    log.lock().unwrap().push(format!(
                        "{:>7.3} s no migration reached {phase} within {PHASE_WAIT:?}: firing anyway",
                        recording.elapsed().as_secs_f64()
                    ));
                    break None;
                }
                match tokio::time::timeout(Duration::from_millis(20), hits.recv()).await {
                    Ok(Ok(hit)) if hit.phase == phase => break Some(hit.migration),
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return None,
                    _ => {}
                }
            };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let offset = recording.elapsed();
            Some(match migration {
                Some(migration) => (
                    FiredAt::Phase {
                        migration,
                        phase,
                        delay,
                        offset,
                    },
                    Landing::InPhase(phase),
                ),
                // The fallback: the phase never came, the step fires late.
                None => (FiredAt::Offset(offset), Landing::Late(phase)),
            })
        }
    }
}

/// Where a step fires in a replay: at the point `was` of the original run.
/// `None` when stopped.
async fn replayed_point(
    cluster: &ChaosCluster,
    step: usize,
    was: FiredAt,
    stop: &AtomicBool,
    diverged: &mut Vec<String>,
) -> Option<FiredAt> {
    let recording = &cluster.recording;
    let start = Instant::now() - recording.elapsed();
    match was {
        FiredAt::Offset(offset) => wait_until(start + offset, stop).await.then_some(was),
        FiredAt::Phase {
            migration,
            phase,
            delay,
            offset,
        } => {
            // The same migration id may come a little later than it did.
            let deadline = (start + offset).max(Instant::now()) + PHASE_WAIT;
            let reached = loop {
                if stop.load(Ordering::Acquire) {
                    return None;
                }
                if recording.reached(migration, phase) {
                    break true;
                }
                if Instant::now() > deadline {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            if !reached {
                diverged.push(format!(
                    "step {step}: migration {migration} did not reach {phase} by {:.3} s; fired then",
                    recording.elapsed().as_secs_f64()
                ));
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let offset = recording.elapsed();
            Some(if reached {
                FiredAt::Phase {
                    migration,
                    phase,
                    delay,
                    offset,
                }
            } else {
                FiredAt::Offset(offset)
            })
        }
    }
}

/// Fires the schedule's steps in order (along `replay`, if given); stops
/// (and repairs what is still broken) when `stop` is set or a replayed
/// trace has no more steps. Sets `done` when no step is left to fire.
pub async fn drive(
    cluster: &ChaosCluster,
    schedule: &Schedule,
    replay: Option<&Trace>,
    stop: &AtomicBool,
    done: &AtomicBool,
    log: &Mutex<Vec<String>>,
) -> Result<Driven, String> {
    let mut injected = BTreeMap::new();
    let mut killed_leader = None;
    let mut path = Vec::new();
    let mut landed = Vec::new();
    let mut diverged = Vec::new();
    for (index, step) in schedule.steps.iter().enumerate() {
        let (at, leader, landing) = match replay {
            None => match next_point(cluster, step.trigger, stop, log).await {
                Some((at, landing)) => (at, None, landing),
                None => break,
            },
            Some(trace) => {
                let Some(was) = trace.step(index) else {
                    break;
                };
                match replayed_point(cluster, index, was.at, stop, &mut diverged).await {
                    Some(at) => {
                        // Aimed as the schedule aims it; in phase only where
                        // the replay met the traced migration's phase.
                        let landing = match (step.trigger, at) {
                            (Trigger::After(_), _) => Landing::Timed,
                            (Trigger::Phase { phase, .. }, FiredAt::Phase { .. }) => {
                                Landing::InPhase(phase)
                            }
                            (Trigger::Phase { phase, .. }, FiredAt::Offset(_)) => {
                                Landing::Late(phase)
                            }
                        };
                        (at, was.node, landing)
                    }
                    None => {
                        diverged.push(format!(
                            "step {index}: the workload ended before its point {}",
                            was.at
                        ));
                        break;
                    }
                }
            }
        };
        let node = fire(cluster, step.fault, &mut killed_leader, leader, log).await?;
        *injected.entry(step.fault.kind()).or_insert(0) += 1;
        path.push(Fired {
            step: index,
            at,
            node,
        });
        landed.push(landing);
    }
    let fired = path.len();
    done.store(true, Ordering::Release);
    // Stopped early: undo what is still broken (links, partitions, nodes).
    for fault in schedule.repairs_after(fired) {
        let fault = match fault {
            Fault::RestartLeader => match killed_leader {
                Some(node) => Fault::RestartNode { node },
                None => continue,
            },
            f => f,
        };
        fire(cluster, fault, &mut killed_leader, None, log).await?;
        *injected.entry(fault.kind()).or_insert(0) += 1;
    }
    Ok(Driven {
        fired,
        injected,
        path,
        landed,
        diverged,
    })
}
