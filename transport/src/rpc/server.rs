//! The serving side: accepts cluster members' connections (mutual TLS, then hello),
//! serves requests and one-way messages, and hands page-stream paths to their
//! receivers. A peer that breaks the protocol loses that one connection; every other
//! peer keeps being served.
//!
//! A request runs in its own task and its answer is kept (`replies`), so a copy of it
//! that arrives on another network — the caller failing over or hedging — gets the same
//! answer without running the handler again, and a caller that gives up on one path
//! does not cancel a handler whose answer the other path is waiting for.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use quinn::{Connection, RecvStream, SendStream};
use rustls::pki_types::CertificateDer;

use super::replies::Arrival;
use super::{lock, RpcHandler, RpcNode};
use crate::framing::{expect_frame, read_frame_counted, write_bytes, FrameDeadline, FrameError};
use crate::identity::verify_cert_names_node;
use crate::limits::{handshake_decision, HandshakeDecision, Holdings, OwnedSlot, Slot};
use crate::protocol::{
    accept_hello, decode_hello, decode_request, encode_hello_ok, encode_response, CloseCode, Hello,
    HelloOk, ProtocolError, Purpose, RequestFrame, ResponseBody, Tag, Versions, FRAME_HEADER_LEN,
    MAGIC, MAX_CONTROL_FRAME,
};
use crate::stream::receiver::{serve_path, PathHello, PathLimits};
use crate::NodeId;

pub(super) async fn accept_loop(node: Weak<RpcNode>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let Some(me) = node.upgrade() else {
            incoming.refuse();
            break;
        };
        let holdings = me.holdings.clone();
        let max = me.cfg.limits.max_handshakes;
        drop(me);
        // Decided before any cryptography or task: past the cap, a stranger costs
        // this node one packet.
        match handshake_decision(
            holdings.handshakes.now(),
            max,
            incoming.remote_address_validated(),
        ) {
            HandshakeDecision::Refuse => {
                holdings.handshakes_refused.fetch_add(1, Ordering::Relaxed);
                incoming.refuse();
            }
            HandshakeDecision::Retry => {
                holdings.handshakes_retried.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
            }
            HandshakeDecision::Accept => {
                let slot = holdings.hold(Slot::Handshake);
                tokio::spawn(serve_connection(node.clone(), incoming, slot));
            }
        }
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

/// How a build from before version ranges took a hello (tests only, see
/// `NetworkConfig::hello_without_range`): its one version in the fixed field, checked
/// first, then the rest with no byte after it.
fn accept_hello_without_range(body: &[u8], ours: Versions) -> Result<(Hello, u16), ProtocolError> {
    if body.len() >= 6 && body[..4] == MAGIC {
        let theirs = u16::from_le_bytes([body[4], body[5]]);
        if theirs != ours.max {
            return Err(ProtocolError::VersionMismatch {
                ours,
                theirs: Versions::only(theirs),
            });
        }
    }
    let hello = decode_hello(body)?;
    if hello.min_version.is_some() {
        return Err(ProtocolError::Malformed("hello: 2 trailing bytes".into()));
    }
    Ok((hello, ours.max))
}

fn peer_certificate(conn: &Connection) -> Option<CertificateDer<'static>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?
        .into_iter()
        .next()
}

