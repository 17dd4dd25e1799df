//! The chaos checker against a deliberately broken engine: with the
//! test-only switch `ferry_actors::migration::source::INJECT_PAGE_COPY_BUG`
//! set, a move's final round leaves one dirty page out, so the target resumes
//! with a stale page.
//!
//! One move of a busy guest on the chaos cluster (no faults), three ways:
//! - the bug on, `verify` off: the engine compares nothing and the move
//!   completes, but the witness's own digests (at the pause and at the
//!   target's resume) differ: the checker reports a "same digest" violation,
//!   memory differs;
//! - the bug off, `verify` off: the same move is clean;
//! - the bug on, `verify` on: the engine catches it in the blackout and
//!   aborts with a digest mismatch, which the run's abort classification
//!   (`ferry_chaos::aborts`) reports as a bug, not an expected abort.
//!
//! The switch is process-wide, so this is a test binary of its own with a
//! single test: nothing else in the process migrates while it is set.
//! `cargo test --test chaos_injected -- --nocapture` shows the reports.
#![allow(clippy::unwrap_used)]

mod chaos_support;

use chaos_support::cluster::ChaosCluster;
use chaos_support::recording::{Aborted, Recording};
use ferry_actors::actors::{MoveVm, StartVm};
use ferry_actors::migration::source::{MovePolicy, MoveRequest, INJECT_PAGE_COPY_BUG};
use ferry_actors::policy::convergence::ConvergenceConfig;
use ferry_chaos::aborts::{self, AbortKind};
use ferry_chaos::checker::{self, Invariant, Report};
use ferry_chaos::schedule::FaultKind;
use ferry_cluster::Command;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// Sets the switch for as long as it lives (cleared on drop, panics too).
struct Injected;

impl Injected {
    fn set(on: bool) -> Injected {
        INJECT_PAGE_COPY_BUG.store(on, Ordering::SeqCst);
        Injected
    }
}

impl Drop for Injected {
    fn drop(&mut self) {
        INJECT_PAGE_COPY_BUG.store(false, Ordering::SeqCst);
    }
}

/// What one move did: the move's answer, the checker's report on the
/// history, and the aborts recorded.
struct Moved {
    answer: Result<u64, String>,
    report: Report,
    aborts: Vec<Aborted>,
}

/// vm-1, 16 MiB with a guest writing 20 000 pages a second (so every round,
/// the final one included, has dirty pages), moves from node 1 to node 2 of
/// a three-node chaos cluster.
async fn one_move(tag: &str, verify: bool) -> Result<Moved, String> {
    let recording = Recording::new();
    let cluster = Arc::new(ChaosCluster::start(tag, 3, 2, 16, recording.clone()).await?);
    cluster
        .leader(Duration::from_secs(10))
        .await
        .ok_or("no leader")?;
    let workload = ferry_vmm::Workload {
        dirty_pages_per_sec: Some(20_000),
        pattern: ferry_vmm::Pattern::HotSet {
            write_percent: 80,
            page_percent: 10,
        },
        seed: 16,
    };
    let mut config = ferry_actors::local::vm_config(16 * MIB, workload, 1);
    config.vcpus = 1;
    cluster
        .write(Command::CreateVm {
            name: "vm-1".into(),
            config,
            node: 1,
        })
        .await?;
    let source = cluster.live(1).ok_or("node 1 is down")?;
    source
        .actor
        .send(StartVm("vm-1".into()))
        .await
        .map_err(|e| e.to_string())??;
    // Let the guest write for a while before the move.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut request = MoveRequest::new("vm-1", 2);
    request.verify = verify;
    // Stop at the first remainder that fits, as the policy did before its copy
    // target: the final round then holds many pages the guest really changed.
    // With the aim on it may hold only a page or two, and the one the bug
    // leaves out may be one whose last write the round before already
    // carried (read as it landed), which changes nothing to find.
    request.policy = MovePolicy::Explicit(ConvergenceConfig {
        copy_target: std::time::Duration::from_secs(3600),
        ..ConvergenceConfig::default()
    });
    let answer = tokio::time::timeout(Duration::from_secs(60), source.actor.send(MoveVm(request)))
        .await
        .map_err(|_| "the move did not answer in 60 s")?
        .map_err(|e| e.to_string())?
        .map(|r| r.epoch)
        .map_err(|e| e.to_string());
    cluster.shutdown().await;
    Ok(Moved {
        answer,
        report: checker::check(&recording.events()),
        aborts: recording.aborts(),
    })
}

fn run(tag: &str, verify: bool, bug: bool) -> Moved {
    let _switch = Injected::set(bug);
    let moved = ferry_actors::local::run(one_move(tag, verify))
        .unwrap()
        .unwrap_or_else(|e| panic!("{tag}: {e}"));
    println!(
        "{tag} (page-copy bug {}, verify {}): move {:?}\n{}",
        if bug { "on" } else { "off" },
        if verify { "on" } else { "off" },
        moved.answer,
        moved.report
    );
    moved
}

#[test]
fn an_injected_page_copy_bug_is_caught_by_the_checker_not_the_engine() {
    // The bug, and nothing in the engine to catch it.
    let broken = run("injected-bug", false, true);
    assert!(
        broken.answer.is_ok(),
        "with verify off the engine must not notice: {:?}",
        broken.answer
    );
    let caught: Vec<_> = broken.report.violations_of(Invariant::SameDigest).collect();
    assert!(
        caught.iter().any(|v| v.message.contains("memory differs")),
        "the checker missed the stale page:\n{}",
        broken.report
    );
    println!(
        "caught: {}",
        caught.first().map(|v| v.to_string()).unwrap_or_default()
    );

    // The same move without the bug is clean, and was compared.
    let clean = run("injected-clean", false, false);
    assert!(clean.answer.is_ok(), "{:?}", clean.answer);
    assert!(
        clean.report.is_clean() && clean.report.is_complete(),
        "{}",
        clean.report
    );
    assert!(
        clean.report.checked[&Invariant::SameDigest] >= 1,
        "{}",
        clean.report
    );

    // With verify on the engine catches it, and the abort is a bug.
    let verified = run("injected-verify", true, true);
    assert!(
        verified.answer.is_err(),
        "verify on: the move must abort: {:?}",
        verified.answer
    );
    assert!(verified.report.is_clean(), "{}", verified.report);
    let no_faults = BTreeSet::<FaultKind>::new();
    let judged: Vec<_> = verified
        .aborts
        .iter()
        .map(|a| (a, aborts::judge(&a.reason, &no_faults)))
        .collect();
    for (abort, j) in &judged {
        println!(
            "abort of migration {} [{}]: {}",
            abort.migration,
            j.kind,
            j.problem.as_deref().unwrap_or("expected")
        );
    }
    assert!(
        judged
            .iter()
            .any(|(_, j)| j.kind == AbortKind::DigestMismatch && j.kind.is_bug()),
        "{:?}",
        verified.aborts
    );
}
