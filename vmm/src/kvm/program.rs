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
//!   where the host paces, throttles and parks the vCPU;
//! - a 1-byte write to [`DB_SERVED`] after serving an append from the mailbox.

/// Doorbell register read (u32) for the next batch size.
pub const DB_YIELD: u64 = 0x00;
/// Doorbell register written (u8) once an append is served.
pub const DB_SERVED: u64 = 0x08;

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
    /// Bytes used.
    pub const SIZE: usize = 0x80;

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
    0x48, 0x8b, 0x7b, 0x78,                         // 000  mov rdi,QWORD PTR [rbx+0x78]
    0x8b, 0x07,                                     // 004  mov eax,DWORD PTR [rdi]
    0x41, 0x89, 0xc4,                               // 006  mov r12d,eax
    0x48, 0x8b, 0x73, 0x38,                         // 009  mov rsi,QWORD PTR [rbx+0x38]
    0x48, 0x85, 0xf6,                               // 00d  test rsi,rsi
    0x74, 0x0e,                                     // 010  je 20 <batch_check>
    0x48, 0x8b, 0x06,                               // 012  mov rax,QWORD PTR [rsi]
    0x48, 0x3b, 0x46, 0x10,                         // 015  cmp rax,QWORD PTR [rsi+0x10]
    0x74, 0x05,                                     // 019  je 20 <batch_check>
    0xe8, 0xfd, 0x00, 0x00, 0x00,                   // 01b  call 11d <serve>
    // batch_check:
    0x4d, 0x85, 0xe4,                               // 020  test r12,r12
    0x74, 0xdb,                                     // 023  je 0 <_start>
    // batch:
    0xe8, 0x0f, 0x00, 0x00, 0x00,                   // 025  call 39 <write_one>
    0x48, 0xff, 0x43, 0x60,                         // 02a  inc QWORD PTR [rbx+0x60]
    0x49, 0xff, 0xcc,                               // 02e  dec r12
    0x75, 0xf2,                                     // 031  jne 25 <batch>
    0x48, 0xff, 0x43, 0x68,                         // 033  inc QWORD PTR [rbx+0x68]
    0xeb, 0xc7,                                     // 037  jmp 0 <_start>
    // write_one:
    0x48, 0x8b, 0x43, 0x20,                         // 039  mov rax,QWORD PTR [rbx+0x20]
    0x48, 0x83, 0xf8, 0x02,                         // 03d  cmp rax,0x2
    0x74, 0x13,                                     // 041  je 56 <pick_sequential>
    0x48, 0x83, 0xf8, 0x01,                         // 043  cmp rax,0x1
    0x74, 0x21,                                     // 047  je 6a <pick_hot>
    // pick_uniform:
    0xe8, 0x82, 0x00, 0x00, 0x00,                   // 049  call d0 <next_u64>
    0x31, 0xd2,                                     // 04e  xor edx,edx
    0x48, 0xf7, 0x73, 0x18,                         // 050  div QWORD PTR [rbx+0x18]
    0xeb, 0x34,                                     // 054  jmp 8a <picked>
    // pick_sequential:
    0x48, 0x8b, 0x43, 0x58,                         // 056  mov rax,QWORD PTR [rbx+0x58]
    0x48, 0x8d, 0x48, 0x01,                         // 05a  lea rcx,[rax+0x1]
    0x48, 0x89, 0x4b, 0x58,                         // 05e  mov QWORD PTR [rbx+0x58],rcx
    0x31, 0xd2,                                     // 062  xor edx,edx
    0x48, 0xf7, 0x73, 0x18,                         // 064  div QWORD PTR [rbx+0x18]
    0xeb, 0x20,                                     // 068  jmp 8a <picked>
    // pick_hot:
    0xe8, 0x61, 0x00, 0x00, 0x00,                   // 06a  call d0 <next_u64>
    0x31, 0xd2,                                     // 06f  xor edx,edx
    0xb9, 0x64, 0x00, 0x00, 0x00,                   // 071  mov ecx,0x64
    0x48, 0xf7, 0xf1,                               // 076  div rcx
    0x48, 0x3b, 0x53, 0x30,                         // 079  cmp rdx,QWORD PTR [rbx+0x30]
    0x73, 0xca,                                     // 07d  jae 49 <pick_uniform>
    0xe8, 0x4c, 0x00, 0x00, 0x00,                   // 07f  call d0 <next_u64>
    0x31, 0xd2,                                     // 084  xor edx,edx
    0x48, 0xf7, 0x73, 0x28,                         // 086  div QWORD PTR [rbx+0x28]
    // picked:
    0x49, 0x89, 0xd5,                               // 08a  mov r13,rdx
    0x48, 0x83, 0xec, 0x40,                         // 08d  sub rsp,0x40
    0x45, 0x31, 0xf6,                               // 091  xor r14d,r14d
    // fill:
    0xe8, 0x37, 0x00, 0x00, 0x00,                   // 094  call d0 <next_u64>
    0x4a, 0x89, 0x04, 0xf4,                         // 099  mov QWORD PTR [rsp+r14*8],rax
    0x49, 0xff, 0xc6,                               // 09d  inc r14
    0x49, 0x83, 0xfe, 0x08,                         // 0a0  cmp r14,0x8
    0x72, 0xee,                                     // 0a4  jb 94 <fill>
    0xe8, 0x25, 0x00, 0x00, 0x00,                   // 0a6  call d0 <next_u64>
    0x83, 0xe0, 0x3f,                               // 0ab  and eax,0x3f
    0x48, 0xc1, 0xe0, 0x06,                         // 0ae  shl rax,0x6
    0x4c, 0x89, 0xef,                               // 0b2  mov rdi,r13
    0x48, 0xc1, 0xe7, 0x0c,                         // 0b5  shl rdi,0xc
    0x48, 0x03, 0x7b, 0x10,                         // 0b9  add rdi,QWORD PTR [rbx+0x10]
    0x48, 0x01, 0xc7,                               // 0bd  add rdi,rax
    0x48, 0x89, 0xe6,                               // 0c0  mov rsi,rsp
    0xb9, 0x08, 0x00, 0x00, 0x00,                   // 0c3  mov ecx,0x8
    0xf3, 0x48, 0xa5,                               // 0c8  rep movs QWORD PTR es:[rdi],QWORD PTR ds:[rsi]
    0x48, 0x83, 0xc4, 0x40,                         // 0cb  add rsp,0x40
    0xc3,                                           // 0cf  ret
    // next_u64:
    0x48, 0xb8, 0x15, 0x7c, 0x4a, 0x7f, 0xb9, 0x79, 0x37, 0x9e,// 0d0  movabs rax,0x9e3779b97f4a7c15
    0x48, 0x03, 0x43, 0x50,                         // 0da  add rax,QWORD PTR [rbx+0x50]
    0x48, 0x89, 0x43, 0x50,                         // 0de  mov QWORD PTR [rbx+0x50],rax
    0x48, 0x89, 0xc2,                               // 0e2  mov rdx,rax
    0x48, 0xc1, 0xea, 0x1e,                         // 0e5  shr rdx,0x1e
    0x48, 0x31, 0xd0,                               // 0e9  xor rax,rdx
    0x48, 0xba, 0xb9, 0xe5, 0xe4, 0x1c, 0x6d, 0x47, 0x58, 0xbf,// 0ec  movabs rdx,0xbf58476d1ce4e5b9
    0x48, 0x0f, 0xaf, 0xc2,                         // 0f6  imul rax,rdx
    0x48, 0x89, 0xc2,                               // 0fa  mov rdx,rax
    0x48, 0xc1, 0xea, 0x1b,                         // 0fd  shr rdx,0x1b
    0x48, 0x31, 0xd0,                               // 101  xor rax,rdx
    0x48, 0xba, 0xeb, 0x11, 0x31, 0x13, 0xbb, 0x49, 0xd0, 0x94,// 104  movabs rdx,0x94d049bb133111eb
    0x48, 0x0f, 0xaf, 0xc2,                         // 10e  imul rax,rdx
    0x48, 0x89, 0xc2,                               // 112  mov rdx,rax
    0x48, 0xc1, 0xea, 0x1f,                         // 115  shr rdx,0x1f
    0x48, 0x31, 0xd0,                               // 119  xor rax,rdx
    0xc3,                                           // 11c  ret
    // serve:
    0x48, 0x8b, 0x7b, 0x40,                         // 11d  mov rdi,QWORD PTR [rbx+0x40]
    0x48, 0xb8, 0x46, 0x45, 0x52, 0x52, 0x59, 0x53, 0x56, 0x43,// 121  movabs rax,0x4356535952524546
    0x48, 0x39, 0x07,                               // 12b  cmp QWORD PTR [rdi],rax
    0x75, 0x59,                                     // 12e  jne 189 <serve_corrupt>
    0x48, 0x8b, 0x4e, 0x08,                         // 130  mov rcx,QWORD PTR [rsi+0x8]
    0x48, 0x81, 0xf9, 0x00, 0x04, 0x00, 0x00,       // 134  cmp rcx,0x400
    0x77, 0x58,                                     // 13b  ja 195 <serve_too_large>
    0x4c, 0x8b, 0x4f, 0x10,                         // 13d  mov r9,QWORD PTR [rdi+0x10]
    0x4c, 0x8d, 0x51, 0x07,                         // 141  lea r10,[rcx+0x7]
    0x49, 0x83, 0xe2, 0xf8,                         // 145  and r10,0xfffffffffffffff8
    0x49, 0x83, 0xc2, 0x10,                         // 149  add r10,0x10
    0x4f, 0x8d, 0x5c, 0x11, 0x40,                   // 14d  lea r11,[r9+r10*1+0x40]
    0x4c, 0x3b, 0x5b, 0x48,                         // 152  cmp r11,QWORD PTR [rbx+0x48]
    0x77, 0x49,                                     // 156  ja 1a1 <serve_full>
    0x4c, 0x8b, 0x47, 0x08,                         // 158  mov r8,QWORD PTR [rdi+0x8]
    0x49, 0xff, 0xc0,                               // 15c  inc r8
    0x4a, 0x8d, 0x54, 0x0f, 0x40,                   // 15f  lea rdx,[rdi+r9*1+0x40]
    0x4c, 0x89, 0x02,                               // 164  mov QWORD PTR [rdx],r8
    0x48, 0x89, 0x4a, 0x08,                         // 167  mov QWORD PTR [rdx+0x8],rcx
    0x56,                                           // 16b  push rsi
    0x57,                                           // 16c  push rdi
    0x48, 0x8d, 0x7a, 0x10,                         // 16d  lea rdi,[rdx+0x10]
    0x48, 0x8d, 0x76, 0x40,                         // 171  lea rsi,[rsi+0x40]
    0xf3, 0xa4,                                     // 175  rep movs BYTE PTR es:[rdi],BYTE PTR ds:[rsi]
    0x5f,                                           // 177  pop rdi
    0x5e,                                           // 178  pop rsi
    0x4c, 0x89, 0x47, 0x08,                         // 179  mov QWORD PTR [rdi+0x8],r8
    0x4d, 0x01, 0xd1,                               // 17d  add r9,r10
    0x4c, 0x89, 0x4f, 0x10,                         // 180  mov QWORD PTR [rdi+0x10],r9
    0x4c, 0x89, 0xc0,                               // 184  mov rax,r8
    0xeb, 0x22,                                     // 187  jmp 1ab <serve_done>
    // serve_corrupt:
    0x48, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80,// 189  movabs rax,0x8000000000000001
    0xeb, 0x16,                                     // 193  jmp 1ab <serve_done>
    // serve_too_large:
    0x48, 0xb8, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80,// 195  movabs rax,0x8000000000000002
    0xeb, 0x0a,                                     // 19f  jmp 1ab <serve_done>
    // serve_full:
    0x48, 0xb8, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80,// 1a1  movabs rax,0x8000000000000003
    // serve_done:
    0x48, 0x89, 0x46, 0x18,                         // 1ab  mov QWORD PTR [rsi+0x18],rax
    0x48, 0x8b, 0x06,                               // 1af  mov rax,QWORD PTR [rsi]
    0x48, 0x89, 0x46, 0x10,                         // 1b2  mov QWORD PTR [rsi+0x10],rax
    0x48, 0xff, 0x43, 0x70,                         // 1b6  inc QWORD PTR [rbx+0x70]
    0x48, 0x8b, 0x7b, 0x78,                         // 1ba  mov rdi,QWORD PTR [rbx+0x78]
    0x88, 0x47, 0x08,                               // 1be  mov BYTE PTR [rdi+0x8],al
    0xc3,                                           // 1c1  ret
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
