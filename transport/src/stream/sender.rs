//! The source side of a page stream: one task per path (connect, hello, then a chunk
//! writer, a control writer sending pings, and a control reader taking acks), plus a
//! watchdog that drops silent paths and fails the stream when no path has been up for
//! `fail_after`. All decisions are made by the [`Scheduler`] under one lock; the tasks
//! wait on a `Notify` that fires whenever its state changes (while hedging, also
//! whenever a path takes a chunk, which the others may then copy).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::{Connection, ConnectionError, RecvStream, SendStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;

use super::pacer::Pacer;
use super::scheduler::{Chunk, PathId, Scheduler, MAX_PATHS};
use crate::config::PageStreamConfig;
use crate::error::{PageStreamError, RpcError};
use crate::framing::{
    read_frame_into_within, write_bytes, write_chunks, FrameDeadline, FrameError,
};
use crate::protocol::{
    check_chunk_version, decode_control, encode_chunk_header, encode_control, ChunkHeader,
    CloseCode, Control, ProtocolError, Purpose, Tag, LISTED_CHUNKS_SINCE, MAX_CHUNK_PAGES,
    MAX_CONTROL_FRAME, MAX_ROUND, MAX_SEQ, PAGE_SIZE,
};
use crate::rpc::RpcNode;
use crate::NodeId;

/// What one path did so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathStats {
    pub remote: SocketAddr,
    pub local: Option<SocketAddr>,
    pub alive: bool,
    pub bytes_sent: u64,
    pub bytes_acked: u64,
    pub chunks_sent: u64,
    pub chunks_acked: u64,
    /// Chunks this path carried after another path lost them.
    pub chunks_resent: u64,
    /// Copies this path carried of chunks in flight on another (while hedging,
    /// see [`PageStreamSender::hedge`]).
    pub chunks_hedged: u64,
    pub inflight_bytes: usize,
    pub times_up: u64,
    pub times_down: u64,
    pub last_error: Option<String>,
    /// The path's datagram size now (UDP payload), as MTU discovery left it;
    /// `None` while the path has no connection.
    pub mtu: Option<u16>,
}

/// A snapshot of a sender.
#[derive(Clone, Debug)]
pub struct SenderStats {
    pub stream_id: u64,
    pub paths: Vec<PathStats>,
    /// Bytes handed to `send`/`send_zero` (wire cost, zero chunks count their header).
    pub bytes_queued: u64,
    pub bytes_acked: u64,
    pub unacked_bytes: usize,
    /// Chunks queued so far; chunk sequence numbers run from 1 to this.
    pub chunks_queued: u64,
    /// Every chunk below this sequence number is applied (`chunks_queued + 1` when
    /// nothing is outstanding): what a barrier issued now has to wait for.
    pub applied_below: u64,
    pub elapsed: Duration,
    /// `bytes_acked / elapsed`.
    pub throughput_bytes_per_sec: f64,
    /// The protocol version the stream speaks (negotiated by its first path), once a
    /// path came up.
    pub wire_version: Option<u16>,
}

/// How long a failed stream's paths stay open for its `Cancel` message to be
/// delivered before they are closed (see `Shared::fail`).
const CANCEL_GRACE: Duration = Duration::from_millis(100);

struct PathSlot {
    remote: SocketAddr,
    local: Option<SocketAddr>,
    conn: Option<Connection>,
    control: Option<mpsc::UnboundedSender<Control>>,
    last_error: Option<String>,
    /// Set when retrying this path cannot help (identity, version, refused).
    gave_up: Option<RpcError>,
    /// Why this node closed the path's connection itself (the watchdog).
    dropped_because: Option<String>,
}

struct State {
    sched: Scheduler,
    paths: Vec<PathSlot>,
    outcome: Option<Result<(), PageStreamError>>,
    no_path_since: Option<Instant>,
    finishing: Option<Control>,
    finish_acked: bool,
    last_error: String,
    /// The bandwidth cap, over all paths (`set_rate_limit`).
    pacer: Pacer,
    /// The protocol version of the stream: the one its first path negotiated. Which
    /// chunks `send_listed` queues depends on it (listed chunks only from
    /// [`LISTED_CHUNKS_SINCE`]), and a queued chunk may go out on any path, so every
    /// path must speak the same version. They do — each reaches the same receiving
    /// process, and both ends' ranges are fixed for their lifetime — and a path that
    /// negotiated another is refused for good rather than trusted (`path_task`).
    version: Option<u16>,
}

