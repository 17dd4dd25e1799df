//! The byte stream: one ordered stream of bytes (a QEMU migration stream) carried
//! from the source node to the target over the multipath page stream, so it rides
//! every migration network and survives losing all but one of them.
//!
//! * The stream is cut into data pages of up to 4094 bytes, each saying how many it
//!   holds, numbered in order; a trailer page at a fixed, far page number gives the
//!   length (`format`). The pages travel as an ordinary page stream: striped over
//!   the paths, acknowledged, resent when a path dies.
//! * The target's sink puts pages back in order (`format::Reassembly`) and its
//!   reader hands them out. A chunk is acknowledged only once the reader has taken
//!   its pages (`super::ack_hold`), so the sender's in-flight budget bounds what the
//!   target buffers and a slow consumer slows the source.
//!
//! Nothing on the wire is new: a byte stream is a page stream whose receiver
//! registered as one ([`RpcNode::accept_byte_stream`](crate::RpcNode::accept_byte_stream)).

pub mod format;
mod receiver;
mod sender;

pub use receiver::{ByteReceiverStats, ByteStreamReceiver};
pub use sender::{ByteSenderStats, ByteStreamCanceller, ByteStreamSender};

use crate::error::PageStreamError;
use format::Refused;

/// A byte stream failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ByteStreamError {
    /// The page stream under it failed: cancelled by either side
    /// ([`PageStreamError::PeerCancelled`] on the other), every path dead, a refused
    /// connection.
    #[error(transparent)]
    Stream(#[from] PageStreamError),
    /// The trailer and the pages disagree about the stream's length.
    #[error("length mismatch: the source declared {declared} bytes, {received} arrived")]
    LengthMismatch { declared: u64, received: u64 },
    /// The sender broke the byte stream's format (or ran too far ahead).
    #[error("malformed byte stream: {0}")]
    Malformed(String),
    /// Reading what the source sends failed (its `AsyncRead`).
    #[error("reading the stream's input failed: {0}")]
    Input(String),
    /// Writing what arrived failed (the target's `AsyncWrite`).
    #[error("writing the stream's output failed: {0}")]
    Output(String),
}

impl From<Refused> for ByteStreamError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::LengthMismatch { declared, received } => {
                ByteStreamError::LengthMismatch { declared, received }
            }
            Refused::Malformed(m) => ByteStreamError::Malformed(m),
        }
    }
}
