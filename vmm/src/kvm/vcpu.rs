//! vCPUs: their boot registers (long mode, CPL3), the thread that runs each
//! one, how the host paces and throttles it, and how a pause kicks it out of
//! `KVM_RUN`.
//!
//! A vCPU thread holds its `VcpuFd` while it runs and lets go of it while
//! parked, so the controller can save or restore registers only when the vCPU
//! cannot run. The guest program exits once per batch of writes (an MMIO read
//! of the doorbell); there the thread sleeps as long as the dirty rate and the
//! throttle ask, answers with the next batch size, and looks at the stop flag.
//!
//! Pause: the controller sets the stop flag, sets `immediate_exit` in each
//! vCPU's `kvm_run` and sends the thread a signal (a no-op handler: the signal
//! only makes `KVM_RUN` return `EINTR`). A thread that sees the flag first
//! completes any MMIO access in flight (`KVM_RUN` with `immediate_exit` set
//! runs no guest instruction but finishes the load or store, whose result
//! would otherwise live only in `kvm_run` and not in the saved registers),
//! then parks. `pause` returns when every vCPU is parked.
//!
//! Fencing: before every `KVM_RUN` the thread checks the guest's run lease;
//! while it does not hold, the thread stays out of `KVM_RUN` (the guest runs
//! no instruction) and looks again every millisecond, still obeying the stop
//! flag. A vCPU is normally held at the doorbell read, between two batches.

use super::layout::{
    Layout, GDT_ENTRIES, SEL_TSS, SEL_USER_CODE, SEL_USER_DATA, TSS_LIMIT, TSS_OFFSET,
};
use super::program::{DB_SERVED, DB_YIELD, YIELD_CPUID};
use super::Inner;
use kvm_bindings::{kvm_dtable, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::collections::BTreeSet;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Reserved bit 1 set, interrupts off, IOPL 0: the program needs no port I/O.
const RFLAGS_BOOT: u64 = 0x2;

/// Real-time signal (offset from `SIGRTMIN`) that kicks a vCPU thread.
const KICK_SIGNAL_OFFSET: i32 = 4;
/// How often a pause re-kicks vCPUs that have not parked yet.
pub(super) const REKICK: Duration = Duration::from_millis(10);

/// The pace the host keeps a rate-limited vCPU to: one batch per slice.
const SLICE: Duration = Duration::from_millis(1);
/// How often a vCPU held by its lease looks at it again: extending a lease
/// wakes no one, so this bounds how late a vCPU resumes after a renewal.
const FENCE_POLL: Duration = Duration::from_millis(1);
/// An idle vCPU (rate 0, or its write limit reached) yields this often.
const IDLE: Duration = Duration::from_millis(5);
/// How far a paced vCPU may fall behind its schedule and still catch up.
const MAX_LAG: Duration = Duration::from_millis(20);
/// Flat-out batches adapt to take between these.
const FLAT_OUT_MIN: Duration = Duration::from_micros(200);
const FLAT_OUT_MAX: Duration = Duration::from_micros(800);

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One vCPU: its file descriptor and where its `immediate_exit` byte is.
pub(super) struct Vcpu {
    pub index: u32,
    pub fd: Mutex<VcpuFd>,
    /// `kvm_run.immediate_exit`, in the `kvm_run` mapping owned by `fd`.
    immediate_exit: *mut u8,
    /// Ask the program to execute CPUID again at its next doorbell read
    /// (set by a restore: what it stored came from the source's KVM).
    pub cpuid_refresh: AtomicBool,
}

// SAFETY: `immediate_exit` points into the kvm_run mapping that `fd` owns and
// that lives as long as `self`; it is only ever accessed atomically (see
// `set_immediate_exit`). Everything else is Send + Sync already.
unsafe impl Send for Vcpu {}
// SAFETY: as above.
unsafe impl Sync for Vcpu {}

impl Vcpu {
    pub fn create(vm: &VmFd, index: u32) -> Result<Vcpu, String> {
        let mut fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|e| format!("creating vCPU {index}: {e}"))?;
        let immediate_exit = std::ptr::addr_of_mut!(fd.get_kvm_run().immediate_exit);
        Ok(Vcpu {
            index,
            fd: Mutex::new(fd),
            immediate_exit,
            cpuid_refresh: AtomicBool::new(false),
        })
    }

    /// Sets `immediate_exit`: with 1, `KVM_RUN` returns `EINTR` before running
    /// any guest instruction (after completing an MMIO access in flight).
    pub fn set_immediate_exit(&self, value: u8) {
        // SAFETY: the pointer is valid for the life of `self` (see the Send
        // impl), aligned (a byte), and every access to the byte from this
        // process goes through this atomic; the kernel reads it at KVM_RUN.
        let byte = unsafe { AtomicU8::from_ptr(self.immediate_exit) };
        byte.store(value, Ordering::SeqCst);
    }
}

