//! A member of the cluster that misbehaves on the wire (unknown version, malformed
//! hello, malformed or oversized frames, an identity it does not hold) loses its
//! connection with a clear reason, while the node keeps serving a well-behaved peer
//! throughout.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{addr, start_node};
use ferry_transport::identity::{client_config, node_server_name};
use ferry_transport::protocol::{
    encode_hello, encode_request, frame, frame_header, CloseCode, Hello, Purpose, Tag, VERSION,
};
use ferry_transport::{handler_fn, ClusterCa, NetworkConfig, NodeCredentials};
use quinn::ConnectionError;

const T: Duration = Duration::from_secs(10);

/// A raw QUIC connection to node 2 with valid credentials, before any hello.
async fn raw_connect(creds: &NodeCredentials, server: SocketAddr) -> quinn::Connection {
    let mut ep = quinn::Endpoint::client(addr(1, 9)).unwrap();
    ep.set_default_client_config(client_config(creds, &NetworkConfig::default()).unwrap());
    ep.connect(server, &node_server_name(2))
        .unwrap()
        .await
        .unwrap()
}

fn hello(node_id: u64, version: u16) -> Vec<u8> {
    encode_hello(&Hello {
        version,
        min_version: None,
        node_id,
        purpose: Purpose::Rpc,
    })
}

/// Sends `bytes` on a new bidirectional stream.
async fn send_bi(conn: &quinn::Connection, bytes: &[u8]) -> quinn::RecvStream {
    let (mut s, r) = conn.open_bi().await.unwrap();
    // The server may close the connection before everything is written.
    let _ = s.write_all(bytes).await;
    let _ = s.finish();
    r
}

