//! Fuzzing of every decoder that takes bytes from a peer or the disk: frame
//! headers, hellos, page-stream control and chunk frames, request and response
//! frames, the payloads of the migration, Raft, cluster and peer services,
//! device state, PEM credentials and the certificate a node presents.
//!
//! Structure-aware by seeding: each target starts from valid encodings of
//! real messages and mutates them the ways a hostile or broken peer would —
//! flipped bits, boundary values written over length fields, bincode varint
//! markers claiming huge lengths, truncation, insertion, duplication, and
//! splices of two valid messages — so inputs get past the first checks and
//! reach the deep ones. Each input must be decoded or refused with an error:
//! no panic, and no single allocation above the frame limit or above 16 times
//! the input (1 MiB at least: serde's own preallocation bound), watched by a
//! counting allocator on the decoding thread.
//!
//! The test command runs a short budget (`FERRY_FUZZ_INPUTS`, default 20 000
//! over all targets). The long run, a million inputs (about 15 s):
//!
//! `FERRY_FUZZ_INPUTS=1000000 cargo test --test fuzz -- --nocapture`
//!
//! It prints `fuzz: N inputs, 0 failures` and the per-target counts; a failure
//! prints the target, the seed of the run (`FERRY_FUZZ_SEED` replays it) and
//! the input in hex.
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};

use ferry::actors::migration::protocol::{self as migration, GuestSpec};
use ferry::cluster::model::Settings;
use ferry::cluster::network::protocol::{
    self as raft_wire, ClientReply, ClientRequest, RaftReply, RaftRequest,
};
use ferry::cluster::raft_types::{Member, Proposal, RequestId};
use ferry::cluster::Command;
use ferry::peer::{Envelope, PeerReply, PeerRequest, PeerResult};
use ferry::transport::protocol::{
    decode_chunk, decode_control, decode_hello, decode_hello_ok, decode_request, decode_response,
    encode_chunk_header, encode_control, encode_hello, encode_hello_ok, encode_request,
    encode_response, parse_frame_header, ChunkHeader, Control, Hello, HelloOk, Purpose,
    ResponseBody, Tag, FRAME_HEADER_LEN, MIN_VERSION, VERSION,
};
use ferry::transport::{ClusterCa, NodeCredentials, PAGE_SIZE};
use ferry::vmm::{DeviceState, Guest, MemoryDigest, SimGuest, SimGuestConfig, Workload};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The largest frame a node accepts (`NetworkConfig::max_frame_bytes`): no
/// decoder may allocate more than this for one input.
const FRAME_LIMIT: usize = 16 << 20;
/// Inputs grow by insertion; beyond this they are cut back.
const MAX_INPUT: usize = 64 << 10;

// ---------------------------------------------------------------------------
// Largest allocation while decoding, per thread.

struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = ARMED.try_with(|armed| {
        if armed.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

// SAFETY: every call is passed on to the system allocator unchanged; the
// bookkeeping only touches const-initialised thread-locals, which never
// allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: forwarded with the caller's pointer and layouts.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The largest single allocation a decoder may make for `len` bytes of input:
/// never over the frame limit, and no more than 16 times the input (rounded up
/// to the decoders' limit tiers), so a short message cannot make a node
/// allocate the whole limit — except serde's own bound: it preallocates a
/// sequence for at most 1 MiB of elements, whatever length it claims.
fn allowed_allocation(len: usize) -> usize {
    let wanted = len.saturating_mul(16);
    [0x10_0000, FRAME_LIMIT]
        .into_iter()
        .find(|tier| *tier >= wanted)
        .unwrap_or(FRAME_LIMIT)
}

/// Runs `decode` on `input`; returns why it failed the fuzzer, if it did.
fn check(decode: &dyn Fn(&[u8]), input: &[u8]) -> Option<String> {
    LARGEST.with(|l| l.set(0));
    ARMED.with(|a| a.set(true));
    let outcome = catch_unwind(AssertUnwindSafe(|| decode(input)));
    ARMED.with(|a| a.set(false));
    let largest = LARGEST.with(Cell::get);
    match outcome {
        Err(panic) => Some(format!(
            "panicked: {}",
            panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)")
        )),
        Ok(()) if largest > allowed_allocation(input.len()) => Some(format!(
            "allocated {largest} bytes at once for {} bytes of input (allowed {})",
            input.len(),
            allowed_allocation(input.len())
        )),
        Ok(()) => None,
    }
}

// ---------------------------------------------------------------------------
// Mutations.

/// Values that sit on the edges of length and count checks.
const INTERESTING: [u64; 12] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0xffff,
    1 << 24,
    (16 << 20) + 1,
    1 << 31,
    u32::MAX as u64,
    1 << 40,
    u64::MAX,
];

