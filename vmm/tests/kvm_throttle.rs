//! A KVM guest that dirties memory faster than a copy can keep up: throttling
//! holds its vCPUs back, the measured dirty rate falls, and a live copy that
//! could not converge unthrottled converges with auto-converge. Where this host
//! has no usable KVM each test prints `SKIPPED kvm: <test>: <reason>` and
//! returns (`kvm::usable_or_skip`: fails instead where `FERRY_CI_PROVIDES`
//! names `kvm`, and wherever Ferry's own guest does not run).
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

use ferry_vmm::dirty::DirtyBitmap;
use ferry_vmm::kvm::{self, KvmGuest, KvmGuestConfig};
use ferry_vmm::local::{live_copy, LocalCopyConfig};
use ferry_vmm::{DeviceState, Guest, GuestResult, MemoryDigest, RunLease, ServiceError, Workload};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// The tests of this file take turns: they run vCPUs flat out or measure
/// rates and times, and the machine may have only two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn flat_out(memory: u64, seed: u64) -> KvmGuestConfig {
    let mut c = KvmGuestConfig::new(
        memory,
        Workload {
            dirty_pages_per_sec: None,
            ..Workload::uniform(0, seed)
        },
    );
    c.service_pages = 16;
    c
}

/// New pages dirtied per second and page writes per second, averaged over
/// `windows` windows of `window` (short enough that the dirty set does not
/// cover all of memory).
fn measure(
    guest: &KvmGuest,
    bitmap: &mut DirtyBitmap,
    window: Duration,
    windows: u32,
) -> (f64, f64) {
    let (mut dirty, mut writes, mut secs) = (0u64, 0u64, 0.0);
    for _ in 0..windows {
        guest.fetch_and_clear_dirty(bitmap).unwrap();
        let (w0, t0) = (guest.writes(), Instant::now());
        std::thread::sleep(window);
        guest.fetch_and_clear_dirty(bitmap).unwrap();
        secs += t0.elapsed().as_secs_f64();
        dirty += bitmap.count();
        writes += guest.writes() - w0;
    }
    (dirty as f64 / secs, writes as f64 / secs)
}

#[test]
fn throttle_reduces_the_measured_dirty_rate() {
    let _serial = one_at_a_time();
    let Some(_) = kvm::usable_or_skip("throttle_reduces_the_measured_dirty_rate") else {
        return;
    };
    let guest = KvmGuest::boot(flat_out(64 * MIB, 3)).unwrap();
    let mut bitmap = DirtyBitmap::new(guest.page_count());
    guest.start_dirty_log().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    // The settings take turns, cycle after cycle, so that a change in the
    // host's load between measurements weighs on all of them alike.
    let shares = [0.0, 0.5, 0.9];
    let mut totals = [(0.0, 0.0); 3];
    for _ in 0..6 {
        for (i, share) in shares.iter().enumerate() {
            guest.set_throttle(*share).unwrap();
            std::thread::sleep(Duration::from_millis(10));
            let (dirty, writes) = measure(&guest, &mut bitmap, Duration::from_millis(20), 1);
            totals[i].0 += dirty;
            totals[i].1 += writes;
        }
    }
    let rates: Vec<f64> = totals.iter().map(|(dirty, _)| dirty / 6.0).collect();
    for (share, (dirty, writes)) in shares.iter().zip(totals) {
        eprintln!(
            "kvm throttle {share}: {:.0} new dirty pages/s, {:.0} page writes/s",
            dirty / 6.0,
            writes / 6.0
        );
    }
    assert_eq!(guest.failure(), None);
    assert!(rates[0] > 0.0);
    assert!(
        rates[1] < 0.75 * rates[0],
        "throttle 0.5 dirtied {:.0}/s against {:.0}/s",
        rates[1],
        rates[0]
    );
    assert!(
        rates[2] < 0.3 * rates[0],
        "throttle 0.9 dirtied {:.0}/s against {:.0}/s",
        rates[2],
        rates[0]
    );
    guest.set_throttle(0.0).unwrap();
    guest.destroy();
}

/// A receiving guest behind a link of limited bandwidth: page writes take as
/// long as they would on the wire. Everything else goes straight through.
struct SlowLink {
    target: Arc<KvmGuest>,
    bytes_per_sec: f64,
    free_at: Mutex<Instant>,
}

impl SlowLink {
    fn new(target: Arc<KvmGuest>, bytes_per_sec: f64) -> SlowLink {
        SlowLink {
            target,
            bytes_per_sec,
            free_at: Mutex::new(Instant::now()),
        }
    }

    fn transmit(&self, bytes: usize) {
        let until = {
            let mut free_at = self.free_at.lock().unwrap();
            *free_at = (*free_at).max(Instant::now())
                + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec);
            *free_at
        };
        if let Some(wait) = until.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}

