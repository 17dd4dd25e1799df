//! Ferry embedded in a larger control plane: three nodes started in this
//! process through the library (`ferry::Node`), driven with the same
//! operations the HTTP API offers — create VMs, move one, drain a node — and
//! the progress followed on the node's event stream. Every figure printed is
//! measured in this run.
//!
//! `cargo run --example embedded`

use ferry::config::{init_cluster, InitOptions, NodeConfig};
use ferry::events::Event;
use ferry::requests::{CreateVm, MoveVm, PauseNode};
use ferry::Node;
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("ferry-embedded-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut options = InitOptions::local(&dir, 3);
    options.networks = vec![
        ("mig-1".into(), "127.73.0.0/16".parse()?),
        ("mig-2".into(), "127.74.0.0/16".parse()?),
    ];
    let configs = init_cluster(&options)?
        .iter()
        .map(|p| NodeConfig::load(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let result = ferry::actors::local::run(run(configs));
    let _ = std::fs::remove_dir_all(&dir);
    result?
}

async fn run(configs: Vec<NodeConfig>) -> anyhow::Result<()> {
    let mut nodes = Vec::new();
    for config in configs {
        nodes.push(Node::start(config).await?);
    }
    for node in &nodes {
        node.wait_ready(Duration::from_secs(30)).await?;
    }
    let control = &nodes[0];
    println!(
        "3 nodes in this process; leader: node {:?}",
        control.status().leader
    );

    for (name, node, mib, rate) in [
        ("web-1", "node-1", 256, 20_000),
        ("db-1", "node-1", 128, 5_000),
    ] {
        let mut req = CreateVm::new(name);
        req.node = Some(node.into());
        req.memory_mib = mib;
        req.dirty_pages_per_sec = rate;
        let vm = control.create_vm(req).await?;
        println!(
            "{} runs on {} ({} MiB)",
            vm.name,
            vm.owner_name,
            vm.memory_bytes >> 20
        );
    }

    // Follow progress on the event stream while the move runs.
    let mut events = control.events();
    let follower = tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            if let Event::Progress(p) = event {
                println!(
                    "  migration {} {}: {} round {} — {:.0}% copied, {} pages dirty, {:.0} MB/s",
                    p.migration,
                    p.vm,
                    p.phase,
                    p.round,
                    p.percent,
                    p.remaining_pages,
                    p.bandwidth / 1e6
                );
            }
        }
    });
    let started = control
        .move_vm(
            "web-1",
            MoveVm {
                target: Some("node-2".into()),
                verify: true,
                ..Default::default()
            },
        )
        .await?;
    if let Some(e) = &started.estimate {
        println!(
            "moving web-1 to {}; estimate: {}",
            started.target_name, e.summary
        );
    }
    let done = control
        .wait_migration(started.migration, Duration::from_secs(120))
        .await?;
    match &done.report {
        Some(r) => println!(
            "web-1: {} in {:.0} ms, {} rounds, {:.1} MiB sent, {:.1} ms blackout (digests verified)",
            done.outcome,
            r.total_ms,
            r.rounds,
            r.bytes as f64 / (1u64 << 20) as f64,
            r.blackout_ms
        ),
        None => println!("web-1: {} {}", done.outcome, done.reason.unwrap_or_default()),
    }
    follower.abort();

    let t = Instant::now();
    control
        .pause_node(
            "node-1",
            PauseNode {
                drain: true,
                ..Default::default()
            },
        )
        .await?;
    let drained = loop {
        let n = control.node("node-1")?;
        if n.drain != "draining" {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("node-1 drain: {} in {:.0?}", drained.drain, t.elapsed());
    for vm in control.vms() {
        println!("  {} on {} ({})", vm.name, vm.owner_name, vm.state);
    }

    for node in &nodes {
        node.shutdown().await;
    }
    Ok(())
}
