//! KVM vCPU and VM state as versioned values.
//!
//! What an x86-64 vCPU carries is what Firecracker saves: CPUID, MSRs, debug
//! registers, local APIC (with an in-kernel irqchip), MP state, registers,
//! special registers, pending events, XCRs, XSAVE area and TSC frequency. The
//! VM adds the KVM clock and the interrupt controllers (if created), plus the
//! layout the guest was booted with, so a target laid out differently refuses.
//!
//! Each blob is `version (u32 LE) ‖ bincode(body)`; the version is read first,
//! and an unknown one is refused by name before anything else is decoded.
//! KVM structs are serialized as their raw bytes (kvm-bindings' `serde`).

use super::layout::Layout;
use super::KvmCaps;
use crate::guest::{GuestError, GuestResult};
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave,
    KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The vCPU-state format this build writes and reads.
pub const KVM_VCPU_STATE_VERSION: u32 = 1;
/// The VM-state format this build writes and reads.
pub const KVM_VM_STATE_VERSION: u32 = 1;
/// Largest blob accepted when decoding.
const MAX_BLOB: usize = 4 << 20;

/// `IA32_TSC`, and the MSRs that count time while a guest is paused: left
/// out of the digest, which compares guests at different instants.
const CLOCK_MSRS: [u32; 4] = [0x10, 0xe7, 0xe8, 0x6e0];

/// One x86-64 vCPU, version 1.
#[derive(Clone, Serialize, Deserialize)]
pub struct KvmVcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub debug_regs: kvm_debugregs,
    /// Present when the VM has an in-kernel irqchip.
    pub lapic: Option<kvm_lapic_state>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub vcpu_events: kvm_vcpu_events,
    pub xcrs: Option<kvm_xcrs>,
    /// The XSAVE area as 32-bit words: 1024 (legacy) or more (XSAVE2).
    pub xsave: Vec<u32>,
    pub tsc_khz: Option<u32>,
}

/// The layout a guest was booted with; a target must match it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutKey {
    pub pages: u64,
    pub service_pages: u64,
    pub vcpus: u32,
    pub workload_first: u64,
}

impl From<&Layout> for LayoutKey {
    fn from(l: &Layout) -> Self {
        LayoutKey {
            pages: l.pages,
            service_pages: l.service_pages,
            vcpus: l.vcpus,
            workload_first: l.workload_first,
        }
    }
}

/// The VM, version 1.
#[derive(Clone, Serialize, Deserialize)]
pub struct KvmVmState {
    pub layout: LayoutKey,
    pub clock: Option<kvm_clock_data>,
    /// PIC master, PIC slave, IOAPIC, when the VM has an in-kernel irqchip.
    pub irqchips: Vec<kvm_irqchip>,
}

/// `version ‖ bincode(value)`.
pub fn encode<T: Serialize>(version: u32, value: &T) -> GuestResult<Vec<u8>> {
    let mut out = version.to_le_bytes().to_vec();
    let body = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| GuestError::Backend(format!("encoding KVM state: {e}")))?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a blob written by [`encode`], refusing another version first.
pub fn decode<T: DeserializeOwned>(what: &str, supported: u32, bytes: &[u8]) -> GuestResult<T> {
    let Some((version, body)) = bytes.split_first_chunk::<4>() else {
        return Err(GuestError::MalformedState(format!(
            "{what}: shorter than its version"
        )));
    };
    let found = u32::from_le_bytes(*version);
    if found != supported {
        return Err(GuestError::UnknownStateVersion { found, supported });
    }
    let config = bincode::config::standard().with_limit::<MAX_BLOB>();
    let (value, used) = bincode::serde::decode_from_slice::<T, _>(body, config)
        .map_err(|e| GuestError::MalformedState(format!("{what}: {e}")))?;
    if used != body.len() {
        return Err(GuestError::MalformedState(format!(
            "{what}: {} trailing bytes",
            body.len() - used
        )));
    }
    Ok(value)
}

fn kvm_err(what: &str) -> impl Fn(kvm_ioctls::Error) -> GuestError + '_ {
    move |e| GuestError::Backend(format!("{what}: {e}"))
}

