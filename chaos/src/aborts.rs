//! Why a migration aborted, sorted into the kinds a chaos run expects.
//!
//! An abort is not a violation: the engine gives a move up whenever a fault
//! leaves it no safe way on, and the guest runs on at the source. But an
//! abort for a reason nobody expected is a finding, and one kind is a bug
//! outright: a digest mismatch means the target's copy of memory or device
//! state was wrong, which with `verify` on the engine catches in the
//! blackout (and aborts) — the copy must never be wrong in the first place.
//!
//! [`AbortKind::of`] reads the reason the source's job gave (the text of
//! `MigrationError::Aborted`); [`judge`] says whether that kind is expected
//! given the faults the run fired.

use crate::schedule::FaultKind;
use std::collections::BTreeSet;
use std::fmt;

/// The reason the chaos harness records for a migration whose source died
/// before its job could say how it ended (the store's word is taken for the
/// outcome, and the store aborted it).
pub const SOURCE_DIED: &str = "its source died before its job ended; the store aborted it";

/// What a migration's abort was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AbortKind {
    /// The source or target node stopped (killed, shut down, its guest
    /// destroyed under the move), or the target's end of the page stream
    /// went away ("cancelled by peer: receiver dropped").
    NodeDown,
    /// The source died; the store recorded the abort ([`SOURCE_DIED`]).
    SourceDied,
    /// The target could not be reached: every path dead, calls timed out,
    /// the page stream broken.
    Unreachable,
    /// The blackout ran past its budget, or the copy did not converge.
    OverBudget,
    /// Cancelled by the user (`ferry vm cancel`); a chaos run never does.
    Cancelled,
    /// The store said no: the switchover refused (the target entered
    /// maintenance mode), the migration aborted or superseded there.
    StoreRefused,
    /// The target refused a step (its replica not yet showing the
    /// migration, an incoming copy gone).
    TargetRefused,
    /// The target's digest differed from the source's: the copy was wrong.
    /// Always a bug.
    DigestMismatch,
    /// A reason no kind above matches: always a finding.
    Unknown,
}

impl AbortKind {
    /// The kind of an abort whose job gave `reason`.
    pub fn of(reason: &str) -> AbortKind {
        let r = reason.to_ascii_lowercase();
        let any = |words: &[&str]| words.iter().any(|w| r.contains(w));
        if any(&["digest mismatch"]) {
            AbortKind::DigestMismatch
        } else if reason == SOURCE_DIED {
            AbortKind::SourceDied
        } else if any(&["cancelled by the user"]) {
            AbortKind::Cancelled
        } else if any(&["ran past its budget", "did not converge"]) {
            AbortKind::OverBudget
        } else if any(&[
            "the store refused the switchover",
            "aborted by the store",
            "without a switchover",
            "moved the vm on without this migration",
            "maintenance mode",
            "never learned that it began",
        ]) {
            AbortKind::StoreRefused
        } else if any(&[
            "shut down",
            "node stopped",
            "has been destroyed",
            "cancelled by peer",
            "receiver dropped",
        ]) {
            AbortKind::NodeDown
        } else if any(&[
            "every path to node",
            "unreachable",
            "timed out",
            "no answer within",
            "page stream",
            "no network allowed for live migration reaches",
        ]) {
            AbortKind::Unreachable
        } else if any(&[
            "target refused",
            "target could not verify",
            "not (yet) in this node's store",
            "does not match the store",
            "no incoming migration",
            "already holds vm",
        ]) {
            AbortKind::TargetRefused
        } else {
            AbortKind::Unknown
        }
    }

    /// A bug whatever the faults: the copy was wrong, or nobody knows why.
    pub fn is_bug(self) -> bool {
        matches!(self, AbortKind::DigestMismatch | AbortKind::Unknown)
    }

    /// Faults of which at least one must have fired for this kind to be
    /// expected. Empty: the run itself may cause it (a drain's maintenance
    /// mode, a tight downtime limit on a busy machine), no fault needed.
    pub fn needs(self) -> &'static [FaultKind] {
        match self {
            AbortKind::SourceDied => &[FaultKind::KillNode, FaultKind::KillLeader],
            // A node cut off from the rest is marked down and its guests
            // restarted elsewhere, so any fault may end a node's part.
            AbortKind::NodeDown | AbortKind::Unreachable => &FaultKind::DISRUPTIVE,
            _ => &[],
        }
    }
}