struct Shared {
    stream_id: u64,
    peer: NodeId,
    cfg: PageStreamConfig,
    started: Instant,
    state: Mutex<State>,
    changed: Notify,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Runs `f` under the lock until it returns `Some`, sleeping between state changes.
    async fn wait_for<T>(&self, mut f: impl FnMut(&mut State) -> Option<T>) -> T {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(t) = f(&mut lock(&self.state)) {
                return t;
            }
            notified.await;
        }
    }

    fn is_over(&self) -> bool {
        lock(&self.state).outcome.is_some()
    }

    /// Ends the stream with `e` (first outcome wins) and closes every path.
    fn fail(&self, e: PageStreamError) {
        let (conns, controls) = {
            let mut st = lock(&self.state);
            if st.outcome.is_some() {
                return;
            }
            tracing::warn!(stream = self.stream_id, peer = self.peer, error = %e, "page stream failed");
            st.outcome = Some(Err(e.clone()));
            let controls: Vec<_> = st.paths.iter_mut().map(|p| p.control.take()).collect();
            let conns: Vec<_> = st.paths.iter_mut().filter_map(|p| p.conn.take()).collect();
            (conns, controls)
        };
        let (code, reason) = match &e {
            PageStreamError::Cancelled(r) => (CloseCode::Cancelled, r.clone()),
            other => (CloseCode::Cancelled, other.to_string()),
        };
        // The close is QUIC's last packet, and it is not sent again once the
        // connection has drained (a few round trips): lost, the receiver would see
        // its paths end without the reason and fail only at `fail_after`, with
        // "every path dead". So the reason goes first as a `Cancel` control message
        // (stream data, resent until delivered; the writers stop once it is
        // written), and the close follows after `CANCEL_GRACE`.
        for c in controls.into_iter().flatten() {
            let _ = c.send(Control::Cancel {
                reason: reason.clone(),
            });
        }
        let close = move || {
            for c in conns {
                c.close(code.to_varint(), reason.as_bytes());
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    tokio::time::sleep(CANCEL_GRACE).await;
                    close();
                });
            }
            Err(_) => close(),
        }
        self.changed.notify_waiters();
    }

    fn outcome_err(st: &State) -> Option<PageStreamError> {
        match &st.outcome {
            Some(Err(e)) => Some(e.clone()),
            Some(Ok(())) => Some(PageStreamError::InvalidInput(
                "the stream is finished".into(),
            )),
            None => None,
        }
    }
}

/// Sends pages to one peer over several paths. Obtained from
/// [`RpcNode::open_page_stream`]. Methods take `&self`: several tasks may feed one
/// stream. Dropping it without [`finish`](Self::finish) cancels the stream.
pub struct PageStreamSender {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RpcNode {
    /// Opens page stream `stream_id` to `peer`, `connections_per_network` paths per
    /// address in `paths` (the peer's address on each allowed migration network).
    /// Each path is dialed from this node's endpoint on the same network (longest
    /// common address prefix).
    ///
    /// Returns once at least one path is up. Fails if none comes up within
    /// `fail_after` or every path is refused for good (identity, version, or the peer
    /// expects no such stream).
    pub async fn open_page_stream(
        self: &Arc<Self>,
        peer: NodeId,
        paths: &[SocketAddr],
        stream_id: u64,
    ) -> Result<PageStreamSender, PageStreamError> {
        let cfg = self.config().page_stream.clone();
        self.open_page_stream_with(cfg, peer, paths, stream_id)
            .await
    }

    /// [`open_page_stream`](Self::open_page_stream) with settings of its own (the
    /// byte stream's smaller budget).
    pub(crate) async fn open_page_stream_with(
        self: &Arc<Self>,
        cfg: PageStreamConfig,
        peer: NodeId,
        paths: &[SocketAddr],
        stream_id: u64,
    ) -> Result<PageStreamSender, PageStreamError> {
        if paths.is_empty() {
            return Err(PageStreamError::InvalidInput("no path given".into()));
        }
        if self.is_shut() {
            return Err(PageStreamError::Shutdown);
        }
        // Each connection is a path of its own to the scheduler: a network's
        // connections share its load, and all of them fail over together.
        let paths: Vec<SocketAddr> = paths
            .iter()
            .flat_map(|r| std::iter::repeat_n(*r, cfg.connections_per_network.max(1) as usize))
            .collect();
        if paths.len() > MAX_PATHS {
            return Err(PageStreamError::InvalidInput(format!(
                "{} paths (networks times connections per network), at most {MAX_PATHS}",
                paths.len()
            )));
        }
        let paths = &paths[..];
        let shared = Arc::new(Shared {
            stream_id,
            peer,
            started: Instant::now(),
            state: Mutex::new(State {
                sched: Scheduler::new(
                    paths.len(),
                    cfg.inflight_budget_bytes,
                    cfg.path_window_bytes,
                )
                .with_adaptive_windows(
                    4 * cfg.chunk_pages as usize * PAGE_SIZE,
                    cfg.path_window_time,
                ),
                paths: paths
                    .iter()
                    .map(|r| PathSlot {
                        remote: *r,
                        local: self.endpoint_for(*r).map(|e| e.addr),
                        conn: None,
                        control: None,
                        last_error: None,
                        gave_up: None,
                        dropped_because: None,
                    })
                    .collect(),
                outcome: None,
                no_path_since: Some(Instant::now()),
                finishing: None,
                finish_acked: false,
                last_error: "no path came up yet".into(),
                pacer: Pacer::default(),
                version: None,
            }),
            changed: Notify::new(),
            cfg,
        });
        let mut tasks = Vec::new();
        for (i, remote) in paths.iter().enumerate() {
            tasks.push(tokio::spawn(path_task(
                shared.clone(),
                Arc::downgrade(self),
                i,
                *remote,
            )));
        }
        tasks.push(tokio::spawn(watchdog(Arc::downgrade(&shared))));
        let sender = PageStreamSender { shared, tasks };
        let ready = sender
            .shared
            .wait_for(|st| {
                if let Some(e) = Shared::outcome_err(st) {
                    return Some(Err(e));
                }
                (st.sched.paths_up() > 0).then_some(Ok(()))
            })
            .await;
        ready.map(|()| sender)
    }
}

impl PageStreamSender {
    pub fn stream_id(&self) -> u64 {
        self.shared.stream_id
    }

