//! The convergence policy: after every pre-copy round, decide whether to send
//! another round, throttle the guest harder (auto-converge), stop and copy, or
//! give up.
//!
//! Pre-copy only ends well if the pages dirtied during a round can be sent
//! faster than the guest dirties them again; once the remainder fits the
//! downtime limit the job pauses the guest and sends the rest during the
//! blackout — or, while rounds still shrink the remainder well, first runs a
//! few more short rounds to bring that blackout down towards
//! [`ConvergenceConfig::copy_target`]. This module is that judgement and
//! nothing else: plain data in (pages sent and dirtied, bytes, elapsed time,
//! throttle), a [`Decision`] out. It never reads a clock or touches a
//! socket, so the migration job and the pre-move
//! [estimate](crate::policy::estimate) share one policy, and the tests replay
//! recorded traces deterministically (the way `quinn-proto` keeps QUIC free
//! of I/O).
//!
//! Termination is a property of the policy, not of its caller: every
//! `max_rounds`-th decision at the latest is terminal ([`Decision::StopAndCopy`]
//! or [`Decision::GiveUp`]), and once terminal the policy repeats its verdict.
//! A stop-and-copy whose expected downtime exceeds the limit happens only when
//! [`ConvergenceConfig::forced_stop`] explicitly allows it, and is marked
//! `forced`.

use ferry_cluster::model::Settings;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// Guest page size, in bytes (the same 4 KiB pages the dirty log tracks).
pub const PAGE_SIZE: u64 = 4096;

const GIB: f64 = (1u64 << 30) as f64;

/// Throttle shares are compared with this slack, so `0.2 + 0.1 + …` reaching
/// the maximum is recognised as reaching it.
const SHARE_EPSILON: f64 = 1e-9;

/// How the guest is slowed down when pre-copy does not converge on its own
/// (QEMU calls this auto-converge; vMotion's equivalent is SDPS).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoConverge {
    /// Whether the policy may throttle the guest at all.
    pub enabled: bool,
    /// Share of vCPU time withheld at the first throttle step.
    pub initial_share: f64,
    /// Added to the share at every further step.
    pub increment: f64,
    /// The highest share ever asked for; a guest must keep some CPU.
    pub max_share: f64,
    /// A round "shrinks enough" when the pages dirtied during it are at most
    /// `1 - min_shrink` of the pages it sent.
    pub min_shrink: f64,
    /// Consecutive rounds that did not shrink enough before a throttle step.
    pub slow_rounds: u32,
    /// Throttle at once when the guest's dirty rate (bytes/s) reaches this
    /// share of the bandwidth: at 1.0 the remainder can no longer shrink.
    pub pressure_trigger: f64,
}

impl Default for AutoConverge {
    fn default() -> Self {
        // QEMU's defaults (cpu-throttle-initial 20, -increment 10, max 99,
        // throttle-trigger-threshold 50 twice in a row); they are the most
        // field-tested numbers there are.
        AutoConverge {
            enabled: true,
            initial_share: 0.20,
            increment: 0.10,
            max_share: 0.99,
            min_shrink: 0.5,
            slow_rounds: 2,
            pressure_trigger: 1.0,
        }
    }
}

/// Limits and tuning of the convergence policy. Cluster settings override the
/// defaults per cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConvergenceConfig {
    /// The longest blackout the policy will plan for.
    pub downtime_limit: Duration,
    /// The blackout copy the policy aims for. Once the remainder fits
    /// `downtime_limit`, the policy keeps running rounds while a round still
    /// shrinks the remainder well (by `auto_converge.min_shrink`) and the
    /// remainder's copy alone — without the device-state allowance — would
    /// take longer than this. Zero: iterate for as long as rounds shrink well.
    pub copy_target: Duration,
    /// Added to every expected downtime: device and vCPU state, the
    /// switchover commit through Raft and the resume on the target.
    pub device_state_allowance: Duration,
    /// The most rounds (round 0 included) before the policy must stop or give up.
    pub max_rounds: u32,
    /// Time budget of a move: this floor plus `time_budget_per_gib` per GiB of
    /// guest memory.
    pub time_budget_floor: Duration,
    pub time_budget_per_gib: Duration,
    /// Weight kept by the bandwidth estimate's history each round (0 = only
    /// the last round counts).
    pub bandwidth_decay: f64,
    /// Consecutive hopeless rounds (nothing sent, or the remainder cannot
    /// shrink and no throttle is left) before giving up early.
    pub hopeless_rounds: u32,
    /// At a limit, stop and copy anyway if the expected downtime is at most
    /// this (marked `forced`). `None`: give up instead and leave the guest
    /// running on the source, which never breaks the downtime promise.
    pub forced_stop: Option<Duration>,
    pub page_size: u64,
    pub auto_converge: AutoConverge,
}

impl Default for ConvergenceConfig {
    fn default() -> Self {
        ConvergenceConfig {
            // QEMU's default downtime-limit; what the field calls "live".
            downtime_limit: Duration::from_millis(300),
            // The limit is the promise, the target the aim. A remainder that
            // fits the limit is no reason to stop while rounds still shrink
            // it well: each such round costs a fraction of the last one and
            // takes that fraction off the blackout, so two or three short
            // rounds turn a 100 ms blackout into a millisecond's (Xen's
            // pre-copy likewise runs until almost nothing is dirty, not until
            // the rest merely fits). 1 ms of copy is small next to the
            // switchover itself, a few milliseconds; a guest whose rounds stop
            // shrinking well stops at once, so hot guests do not iterate on.
            copy_target: Duration::from_millis(1),
            // Device state is kilobytes; the cost is a Raft commit and a
            // resume on a LAN, a few milliseconds each.
            device_state_allowance: Duration::from_millis(10),
            // Enough for the nine auto-converge steps (20% … 99%) two rounds
            // apart, with room for the rounds before and after.
            max_rounds: 30,
            // 20 s/GiB is about 2.3 × the raw time of a GiB over 1 GbE: room
            // for dirty rounds on the slowest link we support. The floor
            // covers setup that does not scale with memory (target shell,
            // connections, Raft commits).
            time_budget_floor: Duration::from_secs(10),
            time_budget_per_gib: Duration::from_secs(20),
            bandwidth_decay: 0.5,
            hopeless_rounds: 3,
            forced_stop: None,
            page_size: PAGE_SIZE,
            auto_converge: AutoConverge::default(),
        }
    }
}

