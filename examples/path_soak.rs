//! The path soak: many moves between three `ferry` daemons in network namespaces,
//! each with one network of the source or the target dropped by a packet filter (in,
//! out or both) at a random phase of the move, while a client appends to the VM's
//! service through node 1's API. Every move must complete on the other network with
//! the client never waiting more than 1 s. Then both networks dropped at the target
//! in the blackout (the move must abort and the VM answer on the source within 3 s),
//! and the Raft leader's first network dropped (the next write must commit within
//! 1 s). No acknowledged append may be lost.
//!
//!     cargo run --release --example path_soak -- [--runs 100] [--seed 1]
//!         [--memory-mib 1024] [--dirty-pages-per-sec 20000] [--verify]
//!
//! Moves are made as a user makes them, without `verify` (see `--verify`).
//!
//! Needs root, `ip`, `tc` and `nft` (package nftables). The last two lines are
//! `path soak: N passed, M failed` and the figures as `key=value`. The example is
//! its own `ferry` (cargo builds no binary for an example): with
//! `FERRY_EXAMPLE_AS_FERRY=1` it is exactly the `ferry` command line.
#![allow(clippy::unwrap_used)]

#[path = "../tests/chaos_support/mod.rs"]
mod chaos_support;

use chaos_support::netns::{cannot_run, Direction};
use chaos_support::paths::{Fault, PathRig, Phase, NODES};
use clap::Parser;
use std::time::Duration;

#[derive(Parser)]
struct Args {
    /// Moves with one network dropped.
    #[arg(long, default_value_t = 100)]
    runs: u32,
    /// Seed of the random phases, directions, networks and nodes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 1024)]
    memory_mib: u64,
    #[arg(long, default_value_t = 20_000)]
    dirty_pages_per_sec: u64,
    /// Compare memory digests in every blackout, as the test suite does. Off by
    /// default, as a user's move is: the hashes of the whole guest on both sides
    /// lengthen each blackout (the append log's check still proves what moved).
    #[arg(long)]
    verify: bool,
}

/// splitmix64: a seeded choice, the same for the same seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e3)
}

const GAP_LIMIT: Duration = Duration::from_secs(1);
const ABORT_LIMIT: Duration = Duration::from_secs(3);
const WRITE_LIMIT: Duration = Duration::from_secs(1);

