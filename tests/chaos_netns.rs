//! Real links: three `ferry node run` daemons, each in its own network
//! namespace, attached by veth pairs to two bridges (one per migration
//! network) that live in a namespace of their own. A VM moves from node 1 to
//! node 2; mid round 0 the target's link on the first network is taken down
//! with `ip link set … down`, and the move carries on over the second
//! network, shaped with `tc` (netem where the kernel has it, else a token
//! bucket). The test prints the stall the link kill caused, measured from
//! the target's interface counters.
//!
//! Needs root and `ip`/`tc` (iproute2); without them it prints
//! `SKIPPED netns: <reason>` and returns. Everything it creates — the
//! namespaces and with them every veth and bridge — is named after this
//! process and removed when the test ends, also when it fails. Addresses
//! (10.201.K.i) exist only inside those namespaces.
#![allow(clippy::unwrap_used)]

mod chaos_support;

use chaos_support::daemons::{in_netns, wait_for, Daemons, TempDir};
use chaos_support::netns::{cannot_run, ip, run, rx_bytes_here, Topology};
use ferry::requests::{Append, CreateVm, MoveVm};
use ferry::views::{MigrationView, MoveStarted, VmView};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NODES: usize = 3;
const NETWORKS: usize = 2;

/// When, and the bytes received so far per network.
type Sample = (Instant, Vec<u64>);

/// Shapes `dev` in `ns`: netem (delay and a little loss) if the kernel has
/// it, else a token-bucket rate limit. Says which.
fn shape(ns: &str, dev: &str) -> String {
    match run(
        "tc",
        &[
            "-n", ns, "qdisc", "add", "dev", dev, "root", "netem", "delay", "1ms", "loss", "0.1%",
        ],
    ) {
        Ok(_) => format!("tc netem delay 1ms loss 0.1% on {dev}"),
        Err(netem) => match run(
            "tc",
            &[
                "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", "2gbit", "burst",
                "1mb", "latency", "50ms",
            ],
        ) {
            Ok(_) => {
                format!("tc tbf rate 2gbit on {dev} (netem unavailable on this kernel: {netem})")
            }
            Err(tbf) => format!("not shaped ({netem}; {tbf})"),
        },
    }
}