fn mutate(rng: &mut StdRng, seeds: &[Vec<u8>], input: &mut Vec<u8>) {
    for _ in 0..rng.random_range(1..=4) {
        let len = input.len();
        let at = if len == 0 {
            0
        } else {
            rng.random_range(0..len)
        };
        match rng.random_range(0..9) {
            0 if len > 0 => input[at] ^= 1 << rng.random_range(0..8),
            1 if len > 0 => {
                // 251..=254 are bincode's varint markers for 2, 4, 8 and 16
                // bytes that follow.
                const BYTES: [u8; 9] = [0, 1, 0x7f, 0x80, 0xfe, 0xff, 251, 252, 253];
                input[at] = BYTES[rng.random_range(0..BYTES.len())];
            }
            2 => {
                let n = rng.random_range(1..=16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                input.splice(at..at, bytes);
            }
            3 if len > 0 => {
                let end = rng.random_range(at..=len.min(at + 32));
                input.drain(at..end);
            }
            4 if len > 0 => {
                let end = rng.random_range(at..=len.min(at + 64));
                let copy = input[at..end].to_vec();
                let to = rng.random_range(0..=len);
                input.splice(to..to, copy);
            }
            5 if len >= 4 => {
                let v = INTERESTING[rng.random_range(0..INTERESTING.len())];
                let width = if len >= 8 && rng.random() { 8 } else { 4 };
                let at = rng.random_range(0..=len - width);
                input[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
            }
            6 => input.truncate(at),
            7 => {
                // A bincode varint claiming a huge length or count.
                let mut claim = vec![253u8];
                let v = INTERESTING[rng.random_range(0..INTERESTING.len())];
                claim.extend_from_slice(&v.to_le_bytes());
                input.splice(at..at, claim);
            }
            _ => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                if !other.is_empty() {
                    let from = rng.random_range(0..other.len());
                    input.truncate(at);
                    input.extend_from_slice(&other[from..]);
                }
            }
        }
    }
    input.truncate(MAX_INPUT);
}

// ---------------------------------------------------------------------------
// Targets: valid seeds and the decoder they feed.

/// A decoder under test: it decodes or refuses, and the fuzzer only watches.
type Decoder = Box<dyn Fn(&[u8])>;

struct Target {
    name: &'static str,
    seeds: Vec<Vec<u8>>,
    decode: Decoder,
}

fn target(name: &'static str, seeds: Vec<Vec<u8>>, decode: impl Fn(&[u8]) + 'static) -> Target {
    Target {
        name,
        seeds,
        decode: Box::new(decode),
    }
}

/// The body of an encoded frame.
fn body(frame: Vec<u8>) -> Vec<u8> {
    frame[FRAME_HEADER_LEN..].to_vec()
}

fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
    ferry::transport::encode(v)
}

fn raft_enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
    raft_wire::encode(v).unwrap()
}

fn spec() -> GuestSpec {
    GuestSpec {
        memory_bytes: 1 << 30,
        vcpus: 2,
        mac: [2, 0, 0, 0, 0, 7],
        backend: "sim".into(),
        workload: Workload::uniform(4096, 9),
        service_pages: 16,
        prefill_seed: Some(3),
    }
}