    /// Queues `pages` (a multiple of 4096 bytes) read in `round`, starting at page
    /// `first`. Waits while the stream's in-flight budget is full.
    pub async fn send(&self, round: u32, first: u64, pages: &[u8]) -> Result<(), PageStreamError> {
        if pages.len() % PAGE_SIZE != 0 {
            return Err(PageStreamError::InvalidInput(format!(
                "{} bytes is not a whole number of pages",
                pages.len()
            )));
        }
        let count = (pages.len() / PAGE_SIZE) as u64;
        check_range(round, first, count)?;
        let per_chunk = self.shared.cfg.chunk_pages as usize * PAGE_SIZE;
        for (i, part) in pages.chunks(per_chunk).enumerate() {
            let chunk = Chunk {
                round,
                first: first + (i * self.shared.cfg.chunk_pages as usize) as u64,
                count: (part.len() / PAGE_SIZE) as u32,
                offsets: None,
                data: Some(Bytes::copy_from_slice(part)),
            };
            self.push(chunk).await?;
        }
        Ok(())
    }

    /// Like [`send`](Self::send) for pages the caller already owns as [`Bytes`]:
    /// no copy.
    pub async fn send_bytes(
        &self,
        round: u32,
        first: u64,
        pages: Bytes,
    ) -> Result<(), PageStreamError> {
        if pages.len() % PAGE_SIZE != 0 {
            return Err(PageStreamError::InvalidInput(format!(
                "{} bytes is not a whole number of pages",
                pages.len()
            )));
        }
        let count = (pages.len() / PAGE_SIZE) as u64;
        check_range(round, first, count)?;
        let per_chunk = self.shared.cfg.chunk_pages as usize * PAGE_SIZE;
        let mut off = 0;
        while off < pages.len() {
            let end = (off + per_chunk).min(pages.len());
            self.push(Chunk {
                round,
                first: first + (off / PAGE_SIZE) as u64,
                count: ((end - off) / PAGE_SIZE) as u32,
                offsets: None,
                data: Some(pages.slice(off..end)),
            })
            .await?;
            off = end;
        }
        Ok(())
    }

    /// Queues `count` zero pages read in `round`: they travel as a marker, not as data.
    pub async fn send_zero(
        &self,
        round: u32,
        first: u64,
        count: u64,
    ) -> Result<(), PageStreamError> {
        check_range(round, first, count)?;
        let mut done = 0;
        while done < count {
            let n = (count - done).min(u64::from(MAX_CHUNK_PAGES));
            self.push(Chunk {
                round,
                first: first + done,
                count: n as u32,
                offsets: None,
                data: None,
            })
            .await?;
            done += n;
        }
        Ok(())
    }

