//! What this node's KVM can do, found once at start.
//!
//! Nothing about `/dev/kvm` is taken for granted: it may be missing, closed
//! to this user, served by a hypervisor that lacks a capability Ferry needs,
//! or unable to run a long-mode CPL3 guest at all. [`probe`] checks the
//! capabilities and then boots a tiny guest and watches it write memory and
//! show up in the dirty log. A node whose probe fails refuses KVM guests with
//! the probe's reason.

use kvm_bindings::{KVM_CAP_DEBUGREGS, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_XSAVE2};
use kvm_ioctls::{Cap, Kvm};
use std::io::Write;
use std::sync::OnceLock;

/// Why KVM guests cannot run on this node. Its text is the reason alone, e.g.
/// `/dev/kvm not present`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KvmUnavailable(pub String);

/// The KVM features this node has, as far as Ferry uses them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmCaps {
    pub api_version: i32,
    /// Recommended vCPUs per VM.
    pub max_vcpus: usize,
    /// An in-kernel interrupt controller can be created (then its state and
    /// each vCPU's local APIC are saved and restored).
    pub irqchip: bool,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: fetch and re-protect separately.
    pub manual_dirty_log_protect: bool,
    /// `KVM_GET_CLOCK`/`KVM_SET_CLOCK`.
    pub adjust_clock: bool,
    /// `KVM_GET_TSC_KHZ`.
    pub get_tsc_khz: bool,
    /// `KVM_SET_TSC_KHZ` (TSC scaling): without it a guest keeps the TSC rate
    /// of the host it lands on.
    pub tsc_scaling: bool,
    /// `KVM_CAP_XCRS`.
    pub xcrs: bool,
    /// Size of the XSAVE area if larger than the legacy 4 KiB.
    pub xsave2_size: Option<usize>,
}

impl KvmCaps {
    /// One line for logs: what a test or node start found.
    pub fn summary(&self) -> String {
        format!(
            "api {} irqchip={} manual_protect={} clock={} tsc_khz={} tsc_scaling={} xsave={}",
            self.api_version,
            self.irqchip,
            self.manual_dirty_log_protect,
            self.adjust_clock,
            self.get_tsc_khz,
            self.tsc_scaling,
            self.xsave2_size.unwrap_or(4096)
        )
    }
}

/// Opens `/dev/kvm` and reads its capabilities, refusing if one that Ferry
/// cannot do without is missing. Does not run a guest.
pub fn detect() -> Result<(Kvm, KvmCaps), KvmUnavailable> {
    detect_at(std::path::Path::new("/dev/kvm"))
}

/// [`detect`] with the KVM device at `path`.
pub fn detect_at(path: &std::path::Path) -> Result<(Kvm, KvmCaps), KvmUnavailable> {
    let shown = path.display();
    if !path.exists() {
        return Err(KvmUnavailable(format!("{shown} not present")));
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| KvmUnavailable(format!("{shown}: not a usable path")))?;
    let kvm = Kvm::new_with_path(c_path.as_c_str())
        .map_err(|e| KvmUnavailable(format!("cannot open {shown}: {e}")))?;
    let api_version = kvm.get_api_version();
    if api_version != 12 {
        return Err(KvmUnavailable(format!(
            "KVM API version {api_version}, Ferry needs 12"
        )));
    }
    let required = [
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (
            Cap::ImmediateExit,
            "KVM_CAP_IMMEDIATE_EXIT (pausing vCPUs promptly)",
        ),
        (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS (vCPU state)"),
        (Cap::Xsave, "KVM_CAP_XSAVE (vCPU state)"),
        (Cap::MpState, "KVM_CAP_MP_STATE (vCPU state)"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    ];
    for (cap, name) in required {
        if !kvm.check_extension(cap) {
            return Err(KvmUnavailable(format!("KVM lacks {name}")));
        }
    }
    if kvm.check_extension_raw(u64::from(KVM_CAP_DEBUGREGS)) <= 0 {
        return Err(KvmUnavailable(
            "KVM lacks KVM_CAP_DEBUGREGS (vCPU state)".into(),
        ));
    }
    let xsave2 = kvm.check_extension_raw(u64::from(KVM_CAP_XSAVE2));
    let caps = KvmCaps {
        api_version,
        max_vcpus: kvm.get_nr_vcpus(),
        irqchip: kvm.check_extension(Cap::Irqchip),
        manual_dirty_log_protect: kvm
            .check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2))
            > 0,
        adjust_clock: kvm.check_extension(Cap::AdjustClock),
        get_tsc_khz: kvm.check_extension(Cap::GetTscKhz),
        tsc_scaling: kvm.check_extension(Cap::TscControl),
        xcrs: kvm.check_extension(Cap::Xcrs),
        xsave2_size: usize::try_from(xsave2).ok().filter(|size| *size > 4096),
    };
    Ok((kvm, caps))
}

static PROBED: OnceLock<Result<KvmCaps, KvmUnavailable>> = OnceLock::new();

/// Whether this node can run KVM guests, and with what. The first call checks
/// the capabilities and boots a test guest (a few milliseconds); later calls
/// return the same answer.
pub fn probe() -> Result<KvmCaps, KvmUnavailable> {
    PROBED
        .get_or_init(|| {
            let (_, caps) = detect()?;
            super::KvmGuest::trial(&caps)
                .map_err(|e| KvmUnavailable(format!("a test guest did not run: {e}")))?;
            Ok(caps)
        })
        .clone()
}

/// For tests and examples that need KVM: the capabilities, or `None` after
/// printing `SKIPPED kvm: <reason> (<what>)` straight to stderr (past the test
/// harness's capture, so a CI log always shows whether KVM tests ran). When
/// KVM is usable it prints `RUNNING kvm: <what> (<capabilities>)`.
pub fn usable_or_skip(what: &str) -> Option<KvmCaps> {
    let line = match probe() {
        Ok(caps) => {
            let line = format!("RUNNING kvm: {what} ({})\n", caps.summary());
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
            return Some(caps);
        }
        Err(reason) => format!("SKIPPED kvm: {reason} ({what})\n"),
    };
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_wrong_device_is_refused_with_its_reason() {
        let missing = detect_at(std::path::Path::new("/nonexistent/kvm")).err();
        assert_eq!(
            missing,
            Some(KvmUnavailable("/nonexistent/kvm not present".into()))
        );
        // A device that is not KVM: opening works, the first ioctl does not.
        match detect_at(std::path::Path::new("/dev/null")) {
            Err(KvmUnavailable(reason)) => {
                assert!(reason.contains("/dev/null") || reason.contains("API"))
            }
            Ok(_) => panic!("/dev/null taken for KVM"),
        }
    }
}
