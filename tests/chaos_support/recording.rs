//! The history of one chaos run, as the invariant checker reads it.
//!
//! Every node reports its [`HistoryEvent`]s through a [`Recorder`] made here;
//! the clients report acknowledged appends; the harness reports node deaths,
//! restarts and what the cluster store says at the end. All of them go into
//! one list under one lock, stamped with one clock, so the list's order is
//! the order in which things happened.
//!
//! Conversion to the checker's [`Event`]s:
//! - an ownership commit is recorded the first time anyone learns of it: the
//!   node that starts a VM, the source that hears its switchover commit, or
//!   the target that resumes after seeing it on its own replica — whichever
//!   comes first, and always before the resume that relies on it;
//! - a node's events count only while that incarnation of the node is alive:
//!   once the harness has recorded a node's death, whatever its lingering
//!   in-process tasks do is not the node any more;
//! - phases the fault schedule aims at (round 0, dirty rounds, blackout,
//!   after the switchover) are broadcast to the fault driver as they happen,
//!   and remembered for a replay that waits on one migration's phase;
//! - digests at pause and resume are the witness's own
//!   (`ferry_chaos::witness`), taken through each node's guest observer at
//!   every pause and every resume; the digests the engine reports are not
//!   used (it takes them only when a move verifies, and only where its
//!   protocol needs one);
//! - each aborted migration keeps the reason its job gave (or
//!   [`SOURCE_DIED`] when the store's word had to be taken), for the run to
//!   sort into expected kinds (`ferry_chaos::aborts`).

use ferry_actors::history::{GuestObserver, GuestPoint, HistoryEvent, Recorder};
use ferry_chaos::aborts::SOURCE_DIED;
use ferry_chaos::checker::{Digest, Event, Outcome, Timed};
use ferry_chaos::schedule::Phase;
use ferry_cluster::NodeId;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Added to the policy's time budget before a migration counts as hung: the
/// control calls' own timeouts (prepare, complete, resume, abandon: 10 s
/// each at most), probes, and the store being unreachable while a fault
/// lasts. A migration that ends at all ends well within it.
pub const MIGRATION_ALLOWANCE: Duration = Duration::from_secs(45);

/// A phase a migration reached, for the fault driver.
#[derive(Debug, Clone, Copy)]
pub struct PhaseHit {
    pub phase: Phase,
    pub migration: u64,
}

#[derive(Debug, Clone)]
pub struct Begun {
    pub vm: String,
    pub source: NodeId,
    pub target: NodeId,
    /// The incarnation of the source that began it.
    pub incarnation: u64,
}

#[derive(Default)]
struct Inner {
    events: Vec<Timed>,
    vm_ids: BTreeMap<String, u64>,
    /// Ownership commits recorded: vm → epoch → owner.
    owners: BTreeMap<u64, BTreeMap<u64, NodeId>>,
    ended: BTreeMap<u64, Outcome>,
    begun: BTreeMap<u64, Begun>,
    /// Bumped when a VM is known to need a restart: an acknowledgement from
    /// the guest that died is not owed any more.
    generation: BTreeMap<String, u64>,
    /// VMs marked as needing a restart and not started since.
    pending_restart: BTreeSet<String>,
    /// The incarnation of each live node.
    alive: BTreeMap<NodeId, u64>,
    /// Migrations for which the after-switchover phase was announced.
    switched: BTreeSet<u64>,
    /// Inconsistencies the harness found between sources (each a violation).
    notes: Vec<(usize, String)>,
    /// Observations for the run's log.
    remarks: Vec<String>,
    /// Phases each migration reached.
    reached: BTreeSet<(u64, Phase)>,
    /// Why each migration recorded as aborted ended.
    abort_reasons: BTreeMap<u64, String>,
}

/// An aborted migration and the reason given for it.
#[derive(Debug, Clone)]
pub struct Aborted {
    pub migration: u64,
    pub vm: String,
    pub reason: String,
}

/// Sees every event of a live node before it is recorded (a test acting at
/// an exact point of a move). Called on engine threads: quick, no blocking.
pub type Tap = Arc<dyn Fn(NodeId, &HistoryEvent) + Send + Sync>;

pub struct Recording {
    start: Instant,
    start_wall_ms: u64,
    inner: Mutex<Inner>,
    phases: tokio::sync::broadcast::Sender<PhaseHit>,
    tap: Mutex<Option<Tap>>,
}