#[test]
fn a_link_killed_mid_migration_the_move_continues_on_the_other_network() {
    if let Some(reason) = cannot_run() {
        println!("SKIPPED netns: {reason}");
        return;
    }
    let topo = match Topology::build("link", NODES, NETWORKS) {
        Ok(t) => t,
        Err(e) => {
            println!("SKIPPED netns: cannot build network namespaces: {e}");
            return;
        }
    };
    let started = Instant::now();
    let dir = TempDir::new("chaos-netns");
    let mut d = Daemons::init(
        &dir.0,
        NODES as u64,
        &[("mig-1", "10.201.1.0/24"), ("mig-2", "10.201.2.0/24")],
        7400,
        7701,
        topo.nodes.iter().cloned().map(Some).collect(),
    );
    for i in 0..NODES {
        d.spawn(i);
    }
    for i in 0..NODES {
        d.wait_ready(i, Duration::from_secs(60));
    }
    let target_ns = topo.nodes[1].clone();
    let shaped = shape(&target_ns, "eth2");

    let mut create = CreateVm::new("web");
    create.node = Some("node-1".into());
    create.memory_mib = 256;
    create.dirty_pages_per_sec = 5_000;
    create.pattern = Some("hot_set".into());
    let _: VmView = d.api(0, |c| c.post("/api/vms", &create)).unwrap();
    let append = |d: &Daemons| -> u64 {
        let v: serde_json::Value = d
            .api(0, |c| {
                c.post(
                    "/api/vms/web/append",
                    &Append {
                        record: "chaos".into(),
                    },
                )
            })
            .unwrap();
        v["seq"].as_u64().unwrap()
    };
    let before = append(&d);

    // The target's interface counters, every 2 ms, from inside its namespace.
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (samples, stop, ns) = (samples.clone(), stop.clone(), target_ns.clone());
        std::thread::spawn(move || {
            in_netns(&ns, || {
                while !stop.load(Ordering::Acquire) {
                    let rx = rx_bytes_here(NETWORKS);
                    samples.lock().unwrap().push((Instant::now(), rx));
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        })
    };

    let request = MoveVm {
        target: Some("node-2".into()),
        verify: true,
        ..Default::default()
    };
    let move_at = Instant::now();
    let moving: MoveStarted = d.api(0, |c| c.post("/api/vms/web/move", &request)).unwrap();
    // Mid round 0: some 32 MiB have reached the target over the first network.
    let at_start = samples
        .lock()
        .unwrap()
        .last()
        .map(|s| s.1.clone())
        .unwrap_or(vec![0; NETWORKS]);
    wait_for(
        "round 0 under way on mig-1",
        Duration::from_secs(60),
        || {
            let last = samples.lock().unwrap().last().map(|s| s.1.clone())?;
            (last[0] > at_start[0] + (32 << 20)).then_some(())
        },
    );
    let killed = Instant::now();
    ip(&["-n", &target_ns, "link", "set", "eth1", "down"]).unwrap();
    let at_kill = samples.lock().unwrap().last().map(|s| s.1.clone()).unwrap();

    let ended: MigrationView = wait_for("the migration to end", Duration::from_secs(120), || {
        d.migration(moving.migration)
            .filter(|m| m.outcome != "active")
    });
    let done = killed.elapsed();
    stop.store(true, Ordering::Release);
    sampler.join().unwrap();
    let after = append(&d);
    let vm: VmView = d.vm("web").unwrap();

    // The stall: the first stretch after the kill in which (almost) nothing
    // reached the target, among those that begin while round 0 still had
    // most of the guest to send — so the blackout at the end of the copy (two
    // digests of 256 MiB) is not mistaken for it. Also: when the next 4 MiB
    // had arrived, and the longest quiet stretch of the whole move.
    let samples = samples.lock().unwrap().clone();
    let at_start_total: u64 = at_start.iter().sum();
    let after_kill: Vec<(Instant, u64)> = samples
        .iter()
        .filter(|(t, _)| *t >= killed)
        .map(|(t, rx)| (*t, rx.iter().sum()))
        .collect();
    let mut stretches: Vec<(Instant, Duration, u64)> = Vec::new();
    let mut flat_since: Option<(Instant, u64)> = None;
    for &(t, total) in &after_kill {
        match flat_since {
            Some((since, base)) if total < base + (64 << 10) => {
                let quiet = t.duration_since(since);
                match stretches.last_mut() {
                    Some(last) if last.0 == since => last.1 = quiet,
                    _ => stretches.push((since, quiet, base - at_start_total)),
                }
            }
            _ => flat_since = Some((t, total)),
        }
    }
    let round0 = 3 * (256u64 << 20) / 4;
    let stall = stretches
        .iter()
        .find(|(_, quiet, moved)| *quiet >= Duration::from_millis(10) && *moved < round0)
        .map(|(since, quiet, _)| (since.duration_since(killed), *quiet));
    let longest = stretches.iter().map(|s| s.1).max().unwrap_or_default();
    let base: u64 = at_kill.iter().sum();
    let next_4mib = after_kill
        .iter()
        .find(|(_, total)| *total >= base + (4 << 20))
        .map(|(t, _)| t.duration_since(killed));
    let last = samples.last().map(|s| s.1.clone()).unwrap();
    let over_mig2 = last[1].saturating_sub(at_kill[1]);
    let over_mig1 = last[0].saturating_sub(at_kill[0]);

    println!(
        "netns: {} namespaces, 2 bridges; mig-2 shaped with {shaped}; web (256 MiB) node 1 -> node 2: target's mig-1 link killed {:.0} MiB into the move ({:.2} s after it began), migration {} {:.2} s after the kill ({} {}); after the kill {:.0} MiB arrived over mig-2 and {} B over mig-1; stall after the link kill: {}; the next 4 MiB arrived {:.0} ms after the kill; longest quiet stretch of the move {:.0} ms (the blackout's digests included); appends {before} -> {after}; {:.1} s",
        NODES + 1,
        (at_kill[0] - at_start[0]) as f64 / (1 << 20) as f64,
        (killed - move_at).as_secs_f64(),
        ended.outcome,
        done.as_secs_f64(),
        ended.phase,
        ended.reason.clone().unwrap_or_default(),
        over_mig2 as f64 / (1 << 20) as f64,
        over_mig1,
        match stall {
            Some((after, quiet)) => format!(
                "{:.0} ms with < 64 KiB arriving, from {:.0} ms after the kill",
                quiet.as_secs_f64() * 1e3,
                after.as_secs_f64() * 1e3
            ),
            None => "none (no quiet stretch of 10 ms or more in round 0)".into(),
        },
        next_4mib.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
        longest.as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        ended.outcome,
        "completed",
        "the move must survive one link: {ended:?}\n{}",
        d.log(0)
    );
    assert_eq!((vm.owner, vm.state.as_str()), (2, "running"));
    assert!(over_mig2 > 1 << 20, "the rest went over mig-2");
    assert!(after > before, "the service continued its log");
    drop(d);
    drop(topo);
}
