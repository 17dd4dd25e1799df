//! The multipath page stream through the public API: a GiB over two paths, a path cut
//! half-way, both paths cut, a cut path rejoining, hedging through a blackout whose
//! path died silently, and the stream's control flow
//! (barrier, zero pages, cancel, sink failure, unknown stream).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{addr, pages, send_scattered, start_node, wait_until, CheckingSink, ZERO};
use ferry_chaos::proxy::LinkProxy;
use ferry_transport::{
    ClusterCa, NetworkConfig, PageStreamConfig, PageStreamError, PageStreamSender, RpcError,
    RpcNode, PAGE_SIZE,
};

const LONG: Duration = Duration::from_secs(60);

/// Source node 1 and target node 2, both on networks 1 and 2.
async fn pair(cfg: NetworkConfig) -> (Arc<RpcNode>, Arc<RpcNode>) {
    let ca = ClusterCa::generate("stream-test").unwrap();
    let src = start_node(&ca, 1, &[1, 2], cfg.clone()).await;
    let dst = start_node(&ca, 2, &[1, 2], cfg).await;
    (src, dst)
}

/// One proxy per network in front of the target, on 127.K.0.100.
async fn proxies(dst: &RpcNode) -> Vec<LinkProxy> {
    let mut out = Vec::new();
    for (i, a) in dst.local_addrs().into_iter().enumerate() {
        out.push(
            LinkProxy::start(addr(i as u8 + 1, 100), a, 42 + i as u64)
                .await
                .unwrap(),
        );
    }
    out
}