impl Recording {
    pub fn new() -> Arc<Recording> {
        Arc::new(Recording {
            start: Instant::now(),
            start_wall_ms: ferry_actors::node::now_ms(),
            inner: Mutex::new(Inner::default()),
            phases: tokio::sync::broadcast::channel(1024).0,
            tap: Mutex::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn phases(&self) -> tokio::sync::broadcast::Receiver<PhaseHit> {
        self.phases.subscribe()
    }

    /// The recorder for incarnation `incarnation` of `node` (alive from now).
    pub fn recorder(self: &Arc<Self>, node: NodeId, incarnation: u64) -> Recorder {
        self.lock().alive.insert(node, incarnation);
        let me = self.clone();
        Arc::new(move |event| me.node_event(node, incarnation, event))
    }

    /// The guest observer for incarnation `incarnation` of `node`: the
    /// witness digests the guest at each pause and resume.
    pub fn observer(self: &Arc<Self>, node: NodeId, incarnation: u64) -> GuestObserver {
        let me = self.clone();
        Arc::new(move |seen| {
            if me.lock().alive.get(&node) != Some(&incarnation) {
                return;
            }
            match ferry_chaos::witness::digest(seen.guest) {
                Ok(digest) => me.witnessed(node, incarnation, seen.point, seen.vm, digest),
                Err(e) => me.note_harness(format!(
                    "witness: vm {} on node {node} ({:?}, migration {}): no digest, {e}",
                    seen.vm, seen.point, seen.migration
                )),
            }
        })
    }

    /// The witness's digest of `vm` on `node` at `point` (what the observer
    /// records; a test may feed a history's digests through it directly).
    pub fn witnessed(
        &self,
        node: NodeId,
        incarnation: u64,
        point: GuestPoint,
        vm: &str,
        digest: Digest,
    ) {
        let mut inner = self.lock();
        if inner.alive.get(&node) != Some(&incarnation) {
            return;
        }
        let id = Self::vm_id(&mut inner, vm);
        let event = match point {
            GuestPoint::Paused => Event::DigestAtPause {
                vm: id,
                node,
                digest,
            },
            GuestPoint::Resuming => Event::DigestAtResume {
                vm: id,
                node,
                digest,
            },
        };
        self.push(&mut inner, event);
    }

    /// Shows every live node's events to `tap` from now on.
    pub fn set_tap(&self, tap: Tap) {
        *self.tap.lock().unwrap_or_else(|p| p.into_inner()) = Some(tap);
    }

    /// Whether migration `migration` has reached `phase`.
    pub fn reached(&self, migration: u64, phase: Phase) -> bool {
        self.lock().reached.contains(&(migration, phase))
    }

    fn vm_id(inner: &mut Inner, name: &str) -> u64 {
        let next = inner.vm_ids.len() as u64 + 1;
        *inner.vm_ids.entry(name.to_string()).or_insert(next)
    }

    fn push(&self, inner: &mut Inner, event: Event) -> usize {
        // Stamped under the lock: times never go backwards in the list.
        inner.events.push(Timed::new(self.start.elapsed(), event));
        inner.events.len() - 1
    }

    fn note(&self, inner: &mut Inner, message: String) {
        let index = inner.events.len().saturating_sub(1);
        inner.notes.push((index, message));
    }

    fn ownership(&self, inner: &mut Inner, vm: &str, owner: NodeId, epoch: u64) {
        let id = Self::vm_id(inner, vm);
        let known = inner.owners.entry(id).or_default();
        match known.get(&epoch) {
            Some(&o) if o == owner => return,
            Some(&o) => {
                let message = format!(
                    "vm {vm}: epoch {epoch} owned by node {o} and by node {owner} by different accounts"
                );
                self.note(inner, message);
            }
            None => {}
        }
        inner.owners.entry(id).or_default().insert(epoch, owner);
        self.push(
            inner,
            Event::OwnershipCommitted {
                vm: id,
                owner,
                epoch,
            },
        );
    }

    fn end(
        &self,
        inner: &mut Inner,
        migration: u64,
        outcome: Outcome,
        reason: Option<String>,
        who: &str,
    ) {
        match inner.ended.get(&migration) {
            Some(&o) if o == outcome => {}
            Some(&o) => {
                let message = format!(
                    "migration {migration}: {who} says {outcome:?}, but it was recorded {o:?}"
                );
                self.note(inner, message);
            }
            None => {
                inner.ended.insert(migration, outcome);
                if outcome == Outcome::Aborted {
                    inner.abort_reasons.insert(
                        migration,
                        reason.unwrap_or_else(|| format!("{who} gave no reason")),
                    );
                }
                self.push(
                    inner,
                    Event::MigrationEnded {
                        id: migration,
                        outcome,
                    },
                );
            }
        }
    }

    fn announce(&self, phase: Phase, migration: u64) {
        self.lock().reached.insert((migration, phase));
        let _ = self.phases.send(PhaseHit { phase, migration });
    }

    fn node_event(&self, node: NodeId, incarnation: u64, event: HistoryEvent) {
        if self.lock().alive.get(&node) != Some(&incarnation) {
            return;
        }
        let tap = self.tap.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(tap) = tap {
            tap(node, &event);
        }
        let mut inner = self.lock();
        if inner.alive.get(&node) != Some(&incarnation) {
            return;
        }
        match event {
            HistoryEvent::VmStarted { vm, node, epoch } => {
                self.ownership(&mut inner, &vm, node, epoch);
                inner.pending_restart.remove(&vm);
                let id = Self::vm_id(&mut inner, &vm);
                self.push(
                    &mut inner,
                    Event::VmStarted {
                        vm: id,
                        node,
                        epoch,
                    },
                );
            }
            HistoryEvent::MigrationBegun {
                migration,
                vm,
                source,
                target,
                budget,
            } => {
                let id = Self::vm_id(&mut inner, &vm);
                inner.begun.insert(
                    migration,
                    Begun {
                        vm,
                        source,
                        target,
                        incarnation,
                    },
                );
                self.push(
                    &mut inner,
                    Event::MigrationBegun {
                        id: migration,
                        vm: id,
                        source,
                        target,
                        budget: budget + MIGRATION_ALLOWANCE,
                    },
                );
            }
            HistoryEvent::CopyRound {
                migration, round, ..
            } => {
                drop(inner);
                let phase = if round == 0 {
                    Phase::MidRound0
                } else {
                    Phase::MidDirtyRounds
                };
                self.announce(phase, migration);
            }
            HistoryEvent::SourcePaused {
                migration,
                vm,
                node,
            } => {
                let id = Self::vm_id(&mut inner, &vm);
                self.push(&mut inner, Event::VmPaused { vm: id, node });
                drop(inner);
                self.announce(Phase::DuringBlackout, migration);
            }
            // The witness's digests stand in for the engine's.
            HistoryEvent::DigestAtPause { .. } | HistoryEvent::DigestAtResume { .. } => {}
            HistoryEvent::SwitchoverCommitted {
                migration,
                vm,
                owner,
                epoch,
            } => {
                self.ownership(&mut inner, &vm, owner, epoch);
                let first = inner.switched.insert(migration);
                drop(inner);
                if first {
                    self.announce(Phase::AfterSwitchover, migration);
                }
            }
            HistoryEvent::TargetResumed {
                migration,
                vm,
                node,
                epoch,
            } => {
                self.ownership(&mut inner, &vm, node, epoch);
                let id = Self::vm_id(&mut inner, &vm);
                self.push(
                    &mut inner,
                    Event::VmResumed {
                        vm: id,
                        node,
                        epoch,
                    },
                );
                let first = inner.switched.insert(migration);
                drop(inner);
                if first {
                    self.announce(Phase::AfterSwitchover, migration);
                }
            }
            HistoryEvent::SourceResumed {
                vm, node, epoch, ..
            } => {
                let id = Self::vm_id(&mut inner, &vm);
                self.push(
                    &mut inner,
                    Event::VmResumed {
                        vm: id,
                        node,
                        epoch,
                    },
                );
            }
            HistoryEvent::CopyDestroyed { vm, node } => {
                let id = Self::vm_id(&mut inner, &vm);
                self.push(&mut inner, Event::VmDestroyed { vm: id, node });
            }
            HistoryEvent::MigrationEnded {
                migration,
                completed,
                reason,
                ..
            } => {
                let outcome = if completed {
                    Outcome::Completed
                } else {
                    Outcome::Aborted
                };
                self.end(&mut inner, migration, outcome, reason, "its source");
            }
        }
    }

    /// The harness killed `node`: nothing runs there any more, and nothing
    /// that incarnation does from now on counts.
    pub fn node_died(&self, node: NodeId) {
        let mut inner = self.lock();
        inner.alive.remove(&node);
        self.push(&mut inner, Event::NodeDied { node });
    }

    /// `node` is back (recorded before its new incarnation's recorder is made).
    pub fn node_restarted(&self, node: NodeId) {
        let mut inner = self.lock();
        self.push(&mut inner, Event::NodeRestarted { node });
    }

    /// The store says `vm` must be restarted (its node died while it ran).
    /// Recorded once per death.
    pub fn needs_restart(&self, vm: &str) {
        let mut inner = self.lock();
        if !inner.pending_restart.insert(vm.to_string()) {
            return;
        }
        *inner.generation.entry(vm.to_string()).or_insert(0) += 1;
        let id = Self::vm_id(&mut inner, vm);
        self.push(&mut inner, Event::VmNeedsRestart { vm: id });
    }

    /// Which life of `vm`'s guest a client is talking to (see [`Self::acked`]).
    pub fn generation(&self, vm: &str) -> u64 {
        self.lock().generation.get(vm).copied().unwrap_or(0)
    }

    /// A client got `seq` acknowledged by `vm`'s service, having read
    /// `generation` before it asked. If the guest died and was marked for a
    /// restart in between, the acknowledgement may come from the dead guest
    /// and is not owed: it is dropped (never a false alarm; at worst one
    /// append less checked).
    pub fn acked(&self, vm: &str, seq: u64, generation: u64) -> bool {
        let mut inner = self.lock();
        if inner.generation.get(vm).copied().unwrap_or(0) != generation {
            return false;
        }
        let id = Self::vm_id(&mut inner, vm);
        self.push(&mut inner, Event::AppendAcked { vm: id, seq });
        true
    }

    pub fn final_records(&self, vm: &str, seqs: Vec<u64>) {
        let mut inner = self.lock();
        let id = Self::vm_id(&mut inner, vm);
        self.push(&mut inner, Event::FinalRecords { vm: id, seqs });
    }

    /// The store's word on a migration whose source died before its job
    /// could say how it ended. `ended_at_ms` is the store's wall-clock time.
    pub fn store_outcome(
        &self,
        migration: u64,
        outcome: Outcome,
        target_epoch: Option<(NodeId, u64)>,
        ended_at_ms: Option<u64>,
    ) {
        let mut inner = self.lock();
        let vm = inner.begun.get(&migration).map(|b| b.vm.clone());
        if let (Some(vm), Some((target, epoch))) = (vm, target_epoch) {
            let id = Self::vm_id(&mut inner, &vm);
            let highest = inner
                .owners
                .get(&id)
                .and_then(|o| o.keys().next_back().copied())
                .unwrap_or(0);
            // Only if nobody learned of it and nothing newer happened since.
            if epoch > highest {
                self.ownership(&mut inner, &vm, target, epoch);
            }
        }
        if inner.ended.contains_key(&migration) {
            return self.end(&mut inner, migration, outcome, None, "the store");
        }
        inner.ended.insert(migration, outcome);
        if outcome == Outcome::Aborted {
            inner
                .abort_reasons
                .insert(migration, SOURCE_DIED.to_string());
        }
        let at = ended_at_ms
            .map(|ms| Duration::from_millis(ms.saturating_sub(self.start_wall_ms)))
            .unwrap_or_else(|| self.start.elapsed());
        inner.events.push(Timed::new(
            at,
            Event::MigrationEnded {
                id: migration,
                outcome,
            },
        ));
    }

    /// Migrations begun with no end recorded, with what is known of them.
    pub fn open_migrations(&self) -> Vec<(u64, Begun)> {
        let inner = self.lock();
        inner
            .begun
            .iter()
            .filter(|(id, _)| !inner.ended.contains_key(id))
            .map(|(id, b)| (*id, b.clone()))
            .collect()
    }

    /// The incarnation of `node` alive now, if it is.
    pub fn incarnation(&self, node: NodeId) -> Option<u64> {
        self.lock().alive.get(&node).copied()
    }

    pub fn events(&self) -> Vec<Timed> {
        self.lock().events.clone()
    }

    /// Something the harness saw that is not a violation but worth a line
    /// in the run's log.
    pub fn note_harness(&self, message: String) {
        self.lock().remarks.push(message);
    }

    pub fn remarks(&self) -> Vec<String> {
        self.lock().remarks.clone()
    }

    /// Harness-level inconsistencies: (event index, message).
    pub fn notes(&self) -> Vec<(usize, String)> {
        self.lock().notes.clone()
    }

    pub fn vm_names(&self) -> BTreeMap<u64, String> {
        self.lock()
            .vm_ids
            .iter()
            .map(|(n, id)| (*id, n.clone()))
            .collect()
    }

    /// Every migration recorded as aborted, with its reason.
    pub fn aborts(&self) -> Vec<Aborted> {
        let inner = self.lock();
        inner
            .abort_reasons
            .iter()
            .map(|(&migration, reason)| Aborted {
                migration,
                vm: inner
                    .begun
                    .get(&migration)
                    .map(|b| b.vm.clone())
                    .unwrap_or_default(),
                reason: reason.clone(),
            })
            .collect()
    }

    /// Completed and aborted migrations in the history.
    pub fn outcomes(&self) -> (usize, usize) {
        let inner = self.lock();
        let completed = inner
            .ended
            .values()
            .filter(|o| **o == Outcome::Completed)
            .count();
        (completed, inner.ended.len() - completed)
    }
}
