//! A running `SimGuest` copied live into another in the same process, with a
//! workload dirtying memory and a client appending to its service throughout.
#![allow(clippy::unwrap_used)]

use ferry_vmm::local::{live_copy, LocalCopyConfig};
use ferry_vmm::{Guest, Pattern, ServiceError, SimGuest, SimGuestConfig, Workload, PAGE_SIZE};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// What the client saw: every acknowledged append, and the longest time it
/// was refused because the guest was paused.
struct ClientLog {
    acked: Vec<(u64, Vec<u8>)>,
    refused: Duration,
    paused_errors: u64,
}

/// A client appending to whichever guest `current` points at (the test's
/// stand-in for the virtual switch) until `stop` is set.
fn run_client(current: Arc<Mutex<Arc<SimGuest>>>, stop: Arc<AtomicBool>) -> ClientLog {
    let mut log = ClientLog {
        acked: Vec::new(),
        refused: Duration::ZERO,
        paused_errors: 0,
    };
    let mut refused_since: Option<Instant> = None;
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        let guest = current.lock().unwrap().clone();
        let record = format!("record-{n}").into_bytes();
        match guest.service_append(&record) {
            Ok(seq) => {
                if let Some(since) = refused_since.take() {
                    log.refused = log.refused.max(since.elapsed());
                }
                log.acked.push((seq, record));
                n += 1;
            }
            Err(ServiceError::Paused) | Err(ServiceError::NotRunning) => {
                log.paused_errors += 1;
                refused_since.get_or_insert_with(Instant::now);
                std::thread::yield_now();
            }
            Err(e) => panic!("unexpected service error: {e}"),
        }
        if n % 64 == 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    log
}

#[test]
fn live_copy_of_a_running_guest_keeps_memory_and_every_acknowledged_append() {
    let mut config = SimGuestConfig::new(
        256 * MIB,
        Workload {
            dirty_pages_per_sec: Some(20_000),
            pattern: Pattern::HotSet {
                write_percent: 80,
                page_percent: 10,
            },
            seed: 11,
        },
    );
    config.vcpus = 2;
    let source = SimGuest::boot(config.clone()).unwrap();
    // Incompressible contents in every page, as a real guest would have.
    source
        .guest_fill(
            config.service_pages,
            source.page_count() - config.service_pages,
            3,
        )
        .unwrap();
    let target = SimGuest::incoming(config).unwrap();

    let current = Arc::new(Mutex::new(source.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (current, stop) = (current.clone(), stop.clone());
        std::thread::spawn(move || run_client(current, stop))
    };
    // Let the client and the workload get going before the move.
    let writes_before = source.writes();
    while source.writes() < writes_before + 2_000 || source.service_records().unwrap().len() < 100 {
        std::thread::yield_now();
    }

    let report = live_copy(
        source.as_ref(),
        target.as_ref(),
        &LocalCopyConfig::default(),
    )
    .unwrap();
    // The switch now points at the target; the source stays paused for good.
    *current.lock().unwrap() = target.clone();
    assert!(
        source.is_paused(),
        "the source must not resume after the copy"
    );
    assert_eq!(source.service_append(b"late"), Err(ServiceError::Paused));
    source.destroy();

    // Appends continue on the target.
    let acked_at_switch = target.service_records().unwrap().len();
    while target.service_records().unwrap().len() < acked_at_switch + 100 {
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Release);
    let client = client.join().unwrap();

    let (src_digest, dst_digest) = report.digests.expect("verified copy");
    assert_eq!(src_digest, dst_digest);
    let records = target.service_records().unwrap();
    assert_eq!(
        records, client.acked,
        "every acknowledged append, in order, and nothing else"
    );
    let seqs: Vec<u64> = records.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "sequence continues without gaps"
    );
    assert!(target.writes() > 0, "the workload runs on the target");
    assert!(
        report.rounds.len() >= 2,
        "at least one dirty round: {:?}",
        report.rounds
    );

    println!(
        "live copy: {} rounds, {} MiB copied, blackout {:?} (client refused for {:?}, {} refusals), total {:?}",
        report.rounds.len(),
        report.bytes_copied() / MIB,
        report.blackout,
        client.refused,
        client.paused_errors,
        report.total
    );
}

