//! Guests that migrate themselves as one byte stream (QEMU), beside the
//! page-based [`Guest`](crate::Guest) methods the other backends serve.
//!
//! A page-based guest hands its memory to Ferry page by page and Ferry runs
//! the rounds. A stream guest runs its own rounds and writes one ordered byte
//! stream to a local socket; Ferry carries that stream to the target's socket
//! and keeps what matters to it: when the source is paused, that the target
//! stays paused until the switchover commits, and progress a person can read.
//! The methods here are the steps Ferry drives; each returns at once (the
//! engine polls [`StreamGuest::outgoing`] and [`StreamGuest::incoming`]).

use crate::guest::GuestResult;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How a stream guest should migrate: the cluster's settings, in its terms.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamSettings {
    /// The longest pause the guest may plan for its last copy.
    pub downtime_limit: Duration,
    /// The bandwidth cap, if any (bytes per second).
    pub max_bandwidth: Option<u64>,
    /// Slow the guest's vCPUs when the copy does not converge.
    pub auto_converge: bool,
}

/// Where a stream migration stands, as the guest reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamStatus {
    /// No migration was asked for.
    None,
    /// Setting up or copying while the guest runs.
    Active,
    /// The source finished its rounds and paused, and waits to be told to
    /// send its last state ([`StreamGuest::continue_switchover`]).
    PreSwitchover,
    /// Everything was sent (source) or received (target); the guest is paused.
    Completed,
    /// The migration stopped on an error.
    Failed(String),
    /// The migration was cancelled.
    Cancelled,
}

/// Progress of an outgoing stream migration.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamProgress {
    pub status: StreamStatus,
    /// Rounds over memory so far (QEMU: the dirty-sync count).
    pub round: u64,
    /// Bytes of memory sent so far.
    pub transferred: u64,
    /// Bytes of memory still to send, as the guest estimates.
    pub remaining: u64,
    /// The guest's memory size.
    pub total: u64,
    /// Recent rate, bytes per second.
    pub rate: f64,
    /// The pause the guest expects for its last copy, if it says.
    pub expected_downtime: Option<Duration>,
}

/// The migration steps of a guest that moves as a byte stream.
pub trait StreamGuest: Send + Sync {
    /// A directory of the guest's own where the engine may put the sockets
    /// the stream runs through.
    fn run_dir(&self) -> PathBuf;

    /// Source: starts sending the guest to `socket` (a Unix socket the engine
    /// listens on), pausing before its last state (`PreSwitchover`).
    fn start_outgoing(&self, socket: &Path, settings: &StreamSettings) -> GuestResult<()>;

    /// Source: where the outgoing migration stands.
    fn outgoing(&self) -> GuestResult<StreamProgress>;

    /// Source: [`outgoing`](Self::outgoing) once the migration left
    /// `None`/`Active` (paused at its switchover point, completed, failed)
    /// or `timeout` passed, whichever is first. Returns as the status
    /// changes, not at the next poll: the blackout starts there.
    fn wait_outgoing(&self, timeout: Duration) -> GuestResult<StreamProgress>;

    /// Source, paused at `PreSwitchover`: send the last state and finish.
    fn continue_switchover(&self) -> GuestResult<()>;

    /// Source: stop an outgoing migration, wherever it is. A guest that ran
    /// when the migration began runs again (QEMU resumes it itself, even
    /// from `PreSwitchover`), unless its run lease no longer holds.
    fn cancel_outgoing(&self) -> GuestResult<()>;

    /// How fast the guest dirties its memory, bytes per second, measured by
    /// the guest's own monitor over about `window`.
    fn dirty_rate(&self, window: Duration) -> GuestResult<f64>;

    /// Target (started waiting for a stream): listen for the stream on
    /// `socket`, which the engine then connects to.
    fn accept_incoming(&self, socket: &Path) -> GuestResult<()>;

    /// Target: where the incoming migration stands. `Completed` leaves the
    /// guest paused until `Guest::resume`.
    fn incoming(&self) -> GuestResult<StreamStatus>;

    /// Target: [`incoming`](Self::incoming) once it is no longer `None` or
    /// `Active`, or when `timeout` passed.
    fn wait_incoming(&self, timeout: Duration) -> GuestResult<StreamStatus>;
}