/// A configuration the policy refuses, with the field at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("max_rounds must be at least 1")]
    NoRounds,
    #[error("page_size must not be zero")]
    NoPageSize,
    #[error("hopeless_rounds and auto_converge.slow_rounds must be at least 1")]
    NoPatience,
    #[error("bandwidth_decay must be in 0..1, got {0}")]
    BandwidthDecay(f64),
    #[error("throttle shares must satisfy 0 <= initial <= max <= 0.99 and increment > 0 (initial {initial}, increment {increment}, max {max})")]
    ThrottleShares {
        initial: f64,
        increment: f64,
        max: f64,
    },
    #[error("auto_converge.min_shrink must be in 0..1, got {0}")]
    MinShrink(f64),
    #[error("auto_converge.pressure_trigger must be positive, got {0}")]
    PressureTrigger(f64),
    #[error("forced_stop ({forced:?}) must not be below downtime_limit ({limit:?})")]
    ForcedStopBelowLimit { forced: Duration, limit: Duration },
}

impl ConvergenceConfig {
    /// The configuration every move of a cluster runs under, whoever starts
    /// it (a user, a drain, a tip, a failback) and its estimate: the
    /// defaults, with the cluster's downtime limit — or the move's own,
    /// `downtime_limit_ms`, where it names one. The one place a cluster's
    /// settings become a policy, so no kind of move can fall back to the
    /// default limit on its own.
    pub fn for_move(settings: &Settings, downtime_limit_ms: Option<u32>) -> Self {
        let ms = downtime_limit_ms.unwrap_or(settings.downtime_limit_ms);
        ConvergenceConfig {
            downtime_limit: Duration::from_millis(u64::from(ms)),
            ..ConvergenceConfig::default()
        }
    }

    /// Checks the configuration; the policy is built only from a valid one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_rounds == 0 {
            return Err(ConfigError::NoRounds);
        }
        if self.page_size == 0 {
            return Err(ConfigError::NoPageSize);
        }
        if self.hopeless_rounds == 0 || self.auto_converge.slow_rounds == 0 {
            return Err(ConfigError::NoPatience);
        }
        if !(0.0..1.0).contains(&self.bandwidth_decay) {
            return Err(ConfigError::BandwidthDecay(self.bandwidth_decay));
        }
        let ac = &self.auto_converge;
        let shares_ok = (0.0..=0.99).contains(&ac.initial_share)
            && (0.0..=0.99).contains(&ac.max_share)
            && ac.initial_share <= ac.max_share
            && ac.increment > 0.0
            && ac.increment.is_finite();
        if !shares_ok {
            return Err(ConfigError::ThrottleShares {
                initial: ac.initial_share,
                increment: ac.increment,
                max: ac.max_share,
            });
        }
        if !(ac.min_shrink > 0.0 && ac.min_shrink < 1.0) {
            return Err(ConfigError::MinShrink(ac.min_shrink));
        }
        if !(ac.pressure_trigger > 0.0 && ac.pressure_trigger.is_finite()) {
            return Err(ConfigError::PressureTrigger(ac.pressure_trigger));
        }
        if let Some(forced) = self.forced_stop {
            if forced < self.downtime_limit {
                return Err(ConfigError::ForcedStopBelowLimit {
                    forced,
                    limit: self.downtime_limit,
                });
            }
        }
        Ok(())
    }

    /// The time budget of a move of a guest with `memory_bytes` of memory.
    pub fn time_budget(&self, memory_bytes: u64) -> Duration {
        let per_gib = self.time_budget_per_gib.as_secs_f64() * (memory_bytes as f64 / GIB);
        self.time_budget_floor.saturating_add(secs(per_gib))
    }

    /// Expected blackout for sending `pages` at `bandwidth` bytes/s, plus the
    /// device-state allowance. Unknown or zero bandwidth with pages left makes
    /// it [`Duration::MAX`]: no promise can be made.
    pub fn expected_downtime(&self, pages: u64, bandwidth: Option<f64>) -> Duration {
        if pages == 0 {
            return self.device_state_allowance;
        }
        match bandwidth {
            Some(bw) if bw > 0.0 && bw.is_finite() => {
                let bytes = pages as f64 * self.page_size as f64;
                secs(bytes / bw).saturating_add(self.device_state_allowance)
            }
            _ => Duration::MAX,
        }
    }
}

/// What one pre-copy round did, as the migration job measured it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoundStats {
    /// 0 for the full copy, then 1, 2, … for the dirty rounds.
    pub round: u32,
    /// Pages this round sent.
    pub pages_sent: u64,
    /// Pages dirtied while it ran: the next round's remainder.
    pub pages_dirtied: u64,
    /// Bytes that went over the wire (framing included).
    pub bytes_sent: u64,
    /// Wall time of the round, from reading the dirty log to the last ack.
    pub elapsed: Duration,
    /// Throttle share in force while the round ran.
    pub throttle: f64,
}

/// Why the policy gave up: the move is aborted and the guest keeps running on
/// the source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GiveUpReason {
    /// The move has used its time budget without converging.
    TimeBudgetExceeded { spent: Duration, budget: Duration },
    /// `max_rounds` rounds ran and the remainder still does not fit.
    RoundLimit {
        rounds: u32,
        expected_downtime: Duration,
    },
    /// The guest dirties memory at least as fast as the link sends it and no
    /// throttle is left to apply (at the maximum, or auto-converge off).
    NotConverging { pressure: f64, throttle: f64 },
    /// Rounds with pages to send sent nothing: the link carries no data.
    NoBandwidth { rounds: u32 },
}

impl fmt::Display for GiveUpReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GiveUpReason::TimeBudgetExceeded { spent, budget } => write!(
                f,
                "time budget exceeded ({} spent of {})",
                HumanDuration(*spent),
                HumanDuration(*budget)
            ),
            GiveUpReason::RoundLimit {
                rounds,
                expected_downtime,
            } => write!(
                f,
                "round limit reached after {rounds} rounds, expected downtime still {}",
                HumanDuration(*expected_downtime)
            ),
            GiveUpReason::NotConverging { pressure, throttle } => write!(
                f,
                "not converging: dirty rate is {:.0}% of bandwidth at throttle {:.0}%",
                pressure * 100.0,
                throttle * 100.0
            ),
            GiveUpReason::NoBandwidth { rounds } => {
                write!(f, "no bandwidth: {rounds} rounds sent nothing")
            }
        }
    }
}

