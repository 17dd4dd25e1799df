//! The `Guest` trait: what a live-migration engine needs from any kind of VM.

use crate::dirty::DirtyBitmap;
use crate::lease::RunLease;
use crate::service::ServiceError;
use crate::state::DeviceState;

/// Size of a guest page. Every memory operation works in whole pages.
pub const PAGE_SIZE: usize = 4096;

/// Errors a guest reports. Each names what was wrong with the request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuestError {
    #[error("pages {first}..{end} are out of range: the guest has {pages} pages")]
    PageOutOfRange { first: u64, end: u64, pages: u64 },
    #[error("buffer of {len} bytes is not a whole number of 4 KiB pages")]
    UnalignedBuffer { len: usize },
    #[error("dirty bitmap covers {got} pages but the guest has {expected}")]
    BitmapSize { expected: u64, got: u64 },
    #[error("device state version {found} is not supported (this node reads version {supported})")]
    UnknownStateVersion { found: u32, supported: u32 },
    #[error("device state is for a {found} guest, not a {expected} guest")]
    StateKind { expected: String, found: String },
    #[error("device state is malformed: {0}")]
    MalformedState(String),
    #[error("device state does not fit this guest: {0}")]
    StateMismatch(String),
    #[error("the guest must be paused for {0}")]
    NotPaused(&'static str),
    #[error("the guest has been destroyed")]
    Destroyed,
    #[error("throttle {0} is outside 0.0..=0.99")]
    BadThrottle(String),
    #[error("guest memory of {bytes} bytes could not be mapped: {reason}")]
    Memory { bytes: u64, reason: String },
    #[error("guest backend failure: {0}")]
    Backend(String),
}

pub type GuestResult<T> = Result<T, GuestError>;

/// A digest of all of a guest's memory plus its device state. Two guests with
/// equal digests hold the same bytes in every page and the same device state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct MemoryDigest {
    /// xxh3-128 over every page, in page order.
    pub memory: u128,
    /// xxh3-128 over the encoded device state.
    pub state: u128,
}

impl std::fmt::Display for MemoryDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "mem:{:032x} state:{:032x}", self.memory, self.state)
    }
}

/// What a live-migration engine drives. Implementations are shared between the
/// engine's tasks, so every method takes `&self`.
///
/// Memory may be read while vCPUs run: a page read while it is being written
/// can be torn, and is always marked dirty again afterwards, so a later round
/// sends it again. A backend must mark a page dirty *after* the write to it has
/// landed, never before.
pub trait Guest: Send + Sync {
    /// Short name of the backend (`"sim"`, `"kvm"`), recorded in device state.
    fn kind(&self) -> &'static str;

    /// Number of 4 KiB pages of guest memory (with a disk copied next to
    /// it, its blocks too: see [`with_disk`](Self::with_disk)).
    fn page_count(&self) -> u64;

    /// The guest's virtual disk, for a guest that has one (see
    /// `crate::with_disk`): where it lives, and how much of the copy space
    /// is disk blocks rather than memory.
    fn with_disk(&self) -> Option<&crate::with_disk::GuestWithDisk> {
        None
    }

    /// Copies pages `first..first + buf.len() / PAGE_SIZE` into `buf`.
    fn read_pages(&self, first: u64, buf: &mut [u8]) -> GuestResult<()>;

    /// Like [`read_pages`](Self::read_pages), into a buffer not yet
    /// initialised: a migration reads each page once, straight into the buffer
    /// that goes to the wire, without zeroing it first. All of `buf` is
    /// initialised on success.
    fn read_pages_uninit(
        &self,
        first: u64,
        buf: &mut [std::mem::MaybeUninit<u8>],
    ) -> GuestResult<()> {
        buf.fill(std::mem::MaybeUninit::new(0));
        // SAFETY: every byte was just initialised, and `MaybeUninit<u8>` has
        // the layout of `u8`.
        let buf = unsafe { &mut *(std::ptr::from_mut(buf) as *mut [u8]) };
        self.read_pages(first, buf)
    }

    /// Writes pages starting at `first` from `data` (a receiving guest).
    fn write_pages(&self, first: u64, data: &[u8]) -> GuestResult<()>;

    /// Sets `count` pages starting at `first` to zero (a receiving guest).
    fn zero_pages(&self, first: u64, count: u64) -> GuestResult<()>;

