//! Reading and writing `protocol.rs` frames on quinn streams, and turning quinn's
//! connection errors into [`RpcError`]s a caller can act on. The only async code that
//! touches frame boundaries lives here, and so does the frame deadline
//! ([`FrameDeadline`]) every stream from a peer is read under.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::{ConnectionError, ReadError, ReadExactError, RecvStream, SendStream, WriteError};

use crate::error::RpcError;
use crate::limits::{Gauge, GrowthPlan, Held, Holdings};
use crate::protocol::{parse_frame_header, CloseCode, ProtocolError, Tag, FRAME_HEADER_LEN};
use crate::NodeId;

/// Why reading a frame failed.
#[derive(Debug)]
pub(crate) enum FrameError {
    /// The peer broke the protocol: close the connection with `close_code()`.
    Protocol(ProtocolError),
    /// The connection is gone.
    Connection(ConnectionError),
    /// This stream was reset or stopped; the connection may be fine.
    Stream(String),
    /// The frame did not arrive whole within this frame deadline.
    Deadline(Duration),
}

impl From<ReadError> for FrameError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::ConnectionLost(c) => FrameError::Connection(c),
            other => FrameError::Stream(other.to_string()),
        }
    }
}

impl From<WriteError> for FrameError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::ConnectionLost(c) => FrameError::Connection(c),
            other => FrameError::Stream(other.to_string()),
        }
    }
}

impl FrameError {
    pub(crate) fn into_rpc(self, peer: NodeId) -> RpcError {
        match self {
            FrameError::Protocol(p) => match p {
                ProtocolError::FrameTooLarge { .. } => RpcError::FrameTooLarge(p.to_string()),
                ProtocolError::VersionMismatch { .. } => RpcError::VersionMismatch(p.to_string()),
                p => RpcError::Protocol(p.to_string()),
            },
            FrameError::Connection(c) => connection_error(&c, peer),
            FrameError::Stream(s) => RpcError::Closed(s),
            FrameError::Deadline(d) => RpcError::Timeout(d),
        }
    }
}

/// The time a frame from a peer has to arrive (`PeerLimits::frame_deadline`), and
/// the node's gauges, which count the frames that missed it and the bytes partial
/// frames hold. A stream that trickles gives back its buffer and task by then.
#[derive(Clone)]
pub(crate) struct FrameDeadline {
    pub after: Duration,
    pub holdings: Arc<Holdings>,
}

