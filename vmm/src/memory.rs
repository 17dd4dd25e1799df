//! Guest memory: one anonymous mapping, lazily populated unless asked otherwise.
//!
//! The mapping is shared with whatever runs the guest (vCPU threads of a
//! `SimGuest`, or KVM): like device DMA, the host copies in and out of it with
//! raw pointers while the guest may be writing. A read racing a write can be
//! torn; the dirty log guarantees such a page is sent again.

use crate::guest::{pages_in, GuestError, GuestResult, PAGE_SIZE};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// An anonymous, private, page-aligned mapping of guest memory.
pub struct GuestMemory {
    base: NonNull<u8>,
    bytes: usize,
    /// Owns the mapping; shared with a background populate, so the memory
    /// stays mapped until that has stopped too.
    mapping: Arc<Mapping>,
}

/// The mmap itself: unmapped when its last owner goes.
struct Mapping {
    base: NonNull<u8>,
    bytes: usize,
    /// Set when the guest memory is dropped: a background populate stops.
    dropped: AtomicBool,
}

// SAFETY: the mapping is plain memory owned by this value; concurrent access is
// the guest/host sharing described in the module doc and goes through raw
// pointers only.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `GuestMemory::new` mapped; no pointer
        // into it outlives the last owner.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

// SAFETY: see `Mapping`.
unsafe impl Send for GuestMemory {}
// SAFETY: as above; no method hands out a Rust reference into the mapping.
unsafe impl Sync for GuestMemory {}

/// How much a background populate faults in per call, checking in between
/// whether the memory was dropped.
const POPULATE_STEP: usize = 64 << 20;

impl GuestMemory {
    /// Maps `bytes` (a multiple of 4 KiB) of zeroed memory. Untouched pages cost
    /// nothing.
    ///
    /// With `populate` (a guest receiving a migration) a background thread
    /// faults the memory in while the copy begins: the target is ready at
    /// once instead of after zeroing all of its memory, and the copy meets few
    /// page faults. Transparent huge pages were tried and left out: on a host
    /// whose memory is fragmented, the first fault of each huge page waits for
    /// the kernel to compact memory (seen: a 1 GiB move's round 0 at a third of
    /// its usual rate, 2 s lost), and the gain once warm was within noise.
    pub fn new(bytes: u64, populate: bool) -> GuestResult<Self> {
        let len = usize::try_from(bytes).map_err(|_| GuestError::Memory {
            bytes,
            reason: "larger than the address space".into(),
        })?;
        if len == 0 || len % PAGE_SIZE != 0 {
            return Err(GuestError::Memory {
                bytes,
                reason: "size must be a non-zero multiple of 4 KiB".into(),
            });
        }
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: a fresh anonymous mapping with no address hint touches no
        // existing memory; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(GuestError::Memory {
                bytes,
                reason: std::io::Error::last_os_error().to_string(),
            });
        }
        let start = ptr.cast::<u8>();
        let base = NonNull::new(start).ok_or_else(|| GuestError::Memory {
            bytes,
            reason: "mmap returned null".into(),
        })?;
        let mapping = Arc::new(Mapping {
            base,
            bytes: len,
            dropped: AtomicBool::new(false),
        });
        if populate {
            let background = mapping.clone();
            let spawned = std::thread::Builder::new()
                .name("populate".into())
                .spawn(move || background.populate());
            if spawned.is_err() {
                // No thread: the copy faults pages in as it writes them.
                tracing::debug!("no thread to populate guest memory");
            }
        }
        Ok(GuestMemory {
            base,
            bytes: len,
            mapping,
        })
    }

    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    pub fn pages(&self) -> u64 {
        (self.bytes / PAGE_SIZE) as u64
    }

    /// Host address of the mapping, for registering it with a hypervisor.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    fn range(&self, first: u64, count: u64) -> GuestResult<(usize, usize)> {
        let end = first.saturating_add(count);
        if end > self.pages() {
            return Err(GuestError::PageOutOfRange {
                first,
                end,
                pages: self.pages(),
            });
        }
        Ok((first as usize * PAGE_SIZE, count as usize * PAGE_SIZE))
    }

    /// Copies pages from `first` into `buf`.
    pub fn read(&self, first: u64, buf: &mut [u8]) -> GuestResult<()> {
        let (off, len) = self.range(first, pages_in(buf.len())?)?;
        // SAFETY: `range` checked that off..off+len lies inside the mapping, and
        // `buf` is a distinct host buffer of exactly `len` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.as_ptr().add(off), buf.as_mut_ptr(), len)
        };
        Ok(())
    }

    /// Copies pages from `first` into `buf`, which need not be initialised; all
    /// of it is on success.
    pub fn read_uninit(
        &self,
        first: u64,
        buf: &mut [std::mem::MaybeUninit<u8>],
    ) -> GuestResult<()> {
        let (off, len) = self.range(first, pages_in(buf.len())?)?;
        // SAFETY: as in `read`; writing through a `MaybeUninit` buffer's pointer
        // is how such a buffer is initialised.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.as_ptr().add(off),
                buf.as_mut_ptr().cast::<u8>(),
                len,
            )
        };
        Ok(())
    }

    /// Copies `data` into pages from `first`.
    pub fn write(&self, first: u64, data: &[u8]) -> GuestResult<()> {
        let (off, len) = self.range(first, pages_in(data.len())?)?;
        // SAFETY: as in `read`, with the roles of the buffers swapped.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.as_ptr().add(off), len) };
        Ok(())
    }

    /// Zeroes `count` pages from `first`.
    pub fn zero(&self, first: u64, count: u64) -> GuestResult<()> {
        let (off, len) = self.range(first, count)?;
        // SAFETY: `range` checked the bounds.
        unsafe { std::ptr::write_bytes(self.base.as_ptr().add(off), 0, len) };
        Ok(())
    }

    /// Writes `bytes` at byte offset `offset` (used by guest-side code: the
    /// simulated vCPUs and the service). Panics if out of range: callers are
    /// the guest's own code and compute offsets from its own layout.
    pub fn store(&self, offset: usize, bytes: &[u8]) {
        assert!(
            offset + bytes.len() <= self.bytes,
            "guest store out of range"
        );
        // SAFETY: bounds asserted above; see the module doc on sharing.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.base.as_ptr().add(offset),
                bytes.len(),
            )
        };
    }

    /// Reads `buf.len()` bytes at byte offset `offset` (guest-side code).
    pub fn load(&self, offset: usize, buf: &mut [u8]) {
        assert!(offset + buf.len() <= self.bytes, "guest load out of range");
        // SAFETY: bounds asserted above.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
    }

    /// Gives every page back to the kernel; they read as zero afterwards.
    pub fn discard(&self) {
        // A populate still running would fault the pages back in.
        self.mapping.dropped.store(true, Ordering::Relaxed);
        // SAFETY: MADV_DONTNEED on our own private anonymous mapping only drops
        // its pages; the mapping stays valid and reads back zeros.
        unsafe { libc::madvise(self.base.as_ptr().cast(), self.bytes, libc::MADV_DONTNEED) };
    }

    /// Hashes all of memory (xxh3-128), in page order.
    pub fn hash(&self) -> u128 {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < self.bytes {
            let n = buf.len().min(self.bytes - off);
            self.load(off, &mut buf[..n]);
            hasher.update(&buf[..n]);
            off += n;
        }
        hasher.digest128()
    }
}

