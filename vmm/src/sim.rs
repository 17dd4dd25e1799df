//! `SimGuest`: a simulated VM with real memory and real vCPU threads.
//!
//! Memory is a lazily populated anonymous mapping; vCPU threads write real
//! bytes into it at a set rate and pattern and mark the dirty log after each
//! write; the append service keeps its log in the first pages. Pause, resume
//! and throttle act on the vCPU threads through a run gate, so a pause returns
//! only once no vCPU (and no service call) can write guest memory. The bound
//! [`RunLease`] is checked by each vCPU once per batch and by each append, so a
//! fenced guest stops writing within a batch with no pause needed.

use crate::dirty::{DirtyBitmap, DirtyLog};
use crate::guest::{pages_in, Guest, GuestError, GuestResult, MemoryDigest, PAGE_SIZE};
use crate::lease::{BoundLease, RunLease};
use crate::memory::GuestMemory;
use crate::service::{ServiceError, ServiceLog, SERVICE_PAGES};
use crate::state::{DeviceState, NicState, VcpuState};
use crate::workload::{VcpuContext, Workload};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const KIND: &str = "sim";
/// A vCPU's scheduling slice: it runs for `(1 - throttle)` of it.
const SLICE: Duration = Duration::from_millis(5);
/// Writes between checks of the clock and the gate; keeps pause latency short.
const BATCH: u64 = 64;
/// How often a fenced vCPU looks at its lease again: extending a lease wakes
/// no one, so this bounds how late a vCPU resumes after a renewal.
const FENCE_POLL: Duration = Duration::from_millis(1);

/// How to build a simulated guest.
#[derive(Debug, Clone, PartialEq)]
pub struct SimGuestConfig {
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub workload: Workload,
    /// Pages at the start of memory reserved for the service log.
    pub service_pages: u64,
    pub mac: [u8; 6],
    /// Fill the workload pages with incompressible data at boot, as a guest
    /// that has run for a while would have; `None` boots with zeroed memory.
    pub prefill_seed: Option<u64>,
}

impl SimGuestConfig {
    pub fn new(memory_bytes: u64, workload: Workload) -> Self {
        // Small guests give the service a quarter of their memory at most.
        let service_pages = SERVICE_PAGES
            .min(memory_bytes / PAGE_SIZE as u64 / 4)
            .max(1);
        SimGuestConfig {
            memory_bytes,
            vcpus: 1,
            workload,
            service_pages,
            mac: [0x02, 0, 0, 0, 0, 1],
            prefill_seed: None,
        }
    }
}

/// The run gate between vCPUs (and service calls) and pause.
///
/// `state` holds a PAUSED bit, a DESTROYED bit and the number of writers inside
/// the gate. A writer counts itself in and backs out if it sees PAUSED; pause
/// sets PAUSED and waits for the count to drain, so once it returns no writer
/// is inside and none can enter.
struct RunGate {
    state: AtomicU64,
    lock: Mutex<()>,
    wake: Condvar,
}

const PAUSED: u64 = 1 << 63;
const DESTROYED: u64 = 1 << 62;
const WRITERS: u64 = (1 << 62) - 1;

enum Closed {
    Paused,
    Destroyed,
}

struct Entered<'a>(&'a RunGate);

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.0.state.fetch_sub(1, Ordering::Release);
    }
}