    /// Queues the pages `pages` (strictly increasing, anywhere in memory) read in
    /// `round`: with `data` (their contents in that order, `pages.len() * 4096`
    /// bytes) or as zero pages (`None`). Scattered pages travel in chunks as full
    /// as contiguous ones, each listing its pages; a contiguous stretch goes as a
    /// plain chunk. To a peer of a version before listed chunks (the stream's
    /// negotiated version), each contiguous run goes as plain chunks instead. No copy
    /// of `data`.
    pub async fn send_listed(
        &self,
        round: u32,
        pages: &[u64],
        data: Option<Bytes>,
    ) -> Result<(), PageStreamError> {
        if pages.windows(2).any(|w| w[0] >= w[1]) {
            return Err(PageStreamError::InvalidInput(
                "listed pages must be strictly increasing".into(),
            ));
        }
        if let Some(d) = &data {
            if d.len() != pages.len() * PAGE_SIZE {
                return Err(PageStreamError::InvalidInput(format!(
                    "{} bytes for {} pages",
                    d.len(),
                    pages.len()
                )));
            }
        }
        if let Some(last) = pages.last() {
            check_range(round, *last, 1)?;
        }
        let listed = lock(&self.shared.state)
            .version
            .is_some_and(|v| v >= LISTED_CHUNKS_SINCE);
        let chunks = if listed {
            listed_chunks(pages, self.shared.cfg.chunk_pages)
        } else {
            contiguous_chunks(pages, self.shared.cfg.chunk_pages)
        };
        for (at, len) in chunks {
            let part = &pages[at..at + len];
            let first = part[0];
            let contiguous = part[len - 1] - first == len as u64 - 1;
            self.push(Chunk {
                round,
                first,
                count: len as u32,
                offsets: (!contiguous).then(|| {
                    part.iter()
                        .map(|p| (p - first) as u32)
                        .collect::<Vec<_>>()
                        .into()
                }),
                data: data
                    .as_ref()
                    .map(|d| d.slice(at * PAGE_SIZE..(at + len) * PAGE_SIZE)),
            })
            .await?;
        }
        Ok(())
    }

    /// Caps what the stream puts on the wire, all paths together, from now on (`None`:
    /// as fast as the paths take it). Resends of a dead path's chunks are not charged
    /// again: they replace bytes that never arrived.
    pub fn set_rate_limit(&self, bytes_per_sec: Option<u64>) {
        lock(&self.shared.state).pacer.set_rate(bytes_per_sec);
    }

    /// Hedging on (`true`) or off. On, every path with nothing new to send carries
    /// a copy of each chunk still unacknowledged on the others, so that every
    /// unacknowledged chunk is on every live path: a path that dies silently then
    /// costs a [`barrier`](Self::barrier) nothing, where without hedging its chunks
    /// wait for it to be declared dead (`path_dead_after`) before they go again.
    /// Meant for a migration's blackout (guest paused, last dirty pages, barrier):
    /// it trades bandwidth (up to one copy per path; copies are not charged to the
    /// rate limit) for a blackout that does not depend on detecting a dead path.
    /// The receiver applies one copy and ignores the others. Takes effect at once:
    /// idle paths start copying now. Off, no new copies go; copies in flight stay.
    pub fn hedge(&self, on: bool) {
        lock(&self.shared.state).sched.set_hedging(on);
        self.shared.changed.notify_waiters();
    }

    async fn push(&self, chunk: Chunk) -> Result<(), PageStreamError> {
        let cost = chunk.cost();
        let at = lock(&self.shared.state).pacer.admit(Instant::now(), cost);
        if at > Instant::now() {
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
        }
        let mut chunk = Some(chunk);
        self.shared
            .wait_for(|st| {
                if let Some(e) = Shared::outcome_err(st) {
                    return Some(Err(e));
                }
                if st.finishing.is_some() {
                    return Some(Err(PageStreamError::InvalidInput(
                        "send after finish".into(),
                    )));
                }
                if !st.sched.has_room(cost) {
                    return None;
                }
                if st.sched.chunks_pushed() >= MAX_SEQ {
                    return Some(Err(PageStreamError::InvalidInput(
                        "stream exhausted its sequence numbers".into(),
                    )));
                }
                st.sched.push(chunk.take()?);
                Some(Ok(()))
            })
            .await?;
        self.shared.changed.notify_waiters();
        Ok(())
    }

    /// Waits until every page queued for `round` or earlier has been applied by the
    /// receiver.
    pub async fn barrier(&self, round: u32) -> Result<(), PageStreamError> {
        self.shared
            .wait_for(|st| {
                if let Some(Err(e)) = &st.outcome {
                    return Some(Err(e.clone()));
                }
                (!st.sched.unacked_through(round)).then_some(Ok(()))
            })
            .await
    }