impl FrameDeadline {
    /// Runs `read` for at most the deadline; `None` (counted in `frames_timed_out`)
    /// when it did not finish in time. Dropping `read` releases what it held.
    pub(crate) async fn run<T>(&self, read: impl Future<Output = T>) -> Option<T> {
        match tokio::time::timeout(self.after, read).await {
            Ok(t) => Some(t),
            Err(_) => {
                self.holdings
                    .frames_timed_out
                    .fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

/// Reads one frame. `Ok(None)` means the stream ended cleanly at a frame boundary.
/// The length is checked against `max` first, and the body's buffer grows only as
/// its bytes arrive (see [`GrowthPlan`]).
pub(crate) async fn read_frame(
    recv: &mut RecvStream,
    max: u32,
) -> Result<Option<(Tag, Vec<u8>)>, FrameError> {
    read_frame_counted(recv, max, None).await
}

/// Like [`read_frame`], counting the bytes its partial body holds in `partial` until
/// the frame is complete (or the read abandoned).
pub(crate) async fn read_frame_counted(
    recv: &mut RecvStream,
    max: u32,
    partial: Option<&Gauge>,
) -> Result<Option<(Tag, Vec<u8>)>, FrameError> {
    let Some((tag, len)) = read_header(recv, max).await? else {
        return Ok(None);
    };
    let mut body = Vec::new();
    read_body(recv, &mut body, len, partial).await?;
    Ok(Some((tag, body)))
}

async fn read_header(recv: &mut RecvStream, max: u32) -> Result<Option<(Tag, usize)>, FrameError> {
    finish_header(recv, [0; FRAME_HEADER_LEN], 0, max).await
}

/// Reads the rest of a frame header whose first `have` bytes are in `header`.
async fn finish_header(
    recv: &mut RecvStream,
    mut header: [u8; FRAME_HEADER_LEN],
    have: usize,
    max: u32,
) -> Result<Option<(Tag, usize)>, FrameError> {
    match recv.read_exact(&mut header[have..]).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) if have == 0 => return Ok(None),
        Err(ReadExactError::FinishedEarly(n)) => {
            return Err(FrameError::Protocol(ProtocolError::Malformed(format!(
                "stream ended inside a frame header ({} bytes)",
                have + n
            ))))
        }
        Err(ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    parse_frame_header(header, max)
        .map(Some)
        .map_err(FrameError::Protocol)
}

/// Reads a `len`-byte body into `body` (cleared first). Its capacity follows the
/// bytes that arrived, not the length claimed: a peer that claims 16 MiB and sends a
/// byte now and then makes the node hold [`crate::limits::FRAME_FIRST_ALLOCATION`] bytes.
async fn read_body(
    recv: &mut RecvStream,
    body: &mut Vec<u8>,
    len: usize,
    partial: Option<&Gauge>,
) -> Result<(), FrameError> {
    body.clear();
    if body.capacity() < GrowthPlan::first(len) {
        body.reserve_exact(GrowthPlan::first(len));
    }
    let mut held = partial.map(|g| Held::new(g, body.capacity() as u64));
    while body.len() < len {
        if body.len() == body.capacity() {
            let grow = GrowthPlan::next(body.len(), len) - body.len();
            body.reserve_exact(grow);
            if let Some(h) = held.as_mut() {
                h.set(body.capacity() as u64);
            }
        }
        let room = (body.capacity() - body.len()).min(len - body.len());
        match recv.read_chunk(room, true).await? {
            Some(chunk) => body.extend_from_slice(&chunk.bytes),
            None => {
                return Err(FrameError::Protocol(ProtocolError::Malformed(format!(
                    "stream ended after {} of {len} body bytes",
                    body.len()
                ))))
            }
        }
    }
    Ok(())
}

/// Like [`read_frame`], but reads the body into `buf` (reused across frames, so bulk
/// streams do not allocate per frame) and returns the tag; the body is `buf[..]`.
/// For a stream that may idle between frames (a page-stream path's data and control
/// streams): waiting for a frame's first byte has no limit, but from that byte on
/// the whole frame must arrive within `deadline`, or the read ends with
/// [`FrameError::Deadline`]. The body's buffer counts in `partial_frames` while the
/// body arrives.
pub(crate) async fn read_frame_into_within(
    recv: &mut RecvStream,
    max: u32,
    buf: &mut Vec<u8>,
    deadline: &FrameDeadline,
) -> Result<Option<Tag>, FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    loop {
        match recv.read(&mut header[..1]).await? {
            None => return Ok(None),
            Some(0) => continue,
            Some(_) => break,
        }
    }
    let frame = async {
        let Some((tag, len)) = finish_header(recv, header, 1, max).await? else {
            return Ok(None);
        };
        read_body(recv, buf, len, Some(&deadline.holdings.partial_frames)).await?;
        Ok(Some(tag))
    };
    match deadline.run(frame).await {
        Some(read) => read,
        None => Err(FrameError::Deadline(deadline.after)),
    }
}

/// Reads one frame that must be there and must have tag `want`.
pub(crate) async fn expect_frame(
    recv: &mut RecvStream,
    max: u32,
    want: Tag,
    what: &'static str,
) -> Result<Vec<u8>, FrameError> {
    match read_frame(recv, max).await? {
        Some((tag, body)) if tag == want => Ok(body),
        Some((tag, _)) => Err(FrameError::Protocol(ProtocolError::Unexpected {
            got: tag,
            expected: what,
        })),
        None => Err(FrameError::Protocol(ProtocolError::Malformed(format!(
            "stream ended before the {what}"
        )))),
    }
}

pub(crate) async fn write_bytes(send: &mut SendStream, bytes: &[u8]) -> Result<(), FrameError> {
    send.write_all(bytes).await.map_err(FrameError::from)
}

pub(crate) async fn write_chunks(
    send: &mut SendStream,
    chunks: &mut [Bytes],
) -> Result<(), FrameError> {
    send.write_all_chunks(chunks)
        .await
        .map_err(FrameError::from)
}

/// TLS alerts travel as QUIC transport errors 0x100–0x1ff.
fn is_crypto(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

/// What a connection error means for the caller.
pub(crate) fn connection_error(e: &ConnectionError, peer: NodeId) -> RpcError {
    match e {
        ConnectionError::ApplicationClosed(c) => RpcError::from_close(
            CloseCode::from_u64(c.error_code.into_inner()),
            String::from_utf8_lossy(&c.reason).into_owned(),
            peer,
        ),
        ConnectionError::ConnectionClosed(c) if is_crypto(c.error_code) => {
            RpcError::PeerIdentity(format!("node {peer} refused the TLS handshake: {c}"))
        }
        ConnectionError::TransportError(t) if is_crypto(t.code) => {
            RpcError::PeerIdentity(format!("node {peer}: {t}"))
        }
        ConnectionError::ConnectionClosed(c) => RpcError::Protocol(c.to_string()),
        ConnectionError::TransportError(t) => RpcError::Protocol(t.to_string()),
        ConnectionError::VersionMismatch => {
            RpcError::VersionMismatch("peer speaks no common QUIC version".into())
        }
        ConnectionError::LocallyClosed => RpcError::Shutdown,
        ConnectionError::TimedOut | ConnectionError::Reset | ConnectionError::CidsExhausted => {
            RpcError::Unreachable {
                peer,
                reason: e.to_string(),
            }
        }
    }
}
