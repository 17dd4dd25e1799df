//! Transport: everything Ferry nodes say to each other — Raft messages, migration
//! control, and the memory of moving VMs — travels through this crate.
//!
//! * [`identity`]: a cluster CA and per-node certificates; every connection is mutual
//!   TLS 1.3 and a peer's node id comes from its certificate.
//! * [`RpcNode`]: one QUIC endpoint per local network address; framed request/response
//!   and one-way messages between registered services ([`RpcHandler`]).
//! * [`stream`]: the multipath page stream, striping chunks of guest pages over one
//!   connection per migration network and surviving the loss of all but one; and the
//!   byte stream on top of it, one ordered stream of bytes (a QEMU migration stream).
//! * [`protocol`]: the wire format, in one file.
//! * [`limits`]: what a stranger or a member may make a node hold, and the gauges.
//! * [`revocation`]: removed nodes' certificates, refused in the handshake.
//!
//! The decisions that are easy to get wrong (stream scheduling, which copy of a page
//! wins) are plain code over plain data in `stream::scheduler` and `stream::versions`,
//! tested without sockets or clocks.

pub mod codec;
pub mod config;
mod endpoint;
pub mod error;
mod framing;
pub mod identity;
pub mod limits;
pub mod protocol;
pub mod revocation;
pub mod rpc;
pub mod stream;

/// A cluster node's id; carried in its certificate as `node-<id>.ferry`.
pub type NodeId = u64;

pub use codec::{decode, encode, try_encode, CodecError};
pub use config::{NetworkConfig, PageStreamConfig, SubnetMtu, DEFAULT_MTU, JUMBO_MTU};
pub use error::{IdentityError, PageStreamError, RpcError, TransportError};
pub use identity::{crypto_provider, ClusterCa, NodeCredentials};
pub use protocol::PAGE_SIZE;
pub use revocation::{RevocationList, Revoked};
pub use rpc::{handler_fn, Admission, CallOptions, NodeStats, RpcHandler, RpcNode};
pub use stream::{
    ByteReceiverStats, ByteSenderStats, ByteStreamCanceller, ByteStreamError, ByteStreamReceiver,
    ByteStreamSender, PageSink, PageStreamReceiver, PageStreamSender, PathStats, ReceiverStats,
    SenderStats,
};