    pub fn stats(&self) -> SenderStats {
        let st = lock(&self.shared.state);
        let elapsed = self.shared.started.elapsed();
        SenderStats {
            stream_id: self.shared.stream_id,
            paths: st
                .paths
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let c = st.sched.path(i).cloned().unwrap_or_default();
                    PathStats {
                        remote: p.remote,
                        local: p.local,
                        alive: c.up,
                        bytes_sent: c.sent_bytes,
                        bytes_acked: c.acked_bytes,
                        chunks_sent: c.sent_chunks,
                        chunks_acked: c.acked_chunks,
                        chunks_resent: c.resent_chunks,
                        chunks_hedged: c.hedged_chunks,
                        inflight_bytes: c.inflight_bytes,
                        times_up: c.times_up,
                        times_down: c.times_down,
                        last_error: p.last_error.clone(),
                        mtu: p.conn.as_ref().map(|c| c.stats().path.current_mtu),
                    }
                })
                .collect(),
            bytes_queued: st.sched.pushed_bytes(),
            bytes_acked: st.sched.acked_bytes(),
            unacked_bytes: st.sched.unacked_bytes(),
            chunks_queued: st.sched.chunks_pushed(),
            applied_below: st
                .sched
                .lowest_unacked()
                .unwrap_or(st.sched.chunks_pushed() + 1),
            elapsed,
            throughput_bytes_per_sec: st.sched.acked_bytes() as f64
                / elapsed.as_secs_f64().max(1e-9),
            wire_version: st.version,
        }
    }

    /// Stops the stream now; the receiver sees [`PageStreamError::PeerCancelled`] with
    /// `reason` (carried in the connection close, which QUIC delivers even when stream
    /// data is still queued).
    pub fn cancel(&self, reason: &str) {
        self.shared
            .fail(PageStreamError::Cancelled(reason.to_owned()));
    }

    /// Waits until everything is applied, tells the receiver the stream is complete,
    /// and closes the paths.
    pub async fn finish(self) -> Result<SenderStats, PageStreamError> {
        self.barrier(u32::MAX).await?;
        {
            let mut st = lock(&self.shared.state);
            let finish = Control::Finish {
                chunks: st.sched.chunks_pushed(),
                bytes: st.sched.acked_bytes(),
            };
            for p in &st.paths {
                if let Some(c) = &p.control {
                    let _ = c.send(finish.clone());
                }
            }
            st.finishing = Some(finish);
        }
        self.shared
            .wait_for(|st| {
                if let Some(Err(e)) = &st.outcome {
                    return Some(Err(e.clone()));
                }
                st.finish_acked.then_some(Ok(()))
            })
            .await?;
        let conns: Vec<Connection> = {
            let mut st = lock(&self.shared.state);
            st.outcome = Some(Ok(()));
            st.paths.iter_mut().filter_map(|p| p.conn.take()).collect()
        };
        self.shared.changed.notify_waiters();
        for c in conns {
            c.close(CloseCode::Normal.to_varint(), b"page stream finished");
        }
        Ok(self.stats())
    }
}

impl Drop for PageStreamSender {
    fn drop(&mut self) {
        if !self.shared.is_over() {
            self.shared
                .fail(PageStreamError::Cancelled("sender dropped".into()));
        }
        // The tasks end by themselves now that the stream is over; aborting them
        // could stop a control writer before it sent the `Cancel`.
        self.tasks.clear();
    }
}

/// Splits a strictly increasing page list into chunks `(start, len)` of at most
/// `chunk_pages` consecutive pages each: its maximal runs, cut to size. For a peer
/// that does not take listed chunks.
fn contiguous_chunks(pages: &[u64], chunk_pages: u32) -> Vec<(usize, usize)> {
    let mut chunks = Vec::new();
    let mut start = 0;
    for i in 1..=pages.len() {
        let run_ends = i == pages.len() || pages[i] != pages[i - 1] + 1;
        if run_ends || i - start == chunk_pages as usize {
            chunks.push((start, i - start));
            start = i;
        }
    }
    chunks
}

/// Splits a strictly increasing page list into chunks `(start, len)` of at most
/// `chunk_pages` pages whose offsets from their first page fit a `u32`.
fn listed_chunks(pages: &[u64], chunk_pages: u32) -> Vec<(usize, usize)> {
    let mut chunks = Vec::new();
    let mut start = 0;
    for (i, page) in pages.iter().enumerate() {
        let full = i - start == chunk_pages as usize;
        if i > start && (full || page - pages[start] > u64::from(u32::MAX)) {
            chunks.push((start, i - start));
            start = i;
        }
    }
    if start < pages.len() {
        chunks.push((start, pages.len() - start));
    }
    chunks
}

fn check_range(round: u32, first: u64, count: u64) -> Result<(), PageStreamError> {
    if round > MAX_ROUND {
        return Err(PageStreamError::InvalidInput(format!(
            "round {round} exceeds {MAX_ROUND}"
        )));
    }
    if first.checked_add(count).is_none() {
        return Err(PageStreamError::InvalidInput("page range overflows".into()));
    }
    Ok(())
}

/// Why a path's connection ended.
enum PathEnd {
    /// Dead path: requeue and try again later.
    Dead(String),
    /// The whole stream must stop.
    Fatal(PageStreamError),
}

