//! The multipath page stream: a VM's memory on its way from the source node to the
//! target, over one QUIC connection per allowed migration network.
//!
//! * [`PageStreamSender`] (source) takes page bytes from its caller, cuts them into
//!   chunks, stripes them over the live paths and resends what a dead path lost.
//! * [`PageStreamReceiver`] (target) applies chunks to a [`PageSink`], never letting an
//!   older copy of a page overwrite a newer one, and acknowledges them.
//!
//! Both are obtained from an [`RpcNode`](crate::RpcNode), which owns the endpoints and
//! the cluster identity: the target calls `accept_page_stream` first (typically while
//! handling the "prepare" RPC of a migration), then the source calls `open_page_stream`.
//!
//! The decisions live in I/O-free modules: [`scheduler`] (which chunk on which path,
//! what to resend, what to copy while hedging, budget, barriers), [`pacer`] (the bandwidth cap) and [`versions`]
//! (which copy of a page wins). The
//! async code in `sender.rs` and `receiver.rs` only moves bytes and time.
//!
//! [`byte_stream`] carries one ordered stream of bytes (a QEMU migration stream) as a
//! page stream whose receiver acknowledges chunks only once its reader took them
//! (`ack_hold`).

pub(crate) mod ack_hold;
pub mod byte_stream;
pub mod pacer;
pub mod receiver;
pub mod scheduler;
pub mod sender;
pub mod versions;

pub use byte_stream::{
    ByteReceiverStats, ByteSenderStats, ByteStreamCanceller, ByteStreamError, ByteStreamReceiver,
    ByteStreamSender,
};
pub use receiver::{PageStreamReceiver, ReceiverStats};
pub use sender::{PageStreamSender, PathStats, SenderStats};

/// Where a receiver puts pages (the target VM's memory, or a test's checker).
pub trait PageSink: Send + Sync + 'static {
    /// Apply pages `[first, first + count)`. `data` is `None` for zero pages (`count`
    /// pages of zeros), else `count * 4096` bytes. Only called with copies newer than
    /// what the pages hold. An `Err` aborts the stream and is reported to the sender.
    fn apply(&self, first: u64, count: u32, data: Option<&[u8]>) -> Result<(), String>;
}
