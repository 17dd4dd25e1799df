//! The pre-move estimate: how long a move will take and how long the guest
//! will be dark, from the seed's three factors — memory size, dirty rate and
//! bandwidth — plus the setup before round 0, shown to the user with the
//! request. [`crate::measure`] measures them.
//!
//! Pre-copy is a geometric series: round 0 sends every non-zero page, and
//! each later round sends what the guest dirtied while the previous one ran,
//! so the remainder shrinks by `q = dirty rate × page size / bandwidth` a
//! round. Rather than a closed form with its own idea of when to stop,
//! the estimate plays a modelled guest against the real [`ConvergencePolicy`]
//! with the same configuration, so the prediction makes the same calls the
//! move will: stop once the remainder fits the downtime limit (after the
//! short rounds that bring the blackout's copy down to the copy target while
//! rounds still shrink it well), throttle (auto-converge), or give up at the
//! round or time limits. The model is deliberately simple: a constant dirty
//! rate, cut by the throttle share (the throttle withholds vCPU time), and a
//! dirty set no larger than memory.

use crate::policy::convergence::{
    secs, ConfigError, ConvergenceConfig, ConvergencePolicy, Decision, GiveUpReason, HumanDuration,
    RoundStats,
};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// What is known about a guest and the link before the move.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Factors {
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Pages round 0 must send, if the guest can tell (zero pages are
    /// skipped); `None` assumes every page.
    pub nonzero_pages: Option<u64>,
    /// Distinct pages the guest dirties per second.
    pub dirty_rate: f64,
    /// Bytes per second the migration networks carry.
    pub bandwidth: f64,
    /// From the request to round 0: the store's record, the target's
    /// preparation, opening the paths.
    #[serde(default)]
    pub setup: Duration,
}

/// The prediction for one move.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// Request to switchover (or to giving up): the setup, every round and
    /// the blackout.
    pub total: Duration,
    /// The expected blackout at stop-and-copy (or when giving up: what it
    /// would have been then).
    pub downtime: Duration,
    /// Pre-copy rounds, round 0 included.
    pub rounds: u32,
    /// Whether the move ends in a stop-and-copy within the limits.
    pub converges: bool,
    /// The guest outruns pre-copy without throttling: a simulation with
    /// auto-converge off does not converge.
    pub needs_throttle: bool,
    /// The highest throttle share the policy applies on the way (0 if none).
    pub throttle: f64,
    /// Bytes sent over the migration networks, blackout included.
    pub bytes: u64,
    /// Why the policy would give up, when it would.
    pub gives_up: Option<GiveUpReason>,
    /// Whether auto-converge was enabled in the configuration simulated.
    pub auto_converge: bool,
}

/// Predicts a move of a guest described by `factors` under `config`.
pub fn estimate(factors: &Factors, config: &ConvergenceConfig) -> Result<Estimate, ConfigError> {
    let mut estimate = simulate(factors, config)?;
    if !estimate.converges || estimate.throttle > 0.0 {
        let mut unthrottled = config.clone();
        unthrottled.auto_converge.enabled = false;
        estimate.needs_throttle = !simulate(factors, &unthrottled)?.converges;
    }
    Ok(estimate)
}

fn simulate(factors: &Factors, config: &ConvergenceConfig) -> Result<Estimate, ConfigError> {
    let mut policy = ConvergencePolicy::new(config.clone(), factors.memory_bytes)?;
    let page = config.page_size;
    let memory_pages = factors.memory_bytes.div_ceil(page);
    let dirty_rate = if factors.dirty_rate.is_finite() && factors.dirty_rate > 0.0 {
        factors.dirty_rate
    } else {
        0.0
    };
    let mut estimate = Estimate {
        total: factors.setup,
        downtime: Duration::MAX,
        rounds: 0,
        converges: false,
        needs_throttle: false,
        throttle: 0.0,
        bytes: 0,
        gives_up: None,
        auto_converge: config.auto_converge.enabled,
    };
    let mut to_send = factors
        .nonzero_pages
        .unwrap_or(memory_pages)
        .min(memory_pages);

    let bandwidth = factors.bandwidth;
    if !(bandwidth.is_finite() && bandwidth > 0.0) {
        if to_send == 0 {
            // Nothing to send: only device state crosses, however slowly.
            estimate.converges = true;
            estimate.downtime = config.device_state_allowance;
            estimate.total = factors.setup.saturating_add(config.device_state_allowance);
            return Ok(estimate);
        }
        // Round 0 would never finish; the move stalls until its budget runs out.
        estimate.total = factors.setup.saturating_add(policy.time_budget());
        estimate.gives_up = Some(GiveUpReason::NoBandwidth { rounds: 1 });
        return Ok(estimate);
    }

    let mut throttle = 0.0;
    // The policy ends within max_rounds decisions; the bound is a backstop.
    for round in 0..config.max_rounds {
        let round_secs = to_send as f64 * page as f64 / bandwidth;
        let dirtied = (dirty_rate * (1.0 - throttle) * round_secs).ceil();
        let dirtied = if dirtied >= memory_pages as f64 {
            memory_pages
        } else {
            dirtied as u64
        };
        let stats = RoundStats {
            round,
            pages_sent: to_send,
            pages_dirtied: dirtied,
            bytes_sent: to_send.saturating_mul(page),
            elapsed: secs(round_secs),
            throttle,
        };
        estimate.rounds = round + 1;
        estimate.total = estimate.total.saturating_add(stats.elapsed);
        estimate.bytes = estimate.bytes.saturating_add(stats.bytes_sent);
        match policy.decide(stats) {
            Decision::AnotherRound => {}
            Decision::Throttle { share } => {
                throttle = share;
                estimate.throttle = estimate.throttle.max(share);
            }
            Decision::StopAndCopy {
                expected_downtime, ..
            } => {
                estimate.converges = true;
                estimate.downtime = expected_downtime;
                estimate.total = estimate.total.saturating_add(expected_downtime);
                estimate.bytes = estimate.bytes.saturating_add(dirtied.saturating_mul(page));
                return Ok(estimate);
            }
            Decision::GiveUp { reason } => {
                estimate.downtime = policy.expected_downtime();
                estimate.gives_up = Some(reason);
                return Ok(estimate);
            }
        }
        to_send = dirtied;
    }
    estimate.downtime = policy.expected_downtime();
    estimate.gives_up = Some(GiveUpReason::RoundLimit {
        rounds: estimate.rounds,
        expected_downtime: estimate.downtime,
    });
    Ok(estimate)
}

