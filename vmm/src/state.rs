//! Device state: vCPUs, the virtual NIC and backend extras, saved while a
//! guest is paused and restored into the guest that takes over.
//!
//! The encoding starts with a 4-byte little-endian version so that a node can
//! refuse a state from a newer (or much older) node with a clear error instead
//! of misreading it. A node reads every version from
//! [`MIN_DEVICE_STATE_VERSION`] to [`DEVICE_STATE_VERSION`]: one version back,
//! so a guest moves between nodes of adjacent builds during a rolling upgrade
//! (ARCHITECTURE.md, *Upgrades*).

use crate::guest::{GuestError, GuestResult};
use serde::{Deserialize, Serialize};

/// The device-state format this build writes (and the newest it reads).
pub const DEVICE_STATE_VERSION: u32 = 1;
/// The oldest device-state format this build reads. There is no older format
/// yet; the next change keeps the decoder of the current one and raises this
/// to it.
pub const MIN_DEVICE_STATE_VERSION: u32 = 1;

/// Largest device state accepted when decoding (vCPU state of a large VM is a
/// few hundred KiB; anything near this is malformed).
pub const MAX_DEVICE_STATE_BYTES: usize = 64 << 20;

/// Everything about a guest that is not in its memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Backend that wrote it (`"sim"`, `"kvm"`); another backend refuses it.
    pub kind: String,
    pub vcpus: Vec<VcpuState>,
    pub nic: NicState,
    /// Backend-specific state that is not per vCPU (VM clock, interrupt
    /// controllers), encoded by the backend.
    pub extra: Vec<u8>,
}

/// One vCPU's registers, encoded by the backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u32,
    pub registers: Vec<u8>,
}

/// The virtual NIC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicState {
    pub mac: [u8; 6],
    /// TCP connections whose state the NIC holds (offloaded). Before a move they
    /// are pushed back into the guest's software stack ([`NicState::push_back`]),
    /// so this is empty in a state that crosses the wire.
    pub offloaded_connections: Vec<u64>,
    /// Whether the NIC offloads TCP state at all (the host's capability).
    pub offload_enabled: bool,
    /// TCP connections the guest's own software stack holds. In a real guest
    /// that state is in guest memory; the simulated guest keeps the list here
    /// so a test can see where every connection is after a move.
    pub software_connections: Vec<u64>,
}

impl NicState {
    /// Hands every offloaded connection back to the guest's software stack, as
    /// a migration must before the state leaves the host: the offload engine's
    /// state belongs to the physical NIC and cannot travel. Returns how many
    /// connections moved.
    pub fn push_back(&mut self) -> usize {
        let moved = self.offloaded_connections.len();
        self.software_connections
            .append(&mut self.offloaded_connections);
        self.software_connections.sort_unstable();
        self.software_connections.dedup();
        moved
    }

    /// Adopts the capability of the host the guest now runs on: with offload
    /// `supported`, every software connection is offloaded again; without it,
    /// offload is off and everything stays in the software stack. Returns how
    /// many connections were offloaded.
    pub fn reoffload(&mut self, supported: bool) -> usize {
        self.offload_enabled = supported;
        if !supported {
            self.push_back();
            return 0;
        }
        let moved = self.software_connections.len();
        self.offloaded_connections
            .append(&mut self.software_connections);
        self.offloaded_connections.sort_unstable();
        self.offloaded_connections.dedup();
        moved
    }

