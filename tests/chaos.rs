//! The chaos suite: seeded fault schedules against a live cluster in this
//! process, and the invariant checker over each run's recorded history.
//!
//! Each seed plans a fault schedule (`ferry_chaos::schedule`) — links cut,
//! delayed, lossy or slowed; nodes killed and restarted; the Raft leader
//! killed; a node partitioned from the majority — aimed at migration phases
//! (mid round 0, mid dirty rounds, during the blackout, right after the
//! switchover). A three-node cluster runs moves and a drain while the faults
//! fire, settles, and the whole history goes through
//! `ferry_chaos::checker::check`: never two running copies, no lost VM, the
//! digest at resume equal to the digest at pause, no lost acknowledged
//! append, every migration ended within its budget. A failing seed prints
//! itself, its schedule and the history around the violation.
//!
//! `cargo test --release --test chaos -- --nocapture` runs the CI seeds;
//! `FERRY_CHAOS_SEEDS=100` runs seeds 0..100 (or `=200..300`), and
//! `FERRY_CHAOS_SEED=<n>` replays one; `FERRY_CHAOS_FAULTS=<n>` plans more
//! faults per schedule than the default four (a replay needs the same value);
//! `FERRY_CHAOS_VERBOSE=1` prints every run's schedule and log. The run ends
//! with one line beginning `chaos summary:`.
#![allow(clippy::unwrap_used)]

mod chaos_support;

use chaos_support::recording::Recording;
use chaos_support::run::{self, Outcome};
use ferry_actors::history::HistoryEvent;
use ferry_chaos::checker::{self, Invariant};
use ferry_chaos::schedule::{FaultKind, Phase, Schedule};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// The seeds CI runs: together their schedules aim at every phase and
/// inject every kind of fault (checked below). 5–11 s each in a debug build
/// on two busy cores: about 100 s for the set.
const CI_SEEDS: [u64; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];

fn seeds() -> Vec<u64> {
    if let Ok(one) = std::env::var("FERRY_CHAOS_SEED") {
        return vec![one.trim().parse().expect("FERRY_CHAOS_SEED is a number")];
    }
    match std::env::var("FERRY_CHAOS_SEEDS") {
        Ok(spec) => match spec.trim().split_once("..") {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
                (a..b).collect()
            }
            None => (0..spec.trim().parse::<u64>().expect("FERRY_CHAOS_SEEDS")).collect(),
        },
        Err(_) => CI_SEEDS.to_vec(),
    }
}

#[test]
fn the_ci_seeds_aim_at_every_phase_with_every_kind_of_fault() {
    let shape = run::shape();
    let mut kinds = BTreeSet::new();
    let mut phases = BTreeSet::new();
    for seed in CI_SEEDS {
        let schedule = Schedule::plan(seed, &shape);
        kinds.extend(schedule.steps.iter().map(|s| s.fault.kind()));
        phases.extend(run::phases_of(&schedule));
    }
    for kind in FaultKind::DISRUPTIVE {
        assert!(kinds.contains(&kind), "no CI seed injects {kind}");
    }
    for phase in Phase::ALL {
        assert!(phases.contains(&phase), "no CI seed aims at {phase}");
    }
}

#[test]
fn chaos_seeds_keep_every_invariant() {
    let started = Instant::now();
    let seeds = seeds();
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    for &seed in &seeds {
        let result = std::thread::Builder::new()
            .name(format!("chaos-seed-{seed}"))
            .spawn(move || run::run_seed(seed))
            .unwrap()
            .join();
        match result {
            Ok(Ok(outcome)) => {
                let kinds: Vec<String> = outcome
                    .schedule
                    .steps
                    .iter()
                    .take(outcome.fired)
                    .filter(|s| !s.fault.kind().is_repair())
                    .map(|s| s.fault.kind().to_string())
                    .collect();
                println!(
                    "chaos seed {seed}: {:.1} s, fired {}/{} steps [{}], migrations {} completed {} aborted, {} checks, {} violations",
                    outcome.elapsed.as_secs_f64(),
                    outcome.fired,
                    outcome.schedule.steps.len(),
                    kinds.join(", "),
                    outcome.completed,
                    outcome.aborted,
                    outcome.report.total_checked(),
                    outcome.report.violations.len()
                );
                if !outcome.is_clean() || std::env::var_os("FERRY_CHAOS_VERBOSE").is_some() {
                    println!("{}", outcome.describe());
                }
                if !outcome.is_clean() {
                    failures.push(format!(
                        "seed {seed}: {} violations",
                        outcome.report.violations.len()
                    ));
                }
                outcomes.push(outcome);
            }
            Ok(Err(e)) => {
                let schedule = Schedule::plan(seed, &run::shape());
                println!("chaos seed {seed} could not run: {e}\n{schedule}");
                failures.push(format!("seed {seed}: {e}"));
            }
            Err(_) => {
                let schedule = Schedule::plan(seed, &run::shape());
                println!("chaos seed {seed} panicked\n{schedule}");
                failures.push(format!("seed {seed}: panicked"));
            }
        }
    }

    let mut injected: BTreeMap<FaultKind, usize> = BTreeMap::new();
    let mut checked: BTreeMap<Invariant, u64> = BTreeMap::new();
    let (mut completed, mut aborted, mut violations) = (0, 0, 0);
    for o in &outcomes {
        for (k, n) in &o.injected {
            *injected.entry(*k).or_insert(0) += n;
        }
        for (i, n) in &o.report.checked {
            *checked.entry(*i).or_insert(0) += n;
        }
        completed += o.completed;
        aborted += o.aborted;
        violations += o.report.violations.len();
    }
    let faults: Vec<String> = injected.iter().map(|(k, n)| format!("{k}={n}")).collect();
    let checks: Vec<String> = checked
        .iter()
        .map(|(i, n)| format!("{}={n}", i.to_string().replace(' ', "_")))
        .collect();
    println!(
        "chaos summary: seeds={} {:?} faults injected: {} | migrations completed={completed} aborted={aborted} | invariants checked={} ({}) | violations={violations} | runs failed={} | {:.1} s",
        seeds.len(),
        seeds,
        faults.join(" "),
        checked.values().sum::<u64>(),
        checks.join(" "),
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "chaos failures: {failures:?}");
}

