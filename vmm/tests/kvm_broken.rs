//! A broken KVM guest makes the KVM tests fail; it never passes for "no KVM
//! here". The test-only switch `FERRY_TEST_BREAK_KVM_GUEST=1` loads a guest
//! program that faults at its first instruction; the probe caches its answer
//! once per process, so the broken run is a child process: this test binary
//! again, running one ordinary KVM test with the switch set (and without
//! `FERRY_CI_PROVIDES`, to show the failure does not depend on CI).
//!
//! Where this host has no usable KVM, the parent skips as every KVM test
//! does (`SKIPPED kvm: ...`), or fails where `FERRY_CI_PROVIDES` names `kvm`.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

use ferry_vmm::kvm::{self, KvmGuest, KvmGuestConfig, BREAK_GUEST_ENV, CI_PROVIDES_ENV};
use ferry_vmm::{Guest, Workload};
use std::process::Command;
use std::time::{Duration, Instant};

/// An ordinary KVM test; the test below also runs it with the guest broken.
#[test]
fn a_guest_boots_and_writes() {
    let Some(_) = kvm::usable_or_skip("a_guest_boots_and_writes") else {
        return;
    };
    let guest = KvmGuest::boot(KvmGuestConfig::new(4 << 20, Workload::uniform(20_000, 3))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while guest.writes() < 100 {
        assert_eq!(guest.failure(), None);
        assert!(
            Instant::now() < deadline,
            "the guest made {} writes in 5 s",
            guest.writes()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    guest.destroy();
}

#[test]
fn a_broken_guest_fails_the_kvm_tests_instead_of_skipping() {
    let name = "a_broken_guest_fails_the_kvm_tests_instead_of_skipping";
    let Some(_) = kvm::usable_or_skip(name) else {
        return;
    };
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_guest_boots_and_writes",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(BREAK_GUEST_ENV, "1")
        .env("RUST_BACKTRACE", "0")
        .env_remove(CI_PROVIDES_ENV)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("running 1 test"),
        "the child ran no test:\n{text}"
    );
    assert!(
        !out.status.success(),
        "a broken guest passed the KVM test:\n{text}"
    );
    assert!(
        text.contains("GuestFailed"),
        "the child failed, but not for its guest:\n{text}"
    );
    assert!(!text.contains("SKIPPED kvm"), "the child skipped:\n{text}");
    // Only the line that says why: the child's own runner lines ("test
    // result: FAILED") would read as this run's in a log.
    let why = text
        .lines()
        .find(|l| l.contains("GuestFailed"))
        .unwrap_or_default();
    println!("the child, with {BREAK_GUEST_ENV}=1, failed as it must: {why}");
}