impl RunGate {
    fn new(paused: bool) -> Self {
        RunGate {
            state: AtomicU64::new(if paused { PAUSED } else { 0 }),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    fn guard(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn try_enter(&self) -> Result<Entered<'_>, Closed> {
        let prev = self.state.fetch_add(1, Ordering::Acquire);
        let entered = Entered(self);
        if prev & DESTROYED != 0 {
            return Err(Closed::Destroyed);
        }
        if prev & PAUSED != 0 {
            return Err(Closed::Paused);
        }
        Ok(entered)
    }

    /// Enters, waiting while paused; `None` once destroyed.
    fn enter_wait(&self) -> Option<Entered<'_>> {
        loop {
            match self.try_enter() {
                Ok(e) => return Some(e),
                Err(Closed::Destroyed) => return None,
                Err(Closed::Paused) => {
                    let mut g = self.guard();
                    while self.state.load(Ordering::Acquire) & PAUSED != 0
                        && self.state.load(Ordering::Acquire) & DESTROYED == 0
                    {
                        g = self.wake.wait(g).unwrap_or_else(|p| p.into_inner());
                    }
                }
            }
        }
    }

    fn close(&self, bit: u64) {
        self.state.fetch_or(bit, Ordering::SeqCst);
        while self.state.load(Ordering::Acquire) & WRITERS != 0 {
            std::hint::spin_loop();
            std::thread::yield_now();
        }
    }

    fn open(&self) {
        let _g = self.guard();
        self.state.fetch_and(!PAUSED, Ordering::SeqCst);
        self.wake.notify_all();
    }

    fn destroy(&self) {
        let _g = self.guard();
        self.state.fetch_or(DESTROYED, Ordering::SeqCst);
        self.wake.notify_all();
    }

    fn is(&self, bit: u64) -> bool {
        self.state.load(Ordering::Acquire) & bit != 0
    }
}

struct Inner {
    config: SimGuestConfig,
    mem: GuestMemory,
    dirty: DirtyLog,
    /// Pages ever written: a page outside it is certainly zero.
    touched: DirtyLog,
    gate: RunGate,
    throttle_ppm: AtomicU32,
    vcpus: Vec<Mutex<VcpuContext>>,
    nic: Mutex<NicState>,
    service: Mutex<()>,
    writes: AtomicU64,
    destroyed: AtomicBool,
    lease: BoundLease,
}

impl Inner {
    fn workload_pages(&self) -> (u64, u64) {
        let first = self.config.service_pages.min(self.mem.pages());
        (first, self.mem.pages() - first)
    }

    /// One guest write of 64 fresh bytes into `page`; write first, mark after.
    fn guest_write(&self, page: u64, ctx: &mut VcpuContext) {
        let mut line = [0u8; 64];
        for chunk in line.chunks_exact_mut(8) {
            chunk.copy_from_slice(&ctx.next_u64().to_le_bytes());
        }
        let offset = (ctx.next_u64() % (PAGE_SIZE as u64 / 64)) as usize * 64;
        self.mem.store(page as usize * PAGE_SIZE + offset, &line);
        self.dirty.mark(page);
        self.touched.mark(page);
        ctx.writes += 1;
    }

    fn throttle(&self) -> f64 {
        f64::from(self.throttle_ppm.load(Ordering::Relaxed)) / 1e6
    }

    /// Waits while the lease does not hold; false once destroyed. Outside the
    /// gate, so a pause does not wait for the lease.
    fn wait_out_fence(&self) -> bool {
        while !self.lease.holds() {
            if self.gate.is(DESTROYED) {
                return false;
            }
            std::thread::sleep(FENCE_POLL);
        }
        true
    }