    /// Marks in `candidates` every page that may hold non-zero bytes; a page
    /// left clear is certainly zero. Cheap: it need not read the pages.
    fn nonzero_candidates(&self, candidates: &mut DirtyBitmap) -> GuestResult<()> {
        self.check_bitmap(candidates)?;
        candidates.set_all();
        Ok(())
    }

    /// Moves the dirty log into `bitmap` (which the caller owns and reuses) and
    /// clears it: afterwards the log records only writes that land later.
    fn fetch_and_clear_dirty(&self, bitmap: &mut DirtyBitmap) -> GuestResult<()>;

    /// Starts or restarts dirty logging; the log starts empty.
    fn start_dirty_log(&self) -> GuestResult<()>;

    /// Stops the vCPUs. Returns once no vCPU can write guest memory.
    fn pause(&self) -> GuestResult<()>;

    /// Lets the vCPUs run again.
    fn resume(&self) -> GuestResult<()>;

    /// Whether the vCPUs are stopped.
    fn is_paused(&self) -> bool;

    /// From now on the guest runs only while `lease` holds: while it does not,
    /// the vCPUs do no guest work (they stop within one batch) and
    /// `service_append` refuses with [`ServiceError::Fenced`], with no call to
    /// `pause` needed. Replaces the lease bound before; a guest starts with
    /// [`RunLease::unlimited`]. Independent of pause: `is_paused` says only
    /// whether `pause` stopped the guest, and the caller asks the lease it
    /// bound whether the guest is fenced.
    fn bind_lease(&self, lease: RunLease);

    /// Holds the vCPUs back for `share` (0.0..=0.99) of their time.
    fn set_throttle(&self, share: f64) -> GuestResult<()>;

    /// Saves vCPU and device state. The guest must be paused.
    fn save_state(&self) -> GuestResult<DeviceState>;

    /// Restores vCPU and device state. The guest must be paused.
    fn restore_state(&self, state: &DeviceState) -> GuestResult<()>;

    /// Digest of all memory plus device state. The guest must be paused.
    fn digest(&self) -> GuestResult<MemoryDigest>;

    /// Appends a record to the guest's service; returns its sequence number once
    /// the record is in guest memory (the acknowledgement).
    fn service_append(&self, record: &[u8]) -> Result<u64, ServiceError>;

    /// Reads the service's records back (from guest memory).
    fn service_records(&self) -> Result<Vec<(u64, Vec<u8>)>, ServiceError>;

    /// Stops the vCPUs for good and frees guest memory.
    fn destroy(&self);

    /// The guest's own stream migration, for a backend that moves as one
    /// byte stream (QEMU) rather than page by page.
    fn as_stream(&self) -> Option<&dyn crate::stream::StreamGuest> {
        None
    }

    /// Checks that `bitmap` covers exactly this guest's pages.
    fn check_bitmap(&self, bitmap: &DirtyBitmap) -> GuestResult<()> {
        if bitmap.len() != self.page_count() {
            return Err(GuestError::BitmapSize {
                expected: self.page_count(),
                got: bitmap.len(),
            });
        }
        Ok(())
    }

    /// Checks that pages `first..first + count` exist.
    fn check_range(&self, first: u64, count: u64) -> GuestResult<()> {
        let end = first.saturating_add(count);
        if end > self.page_count() {
            return Err(GuestError::PageOutOfRange {
                first,
                end,
                pages: self.page_count(),
            });
        }
        Ok(())
    }
}

/// Number of whole pages in a buffer, or an error if it is not page-aligned.
pub fn pages_in(len: usize) -> GuestResult<u64> {
    if len % PAGE_SIZE != 0 {
        return Err(GuestError::UnalignedBuffer { len });
    }
    Ok((len / PAGE_SIZE) as u64)
}

/// Whether a page (or run of pages) is all zero bytes.
pub fn is_zero(bytes: &[u8]) -> bool {
    // Compare 8 bytes at a time in blocks of 128 bytes: the compiler vectorises
    // each block, and a page with data (most of them) stops at its first.
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64, and align_to only yields
        // correctly aligned words from inside `bytes`.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0)
        && words
            .chunks(16)
            .all(|block| block.iter().fold(0u64, |acc, w| acc | w) == 0)
        && tail.iter().all(|b| *b == 0)
}
