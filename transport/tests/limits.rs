//! What a stranger or a member can make a node hold is bounded (`ferry_transport::limits`):
//! a handshake flood, streams opened and left idle, a frame that claims 16 MiB and
//! trickles (on a request stream or a page-stream path, or as a page-stream target's
//! ack), handlers that never answer, and more connections than a node may hold. Each
//! test reads the node's gauges (their peaks cover the whole attack, so no bound
//! depends on when they are sampled) and most have a well-behaved member call the
//! node throughout.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{addr, pages, start_node, wait_until, CheckingSink};
use ferry_transport::identity::{client_config, node_server_name};
use ferry_transport::limits::FRAME_FIRST_ALLOCATION;
use ferry_transport::protocol::{
    decode_hello, encode_hello, encode_hello_ok, frame_header, parse_frame_header, CloseCode,
    Hello, HelloOk, Purpose, Tag, ALPN, FRAME_HEADER_LEN, MAX_CONTROL_FRAME, VERSION,
};
use ferry_transport::{
    crypto_provider, handler_fn, ClusterCa, NetworkConfig, NodeCredentials, RpcError, RpcNode,
};
use quinn::ConnectionError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const T: Duration = Duration::from_secs(20);

/// Node 3 calls node 2's echo service back to back; every call must succeed.
struct Member {
    ok: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Member {
    async fn start(good: Arc<RpcNode>, target: SocketAddr) -> Member {
        // Connected before any attack begins, as a member of a running cluster is.
        let r = good.call(2, &[target], "echo", b"hi".to_vec(), T).await;
        assert_eq!(r.unwrap(), b"hi");
        let ok = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (ok, stop) = (ok.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r = good.call(2, &[target], "echo", b"ping".to_vec(), T).await;
                    assert_eq!(r.unwrap(), b"ping", "a member's call failed");
                    ok.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        Member { ok, stop, task }
    }

    fn calls(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits for `n` more answered calls.
    async fn answered(&self, n: u64) {
        let before = self.calls();
        wait_until(T, "a member's calls answered", || {
            self.calls() >= before + n
        })
        .await;
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let calls = self.calls();
        self.task.await.unwrap();
        calls
    }
}

async fn server_and_member(cfg: NetworkConfig, ca: &ClusterCa) -> (Arc<RpcNode>, Member) {
    let server = start_node(ca, 2, &[1], cfg).await;
    server.register("echo", handler_fn(|_, r| async move { Ok(r) }));
    let good = start_node(ca, 3, &[1], NetworkConfig::default()).await;
    let member = Member::start(good, server.local_addrs()[0]).await;
    (server, member)
}

/// A raw QUIC connection to node 2 with `creds`, before any hello.
async fn raw_connect(
    creds: &NodeCredentials,
    server: SocketAddr,
) -> Result<quinn::Connection, ConnectionError> {
    let mut ep = quinn::Endpoint::client(addr(1, 9)).unwrap();
    ep.set_default_client_config(client_config(creds, &NetworkConfig::default()).unwrap());
    ep.connect(server, &node_server_name(2)).unwrap().await
}

/// Sends an RPC hello as `creds`' node; `Ok` once it is answered.
async fn hello(
    creds: &NodeCredentials,
    server: SocketAddr,
) -> Result<quinn::Connection, (quinn::Connection, ConnectionError)> {
    let conn = raw_connect(creds, server).await.unwrap();
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    let body = encode_hello(&Hello {
        version: VERSION,
        min_version: None,
        node_id: creds.node_id,
        purpose: Purpose::Rpc,
    });
    let _ = s.write_all(&body).await;
    let _ = s.finish();
    let mut ok = [0u8; 5];
    match r.read_exact(&mut ok).await {
        Ok(()) => {
            assert_eq!(ok[4], Tag::HelloOk as u8);
            Ok(conn)
        }
        Err(_) => {
            let e = tokio::time::timeout(T, conn.closed()).await.unwrap();
            Err((conn, e))
        }
    }
}

/// 10 000 handshakes from strangers (a certificate of another CA), 256 at a time
/// from 8 addresses: the node never runs more than `max_handshakes` at once, and a
/// member's calls are answered throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_runs_at_most_the_cap_at_once_and_members_are_served() {
    const ATTEMPTS: usize = 10_000;
    const PARALLEL: usize = 256;
    const SOURCES: u8 = 8;
    let ca = ClusterCa::generate("limits-flood").unwrap();
    let cfg = NetworkConfig::default();
    let cap = u64::from(cfg.limits.max_handshakes);
    let (server, member) = server_and_member(cfg, &ca).await;
    let target = server.local_addrs()[0];
    let stranger = ClusterCa::generate("stranger").unwrap().issue(9).unwrap();
    let client = client_config(&stranger, &NetworkConfig::default()).unwrap();

    let calls_before = member.calls();
    let started = std::time::Instant::now();
    let attempts = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let mut sources = Vec::new();
    for s in 0..SOURCES {
        let mut ep = quinn::Endpoint::client(addr(9, s + 1)).unwrap();
        ep.set_default_client_config(client.clone());
        let (attempts, connected) = (attempts.clone(), connected.clone());
        sources.push(tokio::spawn(async move {
            let per_source = ATTEMPTS / usize::from(SOURCES);
            let mut running = tokio::task::JoinSet::new();
            for _ in 0..per_source {
                if running.len() >= PARALLEL / usize::from(SOURCES) {
                    running.join_next().await;
                }
                attempts.fetch_add(1, Ordering::Relaxed);
                let connecting = ep.connect(target, &node_server_name(2)).unwrap();
                let connected = connected.clone();
                running.spawn(async move {
                    if connecting.await.is_ok() {
                        connected.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            while running.join_next().await.is_some() {}
            ep.close(0u32.into(), b"done");
        }));
    }
    for s in sources {
        s.await.unwrap();
    }
    let flood_took = started.elapsed();
    let calls_during = member.calls() - calls_before;
    wait_until(T, "every handshake slot given back", || {
        server.limit_stats().handshakes_in_flight.now == 0
    })
    .await;
    member.answered(3).await;
    let stats = server.limit_stats();
    let attempts = attempts.load(Ordering::Relaxed);
    println!(
        "flood: {attempts} handshake attempts in {flood_took:?}, {} completed by the \
         stranger, {calls_during} member calls answered meanwhile; {stats:?}",
        connected.load(Ordering::Relaxed)
    );
    assert!(attempts >= ATTEMPTS as u64);
    // A stranger's certificate never completes a handshake.
    assert_eq!(connected.load(Ordering::Relaxed), 0);
    assert!(
        stats.handshakes_in_flight.peak <= cap,
        "{} handshakes ran at once, the cap is {cap}",
        stats.handshakes_in_flight.peak
    );
    // The cap was reached: the flood was refused or sent to validate its address.
    assert!(
        stats.handshakes_refused + stats.handshakes_retried > 0,
        "{stats:?}"
    );
    assert!(calls_during > 0, "no member call answered during the flood");
    member.stop().await;
}

/// A member opens request streams, writes one byte of a frame header on each and
/// never more. On one connection it keeps every stream: it gets
/// `max_concurrent_requests` of them and no more, and the node stops each at the
/// frame deadline, giving back its task (the stream's credit stays spent until the
/// peer resets it: that member only starves its own connection). On another it opens
/// 300, dropping each once stopped, as a quinn peer does: at most the limit are ever
/// open at once, every one is stopped, and the member's other calls are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_request_streams_are_bounded_and_stopped_at_the_deadline() {
    const STREAMS: u64 = 300;
    let ca = ClusterCa::generate("limits-idle").unwrap();
    let mut cfg = NetworkConfig::default();
    cfg.limits.frame_deadline = Duration::from_millis(400);
    let per_conn = u64::from(cfg.max_concurrent_requests);
    let (server, member) = server_and_member(cfg, &ca).await;
    let target = server.local_addrs()[0];
    let hostile = ca.issue(5).unwrap();

    // Phase 1: every stream kept. The hello's stream stays open for the life of
    // the connection, so requests get the others.
    let kept = per_conn - 1;
    let conn = hello(&hostile, target).await.unwrap();
    let opened = Arc::new(AtomicU64::new(0));
    let keeper = {
        let (conn, opened) = (conn.clone(), opened.clone());
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                // Waits while the node allows no more streams on this connection.
                let Ok((mut s, r)) = conn.open_bi().await else {
                    return held.len();
                };
                let _ = s.write_all(&[1]).await;
                held.push((s, r));
                opened.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    wait_until(T, "the kept streams stopped", || {
        server.limit_stats().frames_timed_out >= kept
    })
    .await;
    wait_until(T, "their tasks given back", || {
        server.limit_stats().request_streams_open.now <= 1
    })
    .await;
    // Only a stream the node freed could give credit for another: none was.
    assert_eq!(opened.load(Ordering::Relaxed), kept);
    assert!(conn.close_reason().is_none());

    // Phase 2: 300 streams, each dropped once stopped.
    let conn2 = hello(&hostile, target).await.unwrap();
    let opener = tokio::spawn(async move {
        let mut stopped = tokio::task::JoinSet::new();
        for _ in 0..STREAMS {
            let (mut s, r) = conn2.open_bi().await.unwrap();
            let _ = s.write_all(&[1]).await;
            stopped.spawn(async move {
                let _ = s.stopped().await;
                drop(r);
            });
        }
        while stopped.join_next().await.is_some() {}
        conn2
    });
    wait_until(T, "every idle stream stopped", || {
        server.limit_stats().frames_timed_out >= kept + STREAMS
    })
    .await;
    let conn2 = tokio::time::timeout(T, opener).await.unwrap().unwrap();
    member.answered(3).await;
    wait_until(T, "no request stream left open", || {
        server.limit_stats().request_streams_open.now <= 1
    })
    .await;
    let stats = server.limit_stats();
    println!("idle streams: {kept} kept, {STREAMS} dropped once stopped; {stats:?}");
    // The member's one call in flight is the only stream beyond the hostile ones.
    assert!(
        stats.request_streams_open.peak <= per_conn + 1,
        "{} streams open at once, the limit per connection is {per_conn}",
        stats.request_streams_open.peak
    );
    // Stopping a stream keeps its connection.
    assert!(conn2.close_reason().is_none());
    conn.close(0u32.into(), b"done");
    assert_eq!(
        tokio::time::timeout(T, keeper).await.unwrap().unwrap() as u64,
        kept
    );
    member.stop().await;
}

/// A member claims a 16 MiB request and sends a byte every 20 ms on 8 streams: the
/// node holds at most the first allocation per stream, and stops the streams at the
/// frame deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_frame_holds_a_small_buffer_and_is_stopped_at_the_deadline() {
    const STREAMS: usize = 8;
    let ca = ClusterCa::generate("limits-trickle").unwrap();
    let mut cfg = NetworkConfig::default();
    cfg.limits.frame_deadline = Duration::from_millis(1500);
    let claimed = cfg.max_frame_bytes as usize - 16;
    let (server, member) = server_and_member(cfg, &ca).await;
    let target = server.local_addrs()[0];
    let hostile = ca.issue(5).unwrap();
    let conn = hello(&hostile, target).await.unwrap();

    let mut trickles = Vec::new();
    for _ in 0..STREAMS {
        let (mut s, r) = conn.open_bi().await.unwrap();
        trickles.push(tokio::spawn(async move {
            s.write_all(&frame_header(Tag::Request, claimed))
                .await
                .unwrap();
            let mut sent = 0usize;
            // Until the node stops the stream (the test's deadline is the bound).
            let stopped = loop {
                if let Err(e) = s.write_all(&[0]).await {
                    break e;
                }
                sent += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            drop(r);
            (sent, stopped)
        }));
    }
    let mut sent = 0;
    for t in trickles {
        let (n, stopped) = tokio::time::timeout(T, t).await.unwrap().unwrap();
        assert!(
            matches!(stopped, quinn::WriteError::Stopped(_)),
            "the trickle ended with {stopped}, not a stopped stream"
        );
        sent += n;
    }
    member.answered(3).await;
    wait_until(T, "partial frames released", || {
        server.limit_stats().partial_frame_bytes.now == 0
    })
    .await;
    let stats = server.limit_stats();
    println!(
        "trickle: {STREAMS} streams claimed {claimed} bytes each, sent {sent} bytes in all; {stats:?}"
    );
    assert!(stats.frames_timed_out >= STREAMS as u64, "{stats:?}");
    // One first allocation per trickling stream, and the member's small requests.
    let bound = (STREAMS + 1) * FRAME_FIRST_ALLOCATION;
    assert!(
        stats.partial_frame_bytes.peak <= bound as u64,
        "{} bytes held for partial frames, at most {bound} expected",
        stats.partial_frame_bytes.peak,
    );
    assert!(stats.partial_frame_bytes.peak > 0, "{stats:?}");
    assert!(conn.close_reason().is_none());
    member.stop().await;
}

/// A member opens more connections than a node may hold: the extra one is refused
/// with a reason that says so, and a connection given back makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_per_node_limit_are_refused_with_a_reason() {
    const MAX: u32 = 3;
    let ca = ClusterCa::generate("limits-conns").unwrap();
    let mut cfg = NetworkConfig::default();
    cfg.limits.max_connections_per_peer = MAX;
    let (server, member) = server_and_member(cfg, &ca).await;
    let target = server.local_addrs()[0];
    let hostile = ca.issue(5).unwrap();

    let mut open = Vec::new();
    for _ in 0..MAX {
        open.push(hello(&hostile, target).await.unwrap());
    }
    for _ in 0..4 {
        let Err((_, e)) = hello(&hostile, target).await else {
            panic!("connection beyond the limit of {MAX} accepted");
        };
        let reason = closed_with(e, CloseCode::TooManyConnections);
        assert!(
            reason.contains("node 5") && reason.contains(&format!("{MAX} connections")),
            "{reason}"
        );
    }
    member.answered(3).await;
    let stats = server.limit_stats();
    assert_eq!(stats.connections_over_limit, 4, "{stats:?}");
    // The member's own connection plus node 5's three.
    assert!(
        stats.connections_open.peak <= u64::from(MAX) + 1,
        "{stats:?}"
    );

    // One closed: room for one more.
    let first = open.remove(0);
    first.close(0u32.into(), b"bye");
    wait_until(T, "the closed connection given back", || {
        server.limit_stats().connections_open.now <= u64::from(MAX)
    })
    .await;
    open.push(hello(&hostile, target).await.unwrap());
    println!("connections: {:?}", server.limit_stats());
    member.stop().await;
}

/// A member calls a service whose handler never answers 200 times at once: each
/// call is answered with an error naming the handler deadline (the server's answer,
/// well before the call's own timeout), every handler's task is given back, and
/// another member's calls are answered throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_that_never_answer_are_given_up_at_the_deadline() {
    const CALLS: u64 = 200;
    let ca = ClusterCa::generate("limits-handlers").unwrap();
    let mut cfg = NetworkConfig::default();
    cfg.limits.handler_deadline = Duration::from_millis(300);
    let deadline = cfg.limits.handler_deadline;
    let per_conn = u64::from(cfg.max_concurrent_requests);
    let (server, member) = server_and_member(cfg, &ca).await;
    server.register(
        "stuck",
        handler_fn(|_, _| std::future::pending::<Result<Vec<u8>, String>>()),
    );
    let target = server.local_addrs()[0];
    let hostile = start_node(&ca, 5, &[1], NetworkConfig::default()).await;

    let calls_before = member.calls();
    let started = std::time::Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..CALLS {
        let hostile = hostile.clone();
        calls.spawn(async move {
            let payload = i.to_le_bytes().to_vec();
            hostile.call(2, &[target], "stuck", payload, T).await
        });
    }
    while let Some(r) = calls.join_next().await {
        match r.unwrap() {
            Err(RpcError::Remote(why)) => assert!(
                why.contains("stuck handler") && why.contains(&format!("deadline of {deadline:?}")),
                "{why}"
            ),
            other => panic!("a stuck call ended with {other:?}, not the handler deadline"),
        }
    }
    let took = started.elapsed();
    let calls_during = member.calls() - calls_before;
    member.answered(3).await;
    member.stop().await;
    // With no call in flight, nothing a peer started may still run.
    wait_until(T, "every handler's task given back", || {
        let s = server.limit_stats();
        s.handlers_running.now == 0 && s.request_streams_open.now == 0
    })
    .await;
    let stats = server.limit_stats();
    println!(
        "stuck handlers: {CALLS} calls answered in {took:?}, {calls_during} member calls \
         meanwhile; {stats:?}"
    );
    // Each request ran its handler once, and each was given up.
    assert_eq!(stats.handlers_timed_out, CALLS, "{stats:?}");
    assert!(stats.handlers_running.peak > 1, "{stats:?}");
    // A handler runs only while its request stream waits for it: no more at once
    // than the connections' stream credit allows.
    assert!(
        stats.handlers_running.peak <= per_conn * stats.connections_open.peak,
        "{stats:?}"
    );
    assert!(calls_during > 0, "no member call answered meanwhile");
}

/// A page-stream path of node 5, with its hello answered; returns the connection
/// and its control stream.
async fn page_path(
    creds: &NodeCredentials,
    server: SocketAddr,
    stream_id: u64,
    path: u32,
) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let conn = raw_connect(creds, server).await.unwrap();
    let (mut control, mut answers) = conn.open_bi().await.unwrap();
    let body = encode_hello(&Hello {
        version: VERSION,
        min_version: None,
        node_id: creds.node_id,
        purpose: Purpose::PageStream { stream_id, path },
    });
    control.write_all(&body).await.unwrap();
    let mut ok = [0u8; 5];
    answers.read_exact(&mut ok).await.unwrap();
    assert_eq!(ok[4], Tag::HelloOk as u8);
    (conn, control, answers)
}

/// Asserts that the node closed a connection with `code` and a reason; returns it.
fn closed_with(e: ConnectionError, code: CloseCode) -> String {
    let ConnectionError::ApplicationClosed(c) = e else {
        panic!("closed without a reason: {e}");
    };
    let reason = String::from_utf8_lossy(&c.reason).into_owned();
    assert_eq!(
        CloseCode::from_u64(c.error_code.into_inner()),
        Some(code),
        "{reason}"
    );
    reason
}

/// Waits for `conn` to be closed by the node as a dead path; returns the reason.
async fn closed_as_dead(conn: &quinn::Connection) -> String {
    let e = tokio::time::timeout(T, conn.closed()).await.unwrap();
    closed_with(e, CloseCode::PathDead)
}

/// The source of a page stream (only it may open the stream's paths) claims a
/// 16 MiB chunk on one path and trickles it a byte every 20 ms, and on another path
/// sends one byte of a control frame and no more. The node closes both paths at the
/// frame deadline with a reason naming it, holds no more than the first allocation
/// for the trickled chunk, and meanwhile serves another node's page stream and a
/// member's calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_page_stream_frame_loses_its_path_at_the_deadline() {
    let ca = ClusterCa::generate("limits-page-trickle").unwrap();
    let mut cfg = NetworkConfig::default();
    cfg.limits.frame_deadline = Duration::from_millis(1500);
    let deadline = cfg.limits.frame_deadline;
    let claimed = cfg.max_frame_bytes as usize - 16;
    let (server, member) = server_and_member(cfg, &ca).await;
    let target = server.local_addrs()[0];
    let hostile_rx = server
        .accept_page_stream(5, 5, CheckingSink::new(16))
        .unwrap();
    let hostile = ca.issue(5).unwrap();

    let (chunk_path, _control0, _answers0) = page_path(&hostile, target, 5, 0).await;
    let trickle = {
        let conn = chunk_path.clone();
        tokio::spawn(async move {
            let mut data = conn.open_uni().await.unwrap();
            data.write_all(&frame_header(Tag::Chunk, claimed))
                .await
                .unwrap();
            let started = std::time::Instant::now();
            let mut sent = 0usize;
            // Until the node closes the path (the test's deadline is the bound).
            while data.write_all(&[0]).await.is_ok() {
                sent += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (sent, started.elapsed())
        })
    };
    let (control_path, mut control1, _answers1) = page_path(&hostile, target, 5, 1).await;
    control1.write_all(&[0]).await.unwrap();
    let control_started = std::time::Instant::now();
    wait_until(T, "the trickled chunk's buffer allocated", || {
        server.limit_stats().partial_frame_bytes.now > 0
    })
    .await;

    // Meanwhile node 4 streams 16 MiB to the same node, in chunks no bigger than a
    // first allocation (so the bound below counts buffers, not chunk sizes).
    let mut honest_cfg = NetworkConfig::default();
    honest_cfg.page_stream.chunk_pages = 8;
    let honest_conns = u64::from(honest_cfg.page_stream.connections_per_network);
    let honest = start_node(&ca, 4, &[1], honest_cfg).await;
    let sink = CheckingSink::new(4096);
    let honest_rx = server.accept_page_stream(6, 4, sink.clone()).unwrap();
    let tx = honest.open_page_stream(2, &[target], 6).await.unwrap();
    tx.send(0, 0, &pages(0, 4096, 0)).await.unwrap();
    tx.finish().await.unwrap();
    honest_rx.wait().await.unwrap();
    sink.assert_all(0..4096, 0);

    let reason = closed_as_dead(&chunk_path).await;
    assert!(
        reason.contains("chunk frame from node 5")
            && reason.contains(&format!("frame deadline of {deadline:?}")),
        "{reason}"
    );
    let (sent, trickled) = tokio::time::timeout(T, trickle).await.unwrap().unwrap();
    assert!(trickled >= deadline, "closed after {trickled:?}");
    let reason = closed_as_dead(&control_path).await;
    assert!(
        reason.contains("control frame from node 5")
            && reason.contains(&format!("frame deadline of {deadline:?}")),
        "{reason}"
    );
    assert!(control_started.elapsed() >= deadline);
    wait_until(T, "the hostile stream's paths gone", || {
        hostile_rx.stats().paths_up == 0
    })
    .await;
    member.answered(3).await;
    wait_until(T, "partial frames released", || {
        server.limit_stats().partial_frame_bytes.now == 0
    })
    .await;
    let stats = server.limit_stats();
    println!(
        "page-stream trickle: claimed {claimed} bytes, sent {sent} in {trickled:?}; {stats:?}"
    );
    assert_eq!(stats.frames_timed_out, 2, "{stats:?}");
    // The trickled chunk's first allocation; a chunk and a control frame on each
    // honest connection; a member's request.
    let bound = (2 + 2 * honest_conns) * FRAME_FIRST_ALLOCATION as u64;
    assert!(
        stats.partial_frame_bytes.peak <= bound,
        "{} bytes held for partial frames, at most {bound} expected",
        stats.partial_frame_bytes.peak
    );
    member.stop().await;
}

/// A page-stream target run by hand: a raw quinn endpoint presenting `creds` (the
/// target node's own certificate, so a real sender trusts it) on network 1, which
/// can answer as no receiver would. It does not ask for the sender's certificate:
/// the test judges the sender, not the target's checks.
fn hand_made_target(creds: &NodeCredentials) -> quinn::Endpoint {
    let cert = CertificateDer::from_pem_slice(creds.cert_pem.as_bytes()).unwrap();
    let key = PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes()).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(crypto_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    quinn::Endpoint::server(server, addr(1, creds.node_id as u8)).unwrap()
}

/// Accepts one page-stream path on `target` and answers its hello as node `me`
/// would (`rpc::server`): `HelloOk` naming the hello's highest version when it
/// sent a range. Returns the connection and its control stream, both ways.
async fn accept_page_path(
    target: &quinn::Endpoint,
    me: u64,
) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let incoming = tokio::time::timeout(T, target.accept())
        .await
        .unwrap()
        .unwrap();
    let conn = incoming.await.unwrap();
    let (mut control, mut acks) = conn.accept_bi().await.unwrap();
    let mut header = [0u8; FRAME_HEADER_LEN];
    acks.read_exact(&mut header).await.unwrap();
    let (tag, len) = parse_frame_header(header, MAX_CONTROL_FRAME).unwrap();
    assert_eq!(tag, Tag::Hello);
    let mut body = vec![0u8; len];
    acks.read_exact(&mut body).await.unwrap();
    let hello = decode_hello(&body).unwrap();
    assert!(
        matches!(hello.purpose, Purpose::PageStream { .. }),
        "{:?}",
        hello.purpose
    );
    let ok = encode_hello_ok(&HelloOk {
        node_id: me,
        version: hello.min_version.map(|_| hello.version),
    });
    control.write_all(&ok).await.unwrap();
    (conn, control, acks)
}

/// A page stream's target (run by hand) answers the hello, then begins an ack
/// frame claiming 4 KiB and sends one byte of it every 50 ms. The sender drops
/// that path at its frame deadline, naming it, not before and well before three
/// times it, and counts the frame in its node's `frames_timed_out`. The silence
/// watchdog is set far beyond the deadline, so only the deadline can end the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_trickling_its_acks_loses_the_path_at_the_deadline() {
    let ca = ClusterCa::generate("limits-ack-trickle").unwrap();
    let mut cfg = NetworkConfig::default();
    cfg.limits.frame_deadline = Duration::from_secs(1);
    // A trickled frame is no sign of life: without this the watchdog would drop
    // the path at 300 ms, and the deadline would go untested.
    cfg.page_stream.path_dead_after = Duration::from_secs(10);
    cfg.page_stream.fail_after = Duration::from_secs(20);
    cfg.page_stream.connections_per_network = 1;
    let deadline = cfg.limits.frame_deadline;
    let sender = start_node(&ca, 1, &[1], cfg).await;
    let target = hand_made_target(&ca.issue(2).unwrap());
    let target_addr = target.local_addr().unwrap();

    let opening = {
        let sender = sender.clone();
        tokio::spawn(async move { sender.open_page_stream(2, &[target_addr], 7).await })
    };
    let (conn, mut control, mut pings) = accept_page_path(&target, 2).await;
    let tx = tokio::time::timeout(T, opening)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(tx.stats().paths[0].times_up, 1);
    // The sender's pings are read, so none of its writes waits on flow control.
    let drain = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok(Some(_)) = pings.read(&mut buf).await {}
    });

    control
        .write_all(&frame_header(Tag::Control, 4096))
        .await
        .unwrap();
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        let mut sent = 0usize;
        // Until the sender closes the path (the test's deadline is the bound).
        while control.write_all(&[0]).await.is_ok() {
            sent += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sent
    });
    wait_until(T, "the trickling path down", || {
        tx.stats().paths[0].times_down >= 1
    })
    .await;
    let down_after = started.elapsed();
    // Read at once: a failed redial (the target accepts no more connections)
    // would replace the path's last error after `connect_timeout`.
    let path = tx.stats().paths[0].clone();
    let stats = sender.limit_stats();
    println!("ack trickle: path down {down_after:?} after the frame began; {path:?}; {stats:?}");
    assert!(!path.alive, "{path:?}");
    assert_eq!(path.times_down, 1, "{path:?}");
    let why = path.last_error.unwrap_or_default();
    assert!(
        why.contains(&format!("frame not whole within {deadline:?}")),
        "{why}"
    );
    assert!(down_after >= deadline, "path down after {down_after:?}");
    assert!(down_after < 3 * deadline, "path down after {down_after:?}");
    assert_eq!(stats.frames_timed_out, 1, "{stats:?}");
    // The partial ack was being read into a buffer, and giving up released it.
    assert!(stats.partial_frame_bytes.peak > 0, "{stats:?}");
    wait_until(T, "the partial ack's buffer released", || {
        sender.limit_stats().partial_frame_bytes.now == 0
    })
    .await;
    // The sender closed the connection as a dead path, which ended the trickle.
    closed_as_dead(&conn).await;
    let sent = tokio::time::timeout(T, trickle).await.unwrap().unwrap();
    assert!(
        sent < 4096,
        "{sent} bytes trickled: the frame was completed"
    );
    drain.abort();
    drop(tx);
    target.close(0u32.into(), b"done");
}
