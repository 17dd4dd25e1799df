//! The source side of a byte stream: writes are cut into data pages
//! ([`PageWriter`]) and queued on a page stream in whole chunks; the page stream's
//! budget makes `write` wait while the target has not taken enough.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::format::{PageWriter, TRAILER_PAGE};
use super::ByteStreamError;
use crate::rpc::RpcNode;
use crate::stream::{PageStreamSender, SenderStats};
use crate::NodeId;

/// All pages of a byte stream go in one round: each page is sent once (resends
/// repeat its copy), so no copy can be newer than another.
const ROUND: u32 = 0;

/// When the input pauses this long with a part-filled batch waiting, the pump sends
/// it: the tail of a burst (QEMU's last device state) must not wait for more input.
const IDLE_FLUSH: Duration = Duration::from_millis(1);

/// The pump's read buffer.
const READ_BUFFER: usize = 256 << 10;

/// What a byte stream's source did.
#[derive(Clone, Debug)]
pub struct ByteSenderStats {
    pub stream_id: u64,
    /// Stream bytes written so far.
    pub bytes: u64,
    /// Chunks that went again on another path after their path died, all paths.
    pub chunks_resent: u64,
    /// The page stream underneath: per-path bytes sent and acknowledged
    /// (`page.paths`), wire bytes, elapsed time, throughput.
    pub page: SenderStats,
}

/// Cancels a byte stream, or turns its hedging on, from another task (the stream's
/// owner may be blocked in `write` or a pump). Does nothing once the stream is
/// finished.
#[derive(Clone)]
pub struct ByteStreamCanceller {
    inner: Weak<PageStreamSender>,
}

impl ByteStreamCanceller {
    /// The target's reader fails with [`PageStreamError::PeerCancelled`](crate::PageStreamError::PeerCancelled) carrying
    /// `reason`; this side's pending and later calls with `Cancelled`.
    pub fn cancel(&self, reason: &str) {
        if let Some(s) = self.inner.upgrade() {
            s.cancel(reason);
        }
    }

    /// [`ByteStreamSender::hedge`] while a pump owns the sender: the switchover
    /// (the guest paused, its last state on the way) starts while the pump runs.
    pub fn hedge(&self, on: bool) {
        if let Some(s) = self.inner.upgrade() {
            s.hedge(on);
        }
    }
}

/// Sends one byte stream. Obtained from [`RpcNode::open_byte_stream`]; dropping it
/// before [`finish`](Self::finish) cancels the stream ("sender dropped").
pub struct ByteStreamSender {
    inner: Arc<PageStreamSender>,
    writer: PageWriter,
}

impl RpcNode {
    /// Opens byte stream `stream_id` to `peer` over `paths` (the peer's address on
    /// each allowed migration network), as [`open_page_stream`](Self::open_page_stream)
    /// does, with the in-flight budget `byte_stream_budget_bytes`. The target must have called [`accept_byte_stream`](Self::accept_byte_stream)
    /// first. Returns once one path is up.
    pub async fn open_byte_stream(
        self: &Arc<Self>,
        peer: NodeId,
        paths: &[SocketAddr],
        stream_id: u64,
    ) -> Result<ByteStreamSender, ByteStreamError> {
        let mut cfg = self.config().page_stream.clone();
        cfg.inflight_budget_bytes = cfg.byte_stream_budget_bytes.max(1);
        let chunk_pages = cfg.chunk_pages as usize;
        let inner = self
            .open_page_stream_with(cfg, peer, paths, stream_id)
            .await?;
        Ok(ByteStreamSender {
            inner: Arc::new(inner),
            writer: PageWriter::new(chunk_pages),
        })
    }
}

impl ByteStreamSender {
    pub fn stream_id(&self) -> u64 {
        self.inner.stream_id()
    }

    /// Queues `data`. Waits while the stream's in-flight budget is full, which is
    /// also while the target's reader has not taken what it was sent. Whole chunks
    /// go at once; a part-filled one waits for more bytes, [`flush`](Self::flush) or
    /// [`finish`](Self::finish).
    pub async fn write(&mut self, mut data: &[u8]) -> Result<(), ByteStreamError> {
        while !data.is_empty() {
            let n = self.writer.fill(data);
            data = &data[n..];
            if let Some((first, pages)) = self.writer.take_full() {
                self.inner.send_bytes(ROUND, first, pages).await?;
            }
        }
        Ok(())
    }