    fn vcpu_loop(&self, index: usize) {
        let per_vcpu = self
            .config
            .workload
            .dirty_pages_per_sec
            .map(|rate| rate as f64 / self.config.vcpus.max(1) as f64);
        let (first, pages) = self.workload_pages();
        let pattern = self.config.workload.pattern;
        let mut carry = 0.0f64;
        loop {
            let slice_start = Instant::now();
            let running = SLICE.mul_f64(1.0 - self.throttle());
            // Writes allowed this slice; a throttled vCPU gets fewer.
            let mut budget = match per_vcpu {
                Some(rate) => {
                    let exact = rate * running.as_secs_f64() + carry;
                    let whole = exact.floor();
                    carry = exact - whole;
                    whole as u64
                }
                None => u64::MAX,
            };
            while budget > 0 && slice_start.elapsed() < running && pages > 0 {
                let Some(entered) = self.gate.enter_wait() else {
                    return;
                };
                if !self.lease.holds() {
                    drop(entered);
                    if !self.wait_out_fence() {
                        return;
                    }
                    // Time held counts against the slice: a fenced vCPU
                    // does not catch up on the writes it missed.
                    continue;
                }
                let mut ctx = self.vcpus[index].lock().unwrap_or_else(|p| p.into_inner());
                for _ in 0..BATCH.min(budget) {
                    let page = first + ctx.next_page(pattern, pages);
                    self.guest_write(page, &mut ctx);
                }
                drop(ctx);
                self.writes.fetch_add(BATCH.min(budget), Ordering::Relaxed);
                budget = budget.saturating_sub(BATCH);
            }
            // Idle (or paused, or throttled) for the rest of the slice.
            if self.gate.is(DESTROYED) {
                return;
            }
            if let Some(rest) = SLICE.checked_sub(slice_start.elapsed()) {
                std::thread::sleep(rest);
            }
            if self.gate.is(PAUSED) && self.gate.enter_wait().is_none() {
                return;
            }
        }
    }
}

/// A simulated guest. Cheap to share: clone the `Arc` it is built in.
pub struct SimGuest {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl SimGuest {
    /// Boots a guest: zeroed memory, an empty service log, vCPUs running.
    pub fn boot(config: SimGuestConfig) -> GuestResult<Arc<SimGuest>> {
        let prefill = config.prefill_seed;
        let guest = Self::build(config, false, true)?;
        ServiceLog::new(
            &guest.inner.mem,
            &guest.inner.dirty,
            guest.inner.config.service_pages,
        )
        .format();
        if let Some(seed) = prefill {
            let first = guest.inner.config.service_pages;
            guest.guest_fill(first, guest.page_count() - first, seed)?;
        }
        guest.inner.gate.open();
        Ok(guest)
    }

    /// Creates a guest to receive a migration: memory in huge pages, populated
    /// in the background while the copy begins (see [`GuestMemory::new`]),
    /// vCPUs paused until `resume`.
    pub fn incoming(config: SimGuestConfig) -> GuestResult<Arc<SimGuest>> {
        Self::build(config, true, true)
    }

    fn build(config: SimGuestConfig, populate: bool, paused: bool) -> GuestResult<Arc<SimGuest>> {
        let mem = GuestMemory::new(config.memory_bytes, populate)?;
        if config.service_pages >= mem.pages() {
            return Err(GuestError::Memory {
                bytes: config.memory_bytes,
                reason: format!(
                    "the service needs {} pages and some for the workload",
                    config.service_pages
                ),
            });
        }
        let pages = mem.pages();
        let inner = Arc::new(Inner {
            vcpus: (0..config.vcpus)
                .map(|i| Mutex::new(VcpuContext::new(config.workload.seed, i)))
                .collect(),
            nic: Mutex::new(NicState {
                mac: config.mac,
                ..Default::default()
            }),
            config,
            mem,
            dirty: DirtyLog::new(pages),
            touched: DirtyLog::new(pages),
            gate: RunGate::new(paused),
            throttle_ppm: AtomicU32::new(0),
            service: Mutex::new(()),
            writes: AtomicU64::new(0),
            destroyed: AtomicBool::new(false),
            lease: BoundLease::new(),
        });
        let threads = (0..inner.config.vcpus as usize)
            .map(|i| {
                let inner = inner.clone();
                std::thread::Builder::new()
                    .name(format!("sim-vcpu-{i}"))
                    .spawn(move || inner.vcpu_loop(i))
                    .map_err(|e| GuestError::Backend(format!("cannot start vCPU thread: {e}")))
            })
            .collect::<GuestResult<Vec<_>>>()?;
        // The service log may hold data from the start; it is small, so it is
        // simply always a candidate in round 0.
        inner.touched.mark_range(0, inner.config.service_pages);
        Ok(Arc::new(SimGuest {
            inner,
            threads: Mutex::new(threads),
        }))
    }

