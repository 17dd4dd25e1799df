//! Measures the simulated guest: dirty-log fetch-and-clear for 1 GiB, the
//! highest dirty rate the workload reaches, and pause latency.
//!
//! `cargo run --release -p ferry-vmm --example guest_bench`
#![allow(clippy::unwrap_used)]

use ferry_vmm::{DirtyBitmap, Guest, Pattern, SimGuest, SimGuestConfig, Workload};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median_fetch(
    guest: &SimGuest,
    bitmap: &mut DirtyBitmap,
    prepare: impl Fn(&SimGuest),
) -> Duration {
    let mut times: Vec<Duration> = (0..9)
        .map(|_| {
            prepare(guest);
            let t = Instant::now();
            guest.fetch_and_clear_dirty(bitmap).unwrap();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

fn main() {
    // 1. Dirty-log fetch-and-clear over 1 GiB (262 144 pages).
    let idle = SimGuest::boot(SimGuestConfig::new(GIB, Workload::idle())).unwrap();
    let pages = idle.page_count();
    let mut bitmap = DirtyBitmap::new(pages);
    let few = median_fetch(&idle, &mut bitmap, |g| {
        for i in 0..100 {
            g.guest_fill(i * (pages / 100), 1, i).unwrap();
        }
    });
    assert_eq!(bitmap.count(), 100);
    let all = median_fetch(&idle, &mut bitmap, |g| g.guest_fill(0, pages, 1).unwrap());
    assert_eq!(bitmap.count(), pages);
    println!("dirty log, 1 GiB: fetch-and-clear {few:?} with 100 pages dirty, {all:?} with all {pages} dirty");
    drop(idle);

    // 2. Highest dirty rate: vCPUs writing flat out for a second.
    let mut rates = Vec::new();
    for vcpus in [1u32, 2] {
        let mut config = SimGuestConfig::new(
            GIB,
            Workload {
                dirty_pages_per_sec: None,
                pattern: Pattern::Uniform,
                seed: 9,
            },
        );
        config.vcpus = vcpus;
        let guest = SimGuest::boot(config).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let (w0, t0) = (guest.writes(), Instant::now());
        std::thread::sleep(Duration::from_secs(1));
        let rate = (guest.writes() - w0) as f64 / t0.elapsed().as_secs_f64();
        println!(
            "dirty rate, {vcpus} vCPU(s) flat out: {:.2} M pages/s",
            rate / 1e6
        );
        rates.push(rate);
    }

    // 3. Pause latency with two vCPUs writing flat out.
    let mut config = SimGuestConfig::new(
        GIB,
        Workload {
            dirty_pages_per_sec: None,
            pattern: Pattern::Uniform,
            seed: 2,
        },
    );
    config.vcpus = 2;
    let guest = SimGuest::boot(config).unwrap();
    let mut latencies: Vec<Duration> = (0..400)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(2));
            let t = Instant::now();
            guest.pause().unwrap();
            let latency = t.elapsed();
            guest.resume().unwrap();
            latency
        })
        .collect();
    latencies.sort();
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    println!("pause latency (2 vCPUs flat out, 400 pauses): p50 {p50:?}, p99 {p99:?}");

    let max_rate = rates.iter().cloned().fold(0.0, f64::max);
    println!(
        "summary: dirtylog_fetch_1gib_few_us={:.1} dirtylog_fetch_1gib_all_us={:.1} max_dirty_pages_per_sec={:.0} max_dirty_mib_per_sec={:.0} pause_p50_us={:.1} pause_p99_us={:.1}",
        few.as_secs_f64() * 1e6,
        all.as_secs_f64() * 1e6,
        max_rate,
        max_rate * 4096.0 / (1 << 20) as f64,
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
}
