//! Device state: vCPUs, the virtual NIC and backend extras, saved while a
//! guest is paused and restored into the guest that takes over.
//!
//! The encoding starts with a 4-byte little-endian version so that a node can
//! refuse a stream from a newer (or older) node with a clear error instead of
//! misreading it.

use crate::guest::{GuestError, GuestResult};
use serde::{Deserialize, Serialize};

/// The device-state format this build writes and reads.
pub const DEVICE_STATE_VERSION: u32 = 1;

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
    /// are pushed back into the guest's software stack, so this is empty in a
    /// state that crosses the wire unless the offload was explicitly kept.
    pub offloaded_connections: Vec<u64>,
    /// Whether the NIC offloads TCP state at all.
    pub offload_enabled: bool,
}

impl DeviceState {
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

    /// Decodes, refusing an unknown version before reading anything else.
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
        if version != DEVICE_STATE_VERSION {
            return Err(GuestError::UnknownStateVersion {
                found: version,
                supported: DEVICE_STATE_VERSION,
            });
        }
        let config = bincode::config::standard().with_limit::<MAX_DEVICE_STATE_BYTES>();
        let (state, used) = bincode::serde::decode_from_slice::<Self, _>(body, config)
            .map_err(|e| GuestError::MalformedState(e.to_string()))?;
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
        let mut bytes = sample().encode();
        bytes[..4].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(
            DeviceState::decode(&bytes),
            Err(GuestError::UnknownStateVersion {
                found: 7,
                supported: DEVICE_STATE_VERSION
            })
        );
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
