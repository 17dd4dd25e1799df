//! `KvmGuest`: a real virtual machine on Linux KVM, behind the same [`Guest`]
//! trait as [`SimGuest`](crate::SimGuest).
//!
//! Its vCPUs run a small built-in x86-64 program ([`program`]) in 64-bit long
//! mode at CPL3 — the host sets up page tables, GDT and registers so no
//! kernel-mode boot code runs (on a software hypervisor such as PVM, CPL0
//! code runs about a thousand times slower than CPL3 code). The program does
//! the SimGuest workload (the same SplitMix64 choices from the same seed) and
//! serves the same append service, with the log in the first pages of guest
//! memory laid out as [`ServiceLog`] reads it. Its counters live in guest
//! memory, so they move with it. It reaches the host through a doorbell page
//! mapped past the end of memory (each access is an MMIO exit): one read per
//! batch of writes, one write per append served; appends come in through a
//! mailbox page in guest memory ([`layout`]).
//!
//! - Memory is one [`GuestMemory`] mapping registered as KVM slot 0 with
//!   `KVM_MEM_LOG_DIRTY_PAGES` from boot; the dirty log is fetched with the
//!   raw ioctls into the caller's [`DirtyBitmap`] (manual protect when KVM has
//!   it), plus the few pages the host itself wrote (the mailbox), which KVM
//!   does not log.
//! - Pause kicks every vCPU out of `KVM_RUN` (signal + `immediate_exit`) and
//!   returns once all are parked; throttle and dirty rate are host-side sleeps
//!   at the doorbell between batches (`vcpu.rs`).
//! - The bound [`RunLease`] is checked before every `KVM_RUN`: while it does
//!   not hold, a vCPU stays out of the guest (`vcpu.rs`) and appends are
//!   refused.
//! - State is saved and restored as versioned values ([`state`]).
//! - [`probe`] finds out at start whether this node can run KVM guests at
//!   all; [`KvmGuest::boot`] refuses with its reason if not. It tells a host
//!   without usable KVM from Ferry's own guest failing, and KVM tests pass
//!   [`usable_or_skip`], which skips only for the first.

pub mod caps;
pub mod layout;
pub mod program;
pub mod state;
mod vcpu;

pub use caps::{ci_provides, probe, usable_or_skip, KvmCaps, KvmUnavailable, CI_PROVIDES_ENV};
pub use layout::Layout;
pub use program::BREAK_GUEST_ENV;
pub use state::{KvmVcpuState, KvmVmState, KVM_VCPU_STATE_VERSION, KVM_VM_STATE_VERSION};

use crate::dirty::{DirtyBitmap, DirtyLog};
use crate::guest::{Guest, GuestError, GuestResult, MemoryDigest, PAGE_SIZE};
use crate::lease::{BoundLease, RunLease};
use crate::memory::GuestMemory;
use crate::service::{ServiceError, ServiceLog, MAX_RECORD, SERVICE_PAGES};
use crate::state::{DeviceState, NicState, VcpuState};
use crate::workload::{Pattern, VcpuContext, Workload};
use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, kvm_userspace_memory_region, KVMIO,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{Kvm, VmFd};
use layout::get_u64;
use program::{cb, mb};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vcpu::{lock, Control, Run, Vcpu};
use vmm_sys_util::ioctl::ioctl_with_ref;

/// The backend name in saved state.
pub const KIND: &str = "kvm";
/// How long an append waits for the guest before calling it unresponsive.
const SERVICE_TIMEOUT: Duration = Duration::from_secs(5);

vmm_sys_util::ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// How the dirty log is fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyLogMode {
    /// Manual protect if KVM has it, else get-and-clear.
    #[default]
    Auto,
    /// `KVM_GET_DIRTY_LOG` alone: KVM copies, clears and re-protects at once.
    GetAndClear,
    /// `KVM_GET_DIRTY_LOG` then `KVM_CLEAR_DIRTY_LOG` for the pages it
    /// returned (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`).
    ManualProtect,
}

