//! Ferry's main job, run locally: three nodes in one process over real QUIC
//! and Raft, two private migration networks on loopback, simulated guests with
//! workloads, a client appending to each guest's service through the virtual
//! switch, and live migrations between the nodes — one of them with a
//! migration network's link cut mid-copy — then a node drained for
//! maintenance. Every figure printed is measured in this run.
//!
//! `cargo run --release --example local_cluster`

use ferry::actors::actors::DrainNode;
use ferry::actors::local::{run, Client, LocalCluster, MIB};
use ferry::actors::migration::source::MoveRequest;
use ferry::actors::triggers::drain::{self, DrainOptions};
use ferry::vmm::{Pattern, Workload};
use ferry_chaos::proxy::LinkProxy;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    run(async {
        let cluster = LocalCluster::start("example", 3)
            .await
            .map_err(anyhow::Error::msg)?;
        println!(
            "3 nodes up; networks mig-1 (127.1.0.0/16) and mig-2 (127.2.0.0/16), both private."
        );
        let vms = [
            ("web-1", 1u64, 2u64, 512 * MIB, 20_000u64),
            ("db-1", 2, 3, 256 * MIB, 5_000),
            ("cache-1", 3, 1, 256 * MIB, 60_000),
        ];
        for (i, (name, node, _, memory, rate)) in vms.iter().enumerate() {
            let workload = Workload {
                dirty_pages_per_sec: Some(*rate),
                pattern: Pattern::HotSet {
                    write_percent: 80,
                    page_percent: 10,
                },
                seed: i as u64 + 1,
            };
            cluster
                .start_vm(name, *node, *memory, workload, i as u8 + 1)
                .await
                .map_err(anyhow::Error::msg)?;
            println!(
                "started {name} on node-{node}: {} MiB, dirtying {rate} pages/s",
                memory / MIB
            );
        }
        println!();
        println!(
            "{:<8} {:>6} {:>7} {:>9} {:>10} {:>10} {:>14} {:>16}",
            "vm",
            "move",
            "rounds",
            "MiB sent",
            "total",
            "blackout",
            "client refused",
            "acked appends"
        );
        for (name, from, to, _, _) in vms {
            let client = Client::start(cluster.switch.clone(), name);
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let mut request = MoveRequest::new(name, to);
            request.verify = true;
            let outcome = cluster.move_vm(request, from).await;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let log = client.stop();
            let owner = match &outcome {
                Ok(_) => to,
                Err(_) => from,
            };
            // Acknowledged appends found in the service log of whichever node runs the VM.
            let records: std::collections::HashSet<u64> = cluster
                .node(owner)
                .shared
                .guest(name)
                .and_then(|g| g.service_records().ok())
                .map(|r| r.into_iter().map(|(seq, _)| seq).collect())
                .unwrap_or_default();
            let present = log.acked.iter().filter(|seq| records.contains(seq)).count();
            match outcome {
                Ok(report) => println!(
                    "{:<8} {:>6} {:>7} {:>9} {:>10.1?} {:>10.1?} {:>14.1?} {:>7} of {:<6}",
                    name,
                    format!("{from}->{to}"),
                    report.rounds.len(),
                    report.bytes / MIB,
                    report.total,
                    report.blackout,
                    log.longest_refusal,
                    present,
                    log.acked.len()
                ),
                Err(e) => println!("{name:<8} {from}->{to} did not complete: {e}"),
            }
        }
        println!("\nblackout includes verifying memory digests on both sides (verify is on).");

        cut_a_link_mid_migration(&cluster).await?;
        drain_a_node(&cluster).await?;
        Ok(())
    })?
}

/// The page stream to node 2 goes through one link proxy per migration
/// network; mig-1's link is cut once it has carried 32 MiB of cache-1's copy,
/// and the move finishes over mig-2 alone.
async fn cut_a_link_mid_migration(cluster: &LocalCluster) -> anyhow::Result<()> {
    let (vm, from, to) = ("cache-1", 1u64, 2u64);
    let mut proxies = Vec::new();
    for (k, addr) in cluster.node(to).rpc.local_addrs().into_iter().enumerate() {
        let listen = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, k as u8 + 1, 0, 200)), 0);
        let proxy = LinkProxy::start(listen, addr, k as u64 + 1).await?;
        cluster
            .directory
            .redirect(to, &format!("mig-{}", k + 1), Some(proxy.local_addr()));
        proxies.push(proxy);
    }
    let client = Client::start(cluster.switch.clone(), vm);
    let mut request = MoveRequest::new(vm, to);
    request.verify = true;
    let cut_after = 32 * MIB;
    let moving = cluster.move_vm(request, from);
    tokio::pin!(moving);
    let mut cut_at = None;
    let outcome = loop {
        tokio::select! {
            outcome = &mut moving => break outcome,
            _ = tokio::time::sleep(Duration::from_millis(2)), if cut_at.is_none() => {
                let carried = proxies[0].stats().forwarded_bytes;
                if carried >= cut_after {
                    proxies[0].cut();
                    cut_at = Some(carried);
                }
            }
        }
    };
    let log = client.stop();
    let owner = if outcome.is_ok() { to } else { from };
    let records: std::collections::HashSet<u64> = cluster
        .node(owner)
        .shared
        .guest(vm)
        .and_then(|g| g.service_records().ok())
        .map(|r| r.into_iter().map(|(seq, _)| seq).collect())
        .unwrap_or_default();
    let present = log.acked.iter().filter(|seq| records.contains(seq)).count();
    println!();
    match (outcome, cut_at) {
        (Ok(report), Some(carried)) => println!(
            "{vm} {from}->{to}, mig-1 cut after carrying {} MiB: {} rounds, {} MiB sent, {:.1?} total, \
             {:.1?} blackout; mig-1 carried {} MiB in all, mig-2 {} MiB; client: {} of {} acked appends \
             present after, longest refusal {:.1?}",
            carried / MIB,
            report.rounds.len(),
            report.bytes / MIB,
            report.total,
            report.blackout,
            proxies[0].stats().forwarded_bytes / MIB,
            proxies[1].stats().forwarded_bytes / MIB,
            present,
            log.acked.len(),
            log.longest_refusal
        ),
        (Ok(report), None) => println!(
            "{vm} {from}->{to} completed before mig-1 carried {} MiB (no cut): {:.1?} total",
            cut_after / MIB,
            report.total
        ),
        (Err(e), _) => println!("{vm} {from}->{to} with mig-1 cut did not complete: {e}"),
    }
    for k in 0..proxies.len() {
        cluster
            .directory
            .redirect(to, &format!("mig-{}", k + 1), None);
    }
    Ok(())
}

/// Node 2 enters maintenance with drain: every VM it runs moves off by live
/// migration, each to the node placement picks.
async fn drain_a_node(cluster: &LocalCluster) -> anyhow::Result<()> {
    let node = 2u64;
    let t = Instant::now();
    let mut progress = cluster
        .node(node)
        .actor
        .send(DrainNode(DrainOptions::default()))
        .await?
        .map_err(anyhow::Error::msg)?;
    let report = drain::wait(&mut progress, Duration::from_secs(120))
        .await
        .map_err(anyhow::Error::msg)?;
    println!(
        "\nnode-{node} drained for maintenance in {:.1?}: {:?}",
        t.elapsed(),
        report.outcome
    );
    for (vm, how) in &report.vms {
        println!("  {vm}: {how:?}");
    }
    Ok(())
}
