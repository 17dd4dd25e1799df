//! The target side of a page stream. Each incoming path (a connection whose hello
//! names this stream) gets a chunk reader, which applies chunks through
//! [`PageVersions`] to the [`PageSink`], and a control task that answers pings and
//! sends acknowledgements. Acknowledgements go out only after the sink has applied a
//! chunk, so the sender's barrier means "applied", not "received".
//!
//! A path's streams may idle between frames (a sender with nothing to send), but a
//! frame, once its first byte arrived, must be whole within the node's frame deadline:
//! a sender that trickles one loses that path, closed as dead with a reason naming the
//! deadline, and the buffer and task it held.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use quinn::{Connection, RecvStream, SendStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;

use super::ack_hold::release_acks;
use super::versions::{round_of, version, Admitted, PageVersions};
use super::PageSink;
use crate::config::PageStreamConfig;
use crate::error::PageStreamError;
use crate::framing::{read_frame_into_within, write_bytes, FrameDeadline, FrameError};
use crate::protocol::{
    check_chunk_version, decode_chunk, decode_control, encode_control, CloseCode, Control,
    ProtocolError, Tag, MAX_CONTROL_FRAME, PAGE_SIZE,
};
use crate::rpc::RpcNode;
use crate::NodeId;

/// A snapshot of a receiver.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    pub chunks_received: u64,
    /// Chunks of which no page was applied (duplicates and superseded copies).
    pub chunks_superseded: u64,
    pub pages_applied: u64,
    /// Pages skipped because the receiver already held the same or a newer copy.
    pub pages_stale: u64,
    pub zero_pages_applied: u64,
    pub bytes_received: u64,
    pub paths_up: usize,
    /// Path connections accepted over the stream's life (rejoins included).
    pub path_connections: u64,
    /// Pongs not queued because the sender left too many answers unread.
    pub pongs_dropped: u64,
    pub finished: bool,
}

#[derive(Default)]
struct Counters {
    chunks: AtomicU64,
    superseded: AtomicU64,
    applied: AtomicU64,
    stale: AtomicU64,
    zero: AtomicU64,
    bytes: AtomicU64,
    connections: AtomicU64,
    pongs_dropped: AtomicU64,
}

#[derive(Default)]
struct State {
    outcome: Option<Result<(), PageStreamError>>,
    conns: HashMap<usize, Connection>,
    ever_connected: bool,
    no_path_since: Option<Instant>,
}

/// Shared between the receiver handle, the node's accept path and the path tasks.
pub(crate) struct ReceiverShared {
    stream_id: u64,
    peer: NodeId,
    sink: Arc<dyn PageSink>,
    cfg: PageStreamConfig,
    versions: Mutex<PageVersions>,
    state: Mutex<State>,
    counters: Counters,
    done: Notify,
    /// The consumer's position (pages below it taken), when acknowledgements wait
    /// for it (see `ack_hold`); `None`: a chunk is acknowledged once applied.
    hold: Option<watch::Receiver<u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ReceiverShared {
    pub(crate) fn expected_peer(&self) -> NodeId {
        self.peer
    }

    fn is_over(&self) -> bool {
        lock(&self.state).outcome.is_some()
    }

    /// Ends the stream with `e` (first outcome wins) and closes every path with the
    /// matching close code, so the sender learns why.
    pub(crate) fn fail(&self, e: PageStreamError) {
        let conns: Vec<Connection> = {
            let mut st = lock(&self.state);
            if st.outcome.is_some() {
                return;
            }
            tracing::warn!(stream = self.stream_id, peer = self.peer, error = %e, "page stream failed");
            st.outcome = Some(Err(e.clone()));
            st.conns.drain().map(|(_, c)| c).collect()
        };
        let (code, reason) = match &e {
            PageStreamError::SinkFailed(r) => (CloseCode::SinkFailed, r.clone()),
            PageStreamError::Cancelled(r) => (CloseCode::Cancelled, r.clone()),
            PageStreamError::Shutdown => (CloseCode::Shutdown, "node shutting down".into()),
            other => (CloseCode::Cancelled, other.to_string()),
        };
        for c in conns {
            c.close(code.to_varint(), reason.as_bytes());
        }
        self.done.notify_waiters();
    }

    fn complete(&self) {
        let mut st = lock(&self.state);
        if st.outcome.is_none() {
            st.outcome = Some(Ok(()));
            drop(st);
            self.done.notify_waiters();
        }
    }

    fn apply(
        &self,
        first: u64,
        count: u32,
        round: u32,
        seq: u64,
        data: Option<&[u8]>,
    ) -> Result<Admitted, String> {
        let mut versions = lock(&self.versions);
        versions.admit(first, count, version(round, seq), |start, n| {
            let part = data.map(|d| {
                let off = (start - first) as usize * PAGE_SIZE;
                &d[off..off + n as usize * PAGE_SIZE]
            });
            self.sink.apply(start, n, part)
        })
    }

    fn stats(&self) -> ReceiverStats {
        let c = &self.counters;
        let st = lock(&self.state);
        ReceiverStats {
            chunks_received: c.chunks.load(Ordering::Relaxed),
            chunks_superseded: c.superseded.load(Ordering::Relaxed),
            pages_applied: c.applied.load(Ordering::Relaxed),
            pages_stale: c.stale.load(Ordering::Relaxed),
            zero_pages_applied: c.zero.load(Ordering::Relaxed),
            bytes_received: c.bytes.load(Ordering::Relaxed),
            paths_up: st.conns.len(),
            path_connections: c.connections.load(Ordering::Relaxed),
            pongs_dropped: c.pongs_dropped.load(Ordering::Relaxed),
            finished: matches!(st.outcome, Some(Ok(()))),
        }
    }
}

/// Receives one page stream. Obtained from [`RpcNode::accept_page_stream`]; dropping
/// it before the stream finished cancels the stream.
pub struct PageStreamReceiver {
    shared: Arc<ReceiverShared>,
    node: Weak<RpcNode>,
    watchdog: tokio::task::JoinHandle<()>,
}

impl RpcNode {
    /// Expects page stream `stream_id` from node `from` and applies its pages to
    /// `sink`. Register before the sender opens the stream: paths naming an unknown
    /// stream are refused.
    pub fn accept_page_stream(
        self: &Arc<Self>,
        stream_id: u64,
        from: NodeId,
        sink: Arc<dyn PageSink>,
    ) -> Result<PageStreamReceiver, PageStreamError> {
        self.accept_stream(stream_id, from, sink, None)
    }

