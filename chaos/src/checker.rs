//! The invariant checker: reads the recorded history of a run — events from
//! the nodes, the cluster store and the services' clients, in the order they
//! happened — and reports every breach of `DESIGN.md` §5.
//!
//! Chaos runs prove safety by assertion, not by reading logs: whatever faults
//! a schedule injected, the checker replays the history and states whether a
//! VM ever ran twice, got lost, resumed with different memory, lost an
//! acknowledged write, or sat in a migration that never ended. It is a pure
//! function over plain data, so a deliberately broken history (the source
//! resuming after the switchover commit) is a unit test.
//!
//! What the recorder must provide, for the checks to mean anything:
//! - the cluster store's ownership commits, the first one included (a VM is
//!   owned before it first starts);
//! - every start, pause, resume, stop and destroy of a VM copy, and node deaths;
//! - a digest of memory and device state at every pause and at every resume,
//!   taken by the harness itself (`crate::witness`), not the engine's word;
//! - every acknowledged append, and the records each VM holds at the end;
//! - the run recorded until it settles: a migration still open when the
//!   history ends counts as hung.
//!
//! A resume is compared with the pause it ends: the last pause of that VM
//! before it, since a VM's guest pauses once per blackout and resumes once
//! after it. A pause that carries no digest is not skipped in favour of an
//! older one that does (that older pause describes memory the guest has
//! since changed): the resume is reported as not comparable, a gap in the
//! history, apart from the violations.
//!
//! §5.5 (no stranger joins a connection, no malformed message crashes a node)
//! is the transport's concern and is tested there, not here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

pub type VmId = u64;
pub type NodeId = u64;
pub type MigrationId = u64;
pub type Epoch = u64;

/// A digest of a guest's memory and device state, as the guest computes it
/// (`ferry_vmm::MemoryDigest` carries the same two fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest {
    pub memory: u128,
    pub state: u128,
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mem:{:032x} state:{:032x}", self.memory, self.state)
    }
}

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The switchover committed: the target owns the VM.
    Completed,
    /// Ended before the switchover commit: the source keeps the VM.
    Aborted,
}

/// Something that happened during a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A copy of the VM started running from boot (first start, or a restart
    /// after its node died), as owner at `epoch`.
    VmStarted {
        vm: VmId,
        node: NodeId,
        epoch: Epoch,
    },
    /// The copy on `node` stopped running (vCPUs paused). Opens a pause;
    /// the next resume of the VM ends it.
    VmPaused {
        vm: VmId,
        node: NodeId,
    },
    /// The copy on `node` runs again, claiming ownership at `epoch`.
    VmResumed {
        vm: VmId,
        node: NodeId,
        epoch: Epoch,
    },
    /// The copy on `node` stopped for good.
    VmStopped {
        vm: VmId,
        node: NodeId,
    },
    /// The copy on `node` is gone, memory freed.
    VmDestroyed {
        vm: VmId,
        node: NodeId,
    },
    /// The VM was deleted from the cluster on purpose: no longer expected to run.
    VmDeleted {
        vm: VmId,
    },
    /// The node died (killed, crashed): nothing runs on it any more.
    NodeDied {
        node: NodeId,
    },
    /// The node is back, with no VM running on it yet.
    NodeRestarted {
        node: NodeId,
    },
    /// The cluster store committed `owner` as the VM's owner at `epoch`.
    OwnershipCommitted {
        vm: VmId,
        owner: NodeId,
        epoch: Epoch,
    },
    /// A migration began, and must end within `budget`.
    MigrationBegun {
        id: MigrationId,
        vm: VmId,
        source: NodeId,
        target: NodeId,
        budget: Duration,
    },
    MigrationEnded {
        id: MigrationId,
        outcome: Outcome,
    },
    /// Digest of the paused guest on `node`, before anything was sent or
    /// freed: the digest of the pause opened last.
    DigestAtPause {
        vm: VmId,
        node: NodeId,
        digest: Digest,
    },
    /// Digest of the guest on `node` just before it resumes: compared with
    /// the digest of the pause this resume ends.
    DigestAtResume {
        vm: VmId,
        node: NodeId,
        digest: Digest,
    },
    /// A client got the VM's service's acknowledgement for record `seq`.
    AppendAcked {
        vm: VmId,
        seq: u64,
    },
    /// The records the VM's service holds at the end of the run.
    FinalRecords {
        vm: VmId,
        seqs: Vec<u64>,
    },
    /// The cluster knows the VM must be restarted (its node died). Appends
    /// acknowledged before this lived in the dead guest's memory and are not
    /// expected to survive.
    VmNeedsRestart {
        vm: VmId,
    },
}

/// An event and when it happened, from the start of the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timed {
    pub at: Duration,
    pub event: Event,
}

impl Timed {
    pub fn new(at: Duration, event: Event) -> Self {
        Timed { at, event }
    }
}

/// The §5 promises the checker verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Invariant {
    /// §5.1: never two running copies; only the Raft owner at the current
    /// epoch runs the VM; epochs only grow.
    OneRunningCopy,
    /// §5.2: at the end every VM runs somewhere or is known to need a restart.
    NoLostVm,
    /// §5.3: a guest resumes with the digest it paused with.
    SameDigest,
    /// §5.4: every acknowledged append is present at the end.
    NoLostAppend,
    /// Every migration ends, completed or aborted, within its time budget,
    /// with an outcome that matches the switchover commit.
    MigrationsEnd,
}

