//! Ferry's main job, run locally: three nodes in one process over real QUIC
//! and Raft, two private migration networks on loopback, simulated guests with
//! workloads, a client appending to each guest's service through the virtual
//! switch, and live migrations between the nodes. Every figure printed is
//! measured in this run.
//!
//! `cargo run --release --example local_cluster`

use ferry::actors::job::MoveRequest;
use ferry::actors::local::{run, Client, LocalCluster, MIB};
use ferry::vmm::{Pattern, Workload};

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
        Ok(())
    })?
}
