//! The KVM guest on its own: it boots straight into long mode at CPL3, its
//! program writes exactly what the SimGuest workload would, its service
//! keeps the SimGuest log format, pause stops it, and bad input is refused
//! clearly. Each test passes `kvm::usable_or_skip` first: it prints
//! `SKIPPED kvm: <test>: <reason>` and returns where this host has no usable
//! KVM (fails instead where `FERRY_CI_PROVIDES` names `kvm`), and fails
//! wherever Ferry's own guest does not run.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

use ferry_vmm::dirty::DirtyBitmap;
use ferry_vmm::kvm::{self, KvmGuest, KvmGuestConfig};
use ferry_vmm::workload::VcpuContext;
use ferry_vmm::{Guest, GuestError, Pattern, RunLease, ServiceError, Workload, PAGE_SIZE};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn config(memory: u64, workload: Workload) -> KvmGuestConfig {
    let mut c = KvmGuestConfig::new(memory, workload);
    c.service_pages = 64;
    c
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn boots_and_writes() {
    let Some(_) = kvm::usable_or_skip("boots_and_writes") else {
        return;
    };
    let guest = KvmGuest::boot(config(16 * MIB, Workload::uniform(20_000, 7))).unwrap();
    wait_for("writes", Duration::from_secs(5), || guest.writes() > 100);
    assert_eq!(guest.failure(), None);
    guest.pause().unwrap();
    let at_pause = guest.counters();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(guest.counters(), at_pause, "a paused guest does not write");
    guest.resume().unwrap();
    wait_for("more writes", Duration::from_secs(5), || {
        guest.writes() > at_pause[0].writes
    });
    guest.destroy();
}

/// The program's writes are SimGuest's: replaying the same number of writes
/// with `VcpuContext` over zeroed memory gives the same workload pages.
fn replay_matches(pattern: Pattern, name: &str) {
    let Some(_) = kvm::usable_or_skip(name) else {
        return;
    };
    let writes = 5_000;
    let mut c = config(
        16 * MIB,
        Workload {
            dirty_pages_per_sec: None,
            pattern,
            seed: 99,
        },
    );
    c.write_limit = Some(writes);
    let guest = KvmGuest::boot(c).unwrap();
    wait_for("the write limit", Duration::from_secs(10), || {
        guest.writes() >= writes
    });
    guest.pause().unwrap();
    let counters = guest.counters();
    assert_eq!(counters[0].writes, writes);

    let layout = *guest.layout();
    let (first, pages) = (layout.workload_first, layout.workload_pages());
    let mut expected = vec![0u8; pages as usize * PAGE_SIZE];
    let mut ctx = VcpuContext::new(99, 0);
    for _ in 0..writes {
        let page = ctx.next_page(pattern, pages) as usize;
        let mut line = [0u8; 64];
        for chunk in line.chunks_exact_mut(8) {
            chunk.copy_from_slice(&ctx.next_u64().to_le_bytes());
        }
        let offset = (ctx.next_u64() % (PAGE_SIZE as u64 / 64)) as usize * 64;
        expected[page * PAGE_SIZE + offset..][..64].copy_from_slice(&line);
    }
    assert_eq!(
        counters[0].rng, ctx.rng,
        "generator state after {writes} writes"
    );
    assert_eq!(counters[0].cursor, ctx.cursor);
    let mut actual = vec![0u8; expected.len()];
    guest.read_pages(first, &mut actual).unwrap();
    assert!(actual == expected, "workload pages differ from the replay");
    guest.destroy();
}

#[test]
fn uniform_writes_replay_exactly() {
    replay_matches(Pattern::Uniform, "uniform_writes_replay_exactly");
}

#[test]
fn hot_set_writes_replay_exactly() {
    replay_matches(
        Pattern::HotSet {
            write_percent: 80,
            page_percent: 5,
        },
        "hot_set_writes_replay_exactly",
    );
}

#[test]
fn sequential_writes_replay_exactly() {
    replay_matches(Pattern::Sequential, "sequential_writes_replay_exactly");
}

#[test]
fn service_appends_are_in_guest_memory_in_the_sim_format() {
    let Some(_) = kvm::usable_or_skip("service_appends_are_in_guest_memory_in_the_sim_format")
    else {
        return;
    };
    let guest = KvmGuest::boot(config(16 * MIB, Workload::uniform(5_000, 3))).unwrap();
    for i in 0..50u64 {
        let record = format!("record {i}").repeat(i as usize % 5 + 1);
        assert_eq!(guest.service_append(record.as_bytes()).unwrap(), i + 1);
    }
    assert_eq!(guest.service_append(&[]).unwrap(), 51);
    assert!(matches!(
        guest.service_append(&vec![0; 5000]),
        Err(ServiceError::TooLarge(5000))
    ));
    let records = guest.service_records().unwrap();
    assert_eq!(records.len(), 51);
    for (i, (seq, data)) in records.iter().take(50).enumerate() {
        assert_eq!(*seq, i as u64 + 1);
        assert_eq!(data, format!("record {i}").repeat(i % 5 + 1).as_bytes());
    }
    assert_eq!(guest.counters()[0].appends, 51);
    guest.pause().unwrap();
    assert_eq!(guest.service_append(b"x"), Err(ServiceError::Paused));
    guest.resume().unwrap();
    assert_eq!(guest.service_append(b"x").unwrap(), 52);
    guest.destroy();
    assert_eq!(guest.service_append(b"x"), Err(ServiceError::NotRunning));
}

#[test]
fn a_full_log_is_refused_by_the_guest() {
    let Some(_) = kvm::usable_or_skip("a_full_log_is_refused_by_the_guest") else {
        return;
    };
    let mut c = config(4 * MIB, Workload::idle());
    c.service_pages = 1;
    let guest = KvmGuest::boot(c).unwrap();
    let record = [7u8; 1000];
    // A one-page log (64 header bytes) holds three records of 16 + 1000 bytes.
    for seq in 1..=3 {
        assert_eq!(guest.service_append(&record).unwrap(), seq);
    }
    assert!(matches!(
        guest.service_append(&record),
        Err(ServiceError::Full { .. })
    ));
    assert_eq!(guest.service_records().unwrap().len(), 3);
    guest.destroy();
}

#[test]
fn dirty_log_shows_the_guest_writes() {
    let Some(_) = kvm::usable_or_skip("dirty_log_shows_the_guest_writes") else {
        return;
    };
    let mut c = config(
        16 * MIB,
        Workload {
            dirty_pages_per_sec: None,
            pattern: Pattern::Sequential,
            seed: 1,
        },
    );
    c.write_limit = Some(300);
    let guest = KvmGuest::boot(c).unwrap();
    let mut bitmap = DirtyBitmap::new(guest.page_count());
    guest.start_dirty_log().unwrap();
    wait_for("the write limit", Duration::from_secs(10), || {
        guest.writes() >= 300
    });
    guest.pause().unwrap();
    guest.fetch_and_clear_dirty(&mut bitmap).unwrap();
    let first = guest.layout().workload_first;
    let workload: Vec<u64> = bitmap.iter().filter(|p| *p >= first).collect();
    assert_eq!(
        workload,
        (first..first + 300).collect::<Vec<_>>(),
        "sequential writes dirty pages in order"
    );
    // Once fetched, the log is clear while the guest is paused.
    guest.fetch_and_clear_dirty(&mut bitmap).unwrap();
    assert_eq!(bitmap.count(), 0);
    guest.destroy();
}

#[test]
fn bad_input_is_refused_clearly() {
    let Some(_) = kvm::usable_or_skip("bad_input_is_refused_clearly") else {
        return;
    };
    let guest = KvmGuest::boot(config(8 * MIB, Workload::idle())).unwrap();
    let pages = guest.page_count();
    let mut buf = vec![0u8; 2 * PAGE_SIZE];
    assert_eq!(
        guest.read_pages(pages - 1, &mut buf),
        Err(GuestError::PageOutOfRange {
            first: pages - 1,
            end: pages + 1,
            pages
        })
    );
    assert_eq!(
        guest.zero_pages(pages, 1),
        Err(GuestError::PageOutOfRange {
            first: pages,
            end: pages + 1,
            pages
        })
    );
    assert_eq!(
        guest.read_pages(0, &mut buf[..100]),
        Err(GuestError::UnalignedBuffer { len: 100 })
    );
    let mut wrong = DirtyBitmap::new(pages + 1);
    assert_eq!(
        guest.fetch_and_clear_dirty(&mut wrong),
        Err(GuestError::BitmapSize {
            expected: pages,
            got: pages + 1
        })
    );
    assert!(matches!(
        guest.set_throttle(1.5),
        Err(GuestError::BadThrottle(_))
    ));
    assert!(matches!(guest.save_state(), Err(GuestError::NotPaused(_))));

    guest.pause().unwrap();
    let state = guest.save_state().unwrap();
    // An unknown version of the vCPU blob, of the VM blob, and of the whole.
    let mut bad = state.clone();
    bad.vcpus[0].registers[..4].copy_from_slice(&9u32.to_le_bytes());
    assert_eq!(
        guest.restore_state(&bad),
        Err(GuestError::UnknownStateVersion {
            found: 9,
            supported: kvm::KVM_VCPU_STATE_VERSION
        })
    );
    let mut bad = state.clone();
    bad.extra[..4].copy_from_slice(&3u32.to_le_bytes());
    assert_eq!(
        guest.restore_state(&bad),
        Err(GuestError::UnknownStateVersion {
            found: 3,
            supported: kvm::KVM_VM_STATE_VERSION
        })
    );
    let mut bytes = state.encode();
    bytes[..4].copy_from_slice(&2u32.to_le_bytes());
    assert!(matches!(
        ferry_vmm::DeviceState::decode(&bytes),
        Err(GuestError::UnknownStateVersion { found: 2, .. })
    ));
    // Truncated, another backend's, another layout's.
    let mut bad = state.clone();
    bad.vcpus[0].registers.truncate(40);
    assert!(matches!(
        guest.restore_state(&bad),
        Err(GuestError::MalformedState(_))
    ));
    let mut bad = state.clone();
    bad.kind = "sim".into();
    assert!(matches!(
        guest.restore_state(&bad),
        Err(GuestError::StateKind { .. })
    ));
    let other = KvmGuest::incoming(config(16 * MIB, Workload::idle())).unwrap();
    assert!(matches!(
        other.restore_state(&state),
        Err(GuestError::StateMismatch(_))
    ));
    assert!(
        other.resume().is_err(),
        "an incoming guest without state does not run"
    );
    other.destroy();
    // The good state still restores.
    guest.restore_state(&state).unwrap();
    guest.resume().unwrap();
    guest.destroy();
    assert_eq!(guest.read_pages(0, &mut buf), Err(GuestError::Destroyed));
}

#[test]
fn pause_is_prompt() {
    let Some(_) = kvm::usable_or_skip("pause_is_prompt") else {
        return;
    };
    let guest = KvmGuest::boot(config(
        16 * MIB,
        Workload {
            dirty_pages_per_sec: None,
            ..Workload::uniform(0, 5)
        },
    ))
    .unwrap();
    let mut latencies = Vec::new();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(2));
        let t = Instant::now();
        guest.pause().unwrap();
        latencies.push(t.elapsed());
        guest.resume().unwrap();
    }
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    eprintln!(
        "kvm pause latency p50 {p50:?} max {:?}",
        latencies.last().unwrap()
    );
    assert!(p50 < Duration::from_millis(20), "pause p50 {p50:?}");
    assert_eq!(guest.failure(), None);
    guest.destroy();
}