/// Whether the vCPUs may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Run {
    Running,
    Paused,
    Destroyed,
}

/// What vCPU threads and the controller share, under one lock.
pub(super) struct Ctl {
    pub run: Run,
    /// vCPU threads out of KVM_RUN and waiting at the gate (failed ones count).
    pub parked: u32,
    /// Why a vCPU stopped for good, if one did.
    pub failed: Option<String>,
    /// An append waits in the mailbox: vCPU 0 should not sleep.
    pub service_pending: bool,
    /// vCPU 0 is held out of the guest by the lease just after a doorbell
    /// access: between batches, outside any append, and it cannot re-enter
    /// the guest without taking this lock.
    pub server_fenced: bool,
}

pub(super) struct Control {
    pub ctl: Mutex<Ctl>,
    /// vCPU threads wait here (parked, or pacing).
    pub vcpu_wake: Condvar,
    /// The controller and service callers wait here.
    pub host_wake: Condvar,
    /// Mirrors `run != Running`, read without the lock before every KVM_RUN.
    pub stop: AtomicBool,
    pub throttle_ppm: AtomicU32,
}

impl Control {
    pub fn new(run: Run) -> Control {
        Control {
            ctl: Mutex::new(Ctl {
                run,
                parked: 0,
                failed: None,
                service_pending: false,
                server_fenced: false,
            }),
            vcpu_wake: Condvar::new(),
            host_wake: Condvar::new(),
            stop: AtomicBool::new(run != Run::Running),
            throttle_ppm: AtomicU32::new(0),
        }
    }

    pub fn set_run(&self, ctl: &mut Ctl, run: Run) {
        ctl.run = run;
        self.stop.store(run != Run::Running, Ordering::SeqCst);
        self.vcpu_wake.notify_all();
    }

    fn throttle(&self) -> f64 {
        f64::from(self.throttle_ppm.load(Ordering::Relaxed)) / 1e6
    }
}

/// The signal that kicks vCPU threads out of KVM_RUN.
pub(super) fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivering the signal is what interrupts KVM_RUN.
}

/// Installs the (no-op) kick handler once per process.
pub(super) fn install_kick_handler() -> Result<(), String> {
    static INSTALLED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
                .map_err(|e| format!("installing the vCPU kick signal handler: {e}"))
        })
        .clone()
}

/// Kicks every vCPU: the next or current KVM_RUN returns at once.
pub(super) fn kick(inner: &Inner, threads: &[JoinHandle<()>]) {
    for (vcpu, thread) in inner.vcpus.iter().zip(threads) {
        vcpu.set_immediate_exit(1);
        // SAFETY: the handle is not joined (we hold it), so its pthread_t is
        // valid; a thread that has already exited just makes this return ESRCH.
        unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
    }
}

/// CPUID for vCPU `index`: the host's supported set with this vCPU's APIC ID,
/// and with every feature of `cpu::FEATURES` outside `allowed` cleared
/// (processor compatibility mode); `None` keeps all the host's.
pub(super) fn cpuid_for(
    supported: &CpuId,
    index: u32,
    allowed: Option<&BTreeSet<String>>,
) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (index << 24),
            0xb | 0x1f => entry.edx = index,
            _ => {}
        }
        if let Some(allowed) = allowed {
            let mut regs = [entry.eax, entry.ebx, entry.ecx, entry.edx];
            crate::cpu::mask_leaf(entry.function, entry.index, &mut regs, allowed);
            [entry.eax, entry.ebx, entry.ecx, entry.edx] = regs;
        }
    }
    cpuid
}

