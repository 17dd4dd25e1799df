//! A guest with a virtual disk: [`GuestWithDisk`] wraps any [`Guest`] (sim or
//! KVM) and a [`VirtualDisk`], and is itself a `Guest`.
//!
//! With a disk that moves with the VM ([`DiskPlacement::Copied`], node-local
//! storage) it presents **one copy space**: pages `0..memory_pages` are the
//! inner guest's memory, pages `memory_pages..memory_pages + disk_blocks` the
//! disk's blocks. Reads, writes and zeroing split at the boundary; the dirty
//! log, the round-0 candidates and the digest combine both. A migration
//! engine therefore copies the disk live next to memory — dirty blocks in
//! rounds, the last ones in the blackout, compared by the digest — without
//! knowing it is there, and the wire protocol does not change. With a disk
//! on shared storage ([`DiskPlacement::Shared`]) both nodes reach the same
//! file: the copy space is memory alone and only ownership moves.
//!
//! The workload writes the disk as the vCPUs write memory: a writer thread
//! (for KVM, the host-side disk device, which is where a VMM performs disk
//! writes anyway) writes pseudo-random blocks at [`DiskWorkload`]'s rate
//! while the guest runs, throttled with the vCPUs. Service appends are
//! written through to the disk's log area before they are acknowledged.
//! Both happen under one lock, the disk gate, which `pause` takes too: when
//! `pause` returns no disk write is in flight, and none starts until
//! `resume`, so the blackout's final round catches every block written.

use crate::dirty::DirtyBitmap;
use crate::disk::{VirtualDisk, BLOCK_SIZE};
use crate::guest::{pages_in, Guest, GuestError, GuestResult, MemoryDigest};
use crate::lease::{BoundLease, RunLease};
use crate::service::ServiceError;
use crate::state::DeviceState;
use crate::workload::VcpuContext;
use serde::{Deserialize, Serialize};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where a guest's disk lives, as far as a move is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskPlacement {
    /// On the node's own storage: copied with memory, in the copy space.
    Copied,
    /// On storage every node reaches: not copied.
    Shared,
}

/// How the workload writes the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskWorkload {
    /// Blocks written per second while the guest runs (0: only the
    /// service's records).
    pub blocks_per_sec: u64,
    /// Blocks written when the disk is created, before the guest runs.
    pub prefill_blocks: u64,
    /// Seed of the writer's choices.
    pub seed: u64,
}

/// The writer wakes this often and writes what its rate allows.
const WRITER_TICK: Duration = Duration::from_millis(5);
/// Blocks written per hold of the disk gate, which bounds how long `pause`
/// can wait for the writer.
const WRITER_BATCH: u64 = 16;

/// What the guest and its writer thread share.
struct Shared {
    inner: Arc<dyn Guest>,
    disk: Arc<VirtualDisk>,
    /// Held across every disk write of the running guest, and by `pause`.
    gate: Mutex<()>,
    lease: BoundLease,
    throttle_ppm: AtomicU32,
    stop: AtomicBool,
}

impl Shared {
    fn gate(&self) -> MutexGuard<'_, ()> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the guest may write its disk now (callers hold the gate).
    fn runs(&self) -> bool {
        !self.stop.load(Ordering::Acquire) && !self.inner.is_paused() && self.lease.holds()
    }
}

/// A guest and its disk (see the module doc).
pub struct GuestWithDisk {
    shared: Arc<Shared>,
    placement: DiskPlacement,
    memory_pages: u64,
    /// Reused per round: the inner guest's and the disk's dirty logs.
    scratch: Mutex<(DirtyBitmap, DirtyBitmap)>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl GuestWithDisk {
    /// Attaches `disk` to `inner` and starts the workload's disk writer.
    pub fn new(
        inner: Arc<dyn Guest>,
        disk: Arc<VirtualDisk>,
        placement: DiskPlacement,
        workload: DiskWorkload,
    ) -> GuestResult<Arc<GuestWithDisk>> {
        let memory_pages = inner.page_count();
        let shared = Arc::new(Shared {
            inner,
            disk,
            gate: Mutex::new(()),
            lease: BoundLease::new(),
            throttle_ppm: AtomicU32::new(0),
            stop: AtomicBool::new(false),
        });
        let writer = if workload.blocks_per_sec > 0 {
            let shared = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("disk-writer".into())
                    .spawn(move || writer_loop(&shared, workload))
                    .map_err(|e| {
                        GuestError::Backend(format!("cannot start the disk writer: {e}"))
                    })?,
            )
        } else {
            None
        };
        let blocks = shared.disk.blocks();
        Ok(Arc::new(GuestWithDisk {
            shared,
            placement,
            memory_pages,
            scratch: Mutex::new((DirtyBitmap::new(memory_pages), DirtyBitmap::new(blocks))),
            writer: Mutex::new(writer),
        }))
    }

