//! What a peer may make a node hold, and the gauges that show what it holds now.
//!
//! A stranger (before the handshake ends) may hold a handshake slot; an authenticated
//! member may hold a few connections, a few dozen streams on each, a partial frame
//! that grows only as its bytes arrive, and a handler's task for a bounded time. Every
//! limit is checked before the resource is spent. The decisions are plain functions
//! over plain numbers ([`handshake_decision`], [`GrowthPlan`]), tested here without
//! sockets; `rpc::server` and `framing` apply them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::NodeId;

/// Incoming handshakes (TLS plus hello) one node runs at once. A handshake costs a
/// task, quinn's connection state and a signature; 64 keeps a flood's cost to a few
/// MiB, while a whole cluster (tens of nodes, a few connections each) reconnecting
/// at once still fits, since each of those handshakes takes a few milliseconds.
pub const DEFAULT_MAX_HANDSHAKES: u32 = 64;

/// Connections one authenticated node may hold open to this node. RPC uses one per
/// network; a page stream up to four per network (`connections_per_network`) for
/// each path; 64 leaves room for about eight concurrent migrations between one pair
/// of nodes on two networks, and bounds a hostile member's streams at
/// 64 × `max_concurrent_requests`.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: u32 = 64;

/// Time a request or message stream has to deliver its whole frame from the
/// stream's opening, and a page-stream path's chunk or control frame from its first
/// byte (those streams idle between frames). The largest frame (16 MiB) needs
/// 13 Mbit/s to arrive in time: any cluster network is faster by far, and a stream
/// that trickles slower only holds a slot.
pub const DEFAULT_FRAME_DEADLINE: Duration = Duration::from_secs(10);

/// Time a request handler may run. The longest call any service makes waits 20 s
/// (a forwarded API request); six times that leaves room for a slow node while a
/// handler stuck forever still gives its task back.
pub const DEFAULT_HANDLER_DEADLINE: Duration = Duration::from_secs(120);

/// The first allocation for a frame's body, whatever length its header claims; the
/// buffer then at most doubles as bytes actually arrive. 64 KiB holds every control
/// frame and most requests in one go, and is all a peer that claims 16 MiB and sends
/// nothing makes the node hold.
pub const FRAME_FIRST_ALLOCATION: usize = 64 << 10;

/// Limits on what peers may make this node hold (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerLimits {
    /// Incoming handshakes in flight at once; more are refused before any work.
    /// Above half of it, a peer whose address is not validated is sent a QUIC retry
    /// first, so a spoofed flood cannot fill the slots.
    pub max_handshakes: u32,
    /// Open connections per authenticated peer node; more are refused after the
    /// hello with [`CloseCode::TooManyConnections`](crate::protocol::CloseCode).
    pub max_connections_per_peer: u32,
    /// See [`DEFAULT_FRAME_DEADLINE`].
    pub frame_deadline: Duration,
    /// See [`DEFAULT_HANDLER_DEADLINE`].
    pub handler_deadline: Duration,
}

impl Default for PeerLimits {
    fn default() -> Self {
        PeerLimits {
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            frame_deadline: DEFAULT_FRAME_DEADLINE,
            handler_deadline: DEFAULT_HANDLER_DEADLINE,
        }
    }
}

/// What to do with a new incoming connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeDecision {
    Accept,
    /// Ask the peer to prove its address first (costs it a round trip, us nothing).
    Retry,
    /// Too many in flight: refuse before any cryptography.
    Refuse,
}

/// The decision for an attempt arriving while `in_flight` handshakes run.
pub fn handshake_decision(in_flight: u64, max: u32, address_validated: bool) -> HandshakeDecision {
    let max = u64::from(max.max(1));
    if in_flight >= max {
        HandshakeDecision::Refuse
    } else if !address_validated && in_flight >= max.div_ceil(2) {
        HandshakeDecision::Retry
    } else {
        HandshakeDecision::Accept
    }
}

/// How a frame body's buffer grows: from [`FRAME_FIRST_ALLOCATION`] (or the claimed
/// length, if smaller), doubling as it fills, never past the claimed length.
pub struct GrowthPlan;