    pub fn config(&self) -> &SimGuestConfig {
        &self.inner.config
    }

    /// Total page writes by the vCPUs so far (for measuring the dirty rate).
    pub fn writes(&self) -> u64 {
        self.inner.writes.load(Ordering::Relaxed)
    }

    /// A write by the guest itself to `count` pages from `first` (as a vCPU
    /// would): used to fill memory with incompressible data before a benchmark.
    pub fn guest_fill(&self, first: u64, count: u64, seed: u64) -> GuestResult<()> {
        self.check_range(first, count)?;
        let mut ctx = VcpuContext::new(seed, u32::MAX);
        let mut page_bytes = vec![0u8; PAGE_SIZE];
        for page in first..first + count {
            for chunk in page_bytes.chunks_exact_mut(8) {
                chunk.copy_from_slice(&ctx.next_u64().to_le_bytes());
            }
            self.inner.mem.store(page as usize * PAGE_SIZE, &page_bytes);
            self.inner.dirty.mark(page);
            self.inner.touched.mark(page);
        }
        Ok(())
    }

    /// Sets whether the virtual NIC offloads TCP state (the host NIC's
    /// capability) and opens connections `ids`: offloaded when it does, held
    /// by the guest's software stack when not.
    pub fn open_connections(&self, offload: bool, ids: impl IntoIterator<Item = u64>) {
        let mut nic = self.inner.nic.lock().unwrap_or_else(|p| p.into_inner());
        nic.offload_enabled = offload;
        let held = if offload {
            &mut nic.offloaded_connections
        } else {
            &mut nic.software_connections
        };
        held.extend(ids);
        held.sort_unstable();
        held.dedup();
    }

    /// The virtual NIC as it is now (readable while the guest runs).
    pub fn nic(&self) -> NicState {
        self.inner
            .nic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn live(&self) -> GuestResult<()> {
        if self.inner.destroyed.load(Ordering::Acquire) {
            return Err(GuestError::Destroyed);
        }
        Ok(())
    }
}

impl Guest for SimGuest {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn page_count(&self) -> u64 {
        self.inner.mem.pages()
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
        self.inner.mem.write(first, data)?;
        self.inner.touched.mark_range(first, pages_in(data.len())?);
        Ok(())
    }

    fn zero_pages(&self, first: u64, count: u64) -> GuestResult<()> {
        self.live()?;
        self.inner.mem.zero(first, count)
    }

    fn nonzero_candidates(&self, candidates: &mut DirtyBitmap) -> GuestResult<()> {
        self.check_bitmap(candidates)?;
        self.inner.touched.snapshot(candidates);
        Ok(())
    }

    fn fetch_and_clear_dirty(&self, bitmap: &mut DirtyBitmap) -> GuestResult<()> {
        self.live()?;
        self.check_bitmap(bitmap)?;
        self.inner.dirty.fetch_and_clear(bitmap);
        Ok(())
    }

    fn start_dirty_log(&self) -> GuestResult<()> {
        self.live()?;
        self.inner.dirty.clear();
        Ok(())
    }

    fn pause(&self) -> GuestResult<()> {
        self.live()?;
        self.inner.gate.close(PAUSED);
        Ok(())
    }

    fn resume(&self) -> GuestResult<()> {
        self.live()?;
        self.inner.gate.open();
        Ok(())
    }

    fn is_paused(&self) -> bool {
        self.inner.gate.is(PAUSED)
    }

    fn bind_lease(&self, lease: RunLease) {
        self.inner.lease.bind(lease);
    }

    fn set_throttle(&self, share: f64) -> GuestResult<()> {
        if !(0.0..=0.99).contains(&share) {
            return Err(GuestError::BadThrottle(share.to_string()));
        }
        self.inner
            .throttle_ppm
            .store((share * 1e6) as u32, Ordering::Relaxed);
        Ok(())
    }