    /// Like [`accept_page_stream`](Self::accept_page_stream), but a chunk is
    /// acknowledged only once `taken` (pages below it consumed) has passed its last
    /// page: the byte stream's bound on what its sink buffers.
    pub(crate) fn accept_page_stream_held(
        self: &Arc<Self>,
        stream_id: u64,
        from: NodeId,
        sink: Arc<dyn PageSink>,
        taken: watch::Receiver<u64>,
    ) -> Result<PageStreamReceiver, PageStreamError> {
        self.accept_stream(stream_id, from, sink, Some(taken))
    }

    fn accept_stream(
        self: &Arc<Self>,
        stream_id: u64,
        from: NodeId,
        sink: Arc<dyn PageSink>,
        hold: Option<watch::Receiver<u64>>,
    ) -> Result<PageStreamReceiver, PageStreamError> {
        if self.is_shut() {
            return Err(PageStreamError::Shutdown);
        }
        let shared = Arc::new(ReceiverShared {
            stream_id,
            peer: from,
            sink,
            cfg: self.config().page_stream.clone(),
            versions: Mutex::new(PageVersions::new()),
            state: Mutex::new(State::default()),
            counters: Counters::default(),
            done: Notify::new(),
            hold,
        });
        {
            let mut receivers = lock(&self.receivers);
            if receivers.contains_key(&stream_id) {
                return Err(PageStreamError::AlreadyRegistered(stream_id));
            }
            receivers.insert(stream_id, shared.clone());
        }
        let watchdog = tokio::spawn(watchdog(Arc::downgrade(&shared)));
        Ok(PageStreamReceiver {
            shared,
            node: Arc::downgrade(self),
            watchdog,
        })
    }
}

impl PageStreamReceiver {
    pub fn stream_id(&self) -> u64 {
        self.shared.stream_id
    }

    /// Waits until the sender finished (every chunk applied) or the stream failed.
    pub async fn wait(&self) -> Result<ReceiverStats, PageStreamError> {
        loop {
            let notified = self.shared.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let outcome = lock(&self.shared.state).outcome.clone();
            match outcome {
                Some(Ok(())) => return Ok(self.shared.stats()),
                Some(Err(e)) => return Err(e),
                None => {}
            }
            notified.await;
        }
    }

    pub fn stats(&self) -> ReceiverStats {
        self.shared.stats()
    }

    /// The round of the copy page `page` holds, if any was applied.
    pub fn page_round(&self, page: u64) -> Option<u32> {
        let v = lock(&self.shared.versions).get(page);
        (v != 0).then(|| round_of(v))
    }