fn main() -> std::process::ExitCode {
    if std::env::var_os("FERRY_EXAMPLE_AS_FERRY").is_some() {
        return ferry::cli::run(ferry::cli::Cli::parse());
    }
    let args = Args::parse();
    if let Some(reason) = cannot_run() {
        eprintln!("path soak cannot run here: {reason}");
        return std::process::ExitCode::from(2);
    }
    let mut rig = match PathRig::start("soak", args.memory_mib, args.dirty_pages_per_sec, 1) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("path soak: cannot start the cluster: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    rig.verify = args.verify;
    let mut rng = Rng(args.seed);
    let (mut passed, mut failed) = (0u32, 0u32);
    let mut gaps = Vec::new();
    let mut moves = Vec::new();
    let mut completed = 0u32;
    for run in 1..=args.runs {
        let owner = rig.owner() as usize - 1;
        let to = (owner + 1 + rng.below(NODES as u64 - 1) as usize) % NODES;
        let fault = Fault {
            node: if rng.below(2) == 0 { to } else { owner },
            network: 1 + rng.below(2) as usize,
            all_networks: false,
            direction: Direction::ALL[rng.below(3) as usize],
            phase: Phase::ALL[rng.below(Phase::ALL.len() as u64) as usize],
        };
        let r = match rig.run_move(to, Some(fault)) {
            Ok(r) => r,
            Err(e) => {
                println!("run {run}: {e}");
                failed += 1;
                continue;
            }
        };
        let ok = r.outcome == "completed" && r.max_gap <= GAP_LIMIT;
        completed += u32::from(r.outcome == "completed");
        println!(
            "run {run}: node-{} -> node-{}, mig-{} {} at node-{} in {} (struck at {}): {} in {:.2} s, longest client gap {} ms{}{}",
            owner + 1,
            to + 1,
            fault.network,
            fault.direction.name(),
            fault.node + 1,
            fault.phase.name(),
            r.phase_at_fault.as_deref().unwrap_or("-"),
            r.outcome,
            r.took.as_secs_f64(),
            ms(r.max_gap),
            r.reason.as_ref().map_or(String::new(), |x| format!(" ({x})")),
            if ok { "" } else { "  FAILED" }
        );
        gaps.push(r.max_gap);
        moves.push(r.took);
        if ok {
            passed += 1;
        } else {
            failed += 1;
        }
    }

    // Both networks dropped at the target in the blackout.
    let mut aborts = Vec::new();
    for i in 0..3 {
        let owner = rig.owner() as usize - 1;
        let to = (owner + 1) % NODES;
        let fault = Fault {
            node: to,
            network: 1,
            all_networks: true,
            direction: Direction::Both,
            phase: Phase::Blackout,
        };
        let outcome = rig.run_move(to, Some(fault));
        let ok = match &outcome {
            Ok(r) => {
                let answered = r.answered_after_fault.unwrap_or(Duration::MAX);
                aborts.push(answered);
                println!(
                    "both networks dropped at node-{} in the blackout ({i}): {} ({}), VM answered on node-{} {} ms after the drop",
                    to + 1,
                    r.outcome,
                    r.reason.as_deref().unwrap_or(""),
                    r.owner,
                    ms(answered)
                );
                r.outcome == "aborted" && r.owner as usize == owner + 1 && answered <= ABORT_LIMIT
            }
            Err(e) => {
                println!("both networks dropped: {e}");
                false
            }
        };
        if ok {
            passed += 1;
        } else {
            failed += 1;
        }
    }

    // The Raft leader's first network.
    let mut writes = Vec::new();
    for i in 0..3u32 {
        let Some(leader) = rig.leader() else {
            println!("no leader known");
            failed += 1;
            continue;
        };
        let leader = leader as usize - 1;
        let follower = (leader + 1) % NODES;
        if let Err(e) = rig.wait_store_healed(follower) {
            println!("the store did not heal: {e}");
            failed += 1;
            continue;
        }
        let blocked = rig.topo.block(leader, 1, Direction::Both);
        let took = blocked.and_then(|_| rig.timed_write(follower, 2 + i));
        let _ = rig.topo.unblock(leader);
        match took {
            Ok(took) => {
                println!(
                    "leader node-{} lost mig-1: a write through node-{} committed in {} ms",
                    leader + 1,
                    follower + 1,
                    ms(took)
                );
                writes.push(took);
                if took <= WRITE_LIMIT {
                    passed += 1;
                } else {
                    failed += 1;
                }
            }
            Err(e) => {
                println!("leader write: {e}");
                failed += 1;
            }
        }
    }

    let acked = match rig.check_acks() {
        Ok(n) => n,
        Err(e) => {
            println!("{e}");
            failed += 1;
            0
        }
    };
    gaps.sort();
    moves.sort();
    println!("path soak: {passed} passed, {failed} failed");
    println!(
        "runs={} verify={} completed={completed} gap_p50_ms={} gap_p99_ms={} gap_max_ms={} move_p50_s={:.2} move_max_s={:.2} both_dropped_answer_max_ms={} leader_write_max_ms={} acked_appends={acked}",
        args.runs,
        args.verify,
        ms(percentile(&gaps, 0.5)),
        ms(percentile(&gaps, 0.99)),
        ms(gaps.last().copied().unwrap_or_default()),
        percentile(&moves, 0.5).as_secs_f64(),
        moves.last().copied().unwrap_or_default().as_secs_f64(),
        ms(aborts.iter().max().copied().unwrap_or_default()),
        ms(writes.iter().max().copied().unwrap_or_default()),
    );
    if failed == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
