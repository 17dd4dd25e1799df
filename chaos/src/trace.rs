//! Fault traces: where each step of a schedule actually fired in one run —
//! at which migration's phase, or at which offset from the start — so a
//! failing run can be replayed along the same path.
//!
//! A seed alone plans the same faults, but a phase step fires when *some*
//! migration next reaches its phase, in real time: a replay with the seed
//! alone takes another path as soon as one move runs a little faster. The
//! trace pins each step to the migration id and phase (or the offset) it
//! fired at, and names the invariants the run broke, so a replay can fire at
//! the same points and then say whether it broke them again.
//!
//! The compact form fits in one environment variable and in a file (the
//! separators are commas or whitespace, `#` starts a comment):
//!
//! ```text
//! v1,seed=12,faults=4,expect=same_digest,s0=m37.after_switchover+86ms@3120ms,s1=t3501ms
//! ```
//!
//! `s<i>=m<id>.<phase>+<delay>ms@<offset>ms`: step `i` fired `delay` after
//! migration `id` reached `phase`, `offset` into the run. `s<i>=t<offset>ms`:
//! step `i` fired at `offset` (a timed step, or a phase step whose phase no
//! migration reached in time). A `/n<node>` suffix names the node a step hit
//! where the schedule leaves it to the moment (the Raft leader it killed).

use crate::checker::Invariant;
use crate::schedule::Phase;
use std::fmt;
use std::time::Duration;

/// Where one step fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FiredAt {
    /// `delay` after migration `migration` reached `phase`, `offset` into the run.
    Phase {
        migration: u64,
        phase: Phase,
        delay: Duration,
        offset: Duration,
    },
    /// At `offset` into the run.
    Offset(Duration),
}

impl FiredAt {
    pub fn offset(&self) -> Duration {
        match *self {
            FiredAt::Phase { offset, .. } | FiredAt::Offset(offset) => offset,
        }
    }
}

impl fmt::Display for FiredAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FiredAt::Phase {
                migration,
                phase,
                delay,
                offset,
            } => write!(
                f,
                "m{migration}.{}+{}ms@{}ms",
                phase_token(phase),
                delay.as_millis(),
                offset.as_millis()
            ),
            FiredAt::Offset(offset) => write!(f, "t{}ms", offset.as_millis()),
        }
    }
}

/// One step as it fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fired {
    /// Index of the step in the schedule.
    pub step: usize,
    pub at: FiredAt,
    /// The node it hit, where the schedule does not say (the leader).
    pub node: Option<u64>,
}

impl fmt::Display for Fired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}={}", self.step, self.at)?;
        if let Some(node) = self.node {
            write!(f, "/n{node}")?;
        }
        Ok(())
    }
}

/// The path one run took through its schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    pub seed: u64,
    /// Disruptive faults the schedule was planned with.
    pub faults: usize,
    /// Invariants the run broke (what a replay should break again).
    pub expect: Vec<Invariant>,
    /// Fired steps, in firing order.
    pub fired: Vec<Fired>,
}

impl Trace {
    pub fn new(seed: u64, faults: usize) -> Self {
        Trace {
            seed,
            faults,
            expect: Vec::new(),
            fired: Vec::new(),
        }
    }

    /// How step `step` fired, if it did.
    pub fn step(&self, step: usize) -> Option<Fired> {
        self.fired.iter().find(|f| f.step == step).copied()
    }