    fn save_state(&self) -> GuestResult<DeviceState> {
        self.live()?;
        if !self.is_paused() {
            return Err(GuestError::NotPaused("saving device state"));
        }
        let config = bincode::config::standard();
        let vcpus = self
            .inner
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, ctx)| {
                let ctx = *ctx.lock().unwrap_or_else(|p| p.into_inner());
                let registers = bincode::serde::encode_to_vec(ctx, config)
                    .map_err(|e| GuestError::Backend(format!("encoding vCPU {i}: {e}")))?;
                Ok(VcpuState {
                    index: i as u32,
                    registers,
                })
            })
            .collect::<GuestResult<Vec<_>>>()?;
        let nic = self
            .inner
            .nic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok(DeviceState {
            kind: KIND.into(),
            vcpus,
            nic,
            extra: Vec::new(),
        })
    }

    fn restore_state(&self, state: &DeviceState) -> GuestResult<()> {
        self.live()?;
        if !self.is_paused() {
            return Err(GuestError::NotPaused("restoring device state"));
        }
        state.expect_kind(KIND)?;
        if state.vcpus.len() != self.inner.vcpus.len() {
            return Err(GuestError::StateMismatch(format!(
                "state has {} vCPUs, this guest {}",
                state.vcpus.len(),
                self.inner.vcpus.len()
            )));
        }
        let config = bincode::config::standard().with_limit::<1024>();
        // Decode everything before changing anything: a bad state changes nothing.
        let contexts = state
            .vcpus
            .iter()
            .map(|v| {
                bincode::serde::decode_from_slice::<VcpuContext, _>(&v.registers, config)
                    .map(|(ctx, _)| (v.index as usize, ctx))
                    .map_err(|e| GuestError::MalformedState(format!("vCPU {}: {e}", v.index)))
            })
            .collect::<GuestResult<Vec<_>>>()?;
        for (index, ctx) in contexts {
            let slot = self
                .inner
                .vcpus
                .get(index)
                .ok_or_else(|| GuestError::StateMismatch(format!("no vCPU {index}")))?;
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = ctx;
        }
        *self.inner.nic.lock().unwrap_or_else(|p| p.into_inner()) = state.nic.clone();
        Ok(())
    }

    fn digest(&self) -> GuestResult<MemoryDigest> {
        let state = self.save_state()?;
        Ok(MemoryDigest {
            memory: self.inner.mem.hash(),
            state: xxhash_rust::xxh3::xxh3_128(&state.encode()),
        })
    }

    fn service_append(&self, record: &[u8]) -> Result<u64, ServiceError> {
        let _one_at_a_time = self.inner.service.lock().unwrap_or_else(|p| p.into_inner());
        let entered = self.inner.gate.try_enter();
        if let Err(Closed::Destroyed) = entered {
            return Err(ServiceError::NotRunning);
        }
        if !self.inner.lease.holds() {
            return Err(ServiceError::Fenced);
        }
        let _entered = entered.map_err(|_| ServiceError::Paused)?;
        let seq = ServiceLog::new(
            &self.inner.mem,
            &self.inner.dirty,
            self.inner.config.service_pages,
        )
        .append(record)?;
        // The acknowledgement needs the lease too: one that ran out during the
        // append leaves the record unacknowledged, as a lost answer would.
        if !self.inner.lease.holds() {
            return Err(ServiceError::Fenced);
        }
        Ok(seq)
    }

    fn service_records(&self) -> Result<Vec<(u64, Vec<u8>)>, ServiceError> {
        if self.inner.destroyed.load(Ordering::Acquire) {
            return Err(ServiceError::NotRunning);
        }
        ServiceLog::new(
            &self.inner.mem,
            &self.inner.dirty,
            self.inner.config.service_pages,
        )
        .records()
    }

    fn destroy(&self) {
        if self.inner.destroyed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.inner.gate.destroy();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        self.inner.mem.discard();
    }
}

impl Drop for SimGuest {
    fn drop(&mut self) {
        self.destroy();
    }
}
