//! A failover cluster of three `ferry node run` daemons, judged from outside
//! them: the observer (a probe with its own certificate) asks every node
//! directly to append to each VM's service, and a node answers only for a
//! VM it runs. Nothing here writes to the store on the cluster's behalf: the
//! cluster notices deaths itself, at its default settings.
//!
//! - A daemon killed with SIGKILL: within 10 s each VM it ran answers on
//!   another node, and the store shows the node down with the reason; a VM
//!   that asked not to be restarted stays down and says so.
//! - A daemon stopped with SIGSTOP (the Raft leader, running a VM) for longer
//!   than the detection timeout, then continued: its VM runs elsewhere, and
//!   the continued process never answers for it again.
//! - SIGTERM: the node moves its VMs away live (no acknowledged append lost,
//!   the sequence keeps growing), then all daemons stop and start again, and
//!   every VM that was running runs again, once.
//!
//! Never twice, as the observer sees it: the nodes that acknowledged appends
//! to a VM, in the order the acknowledgements came, form one run per node —
//! a node that answers again after another node answered would be a second
//! running copy (a failover restart starts a new sequence, so the check is
//! by node, not by sequence number).
#![allow(clippy::unwrap_used)]

mod chaos_support;

use chaos_support::daemons::{free_ports, wait_for, Daemons, Observer, TempDir};
use ferry::requests::CreateVm;
use ferry::views::{NodeView, StatusView, VmView};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Starts three daemons on two networks of their own (`net` picks the
/// subnets, so the tests of this file can run at once) and an observer.
fn cluster(tag: &str, net: u8) -> (TempDir, Daemons, Observer) {
    let dir = TempDir::new(tag);
    let port = 7400 + (std::process::id() % 500) as u16;
    let api = free_ports(3, u16::from(net) << 8);
    let (a, b) = (
        format!("127.{net}.0.0/16"),
        format!("127.{}.0.0/16", net + 1),
    );
    let mut d = Daemons::init(
        &dir.0,
        3,
        &[("mig-1", a.as_str()), ("mig-2", b.as_str())],
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
    let listen: Vec<SocketAddr> = vec![
        format!("127.{net}.0.250:0").parse().unwrap(),
        format!("127.{}.0.250:0", net + 1).parse().unwrap(),
    ];
    let observer = Observer::start(&d, listen, None);
    (dir, d, observer)
}

fn create(d: &Daemons, name: &str, node: u64, restart: bool, priority: u32) -> VmView {
    let mut req = CreateVm::new(name);
    req.node = Some(node.to_string());
    req.memory_mib = 64;
    req.dirty_pages_per_sec = 2000;
    req.restart = restart;
    req.priority = priority;
    let vm: VmView = d.api(0, |c| c.post("/api/vms", &req)).unwrap();
    assert_eq!(vm.owner, node);
    vm
}

/// The nodes that acknowledged appends to `vm`, one entry per run, in order.
fn runs(observer: &Observer, vm: &str) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for (node, _) in observer.seen(vm).acks {
        if out.last() != Some(&node) {
            out.push(node);
        }
    }
    out
}

/// Never two copies: each node acknowledged in one run only.
fn assert_never_twice(observer: &Observer, vm: &str) {
    let runs = runs(observer, vm);
    let mut seen = std::collections::BTreeSet::new();
    for n in &runs {
        assert!(
            seen.insert(*n),
            "{vm} answered on node {n} again after another node had answered (runs {runs:?}): two running copies"
        );
    }
}

fn node_view(d: &Daemons, id: u64) -> Option<NodeView> {
    d.get::<Vec<NodeView>>("/api/nodes")?
        .into_iter()
        .find(|n| n.id == id)
}

/// Waits until `vm` answers the observer on a node other than `not_on`, and
/// the store agrees it runs there. Returns the node.
fn runs_elsewhere(
    d: &Daemons,
    observer: &Observer,
    vm: &str,
    not_on: u64,
    timeout: Duration,
) -> u64 {
    wait_for(
        &format!("{vm} answering away from node {not_on}"),
        timeout,
        || {
            let (node, _) = *observer.seen(vm).acks.last()?;
            let v = d.vm(vm)?;
            (node != not_on && v.owner == node && v.state == "running").then_some(node)
        },
    )
}

#[test]
fn a_killed_nodes_vms_run_again_elsewhere_within_ten_seconds() {
    let (_dir, mut d, observer) = cluster("failover-kill", 91);
    let victim = 3u64;
    let low = create(&d, "kill-low", victim, true, 0);
    let high = create(&d, "kill-high", victim, true, 100);
    create(&d, "kill-keep-off", victim, false, 0);
    for vm in ["kill-low", "kill-high"] {
        observer.watch(vm);
        wait_for("a first acknowledgement", Duration::from_secs(20), || {
            (!observer.seen(vm).acks.is_empty()).then_some(())
        });
    }
    let killed = Instant::now();
    d.sigkill(victim as usize - 1);
    let down: NodeView = wait_for("the node shown down", Duration::from_secs(10), || {
        node_view(&d, victim).filter(|n| n.state == "down")
    });
    let detected = killed.elapsed();
    let reason = down.down_reason.clone().unwrap_or_default();
    assert!(
        reason.contains("no lease renewal"),
        "down reason: {reason:?}"
    );
    let mut restarted = Vec::new();
    for (vm, before) in [("kill-high", &high), ("kill-low", &low)] {
        let left = Duration::from_secs(10).saturating_sub(killed.elapsed());
        let node = runs_elsewhere(&d, &observer, vm, victim, left);
        restarted.push((vm, node, killed.elapsed()));
        let v = d.vm(vm).unwrap();
        assert!(
            v.epoch > before.epoch,
            "{vm} restarted at a new epoch: {v:?}"
        );
    }
    assert!(killed.elapsed() < Duration::from_secs(10));
    // The killed process is gone: stop probing it (each probe would wait out
    // its timeout and slow the observer down).
    observer.node_down(victim, true);
    // Left off, by its own choice: it waits for a user, and says so.
    let off = d.vm("kill-keep-off").unwrap();
    assert_eq!(off.state, "needs_restart", "{off:?}");
    // Each ran once the whole time, and keeps running where it was restarted.
    std::thread::sleep(Duration::from_millis(500));
    for (vm, node, _) in &restarted {
        assert_never_twice(&observer, vm);
        assert_eq!(
            observer.running_on(vm, Duration::from_millis(300)),
            vec![*node]
        );
    }
    let status: StatusView = d.api(0, |c| c.get("/api/status")).unwrap();
    assert_eq!(status.nodes_up, 2, "{status:?}");
    println!(
        "failover: SIGKILL of node {victim}: detected (node down) after {} ms, reason {reason:?}; {}",
        detected.as_millis(),
        restarted
            .iter()
            .map(|(vm, node, at)| format!("{vm} runs on node {node} after {} ms", at.as_millis()))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

#[test]
fn a_paused_leader_is_fenced_and_never_runs_its_restarted_vm() {
    let (_dir, mut d, observer) = cluster("failover-stop", 93);
    let status: StatusView = d.api(0, |c| c.get("/api/status")).unwrap();
    let leader = status.leader.unwrap();
    let vm = "stop-vm";
    create(&d, vm, leader, true, 0);
    observer.watch(vm);
    wait_for("a first acknowledgement", Duration::from_secs(20), || {
        (!observer.seen(vm).acks.is_empty()).then_some(())
    });
    let i = leader as usize - 1;
    let stopped = Instant::now();
    d.signal(i, libc::SIGSTOP);
    // Longer than the detection timeout (3 s): the cluster restarts the VM.
    let node = runs_elsewhere(&d, &observer, vm, leader, Duration::from_secs(10));
    let restarted_after = stopped.elapsed();
    let down = node_view(&d, leader).unwrap();
    assert_eq!(down.state, "down", "{down:?}");
    d.signal(i, libc::SIGCONT);
    let continued = Instant::now();
    // The continued node learns it is down, drops its copy and comes back
    // up (as another node's replica says: its own is stale at first).
    let other = (i + 1) % 3;
    wait_for("the paused node back up", Duration::from_secs(20), || {
        let nodes: Vec<NodeView> = d.api(other, |c| c.get("/api/nodes").ok())?;
        let n = nodes.into_iter().find(|n| n.id == leader)?;
        (n.state == "up" && d.log(i).contains("declared down by the cluster")).then_some(())
    });
    // Keep watching for a while after it is back: it never answers for it.
    let acks_before = observer.seen(vm).acks.len();
    wait_for("more acknowledgements", Duration::from_secs(10), || {
        (observer.seen(vm).acks.len() > acks_before + 50).then_some(())
    });
    assert_never_twice(&observer, vm);
    assert_eq!(runs(&observer, vm), vec![leader, node]);
    assert!(
        !observer.seen(vm).last_on.contains_key(&leader)
            || observer.seen(vm).last_on[&leader] < continued,
        "the continued node answered for {vm}"
    );
    println!(
        "failover: SIGSTOP of the leader (node {leader}) running {vm}: restarted on node {node} after {} ms; after SIGCONT the node dropped its copy and rejoined; the observer saw runs {:?}",
        restarted_after.as_millis(),
        runs(&observer, vm)
    );
}

#[test]
fn sigterm_moves_vms_away_live_and_a_cold_start_runs_each_vm_once() {
    let (dir, mut d, observer) = cluster("failover-term", 95);
    let vms = ["term-a", "term-b", "term-c"];
    create(&d, "term-a", 1, true, 0);
    create(&d, "term-b", 1, true, 0);
    create(&d, "term-c", 2, true, 0);
    for vm in vms {
        observer.watch(vm);
        wait_for("a first acknowledgement", Duration::from_secs(20), || {
            (!observer.seen(vm).acks.is_empty()).then_some(())
        });
    }
    // SIGTERM of node 1: both its VMs move away live.
    let status = d.sigterm_and_wait(0, Duration::from_secs(120));
    assert!(status.success(), "node 1 exited with {status}");
    observer.node_down(1, true);
    let report: ferry::node::ShutdownReport = serde_json::from_slice(
        &std::fs::read(ferry::node::report_path(&d.loaded[0].data_dir)).unwrap(),
    )
    .unwrap();
    let moved: Vec<&str> = report.moved.iter().map(|m| m.vm.as_str()).collect();
    assert_eq!(moved, vec!["term-a", "term-b"], "{report:?}");
    assert!(
        report.stopped.is_empty() && report.marked_down,
        "{report:?}"
    );
    for vm in ["term-a", "term-b"] {
        runs_elsewhere(&d, &observer, vm, 1, Duration::from_secs(10));
        // A live move: the service's sequence went on, nothing acknowledged
        // was lost (the observer checks each acknowledgement is higher).
        let seen = observer.seen(vm);
        assert!(seen.violations.is_empty(), "{:?}", seen.violations);
        assert_never_twice(&observer, vm);
    }
    println!(
        "failover: SIGTERM of node 1 moved {moved:?} live; report: {}",
        report.lines().join("; ")
    );
    // Then the whole cluster stops, node by node, and starts again.
    let epochs: Vec<u64> = vms.iter().map(|vm| d.vm(vm).unwrap().epoch).collect();
    for i in [1usize, 2] {
        let status = d.sigterm_and_wait(i, Duration::from_secs(120));
        assert!(status.success(), "node {} exited with {status}", i + 1);
        observer.node_down(i as u64 + 1, true);
    }
    for vm in vms {
        observer.forget(vm);
    }
    let started = Instant::now();
    for i in 0..3 {
        d.spawn(i);
        observer.node_down(i as u64 + 1, false);
    }
    for i in 0..3 {
        d.wait_ready(i, Duration::from_secs(60));
    }
    for (vm, before) in vms.iter().zip(epochs) {
        let v: VmView = wait_for(
            &format!("{vm} running again"),
            Duration::from_secs(30),
            || {
                let v = d.vm(vm)?;
                let (node, _) = *observer.seen(vm).acks.last()?;
                (v.state == "running" && v.owner == node).then_some(v)
            },
        );
        assert!(v.epoch > before, "{vm} started again at a new epoch: {v:?}");
    }
    // Once each: one running copy, and no second start behind it.
    std::thread::sleep(Duration::from_millis(1000));
    for vm in vms {
        assert_never_twice(&observer, vm);
        let on = observer.running_on(vm, Duration::from_millis(300));
        assert_eq!(on.len(), 1, "{vm} answers on {on:?}");
        let v = d.vm(vm).unwrap();
        assert_eq!(on, vec![v.owner]);
    }
    println!(
        "failover: cluster cold start: {} VMs running again, once each, {} ms after the daemons started",
        vms.len(),
        started.elapsed().as_millis()
    );
    drop(dir);
}