    /// Every connection the guest has, wherever its state is held.
    pub fn connections(&self) -> Vec<u64> {
        let mut all: Vec<u64> = self
            .offloaded_connections
            .iter()
            .chain(&self.software_connections)
            .copied()
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

impl DeviceState {
    /// The state without what changes while a guest is paused (a KVM guest's
    /// clocks; nothing for simulated guests), for comparing two saves.
    pub fn without_clocks(&self) -> GuestResult<DeviceState> {
        #[cfg(target_os = "linux")]
        if self.kind == crate::kvm::KIND {
            return crate::kvm::without_clocks(self);
        }
        Ok(self.clone())
    }

    /// Encodes as `version (u32 LE) ‖ bincode(body)`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = DEVICE_STATE_VERSION.to_le_bytes().to_vec();
        // Encoding into a Vec cannot fail for these plain types.
        match bincode::serde::encode_to_vec(self, bincode::config::standard()) {
            Ok(body) => out.extend_from_slice(&body),
            Err(e) => unreachable!("device state always encodes: {e}"),
        }
        out
    }

    /// Decodes, refusing a version outside [`MIN_DEVICE_STATE_VERSION`] to
    /// [`DEVICE_STATE_VERSION`] before reading anything else.
    pub fn decode(bytes: &[u8]) -> GuestResult<Self> {
        if bytes.len() > MAX_DEVICE_STATE_BYTES {
            return Err(GuestError::MalformedState(format!(
                "{} bytes is over the {} byte limit",
                bytes.len(),
                MAX_DEVICE_STATE_BYTES
            )));
        }
        let Some((version, body)) = bytes.split_first_chunk::<4>() else {
            return Err(GuestError::MalformedState(
                "shorter than its version".into(),
            ));
        };
        let version = u32::from_le_bytes(*version);
        // One decoder per version read; version 1 is the only format so far.
        if !(MIN_DEVICE_STATE_VERSION..=DEVICE_STATE_VERSION).contains(&version) {
            return Err(GuestError::UnknownStateVersion {
                found: version,
                supported: DEVICE_STATE_VERSION,
            });
        }
        // bincode allocates what a length field claims before reading the
        // bytes: the limit follows the input (16 times it, in tiers, as
        // `ferry_transport::codec::decode_standard` does for the wire), so a
        // short hostile state cannot make the target allocate 64 MiB.
        let config = bincode::config::standard();
        let allowed = body.len().saturating_mul(16);
        let decoded = if allowed <= 0x1_0000 {
            bincode::serde::decode_from_slice::<Self, _>(body, config.with_limit::<0x1_0000>())
        } else if allowed <= 0x10_0000 {
            bincode::serde::decode_from_slice(body, config.with_limit::<0x10_0000>())
        } else if allowed <= 0x100_0000 {
            bincode::serde::decode_from_slice(body, config.with_limit::<0x100_0000>())
        } else {
            bincode::serde::decode_from_slice(body, config.with_limit::<MAX_DEVICE_STATE_BYTES>())
        };
        let (state, used) = decoded.map_err(|e| GuestError::MalformedState(e.to_string()))?;
        if used != body.len() {
            return Err(GuestError::MalformedState(format!(
                "{} trailing bytes",
                body.len() - used
            )));
        }
        Ok(state)
    }

    /// Refuses a state written by another backend.
    pub fn expect_kind(&self, kind: &str) -> GuestResult<()> {
        if self.kind != kind {
            return Err(GuestError::StateKind {
                expected: kind.to_string(),
                found: self.kind.clone(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeviceState {
        DeviceState {
            kind: "sim".into(),
            vcpus: vec![VcpuState {
                index: 0,
                registers: vec![1, 2, 3],
            }],
            nic: NicState {
                mac: [2, 0, 0, 0, 0, 1],
                ..Default::default()
            },
            extra: vec![],
        }
    }

    #[test]
    fn round_trips() {
        let s = sample();
        assert_eq!(DeviceState::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn unknown_version_is_refused_by_name() {
        for found in [7, DEVICE_STATE_VERSION + 1, MIN_DEVICE_STATE_VERSION - 1] {
            let mut bytes = sample().encode();
            bytes[..4].copy_from_slice(&found.to_le_bytes());
            assert_eq!(
                DeviceState::decode(&bytes),
                Err(GuestError::UnknownStateVersion {
                    found,
                    supported: DEVICE_STATE_VERSION
                })
            );
        }
    }

    #[test]
    fn truncated_and_trailing_bytes_are_malformed() {
        let bytes = sample().encode();
        assert!(matches!(
            DeviceState::decode(&bytes[..2]),
            Err(GuestError::MalformedState(_))
        ));
        assert!(matches!(
            DeviceState::decode(&bytes[..bytes.len() - 1]),
            Err(GuestError::MalformedState(_))
        ));
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            DeviceState::decode(&long),
            Err(GuestError::MalformedState(_))
        ));
    }

    #[test]
    fn offloaded_connections_go_back_to_the_guest_and_out_again_only_where_supported() {
        let mut nic = NicState {
            offloaded_connections: vec![3, 1],
            offload_enabled: true,
            software_connections: vec![2],
            ..Default::default()
        };
        assert_eq!(nic.push_back(), 2);
        assert!(nic.offloaded_connections.is_empty());
        assert_eq!(nic.software_connections, vec![1, 2, 3]);
        // A target without offload keeps them in software and turns it off.
        let mut plain = nic.clone();
        assert_eq!(plain.reoffload(false), 0);
        assert!(!plain.offload_enabled);
        assert_eq!(plain.connections(), vec![1, 2, 3]);
        assert!(plain.offloaded_connections.is_empty());
        // A target with offload takes them all.
        assert_eq!(nic.reoffload(true), 3);
        assert!(nic.offload_enabled && nic.software_connections.is_empty());
        assert_eq!(nic.offloaded_connections, vec![1, 2, 3]);
        // The state round-trips with its connections.
        let s = DeviceState { nic, ..sample() };
        assert_eq!(DeviceState::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn other_backend_is_refused() {
        assert_eq!(
            sample().expect_kind("kvm"),
            Err(GuestError::StateKind {
                expected: "kvm".into(),
                found: "sim".into()
            })
        );
    }
}