    /// Stops the stream; the sender sees [`PageStreamError::PeerCancelled`].
    pub fn cancel(&self, reason: &str) {
        self.shared
            .fail(PageStreamError::Cancelled(reason.to_owned()));
    }
}

impl Drop for PageStreamReceiver {
    fn drop(&mut self) {
        self.watchdog.abort();
        if let Some(node) = self.node.upgrade() {
            let mut receivers = lock(&node.receivers);
            if receivers
                .get(&self.shared.stream_id)
                .is_some_and(|r| Arc::ptr_eq(r, &self.shared))
            {
                receivers.remove(&self.shared.stream_id);
            }
        }
        if !self.shared.is_over() {
            self.shared
                .fail(PageStreamError::Cancelled("receiver dropped".into()));
        }
    }
}

/// Fails the stream when it had paths and none has been up for `fail_after`.
async fn watchdog(shared: Weak<ReceiverShared>) {
    let Some(tick) = shared.upgrade().map(|s| s.cfg.heartbeat_interval) else {
        return;
    };
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let failure = {
            let st = lock(&shared.state);
            if st.outcome.is_some() {
                return;
            }
            st.no_path_since.and_then(|since| {
                let after = since.elapsed();
                (st.ever_connected && st.conns.is_empty() && after >= shared.cfg.fail_after).then(
                    || PageStreamError::AllPathsDead {
                        peer: shared.peer,
                        after,
                        last_error: "no path from the sender".into(),
                    },
                )
            })
        };
        if let Some(e) = failure {
            shared.fail(e);
            return;
        }
    }
}

/// Control messages (acks, pongs) a path may have waiting for the sender to
/// read them.
const OUTBOX: usize = 1024;

/// Most pages applied under the version lock at once (1 MiB).
const APPLY_PAGES: u32 = 256;

enum Out {
    Ack(u64),
    Control(Control),
}

/// What the hello settled for one incoming path.
pub(crate) struct PathHello {
    /// The sender's number for the path.
    pub path: u32,
    /// The protocol version negotiated for the path's connection.
    pub wire_version: u16,
}

/// What one path's sender may make this node hold: its largest chunk frame, and the
/// time a frame has once its first byte arrived.
pub(crate) struct PathLimits {
    pub max_frame: u32,
    pub deadline: FrameDeadline,
}

