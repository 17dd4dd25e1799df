# Ferry's built-in KVM guest program (x86-64, long mode, CPL3).
#
# The bytes in program.rs are this file assembled; a test re-assembles it
# where binutils are installed and compares. Regenerate with:
#
#     as --64 -o /tmp/p.o vmm/src/kvm/program.S
#     objcopy -O binary -j .text /tmp/p.o /tmp/p.bin
#     objdump -d -M intel /tmp/p.o          # the listing in program.rs
#
# Entry: rbx = this vCPU's control block, rsp = top of its stack. The host
# set everything else (layout.rs); the program touches no absolute address.
#
# The host is reached through the doorbell: a page mapped in the guest's page
# tables just past its memory, with no memory behind it, so every access is
# an MMIO exit. (Port I/O would be the classic choice, but under a software
# hypervisor such as PVM an IN/OUT at CPL3 faults even with IOPL 3.)
#
# Loop: ask the host how many page writes to do (a read of the doorbell: the
# one exit per batch, where the host paces, throttles and parks the vCPU);
# serve a pending append from the mailbox (vCPU 0 only); do the writes; again.
# Every write is the SimGuest workload's: SplitMix64 over the state in the
# control block picks the page (uniform, hot set or sequential) and 64 bytes
# at a 64-byte aligned offset in it, so the same seed writes the same bytes.
# Counters live in the control block, so they move with guest memory.

        .intel_syntax noprefix
        .code64
        .text

        # Control block (per vCPU), u64 fields.
        .set CB_BASE,      0x10      # address of the first workload page
        .set CB_PAGES,     0x18      # number of workload pages (> 0)
        .set CB_PATTERN,   0x20      # 0 uniform, 1 hot set, 2 sequential
        .set CB_HOT,       0x28      # pages in the hot set (> 0)
        .set CB_HOTPCT,    0x30      # share of writes to the hot set, percent
        .set CB_MAILBOX,   0x38      # mailbox address, 0 on vCPUs but the first
        .set CB_LOG,       0x40      # service log address
        .set CB_LOGCAP,    0x48      # service log size in bytes
        .set CB_RNG,       0x50      # SplitMix64 state
        .set CB_CURSOR,    0x58      # sequential sweep cursor
        .set CB_WRITES,    0x60      # page writes done
        .set CB_BATCHES,   0x68      # batches done
        .set CB_APPENDS,   0x70      # appends served
        .set CB_DOORBELL,  0x78      # address of the doorbell page
        .set CB_CPUID,     0x80      # u32 eax, ebx, ecx, edx of leaves 0, 1,
                                     # 7 (subleaf 0), 0x80000001, as executed

        # Mailbox (host <-> guest), u64 fields then the record.
        .set MB_REQ,       0x00      # request number, bumped by the host
        .set MB_LEN,       0x08      # record length in bytes
        .set MB_ACK,       0x10      # last request number served
        .set MB_RES,       0x18      # sequence number, or bit 63 | error
        .set MB_DATA,      0x40      # the record

        # Service log (service.rs): header then records.
        .set LOG_MAGIC,    0x4356535952524546    # "FERRYSVC"
        .set LOG_HEADER,   64
        .set REC_HEADER,   16
        .set MAX_RECORD,   1024
        .set ERR_CORRUPT,  0x8000000000000001
        .set ERR_TOO_LARGE, 0x8000000000000002
        .set ERR_FULL,     0x8000000000000003

        # Doorbell registers.
        .set DB_YIELD,     0x00      # read (u32): the next batch size;
                                     # bit 31 set: read CPUID again first
        .set YIELD_CPUID,  31
        .set DB_SERVED,    0x08      # write (u8): an append was served

        .globl _start
_start:
        call    read_cpuid
main:
        mov     rdi, [rbx + CB_DOORBELL]
        mov     eax, dword ptr [rdi + DB_YIELD]
        mov     r12d, eax
        btr     r12d, YIELD_CPUID
        jnc     mailbox
        call    read_cpuid
mailbox:
        mov     rsi, [rbx + CB_MAILBOX]
        test    rsi, rsi
        jz      batch_check
        mov     rax, [rsi + MB_REQ]
        cmp     rax, [rsi + MB_ACK]
        je      batch_check
        call    serve
batch_check:
        test    r12, r12
        jz      main
batch:
        call    write_one
        inc     qword ptr [rbx + CB_WRITES]
        dec     r12
        jnz     batch
        inc     qword ptr [rbx + CB_BATCHES]
        jmp     main

# One workload write. Clobbers rax, rcx, rdx, rsi, rdi, r13, r14.
write_one:
        mov     rax, [rbx + CB_PATTERN]
        cmp     rax, 2
        je      pick_sequential
        cmp     rax, 1
        je      pick_hot
pick_uniform:
        call    next_u64
        xor     edx, edx
        div     qword ptr [rbx + CB_PAGES]
        jmp     picked