fn classify(e: &ConnectionError, peer: NodeId) -> PathEnd {
    if let ConnectionError::ApplicationClosed(c) = e {
        let reason = String::from_utf8_lossy(&c.reason).into_owned();
        match CloseCode::from_u64(c.error_code.into_inner()) {
            Some(CloseCode::Cancelled) => {
                return PathEnd::Fatal(PageStreamError::PeerCancelled(reason))
            }
            Some(CloseCode::SinkFailed) => {
                return PathEnd::Fatal(PageStreamError::SinkFailed(reason))
            }
            Some(CloseCode::Protocol | CloseCode::FrameTooLarge | CloseCode::VersionMismatch) => {
                return PathEnd::Fatal(PageStreamError::Protocol(reason))
            }
            Some(CloseCode::UnknownStream) => {
                return PathEnd::Fatal(PageStreamError::Connect(RpcError::Refused(reason)))
            }
            _ => {}
        }
    }
    PathEnd::Dead(crate::framing::connection_error(e, peer).to_string())
}

fn frame_end(e: FrameError, peer: NodeId, conn: &Connection) -> PathEnd {
    match e {
        FrameError::Protocol(p) => {
            conn.close(p.close_code().to_varint(), p.to_string().as_bytes());
            PathEnd::Fatal(PageStreamError::Protocol(format!("node {peer}: {p}")))
        }
        FrameError::Connection(c) => classify(&c, peer),
        FrameError::Stream(s) => PathEnd::Dead(s),
        FrameError::Deadline(d) => PathEnd::Dead(format!("frame not whole within {d:?}")),
    }
}

async fn path_task(shared: Arc<Shared>, node: Weak<RpcNode>, path: PathId, remote: SocketAddr) {
    let (peer, stream_id) = (shared.peer, shared.stream_id);
    loop {
        if shared.is_over() {
            return;
        }
        let Some(n) = node.upgrade() else {
            shared.fail(PageStreamError::Shutdown);
            return;
        };
        let purpose = Purpose::PageStream {
            stream_id,
            path: path as u32,
        };
        let opened = n
            .open_connection(peer, remote, purpose, true)
            .await
            .and_then(|h| {
                let mut st = lock(&shared.state);
                match st.version {
                    Some(v) if v != h.version => {
                        let why = format!(
                            "path negotiated protocol version {}, the stream speaks version {v}",
                            h.version
                        );
                        h.conn
                            .close(CloseCode::VersionMismatch.to_varint(), why.as_bytes());
                        Err(RpcError::VersionMismatch(why))
                    }
                    _ => {
                        st.version = Some(h.version);
                        Ok(h)
                    }
                }
            });
        let deadline = n.frame_deadline();
        drop(n);
        match opened {
            Ok(h) => {
                let conn = h.conn;
                let end = run_path(
                    &shared,
                    path,
                    conn.clone(),
                    (h.send, h.recv),
                    h.version,
                    deadline,
                )
                .await;
                let requeued = {
                    let mut st = lock(&shared.state);
                    let slot = &mut st.paths[path];
                    slot.conn = None;
                    slot.control = None;
                    let why = match (&end, slot.dropped_because.take()) {
                        (PathEnd::Dead(_), Some(own)) => own,
                        (PathEnd::Dead(s), None) => s.clone(),
                        (PathEnd::Fatal(e), _) => e.to_string(),
                    };
                    slot.last_error = Some(why.clone());
                    st.last_error = format!("path {remote}: {why}");
                    st.sched.path_down(path)
                };
                shared.changed.notify_waiters();
                // A path that ended because the stream did is closed by whoever
                // ended the stream, with its code (a cancel's reason must reach the
                // receiver, not "path dropped").
                if !shared.is_over() {
                    conn.close(CloseCode::PathDead.to_varint(), b"path dropped");
                }
                match end {
                    PathEnd::Fatal(e) => {
                        shared.fail(e);
                        return;
                    }
                    PathEnd::Dead(why) => {
                        if !shared.is_over() {
                            tracing::info!(stream = stream_id, %remote, requeued, "path died: {why}");
                        }
                    }
                }
            }
            Err(RpcError::Shutdown) => {
                shared.fail(PageStreamError::Shutdown);
                return;
            }
            Err(e) if e.is_permanent() => {
                let all_gave_up = {
                    let mut st = lock(&shared.state);
                    st.paths[path].last_error = Some(e.to_string());
                    st.paths[path].gave_up = Some(e.clone());
                    st.last_error = format!("path {remote}: {e}");
                    st.paths.iter().all(|p| p.gave_up.is_some())
                };
                tracing::warn!(stream = stream_id, %remote, "path refused for good: {e}");
                if all_gave_up {
                    shared.fail(PageStreamError::Connect(e));
                }
                return;
            }
            Err(e) => {
                let mut st = lock(&shared.state);
                st.paths[path].last_error = Some(e.to_string());
                st.last_error = format!("path {remote}: {e}");
            }
        }
        let over = shared.wait_for(|st| st.outcome.is_some().then_some(()));
        tokio::select! {
            _ = tokio::time::sleep(shared.cfg.reconnect_interval) => {}
            _ = over => return,
        }
    }
}

