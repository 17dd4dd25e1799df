//! The checker's own look at a guest: a digest of its memory and device
//! state, taken by the harness at the moment the guest pauses and the moment
//! before it resumes, whatever the engine computes or sends.
//!
//! The engine digests a guest only when a move verifies, and only at the
//! points its protocol needs one; a history built from those digests has
//! pauses without a digest (a blackout that failed early) and compares a
//! resume with whichever pause happened to carry one. The witness digests at
//! every pause and every resume, so each resume is compared with its own
//! pause.
//!
//! The digest is computed here, not by `Guest::digest`: pages are read through
//! `Guest::read_pages` and hashed with a seed of the witness's own, and the
//! device state is hashed field by field. One part of the state is put in a
//! canonical form: where a TCP connection's state lives (offloaded to the
//! host's NIC or in the guest's software stack) and whether the host's NIC
//! offloads at all. A move pushes offloaded connections back into the guest
//! and the target's NIC may take them again; that is the host changing, not
//! the guest. The set of connections itself is kept. A KVM guest's clocks are
//! left out (`DeviceState::without_clocks`): they run on while it is paused.

use ferry_vmm::{DeviceState, Guest, PAGE_SIZE};
use std::fmt;
use xxhash_rust::xxh3::Xxh3;

/// Seeds the witness's hashes, so its digests never coincide with the
/// engine's by construction (a test comparing the two would be meaningless).
const SEED: u64 = 0x7769_746e_6573_7321;

/// Pages read at once.
const CHUNK_PAGES: u64 = 256;

/// Why the witness could not digest a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WitnessError {
    /// The guest's vCPUs run: its memory is changing.
    Running,
    /// The guest refused (destroyed, a backend error).
    Guest(String),
}

impl fmt::Display for WitnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WitnessError::Running => f.write_str("the guest is running"),
            WitnessError::Guest(e) => write!(f, "the guest refused: {e}"),
        }
    }
}

/// Digest of a paused guest's memory and (canonical) device state.
pub fn digest(guest: &dyn Guest) -> Result<crate::checker::Digest, WitnessError> {
    if !guest.is_paused() {
        return Err(WitnessError::Running);
    }
    let state = guest
        .save_state()
        .map_err(|e| WitnessError::Guest(e.to_string()))?;
    let memory = memory_hash(guest)?;
    // Paused throughout? A resume racing the read would make the digest
    // describe no moment at all.
    if !guest.is_paused() {
        return Err(WitnessError::Running);
    }
    // A KVM guest's clocks run on while it is paused: compare the rest.
    let state = state
        .without_clocks()
        .map_err(|e| WitnessError::Guest(e.to_string()))?;
    Ok(crate::checker::Digest {
        memory,
        state: state_hash(&state),
    })
}

fn memory_hash(guest: &dyn Guest) -> Result<u128, WitnessError> {
    let pages = guest.page_count();
    let mut hasher = Xxh3::with_seed(SEED);
    let mut buf = vec![0u8; CHUNK_PAGES as usize * PAGE_SIZE];
    let mut first = 0;
    while first < pages {
        let n = CHUNK_PAGES.min(pages - first);
        let chunk = &mut buf[..n as usize * PAGE_SIZE];
        guest
            .read_pages(first, chunk)
            .map_err(|e| WitnessError::Guest(e.to_string()))?;
        hasher.update(chunk);
        first += n;
    }
    Ok(hasher.digest128())
}

