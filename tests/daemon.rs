//! Three `ferry` daemons as separate processes, driven the way a user drives
//! them: `ferry cluster init`, `ferry node run`, then the CLI moves a VM and
//! drains a node, and the outcome is checked through the HTTP API. Also: a
//! second daemon on a data directory refuses to start, SIGTERM stops a
//! daemon cleanly, and a restarted daemon resumes its state.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry::views::{MigrationView, NodeView, StatusView, VmView};
use std::time::{Duration, Instant};

#[test]
fn three_daemons_move_a_vm_and_drain_a_node_through_the_cli() {
    let started = Instant::now();
    let dir = TempDir::new("daemons");
    let mut d = Daemons::init(&dir.0, 3, 41, 42);
    for i in 0..3 {
        d.spawn(i);
    }
    let (c1, c3) = (d.configs[0].clone(), d.configs[2].clone());
    let api = client(&c1);

    // The cluster forms: three voters, three nodes in the model.
    wait_for("three voters", Duration::from_secs(30), || {
        let s: StatusView = api.get("/api/status").ok()?;
        (s.voters.len() == 3 && s.nodes == 3).then_some(())
    });
    let r = cli(&c1, &["status"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("voters [1, 2, 3]"), "{}", r.stdout);

    // A second daemon on node 1's data directory refuses to start.
    let second = std::process::Command::new(FERRY)
        .args(["node", "run", "--config"])
        .arg(&c1)
        .output()
        .unwrap();
    assert_ne!(second.status.code(), Some(0));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("in use by another ferry daemon"), "{err}");

    // Two VMs on node 1, created through node 3 (a follower: forwarded).
    for (vm, mem, rate) in [("web-1", "96", "4000"), ("db-1", "64", "1000")] {
        let r = cli(
            &c3,
            &[
                "vm",
                "create",
                vm,
                "--node",
                "node-1",
                "--memory-mib",
                mem,
                "--dirty-pages-per-sec",
                rate,
            ],
        );
        assert_eq!(r.code, 0, "{r:?}");
    }
    let r = cli(&c1, &["vm", "append", "web-1", "before the move", "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let before: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();

    // A move under a 1 ms limit of its own cannot promise it (the policy
    // plans 10 ms for the device state alone): it gives up, web-1 stays.
    let r = cli(
        &c1,
        &[
            "vm",
            "move",
            "web-1",
            "--to",
            "node-2",
            "--downtime-limit-ms",
            "1",
        ],
    );
    assert_eq!(r.code, 1, "{r:?}");
    let vm: VmView = api.get("/api/vms/web-1").unwrap();
    assert_eq!((vm.owner, vm.state.as_str()), (1, "running"));

    // Move web-1 to node 2 through the CLI.
    let r = cli(&c1, &["vm", "move", "web-1", "--to", "node-2"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("now runs on node 2"), "{}", r.stdout);
    let vm: VmView = api.get("/api/vms/web-1").unwrap();
    assert_eq!((vm.owner, vm.state.as_str()), (2, "running"));
    // The guest's service kept its log across the move.
    let r = cli(&c3, &["vm", "append", "web-1", "after the move", "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let after: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(after["node"], 2);
    assert_eq!(
        after["seq"].as_u64().unwrap(),
        before["seq"].as_u64().unwrap() + 1
    );
    let ms: Vec<MigrationView> = api.get("/api/migrations").unwrap();
    let m = ms
        .iter()
        .filter(|m| m.vm == "web-1")
        .max_by_key(|m| m.id)
        .unwrap();
    assert_eq!(m.outcome, "completed");
    let report = m.report.as_ref().expect("the move's report reached node 1");
    println!(
        "measured: web-1 (96 MiB) moved in {:.0} ms, {} rounds, {:.1} ms blackout",
        report.total_ms, report.rounds, report.blackout_ms
    );

    // Moving to an unknown node fails with the documented exit code.
    let r = cli(&c1, &["vm", "move", "web-1", "--to", "node-9"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("unknown_node"), "{}", r.stderr);

    // Drain node 1 through the CLI, under a limit of the drain's own (asked
    // of node 1 through node 3): db-1 leaves, node 1 is paused and drained.
    let r = cli(
        &c3,
        &[
            "node",
            "pause",
            "node-1",
            "--drain",
            "--downtime-limit-ms",
            "200",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("drained"), "{}", r.stdout);
    let n1: NodeView = api.get("/api/nodes/node-1").unwrap();
    assert_eq!(
        (n1.state.as_str(), n1.drain.as_str()),
        ("paused", "drained")
    );
    let vms: Vec<VmView> = api.get("/api/vms").unwrap();
    assert!(
        vms.iter().all(|v| v.owner != 1 && v.state == "running"),
        "{vms:?}"
    );
    let ms: Vec<MigrationView> = api.get("/api/migrations").unwrap();
    assert!(ms
        .iter()
        .any(|m| m.vm == "db-1" && m.trigger == "drain" && m.outcome == "completed"));
    // Nothing lands on a paused node.
    let r = cli(&c1, &["vm", "move", "web-1", "--to", "node-1", "--json"]);
    assert_eq!(r.code, 4, "{r:?}");
    let e: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(e["code"], "target_paused");

    // SIGTERM stops node 3 cleanly; restarted on its data directory it
    // rejoins with the cluster's state.
    let db_owner = vms.iter().find(|v| v.name == "db-1").unwrap().owner;
    let t = Instant::now();
    assert_eq!(d.terminate(2), Some(0), "{}", d.log(2));
    println!("node 3 stopped on SIGTERM in {:.0?}", t.elapsed());
    assert!(d.log(2).contains("ferry node node-3 stopped"));
    d.spawn(2);
    let api3 = client(&c3);
    let vms3: Vec<VmView> = wait_for("node 3 back", Duration::from_secs(30), || {
        api3.get::<Vec<VmView>>("/api/vms")
            .ok()
            .filter(|v| v.len() == 2)
    });
    let db = vms3.iter().find(|v| v.name == "db-1").unwrap();
    if db_owner == 3 {
        // It ran on node 3, which moved it away live before it stopped
        // (node 1 is in maintenance, so node 2 took it), and said so.
        let report: ferry::node::ShutdownReport = serde_json::from_slice(
            &std::fs::read(ferry::node::report_path(
                &ferry::config::NodeConfig::load(&c3).unwrap().data_dir,
            ))
            .unwrap(),
        )
        .unwrap();
        assert!(
            report.moved.iter().any(|m| m.vm == "db-1" && m.to == 2),
            "{report:?}"
        );
        assert_eq!(db.owner, 2, "{db:?}");
    }
    assert_eq!(db.state, "running", "{db:?}");
    let r = cli(&c3, &["node", "resume", "node-1", "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let n1: NodeView = api.get("/api/nodes/node-1").unwrap();
    assert_eq!(n1.state, "up");
    println!("three-daemon test took {:.1?}", started.elapsed());
}

#[test]
fn node_stop_sends_sigterm_and_prints_the_daemons_report() {
    let dir = TempDir::new("node-stop");
    let mut d = Daemons::init(&dir.0, 1, 47, 49);
    let c1 = d.configs[0].clone();

    // Nothing ran on the data directory yet: no pid file.
    let r = cli(&c1, &["node", "stop"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("no pid file"), "{}", r.stderr);

    d.spawn(0);
    let api = client(&c1);
    wait_for("the node up", Duration::from_secs(30), || {
        let s: StatusView = api.get("/api/status").ok()?;
        (s.nodes_up == 1).then_some(())
    });
    let r = cli(&c1, &["vm", "create", "web-1", "--memory-mib", "16"]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = cli(&c1, &["status"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("lease"), "{}", r.stdout);

    // A one-node cluster has nowhere to move web-1: it stops with the node.
    let t = Instant::now();
    let r = cli(&c1, &["node", "stop", "--json"]);
    assert_eq!(r.code, 0, "{r:?}\n{}", d.log(0));
    let report: ferry::node::ShutdownReport = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report.node, "node-1");
    assert!(
        report.moved.is_empty() && report.stopped.iter().any(|s| s.vm == "web-1"),
        "{report:?}"
    );
    println!(
        "ferry node stop took {:.1?}: {}",
        t.elapsed(),
        report.lines().join("; ")
    );
    // The daemon exited 0 (the CLI saw it gone, so this does not wait).
    assert_eq!(d.terminate(0), Some(0), "{}", d.log(0));

    // Stopped already: not running, and the old report is not shown again.
    let r = cli(&c1, &["node", "stop"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("not running"), "{}", r.stderr);
}
