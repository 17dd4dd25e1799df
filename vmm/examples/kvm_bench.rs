//! KVM guest benchmark: what the dirty log costs per round, how fast a guest
//! can dirty new pages, how long a pause takes, and the blackout of an
//! in-process live copy, for a 64 MiB and a 1 GiB guest.
//!
//! `cargo run --release -p ferry-vmm --example kvm_bench`
//!
//! The last line sums the figures up as `key=value` pairs. Where KVM is not
//! usable it prints `SKIPPED kvm: <reason>` and a last line saying so.
#![allow(clippy::unwrap_used)]

#[cfg(not(target_os = "linux"))]
fn main() {
    println!("SKIPPED kvm: not Linux");
    println!("kvm_bench skipped=1");
}

#[cfg(target_os = "linux")]
fn main() {
    bench::main();
}

#[cfg(target_os = "linux")]
mod bench {
    use ferry_vmm::dirty::DirtyBitmap;
    use ferry_vmm::kvm::{self, DirtyLogMode, KvmGuest, KvmGuestConfig};
    use ferry_vmm::local::{live_copy, LocalCopyConfig};
    use ferry_vmm::{Guest, Pattern, Workload};
    use std::time::{Duration, Instant};

    const MIB: u64 = 1 << 20;

    fn micros(d: Duration) -> f64 {
        d.as_secs_f64() * 1e6
    }

    fn percentile(sorted: &[Duration], p: f64) -> Duration {
        sorted[((sorted.len() - 1) as f64 * p).round() as usize]
    }

    fn config(memory: u64, workload: Workload, mode: DirtyLogMode) -> KvmGuestConfig {
        let mut c = KvmGuestConfig::new(memory, workload);
        c.dirty_log = mode;
        c
    }

    /// Fetch-and-clear with every workload page dirty: a sequential flat-out
    /// sweep over all of memory, then one fetch. Returns (fetch time, pages
    /// found dirty, new pages dirtied per second during the sweep).
    fn fetch_all_dirty(memory: u64, mode: DirtyLogMode) -> (Duration, u64, f64) {
        let workload = Workload {
            dirty_pages_per_sec: None,
            pattern: Pattern::Sequential,
            seed: 1,
        };
        let guest = KvmGuest::boot(config(memory, workload, mode)).unwrap();
        let pages = guest.layout().workload_pages();
        let mut bitmap = DirtyBitmap::new(guest.page_count());
        // First touch of each page costs a host page fault: sweep once before measuring.
        while guest.writes() < pages {
            std::thread::sleep(Duration::from_millis(1));
        }
        guest.start_dirty_log().unwrap();
        let (start, w0) = (Instant::now(), guest.writes());
        while guest.writes() < w0 + pages {
            std::thread::sleep(Duration::from_millis(1));
        }
        let sweep = start.elapsed();
        guest.pause().unwrap();
        let t = Instant::now();
        guest.fetch_and_clear_dirty(&mut bitmap).unwrap();
        let fetch = t.elapsed();
        guest.destroy();
        (fetch, bitmap.count(), pages as f64 / sweep.as_secs_f64())
    }

    struct Figures {
        fetch_few: Duration,
        few_pages: u64,
        fetch_all: Duration,
        fetch_all_get_clear: Duration,
        all_pages: u64,
        max_dirty_rate: f64,
        blackout: Duration,
        final_pages: u64,
        rounds: usize,
        copy_total: Duration,
        save: Duration,
        restore: Duration,
        verify: Duration,
    }

