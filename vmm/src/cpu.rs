//! Named x86 CPU features and where CPUID reports them.
//!
//! A node reports [`host_features`] to the cluster store, which compares
//! them: a VM in processor compatibility mode is given the cluster's common
//! baseline, and a KVM guest's CPUID is [`mask`]ed to it, as QEMU's CPU
//! models and vMotion's EVC do, so it can move to any node that has the
//! baseline. The table names features that user code can use and that differ
//! between processor generations; bits the table does not name (APIC IDs,
//! topology, long mode itself, the OS-controlled bits) are left as they are.

use std::collections::BTreeSet;

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax = 0,
    Ebx = 1,
    Ecx = 2,
    Edx = 3,
}

/// Where CPUID reports one feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

const fn f(name: &'static str, leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> Feature {
    Feature {
        name,
        leaf,
        subleaf,
        reg,
        bit,
    }
}

/// Extended function leaf with the AMD-defined feature flags.
pub const EXT_FEATURES: u32 = 0x8000_0001;

/// The features Ferry compares and masks.
pub const FEATURES: &[Feature] = &[
    // Leaf 1, ECX.
    f("sse3", 1, 0, Reg::Ecx, 0),
    f("pclmulqdq", 1, 0, Reg::Ecx, 1),
    f("ssse3", 1, 0, Reg::Ecx, 9),
    f("fma", 1, 0, Reg::Ecx, 12),
    f("cx16", 1, 0, Reg::Ecx, 13),
    f("sse4_1", 1, 0, Reg::Ecx, 19),
    f("sse4_2", 1, 0, Reg::Ecx, 20),
    f("movbe", 1, 0, Reg::Ecx, 22),
    f("popcnt", 1, 0, Reg::Ecx, 23),
    f("aes", 1, 0, Reg::Ecx, 25),
    f("xsave", 1, 0, Reg::Ecx, 26),
    f("avx", 1, 0, Reg::Ecx, 28),
    f("f16c", 1, 0, Reg::Ecx, 29),
    f("rdrand", 1, 0, Reg::Ecx, 30),
    // Leaf 7 subleaf 0, EBX.
    f("fsgsbase", 7, 0, Reg::Ebx, 0),
    f("bmi1", 7, 0, Reg::Ebx, 3),
    f("avx2", 7, 0, Reg::Ebx, 5),
    f("bmi2", 7, 0, Reg::Ebx, 8),
    f("erms", 7, 0, Reg::Ebx, 9),
    f("avx512f", 7, 0, Reg::Ebx, 16),
    f("avx512dq", 7, 0, Reg::Ebx, 17),
    f("rdseed", 7, 0, Reg::Ebx, 18),
    f("adx", 7, 0, Reg::Ebx, 19),
    f("avx512ifma", 7, 0, Reg::Ebx, 21),
    f("clflushopt", 7, 0, Reg::Ebx, 23),
    f("clwb", 7, 0, Reg::Ebx, 24),
    f("avx512cd", 7, 0, Reg::Ebx, 28),
    f("sha", 7, 0, Reg::Ebx, 29),
    f("avx512bw", 7, 0, Reg::Ebx, 30),
    f("avx512vl", 7, 0, Reg::Ebx, 31),
    // Leaf 7 subleaf 0, ECX.
    f("avx512vbmi", 7, 0, Reg::Ecx, 1),
    f("avx512_vbmi2", 7, 0, Reg::Ecx, 6),
    f("gfni", 7, 0, Reg::Ecx, 8),
    f("vaes", 7, 0, Reg::Ecx, 9),
    f("vpclmulqdq", 7, 0, Reg::Ecx, 10),
    f("avx512_vnni", 7, 0, Reg::Ecx, 11),
    f("avx512_bitalg", 7, 0, Reg::Ecx, 12),
    f("avx512_vpopcntdq", 7, 0, Reg::Ecx, 14),
    f("rdpid", 7, 0, Reg::Ecx, 22),
    // Leaf 7 subleaf 0, EDX.
    f("fsrm", 7, 0, Reg::Edx, 4),
    // Leaf 0x8000_0001.
    f("lahf_lm", EXT_FEATURES, 0, Reg::Ecx, 0),
    f("lzcnt", EXT_FEATURES, 0, Reg::Ecx, 5),
    f("sse4a", EXT_FEATURES, 0, Reg::Ecx, 6),
    f("prefetchw", EXT_FEATURES, 0, Reg::Ecx, 8),
    f("rdtscp", EXT_FEATURES, 0, Reg::Edx, 27),
];

/// One CPUID leaf's output: eax, ebx, ecx, edx.
pub type Registers = [u32; 4];

/// Whether `feature` is set in `regs`, the output of its leaf and subleaf.
pub fn has(feature: &Feature, regs: &Registers) -> bool {
    regs[feature.reg as usize] & (1 << feature.bit) != 0
}

/// The named features set in the output of one leaf.
pub fn features_in(leaf: u32, subleaf: u32, regs: &Registers) -> BTreeSet<String> {
    FEATURES
        .iter()
        .filter(|f| f.leaf == leaf && f.subleaf == subleaf && has(f, regs))
        .map(|f| f.name.to_string())
        .collect()
}

/// Clears, in the output of `leaf`/`subleaf`, every feature of the table that
/// `allowed` does not name.
pub fn mask_leaf(leaf: u32, subleaf: u32, regs: &mut Registers, allowed: &BTreeSet<String>) {
    for feature in FEATURES {
        if feature.leaf == leaf && feature.subleaf == subleaf && !allowed.contains(feature.name) {
            regs[feature.reg as usize] &= !(1 << feature.bit);
        }
    }
}