    pub fn disk(&self) -> &Arc<VirtualDisk> {
        &self.shared.disk
    }

    pub fn placement(&self) -> DiskPlacement {
        self.placement
    }

    /// Pages at the end of the copy space that are disk blocks: all of the
    /// disk's when it is copied with the guest, none when it is shared.
    pub fn copied_blocks(&self) -> u64 {
        if self.copied() {
            self.shared.disk.blocks()
        } else {
            0
        }
    }

    /// Pages of the copy space that are memory.
    pub fn memory_pages(&self) -> u64 {
        self.memory_pages
    }

    fn copied(&self) -> bool {
        self.placement == DiskPlacement::Copied
    }

    fn inner(&self) -> &dyn Guest {
        self.shared.inner.as_ref()
    }

    fn disk_err(e: std::io::Error) -> GuestError {
        GuestError::Backend(format!("disk: {e}"))
    }
}

/// Writes `prefill` pseudo-random blocks into the data area of a new disk.
pub fn prefill(disk: &VirtualDisk, workload: &DiskWorkload) -> std::io::Result<()> {
    let mut rng = VcpuContext::new(workload.seed, u32::MAX);
    let mut block = vec![0u8; BLOCK_SIZE];
    for _ in 0..workload.prefill_blocks {
        write_random_block(disk, &mut rng, &mut block)?;
    }
    Ok(())
}