impl KvmVcpuState {
    /// Reads a stopped vCPU's state (Firecracker's order).
    pub fn save(fd: &VcpuFd, caps: &KvmCaps, msr_list: &[u32]) -> GuestResult<KvmVcpuState> {
        let mp_state = fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let xsave = save_xsave(fd, caps)?;
        let xcrs = if caps.xcrs {
            Some(fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?)
        } else {
            None
        };
        let debug_regs = fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
        let lapic = if caps.irqchip {
            Some(fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?)
        } else {
            None
        };
        let tsc_khz = if caps.get_tsc_khz {
            fd.get_tsc_khz().ok()
        } else {
            None
        };
        let cpuid = fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let msrs = save_msrs(fd, msr_list)?;
        let vcpu_events = fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        Ok(KvmVcpuState {
            cpuid,
            msrs,
            debug_regs,
            lapic,
            mp_state,
            regs,
            sregs,
            vcpu_events,
            xcrs,
            xsave,
            tsc_khz,
        })
    }

    /// Checks that this state can go into a vCPU of this node before anything
    /// is changed.
    pub fn check(&self, caps: &KvmCaps, index: u32) -> GuestResult<()> {
        if self.lapic.is_some() && !caps.irqchip {
            return Err(GuestError::StateMismatch(format!(
                "vCPU {index} has a local APIC but this node's KVM has no in-kernel irqchip"
            )));
        }
        if self.xcrs.is_some() && !caps.xcrs {
            return Err(GuestError::StateMismatch(format!(
                "vCPU {index} has XCRs but this node's KVM cannot set them"
            )));
        }
        if self.xsave.len() < 1024 {
            return Err(GuestError::MalformedState(format!(
                "vCPU {index}: XSAVE area of {} words",
                self.xsave.len()
            )));
        }
        // KVM_SET_XSAVE reads as many bytes as this node's XSAVE area has.
        let needed = caps.xsave2_size.unwrap_or(std::mem::size_of::<kvm_xsave>());
        if self.xsave.len() * 4 < needed {
            return Err(GuestError::StateMismatch(format!(
                "vCPU {index}: XSAVE area of {} bytes, this node's KVM reads {needed}",
                self.xsave.len() * 4
            )));
        }
        Ok(())
    }

