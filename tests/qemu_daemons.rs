//! A QEMU VM running Linux moved between three `ferry` daemons, each in its
//! own network namespace on two migration networks, while a client appends
//! to the guest's service through node 1's API the whole time (issue 19):
//!
//! 1. created through the API and moved with the CLI: the move completes,
//!    every acknowledged append keeps its place (the service numbers them
//!    in order, so a lost one would be numbered again), the client's longest
//!    wait is the blackout it saw, and the source's QEMU process is gone;
//! 2. moved again with one network dropped at the target by a packet filter
//!    in its namespace, outside Ferry: the move completes on the other;
//! 3. moved again and the target daemon killed (SIGKILL) mid-copy: the move
//!    aborts, the VM runs on at its source, nothing acknowledged is lost, and
//!    the target's QEMU died with its daemon;
//!
//! and over the whole run a watcher outside Ferry asks every QEMU process
//! (through a monitor socket Ferry does not use) whether it runs: never two
//! at once.
//!
//! Needs QEMU, a kernel and busybox (`ferry::vmm::qemu::usable_or_skip`), and
//! root with `ip`, `tc` and `nft` for the namespaces. Without them it says
//! `SKIPPED` and returns, unless `FERRY_CI_PROVIDES` names `qemu` and
//! `netns`, where it fails.
#![allow(clippy::unwrap_used)]

mod chaos_support;

use chaos_support::daemons::{ferry_program, TempDir};
use chaos_support::netns::{cannot_run, Direction};
use chaos_support::paths::{Fault, PathRig, Phase, VM};
use chaos_support::qemu_watch::QemuWatch;
use ferry::requests::MoveVm;
use ferry::views::{MigrationView, MoveStarted};
use std::time::{Duration, Instant};

fn skip_or_fail(reason: &str) {
    let provided = std::env::var("FERRY_CI_PROVIDES").unwrap_or_default();
    if provided.split(',').any(|p| p.trim() == "netns") {
        panic!("FERRY_CI_PROVIDES says netns, but: {reason}");
    }
    println!("SKIPPED qemu_daemons: {reason}");
}

/// QEMU run directories under `root` (one per QEMU process alive or not
/// yet cleaned up).
fn run_dirs(root: &std::path::Path) -> Vec<String> {
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(root.join("run"))
        .into_iter()
        .flatten()
        .flatten()
    {
        dirs.push(entry.file_name().to_string_lossy().into_owned());
    }
    dirs
}

/// QEMU processes alive whose run directory is under `root` (a killed
/// daemon leaves its VMs' directories behind, not their processes).
fn run_dirs_alive(root: &std::path::Path) -> usize {
    let root = root.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.starts_with("qemu-system") && cmdline.contains(&root)
        })
        .count()
}

