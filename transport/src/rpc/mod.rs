//! `RpcNode`: a node's presence on the cluster networks. It owns one QUIC endpoint per
//! local address (one per network), serves registered services (`server`), and calls
//! peers over whichever of their networks answers (`client`). Page streams (`stream/`)
//! ride on the same endpoints and identities.
//!
//! Every request is safe to send more than once: the caller gives it an id, the
//! receiver runs it once per id (`replies`). That is what lets a call move to another
//! network the moment its path dies or stalls, whatever the request does.

mod client;
mod replies;
mod server;

pub use client::CallOptions;

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream};

use crate::config::{common_prefix_len, NetworkConfig};
use crate::endpoint::{self, LocalEndpoint};
use crate::error::{RpcError, TransportError};
use crate::framing::{connection_error, expect_frame, write_bytes};
use crate::identity::{node_server_name, tls_configs_revoking, NodeCredentials};
use crate::protocol::{
    decode_hello_ok, encode_hello, negotiated_version, CloseCode, Hello, Purpose, Tag, Versions,
    MAX_CONTROL_FRAME,
};
use crate::stream::receiver::ReceiverShared;
use crate::NodeId;
use client::ConnSlot;
use replies::ReplyCache;

/// A service's request handler. `from` is the caller's node id, verified against its
/// certificate. An `Err` travels back to the caller as [`RpcError::Remote`].
pub trait RpcHandler: Send + Sync + 'static {
    fn handle(
        &self,
        from: NodeId,
        request: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + '_>>;
}

/// Wraps an async closure as a handler:
/// `node.register("echo", handler_fn(|_from, req| async move { Ok(req) }))`.
pub fn handler_fn<F, Fut>(f: F) -> Arc<dyn RpcHandler>
where
    F: Fn(NodeId, Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, String>> + Send + 'static,
{
    struct FnHandler<F>(F);
    impl<F, Fut> RpcHandler for FnHandler<F>
    where
        F: Fn(NodeId, Vec<u8>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<u8>, String>> + Send + 'static,
    {
        fn handle(
            &self,
            from: NodeId,
            request: Vec<u8>,
        ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + '_>> {
            Box::pin((self.0)(from, request))
        }
    }
    Arc::new(FnHandler(f))
}

/// Who may call which service, asked before every request, one-way message
/// and page-stream path is served (the daemon answers from the cluster
/// store's membership). `request` is the request's payload (empty for a
/// page-stream path), for a gate that lets a stranger make one kind of
/// request only. `Err` is the refusal the caller reads.
pub trait Admission: Send + Sync + 'static {
    fn admit(&self, peer: NodeId, service: &str, request: &[u8]) -> Result<(), String>;
}

/// The service name [`Admission`] is asked about for a page-stream path.
pub const PAGE_STREAM_SERVICE: &str = "page-stream";

/// Counters of what a node accepted and refused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    pub connections_accepted: u64,
    /// Handshakes that failed and hellos that were refused.
    pub connections_refused: u64,
    /// Connections closed because the peer broke the protocol after its hello.
    pub protocol_errors: u64,
    pub requests_served: u64,
    pub messages_received: u64,
    /// Requests that arrived again (another path's copy) and were answered from the
    /// first run instead of running twice.
    pub duplicate_requests: u64,
    /// Calls that also went out on another path because the first was slow.
    pub calls_hedged: u64,
    /// Calls that went out on another path because the first one failed.
    pub calls_failed_over: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    protocol_errors: AtomicU64,
    requests: AtomicU64,
    messages: AtomicU64,
    hedged: AtomicU64,
    failed_over: AtomicU64,
}

const MAX_REFUSALS_KEPT: usize = 32;

/// One cluster node's transport. See the module docs.
pub struct RpcNode {
    node_id: NodeId,
    /// This node itself, for the tasks a call spawns.
    me: Weak<RpcNode>,
    /// Request ids start from a random point, so a restarted caller never reuses the
    /// ids its previous life sent.
    next_request: AtomicU64,
    replies: Mutex<ReplyCache>,
    cfg: NetworkConfig,
    endpoints: RwLock<Vec<LocalEndpoint>>,
    addrs: Vec<SocketAddr>,
    handlers: RwLock<HashMap<&'static str, Arc<dyn RpcHandler>>>,
    conns: Mutex<HashMap<(NodeId, SocketAddr), Arc<ConnSlot>>>,
    pub(crate) receivers: Mutex<HashMap<u64, Arc<ReceiverShared>>>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    shut: AtomicBool,
    counters: Counters,
    refusals: Mutex<VecDeque<String>>,
    /// Removed nodes whose certificates the handshake refuses.
    revoked: crate::revocation::RevocationList,
    admission: RwLock<Option<Arc<dyn Admission>>>,
    /// Connections peers opened to this node, so a removed peer's can be closed.
    incoming: Mutex<Vec<(NodeId, Connection)>>,
    /// What peers hold of this node now, against `cfg.limits`.
    holdings: Arc<crate::limits::Holdings>,
}