impl Mapping {
    /// Faults every page in, a step at a time, until done or the memory is
    /// dropped. Pages the copy already wrote keep their contents.
    fn populate(&self) {
        let mut at = 0;
        while at < self.bytes && !self.dropped.load(Ordering::Relaxed) {
            let n = POPULATE_STEP.min(self.bytes - at);
            // SAFETY: the range lies inside the mapping, which `self` keeps
            // mapped; MADV_POPULATE_WRITE faults pages in without changing what
            // they hold.
            let done = unsafe {
                libc::madvise(
                    self.base.as_ptr().add(at).cast(),
                    n,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            if done != 0 {
                // An old kernel (before 5.14) or no memory left: the copy
                // faults pages in as it goes, as it would without this.
                return;
            }
            at += n;
        }
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // The mapping goes with its last owner, once a populate in flight
        // noticed this.
        self.mapping.dropped.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_what_was_written() {
        let m = GuestMemory::new(16 * PAGE_SIZE as u64, false).unwrap();
        let data = vec![7u8; 2 * PAGE_SIZE];
        m.write(3, &data).unwrap();
        let mut back = vec![0u8; 2 * PAGE_SIZE];
        m.read(3, &mut back).unwrap();
        assert_eq!(back, data);
        m.zero(3, 1).unwrap();
        m.read(3, &mut back).unwrap();
        assert!(back[..PAGE_SIZE].iter().all(|b| *b == 0));
        let mut raw = Vec::with_capacity(2 * PAGE_SIZE);
        m.read_uninit(3, &mut raw.spare_capacity_mut()[..2 * PAGE_SIZE])
            .unwrap();
        // SAFETY: `read_uninit` initialised these bytes.
        unsafe { raw.set_len(2 * PAGE_SIZE) };
        assert_eq!(raw, back);
    }

    #[test]
    fn out_of_range_and_unaligned_are_errors() {
        let m = GuestMemory::new(4 * PAGE_SIZE as u64, false).unwrap();
        let mut buf = vec![0u8; 2 * PAGE_SIZE];
        assert_eq!(
            m.read(3, &mut buf),
            Err(GuestError::PageOutOfRange {
                first: 3,
                end: 5,
                pages: 4
            })
        );
        assert_eq!(
            m.read(0, &mut buf[..100]),
            Err(GuestError::UnalignedBuffer { len: 100 })
        );
        assert!(GuestMemory::new(1000, false).is_err());
    }
}
