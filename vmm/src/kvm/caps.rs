//! What this node's KVM can do, found once at start.
//!
//! Nothing about `/dev/kvm` is taken for granted: it may be missing, closed
//! to this user, or served by a hypervisor that lacks a capability Ferry
//! needs. [`probe`] checks the capabilities and then boots a tiny guest and
//! watches it write memory and show up in the dirty log. A node whose probe
//! fails refuses KVM guests with the probe's reason.
//!
//! The two kinds of "no" are kept apart: [`KvmUnavailable::HostLacksKvm`] is
//! the kernel's answer (no device, no access, a missing capability, no VM),
//! a fact about the host; [`KvmUnavailable::GuestFailed`] is Ferry's own
//! guest not doing what it should on a KVM that said yes — a bug until shown
//! otherwise. [`usable_or_skip`] is the one policy every KVM test follows:
//! skip (saying so) only for the first, and only where CI does not promise
//! KVM.

use kvm_bindings::{KVM_CAP_DEBUGREGS, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_XSAVE2};
use kvm_ioctls::{Cap, Kvm};
use std::io::Write;
use std::sync::OnceLock;

/// Why KVM guests cannot run on this node. Its text is the reason alone, e.g.
/// `/dev/kvm not present`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvmUnavailable {
    /// The kernel's answer: `/dev/kvm` absent or not openable, the wrong API
    /// version, a capability Ferry needs missing, or `KVM_CREATE_VM` refused.
    /// This host has no usable KVM.
    #[error("{0}")]
    HostLacksKvm(String),
    /// KVM said yes to all of that, and Ferry's own trial guest then did not
    /// run, did not write, or its writes were not in the dirty log. Our guest
    /// (or its loader) is broken; never a reason for a test to skip.
    #[error("Ferry's test guest failed on this KVM: {0}")]
    GuestFailed(String),
}

impl KvmUnavailable {
    /// The reason, without saying which kind it is.
    pub fn reason(&self) -> &str {
        match self {
            KvmUnavailable::HostLacksKvm(reason) | KvmUnavailable::GuestFailed(reason) => reason,
        }
    }

    /// Ferry's guest failed (not the host's KVM).
    pub fn is_guest_failure(&self) -> bool {
        matches!(self, KvmUnavailable::GuestFailed(_))
    }
}

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

/// Opens `/dev/kvm`, reads its capabilities, refusing if one that Ferry
/// cannot do without is missing, and creates (and drops) an empty VM. Does
/// not run a guest. Every refusal is [`KvmUnavailable::HostLacksKvm`].
pub fn detect() -> Result<(Kvm, KvmCaps), KvmUnavailable> {
    detect_at(std::path::Path::new("/dev/kvm"))
}

