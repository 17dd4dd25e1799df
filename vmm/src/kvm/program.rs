//! The guest program every KVM vCPU runs: the SimGuest workload and the
//! append service, as x86-64 machine code that runs in long mode at CPL3.
//!
//! The bytes below are `program.S` (next to this file) assembled with GNU as;
//! each line carries the instruction it encodes, so the program can be read
//! and reviewed here. `program_matches_its_source` re-assembles `program.S`
//! where binutils are installed and compares, and the KVM tests check what the
//! program does (its writes replay exactly with `VcpuContext`, its records
//! read back through `ServiceLog`).
//!
//! Interface with the host (see `layout.rs` for where things are):
//! - entry at the first byte with `rbx` = the vCPU's control block and `rsp`
//!   = the top of its stack;
//! - the doorbell, a page mapped just past guest memory with no memory behind
//!   it, so each access exits to the host as MMIO (port I/O at CPL3 faults
//!   under PVM even with IOPL 3, so it is not used);
//! - a 4-byte read of [`DB_YIELD`] once per batch: the host answers with the
//!   number of page writes to do next (0 is fine) — the one regular exit,
//!   where the host paces, throttles and parks the vCPU; with
//!   [`YIELD_CPUID`] set in the answer the program first executes CPUID
//!   again (the host asks after a restore: the target's KVM answers now);
//! - CPUID for leaves 0, 1, 7 (subleaf 0) and 0x8000_0001 at entry and when
//!   asked, stored at [`cb::CPUID`]: what the guest's code sees, so tests can
//!   check the CPUID a guest really gets;
//! - a 1-byte write to [`DB_SERVED`] after serving an append from the mailbox.

/// Doorbell register read (u32) for the next batch size.
pub const DB_YIELD: u64 = 0x00;
/// Doorbell register written (u8) once an append is served.
pub const DB_SERVED: u64 = 0x08;
/// Bit of the [`DB_YIELD`] answer that asks the program to execute CPUID
/// again; it is not part of the batch size.
pub const YIELD_CPUID: u32 = 1 << 31;
/// The CPUID leaves (leaf, subleaf) the program executes, in the order it
/// stores them at [`cb::CPUID`].
pub const CPUID_LEAVES: [(u32, u32); 4] = [(0, 0), (1, 0), (7, 0), (0x8000_0001, 0)];

/// Control block fields (byte offsets of u64s), as in `program.S`.
pub mod cb {
    pub const MAGIC: usize = 0x00;
    pub const INDEX: usize = 0x08;
    pub const BASE: usize = 0x10;
    pub const PAGES: usize = 0x18;
    pub const PATTERN: usize = 0x20;
    pub const HOT: usize = 0x28;
    pub const HOTPCT: usize = 0x30;
    pub const MAILBOX: usize = 0x38;
    pub const LOG: usize = 0x40;
    pub const LOGCAP: usize = 0x48;
    pub const RNG: usize = 0x50;
    pub const CURSOR: usize = 0x58;
    pub const WRITES: usize = 0x60;
    pub const BATCHES: usize = 0x68;
    pub const APPENDS: usize = 0x70;
    pub const DOORBELL: usize = 0x78;
    /// u32 eax, ebx, ecx, edx of each of `CPUID_LEAVES`, as the program
    /// executed them (16 bytes a leaf).
    pub const CPUID: usize = 0x80;
    /// Bytes used.
    pub const SIZE: usize = 0xc0;

    pub const PATTERN_UNIFORM: u64 = 0;
    pub const PATTERN_HOT: u64 = 1;
    pub const PATTERN_SEQUENTIAL: u64 = 2;
}

/// Mailbox fields (byte offsets), as in `program.S`.
pub mod mb {
    pub const REQ: usize = 0x00;
    pub const LEN: usize = 0x08;
    pub const ACK: usize = 0x10;
    pub const RES: usize = 0x18;
    pub const DATA: usize = 0x40;