    /// Reads the compact form (see the module doc).
    pub fn parse(text: &str) -> Result<Trace, TraceError> {
        let bad = |token: &str, why: &str| TraceError(format!("{why}: {token:?}"));
        let mut tokens = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or(""))
            .flat_map(|l| l.split(|c: char| c == ',' || c.is_whitespace()))
            .filter(|t| !t.is_empty());
        match tokens.next() {
            Some("v1") => {}
            Some(other) => return Err(bad(other, "not a v1 chaos trace (it starts with v1)")),
            None => return Err(TraceError("empty chaos trace".into())),
        }
        let (mut seed, mut faults) = (None, None);
        let mut trace = Trace::new(0, 0);
        for token in tokens {
            let (key, value) = token
                .split_once('=')
                .ok_or_else(|| bad(token, "expected key=value"))?;
            match key {
                "seed" => seed = Some(value.parse().map_err(|_| bad(token, "bad seed"))?),
                "faults" => {
                    faults = Some(value.parse().map_err(|_| bad(token, "bad fault count"))?)
                }
                "expect" => {
                    for name in value.split('+').filter(|n| !n.is_empty()) {
                        trace.expect.push(
                            invariant_from_token(name)
                                .ok_or_else(|| bad(name, "unknown invariant"))?,
                        );
                    }
                }
                _ => {
                    let step: usize = key
                        .strip_prefix('s')
                        .and_then(|n| n.parse().ok())
                        .ok_or_else(|| bad(token, "unknown key"))?;
                    if trace.step(step).is_some() {
                        return Err(bad(token, "step listed twice"));
                    }
                    let (at, node) = match value.split_once("/n") {
                        Some((at, node)) => {
                            (at, Some(node.parse().map_err(|_| bad(token, "bad node"))?))
                        }
                        None => (value, None),
                    };
                    let at = parse_fired(at).ok_or_else(|| bad(token, "bad firing point"))?;
                    trace.fired.push(Fired { step, at, node });
                }
            }
        }
        trace.seed = seed.ok_or_else(|| TraceError("the trace has no seed=".into()))?;
        trace.faults = faults.ok_or_else(|| TraceError("the trace has no faults=".into()))?;
        Ok(trace)
    }
}

impl fmt::Display for Trace {
    /// The compact form: one line, no spaces, shell-safe.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v1,seed={},faults={}", self.seed, self.faults)?;
        if !self.expect.is_empty() {
            let names: Vec<&str> = self.expect.iter().map(|&i| invariant_token(i)).collect();
            write!(f, ",expect={}", names.join("+"))?;
        }
        for fired in &self.fired {
            write!(f, ",{fired}")?;
        }
        Ok(())
    }
}

/// A trace that does not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceError(pub String);

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TraceError {}

fn millis(text: &str) -> Option<Duration> {
    text.strip_suffix("ms")?
        .parse()
        .ok()
        .map(Duration::from_millis)
}

fn parse_fired(value: &str) -> Option<FiredAt> {
    if let Some(offset) = value.strip_prefix('t') {
        return millis(offset).map(FiredAt::Offset);
    }
    let rest = value.strip_prefix('m')?;
    let (migration, rest) = rest.split_once('.')?;
    let (phase, rest) = rest.split_once('+')?;
    let (delay, offset) = rest.split_once('@')?;
    Some(FiredAt::Phase {
        migration: migration.parse().ok()?,
        phase: phase_from_token(phase)?,
        delay: millis(delay)?,
        offset: millis(offset)?,
    })
}

pub fn phase_token(phase: Phase) -> &'static str {
    match phase {
        Phase::MidRound0 => "round0",
        Phase::MidDirtyRounds => "dirty_rounds",
        Phase::DuringBlackout => "blackout",
        Phase::AfterSwitchover => "after_switchover",
    }
}

fn phase_from_token(token: &str) -> Option<Phase> {
    Phase::ALL.into_iter().find(|&p| phase_token(p) == token)
}

/// The invariant's name with underscores, as the chaos summary prints it.
pub fn invariant_token(invariant: Invariant) -> &'static str {
    match invariant {
        Invariant::OneRunningCopy => "one_running_copy",
        Invariant::NoLostVm => "no_lost_vm",
        Invariant::SameDigest => "same_digest",
        Invariant::NoLostAppend => "no_lost_append",
        Invariant::MigrationsEnd => "migrations_end",
    }
}

