//! The run lease: the deadline until which a guest may run on this node.
//!
//! A node that cannot confirm its cluster lease with a quorum must stop its
//! guests before the lease can have expired anywhere else, or a VM restarted
//! on another node would run twice. The node's fencing task pauses guests
//! when the lease runs out, but a process resumed with `SIGCONT` after a long
//! stop lets its vCPU threads and its service run before that task is
//! scheduled. So each guest checks its [`RunLease`] itself: once per batch of
//! vCPU work and before acknowledging an append, without waiting for anyone to
//! call `pause`.
//!
//! The deadline is on the monotonic clock ([`Instant`]), kept as nanoseconds
//! since a process-wide origin in one atomic, so checking it costs a clock
//! read and a load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

/// The stored deadline of a lease with no deadline.
const NEVER: u64 = u64::MAX;

/// Every deadline is measured from here, so it fits one `u64`.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// `at` as nanoseconds since the origin. An instant before the origin counts as
/// the origin: it is in the past for every `now` a lease is asked about, and
/// rounding a `now` up only makes a lease hold less. Finite instants stay below
/// [`NEVER`] (which is 584 years away).
fn nanos(at: Instant) -> u64 {
    let since = at.saturating_duration_since(origin()).as_nanos();
    u64::try_from(since).unwrap_or(NEVER - 1).min(NEVER - 1)
}

struct Shared {
    /// Nanoseconds since [`origin`]; the lease holds strictly before it.
    deadline: AtomicU64,
    /// Set once by `revoke` and never cleared.
    revoked: AtomicBool,
}

/// Whether a guest may run now: a deadline on the monotonic clock that the
/// node's lease keeper moves forward and the guest checks.
///
/// Cheap to clone; clones share one deadline, so the keeper keeps one handle
/// and binds clones to its guests ([`Guest::bind_lease`](crate::Guest::bind_lease)).
#[derive(Clone)]
pub struct RunLease {
    shared: Arc<Shared>,
}

impl RunLease {
    fn at(deadline: u64) -> Self {
        RunLease {
            shared: Arc::new(Shared {
                deadline: AtomicU64::new(deadline),
                revoked: AtomicBool::new(false),
            }),
        }
    }

    /// A lease that always holds: for guests nobody fences (tests, the
    /// in-process cluster).
    pub fn unlimited() -> Self {
        Self::at(NEVER)
    }

    /// A lease that holds until `deadline` (exclusive).
    pub fn until(deadline: Instant) -> Self {
        Self::at(nanos(deadline))
    }

    /// A lease that does not hold until it is extended.
    pub fn expired() -> Self {
        Self::at(0)
    }

    /// Moves the deadline to `deadline` if that is later. Never moves it back:
    /// renewals may complete out of order, and an older one must not shorten
    /// what a newer one granted.
    pub fn extend_to(&self, deadline: Instant) {
        self.shared
            .deadline
            .fetch_max(nanos(deadline), Ordering::SeqCst);
    }

    /// Ends the lease now, until a later [`extend_to`](Self::extend_to) brings
    /// it back: a node that has no lease yet, or lost it and has dropped its
    /// guests, holds none until its next confirmed renewal.
    pub fn expire(&self) {
        self.shared.deadline.store(0, Ordering::SeqCst);
    }

    /// Ends the lease for good (the node learned that it is declared down).
    /// Unlike an expired lease, a revoked one never holds again, whatever
    /// `extend_to` is called with later: a renewal that was in flight when the
    /// node learned it must not let its guests run beside their restarts.
    pub fn revoke(&self) {
        self.shared.revoked.store(true, Ordering::SeqCst);
    }

    /// Whether the lease holds now.
    pub fn holds(&self) -> bool {
        self.holds_at(Instant::now())
    }

    /// Whether the lease holds at `now`.
    pub fn holds_at(&self, now: Instant) -> bool {
        let deadline = self.shared.deadline.load(Ordering::SeqCst);
        !self.is_revoked() && (deadline == NEVER || nanos(now) < deadline)
    }

    /// Whether [`revoke`](Self::revoke) was called.
    pub fn is_revoked(&self) -> bool {
        self.shared.revoked.load(Ordering::SeqCst)
    }

    /// When the lease stops holding; `None` for an unlimited lease. A revoked
    /// lease reports an instant already passed.
    pub fn deadline(&self) -> Option<Instant> {
        if self.is_revoked() {
            return Some(origin());
        }
        match self.shared.deadline.load(Ordering::SeqCst) {
            NEVER => None,
            at => Some(origin() + Duration::from_nanos(at)),
        }
    }
}