/// Waits for the server to close `conn` and returns (code, reason).
async fn closed(conn: &quinn::Connection) -> (Option<CloseCode>, String) {
    match tokio::time::timeout(T, conn.closed())
        .await
        .expect("server never closed")
    {
        ConnectionError::ApplicationClosed(c) => (
            CloseCode::from_u64(c.error_code.into_inner()),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => (None, other.to_string()),
    }
}

/// Completes the hello as node `node_id` and returns the connection.
async fn after_hello(creds: &NodeCredentials, server: SocketAddr) -> quinn::Connection {
    let conn = raw_connect(creds, server).await;
    let mut r = send_bi(&conn, &hello(creds.node_id, VERSION)).await;
    let mut ok = [0u8; 5];
    r.read_exact(&mut ok).await.unwrap();
    assert_eq!(ok[4], Tag::HelloOk as u8);
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_peers_lose_their_connection_and_others_are_still_served() {
    let ca = ClusterCa::generate("abuse").unwrap();
    let server = start_node(&ca, 2, &[1], NetworkConfig::default()).await;
    let good = start_node(&ca, 3, &[1], NetworkConfig::default()).await;
    server.register("echo", handler_fn(|_, r| async move { Ok(r) }));
    let target = server.local_addrs()[0];
    let bad = ca.issue(5).unwrap();

    // A well-behaved peer calls all along; every call must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let ok_calls = Arc::new(AtomicU64::new(0));
    let background = {
        let (good, stop, ok_calls) = (good.clone(), stop.clone(), ok_calls.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = good.call(2, &[target], "echo", b"ping".to_vec(), T).await;
                assert_eq!(r.unwrap(), b"ping");
                ok_calls.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let mut seen = Vec::new();

    // Unknown protocol version in the hello.
    let conn = raw_connect(&bad, target).await;
    send_bi(&conn, &hello(5, 999)).await;
    let (code, reason) = closed(&conn).await;
    assert_eq!(code, Some(CloseCode::VersionMismatch), "{reason}");
    assert!(
        reason.contains("version 999") && reason.contains(&format!("version {VERSION}")),
        "{reason}"
    );
    seen.push(reason);

    // Not a Ferry hello at all.
    let conn = raw_connect(&bad, target).await;
    send_bi(&conn, &frame(Tag::Hello, b"GET / HTTP/1.1\r\n")).await;
    let (code, reason) = closed(&conn).await;
    assert_eq!(code, Some(CloseCode::Protocol), "{reason}");
    assert!(reason.contains("magic"), "{reason}");
    seen.push(reason);

    // Claims to be node 6 with node 5's certificate.
    let conn = raw_connect(&bad, target).await;
    send_bi(&conn, &hello(6, VERSION)).await;
    let (code, reason) = closed(&conn).await;
    assert_eq!(code, Some(CloseCode::PeerIdentity), "{reason}");
    assert!(reason.contains("node 6"), "{reason}");
    seen.push(reason);

    // After a good hello: a length of nearly 4 GiB. Refused from the header alone.
    let conn = after_hello(&bad, target).await;
    let mut huge = frame_header(Tag::Request, 0).to_vec();
    huge[..4].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    send_bi(&conn, &huge).await;
    let (code, reason) = closed(&conn).await;
    assert_eq!(code, Some(CloseCode::FrameTooLarge), "{reason}");
    assert!(
        reason.contains("4294967280") && reason.contains("maximum"),
        "{reason}"
    );
    seen.push(reason);

    // After a good hello: a request whose service name runs past its end.
    let conn = after_hello(&bad, target).await;
    send_bi(
        &conn,
        &frame(Tag::Request, &[0, 0, 0, 0, 0, 0, 0, 0, 200, b'e', b'c']),
    )
    .await;
    let (code, reason) = closed(&conn).await;
    assert_eq!(code, Some(CloseCode::Protocol), "{reason}");
    assert!(reason.contains("malformed"), "{reason}");
    seen.push(reason);

    // After a good hello: an unknown frame type.
    let conn = after_hello(&bad, target).await;
    let mut unknown = frame(Tag::Request, b"x");
    unknown[4] = 77;
    send_bi(&conn, &unknown).await;
    let (code, reason) = closed(&conn).await;
    assert_eq!(code, Some(CloseCode::Protocol), "{reason}");
    assert!(reason.contains("tag 77"), "{reason}");
    seen.push(reason);

    // The same raw client, behaving, is served: the node holds no grudge.
    let conn = after_hello(&bad, target).await;
    let mut r = send_bi(
        &conn,
        &encode_request(Tag::Request, 9, "echo", b"hi").unwrap(),
    )
    .await;
    let answer = r.read_to_end(1024).await.unwrap();
    assert_eq!(&answer[6..], b"hi");

    let before = ok_calls.load(Ordering::Relaxed);
    common::wait_until(T, "more good calls", || {
        ok_calls.load(Ordering::Relaxed) > before + 3
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    background.await.unwrap();
    let stats = server.stats();
    assert!(stats.connections_refused >= 3, "{stats:?}");
    assert!(stats.protocol_errors >= 3, "{stats:?}");
    // The node's own record says the same.
    let refusals = server.recent_refusals();
    for reason in &seen {
        assert!(
            refusals.iter().any(|r| r.contains(reason.as_str())),
            "{reason} not in {refusals:?}"
        );
    }
    println!("refusals: {refusals:#?}");
}

/// A page-stream sender that pings without ever reading the answers: the
/// receiver's control outbox for that path stays bounded (its pongs are
/// dropped once the outbox is full), and another node's stream to the same
/// receiver is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_that_never_reads_its_control_stream_cannot_grow_the_receivers_outbox() {
    use common::{pages, wait_until, CheckingSink};
    use ferry_transport::protocol::{encode_control, Control};

    let ca = ClusterCa::generate("abuse-outbox").unwrap();
    let receiver = start_node(&ca, 2, &[1], NetworkConfig::default()).await;
    let honest = start_node(&ca, 3, &[1], NetworkConfig::default()).await;
    let server = receiver.local_addrs()[0];
    let hostile_rx = receiver
        .accept_page_stream(5, 1, CheckingSink::new(16))
        .unwrap();
    let sink = CheckingSink::new(4096);
    let honest_rx = receiver.accept_page_stream(6, 3, sink.clone()).unwrap();

    // Node 1's path of stream 5: the hello stream is the control channel.
    let creds = ca.issue(1).unwrap();
    let conn = raw_connect(&creds, server).await;
    let (mut control, mut answers) = conn.open_bi().await.unwrap();
    let hello = encode_hello(&Hello {
        version: VERSION,
        min_version: None,
        node_id: 1,
        purpose: Purpose::PageStream {
            stream_id: 5,
            path: 0,
        },
    });
    control.write_all(&hello).await.unwrap();
    let mut ok = [0u8; 5];
    answers.read_exact(&mut ok).await.unwrap();
    assert_eq!(ok[4], Tag::HelloOk as u8);
    // Pings, never reading a pong: far more than the QUIC stream window
    // holds, so the receiver's writes block and its outbox fills.
    let flood = tokio::spawn(async move {
        let mut batch = Vec::new();
        for nonce in 0..2_000_000u64 {
            batch.extend_from_slice(&encode_control(&Control::Ping { nonce }));
            if batch.len() > 64 << 10 && control.write_all(&batch).await.is_err() {
                return;
            }
            if batch.len() > 64 << 10 {
                batch.clear();
            }
        }
        let _ = control.write_all(&batch).await;
        // Held open, unread, until the test ends.
        std::future::pending::<()>().await;
    });

    // Meanwhile node 3 streams 16 MiB to the same receiver.
    let tx = honest
        .open_page_stream(2, &receiver.local_addrs(), 6)
        .await
        .unwrap();
    tx.send(0, 0, &pages(0, 4096, 0)).await.unwrap();
    tx.finish().await.unwrap();
    honest_rx.wait().await.unwrap();
    sink.assert_all(0..4096, 0);

    wait_until(T, "pongs dropped once the outbox is full", || {
        hostile_rx.stats().pongs_dropped > 0
    })
    .await;
    flood.abort();
    let _ = answers;
}
