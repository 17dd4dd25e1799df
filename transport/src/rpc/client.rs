//! The calling side: requests and one-way messages to a peer over whichever of its
//! networks answers.
//!
//! A call goes out on the peer's best path (networks that failed or were slow recently
//! go last). When that path errors, or falls silent for the call's hedge delay, the
//! same request (same id) also goes out on the next path, and the first answer wins.
//! Silent means: the peer has not acknowledged the request, or, once it has, nothing
//! at all has been received from it since. The first catches a path that only the
//! peer's packets still cross (our transmit side failed: its keep-alives keep coming,
//! our request never arrives); the second a path that died after the request got
//! through. A path that dies silently, which looks like a slow peer until QUIC's idle
//! timeout, therefore costs one hedge delay, not the call's whole deadline; a handler
//! that merely takes long keeps its path, whose peer keeps acknowledging. The peer
//! runs the request once however many copies reach it (`replies`).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::Connection;
use tokio::task::JoinSet;

use super::{lock, no_address, RpcNode};
use crate::error::RpcError;
use crate::framing::{connection_error, expect_frame, write_bytes, FrameError};
use crate::protocol::{
    decode_response, encode_request, Purpose, ResponseBody, Tag, FRAME_HEADER_LEN,
};
use crate::NodeId;

/// A cached outgoing connection to one peer address.
#[derive(Default)]
pub(super) struct ConnSlot {
    conn: tokio::sync::Mutex<Option<Connection>>,
    /// Last time connecting, a request, or a race with another path went badly on this
    /// address: such addresses are tried after the others for a while.
    failed_at: std::sync::Mutex<Option<Instant>>,
}

impl ConnSlot {
    /// Closes the slot's connection, if it has one and nobody is dialling.
    pub(super) fn close(&self, code: crate::protocol::CloseCode, reason: &str) {
        if let Ok(mut conn) = self.conn.try_lock() {
            if let Some(c) = conn.take() {
                c.close(code.to_varint(), reason.as_bytes());
            }
        }
    }
}

/// How long a path that failed or lost a race is tried after the others.
const RECENT_FAILURE: Duration = Duration::from_secs(2);

/// Shortest and longest default hedge delay (see [`CallOptions::new`]).
const MIN_HEDGE: Duration = Duration::from_millis(100);
/// A healthy peer acknowledges within its ACK delay (25 ms) plus a LAN round trip,
/// and pings every 40 ms: 120 ms leaves room for a busy peer, while a forwarded
/// store write (a 2 s attempt), which the switchover waits for inside the blackout,
/// does not wait out a quarter of a second on a dead network (250 ms before).
const MAX_HEDGE: Duration = Duration::from_millis(120);

/// The budget of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallOptions {
    /// The whole call, over all paths.
    pub timeout: Duration,
    /// When a path stays silent this long (connecting, or nothing received after the
    /// request went out), the request also goes out on the next path.
    pub hedge_after: Duration,
}

impl CallOptions {
    /// `timeout` with a hedge delay of a quarter of it, within 100–120 ms: long enough
    /// that a healthy peer's acknowledgement arrives first, short enough that a dead
    /// path costs little of the budget. A call shorter than 200 ms (Raft's heartbeat)
    /// hedges at half its budget, so it still reaches the other network in time.
    pub fn new(timeout: Duration) -> CallOptions {
        CallOptions {
            timeout,
            hedge_after: (timeout / 4).clamp(MIN_HEDGE, MAX_HEDGE).min(timeout / 2),
        }
    }

    pub fn hedge_after(self, hedge_after: Duration) -> CallOptions {
        CallOptions {
            hedge_after,
            ..self
        }
    }
}

