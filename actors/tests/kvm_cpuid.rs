//! Processor compatibility end to end: nodes report the features of their
//! processor's CPUID, and a KVM guest in compatibility mode reads CPUID
//! masked to the cluster's baseline — its program executes CPUID and stores
//! the leaves — on the node it started on and, after a move, on the target.
//! The KVM test passes `ferry_vmm::kvm::usable_or_skip` first.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry_actors::local::{vm_config, LocalOptions};
use ferry_actors::migration::source::MoveRequest;
use ferry_cluster::model::Backend;
use ferry_cluster::Command;
use ferry_vmm::cpu;
use std::collections::BTreeSet;

#[test]
fn nodes_report_their_processors_features() {
    run(async {
        let cluster = TestCluster::start("cpu-hw", 2).await.unwrap();
        let state = cluster.node(1).shared.cluster.read();
        let host = cpu::host_features();
        if cfg!(target_arch = "x86_64") {
            assert!(host.contains("cx16") && host.contains("sse3"), "{host:?}");
        }
        for id in [1, 2] {
            assert_eq!(state.nodes[&id].cpu_features, host, "node {id}");
        }
    });
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod kvm {
    use super::*;
    use ferry_actors::actors::StartVm;
    use ferry_actors::node::spec_of;
    use ferry_vmm::kvm::program::{cb, CPUID_LEAVES};
    use ferry_vmm::kvm::{KvmGuest, KvmGuestConfig, Layout};
    use ferry_vmm::{Guest, Workload, PAGE_SIZE};
    use std::time::{Duration, Instant};

    const NAME: &str = "a_compatible_kvm_guest_reads_the_baseline_before_and_after_a_move";

    /// vCPU `index`'s control block: (batches done, the CPUID leaves stored).
    fn control_block(guest: &dyn Guest, layout: &Layout, index: u32) -> (u64, Vec<cpu::Leaf>) {
        let mut page = vec![0u8; PAGE_SIZE];
        guest
            .read_pages(layout.control + u64::from(index), &mut page)
            .unwrap();
        let u32_at = |at: usize| u32::from_le_bytes(page[at..at + 4].try_into().unwrap());
        let batches = u64::from_le_bytes(page[cb::BATCHES..cb::BATCHES + 8].try_into().unwrap());
        let leaves = CPUID_LEAVES
            .iter()
            .enumerate()
            .map(|(i, &(leaf, subleaf))| {
                let at = cb::CPUID + i * 16;
                cpu::Leaf {
                    leaf,
                    subleaf,
                    regs: [u32_at(at), u32_at(at + 4), u32_at(at + 8), u32_at(at + 12)],
                }
            })
            .collect();
        (batches, leaves)
    }

    /// The leaves vCPU `index` stores once two batches pass `after`: the
    /// program executes CPUID before a batch when it boots and when the host
    /// asks after a restore.
    async fn leaves_after(
        guest: &dyn Guest,
        layout: &Layout,
        index: u32,
        after: u64,
    ) -> Vec<cpu::Leaf> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (batches, leaves) = control_block(guest, layout, index);
            if batches >= after + 2 {
                return leaves;
            }
            assert!(Instant::now() < deadline, "vCPU {index} makes no progress");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The table's features an unmasked KVM guest sees on this host.
    fn seen_unmasked() -> BTreeSet<String> {
        let mut config = KvmGuestConfig::new(16 << 20, Workload::uniform(10_000, 3));
        config.service_pages = 16;
        let guest = KvmGuest::boot(config).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while guest.counters()[0].batches < 2 {
            assert!(
                Instant::now() < deadline,
                "the plain guest makes no progress"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let stored = guest.cpuid_leaves(0).unwrap();
        guest.destroy();
        let leaves: Vec<cpu::Leaf> = CPUID_LEAVES
            .iter()
            .zip(stored)
            .map(|(&(leaf, subleaf), regs)| cpu::Leaf {
                leaf,
                subleaf,
                regs,
            })
            .collect();
        cpu::features_of(&leaves)
    }

    #[test]
    fn a_compatible_kvm_guest_reads_the_baseline_before_and_after_a_move() {
        if ferry_vmm::kvm::usable_or_skip(NAME).is_none() {
            return;
        }
        let host = cpu::host_features();
        let seen = seen_unmasked();
        let Some(victim) = ["avx2", "sse4_2", "popcnt", "ssse3"]
            .into_iter()
            .find(|f| seen.contains(*f) && host.contains(*f))
            .or_else(|| seen.intersection(&host).next().map(String::as_str))
            .map(str::to_string)
        else {
            panic!("a KVM guest sees none of the host's features: {seen:?}");
        };
        run(async move {
            // Node 2 is the same processor without `victim`: the baseline.
            let mut older = host.clone();
            older.remove(&victim);
            let mut options = LocalOptions::new(2);
            options.cpu_features = vec![host.clone(), older.clone()];
            let cluster = TestCluster::start_options("kvm-cpuid", options)
                .await
                .unwrap();
            let mut config = vm_config(32 * MIB, workload(10_000), 11);
            config.backend = Backend::Kvm;
            config.vcpus = 2;
            let service_pages = spec_of(&config).unwrap().service_pages;
            let layout = Layout::new(config.memory_bytes, service_pages, config.vcpus).unwrap();
            cluster
                .write(Command::CreateVm {
                    name: "calc".into(),
                    config,
                    node: 1,
                })
                .await
                .unwrap();
            cluster
                .write(Command::SetProcessorCompatibility {
                    vm: "calc".into(),
                    enabled: true,
                })
                .await
                .unwrap();
            cluster
                .node(1)
                .actor
                .send(StartVm("calc".into()))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                cluster.node(1).shared.cluster.read().vms["calc"].cpu_features,
                older
            );

            let source = cluster.node(1).shared.guest("calc").unwrap();
            let before = leaves_after(source.as_ref(), &layout, 0, 0).await;
            let before_seen = cpu::features_of(&before);
            // Without CPUID faulting the guest reads the processor's own
            // CPUID: the move is still made and checked, the mask is not.
            let masked = !before_seen.contains(&victim);
            let before_1 = leaves_after(source.as_ref(), &layout, 1, 0).await;
            if masked {
                // The baseline, not the host: what an unmasked guest would
                // see of the baseline.
                let expected: BTreeSet<String> = seen.intersection(&older).cloned().collect();
                assert_eq!(before_seen, expected);
                assert_eq!(cpu::features_of(&before_1), expected);
            }

            let mut request = MoveRequest::new("calc", 2);
            request.verify = true;
            cluster
                .move_vm(request, 1)
                .await
                .expect("the compatible guest moves");
            let target = cluster.node(2).shared.guest("calc").unwrap();
            for (index, before) in [(0, &before), (1, &before_1)] {
                let (now, _) = control_block(target.as_ref(), &layout, index);
                let after = leaves_after(target.as_ref(), &layout, index, now).await;
                if masked {
                    assert_eq!(&after, before, "vCPU {index}'s CPUID on the target");
                } else {
                    assert_eq!(cpu::features_of(&after), cpu::features_of(before));
                }
            }
            if !masked {
                eprintln!(
                    "SKIPPED kvm: {NAME}: (in part) the guest still sees {victim}: CPUID \
                     executed at CPL3 returns the processor's own CPUID, not the table \
                     KVM_SET_CPUID2 set (no CPUID faulting under this host's hypervisor), so \
                     the mask cannot be shown here; the compatible guest's move was checked"
                );
            }
        });
    }
}
