//! The target side of a byte stream: a [`PageSink`] that puts pages back in order
//! ([`Reassembly`]) and a reader that hands out the stream, telling the page
//! receiver how far it has read so chunks are acknowledged only once taken.

use std::io::IoSlice;
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Notify};

use super::format::{Reassembly, Refused};
use super::ByteStreamError;
use crate::protocol::PAGE_SIZE;
use crate::rpc::RpcNode;
use crate::stream::{PageSink, PageStreamReceiver, ReceiverStats};
use crate::NodeId;

/// Most bytes one [`read_chunk`](ByteStreamReceiver::read_chunk) returns.
const READ_CHUNK: usize = 256 << 10;

/// How far ahead of the reader the sink accepts pages, in multiples of the node's
/// in-flight budget. An honest sender never gets further ahead than its budget
/// (acknowledgements wait for the reader); the margin covers a sender configured with
/// a larger one, and the cap stops a peer that ignores its budget.
const AHEAD_BUDGETS: usize = 4;

/// What a byte stream's target did.
#[derive(Clone, Debug)]
pub struct ByteReceiverStats {
    pub stream_id: u64,
    /// Stream bytes handed to the reader.
    pub bytes_delivered: u64,
    /// Stream bytes arrived but not yet taken by the reader, now and at most.
    pub buffered_bytes: u64,
    pub peak_buffered_bytes: u64,
    /// The length the source declared, once its trailer arrived.
    pub declared_length: Option<u64>,
    /// The page stream underneath (`finished` once the source confirmed the end).
    pub page: ReceiverStats,
}

struct SinkState {
    reassembly: Reassembly,
    refused: Option<Refused>,
}

struct ByteSink {
    state: Mutex<SinkState>,
    arrived: Notify,
}

fn lock(m: &Mutex<SinkState>) -> std::sync::MutexGuard<'_, SinkState> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PageSink for ByteSink {
    fn apply(&self, first: u64, count: u32, data: Option<&[u8]>) -> Result<(), String> {
        let mut st = lock(&self.state);
        let result = match data {
            None => Err(Refused::Malformed("zero pages in a byte stream".into())),
            Some(d) => (0..u64::from(count)).try_for_each(|i| {
                let at = i as usize * PAGE_SIZE;
                st.reassembly.accept(first + i, &d[at..at + PAGE_SIZE])
            }),
        };
        if let Err(r) = &result {
            st.refused.get_or_insert_with(|| r.clone());
        }
        drop(st);
        self.arrived.notify_one();
        result.map_err(|r| r.to_string())
    }
}

/// Receives one byte stream. Obtained from [`RpcNode::accept_byte_stream`];
/// dropping it before the end cancels the stream.
pub struct ByteStreamReceiver {
    inner: PageStreamReceiver,
    sink: Arc<ByteSink>,
    /// Pages below this are taken (`u64::MAX` once the end is reached).
    taken: watch::Sender<u64>,
    /// Bytes of the last chunk `read` has not handed out yet.
    leftover: Bytes,
}

impl RpcNode {
    /// Expects byte stream `stream_id` from node `from`. Register before the source
    /// opens it, as for a page stream.
    pub fn accept_byte_stream(
        self: &Arc<Self>,
        stream_id: u64,
        from: NodeId,
    ) -> Result<ByteStreamReceiver, ByteStreamError> {
        let cfg = &self.config().page_stream;
        let budget = cfg.inflight_budget_bytes.max(cfg.byte_stream_budget_bytes);
        let ahead = (AHEAD_BUDGETS * budget / PAGE_SIZE) as u64 + 2 * u64::from(cfg.chunk_pages);
        let sink = Arc::new(ByteSink {
            state: Mutex::new(SinkState {
                reassembly: Reassembly::new(ahead),
                refused: None,
            }),
            arrived: Notify::new(),
        });
        let (taken, taken_rx) = watch::channel(0);
        let inner = self.accept_page_stream_held(stream_id, from, sink.clone(), taken_rx)?;
        Ok(ByteStreamReceiver {
            inner,
            sink,
            taken,
            leftover: Bytes::new(),
        })
    }
}

impl ByteStreamReceiver {
    pub fn stream_id(&self) -> u64 {
        self.inner.stream_id()
    }

    /// The next bytes of the stream in order (at most 256 KiB), `None` at its end
    /// (every byte taken, the length checked). Waits for them; fails when the stream
    /// fails (cancelled, every path dead, a length mismatch), never hangs: the page
    /// stream's watchdog fails a stream whose paths are all gone.
    pub async fn read_chunk(&mut self) -> Result<Option<Bytes>, ByteStreamError> {
        if !self.leftover.is_empty() {
            return Ok(Some(std::mem::take(&mut self.leftover)));
        }
        let Some(pieces) = self.next_pieces().await? else {
            return Ok(None);
        };
        if let [one] = &pieces[..] {
            return Ok(Some(one.clone()));
        }
        let mut out = BytesMut::with_capacity(pieces.iter().map(Bytes::len).sum());
        for p in &pieces {
            out.extend_from_slice(p);
        }
        Ok(Some(out.freeze()))
    }

