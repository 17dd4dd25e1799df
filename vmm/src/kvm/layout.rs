//! Where things sit in a KVM guest's memory, and the boot image the host
//! writes there so the vCPUs start directly in 64-bit long mode at CPL3.
//!
//! Guest physical memory is one slot at address 0:
//!
//! ```text
//! page 0                      service log (service_pages), as SimGuest's
//! S = service_pages           PML4
//! S+1                         PDPT
//! S+2 ..                      page directories, one per GiB (2 MiB pages)
//! then                        GDT (user code/data at DPL 3) and the TSS
//! then                        the guest program (program.rs)
//! then                        mailbox: appends from host to guest
//! then                        one control block per vCPU (workload state, counters)
//! then                        one stack page per vCPU
//! W = workload_first          the workload's pages, to the end of memory
//! doorbell                    past memory, 2 MiB aligned: no memory, MMIO exits
//! ```
//!
//! The page tables map all of memory 1:1 with 2 MiB pages, user-accessible
//! and writable, with the accessed and dirty bits preset so the CPU never
//! writes them; one more 2 MiB page maps the doorbell. Nothing here is read by the host after boot except the
//! control blocks (counters) and the mailbox; everything moves with memory.

use super::program::{cb, PROGRAM};
use crate::guest::{GuestError, GuestResult, PAGE_SIZE};
use crate::memory::GuestMemory;
use crate::workload::{Pattern, VcpuContext, Workload};

const PAGE: u64 = PAGE_SIZE as u64;
const HUGE_PAGE: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
/// One PDPT maps 512 GiB, the doorbell included.
pub const MAX_MEMORY: u64 = 512 * GIB - HUGE_PAGE;

// Page-table entry bits.
const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_ACCESSED: u64 = 1 << 5;
const PTE_DIRTY: u64 = 1 << 6;
const PTE_HUGE: u64 = 1 << 7;

/// GDT selectors (index << 3 | RPL).
pub const SEL_USER_CODE: u16 = (3 << 3) | 3;
pub const SEL_USER_DATA: u16 = (4 << 3) | 3;
pub const SEL_TSS: u16 = 5 << 3;
/// GDT entries: null, kernel code, kernel data, user code, user data, TSS (two).
pub const GDT_ENTRIES: u16 = 7;
/// The TSS sits in the GDT page at this offset.
pub const TSS_OFFSET: u64 = 0x100;
/// A 64-bit TSS is 104 bytes.
pub const TSS_LIMIT: u32 = 103;

/// Marks an initialised control block ("FERRYCPU").
pub const CONTROL_MAGIC: u64 = u64::from_le_bytes(*b"FERRYCPU");

/// Page numbers of everything in a KVM guest's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub pages: u64,
    pub service_pages: u64,
    pub vcpus: u32,
    pub pml4: u64,
    pub pdpt: u64,
    pub pd: u64,
    pub pd_count: u64,
    pub gdt: u64,
    pub code: u64,
    pub code_pages: u64,
    pub mailbox: u64,
    pub control: u64,
    pub stacks: u64,
    pub workload_first: u64,
    /// Guest physical address of the doorbell (MMIO, not memory).
    pub doorbell: u64,
}

