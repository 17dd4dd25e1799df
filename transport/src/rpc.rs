//! `RpcNode`: a node's presence on the cluster networks. It owns one QUIC endpoint per
//! local address, accepts connections from cluster members (mutual TLS, then hello),
//! serves registered services, and dials peers for requests and one-way messages.
//! Page streams (`stream/`) ride on the same endpoints and identities.
//!
//! Outgoing RPC connections are cached per (peer, address) and replaced when they die;
//! incoming connections each get a task that serves their streams. A peer that breaks
//! the protocol loses that one connection; every other peer keeps being served.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use quinn::{Connection, RecvStream, SendStream};
use rustls::pki_types::CertificateDer;

use crate::config::{common_prefix_len, NetworkConfig};
use crate::endpoint::{self, LocalEndpoint};
use crate::error::{RpcError, TransportError};
use crate::framing::{connection_error, expect_frame, read_frame, write_bytes, FrameError};
use crate::identity::{node_server_name, tls_configs, verify_cert_names_node, NodeCredentials};
use crate::protocol::{
    decode_hello, decode_hello_ok, decode_request, decode_response, encode_hello, encode_hello_ok,
    encode_request, encode_response, CloseCode, Hello, HelloOk, ProtocolError, Purpose,
    ResponseBody, Tag, FRAME_HEADER_LEN, MAX_CONTROL_FRAME, VERSION,
};
use crate::stream::receiver::{serve_path, ReceiverShared};
use crate::NodeId;

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
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    protocol_errors: AtomicU64,
    requests: AtomicU64,
    messages: AtomicU64,
}

/// A cached outgoing connection to one peer address.
#[derive(Default)]
struct ConnSlot {
    conn: tokio::sync::Mutex<Option<Connection>>,
    /// Last time connecting or a request on this address failed: such addresses are
    /// tried after the others.
    failed_at: Mutex<Option<Instant>>,
}

const RECENT_FAILURE: Duration = Duration::from_secs(2);
const MAX_REFUSALS_KEPT: usize = 32;

