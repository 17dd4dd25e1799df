//! Live-migration benchmark: guests of 256 MiB and 1 GiB filled with
//! incompressible data, at dirty rates of 0, 16 and 128 MiB/s, moved between
//! two nodes of a local cluster (real QUIC with TLS, real Raft). Total time is
//! also given as a ratio to the ideal: memory size divided by the raw
//! single-path page-stream throughput measured in the same run, and the
//! progress events of round 0 are counted per second of it (at least 4
//! promised). Last, the cluster's bandwidth cap: a 1 GiB idle guest moved
//! under a cap of 100 MiB/s, its round 0's rate given as a ratio to the cap.
//!
//! `cargo run --release --example migration_bench`
#![allow(clippy::unwrap_used)]

use ferry::actors::local::{run, LocalCluster, MIB};
use ferry::actors::migration::source::{MoveRequest, Phase};
use ferry::transport::{ClusterCa, NetworkConfig, PageSink, RpcNode, PAGE_SIZE};
use ferry::vmm::{Pattern, Workload};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A sink that takes pages and throws them away: the baseline measures the
/// stream, not a guest.
struct Discard;

impl PageSink for Discard {
    fn apply(&self, _first: u64, _count: u32, _data: Option<&[u8]>) -> Result<(), String> {
        Ok(())
    }
}

/// Raw page-stream throughput over one path (bytes/s), 1 GiB of
/// incompressible pages between two transport nodes.
async fn raw_single_path() -> f64 {
    let ca = ClusterCa::generate("bench").unwrap();
    let addr = |n: u8| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 1, 0, 200 + n)), 0);
    let a = RpcNode::start(
        ca.issue(1).unwrap(),
        vec![addr(1)],
        NetworkConfig::loopback(),
    )
    .await
    .unwrap();
    let b = RpcNode::start(
        ca.issue(2).unwrap(),
        vec![addr(2)],
        NetworkConfig::loopback(),
    )
    .await
    .unwrap();
    let receiver = b.accept_page_stream(1, 1, Arc::new(Discard)).unwrap();
    let sender = a.open_page_stream(2, &b.local_addrs(), 1).await.unwrap();
    let run_pages = 64usize;
    let mut chunk = vec![0u8; run_pages * PAGE_SIZE];
    let mut x = 0x1234_5678_9abc_def0u64;
    for w in chunk.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    let total_pages = (1u64 << 30) / PAGE_SIZE as u64;
    let started = Instant::now();
    let mut first = 0;
    while first < total_pages {
        sender.send(0, first, &chunk).await.unwrap();
        first += run_pages as u64;
    }
    sender.barrier(0).await.unwrap();
    let elapsed = started.elapsed();
    sender.finish().await.unwrap();
    receiver.wait().await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
    (1u64 << 30) as f64 / elapsed.as_secs_f64()
}

struct Row {
    memory_mib: u64,
    rate_mib: u64,
    total: Duration,
    blackout: Duration,
    rounds: usize,
    bytes: u64,
    ratio: f64,
    /// Progress events of round 0 per second of round 0.
    progress_per_s: f64,
}

fn main() {
    let rows = run(async {
        let raw = raw_single_path().await;
        println!("raw single-path page stream (TLS): {:.0} MiB/s", raw / MIB as f64);
        let mut rows = Vec::new();
        for memory_mib in [256u64, 1024] {
            for rate_mib in [0u64, 16, 128] {
                let cluster = LocalCluster::start(&format!("bench-{memory_mib}-{rate_mib}"), 2).await.unwrap();
                let workload = Workload {
                    dirty_pages_per_sec: Some(rate_mib * MIB / PAGE_SIZE as u64),
                    pattern: Pattern::Uniform,
                    seed: 42,
                };
                cluster.start_vm("bench", 1, memory_mib * MIB, workload, 1).await.unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
                let mut events = cluster.node(1).shared.events.subscribe();
                let report = cluster.move_vm(MoveRequest::new("bench", 2), 1).await.unwrap();
                let mut round_0 = 0u32;
                while let Ok(p) = events.try_recv() {
                    round_0 += u32::from(p.phase == Phase::Copying && p.round == 0);
                }
                let ideal = (memory_mib * MIB) as f64 / raw;
                let row = Row {
                    memory_mib,
                    rate_mib,
                    total: report.total,
                    blackout: report.blackout,
                    rounds: report.rounds.len(),
                    bytes: report.bytes,
                    ratio: report.total.as_secs_f64() / ideal,
                    progress_per_s: f64::from(round_0) / report.rounds[0].elapsed.as_secs_f64(),
                };
                println!(
                    "{:>5} MiB at {:>3} MiB/s dirty: total {:>8.1?} ({:.2}x ideal), blackout {:>7.1?}, {} rounds, {} MiB sent, {:.0} MiB/s, {:.1} progress events/s in round 0",
                    row.memory_mib,
                    row.rate_mib,
                    row.total,
                    row.ratio,
                    row.blackout,
                    row.rounds,
                    row.bytes / MIB,
                    row.bytes as f64 / MIB as f64 / row.total.as_secs_f64(),
                    row.progress_per_s
                );
                rows.push(row);
                for node in &cluster.nodes {
                    node.shared.kill().await;
                }
            }
        }
        let capped = capped_rate(CAP).await;
        println!(
            " 1024 MiB idle under a {} MiB/s cap: round 0 at {:.1} MiB/s ({:.3}x the cap)",
            CAP / MIB,
            capped / MIB as f64,
            capped / CAP as f64
        );
        (raw, rows, capped)
    })
    .unwrap();
    let (raw, rows, capped) = rows;
    let mut summary = format!("summary: raw_single_path_mib_s={:.0}", raw / MIB as f64);
    for r in &rows {
        let key = format!("{}mib_{}mibps", r.memory_mib, r.rate_mib);
        summary.push_str(&format!(
            " total_ms_{key}={:.0} ratio_{key}={:.2} blackout_ms_{key}={:.1} rounds_{key}={} progress_per_s_round0_{key}={:.1}",
            r.total.as_secs_f64() * 1e3,
            r.ratio,
            r.blackout.as_secs_f64() * 1e3,
            r.rounds,
            r.progress_per_s
        ));
    }
    summary.push_str(&format!(
        " capped_mib_s={:.1} cap_mib_s={} capped_ratio={:.3}",
        capped / MIB as f64,
        CAP / MIB,
        capped / CAP as f64
    ));
    println!("{summary}");
}

/// The bandwidth cap of the capped move.
const CAP: u64 = 100 * MIB;

/// Round 0's rate (bytes/s) of a 1 GiB idle guest moved under the cluster's
/// bandwidth cap `cap`.
async fn capped_rate(cap: u64) -> f64 {
    let cluster = LocalCluster::start("bench-capped", 2).await.unwrap();
    let settings = ferry::cluster::model::Settings {
        bandwidth_cap_bytes_per_sec: Some(cap),
        ..Default::default()
    };
    cluster
        .write(ferry::cluster::Command::UpdateSettings { settings })
        .await
        .unwrap();
    let workload = Workload {
        dirty_pages_per_sec: Some(0),
        pattern: Pattern::Uniform,
        seed: 42,
    };
    cluster
        .start_vm("bench", 1, 1024 * MIB, workload, 1)
        .await
        .unwrap();
    let report = cluster
        .move_vm(MoveRequest::new("bench", 2), 1)
        .await
        .unwrap();
    for node in &cluster.nodes {
        node.shared.kill().await;
    }
    let r0 = &report.rounds[0];
    r0.bytes as f64 / r0.elapsed.as_secs_f64()
}
