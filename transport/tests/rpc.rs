//! RPC between cluster nodes through the public API: requests, one-way messages,
//! errors a caller must be able to tell apart, and failover across networks.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{start_node, wait_until};
use ferry_transport::{decode, encode, handler_fn, ClusterCa, NetworkConfig, RpcError, RpcNode};

const T: Duration = Duration::from_secs(5);

fn register_echo(node: &RpcNode) {
    node.register(
        "echo",
        handler_fn(|from, req| async move {
            let (text, n): (String, u64) = decode(&req).map_err(|e| e.to_string())?;
            Ok(encode(&(format!("{text} from {from}"), n + 1)))
        }),
    );
    node.register("fail", handler_fn(|_, _| async { Err("nope".to_string()) }));
    node.register(
        "slow",
        handler_fn(|_, _| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(vec![])
        }),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_messages_and_errors() {
    let ca = ClusterCa::generate("rpc-test").unwrap();
    let a = start_node(&ca, 1, &[1, 2], NetworkConfig::default()).await;
    let b = start_node(&ca, 2, &[1, 2], NetworkConfig::default()).await;
    register_echo(&b);
    let got = Arc::new(AtomicU64::new(0));
    {
        let got = got.clone();
        b.register(
            "count",
            handler_fn(move |from, msg| {
                let got = got.clone();
                async move {
                    assert_eq!(from, 1);
                    got.fetch_add(msg.len() as u64, Ordering::SeqCst);
                    Ok(vec![])
                }
            }),
        );
    }
    let b_addrs = b.local_addrs();

    let reply = a
        .call(2, &b_addrs, "echo", encode(&("hi".to_string(), 41u64)), T)
        .await
        .unwrap();
    assert_eq!(
        decode::<(String, u64)>(&reply).unwrap(),
        ("hi from 1".to_string(), 42)
    );

    // Many concurrent calls share the cached connection.
    let calls = (0..50u64).map(|i| {
        let a = a.clone();
        let addrs = b_addrs.clone();
        async move {
            let r = a
                .call(2, &addrs, "echo", encode(&("x".to_string(), i)), T)
                .await
                .unwrap();
            decode::<(String, u64)>(&r).unwrap().1
        }
    });
    let results = futures_join_all(calls).await;
    assert_eq!(results, (1..=50).collect::<Vec<u64>>());

    for _ in 0..10 {
        a.send(2, &b_addrs, "count", vec![0; 100]).await.unwrap();
    }
    wait_until(T, "ten one-way messages", || {
        got.load(Ordering::SeqCst) == 1000
    })
    .await;

    assert_eq!(
        a.call(2, &b_addrs, "fail", vec![], T).await,
        Err(RpcError::Remote("nope".into()))
    );
    assert_eq!(
        a.call(2, &b_addrs, "missing", vec![], T).await,
        Err(RpcError::UnknownService("missing".into()))
    );
    let started = std::time::Instant::now();
    let slow = a
        .call(2, &b_addrs, "slow", vec![], Duration::from_millis(300))
        .await;
    assert!(matches!(slow, Err(RpcError::Timeout(_))), "{slow:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // Too large for the peer's frame limit: refused locally before sending.
    let big = vec![0u8; 17 << 20];
    assert!(matches!(
        a.call(2, &b_addrs, "echo", big, T).await,
        Err(RpcError::FrameTooLarge(_))
    ));
    // Still fine afterwards.
    a.call(2, &b_addrs, "echo", encode(&("again".to_string(), 0u64)), T)
        .await
        .unwrap();
    assert!(b.stats().requests_served >= 54);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_node_foreign_ca_and_dead_first_network() {
    let ca = ClusterCa::generate("rpc-test").unwrap();
    let a = start_node(&ca, 1, &[1, 2], NetworkConfig::default()).await;
    let b = start_node(&ca, 2, &[1, 2], NetworkConfig::default()).await;
    let c = start_node(&ca, 3, &[1], NetworkConfig::default()).await;
    register_echo(&b);
    register_echo(&c);
    let ping = || encode(&("p".to_string(), 0u64));

    // Node 3's address, but we expect node 2 there.
    let r = a.call(2, &c.local_addrs(), "echo", ping(), T).await;
    assert!(matches!(r, Err(RpcError::PeerIdentity(_))), "{r:?}");

    // A node of another cluster: its server certificate is refused by us...
    let other = ClusterCa::generate("other-cluster").unwrap();
    let stranger = start_node(&other, 2, &[3], NetworkConfig::default()).await;
    let r = a.call(2, &stranger.local_addrs(), "echo", ping(), T).await;
    assert!(matches!(r, Err(RpcError::PeerIdentity(_))), "{r:?}");
    // ...and its client certificate is refused by our node, which says so.
    let refused_before = b.stats().connections_refused;
    let r = stranger.call(2, &b.local_addrs(), "echo", ping(), T).await;
    assert!(matches!(r, Err(RpcError::PeerIdentity(_))), "{r:?}");
    wait_until(T, "b counts the refusal", || {
        b.stats().connections_refused > refused_before
    })
    .await;

    // First network dead (nothing listens there): the call fails over to the second.
    let dead = "127.1.0.250:9".parse().unwrap();
    let addrs = vec![dead, b.local_addrs()[1]];
    let r = a
        .call(2, &addrs, "echo", ping(), Duration::from_secs(3))
        .await;
    assert!(r.is_ok(), "{r:?}");

    // A node that shuts down is unreachable, and a new node can take its addresses.
    let b_addrs = b.local_addrs();
    b.shutdown().await;
    let r = a
        .call(2, &b_addrs, "echo", ping(), Duration::from_secs(2))
        .await;
    assert!(
        matches!(r, Err(RpcError::Unreachable { .. } | RpcError::Timeout(_))),
        "{r:?}"
    );
    let b2 = RpcNode::start(
        ca.issue(2).unwrap(),
        b_addrs.clone(),
        NetworkConfig::default(),
    )
    .await
    .unwrap();
    register_echo(&b2);
    let r = a.call(2, &b_addrs, "echo", ping(), T).await;
    assert!(r.is_ok(), "restarted node: {r:?}");
}

async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futs: impl IntoIterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
