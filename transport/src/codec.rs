//! Typed payloads for RPC: services exchange `Vec<u8>`, and these helpers turn their
//! serde types into bytes and back with bincode 2, refusing oversized or trailing input
//! so a hostile peer cannot make a decoder allocate without bound.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Most bytes [`decode`] reads (the default `max_frame_bytes`).
pub const MAX_DECODE_BYTES: usize = 16 << 20;

fn encode_config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// Decodes `bytes` with bincode's standard configuration, allowing length claims
/// of at most `max` bytes in all and at most 16 times the input: bincode allocates
/// what a length field claims before it reads the bytes, so with one fixed limit a
/// 40-byte payload could make a node allocate the whole limit (the fuzzer found
/// this). bincode's limit is a const generic, so it is chosen from tiers (64 KiB,
/// 1, 16 and 64 MiB); `max` is rounded up to one.
pub fn decode_standard<T: DeserializeOwned>(
    bytes: &[u8],
    max: usize,
) -> Result<(T, usize), bincode::error::DecodeError> {
    use bincode::config::standard;
    use bincode::serde::decode_from_slice as d;
    let allowed = bytes.len().saturating_mul(16).min(max);
    if allowed <= 0x1_0000 {
        d(bytes, standard().with_limit::<0x1_0000>())
    } else if allowed <= 0x10_0000 {
        d(bytes, standard().with_limit::<0x10_0000>())
    } else if allowed <= 0x100_0000 {
        d(bytes, standard().with_limit::<0x100_0000>())
    } else {
        d(bytes, standard().with_limit::<0x400_0000>())
    }
}

/// Decoding a payload failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode: {0}")]
    Encode(String),
    #[error("cannot decode: {0}")]
    Decode(String),
}

/// Encodes `value`.
///
/// # Panics
/// Only if the type uses serde features bincode cannot express (a programming error
/// caught by the first test that sends it); use [`try_encode`] to handle that instead.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    match try_encode(value) {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// Encodes `value`, reporting types bincode cannot express.
pub fn try_encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, encode_config())
        .map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes a whole payload; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) =
        decode_standard(bytes, MAX_DECODE_BYTES).map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Decode(format!(
            "{} trailing bytes",
            bytes.len() - used
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_hostile_lengths() {
        let v: (u64, String, Vec<u32>) = (7, "x".into(), vec![1, 2, 3]);
        assert_eq!(decode::<(u64, String, Vec<u32>)>(&encode(&v)).unwrap(), v);
        let mut extra = encode(&v);
        extra.push(0);
        assert!(decode::<(u64, String, Vec<u32>)>(&extra).is_err());
        // A length prefix claiming 2^60 elements must fail, not allocate.
        let hostile = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0x10];
        assert!(decode::<Vec<u8>>(&hostile).is_err());
    }
}