/// Puts a fresh vCPU directly in 64-bit long mode at CPL 3 at the program's
/// entry, with paging on over the identity map in `layout`.
pub(super) fn set_boot_registers(fd: &VcpuFd, layout: &Layout, index: u32) -> Result<(), String> {
    let mut sregs = fd.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: SEL_USER_CODE,
        type_: 0xb, // execute/read, accessed
        present: 1,
        dpl: 3,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: SEL_USER_DATA,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: Layout::gpa(layout.gdt) + TSS_OFFSET,
        limit: TSS_LIMIT,
        selector: SEL_TSS,
        type_: 0xb, // 64-bit TSS, busy
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.ldt = kvm_segment {
        selector: 0,
        type_: 0x2,
        present: 0,
        unusable: 1,
        ..sregs.tr
    };
    sregs.gdt = kvm_dtable {
        base: Layout::gpa(layout.gdt),
        limit: GDT_ENTRIES * 8 - 1,
        padding: [0; 3],
    };
    sregs.idt = kvm_dtable {
        base: 0,
        limit: 0,
        padding: [0; 3],
    };
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = Layout::gpa(layout.pml4);
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    fd.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(|e| format!("KVM_SET_FPU: {e}"))?;

    let (rip, rsp, rbx) = layout.entry(index);
    let regs = kvm_regs {
        rip,
        rsp,
        rbx,
        rflags: RFLAGS_BOOT,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))
}

/// The MSRs of this host's KVM that a vCPU can both read and write back:
/// the list a saved state carries. Found on a fresh vCPU (CPUID set) by
/// reading every MSR KVM lists and writing each value back, dropping those
/// that fail either way.
pub(super) fn usable_msrs(kvm: &Kvm, fd: &VcpuFd) -> Result<Vec<u32>, String> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| format!("KVM_GET_MSR_INDEX_LIST: {e}"))?;
    let entries: Vec<kvm_msr_entry> = list
        .as_slice()
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let readable = filter_msrs(entries, |msrs| {
        let mut msrs = msrs;
        let n = fd.get_msrs(&mut msrs).unwrap_or(0);
        (n, msrs.as_slice().to_vec())
    })?;
    let writable = filter_msrs(readable, |msrs| {
        let n = fd.set_msrs(&msrs).unwrap_or(0);
        (n, msrs.as_slice().to_vec())
    })?;
    Ok(writable.iter().map(|e| e.index).collect())
}

/// Runs `op` over `entries` in chunks; KVM's MSR ioctls stop at the first
/// MSR they cannot handle and say how many they did, so the one after those
/// is dropped and the rest retried.
fn filter_msrs(
    mut entries: Vec<kvm_msr_entry>,
    op: impl Fn(Msrs) -> (usize, Vec<kvm_msr_entry>),
) -> Result<Vec<kvm_msr_entry>, String> {
    let mut kept = Vec::with_capacity(entries.len());
    while !entries.is_empty() {
        let chunk: Vec<_> = entries
            .drain(..entries.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES))
            .collect();
        let mut rest = chunk.as_slice();
        while !rest.is_empty() {
            let msrs =
                Msrs::from_entries(rest).map_err(|e| format!("building an MSR list: {e:?}"))?;
            let (done, out) = op(msrs);
            kept.extend_from_slice(&out[..done.min(out.len())]);
            rest = &rest[(done + 1).min(rest.len())..];
        }
    }
    Ok(kept)
}

/// Paces one vCPU: how long to hold it after each batch, and how many writes
/// to ask for next.
struct Pacer {
    /// Page writes per second for this vCPU; `None` is flat out.
    rate: Option<f64>,
    /// Writes this vCPU may still be given, if limited.
    limit_left: Option<u64>,
    last_batch: u64,
    carry: f64,
    flat_out_batch: u64,
    /// End of the current slot of a paced vCPU: slots follow each other on
    /// an absolute schedule, so exit and wake-up costs do not slow the rate.
    slot_end: Option<Instant>,
    /// A sleep cut short to serve an append, to be finished next time.
    pending: Option<Instant>,
}

enum Woke {
    Deadline,
    Service,
    Stop,
}

impl Pacer {
    fn new(inner: &Inner, index: u32) -> Pacer {
        let vcpus = u64::from(inner.config.vcpus.max(1));
        let rate = inner
            .config
            .workload
            .dirty_pages_per_sec
            .map(|r| r as f64 / vcpus as f64);
        let limit_left = inner
            .config
            .write_limit
            .map(|total| total / vcpus + u64::from(u64::from(index) < total % vcpus));
        Pacer {
            rate,
            limit_left,
            last_batch: 0,
            carry: 0.0,
            flat_out_batch: 64,
            slot_end: None,
            pending: None,
        }
    }