/// Hashes the device state field by field, each field length-prefixed so two
/// different states never feed the same bytes.
pub fn state_hash(state: &DeviceState) -> u128 {
    let mut h = Xxh3::with_seed(SEED);
    let mut field = |bytes: &[u8]| {
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(state.kind.as_bytes());
    field(&(state.vcpus.len() as u64).to_le_bytes());
    for vcpu in &state.vcpus {
        field(&vcpu.index.to_le_bytes());
        field(&vcpu.registers);
    }
    field(&state.nic.mac);
    let mut connections: Vec<u64> = state
        .nic
        .offloaded_connections
        .iter()
        .chain(&state.nic.software_connections)
        .copied()
        .collect();
    connections.sort_unstable();
    connections.dedup();
    let encoded: Vec<u8> = connections.iter().flat_map(|c| c.to_le_bytes()).collect();
    field(&encoded);
    field(&state.extra);
    h.digest128()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_vmm::{Pattern, SimGuest, SimGuestConfig, Workload};
    use std::time::{Duration, Instant};

    fn guest() -> std::sync::Arc<SimGuest> {
        let workload = Workload {
            dirty_pages_per_sec: Some(20_000),
            pattern: Pattern::Uniform,
            seed: 3,
        };
        let mut config = SimGuestConfig::new(4 << 20, workload);
        config.prefill_seed = Some(9);
        SimGuest::boot(config).expect("a 4 MiB simulated guest boots")
    }

    #[test]
    fn a_running_guest_is_not_digested() {
        let g = guest();
        assert_eq!(digest(g.as_ref()), Err(WitnessError::Running));
    }

    #[test]
    fn a_paused_guest_digests_the_same_until_it_runs_again() {
        let g = guest();
        g.pause().unwrap();
        let a = digest(g.as_ref()).unwrap();
        assert_eq!(digest(g.as_ref()).unwrap(), a);
        // The engine's own digest is a different function of the same guest.
        assert_ne!(g.digest().unwrap().memory, a.memory);

        g.resume().unwrap();
        let appended = g.service_append(b"after the pause").unwrap();
        g.pause().unwrap();
        let b = digest(g.as_ref()).unwrap();
        assert_ne!(a.memory, b.memory, "append {appended} changed no page");
        assert_eq!(digest(g.as_ref()).unwrap(), b);
    }

    #[test]
    fn the_workload_running_changes_the_memory_digest() {
        let g = guest();
        g.pause().unwrap();
        let a = digest(g.as_ref()).unwrap();
        g.resume().unwrap();
        // Wait for the workload to write (it dirties 20 000 pages a second).
        let deadline = Instant::now() + Duration::from_secs(10);
        let changed = loop {
            std::thread::sleep(Duration::from_millis(5));
            g.pause().unwrap();
            let b = digest(g.as_ref()).unwrap();
            if b.memory != a.memory {
                break true;
            }
            g.resume().unwrap();
            if Instant::now() > deadline {
                break false;
            }
        };
        assert!(changed, "the workload wrote nothing in 10 s");
    }

    #[test]
    fn device_state_changes_show_but_offload_placement_does_not() {
        let g = guest();
        g.open_connections(true, 1..=3);
        g.pause().unwrap();
        let (witness_before, engine_before) = (digest(g.as_ref()).unwrap(), g.digest().unwrap());

        // A move pushes the connections back into the guest: the state's
        // form changes (the engine's digest says so), the guest does not.
        let mut state = g.save_state().unwrap();
        assert_eq!(state.nic.push_back(), 3);
        g.restore_state(&state).unwrap();
        let (witness_after, engine_after) = (digest(g.as_ref()).unwrap(), g.digest().unwrap());
        assert_ne!(engine_before.state, engine_after.state);
        assert_eq!(witness_after, witness_before);

        // A connection lost, or a register changed, is a different state.
        let mut fewer = state.clone();
        fewer.nic.software_connections.pop();
        assert_ne!(state_hash(&fewer), witness_before.state);
        let mut registers = state;
        registers.vcpus[0].registers[0] ^= 1;
        assert_ne!(state_hash(&registers), witness_before.state);
    }

    #[test]
    fn a_destroyed_guest_is_refused() {
        let g = guest();
        g.pause().unwrap();
        g.destroy();
        assert!(digest(g.as_ref()).is_err());
    }
}