/// [`detect`] with the KVM device at `path`.
pub fn detect_at(path: &std::path::Path) -> Result<(Kvm, KvmCaps), KvmUnavailable> {
    use KvmUnavailable::HostLacksKvm;
    let shown = path.display();
    if !path.exists() {
        return Err(HostLacksKvm(format!("{shown} not present")));
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| HostLacksKvm(format!("{shown}: not a usable path")))?;
    let kvm = Kvm::new_with_path(c_path.as_c_str())
        .map_err(|e| HostLacksKvm(format!("cannot open {shown}: {e}")))?;
    let api_version = kvm.get_api_version();
    if api_version < 0 {
        return Err(HostLacksKvm(format!(
            "{shown} does not answer KVM_GET_API_VERSION: not a KVM device"
        )));
    }
    if api_version != 12 {
        return Err(HostLacksKvm(format!(
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
            return Err(HostLacksKvm(format!("KVM lacks {name}")));
        }
    }
    if kvm.check_extension_raw(u64::from(KVM_CAP_DEBUGREGS)) <= 0 {
        return Err(HostLacksKvm(
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
    // Capabilities are not a VM: a host may still refuse to create one (no
    // virtualization in the CPU, a nested hypervisor that says no, limits).
    kvm.create_vm()
        .map_err(|e| HostLacksKvm(format!("KVM_CREATE_VM: {e}")))?;
    Ok((kvm, caps))
}

static PROBED: OnceLock<Result<KvmCaps, KvmUnavailable>> = OnceLock::new();

/// Whether this node can run KVM guests, and with what. The first call checks
/// the capabilities and boots a test guest (a few milliseconds); later calls
/// return the same answer. A refusal by the kernel is
/// [`KvmUnavailable::HostLacksKvm`]; the test guest failing on a KVM that
/// accepted everything is [`KvmUnavailable::GuestFailed`].
pub fn probe() -> Result<KvmCaps, KvmUnavailable> {
    PROBED
        .get_or_init(|| {
            let (_, caps) = detect()?;
            super::KvmGuest::trial(&caps).map_err(KvmUnavailable::GuestFailed)?;
            Ok(caps)
        })
        .clone()
}

/// The environment variable in which CI names, comma-separated, what it
/// provides (`kvm`, `netns`, `browser`, ...); set by `.ci/run`. A test that
/// needs something named there fails instead of skipping without it.
pub const CI_PROVIDES_ENV: &str = "FERRY_CI_PROVIDES";

/// Whether `FERRY_CI_PROVIDES` names `what`.
pub fn ci_provides(what: &str) -> bool {
    std::env::var(CI_PROVIDES_ENV).is_ok_and(|list| names(&list, what))
}

fn names(list: &str, what: &str) -> bool {
    list.split(',').any(|item| item.trim() == what)
}

/// What a KVM test does with the probe's answer.
#[derive(Debug, PartialEq)]
enum Gate {
    Run(KvmCaps),
    Skip(String),
    Fail(String),
}

/// The skip policy, in one place: our guest failing is a failure anywhere;
/// a host without KVM is a skip, unless CI says it provides KVM.
fn gate(what: &str, probed: Result<KvmCaps, KvmUnavailable>, ci_kvm: bool) -> Gate {
    match probed {
        Ok(caps) => Gate::Run(caps),
        Err(KvmUnavailable::GuestFailed(reason)) => Gate::Fail(format!(
            "KVM guest broken (GuestFailed), a failure on any host: {what}: {reason}"
        )),
        Err(KvmUnavailable::HostLacksKvm(reason)) if ci_kvm => Gate::Fail(format!(
            "{CI_PROVIDES_ENV} says it provides kvm, but (HostLacksKvm): {what}: {reason}"
        )),
        Err(KvmUnavailable::HostLacksKvm(reason)) => {
            Gate::Skip(format!("SKIPPED kvm: {what}: {reason}"))
        }
    }
}

/// The gate every KVM test (and example) passes first. Returns the
/// capabilities when KVM is usable, after printing
/// `RUNNING kvm: <what> (<capabilities>)`. When this host has no usable KVM
/// ([`KvmUnavailable::HostLacksKvm`]) it prints
/// `SKIPPED kvm: <what>: <reason>` and returns `None` — unless
/// `FERRY_CI_PROVIDES` names `kvm`, where it panics. When Ferry's own test
/// guest failed ([`KvmUnavailable::GuestFailed`]) it panics, CI or not.
/// Lines go straight to stderr, past the test harness's capture, so a log
/// always shows whether KVM tests ran.
pub fn usable_or_skip(what: &str) -> Option<KvmCaps> {
    let line = match gate(what, probe(), ci_provides("kvm")) {
        Gate::Run(caps) => {
            let line = format!("RUNNING kvm: {what} ({})\n", caps.summary());
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
            return Some(caps);
        }
        Gate::Fail(message) => panic!("{message}"),
        Gate::Skip(line) => line + "\n",
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
            Some(KvmUnavailable::HostLacksKvm(
                "/nonexistent/kvm not present".into()
            ))
        );
        // A device that is not KVM: opening works, the first ioctl does not.
        match detect_at(std::path::Path::new("/dev/null")) {
            Err(KvmUnavailable::HostLacksKvm(reason)) => {
                assert!(reason.contains("/dev/null"), "{reason}")
            }
            other => panic!("/dev/null taken for KVM: {other:?}"),
        }
    }

    #[test]
    fn only_a_host_without_kvm_skips_and_only_outside_ci() {
        let host = || Err(KvmUnavailable::HostLacksKvm("/dev/kvm not present".into()));
        let guest = || Err(KvmUnavailable::GuestFailed("Shutdown exit".into()));
        assert_eq!(
            gate("t", host(), false),
            Gate::Skip("SKIPPED kvm: t: /dev/kvm not present".into())
        );
        match gate("t", host(), true) {
            Gate::Fail(m) => {
                assert!(m.contains("says it provides kvm") && m.contains("t: /dev/kvm"))
            }
            other => panic!("{other:?}"),
        }
        for ci in [false, true] {
            match gate("t", guest(), ci) {
                Gate::Fail(m) => assert!(m.contains("GuestFailed") && m.contains("Shutdown exit")),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn ci_provides_is_a_comma_separated_list() {
        assert!(names("netns,kvm", "kvm"));
        assert!(names(" netns , kvm ", "kvm"));
        assert!(!names("netns,kvmx", "kvm"));
        assert!(!names("", "kvm"));
    }

    #[test]
    fn the_two_kinds_display_their_reason() {
        let host = KvmUnavailable::HostLacksKvm("/dev/kvm not present".into());
        assert_eq!(host.to_string(), "/dev/kvm not present");
        assert!(!host.is_guest_failure());
        let guest = KvmUnavailable::GuestFailed("no writes".into());
        assert!(guest.to_string().contains("no writes") && guest.is_guest_failure());
        assert_eq!(guest.reason(), "no writes");
    }
}