pick_sequential:
        mov     rax, [rbx + CB_CURSOR]
        lea     rcx, [rax + 1]
        mov     [rbx + CB_CURSOR], rcx
        xor     edx, edx
        div     qword ptr [rbx + CB_PAGES]
        jmp     picked
pick_hot:
        call    next_u64
        xor     edx, edx
        mov     ecx, 100
        div     rcx
        cmp     rdx, [rbx + CB_HOTPCT]
        jae     pick_uniform
        call    next_u64
        xor     edx, edx
        div     qword ptr [rbx + CB_HOT]
picked:                                 # rdx = page within the workload area
        mov     r13, rdx
        sub     rsp, 64                 # the 64-byte line, on the stack
        xor     r14d, r14d
fill:
        call    next_u64
        mov     [rsp + r14 * 8], rax
        inc     r14
        cmp     r14, 8
        jb      fill
        call    next_u64                # offset = (next % 64) * 64
        and     eax, 63
        shl     rax, 6
        mov     rdi, r13
        shl     rdi, 12
        add     rdi, [rbx + CB_BASE]
        add     rdi, rax
        mov     rsi, rsp
        mov     ecx, 8
        rep     movsq
        add     rsp, 64
        ret

# Executes CPUID for the leaves the host reads back (KvmGuest::cpuid_leaves)
# and stores what it returned: what this guest's code would see, which is
# the CPUID KVM was given (masked in processor compatibility mode), not
# necessarily the host's. CPUID overwrites rbx, the control block: kept in r8
# and restored. Clobbers rax, rcx, rdx, r8.
        .macro  LEAF leaf, slot
        mov     eax, \leaf
        xor     ecx, ecx
        cpuid
        mov     [r8 + CB_CPUID + \slot * 16], eax
        mov     [r8 + CB_CPUID + \slot * 16 + 4], ebx
        mov     [r8 + CB_CPUID + \slot * 16 + 8], ecx
        mov     [r8 + CB_CPUID + \slot * 16 + 12], edx
        .endm
read_cpuid:
        mov     r8, rbx
        LEAF    0, 0
        LEAF    1, 1
        LEAF    7, 2
        LEAF    0x80000001, 3
        mov     rbx, r8
        ret

# SplitMix64 (workload.rs VcpuContext::next_u64): rax = next. Clobbers rdx.
next_u64:
        movabs  rax, 0x9e3779b97f4a7c15
        add     rax, [rbx + CB_RNG]
        mov     [rbx + CB_RNG], rax
        mov     rdx, rax
        shr     rdx, 30
        xor     rax, rdx
        movabs  rdx, 0xbf58476d1ce4e5b9
        imul    rax, rdx
        mov     rdx, rax
        shr     rdx, 27
        xor     rax, rdx
        movabs  rdx, 0x94d049bb133111eb
        imul    rax, rdx
        mov     rdx, rax
        shr     rdx, 31
        xor     rax, rdx
        ret

# Serves the append in the mailbox at rsi (service.rs ServiceLog::append):
# the record, then the header's count and used, then the result and the
# acknowledgement, then one exit so the host sees it at once.
serve:
        mov     rdi, [rbx + CB_LOG]
        movabs  rax, LOG_MAGIC
        cmp     [rdi], rax
        jne     serve_corrupt
        mov     rcx, [rsi + MB_LEN]
        cmp     rcx, MAX_RECORD
        ja      serve_too_large
        mov     r9, [rdi + 16]          # used
        lea     r10, [rcx + 7]
        and     r10, -8
        add     r10, REC_HEADER         # size of this record
        lea     r11, [r9 + r10 + LOG_HEADER]
        cmp     r11, [rbx + CB_LOGCAP]
        ja      serve_full
        mov     r8, [rdi + 8]
        inc     r8                      # its sequence number
        lea     rdx, [rdi + r9 + LOG_HEADER]
        mov     [rdx], r8               # seq
        mov     [rdx + 8], rcx          # len, pad = 0
        push    rsi
        push    rdi
        lea     rdi, [rdx + REC_HEADER]
        lea     rsi, [rsi + MB_DATA]
        rep     movsb
        pop     rdi
        pop     rsi
        mov     [rdi + 8], r8           # count
        add     r9, r10
        mov     [rdi + 16], r9          # used
        mov     rax, r8
        jmp     serve_done
serve_corrupt:
        movabs  rax, ERR_CORRUPT
        jmp     serve_done
serve_too_large:
        movabs  rax, ERR_TOO_LARGE
        jmp     serve_done
serve_full:
        movabs  rax, ERR_FULL
serve_done:
        mov     [rsi + MB_RES], rax
        mov     rax, [rsi + MB_REQ]
        mov     [rsi + MB_ACK], rax
        inc     qword ptr [rbx + CB_APPENDS]
        mov     rdi, [rbx + CB_DOORBELL]
        mov     byte ptr [rdi + DB_SERVED], al
        ret