async fn run_path(
    shared: &Arc<Shared>,
    path: PathId,
    conn: Connection,
    (ctrl_send, ctrl_recv): (SendStream, RecvStream),
    version: u16,
    deadline: FrameDeadline,
) -> PathEnd {
    let peer = shared.peer;
    let data = match conn.open_uni().await {
        Ok(d) => d,
        Err(e) => return classify(&e, peer),
    };
    // Pings and acks must not queue behind megabytes of pages.
    let _ = ctrl_send.set_priority(1);
    let (ctrl_tx, ctrl_rx) = mpsc::unbounded_channel();
    {
        let mut st = lock(&shared.state);
        if st.outcome.is_some() {
            return PathEnd::Dead("stream over".into());
        }
        if let Some(f) = &st.finishing {
            let _ = ctrl_tx.send(f.clone());
        }
        st.sched.path_up(path, Instant::now());
        let slot = &mut st.paths[path];
        slot.conn = Some(conn.clone());
        slot.control = Some(ctrl_tx);
        st.no_path_since = None;
    }
    tracing::debug!(stream = shared.stream_id, remote = %conn.remote_address(), "path up");
    shared.changed.notify_waiters();

    let mut tasks = JoinSet::new();
    tasks.spawn(chunk_writer(
        shared.clone(),
        path,
        data,
        conn.clone(),
        version,
    ));
    tasks.spawn(control_writer(
        ctrl_send,
        ctrl_rx,
        shared.cfg.heartbeat_interval,
        peer,
        conn.clone(),
    ));
    tasks.spawn(control_reader(
        shared.clone(),
        path,
        ctrl_recv,
        conn.clone(),
        deadline,
    ));
    let end = tokio::select! {
        r = tasks.join_next() => match r {
            Some(Ok(end)) => end,
            Some(Err(e)) => PathEnd::Dead(format!("path task failed: {e}")),
            None => PathEnd::Dead("no path tasks".into()),
        },
        e = conn.closed() => classify(&e, peer),
    };
    if shared.is_over() {
        // Let the control writer send the stream's last word (`Shared::fail`).
        let _ = tokio::time::timeout(CANCEL_GRACE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
    }
    end
}

async fn chunk_writer(
    shared: Arc<Shared>,
    path: PathId,
    mut data: SendStream,
    conn: Connection,
    version: u16,
) -> PathEnd {
    loop {
        let next = shared
            .wait_for(|st| {
                if st.outcome.is_some() || !st.sched.is_up(path) {
                    return Some(None);
                }
                let hedging = st.sched.hedging();
                st.sched.next_for(path).map(|c| Some((c, hedging)))
            })
            .await;
        let Some(((seq, chunk), hedging)) = next else {
            return PathEnd::Dead("path no longer scheduled".into());
        };
        if hedging {
            // A chunk just went on this path: the idle ones copy it.
            shared.changed.notify_waiters();
        }
        let header = ChunkHeader {
            seq,
            round: chunk.round,
            first: chunk.first,
            count: chunk.count,
            zero: chunk.data.is_none(),
            listed: chunk.offsets.is_some(),
        };
        // Unreachable while every path speaks the stream's version (see
        // `State::version`); never put a chunk on the wire the peer cannot read.
        if let Err(p) = check_chunk_version(&header, version) {
            return PathEnd::Fatal(PageStreamError::Protocol(p.to_string()));
        }
        let header = encode_chunk_header(&header, chunk.offsets.as_deref().unwrap_or_default());
        let mut bufs = [Bytes::from(header), chunk.data.unwrap_or_default()];
        if let Err(e) = write_chunks(&mut data, &mut bufs).await {
            return frame_end(e, shared.peer, &conn);
        }
    }
}

async fn control_writer(
    mut send: SendStream,
    mut outbox: mpsc::UnboundedReceiver<Control>,
    heartbeat: Duration,
    peer: NodeId,
    conn: Connection,
) -> PathEnd {
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut nonce = 0u64;
    loop {
        let msg = tokio::select! {
            _ = tick.tick() => {
                nonce += 1;
                Control::Ping { nonce }
            }
            m = outbox.recv() => match m {
                Some(m) => m,
                None => return PathEnd::Dead("control channel dropped".into()),
            },
        };
        if let Err(e) = write_bytes(&mut send, &encode_control(&msg)).await {
            return frame_end(e, peer, &conn);
        }
    }
}

/// Reads the receiver's acks. A frame begun must be whole within the node's
/// frame deadline, as on the receiving side: a target that trickles its acks
/// would hold this path (and the move) for as long as it liked.
async fn control_reader(
    shared: Arc<Shared>,
    path: PathId,
    mut recv: RecvStream,
    conn: Connection,
    deadline: FrameDeadline,
) -> PathEnd {
    let peer = shared.peer;
    let mut body = Vec::new();
    loop {
        let tag = match read_frame_into_within(&mut recv, MAX_CONTROL_FRAME, &mut body, &deadline)
            .await
        {
            Ok(Some(tag)) => tag,
            Ok(None) => return PathEnd::Dead("receiver closed the control stream".into()),
            Err(e) => return frame_end(e, peer, &conn),
        };
        let msg = match tag {
            Tag::Control => decode_control(&body),
            tag => Err(ProtocolError::Unexpected {
                got: tag,
                expected: "control frame",
            }),
        };
        let msg = match msg {
            Ok(m) => m,
            Err(p) => return frame_end(FrameError::Protocol(p), peer, &conn),
        };
        let now = Instant::now();
        {
            let mut st = lock(&shared.state);
            st.sched.heard(path, now);
            match msg {
                Control::Ack { seqs } => {
                    // The receiver acknowledges a copy on the path it came on.
                    for s in seqs {
                        st.sched.on_ack_on(s, path, now);
                    }
                }
                Control::FinishAck => st.finish_acked = true,
                Control::Cancel { reason } => {
                    return PathEnd::Fatal(PageStreamError::PeerCancelled(reason))
                }
                Control::Pong { .. } | Control::Ping { .. } => continue,
                Control::Finish { .. } => {
                    drop(st);
                    return frame_end(
                        FrameError::Protocol(ProtocolError::Malformed(
                            "receiver sent Finish".into(),
                        )),
                        peer,
                        &conn,
                    );
                }
            }
        }
        shared.changed.notify_waiters();
    }
}

/// Drops silent paths and fails the stream once no path has been up for `fail_after`.
async fn watchdog(shared: Weak<Shared>) {
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
        let now = Instant::now();
        let mut silent = Vec::new();
        let failure = {
            let mut st = lock(&shared.state);
            if st.outcome.is_some() {
                return;
            }
            for p in st.sched.silent_paths(now, shared.cfg.path_dead_after) {
                if let Some(c) = st.paths[p].conn.clone() {
                    st.paths[p].dropped_because = Some(format!(
                        "no sign of life for {:?}",
                        shared.cfg.path_dead_after
                    ));
                    silent.push(c);
                }
            }
            if st.sched.paths_up() == 0 {
                let since = *st.no_path_since.get_or_insert(now);
                let after = now.saturating_duration_since(since);
                (after >= shared.cfg.fail_after).then(|| PageStreamError::AllPathsDead {
                    peer: shared.peer,
                    after,
                    last_error: st.last_error.clone(),
                })
            } else {
                st.no_path_since = None;
                None
            }
        };
        for c in silent {
            let reason = format!("no sign of life for {:?}", shared.cfg.path_dead_after);
            c.close(CloseCode::PathDead.to_varint(), reason.as_bytes());
        }
        if let Some(e) = failure {
            shared.fail(e);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{contiguous_chunks, listed_chunks};

    #[test]
    fn contiguous_chunks_are_the_runs_cut_to_size() {
        let pages = [1, 2, 3, 4, 5, 9, 11, 12, 13, 20];
        assert_eq!(
            contiguous_chunks(&pages, 3),
            vec![(0, 3), (3, 2), (5, 1), (6, 3), (9, 1)]
        );
        assert_eq!(contiguous_chunks(&[], 3), vec![]);
        assert_eq!(contiguous_chunks(&[7], 64), vec![(0, 1)]);
        let run: Vec<u64> = (100..300).collect();
        assert_eq!(
            contiguous_chunks(&run, 64),
            vec![(0, 64), (64, 64), (128, 64), (192, 8)]
        );
    }

    #[test]
    fn listed_pages_split_into_full_chunks_with_u32_offsets() {
        let pages: Vec<u64> = (0..10).map(|i| i * 3).collect();
        assert_eq!(listed_chunks(&pages, 4), vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(listed_chunks(&[], 4), vec![]);
        // A gap wider than a u32 offset starts a new chunk.
        let far = [1, 2, 1 << 33, (1 << 33) + 1];
        assert_eq!(listed_chunks(&far, 64), vec![(0, 2), (2, 2)]);
    }
}
