//! A call survives its network dying: two nodes on two networks, each path through a
//! link proxy that can be cut (every datagram dropped, both ways, as a dead switch
//! port does, or only one way, as a failed transmitter does). A cut path is silent,
//! so the call also goes out on the other path; the peer runs the request once
//! however many copies reach it.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{start_node, wait_until};
use ferry_chaos::proxy::LinkProxy;
use ferry_transport::{handler_fn, CallOptions, ClusterCa, NetworkConfig, RpcNode};

const T: Duration = Duration::from_secs(30);

struct Pair {
    a: Arc<RpcNode>,
    b: Arc<RpcNode>,
    /// Node 2's two networks as node 1 reaches them, through proxies.
    links: [LinkProxy; 2],
    _ca: ClusterCa,
}

impl Pair {
    async fn start() -> Pair {
        Pair::start_with(NetworkConfig::loopback()).await
    }

    async fn start_with(cfg: NetworkConfig) -> Pair {
        let ca = ClusterCa::generate("failover-test").unwrap();
        let a = start_node(&ca, 1, &[1, 2], cfg.clone()).await;
        let b = start_node(&ca, 2, &[1, 2], cfg).await;
        let b_addrs = b.local_addrs();
        let l1 = LinkProxy::start("127.1.0.99:0".parse().unwrap(), b_addrs[0], 1)
            .await
            .unwrap();
        let l2 = LinkProxy::start("127.2.0.99:0".parse().unwrap(), b_addrs[1], 2)
            .await
            .unwrap();
        Pair {
            a,
            b,
            links: [l1, l2],
            _ca: ca,
        }
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.links.iter().map(|l| l.local_addr()).collect()
    }
}

/// Registers "count" on `node`: counts its runs, and (when `hold` is set) waits for
/// it to be cleared before answering with the run number.
fn register_count(
    node: &RpcNode,
    runs: Arc<AtomicU64>,
    hold: Arc<tokio::sync::watch::Sender<bool>>,
) {
    node.register(
        "count",
        handler_fn(move |_from, _req| {
            let runs = runs.clone();
            let mut held = hold.subscribe();
            async move {
                let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                let _ = held.wait_for(|h| !*h).await;
                Ok(n.to_le_bytes().to_vec())
            }
        }),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_path_dies_in_flight_is_answered_on_the_other_and_runs_once() {
    let p = Pair::start().await;
    let runs = Arc::new(AtomicU64::new(0));
    let hold = Arc::new(tokio::sync::watch::channel(true).0);
    register_count(&p.b, runs.clone(), hold.clone());

    let (a, addrs) = (p.a.clone(), p.addrs());
    let call = tokio::spawn(async move { a.call(2, &addrs, "count", Vec::new(), T).await });
    wait_until(T, "the handler to start", || {
        runs.load(Ordering::SeqCst) == 1
    })
    .await;
    // The request is being served; its path now dies.
    p.links[0].cut();
    // The caller hears nothing more on it and sends the same request on the other
    // network; node 2 recognises it and does not run it again.
    wait_until(T, "the copy on the second network", || {
        p.b.stats().duplicate_requests == 1
    })
    .await;
    hold.send_replace(false);
    let answer = call.await.unwrap().unwrap();
    assert_eq!(answer, 1u64.to_le_bytes(), "the first run's answer");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "ran once");
    assert!(p.a.stats().calls_hedged >= 1, "{:?}", p.a.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_whose_transmit_side_failed_is_left_although_the_peer_still_talks() {
    // Idle timeouts longer than the call's deadline: neither side gives up on the
    // half-dead connection during the test, so only the unacknowledged request can
    // tell the caller to go elsewhere.
    let p = Pair::start_with(NetworkConfig {
        idle_timeout: 2 * T,
        ..NetworkConfig::loopback()
    })
    .await;
    let runs = Arc::new(AtomicU64::new(0));
    register_count(
        &p.b,
        runs.clone(),
        Arc::new(tokio::sync::watch::channel(false).0),
    );
    let addrs = p.addrs();
    let n = p.a.call(2, &addrs, "count", Vec::new(), T).await.unwrap();
    assert_eq!(n, 1u64.to_le_bytes());
    let heard_before = p.b.stats().requests_served;
    let before = p.a.stats();

    // Node 1's datagrams on the first network vanish; node 2's keep-alives on it
    // still arrive, so the path is not silent in the receive sense.
    p.links[0].cut_to_target();
    // A budget such as the blackout's: the call must leave the path within it, not
    // wait for the peer's keep-alives to back off into silence (seconds).
    let opts = CallOptions::new(Duration::from_secs(2));
    let n =
        p.a.call_with(2, &addrs, "count", Vec::new(), opts)
            .await
            .unwrap();
    assert_eq!(n, 2u64.to_le_bytes(), "ran once, on the second network");
    let a = p.a.stats();
    // Unacknowledged, the request went out again on the other network at the hedge
    // delay, once.
    let hedged = a.calls_hedged - before.calls_hedged;
    let failed_over = a.calls_failed_over - before.calls_failed_over;
    assert_eq!((hedged, failed_over), (1, 0), "{a:?}");
    assert_eq!(p.b.stats().requests_served, heard_before + 1);
    assert_eq!(p.b.stats().duplicate_requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_network_is_avoided_and_used_again_once_it_returns() {
    let p = Pair::start().await;
    let runs = Arc::new(AtomicU64::new(0));
    let hold = Arc::new(tokio::sync::watch::channel(false).0);
    register_count(&p.b, runs.clone(), hold);
    let addrs = p.addrs();
    let call = || p.a.call(2, &addrs, "count", Vec::new(), T);
    call().await.unwrap();

    p.links[0].cut();
    let started = Instant::now();
    let hedged_before = p.a.stats().calls_hedged;
    for i in 0..20u64 {
        let n = call().await.unwrap();
        assert_eq!(n, (i + 2).to_le_bytes(), "every call runs exactly once");
    }
    // The dead path costs the first call one hedge; after that calls start on the
    // live one, trying the dead one again (and hedging) at most every 2 s.
    let hedged = p.a.stats().calls_hedged - hedged_before;
    let allowed = 1 + started.elapsed().as_secs() / 2 + 1;
    assert!(
        (1..=allowed).contains(&hedged),
        "{hedged} hedges in {:?}",
        started.elapsed()
    );
    assert_eq!(p.b.stats().duplicate_requests as usize, 0);

    // Back up: calls return to the first network.
    p.links[0].restore();
    let forwarded = p.links[0].stats().forwarded_packets;
    let deadline = Instant::now() + T;
    while p.links[0].stats().forwarded_packets < forwarded + 20 {
        call().await.unwrap();
        assert!(
            Instant::now() < deadline,
            "calls never returned to the first network"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_networks_dead_the_call_fails_within_its_budget() {
    let p = Pair::start().await;
    let runs = Arc::new(AtomicU64::new(0));
    register_count(&p.b, runs, Arc::new(tokio::sync::watch::channel(false).0));
    p.a.call(2, &p.addrs(), "count", Vec::new(), T)
        .await
        .unwrap();
    p.links[0].cut();
    p.links[1].cut();
    let budget = Duration::from_millis(800);
    let started = Instant::now();
    let r =
        p.a.call_with(2, &p.addrs(), "count", Vec::new(), CallOptions::new(budget))
            .await;
    assert!(r.is_err(), "{r:?}");
    // The budget is a deadline, not a hint (generous slack for a loaded machine).
    assert!(started.elapsed() < budget + Duration::from_secs(2));
}