impl Layout {
    /// Lays out `memory_bytes` for `vcpus` vCPUs with a service log of
    /// `service_pages`; refuses a size that leaves no workload page.
    pub fn new(memory_bytes: u64, service_pages: u64, vcpus: u32) -> GuestResult<Layout> {
        let bad = |reason: String| GuestError::Memory {
            bytes: memory_bytes,
            reason,
        };
        if memory_bytes == 0 || memory_bytes % PAGE != 0 {
            return Err(bad("size must be a non-zero multiple of 4 KiB".into()));
        }
        if memory_bytes > MAX_MEMORY {
            return Err(bad(format!(
                "a KVM guest holds at most {} GiB",
                MAX_MEMORY / GIB
            )));
        }
        if vcpus == 0 {
            return Err(GuestError::Backend(
                "a KVM guest needs at least one vCPU".into(),
            ));
        }
        if service_pages == 0 {
            return Err(bad("the service log needs at least one page".into()));
        }
        let pages = memory_bytes / PAGE;
        let pml4 = service_pages;
        let pdpt = pml4 + 1;
        let pd = pdpt + 1;
        let doorbell = memory_bytes.next_multiple_of(HUGE_PAGE);
        let pd_count = (doorbell + HUGE_PAGE).div_ceil(GIB);
        let gdt = pd + pd_count;
        let code = gdt + 1;
        let code_pages = (PROGRAM.len() as u64).div_ceil(PAGE);
        let mailbox = code + code_pages;
        let control = mailbox + 1;
        let stacks = control + u64::from(vcpus);
        let workload_first = stacks + u64::from(vcpus);
        if workload_first >= pages {
            return Err(bad(format!(
                "the service log, page tables, program and {vcpus} vCPUs take {workload_first} \
                 pages and leave none for the workload"
            )));
        }
        Ok(Layout {
            pages,
            service_pages,
            vcpus,
            pml4,
            pdpt,
            pd,
            pd_count,
            gdt,
            code,
            code_pages,
            mailbox,
            control,
            stacks,
            workload_first,
            doorbell,
        })
    }

    /// Guest physical address of a page.
    pub fn gpa(page: u64) -> u64 {
        page * PAGE
    }

    pub fn workload_pages(&self) -> u64 {
        self.pages - self.workload_first
    }

    /// Byte offset of vCPU `index`'s control block.
    pub fn control_offset(&self, index: u32) -> usize {
        ((self.control + u64::from(index)) * PAGE) as usize
    }

    pub fn mailbox_offset(&self) -> usize {
        (self.mailbox * PAGE) as usize
    }

    /// Where vCPU `index` starts: (rip, rsp, rbx).
    pub fn entry(&self, index: u32) -> (u64, u64, u64) {
        let rip = Self::gpa(self.code);
        let rsp = Self::gpa(self.stacks + u64::from(index) + 1);
        let rbx = Self::gpa(self.control + u64::from(index));
        (rip, rsp, rbx)
    }

    /// Writes page tables, GDT, TSS, program, an empty mailbox and the control
    /// blocks for `workload`. The service log is formatted by the caller.
    /// Returns the pages written (the caller marks them for the dirty log).
    pub fn write_boot_image(&self, mem: &GuestMemory, workload: &Workload) -> std::ops::Range<u64> {
        // Page tables: PML4[0] -> PDPT; PDPT[g] -> PD g; PD entries map 2 MiB.
        let table = PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_ACCESSED;
        put_u64(mem, self.pml4 * PAGE, Self::gpa(self.pdpt) | table);
        for g in 0..self.pd_count {
            put_u64(
                mem,
                self.pdpt * PAGE + g * 8,
                Self::gpa(self.pd + g) | table,
            );
        }
        // Memory, then the doorbell right after it.
        let huge_pages = self.doorbell / HUGE_PAGE + 1;
        let leaf = table | PTE_DIRTY | PTE_HUGE;
        let mut entries = Vec::with_capacity(huge_pages as usize * 8);
        for i in 0..huge_pages {
            entries.extend_from_slice(&((i * HUGE_PAGE) | leaf).to_le_bytes());
        }
        mem.store((self.pd * PAGE) as usize, &entries);

        // GDT: flat segments; the vCPU runs with the user ones (DPL 3).
        let tss = Self::gpa(self.gdt) + TSS_OFFSET;
        let gdt: [u64; GDT_ENTRIES as usize] = [
            0,
            0x00af_9b00_0000_ffff, // kernel code, 64-bit
            0x00cf_9300_0000_ffff, // kernel data
            0x00af_fb00_0000_ffff, // user code, 64-bit, DPL 3
            0x00cf_f300_0000_ffff, // user data, DPL 3
            tss_low(tss, TSS_LIMIT),
            tss >> 32,
        ];
        for (i, entry) in gdt.iter().enumerate() {
            put_u64(mem, self.gdt * PAGE + i as u64 * 8, *entry);
        }
        // TSS: no I/O bitmap; the program does no port I/O.
        let iopb = (TSS_LIMIT + 1) as u16;
        mem.store((tss + 0x66) as usize, &iopb.to_le_bytes());

        mem.store((self.code * PAGE) as usize, &super::program::image());
        mem.store(self.mailbox_offset(), &[0u8; PAGE_SIZE]);

        let pages = self.workload_pages();
        let (pattern, hot, hot_percent) = match workload.pattern {
            Pattern::Uniform => (cb::PATTERN_UNIFORM, 1, 0),
            Pattern::Sequential => (cb::PATTERN_SEQUENTIAL, 1, 0),
            Pattern::HotSet {
                write_percent,
                page_percent,
            } => (
                cb::PATTERN_HOT,
                (pages * u64::from(page_percent.min(100)) / 100).max(1),
                u64::from(write_percent),
            ),
        };
        for index in 0..self.vcpus {
            let mut block = [0u8; cb::SIZE];
            let mut set = |field: usize, value: u64| {
                block[field..field + 8].copy_from_slice(&value.to_le_bytes())
            };
            set(cb::MAGIC, CONTROL_MAGIC);
            set(cb::INDEX, u64::from(index));
            set(cb::BASE, Self::gpa(self.workload_first));
            set(cb::PAGES, pages);
            set(cb::PATTERN, pattern);
            set(cb::HOT, hot);
            set(cb::HOTPCT, hot_percent);
            set(
                cb::MAILBOX,
                if index == 0 {
                    Self::gpa(self.mailbox)
                } else {
                    0
                },
            );
            set(cb::LOG, 0);
            set(cb::LOGCAP, self.service_pages * PAGE);
            set(cb::RNG, VcpuContext::new(workload.seed, index).rng);
            set(cb::DOORBELL, self.doorbell);
            mem.store(self.control_offset(index), &block);
        }
        self.pml4..self.workload_first
    }
}