/// Serves one path of a registered stream after its hello was answered.
pub(crate) async fn serve_path(
    shared: Arc<ReceiverShared>,
    conn: Connection,
    ctrl_send: SendStream,
    ctrl_recv: RecvStream,
    hello: PathHello,
    limits: PathLimits,
    on_violation: impl Fn(&Connection, &ProtocolError) + Send + Sync + 'static,
) {
    let id = conn.stable_id();
    {
        let mut st = lock(&shared.state);
        if st.outcome.is_some() {
            drop(st);
            conn.close(
                CloseCode::UnknownStream.to_varint(),
                b"page stream already ended",
            );
            return;
        }
        st.conns.insert(id, conn.clone());
        st.ever_connected = true;
        st.no_path_since = None;
    }
    shared.counters.connections.fetch_add(1, Ordering::Relaxed);
    let PathHello { path, wire_version } = hello;
    tracing::debug!(stream = shared.stream_id, path, wire_version, remote = %conn.remote_address(), "path accepted");

    let on_violation = Arc::new(on_violation);
    let (out_tx, out_rx) = mpsc::channel(OUTBOX);
    let mut tasks = JoinSet::new();
    // Not one of `tasks`: when the path ends it still sends what is queued
    // (see below).
    let mut writer = tokio::spawn(control_writer(ctrl_send, out_rx));
    tasks.spawn(control_reader(
        shared.clone(),
        ctrl_recv,
        out_tx.clone(),
        conn.clone(),
        limits.deadline.clone(),
        on_violation.clone(),
    ));
    let held = shared.hold.clone().map(|taken| {
        let (applied_tx, applied_rx) = mpsc::channel(OUTBOX);
        let (shared, out) = (shared.clone(), out_tx.clone());
        tasks.spawn(async move {
            let acks = release_acks(applied_rx, taken, |seq| {
                let out = out.clone();
                async move { out.send(Out::Ack(seq)).await.is_ok() }
            });
            if let Err(e) = acks.await {
                shared.fail(PageStreamError::Protocol(e));
            }
        });
        applied_tx
    });
    tasks.spawn(chunk_reader(
        shared.clone(),
        conn.clone(),
        out_tx,
        held,
        wire_version,
        limits,
        on_violation,
    ));
    tokio::select! {
        _ = tasks.join_next() => {}
        _ = conn.closed() => {}
        _ = &mut writer => {}
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    // The others are gone, and with them every sender of the outbox: the
    // writer sends what they queued and ends. Above all a `FinishAck`: when
    // the sender finishes its data stream right after its `Finish`, the chunk
    // reader ends this path at once, and aborting the writer too lost the
    // acknowledgement on the one live path, so a complete stream failed at
    // the source for want of it (seen with a network dropped). Bounded: a
    // dead path's writes fail, or wait out the dead-path deadline.
    if !writer.is_finished()
        && tokio::time::timeout(shared.cfg.path_dead_after, &mut writer)
            .await
            .is_err()
    {
        writer.abort();
    }
    // A task may end (its stream finished) just before the sender's close arrives:
    // wait briefly for the close, which says whether the stream was cancelled.
    if conn.close_reason().is_none() {
        let _ = tokio::time::timeout(shared.cfg.path_dead_after, conn.closed()).await;
    }
    if let Some(quinn::ConnectionError::ApplicationClosed(c)) = conn.close_reason() {
        if CloseCode::from_u64(c.error_code.into_inner()) == Some(CloseCode::Cancelled) {
            let reason = String::from_utf8_lossy(&c.reason).into_owned();
            shared.fail(PageStreamError::PeerCancelled(reason));
        }
    }
    let mut st = lock(&shared.state);
    st.conns.remove(&id);
    if st.conns.is_empty() {
        st.no_path_since = Some(Instant::now());
    }
}

async fn control_writer(mut send: SendStream, mut outbox: mpsc::Receiver<Out>) {
    let _ = send.set_priority(1);
    // Ends when every sender of the outbox is gone and all it held is written.
    let mut acks = Vec::new();
    while let Some(first) = outbox.recv().await {
        let mut next = Some(first);
        // Batch whatever else is ready into one ack frame.
        while let Some(out) = next.take().or_else(|| outbox.try_recv().ok()) {
            match out {
                Out::Ack(s) => {
                    acks.push(s);
                    if acks.len() >= 4096 {
                        break;
                    }
                }
                Out::Control(c) => {
                    if write_bytes(&mut send, &encode_control(&c)).await.is_err() {
                        return;
                    }
                }
            }
        }
        if !acks.is_empty() {
            let msg = Control::Ack {
                seqs: std::mem::take(&mut acks),
            };
            if write_bytes(&mut send, &encode_control(&msg)).await.is_err() {
                return;
            }
        }
    }
}

/// Closes a path whose sender did not deliver a frame within the frame deadline.
/// As a dead path (not a protocol violation): a sender on a link that slow sends
/// again on its other paths, or on this one once it reconnects.
fn frame_too_slow(shared: &ReceiverShared, conn: &Connection, what: &str, after: Duration) {
    let reason = format!(
        "a {what} frame from node {} was not whole within the frame deadline of \
         {after:?} after its first byte",
        shared.peer
    );
    tracing::warn!(
        stream = shared.stream_id,
        peer = shared.peer,
        "{reason}: path closed"
    );
    conn.close(CloseCode::PathDead.to_varint(), reason.as_bytes());
}

async fn control_reader(
    shared: Arc<ReceiverShared>,
    mut recv: RecvStream,
    out: mpsc::Sender<Out>,
    conn: Connection,
    deadline: FrameDeadline,
    on_violation: Arc<impl Fn(&Connection, &ProtocolError)>,
) {
    let mut body = Vec::new();
    loop {
        let msg = match read_frame_into_within(&mut recv, MAX_CONTROL_FRAME, &mut body, &deadline)
            .await
        {
            Ok(Some(Tag::Control)) => decode_control(&body),
            Ok(Some(tag)) => Err(ProtocolError::Unexpected {
                got: tag,
                expected: "control frame",
            }),
            Ok(None) => return,
            Err(FrameError::Protocol(p)) => Err(p),
            Err(FrameError::Deadline(after)) => {
                frame_too_slow(&shared, &conn, "control", after);
                return;
            }
            Err(_) => return,
        };
        let msg = match msg {
            Ok(m) => m,
            Err(p) => {
                on_violation(&conn, &p);
                return;
            }
        };
        match msg {
            Control::Ping { nonce } => {
                // A sender that pings but does not read its answers fills the
                // outbox: its pongs are dropped (it will call the path dead),
                // never queued without bound.
                if out.try_send(Out::Control(Control::Pong { nonce })).is_err() {
                    shared
                        .counters
                        .pongs_dropped
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            Control::Finish { chunks, bytes } => {
                tracing::debug!(stream = shared.stream_id, chunks, bytes, "sender finished");
                shared.complete();
                if out.send(Out::Control(Control::FinishAck)).await.is_err() {
                    return;
                }
            }
            Control::Cancel { reason } => {
                shared.fail(PageStreamError::PeerCancelled(reason));
                return;
            }
            Control::Pong { .. } | Control::Ack { .. } | Control::FinishAck => {
                on_violation(
                    &conn,
                    &ProtocolError::Malformed("sender sent a receiver's control message".into()),
                );
                return;
            }
        }
    }
}

async fn chunk_reader(
    shared: Arc<ReceiverShared>,
    conn: Connection,
    out: mpsc::Sender<Out>,
    held: Option<mpsc::Sender<(u64, u64)>>,
    wire_version: u16,
    limits: PathLimits,
    on_violation: Arc<impl Fn(&Connection, &ProtocolError)>,
) {
    let Ok(mut recv) = conn.accept_uni().await else {
        return;
    };
    // Grows to the largest chunk seen (bounded by `max_frame`), never shrinks.
    let mut body = Vec::new();
    loop {
        let chunk =
            match read_frame_into_within(&mut recv, limits.max_frame, &mut body, &limits.deadline)
                .await
            {
                // A path of a version before listed chunks refuses them, as a build of
                // that version would (it does not know the flag).
                Ok(Some(Tag::Chunk)) => match decode_chunk(&body)
                    .and_then(|c| check_chunk_version(&c.header, wire_version).map(|()| c))
                {
                    Ok(c) => c,
                    Err(p) => {
                        on_violation(&conn, &p);
                        return;
                    }
                },
                Ok(Some(tag)) => {
                    on_violation(
                        &conn,
                        &ProtocolError::Unexpected {
                            got: tag,
                            expected: "chunk",
                        },
                    );
                    return;
                }
                Ok(None) => return,
                Err(FrameError::Protocol(p)) => {
                    on_violation(&conn, &p);
                    return;
                }
                Err(FrameError::Deadline(after)) => {
                    frame_too_slow(&shared, &conn, "chunk", after);
                    return;
                }
                Err(_) => return,
            };
        if shared.is_over() {
            return;
        }
        let header = chunk.header;
        let c = &shared.counters;
        c.chunks.fetch_add(1, Ordering::Relaxed);
        c.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
        let mut admitted = Admitted::default();
        // Applied in slices of at most `APPLY_PAGES`, each under the version
        // lock on its own: a 30-byte zero chunk may name 65 536 pages, and
        // zeroing 256 MiB under one lock would stall the stream's other paths.
        let slices = chunk.runs().into_iter().flat_map(|(index, first, count)| {
            (0..count).step_by(APPLY_PAGES as usize).map(move |done| {
                (
                    index + done,
                    first + u64::from(done),
                    (count - done).min(APPLY_PAGES),
                )
            })
        });
        for (index, first, count) in slices {
            let data = (!header.zero).then(|| {
                let at = index as usize * PAGE_SIZE;
                &chunk.data[at..at + count as usize * PAGE_SIZE]
            });
            match shared.apply(first, count, header.round, header.seq, data) {
                Ok(a) => {
                    admitted.applied += a.applied;
                    admitted.stale += a.stale;
                }
                Err(e) => {
                    shared.fail(PageStreamError::SinkFailed(format!(
                        "pages {first}..{}: {e}",
                        first + u64::from(count)
                    )));
                    return;
                }
            }
        }
        c.applied
            .fetch_add(u64::from(admitted.applied), Ordering::Relaxed);
        c.stale
            .fetch_add(u64::from(admitted.stale), Ordering::Relaxed);
        if admitted.applied == 0 {
            c.superseded.fetch_add(1, Ordering::Relaxed);
        }
        if header.zero {
            c.zero
                .fetch_add(u64::from(admitted.applied), Ordering::Relaxed);
        }
        // A full outbox (the sender reads no acks) stops this reader, and
        // QUIC's flow control then stops the sender: back-pressure, not a
        // queue that grows. Held acknowledgements go through the releaser.
        let sent = match &held {
            Some(h) => {
                let end = chunk
                    .runs()
                    .iter()
                    .map(|(_, first, count)| first + u64::from(*count))
                    .max()
                    .unwrap_or(header.first);
                h.send((end, header.seq)).await.is_ok()
            }
            None => out.send(Out::Ack(header.seq)).await.is_ok(),
        };
        if !sent {
            return;
        }
    }
}