fn device_state() -> Vec<u8> {
    let guest = SimGuest::boot(SimGuestConfig::new(1 << 20, Workload::uniform(100, 1))).unwrap();
    guest.pause().unwrap();
    let state = guest.save_state().unwrap().encode();
    guest.destroy();
    state
}

fn proposal(seq: u64) -> Proposal {
    Proposal {
        id: RequestId {
            origin: 1,
            session: 77,
            seq,
        },
        command: Command::UpdateSettings {
            settings: Settings::default(),
        },
    }
}

fn raft_requests() -> Vec<Vec<u8>> {
    use openraft::raft::{AppendEntriesRequest, VoteRequest};
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};
    let log_id = |index| LogId::new(CommittedLeaderId::new(2, 1), index);
    vec![
        raft_enc(&RaftRequest::Vote(VoteRequest::new(
            Vote::new(3, 2),
            Some(log_id(10)),
        ))),
        raft_enc(&RaftRequest::AppendEntries(AppendEntriesRequest {
            vote: Vote::new_committed(2, 1),
            prev_log_id: Some(log_id(9)),
            entries: vec![
                Entry {
                    log_id: log_id(10),
                    payload: EntryPayload::Normal(proposal(5)),
                },
                Entry {
                    log_id: log_id(11),
                    payload: EntryPayload::Blank,
                },
            ],
            leader_commit: Some(log_id(9)),
        })),
    ]
}

fn credentials() -> (ClusterCa, NodeCredentials) {
    let ca = ClusterCa::generate("fuzz").unwrap();
    let creds = ca.issue(3).unwrap();
    (ca, creds)
}

