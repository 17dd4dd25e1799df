//! A guest's virtual disk: one sparse file, read and written in 4 KiB blocks,
//! with a dirty-block log so a live migration can copy it in rounds while the
//! guest writes to it, and a digest that two copies can be compared by.
//!
//! The first blocks of the disk hold the guest service's log: every record
//! the service acknowledges is written through to a slot here first (see
//! [`VirtualDisk::write_record`]), so "every acknowledged append is on the
//! disk" can be checked by reading the disk alone. The rest is the
//! workload's data area.
//!
//! Blocks never written are holes in the file: a 1 GiB disk costs what its
//! writes cost. Zeroing a block punches a hole, and round 0 of a move asks
//! the file system which blocks hold data (`SEEK_DATA`/`SEEK_HOLE`) instead
//! of reading the whole disk.

use crate::dirty::{DirtyBitmap, DirtyLog};
use crate::guest::{is_zero, PAGE_SIZE};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A disk block is a guest page: the copy space treats both alike.
pub const BLOCK_SIZE: usize = PAGE_SIZE;
/// Most blocks set aside for the service log (16 MiB, 8192 records).
const MAX_LOG_BLOCKS: u64 = 4096;
/// One service record per slot; two slots per block.
const SLOT: usize = 2048;
const SLOT_MAGIC: u32 = u32::from_le_bytes(*b"FLOG");
/// `magic u32 | len u32 | seq u64 | check u64`, then the record.
const SLOT_HEADER: usize = 24;
/// Reads and digests go through a buffer of this many blocks.
const CHUNK_BLOCKS: u64 = 256;

/// A sparse file of whole blocks and its dirty-block log.
pub struct VirtualDisk {
    file: File,
    path: PathBuf,
    blocks: u64,
    dirty: DirtyLog,
    /// Blocks written since the disk was opened (a move reports how many
    /// were written while it ran).
    written: AtomicU64,
}