impl Guest for SlowLink {
    fn kind(&self) -> &'static str {
        self.target.kind()
    }
    fn page_count(&self) -> u64 {
        self.target.page_count()
    }
    fn read_pages(&self, first: u64, buf: &mut [u8]) -> GuestResult<()> {
        self.target.read_pages(first, buf)
    }
    fn write_pages(&self, first: u64, data: &[u8]) -> GuestResult<()> {
        self.transmit(data.len());
        self.target.write_pages(first, data)
    }
    fn zero_pages(&self, first: u64, count: u64) -> GuestResult<()> {
        self.transmit(16); // a "zero page" message
        self.target.zero_pages(first, count)
    }
    fn fetch_and_clear_dirty(&self, bitmap: &mut DirtyBitmap) -> GuestResult<()> {
        self.target.fetch_and_clear_dirty(bitmap)
    }
    fn start_dirty_log(&self) -> GuestResult<()> {
        self.target.start_dirty_log()
    }
    fn pause(&self) -> GuestResult<()> {
        self.target.pause()
    }
    fn resume(&self) -> GuestResult<()> {
        self.target.resume()
    }
    fn is_paused(&self) -> bool {
        self.target.is_paused()
    }
    fn bind_lease(&self, lease: RunLease) {
        self.target.bind_lease(lease)
    }
    fn set_throttle(&self, share: f64) -> GuestResult<()> {
        self.target.set_throttle(share)
    }
    fn save_state(&self) -> GuestResult<DeviceState> {
        self.target.save_state()
    }
    fn restore_state(&self, state: &DeviceState) -> GuestResult<()> {
        self.transmit(state.encode().len());
        self.target.restore_state(state)
    }
    fn digest(&self) -> GuestResult<MemoryDigest> {
        self.target.digest()
    }
    fn service_append(&self, record: &[u8]) -> Result<u64, ServiceError> {
        self.target.service_append(record)
    }
    fn service_records(&self) -> Result<Vec<(u64, Vec<u8>)>, ServiceError> {
        self.target.service_records()
    }
    fn destroy(&self) {
        self.target.destroy()
    }
}

#[test]
fn a_guest_too_fast_to_converge_converges_with_auto_converge() {
    let _serial = one_at_a_time();
    let Some(_) = kvm::usable_or_skip("a_guest_too_fast_to_converge_converges_with_auto_converge")
    else {
        return;
    };
    let (memory, stop_pages) = (8 * MIB, 64);
    // 64 MB/s: about 16k pages/s, well below what the guest dirties flat out.
    let link = 64e6;

    // Unthrottled, the remainder never gets small: the copy gives up at its
    // round limit with a large remainder.
    let source = KvmGuest::boot(flat_out(memory, 5)).unwrap();
    let target = SlowLink::new(KvmGuest::incoming(flat_out(memory, 5)).unwrap(), link);
    std::thread::sleep(Duration::from_millis(30));
    let plain = LocalCopyConfig {
        stop_pages,
        max_rounds: 3,
        throttle_step: 0.0,
        verify: true,
        run_pages: 64,
    };
    let report = live_copy(source.as_ref(), &target, &plain).unwrap();
    let sent: Vec<u64> = report
        .rounds
        .iter()
        .map(|r| r.pages_sent + r.zero_pages)
        .collect();
    eprintln!(
        "kvm unthrottled over 64 MB/s: pages per round {sent:?}, final {}",
        report.final_pages
    );
    assert_eq!(
        report.rounds.len(),
        4,
        "stopped by the round limit, not by converging"
    );
    assert!(
        sent[1..].iter().all(|p| *p > 1_000),
        "dirty rounds stay large: {sent:?}"
    );
    source.destroy();
    target.destroy();

    // With auto-converge the throttle rises until the remainder fits.
    let source = KvmGuest::boot(flat_out(memory, 5)).unwrap();
    let target = SlowLink::new(KvmGuest::incoming(flat_out(memory, 5)).unwrap(), link);
    std::thread::sleep(Duration::from_millis(30));
    let converge = LocalCopyConfig {
        stop_pages,
        max_rounds: 30,
        throttle_step: 0.2,
        verify: true,
        run_pages: 64,
    };
    let report = live_copy(source.as_ref(), &target, &converge).unwrap();
    let rounds: Vec<String> = report
        .rounds
        .iter()
        .map(|r| format!("{}@{:.2}", r.pages_sent + r.zero_pages, r.throttle))
        .collect();
    eprintln!(
        "kvm auto-converge over 64 MB/s: pages@throttle per round {}, final {} pages, blackout {:?}",
        rounds.join(" "),
        report.final_pages,
        report.blackout
    );
    assert!(
        report.rounds.len() <= 30,
        "converged before the round limit"
    );
    assert!(
        report.rounds.iter().any(|r| r.throttle > 0.0),
        "it needed the throttle"
    );
    assert!(
        report.final_pages <= 4 * stop_pages,
        "final remainder {} pages",
        report.final_pages
    );
    let (a, b) = report.digests.unwrap();
    assert_eq!(a, b);
    let stopped = source.counters()[0].writes;
    let deadline = Instant::now() + Duration::from_secs(5);
    while target.target.counters()[0].writes <= stopped {
        assert!(Instant::now() < deadline, "the target does not run on");
        std::thread::sleep(Duration::from_millis(1));
    }
    source.destroy();
    target.destroy();
}