/// Low 8 bytes of a 64-bit TSS descriptor (present, DPL 0, type 11: busy).
fn tss_low(base: u64, limit: u32) -> u64 {
    let limit = u64::from(limit);
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x8b << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56)
}

fn put_u64(mem: &GuestMemory, offset: u64, value: u64) {
    mem.store(offset as usize, &value.to_le_bytes());
}

/// Reads a u64 the guest may be writing concurrently (aligned, so never torn
/// on x86-64).
pub fn get_u64(mem: &GuestMemory, offset: usize) -> u64 {
    let mut b = [0u8; 8];
    mem.load(offset, &mut b);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn areas_follow_each_other_and_leave_a_workload() {
        let l = Layout::new(16 << 20, 1024, 2).unwrap();
        assert_eq!(l.pml4, 1024);
        assert_eq!(l.pd_count, 1);
        assert_eq!(l.code, l.gdt + 1);
        assert_eq!(l.stacks, l.control + 2);
        assert_eq!(l.workload_first, l.stacks + 2);
        assert_eq!(l.workload_pages(), 4096 - l.workload_first);
        assert_eq!(l.doorbell, 16 << 20);
        assert_eq!(
            Layout::new(3 << 30, 1, 1).unwrap().pd_count,
            4,
            "the doorbell needs a fourth GiB"
        );
        assert_eq!(
            Layout::new((3 << 30) - (4 << 20), 1, 1).unwrap().pd_count,
            3
        );
    }

    #[test]
    fn too_small_or_odd_sizes_are_refused() {
        assert!(matches!(
            Layout::new(4 << 20, 1024, 1),
            Err(GuestError::Memory { .. })
        ));
        assert!(matches!(
            Layout::new(5000, 1, 1),
            Err(GuestError::Memory { .. })
        ));
        assert!(matches!(
            Layout::new(1 << 20, 1, 0),
            Err(GuestError::Backend(_))
        ));
    }

    #[test]
    fn tss_descriptor_encodes_base_and_limit() {
        let low = tss_low(0x0012_3456_789a_b000, 103);
        assert_eq!(low & 0xffff, 103);
        assert_eq!((low >> 16) & 0xff_ffff, 0x9a_b000);
        assert_eq!((low >> 56) & 0xff, 0x78);
        assert_eq!((low >> 40) & 0xff, 0x8b);
    }
}