#[test]
fn a_guest_dirtying_faster_than_the_copy_converges_by_throttling() {
    let config = SimGuestConfig::new(
        64 * MIB,
        Workload {
            dirty_pages_per_sec: None,
            pattern: Pattern::Uniform,
            seed: 5,
        },
    );
    let source = SimGuest::boot(config.clone()).unwrap();
    let target = SimGuest::incoming(config).unwrap();
    // The vCPU must be writing flat out before the copy starts.
    while source.writes() < 200_000 {
        std::thread::yield_now();
    }
    let copy = LocalCopyConfig {
        stop_pages: 64,
        max_rounds: 40,
        throttle_step: 0.25,
        ..Default::default()
    };
    let report = live_copy(source.as_ref(), target.as_ref(), &copy).unwrap();
    let (a, b) = report.digests.unwrap();
    assert_eq!(a, b);
    let last = report.rounds.last().unwrap();
    assert!(
        last.throttle > 0.0,
        "an unbounded dirtier needs throttling: {:?}",
        report.rounds
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while target.writes() == 0 {
        assert!(
            Instant::now() < deadline,
            "the workload never ran on the target"
        );
        std::thread::yield_now();
    }
}

#[test]
fn bad_inputs_are_clear_errors_and_change_nothing() {
    use ferry_vmm::{DeviceState, DirtyBitmap, GuestError};
    let config = SimGuestConfig::new(8 * MIB, Workload::idle());
    let guest = SimGuest::boot(config.clone()).unwrap();
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
        guest.write_pages(pages, &buf),
        Err(GuestError::PageOutOfRange {
            first: pages,
            end: pages + 2,
            pages
        })
    );
    assert_eq!(
        guest.read_pages(0, &mut buf[..10]),
        Err(GuestError::UnalignedBuffer { len: 10 })
    );

    let mut wrong = DirtyBitmap::new(pages + 1);
    assert_eq!(
        guest.fetch_and_clear_dirty(&mut wrong),
        Err(GuestError::BitmapSize {
            expected: pages,
            got: pages + 1
        })
    );

    assert!(matches!(guest.save_state(), Err(GuestError::NotPaused(_))));
    guest.pause().unwrap();
    let state = guest.save_state().unwrap();
    let before = guest.digest().unwrap();

    let mut bytes = state.encode();
    bytes[..4].copy_from_slice(&99u32.to_le_bytes());
    let decoded = DeviceState::decode(&bytes);
    assert!(
        matches!(
            decoded,
            Err(GuestError::UnknownStateVersion { found: 99, .. })
        ),
        "{decoded:?}"
    );

    let mut other = state.clone();
    other.kind = "kvm".into();
    assert!(matches!(
        guest.restore_state(&other),
        Err(GuestError::StateKind { .. })
    ));
    let mut garbled = state.clone();
    garbled.vcpus[0].registers = vec![0xff; 3];
    assert!(matches!(
        guest.restore_state(&garbled),
        Err(GuestError::MalformedState(_))
    ));
    let mut extra_vcpu = state.clone();
    extra_vcpu.vcpus.push(extra_vcpu.vcpus[0].clone());
    assert!(matches!(
        guest.restore_state(&extra_vcpu),
        Err(GuestError::StateMismatch(_))
    ));
    assert_eq!(
        guest.digest().unwrap(),
        before,
        "rejected states change nothing"
    );

    assert!(matches!(
        guest.set_throttle(1.5),
        Err(GuestError::BadThrottle(_))
    ));
    assert_eq!(guest.service_append(b"x"), Err(ServiceError::Paused));
    guest.resume().unwrap();
    assert_eq!(
        guest.service_append(&[0u8; 5000]),
        Err(ServiceError::TooLarge(5000))
    );
    assert_eq!(guest.service_append(b"ok"), Ok(1));

    let small = SimGuest::incoming(SimGuestConfig::new(4 * MIB, Workload::idle())).unwrap();
    assert!(matches!(
        live_copy(guest.as_ref(), small.as_ref(), &LocalCopyConfig::default()),
        Err(GuestError::StateMismatch(_))
    ));
}