    /// Sends what is queued now, its last page part-filled (later bytes start a new
    /// page: a flush costs at most one page of padding).
    pub async fn flush(&mut self) -> Result<(), ByteStreamError> {
        if let Some((first, pages)) = self.writer.take_any() {
            self.inner.send_bytes(ROUND, first, pages).await?;
        }
        Ok(())
    }

    /// Hedging on or off for the page stream underneath
    /// ([`PageStreamSender::hedge`]): every unacknowledged chunk goes on every live
    /// path, so a path that dies silently during the switchover costs nothing. The
    /// target's reader takes one copy of each page and ignores the others.
    pub fn hedge(&self, on: bool) {
        self.inner.hedge(on);
    }

    /// Sets the bandwidth cap of the stream, all paths together (`None`: none).
    pub fn set_rate_limit(&self, bytes_per_sec: Option<u64>) {
        self.inner.set_rate_limit(bytes_per_sec);
    }

    pub fn canceller(&self) -> ByteStreamCanceller {
        ByteStreamCanceller {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// Stops the stream now; the target's reader fails with
    /// [`PageStreamError::PeerCancelled`](crate::PageStreamError::PeerCancelled) carrying `reason`.
    pub fn cancel(&self, reason: &str) {
        self.inner.cancel(reason);
    }

    pub fn stats(&self) -> ByteSenderStats {
        let page = self.inner.stats();
        ByteSenderStats {
            stream_id: page.stream_id,
            bytes: self.writer.length(),
            chunks_resent: page.paths.iter().map(|p| p.chunks_resent).sum(),
            page,
        }
    }

    /// Sends what is queued and the trailer, waits until the target's reader has
    /// taken every byte (and checked the length), then closes the stream.
    pub async fn finish(mut self) -> Result<ByteSenderStats, ByteStreamError> {
        self.flush().await?;
        let trailer = self.writer.trailer();
        self.inner
            .send_bytes(ROUND, TRAILER_PAGE, trailer.encode())
            .await?;
        // Waiting here keeps the stream cancellable through a canceller, which only
        // holds a weak reference: the final handshake below needs the sender itself.
        self.inner.barrier(u32::MAX).await?;
        let bytes = self.writer.length();
        let mut inner = self.inner;
        let inner = loop {
            match Arc::try_unwrap(inner) {
                Ok(s) => break s,
                // A canceller is looking at it this instant.
                Err(shared) => {
                    inner = shared;
                    tokio::task::yield_now().await;
                }
            }
        };
        let page = inner.finish().await?;
        Ok(ByteSenderStats {
            stream_id: page.stream_id,
            bytes,
            chunks_resent: page.paths.iter().map(|p| p.chunks_resent).sum(),
            page,
        })
    }

    /// Sends everything `input` yields (QEMU's migration socket) until its end, then
    /// [`finish`](Self::finish)es. A failed read cancels the stream with the reason.
    pub async fn pump_from<R>(mut self, input: &mut R) -> Result<ByteSenderStats, ByteStreamError>
    where
        R: AsyncRead + Unpin,
    {
        let mut buf = vec![0u8; READ_BUFFER];
        loop {
            // `read` is cancel-safe: a timed-out read lost no bytes.
            let read = if self.writer.has_pending() {
                match tokio::time::timeout(IDLE_FLUSH, input.read(&mut buf)).await {
                    Ok(r) => r,
                    Err(_) => {
                        self.flush().await?;
                        continue;
                    }
                }
            } else {
                input.read(&mut buf).await
            };
            match read {
                Ok(0) => return self.finish().await,
                Ok(n) => self.write(&buf[..n]).await?,
                Err(e) => {
                    let e = ByteStreamError::Input(e.to_string());
                    self.cancel(&e.to_string());
                    return Err(e);
                }
            }
        }
    }
}