/// How to build a KVM guest.
#[derive(Debug, Clone, PartialEq)]
pub struct KvmGuestConfig {
    pub memory_bytes: u64,
    pub vcpus: u32,
    /// What the guest program does; the rate is kept by the host, the pattern
    /// and seed are written into guest memory at boot.
    pub workload: Workload,
    /// Pages at the start of memory for the service log (as `SimGuest`).
    pub service_pages: u64,
    pub mac: [u8; 6],
    /// Fill the workload pages with incompressible data at boot (the same
    /// bytes as `SimGuest`'s prefill); `None` boots with zeroed memory.
    pub prefill_seed: Option<u64>,
    /// Stop writing after this many page writes over all vCPUs (tests that
    /// replay the program's writes exactly). `None`: no limit.
    pub write_limit: Option<u64>,
    pub dirty_log: DirtyLogMode,
    /// Processor compatibility: the named features (`cpu::FEATURES`) the
    /// guest's CPUID may show; every other feature of the table is cleared,
    /// fixed at boot. `None`: the host's CPUID as KVM supports it. An
    /// incoming guest takes the CPUID its saved state carries instead.
    pub cpu_features: Option<BTreeSet<String>>,
}

impl KvmGuestConfig {
    pub fn new(memory_bytes: u64, workload: Workload) -> Self {
        // As SimGuestConfig: small guests give the service a quarter at most.
        let service_pages = SERVICE_PAGES
            .min(memory_bytes / PAGE_SIZE as u64 / 4)
            .max(1);
        KvmGuestConfig {
            memory_bytes,
            vcpus: 1,
            workload,
            service_pages,
            mac: [0x02, 0, 0, 0, 0, 1],
            prefill_seed: None,
            write_limit: None,
            dirty_log: DirtyLogMode::Auto,
            cpu_features: None,
        }
    }
}

impl From<&crate::SimGuestConfig> for KvmGuestConfig {
    fn from(sim: &crate::SimGuestConfig) -> Self {
        KvmGuestConfig {
            vcpus: sim.vcpus,
            service_pages: sim.service_pages,
            mac: sim.mac,
            prefill_seed: sim.prefill_seed,
            ..KvmGuestConfig::new(sim.memory_bytes, sim.workload)
        }
    }
}

/// One vCPU's counters, read from its control block in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuCounters {
    /// Page writes done.
    pub writes: u64,
    /// Batches done (yield exits that followed writes).
    pub batches: u64,
    /// Appends served (vCPU 0).
    pub appends: u64,
    /// The workload generator's state.
    pub rng: u64,
    pub cursor: u64,
}

/// Everything the vCPU threads share with the controller. Fields drop in
/// order: vCPUs, then the VM, then the memory KVM maps.
pub(crate) struct Inner {
    vcpus: Vec<Vcpu>,
    vm: VmFd,
    _kvm: Kvm,
    caps: KvmCaps,
    config: KvmGuestConfig,
    layout: Layout,
    manual_protect: bool,
    /// MSRs saved with each vCPU.
    msr_list: Vec<u32>,
    control: Control,
    /// Pages the host wrote (boot image, mailbox): KVM does not log them.
    host_dirty: DirtyLog,
    /// Reused when merging `host_dirty` into a fetched bitmap.
    scratch: Mutex<DirtyBitmap>,
    /// One append at a time; a pause waits for the one in flight.
    service: Mutex<()>,
    nic: Mutex<NicState>,
    /// The vCPUs hold a real CPU state (booted, or restored): may run.
    armed: AtomicBool,
    destroyed: AtomicBool,
    lease: BoundLease,
    mem: GuestMemory,
}

/// A KVM virtual machine running Ferry's guest program.
pub struct KvmGuest {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl KvmGuest {
    /// Whether this node can run KVM guests (checked once per process).
    pub fn probe() -> Result<KvmCaps, KvmUnavailable> {
        caps::probe()
    }

    /// Boots a guest: the boot image and an empty service log in memory,
    /// vCPUs running the program.
    pub fn boot(config: KvmGuestConfig) -> GuestResult<Arc<KvmGuest>> {
        let caps = Self::usable()?;
        Self::build(config, caps, false)
    }

    /// Creates a guest to receive a migration: memory in huge pages, populated
    /// in the background while the copy begins, vCPUs created but parked until `restore_state` and `resume`.
    pub fn incoming(config: KvmGuestConfig) -> GuestResult<Arc<KvmGuest>> {
        let caps = Self::usable()?;
        Self::build(config, caps, true)
    }

    fn usable() -> GuestResult<KvmCaps> {
        caps::probe().map_err(|reason| {
            GuestError::Backend(format!("KVM is not usable on this node: {reason}"))
        })
    }