impl VirtualDisk {
    /// Opens the disk at `path`, creating it (all holes) if there is none.
    /// Returns whether it was created. An existing disk of another size is
    /// refused: it belongs to another VM definition.
    pub fn open_or_create(path: &Path, size_bytes: u64) -> io::Result<(VirtualDisk, bool)> {
        let blocks = blocks_of(size_bytes)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len();
        let created = len == 0;
        if created {
            file.set_len(size_bytes)?;
        } else if len != size_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "disk {} has {len} bytes, the VM's disk {size_bytes}",
                    path.display()
                ),
            ));
        }
        Ok((VirtualDisk::with_file(file, path, blocks), created))
    }

    /// Creates an empty disk at `path` to receive a copy. Whatever was at
    /// `path` is unlinked first, not truncated: a copy of the VM still open
    /// here (a paused source from an earlier switchover) keeps its own file.
    pub fn create_empty(path: &Path, size_bytes: u64) -> io::Result<VirtualDisk> {
        let blocks = blocks_of(size_bytes)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        file.set_len(size_bytes)?;
        Ok(VirtualDisk::with_file(file, path, blocks))
    }

    fn with_file(file: File, path: &Path, blocks: u64) -> VirtualDisk {
        VirtualDisk {
            file,
            path: path.to_path_buf(),
            blocks,
            dirty: DirtyLog::new(blocks),
            written: AtomicU64::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of 4 KiB blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    pub fn size_bytes(&self) -> u64 {
        self.blocks * BLOCK_SIZE as u64
    }

    /// Blocks written since the disk was opened.
    pub fn blocks_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Blocks at the start of the disk that hold the service log.
    pub fn log_blocks(&self) -> u64 {
        log_blocks(self.blocks)
    }

    fn check(&self, first: u64, count: u64) -> io::Result<()> {
        if first.checked_add(count).is_none_or(|end| end > self.blocks) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "blocks {first}..{} are outside the disk's {} blocks",
                    first.saturating_add(count),
                    self.blocks
                ),
            ));
        }
        Ok(())
    }

    /// Reads blocks `first..` into `buf` (a whole number of blocks).
    pub fn read_blocks(&self, first: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(first, whole_blocks(buf.len())?)?;
        self.file.read_exact_at(buf, first * BLOCK_SIZE as u64)
    }

    /// Writes blocks `first..` from `data`, then marks them dirty (after the
    /// write landed, as the dirty log's ordering requires).
    pub fn write_blocks(&self, first: u64, data: &[u8]) -> io::Result<()> {
        let count = whole_blocks(data.len())?;
        self.check(first, count)?;
        self.file.write_all_at(data, first * BLOCK_SIZE as u64)?;
        self.dirty.mark_range(first, count);
        self.written.fetch_add(count, Ordering::Relaxed);
        Ok(())
    }

    /// Sets blocks to zero by punching a hole (zeros written where the file
    /// system cannot punch).
    pub fn zero_blocks(&self, first: u64, count: u64) -> io::Result<()> {
        self.check(first, count)?;
        let (offset, len) = (first * BLOCK_SIZE as u64, count * BLOCK_SIZE as u64);
        // SAFETY: fallocate on a file descriptor this struct owns, with a
        // range checked to lie inside the file; it touches no memory of ours.
        let punched = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        } == 0;
        if !punched {
            let zeros = vec![0u8; (CHUNK_BLOCKS as usize * BLOCK_SIZE).min(len as usize)];
            let mut at = 0;
            while at < len {
                let n = (len - at).min(zeros.len() as u64) as usize;
                self.file.write_all_at(&zeros[..n], offset + at)?;
                at += n as u64;
            }
        }
        self.dirty.mark_range(first, count);
        self.written.fetch_add(count, Ordering::Relaxed);
        Ok(())
    }

    /// Moves the dirty-block log into `out` (covering every block) and clears it.
    pub fn fetch_and_clear_dirty(&self, out: &mut DirtyBitmap) {
        self.dirty.fetch_and_clear(out);
    }

    /// Starts the dirty-block log afresh.
    pub fn clear_dirty(&self) {
        self.dirty.clear();
    }

    /// Marks in `out` every block the file holds data for; the rest are
    /// holes, certainly zero.
    pub fn allocated(&self, out: &mut DirtyBitmap) -> io::Result<()> {
        out.clear();
        for (first, end) in self.data_extents()? {
            for block in first..end {
                out.set(block);
            }
        }
        Ok(())
    }

    /// The file's data extents as block ranges `(first, end)`.
    fn data_extents(&self) -> io::Result<Vec<(u64, u64)>> {
        let fd = self.file.as_raw_fd();
        let size = self.size_bytes() as libc::off_t;
        let mut extents = Vec::new();
        let mut at: libc::off_t = 0;
        while at < size {
            // SAFETY: lseek on a descriptor this struct owns; it moves only
            // the file offset, which nothing here uses (all I/O is pread and
            // pwrite at explicit offsets).
            let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
            if data < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break; // no data past `at`
                }
                // A file system without SEEK_DATA: everything may hold data.
                return Ok(vec![(0, self.blocks)]);
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let hole = if hole < 0 { size } else { hole.min(size) };
            let first = data as u64 / BLOCK_SIZE as u64;
            let end = (hole as u64).div_ceil(BLOCK_SIZE as u64).min(self.blocks);
            if end > first {
                extents.push((first, end));
            }
            at = hole.max(data + 1);
        }
        Ok(extents)
    }

    /// A digest of the disk's contents: xxh3-128 over `(block number, block)`
    /// for every block that is not all zeros, in order. It depends only on
    /// the bytes (not on which zero blocks are holes), and reads only the
    /// blocks that hold data.
    pub fn digest(&self) -> io::Result<u128> {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; CHUNK_BLOCKS as usize * BLOCK_SIZE];
        for (first, end) in self.data_extents()? {
            let mut block = first;
            while block < end {
                let n = (end - block).min(CHUNK_BLOCKS);
                let bytes = &mut buf[..n as usize * BLOCK_SIZE];
                self.file.read_exact_at(bytes, block * BLOCK_SIZE as u64)?;
                for (i, data) in bytes.chunks_exact(BLOCK_SIZE).enumerate() {
                    if !is_zero(data) {
                        hasher.update(&(block + i as u64).to_le_bytes());
                        hasher.update(data);
                    }
                }
                block += n;
            }
        }
        Ok(hasher.digest128())
    }

    /// Writes service record `seq` through to its slot in the log area
    /// (slots are reused round-robin once the area is full).
    pub fn write_record(&self, seq: u64, record: &[u8]) -> io::Result<()> {
        let slots = self.log_blocks() * (BLOCK_SIZE / SLOT) as u64;
        if slots == 0 || record.len() > SLOT - SLOT_HEADER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no room on the disk for a record of {} bytes", record.len()),
            ));
        }
        let slot = seq.wrapping_sub(1) % slots;
        let mut bytes = vec![0u8; SLOT_HEADER + record.len()];
        bytes[..4].copy_from_slice(&SLOT_MAGIC.to_le_bytes());
        bytes[4..8].copy_from_slice(&(record.len() as u32).to_le_bytes());
        bytes[8..16].copy_from_slice(&seq.to_le_bytes());
        bytes[16..24].copy_from_slice(&record_check(seq, record).to_le_bytes());
        bytes[SLOT_HEADER..].copy_from_slice(record);
        self.file.write_all_at(&bytes, slot * SLOT as u64)?;
        self.dirty.mark(slot * SLOT as u64 / BLOCK_SIZE as u64);
        self.written.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The service records found in the log area, by sequence number.
    pub fn records(&self) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let mut area = vec![0u8; self.log_blocks() as usize * BLOCK_SIZE];
        self.file.read_exact_at(&mut area, 0)?;
        let mut records: Vec<(u64, Vec<u8>)> =
            area.chunks_exact(SLOT).filter_map(parse_slot).collect();
        records.sort_by_key(|(seq, _)| *seq);
        Ok(records)
    }

    /// Deletes the disk's file, if `path` still names this disk's file (a
    /// newer copy of the VM may have been created there since).
    pub fn remove(&self) -> io::Result<()> {
        let mine = self.file.metadata()?;
        match std::fs::metadata(&self.path) {
            Ok(there) if there.dev() == mine.dev() && there.ino() == mine.ino() => {
                std::fs::remove_file(&self.path)
            }
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Blocks of a disk of `size_bytes`, which must be a whole number of blocks.
fn blocks_of(size_bytes: u64) -> io::Result<u64> {
    if size_bytes == 0 || size_bytes % BLOCK_SIZE as u64 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a disk of {size_bytes} bytes is not a whole number of 4 KiB blocks"),
        ));
    }
    Ok(size_bytes / BLOCK_SIZE as u64)
}

