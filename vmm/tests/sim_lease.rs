//! A `SimGuest` bound to a run lease: while the lease does not hold, its vCPUs
//! write nothing and its service acknowledges nothing, without anyone calling
//! `pause`; pause, resume and destroy keep working while it is fenced.
#![allow(clippy::unwrap_used)]

use ferry_vmm::{Guest, RunLease, ServiceError, SimGuest, SimGuestConfig, Workload};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// How long the write counter must stand still to count as stopped.
const QUIET: Duration = Duration::from_millis(50);

fn boot() -> Arc<SimGuest> {
    let guest = SimGuest::boot(SimGuestConfig::new(
        32 * MIB,
        Workload::uniform(100_000, 11),
    ))
    .unwrap();
    let at_boot = guest.writes();
    wait_for("the guest to write", Duration::from_secs(5), || {
        guest.writes() > at_boot
    });
    guest
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until the write counter stands still for `QUIET`; returns its value.
fn settled_writes(guest: &SimGuest) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = guest.writes();
    loop {
        std::thread::sleep(QUIET);
        let now = guest.writes();
        if now == last {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the guest kept writing ({last} then {now})"
        );
        last = now;
    }
}

/// Asserts that the guest writes nothing more over a window.
fn stays_at(guest: &SimGuest, writes: u64, why: &str) {
    std::thread::sleep(QUIET);
    assert_eq!(guest.writes(), writes, "{why}");
}

fn extend(lease: &RunLease) {
    lease.extend_to(Instant::now() + Duration::from_secs(600));
}

#[test]
fn an_expired_lease_stops_writes_and_appends_until_it_is_extended() {
    let guest = boot();
    assert_eq!(guest.service_append(b"before"), Ok(1));

    let lease = RunLease::expired();
    guest.bind_lease(lease.clone());
    assert_eq!(guest.service_append(b"fenced"), Err(ServiceError::Fenced));
    let fenced = settled_writes(&guest);
    stays_at(&guest, fenced, "a fenced guest does not write");
    assert!(!guest.is_paused(), "fencing is not a pause");
    assert_eq!(
        guest.service_records().unwrap(),
        vec![(1, b"before".to_vec())],
        "the log is still readable, and the refused append is not in it"
    );

    extend(&lease);
    wait_for(
        "writes after the lease is extended",
        Duration::from_secs(5),
        || guest.writes() > fenced,
    );
    assert_eq!(guest.service_append(b"after"), Ok(2));
    guest.destroy();
}

#[test]
fn pause_resume_and_destroy_work_while_fenced() {
    let guest = boot();
    let lease = RunLease::expired();
    guest.bind_lease(lease.clone());
    let fenced = settled_writes(&guest);

    let t = Instant::now();
    guest.pause().unwrap();
    let latency = t.elapsed();
    assert!(
        latency < Duration::from_millis(500),
        "pause took {latency:?}"
    );
    assert!(guest.is_paused());
    assert_eq!(guest.service_append(b"x"), Err(ServiceError::Fenced));

    // Resumed but still fenced: still nothing runs.
    guest.resume().unwrap();
    assert!(!guest.is_paused());
    stays_at(
        &guest,
        fenced,
        "a resumed guest runs only once its lease holds",
    );
    assert_eq!(guest.service_append(b"x"), Err(ServiceError::Fenced));

    // The lease holds again, but the guest is paused: still nothing runs.
    guest.pause().unwrap();
    extend(&lease);
    stays_at(&guest, fenced, "a paused guest does not write");
    assert_eq!(guest.service_append(b"x"), Err(ServiceError::Paused));
    guest.resume().unwrap();
    wait_for("writes after resume", Duration::from_secs(5), || {
        guest.writes() > fenced
    });
    assert_eq!(guest.service_append(b"x"), Ok(1));

    // Destroy returns while the vCPUs are held by the lease.
    guest.bind_lease(RunLease::expired());
    settled_writes(&guest);
    let (done, destroyed) = std::sync::mpsc::channel();
    let destroying = {
        let guest = guest.clone();
        std::thread::spawn(move || {
            guest.destroy();
            let _ = done.send(());
        })
    };
    destroyed
        .recv_timeout(Duration::from_secs(5))
        .expect("destroy of a fenced guest returns");
    destroying.join().unwrap();
    assert_eq!(guest.service_append(b"x"), Err(ServiceError::NotRunning));
}

#[test]
fn a_lease_that_runs_out_fences_the_guest_by_itself() {
    let guest = boot();
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
                if start >= deadline {
                    break;
                }
            }
            Err(e) => panic!("unexpected service error: {e}"),
        }
        assert!(Instant::now() < give_up, "appends still acknowledged");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Every append that ended before the deadline was acknowledged; the
    // guest's writes stopped with no pause.
    let fenced = settled_writes(&guest);
    stays_at(&guest, fenced, "a guest whose lease ran out does not write");
    assert!(!guest.is_paused());
    // Every acknowledged record is in the log; one the lease ran out under
    // while it was written may be there unacknowledged.
    let records = guest.service_records().unwrap().len() as u64;
    assert!((acked..=acked + 1).contains(&records), "{records} records");
    guest.destroy();
}

#[test]
fn a_revoked_lease_is_not_brought_back_by_a_late_extension() {
    let guest = boot();
    let lease = RunLease::until(Instant::now() + Duration::from_secs(600));
    guest.bind_lease(lease.clone());
    assert_eq!(guest.service_append(b"x"), Ok(1));
    lease.revoke();
    assert_eq!(guest.service_append(b"x"), Err(ServiceError::Fenced));
    extend(&lease);
    assert_eq!(guest.service_append(b"x"), Err(ServiceError::Fenced));
    let fenced = settled_writes(&guest);
    stays_at(
        &guest,
        fenced,
        "a guest whose lease was revoked does not write",
    );

    // Binding a new lease (a node that rejoined) lets the guest run again.
    guest.bind_lease(RunLease::unlimited());
    assert_eq!(guest.service_append(b"x"), Ok(2));
    guest.destroy();
}