    /// A result with this bit set is an error code, not a sequence number.
    pub const ERROR: u64 = 1 << 63;
    pub const ERR_CORRUPT: u64 = ERROR | 1;
    pub const ERR_TOO_LARGE: u64 = ERROR | 2;
    pub const ERR_FULL: u64 = ERROR | 3;
}

/// Test-only switch (never set it outside tests): with
/// `FERRY_TEST_BREAK_KVM_GUEST=1` in a process's environment, every KVM guest
/// it boots gets the program with a `ud2` over its first instruction, so the
/// guest faults at once (a `Shutdown` exit) — the probe's trial guest
/// included, which then reports `GuestFailed`. It exists so a test can show
/// that a broken guest makes the KVM tests fail rather than skip
/// (`vmm/tests/kvm_broken.rs`).
pub const BREAK_GUEST_ENV: &str = "FERRY_TEST_BREAK_KVM_GUEST";

/// The bytes loaded into a guest: [`PROGRAM`], unless [`BREAK_GUEST_ENV`]
/// is `1`.
pub(crate) fn image() -> std::borrow::Cow<'static, [u8]> {
    if std::env::var_os(BREAK_GUEST_ENV).is_some_and(|v| v == "1") {
        tracing::warn!("{BREAK_GUEST_ENV}=1: loading a broken KVM guest program (tests only)");
        let mut broken = PROGRAM.to_vec();
        for (byte, ud2) in broken.iter_mut().zip([0x0f, 0x0b]) {
            *byte = ud2;
        }
        return std::borrow::Cow::Owned(broken);
    }
    std::borrow::Cow::Borrowed(PROGRAM)
}