impl RpcNode {
    /// Sends `request` to `service` on `peer` and waits for the answer, within
    /// `timeout` and with the default hedge delay ([`CallOptions::new`]).
    ///
    /// `addrs` are the peer's addresses, one per network, in order of preference.
    pub async fn call(
        &self,
        peer: NodeId,
        addrs: &[SocketAddr],
        service: &'static str,
        request: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, RpcError> {
        self.call_with(peer, addrs, service, request, CallOptions::new(timeout))
            .await
    }

    /// [`call`](Self::call) with an explicit budget. See the module docs for how the
    /// paths are used.
    pub async fn call_with(
        &self,
        peer: NodeId,
        addrs: &[SocketAddr],
        service: &'static str,
        request: Vec<u8>,
        opts: CallOptions,
    ) -> Result<Vec<u8>, RpcError> {
        let me = self.me.upgrade().ok_or(RpcError::Shutdown)?;
        let id = self.next_request_id();
        let frame = Arc::new(self.request_frame(Tag::Request, id, service, &request)?);
        let deadline = tokio::time::Instant::now() + opts.timeout;
        let order = self.ordered(peer, addrs);
        if order.is_empty() {
            return Err(no_address(peer));
        }
        let mut attempts = JoinSet::new();
        let (silent_tx, mut silent) = tokio::sync::mpsc::unbounded_channel();
        let launch = |attempts: &mut JoinSet<_>, addr: SocketAddr| {
            let (node, frame, silent) = (me.clone(), frame.clone(), silent_tx.clone());
            attempts.spawn(async move {
                let r = node
                    .attempt(peer, addr, &frame, deadline, opts.hedge_after, &silent)
                    .await;
                (addr, r)
            });
        };
        launch(&mut attempts, order[0]);
        let mut pending = vec![order[0]];
        let mut next = 1;
        let mut redialled: Vec<SocketAddr> = Vec::new();
        let mut last_err = None;
        loop {
            tokio::select! {
                joined = attempts.join_next() => {
                    let (addr, result) = match joined {
                        Some(Ok(done)) => done,
                        Some(Err(_)) => continue,
                        None => return Err(last_err.unwrap_or_else(|| no_address(peer))),
                    };
                    pending.retain(|a| *a != addr);
                    match result {
                        Ok(body) => {
                            // The paths still waiting were beaten: the next call starts
                            // on the one that answered.
                            for slow in &pending {
                                self.mark_failed(peer, *slow);
                            }
                            return match body {
                                ResponseBody::Ok(v) => Ok(v),
                                ResponseBody::HandlerError(s) => Err(RpcError::Remote(s)),
                                ResponseBody::UnknownService(s) => Err(RpcError::UnknownService(s)),
                            };
                        }
                        Err(e) if e.is_permanent() => return Err(e),
                        Err(e) => {
                            tracing::debug!(peer, %addr, error = %e, "call failed on one path");
                            last_err = Some(e);
                            // The next path; or, with none left, this one once more
                            // on a fresh connection (a cached one may have died with
                            // the peer's restart or a long outage: reset, closed).
                            let again = match order.get(next) {
                                Some(&a) => {
                                    next += 1;
                                    Some(a)
                                }
                                None if !redialled.contains(&addr) => {
                                    redialled.push(addr);
                                    Some(addr)
                                }
                                None => None,
                            };
                            if let Some(addr) = again {
                                pending.push(addr);
                                self.counters.failed_over.fetch_add(1, Ordering::Relaxed);
                                launch(&mut attempts, addr);
                            } else if attempts.is_empty() {
                                return Err(last_err.unwrap_or_else(|| no_address(peer)));
                            }
                        }
                    }
                }
                Some(quiet) = silent.recv() => {
                    // The next path, or (once) a fresh connection on this one: a
                    // network that just came back may still hold a connection deep
                    // in QUIC's retransmission backoff, which was dropped from the
                    // cache when it fell silent.
                    let addr = if let Some(&addr) = order.get(next) {
                        next += 1;
                        addr
                    } else if !redialled.contains(&quiet) {
                        redialled.push(quiet);
                        quiet
                    } else {
                        continue;
                    };
                    tracing::debug!(peer, %quiet, %addr, "path silent; the call also goes out on another");
                    pending.push(addr);
                    self.counters.hedged.fetch_add(1, Ordering::Relaxed);
                    launch(&mut attempts, addr);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    for slow in &pending {
                        self.mark_failed(peer, *slow);
                    }
                    return Err(RpcError::Timeout(opts.timeout));
                }
            }
        }
    }

    /// One copy of a request on one path: the peer's answer, or why there is none.
    /// Says on `silent` (once) when the path shows no life for `hedge_after`.
    async fn attempt(
        &self,
        peer: NodeId,
        addr: SocketAddr,
        frame: &[u8],
        deadline: tokio::time::Instant,
        hedge_after: Duration,
        silent: &tokio::sync::mpsc::UnboundedSender<SocketAddr>,
    ) -> Result<ResponseBody, RpcError> {
        let mut said = false;
        let mut say_silent = || {
            if !std::mem::replace(&mut said, true) {
                let _ = silent.send(addr);
            }
        };
        let connecting = self.connect(peer, addr, deadline);
        tokio::pin!(connecting);
        let conn = tokio::select! {
            c = &mut connecting => c?,
            _ = tokio::time::sleep(hedge_after) => {
                say_silent();
                connecting.await?
            }
        };
        let result = async {
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| connection_error(&e, peer))?;
            write_bytes(&mut send, frame)
                .await
                .map_err(|e| e.into_rpc(peer))?;
            send.finish().map_err(|e| RpcError::Closed(e.to_string()))?;
            // Resolves once the peer has acknowledged the whole request (or refused
            // the stream); either way it got through. A request too large to be
            // acknowledged within the hedge delay (megabytes on a slow link) is
            // hedged too: wasteful, not wrong, as the peer runs it once.
            let delivered = send.stopped();
            tokio::pin!(delivered);
            let mut got_through = false;
            let answer = expect_frame(
                &mut recv,
                self.cfg.max_frame_bytes,
                Tag::Response,
                "response",
            );
            tokio::pin!(answer);
            // Life on the path: the request acknowledged within a round trip (plus
            // QUIC's ack delay), then anything received from the peer, which sends
            // keep-alives while it works.
            let mut received = conn.stats().udp_rx.datagrams;
            let body = loop {
                tokio::select! {
                    body = &mut answer => break body,
                    _ = &mut delivered, if !got_through => got_through = true,
                    _ = tokio::time::sleep(hedge_after) => {
                        let now = conn.stats().udp_rx.datagrams;
                        if !got_through || now == received {
                            // Silent for long enough to be dead, not merely between
                            // keep-alives: no call waits on this connection again;
                            // this one still takes an answer should it come.
                            if hedge_after >= MIN_HEDGE {
                                self.forget(peer, addr, &conn);
                            }
                            say_silent();
                        }
                        received = now;
                    }
                }
            };
            let body = body.map_err(|e| {
                if let FrameError::Protocol(p) = &e {
                    conn.close(p.close_code().to_varint(), p.to_string().as_bytes());
                }
                e.into_rpc(peer)
            })?;
            decode_response(body).map_err(|p| {
                conn.close(p.close_code().to_varint(), p.to_string().as_bytes());
                RpcError::Protocol(p.to_string())
            })
        }
        .await;
        if result.is_err() {
            self.forget(peer, addr, &conn);
        }
        result
    }