    /// Writes this state into a stopped vCPU (Firecracker's order).
    pub fn restore(&self, index: u32, fd: &VcpuFd, caps: &KvmCaps) -> GuestResult<()> {
        if let (Some(saved), true) = (self.tsc_khz, caps.get_tsc_khz) {
            let here = fd.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
            if here != saved {
                if caps.tsc_scaling {
                    fd.set_tsc_khz(saved).map_err(kvm_err("KVM_SET_TSC_KHZ"))?;
                } else {
                    tracing::warn!(
                        vcpu = index,
                        saved,
                        here,
                        "TSC frequency differs and this host cannot scale it: the guest's TSC now runs at this host's rate"
                    );
                }
            }
        }
        let cpuid = CpuId::from_entries(&self.cpuid)
            .map_err(|e| GuestError::MalformedState(format!("vCPU {index}: CPUID: {e:?}")))?;
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        restore_xsave(fd, &self.xsave)?;
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        fd.set_debug_regs(&self.debug_regs)
            .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        if let Some(lapic) = &self.lapic {
            fd.set_lapic(lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
        }
        restore_msrs(fd, &self.msrs)?;
        fd.set_vcpu_events(&self.vcpu_events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// The same state with the clocks zeroed, for the digest.
    pub fn without_clocks(&self) -> KvmVcpuState {
        let mut s = self.clone();
        for msr in &mut s.msrs {
            if CLOCK_MSRS.contains(&msr.index) {
                msr.data = 0;
            }
        }
        if let Some(lapic) = s.lapic.as_mut() {
            // Timer current count (APIC register 0x390).
            lapic.regs[0x390..0x394].fill(0);
        }
        s
    }
}

fn save_msrs(fd: &VcpuFd, list: &[u32]) -> GuestResult<Vec<kvm_msr_entry>> {
    let mut out = Vec::with_capacity(list.len());
    for chunk in list.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<_> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| GuestError::Backend(format!("building an MSR list: {e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        if n != chunk.len() {
            return Err(GuestError::Backend(format!(
                "KVM_GET_MSRS could not read MSR {:#x}",
                chunk[n]
            )));
        }
        out.extend_from_slice(msrs.as_slice());
    }
    Ok(out)
}

fn restore_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> GuestResult<()> {
    for chunk in entries.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk)
            .map_err(|e| GuestError::MalformedState(format!("MSR list: {e:?}")))?;
        let n = fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if n != chunk.len() {
            return Err(GuestError::StateMismatch(format!(
                "this node's KVM refuses MSR {:#x} = {:#x}",
                chunk[n].index, chunk[n].data
            )));
        }
    }
    Ok(())
}

fn save_xsave(fd: &VcpuFd, caps: &KvmCaps) -> GuestResult<Vec<u32>> {
    match caps.xsave2_size {
        Some(size) => {
            let extra = (size - std::mem::size_of::<kvm_xsave>()).div_ceil(4);
            let mut xsave = Xsave::new(extra)
                .map_err(|e| GuestError::Backend(format!("XSAVE buffer: {e:?}")))?;
            // SAFETY: `xsave` was allocated with room for the whole area whose
            // size KVM_CAP_XSAVE2 reported.
            unsafe { fd.get_xsave2(&mut xsave) }.map_err(kvm_err("KVM_GET_XSAVE2"))?;
            let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
            words.extend_from_slice(xsave.as_slice());
            Ok(words)
        }
        None => Ok(fd
            .get_xsave()
            .map_err(kvm_err("KVM_GET_XSAVE"))?
            .region
            .to_vec()),
    }
}

fn restore_xsave(fd: &VcpuFd, words: &[u32]) -> GuestResult<()> {
    let (region, extra) = words.split_at(1024.min(words.len()));
    let mut xsave =
        Xsave::new(extra.len()).map_err(|e| GuestError::Backend(format!("XSAVE buffer: {e:?}")))?;
    // SAFETY: only the fixed-size region is written; the length of the
    // flexible array, which `as_mut_fam_struct` lets us break, is untouched.
    unsafe { xsave.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(region);
    xsave.as_mut_slice().copy_from_slice(extra);
    // SAFETY: `xsave` holds the region plus `extra.len()` words, and
    // `KvmVcpuState::check` (called before any restore) made sure that is at
    // least the size this node's KVM reads for KVM_SET_XSAVE.
    unsafe { fd.set_xsave2(&xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))
}

impl KvmVmState {
    pub fn save(vm: &VmFd, caps: &KvmCaps, layout: &Layout) -> GuestResult<KvmVmState> {
        let clock = if caps.adjust_clock {
            Some(vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?)
        } else {
            None
        };
        let mut irqchips = Vec::new();
        if caps.irqchip {
            for chip_id in [
                KVM_IRQCHIP_PIC_MASTER,
                KVM_IRQCHIP_PIC_SLAVE,
                KVM_IRQCHIP_IOAPIC,
            ] {
                let mut chip = kvm_irqchip {
                    chip_id,
                    ..Default::default()
                };
                vm.get_irqchip(&mut chip)
                    .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
                irqchips.push(chip);
            }
        }
        Ok(KvmVmState {
            layout: layout.into(),
            clock,
            irqchips,
        })
    }

    pub fn check(&self, caps: &KvmCaps, layout: &Layout) -> GuestResult<()> {
        let here = LayoutKey::from(layout);
        if self.layout != here {
            return Err(GuestError::StateMismatch(format!(
                "the guest was laid out as {:?}, this one as {here:?}",
                self.layout
            )));
        }
        if !self.irqchips.is_empty() && !caps.irqchip {
            return Err(GuestError::StateMismatch(
                "the guest has an in-kernel irqchip and this node's KVM has none".into(),
            ));
        }
        Ok(())
    }

    pub fn restore(&self, vm: &VmFd, caps: &KvmCaps) -> GuestResult<()> {
        if let (Some(clock), true) = (self.clock, caps.adjust_clock) {
            // KVM refuses to be told its TSC is stable.
            let clock = kvm_clock_data {
                flags: clock.flags & !KVM_CLOCK_TSC_STABLE,
                ..clock
            };
            vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
        }
        for chip in &self.irqchips {
            vm.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }

    pub fn without_clocks(&self) -> KvmVmState {
        KvmVmState {
            clock: None,
            ..self.clone()
        }
    }
}