async fn serve_connection(node: Weak<RpcNode>, incoming: quinn::Incoming, handshake: OwnedSlot) {
    let remote = incoming.remote_address();
    let Some((cfg, holdings)) = node.upgrade().map(|n| (n.cfg.clone(), n.holdings.clone())) else {
        return;
    };
    // One deadline for the TLS handshake and the hello together: a stranger that
    // never finishes gives its handshake slot back by then.
    let deadline = tokio::time::Instant::now() + cfg.connect_timeout;
    let conn = match tokio::time::timeout_at(deadline, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            if let Some(n) = node.upgrade() {
                n.note_refusal(false, format!("handshake from {remote} failed: {e}"));
            }
            return;
        }
        Err(_) => {
            if let Some(n) = node.upgrade() {
                n.note_refusal(
                    false,
                    format!(
                        "handshake from {remote} not done within {:?}",
                        cfg.connect_timeout
                    ),
                );
            }
            return;
        }
    };
    let hello = tokio::time::timeout_at(deadline, async {
        let (send, mut recv) = conn.accept_bi().await.map_err(FrameError::Connection)?;
        let body = expect_frame(&mut recv, MAX_CONTROL_FRAME, Tag::Hello, "hello").await?;
        let hello = if cfg.hello_without_range {
            accept_hello_without_range(&body, cfg.wire_versions())
        } else {
            accept_hello(&body, cfg.wire_versions())
        };
        let hello = hello.map_err(FrameError::Protocol)?;
        Ok::<_, FrameError>((hello, send, recv))
    })
    .await;
    let ((hello, version), mut send, recv) = match hello {
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
    drop(handshake);
    let max_conns = cfg.limits.max_connections_per_peer;
    let Some(_counted) = holdings.connect(peer, max_conns) else {
        refuse(
            &node,
            &conn,
            CloseCode::TooManyConnections,
            format!(
                "node {peer} already holds {max_conns} connections to this node, the most one node may"
            ),
        );
        return;
    };
    let Some(me) = node.upgrade() else {
        return;
    };
    me.note_incoming(peer, &conn);
    let my_id = me.node_id;
    // A client that sent a range learns the version chosen; one that sent a single
    // version (a build from before ranges) gets the answer it knows, and speaks it.
    let hello_ok = encode_hello_ok(&HelloOk {
        node_id: my_id,
        version: hello.min_version.map(|_| version),
    });
    match hello.purpose {
        Purpose::Rpc => {
            drop(me);
            if write_bytes(&mut send, &hello_ok).await.is_err() {
                return;
            }
            let _ = send.finish();
            if let Some(n) = node.upgrade() {
                n.counters.accepted.fetch_add(1, Ordering::Relaxed);
            }
            serve_rpc(node, conn, peer, cfg.max_frame_bytes, holdings).await;
        }
        Purpose::PageStream { stream_id, path } => {
            if let Err(reason) = me.admit(peer, super::PAGE_STREAM_SERVICE, &[]) {
                drop(me);
                refuse(&node, &conn, CloseCode::PeerIdentity, reason);
                return;
            }
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
            if write_bytes(&mut send, &hello_ok).await.is_err() {
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
                PathHello {
                    path,
                    wire_version: version,
                },
                PathLimits {
                    max_frame: cfg.max_frame_bytes,
                    deadline: FrameDeadline {
                        after: cfg.limits.frame_deadline,
                        holdings,
                    },
                },
                on_violation,
            )
            .await;
        }
    }
}

