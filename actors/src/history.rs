//! History recording: what a node did to its guests and migrations, reported
//! as it happens to an optional recorder the embedding code sets with
//! [`NodeShared::set_history`](crate::node::NodeShared::set_history).
//!
//! The chaos suite records every node's history with one shared clock and
//! hands it to the invariant checker (`ferry_chaos::checker`), which then says
//! whether a VM ever ran twice, resumed with different memory, or sat in a
//! migration that never ended. The events are reported at the real points in
//! the engine — right after a guest is paused or resumed, right after the
//! source learns the switchover committed — so their order is the order in
//! which things happened.
//!
//! Without a recorder nothing is built or computed: every call site passes a
//! closure that only runs when one is set. A node that was killed reports
//! nothing more (its lingering tasks are not the node any more).
//!
//! A [`GuestObserver`], set apart from the recorder, is shown the guest itself
//! at the two points where its vCPUs stop and start again in a move (just
//! after a pause, just before a resume), so a checker can take its own look at
//! memory and device state instead of trusting the digests the engine sends.
//! Unset, each point costs one read of an empty slot.

use ferry_cluster::NodeId;
use ferry_vmm::{Guest, MemoryDigest};
use std::sync::Arc;
use std::time::Duration;

/// Receives a node's history events, in the order the node produces them.
/// Called synchronously on engine threads (sometimes under the node's lock):
/// it must be quick and must not call back into the node.
pub type Recorder = Arc<dyn Fn(HistoryEvent) + Send + Sync>;

/// Where in a move a guest is shown to the [`GuestObserver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestPoint {
    /// The source just paused the guest for the blackout; nothing was read,
    /// sent or changed since.
    Paused,
    /// The guest is about to resume (a target after the switchover, or a
    /// source after an abort), with the state it will run with; still paused.
    Resuming,
}

/// One look at a guest, at a [`GuestPoint`] of migration `migration`.
pub struct GuestSeen<'a> {
    pub point: GuestPoint,
    pub migration: u64,
    pub vm: &'a str,
    pub node: NodeId,
    pub guest: &'a dyn Guest,
}

/// Shown each guest at its pause and resume points. Called synchronously on
/// engine threads, sometimes under the node's lock: it may read the guest
/// (pages, device state) but must not call back into the node.
pub type GuestObserver = Arc<dyn Fn(GuestSeen<'_>) + Send + Sync>;

/// Something a node did that the invariants of `DESIGN.md` §5 are about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryEvent {
    /// The guest booted here; the store made this node its owner at `epoch`
    /// just before.
    VmStarted {
        vm: String,
        node: NodeId,
        epoch: u64,
    },
    /// This node (the source) recorded the migration in the store. `budget`
    /// is the convergence policy's time budget for the guest's memory.
    MigrationBegun {
        migration: u64,
        vm: String,
        source: NodeId,
        target: NodeId,
        budget: Duration,
    },
    /// A copy round begins (round 0 is the full copy).
    CopyRound {
        migration: u64,
        vm: String,
        round: u32,
    },
    /// The source paused the guest for the blackout.
    SourcePaused {
        migration: u64,
        vm: String,
        node: NodeId,
    },
    /// Digest of the paused guest on the source, as sent to the target for
    /// verification (only when the move verifies digests).
    DigestAtPause {
        vm: String,
        node: NodeId,
        digest: MemoryDigest,
    },
    /// The source learned that the store committed the switchover: `owner`
    /// owns the VM at `epoch`.
    SwitchoverCommitted {
        migration: u64,
        vm: String,
        owner: NodeId,
        epoch: u64,
    },
    /// Digest of the guest on `node` just before it resumes: the target's
    /// verified digest, or the source's when it resumes after an abort.
    DigestAtResume {
        vm: String,
        node: NodeId,
        digest: MemoryDigest,
    },
    /// The target resumed the guest; its replica showed the switchover to it
    /// committed at `epoch`.
    TargetResumed {
        migration: u64,
        vm: String,
        node: NodeId,
        epoch: u64,
    },
    /// The source resumed its guest after the move was given up, still
    /// owner at `epoch`.
    SourceResumed {
        migration: u64,
        vm: String,
        node: NodeId,
        epoch: u64,
    },
    /// A copy of the guest on `node` was destroyed (the source's after a
    /// switchover, a stopped VM, a discarded incoming copy).
    CopyDestroyed { vm: String, node: NodeId },
    /// The source's job ended: completed (switchover committed) or not.
    MigrationEnded {
        migration: u64,
        vm: String,
        completed: bool,
        reason: Option<String>,
    },
}