#[test]
fn prefill_writes_the_same_bytes_as_the_simulated_guest() {
    let Some(_) = kvm::usable_or_skip("prefill_writes_the_same_bytes_as_the_simulated_guest")
    else {
        return;
    };
    let mut c = config(8 * MIB, Workload::idle());
    c.prefill_seed = Some(77);
    let guest = KvmGuest::boot(c).unwrap();
    let layout = *guest.layout();
    let mut ctx = VcpuContext::new(77, u32::MAX);
    let mut expected = vec![0u8; 2 * PAGE_SIZE];
    for chunk in expected.chunks_exact_mut(8) {
        chunk.copy_from_slice(&ctx.next_u64().to_le_bytes());
    }
    let mut actual = vec![0u8; 2 * PAGE_SIZE];
    guest
        .read_pages(layout.workload_first, &mut actual)
        .unwrap();
    assert!(actual == expected, "prefilled pages differ from SimGuest's");
    let mut last = vec![0u8; PAGE_SIZE];
    guest.read_pages(layout.pages - 1, &mut last).unwrap();
    assert!(last.iter().any(|b| *b != 0), "the last page is filled too");
    guest.destroy();
}

#[test]
fn the_guest_keeps_its_dirty_rate() {
    let Some(_) = kvm::usable_or_skip("the_guest_keeps_its_dirty_rate") else {
        return;
    };
    let mut c = config(16 * MIB, Workload::uniform(30_000, 4));
    c.vcpus = 2;
    let guest = KvmGuest::boot(c).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let (w0, t0) = (guest.writes(), Instant::now());
    std::thread::sleep(Duration::from_millis(500));
    let rate = (guest.writes() - w0) as f64 / t0.elapsed().as_secs_f64();
    eprintln!("kvm paced at 30000 writes/s: measured {rate:.0}");
    assert!(
        (21_000.0..=34_500.0).contains(&rate),
        "paced at 30000/s, wrote {rate:.0}/s"
    );
    guest.destroy();
}