/// The end of every daemon's log, for a failure's message.
fn logs(rig: &PathRig) -> String {
    (0..rig.d.nodes())
        .map(|i| {
            let log = rig.d.log(i);
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            format!("--- node-{} log, last lines:\n{tail}", i + 1)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `ferry vm move` with node `from`'s config, run in its namespace.
fn cli_move(rig: &PathRig, from: usize, to: usize) -> (i32, String) {
    let (program, env) = ferry_program();
    let ns = rig.d.netns[from].clone().unwrap();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(program)
        .envs(env)
        .args([
            "vm",
            "move",
            VM,
            "--to",
            &format!("node-{}", to + 1),
            "--config",
        ])
        .arg(&rig.d.configs[from])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn a_linux_vm_moves_between_daemons_survives_a_dropped_network_and_a_dead_target() {
    let qemu_dir = TempDir::new("qemu-daemons-vms");
    if ferry::vmm::qemu::usable_or_skip(
        "a_linux_vm_moves_between_daemons_survives_a_dropped_network_and_a_dead_target",
        &qemu_dir.0.join("gate"),
    )
    .is_none()
    {
        return;
    }
    if let Some(reason) = cannot_run() {
        return skip_or_fail(&reason);
    }
    // The daemons inherit it: their QEMU run directories go where the
    // watcher looks.
    std::env::set_var("FERRY_QEMU_DIR", &qemu_dir.0);
    let watch = QemuWatch::start(&qemu_dir.0);
    let rig = PathRig::start_backend("qemu", 256, 0, 0, Some("qemu")).unwrap();
    assert_eq!(rig.owner(), 1);
    assert_eq!(run_dirs(&qemu_dir.0).len(), 1, "one QEMU for the VM");

    // 1. With the CLI, as a user would.
    let acked_before = rig.check_acks().unwrap();
    let begun = Instant::now();
    let (code, out) = cli_move(&rig, 0, 1);
    assert_eq!(code, 0, "{out}\n{}", logs(&rig));
    assert!(out.contains("now runs on node 2"), "{out}");
    assert_eq!(rig.owner(), 2);
    let took = begun.elapsed();
    chaos_support::daemons::wait_for("the source's QEMU gone", Duration::from_secs(10), || {
        (run_dirs(&qemu_dir.0).len() == 1).then_some(())
    });
    let acked = rig.check_acks().unwrap();
    assert!(acked > acked_before, "the client was answered");
    let m: Vec<MigrationView> = rig.d.get("/api/migrations").unwrap();
    let report = m.iter().rev().find_map(|m| m.report.clone()).unwrap();
    println!(
        "qemu_daemons: CLI move 1 -> 2 in {:.2} s (report: {:.0} ms, blackout {:.1} ms at the source)",
        took.as_secs_f64(),
        report.total_ms,
        report.blackout_ms
    );

    // 2. Network 1 dropped at the target while QEMU copies. An idle guest's
    // copy takes well under a second, so QEMU often pauses for its last state
    // while the dead path's chunks are still being found lost. Since the
    // byte stream hedges from the pause (every unacknowledged chunk on every
    // live path), 13 of 15 runs completed at the default limit (300 ms); the
    // other two aborted safely, in a debug build on a busy 2-core machine.
    // As in tests/netns_paths.rs, the limit is raised for this case, so the
    // test shows the move completing; the gap it cost is printed.
    rig.set_downtime_limit(3_000).unwrap();
    // A TCG guest booting on the target takes most of a core of this 2-core
    // machine; a lease renewal late by more than the default 3 s made the
    // target fence itself mid-move and drop the incoming copy. This case is
    // about a network, not failure detection: give the leases room.
    let patch = serde_json::json!({ "failure_detection_ms": 15_000 });
    rig.d
        .api(0, |c| {
            c.call::<serde_json::Value>("PATCH", "/api/settings", Some(&patch))
        })
        .unwrap();
    let dropped = rig
        .run_move(
            2,
            Some(Fault {
                node: 2,
                network: 1,
                all_networks: false,
                direction: Direction::Both,
                phase: Phase::Round0,
            }),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&rig)));
    println!(
        "qemu_daemons: move 2 -> 3 with network 1 dropped at the target ({}): {} in {:.2} s, longest client gap {:.0} ms",
        dropped.phase_at_fault.as_deref().unwrap_or("-"),
        dropped.outcome,
        dropped.took.as_secs_f64(),
        dropped.max_gap.as_secs_f64() * 1e3
    );
    assert_eq!(dropped.outcome, "completed", "{dropped:?}\n{}", logs(&rig));
    rig.set_downtime_limit(300).unwrap();
    assert!(
        dropped.phase_at_fault.is_some(),
        "the fault struck mid-move"
    );
    assert_eq!(rig.owner(), 3);

    // 3. The target daemon (node 2; the client talks to node 1) killed
    // mid-copy: the VM runs on at node 3. A cap keeps QEMU copying long
    // enough to be caught at it.
    let mut rig = rig;
    let patch = serde_json::json!({ "bandwidth_cap_bytes_per_sec": 8 << 20 });
    rig.d
        .api(2, |c| {
            c.call::<serde_json::Value>("PATCH", "/api/settings", Some(&patch))
        })
        .unwrap();
    let request = MoveVm {
        target: Some("node-2".into()),
        ..Default::default()
    };
    let moving: MoveStarted = rig
        .d
        .api(2, |c| c.post(&format!("/api/vms/{VM}/move"), &request))
        .unwrap();
    let path = format!("/api/migrations/{}", moving.migration);
    chaos_support::daemons::wait_for("the copy under way", Duration::from_secs(60), || {
        let m: MigrationView = rig.d.api(2, |c| c.get(&path).ok())?;
        m.progress
            .filter(|p| p.phase == "copying" && p.bytes_sent > 0)
            .map(|_| ())
    });
    rig.d.sigkill(1);
    let ended =
        chaos_support::daemons::wait_for("the move to end", Duration::from_secs(60), || {
            let m: MigrationView = rig.d.api(2, |c| c.get(&path).ok())?;
            (m.outcome != "active").then_some(m)
        });
    assert_eq!(ended.outcome, "aborted", "{ended:?}");
    let acked = rig.check_acks().unwrap();
    chaos_support::daemons::wait_for("an append after the abort", Duration::from_secs(30), || {
        (rig.check_acks().ok()? > acked).then_some(())
    });
    assert_eq!(rig.owner(), 3, "the VM runs on at its source");
    chaos_support::daemons::wait_for(
        "the dead target's QEMU gone with it",
        Duration::from_secs(10),
        || (run_dirs_alive(&qemu_dir.0) == 1).then_some(()),
    );
    let total = rig.check_acks().unwrap();
    println!(
        "qemu_daemons: target killed mid-copy: {} ({}); {total} appends acknowledged in order over the run",
        ended.outcome,
        ended.reason.as_deref().unwrap_or("-")
    );

    let watched = watch.stop();
    println!(
        "qemu_daemons: watcher: {} samples over {} QEMU processes, one running in {}",
        watched.samples, watched.processes, watched.one_running
    );
    assert!(
        watched.twice.is_empty(),
        "two copies ran: {:?}",
        watched.twice
    );
    assert!(watched.processes >= 4, "{watched:?}");
    assert!(watched.one_running > 100, "{watched:?}");
}