    /// The next pieces of the stream in order (each a page's bytes, at most
    /// [`READ_CHUNK`] in all), `None` at its end. Waits as `read_chunk` does.
    async fn next_pieces(&mut self) -> Result<Option<Vec<Bytes>>, ByteStreamError> {
        let mut sender_done = false;
        loop {
            match self.take_ready() {
                Ok(Some(out)) => return Ok(Some(out)),
                Ok(None) => {}
                Err(e) => {
                    // The sink's own refusals already failed the page stream.
                    if matches!(e, ByteStreamError::LengthMismatch { .. }) {
                        self.inner.cancel(&e.to_string());
                    }
                    return Err(e);
                }
            }
            if *self.taken.borrow() == u64::MAX {
                return Ok(None);
            }
            if sender_done {
                // The source says it finished, yet the end is not here.
                let e = ByteStreamError::Malformed(
                    "the source finished before the stream's end".into(),
                );
                self.inner.cancel(&e.to_string());
                return Err(e);
            }
            tokio::select! {
                _ = self.sink.arrived.notified() => {}
                outcome = self.inner.wait() => match outcome {
                    Ok(_) => sender_done = true,
                    Err(e) => return Err(self.refusal().unwrap_or(ByteStreamError::Stream(e))),
                },
            }
        }
    }

    /// Takes what is in order now, up to [`READ_CHUNK`] bytes, and publishes the new
    /// position (`u64::MAX` at the end). `Ok(None)`: nothing yet, or the end.
    fn take_ready(&mut self) -> Result<Option<Vec<Bytes>>, ByteStreamError> {
        let mut st = lock(&self.sink.state);
        if let Some(r) = &st.refused {
            return Err(r.clone().into());
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        while bytes < READ_CHUNK {
            match st.reassembly.take() {
                Some(piece) => {
                    bytes += piece.len();
                    out.push(piece);
                }
                None => break,
            }
        }
        let at_end = st.reassembly.at_end()?;
        let next = st.reassembly.next_page();
        drop(st);
        let position = if at_end { u64::MAX } else { next };
        if position != *self.taken.borrow() {
            self.taken.send_replace(position);
        }
        Ok((!out.is_empty()).then_some(out))
    }

    fn refusal(&self) -> Option<ByteStreamError> {
        lock(&self.sink.state).refused.clone().map(Into::into)
    }

    /// Reads into `buf`: the number of bytes, 0 at the end of the stream.
    pub async fn read(&mut self, buf: &mut [u8]) -> Result<usize, ByteStreamError> {
        if buf.is_empty() {
            return Ok(0);
        }
        let Some(mut chunk) = self.read_chunk().await? else {
            return Ok(0);
        };
        let n = buf.len().min(chunk.len());
        buf[..n].copy_from_slice(&chunk[..n]);
        self.leftover = chunk.split_off(n);
        Ok(n)
    }

    /// Writes the stream into `output` (the target QEMU's migration socket) until its
    /// end, flushes it, and waits for the source to confirm it finished. A failed
    /// write cancels the stream with the reason.
    pub async fn pump_into<W>(
        mut self,
        output: &mut W,
    ) -> Result<ByteReceiverStats, ByteStreamError>
    where
        W: AsyncWrite + Unpin,
    {
        while let Some(mut pieces) = self.next_pieces().await? {
            if let Err(e) = write_pieces(output, &mut pieces).await {
                let e = ByteStreamError::Output(e.to_string());
                self.cancel(&e.to_string());
                return Err(e);
            }
        }
        if let Err(e) = output.flush().await {
            let e = ByteStreamError::Output(e.to_string());
            self.cancel(&e.to_string());
            return Err(e);
        }
        self.finished().await
    }

    /// Waits for the source's confirmation that the stream is complete (it comes
    /// once the reader has taken the end), or the stream's failure.
    pub async fn finished(&self) -> Result<ByteReceiverStats, ByteStreamError> {
        match self.inner.wait().await {
            Ok(_) => Ok(self.stats()),
            Err(e) => Err(self.refusal().unwrap_or(ByteStreamError::Stream(e))),
        }
    }

    /// Stops the stream; the source sees
    /// [`PageStreamError::PeerCancelled`](crate::PageStreamError::PeerCancelled).
    pub fn cancel(&self, reason: &str) {
        self.inner.cancel(reason);
    }

    pub fn stats(&self) -> ByteReceiverStats {
        let st = lock(&self.sink.state);
        let (buffered, peak) = st.reassembly.buffered();
        ByteReceiverStats {
            stream_id: self.inner.stream_id(),
            bytes_delivered: st.reassembly.delivered() - self.leftover.len() as u64,
            buffered_bytes: buffered + self.leftover.len() as u64,
            peak_buffered_bytes: peak,
            declared_length: st.reassembly.trailer().map(|t| t.length),
            page: self.inner.stats(),
        }
    }
}

/// Writes `pieces` in order with vectored writes: a page's worth each, so one
/// system call carries many of them without copying them together first.
async fn write_pieces<W>(output: &mut W, pieces: &mut [Bytes]) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    /// Slices per write (Linux takes up to 1024).
    const SLICES: usize = 64;
    let mut at = 0;
    while at < pieces.len() {
        let slices: Vec<IoSlice<'_>> = pieces[at..]
            .iter()
            .take(SLICES)
            .map(|p| IoSlice::new(p))
            .collect();
        let mut n = output.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && at < pieces.len() {
            let len = pieces[at].len();
            if n >= len {
                n -= len;
                at += 1;
            } else {
                pieces[at].advance(n);
                n = 0;
            }
        }
    }
    Ok(())
}
