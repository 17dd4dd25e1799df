//! Commit latency and throughput of the cluster store: three nodes in one process, Raft over
//! real QUIC with mutual TLS on 127.1.0.{1,2,3}, each node's log fsynced in its own data
//! directory.
//!
//! `cargo run --release -p ferry-cluster --example raft_bench [-- --commands 10000 --clients 64]`
//!
//! Phases: sequential writes on the leader (one at a time: pure commit latency), sequential
//! writes on a follower (forwarded to the leader), then many concurrent clients (throughput,
//! group commit). The last line sums the figures up as `key=value` pairs.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_cluster::command::Command;
use ferry_cluster::model::Settings;
use ferry_cluster::{ClusterNode, ClusterNodeConfig, ClusterTransport};
use ferry_transport::{ClusterCa, NetworkConfig, RpcNode};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time this process used so far (user + system), from /proc (Linux); 0 elsewhere.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses): utime is the 14th field.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // `rest` starts at field 3 (state); utime is field 14, stime 15.
    (ticks(11) + ticks(12)) / 100.0
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn command(i: usize) -> Command {
    Command::UpdateSettings {
        settings: Settings {
            downtime_limit_ms: 100 + (i % 1000) as u32,
            ..Settings::default()
        },
    }
}

/// The disk's own fsync latency in the data directory, for context.
fn fsync_ms(dir: &std::path::Path) -> f64 {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).unwrap();
    let mut times = Vec::new();
    for _ in 0..30 {
        f.write_all(&[7u8; 4096]).unwrap();
        let t = Instant::now();
        f.sync_data().unwrap();
        times.push(t.elapsed());
    }
    let _ = std::fs::remove_file(path);
    times.sort();
    quantile(&times, 0.5)
}

async fn sequential(node: &ClusterNode, n: usize, offset: usize) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        node.write(command(offset + i)).await.unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();
    lat
}

#[tokio::main]
async fn main() {
    let commands = arg("--commands", 10_000);
    let clients = arg("--clients", 64);
    let sequential_n = arg("--sequential", 1000);
    // 3: clients spread over all nodes (2 of 3 forward to the leader); 1: all on the leader.
    let spread = arg("--spread", 3).clamp(1, 3);

    let dir = std::env::temp_dir().join(format!("ferry-raft-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fsync = fsync_ms(&dir);

    let ca = ClusterCa::generate("ferry-bench").unwrap();
    let mut nodes = Vec::new();
    let mut addrs = Vec::new();
    for id in 1..=3u64 {
        let rpc = RpcNode::start(
            ca.issue(id).unwrap(),
            vec![format!("127.1.0.{id}:0").parse().unwrap()],
            NetworkConfig::loopback(),
        )
        .await
        .unwrap();
        let advertise = rpc.local_addrs();
        addrs.push(advertise.clone());
        let transport: Arc<dyn ClusterTransport> = rpc;
        let cfg = ClusterNodeConfig::new(id, dir.join(format!("node{id}")), transport, advertise);
        nodes.push(ClusterNode::start(cfg).await.unwrap());
    }
    nodes[0].initialize().await.unwrap();
    nodes[0].add_voter(2, addrs[1].clone()).await.unwrap();
    nodes[0].add_voter(3, addrs[2].clone()).await.unwrap();
    let leader = nodes[0].clone();
    let follower = nodes[1].clone();
    assert_eq!(leader.leader(), Some(1));

    // Warm up connections and caches.
    sequential(&leader, 200, 0).await;
    sequential(&follower, 50, 0).await;

    let on_leader = sequential(&leader, sequential_n, 1).await;
    let on_follower = sequential(&follower, sequential_n / 2, 2).await;

    let t0 = Instant::now();
    let cpu0 = cpu_seconds();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let node = nodes[c % spread].clone();
        let share = commands / clients + usize::from(c < commands % clients);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(share);
            for i in 0..share {
                let t = Instant::now();
                node.write(command(c * 7 + i)).await.unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut loaded = Vec::with_capacity(commands);
    for t in tasks {
        loaded.extend(t.await.unwrap());
    }
    let elapsed = t0.elapsed();
    let cpu = (cpu_seconds() - cpu0) / elapsed.as_secs_f64();
    loaded.sort();
    let per_sec = commands as f64 / elapsed.as_secs_f64();

    // Every replica applied the same number of commands.
    let want = leader.read_linearizable().await.unwrap();
    for n in &nodes {
        let got = n.read_linearizable().await.unwrap();
        assert_eq!(*got, *want);
    }

    println!("raft_bench: 3 nodes, QUIC + mutual TLS on loopback, fsync per commit");
    println!("  disk fsync p50:             {fsync:.2} ms");
    println!(
        "  sequential on leader:       p50 {:.2} ms  p99 {:.2} ms  ({} writes)",
        quantile(&on_leader, 0.5),
        quantile(&on_leader, 0.99),
        on_leader.len()
    );
    println!(
        "  sequential via follower:    p50 {:.2} ms  p99 {:.2} ms  ({} writes)",
        quantile(&on_follower, 0.5),
        quantile(&on_follower, 0.99),
        on_follower.len()
    );
    println!(
        "  {clients} concurrent clients on {spread} node(s): {per_sec:.0} commands/s, p50 {:.2} ms  p99 {:.2} ms  ({commands} writes in {:.2} s, {cpu:.2} CPUs busy)",
        quantile(&loaded, 0.5),
        quantile(&loaded, 0.99),
        elapsed.as_secs_f64()
    );

    for n in &nodes {
        n.shutdown().await.unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "nodes=3 transport=quic fsync_p50_ms={fsync:.2} leader_p50_ms={:.2} leader_p99_ms={:.2} follower_p50_ms={:.2} follower_p99_ms={:.2} clients={clients} spread={spread} commands={commands} cmds_per_sec={per_sec:.0} cpus_busy={cpu:.2} loaded_p50_ms={:.2} loaded_p99_ms={:.2}",
        quantile(&on_leader, 0.5),
        quantile(&on_leader, 0.99),
        quantile(&on_follower, 0.5),
        quantile(&on_follower, 0.99),
        quantile(&loaded, 0.5),
        quantile(&loaded, 0.99),
    );
}