/// Sends pages `[first, first + count)` of `round` in 4 MiB batches.
async fn send_range(s: &PageStreamSender, round: u32, first: u64, count: u64) {
    const BATCH: u64 = 1024;
    let mut p = first;
    while p < first + count {
        let n = BATCH.min(first + count - p);
        s.send_bytes(round, p, Bytes::from(pages(p, n as usize, round)))
            .await
            .unwrap();
        p += n;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_over_two_paths_arrives_intact() {
    const PAGES: u64 = (1 << 30) / PAGE_SIZE as u64;
    let (src, dst) = pair(NetworkConfig::loopback()).await;
    let sink = CheckingSink::new(PAGES);
    let rx = dst.accept_page_stream(7, 1, sink.clone()).unwrap();
    let started = Instant::now();
    let tx = src
        .open_page_stream(2, &dst.local_addrs(), 7)
        .await
        .unwrap();

    send_range(&tx, 0, 0, PAGES).await;
    tx.barrier(0).await.unwrap();
    let round0 = started.elapsed();
    // Round 1: every 16th block of 64 pages was dirtied meanwhile, and one block
    // became zero.
    for block in (0..PAGES / 64).step_by(16) {
        send_range(&tx, 1, block * 64, 64).await;
    }
    tx.send_zero(1, 64, 64).await.unwrap();
    let stats = tx.finish().await.unwrap();
    let total = rx.wait().await.unwrap();

    for block in 0..PAGES / 64 {
        let range = block * 64..block * 64 + 64;
        if block == 1 {
            assert!(
                range.clone().all(|p| sink.round_of(p) == ZERO),
                "zero block"
            );
        } else if block % 16 == 0 {
            sink.assert_all(range, 1);
        } else {
            sink.assert_all(range, 0);
        }
    }
    sink.assert_clean();
    assert!(total.finished);
    if stats.paths.iter().all(|p| p.times_down == 0) {
        assert_eq!(total.pages_stale, 0, "no duplicates without a path failure");
    }
    let mib = (1u64 << 30) as f64 / (1 << 20) as f64;
    println!(
        "1 GiB round 0 in {round0:?} ({:.0} MiB/s); per path acked: {:?}",
        mib / round0.as_secs_f64(),
        stats
            .paths
            .iter()
            .map(|p| p.bytes_acked >> 20)
            .collect::<Vec<_>>()
    );
    for p in &stats.paths {
        assert!(
            p.bytes_acked > (100 << 20),
            "both paths carry a real share: {:?}",
            stats.paths
        );
    }
}

/// The default settings start at the 1500-byte-Ethernet MTU and discover what
/// the path carries: on loopback, the jumbo ceiling. A ceiling at the MTU keeps
/// datagrams at the MTU. Both streams arrive intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_settings_discover_a_larger_mtu_and_a_ceiling_holds() {
    const PAGES: u64 = 16 * 1024;
    let defaults = NetworkConfig::default();
    assert!(defaults.mtu < defaults.mtu_ceiling);
    let fixed = NetworkConfig {
        mtu_ceiling: defaults.mtu,
        ..NetworkConfig::default()
    };
    for (cfg, want) in [
        (defaults.clone(), defaults.mtu_ceiling),
        (fixed, defaults.mtu),
    ] {
        let (src, dst) = pair(cfg).await;
        let sink = CheckingSink::new(PAGES);
        let rx = dst.accept_page_stream(3, 1, sink.clone()).unwrap();
        let tx = src
            .open_page_stream(2, &dst.local_addrs()[..1], 3)
            .await
            .unwrap();
        send_range(&tx, 0, 0, PAGES).await;
        tx.barrier(0).await.unwrap();
        // Discovery runs alongside the data: wait for its result, not a time.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mtu = loop {
            let mtu = tx.stats().paths[0].mtu;
            if mtu == Some(want) || Instant::now() > deadline {
                break mtu;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(mtu, Some(want));
        tx.finish().await.unwrap();
        rx.wait().await.unwrap();
        for p in 0..PAGES {
            assert_eq!(sink.round_of(p), 1, "page {p}");
        }
        sink.assert_clean();
        src.shutdown().await;
        dst.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scattered_pages_travel_in_full_listed_chunks() {
    const PAGES: u64 = 64 * 1024;
    let (src, dst) = pair(NetworkConfig::loopback()).await;
    let sink = CheckingSink::new(PAGES);
    let rx = dst.accept_page_stream(9, 1, sink.clone()).unwrap();
    let tx = src
        .open_page_stream(2, &dst.local_addrs(), 9)
        .await
        .unwrap();
    send_range(&tx, 0, 0, PAGES).await;
    tx.barrier(0).await.unwrap();
    let after_round_0 = tx.stats().chunks_queued;

    // Round 1: every 7th page, plus one contiguous stretch, carries data; every
    // 11th page (not also a 7th) became zero. As a dirty round would, in batches
    // of 256 pages.
    let dirty: Vec<u64> = (0..PAGES)
        .filter(|p| p % 7 == 0 || (1000..1100).contains(p))
        .collect();
    let zeroed: Vec<u64> = (0..PAGES)
        .filter(|p| p % 11 == 0 && !dirty.contains(p))
        .collect();
    send_scattered(&tx, 1, &dirty, &zeroed).await;
    // Refused: pages out of order, data of the wrong size.
    assert!(tx.send_listed(1, &[5, 3], None).await.is_err());
    assert!(tx
        .send_listed(1, &[5, 6], Some(Bytes::from(vec![0u8; PAGE_SIZE])))
        .await
        .is_err());
    let stats = tx.finish().await.unwrap();
    rx.wait().await.unwrap();

    for p in 0..PAGES {
        let want = if dirty.binary_search(&p).is_ok() {
            2
        } else if zeroed.binary_search(&p).is_ok() {
            ZERO
        } else {
            1
        };
        assert_eq!(sink.round_of(p), want, "page {p}");
    }
    sink.assert_clean();
    // Full chunks of 64 pages, not one chunk per scattered page.
    let chunks = stats.chunks_queued - after_round_0;
    let full = (dirty.len() as u64).div_ceil(64) + (zeroed.len() as u64).div_ceil(64);
    assert!(
        chunks <= full + 2 * (dirty.len() + zeroed.len()) as u64 / 256 + 2,
        "{chunks} chunks for {} pages (full chunks: {full})",
        dirty.len() + zeroed.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_connections_per_network_share_the_load_and_fail_over_together() {
    const PAGES: u64 = (256 << 20) / PAGE_SIZE as u64;
    let mut cfg = NetworkConfig::loopback();
    cfg.page_stream.connections_per_network = 2;
    let (src, dst) = pair(cfg).await;
    let links = proxies(&dst).await;
    let sink = CheckingSink::new(PAGES);
    let rx = dst.accept_page_stream(10, 1, sink.clone()).unwrap();
    let targets: Vec<_> = links.iter().map(|l| l.local_addr()).collect();
    let tx = Arc::new(src.open_page_stream(2, &targets, 10).await.unwrap());
    wait_until(LONG, "all four connections up", || {
        tx.stats().paths.iter().filter(|p| p.alive).count() == 4
    })
    .await;
    let stats = tx.stats();
    // Two connections to each network's address, in network order.
    let remotes: Vec<_> = stats.paths.iter().map(|p| p.remote).collect();
    assert_eq!(
        remotes,
        vec![targets[0], targets[0], targets[1], targets[1]]
    );

    let first_half = PAGES / 2;
    send_range(&tx, 0, 0, first_half).await;
    tx.barrier(0).await.unwrap();
    for p in &tx.stats().paths {
        assert!(p.bytes_acked > 0, "every connection carried pages: {p:?}");
    }
    // Network 1 goes down: both its connections die, network 2's carry the rest.
    links[0].cut();
    send_range(&tx, 0, first_half, PAGES - first_half).await;
    // Both of network 1's connections are declared dead (their pings go
    // unanswered), whether or not they held pages at the cut.
    wait_until(LONG, "network 1's connections declared dead", || {
        let paths = tx.stats().paths;
        !paths[0].alive && !paths[1].alive
    })
    .await;
    let tx = Arc::into_inner(tx).unwrap_or_else(|| panic!("sender still shared"));
    let stats = tx.finish().await.unwrap();
    rx.wait().await.unwrap();
    sink.assert_all(0..PAGES, 0);
    let alive: Vec<bool> = stats.paths.iter().map(|p| p.alive).collect();
    assert_eq!(alive, vec![false, false, true, true]);
}

/// Samples `bytes_acked` of a sender until `stop`.
fn sampler(
    tx: Arc<PageStreamSender>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(Instant, u64)>> {
    tokio::spawn(async move {
        let mut samples = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            samples.push((Instant::now(), tx.stats().bytes_acked));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        samples
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_one_path_half_way_loses_nothing() {
    const PAGES: u64 = (512 << 20) / PAGE_SIZE as u64;
    let (src, dst) = pair(NetworkConfig::loopback()).await;
    let links = proxies(&dst).await;
    let sink = CheckingSink::new(PAGES);
    let rx = dst.accept_page_stream(8, 1, sink.clone()).unwrap();
    let targets: Vec<_> = links.iter().map(|l| l.local_addr()).collect();
    let tx = Arc::new(src.open_page_stream(2, &targets, 8).await.unwrap());

    let stop = Arc::new(AtomicBool::new(false));
    let samples = sampler(tx.clone(), stop.clone());
    // Cuts path 0 once half the data is acknowledged, then times how long the sender
    // takes to notice and to get everything queued before the cut delivered again.
    let watcher = {
        let tx = tx.clone();
        let half = 256u64 << 20;
        tokio::spawn(async move {
            wait_until(LONG, "half the data acknowledged", || {
                tx.stats().bytes_acked >= half
            })
            .await;
            let queued = tx.stats().chunks_queued;
            links[0].cut();
            let cut_at = Instant::now();
            wait_until(LONG, "path 0 declared dead", || !tx.stats().paths[0].alive).await;
            let detected = cut_at.elapsed();
            // What a barrier issued at the cut waits for: every chunk queued before it
            // (including those lost with path 0) applied.
            wait_until(LONG, "pre-cut chunks applied", || {
                tx.stats().applied_below > queued
            })
            .await;
            (links, cut_at, detected, cut_at.elapsed())
        })
    };
    send_range(&tx, 0, 0, PAGES).await;
    let (links, cut_at, detected, recovered) = watcher.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let samples = samples.await.unwrap();
    let tx = Arc::into_inner(tx).unwrap_or_else(|| panic!("sampler still holds the sender"));
    let stats = tx.finish().await.unwrap();
    rx.wait().await.unwrap();

    sink.assert_all(0..PAGES, 0);
    // Longest time after the cut without any new acknowledgement.
    let mut stall = Duration::ZERO;
    let after: Vec<_> = samples.iter().filter(|(t, _)| *t >= cut_at).collect();
    let mut last_progress = cut_at;
    let mut last_acked = after.first().map_or(0, |s| s.1);
    for (t, acked) in after {
        if *acked > last_acked {
            stall = stall.max(t.duration_since(last_progress));
            last_progress = *t;
            last_acked = *acked;
        }
    }
    println!(
        "cut at ~50%: dead-path detection {detected:?}, longest ack stall {stall:?}, \
         a barrier issued at the cut completes after {recovered:?}; resent chunks {}; proxy {:?}",
        stats.paths[1].chunks_resent,
        links[0].stats()
    );
    assert!(!stats.paths[0].alive || stats.paths[0].times_down >= 1);
    assert!(
        stats.paths[1].chunks_resent > 0,
        "lost chunks went again on path 1"
    );
    assert!(detected < Duration::from_secs(2), "{detected:?}");
    assert!(recovered < Duration::from_secs(5), "{recovered:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_paths_cut_fails_clearly_within_bounded_time() {
    const PAGES: u64 = 16384;
    let (src, dst) = pair(NetworkConfig::loopback()).await;
    let links = proxies(&dst).await;
    let sink = CheckingSink::new(PAGES);
    let rx = dst.accept_page_stream(9, 1, sink.clone()).unwrap();
    let targets: Vec<_> = links.iter().map(|l| l.local_addr()).collect();
    let tx = src.open_page_stream(2, &targets, 9).await.unwrap();
    send_range(&tx, 0, 0, PAGES).await;
    tx.barrier(0).await.unwrap();

    for l in &links {
        l.cut();
    }
    let cut_at = Instant::now();
    let cfg = src.config().page_stream.clone();
    let bound = cfg.path_dead_after + cfg.fail_after + Duration::from_secs(2);
    // Keep sending: the sender must not hang once its budget is full.
    let result = tokio::time::timeout(bound + Duration::from_secs(10), async {
        loop {
            if let Err(e) = tx.send_bytes(1, 0, Bytes::from(pages(0, 1024, 1))).await {
                break e;
            }
        }
    })
    .await
    .expect("sender hung with every path cut");
    let failed_after = cut_at.elapsed();
    println!("both paths cut: sender failed after {failed_after:?}: {result:?}");
    assert!(
        matches!(result, PageStreamError::AllPathsDead { peer: 2, .. }),
        "expected AllPathsDead, got {result:?}"
    );
    assert!(failed_after < bound, "{failed_after:?} > {bound:?}");
    assert!(matches!(
        tx.barrier(1).await,
        Err(PageStreamError::AllPathsDead { .. })
    ));
    // The receiver notices too, within the same kind of bound.
    let r = tokio::time::timeout(bound, rx.wait())
        .await
        .expect("receiver hung");
    assert!(
        matches!(r, Err(PageStreamError::AllPathsDead { .. })),
        "{r:?}"
    );
    sink.assert_all(0..PAGES, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_path_rejoins_when_restored() {
    const PAGES: u64 = 8192;
    let (src, dst) = pair(NetworkConfig::loopback()).await;
    let links = proxies(&dst).await;
    let sink = CheckingSink::new(PAGES);
    let rx = dst.accept_page_stream(10, 1, sink.clone()).unwrap();
    let targets: Vec<_> = links.iter().map(|l| l.local_addr()).collect();
    let tx = Arc::new(src.open_page_stream(2, &targets, 10).await.unwrap());
    wait_until(LONG, "both paths up", || {
        tx.stats().paths.iter().all(|p| p.alive)
    })
    .await;

    // Keep rounds flowing until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let producer = {
        let (tx, stop, rounds) = (tx.clone(), stop.clone(), rounds.clone());
        tokio::spawn(async move {
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                send_range(&tx, round, 0, PAGES).await;
                rounds.store(u64::from(round), Ordering::Relaxed);
                round += 1;
            }
            round - 1
        })
    };

    links[0].cut();
    wait_until(LONG, "path 0 dropped", || !tx.stats().paths[0].alive).await;
    let acked_on_0 = tx.stats().paths[0].bytes_acked;
    let round_at_cut = rounds.load(Ordering::Relaxed);
    wait_until(LONG, "a round completes on path 1 alone", || {
        rounds.load(Ordering::Relaxed) > round_at_cut + 1
    })
    .await;
    links[0].restore();
    let restored = Instant::now();
    wait_until(LONG, "path 0 rejoins", || tx.stats().paths[0].alive).await;
    let rejoin = restored.elapsed();
    wait_until(LONG, "path 0 carries pages again", || {
        tx.stats().paths[0].bytes_acked > acked_on_0 + (8 << 20)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let last_round = producer.await.unwrap();
    let tx = Arc::into_inner(tx).unwrap();
    let stats = tx.finish().await.unwrap();
    rx.wait().await.unwrap();
    println!(
        "path 0 rejoined {rejoin:?} after restore; paths: {:?}",
        stats.paths
    );
    assert!(stats.paths[0].times_up >= 2, "{:?}", stats.paths[0]);
    assert!(rx.stats().path_connections >= 3);
    sink.assert_all(0..PAGES, last_round);
}

/// What a blackout with a silently dead path cost (see the test below).
struct Blackout {
    /// From the cut to the last batch's barrier completing.
    barrier: Duration,
    /// Chunks the dead path took from the queue after the cut (lost with it; its
    /// copies of the survivor's chunks are not counted).
    lost_on_dead_path: u64,
    hedged_on_survivor: u64,
    cfg: PageStreamConfig,
}

/// A migration's last round over two paths, the first of which has just died
/// silently (its proxy blackholes everything; nothing has noticed yet): the guest's
/// memory goes as round 0, then path 0 is cut, hedging is set to `hedge`, and the
/// blackout's dirty pages go as round 1 and are waited for with a barrier.
async fn blackout_with_a_silent_path(hedge: bool) -> Blackout {
    const PAGES: u64 = 4096;
    const DIRTY: u64 = 1024;
    let mut cfg = NetworkConfig::loopback();
    cfg.page_stream.connections_per_network = 1;
    // Windows of four chunks: however quickly path 1 gets its acknowledgements, it
    // cannot take the whole last round before path 0 takes its share.
    cfg.page_stream.path_window_bytes = 4 * cfg.page_stream.chunk_pages as usize * PAGE_SIZE;
    let (src, dst) = pair(cfg).await;
    let links = proxies(&dst).await;
    let sink = CheckingSink::new(PAGES);
    let rx = dst.accept_page_stream(12, 1, sink.clone()).unwrap();
    let targets: Vec<_> = links.iter().map(|l| l.local_addr()).collect();
    let tx = src.open_page_stream(2, &targets, 12).await.unwrap();
    wait_until(LONG, "both paths up", || {
        tx.stats().paths.iter().all(|p| p.alive)
    })
    .await;
    send_range(&tx, 0, 0, PAGES).await;
    tx.barrier(0).await.unwrap();
    let sent_on_0 = tx.stats().paths[0].chunks_sent;

    links[0].cut();
    let cut_at = Instant::now();
    tx.hedge(hedge);
    send_range(&tx, 1, 0, DIRTY).await;
    tx.barrier(1).await.unwrap();
    let barrier = cut_at.elapsed();

    let stats = tx.finish().await.unwrap();
    rx.wait().await.unwrap();
    sink.assert_all(0..DIRTY, 1);
    sink.assert_all(DIRTY..PAGES, 0);
    let out = Blackout {
        barrier,
        lost_on_dead_path: stats.paths[0].chunks_sent - stats.paths[0].chunks_hedged - sent_on_0,
        hedged_on_survivor: stats.paths[1].chunks_hedged,
        cfg: src.config().page_stream.clone(),
    };
    println!(
        "blackout with path 0 silently dead, hedging {hedge}: barrier after {barrier:?}; \
         chunks lost on path 0 {}, hedged on path 1 {}, resent on path 1 {}",
        out.lost_on_dead_path, out.hedged_on_survivor, stats.paths[1].chunks_resent
    );
    src.shutdown().await;
    dst.shutdown().await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedging_keeps_a_silently_dead_path_out_of_the_blackout() {
    // Without hedging, the chunks the dead path took wait for it to be declared
    // dead: the barrier takes the dead-path deadline (less at most one heartbeat,
    // the path's last sign of life may precede the cut by that much).
    let plain = blackout_with_a_silent_path(false).await;
    assert!(
        plain.lost_on_dead_path > 0,
        "path 0 took none of the last round"
    );
    let deadline = plain.cfg.path_dead_after - plain.cfg.heartbeat_interval;
    assert!(plain.barrier >= deadline, "{:?}", plain.barrier);
    assert_eq!(plain.hedged_on_survivor, 0);

    // With hedging, path 1 carries a copy of each of them at once.
    let hedged = blackout_with_a_silent_path(true).await;
    assert!(
        hedged.lost_on_dead_path > 0,
        "path 0 took none of the last round"
    );
    assert!(hedged.hedged_on_survivor >= hedged.lost_on_dead_path);
    assert!(
        hedged.barrier < Duration::from_millis(150),
        "{:?} (without hedging {:?})",
        hedged.barrier,
        plain.barrier
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_cancel_sink_failure_and_unknown_streams() {
    let (src, dst) = pair(NetworkConfig::loopback()).await;
    let targets = dst.local_addrs();

    // Nobody expects stream 99.
    let r = src.open_page_stream(2, &targets, 99).await;
    assert!(
        matches!(r, Err(PageStreamError::Connect(RpcError::Refused(_)))),
        "{:?}",
        r.err()
    );
    // Stream 11 is expected from node 3, not node 1.
    let _rx = dst
        .accept_page_stream(11, 3, CheckingSink::new(16))
        .unwrap();
    let r = src.open_page_stream(2, &targets, 11).await;
    assert!(
        matches!(r, Err(PageStreamError::Connect(RpcError::PeerIdentity(_)))),
        "{:?}",
        r.err()
    );
    assert!(matches!(
        dst.accept_page_stream(11, 1, CheckingSink::new(16)),
        Err(PageStreamError::AlreadyRegistered(11))
    ));

    // Barrier: round 0 applied before round 1 is sent; later rounds win.
    let sink = CheckingSink::new(256);
    let rx = dst.accept_page_stream(12, 1, sink.clone()).unwrap();
    let tx = src.open_page_stream(2, &targets, 12).await.unwrap();
    send_range(&tx, 0, 0, 256).await;
    tx.barrier(0).await.unwrap();
    sink.assert_all(0..256, 0);
    tx.send_zero(1, 0, 128).await.unwrap();
    send_range(&tx, 1, 128, 128).await;
    tx.barrier(1).await.unwrap();
    assert!((0..128).all(|p| sink.round_of(p) == ZERO));
    sink.assert_all(128..256, 1);
    assert_eq!(rx.page_round(200), Some(1));
    assert_eq!(rx.stats().zero_pages_applied, 128);

    // Sender cancels: the receiver learns why.
    tx.cancel("operator aborted the migration");
    let r = rx.wait().await;
    assert!(
        matches!(&r, Err(PageStreamError::PeerCancelled(m)) if m.contains("operator aborted")),
        "{r:?}"
    );
    let r = tx.barrier(1).await;
    assert!(matches!(r, Err(PageStreamError::Cancelled(_))), "{r:?}");

    // Receiver cancels: the sender learns why.
    let rx = dst
        .accept_page_stream(13, 1, CheckingSink::new(256))
        .unwrap();
    let tx = src.open_page_stream(2, &targets, 13).await.unwrap();
    rx.cancel("target out of memory");
    let r = tokio::time::timeout(LONG, async {
        loop {
            if let Err(e) = tx.send_bytes(0, 0, Bytes::from(pages(0, 64, 0))).await {
                return e;
            }
        }
    })
    .await
    .unwrap();
    assert!(
        matches!(&r, PageStreamError::PeerCancelled(m) if m.contains("out of memory")),
        "{r:?}"
    );

    // The sink refuses a page: the stream fails on both sides with the sink's reason.
    let rx = dst
        .accept_page_stream(14, 1, CheckingSink::failing_at(256, 100))
        .unwrap();
    let tx = src.open_page_stream(2, &targets, 14).await.unwrap();
    send_range(&tx, 0, 0, 256).await;
    let r = tx.barrier(0).await;
    assert!(
        matches!(&r, Err(PageStreamError::SinkFailed(m)) if m.contains("injected failure")),
        "{r:?}"
    );
    assert!(matches!(
        rx.wait().await,
        Err(PageStreamError::SinkFailed(_))
    ));
}

/// Records the largest run one `apply` was asked to write.
#[derive(Default)]
struct SliceSink {
    largest: std::sync::atomic::AtomicU32,
    pages: AtomicU64,
}

impl ferry_transport::PageSink for SliceSink {
    fn apply(&self, _first: u64, count: u32, _data: Option<&[u8]>) -> Result<(), String> {
        self.largest.fetch_max(count, Ordering::Relaxed);
        self.pages.fetch_add(u64::from(count), Ordering::Relaxed);
        Ok(())
    }
}

/// Issue 15, hole 4: a zero chunk of 30 bytes may claim 65 536 pages (256 MiB
/// of zeroing). The receiver applies it in slices of at most 256 pages, each
/// under the stream's lock on its own, so one such chunk never holds the
/// stream (and the pages other paths deliver) for a 256 MiB memset; another
/// node's stream to the same receiver is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_chunk_claiming_65536_pages_is_applied_in_small_slices() {
    let ca = ClusterCa::generate("stream-test").unwrap();
    let src = start_node(&ca, 1, &[1, 2], NetworkConfig::loopback()).await;
    let dst = start_node(&ca, 2, &[1, 2], NetworkConfig::loopback()).await;
    let honest = start_node(&ca, 3, &[1, 2], NetworkConfig::loopback()).await;
    let sink = Arc::new(SliceSink::default());
    let rx = dst.accept_page_stream(9, 1, sink.clone()).unwrap();
    let honest_sink = CheckingSink::new(1024);
    let honest_rx = dst.accept_page_stream(10, 3, honest_sink.clone()).unwrap();
    let tx = src
        .open_page_stream(2, &dst.local_addrs(), 9)
        .await
        .unwrap();
    const CLAIMED: u64 = 65_536;
    let claims = tokio::spawn(async move {
        for i in 0..64 {
            tx.send_zero(1, (i % 4) * CLAIMED, CLAIMED).await.unwrap();
        }
        tx.finish().await.unwrap()
    });
    let honest_tx = honest
        .open_page_stream(2, &dst.local_addrs(), 10)
        .await
        .unwrap();
    send_range(&honest_tx, 0, 0, 1024).await;
    honest_tx.finish().await.unwrap();
    honest_rx.wait().await.unwrap();
    honest_sink.assert_all(0..1024, 0);
    let stats = claims.await.unwrap();
    rx.wait().await.unwrap();
    // Every page claimed at least once; a claim that arrived after a newer
    // one on the other path was stale and skipped.
    let applied = sink.pages.load(Ordering::Relaxed);
    assert!((4 * CLAIMED..=64 * CLAIMED).contains(&applied), "{applied}");
    let largest = sink.largest.load(Ordering::Relaxed);
    assert!(largest <= 256, "one apply zeroed {largest} pages");
    let chunks: u64 = stats.paths.iter().map(|p| p.chunks_acked).sum();
    assert!(
        chunks <= 128,
        "64 claims went out as {chunks} chunks, not one per slice"
    );
}