/// One cluster node's transport. See the module docs.
pub struct RpcNode {
    node_id: NodeId,
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
        let tls = tls_configs(&creds)?;
        let endpoints = listen
            .iter()
            .map(|addr| endpoint::bind(*addr, &cfg, &tls))
            .collect::<Result<Vec<_>, _>>()?;
        let node = Arc::new(RpcNode {
            node_id: creds.node_id,
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
        });
        for ep in endpoints {
            let weak = Arc::downgrade(&node);
            let task = tokio::spawn(accept_loop(weak, ep.endpoint));
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

    pub fn stats(&self) -> NodeStats {
        let c = &self.counters;
        NodeStats {
            connections_accepted: c.accepted.load(Ordering::Relaxed),
            connections_refused: c.refused.load(Ordering::Relaxed),
            protocol_errors: c.protocol_errors.load(Ordering::Relaxed),
            requests_served: c.requests.load(Ordering::Relaxed),
            messages_received: c.messages.load(Ordering::Relaxed),
        }
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

    /// Sends `request` to `service` on `peer` and waits for the answer.
    ///
    /// `addrs` are the peer's addresses, one per network, in order of preference;
    /// addresses that failed recently are tried last. Connecting to each address gets
    /// a share of `timeout`, so one dead network cannot use it all up. Once a request is
    /// written it is not sent again on another network (at most once); a failure after
    /// that point is returned.
    pub async fn call(
        &self,
        peer: NodeId,
        addrs: &[SocketAddr],
        service: &'static str,
        request: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, RpcError> {
        let frame = self.request_frame(Tag::Request, service, &request)?;
        let deadline = tokio::time::Instant::now() + timeout;
        match tokio::time::timeout_at(deadline, self.call_inner(peer, addrs, &frame, deadline))
            .await
        {
            Ok(r) => r,
            Err(_) => Err(RpcError::Timeout(timeout)),
        }
    }

    /// Sends a one-way `message`. Returns once it is handed to QUIC on a live
    /// connection; delivery is not confirmed.
    pub async fn send(
        &self,
        peer: NodeId,
        addrs: &[SocketAddr],
        service: &'static str,
        message: Vec<u8>,
    ) -> Result<(), RpcError> {
        let frame = self.request_frame(Tag::Message, service, &message)?;
        let timeout = self.cfg.connect_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let fut = async {
            let mut last = None;
            let order = self.ordered(peer, addrs);
            let n = order.len();
            for (i, addr) in order.into_iter().enumerate() {
                let conn = match self.connect_within(peer, addr, deadline, n - i).await {
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

    fn request_frame(&self, tag: Tag, service: &str, payload: &[u8]) -> Result<Vec<u8>, RpcError> {
        if self.shut.load(Ordering::Acquire) {
            return Err(RpcError::Shutdown);
        }
        let frame =
            encode_request(tag, service, payload).map_err(|e| RpcError::Protocol(e.to_string()))?;
        let len = frame.len() - FRAME_HEADER_LEN + 1;
        if len > self.cfg.max_frame_bytes as usize {
            return Err(RpcError::FrameTooLarge(format!(
                "request of {len} bytes exceeds the maximum of {} bytes",
                self.cfg.max_frame_bytes
            )));
        }
        Ok(frame)
    }

    async fn call_inner(
        &self,
        peer: NodeId,
        addrs: &[SocketAddr],
        frame: &[u8],
        deadline: tokio::time::Instant,
    ) -> Result<Vec<u8>, RpcError> {
        let mut last = None;
        let order = self.ordered(peer, addrs);
        let n = order.len();
        for (i, addr) in order.into_iter().enumerate() {
            let conn = match self.connect_within(peer, addr, deadline, n - i).await {
                Ok(c) => c,
                Err(e) if e.is_permanent() => return Err(e),
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            let opened = async {
                let (mut send, recv) = conn
                    .open_bi()
                    .await
                    .map_err(|e| connection_error(&e, peer))?;
                write_bytes(&mut send, frame)
                    .await
                    .map_err(|e| e.into_rpc(peer))?;
                send.finish().map_err(|e| RpcError::Closed(e.to_string()))?;
                Ok::<_, RpcError>(recv)
            };
            let mut recv = match opened.await {
                Ok(r) => r,
                Err(e) => {
                    // Nothing reached the peer: another network may still work.
                    self.forget(peer, addr, &conn);
                    last = Some(e);
                    continue;
                }
            };
            let answer = tokio::time::timeout_at(
                deadline,
                expect_frame(
                    &mut recv,
                    self.cfg.max_frame_bytes,
                    Tag::Response,
                    "response",
                ),
            )
            .await;
            let body = match answer {
                Ok(Ok(body)) => body,
                Ok(Err(e)) => {
                    if let FrameError::Protocol(p) = &e {
                        conn.close(p.close_code().to_varint(), p.to_string().as_bytes());
                    }
                    self.forget(peer, addr, &conn);
                    return Err(e.into_rpc(peer));
                }
                Err(_) => {
                    // A dead peer looks like a slow one until the idle timeout; do not
                    // reuse this connection for the next call.
                    self.forget(peer, addr, &conn);
                    return Err(RpcError::Timeout(
                        deadline.saturating_duration_since(tokio::time::Instant::now()),
                    ));
                }
            };
            return match decode_response(body) {
                Ok(ResponseBody::Ok(v)) => Ok(v),
                Ok(ResponseBody::HandlerError(s)) => Err(RpcError::Remote(s)),
                Ok(ResponseBody::UnknownService(s)) => Err(RpcError::UnknownService(s)),
                Err(p) => {
                    conn.close(p.close_code().to_varint(), p.to_string().as_bytes());
                    self.forget(peer, addr, &conn);
                    Err(RpcError::Protocol(p.to_string()))
                }
            };
        }
        Err(last.unwrap_or_else(|| no_address(peer)))
    }

    /// `addrs` with recently failed ones moved to the back.
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

    /// Drops `conn` from the cache (if it is still the cached one) and marks the
    /// address as recently failed.
    fn forget(&self, peer: NodeId, addr: SocketAddr, conn: &Connection) {
        let slot = self.slot(peer, addr);
        *lock(&slot.failed_at) = Some(Instant::now());
        let guard = slot.conn.try_lock();
        if let Ok(mut cached) = guard {
            if cached
                .as_ref()
                .is_some_and(|c| c.stable_id() == conn.stable_id())
            {
                *cached = None;
            }
        }
    }

    /// A live cached connection, or a new one, within a fair share of the time left.
    async fn connect_within(
        &self,
        peer: NodeId,
        addr: SocketAddr,
        deadline: tokio::time::Instant,
        addrs_left: usize,
    ) -> Result<Connection, RpcError> {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let share = left / addrs_left.max(1) as u32;
        let slot = self.slot(peer, addr);
        let result = tokio::time::timeout(share, async {
            let mut cached = slot.conn.lock().await;
            if let Some(c) = cached.as_ref() {
                if c.close_reason().is_none() {
                    return Ok(c.clone());
                }
            }
            *cached = None;
            let (conn, mut send, _recv) = self
                .open_connection(peer, addr, Purpose::Rpc, false)
                .await?;
            let _ = send.finish();
            *cached = Some(conn.clone());
            Ok(conn)
        })
        .await
        .unwrap_or_else(|_| {
            Err(RpcError::Unreachable {
                peer,
                reason: format!("no connection to {addr} within {share:?}"),
            })
        });
        if result.is_err() {
            *lock(&slot.failed_at) = Some(Instant::now());
        }
        result
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
    /// hello stream (still open: page-stream paths use it as their control channel).
    pub(crate) async fn open_connection(
        &self,
        peer: NodeId,
        addr: SocketAddr,
        purpose: Purpose,
        page_stream: bool,
    ) -> Result<(Connection, SendStream, RecvStream), RpcError> {
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
            version: VERSION,
            node_id: self.node_id,
            purpose,
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
            Ok((conn, send, recv))
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

fn no_address(peer: NodeId) -> RpcError {
    RpcError::Unreachable {
        peer,
        reason: "no address given".into(),
    }
}

async fn accept_loop(node: Weak<RpcNode>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        if node.strong_count() == 0 {
            incoming.refuse();
            break;
        }
        tokio::spawn(serve_connection(node.clone(), incoming));
    }
}

/// Closes `conn` because the peer broke the protocol.
fn protocol_violation(node: &Weak<RpcNode>, conn: &Connection, peer: &str, e: &ProtocolError) {
    let reason = e.to_string();
    if let Some(n) = node.upgrade() {
        n.note_refusal(
            true,
            format!(
                "closing connection from {peer} ({}): {reason}",
                conn.remote_address()
            ),
        );
    }
    conn.close(e.close_code().to_varint(), reason.as_bytes());
}

fn refuse(node: &Weak<RpcNode>, conn: &Connection, code: CloseCode, reason: String) {
    if let Some(n) = node.upgrade() {
        n.note_refusal(
            false,
            format!(
                "refused connection from {}: {reason}",
                conn.remote_address()
            ),
        );
    }
    conn.close(code.to_varint(), reason.as_bytes());
}

fn peer_certificate(conn: &Connection) -> Option<CertificateDer<'static>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?
        .into_iter()
        .next()
}

async fn serve_connection(node: Weak<RpcNode>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let Some(cfg) = node.upgrade().map(|n| n.cfg.clone()) else {
        return;
    };
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            if let Some(n) = node.upgrade() {
                n.note_refusal(false, format!("handshake from {remote} failed: {e}"));
            }
            return;
        }
    };
    let hello = tokio::time::timeout(cfg.connect_timeout, async {
        let (send, mut recv) = conn.accept_bi().await.map_err(FrameError::Connection)?;
        let body = expect_frame(&mut recv, MAX_CONTROL_FRAME, Tag::Hello, "hello").await?;
        let hello = decode_hello(&body).map_err(FrameError::Protocol)?;
        Ok::<_, FrameError>((hello, send, recv))
    })
    .await;
    let (hello, mut send, recv) = match hello {
        Ok(Ok(h)) => h,
        Ok(Err(FrameError::Protocol(p))) => {
            refuse(&node, &conn, p.close_code(), format!("bad hello: {p}"));
            return;
        }
        Ok(Err(e)) => {
            if let Some(n) = node.upgrade() {
                n.note_refusal(
                    false,
                    format!("connection from {remote} lost before its hello: {e:?}"),
                );
            }
            return;
        }
        Err(_) => {
            refuse(
                &node,
                &conn,
                CloseCode::Protocol,
                format!("no hello within {:?}", cfg.connect_timeout),
            );
            return;
        }
    };
    let peer = hello.node_id;
    let identity = match peer_certificate(&conn) {
        Some(cert) => verify_cert_names_node(&cert, peer).map_err(|e| e.to_string()),
        None => Err("no client certificate".to_string()),
    };
    if let Err(reason) = identity {
        refuse(
            &node,
            &conn,
            CloseCode::PeerIdentity,
            format!("claims to be node {peer}: {reason}"),
        );
        return;
    }
    let Some(me) = node.upgrade() else {
        return;
    };
    let my_id = me.node_id;
    match hello.purpose {
        Purpose::Rpc => {
            drop(me);
            if write_bytes(&mut send, &encode_hello_ok(&HelloOk { node_id: my_id }))
                .await
                .is_err()
            {
                return;
            }
            let _ = send.finish();
            if let Some(n) = node.upgrade() {
                n.counters.accepted.fetch_add(1, Ordering::Relaxed);
            }
            serve_rpc(node, conn, peer, cfg.max_frame_bytes).await;
        }
        Purpose::PageStream { stream_id, path } => {
            let receiver = lock(&me.receivers).get(&stream_id).cloned();
            drop(me);
            let Some(receiver) = receiver else {
                refuse(
                    &node,
                    &conn,
                    CloseCode::UnknownStream,
                    format!("node {my_id} expects no page stream {stream_id}"),
                );
                return;
            };
            if receiver.expected_peer() != peer {
                refuse(
                    &node,
                    &conn,
                    CloseCode::PeerIdentity,
                    format!(
                        "page stream {stream_id} comes from node {}, not node {peer}",
                        receiver.expected_peer()
                    ),
                );
                return;
            }
            if write_bytes(&mut send, &encode_hello_ok(&HelloOk { node_id: my_id }))
                .await
                .is_err()
            {
                return;
            }
            if let Some(n) = node.upgrade() {
                n.counters.accepted.fetch_add(1, Ordering::Relaxed);
            }
            let on_violation = {
                let node = node.clone();
                move |conn: &Connection, e: &ProtocolError| {
                    protocol_violation(&node, conn, &format!("node {peer}"), e)
                }
            };
            serve_path(
                receiver,
                conn,
                send,
                recv,
                path,
                cfg.max_frame_bytes,
                on_violation,
            )
            .await;
        }
    }
}

async fn serve_rpc(node: Weak<RpcNode>, conn: Connection, peer: NodeId, max_frame: u32) {
    loop {
        tokio::select! {
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => {
                    tokio::spawn(serve_request(node.clone(), conn.clone(), peer, send, recv, max_frame));
                }
                Err(_) => break,
            },
            uni = conn.accept_uni() => match uni {
                Ok(recv) => {
                    tokio::spawn(serve_message(node.clone(), conn.clone(), peer, recv, max_frame));
                }
                Err(_) => break,
            },
        }
    }
}

/// Reads the single request/message frame of a stream; closes the connection on a
/// protocol violation.
async fn read_request(
    node: &Weak<RpcNode>,
    conn: &Connection,
    peer: NodeId,
    recv: &mut RecvStream,
    max_frame: u32,
    tag: Tag,
) -> Option<(String, Vec<u8>)> {
    let what = if tag == Tag::Request {
        "request"
    } else {
        "message"
    };
    let result = match read_frame(recv, max_frame).await {
        Ok(Some((t, body))) if t == tag => decode_request(body).map_err(FrameError::Protocol),
        Ok(Some((t, _))) => Err(FrameError::Protocol(ProtocolError::Unexpected {
            got: t,
            expected: what,
        })),
        Ok(None) => Err(FrameError::Protocol(ProtocolError::Malformed(format!(
            "empty {what} stream"
        )))),
        Err(e) => Err(e),
    };
    match result {
        Ok(r) => Some(r),
        Err(FrameError::Protocol(p)) => {
            protocol_violation(node, conn, &format!("node {peer}"), &p);
            None
        }
        Err(_) => None,
    }
}

fn handler(node: &Weak<RpcNode>, service: &str) -> Option<Arc<dyn RpcHandler>> {
    let n = node.upgrade()?;
    let h = n.handlers.read().unwrap_or_else(|e| e.into_inner());
    h.get(service).cloned()
}

async fn serve_request(
    node: Weak<RpcNode>,
    conn: Connection,
    peer: NodeId,
    mut send: SendStream,
    mut recv: RecvStream,
    max_frame: u32,
) {
    let Some((service, payload)) =
        read_request(&node, &conn, peer, &mut recv, max_frame, Tag::Request).await
    else {
        return;
    };
    let response = match handler(&node, &service) {
        None => ResponseBody::UnknownService(service),
        Some(h) => match h.handle(peer, payload).await {
            Ok(v) => ResponseBody::Ok(v),
            Err(e) => ResponseBody::HandlerError(e),
        },
    };
    let mut frame = encode_response(&response);
    if frame.len() - FRAME_HEADER_LEN + 1 > max_frame as usize {
        frame = encode_response(&ResponseBody::HandlerError(format!(
            "response of {} bytes exceeds the maximum frame of {max_frame} bytes",
            frame.len()
        )));
    }
    if let Some(n) = node.upgrade() {
        n.counters.requests.fetch_add(1, Ordering::Relaxed);
    }
    if write_bytes(&mut send, &frame).await.is_ok() {
        let _ = send.finish();
    }
}

async fn serve_message(
    node: Weak<RpcNode>,
    conn: Connection,
    peer: NodeId,
    mut recv: RecvStream,
    max_frame: u32,
) {
    let Some((service, payload)) =
        read_request(&node, &conn, peer, &mut recv, max_frame, Tag::Message).await
    else {
        return;
    };
    if let Some(n) = node.upgrade() {
        n.counters.messages.fetch_add(1, Ordering::Relaxed);
    }
    match handler(&node, &service) {
        None => tracing::debug!(
            peer,
            service,
            "one-way message for an unknown service dropped"
        ),
        Some(h) => {
            if let Err(e) = h.handle(peer, payload).await {
                tracing::debug!(peer, service, error = %e, "one-way message handler failed");
            }
        }
    }
}