    /// Sends a one-way `message` on the peer's best path. Returns once it is handed to
    /// QUIC on a live connection; delivery is not confirmed, so it is never repeated
    /// on another path once written.
    pub async fn send(
        &self,
        peer: NodeId,
        addrs: &[SocketAddr],
        service: &'static str,
        message: Vec<u8>,
    ) -> Result<(), RpcError> {
        let frame = self.request_frame(Tag::Message, 0, service, &message)?;
        let timeout = self.cfg.connect_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let fut = async {
            let mut last = None;
            for addr in self.ordered(peer, addrs) {
                let conn = match self.connect(peer, addr, deadline).await {
                    Ok(c) => c,
                    Err(e) if e.is_permanent() => return Err(e),
                    Err(e) => {
                        last = Some(e);
                        continue;
                    }
                };
                let sent = async {
                    let mut s = conn
                        .open_uni()
                        .await
                        .map_err(|e| connection_error(&e, peer))?;
                    write_bytes(&mut s, &frame)
                        .await
                        .map_err(|e| e.into_rpc(peer))?;
                    s.finish().map_err(|e| RpcError::Closed(e.to_string()))
                };
                match sent.await {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        self.forget(peer, addr, &conn);
                        last = Some(e);
                    }
                }
            }
            Err(last.unwrap_or_else(|| no_address(peer)))
        };
        match tokio::time::timeout_at(deadline, fut).await {
            Ok(r) => r,
            Err(_) => Err(RpcError::Timeout(timeout)),
        }
    }

    fn request_frame(
        &self,
        tag: Tag,
        id: u64,
        service: &str,
        payload: &[u8],
    ) -> Result<Vec<u8>, RpcError> {
        if self.is_shut() {
            return Err(RpcError::Shutdown);
        }
        let frame = encode_request(tag, id, service, payload)
            .map_err(|e| RpcError::Protocol(e.to_string()))?;
        let len = frame.len() - FRAME_HEADER_LEN + 1;
        if len > self.cfg.max_frame_bytes as usize {
            return Err(RpcError::FrameTooLarge(format!(
                "request of {len} bytes exceeds the maximum of {} bytes",
                self.cfg.max_frame_bytes
            )));
        }
        Ok(frame)
    }

    /// `addrs` with recently failed ones moved to the back (in their given order).
    fn ordered(&self, peer: NodeId, addrs: &[SocketAddr]) -> Vec<SocketAddr> {
        let conns = lock(&self.conns);
        let recently_failed = |a: &SocketAddr| {
            conns
                .get(&(peer, *a))
                .is_some_and(|s| lock(&s.failed_at).is_some_and(|t| t.elapsed() < RECENT_FAILURE))
        };
        let (bad, mut good): (Vec<SocketAddr>, Vec<SocketAddr>) =
            addrs.iter().partition(|a| recently_failed(a));
        good.extend(bad);
        good
    }

    fn slot(&self, peer: NodeId, addr: SocketAddr) -> Arc<ConnSlot> {
        lock(&self.conns).entry((peer, addr)).or_default().clone()
    }

    fn mark_failed(&self, peer: NodeId, addr: SocketAddr) {
        *lock(&self.slot(peer, addr).failed_at) = Some(Instant::now());
    }

    /// Drops `conn` from the cache (if it is still the cached one) and marks the
    /// address as recently failed.
    fn forget(&self, peer: NodeId, addr: SocketAddr, conn: &Connection) {
        let slot = self.slot(peer, addr);
        *lock(&slot.failed_at) = Some(Instant::now());
        if let Ok(mut cached) = slot.conn.try_lock() {
            if cached
                .as_ref()
                .is_some_and(|c| c.stable_id() == conn.stable_id())
            {
                *cached = None;
            }
        };
    }

    /// A live cached connection to `addr`, or a new one, before `deadline`.
    async fn connect(
        &self,
        peer: NodeId,
        addr: SocketAddr,
        deadline: tokio::time::Instant,
    ) -> Result<Connection, RpcError> {
        let slot = self.slot(peer, addr);
        let result = tokio::time::timeout_at(deadline, async {
            let mut cached = slot.conn.lock().await;
            if let Some(c) = cached.as_ref() {
                if c.close_reason().is_none() {
                    return Ok(c.clone());
                }
            }
            *cached = None;
            // Every request and message format is the same in each version spoken
            // today, so an RPC connection does not need its negotiated version.
            let mut h = self
                .open_connection(peer, addr, Purpose::Rpc, false)
                .await?;
            let _ = h.send.finish();
            *cached = Some(h.conn.clone());
            Ok(h.conn)
        })
        .await
        .unwrap_or_else(|_| {
            Err(RpcError::Unreachable {
                peer,
                reason: format!("no connection to {addr} in time"),
            })
        });
        if result.is_err() {
            *lock(&slot.failed_at) = Some(Instant::now());
        }
        result
    }
}