/// The policy's answer after a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Decision {
    /// Send the pages dirtied during the last round.
    AnotherRound,
    /// Set the guest's throttle to `share`, then send another round.
    Throttle { share: f64 },
    /// Pause the guest and send the rest: the blackout. `forced` means the
    /// limits ran out and `forced_stop` allowed exceeding the downtime limit.
    StopAndCopy {
        expected_downtime: Duration,
        forced: bool,
    },
    /// Abort the move; the source keeps (and un-throttles) the guest.
    GiveUp { reason: GiveUpReason },
}

impl Decision {
    /// Whether this decision ends pre-copy.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Decision::StopAndCopy { .. } | Decision::GiveUp { .. })
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::AnotherRound => f.write_str("another round"),
            Decision::Throttle { share } => {
                write!(
                    f,
                    "throttle the guest to {:.0}%, another round",
                    share * 100.0
                )
            }
            Decision::StopAndCopy {
                expected_downtime,
                forced,
            } => write!(
                f,
                "stop and copy{}, expected downtime {}",
                if *forced { " (forced)" } else { "" },
                HumanDuration(*expected_downtime)
            ),
            Decision::GiveUp { reason } => write!(f, "give up: {reason}"),
        }
    }
}

/// The convergence policy of one migration: its configuration and what the
/// rounds so far measured.
#[derive(Debug, Clone)]
pub struct ConvergencePolicy {
    config: ConvergenceConfig,
    budget: Duration,
    history: Vec<RoundStats>,
    /// Decayed sums of bytes and seconds; their ratio is the bandwidth. Big
    /// rounds weigh more than tiny ones, whose time is mostly latency.
    window_bytes: f64,
    window_secs: f64,
    spent: Duration,
    /// Consecutive rounds that shrank the remainder too little.
    slow_streak: u32,
    /// Consecutive rounds at pressure with no throttle left to apply.
    hopeless_streak: u32,
    /// Consecutive rounds that sent no bytes while pages were due.
    idle_streak: u32,
    verdict: Option<Decision>,
}

impl ConvergencePolicy {
    /// A policy for moving a guest of `memory_bytes`.
    pub fn new(config: ConvergenceConfig, memory_bytes: u64) -> Result<Self, ConfigError> {
        config.validate()?;
        let budget = config.time_budget(memory_bytes);
        Ok(ConvergencePolicy {
            config,
            budget,
            history: Vec::new(),
            window_bytes: 0.0,
            window_secs: 0.0,
            spent: Duration::ZERO,
            slow_streak: 0,
            hopeless_streak: 0,
            idle_streak: 0,
            verdict: None,
        })
    }

    /// Records a finished round and decides what comes next.
    ///
    /// Once a terminal decision has been made, further calls return it again
    /// without recording anything: a confused caller cannot loop forever.
    pub fn decide(&mut self, round: RoundStats) -> Decision {
        if let Some(verdict) = &self.verdict {
            return verdict.clone();
        }
        debug_assert_eq!(
            round.round as usize,
            self.history.len(),
            "rounds are reported in order"
        );
        let decision = self.judge(round);
        debug_assert!(
            self.history.len() < self.config.max_rounds as usize || decision.is_terminal(),
            "the max_rounds-th decision is terminal"
        );
        if let Decision::StopAndCopy {
            expected_downtime,
            forced: false,
        } = decision
        {
            debug_assert!(expected_downtime <= self.config.downtime_limit);
        }
        if decision.is_terminal() {
            self.verdict = Some(decision.clone());
        }
        decision
    }

    fn judge(&mut self, round: RoundStats) -> Decision {
        self.record(&round);

        let expected = self.expected_downtime();
        if expected <= self.config.downtime_limit {
            // The promise is kept; aim for a shorter blackout if a round
            // still pays. Never throttle for the aim: the throttle is only
            // for reaching the limit.
            if self.worth_another_round(&round, expected) {
                return Decision::AnotherRound;
            }
            return Decision::StopAndCopy {
                expected_downtime: expected,
                forced: false,
            };
        }
        if self.spent >= self.budget {
            return self.at_limit(GiveUpReason::TimeBudgetExceeded {
                spent: self.spent,
                budget: self.budget,
            });
        }
        let rounds = self.history.len();
        if rounds >= self.config.max_rounds as usize {
            return self.at_limit(GiveUpReason::RoundLimit {
                rounds: u32::try_from(rounds).unwrap_or(u32::MAX),
                expected_downtime: expected,
            });
        }
        if self.idle_streak >= self.config.hopeless_rounds {
            return Decision::GiveUp {
                reason: GiveUpReason::NoBandwidth {
                    rounds: self.idle_streak,
                },
            };
        }

        let ac = &self.config.auto_converge;
        let throttle = sanitize_share(round.throttle, ac.max_share);
        let pressure = self.pressure(&round);
        // A remainder that did not shrink at all is hot whatever the
        // measured rates say: the dirty set has caught up with the link.
        let stuck = round.pages_sent > 0 && round.pages_dirtied >= round.pages_sent;
        let hot = pressure >= ac.pressure_trigger || stuck;
        let can_throttle = ac.enabled && throttle + SHARE_EPSILON < ac.max_share;

        if can_throttle && (hot || self.slow_streak >= ac.slow_rounds) {
            // Each step gets `slow_rounds` rounds to show its effect before
            // the next one, unless the guest still outruns the link.
            self.slow_streak = 0;
            self.hopeless_streak = 0;
            let share = if throttle + SHARE_EPSILON < ac.initial_share {
                ac.initial_share
            } else {
                (throttle + ac.increment).min(ac.max_share)
            };
            return Decision::Throttle {
                share: round_share(share),
            };
        }

        if hot && !can_throttle {
            self.hopeless_streak += 1;
        } else {
            self.hopeless_streak = 0;
        }
        if self.hopeless_streak >= self.config.hopeless_rounds {
            return self.at_limit(GiveUpReason::NotConverging { pressure, throttle });
        }
        Decision::AnotherRound
    }

    /// Whether a remainder that already fits the limit (blackout `expected`)
    /// is worth another round: its copy is above the target, the last round
    /// shrank the remainder well, a round is left (the `max_rounds`-th
    /// decision stays terminal) and the next round, about as long as the
    /// copy, ends within the time budget.
    fn worth_another_round(&self, round: &RoundStats, expected: Duration) -> bool {
        let copy = expected.saturating_sub(self.config.device_state_allowance);
        let allowed = (1.0 - self.config.auto_converge.min_shrink) * round.pages_sent as f64;
        let shrank_well = round.pages_dirtied as f64 <= allowed;
        // The next round sends the remainder: about `copy` long.
        let time_left = self.spent.saturating_add(copy) < self.budget;
        let rounds_left = self.history.len() < self.config.max_rounds as usize;
        copy > self.config.copy_target && shrank_well && rounds_left && time_left
    }