fn write_random_block(
    disk: &VirtualDisk,
    rng: &mut VcpuContext,
    buf: &mut [u8],
) -> std::io::Result<()> {
    let first = disk.log_blocks();
    let span = disk.blocks().saturating_sub(first);
    if span == 0 {
        return Ok(());
    }
    let block = first + rng.next_u64() % span;
    for word in buf.chunks_exact_mut(8) {
        word.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    buf[..8].copy_from_slice(&block.to_le_bytes());
    disk.write_blocks(block, buf)
}

fn writer_loop(shared: &Shared, workload: DiskWorkload) {
    let mut rng = VcpuContext::new(workload.seed, u32::MAX - 1);
    let mut buf = vec![0u8; BLOCK_SIZE];
    let mut credit = 0.0f64;
    let mut last = Instant::now();
    while !shared.stop.load(Ordering::Acquire) {
        std::thread::park_timeout(WRITER_TICK);
        let now = Instant::now();
        let share = 1.0 - f64::from(shared.throttle_ppm.load(Ordering::Relaxed)) / 1e6;
        let rate = workload.blocks_per_sec as f64 * share;
        // At most a tenth of a second's writes at once: no burst after a pause.
        credit = (credit + rate * (now - last).as_secs_f64()).min(rate / 10.0 + 1.0);
        last = now;
        while credit >= 1.0 {
            let gate = shared.gate();
            if !shared.runs() {
                credit = 0.0;
                break;
            }
            let n = (credit as u64).min(WRITER_BATCH);
            for _ in 0..n {
                if let Err(e) = write_random_block(&shared.disk, &mut rng, &mut buf) {
                    tracing::warn!(disk = %shared.disk.path().display(), "disk write failed: {e}");
                }
            }
            drop(gate);
            credit -= n as f64;
        }
    }
}

/// Where a range of the copy space lies: `(memory pages, disk blocks)` as
/// `(first, count)` each, split at `memory_pages`.
fn split(memory_pages: u64, first: u64, count: u64) -> ((u64, u64), (u64, u64)) {
    let end = first + count;
    let mem = (
        first.min(memory_pages),
        end.min(memory_pages) - first.min(memory_pages),
    );
    let disk_first = first.max(memory_pages);
    let disk = (disk_first - memory_pages, end.saturating_sub(disk_first));
    (mem, disk)
}

/// Writes `memory` then `disk` into `out`, disk bit `b` at `memory.len() + b`.
pub fn join_bitmaps(out: &mut DirtyBitmap, memory: &DirtyBitmap, disk: &DirtyBitmap) {
    let offset = memory.len();
    let words = out.words_mut();
    words.fill(0);
    for (o, m) in words.iter_mut().zip(memory.words()) {
        *o = *m;
    }
    let (base, shift) = ((offset / 64) as usize, (offset % 64) as u32);
    for (i, &w) in disk.words().iter().enumerate() {
        if w == 0 {
            continue;
        }
        if let Some(o) = words.get_mut(base + i) {
            *o |= w << shift;
        }
        if shift > 0 {
            if let Some(o) = words.get_mut(base + i + 1) {
                *o |= w >> (64 - shift);
            }
        }
    }
    out.trim();
}

/// Set bits of `bitmap` at or past `from` (disk blocks, with `from` the
/// memory's page count).
pub fn count_from(bitmap: &DirtyBitmap, from: u64) -> u64 {
    let (word, bit) = ((from / 64) as usize, from % 64);
    let Some(first) = bitmap.words().get(word) else {
        return 0;
    };
    let head = u64::from((first & (u64::MAX << bit)).count_ones());
    head + bitmap.words()[word + 1..]
        .iter()
        .map(|w| u64::from(w.count_ones()))
        .sum::<u64>()
}

impl Guest for GuestWithDisk {
    fn kind(&self) -> &'static str {
        self.inner().kind()
    }

    fn page_count(&self) -> u64 {
        if self.copied() {
            self.memory_pages + self.shared.disk.blocks()
        } else {
            self.memory_pages
        }
    }

    fn with_disk(&self) -> Option<&GuestWithDisk> {
        Some(self)
    }

    fn read_pages(&self, first: u64, buf: &mut [u8]) -> GuestResult<()> {
        let count = pages_in(buf.len())?;
        self.check_range(first, count)?;
        let ((mf, mc), (df, _)) = split(self.memory_pages, first, count);
        let (mem, disk) = buf.split_at_mut(mc as usize * BLOCK_SIZE);
        if mc > 0 {
            self.inner().read_pages(mf, mem)?;
        }
        if !disk.is_empty() {
            self.shared
                .disk
                .read_blocks(df, disk)
                .map_err(Self::disk_err)?;
        }
        Ok(())
    }

    fn read_pages_uninit(&self, first: u64, buf: &mut [MaybeUninit<u8>]) -> GuestResult<()> {
        let count = pages_in(buf.len())?;
        self.check_range(first, count)?;
        let ((mf, mc), (df, _)) = split(self.memory_pages, first, count);
        let (mem, disk) = buf.split_at_mut(mc as usize * BLOCK_SIZE);
        if mc > 0 {
            self.inner().read_pages_uninit(mf, mem)?;
        }
        if !disk.is_empty() {
            disk.fill(MaybeUninit::new(0));
            // SAFETY: every byte was just initialised, and `MaybeUninit<u8>`
            // has the layout of `u8`.
            let disk = unsafe { &mut *(std::ptr::from_mut(disk) as *mut [u8]) };
            self.shared
                .disk
                .read_blocks(df, disk)
                .map_err(Self::disk_err)?;
        }
        Ok(())
    }

    fn write_pages(&self, first: u64, data: &[u8]) -> GuestResult<()> {
        let count = pages_in(data.len())?;
        self.check_range(first, count)?;
        let ((mf, mc), (df, _)) = split(self.memory_pages, first, count);
        let (mem, disk) = data.split_at(mc as usize * BLOCK_SIZE);
        if mc > 0 {
            self.inner().write_pages(mf, mem)?;
        }
        if !disk.is_empty() {
            self.shared
                .disk
                .write_blocks(df, disk)
                .map_err(Self::disk_err)?;
        }
        Ok(())
    }

    fn zero_pages(&self, first: u64, count: u64) -> GuestResult<()> {
        self.check_range(first, count)?;
        let ((mf, mc), (df, dc)) = split(self.memory_pages, first, count);
        if mc > 0 {
            self.inner().zero_pages(mf, mc)?;
        }
        if dc > 0 {
            self.shared
                .disk
                .zero_blocks(df, dc)
                .map_err(Self::disk_err)?;
        }
        Ok(())
    }

    fn nonzero_candidates(&self, candidates: &mut DirtyBitmap) -> GuestResult<()> {
        if !self.copied() {
            return self.inner().nonzero_candidates(candidates);
        }
        self.check_bitmap(candidates)?;
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let (mem, disk) = &mut *scratch;
        self.inner().nonzero_candidates(mem)?;
        self.shared.disk.allocated(disk).map_err(Self::disk_err)?;
        join_bitmaps(candidates, mem, disk);
        Ok(())
    }

    fn fetch_and_clear_dirty(&self, bitmap: &mut DirtyBitmap) -> GuestResult<()> {
        if !self.copied() {
            return self.inner().fetch_and_clear_dirty(bitmap);
        }
        self.check_bitmap(bitmap)?;
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let (mem, disk) = &mut *scratch;
        self.inner().fetch_and_clear_dirty(mem)?;
        self.shared.disk.fetch_and_clear_dirty(disk);
        join_bitmaps(bitmap, mem, disk);
        Ok(())
    }

    fn start_dirty_log(&self) -> GuestResult<()> {
        self.inner().start_dirty_log()?;
        self.shared.disk.clear_dirty();
        Ok(())
    }

    fn pause(&self) -> GuestResult<()> {
        // Under the disk gate: no disk write is in flight once this returns,
        // and the next one sees the guest paused.
        let _gate = self.shared.gate();
        self.inner().pause()
    }

    fn resume(&self) -> GuestResult<()> {
        self.inner().resume()
    }

    fn is_paused(&self) -> bool {
        self.inner().is_paused()
    }

    fn bind_lease(&self, lease: RunLease) {
        self.shared.lease.bind(lease.clone());
        self.inner().bind_lease(lease);
    }

    fn set_throttle(&self, share: f64) -> GuestResult<()> {
        self.inner().set_throttle(share)?;
        self.shared
            .throttle_ppm
            .store((share * 1e6) as u32, Ordering::Relaxed);
        Ok(())
    }

    fn save_state(&self) -> GuestResult<DeviceState> {
        self.inner().save_state()
    }

    fn restore_state(&self, state: &DeviceState) -> GuestResult<()> {
        self.inner().restore_state(state)
    }

    fn digest(&self) -> GuestResult<MemoryDigest> {
        let digest = self.inner().digest()?;
        if !self.copied() {
            return Ok(digest);
        }
        let disk = self.shared.disk.digest().map_err(Self::disk_err)?;
        let mut both = [0u8; 32];
        both[..16].copy_from_slice(&digest.memory.to_le_bytes());
        both[16..].copy_from_slice(&disk.to_le_bytes());
        Ok(MemoryDigest {
            memory: xxhash_rust::xxh3::xxh3_128(&both),
            state: digest.state,
        })
    }

    fn service_append(&self, record: &[u8]) -> Result<u64, ServiceError> {
        let _gate = self.shared.gate();
        let seq = self.inner().service_append(record)?;
        // Acknowledged only once it is on the disk too.
        self.shared
            .disk
            .write_record(seq, record)
            .map_err(|e| ServiceError::Disk(e.to_string()))?;
        if !self.shared.lease.holds() {
            return Err(ServiceError::Fenced);
        }
        Ok(seq)
    }

    fn service_records(&self) -> Result<Vec<(u64, Vec<u8>)>, ServiceError> {
        self.inner().service_records()
    }

    fn destroy(&self) {
        self.shared.stop.store(true, Ordering::Release);
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(writer) = writer {
            writer.thread().unpark();
            let _ = writer.join();
        }
        self.inner().destroy();
    }
}

impl Drop for GuestWithDisk {
    fn drop(&mut self) {
        self.destroy();
    }
}

#[cfg(test)]
mod tests;