impl Invariant {
    pub const ALL: [Invariant; 5] = [
        Invariant::OneRunningCopy,
        Invariant::NoLostVm,
        Invariant::SameDigest,
        Invariant::NoLostAppend,
        Invariant::MigrationsEnd,
    ];
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Invariant::OneRunningCopy => "one running copy",
            Invariant::NoLostVm => "no lost VM",
            Invariant::SameDigest => "same digest",
            Invariant::NoLostAppend => "no lost append",
            Invariant::MigrationsEnd => "migrations end",
        })
    }
}

/// One breach, pointing at the event where it shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub invariant: Invariant,
    /// Index of the event in the history.
    pub index: usize,
    pub at: Duration,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "event #{} at {:.3} s [{}]: {}",
            self.index,
            self.at.as_secs_f64(),
            self.invariant,
            self.message
        )
    }
}

/// What the checker did and found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    /// Events read.
    pub events: usize,
    /// Individual checks made, per invariant (every invariant is listed).
    pub checked: BTreeMap<Invariant, u64>,
    pub violations: Vec<Violation>,
    /// Resumes that could not be compared with their pause (the pause or the
    /// resume carries no digest): not violations, but the history does not
    /// show the VM kept its memory there.
    pub gaps: Vec<Violation>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }

    /// Every resume was compared with a digest of its own pause.
    pub fn is_complete(&self) -> bool {
        self.gaps.is_empty()
    }

    pub fn total_checked(&self) -> u64 {
        self.checked.values().sum()
    }

    pub fn violations_of(&self, invariant: Invariant) -> impl Iterator<Item = &Violation> {
        self.violations
            .iter()
            .filter(move |v| v.invariant == invariant)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} events, checks:", self.events)?;
        for (i, (invariant, n)) in self.checked.iter().enumerate() {
            write!(f, "{} {invariant} {n}", if i == 0 { "" } else { "," })?;
        }
        write!(f, "; {} violations", self.violations.len())?;
        if !self.gaps.is_empty() {
            write!(f, "; {} resumes not comparable", self.gaps.len())?;
        }
        writeln!(f)?;
        for v in &self.violations {
            writeln!(f, "  {v}")?;
        }
        for g in &self.gaps {
            writeln!(f, "  not comparable: {g}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct VmTrack {
    running: BTreeSet<NodeId>,
    owner: Option<(NodeId, Epoch)>,
    needs_restart: bool,
    deleted: bool,
    /// The pause the next resume ends, if the VM is paused.
    pause: Option<Pause>,
    /// Acknowledged seqs still expected at the end, with the ack's index.
    acked: BTreeMap<u64, usize>,
    final_records: Option<(BTreeSet<u64>, usize)>,
    /// The last event about this VM, where a loss at the end is reported.
    last_index: usize,
}

/// A pause of a VM's guest, the digest taken at it (with its index), and
/// the nodes whose resume from it came with a digest.
#[derive(Debug, Clone)]
struct Pause {
    node: NodeId,
    index: usize,
    digest: Option<(Digest, usize)>,
    resumed_with_digest: BTreeSet<NodeId>,
}

#[derive(Debug)]
struct MigrationTrack {
    vm: VmId,
    target: NodeId,
    begun_at: Duration,
    budget: Duration,
    index: usize,
    ended: bool,
    switched_over: bool,
}

struct Checker<'a> {
    history: &'a [Timed],
    vms: BTreeMap<VmId, VmTrack>,
    migrations: BTreeMap<MigrationId, MigrationTrack>,
    dead: BTreeSet<NodeId>,
    report: Report,
}

/// Replays `history` and checks every invariant of `DESIGN.md` §5.1–4 plus
/// migration termination.
pub fn check(history: &[Timed]) -> Report {
    let mut checker = Checker {
        history,
        vms: BTreeMap::new(),
        migrations: BTreeMap::new(),
        dead: BTreeSet::new(),
        report: Report {
            events: history.len(),
            checked: Invariant::ALL.iter().map(|&i| (i, 0)).collect(),
            violations: Vec::new(),
            gaps: Vec::new(),
        },
    };
    for (index, timed) in history.iter().enumerate() {
        checker.step(index, timed);
    }
    checker.finish();
    checker.report
}