    /// Called at a yield exit: the batch begun at `entered` is done. Sleeps as
    /// the rate and throttle ask (cut short by a pause, or by an append for
    /// vCPU 0) and returns the next batch size.
    fn next_batch(&mut self, control: &Control, entered: Instant, serves: bool) -> u32 {
        let ran = entered.elapsed();
        let deadline = self.pending.take().unwrap_or_else(|| {
            // A throttled vCPU's slot stretches so that it runs (1 - share) of it.
            let stretch = 1.0 - control.throttle().clamp(0.0, 0.99);
            let slot = match self.rate {
                _ if self.limit_left == Some(0) => IDLE,
                Some(rate) if rate > 0.0 => SLICE,
                Some(_) => IDLE,
                // Flat out: no schedule, only the throttle's share.
                None => return entered + ran.div_f64(stretch),
            };
            let now = Instant::now();
            let start = self.slot_end.unwrap_or(entered);
            // Fallen far behind (host busy, guest paused): start afresh.
            let start = if start + MAX_LAG < now { now } else { start };
            let end = start + slot.div_f64(stretch);
            self.slot_end = Some(end);
            end
        });
        match sleep_until(control, deadline, serves) {
            Woke::Service => {
                // Serve now with an empty batch, then finish this sleep.
                self.pending = Some(deadline);
                self.last_batch = 0;
                return 0;
            }
            Woke::Deadline | Woke::Stop => {}
        }
        let mut batch = match self.rate {
            Some(rate) => {
                let exact = rate * SLICE.as_secs_f64() + self.carry;
                let whole = exact.floor();
                self.carry = exact - whole;
                whole as u64
            }
            None => {
                if self.last_batch == self.flat_out_batch {
                    if ran < FLAT_OUT_MIN {
                        self.flat_out_batch = (self.flat_out_batch * 2).min(1 << 20);
                    } else if ran > FLAT_OUT_MAX {
                        self.flat_out_batch = (self.flat_out_batch / 2).max(8);
                    }
                }
                self.flat_out_batch
            }
        };
        if let Some(left) = self.limit_left.as_mut() {
            batch = batch.min(*left);
            *left -= batch;
        }
        self.last_batch = batch;
        u32::try_from(batch).unwrap_or(u32::MAX)
    }
}