async fn serve_rpc(
    node: Weak<RpcNode>,
    conn: Connection,
    peer: NodeId,
    max_frame: u32,
    holdings: Arc<Holdings>,
) {
    // quinn lets the peer open at most `max_concurrent_requests` streams of each
    // kind at once; each is counted while its task runs.
    loop {
        tokio::select! {
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => {
                    let slot = holdings.hold(Slot::RequestStream);
                    tokio::spawn(serve_request(node.clone(), conn.clone(), peer, send, recv, max_frame, slot));
                }
                Err(_) => break,
            },
            uni = conn.accept_uni() => match uni {
                Ok(recv) => {
                    let slot = holdings.hold(Slot::RequestStream);
                    tokio::spawn(serve_message(node.clone(), conn.clone(), peer, recv, max_frame, slot));
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
) -> Option<RequestFrame> {
    let what = if tag == Tag::Request {
        "request"
    } else {
        "message"
    };
    let deadline = node.upgrade()?.frame_deadline();
    // A request stream exists only to carry its frame: the deadline runs from the
    // stream's opening.
    let read = read_frame_counted(recv, max_frame, Some(&deadline.holdings.partial_frames));
    let Some(read) = deadline.run(read).await else {
        // Idle or trickling: the stream gives its slot back, the connection lives.
        let _ = recv.stop(CloseCode::Cancelled.to_varint());
        tracing::debug!(
            peer,
            "{what} frame not received within {:?}: stream stopped",
            deadline.after
        );
        return None;
    };
    let result = match read {
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
    _slot: OwnedSlot,
) {
    let Some(req) = read_request(&node, &conn, peer, &mut recv, max_frame, Tag::Request).await
    else {
        let _ = send.reset(CloseCode::Cancelled.to_varint());
        return;
    };
    let Some(me) = node.upgrade() else {
        return;
    };
    // The gate comes first: a caller that may not use the service learns why,
    // and nothing of its request runs or is kept.
    if let Err(reason) = me.admit(peer, &req.service, &req.payload) {
        drop(me);
        let frame = encode_response(&ResponseBody::HandlerError(format!("refused: {reason}")));
        if write_bytes(&mut send, &frame).await.is_ok() {
            let _ = send.finish();
        }
        return;
    }
    let key = (peer, req.id);
    let arrival = lock(&me.replies).arrive(key, Instant::now());
    let mut answer = match arrival {
        Arrival::Duplicate(answer) => answer,
        Arrival::Run(answer) => {
            let handler = handler(&node, &req.service);
            let weak = node.clone();
            let deadline = me.cfg.limits.handler_deadline;
            tokio::spawn(async move {
                let response = match handler {
                    None => ResponseBody::UnknownService(req.service),
                    Some(h) => {
                        match run_handler(&weak, &*h, peer, &req.service, req.payload, deadline)
                            .await
                        {
                            Ok(v) => ResponseBody::Ok(v),
                            Err(e) => ResponseBody::HandlerError(e),
                        }
                    }
                };
                if let Some(n) = weak.upgrade() {
                    n.counters.requests.fetch_add(1, Ordering::Relaxed);
                    lock(&n.replies).finish(key, &response);
                }
            });
            answer
        }
    };
    drop(me);
    let response = loop {
        if let Some(r) = answer.borrow_and_update().clone() {
            break r;
        }
        if answer.changed().await.is_err() {
            // Pushed out of the cache before it finished (only under a flood of
            // requests): the caller's other copy, or its retry, gets the answer.
            return;
        }
    };
    let mut frame = encode_response(&response);
    if frame.len() - FRAME_HEADER_LEN + 1 > max_frame as usize {
        frame = encode_response(&ResponseBody::HandlerError(format!(
            "response of {} bytes exceeds the maximum frame of {max_frame} bytes",
            frame.len()
        )));
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
    _slot: OwnedSlot,
) {
    let Some(RequestFrame {
        service, payload, ..
    }) = read_request(&node, &conn, peer, &mut recv, max_frame, Tag::Message).await
    else {
        return;
    };
    if let Some(n) = node.upgrade() {
        n.counters.messages.fetch_add(1, Ordering::Relaxed);
        if let Err(reason) = n.admit(peer, &service, &payload) {
            tracing::debug!(peer, service, "one-way message refused: {reason}");
            return;
        }
    }
    match handler(&node, &service) {
        None => tracing::debug!(
            peer,
            service,
            "one-way message for an unknown service dropped"
        ),
        Some(h) => {
            let Some(deadline) = node.upgrade().map(|n| n.cfg.limits.handler_deadline) else {
                return;
            };
            if let Err(e) = run_handler(&node, &*h, peer, &service, payload, deadline).await {
                tracing::debug!(peer, service, error = %e, "one-way message handler failed");
            }
        }
    }
}

/// Runs a handler, giving up on it (and its task) at `deadline`.
async fn run_handler(
    node: &Weak<RpcNode>,
    h: &dyn RpcHandler,
    peer: NodeId,
    service: &str,
    payload: Vec<u8>,
    deadline: std::time::Duration,
) -> Result<Vec<u8>, String> {
    // Counted while it runs, so the node's gauges show handlers a peer holds.
    let _running = node.upgrade().map(|n| n.holdings.hold(Slot::Handler));
    match tokio::time::timeout(deadline, h.handle(peer, payload)).await {
        Ok(r) => r,
        Err(_) => {
            if let Some(n) = node.upgrade() {
                n.holdings
                    .handlers_timed_out
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(format!(
                "the {service} handler did not answer within its deadline of {deadline:?}"
            ))
        }
    }
}
