//! One network failing from outside Ferry, at several phases of a move between
//! daemons: a packet filter in the target's (once, the source's) namespace drops
//! everything it receives, sends, or both, on one migration network (`chaos_support::paths`). Every move must
//! complete on the other network with the client's appends continuing; both networks
//! dropped at the target must abort the move with the VM answering on the source and
//! no acknowledged append lost; the Raft leader losing its first network must not stall
//! the store. The bounds here are loose (debug build, shared 2-core machine); the
//! release soak (`cargo run --release --example path_soak`) checks the tight ones.
//!
//! Needs root, `ip`, `tc` and `nft`. Without them it says `SKIPPED` and returns,
//! unless `FERRY_CI_PROVIDES` names `netns` (CI provides namespaces), where it fails.
#![allow(clippy::unwrap_used)]

mod chaos_support;

use chaos_support::netns::{cannot_run, Direction};
use chaos_support::paths::{Fault, MoveRun, PathRig, Phase};
use std::time::Duration;

/// Fails in CI (which promises namespaces), skips elsewhere.
fn skip_or_fail(reason: &str) {
    let provided = std::env::var("FERRY_CI_PROVIDES").unwrap_or_default();
    if provided.split(',').any(|p| p.trim() == "netns") {
        panic!("FERRY_CI_PROVIDES says netns, but: {reason}");
    }
    println!("SKIPPED netns_paths: {reason}");
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn show(case: &str, r: &MoveRun) {
    println!(
        "netns_paths: {case}: {} in {:.2} s (fault at {}), longest client gap {:.0} ms, answered {} after the fault{}",
        r.outcome,
        r.took.as_secs_f64(),
        r.phase_at_fault.as_deref().unwrap_or("-"),
        r.max_gap.as_secs_f64() * 1e3,
        r.answered_after_fault
            .map_or("-".into(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3)),
        r.reason
            .as_ref()
            .map_or(String::new(), |r| format!(" ({r})"))
    );
}

/// Where a case drops its network.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Side {
    Source,
    Target,
}

#[test]
fn one_network_dropped_at_any_phase_the_move_completes_on_the_other() {
    if let Some(reason) = cannot_run() {
        return skip_or_fail(&reason);
    }
    let rig = PathRig::start("paths", 256, 5_000, 1).unwrap();
    // A debug build's blackout (two digests of 256 MiB) takes most of a second
    // alone; the blackout budget is this limit + 1 s. The release soak keeps the
    // default limit.
    rig.set_downtime_limit(1_000).unwrap();
    let other = |owner: u64| if owner == 2 { 2 } else { 1 };

    // One network at the target, each direction, in round 0 and in the blackout;
    // and the source's sending side in the blackout, where the target's packets still
    // arrive (so only unacknowledged requests show the path is dead).
    let cases = [
        (Phase::Round0, Direction::In, 1, Side::Target),
        (Phase::Round0, Direction::Out, 2, Side::Target),
        (Phase::Blackout, Direction::Both, 1, Side::Target),
        (Phase::Blackout, Direction::Out, 1, Side::Source),
        (Phase::Switchover, Direction::Both, 2, Side::Target),
    ];
    for (phase, direction, network, side) in cases {
        let from = rig.owner() as usize - 1;
        let to = other(rig.owner());
        let fault = Fault {
            node: if side == Side::Source { from } else { to },
            network,
            all_networks: false,
            direction,
            phase,
        };
        let r = rig.run_move(to, Some(fault)).unwrap();
        let case = format!(
            "mig-{network} {} at the {side:?} in {}",
            direction.name(),
            phase.name()
        );
        show(&case, &r);
        assert_eq!(
            r.outcome,
            "completed",
            "{case}: {r:?}\nsource's log:\n{}",
            tail(&rig.d.log(from), 80)
        );
        assert_eq!(r.owner, to as u64 + 1, "{case}");
        assert!(
            r.max_gap < Duration::from_secs(5),
            "{case}: {r:?}\nsource's log:\n{}\ntarget's log:\n{}\nnode-1's log:\n{}",
            tail(&rig.d.log(from), 80),
            tail(&rig.d.log(to), 80),
            tail(&rig.d.log(0), 60)
        );
    }

    // Both networks at the target during the blackout: the move aborts and the VM
    // answers on the source again.
    let from = rig.owner();
    let to = other(from);
    let fault = Fault {
        node: to,
        network: 1,
        all_networks: true,
        direction: Direction::Both,
        phase: Phase::Blackout,
    };
    let r = rig.run_move(to, Some(fault)).unwrap();
    show("both networks dropped at the target, in the blackout", &r);
    assert_eq!(r.outcome, "aborted", "{r:?}");
    assert_eq!(r.owner, from, "the VM runs on its source");
    let answered = r.answered_after_fault.unwrap();
    assert!(answered < Duration::from_secs(10), "{answered:?}");

    // The Raft leader's first network: the next write still commits.
    let leader = rig.leader().unwrap() as usize - 1;
    let follower = (leader + 1) % 3;
    rig.wait_store_healed(follower).unwrap();
    rig.topo.block(leader, 1, Direction::Both).unwrap();
    let took = rig.timed_write(follower, 3).unwrap();
    rig.topo.unblock(leader).unwrap();
    println!(
        "netns_paths: leader node-{} lost mig-1; a write through node-{} committed in {:.0} ms",
        leader + 1,
        follower + 1,
        took.as_secs_f64() * 1e3
    );
    assert!(took < Duration::from_secs(5), "{took:?}");

    let acked = rig.check_acks().unwrap();
    println!("netns_paths: {acked} appends acknowledged, none lost");
}