/// Waits until the guest's write counters stand still for a while; returns them.
fn settled_counters(guest: &KvmGuest) -> Vec<ferry_vmm::kvm::VcpuCounters> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = guest.counters();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = guest.counters();
        if now == last {
            return now;
        }
        assert!(Instant::now() < deadline, "the guest kept running");
        last = now;
    }
}

#[test]
fn a_fenced_guest_runs_nothing_and_acknowledges_nothing() {
    let Some(_) = kvm::usable_or_skip("a_fenced_guest_runs_nothing_and_acknowledges_nothing")
    else {
        return;
    };
    let guest = KvmGuest::boot(config(16 * MIB, Workload::uniform(20_000, 7))).unwrap();
    wait_for("writes", Duration::from_secs(5), || guest.writes() > 100);
    assert_eq!(guest.service_append(b"before"), Ok(1));

    let lease = RunLease::expired();
    guest.bind_lease(lease.clone());
    assert_eq!(guest.service_append(b"fenced"), Err(ServiceError::Fenced));
    let fenced = settled_counters(&guest);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(guest.counters(), fenced, "a fenced guest runs nothing");
    assert!(!guest.is_paused(), "fencing is not a pause");
    assert_eq!(guest.service_records().unwrap().len(), 1);

    // Pause and resume still work while fenced, and resuming runs nothing.
    let t = Instant::now();
    guest.pause().unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "pause while fenced"
    );
    guest.resume().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        guest.counters(),
        fenced,
        "a resumed guest waits for its lease"
    );
    assert_eq!(guest.service_append(b"fenced"), Err(ServiceError::Fenced));

    lease.extend_to(Instant::now() + Duration::from_secs(600));
    wait_for("writes after the extension", Duration::from_secs(5), || {
        guest.writes() > fenced[0].writes
    });
    assert_eq!(guest.service_append(b"after"), Ok(2));
    assert_eq!(guest.failure(), None);

    // Destroy returns while the vCPUs are held by the lease.
    guest.bind_lease(RunLease::expired());
    settled_counters(&guest);
    guest.destroy();
    assert_eq!(guest.service_append(b"x"), Err(ServiceError::NotRunning));
}