impl GrowthPlan {
    pub fn first(claimed: usize) -> usize {
        claimed.min(FRAME_FIRST_ALLOCATION)
    }

    /// The capacity to grow to once `have` bytes fill the buffer.
    pub fn next(have: usize, claimed: usize) -> usize {
        have.saturating_mul(2)
            .max(FRAME_FIRST_ALLOCATION)
            .min(claimed)
    }
}

/// A count that remembers its highest value, so a test can assert a bound held
/// throughout an attack without sampling it.
#[derive(Debug, Default)]
pub struct Gauge {
    now: AtomicU64,
    peak: AtomicU64,
}

impl Gauge {
    pub fn add(&self, n: u64) -> u64 {
        let now = self.now.fetch_add(n, Ordering::AcqRel) + n;
        self.peak.fetch_max(now, Ordering::AcqRel);
        now
    }

    pub fn sub(&self, n: u64) {
        self.now.fetch_sub(n, Ordering::AcqRel);
    }

    pub fn now(&self) -> u64 {
        self.now.load(Ordering::Acquire)
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Acquire)
    }
}

/// Holds `n` of a gauge until dropped.
pub(crate) struct Held<'a> {
    gauge: &'a Gauge,
    n: u64,
}

impl<'a> Held<'a> {
    pub(crate) fn new(gauge: &'a Gauge, n: u64) -> Self {
        gauge.add(n);
        Held { gauge, n }
    }

    /// Holds `n` instead of what it held.
    pub(crate) fn set(&mut self, n: u64) {
        if n > self.n {
            self.gauge.add(n - self.n);
        } else {
            self.gauge.sub(self.n - n);
        }
        self.n = n;
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.gauge.sub(self.n);
    }
}

/// What peers make this node hold now, and the most they ever did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Level {
    pub now: u64,
    pub peak: u64,
}

/// Resource gauges of a node, read with [`RpcNode::limit_stats`](crate::RpcNode::limit_stats).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitStats {
    pub handshakes_in_flight: Level,
    /// Attempts refused because `max_handshakes` were in flight.
    pub handshakes_refused: u64,
    /// Attempts sent a QUIC retry to validate their address.
    pub handshakes_retried: u64,
    pub connections_open: Level,
    /// Connections refused because their node held `max_connections_per_peer`.
    pub connections_over_limit: u64,
    /// Request and message streams being read or answered.
    pub request_streams_open: Level,
    /// Streams stopped because their frame did not arrive within `frame_deadline`.
    pub frames_timed_out: u64,
    /// Handlers that ran past `handler_deadline`.
    pub handlers_timed_out: u64,
    /// Request and one-way message handlers running (each is a task).
    pub handlers_running: Level,
    /// Bytes allocated for frames still arriving: requests, messages, and the
    /// chunk and control frames of page-stream paths.
    pub partial_frame_bytes: Level,
}

/// What peers hold of one node now: the gauges behind [`LimitStats`], and the
/// connections each authenticated node holds.
#[derive(Debug, Default)]
pub(crate) struct Holdings {
    pub handshakes: Gauge,
    pub handshakes_refused: AtomicU64,
    pub handshakes_retried: AtomicU64,
    pub connections: Gauge,
    pub connections_over_limit: AtomicU64,
    pub request_streams: Gauge,
    pub frames_timed_out: AtomicU64,
    pub handlers_timed_out: AtomicU64,
    pub handlers: Gauge,
    pub partial_frames: Gauge,
    per_peer: Mutex<HashMap<NodeId, u32>>,
}

/// Which gauge an [`OwnedSlot`] holds one of.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Slot {
    Handshake,
    RequestStream,
    Handler,
}

/// One unit of a gauge, held by a task until it drops it.
pub(crate) struct OwnedSlot {
    holdings: Arc<Holdings>,
    slot: Slot,
}

impl Drop for OwnedSlot {
    fn drop(&mut self) {
        self.holdings.gauge(self.slot).sub(1);
    }
}

/// One of `peer`'s connections, counted until dropped.
pub(crate) struct PeerConnection {
    holdings: Arc<Holdings>,
    peer: NodeId,
}