    fn record(&mut self, round: &RoundStats) {
        let decay = self.config.bandwidth_decay;
        let elapsed = round.elapsed.as_secs_f64();
        self.window_bytes = self.window_bytes * decay + round.bytes_sent as f64;
        self.window_secs = self.window_secs * decay + elapsed;
        self.spent = self.spent.saturating_add(round.elapsed);

        let ac = &self.config.auto_converge;
        let allowed = (1.0 - ac.min_shrink) * round.pages_sent as f64;
        if round.pages_dirtied as f64 > allowed {
            self.slow_streak += 1;
        } else {
            self.slow_streak = 0;
        }
        if round.bytes_sent == 0 && round.pages_sent.max(round.pages_dirtied) > 0 {
            self.idle_streak += 1;
        } else {
            self.idle_streak = 0;
        }
        self.history.push(*round);
    }

    /// The guest's dirty rate as a share of the bandwidth in the last round:
    /// at 1 or more the remainder cannot shrink.
    fn pressure(&self, round: &RoundStats) -> f64 {
        let page = self.config.page_size as f64;
        let dirtied = round.pages_dirtied as f64 * page;
        let elapsed = round.elapsed.as_secs_f64();
        match self.bandwidth() {
            Some(bw) if elapsed > 0.0 => dirtied / elapsed / bw,
            // Without a usable clock, the round's own ratio says the same:
            // bytes dirtied per byte sent.
            _ if round.bytes_sent > 0 => dirtied / round.bytes_sent as f64,
            _ if round.pages_dirtied > 0 => f64::INFINITY,
            _ => 0.0,
        }
    }

    fn at_limit(&self, reason: GiveUpReason) -> Decision {
        let expected = self.expected_downtime();
        match self.config.forced_stop {
            Some(ceiling) if expected <= ceiling => Decision::StopAndCopy {
                expected_downtime: expected,
                forced: true,
            },
            _ => Decision::GiveUp { reason },
        }
    }

    /// Expected blackout if the guest were paused now: the remainder at the
    /// smoothed bandwidth, plus the device-state allowance.
    pub fn expected_downtime(&self) -> Duration {
        self.config
            .expected_downtime(self.remaining_pages(), self.bandwidth())
    }

    /// Smoothed bandwidth in bytes/s; `None` before any round moved bytes in
    /// measurable time.
    pub fn bandwidth(&self) -> Option<f64> {
        if self.window_secs > 0.0 && self.window_bytes > 0.0 {
            let bw = self.window_bytes / self.window_secs;
            bw.is_finite().then_some(bw)
        } else {
            None
        }
    }

    /// The last round's dirty rate in pages/s (`None` before the first round
    /// or when it took no measurable time).
    pub fn dirty_rate(&self) -> Option<f64> {
        let last = self.history.last()?;
        let elapsed = last.elapsed.as_secs_f64();
        (elapsed > 0.0).then(|| last.pages_dirtied as f64 / elapsed)
    }

    /// Pages the next round (or the blackout) must send.
    pub fn remaining_pages(&self) -> u64 {
        self.history.last().map_or(0, |r| r.pages_dirtied)
    }

    /// Time the recorded rounds took together.
    pub fn spent(&self) -> Duration {
        self.spent
    }

    /// This move's time budget.
    pub fn time_budget(&self) -> Duration {
        self.budget
    }

    /// Budget not yet spent: the longest the job should let the next round
    /// run before aborting on its own (a round over a dead link never
    /// reports back to the policy).
    pub fn time_left(&self) -> Duration {
        self.budget.saturating_sub(self.spent)
    }

    /// Every round recorded so far, in order (the final report's pages per round).
    pub fn history(&self) -> &[RoundStats] {
        &self.history
    }

    pub fn config(&self) -> &ConvergenceConfig {
        &self.config
    }

    /// The terminal decision, once made.
    pub fn verdict(&self) -> Option<&Decision> {
        self.verdict.as_ref()
    }
}

/// A throttle share reported by the job, made safe to compute with.
fn sanitize_share(share: f64, max: f64) -> f64 {
    if share.is_finite() {
        share.clamp(0.0, max)
    } else {
        0.0
    }
}

/// Keeps shares readable (0.3, not 0.30000000000000004) in events and logs.
fn round_share(share: f64) -> f64 {
    (share * 1e6).round() / 1e6
}

/// Seconds to a `Duration`, saturating instead of panicking on overflow,
/// negative or NaN input.
pub(crate) fn secs(s: f64) -> Duration {
    if s.is_nan() || s <= 0.0 {
        Duration::ZERO
    } else {
        Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
    }
}