/// The program, position-independent: it may sit at any page.
#[rustfmt::skip]
pub const PROGRAM: &[u8] = &[
    // _start:
    0xe8, 0xdc, 0x00, 0x00, 0x00,                   // 000  call e1 <read_cpuid>
    // main:
    0x48, 0x8b, 0x7b, 0x78,                         // 005  mov rdi,QWORD PTR [rbx+0x78]
    0x8b, 0x07,                                     // 009  mov eax,DWORD PTR [rdi]
    0x41, 0x89, 0xc4,                               // 00b  mov r12d,eax
    0x41, 0x0f, 0xba, 0xf4, 0x1f,                   // 00e  btr r12d,0x1f
    0x73, 0x05,                                     // 013  jae 1a <mailbox>
    0xe8, 0xc7, 0x00, 0x00, 0x00,                   // 015  call e1 <read_cpuid>
    // mailbox:
    0x48, 0x8b, 0x73, 0x38,                         // 01a  mov rsi,QWORD PTR [rbx+0x38]
    0x48, 0x85, 0xf6,                               // 01e  test rsi,rsi
    0x74, 0x0e,                                     // 021  je 31 <batch_check>
    0x48, 0x8b, 0x06,                               // 023  mov rax,QWORD PTR [rsi]
    0x48, 0x3b, 0x46, 0x10,                         // 026  cmp rax,QWORD PTR [rsi+0x10]
    0x74, 0x05,                                     // 02a  je 31 <batch_check>
    0xe8, 0x98, 0x01, 0x00, 0x00,                   // 02c  call 1c9 <serve>
    // batch_check:
    0x4d, 0x85, 0xe4,                               // 031  test r12,r12
    0x74, 0xcf,                                     // 034  je 5 <main>
    // batch:
    0xe8, 0x0f, 0x00, 0x00, 0x00,                   // 036  call 4a <write_one>
    0x48, 0xff, 0x43, 0x60,                         // 03b  inc QWORD PTR [rbx+0x60]
    0x49, 0xff, 0xcc,                               // 03f  dec r12
    0x75, 0xf2,                                     // 042  jne 36 <batch>
    0x48, 0xff, 0x43, 0x68,                         // 044  inc QWORD PTR [rbx+0x68]
    0xeb, 0xbb,                                     // 048  jmp 5 <main>
    // write_one:
    0x48, 0x8b, 0x43, 0x20,                         // 04a  mov rax,QWORD PTR [rbx+0x20]
    0x48, 0x83, 0xf8, 0x02,                         // 04e  cmp rax,0x2
    0x74, 0x13,                                     // 052  je 67 <pick_sequential>
    0x48, 0x83, 0xf8, 0x01,                         // 054  cmp rax,0x1
    0x74, 0x21,                                     // 058  je 7b <pick_hot>
    // pick_uniform:
    0xe8, 0x1d, 0x01, 0x00, 0x00,                   // 05a  call 17c <next_u64>
    0x31, 0xd2,                                     // 05f  xor edx,edx
    0x48, 0xf7, 0x73, 0x18,                         // 061  div QWORD PTR [rbx+0x18]
    0xeb, 0x34,                                     // 065  jmp 9b <picked>
    // pick_sequential:
    0x48, 0x8b, 0x43, 0x58,                         // 067  mov rax,QWORD PTR [rbx+0x58]
    0x48, 0x8d, 0x48, 0x01,                         // 06b  lea rcx,[rax+0x1]
    0x48, 0x89, 0x4b, 0x58,                         // 06f  mov QWORD PTR [rbx+0x58],rcx
    0x31, 0xd2,                                     // 073  xor edx,edx
    0x48, 0xf7, 0x73, 0x18,                         // 075  div QWORD PTR [rbx+0x18]
    0xeb, 0x20,                                     // 079  jmp 9b <picked>
    // pick_hot:
    0xe8, 0xfc, 0x00, 0x00, 0x00,                   // 07b  call 17c <next_u64>
    0x31, 0xd2,                                     // 080  xor edx,edx
    0xb9, 0x64, 0x00, 0x00, 0x00,                   // 082  mov ecx,0x64
    0x48, 0xf7, 0xf1,                               // 087  div rcx
    0x48, 0x3b, 0x53, 0x30,                         // 08a  cmp rdx,QWORD PTR [rbx+0x30]
    0x73, 0xca,                                     // 08e  jae 5a <pick_uniform>
    0xe8, 0xe7, 0x00, 0x00, 0x00,                   // 090  call 17c <next_u64>
    0x31, 0xd2,                                     // 095  xor edx,edx
    0x48, 0xf7, 0x73, 0x28,                         // 097  div QWORD PTR [rbx+0x28]
    // picked:
    0x49, 0x89, 0xd5,                               // 09b  mov r13,rdx
    0x48, 0x83, 0xec, 0x40,                         // 09e  sub rsp,0x40
    0x45, 0x31, 0xf6,                               // 0a2  xor r14d,r14d
    // fill:
    0xe8, 0xd2, 0x00, 0x00, 0x00,                   // 0a5  call 17c <next_u64>
    0x4a, 0x89, 0x04, 0xf4,                         // 0aa  mov QWORD PTR [rsp+r14*8],rax
    0x49, 0xff, 0xc6,                               // 0ae  inc r14
    0x49, 0x83, 0xfe, 0x08,                         // 0b1  cmp r14,0x8
    0x72, 0xee,                                     // 0b5  jb a5 <fill>
    0xe8, 0xc0, 0x00, 0x00, 0x00,                   // 0b7  call 17c <next_u64>
    0x83, 0xe0, 0x3f,                               // 0bc  and eax,0x3f
    0x48, 0xc1, 0xe0, 0x06,                         // 0bf  shl rax,0x6
    0x4c, 0x89, 0xef,                               // 0c3  mov rdi,r13
    0x48, 0xc1, 0xe7, 0x0c,                         // 0c6  shl rdi,0xc
    0x48, 0x03, 0x7b, 0x10,                         // 0ca  add rdi,QWORD PTR [rbx+0x10]
    0x48, 0x01, 0xc7,                               // 0ce  add rdi,rax
    0x48, 0x89, 0xe6,                               // 0d1  mov rsi,rsp
    0xb9, 0x08, 0x00, 0x00, 0x00,                   // 0d4  mov ecx,0x8
    0xf3, 0x48, 0xa5,                               // 0d9  rep movs QWORD PTR es:[rdi],QWORD PTR ds:[rsi]
    0x48, 0x83, 0xc4, 0x40,                         // 0dc  add rsp,0x40
    0xc3,                                           // 0e0  ret
    // read_cpuid:
    0x49, 0x89, 0xd8,                               // 0e1  mov r8,rbx
    0xb8, 0x00, 0x00, 0x00, 0x00,                   // 0e4  mov eax,0x0
    0x31, 0xc9,                                     // 0e9  xor ecx,ecx
    0x0f, 0xa2,                                     // 0eb  cpuid
    0x41, 0x89, 0x80, 0x80, 0x00, 0x00, 0x00,       // 0ed  mov DWORD PTR [r8+0x80],eax
    0x41, 0x89, 0x98, 0x84, 0x00, 0x00, 0x00,       // 0f4  mov DWORD PTR [r8+0x84],ebx
    0x41, 0x89, 0x88, 0x88, 0x00, 0x00, 0x00,       // 0fb  mov DWORD PTR [r8+0x88],ecx
    0x41, 0x89, 0x90, 0x8c, 0x00, 0x00, 0x00,       // 102  mov DWORD PTR [r8+0x8c],edx
    0xb8, 0x01, 0x00, 0x00, 0x00,                   // 109  mov eax,0x1
    0x31, 0xc9,                                     // 10e  xor ecx,ecx
    0x0f, 0xa2,                                     // 110  cpuid
    0x41, 0x89, 0x80, 0x90, 0x00, 0x00, 0x00,       // 112  mov DWORD PTR [r8+0x90],eax
    0x41, 0x89, 0x98, 0x94, 0x00, 0x00, 0x00,       // 119  mov DWORD PTR [r8+0x94],ebx
    0x41, 0x89, 0x88, 0x98, 0x00, 0x00, 0x00,       // 120  mov DWORD PTR [r8+0x98],ecx
    0x41, 0x89, 0x90, 0x9c, 0x00, 0x00, 0x00,       // 127  mov DWORD PTR [r8+0x9c],edx
    0xb8, 0x07, 0x00, 0x00, 0x00,                   // 12e  mov eax,0x7
    0x31, 0xc9,                                     // 133  xor ecx,ecx
    0x0f, 0xa2,                                     // 135  cpuid
    0x41, 0x89, 0x80, 0xa0, 0x00, 0x00, 0x00,       // 137  mov DWORD PTR [r8+0xa0],eax
    0x41, 0x89, 0x98, 0xa4, 0x00, 0x00, 0x00,       // 13e  mov DWORD PTR [r8+0xa4],ebx
    0x41, 0x89, 0x88, 0xa8, 0x00, 0x00, 0x00,       // 145  mov DWORD PTR [r8+0xa8],ecx
    0x41, 0x89, 0x90, 0xac, 0x00, 0x00, 0x00,       // 14c  mov DWORD PTR [r8+0xac],edx
    0xb8, 0x01, 0x00, 0x00, 0x80,                   // 153  mov eax,0x80000001
    0x31, 0xc9,                                     // 158  xor ecx,ecx
    0x0f, 0xa2,                                     // 15a  cpuid
    0x41, 0x89, 0x80, 0xb0, 0x00, 0x00, 0x00,       // 15c  mov DWORD PTR [r8+0xb0],eax
    0x41, 0x89, 0x98, 0xb4, 0x00, 0x00, 0x00,       // 163  mov DWORD PTR [r8+0xb4],ebx
    0x41, 0x89, 0x88, 0xb8, 0x00, 0x00, 0x00,       // 16a  mov DWORD PTR [r8+0xb8],ecx
    0x41, 0x89, 0x90, 0xbc, 0x00, 0x00, 0x00,       // 171  mov DWORD PTR [r8+0xbc],edx
    0x4c, 0x89, 0xc3,                               // 178  mov rbx,r8
    0xc3,                                           // 17b  ret
    // next_u64:
    0x48, 0xb8, 0x15, 0x7c, 0x4a, 0x7f, 0xb9, 0x79, 0x37, 0x9e,// 17c  movabs rax,0x9e3779b97f4a7c15
    0x48, 0x03, 0x43, 0x50,                         // 186  add rax,QWORD PTR [rbx+0x50]
    0x48, 0x89, 0x43, 0x50,                         // 18a  mov QWORD PTR [rbx+0x50],rax
    0x48, 0x89, 0xc2,                               // 18e  mov rdx,rax
    0x48, 0xc1, 0xea, 0x1e,                         // 191  shr rdx,0x1e
    0x48, 0x31, 0xd0,                               // 195  xor rax,rdx
    0x48, 0xba, 0xb9, 0xe5, 0xe4, 0x1c, 0x6d, 0x47, 0x58, 0xbf,// 198  movabs rdx,0xbf58476d1ce4e5b9
    0x48, 0x0f, 0xaf, 0xc2,                         // 1a2  imul rax,rdx
    0x48, 0x89, 0xc2,                               // 1a6  mov rdx,rax
    0x48, 0xc1, 0xea, 0x1b,                         // 1a9  shr rdx,0x1b
    0x48, 0x31, 0xd0,                               // 1ad  xor rax,rdx
    0x48, 0xba, 0xeb, 0x11, 0x31, 0x13, 0xbb, 0x49, 0xd0, 0x94,// 1b0  movabs rdx,0x94d049bb133111eb
    0x48, 0x0f, 0xaf, 0xc2,                         // 1ba  imul rax,rdx
    0x48, 0x89, 0xc2,                               // 1be  mov rdx,rax
    0x48, 0xc1, 0xea, 0x1f,                         // 1c1  shr rdx,0x1f
    0x48, 0x31, 0xd0,                               // 1c5  xor rax,rdx
    0xc3,                                           // 1c8  ret
    // serve:
    0x48, 0x8b, 0x7b, 0x40,                         // 1c9  mov rdi,QWORD PTR [rbx+0x40]
    0x48, 0xb8, 0x46, 0x45, 0x52, 0x52, 0x59, 0x53, 0x56, 0x43,// 1cd  movabs rax,0x4356535952524546
    0x48, 0x39, 0x07,                               // 1d7  cmp QWORD PTR [rdi],rax
    0x75, 0x59,                                     // 1da  jne 235 <serve_corrupt>
    0x48, 0x8b, 0x4e, 0x08,                         // 1dc  mov rcx,QWORD PTR [rsi+0x8]
    0x48, 0x81, 0xf9, 0x00, 0x04, 0x00, 0x00,       // 1e0  cmp rcx,0x400
    0x77, 0x58,                                     // 1e7  ja 241 <serve_too_large>
    0x4c, 0x8b, 0x4f, 0x10,                         // 1e9  mov r9,QWORD PTR [rdi+0x10]
    0x4c, 0x8d, 0x51, 0x07,                         // 1ed  lea r10,[rcx+0x7]
    0x49, 0x83, 0xe2, 0xf8,                         // 1f1  and r10,0xfffffffffffffff8
    0x49, 0x83, 0xc2, 0x10,                         // 1f5  add r10,0x10
    0x4f, 0x8d, 0x5c, 0x11, 0x40,                   // 1f9  lea r11,[r9+r10*1+0x40]
    0x4c, 0x3b, 0x5b, 0x48,                         // 1fe  cmp r11,QWORD PTR [rbx+0x48]
    0x77, 0x49,                                     // 202  ja 24d <serve_full>
    0x4c, 0x8b, 0x47, 0x08,                         // 204  mov r8,QWORD PTR [rdi+0x8]
    0x49, 0xff, 0xc0,                               // 208  inc r8
    0x4a, 0x8d, 0x54, 0x0f, 0x40,                   // 20b  lea rdx,[rdi+r9*1+0x40]
    0x4c, 0x89, 0x02,                               // 210  mov QWORD PTR [rdx],r8
    0x48, 0x89, 0x4a, 0x08,                         // 213  mov QWORD PTR [rdx+0x8],rcx
    0x56,                                           // 217  push rsi
    0x57,                                           // 218  push rdi
    0x48, 0x8d, 0x7a, 0x10,                         // 219  lea rdi,[rdx+0x10]
    0x48, 0x8d, 0x76, 0x40,                         // 21d  lea rsi,[rsi+0x40]
    0xf3, 0xa4,                                     // 221  rep movs BYTE PTR es:[rdi],BYTE PTR ds:[rsi]
    0x5f,                                           // 223  pop rdi
    0x5e,                                           // 224  pop rsi
    0x4c, 0x89, 0x47, 0x08,                         // 225  mov QWORD PTR [rdi+0x8],r8
    0x4d, 0x01, 0xd1,                               // 229  add r9,r10
    0x4c, 0x89, 0x4f, 0x10,                         // 22c  mov QWORD PTR [rdi+0x10],r9
    0x4c, 0x89, 0xc0,                               // 230  mov rax,r8
    0xeb, 0x22,                                     // 233  jmp 257 <serve_done>
    // serve_corrupt:
    0x48, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80,// 235  movabs rax,0x8000000000000001
    0xeb, 0x16,                                     // 23f  jmp 257 <serve_done>
    // serve_too_large:
    0x48, 0xb8, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80,// 241  movabs rax,0x8000000000000002
    0xeb, 0x0a,                                     // 24b  jmp 257 <serve_done>
    // serve_full:
    0x48, 0xb8, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80,// 24d  movabs rax,0x8000000000000003
    // serve_done:
    0x48, 0x89, 0x46, 0x18,                         // 257  mov QWORD PTR [rsi+0x18],rax
    0x48, 0x8b, 0x06,                               // 25b  mov rax,QWORD PTR [rsi]
    0x48, 0x89, 0x46, 0x10,                         // 25e  mov QWORD PTR [rsi+0x10],rax
    0x48, 0xff, 0x43, 0x70,                         // 262  inc QWORD PTR [rbx+0x70]
    0x48, 0x8b, 0x7b, 0x78,                         // 266  mov rdi,QWORD PTR [rbx+0x78]
    0x88, 0x47, 0x08,                               // 26a  mov BYTE PTR [rdi+0x8],al
    0xc3,                                           // 26d  ret
];

#[cfg(test)]
mod tests {
    use super::PROGRAM;
    use std::process::Command;

    /// The committed bytes are `program.S` assembled. Skipped (with a line
    /// saying so) where GNU binutils are not installed.
    #[test]
    fn program_matches_its_source() {
        let source = concat!(env!("CARGO_MANIFEST_DIR"), "/src/kvm/program.S");
        let dir = std::env::temp_dir().join(format!("ferry-kvm-program-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (object, binary) = (dir.join("program.o"), dir.join("program.bin"));
        let assembled = Command::new("as")
            .arg("--64")
            .arg("-o")
            .arg(&object)
            .arg(source)
            .status();
        match assembled {
            Err(e) => {
                eprintln!("SKIPPED program_matches_its_source: cannot run `as`: {e}");
                return;
            }
            Ok(status) => assert!(status.success(), "as failed on {source}"),
        }
        let status = Command::new("objcopy")
            .args(["-O", "binary", "-j", ".text"])
            .arg(&object)
            .arg(&binary)
            .status()
            .unwrap();
        assert!(status.success(), "objcopy failed");
        let bytes = std::fs::read(&binary).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            bytes == PROGRAM,
            "program.rs is stale: re-generate it from program.S (see its header)"
        );
    }
}