    /// The probe's test run: a tiny guest must do 256 writes, show them in the
    /// dirty log and pause.
    pub(crate) fn trial(caps: &KvmCaps) -> Result<(), String> {
        let mut config = KvmGuestConfig::new(1 << 20, Workload::uniform(0, 1));
        config.workload.dirty_pages_per_sec = None;
        config.service_pages = 1;
        config.write_limit = Some(256);
        let guest = Self::build(config, caps.clone(), false).map_err(|e| e.to_string())?;
        let mut bitmap = DirtyBitmap::new(guest.page_count());
        let deadline = Instant::now() + Duration::from_secs(5);
        let outcome = loop {
            if let Some(reason) = guest.failure() {
                break Err(reason);
            }
            if guest.writes() >= 256 {
                break Ok(());
            }
            if Instant::now() > deadline {
                break Err(format!(
                    "the guest made {} of 256 writes in 5 s",
                    guest.writes()
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let outcome = outcome.and_then(|()| {
            guest.pause().map_err(|e| e.to_string())?;
            guest
                .fetch_and_clear_dirty(&mut bitmap)
                .map_err(|e| e.to_string())?;
            let workload = guest.inner.layout.workload_first;
            if bitmap.iter().any(|page| page >= workload) {
                Ok(())
            } else {
                Err("the dirty log shows none of the guest's writes".into())
            }
        });
        guest.destroy();
        outcome
    }

    fn build(config: KvmGuestConfig, caps: KvmCaps, incoming: bool) -> GuestResult<Arc<KvmGuest>> {
        let backend = |e: String| GuestError::Backend(e);
        let layout = Layout::new(config.memory_bytes, config.service_pages, config.vcpus)?;
        if config.vcpus as usize > caps.max_vcpus.max(1) {
            return Err(backend(format!(
                "{} vCPUs asked, this node's KVM allows {}",
                config.vcpus, caps.max_vcpus
            )));
        }
        if let Pattern::HotSet {
            write_percent,
            page_percent,
        } = config.workload.pattern
        {
            if write_percent > 100 || page_percent > 100 {
                return Err(backend(format!(
                    "hot set {write_percent}% of writes to {page_percent}% of pages"
                )));
            }
        }
        let manual_protect = match config.dirty_log {
            DirtyLogMode::Auto => caps.manual_dirty_log_protect,
            DirtyLogMode::GetAndClear => false,
            DirtyLogMode::ManualProtect if caps.manual_dirty_log_protect => true,
            DirtyLogMode::ManualProtect => {
                return Err(backend(
                    "manual dirty-log protect asked, this node's KVM lacks it".into(),
                ));
            }
        };
        vcpu::install_kick_handler().map_err(backend)?;
        let mem = GuestMemory::new(config.memory_bytes, incoming)?;
        let kvm = Kvm::new().map_err(|e| backend(format!("opening /dev/kvm: {e}")))?;
        let vm = kvm
            .create_vm()
            .map_err(|e| backend(format!("KVM_CREATE_VM: {e}")))?;
        if manual_protect {
            let cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                args: [u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
                ..Default::default()
            };
            vm.enable_cap(&cap)
                .map_err(|e| backend(format!("enabling manual dirty-log protect: {e}")))?;
        }
        if caps.irqchip {
            // Only real mode on Intel uses the TSS area; harmless elsewhere.
            let _ = vm.set_tss_address(0xfffb_d000);
            vm.create_irq_chip()
                .map_err(|e| backend(format!("KVM_CREATE_IRQCHIP: {e}")))?;
        }
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: config.memory_bytes,
            userspace_addr: mem.as_ptr() as u64,
        };
        // SAFETY: the region is exactly the mapping `mem`, which `Inner`
        // drops after the VM (field order), so KVM never maps freed memory.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| backend(format!("KVM_SET_USER_MEMORY_REGION: {e}")))?;

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| backend(format!("KVM_GET_SUPPORTED_CPUID: {e}")))?;
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for index in 0..config.vcpus {
            let vcpu = Vcpu::create(&vm, index).map_err(backend)?;
            {
                let fd = lock(&vcpu.fd);
                let allowed = config.cpu_features.as_ref();
                fd.set_cpuid2(&vcpu::cpuid_for(&supported, index, allowed))
                    .map_err(|e| backend(format!("KVM_SET_CPUID2: {e}")))?;
            }
            vcpus.push(vcpu);
        }
        let msr_list = vcpus
            .first()
            .map(|v| vcpu::usable_msrs(&kvm, &lock(&v.fd)))
            .transpose()
            .map_err(backend)?;

        let pages = layout.pages;
        let host_dirty = DirtyLog::new(pages);
        if !incoming {
            let written = layout.write_boot_image(&mem, &config.workload);
            host_dirty.mark_range(written.start, written.end - written.start);
            ServiceLog::new(&mem, &host_dirty, config.service_pages).format();
            if let Some(seed) = config.prefill_seed {
                prefill(&mem, layout.workload_first..layout.pages, seed);
                host_dirty.mark_range(layout.workload_first, layout.workload_pages());
            }
            for vcpu in &vcpus {
                let fd = lock(&vcpu.fd);
                vcpu::set_boot_registers(&fd, &layout, vcpu.index).map_err(backend)?;
                if caps.irqchip {
                    // Secondary vCPUs would otherwise wait for a startup IPI.
                    let state = kvm_bindings::kvm_mp_state {
                        mp_state: KVM_MP_STATE_RUNNABLE,
                    };
                    fd.set_mp_state(state)
                        .map_err(|e| backend(format!("KVM_SET_MP_STATE: {e}")))?;
                }
            }
        }

        let inner = Arc::new(Inner {
            vcpus,
            vm,
            _kvm: kvm,
            caps,
            nic: Mutex::new(NicState {
                mac: config.mac,
                ..Default::default()
            }),
            config,
            layout,
            manual_protect,
            msr_list: msr_list.unwrap_or_default(),
            control: Control::new(if incoming { Run::Paused } else { Run::Running }),
            host_dirty,
            scratch: Mutex::new(DirtyBitmap::new(pages)),
            service: Mutex::new(()),
            armed: AtomicBool::new(!incoming),
            destroyed: AtomicBool::new(false),
            lease: BoundLease::new(),
            mem,
        });
        let mut threads = Vec::with_capacity(inner.vcpus.len());
        for index in 0..inner.config.vcpus {
            let thread_inner = inner.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("kvm-vcpu-{index}"))
                .spawn(move || vcpu::vcpu_thread(thread_inner, index));
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    let guest = KvmGuest {
                        inner,
                        threads: Mutex::new(threads),
                    };
                    guest.destroy();
                    return Err(backend(format!("cannot start vCPU thread: {e}")));
                }
            }
        }
        Ok(Arc::new(KvmGuest {
            inner,
            threads: Mutex::new(threads),
        }))
    }

