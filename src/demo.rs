//! The in-process demonstration: a running simulated guest copied live into a
//! second one, with a client appending to its service throughout. Every figure
//! it prints is measured in the run.

use ferry_vmm::local::{live_copy, LocalCopyConfig, LocalReport};
use ferry_vmm::{Guest, Pattern, ServiceError, SimGuest, SimGuestConfig, Workload};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to copy.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub memory_mib: u64,
    pub vcpus: u32,
    pub dirty_pages_per_sec: u64,
}

/// What happened, as measured.
#[derive(Debug)]
pub struct DemoOutcome {
    pub report: LocalReport,
    pub acked: usize,
    pub present: usize,
    pub client_refused: Duration,
}

/// Boots a guest, fills its memory, copies it live into a second guest while a
/// client appends, and checks the client's acknowledged appends on the target.
pub fn run(config: &DemoConfig) -> anyhow::Result<DemoOutcome> {
    let mut guest_config = SimGuestConfig::new(
        config.memory_mib << 20,
        Workload {
            dirty_pages_per_sec: Some(config.dirty_pages_per_sec),
            pattern: Pattern::HotSet {
                write_percent: 80,
                page_percent: 10,
            },
            seed: 1,
        },
    );
    guest_config.vcpus = config.vcpus;
    let source = SimGuest::boot(guest_config.clone())?;
    let service_pages = guest_config.service_pages;
    source.guest_fill(service_pages, source.page_count() - service_pages, 7)?;
    let target = SimGuest::incoming(guest_config)?;

    let current = Arc::new(Mutex::new(source.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (current, stop) = (current.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut acked, mut refused, mut since) = (Vec::new(), Duration::ZERO, None::<Instant>);
            while !stop.load(Ordering::Acquire) {
                let guest = current.lock().unwrap_or_else(|p| p.into_inner()).clone();
                match guest.service_append(format!("order-{}", acked.len()).as_bytes()) {
                    Ok(seq) => {
                        if let Some(s) = since.take() {
                            refused = refused.max(s.elapsed());
                        }
                        acked.push(seq);
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    Err(ServiceError::Paused | ServiceError::NotRunning) => {
                        since.get_or_insert_with(Instant::now);
                        std::thread::yield_now();
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok((acked, refused))
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let report = live_copy(
        source.as_ref(),
        target.as_ref(),
        &LocalCopyConfig::default(),
    );
    if report.is_ok() {
        *current.lock().unwrap_or_else(|p| p.into_inner()) = target.clone();
        source.destroy();
    }
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Release);
    let (acked, client_refused) = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    let report = report?;
    let records = target.service_records()?;
    let present = acked
        .iter()
        .filter(|seq| records.iter().any(|(s, _)| s == *seq))
        .count();
    Ok(DemoOutcome {
        report,
        acked: acked.len(),
        present,
        client_refused,
    })
}

impl std::fmt::Display for DemoOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:>5} {:>12} {:>12} {:>10} {:>9}",
            "round", "pages sent", "zero pages", "time", "throttle"
        )?;
        for r in &self.report.rounds {
            writeln!(
                f,
                "{:>5} {:>12} {:>12} {:>10.1?} {:>8.0}%",
                r.round,
                r.pages_sent,
                r.zero_pages,
                r.elapsed,
                r.throttle * 100.0
            )?;
        }
        writeln!(
            f,
            "stop-and-copy: {} pages while paused",
            self.report.final_pages
        )?;
        if let Some((a, b)) = self.report.digests {
            writeln!(
                f,
                "digests: source {a}\n         target {b} ({})",
                if a == b { "equal" } else { "DIFFER" }
            )?;
        }
        writeln!(
            f,
            "total {:.1?}, blackout {:.1?} of which {:.1?} verifying digests (client refused for {:.1?}), {} MiB copied",
            self.report.total,
            self.report.blackout,
            self.report.verify_time,
            self.client_refused,
            self.report.bytes_copied() >> 20
        )?;
        write!(
            f,
            "acknowledged appends: {} present on the target of {} acknowledged",
            self.present, self.acked
        )
    }
}