// ---- the checker on recorded histories of deliberately broken builds ----

/// Feeds a migration of vm-1 from node 1 to node 2, as the engine reports
/// it, through the same recording the live runs use; `broken` inserts what
/// a broken build would do right after the switchover commit.
fn recorded(broken: &[HistoryEvent], final_seqs: Vec<u64>) -> checker::Report {
    let recording = Recording::new();
    let n1 = recording.recorder(1, 1);
    let n2 = recording.recorder(2, 1);
    let digest = ferry_vmm::MemoryDigest {
        memory: 0xfeed,
        state: 0xbeef,
    };
    let vm = || "vm-1".to_string();
    n1(HistoryEvent::VmStarted {
        vm: vm(),
        node: 1,
        epoch: 1,
    });
    assert!(recording.acked("vm-1", 1, recording.generation("vm-1")));
    n1(HistoryEvent::MigrationBegun {
        migration: 7,
        vm: vm(),
        source: 1,
        target: 2,
        budget: Duration::from_secs(11),
    });
    n1(HistoryEvent::CopyRound {
        migration: 7,
        vm: vm(),
        round: 0,
    });
    assert!(recording.acked("vm-1", 2, recording.generation("vm-1")));
    n1(HistoryEvent::SourcePaused {
        migration: 7,
        vm: vm(),
        node: 1,
    });
    n1(HistoryEvent::DigestAtPause {
        vm: vm(),
        node: 1,
        digest,
    });
    n1(HistoryEvent::SwitchoverCommitted {
        migration: 7,
        vm: vm(),
        owner: 2,
        epoch: 2,
    });
    for event in broken {
        match event {
            HistoryEvent::SourceResumed { .. } => n1(event.clone()),
            _ => n2(event.clone()),
        }
    }
    if !broken
        .iter()
        .any(|e| matches!(e, HistoryEvent::DigestAtResume { .. }))
    {
        n2(HistoryEvent::DigestAtResume {
            vm: vm(),
            node: 2,
            digest,
        });
    }
    n2(HistoryEvent::TargetResumed {
        migration: 7,
        vm: vm(),
        node: 2,
        epoch: 2,
    });
    n1(HistoryEvent::CopyDestroyed { vm: vm(), node: 1 });
    n1(HistoryEvent::MigrationEnded {
        migration: 7,
        vm: vm(),
        completed: true,
        reason: None,
    });
    assert!(recording.acked("vm-1", 3, recording.generation("vm-1")));
    recording.final_records("vm-1", final_seqs);
    checker::check(&recording.events())
}

#[test]
fn a_clean_recorded_migration_passes() {
    let report = recorded(&[], vec![1, 2, 3]);
    assert!(report.is_clean(), "{report}");
    for invariant in Invariant::ALL {
        assert!(report.checked[&invariant] > 0, "{invariant}: {report}");
    }
}

#[test]
fn a_source_resuming_after_the_switchover_commit_is_caught() {
    // The broken build: the source, paused in the blackout, resumes on its
    // own after the store gave the VM to the target.
    let report = recorded(
        &[HistoryEvent::SourceResumed {
            migration: 7,
            vm: "vm-1".into(),
            node: 1,
            epoch: 1,
        }],
        vec![1, 2, 3],
    );
    println!("{report}");
    let caught: Vec<_> = report.violations_of(Invariant::OneRunningCopy).collect();
    assert!(
        caught.iter().any(|v| v
            .message
            .contains("runs on node 1, but the cluster store says node 2 owns it")),
        "{report}"
    );
    assert!(
        caught
            .iter()
            .any(|v| v.message.contains("two running copies")),
        "{report}"
    );
}

#[test]
fn a_target_resuming_with_other_memory_is_caught() {
    let report = recorded(
        &[HistoryEvent::DigestAtResume {
            vm: "vm-1".into(),
            node: 2,
            digest: ferry_vmm::MemoryDigest {
                memory: 0xdead,
                state: 0xbeef,
            },
        }],
        vec![1, 2, 3],
    );
    assert_eq!(
        report.violations_of(Invariant::SameDigest).count(),
        1,
        "{report}"
    );
    assert_eq!(report.violations.len(), 1, "{report}");
}

#[test]
fn a_lost_acknowledged_append_is_caught() {
    // The target resumed without the last pages: append 2 is gone.
    let report = recorded(&[], vec![1, 3]);
    let lost: Vec<_> = report.violations_of(Invariant::NoLostAppend).collect();
    assert_eq!(lost.len(), 1, "{report}");
    assert!(lost[0].message.contains("append 2"), "{report}");
}