impl std::fmt::Debug for RunLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunLease")
            .field("deadline", &self.deadline())
            .field("revoked", &self.is_revoked())
            .finish()
    }
}

/// The lease a guest is bound to, replaceable while its vCPUs run.
pub(crate) struct BoundLease(RwLock<RunLease>);

impl BoundLease {
    /// Unbound guests are not fenced.
    pub(crate) fn new() -> Self {
        BoundLease(RwLock::new(RunLease::unlimited()))
    }

    pub(crate) fn bind(&self, lease: RunLease) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = lease;
    }

    pub(crate) fn holds(&self) -> bool {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .holds()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    /// A point well after the origin, so no instant in a test is clamped.
    fn t0() -> Instant {
        origin() + 10 * SEC
    }

    #[test]
    fn unlimited_always_holds_and_has_no_deadline() {
        let lease = RunLease::unlimited();
        assert!(lease.holds_at(t0()));
        assert!(lease.holds_at(t0() + 1_000_000 * SEC));
        assert!(lease.holds());
        assert_eq!(lease.deadline(), None);
        lease.extend_to(t0());
        assert_eq!(lease.deadline(), None, "extending cannot shorten it");
    }

    #[test]
    fn until_holds_strictly_before_its_deadline() {
        let lease = RunLease::until(t0() + SEC);
        assert_eq!(lease.deadline(), Some(t0() + SEC));
        assert!(lease.holds_at(t0()));
        assert!(lease.holds_at(t0() + SEC - Duration::from_nanos(1)));
        assert!(!lease.holds_at(t0() + SEC));
        assert!(!lease.holds_at(t0() + 2 * SEC));
    }

    #[test]
    fn expired_holds_only_once_extended() {
        let lease = RunLease::expired();
        assert!(!lease.holds_at(origin()));
        assert!(!lease.holds_at(t0()));
        assert!(!lease.holds());
        lease.extend_to(t0() + SEC);
        assert!(lease.holds_at(t0()));
        assert!(!lease.holds_at(t0() + SEC));
    }

    #[test]
    fn an_expired_lease_holds_again_once_extended() {
        let lease = RunLease::unlimited();
        lease.expire();
        assert!(!lease.holds_at(t0()));
        lease.extend_to(t0() + SEC);
        assert!(lease.holds_at(t0()));
        lease.expire();
        assert!(!lease.holds_at(t0()));
    }

    #[test]
    fn extend_only_moves_the_deadline_forward() {
        let lease = RunLease::until(t0() + 5 * SEC);
        lease.extend_to(t0() + SEC);
        assert_eq!(lease.deadline(), Some(t0() + 5 * SEC));
        assert!(lease.holds_at(t0() + 4 * SEC));
        lease.extend_to(t0() + 7 * SEC);
        assert_eq!(lease.deadline(), Some(t0() + 7 * SEC));
        assert!(lease.holds_at(t0() + 6 * SEC));
    }

    #[test]
    fn clones_share_one_deadline() {
        let keeper = RunLease::expired();
        let bound = keeper.clone();
        keeper.extend_to(t0() + SEC);
        assert!(bound.holds_at(t0()));
        keeper.revoke();
        assert!(!bound.holds_at(t0()));
    }

    #[test]
    fn a_revoked_lease_never_holds_again() {
        let lease = RunLease::until(t0() + 5 * SEC);
        lease.revoke();
        assert!(lease.is_revoked());
        assert!(!lease.holds_at(t0()));
        lease.extend_to(t0() + 100 * SEC);
        assert!(!lease.holds_at(t0()));
        assert!(lease.deadline().is_some_and(|d| d < t0()));

        let unlimited = RunLease::unlimited();
        unlimited.revoke();
        assert!(!unlimited.holds_at(t0()));
        assert!(unlimited.deadline().is_some());
    }

    #[test]
    fn instants_before_the_origin_are_in_the_past() {
        let before = origin().checked_sub(SEC);
        if let Some(before) = before {
            let lease = RunLease::until(before);
            assert!(!lease.holds_at(before));
            assert!(!lease.holds_at(t0()));
        }
    }

    #[test]
    fn a_bound_lease_starts_unlimited_and_can_be_replaced() {
        let bound = BoundLease::new();
        assert!(bound.holds());
        let lease = RunLease::expired();
        bound.bind(lease.clone());
        assert!(!bound.holds());
        lease.extend_to(Instant::now() + 60 * SEC);
        assert!(bound.holds());
    }
}
