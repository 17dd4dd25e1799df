//! A KVM guest with two vCPUs, created and moved between three `ferry`
//! daemons with the CLI, as a user would: node 1 → node 2 → node 3. Its
//! service keeps its log across both moves (every acknowledged append is
//! there, the sequence continues), and each move completes with a report.
//!
//! Skips, and says why, where this host has no usable KVM — unless
//! `FERRY_CI_PROVIDES` names `kvm`, where that is a failure
//! (`ferry::vmm::kvm::usable_or_skip`).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry::views::{MigrationView, StatusView, VmView};
use std::time::Duration;

/// Appends `text` to `vm`'s service through node `config`'s CLI; returns the
/// acknowledged sequence number and the node that served it. A refusal the
/// service calls temporary (a node whose lease with the cluster is late on a
/// loaded machine fences its guests until it renews) is tried again, as a
/// client would, for a while; a refused append is not acknowledged, so the
/// sequence checks below still hold.
fn append(config: &std::path::Path, vm: &str, text: &str) -> (u64, u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let r = loop {
        let r = cli(config, &["vm", "append", vm, text, "--json"]);
        if r.code == 0
            || !r.stdout.contains("service_unavailable")
            || std::time::Instant::now() > deadline
        {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(r.code, 0, "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    (v["seq"].as_u64().unwrap(), v["node"].as_u64().unwrap())
}

#[test]
fn a_kvm_guest_with_two_vcpus_moves_between_three_daemons_with_the_cli() {
    if ferry::vmm::kvm::usable_or_skip(
        "a_kvm_guest_with_two_vcpus_moves_between_three_daemons_with_the_cli",
    )
    .is_none()
    {
        return;
    }
    let dir = TempDir::new("kvm-daemons");
    let mut d = Daemons::init(&dir.0, 3, 51, 52);
    for i in 0..3 {
        d.spawn(i);
    }
    let configs = d.configs.clone();
    let api = client(&configs[0]);
    wait_for("three voters", Duration::from_secs(30), || {
        let s: StatusView = api.get("/api/status").ok()?;
        (s.voters.len() == 3 && s.nodes == 3).then_some(())
    });
    // As a user would: every node joined and up, with its lease.
    let r = cli(&configs[0], &["status", "--wait"]);
    assert_eq!(r.code, 0, "{r:?}");

    let r = cli(
        &configs[0],
        &[
            "vm",
            "create",
            "kvm-1",
            "--node",
            "node-1",
            "--backend",
            "kvm",
            "--vcpus",
            "2",
            "--memory-mib",
            "64",
            "--dirty-pages-per-sec",
            "5000",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}\n{}", d.log(0));
    let vm: VmView = api.get("/api/vms/kvm-1").unwrap();
    assert_eq!(
        (vm.owner, vm.state.as_str(), vm.vcpus),
        (1, "running", 2),
        "{vm:?}"
    );

    let mut acked = vec![append(&configs[2], "kvm-1", "on node 1")];
    assert_eq!(acked[0].1, 1);
    for (to, at) in [(2u64, 1usize), (3, 2)] {
        let r = cli(
            &configs[at],
            &["vm", "move", "kvm-1", "--to", &format!("node-{to}")],
        );
        assert_eq!(r.code, 0, "{r:?}\n{}", d.log(to as usize - 2));
        assert!(
            r.stdout.contains(&format!("now runs on node {to}")),
            "{}",
            r.stdout
        );
        let vm: VmView = api.get("/api/vms/kvm-1").unwrap();
        assert_eq!((vm.owner, vm.state.as_str()), (to, "running"), "{vm:?}");
        // The service continues its sequence where the source left it: no
        // acknowledged append is lost, none is numbered twice.
        let (seq, node) = append(&configs[0], "kvm-1", &format!("on node {to}"));
        assert_eq!(node, to);
        assert_eq!(
            seq,
            acked.last().unwrap().0 + 1,
            "after the move to node {to}"
        );
        acked.push((seq, node));

        let ms: Vec<MigrationView> = api.get("/api/migrations").unwrap();
        let m = ms
            .iter()
            .filter(|m| m.vm == "kvm-1")
            .max_by_key(|m| m.id)
            .unwrap();
        assert_eq!((m.outcome.as_str(), m.target), ("completed", to), "{m:?}");
        let report = wait_for("the move's report", Duration::from_secs(10), || {
            let ms: Vec<MigrationView> = api.get("/api/migrations").ok()?;
            ms.into_iter().find(|x| x.id == m.id)?.report
        });
        println!(
            "measured: kvm-1 (64 MiB, 2 vCPUs) to node {to} in {:.0} ms, {} rounds, {:.1} ms blackout",
            report.total_ms, report.rounds, report.blackout_ms
        );
    }
    let vm: VmView = api.get("/api/vms/kvm-1").unwrap();
    assert_eq!((vm.owner, vm.vcpus), (3, 2), "{vm:?}");
}