fn sleep_until(control: &Control, deadline: Instant, serves: bool) -> Woke {
    if Instant::now() >= deadline {
        return Woke::Deadline;
    }
    let mut ctl = lock(&control.ctl);
    loop {
        if ctl.run != Run::Running {
            return Woke::Stop;
        }
        if serves && ctl.service_pending {
            return Woke::Service;
        }
        let now = Instant::now();
        if now >= deadline {
            return Woke::Deadline;
        }
        ctl = control
            .vcpu_wake
            .wait_timeout(ctl, deadline - now)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

/// Waits at the gate while the guest is paused. Returns false once destroyed.
fn gate(control: &Control) -> bool {
    let mut ctl = lock(&control.ctl);
    let mut counted = false;
    loop {
        match ctl.run {
            Run::Running => {
                if counted {
                    ctl.parked -= 1;
                }
                return true;
            }
            Run::Destroyed => {
                if !counted {
                    ctl.parked += 1;
                    control.host_wake.notify_all();
                }
                return false;
            }
            Run::Paused => {
                if !counted {
                    counted = true;
                    ctl.parked += 1;
                    control.host_wake.notify_all();
                }
                ctl = control
                    .vcpu_wake
                    .wait(ctl)
                    .unwrap_or_else(|p| p.into_inner());
            }
        }
    }
}

/// Keeps the vCPU out of KVM_RUN while the lease does not hold. Returns false
/// if it was told to stop meanwhile. `serves_at_doorbell`: this is vCPU 0 and
/// its program stands just after a doorbell access (see `Ctl::server_fenced`).
fn wait_out_fence(inner: &Inner, serves_at_doorbell: bool) -> bool {
    if inner.lease.holds() {
        return true;
    }
    let control = &inner.control;
    let mut ctl = lock(&control.ctl);
    if serves_at_doorbell {
        ctl.server_fenced = true;
        control.host_wake.notify_all();
    }
    let may_run = loop {
        if ctl.run != Run::Running {
            break false;
        }
        if inner.lease.holds() {
            break true;
        }
        ctl = control
            .vcpu_wake
            .wait_timeout(ctl, FENCE_POLL)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    };
    ctl.server_fenced = false;
    may_run
}

/// Body of vCPU thread `index`.
pub(super) fn vcpu_thread(inner: Arc<Inner>, index: u32) {
    // Threads inherit their creator's signal mask; the kick must get through.
    let _ = vmm_sys_util::signal::unblock_signal(kick_signal());
    let mut pacer = Pacer::new(&inner, index);
    let vcpu = &inner.vcpus[index as usize];
    let control = &inner.control;
    // Whether the program stands just after a doorbell access. Not known at
    // the start (a restored vCPU may have been stopped anywhere).
    let mut at_doorbell = false;
    loop {
        if !gate(control) {
            return;
        }
        vcpu.set_immediate_exit(0);
        let result = {
            let mut fd = lock(&vcpu.fd);
            run_until_stopped(&inner, vcpu, &mut fd, &mut pacer, &mut at_doorbell)
        };
        if let Err(reason) = result {
            tracing::error!(vcpu = index, %reason, "KVM vCPU stopped");
            let mut ctl = lock(&control.ctl);
            ctl.failed.get_or_insert(format!("vCPU {index}: {reason}"));
            ctl.parked += 1;
            control.host_wake.notify_all();
            while ctl.run != Run::Destroyed {
                ctl = control
                    .vcpu_wake
                    .wait(ctl)
                    .unwrap_or_else(|p| p.into_inner());
            }
            return;
        }
    }
}

/// Runs the vCPU until the stop flag is seen; the vCPU is then out of
/// KVM_RUN with no MMIO access in flight.
fn run_until_stopped(
    inner: &Inner,
    vcpu: &Vcpu,
    fd: &mut VcpuFd,
    pacer: &mut Pacer,
    at_doorbell: &mut bool,
) -> Result<(), String> {
    let control = &inner.control;
    let serves = vcpu.index == 0;
    let doorbell = inner.layout.doorbell;
    let mut io_in_flight = false;
    loop {
        if control.stop.load(Ordering::SeqCst) {
            if io_in_flight {
                complete_io(vcpu, fd)?;
            }
            return Ok(());
        }
        if !wait_out_fence(inner, serves && *at_doorbell) {
            // Told to stop while held: the check above parks the vCPU.
            continue;
        }
        let entered = Instant::now();
        match fd.run() {
            Ok(VcpuExit::MmioRead(addr, data)) if addr == doorbell + DB_YIELD => {
                let mut answer = pacer
                    .next_batch(control, entered, serves)
                    .min(YIELD_CPUID - 1);
                if vcpu.cpuid_refresh.swap(false, Ordering::SeqCst) {
                    answer |= YIELD_CPUID;
                }
                let batch = answer.to_le_bytes();
                let n = data.len().min(batch.len());
                data[..n].copy_from_slice(&batch[..n]);
                io_in_flight = true;
                *at_doorbell = true;
            }
            Ok(VcpuExit::MmioWrite(addr, _)) if addr == doorbell + DB_SERVED => {
                let mut ctl = lock(&control.ctl);
                ctl.service_pending = false;
                control.host_wake.notify_all();
                io_in_flight = true;
                *at_doorbell = true;
            }
            // Interrupted, the program may stand anywhere, even inside an append.
            Ok(VcpuExit::Intr) => {
                io_in_flight = false;
                *at_doorbell = false;
            }
            Err(e) if e.errno() == libc::EINTR => {
                io_in_flight = false;
                *at_doorbell = false;
            }
            Ok(exit) => {
                let exit = format!("{exit:?}");
                return Err(describe_exit(fd, &exit));
            }
            Err(e) => return Err(format!("KVM_RUN failed: {e}")),
        }
    }
}

fn describe_exit(fd: &VcpuFd, exit: &str) -> String {
    let rip = fd
        .get_regs()
        .map(|r| format!("{:#x}", r.rip))
        .unwrap_or_else(|_| "?".into());
    format!("unexpected exit {exit} at rip {rip}")
}

/// Completes the MMIO access the vCPU exited on, without running further guest
/// code, so the saved registers are the whole truth.
fn complete_io(vcpu: &Vcpu, fd: &mut VcpuFd) -> Result<(), String> {
    vcpu.set_immediate_exit(1);
    match fd.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Ok(VcpuExit::Intr) => Ok(()),
        Ok(exit) => {
            let exit = format!("{exit:?}");
            Err(format!("completing MMIO: {}", describe_exit(fd, &exit)))
        }
        Err(e) => Err(format!("completing MMIO: {e}")),
    }
}