impl RpcNode {
    /// The time a frame from a peer has to arrive once begun, with the gauges
    /// that count the frames that missed it.
    pub(crate) fn frame_deadline(&self) -> crate::framing::FrameDeadline {
        crate::framing::FrameDeadline {
            after: self.cfg.limits.frame_deadline,
            holdings: self.holdings.clone(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RpcNode {
    /// Binds one endpoint per address in `listen` (port 0 picks a free port; see
    /// [`local_addrs`](Self::local_addrs)) and starts accepting cluster members.
    pub async fn start(
        creds: NodeCredentials,
        listen: Vec<SocketAddr>,
        cfg: NetworkConfig,
    ) -> Result<Arc<RpcNode>, TransportError> {
        if listen.is_empty() {
            return Err(TransportError::NoAddresses);
        }
        cfg.validate().map_err(TransportError::Config)?;
        let revoked = crate::revocation::RevocationList::default();
        let tls = tls_configs_revoking(&creds, revoked.clone())?;
        let endpoints = listen
            .iter()
            .map(|addr| endpoint::bind(*addr, &cfg, &tls))
            .collect::<Result<Vec<_>, _>>()?;
        let node = Arc::new_cyclic(|me| RpcNode {
            node_id: creds.node_id,
            me: me.clone(),
            next_request: AtomicU64::new(RandomState::new().hash_one(creds.node_id)),
            replies: Mutex::new(ReplyCache::default()),
            addrs: endpoints.iter().map(|e| e.addr).collect(),
            cfg,
            endpoints: RwLock::new(endpoints.clone()),
            handlers: RwLock::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            receivers: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
            shut: AtomicBool::new(false),
            counters: Counters::default(),
            refusals: Mutex::new(VecDeque::new()),
            revoked,
            admission: RwLock::new(None),
            incoming: Mutex::new(Vec::new()),
            holdings: Arc::default(),
        });
        for ep in endpoints {
            let weak = Arc::downgrade(&node);
            let task = tokio::spawn(server::accept_loop(weak, ep.endpoint));
            lock(&node.tasks).push(task.abort_handle());
        }
        tracing::info!(node = node.node_id, addrs = ?node.addrs, "transport started");
        Ok(node)
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The bound addresses, one per network, in the order given to `start`.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.addrs.clone()
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.cfg
    }

    /// Serves `service` with `handler` from now on (replacing an earlier handler).
    pub fn register(&self, service: &'static str, handler: Arc<dyn RpcHandler>) {
        self.handlers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(service, handler);
    }

    /// Asks every request, message and page-stream path from now on whether
    /// its caller may use the service (replacing an earlier gate).
    pub fn set_admission(&self, admission: Arc<dyn Admission>) {
        *self.admission.write().unwrap_or_else(|e| e.into_inner()) = Some(admission);
    }

    /// What the gate says of `peer` calling `service` (no gate: yes).
    pub(crate) fn admit(&self, peer: NodeId, service: &str, request: &[u8]) -> Result<(), String> {
        let gate = self
            .admission
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match gate {
            Some(g) => g.admit(peer, service, request),
            None => Ok(()),
        }
    }

    /// The removed nodes whose certificates this node's handshakes refuse.
    pub fn revocations(&self) -> &crate::revocation::RevocationList {
        &self.revoked
    }

    /// Replaces the revocation list and closes every connection to or from a
    /// node on it: its certificate was checked when they opened.
    pub fn set_revoked(&self, revoked: std::collections::BTreeMap<NodeId, u64>) {
        let peers: Vec<NodeId> = revoked.keys().copied().collect();
        self.revoked.replace(revoked);
        for peer in peers {
            self.disconnect(
                peer,
                &format!(
                    "the certificate of node {peer} is revoked: the node was removed from the cluster"
                ),
            );
        }
    }

    /// Closes every connection to and from `peer` (new ones go through the
    /// handshake and the gate again).
    pub fn disconnect(&self, peer: NodeId, reason: &str) {
        let slots: Vec<Arc<ConnSlot>> = {
            let mut conns = lock(&self.conns);
            let keys: Vec<_> = conns.keys().filter(|(p, _)| *p == peer).copied().collect();
            keys.iter().filter_map(|k| conns.remove(k)).collect()
        };
        for slot in slots {
            slot.close(CloseCode::PeerIdentity, reason);
        }
        let mut incoming = lock(&self.incoming);
        incoming.retain(|(p, c)| {
            if *p == peer {
                c.close(CloseCode::PeerIdentity.to_varint(), reason.as_bytes());
                false
            } else {
                c.close_reason().is_none()
            }
        });
    }

    /// Remembers a connection `peer` opened (and forgets closed ones).
    pub(crate) fn note_incoming(&self, peer: NodeId, conn: &Connection) {
        let mut incoming = lock(&self.incoming);
        incoming.retain(|(_, c)| c.close_reason().is_none());
        incoming.push((peer, conn.clone()));
    }

    pub fn stats(&self) -> NodeStats {
        let c = &self.counters;
        NodeStats {
            connections_accepted: c.accepted.load(Ordering::Relaxed),
            connections_refused: c.refused.load(Ordering::Relaxed),
            protocol_errors: c.protocol_errors.load(Ordering::Relaxed),
            requests_served: c.requests.load(Ordering::Relaxed),
            messages_received: c.messages.load(Ordering::Relaxed),
            duplicate_requests: lock(&self.replies).duplicates(),
            calls_hedged: c.hedged.load(Ordering::Relaxed),
            calls_failed_over: c.failed_over.load(Ordering::Relaxed),
        }
    }

    /// What strangers and members make this node hold now, and the most they ever
    /// did (see [`crate::limits`]).
    pub fn limit_stats(&self) -> crate::limits::LimitStats {
        self.holdings.stats()
    }

    fn next_request_id(&self) -> u64 {
        self.next_request.fetch_add(1, Ordering::Relaxed)
    }

    /// Why recent connections were refused or closed for protocol errors, newest last.
    pub fn recent_refusals(&self) -> Vec<String> {
        lock(&self.refusals).iter().cloned().collect()
    }

    fn note_refusal(&self, protocol_error: bool, reason: String) {
        tracing::warn!(node = self.node_id, "{reason}");
        let counter = if protocol_error {
            &self.counters.protocol_errors
        } else {
            &self.counters.refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut r = lock(&self.refusals);
        if r.len() == MAX_REFUSALS_KEPT {
            r.pop_front();
        }
        r.push_back(reason);
    }

    /// The endpoint to dial `dst` from: the local address sharing the longest prefix
    /// with it, i.e. our address on the same network.
    pub(crate) fn endpoint_for(&self, dst: SocketAddr) -> Option<LocalEndpoint> {
        let eps = self.endpoints.read().unwrap_or_else(|e| e.into_inner());
        let mut best: Option<(&LocalEndpoint, u32)> = None;
        for e in eps.iter().filter(|e| e.addr.is_ipv4() == dst.is_ipv4()) {
            let len = common_prefix_len(e.addr.ip(), dst.ip());
            if best.is_none_or(|(_, b)| len > b) {
                best = Some((e, len));
            }
        }
        best.map(|(e, _)| e.clone())
    }

    /// Dials `peer` at `addr`, runs the hello, and returns the connection with the
    /// hello stream (still open: page-stream paths use it as their control channel)
    /// and the protocol version the two negotiated for it.
    pub(crate) async fn open_connection(
        &self,
        peer: NodeId,
        addr: SocketAddr,
        purpose: Purpose,
        page_stream: bool,
    ) -> Result<Handshake, RpcError> {
        let versions = self.cfg.wire_versions();
        let first = self.dial(peer, addr, &purpose, page_stream, versions).await;
        let retry: Vec<u16> = match &first {
            Err(_) if versions.min == versions.max => Vec::new(),
            // A build from before version ranges reads only the fixed field. Of the
            // same highest version, it refuses what follows the hello as trailing
            // bytes; of another, it refuses the version. Offer it the versions it
            // may speak one at a time, as it would have: one more handshake, and
            // only with such a peer, during an upgrade from it.
            Err(RpcError::Protocol(_)) => vec![versions.max],
            Err(RpcError::VersionMismatch(_)) => (versions.min..versions.max).rev().collect(),
            _ => Vec::new(),
        };
        for v in retry {
            let older = self
                .dial(peer, addr, &purpose, page_stream, Versions::only(v))
                .await;
            if older.is_ok() {
                return older;
            }
        }
        // The first refusal names both ranges when the peer knows ranges.
        first
    }

    /// One connection attempt whose hello offers `versions`.
    async fn dial(
        &self,
        peer: NodeId,
        addr: SocketAddr,
        purpose: &Purpose,
        page_stream: bool,
        versions: Versions,
    ) -> Result<Handshake, RpcError> {
        if self.shut.load(Ordering::Acquire) {
            return Err(RpcError::Shutdown);
        }
        let ep = self.endpoint_for(addr).ok_or(RpcError::Shutdown)?;
        let client = if page_stream {
            ep.stream_client
        } else {
            ep.rpc_client
        };
        let connecting = ep
            .endpoint
            .connect_with(client, addr, &node_server_name(peer))
            .map_err(|e| match e {
                quinn::ConnectError::EndpointStopping => RpcError::Shutdown,
                other => RpcError::Unreachable {
                    peer,
                    reason: other.to_string(),
                },
            })?;
        let hello = encode_hello(&Hello {
            version: versions.max,
            min_version: Some(versions.min),
            node_id: self.node_id,
            purpose: purpose.clone(),
        });
        let attempt = async {
            let conn = connecting.await.map_err(|e| connection_error(&e, peer))?;
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| connection_error(&e, peer))?;
            write_bytes(&mut send, &hello)
                .await
                .map_err(|e| e.into_rpc(peer))?;
            // Quinn reports a refused client certificate only here, at the first stream
            // operation: until this answer arrives the connection is not up.
            let body = expect_frame(&mut recv, MAX_CONTROL_FRAME, Tag::HelloOk, "hello answer")
                .await
                .map_err(|e| e.into_rpc(peer))?;
            let ok = decode_hello_ok(&body).map_err(|e| RpcError::Protocol(e.to_string()))?;
            if ok.node_id != peer {
                return Err(RpcError::PeerIdentity(format!(
                    "expected node {peer}, {addr} answered as node {}",
                    ok.node_id
                )));
            }
            let version = negotiated_version(&ok, versions).map_err(|e| {
                conn.close(e.close_code().to_varint(), e.to_string().as_bytes());
                RpcError::Protocol(e.to_string())
            })?;
            Ok(Handshake {
                conn,
                send,
                recv,
                version,
            })
        };
        match tokio::time::timeout(self.cfg.connect_timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(RpcError::Unreachable {
                peer,
                reason: format!(
                    "no hello answer from {addr} within {:?}",
                    self.cfg.connect_timeout
                ),
            }),
        }
    }

    pub(crate) fn is_shut(&self) -> bool {
        self.shut.load(Ordering::Acquire)
    }

    /// Closes every endpoint and connection. Peers see this node as dead; the
    /// addresses are free again when this returns (after a short bounded drain).
    pub async fn shutdown(&self) {
        if self.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
        let receivers: Vec<_> = lock(&self.receivers).drain().map(|(_, r)| r).collect();
        for r in receivers {
            r.fail(crate::error::PageStreamError::Shutdown);
        }
        lock(&self.conns).clear();
        // A connection handle keeps its endpoint's socket bound.
        lock(&self.incoming).clear();
        let endpoints =
            std::mem::take(&mut *self.endpoints.write().unwrap_or_else(|e| e.into_inner()));
        for ep in &endpoints {
            ep.endpoint
                .close(CloseCode::Shutdown.to_varint(), b"node shutting down");
        }
        for ep in &endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(1), ep.endpoint.wait_idle()).await;
        }
        tracing::info!(node = self.node_id, "transport shut down");
    }
}

impl Drop for RpcNode {
    fn drop(&mut self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
        let eps = self.endpoints.read().unwrap_or_else(|e| e.into_inner());
        for ep in eps.iter() {
            ep.endpoint
                .close(CloseCode::Shutdown.to_varint(), b"node dropped");
        }
    }
}

/// A connection whose hello was answered.
pub(crate) struct Handshake {
    pub conn: Connection,
    /// The hello stream, still open (a page-stream path's control channel).
    pub send: SendStream,
    pub recv: RecvStream,
    /// The protocol version negotiated for this connection.
    pub version: u16,
}

fn no_address(peer: NodeId) -> RpcError {
    RpcError::Unreachable {
        peer,
        reason: "no address given".into(),
    }
}