impl Drop for PeerConnection {
    fn drop(&mut self) {
        self.holdings.connections.sub(1);
        let mut per_peer = self
            .holdings
            .per_peer
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_peer.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per_peer.remove(&self.peer);
            }
        }
    }
}

impl Holdings {
    fn gauge(&self, slot: Slot) -> &Gauge {
        match slot {
            Slot::Handshake => &self.handshakes,
            Slot::RequestStream => &self.request_streams,
            Slot::Handler => &self.handlers,
        }
    }

    pub(crate) fn hold(self: &Arc<Self>, slot: Slot) -> OwnedSlot {
        self.gauge(slot).add(1);
        OwnedSlot {
            holdings: self.clone(),
            slot,
        }
    }

    /// Counts one more connection of `peer`, unless it already holds `max`.
    pub(crate) fn connect(self: &Arc<Self>, peer: NodeId, max: u32) -> Option<PeerConnection> {
        let mut per_peer = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        let n = per_peer.entry(peer).or_insert(0);
        if *n >= max.max(1) {
            self.connections_over_limit.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *n += 1;
        self.connections.add(1);
        Some(PeerConnection {
            holdings: self.clone(),
            peer,
        })
    }

    pub(crate) fn stats(&self) -> LimitStats {
        let level = |g: &Gauge| Level {
            now: g.now(),
            peak: g.peak(),
        };
        let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
        LimitStats {
            handshakes_in_flight: level(&self.handshakes),
            handshakes_refused: count(&self.handshakes_refused),
            handshakes_retried: count(&self.handshakes_retried),
            connections_open: level(&self.connections),
            connections_over_limit: count(&self.connections_over_limit),
            request_streams_open: level(&self.request_streams),
            frames_timed_out: count(&self.frames_timed_out),
            handlers_timed_out: count(&self.handlers_timed_out),
            handlers_running: level(&self.handlers),
            partial_frame_bytes: level(&self.partial_frames),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_are_accepted_then_retried_then_refused() {
        use HandshakeDecision::*;
        assert_eq!(handshake_decision(0, 64, false), Accept);
        assert_eq!(handshake_decision(31, 64, false), Accept);
        assert_eq!(handshake_decision(32, 64, false), Retry);
        assert_eq!(handshake_decision(32, 64, true), Accept);
        assert_eq!(handshake_decision(63, 64, true), Accept);
        assert_eq!(handshake_decision(64, 64, true), Refuse);
        assert_eq!(handshake_decision(64, 64, false), Refuse);
        // A cap of 0 would refuse every member: it means 1.
        assert_eq!(handshake_decision(0, 0, true), Accept);
    }

    #[test]
    fn a_frame_buffer_grows_with_its_bytes_not_its_claim() {
        let claimed = 16 << 20;
        assert_eq!(GrowthPlan::first(claimed), FRAME_FIRST_ALLOCATION);
        assert_eq!(GrowthPlan::first(100), 100);
        let mut cap = GrowthPlan::first(claimed);
        let mut steps = 0;
        while cap < claimed {
            let next = GrowthPlan::next(cap, claimed);
            assert!(next <= 2 * cap && next > cap);
            cap = next;
            steps += 1;
        }
        assert_eq!(cap, claimed);
        assert_eq!(steps, 8);
    }

    #[test]
    fn a_gauge_remembers_its_peak() {
        let g = Gauge::default();
        {
            let _a = Held::new(&g, 3);
            let mut b = Held::new(&g, 2);
            b.set(10);
            assert_eq!(g.now(), 13);
            b.set(1);
        }
        assert_eq!((g.now(), g.peak()), (0, 13));
    }

    #[test]
    fn a_node_holds_at_most_its_connection_limit_of_each_peer() {
        let h = Arc::new(Holdings::default());
        let a: Vec<_> = (0..3).filter_map(|_| h.connect(7, 3)).collect();
        assert_eq!(a.len(), 3);
        assert!(h.connect(7, 3).is_none());
        let other = h.connect(8, 3);
        assert!(other.is_some());
        drop(a);
        assert!(h.connect(7, 3).is_some());
        let s = h.stats();
        assert_eq!(s.connections_over_limit, 1);
        assert_eq!(s.connections_open.peak, 4);
    }
}