    pub fn config(&self) -> &KvmGuestConfig {
        &self.inner.config
    }

    pub fn caps(&self) -> &KvmCaps {
        &self.inner.caps
    }

    pub fn layout(&self) -> &Layout {
        &self.inner.layout
    }

    /// Whether the dirty log uses manual protect.
    pub fn manual_protect(&self) -> bool {
        self.inner.manual_protect
    }

    /// Each vCPU's counters, read from guest memory (while running, a
    /// snapshot of values that keep moving).
    pub fn counters(&self) -> Vec<VcpuCounters> {
        let (mem, layout) = (&self.inner.mem, &self.inner.layout);
        (0..layout.vcpus)
            .map(|index| {
                let at = layout.control_offset(index);
                VcpuCounters {
                    writes: get_u64(mem, at + cb::WRITES),
                    batches: get_u64(mem, at + cb::BATCHES),
                    appends: get_u64(mem, at + cb::APPENDS),
                    rng: get_u64(mem, at + cb::RNG),
                    cursor: get_u64(mem, at + cb::CURSOR),
                }
            })
            .collect()
    }

    /// The CPUID leaves vCPU `index`'s program last executed (`CPUID_LEAVES`
    /// order, each eax, ebx, ecx, edx), read from its control block: what
    /// the guest's code sees. `None` for a vCPU the guest does not have.
    pub fn cpuid_leaves(&self, index: u32) -> Option<[[u32; 4]; 4]> {
        let layout = &self.inner.layout;
        if index >= layout.vcpus {
            return None;
        }
        let at = layout.control_offset(index) + cb::CPUID;
        let mut bytes = [0u8; 64];
        self.inner.mem.load(at, &mut bytes);
        let mut leaves = [[0u32; 4]; 4];
        for (i, word) in bytes.chunks_exact(4).enumerate() {
            let mut b = [0u8; 4];
            b.copy_from_slice(word);
            leaves[i / 4][i % 4] = u32::from_le_bytes(b);
        }
        Some(leaves)
    }

    /// Total page writes by the guest program so far (from guest memory).
    pub fn writes(&self) -> u64 {
        self.counters().iter().map(|c| c.writes).sum()
    }

    /// Why a vCPU stopped for good, if one did (an unexpected exit).
    pub fn failure(&self) -> Option<String> {
        lock(&self.inner.control.ctl).failed.clone()
    }

