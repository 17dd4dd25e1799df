//! The guest's append service: a log of records kept in guest memory.
//!
//! Clients append a record and get back its sequence number once the record is
//! in guest memory — the acknowledgement. Because the log lives in guest pages,
//! it moves with the guest's memory: after a migration the target continues the
//! sequence, and every acknowledged record must be found there. While the guest
//! is paused the service refuses with [`ServiceError::Paused`], which is how a
//! client measures the blackout. While the guest's
//! [`RunLease`](crate::RunLease) does not hold it refuses with
//! [`ServiceError::Fenced`]: a fenced guest acknowledges nothing.
//!
//! Layout, at the start of guest memory (little-endian):
//! `magic u64 | count u64 | used u64 | …` header in the first 64 bytes, then
//! records `seq u64 | len u32 | pad u32 | data, padded to 8 bytes`.

use crate::dirty::DirtyLog;
use crate::guest::PAGE_SIZE;
use crate::memory::GuestMemory;

/// Default number of pages reserved for the service log (4 MiB).
pub const SERVICE_PAGES: u64 = 1024;
/// Largest record a client may append.
pub const MAX_RECORD: usize = 1024;

const MAGIC: u64 = u64::from_le_bytes(*b"FERRYSVC");
const HEADER: usize = 64;
const RECORD_HEADER: usize = 16;

/// Why the service did not take (or could not list) records.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ServiceError {
    #[error("the guest is paused: the service is not answering")]
    Paused,
    #[error("the guest is not running here (destroyed or never started)")]
    NotRunning,
    #[error("the guest is fenced: its node's lease with the cluster expired")]
    Fenced,
    #[error("the service log is full ({used} of {capacity} bytes)")]
    Full { used: u64, capacity: u64 },
    #[error("record of {0} bytes is over the {MAX_RECORD} byte limit")]
    TooLarge(usize),
    #[error("the service log in guest memory is corrupt: {0}")]
    Corrupt(String),
    #[error("the record could not be written through to the guest's disk: {0}")]
    Disk(String),
}

/// The service log over a guest's memory. Holds no state of its own: every
/// call reads the header from guest memory, so a guest that received the
/// memory of another continues its log.
pub struct ServiceLog<'a> {
    mem: &'a GuestMemory,
    dirty: &'a DirtyLog,
    pages: u64,
}

impl<'a> ServiceLog<'a> {
    pub fn new(mem: &'a GuestMemory, dirty: &'a DirtyLog, pages: u64) -> Self {
        ServiceLog { mem, dirty, pages }
    }

    fn capacity(&self) -> usize {
        self.pages as usize * PAGE_SIZE
    }

    fn store(&self, offset: usize, bytes: &[u8]) {
        self.mem.store(offset, bytes);
        let first = (offset / PAGE_SIZE) as u64;
        let last = ((offset + bytes.len() - 1) / PAGE_SIZE) as u64;
        // Write first, mark after: see `DirtyLog`.
        self.dirty.mark_range(first, last - first + 1);
    }

    fn word(&self, offset: usize) -> u64 {
        let mut b = [0u8; 8];
        self.mem.load(offset, &mut b);
        u64::from_le_bytes(b)
    }

    /// Writes an empty log (a freshly booted guest).
    pub fn format(&self) {
        let mut header = [0u8; 24];
        header[..8].copy_from_slice(&MAGIC.to_le_bytes());
        self.store(0, &header);
    }

    fn header(&self) -> Result<(u64, usize), ServiceError> {
        if self.word(0) != MAGIC {
            return Err(ServiceError::Corrupt("no service header".into()));
        }
        let count = self.word(8);
        let used = self.word(16) as usize;
        if used > self.capacity() - HEADER {
            return Err(ServiceError::Corrupt(format!(
                "used {used} bytes beyond the log"
            )));
        }
        Ok((count, used))
    }

    /// Appends a record; the caller holds the guest's run gate and the service
    /// lock, so no pause or other append interleaves.
    pub fn append(&self, record: &[u8]) -> Result<u64, ServiceError> {
        if record.len() > MAX_RECORD {
            return Err(ServiceError::TooLarge(record.len()));
        }
        let (count, used) = self.header()?;
        let size = RECORD_HEADER + record.len().next_multiple_of(8);
        if HEADER + used + size > self.capacity() {
            return Err(ServiceError::Full {
                used: used as u64,
                capacity: self.capacity() as u64,
            });
        }
        let seq = count + 1;
        let at = HEADER + used;
        let mut head = [0u8; RECORD_HEADER];
        head[..8].copy_from_slice(&seq.to_le_bytes());
        head[8..12].copy_from_slice(&(record.len() as u32).to_le_bytes());
        self.store(at, &head);
        if !record.is_empty() {
            self.store(at + RECORD_HEADER, record);
        }
        // The header last: a record is part of the log once `count` covers it.
        let mut counts = [0u8; 16];
        counts[..8].copy_from_slice(&seq.to_le_bytes());
        counts[8..].copy_from_slice(&((used + size) as u64).to_le_bytes());
        self.store(8, &counts);
        Ok(seq)
    }

    /// Every record in the log, in order.
    pub fn records(&self) -> Result<Vec<(u64, Vec<u8>)>, ServiceError> {
        let (count, used) = self.header()?;
        let mut out = Vec::with_capacity(count as usize);
        let mut at = HEADER;
        while at < HEADER + used {
            let seq = self.word(at);
            let len = (self.word(at + 8) & 0xffff_ffff) as usize;
            if len > MAX_RECORD || at + RECORD_HEADER + len > HEADER + used {
                return Err(ServiceError::Corrupt(format!(
                    "record at byte {at} has length {len}"
                )));
            }
            let mut data = vec![0u8; len];
            self.mem.load(at + RECORD_HEADER, &mut data);
            out.push((seq, data));
            at += RECORD_HEADER + len.next_multiple_of(8);
        }
        if out.len() as u64 != count {
            return Err(ServiceError::Corrupt(format!(
                "header says {count} records, found {}",
                out.len()
            )));
        }
        Ok(out)
    }
}