#[test]
fn a_kvm_lease_that_runs_out_fences_the_guest_by_itself() {
    let Some(_) = kvm::usable_or_skip("a_kvm_lease_that_runs_out_fences_the_guest_by_itself")
    else {
        return;
    };
    let guest = KvmGuest::boot(config(16 * MIB, Workload::uniform(20_000, 8))).unwrap();
    wait_for("writes", Duration::from_secs(5), || guest.writes() > 100);
    let deadline = Instant::now() + Duration::from_millis(100);
    guest.bind_lease(RunLease::until(deadline));
    let give_up = deadline + Duration::from_secs(5);
    let mut acked = 0u64;
    loop {
        let start = Instant::now();
        let result = guest.service_append(b"r");
        let end = Instant::now();
        match result {
            Ok(seq) => {
                assert!(start < deadline, "acknowledged after the deadline");
                acked += 1;
                assert_eq!(seq, acked);
            }
            Err(ServiceError::Fenced) => {
                assert!(end >= deadline, "refused before the deadline");
                // Caught by the deadline on its way: refused at once, not
                // after the service timeout.
                assert!(
                    end - start < Duration::from_secs(1),
                    "took {:?}",
                    end - start
                );
                if start >= deadline {
                    break;
                }
            }
            Err(e) => panic!("unexpected service error: {e}"),
        }
        assert!(Instant::now() < give_up, "appends still acknowledged");
        std::thread::sleep(Duration::from_millis(1));
    }
    let fenced = settled_counters(&guest);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        guest.counters(),
        fenced,
        "a guest whose lease ran out runs nothing"
    );
    let records = guest.service_records().unwrap().len() as u64;
    assert!((acked..=acked + 1).contains(&records), "{records} records");
    assert_eq!(guest.failure(), None);
    guest.destroy();
}