    fn run_size(memory: u64, rate: u64) -> Figures {
        let name = format!("{} MiB", memory / MIB);
        let workload = Workload {
            dirty_pages_per_sec: Some(rate),
            pattern: Pattern::HotSet {
                write_percent: 80,
                page_percent: 10,
            },
            seed: 42,
        };

        // Dirty-log cost per round while the guest writes at `rate`. Memory is
        // prefilled with incompressible data, as a guest that has run a while.
        let mut source_config = config(memory, workload, DirtyLogMode::Auto);
        source_config.prefill_seed = Some(7);
        let source = KvmGuest::boot(source_config).unwrap();
        let mut bitmap = DirtyBitmap::new(source.page_count());
        std::thread::sleep(Duration::from_millis(200));
        source.start_dirty_log().unwrap();
        let mut fetches = Vec::new();
        let mut counts = Vec::new();
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(100));
            let t = Instant::now();
            source.fetch_and_clear_dirty(&mut bitmap).unwrap();
            fetches.push(t.elapsed());
            counts.push(bitmap.count());
        }
        fetches.sort();
        counts.sort();
        let fetch_few = percentile(&fetches, 0.5);
        let few_pages = counts[counts.len() / 2];
        println!(
            "{name}: fetch-and-clear at {rate} writes/s ({} manual protect): p50 {:.0} µs for {few_pages} dirty pages per 100 ms round",
            if source.manual_protect() { "with" } else { "without" },
            micros(fetch_few)
        );

        // Live copy into an incoming guest, verified (both digests taken in the
        // blackout); the blackout reported leaves the verification out.
        let target = KvmGuest::incoming(config(memory, workload, DirtyLogMode::Auto)).unwrap();
        let report = live_copy(
            source.as_ref(),
            target.as_ref(),
            &LocalCopyConfig::default(),
        )
        .unwrap();
        let (a, b) = report.digests.unwrap();
        assert_eq!(a, b, "source and target differ");
        let blackout = report.blackout.saturating_sub(report.verify_time);
        let rounds: Vec<String> = report
            .rounds
            .iter()
            .map(|r| r.pages_sent.to_string())
            .collect();
        println!(
            "{name}: live copy: pages sent per round [{}], {} pages while paused, blackout {:.2} ms \
             (+{:.1} ms to verify both digests), total {:.0} ms",
            rounds.join(", "),
            report.final_pages,
            blackout.as_secs_f64() * 1e3,
            report.verify_time.as_secs_f64() * 1e3,
            report.total.as_secs_f64() * 1e3
        );
        // Parts of the blackout, measured again: saving the paused source's
        // state, and restoring it into the (paused again) target.
        let t = Instant::now();
        let state = source.save_state().unwrap();
        let save = t.elapsed();
        target.pause().unwrap();
        let t = Instant::now();
        target.restore_state(&state).unwrap();
        let restore = t.elapsed();
        println!(
            "{name}: save_state {:.0} µs ({} bytes encoded), restore_state {:.0} µs",
            micros(save),
            state.encode().len(),
            micros(restore),
        );
        source.destroy();
        target.destroy();

        // Fetch cost with every page dirty, both dirty-log modes.
        let (fetch_all, all_pages, max_dirty_rate) = fetch_all_dirty(memory, DirtyLogMode::Auto);
        let (fetch_all_get_clear, _, _) = fetch_all_dirty(memory, DirtyLogMode::GetAndClear);
        println!(
            "{name}: fetch-and-clear with all {all_pages} pages dirty: {:.0} µs (manual protect), {:.0} µs (get-and-clear); \
             a flat-out vCPU dirties {max_dirty_rate:.0} new pages/s",
            micros(fetch_all),
            micros(fetch_all_get_clear)
        );
        Figures {
            fetch_few,
            few_pages,
            fetch_all,
            fetch_all_get_clear,
            all_pages,
            max_dirty_rate,
            blackout,
            final_pages: report.final_pages,
            rounds: report.rounds.len(),
            copy_total: report.total,
            save,
            restore,
            verify: report.verify_time,
        }
    }

    fn pause_latency() -> (Duration, Duration) {
        let workload = Workload {
            dirty_pages_per_sec: None,
            ..Workload::uniform(0, 9)
        };
        let guest = KvmGuest::boot(config(64 * MIB, workload, DirtyLogMode::Auto)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let mut latencies = Vec::new();
        for _ in 0..200 {
            std::thread::sleep(Duration::from_millis(2));
            let t = Instant::now();
            guest.pause().unwrap();
            latencies.push(t.elapsed());
            guest.resume().unwrap();
        }
        guest.destroy();
        latencies.sort();
        (percentile(&latencies, 0.5), percentile(&latencies, 0.99))
    }

    pub fn main() {
        let Some(caps) = kvm::usable_or_skip("kvm_bench") else {
            let reason = kvm::probe()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            println!("SKIPPED kvm: {reason}");
            println!("kvm_bench skipped=1");
            return;
        };
        println!("KVM: {}", caps.summary());
        let (p50, p99) = pause_latency();
        println!(
            "pause of a flat-out vCPU: p50 {:.0} µs, p99 {:.0} µs",
            micros(p50),
            micros(p99)
        );
        let small = run_size(64 * MIB, 20_000);
        let large = run_size(1024 * MIB, 50_000);
        let mut summary = format!(
            "kvm_bench pause_p50_us={:.0} pause_p99_us={:.0}",
            micros(p50),
            micros(p99)
        );
        for (tag, f) in [("64m", &small), ("1g", &large)] {
            summary.push_str(&format!(
                " {tag}_fetch_us={:.0} {tag}_fetch_pages={} {tag}_fetch_all_us={:.0} {tag}_fetch_all_getclear_us={:.0} \
                 {tag}_all_pages={} {tag}_max_dirty_pages_per_s={:.0} {tag}_blackout_ms={:.2} {tag}_final_pages={} \
                 {tag}_rounds={} {tag}_copy_ms={:.0} {tag}_save_us={:.0} {tag}_restore_us={:.0} {tag}_verify_ms={:.1}",
                micros(f.fetch_few),
                f.few_pages,
                micros(f.fetch_all),
                micros(f.fetch_all_get_clear),
                f.all_pages,
                f.max_dirty_rate,
                f.blackout.as_secs_f64() * 1e3,
                f.final_pages,
                f.rounds,
                f.copy_total.as_secs_f64() * 1e3,
                micros(f.save),
                micros(f.restore),
                f.verify.as_secs_f64() * 1e3,
            ));
        }
        println!("{summary}");
    }
}