/// A duration for people: `850 µs`, `12.3 ms`, `4.20 s`, `3 min 20 s`, `∞`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d == Duration::MAX {
            return f.write_str("∞");
        }
        let s = d.as_secs_f64();
        if s < 1e-3 {
            write!(f, "{} µs", d.as_micros())
        } else if s < 1.0 {
            write!(f, "{:.1} ms", s * 1e3)
        } else if s < 120.0 {
            write!(f, "{s:.2} s")
        } else if s < 360_000.0 {
            let whole = d.as_secs();
            write!(f, "{} min {} s", whole / 60, whole % 60)
        } else {
            write!(f, "{:.0} h", s / 3600.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB_BYTES: u64 = 1 << 30;

    fn policy(memory_bytes: u64) -> ConvergencePolicy {
        ConvergencePolicy::new(ConvergenceConfig::default(), memory_bytes).unwrap()
    }

    /// A recorded round: (pages sent, pages dirtied, bytes sent, ms, throttle).
    type Row = (u64, u64, u64, u64, f64);

    /// Feeds a recorded trace, numbering its rounds on from those the policy
    /// has already seen; returns every decision.
    fn replay(policy: &mut ConvergencePolicy, trace: &[Row]) -> Vec<Decision> {
        trace
            .iter()
            .map(|&(sent, dirtied, bytes, ms, throttle)| {
                policy.decide(RoundStats {
                    round: policy.history().len() as u32,
                    pages_sent: sent,
                    pages_dirtied: dirtied,
                    bytes_sent: bytes,
                    elapsed: Duration::from_millis(ms),
                    throttle,
                })
            })
            .collect()
    }

    /// A guest that dirties `dirty_pages_per_sec` (scaled by the throttle,
    /// as SimGuest's run gate does) over a link of `bandwidth` bytes/s,
    /// driven by the policy until it decides to stop.
    fn drive(
        policy: &mut ConvergencePolicy,
        memory_pages: u64,
        dirty_pages_per_sec: f64,
        bandwidth: f64,
    ) -> (Vec<RoundStats>, Vec<Decision>) {
        let mut to_send = memory_pages;
        let mut throttle = 0.0;
        let mut rounds = Vec::new();
        let mut decisions = Vec::new();
        for round in 0..1000 {
            let secs_f = (to_send * PAGE_SIZE) as f64 / bandwidth;
            let dirtied =
                ((dirty_pages_per_sec * (1.0 - throttle) * secs_f).ceil() as u64).min(memory_pages);
            let stats = RoundStats {
                round,
                pages_sent: to_send,
                pages_dirtied: dirtied,
                bytes_sent: to_send * PAGE_SIZE,
                elapsed: Duration::from_secs_f64(secs_f),
                throttle,
            };
            rounds.push(stats);
            let d = policy.decide(stats);
            decisions.push(d.clone());
            match d {
                Decision::AnotherRound => {}
                Decision::Throttle { share } => throttle = share,
                _ => break,
            }
            to_send = dirtied;
        }
        (rounds, decisions)
    }

    #[test]
    fn defaults_are_valid() {
        ConvergenceConfig::default().validate().unwrap();
    }

    #[test]
    fn a_move_takes_the_clusters_downtime_limit_unless_it_names_its_own() {
        let settings = Settings {
            downtime_limit_ms: 50,
            ..Settings::default()
        };
        let cluster = ConvergenceConfig::for_move(&settings, None);
        assert_eq!(cluster.downtime_limit, Duration::from_millis(50));
        let own = ConvergenceConfig::for_move(&settings, Some(20));
        assert_eq!(own.downtime_limit, Duration::from_millis(20));
        // Nothing but the limit comes from the settings.
        let defaults = ConvergenceConfig::default();
        assert_eq!(
            ConvergenceConfig {
                downtime_limit: defaults.downtime_limit,
                ..own.clone()
            },
            defaults
        );
        own.validate().unwrap();
    }

    #[test]
    fn idle_guest_stops_after_round_zero() {
        // 256 MiB, nothing dirtied while round 0 ran at ~1 GB/s.
        let mut p = policy(256 * MIB);
        let d = replay(&mut p, &[(65_536, 0, 256 * MIB + 65_536 * 16, 260, 0.0)]);
        assert_eq!(
            d,
            vec![Decision::StopAndCopy {
                expected_downtime: p.config().device_state_allowance,
                forced: false
            }]
        );

        // Nothing to copy is at any target, even a zero one.
        let config = ConvergenceConfig {
            copy_target: Duration::ZERO,
            ..ConvergenceConfig::default()
        };
        let mut p = ConvergencePolicy::new(config, 256 * MIB).unwrap();
        let d = replay(&mut p, &[(65_536, 0, 256 * MIB, 260, 0.0)]);
        assert!(matches!(d[0], Decision::StopAndCopy { forced: false, .. }));
    }

    #[test]
    fn moderate_dirtier_converges_in_a_few_rounds() {
        // Recorded over 1 GbE (~117 MB/s): 1 GiB guest dirtying 24 MiB/s of
        // a 600 MiB working set. Each round the remainder shrinks ~5×.
        let trace: &[Row] = &[
            (262_144, 53_000, 1_074_000_000, 9_170, 0.0),
            (53_000, 11_000, 217_100_000, 1_860, 0.0),
            (11_000, 2_300, 45_060_000, 390, 0.0),
        ];
        let mut p = policy(GIB_BYTES);
        let d = replay(&mut p, trace);
        assert_eq!(d[0], Decision::AnotherRound);
        assert_eq!(d[1], Decision::AnotherRound);
        // After round 2 the remainder (~80 ms) fits the limit, but the round
        // shrank it ~5×, so the policy aims lower instead of stopping.
        let fits = p.expected_downtime();
        assert!(fits <= Duration::from_millis(300));
        assert!(fits >= Duration::from_millis(80));
        assert_eq!(d[2], Decision::AnotherRound);
        assert!(p.bandwidth().unwrap() > 100e6 && p.bandwidth().unwrap() < 130e6);
        assert_eq!(p.remaining_pages(), 2_300);

        // The short rounds that follow bring the copy under the target.
        let tail: &[Row] = &[
            (2_300, 480, 9_421_000, 81, 0.0),
            (480, 100, 1_966_000, 17, 0.0),
            (100, 21, 409_800, 4, 0.0),
        ];
        let d = replay(&mut p, tail);
        assert_eq!(d[..2], [Decision::AnotherRound, Decision::AnotherRound]);
        match d[2] {
            Decision::StopAndCopy {
                expected_downtime,
                forced: false,
            } => {
                let allowance = p.config().device_state_allowance;
                assert!(expected_downtime > allowance);
                assert!(expected_downtime - allowance <= p.config().copy_target);
            }
            ref other => panic!("expected stop and copy, got {other:?}"),
        }
        assert_eq!(p.history().len(), 6);
        assert_eq!(p.remaining_pages(), 21);
    }

    #[test]
    fn a_fitting_remainder_that_shrinks_well_gets_more_rounds_until_under_the_target() {
        // 1 GiB guest dirtying 128 MiB/s over a 1 GB/s link: round 0 leaves
        // a ~144 ms remainder, which fits the 300 ms limit; each round
        // shrinks the remainder ~7×.
        let mut p = policy(GIB_BYTES);
        let d = replay(&mut p, &[(262_144, 35_190, GIB_BYTES, 1_074, 0.0)]);
        let after_round_zero = p.expected_downtime();
        assert!(after_round_zero <= p.config().downtime_limit);
        assert!(after_round_zero >= Duration::from_millis(150));
        assert_eq!(d, [Decision::AnotherRound]);

        let d = replay(
            &mut p,
            &[
                (35_190, 4_719, 144_138_240, 144, 0.0),
                (4_719, 633, 19_329_024, 19, 0.0),
                (633, 85, 2_592_768, 3, 0.0),
            ],
        );
        assert_eq!(d[..2], [Decision::AnotherRound, Decision::AnotherRound]);
        let Decision::StopAndCopy {
            expected_downtime,
            forced: false,
        } = d[2]
        else {
            panic!("expected stop and copy, got {:?}", d[2]);
        };
        // 85 pages at ~1 GB/s: a third of a millisecond of copy.
        let copy = expected_downtime - p.config().device_state_allowance;
        assert!(copy <= p.config().copy_target, "{copy:?}");
        assert!(copy > Duration::ZERO);
    }

    #[test]
    fn the_headline_guest_blacks_out_for_well_under_a_millisecond_of_copy() {
        // The same guest, modelled: the copy drops under the target within a
        // handful of rounds, without throttling.
        let mut p = policy(GIB_BYTES);
        let (rounds, decisions) = drive(&mut p, 262_144, 128.0 * MIB as f64 / 4096.0, 1e9);
        assert!(decisions.len() <= 5, "{decisions:?}");
        assert!(rounds.iter().all(|r| r.throttle == 0.0));
        match decisions.last().unwrap() {
            Decision::StopAndCopy {
                expected_downtime,
                forced: false,
            } => {
                let copy = *expected_downtime - p.config().device_state_allowance;
                assert!(copy <= p.config().copy_target, "{copy:?}");
            }
            other => panic!("expected stop and copy, got {other:?}"),
        }
    }

    #[test]
    fn a_fitting_remainder_that_did_not_halve_stops_at_once() {
        // 64 MiB guest at 1 GB/s; round 0 leaves 61% of it dirty: ~41 ms,
        // fits, but another round would barely help.
        let mut p = policy(64 * MIB);
        let d = replay(&mut p, &[(16_384, 10_000, 64 * MIB, 67, 0.0)]);
        assert!(
            matches!(d[0], Decision::StopAndCopy { forced: false, .. }),
            "{d:?}"
        );

        // A hot set the guest rewrites whatever the round's length: round 1
        // fits and shrank, round 2 no longer halves it. Even with no target
        // at all the policy stops there instead of iterating on.
        let config = ConvergenceConfig {
            copy_target: Duration::ZERO,
            ..ConvergenceConfig::default()
        };
        let mut p = ConvergencePolicy::new(config, 64 * MIB).unwrap();
        let d = replay(
            &mut p,
            &[
                (16_384, 2_000, 64 * MIB, 67, 0.0),
                (2_000, 300, 8_192_000, 8, 0.0),
                (300, 256, 1_228_800, 2, 0.0),
            ],
        );
        assert_eq!(d[..2], [Decision::AnotherRound, Decision::AnotherRound]);
        assert!(
            matches!(d[2], Decision::StopAndCopy { forced: false, .. }),
            "{d:?}"
        );
    }

    #[test]
    fn aiming_stops_at_the_round_limit_and_the_time_budget() {
        // Every round shrinks the remainder ~7× and it fits from round 0 on.
        let trace: &[Row] = &[
            (262_144, 35_190, GIB_BYTES, 1_074, 0.0),
            (35_190, 4_719, 144_138_240, 144, 0.0),
        ];
        // With max_rounds 1, round 0's decision is the last: it stops.
        let config = ConvergenceConfig {
            max_rounds: 1,
            ..ConvergenceConfig::default()
        };
        let mut p = ConvergencePolicy::new(config, GIB_BYTES).unwrap();
        let d = replay(&mut p, &trace[..1]);
        assert!(matches!(d[0], Decision::StopAndCopy { forced: false, .. }));

        // With max_rounds 2, one round for the aim, then the terminal stop
        // although the copy (~19 ms) is still above the target.
        let config = ConvergenceConfig {
            max_rounds: 2,
            ..ConvergenceConfig::default()
        };
        let mut p = ConvergencePolicy::new(config, GIB_BYTES).unwrap();
        let d = replay(&mut p, trace);
        assert_eq!(d[0], Decision::AnotherRound);
        match d[1] {
            Decision::StopAndCopy {
                expected_downtime,
                forced: false,
            } => assert!(expected_downtime > Duration::from_millis(25)),
            ref other => panic!("expected stop and copy, got {other:?}"),
        }

        // 256 MiB: a 15 s budget. Round 0 took 14.99 s over a slow link and
        // left ~92 ms to copy: another round would outlast the budget.
        let row = |ms| (65_536, 400, 256 * MIB, ms, 0.0);
        let mut p = policy(256 * MIB);
        let d = replay(&mut p, &[row(14_990)]);
        assert!(matches!(d[0], Decision::StopAndCopy { forced: false, .. }));
        // With 10 s spent, there is time for it.
        let mut p = policy(256 * MIB);
        let d = replay(&mut p, &[row(10_000)]);
        assert_eq!(d[0], Decision::AnotherRound);
    }

    #[test]
    fn fast_dirtier_is_throttled_step_by_step_until_it_converges() {
        // 1 GiB guest dirtying 3 GB/s over a 1 GB/s link: it can only
        // converge once throttled past 2/3.
        let mut p = policy(GIB_BYTES);
        let (rounds, decisions) = drive(&mut p, 262_144, 3e9 / PAGE_SIZE as f64, 1e9);
        let shares: Vec<f64> = decisions
            .iter()
            .filter_map(|d| match d {
                Decision::Throttle { share } => Some(*share),
                _ => None,
            })
            .collect();
        assert!(shares.len() >= 3, "stepped: {shares:?}");
        assert_eq!(shares[0], 0.2);
        assert!(
            shares.windows(2).all(|w| w[1] > w[0]),
            "monotonic: {shares:?}"
        );
        assert!(shares.iter().all(|s| *s <= 0.99));
        match decisions.last().unwrap() {
            Decision::StopAndCopy {
                expected_downtime,
                forced: false,
            } => assert!(*expected_downtime <= Duration::from_millis(300)),
            other => panic!("expected convergence, got {other:?}"),
        }
        assert!(rounds.last().unwrap().throttle > 2.0 / 3.0);
        assert!(decisions.len() <= 30);
    }

    #[test]
    fn slow_shrink_triggers_throttle_after_two_rounds() {
        // Remainder shrinks only ~30% a round: converging, but slowly.
        let trace: &[Row] = &[
            (262_144, 200_000, 1 << 30, 10_000, 0.0),
            (200_000, 140_000, 819_200_000, 7_000, 0.0),
        ];
        let mut p = policy(GIB_BYTES);
        let d = replay(&mut p, trace);
        assert_eq!(d[0], Decision::AnotherRound);
        assert_eq!(d[1], Decision::Throttle { share: 0.2 });
    }

    #[test]
    fn impossible_guest_gives_up_without_looping() {
        // Dirties twice as fast as the link sends, the whole of memory, and
        // auto-converge is off.
        let mut config = ConvergenceConfig::default();
        config.auto_converge.enabled = false;
        let mut p = ConvergencePolicy::new(config, GIB_BYTES).unwrap();
        let (_, decisions) = drive(&mut p, 262_144, 2.0 * 117e6 / 4096.0, 117e6);
        assert!(decisions.len() <= 4, "{decisions:?}");
        assert!(matches!(
            decisions.last(),
            Some(Decision::GiveUp {
                reason: GiveUpReason::NotConverging { .. }
            })
        ));
    }

    #[test]
    fn throttle_at_max_that_cannot_help_gives_up() {
        // A guest whose writes the throttle cannot slow (say, DMA): each round
        // the link moves 1 GB and the guest dirties more.
        let row: Row = (244_140, 250_000, 1_000_000_000, 1_000, 0.0);
        let mut p = policy(4 * GIB_BYTES);
        let mut throttle = 0.0;
        let mut last = Decision::AnotherRound;
        for i in 0..40u32 {
            last = p.decide(RoundStats {
                round: i,
                pages_sent: row.0,
                pages_dirtied: row.1,
                bytes_sent: row.2,
                elapsed: Duration::from_millis(row.3),
                throttle,
            });
            match &last {
                Decision::Throttle { share } => throttle = *share,
                Decision::AnotherRound => {}
                _ => break,
            }
        }
        assert_eq!(throttle, 0.99);
        assert!(matches!(
            last,
            Decision::GiveUp {
                reason: GiveUpReason::NotConverging { .. }
            }
        ));
        assert!(p.history().len() <= 30);
    }

    #[test]
    fn time_budget_ends_a_slow_move() {
        // 256 MiB budget = 10 s + 5 s. Rounds of 4 s that barely shrink.
        let mut config = ConvergenceConfig::default();
        config.auto_converge.enabled = false;
        let mut p = ConvergencePolicy::new(config, 256 * MIB).unwrap();
        assert_eq!(p.time_budget(), Duration::from_secs(15));
        assert_eq!(p.time_left(), Duration::from_secs(15));
        let trace: &[Row] = &[
            (65_536, 60_000, 256 * MIB, 4_000, 0.0),
            (60_000, 58_000, 245_760_000, 4_000, 0.0),
            (58_000, 56_000, 237_568_000, 4_000, 0.0),
            (56_000, 54_000, 229_376_000, 4_000, 0.0),
        ];
        let d = replay(&mut p, trace);
        assert_eq!(
            d[..3],
            [
                Decision::AnotherRound,
                Decision::AnotherRound,
                Decision::AnotherRound
            ]
        );
        assert!(matches!(
            d[3],
            Decision::GiveUp {
                reason: GiveUpReason::TimeBudgetExceeded { .. }
            }
        ));
        assert_eq!(p.time_left(), Duration::ZERO);
    }

    #[test]
    fn round_limit_gives_up_or_forces_when_allowed() {
        let mut config = ConvergenceConfig {
            max_rounds: 3,
            ..ConvergenceConfig::default()
        };
        config.auto_converge.enabled = false;
        // 400 ms of remainder at 100 MB/s after every round.
        let trace: &[Row] = &[
            (25_000, 9_766, 100_000_000, 1_000, 0.0),
            (9_766, 9_766, 40_000_000, 400, 0.0),
            (9_766, 9_766, 40_000_000, 400, 0.0),
        ];
        let mut p = ConvergencePolicy::new(config.clone(), 100 * MIB).unwrap();
        let d = replay(&mut p, trace);
        assert!(matches!(
            d[2],
            Decision::GiveUp {
                reason: GiveUpReason::RoundLimit { rounds: 3, .. }
            }
        ));

        config.forced_stop = Some(Duration::from_secs(1));
        let mut p = ConvergencePolicy::new(config, 100 * MIB).unwrap();
        let d = replay(&mut p, trace);
        match d[2] {
            Decision::StopAndCopy {
                expected_downtime,
                forced: true,
            } => assert!(expected_downtime > Duration::from_millis(300)),
            ref other => panic!("expected a forced stop, got {other:?}"),
        }
    }

    #[test]
    fn zero_bandwidth_and_zero_time_do_not_panic() {
        let mut p = policy(GIB_BYTES);
        // Zero time, zero bytes, but pages due: nothing can be promised.
        let trace: &[Row] = &[
            (1000, 1000, 0, 0, 0.0),
            (1000, 1000, 0, 0, 0.0),
            (1000, 1000, 0, 0, 0.0),
        ];
        let d = replay(&mut p, trace);
        assert_eq!(p.bandwidth(), None);
        assert_eq!(p.dirty_rate(), None);
        assert_eq!(p.expected_downtime(), Duration::MAX);
        assert!(matches!(
            d.last(),
            Some(Decision::GiveUp {
                reason: GiveUpReason::NoBandwidth { rounds: 3 }
            })
        ));

        // Bytes in zero time: bandwidth unknown, no division by zero.
        let mut p = policy(GIB_BYTES);
        let d = replay(&mut p, &[(1000, 10, 4_096_000, 0, f64::NAN)]);
        assert_eq!(d[0], Decision::AnotherRound);
        assert_eq!(p.bandwidth(), None);

        // Nothing to send and nothing dirtied: done, even without bandwidth.
        let mut p = policy(0);
        let d = replay(&mut p, &[(0, 0, 0, 0, 0.0)]);
        assert!(matches!(d[0], Decision::StopAndCopy { forced: false, .. }));
    }

    #[test]
    fn verdict_is_repeated_after_the_end() {
        let mut p = policy(256 * MIB);
        let first = replay(&mut p, &[(65_536, 0, 256 * MIB, 260, 0.0)]);
        let again = p.decide(RoundStats {
            round: 1,
            pages_sent: 5,
            pages_dirtied: 5_000_000,
            bytes_sent: 0,
            elapsed: Duration::from_secs(100),
            throttle: 0.0,
        });
        assert_eq!(first[0], again);
        assert_eq!(p.history().len(), 1);
        assert_eq!(p.verdict(), Some(&again));
    }

    #[test]
    fn bad_configs_are_refused() {
        let bad = [
            ConvergenceConfig {
                max_rounds: 0,
                ..Default::default()
            },
            ConvergenceConfig {
                bandwidth_decay: 1.0,
                ..Default::default()
            },
            ConvergenceConfig {
                page_size: 0,
                ..Default::default()
            },
            ConvergenceConfig {
                forced_stop: Some(Duration::from_millis(1)),
                ..Default::default()
            },
            ConvergenceConfig {
                auto_converge: AutoConverge {
                    max_share: 1.0,
                    ..Default::default()
                },
                ..Default::default()
            },
            ConvergenceConfig {
                auto_converge: AutoConverge {
                    min_shrink: f64::NAN,
                    ..Default::default()
                },
                ..Default::default()
            },
        ];
        for config in bad {
            assert!(ConvergencePolicy::new(config, GIB_BYTES).is_err());
        }
    }

    #[test]
    fn displays_read_well() {
        assert_eq!(
            HumanDuration(Duration::from_micros(850)).to_string(),
            "850 µs"
        );
        assert_eq!(
            HumanDuration(Duration::from_millis(12)).to_string(),
            "12.0 ms"
        );
        assert_eq!(
            HumanDuration(Duration::from_millis(4200)).to_string(),
            "4.20 s"
        );
        assert_eq!(
            HumanDuration(Duration::from_secs(200)).to_string(),
            "3 min 20 s"
        );
        assert_eq!(HumanDuration(Duration::MAX).to_string(), "∞");
        assert_eq!(
            Decision::Throttle { share: 0.3 }.to_string(),
            "throttle the guest to 30%, another round"
        );
        let give_up = Decision::GiveUp {
            reason: GiveUpReason::RoundLimit {
                rounds: 30,
                expected_downtime: Duration::from_millis(450),
            },
        };
        assert_eq!(
            give_up.to_string(),
            "give up: round limit reached after 30 rounds, expected downtime still 450.0 ms"
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn row() -> impl Strategy<Value = (u64, u64, u64, u64, f64)> {
            (
                0u64..2_000_000,
                0u64..2_000_000,
                prop_oneof![Just(0u64), 0u64..10_000_000_000],
                prop_oneof![Just(0u64), 0u64..60_000],
                prop_oneof![Just(0.0), 0.0f64..1.0, Just(f64::NAN), Just(-1.0)],
            )
        }

        fn config() -> impl Strategy<Value = ConvergenceConfig> {
            (
                1u32..40,
                any::<bool>(),
                prop::option::of(300u64..2_000),
                1u32..5,
                prop_oneof![Just(0u64), Just(1_000), 0u64..400_000],
            )
                .prop_map(|(max_rounds, enabled, forced, hopeless, target_us)| {
                    let mut c = ConvergenceConfig {
                        max_rounds,
                        hopeless_rounds: hopeless,
                        forced_stop: forced.map(Duration::from_millis),
                        copy_target: Duration::from_micros(target_us),
                        ..Default::default()
                    };
                    c.auto_converge.enabled = enabled;
                    c
                })
        }

        proptest! {
            /// Whatever the trace, pre-copy ends within `max_rounds`
            /// decisions; an unforced stop keeps the downtime promise; a
            /// forced one stays under its ceiling; throttle shares stay legal.
            /// A remainder that fits the limit gets another round only for
            /// the copy target, after a round that shrank it well, with a
            /// round and the time for it left; otherwise it is copied.
            #[test]
            fn policy_always_ends_and_keeps_its_promises(
                config in config(),
                memory in 0u64..(64 << 30),
                trace in prop::collection::vec(row(), 1..60),
            ) {
                let mut p = ConvergencePolicy::new(config.clone(), memory).unwrap();
                let mut ended_at = None;
                for (i, &(sent, dirtied, bytes, ms, throttle)) in trace.iter().enumerate() {
                    let d = p.decide(RoundStats {
                        round: i as u32,
                        pages_sent: sent,
                        pages_dirtied: dirtied,
                        bytes_sent: bytes,
                        elapsed: Duration::from_millis(ms),
                        throttle,
                    });
                    // What the decision was made on.
                    let expected = p.expected_downtime();
                    let copy = expected.saturating_sub(config.device_state_allowance);
                    let shrank_well = dirtied as f64
                        <= (1.0 - config.auto_converge.min_shrink) * sent as f64;
                    let room = p.history().len() < config.max_rounds as usize
                        && p.spent().saturating_add(copy) < p.time_budget();
                    let aim = copy > config.copy_target && shrank_well && room;
                    if expected <= config.downtime_limit {
                        if aim {
                            prop_assert_eq!(&d, &Decision::AnotherRound);
                        } else {
                            let stopped = matches!(d, Decision::StopAndCopy { forced: false, .. });
                            prop_assert!(stopped, "{:?}", d);
                        }
                    }
                    match d {
                        Decision::Throttle { share } => {
                            prop_assert!(config.auto_converge.enabled);
                            prop_assert!(share > 0.0 && share <= config.auto_converge.max_share);
                        }
                        Decision::StopAndCopy { expected_downtime, forced } => {
                            if forced {
                                prop_assert!(expected_downtime <= config.forced_stop.unwrap());
                            } else {
                                prop_assert!(expected_downtime <= config.downtime_limit);
                            }
                        }
                        Decision::GiveUp { .. } | Decision::AnotherRound => {}
                    }
                    if d.is_terminal() {
                        ended_at = Some(i + 1);
                        break;
                    }
                }
                let decisions = ended_at.unwrap_or(trace.len());
                prop_assert!(decisions <= config.max_rounds as usize);
                if trace.len() >= config.max_rounds as usize {
                    prop_assert!(ended_at.is_some());
                }
            }

            /// A modelled guest whose rounds each shrink the remainder to at
            /// most 0.4 of the last, on links from 100 MB/s to 10 GB/s: the
            /// policy never throttles it, and stops, unforced, within
            /// `max_rounds` with the blackout's copy within the copy target.
            #[test]
            fn a_converging_guest_is_iterated_down_to_the_copy_target(
                memory_mib in 64u64..16_384,
                q in 0.0f64..0.4,
                bandwidth in 100e6f64..10e9,
            ) {
                let mut p = policy(memory_mib * MIB);
                let dirty_pages_per_sec = q * bandwidth / PAGE_SIZE as f64;
                let (rounds, decisions) =
                    drive(&mut p, memory_mib * MIB / PAGE_SIZE, dirty_pages_per_sec, bandwidth);
                prop_assert!(decisions.len() <= p.config().max_rounds as usize);
                prop_assert!(rounds.iter().all(|r| r.throttle == 0.0));
                match decisions.last().unwrap() {
                    Decision::StopAndCopy { expected_downtime, forced: false } => {
                        let copy = *expected_downtime - p.config().device_state_allowance;
                        prop_assert!(copy <= p.config().copy_target, "{:?} {:?}", copy, decisions);
                    }
                    other => prop_assert!(false, "expected a stop, got {:?}", other),
                }
            }
        }
    }
}