impl fmt::Display for Estimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rounds = if self.rounds == 1 { "round" } else { "rounds" };
        if self.converges {
            write!(
                f,
                "about {} in total, {} downtime, {} {rounds}, {} MiB sent",
                HumanDuration(self.total),
                HumanDuration(self.downtime),
                self.rounds,
                self.bytes >> 20
            )?;
            if self.needs_throttle {
                write!(
                    f,
                    "; converges only by throttling the guest (up to {:.0}%)",
                    self.throttle * 100.0
                )?;
            } else if self.throttle > 0.0 {
                write!(
                    f,
                    "; the guest is throttled up to {:.0}% to speed it up",
                    self.throttle * 100.0
                )?;
            }
            Ok(())
        } else {
            f.write_str("will not converge")?;
            if let Some(reason) = &self.gives_up {
                write!(
                    f,
                    ": gives up after {} ({reason})",
                    HumanDuration(self.total)
                )?;
            }
            if self.needs_throttle && !self.auto_converge {
                f.write_str("; the guest dirties memory faster than the link sends it and auto-converge is off")?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::convergence::PAGE_SIZE;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn factors(memory_bytes: u64, dirty_bytes_per_sec: f64, bandwidth: f64) -> Factors {
        Factors {
            memory_bytes,
            nonzero_pages: None,
            dirty_rate: dirty_bytes_per_sec / PAGE_SIZE as f64,
            bandwidth,
            setup: Duration::ZERO,
        }
    }

    #[test]
    fn idle_guest_is_one_round_and_the_allowance() {
        let config = ConvergenceConfig::default();
        let e = estimate(&factors(GIB, 0.0, 1e9), &config).unwrap();
        assert!(e.converges);
        assert!(!e.needs_throttle);
        assert_eq!(e.rounds, 1);
        assert_eq!(e.downtime, config.device_state_allowance);
        let copy = GIB as f64 / 1e9;
        assert!((e.total.as_secs_f64() - copy - 0.010).abs() < 1e-6);
        assert_eq!(e.bytes, GIB);
    }

    #[test]
    fn the_setup_comes_before_round_zero() {
        let config = ConvergenceConfig::default();
        let mut f = factors(GIB, 16.0 * MIB as f64, 1e9);
        let without = estimate(&f, &config).unwrap();
        f.setup = Duration::from_millis(25);
        let with = estimate(&f, &config).unwrap();
        assert_eq!(with.total, without.total + Duration::from_millis(25));
        assert_eq!(with.rounds, without.rounds);
        assert_eq!(with.downtime, without.downtime);
        f.setup = Duration::MAX;
        assert_eq!(estimate(&f, &config).unwrap().total, Duration::MAX);
    }

    #[test]
    fn nonzero_pages_shorten_round_zero() {
        let mut f = factors(GIB, 0.0, 1e9);
        f.nonzero_pages = Some(1000);
        let e = estimate(&f, &ConvergenceConfig::default()).unwrap();
        assert_eq!(e.bytes, 1000 * PAGE_SIZE);
        assert!(e.total < Duration::from_millis(20));
    }

    #[test]
    fn matches_the_geometric_series() {
        // 1 GiB over 1 GbE at 32 MiB/s dirty: q ≈ 0.29 per round.
        let bw = 117e6;
        let dirty = 32.0 * MIB as f64;
        let config = ConvergenceConfig::default();
        let e = estimate(&factors(GIB, dirty, bw), &config).unwrap();
        assert!(e.converges);
        assert!(!e.needs_throttle);
        assert_eq!(e.throttle, 0.0);

        // Closed form: round k sends N·q^k pages. The remainder fits the
        // limit after round 2 already, but with q < 1/2 every round shrinks
        // it well, so the policy goes on until the remainder's copy
        // N·q^(k+1)/bw is within the copy target (round 7 here, 8 rounds).
        let q = dirty / bw;
        assert!(q < config.auto_converge.min_shrink);
        let n0 = GIB as f64;
        let target = config.copy_target.as_secs_f64();
        assert!(n0 * q.powi(3) / bw <= 0.300 - 0.010);
        let mut k = 0;
        while n0 * q.powi(k + 1) / bw > target {
            k += 1;
        }
        let rounds = k as u32 + 1;
        assert_eq!(rounds, 8);
        let precopy = n0 / bw * (1.0 - q.powi(k + 1)) / (1.0 - q);
        let downtime = n0 * q.powi(k + 1) / bw + 0.010;
        assert_eq!(e.rounds, rounds);
        // Pages are whole in the simulation, so allow a little rounding.
        assert!(
            (e.total.as_secs_f64() - (precopy + downtime)).abs() < 0.01,
            "{e:?}"
        );
        assert!((e.downtime.as_secs_f64() - downtime).abs() < 0.001, "{e:?}");
    }

    #[test]
    fn a_remainder_that_shrinks_well_is_iterated_down_to_the_copy_target() {
        // 1 GiB guest dirtying 128 MiB/s over 1 GB/s: round 0's remainder
        // (~144 ms) already fits the limit; three more short rounds bring
        // its copy under a millisecond, at a cost of ~0.17 s.
        let config = ConvergenceConfig::default();
        let e = estimate(&factors(GIB, 128.0 * MIB as f64, 1e9), &config).unwrap();
        assert!(e.converges);
        assert!(!e.needs_throttle);
        assert_eq!(e.throttle, 0.0);
        assert_eq!(e.rounds, 4);
        assert!(e.downtime > config.device_state_allowance);
        assert!(e.downtime <= config.device_state_allowance + config.copy_target);
        let round_zero = GIB as f64 / 1e9;
        assert!(e.total.as_secs_f64() < round_zero + 0.2, "{e:?}");
    }

    #[test]
    fn fast_dirtier_needs_throttle_and_says_so() {
        // 1 GiB guest dirtying 2 GB/s over a 1 GB/s link.
        let e = estimate(&factors(GIB, 2e9, 1e9), &ConvergenceConfig::default()).unwrap();
        assert!(e.converges, "{e:?}");
        assert!(e.needs_throttle);
        assert!(e.throttle >= 0.5);
        assert!(e.downtime <= Duration::from_millis(300));
        assert!(
            e.to_string().contains("converges only by throttling"),
            "{e}"
        );
    }

    #[test]
    fn without_auto_converge_it_will_not_converge() {
        let mut config = ConvergenceConfig::default();
        config.auto_converge.enabled = false;
        let e = estimate(&factors(GIB, 2e9, 1e9), &config).unwrap();
        assert!(!e.converges);
        assert!(e.needs_throttle);
        assert!(matches!(
            e.gives_up,
            Some(GiveUpReason::NotConverging { .. })
        ));
        let text = e.to_string();
        assert!(
            text.starts_with("will not converge: gives up after"),
            "{text}"
        );
        assert!(text.contains("auto-converge is off"), "{text}");
    }

    #[test]
    fn a_link_too_slow_for_the_budget_gives_up() {
        // 64 GiB over 10 MB/s: round 0 alone outlasts the 1290 s budget.
        let config = ConvergenceConfig::default();
        let e = estimate(&factors(64 * GIB, 1e6, 10e6), &config).unwrap();
        assert!(!e.converges);
        assert!(matches!(
            e.gives_up,
            Some(GiveUpReason::TimeBudgetExceeded { .. })
        ));
        assert_eq!(e.rounds, 1);
    }

    #[test]
    fn zero_and_nonsense_inputs_do_not_panic() {
        let config = ConvergenceConfig::default();
        let e = estimate(&factors(GIB, 1e6, 0.0), &config).unwrap();
        assert!(!e.converges);
        assert_eq!(e.gives_up, Some(GiveUpReason::NoBandwidth { rounds: 1 }));
        assert_eq!(e.total, config.time_budget(GIB));
        assert!(e.to_string().contains("no bandwidth"));

        let e = estimate(&factors(0, 0.0, 0.0), &config).unwrap();
        assert!(e.converges);

        for (dirty, bw) in [
            (f64::NAN, 1e9),
            (-5.0, 1e9),
            (1e6, f64::INFINITY),
            (1e6, f64::NAN),
        ] {
            let _ = estimate(&factors(GIB, dirty, bw), &config).unwrap();
        }
        let e = estimate(&factors(u64::MAX, 1e30, 1e-30), &config).unwrap();
        assert!(!e.converges);
    }

    #[test]
    fn display_for_a_quick_move() {
        let e = estimate(&factors(GIB, 0.0, 1e9), &ConvergenceConfig::default()).unwrap();
        assert_eq!(
            e.to_string(),
            "about 1.08 s in total, 10.0 ms downtime, 1 round, 1024 MiB sent"
        );
    }
}
