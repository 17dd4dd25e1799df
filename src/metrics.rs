//! Prometheus metrics (text exposition format 0.0.4) of one node: the
//! cluster as its replica sees it, its Raft role, its transport, the
//! migrations it has seen reported, and its API.

use crate::node::Node;
use crate::views;
use ferry_cluster::model::MigrationOutcome;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;

fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

fn one(v: f64) -> Vec<(String, f64)> {
    vec![(String::new(), v)]
}

/// The metrics text of `node`.
pub fn render(node: &Node) -> String {
    let state = node.state();
    let raft = node.cluster().metrics();
    let rpc = node.shared().rpc.stats();
    let hub = node.hub().counters();
    let api = node.api_counters();
    let mut out = String::new();

    let mut by_state: BTreeMap<&str, f64> = ["up", "paused", "down"]
        .into_iter()
        .map(|s| (s, 0.0))
        .collect();
    for n in state.nodes.values() {
        *by_state.entry(views::node_state(n.state)).or_default() += 1.0;
    }
    metric(
        &mut out,
        "ferry_nodes",
        "gauge",
        "Cluster nodes by state.",
        &by_state
            .iter()
            .map(|(s, v)| (format!("state=\"{s}\""), *v))
            .collect::<Vec<_>>(),
    );
    let mut vms: BTreeMap<&str, f64> = ["off", "running", "migrating", "needs_restart"]
        .into_iter()
        .map(|s| (s, 0.0))
        .collect();
    for v in state.vms.values() {
        *vms.entry(views::vm_state(v.state)).or_default() += 1.0;
    }
    metric(
        &mut out,
        "ferry_vms",
        "gauge",
        "VMs by state.",
        &vms.iter()
            .map(|(s, v)| (format!("state=\"{s}\""), *v))
            .collect::<Vec<_>>(),
    );
    let (mut active, mut completed, mut aborted) = (0.0, 0.0, 0.0);
    for m in state.migrations.values() {
        match m.outcome {
            MigrationOutcome::Active => active += 1.0,
            MigrationOutcome::Completed => completed += 1.0,
            MigrationOutcome::Aborted { .. } => aborted += 1.0,
        }
    }
    metric(
        &mut out,
        "ferry_migrations",
        "gauge",
        "Migrations in the store's recent history, by outcome.",
        &[
            ("outcome=\"active\"".into(), active),
            ("outcome=\"completed\"".into(), completed),
            ("outcome=\"aborted\"".into(), aborted),
        ],
    );
    let owned = state.vms_on(node.id()).count() as f64;
    metric(
        &mut out,
        "ferry_node_vms",
        "gauge",
        "VMs this node owns.",
        &one(owned),
    );
    metric(
        &mut out,
        "ferry_raft_leader",
        "gauge",
        "1 if this node is the Raft leader.",
        &one(f64::from(u8::from(raft.current_leader == Some(node.id())))),
    );
    metric(
        &mut out,
        "ferry_raft_term",
        "gauge",
        "Current Raft term.",
        &one(raft.current_term as f64),
    );
    metric(
        &mut out,
        "ferry_raft_last_applied",
        "gauge",
        "Index of the last log entry applied here.",
        &one(raft.last_applied.map(|l| l.index).unwrap_or(0) as f64),
    );
    metric(
        &mut out,
        "ferry_transport_connections_accepted_total",
        "counter",
        "Peer connections accepted.",
        &one(rpc.connections_accepted as f64),
    );
    metric(
        &mut out,
        "ferry_transport_connections_refused_total",
        "counter",
        "Peer connections refused (failed handshake or hello).",
        &one(rpc.connections_refused as f64),
    );
    metric(
        &mut out,
        "ferry_transport_requests_served_total",
        "counter",
        "RPC requests served.",
        &one(rpc.requests_served as f64),
    );
    metric(
        &mut out,
        "ferry_migration_reports_total",
        "counter",
        "Completed migrations whose report this node received.",
        &one(hub.reports as f64),
    );
    metric(
        &mut out,
        "ferry_migration_bytes_total",
        "counter",
        "Bytes sent by the completed migrations reported here.",
        &one(hub.bytes_migrated as f64),
    );
    metric(
        &mut out,
        "ferry_migration_blackout_seconds_max",
        "gauge",
        "Longest blackout among the migrations reported here.",
        &one(hub.blackout_ms_max / 1e3),
    );
    metric(
        &mut out,
        "ferry_migration_blackout_seconds_sum",
        "counter",
        "Sum of the blackouts of the migrations reported here.",
        &one(hub.blackout_ms_total / 1e3),
    );
    metric(
        &mut out,
        "ferry_api_requests_total",
        "counter",
        "HTTP requests served by this node's API.",
        &one(api.requests.load(Ordering::Relaxed) as f64),
    );
    metric(
        &mut out,
        "ferry_api_errors_total",
        "counter",
        "HTTP requests answered with an error, by class.",
        &[
            (
                "class=\"4xx\"".into(),
                api.errors_4xx.load(Ordering::Relaxed) as f64,
            ),
            (
                "class=\"5xx\"".into(),
                api.errors_5xx.load(Ordering::Relaxed) as f64,
            ),
        ],
    );
    out
}