/// One leaf of a CPUID table, as a hypervisor sets it for a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    pub leaf: u32,
    pub subleaf: u32,
    pub regs: Registers,
}

/// [`mask_leaf`] over a whole table.
pub fn mask(entries: &mut [Leaf], allowed: &BTreeSet<String>) {
    for entry in entries {
        mask_leaf(entry.leaf, entry.subleaf, &mut entry.regs, allowed);
    }
}

/// The named features in a set of leaves (each leaf's table features).
pub fn features_of(entries: &[Leaf]) -> BTreeSet<String> {
    entries
        .iter()
        .flat_map(|e| features_in(e.leaf, e.subleaf, &e.regs))
        .collect()
}

/// CPUID on this processor.
#[cfg(target_arch = "x86_64")]
pub fn host_cpuid(leaf: u32, subleaf: u32) -> Registers {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// The leaves the table uses, read from this processor; leaves above the
/// highest the processor reports read as zero (CPUID would repeat another).
#[cfg(target_arch = "x86_64")]
pub fn host_leaves() -> Vec<Leaf> {
    let max_basic = host_cpuid(0, 0)[0];
    let max_ext = host_cpuid(0x8000_0000, 0)[0];
    let mut leaves: Vec<(u32, u32)> = FEATURES.iter().map(|f| (f.leaf, f.subleaf)).collect();
    leaves.sort_unstable();
    leaves.dedup();
    leaves
        .into_iter()
        .map(|(leaf, subleaf)| {
            let max = if leaf >= 0x8000_0000 {
                max_ext
            } else {
                max_basic
            };
            let regs = if leaf <= max {
                host_cpuid(leaf, subleaf)
            } else {
                [0; 4]
            };
            Leaf {
                leaf,
                subleaf,
                regs,
            }
        })
        .collect()
}

/// The table's features this processor has (what a node reports).
#[cfg(target_arch = "x86_64")]
pub fn host_features() -> BTreeSet<String> {
    features_of(&host_leaves())
}

/// Not x86-64: no feature of the table.
#[cfg(not(target_arch = "x86_64"))]
pub fn host_features() -> BTreeSet<String> {
    BTreeSet::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_and_bits_are_unique() {
        let names: BTreeSet<_> = FEATURES.iter().map(|f| f.name).collect();
        assert_eq!(names.len(), FEATURES.len());
        let bits: BTreeSet<_> = FEATURES
            .iter()
            .map(|f| (f.leaf, f.subleaf, f.reg as u8, f.bit))
            .collect();
        assert_eq!(bits.len(), FEATURES.len());
        assert!(FEATURES.iter().all(|f| f.bit < 32));
    }

    #[test]
    fn masking_clears_only_disallowed_table_bits() {
        let mut leaves = vec![
            Leaf {
                leaf: 1,
                subleaf: 0,
                regs: [0x000a_06a0, 0x0100_0800, u32::MAX, u32::MAX],
            },
            Leaf {
                leaf: 7,
                subleaf: 0,
                regs: [0, u32::MAX, u32::MAX, u32::MAX],
            },
            Leaf {
                leaf: 7,
                subleaf: 1,
                regs: [u32::MAX; 4],
            },
            Leaf {
                leaf: 0xb,
                subleaf: 0,
                regs: [1, 2, 3, 4],
            },
        ];
        let allowed = set(&["sse4_2", "avx2", "no_such_feature"]);
        mask(&mut leaves, &allowed);
        // Leaf 1: eax/ebx untouched, edx untouched (no table bit), ecx keeps
        // sse4_2 and every bit the table does not name.
        assert_eq!(leaves[0].regs[0], 0x000a_06a0);
        assert_eq!(leaves[0].regs[1], 0x0100_0800);
        assert_eq!(leaves[0].regs[3], u32::MAX);
        let ecx = leaves[0].regs[2];
        assert_ne!(ecx & (1 << 20), 0, "sse4_2 allowed");
        assert_eq!(ecx & (1 << 19), 0, "sse4_1 masked");
        assert_eq!(ecx & (1 << 28), 0, "avx masked");
        assert_ne!(ecx & (1 << 31), 0, "the hypervisor bit is not the table's");
        assert_ne!(ecx & (1 << 27), 0, "osxsave is the OS's, not the table's");
        assert_ne!(leaves[1].regs[1] & (1 << 5), 0, "avx2 allowed");
        assert_eq!(leaves[1].regs[1] & (1 << 3), 0, "bmi1 masked");
        assert_eq!(
            leaves[2].regs,
            [u32::MAX; 4],
            "subleaf 1 is not the table's"
        );
        assert_eq!(leaves[3].regs, [1, 2, 3, 4]);
        assert_eq!(features_of(&leaves), set(&["sse4_2", "avx2"]));
    }

    #[test]
    fn masking_to_everything_changes_nothing() {
        let all: BTreeSet<String> = FEATURES.iter().map(|f| f.name.to_string()).collect();
        let mut leaves = vec![Leaf {
            leaf: 1,
            subleaf: 0,
            regs: [1, 2, 0x7fff_ffff, 4],
        }];
        let before = leaves.clone();
        mask(&mut leaves, &all);
        assert_eq!(leaves, before);
        mask(&mut leaves, &BTreeSet::new());
        assert!(features_of(&leaves).is_empty());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn this_host_has_the_x86_64_baseline() {
        let features = host_features();
        // Every x86-64 processor Ferry runs on has these (x86-64-v2 level).
        for name in ["cx16", "sse3", "ssse3", "popcnt", "lahf_lm"] {
            assert!(features.contains(name), "{name} missing from {features:?}");
        }
    }
}
