//! Node processes killed with SIGKILL: three `ferry node run` daemons on
//! loopback; a VM is moved and one of its two nodes is killed mid-migration
//! (the source, then the target) and right after the switchover commit (the
//! source, then the target); the killed daemon restarts on its data
//! directory. Through the daemons' API and the store's state, and through an
//! observer that asks every node directly whether it runs the VM:
//! - never two running copies, and no acknowledged append lost: every
//!   acknowledgement the observer gets carries a higher sequence number than
//!   the one before (two copies, or a copy missing a record, would hand out
//!   a number again);
//! - no VM lost: it runs on exactly its owner, or — its node having died
//!   with it — the cluster starts it again by itself (a cold start, whose
//!   service begins a new sequence);
//! - every migration ends (completed or aborted), none stays active.
#![allow(clippy::unwrap_used)]

mod chaos_support;

use chaos_support::daemons::{free_ports, wait_for, Daemons, Observer, TempDir};
use ferry::requests::{CreateVm, MoveVm};
use ferry::views::{MigrationView, MoveStarted, VmView};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Victim {
    Source,
    Target,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum When {
    /// While the copy rounds run.
    MidCopy,
    /// As soon as the store shows the switchover committed.
    AfterSwitchover,
}

#[test]
fn sigkill_mid_migration_and_right_after_switchover_keeps_the_invariants() {
    let started = Instant::now();
    let dir = TempDir::new("chaos-process");
    let port = 7400 + (std::process::id() % 500) as u16;
    let api = free_ports(3, 77);
    let mut d = Daemons::init(
        &dir.0,
        3,
        &[("mig-1", "127.75.0.0/16"), ("mig-2", "127.76.0.0/16")],
        port,
        api,
        vec![None, None, None],
    );
    for i in 0..3 {
        d.spawn(i);
    }
    for i in 0..3 {
        d.wait_ready(i, Duration::from_secs(60));
    }
    let observer = Observer::start(
        &d,
        vec![
            "127.75.0.250:0".parse().unwrap(),
            "127.76.0.250:0".parse().unwrap(),
        ],
        None,
    );

    let cases = [
        (Victim::Target, When::MidCopy, 1, 2),
        (Victim::Source, When::MidCopy, 2, 3),
        (Victim::Source, When::AfterSwitchover, 3, 1),
        (Victim::Target, When::AfterSwitchover, 1, 3),
    ];
    for (k, (victim, when, source, target)) in cases.into_iter().enumerate() {
        let vm = format!("vm-{k}");
        let t0 = Instant::now();
        // Busy enough that the copy takes several rounds.
        let mut create = CreateVm::new(&vm);
        create.node = Some(source.to_string());
        create.memory_mib = 128;
        create.dirty_pages_per_sec = 20_000;
        let created: VmView = d.api(0, |c| c.post("/api/vms", &create)).unwrap();
        assert_eq!(created.owner, source);
        observer.watch(&vm);
        wait_for(
            "the observer's first acknowledgement",
            Duration::from_secs(20),
            || (!observer.seen(&vm).acks.is_empty()).then_some(()),
        );

        let request = MoveVm {
            target: Some(target.to_string()),
            verify: true,
            ..Default::default()
        };
        let moving: MoveStarted = d
            .api(source as usize - 1, |c| {
                c.post(&format!("/api/vms/{vm}/move"), &request)
            })
            .unwrap();
        let id = moving.migration;
        let at: MigrationView = wait_for("the moment to kill", Duration::from_secs(60), || {
            let m = d.migration(id)?;
            let due = match when {
                When::MidCopy => m.phase == "copying" || m.outcome != "active",
                When::AfterSwitchover => m.outcome != "active",
            };
            due.then_some(m)
        });
        let victim_node = match victim {
            Victim::Source => source,
            Victim::Target => target,
        };
        let i = victim_node as usize - 1;
        // The node that owns the VM at the kill takes the guest with it: the
        // cluster restarts the VM (a cold start, whose service begins a new
        // sequence). Any other kill leaves the VM running where it was.
        let owner_at_kill = match when {
            When::MidCopy => source,
            When::AfterSwitchover => target,
        };
        let restarted = victim_node == owner_at_kill;
        let killed_at = Instant::now();
        observer.node_down(victim_node, true);
        d.sigkill(i);
        if restarted {
            observer.new_life(&vm);
        }
        // While it is dead, the survivors decide what they can.
        let survivor_view: Option<MigrationView> = d.migration(id);
        let acks_at_restart = observer.seen(&vm).acks.len();
        d.spawn(i);
        d.wait_ready(i, Duration::from_secs(60));
        observer.node_down(victim_node, false);
        let ended: MigrationView =
            wait_for("the migration to end", Duration::from_secs(60), || {
                d.migration(id).filter(|m| m.outcome != "active")
            });
        // A VM whose node died with it is restarted by the cluster (the
        // failure detector, or the restarted node reporting it lost);
        // otherwise it runs on its owner. Wait for the owner's
        // acknowledgements either way.
        let deadline = Instant::now() + Duration::from_secs(40);
        let vm_view: VmView = loop {
            let v: VmView = d.vm(&vm).unwrap();
            // Acknowledged by the owner since the killed node came back.
            let fresh = observer.seen(&vm).acks[acks_at_restart..]
                .iter()
                .any(|(node, _)| *node == v.owner);
            if v.state == "running" && fresh {
                break v;
            }
            assert!(
                Instant::now() < deadline,
                "{vm} does not run on its owner: {v:?}; observer {:?}\nnode {} log:\n{}",
                observer.seen(&vm).last_on,
                v.owner,
                d.log(v.owner as usize - 1)
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let owner = vm_view.owner;
        let acks_before = observer.seen(&vm).acks.len();
        let deadline = Instant::now() + Duration::from_secs(20);
        while observer.seen(&vm).acks.len() <= acks_before + 20 {
            assert!(
                Instant::now() < deadline,
                "{vm} stopped answering on node {owner} (restarted: {restarted}): {vm_view:?}, now {:?}; observer {:?} acks {:?}\nnode {owner} log:\n{}",
                d.vm(&vm),
                observer.seen(&vm).last_on,
                observer.seen(&vm).acks.iter().rev().take(5).collect::<Vec<_>>(),
                d.log(owner as usize - 1)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let on = observer.running_on(&vm, Duration::from_millis(200));
        assert_eq!(on, vec![owner], "{vm} runs on {on:?}; its owner is {owner}");
        let seen = observer.seen(&vm);
        observer.unwatch(&vm);
        assert!(seen.violations.is_empty(), "{:?}", seen.violations);
        match (when, victim) {
            // Killed before the switchover: aborted.
            (When::MidCopy, _) => assert_eq!(ended.outcome, "aborted", "{ended:?}"),
            // The commit came first: completed, and the VM is the target's.
            (When::AfterSwitchover, victim) => {
                assert_eq!(at.outcome, "completed", "{at:?}");
                if victim == Victim::Source {
                    assert_eq!(owner, target);
                }
            }
        }
        if victim == Victim::Target && when == When::MidCopy {
            assert!(!restarted, "the source kept running it");
            assert_eq!(owner, source);
        }
        println!(
            "process chaos: {vm} {source}->{target}, SIGKILL of the {victim:?} (node {victim_node}) {when:?} (phase {} round {:?}): migration {} ({}), survivors said {:?}; VM {} on node {owner} at epoch {}; {} acknowledgements, sequence always growing; {:.1} s (restart {:.1} s)",
            at.phase,
            at.round,
            ended.outcome,
            ended.reason.clone().unwrap_or_default(),
            survivor_view.map(|m| m.outcome),
            if restarted { "restarted" } else { "kept running" },
            vm_view.epoch,
            seen.acks.len(),
            t0.elapsed().as_secs_f64(),
            killed_at.elapsed().as_secs_f64(),
        );
    }
    // Nothing is left in flight.
    let all: Vec<MigrationView> = d.get("/api/migrations").unwrap();
    assert!(
        all.iter().all(|m| m.outcome != "active"),
        "{:?}",
        all.iter()
            .filter(|m| m.outcome == "active")
            .collect::<Vec<_>>()
    );
    println!(
        "process chaos: 4 SIGKILLs, {} migrations, all ended; {:.1} s",
        all.len(),
        started.elapsed().as_secs_f64()
    );
}
