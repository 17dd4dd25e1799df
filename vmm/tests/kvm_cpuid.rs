//! Processor compatibility on a real KVM guest: the guest program executes
//! CPUID and stores the leaves in its control block; with `cpu_features` set
//! the leaves it reads lack every table feature outside that set, while an
//! unmasked guest shows the host's; and a guest restored elsewhere executes
//! CPUID again there and still reads the masked leaves its saved state
//! carries. Where CPUID at CPL3 does not reach KVM (no CPUID faulting, as
//! under this machine's PVM) the guest reads the processor's own CPUID: those
//! two tests say so and skip, and the third still checks the CPUID KVM is
//! given. Each test passes `kvm::usable_or_skip` first.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]
#![allow(clippy::unwrap_used)]

use ferry_vmm::cpu::{self, Leaf};
use ferry_vmm::kvm::program::{cb, CPUID_LEAVES};
use ferry_vmm::kvm::{self, KvmGuest, KvmGuestConfig};
use ferry_vmm::{Guest, Workload, PAGE_SIZE};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn config(features: Option<BTreeSet<String>>) -> KvmGuestConfig {
    let mut c = KvmGuestConfig::new(16 * MIB, Workload::uniform(20_000, 7));
    c.service_pages = 16;
    c.vcpus = 2;
    c.cpu_features = features;
    c
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The leaves vCPU `index` stored, once its batch count passed `batches`:
/// the program executes CPUID before a batch (at entry, or at the doorbell
/// read where the host asks), so two more batches mean it has stored them.
fn leaves(guest: &KvmGuest, index: u32, batches: u64) -> Vec<Leaf> {
    wait_for("the program's CPUID", Duration::from_secs(5), || {
        guest.counters()[index as usize].batches >= batches + 2
    });
    let stored = guest.cpuid_leaves(index).unwrap();
    CPUID_LEAVES
        .iter()
        .zip(stored)
        .map(|(&(leaf, subleaf), regs)| Leaf {
            leaf,
            subleaf,
            regs,
        })
        .collect()
}

/// A feature the unmasked guest sees (and so could lose to masking).
fn victim(seen: &BTreeSet<String>) -> String {
    ["avx2", "sse4_2", "popcnt", "ssse3"]
        .into_iter()
        .find(|f| seen.contains(*f))
        .or_else(|| seen.iter().next().map(String::as_str))
        .expect("the unmasked guest sees no feature of the table")
        .to_string()
}

/// Whether the masked guest read the processor's own CPUID rather than
/// KVM's: CPUID at CPL3 does not exit to the hypervisor on this host.
fn reads_raw_host_cpuid(masked: &[Leaf], victim: &str) -> bool {
    cpu::features_of(masked).contains(victim) && cpu::host_features().contains(victim)
}

#[test]
fn a_masked_guest_reads_the_baseline_not_the_host() {
    let name = "a_masked_guest_reads_the_baseline_not_the_host";
    let Some(_) = kvm::usable_or_skip(name) else {
        return;
    };
    let host = cpu::host_features();
    let plain = KvmGuest::boot(config(None)).unwrap();
    let seen = cpu::features_of(&leaves(&plain, 0, 0));
    assert_eq!(plain.failure(), None);
    plain.destroy();
    let victim = victim(&seen);
    eprintln!("host features {host:?}; the unmasked guest sees {seen:?}; masking {victim}");

    let mut allowed = seen.clone();
    allowed.remove(&victim);
    let masked = KvmGuest::boot(config(Some(allowed.clone()))).unwrap();
    for index in 0..2 {
        let got = leaves(&masked, index, 0);
        if reads_raw_host_cpuid(&got, &victim) {
            masked.destroy();
            eprintln!(
                "SKIPPED kvm: {name}: the guest still sees {victim}: CPUID executed at CPL3 \
                 returns the processor's own CPUID (as this host's outer hypervisor answers \
                 it), not the table KVM_SET_CPUID2 set; this host's KVM runs guest code \
                 natively without CPUID faulting, so masking cannot be shown here"
            );
            return;
        }
        assert_eq!(
            cpu::features_of(&got),
            allowed,
            "vCPU {index} reads the baseline: {victim} cleared, the rest as the host's"
        );
        // The APIC ID is still this vCPU's: masking touched only feature bits.
        assert_eq!(got[1].regs[1] >> 24, index);
    }
    assert_eq!(masked.failure(), None);
    masked.destroy();
}

/// Copies a paused `src` into a paused `dst` (memory, then device state).
fn copy_paused(src: &KvmGuest, dst: &KvmGuest) {
    let pages = src.page_count();
    let mut buf = vec![0u8; 256 * PAGE_SIZE];
    let mut first = 0;
    while first < pages {
        let n = (pages - first).min(256);
        let chunk = &mut buf[..n as usize * PAGE_SIZE];
        src.read_pages(first, chunk).unwrap();
        dst.write_pages(first, chunk).unwrap();
        first += n;
    }
    dst.restore_state(&src.save_state().unwrap()).unwrap();
}

#[test]
fn a_restored_guest_reads_cpuid_again_and_keeps_its_mask() {
    let name = "a_restored_guest_reads_cpuid_again_and_keeps_its_mask";
    let Some(_) = kvm::usable_or_skip(name) else {
        return;
    };
    let plain = KvmGuest::boot(config(None)).unwrap();
    let seen = cpu::features_of(&leaves(&plain, 0, 0));
    plain.destroy();
    let victim = victim(&seen);
    let mut allowed = seen.clone();
    allowed.remove(&victim);

    let source: Arc<KvmGuest> = KvmGuest::boot(config(Some(allowed.clone()))).unwrap();
    let before = [leaves(&source, 0, 0), leaves(&source, 1, 0)];
    // Without CPUID faulting the mask cannot be seen, but the program must
    // still execute CPUID again after the restore: that part runs anyway.
    let masked = !reads_raw_host_cpuid(&before[0], &victim);
    wait_for("writes", Duration::from_secs(5), || source.writes() > 100);
    source.pause().unwrap();

    // The target is configured without a mask: what it runs with comes from
    // the saved state.
    let target = KvmGuest::incoming(config(None)).unwrap();
    copy_paused(&source, &target);
    source.destroy();
    // Wipe what the source stored, so what the target's leaves show was
    // executed on the target after the restore.
    let layout = *target.layout();
    for index in 0..2u32 {
        let page = layout.control + u64::from(index);
        let mut block = vec![0u8; PAGE_SIZE];
        target.read_pages(page, &mut block).unwrap();
        block[cb::CPUID..cb::CPUID + 64].fill(0);
        target.write_pages(page, &block).unwrap();
    }
    assert_eq!(target.cpuid_leaves(0).unwrap(), [[0; 4]; 4]);
    let restored = target.counters();
    target.resume().unwrap();
    for (index, before) in before.iter().enumerate() {
        let after = leaves(&target, index as u32, restored[index].batches);
        assert_ne!(after[0].regs, [0; 4], "vCPU {index} executed CPUID again");
        if masked {
            assert_eq!(&after, before, "vCPU {index}'s CPUID after the restore");
            assert!(!cpu::features_of(&after).contains(&victim));
        } else {
            assert_eq!(cpu::features_of(&after), cpu::features_of(before));
        }
    }
    assert_eq!(target.failure(), None);
    target.destroy();
    if !masked {
        eprintln!(
            "SKIPPED kvm: {name}: (in part) the guest still sees {victim}: CPUID at CPL3 \
             returns the processor's own CPUID, not KVM's (no CPUID faulting on this \
             host); checked only that the restored guest executed CPUID again"
        );
    }
}

/// The CPUID KVM answers with (what each vCPU's saved state carries) is the
/// masked one, on the guest booted masked and on a guest restored from it
/// that was configured without a mask. Holds wherever KVM runs, CPUID
/// faulting or not.
#[test]
fn kvm_is_given_the_masked_cpuid_and_a_restore_keeps_it() {
    let name = "kvm_is_given_the_masked_cpuid_and_a_restore_keeps_it";
    let Some(_) = kvm::usable_or_skip(name) else {
        return;
    };
    let plain = KvmGuest::boot(config(None)).unwrap();
    plain.pause().unwrap();
    let table = kvm::saved_cpu_features(&plain.save_state().unwrap(), 0).unwrap();
    plain.destroy();
    let victim = ["avx2", "sse4_2", "cx16", "clflushopt"]
        .into_iter()
        .find(|f| table.contains(*f))
        .or_else(|| table.iter().next().map(String::as_str))
        .expect("KVM supports no feature of the table")
        .to_string();
    let mut allowed = table.clone();
    allowed.remove(&victim);

    let source = KvmGuest::boot(config(Some(allowed.clone()))).unwrap();
    wait_for("writes", Duration::from_secs(5), || source.writes() > 100);
    source.pause().unwrap();
    let saved = source.save_state().unwrap();
    if kvm::saved_cpu_features(&saved, 0)
        .unwrap()
        .contains(&victim)
    {
        source.destroy();
        eprintln!(
            "SKIPPED kvm: {name}: KVM_GET_CPUID2 still shows {victim} after \
             KVM_SET_CPUID2 without it: this host's KVM (PVM) keeps the processor's \
             own CPUID for its guests, so masking cannot be shown here"
        );
        return;
    }
    for index in 0..2 {
        assert_eq!(
            kvm::saved_cpu_features(&saved, index).unwrap(),
            allowed,
            "vCPU {index} is given the table's features but {victim}"
        );
    }
    let target = KvmGuest::incoming(config(None)).unwrap();
    copy_paused(&source, &target);
    source.destroy();
    target.resume().unwrap();
    let restored = target.writes();
    wait_for("the target's writes", Duration::from_secs(5), || {
        target.writes() > restored + 100
    });
    target.pause().unwrap();
    let saved = target.save_state().unwrap();
    for index in 0..2 {
        assert_eq!(kvm::saved_cpu_features(&saved, index).unwrap(), allowed);
    }
    assert_eq!(target.failure(), None);
    target.destroy();
}