fn targets() -> Vec<Target> {
    let (ca, creds) = credentials();
    let header = ChunkHeader {
        seq: 9,
        round: 2,
        first: 4096,
        count: 3,
        zero: false,
        listed: false,
    };
    let chunk = |h: ChunkHeader, offsets: &[u32]| {
        let mut f = encode_chunk_header(&h, offsets);
        if !h.zero {
            f.extend(std::iter::repeat_n(0xa5u8, h.count as usize * PAGE_SIZE));
        }
        body(f)
    };
    let state = device_state();
    vec![
        target(
            "frame header",
            vec![
                encode_control(&Control::Ping { nonce: 1 })[..FRAME_HEADER_LEN].to_vec(),
                encode_response(&ResponseBody::Ok(vec![1]))[..FRAME_HEADER_LEN].to_vec(),
            ],
            |b| {
                let mut h = [0u8; FRAME_HEADER_LEN];
                let n = b.len().min(FRAME_HEADER_LEN);
                h[..n].copy_from_slice(&b[..n]);
                let _ = parse_frame_header(h, FRAME_LIMIT as u32);
            },
        ),
        target(
            "hello",
            vec![
                body(encode_hello(&Hello {
                    version: VERSION,
                    min_version: None,
                    node_id: 3,
                    purpose: Purpose::Rpc,
                })),
                body(encode_hello(&Hello {
                    version: VERSION,
                    min_version: Some(MIN_VERSION),
                    node_id: 4,
                    purpose: Purpose::PageStream {
                        stream_id: 17,
                        path: 1,
                    },
                })),
            ],
            |b| {
                let _ = decode_hello(b);
            },
        ),
        target(
            "hello-ok",
            vec![
                body(encode_hello_ok(&HelloOk {
                    node_id: 2,
                    version: Some(VERSION),
                })),
                body(encode_hello_ok(&HelloOk {
                    node_id: 2,
                    version: None,
                })),
            ],
            |b| {
                let _ = decode_hello_ok(b);
            },
        ),
        target(
            "control",
            [
                Control::Ping { nonce: 5 },
                Control::Ack {
                    seqs: vec![1, 2, 300, 1 << 35],
                },
                Control::Finish {
                    chunks: 100,
                    bytes: 1 << 30,
                },
                Control::Cancel {
                    reason: "operator".into(),
                },
            ]
            .iter()
            .map(|c| body(encode_control(c)))
            .collect(),
            |b| {
                let _ = decode_control(b);
            },
        ),
        target(
            "chunk",
            vec![
                chunk(header, &[]),
                chunk(
                    ChunkHeader {
                        zero: true,
                        count: 65_536,
                        ..header
                    },
                    &[],
                ),
                chunk(
                    ChunkHeader {
                        listed: true,
                        ..header
                    },
                    &[0, 5, 900],
                ),
            ],
            |b| {
                if let Ok(c) = decode_chunk(b) {
                    let _ = c.runs();
                }
            },
        ),
        target(
            "request frame",
            vec![
                body(encode_request(Tag::Request, 42, "migration", b"payload").unwrap()),
                body(encode_request(Tag::Message, 7, "raft", &[]).unwrap()),
            ],
            |b| {
                let _ = decode_request(b.to_vec());
            },
        ),
        target(
            "response frame",
            [
                ResponseBody::Ok(vec![1, 2, 3]),
                ResponseBody::HandlerError("no".into()),
                ResponseBody::UnknownService("x".into()),
            ]
            .iter()
            .map(|r| body(encode_response(r)))
            .collect(),
            |b| {
                let _ = decode_response(b.to_vec());
            },
        ),
        target(
            "migration request",
            vec![
                enc(&migration::Request::Prepare {
                    version: migration::PROTOCOL_VERSION,
                    migration: 7,
                    vm: "web".into(),
                    epoch: 3,
                    spec: spec(),
                }),
                enc(&migration::Request::Complete {
                    migration: 7,
                    device_state: state.clone(),
                    digest: Some(MemoryDigest {
                        memory: 1 << 100,
                        state: 5,
                    }),
                    last_round: 4,
                }),
                enc(&migration::Request::Append {
                    vm: "web".into(),
                    record: b"hello".to_vec(),
                }),
            ],
            |b| {
                let _ = ferry::transport::decode::<migration::Request>(b);
            },
        ),
        target(
            "migration reply",
            vec![
                enc(&migration::Reply::Verified { digest: None }),
                enc(&migration::Reply::Appended { seq: 99 }),
                enc(&migration::Reply::Refused {
                    reason: "busy".into(),
                }),
            ],
            |b| {
                let _ = ferry::transport::decode::<migration::Reply>(b);
            },
        ),
        target("raft request", raft_requests(), |b| {
            let _ = raft_wire::decode::<RaftRequest>(b);
        }),
        target(
            "raft reply",
            vec![raft_enc(&RaftReply::Vote(Ok(
                openraft::raft::VoteResponse {
                    vote: openraft::Vote::new(3, 2),
                    vote_granted: true,
                    last_log_id: None,
                },
            )))],
            |b| {
                let _ = raft_wire::decode::<RaftReply>(b);
            },
        ),
        target(
            "cluster request",
            vec![
                raft_enc(&ClientRequest::Write(proposal(8))),
                raft_enc(&ClientRequest::AddVoter {
                    id: 4,
                    member: Member {
                        addrs: vec!["127.0.0.1:7000".parse().unwrap()],
                    },
                }),
                raft_enc(&ClientRequest::ReadIndex),
            ],
            |b| {
                let _ = raft_wire::decode::<ClientRequest>(b);
            },
        ),
        target(
            "cluster reply",
            vec![
                raft_enc(&ClientReply::NotLeader { leader: Some(2) }),
                raft_enc(&ClientReply::ReadIndex { index: Some(40) }),
            ],
            |b| {
                let _ = raft_wire::decode::<ClientReply>(b);
            },
        ),
        target(
            "peer request",
            vec![
                enc(&Envelope {
                    version: ferry::peer::VERSION,
                    request: PeerRequest::StopVm {
                        vm: "db".into(),
                        epoch: 4,
                    },
                }),
                enc(&Envelope {
                    version: ferry::peer::VERSION,
                    request: PeerRequest::Move {
                        vm: "db".into(),
                        target: 2,
                        trigger: ferry::cluster::model::MigrationTrigger::User,
                        verify: true,
                        downtime_limit_ms: Some(50),
                    },
                }),
            ],
            |b| {
                let _ = ferry::transport::decode::<Envelope>(b);
            },
        ),
        target(
            "peer reply",
            vec![
                enc(&PeerResult::Ok(PeerReply::Started { epoch: 3 })),
                enc(&PeerResult::Ok(PeerReply::MoveBegun { migration: 12 })),
            ],
            |b| {
                let _ = ferry::transport::decode::<PeerResult>(b);
            },
        ),
        target("device state", vec![state], |b| {
            let _ = DeviceState::decode(b);
        }),
        target("credentials pem", vec![creds.to_pem().into_bytes()], |b| {
            if let Ok(c) = NodeCredentials::from_pem(&String::from_utf8_lossy(b)) {
                let _ = c.check();
            }
        }),
        target(
            "ca pem",
            vec![format!("{}\0{}", ca.cert_pem(), ca.key_pem()).into_bytes()],
            |b| {
                let text = String::from_utf8_lossy(b);
                let (cert, key) = text.split_once('\0').unwrap_or((&text, ""));
                let _ = ClusterCa::from_pem(cert, key);
            },
        ),
        // The certificate itself, mutated as DER and wrapped back into PEM: the
        // parser and the check of the node name it carries.
        target("node certificate", vec![pem_der(&creds.cert_pem)], {
            let creds = creds.clone();
            move |b| {
                let bad = NodeCredentials {
                    cert_pem: der_pem("CERTIFICATE", b),
                    ..creds.clone()
                };
                let _ = bad.check();
            }
        }),
    ]
}