    fn live(&self) -> GuestResult<()> {
        if self.inner.destroyed.load(Ordering::Acquire) {
            return Err(GuestError::Destroyed);
        }
        Ok(())
    }

    fn require_paused(&self, what: &'static str) -> GuestResult<()> {
        self.live()?;
        if !self.is_paused() {
            return Err(GuestError::NotPaused(what));
        }
        Ok(())
    }

    /// The raw dirty-log fetch into `words` (one bit per page of slot 0).
    fn fetch_kvm_dirty(&self, words: &mut [u64]) -> GuestResult<()> {
        let pages = self.inner.layout.pages;
        if (words.len() as u64) < pages.div_ceil(64) {
            return Err(GuestError::BitmapSize {
                expected: pages,
                got: words.len() as u64 * 64,
            });
        }
        let log = kvm_dirty_log {
            slot: 0,
            padding1: 0,
            __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
                dirty_bitmap: words.as_mut_ptr().cast(),
            },
        };
        // SAFETY: `log` names slot 0 of this VM and a buffer of at least one bit
        // per page of that slot (checked above), which is all KVM writes.
        let ret = unsafe { ioctl_with_ref(&self.inner.vm, KVM_GET_DIRTY_LOG(), &log) };
        if ret != 0 {
            return Err(GuestError::Backend(format!(
                "KVM_GET_DIRTY_LOG: {}",
                std::io::Error::last_os_error()
            )));
        }
        if self.inner.manual_protect {
            let clear = kvm_clear_dirty_log {
                slot: 0,
                num_pages: u32::try_from(pages).map_err(|_| {
                    GuestError::Backend("too many pages for KVM_CLEAR_DIRTY_LOG".into())
                })?,
                first_page: 0,
                __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: words.as_mut_ptr().cast(),
                },
            };
            // SAFETY: as above; KVM only reads the bitmap, one bit per page of
            // the range `first_page..first_page + num_pages` of slot 0.
            let ret = unsafe { ioctl_with_ref(&self.inner.vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
            if ret != 0 {
                return Err(GuestError::Backend(format!(
                    "KVM_CLEAR_DIRTY_LOG: {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
        Ok(())
    }

    fn service_log(&self) -> ServiceLog<'_> {
        ServiceLog::new(
            &self.inner.mem,
            &self.inner.host_dirty,
            self.inner.config.service_pages,
        )
    }

    /// Stops the vCPUs and waits until all are parked (or failed).
    fn stop_vcpus(&self, run: Run) {
        let threads = lock(&self.threads);
        let control = &self.inner.control;
        {
            let mut ctl = lock(&control.ctl);
            control.set_run(&mut ctl, run);
        }
        let n = threads.len() as u32;
        loop {
            vcpu::kick(&self.inner, &threads);
            let ctl = lock(&control.ctl);
            let (ctl, _) = control
                .host_wake
                .wait_timeout_while(ctl, vcpu::REKICK, |c| c.parked < n)
                .unwrap_or_else(|p| p.into_inner());
            if ctl.parked >= n {
                return;
            }
        }
    }

    /// Posts `record` in the mailbox and waits for vCPU 0 to serve it. The
    /// caller holds the service lock and found the guest running.
    fn serve(&self, record: &[u8]) -> Result<u64, ServiceError> {
        let inner = &self.inner;
        let control = &inner.control;
        let (mem, at) = (&inner.mem, inner.layout.mailbox_offset());
        let request = get_u64(mem, at + mb::REQ).max(get_u64(mem, at + mb::ACK)) + 1;
        mem.store(at + mb::DATA, record);
        mem.store(at + mb::LEN, &(record.len() as u64).to_le_bytes());
        // The guest reads the request number first: publish it last.
        std::sync::atomic::fence(Ordering::SeqCst);
        mem.store(at + mb::REQ, &request.to_le_bytes());
        inner.host_dirty.mark(inner.layout.mailbox);

        let deadline = Instant::now() + SERVICE_TIMEOUT;
        let mut ctl = lock(&control.ctl);
        ctl.service_pending = true;
        control.vcpu_wake.notify_all();
        while get_u64(mem, at + mb::ACK) != request {
            if ctl.run == Run::Destroyed || ctl.failed.is_some() {
                return Err(ServiceError::NotRunning);
            }
            // A vCPU 0 still held under a lease that holds again is about to
            // go: the notify above woke it, or its next look at the lease will.
            if ctl.server_fenced && !inner.lease.holds() {
                // The lease ran out after the check: vCPU 0 is held at the
                // doorbell, outside any append, and cannot re-enter the guest
                // while this lock is held. Take the request back, so it is
                // neither served later nor torn by the next one.
                let ack = get_u64(mem, at + mb::ACK);
                mem.store(at + mb::REQ, &ack.to_le_bytes());
                inner.host_dirty.mark(inner.layout.mailbox);
                ctl.service_pending = false;
                return Err(ServiceError::Fenced);
            }
            let now = Instant::now();
            if now >= deadline {
                if !inner.lease.holds() {
                    return Err(ServiceError::Fenced);
                }
                tracing::warn!("KVM guest did not serve an append within {SERVICE_TIMEOUT:?}");
                return Err(ServiceError::NotRunning);
            }
            let wait = (deadline - now).min(Duration::from_millis(20));
            ctl = control
                .host_wake
                .wait_timeout(ctl, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(ctl);
        // The acknowledgement needs the lease too: one that ran out while the
        // guest served leaves the record unacknowledged, as a lost answer would.
        if !inner.lease.holds() {
            return Err(ServiceError::Fenced);
        }
        match get_u64(mem, at + mb::RES) {
            mb::ERR_FULL => Err(ServiceError::Full {
                used: get_u64(mem, 16),
                capacity: inner.config.service_pages * PAGE_SIZE as u64,
            }),
            mb::ERR_TOO_LARGE => Err(ServiceError::TooLarge(record.len())),
            mb::ERR_CORRUPT => Err(ServiceError::Corrupt("no service header".into())),
            seq if seq & mb::ERROR != 0 => {
                Err(ServiceError::Corrupt(format!("guest answered {seq:#x}")))
            }
            seq => Ok(seq),
        }
    }
}

/// Writes pseudo-random pages as `SimGuest::guest_fill` does (same bytes).
fn prefill(mem: &GuestMemory, pages: std::ops::Range<u64>, seed: u64) {
    let mut ctx = VcpuContext::new(seed, u32::MAX);
    let mut bytes = vec![0u8; PAGE_SIZE];
    for page in pages {
        for chunk in bytes.chunks_exact_mut(8) {
            chunk.copy_from_slice(&ctx.next_u64().to_le_bytes());
        }
        mem.store(page as usize * PAGE_SIZE, &bytes);
    }
}

impl Guest for KvmGuest {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn page_count(&self) -> u64 {
        self.inner.layout.pages
    }

    fn read_pages(&self, first: u64, buf: &mut [u8]) -> GuestResult<()> {
        self.live()?;
        self.inner.mem.read(first, buf)
    }

    fn read_pages_uninit(
        &self,
        first: u64,
        buf: &mut [std::mem::MaybeUninit<u8>],
    ) -> GuestResult<()> {
        self.live()?;
        self.inner.mem.read_uninit(first, buf)
    }

    fn write_pages(&self, first: u64, data: &[u8]) -> GuestResult<()> {
        self.live()?;
        self.inner.mem.write(first, data)
    }

    fn zero_pages(&self, first: u64, count: u64) -> GuestResult<()> {
        self.live()?;
        self.inner.mem.zero(first, count)
    }

    fn fetch_and_clear_dirty(&self, bitmap: &mut DirtyBitmap) -> GuestResult<()> {
        self.live()?;
        self.check_bitmap(bitmap)?;
        self.fetch_kvm_dirty(bitmap.words_mut())?;
        let mut scratch = lock(&self.inner.scratch);
        self.inner.host_dirty.fetch_and_clear(&mut scratch);
        bitmap.union_with(&scratch);
        bitmap.trim();
        Ok(())
    }

    fn start_dirty_log(&self) -> GuestResult<()> {
        self.live()?;
        // Logging is on from boot; starting over means dropping what it holds.
        let mut scratch = lock(&self.inner.scratch);
        self.fetch_kvm_dirty(scratch.words_mut())?;
        self.inner.host_dirty.clear();
        Ok(())
    }

    fn pause(&self) -> GuestResult<()> {
        self.live()?;
        // No append in flight: it would need the vCPUs to finish.
        let _service = lock(&self.inner.service);
        {
            let ctl = lock(&self.inner.control.ctl);
            match ctl.run {
                Run::Paused => return Ok(()),
                Run::Destroyed => return Err(GuestError::Destroyed),
                Run::Running => {}
            }
        }
        self.stop_vcpus(Run::Paused);
        Ok(())
    }

    fn resume(&self) -> GuestResult<()> {
        self.live()?;
        if !self.inner.armed.load(Ordering::Acquire) {
            return Err(GuestError::Backend(
                "an incoming KVM guest can run only after restore_state".into(),
            ));
        }
        let control = &self.inner.control;
        let mut ctl = lock(&control.ctl);
        match ctl.run {
            Run::Destroyed => Err(GuestError::Destroyed),
            Run::Running => Ok(()),
            Run::Paused => {
                control.set_run(&mut ctl, Run::Running);
                Ok(())
            }
        }
    }

    fn is_paused(&self) -> bool {
        lock(&self.inner.control.ctl).run != Run::Running
    }

    fn bind_lease(&self, lease: RunLease) {
        self.inner.lease.bind(lease);
    }

    fn set_throttle(&self, share: f64) -> GuestResult<()> {
        if !(0.0..=0.99).contains(&share) {
            return Err(GuestError::BadThrottle(share.to_string()));
        }
        self.inner
            .control
            .throttle_ppm
            .store((share * 1e6) as u32, Ordering::Relaxed);
        Ok(())
    }

    fn save_state(&self) -> GuestResult<DeviceState> {
        self.require_paused("saving device state")?;
        let inner = &self.inner;
        let vcpus = inner
            .vcpus
            .iter()
            .map(|vcpu| {
                let state = KvmVcpuState::save(&lock(&vcpu.fd), &inner.caps, &inner.msr_list)?;
                Ok(VcpuState {
                    index: vcpu.index,
                    registers: state::encode(KVM_VCPU_STATE_VERSION, &state)?,
                })
            })
            .collect::<GuestResult<Vec<_>>>()?;
        let vm = KvmVmState::save(&inner.vm, &inner.caps, &inner.layout)?;
        let nic = lock(&inner.nic).clone();
        Ok(DeviceState {
            kind: KIND.into(),
            vcpus,
            nic,
            extra: state::encode(KVM_VM_STATE_VERSION, &vm)?,
        })
    }

    fn restore_state(&self, state: &DeviceState) -> GuestResult<()> {
        self.require_paused("restoring device state")?;
        state.expect_kind(KIND)?;
        let inner = &self.inner;
        if state.vcpus.len() != inner.vcpus.len() {
            return Err(GuestError::StateMismatch(format!(
                "state has {} vCPUs, this guest {}",
                state.vcpus.len(),
                inner.vcpus.len()
            )));
        }
        // Decode and check everything before changing anything.
        let vm: KvmVmState = state::decode("VM state", KVM_VM_STATE_VERSION, &state.extra)?;
        vm.check(&inner.caps, &inner.layout)?;
        let mut vcpus = Vec::with_capacity(state.vcpus.len());
        for saved in &state.vcpus {
            let vcpu = inner
                .vcpus
                .get(saved.index as usize)
                .ok_or_else(|| GuestError::StateMismatch(format!("no vCPU {}", saved.index)))?;
            let what = format!("vCPU {}", saved.index);
            let decoded: KvmVcpuState =
                state::decode(&what, KVM_VCPU_STATE_VERSION, &saved.registers)?;
            decoded.check(&inner.caps, saved.index)?;
            vcpus.push((vcpu, decoded));
        }
        inner.armed.store(false, Ordering::Release);
        vm.restore(&inner.vm, &inner.caps)?;
        for (vcpu, decoded) in &vcpus {
            decoded.restore(vcpu.index, &lock(&vcpu.fd), &inner.caps)?;
            vcpu.cpuid_refresh.store(true, Ordering::SeqCst);
        }
        *lock(&inner.nic) = state.nic.clone();
        inner.armed.store(true, Ordering::Release);
        Ok(())
    }

    fn digest(&self) -> GuestResult<MemoryDigest> {
        let canonical = without_clocks(&self.save_state()?)?;
        Ok(MemoryDigest {
            memory: self.inner.mem.hash(),
            state: xxhash_rust::xxh3::xxh3_128(&canonical.encode()),
        })
    }

    fn service_append(&self, record: &[u8]) -> Result<u64, ServiceError> {
        if record.len() > MAX_RECORD {
            return Err(ServiceError::TooLarge(record.len()));
        }
        let inner = &self.inner;
        let _one_at_a_time = lock(&inner.service);
        let control = &inner.control;
        {
            let ctl = lock(&control.ctl);
            match ctl.run {
                Run::Destroyed => return Err(ServiceError::NotRunning),
                Run::Running if ctl.failed.is_some() => return Err(ServiceError::NotRunning),
                _ if !inner.lease.holds() => return Err(ServiceError::Fenced),
                Run::Paused => return Err(ServiceError::Paused),
                Run::Running => {}
            }
        }
        self.serve(record)
    }

    fn service_records(&self) -> Result<Vec<(u64, Vec<u8>)>, ServiceError> {
        if self.inner.destroyed.load(Ordering::Acquire) {
            return Err(ServiceError::NotRunning);
        }
        self.service_log().records()
    }

    fn destroy(&self) {
        if self.inner.destroyed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.stop_vcpus(Run::Destroyed);
        let threads = std::mem::take(&mut *lock(&self.threads));
        for thread in threads {
            let _ = thread.join();
        }
        self.inner.mem.discard();
    }
}

/// The named features (`cpu::FEATURES`) of the CPUID table that vCPU
/// `index` of a saved KVM guest carries: what KVM answers that guest's CPUID
/// with, on the node it was saved on and on any node it is restored on.
pub fn saved_cpu_features(saved: &DeviceState, index: u32) -> GuestResult<BTreeSet<String>> {
    saved.expect_kind(KIND)?;
    let vcpu = saved
        .vcpus
        .iter()
        .find(|v| v.index == index)
        .ok_or_else(|| GuestError::StateMismatch(format!("no vCPU {index}")))?;
    let what = format!("vCPU {index}");
    let state: KvmVcpuState = state::decode(&what, KVM_VCPU_STATE_VERSION, &vcpu.registers)?;
    let leaves: Vec<crate::cpu::Leaf> = state
        .cpuid
        .iter()
        .map(|e| crate::cpu::Leaf {
            leaf: e.function,
            subleaf: e.index,
            regs: [e.eax, e.ebx, e.ecx, e.edx],
        })
        .collect();
    Ok(crate::cpu::features_of(&leaves))
}

/// A KVM guest's saved state with its clocks taken out: they run on while the
/// guest is paused, on both sides of a move, so two saves of one paused guest
/// (or a save on the source and one after the restore on the target) differ
/// only there. What compares states compares this form.
pub fn without_clocks(saved: &DeviceState) -> GuestResult<DeviceState> {
    let mut canonical = saved.clone();
    for vcpu in &mut canonical.vcpus {
        let state: KvmVcpuState = state::decode("vCPU", KVM_VCPU_STATE_VERSION, &vcpu.registers)?;
        vcpu.registers = state::encode(KVM_VCPU_STATE_VERSION, &state.without_clocks())?;
    }
    let vm: KvmVmState = state::decode("VM state", KVM_VM_STATE_VERSION, &saved.extra)?;
    canonical.extra = state::encode(KVM_VM_STATE_VERSION, &vm.without_clocks())?;
    Ok(canonical)
}

impl Drop for KvmGuest {
    fn drop(&mut self) {
        self.destroy();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_append_the_lease_runs_out_under_is_taken_back() {
        let Some(_) = usable_or_skip("an_append_the_lease_runs_out_under_is_taken_back") else {
            return;
        };
        let mut config = KvmGuestConfig::new(4 << 20, Workload::idle());
        config.service_pages = 4;
        let guest = KvmGuest::boot(config).unwrap();
        assert_eq!(guest.service_append(b"first"), Ok(1));

        let lease = RunLease::expired();
        guest.bind_lease(lease.clone());
        let deadline = Instant::now() + Duration::from_secs(5);
        while !lock(&guest.inner.control.ctl).server_fenced {
            assert!(Instant::now() < deadline, "vCPU 0 is not held by the lease");
            std::thread::sleep(Duration::from_millis(1));
        }
        // As if the lease ran out between the append's own check and vCPU 0's
        // next doorbell exit: the request is already in the mailbox.
        let t = Instant::now();
        assert_eq!(guest.serve(b"withdrawn"), Err(ServiceError::Fenced));
        assert!(t.elapsed() < SERVICE_TIMEOUT, "refused only at the timeout");

        // Once the guest runs again it does not serve the withdrawn request.
        lease.extend_to(Instant::now() + Duration::from_secs(600));
        assert_eq!(guest.service_append(b"second"), Ok(2));
        assert_eq!(
            guest.service_records().unwrap(),
            vec![(1, b"first".to_vec()), (2, b"second".to_vec())]
        );
        assert_eq!(guest.counters()[0].appends, 2);
        guest.destroy();
    }
}
