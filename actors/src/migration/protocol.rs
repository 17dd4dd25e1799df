//! The live-migration control exchange between a source and a target node, in
//! one file: every message, its answer, and the version check.
//!
//! Memory does not travel here: it goes over the multipath page stream
//! (`ferry_transport::stream`), keyed by the migration id. This service carries
//! the steps around it:
//!
//! ```text
//! source                                   target
//!   Prepare{version, migration, vm, …} ──▶  create the VM shell (memory populated),
//!                                     ◀──  Prepared            expect page stream `migration`
//!   …pre-copy rounds on the page stream…
//!   Complete{device state, digest}     ──▶  wait for every page, restore, verify
//!                                     ◀──  Verified
//!   (source commits the switchover through Raft)
//!   Resume{migration, epoch}           ──▶  resume once the store shows the commit
//!                                     ◀──  Resumed
//!   Abandon{migration, reason}         ──▶  discard the copy (any time before the commit)
//! ```
//!
//! The same service also carries clients' requests to a VM's service when the
//! virtual switch routes them to another process (`Append`).

use ferry_vmm::MemoryDigest;
use serde::{Deserialize, Serialize};

/// RPC service name of the migration exchange.
pub const SERVICE: &str = "migration";

/// Version of this exchange that a source sends in `Prepare`.
pub const PROTOCOL_VERSION: u32 = 1;
/// The oldest version a target still accepts: one version back, so a cluster
/// upgrades node by node (ARCHITECTURE.md, *Upgrades*). There is no older version
/// yet; the next change of these messages keeps the decoder of version
/// `PROTOCOL_VERSION` and raises this to it.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Whether a target accepts a `Prepare` of `version`.
pub fn supported(version: u32) -> bool {
    (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version)
}

/// What a simulated or KVM guest is built from on the target; travels in
/// `Prepare` so the target builds the same machine the source runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestSpec {
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub mac: [u8; 6],
    pub backend: String,
    pub workload: ferry_vmm::Workload,
    pub service_pages: u64,
    /// Memory contents at boot (see `SimGuestConfig::prefill_seed`).
    pub prefill_seed: Option<u64>,
}

/// Backends whose guests migrate themselves as one byte stream (see
/// `ferry_vmm::StreamGuest`): their `Prepare` sets up a byte stream, not a
/// page stream, and their `Complete` carries no device state.
pub const STREAM_BACKENDS: &[&str] = &["qemu"];

pub fn is_stream_backend(backend: &str) -> bool {
    STREAM_BACKENDS.contains(&backend)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    Prepare {
        version: u32,
        migration: u64,
        vm: String,
        /// Ownership epoch when the migration began.
        epoch: u64,
        spec: GuestSpec,
    },
    Complete {
        migration: u64,
        /// `DeviceState::encode()` of the paused source.
        device_state: Vec<u8>,
        /// The source's digest at pause, when verification is on.
        digest: Option<MemoryDigest>,
        /// The last round sent; the target checks it applied everything up to it.
        last_round: u32,
    },
    Resume {
        migration: u64,
        /// The epoch the switchover committed (begin epoch + 1).
        epoch: u64,
    },
    Abandon {
        migration: u64,
        reason: String,
    },
    Append {
        vm: String,
        record: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Prepared,
    Verified {
        digest: Option<MemoryDigest>,
    },
    Resumed,
    Abandoned,
    Appended {
        seq: u64,
    },
    /// The request was understood and refused; the text says why.
    Refused {
        reason: String,
    },
}