fn whole_blocks(len: usize) -> io::Result<u64> {
    if len % BLOCK_SIZE != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{len} bytes are not a whole number of 4 KiB blocks"),
        ));
    }
    Ok((len / BLOCK_SIZE) as u64)
}

/// Blocks set aside for the service log on a disk of `blocks`: a quarter of
/// a small disk, at most [`MAX_LOG_BLOCKS`].
pub fn log_blocks(blocks: u64) -> u64 {
    (blocks / 4).min(MAX_LOG_BLOCKS)
}

fn record_check(seq: u64, record: &[u8]) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(record);
    hasher.digest()
}

/// A slot's record, if the slot holds a whole one.
fn parse_slot(slot: &[u8]) -> Option<(u64, Vec<u8>)> {
    let word = |at: usize| slot.get(at..at + 8).and_then(|b| b.try_into().ok());
    let magic = u32::from_le_bytes(slot.get(..4)?.try_into().ok()?);
    let len = u32::from_le_bytes(slot.get(4..8)?.try_into().ok()?) as usize;
    let seq = u64::from_le_bytes(word(8)?);
    let check = u64::from_le_bytes(word(16)?);
    let record = slot.get(SLOT_HEADER..SLOT_HEADER.checked_add(len)?)?;
    (magic == SLOT_MAGIC && record_check(seq, record) == check).then(|| (seq, record.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("ferry-disk-{name}-{}", std::process::id()))
    }

    #[test]
    fn a_sparse_disk_reads_back_its_writes_and_only_written_blocks_are_data() {
        let path = scratch("rw");
        let (disk, created) = VirtualDisk::open_or_create(&path, 1 << 30).unwrap();
        assert!(created);
        let before = disk.digest().unwrap();
        disk.write_blocks(5000, &[7u8; BLOCK_SIZE * 2]).unwrap();
        let mut back = vec![0u8; BLOCK_SIZE * 3];
        disk.read_blocks(4999, &mut back).unwrap();
        assert!(back[..BLOCK_SIZE].iter().all(|b| *b == 0));
        assert!(back[BLOCK_SIZE..].iter().all(|b| *b == 7));
        let mut data = DirtyBitmap::new(disk.blocks());
        disk.allocated(&mut data).unwrap();
        assert!(data.get(5000) && data.get(5001));
        assert!(
            data.count() < 1024,
            "a sparse disk: {} blocks",
            data.count()
        );
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 < 64 << 20);
        let mut dirty = DirtyBitmap::new(disk.blocks());
        disk.fetch_and_clear_dirty(&mut dirty);
        assert_eq!(dirty.iter().collect::<Vec<_>>(), vec![5000, 5001]);
        // Zeroing punches the data out again: the digest is the empty disk's.
        assert_ne!(disk.digest().unwrap(), before);
        disk.zero_blocks(5000, 2).unwrap();
        assert_eq!(disk.digest().unwrap(), before);
        assert!(disk.read_blocks(disk.blocks(), &mut back).is_err());
        disk.remove().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn the_digest_depends_on_bytes_and_places_not_on_holes() {
        let (a, b) = (scratch("da"), scratch("db"));
        let (one, _) = VirtualDisk::open_or_create(&a, 16 << 20).unwrap();
        let two = VirtualDisk::create_empty(&b, 16 << 20).unwrap();
        one.write_blocks(10, &[1u8; BLOCK_SIZE]).unwrap();
        // Written zeros (data, not a hole) count as nothing.
        one.write_blocks(11, &[0u8; BLOCK_SIZE]).unwrap();
        two.write_blocks(10, &[1u8; BLOCK_SIZE]).unwrap();
        assert_eq!(one.digest().unwrap(), two.digest().unwrap());
        two.write_blocks(12, &[1u8; BLOCK_SIZE]).unwrap();
        assert_ne!(one.digest().unwrap(), two.digest().unwrap());
        one.remove().unwrap();
        two.remove().unwrap();
    }

    #[test]
    fn service_records_are_found_by_sequence_and_torn_slots_are_not() {
        let path = scratch("log");
        let (disk, _) = VirtualDisk::open_or_create(&path, 16 << 20).unwrap();
        for seq in 1..=5u64 {
            disk.write_record(seq, format!("order-{seq}").as_bytes())
                .unwrap();
        }
        // A slot whose check does not match (a torn write) is not a record.
        disk.write_blocks(0, &[0u8; BLOCK_SIZE]).unwrap();
        let records = disk.records().unwrap();
        assert_eq!(
            records.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(records[0].1, b"order-3");
        assert!(disk.write_record(6, &[0u8; SLOT]).is_err());
        disk.remove().unwrap();
    }

    #[test]
    fn remove_leaves_a_newer_file_at_the_same_path_alone() {
        let path = scratch("newer");
        let (old, _) = VirtualDisk::open_or_create(&path, 1 << 20).unwrap();
        let new = VirtualDisk::create_empty(&path, 1 << 20).unwrap();
        old.remove().unwrap();
        assert!(path.exists());
        new.remove().unwrap();
        assert!(!path.exists());
        assert!(VirtualDisk::open_or_create(&path, 12345).is_err());
    }
}