impl Checker<'_> {
    fn count(&mut self, invariant: Invariant) {
        *self.report.checked.entry(invariant).or_insert(0) += 1;
    }

    fn violation(&mut self, invariant: Invariant, index: usize, message: String) {
        let at = self.history.get(index).map_or(Duration::ZERO, |t| t.at);
        self.report.violations.push(Violation {
            invariant,
            index,
            at,
            message,
        });
    }

    fn vm(&mut self, vm: VmId, index: usize) -> &mut VmTrack {
        let track = self.vms.entry(vm).or_default();
        track.last_index = index;
        track
    }

    fn step(&mut self, index: usize, timed: &Timed) {
        match &timed.event {
            &Event::VmStarted { vm, node, epoch } => {
                // A fresh boot: no pause of an earlier life carries over.
                self.vm(vm, index).pause = None;
                self.runs(index, vm, node, epoch)
            }
            &Event::VmResumed { vm, node, epoch } => {
                let unchecked = self
                    .vm(vm, index)
                    .pause
                    .clone()
                    .filter(|p| !p.resumed_with_digest.contains(&node));
                if let Some(pause) = unchecked {
                    self.gap(index, vm, node, &pause, "no digest was taken at the resume");
                }
                self.runs(index, vm, node, epoch)
            }
            &Event::VmPaused { vm, node } => {
                let track = self.vm(vm, index);
                track.running.remove(&node);
                track.pause = Some(Pause {
                    node,
                    index,
                    digest: None,
                    resumed_with_digest: BTreeSet::new(),
                });
            }
            &Event::VmStopped { vm, node } | &Event::VmDestroyed { vm, node } => {
                self.vm(vm, index).running.remove(&node);
            }
            &Event::VmDeleted { vm } => {
                let track = self.vm(vm, index);
                track.deleted = true;
                track.running.clear();
            }
            &Event::NodeDied { node } => {
                self.dead.insert(node);
                for track in self.vms.values_mut() {
                    track.running.remove(&node);
                }
            }
            &Event::NodeRestarted { node } => {
                self.dead.remove(&node);
            }
            &Event::OwnershipCommitted { vm, owner, epoch } => {
                self.committed(index, vm, owner, epoch)
            }
            &Event::MigrationBegun {
                id,
                vm,
                target,
                budget,
                ..
            } => {
                if self.migrations.contains_key(&id) {
                    self.violation(
                        Invariant::MigrationsEnd,
                        index,
                        format!("migration {id} begun twice"),
                    );
                    return;
                }
                self.vm(vm, index);
                self.migrations.insert(
                    id,
                    MigrationTrack {
                        vm,
                        target,
                        begun_at: timed.at,
                        budget,
                        index,
                        ended: false,
                        switched_over: false,
                    },
                );
            }
            &Event::MigrationEnded { id, outcome } => self.ended(index, timed.at, id, outcome),
            &Event::DigestAtPause { vm, node, digest } => self.paused_with(index, vm, node, digest),
            &Event::DigestAtResume { vm, node, digest } => {
                self.resumed_with(index, vm, node, digest)
            }
            &Event::AppendAcked { vm, seq } => {
                self.vm(vm, index).acked.insert(seq, index);
            }
            Event::FinalRecords { vm, seqs } => {
                self.vm(*vm, index).final_records = Some((seqs.iter().copied().collect(), index));
            }
            &Event::VmNeedsRestart { vm } => {
                let track = self.vm(vm, index);
                track.needs_restart = true;
                // The records lived in the dead guest's memory.
                track.acked.clear();
            }
        }
    }

    /// A copy starts or resumes on `node`.
    fn runs(&mut self, index: usize, vm: VmId, node: NodeId, epoch: Epoch) {
        self.count(Invariant::OneRunningCopy);
        let dead = self.dead.contains(&node);
        let track = self.vm(vm, index);
        let owner = track.owner;
        let others: Vec<NodeId> = track
            .running
            .iter()
            .copied()
            .filter(|&n| n != node)
            .collect();
        track.running.insert(node);
        track.needs_restart = false;

        if dead {
            self.violation(
                Invariant::OneRunningCopy,
                index,
                format!("vm {vm} runs on node {node}, which is dead"),
            );
        }
        match owner {
            None => self.violation(
                Invariant::OneRunningCopy,
                index,
                format!("vm {vm} runs on node {node} with no ownership committed"),
            ),
            Some((owner, current)) if owner != node => self.violation(
                Invariant::OneRunningCopy,
                index,
                format!("vm {vm} runs on node {node}, but the cluster store says node {owner} owns it (epoch {current})"),
            ),
            Some((_, current)) if epoch != current => self.violation(
                Invariant::OneRunningCopy,
                index,
                format!("vm {vm} runs on node {node} with epoch {epoch}, but the current epoch is {current}"),
            ),
            Some(_) => {}
        }
        if !others.is_empty() {
            self.violation(
                Invariant::OneRunningCopy,
                index,
                format!("vm {vm} runs on node {node} while it still runs on {others:?}: two running copies"),
            );
        }
    }

    fn committed(&mut self, index: usize, vm: VmId, owner: NodeId, epoch: Epoch) {
        self.count(Invariant::OneRunningCopy);
        let track = self.vm(vm, index);
        let previous = track.owner;
        track.owner = Some((owner, epoch));
        let strays: Vec<NodeId> = track
            .running
            .iter()
            .copied()
            .filter(|&n| n != owner)
            .collect();
        if let Some((_, before)) = previous {
            if epoch <= before {
                self.violation(
                    Invariant::OneRunningCopy,
                    index,
                    format!("vm {vm}: ownership committed at epoch {epoch}, not above the previous {before}"),
                );
            }
        }
        if !strays.is_empty() {
            self.violation(
                Invariant::OneRunningCopy,
                index,
                format!(
                    "vm {vm}: ownership passed to node {owner} while it still runs on {strays:?}"
                ),
            );
        }
        for m in self.migrations.values_mut() {
            if m.vm == vm && !m.ended && m.target == owner {
                m.switched_over = true;
            }
        }
    }

    fn ended(&mut self, index: usize, at: Duration, id: MigrationId, outcome: Outcome) {
        let Some(m) = self.migrations.get_mut(&id) else {
            self.violation(
                Invariant::MigrationsEnd,
                index,
                format!("migration {id} ended but never began"),
            );
            return;
        };
        if m.ended {
            self.violation(
                Invariant::MigrationsEnd,
                index,
                format!("migration {id} ended twice"),
            );
            return;
        }
        m.ended = true;
        let took = at.saturating_sub(m.begun_at);
        let (budget, switched_over, vm) = (m.budget, m.switched_over, m.vm);
        self.count(Invariant::MigrationsEnd);
        if took > budget {
            self.violation(
                Invariant::MigrationsEnd,
                index,
                format!(
                    "migration {id} of vm {vm} took {:.3} s, over its budget of {:.3} s",
                    took.as_secs_f64(),
                    budget.as_secs_f64()
                ),
            );
        }
        match (outcome, switched_over) {
            (Outcome::Completed, false) => self.violation(
                Invariant::MigrationsEnd,
                index,
                format!("migration {id} of vm {vm} completed without a switchover commit to its target"),
            ),
            (Outcome::Aborted, true) => self.violation(
                Invariant::MigrationsEnd,
                index,
                format!("migration {id} of vm {vm} aborted after the switchover commit: the target owns the VM"),
            ),
            _ => {}
        }
    }

    /// A digest of the guest paused on `node`: it belongs to the pause
    /// opened last (a history without the pause itself opens one here).
    fn paused_with(&mut self, index: usize, vm: VmId, node: NodeId, digest: Digest) {
        let track = self.vm(vm, index);
        let changed = match &mut track.pause {
            Some(pause) if pause.node == node => match pause.digest {
                None => {
                    pause.digest = Some((digest, index));
                    None
                }
                Some((first, at)) if first != digest => Some((pause.index, first, at)),
                Some(_) => None,
            },
            _ => {
                track.pause = Some(Pause {
                    node,
                    index,
                    digest: Some((digest, index)),
                    resumed_with_digest: BTreeSet::new(),
                });
                None
            }
        };
        if let Some((opened, first, at)) = changed {
            self.count(Invariant::SameDigest);
            self.violation(
                Invariant::SameDigest,
                index,
                format!("vm {vm}, paused on node {node} since event #{opened}, digests {digest} at event #{index} but {first} at event #{at}: it changed while paused"),
            );
        }
    }

    fn resumed_with(&mut self, index: usize, vm: VmId, node: NodeId, digest: Digest) {
        let pause = self.vm(vm, index).pause.as_mut().map(|p| {
            p.resumed_with_digest.insert(node);
            p.clone()
        });
        let Some(pause) = pause else {
            self.count(Invariant::SameDigest);
            self.violation(
                Invariant::SameDigest,
                index,
                format!("vm {vm} resumes on node {node} with no pause recorded before it"),
            );
            return;
        };
        let Some((before, _)) = pause.digest else {
            self.gap(index, vm, node, &pause, "its pause carries no digest");
            return;
        };
        self.count(Invariant::SameDigest);
        if before == digest {
            return;
        }
        let what = match (before.memory == digest.memory, before.state == digest.state) {
            (false, false) => "memory and device state differ",
            (false, true) => "memory differs",
            _ => "device state differs",
        };
        self.violation(
            Invariant::SameDigest,
            index,
            format!(
                "vm {vm} resumes on node {node} with {digest}; it paused on node {} (event #{}) with {before}: {what}",
                pause.node, pause.index
            ),
        );
    }

    /// A resume at `index` that ends `pause` and could not be compared.
    fn gap(&mut self, index: usize, vm: VmId, node: NodeId, pause: &Pause, why: &str) {
        let at = self.history.get(index).map_or(Duration::ZERO, |t| t.at);
        let older = self.history[..pause.index]
            .iter()
            .rposition(|t| matches!(t.event, Event::DigestAtPause { vm: v, .. } if v == vm));
        let stale = match older {
            Some(i) if pause.digest.is_none() => {
                format!("; the digest at event #{i} is of an earlier pause, not this one")
            }
            _ => String::new(),
        };
        self.report.gaps.push(Violation {
            invariant: Invariant::SameDigest,
            index,
            at,
            message: format!(
                "vm {vm} resumes on node {node}, ending its pause on node {} at event #{}: {why}{stale}",
                pause.node, pause.index
            ),
        });
    }

    fn finish(&mut self) {
        let end = self.history.len().saturating_sub(1);
        let mut found = Vec::new();
        let mut lost_vm = 0;
        let mut appends = 0;
        for (&vm, track) in &self.vms {
            if track.deleted {
                continue;
            }
            lost_vm += 1;
            if track.running.is_empty() && !track.needs_restart {
                found.push((
                    Invariant::NoLostVm,
                    track.last_index,
                    format!("vm {vm} runs nowhere at the end and no restart is pending: lost"),
                ));
            }
            if track.acked.is_empty() {
                continue;
            }
            match &track.final_records {
                None => {
                    appends += 1;
                    found.push((
                        Invariant::NoLostAppend,
                        end,
                        format!(
                            "vm {vm} acknowledged {} appends but its final records were never read",
                            track.acked.len()
                        ),
                    ));
                }
                Some((present, final_index)) => {
                    for (&seq, &acked_at) in &track.acked {
                        appends += 1;
                        if !present.contains(&seq) {
                            found.push((
                                Invariant::NoLostAppend,
                                *final_index,
                                format!("vm {vm}: append {seq}, acknowledged at event #{acked_at}, is missing from the final records"),
                            ));
                        }
                    }
                }
            }
        }
        for (&id, m) in &self.migrations {
            if !m.ended {
                found.push((
                    Invariant::MigrationsEnd,
                    m.index,
                    format!("migration {id} of vm {} never ended: hung", m.vm),
                ));
            }
        }
        let hung = self.migrations.values().filter(|m| !m.ended).count() as u64;
        *self.report.checked.entry(Invariant::NoLostVm).or_insert(0) += lost_vm;
        *self
            .report
            .checked
            .entry(Invariant::NoLostAppend)
            .or_insert(0) += appends;
        *self
            .report
            .checked
            .entry(Invariant::MigrationsEnd)
            .or_insert(0) += hung;
        for (invariant, index, message) in found {
            self.violation(invariant, index, message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Event::*;

    const D1: Digest = Digest {
        memory: 0x11,
        state: 0xaa,
    };
    const D2: Digest = Digest {
        memory: 0x22,
        state: 0xaa,
    };

    /// A history written as (milliseconds, event).
    fn history(events: Vec<(u64, Event)>) -> Vec<Timed> {
        events
            .into_iter()
            .map(|(ms, e)| Timed::new(Duration::from_millis(ms), e))
            .collect()
    }

    /// VM 7 boots on node 1, serves appends 1–3, and moves to node 2
    /// (completed); a second VM 8 on node 3 survives an aborted move to node 1
    /// and then loses its node, and the cluster marks it for restart.
    fn clean() -> Vec<(u64, Event)> {
        vec![
            (
                0,
                OwnershipCommitted {
                    vm: 7,
                    owner: 1,
                    epoch: 1,
                },
            ),
            (
                1,
                VmStarted {
                    vm: 7,
                    node: 1,
                    epoch: 1,
                },
            ),
            (
                2,
                OwnershipCommitted {
                    vm: 8,
                    owner: 3,
                    epoch: 1,
                },
            ),
            (
                3,
                VmStarted {
                    vm: 8,
                    node: 3,
                    epoch: 1,
                },
            ),
            (10, AppendAcked { vm: 7, seq: 1 }),
            (
                20,
                MigrationBegun {
                    id: 100,
                    vm: 7,
                    source: 1,
                    target: 2,
                    budget: Duration::from_secs(15),
                },
            ),
            (30, AppendAcked { vm: 7, seq: 2 }),
            (400, VmPaused { vm: 7, node: 1 }),
            (
                401,
                DigestAtPause {
                    vm: 7,
                    node: 1,
                    digest: D1,
                },
            ),
            (
                405,
                OwnershipCommitted {
                    vm: 7,
                    owner: 2,
                    epoch: 2,
                },
            ),
            (
                406,
                DigestAtResume {
                    vm: 7,
                    node: 2,
                    digest: D1,
                },
            ),
            (
                407,
                VmResumed {
                    vm: 7,
                    node: 2,
                    epoch: 2,
                },
            ),
            (
                408,
                MigrationEnded {
                    id: 100,
                    outcome: Outcome::Completed,
                },
            ),
            (409, VmDestroyed { vm: 7, node: 1 }),
            (420, AppendAcked { vm: 7, seq: 3 }),
            (
                500,
                MigrationBegun {
                    id: 101,
                    vm: 8,
                    source: 3,
                    target: 1,
                    budget: Duration::from_secs(15),
                },
            ),
            (600, VmPaused { vm: 8, node: 3 }),
            (
                601,
                DigestAtPause {
                    vm: 8,
                    node: 3,
                    digest: D2,
                },
            ),
            // The commit fails: abort, the source resumes as it was.
            (
                700,
                DigestAtResume {
                    vm: 8,
                    node: 3,
                    digest: D2,
                },
            ),
            (
                701,
                VmResumed {
                    vm: 8,
                    node: 3,
                    epoch: 1,
                },
            ),
            (
                702,
                MigrationEnded {
                    id: 101,
                    outcome: Outcome::Aborted,
                },
            ),
            (703, VmDestroyed { vm: 8, node: 1 }),
            (750, AppendAcked { vm: 8, seq: 1 }),
            (800, NodeDied { node: 3 }),
            (801, VmNeedsRestart { vm: 8 }),
            (
                900,
                FinalRecords {
                    vm: 7,
                    seqs: vec![1, 2, 3],
                },
            ),
        ]
    }

    fn only(report: &Report, invariant: Invariant) -> &Violation {
        assert!(
            !report.violations.is_empty()
                && report.violations.iter().all(|v| v.invariant == invariant),
            "expected only {invariant} violations, got:\n{report}"
        );
        &report.violations[0]
    }

    #[test]
    fn clean_history_passes() {
        let report = check(&history(clean()));
        assert!(report.is_clean(), "{report}");
        for invariant in Invariant::ALL {
            assert!(
                report.checked[&invariant] > 0,
                "{invariant} never checked:\n{report}"
            );
        }
        assert_eq!(report.checked[&Invariant::NoLostAppend], 3);
        assert_eq!(report.checked[&Invariant::MigrationsEnd], 2);
        assert_eq!(report.events, clean().len());
    }

    #[test]
    fn source_resuming_after_switchover_commit_is_caught() {
        // The broken build: the source loses contact while paused and resumes
        // on its own after the commit gave the VM to the target.
        let mut events = clean();
        events.insert(
            10,
            (
                405,
                VmResumed {
                    vm: 7,
                    node: 1,
                    epoch: 1,
                },
            ),
        );
        let report = check(&history(events));
        let v = only(&report, Invariant::OneRunningCopy);
        assert_eq!(v.index, 10);
        assert!(v.message.contains("node 2 owns it"), "{}", v.message);
        // And when the target resumes too, there are two running copies.
        assert!(
            report
                .violations
                .iter()
                .any(|v| v.index == 12 && v.message.contains("two running copies")),
            "{report}"
        );
    }

    #[test]
    fn stale_epoch_is_caught() {
        let mut events = clean();
        events[11] = (
            407,
            VmResumed {
                vm: 7,
                node: 2,
                epoch: 1,
            },
        );
        let report = check(&history(events));
        let v = only(&report, Invariant::OneRunningCopy);
        assert_eq!(v.index, 11);
        assert!(v.message.contains("current epoch is 2"), "{}", v.message);
    }

    #[test]
    fn commit_while_source_still_runs_is_caught() {
        let mut events = clean();
        events.remove(7); // the source never paused
        let report = check(&history(events));
        let v = only(&report, Invariant::OneRunningCopy);
        assert!(v.message.contains("still runs on [1]"), "{report}");
    }

    #[test]
    fn lost_vm_is_caught() {
        let mut events = clean();
        events.retain(|(_, e)| *e != VmNeedsRestart { vm: 8 });
        let report = check(&history(events));
        let lost: Vec<_> = report.violations_of(Invariant::NoLostVm).collect();
        assert_eq!(lost.len(), 1, "{report}");
        assert!(
            lost[0].message.contains("vm 8 runs nowhere"),
            "{}",
            lost[0].message
        );
        // Without the restart mark, its acknowledged append is still owed too.
        assert_eq!(
            report.violations_of(Invariant::NoLostAppend).count(),
            1,
            "{report}"
        );
    }

    #[test]
    fn different_digest_at_resume_is_caught() {
        let mut events = clean();
        events[10] = (
            406,
            DigestAtResume {
                vm: 7,
                node: 2,
                digest: D2,
            },
        );
        let report = check(&history(events));
        let v = only(&report, Invariant::SameDigest);
        assert_eq!(v.index, 10);
        assert!(v.message.ends_with("memory differs"), "{}", v.message);
    }

    #[test]
    fn lost_append_is_caught() {
        let mut events = clean();
        let last = events.len() - 1;
        events[last] = (
            900,
            FinalRecords {
                vm: 7,
                seqs: vec![1, 3],
            },
        );
        let report = check(&history(events));
        let v = only(&report, Invariant::NoLostAppend);
        assert_eq!(v.index, last);
        assert!(
            v.message.contains("append 2, acknowledged at event #6"),
            "{}",
            v.message
        );
    }

    #[test]
    fn missing_final_records_are_caught() {
        let mut events = clean();
        events.pop();
        let report = check(&history(events));
        let v = only(&report, Invariant::NoLostAppend);
        assert!(v.message.contains("never read"), "{}", v.message);
    }

    #[test]
    fn hung_migration_is_caught() {
        let mut events = clean();
        events.push((
            1000,
            MigrationBegun {
                id: 102,
                vm: 7,
                source: 2,
                target: 3,
                budget: Duration::from_secs(15),
            },
        ));
        let report = check(&history(events));
        let v = only(&report, Invariant::MigrationsEnd);
        assert!(
            v.message.contains("migration 102 of vm 7 never ended"),
            "{}",
            v.message
        );
    }

    #[test]
    fn migration_over_budget_is_caught() {
        let mut events = clean();
        events[12] = (
            20_000,
            MigrationEnded {
                id: 100,
                outcome: Outcome::Completed,
            },
        );
        let report = check(&history(events));
        let v = only(&report, Invariant::MigrationsEnd);
        assert_eq!(v.index, 12);
        assert!(
            v.message.contains("over its budget of 15.000 s"),
            "{}",
            v.message
        );
    }

    #[test]
    fn outcome_must_match_the_switchover() {
        let mut events = clean();
        events[12] = (
            408,
            MigrationEnded {
                id: 100,
                outcome: Outcome::Aborted,
            },
        );
        let report = check(&history(events));
        assert!(only(&report, Invariant::MigrationsEnd)
            .message
            .contains("aborted after the switchover commit"));

        let mut events = clean();
        events[20] = (
            702,
            MigrationEnded {
                id: 101,
                outcome: Outcome::Completed,
            },
        );
        let report = check(&history(events));
        assert!(only(&report, Invariant::MigrationsEnd)
            .message
            .contains("completed without a switchover commit"));
    }

    #[test]
    fn dead_node_cannot_run_a_vm() {
        let mut events = clean();
        events.push((
            950,
            VmResumed {
                vm: 8,
                node: 3,
                epoch: 1,
            },
        ));
        let report = check(&history(events));
        let v = only(&report, Invariant::OneRunningCopy);
        assert!(v.message.contains("which is dead"), "{}", v.message);
    }

    #[test]
    fn restart_elsewhere_after_node_death_is_clean() {
        let mut events = clean();
        events.push((
            1000,
            OwnershipCommitted {
                vm: 8,
                owner: 1,
                epoch: 2,
            },
        ));
        events.push((
            1001,
            VmStarted {
                vm: 8,
                node: 1,
                epoch: 2,
            },
        ));
        events.push((1100, NodeRestarted { node: 3 }));
        let report = check(&history(events));
        assert!(report.is_clean(), "{report}");
    }

    #[test]
    fn deleted_vm_is_not_lost() {
        let mut events = clean();
        events.retain(|(_, e)| *e != VmNeedsRestart { vm: 8 });
        events.push((1000, VmDeleted { vm: 8 }));
        let report = check(&history(events));
        assert!(report.is_clean(), "{report}");
    }

    #[test]
    fn empty_history_is_clean() {
        let report = check(&[]);
        assert!(report.is_clean());
        assert_eq!(report.total_checked(), 0);
    }

    #[test]
    fn report_display_lists_counts_and_violations() {
        let mut events = clean();
        events[10] = (
            406,
            DigestAtResume {
                vm: 7,
                node: 2,
                digest: D2,
            },
        );
        let text = check(&history(events)).to_string();
        assert!(
            text.starts_with("26 events, checks: one running copy"),
            "{text}"
        );
        assert!(
            text.contains("; 1 violations\n  event #10 at 0.406 s [same digest]: vm 7 resumes"),
            "{text}"
        );
    }

    // ---- issue 20: seed 12's history, as the old recorder wrote it ----

    const ISSUE_A: Digest = Digest {
        memory: 0x98ef_dfed_0000_0000_0000_0000_0000_0000,
        state: 0x3788_5c0c_0000_0000_0000_0000_0000_0000,
    };
    const ISSUE_B: Digest = Digest {
        memory: 0xcfa3_b179_0000_0000_0000_0000_0000_0000,
        state: 0xb891_9eb1_0000_0000_0000_0000_0000_0000,
    };

    /// Pads `events` with acknowledged appends of vm 1 (as the clients' acks
    /// filled the real history) until the next event lands at `index`.
    fn pad_to(events: &mut Vec<(u64, Event)>, index: usize, seq: &mut u64) {
        while events.len() < index {
            let ms = events.last().map_or(0, |(ms, _)| *ms);
            *seq += 1;
            events.push((ms, AppendAcked { vm: 1, seq: *seq }));
        }
    }

    /// The shape of seed 12's run around vm 1, with the indices it printed:
    /// vm 1 pauses on node 2 for a move to node 3 and the digest A is taken
    /// (event #2230); the move aborts and vm 1 resumes on node 2 with A. It
    /// runs on (its memory changes). A second move pauses it again; node 3,
    /// the target, is killed during that blackout, before any digest is
    /// taken; the source resumes, recorded with digest B (event #4359).
    fn issue_20_history(failed_blackout_digest: Option<Digest>) -> Vec<Timed> {
        let mut seq = 0;
        let mut e = vec![
            (
                0,
                OwnershipCommitted {
                    vm: 1,
                    owner: 2,
                    epoch: 1,
                },
            ),
            (
                1,
                VmStarted {
                    vm: 1,
                    node: 2,
                    epoch: 1,
                },
            ),
        ];
        pad_to(&mut e, 2227, &mut seq);
        e.push((
            1790,
            MigrationBegun {
                id: 20,
                vm: 1,
                source: 2,
                target: 3,
                budget: Duration::from_secs(60),
            },
        ));
        pad_to(&mut e, 2229, &mut seq);
        e.push((1800, VmPaused { vm: 1, node: 2 }));
        e.push((
            1801,
            DigestAtPause {
                vm: 1,
                node: 2,
                digest: ISSUE_A,
            },
        ));
        e.push((
            1900,
            DigestAtResume {
                vm: 1,
                node: 2,
                digest: ISSUE_A,
            },
        ));
        e.push((
            1901,
            VmResumed {
                vm: 1,
                node: 2,
                epoch: 1,
            },
        ));
        e.push((
            1902,
            MigrationEnded {
                id: 20,
                outcome: Outcome::Aborted,
            },
        ));
        pad_to(&mut e, 4300, &mut seq);
        e.push((
            3400,
            MigrationBegun {
                id: 31,
                vm: 1,
                source: 2,
                target: 3,
                budget: Duration::from_secs(60),
            },
        ));
        e.push((3450, VmPaused { vm: 1, node: 2 }));
        if let Some(digest) = failed_blackout_digest {
            e.push((
                3451,
                DigestAtPause {
                    vm: 1,
                    node: 2,
                    digest,
                },
            ));
        }
        e.push((3452, NodeDied { node: 3 }));
        pad_to(&mut e, 4359, &mut seq);
        e.push((
            3643,
            DigestAtResume {
                vm: 1,
                node: 2,
                digest: ISSUE_B,
            },
        ));
        e.push((
            3644,
            VmResumed {
                vm: 1,
                node: 2,
                epoch: 1,
            },
        ));
        e.push((
            3645,
            MigrationEnded {
                id: 31,
                outcome: Outcome::Aborted,
            },
        ));
        e.push((3700, NodeRestarted { node: 3 }));
        e.push((
            3800,
            FinalRecords {
                vm: 1,
                seqs: (1..=seq).collect(),
            },
        ));
        history(e)
    }

    #[test]
    fn issue_20_as_recorded_is_a_stale_pause_not_a_violation() {
        let events = issue_20_history(None);
        assert_eq!(
            events[2230].event,
            DigestAtPause {
                vm: 1,
                node: 2,
                digest: ISSUE_A
            }
        );
        assert_eq!(
            events[4359].event,
            DigestAtResume {
                vm: 1,
                node: 2,
                digest: ISSUE_B
            }
        );
        let report = check(&events);
        // The resume at #4359 ends the pause of the failed blackout, which
        // has no digest; the digest at #2230 is of the pause before.
        assert_eq!(
            report.violations_of(Invariant::SameDigest).count(),
            0,
            "{report}"
        );
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.gaps.len(), 1, "{report}");
        let gap = &report.gaps[0];
        assert_eq!(gap.index, 4359);
        let failed_pause = events
            .iter()
            .rposition(|t| t.event == VmPaused { vm: 1, node: 2 })
            .unwrap();
        assert!(
            gap.message.contains(&format!("ending its pause on node 2 at event #{failed_pause}: its pause carries no digest; the digest at event #2230 is of an earlier pause")),
            "{report}"
        );
        // The first resume, after the pause it ends, was compared.
        assert_eq!(report.checked[&Invariant::SameDigest], 1);
        assert!(
            report
                .to_string()
                .contains("; 0 violations; 1 resumes not comparable"),
            "{report}"
        );
    }

    #[test]
    fn issue_20_with_a_digest_at_every_pause_is_judged_on_its_own_pause() {
        // The witness digests the failed blackout's pause too: equal to the
        // resume's, clean and complete...
        let report = check(&issue_20_history(Some(ISSUE_B)));
        assert!(report.is_clean() && report.is_complete(), "{report}");
        assert_eq!(report.checked[&Invariant::SameDigest], 2);
        // ...and had the guest really changed in that blackout, it is caught
        // against that pause, not the stale one.
        let report = check(&issue_20_history(Some(ISSUE_A)));
        let v = only(&report, Invariant::SameDigest);
        assert_eq!(v.index, 4359);
        assert!(
            v.message.contains("paused on node 2 (event #4301)")
                && v.message.ends_with("memory and device state differ"),
            "{report}"
        );
    }

    #[test]
    fn a_pause_whose_resume_takes_no_digest_is_a_gap() {
        let mut events = clean();
        events.remove(18); // vm 8's digest at resume
        let report = check(&history(events));
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.gaps.len(), 1, "{report}");
        assert!(
            report.gaps[0]
                .message
                .contains("no digest was taken at the resume"),
            "{report}"
        );
    }

    #[test]
    fn a_resume_with_no_pause_at_all_is_a_violation() {
        let mut events = clean();
        events.remove(16); // vm 8's pause
        events.remove(16); // and its digest
        let report = check(&history(events));
        let v = only(&report, Invariant::SameDigest);
        assert!(
            v.message.contains("no pause recorded before it"),
            "{report}"
        );
    }

    #[test]
    fn a_fresh_boot_ends_the_pause_of_an_earlier_life() {
        // vm 8 pauses, its node dies, it boots again on node 1 and is then
        // resumed by a stray copy: nothing of the old pause may vouch for it.
        let mut events = clean();
        events.truncate(19);
        events.push((650, NodeDied { node: 3 }));
        events.push((
            660,
            OwnershipCommitted {
                vm: 8,
                owner: 1,
                epoch: 2,
            },
        ));
        events.push((
            661,
            VmStarted {
                vm: 8,
                node: 1,
                epoch: 2,
            },
        ));
        events.push((
            670,
            DigestAtResume {
                vm: 8,
                node: 1,
                digest: D2,
            },
        ));
        let report = check(&history(events));
        assert!(
            report
                .violations_of(Invariant::SameDigest)
                .any(|v| v.message.contains("no pause recorded")),
            "{report}"
        );
    }

    #[test]
    fn a_guest_that_changes_while_paused_is_caught() {
        let mut events = clean();
        events.insert(
            18,
            (
                602,
                DigestAtPause {
                    vm: 8,
                    node: 3,
                    digest: D1,
                },
            ),
        );
        let report = check(&history(events));
        let v = only(&report, Invariant::SameDigest);
        assert_eq!(v.index, 18);
        assert!(v.message.contains("changed while paused"), "{report}");
    }
}