// ---------------------------------------------------------------------------
// PEM's base64, both ways (for the certificate target only).

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn pem_der(pem: &str) -> Vec<u8> {
    let text: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<String>();
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes().filter(|c| *c != b'=') {
        let v = B64.iter().position(|b| *b == c).unwrap() as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

fn der_pem(label: &str, der: &[u8]) -> String {
    let mut text = String::new();
    for group in der.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                text.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                text.push('=');
            }
        }
    }
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in text.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap());
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

// ---------------------------------------------------------------------------

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn every_decoder_refuses_hostile_input_without_panic_or_huge_allocation() {
    let budget = env_u64("FERRY_FUZZ_INPUTS").unwrap_or(20_000);
    let seed = env_u64("FERRY_FUZZ_SEED").unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    let targets = targets();
    // Every seed is valid: the fuzzer starts from messages that get through.
    for t in &targets {
        for s in &t.seeds {
            assert_eq!(check(&t.decode, s), None, "seed of {}", t.name);
        }
    }
    // A PEM round trip of the certificate seed, so mutations reach the DER.
    assert_eq!(
        pem_der(&der_pem(
            "CERTIFICATE",
            &targets[targets.len() - 1].seeds[0]
        )),
        targets[targets.len() - 1].seeds[0]
    );

    let per_target = budget.div_ceil(targets.len() as u64);
    let mut total = 0u64;
    let mut failed = 0u64;
    let mut failures = Vec::new();
    for t in &targets {
        for _ in 0..per_target {
            let mut input = t.seeds[rng.random_range(0..t.seeds.len())].clone();
            mutate(&mut rng, &t.seeds, &mut input);
            total += 1;
            if let Some(why) = check(&t.decode, &input) {
                failed += 1;
                if failures.len() < 10 {
                    let hex: String = input.iter().take(256).map(|b| format!("{b:02x}")).collect();
                    failures.push(format!("{}: {why}; input {hex}", t.name));
                }
            }
        }
        println!("  {}: {per_target} inputs", t.name);
    }
    println!("fuzz: {total} inputs, {failed} failures (FERRY_FUZZ_SEED={seed})");
    assert!(failures.is_empty(), "{failures:#?}");
}