fn invariant_from_token(token: &str) -> Option<Invariant> {
    Invariant::ALL
        .into_iter()
        .find(|&i| invariant_token(i) == token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Seed 12 of issue 20, as a trace of its run could have read.
    fn seed_12() -> Trace {
        Trace {
            seed: 12,
            faults: 4,
            expect: vec![Invariant::SameDigest],
            fired: vec![
                Fired {
                    step: 0,
                    at: FiredAt::Phase {
                        migration: 3,
                        phase: Phase::AfterSwitchover,
                        delay: ms(86),
                        offset: ms(702),
                    },
                    node: None,
                },
                Fired {
                    step: 1,
                    at: FiredAt::Offset(ms(1083)),
                    node: None,
                },
                Fired {
                    step: 2,
                    at: FiredAt::Phase {
                        migration: 9,
                        phase: Phase::AfterSwitchover,
                        delay: ms(68),
                        offset: ms(1840),
                    },
                    node: Some(1),
                },
                Fired {
                    step: 5,
                    at: FiredAt::Phase {
                        migration: 31,
                        phase: Phase::DuringBlackout,
                        delay: ms(0),
                        offset: ms(3401),
                    },
                    node: None,
                },
            ],
        }
    }

    #[test]
    fn the_compact_form_reads_back_as_written() {
        let text = seed_12().to_string();
        assert_eq!(
            text,
            "v1,seed=12,faults=4,expect=same_digest,s0=m3.after_switchover+86ms@702ms,s1=t1083ms,s2=m9.after_switchover+68ms@1840ms/n1,s5=m31.blackout+0ms@3401ms"
        );
        assert!(!text.contains(char::is_whitespace));
        assert_eq!(Trace::parse(&text), Ok(seed_12()));
    }

    #[test]
    fn every_phase_and_invariant_round_trips() {
        let mut trace = Trace::new(7, 6);
        trace.expect = Invariant::ALL.to_vec();
        for (i, phase) in Phase::ALL.into_iter().enumerate() {
            trace.fired.push(Fired {
                step: i,
                at: FiredAt::Phase {
                    migration: 100 + i as u64,
                    phase,
                    delay: ms(i as u64 * 10),
                    offset: ms(5000 + i as u64),
                },
                node: (i % 2 == 0).then_some(i as u64),
            });
        }
        assert_eq!(Trace::parse(&trace.to_string()), Ok(trace));
    }

    #[test]
    fn a_file_may_spread_the_trace_over_lines_with_comments() {
        let file = "# seed 12, failed with a same-digest violation\nv1 seed=12 faults=4\n  expect=same_digest\ns0=m3.after_switchover+86ms@702ms  # the first step\ns1=t1083ms\ns2=m9.after_switchover+68ms@1840ms/n1  # killed the leader, node 1\ns5=m31.blackout+0ms@3401ms\n";
        assert_eq!(Trace::parse(file), Ok(seed_12()));
        assert_eq!(
            seed_12().step(5).map(|f| f.at.offset()),
            Some(ms(3401)),
            "step 5 fired 3.401 s in"
        );
        assert_eq!(seed_12().step(2).and_then(|f| f.node), Some(1));
        assert_eq!(seed_12().step(3), None);
    }

    #[test]
    fn bad_traces_are_refused_with_the_token_at_fault() {
        let cases = [
            ("", "empty"),
            ("v2,seed=1,faults=4", "not a v1 chaos trace"),
            ("v1,faults=4", "no seed="),
            ("v1,seed=1", "no faults="),
            ("v1,seed=x,faults=4", "bad seed: \"seed=x\""),
            (
                "v1,seed=1,faults=4,expect=twice",
                "unknown invariant: \"twice\"",
            ),
            ("v1,seed=1,faults=4,s0=t12", "bad firing point"),
            (
                "v1,seed=1,faults=4,s0=m3.sideways+1ms@2ms",
                "bad firing point",
            ),
            ("v1,seed=1,faults=4,s0=m3.blackout+1ms", "bad firing point"),
            ("v1,seed=1,faults=4,s0=t1ms,s0=t2ms", "step listed twice"),
            ("v1,seed=1,faults=4,s0=t1ms/nX", "bad node"),
            ("v1,seed=1,faults=4,colour=red", "unknown key"),
            ("v1,seed=1,faults=4,oops", "expected key=value"),
        ];
        for (text, why) in cases {
            match Trace::parse(text) {
                Ok(t) => panic!("{text:?} read as {t:?}"),
                Err(e) => assert!(e.0.contains(why), "{text:?}: {e} (expected {why:?})"),
            }
        }
    }
}
