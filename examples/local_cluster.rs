//! Ferry's main job, run locally. Until the cluster engine lands this runs the
//! in-process live copy of a simulated guest and prints what it measured.
//!
//! `cargo run --release --example local_cluster`

fn main() -> anyhow::Result<()> {
    let config = ferry::demo::DemoConfig { memory_mib: 512, vcpus: 2, dirty_pages_per_sec: 20_000 };
    println!(
        "Live copy of a {} MiB simulated guest ({} vCPUs dirtying {} pages/s) with a client appending throughout:\n",
        config.memory_mib, config.vcpus, config.dirty_pages_per_sec
    );
    let outcome = ferry::demo::run(&config)?;
    println!("{outcome}");
    anyhow::ensure!(outcome.present == outcome.acked, "acknowledged appends were lost");
    Ok(())
}