impl fmt::Display for AbortKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AbortKind::NodeDown => "node_down",
            AbortKind::SourceDied => "source_died",
            AbortKind::Unreachable => "unreachable",
            AbortKind::OverBudget => "over_budget",
            AbortKind::Cancelled => "cancelled",
            AbortKind::StoreRefused => "store_refused",
            AbortKind::TargetRefused => "target_refused",
            AbortKind::DigestMismatch => "digest_mismatch",
            AbortKind::Unknown => "unknown",
        })
    }
}

/// An abort's kind, and what is wrong with it, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judged {
    pub kind: AbortKind,
    /// Why this abort fails the run: a bug, or a kind no fired fault
    /// explains. `None`: an expected abort.
    pub problem: Option<String>,
}

/// Judges an abort with `reason` in a run that fired the faults `fired`.
pub fn judge(reason: &str, fired: &BTreeSet<FaultKind>) -> Judged {
    let kind = AbortKind::of(reason);
    let problem = match kind {
        AbortKind::DigestMismatch => Some(format!(
            "BUG: the target's copy differed from the source's ({reason})"
        )),
        AbortKind::Unknown => Some(format!("an abort of no known kind: {reason}")),
        _ if !kind.needs().is_empty() && !kind.needs().iter().any(|k| fired.contains(k)) => Some(
            format!("a {kind} abort, but no fault that explains it fired ({reason})"),
        ),
        _ => None,
    };
    Judged { kind, problem }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engines_reasons_fall_into_their_kinds() {
        let cases = [
            ("the node is shut down", AbortKind::NodeDown),
            (
                "receiver failed to apply pages: pages 0..1: the guest has been destroyed",
                AbortKind::NodeDown,
            ),
            ("node stopped", AbortKind::NodeDown),
            ("cancelled by peer: receiver dropped", AbortKind::NodeDown),
            (SOURCE_DIED, AbortKind::SourceDied),
            (
                "every path to node 2 has been dead for 2.05s (last error: timed out)",
                AbortKind::Unreachable,
            ),
            (
                "target unreachable: protocol error: the server refused to accept a new connection",
                AbortKind::Unreachable,
            ),
            (
                "the blackout ran past its budget of 1.1s before the switchover",
                AbortKind::OverBudget,
            ),
            ("did not converge: rounds exhausted", AbortKind::OverBudget),
            ("cancelled by the user", AbortKind::Cancelled),
            (
                "target unreachable: no answer within 716.82ms",
                AbortKind::Unreachable,
            ),
            (
                "the store refused the switchover: target node 2 is in maintenance mode",
                AbortKind::StoreRefused,
            ),
            ("aborted by the store: node 3 down", AbortKind::StoreRefused),
            (
                "target refused: migration 4 is not (yet) in this node's store",
                AbortKind::TargetRefused,
            ),
            (
                "target could not verify: digest mismatch: source Some(..), target Some(..)",
                AbortKind::DigestMismatch,
            ),
            ("the flux capacitor melted", AbortKind::Unknown),
        ];
        for (reason, kind) in cases {
            assert_eq!(AbortKind::of(reason), kind, "{reason}");
        }
    }

    #[test]
    fn a_digest_mismatch_is_a_bug_whatever_fired() {
        let all: BTreeSet<FaultKind> = FaultKind::DISRUPTIVE.into_iter().collect();
        let judged = judge("target could not verify: digest mismatch: …", &all);
        assert_eq!(judged.kind, AbortKind::DigestMismatch);
        assert!(judged.problem.is_some_and(|p| p.contains("BUG")));
        assert!(judge("gremlins", &all).problem.is_some());
    }

    #[test]
    fn a_fault_kind_needs_a_fault_that_explains_it() {
        let none = BTreeSet::new();
        assert!(judge("the node is shut down", &none).problem.is_some());
        assert!(judge(SOURCE_DIED, &[FaultKind::Loss].into())
            .problem
            .is_some());
        assert!(judge(SOURCE_DIED, &[FaultKind::KillNode].into())
            .problem
            .is_none());
        // The run alone may cause these.
        assert!(judge(
            "the store refused the switchover: target node 2 is in maintenance mode",
            &none
        )
        .problem
        .is_none());
        assert!(judge("did not converge: too slow", &none).problem.is_none());
    }
}
