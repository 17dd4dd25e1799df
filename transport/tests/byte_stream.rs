//! The byte stream (a QEMU migration stream's carrier) through the public API: 64 MiB
//! in odd-sized pieces over two networks, one network cut mid-stream, a hedged
//! switchover past a silently dead network, both cut, a
//! slow consumer, cancels from either side, and the Unix-socket pumps (a burst
//! followed by silence, a dead output), each checked byte for byte against the
//! sequence written.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{addr, start_node, wait_until};
use ferry_chaos::proxy::LinkProxy;
use ferry_transport::{
    ByteStreamError, ByteStreamReceiver, ClusterCa, NetworkConfig, PageStreamError, RpcError,
    RpcNode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LONG: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

/// Source node 1 and target node 2, both on networks 1 and 2.
async fn pair(cfg: NetworkConfig) -> (Arc<RpcNode>, Arc<RpcNode>) {
    let ca = ClusterCa::generate("byte-stream-test").unwrap();
    let src = start_node(&ca, 1, &[1, 2], cfg.clone()).await;
    let dst = start_node(&ca, 2, &[1, 2], cfg).await;
    (src, dst)
}

/// One proxy per network in front of the target, on 127.K.0.100.
async fn proxies(dst: &RpcNode) -> Vec<LinkProxy> {
    let mut out = Vec::new();
    for (i, a) in dst.local_addrs().into_iter().enumerate() {
        out.push(
            LinkProxy::start(addr(i as u8 + 1, 100), a, 7 + i as u64)
                .await
                .unwrap(),
        );
    }
    out
}

/// A reproducible byte sequence (xorshift64*): the writer produces it, the reader
/// regenerates it and compares every byte.
struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
    /// Bytes produced so far.
    at: u64,
}

impl Pattern {
    fn new(seed: u64) -> Pattern {
        Pattern {
            state: seed | 1,
            word: [0; 8],
            used: 8,
            at: 0,
        }
    }

    fn fill(&mut self, out: &mut [u8]) {
        for b in out.iter_mut() {
            if self.used == 8 {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.word = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
                self.used = 0;
            }
            *b = self.word[self.used];
            self.used += 1;
        }
        self.at += out.len() as u64;
    }

    fn next(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }

    /// Panics unless `got` is the sequence's next `got.len()` bytes.
    fn check(&mut self, got: &[u8]) {
        let at = self.at;
        let want = self.next(got.len());
        if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
            panic!("byte {} differs from what was written", at + i as u64);
        }
    }
}

/// Odd piece sizes: below, at and across page and chunk boundaries.
const PIECES: [usize; 8] = [1, 4093, 4094, 4095, 65_537, 333_333, 7, 262_144];

/// Writes `total` bytes of `Pattern::new(seed)` into `out` in [`PIECES`]-sized pieces.
async fn produce<W: AsyncWriteExt + Unpin>(out: &mut W, seed: u64, total: u64) {
    let mut p = Pattern::new(seed);
    let mut i = 0;
    while p.at < total {
        let n = (PIECES[i % PIECES.len()] as u64).min(total - p.at) as usize;
        out.write_all(&p.next(n)).await.unwrap();
        i += 1;
    }
}

/// Reads `rx` to its end with odd-sized reads, checking every byte; returns the count.
async fn consume(rx: &mut ByteStreamReceiver, seed: u64) -> Result<u64, ByteStreamError> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut i = 0;
    loop {
        let want = PIECES[i % PIECES.len()].min(buf.len());
        let n = rx.read(&mut buf[..want]).await?;
        if n == 0 {
            return Ok(p.at);
        }
        p.check(&buf[..n]);
        i += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_in_odd_pieces_arrive_identical_over_two_networks() {
    const TOTAL: u64 = 64 * MIB;
    let (src, dst) = pair(NetworkConfig::loopback()).await;
    let mut rx = dst.accept_byte_stream(1, 1).unwrap();
    let mut tx = src
        .open_byte_stream(2, &dst.local_addrs(), 1)
        .await
        .unwrap();
    let started = Instant::now();
    let reader = tokio::spawn(async move {
        let n = consume(&mut rx, 42).await;
        (n, rx.finished().await)
    });
    let mut p = Pattern::new(42);
    let mut i = 0;
    while p.at < TOTAL {
        let n = (PIECES[i % PIECES.len()] as u64).min(TOTAL - p.at) as usize;
        tx.write(&p.next(n)).await.unwrap();
        i += 1;
    }
    let sent = tx.finish().await.unwrap();
    let (read, done) = reader.await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(read.unwrap(), TOTAL);
    let done = done.unwrap();
    assert_eq!(done.bytes_delivered, TOTAL);
    assert_eq!(done.declared_length, Some(TOTAL));
    assert!(done.page.finished);
    assert_eq!(sent.bytes, TOTAL);
    println!(
        "64 MiB in {elapsed:?} ({:.0} MiB/s); per path acked MiB: {:?}; peak buffered {} KiB",
        TOTAL as f64 / MIB as f64 / elapsed.as_secs_f64(),
        sent.page
            .paths
            .iter()
            .map(|p| p.bytes_acked / MIB)
            .collect::<Vec<_>>(),
        done.peak_buffered_bytes >> 10
    );
    for net in dst.local_addrs() {
        let on_net: u64 = sent
            .page
            .paths
            .iter()
            .filter(|p| p.remote == net)
            .map(|p| p.bytes_acked)
            .sum();
        assert!(
            on_net > 4 * MIB,
            "network {net} carried a real share: {:?}",
            sent.page.paths
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_cut_mid_stream_loses_nothing() {
    const TOTAL: u64 = 96 * MIB;
    let (src, dst) = pair(NetworkConfig::loopback()).await;
    let links = proxies(&dst).await;
    let targets: Vec<_> = links.iter().map(|l| l.local_addr()).collect();
    let rx = dst.accept_byte_stream(2, 1).unwrap();
    let tx = src.open_byte_stream(2, &targets, 2).await.unwrap();
    wait_until(LONG, "both paths up", || {
        tx.stats().page.paths.iter().all(|p| p.alive)
    })
    .await;

    // As with QEMU: the source writes into a Unix socket the pump reads, the target's
    // pump writes into a Unix socket the consumer reads.
    let (mut qemu_out, mut src_sock) = tokio::net::UnixStream::pair().unwrap();
    let (mut dst_sock, mut qemu_in) = tokio::net::UnixStream::pair().unwrap();
    let producer = tokio::spawn(async move {
        produce(&mut qemu_out, 5, TOTAL).await;
        qemu_out.shutdown().await.unwrap();
    });
    let consumer = tokio::spawn(async move {
        let mut p = Pattern::new(5);
        let mut buf = vec![0u8; 100_003];
        loop {
            let n = qemu_in.read(&mut buf).await.unwrap();
            if n == 0 {
                return p.at;
            }
            p.check(&buf[..n]);
        }
    });
    // A canceller only holds the stream weakly: keeping one does not stop `finish`.
    let _canceller = tx.canceller();
    let source = tokio::spawn(async move { tx.pump_from(&mut src_sock).await });
    let target = tokio::spawn(async move { rx.pump_into(&mut dst_sock).await });
    // Cut network 1 once a third has arrived (the sender's stats live in the pump
    // task: the link's own counter says how far it got).
    wait_until(LONG, "a third through network 1's link", || {
        links[0].stats().forwarded_bytes > TOTAL / 6
    })
    .await;
    links[0].cut();
    let sent = tokio::time::timeout(LONG, source)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let got = tokio::time::timeout(LONG, target)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    producer.await.unwrap();
    assert_eq!(consumer.await.unwrap(), TOTAL);
    assert_eq!(got.bytes_delivered, TOTAL);
    assert_eq!(sent.bytes, TOTAL);
    println!(
        "cut network 1 mid-stream: resent chunks {}, paths {:?}",
        sent.chunks_resent,
        sent.page
            .paths
            .iter()
            .map(|p| (p.alive, p.bytes_acked / MIB, p.chunks_resent))
            .collect::<Vec<_>>()
    );
    assert!(
        sent.page.paths[0].times_down >= 1,
        "{:?}",
        sent.page.paths[0]
    );
    assert!(sent.chunks_resent > 0, "what the cut path lost went again");
    assert!(sent.page.paths[1].bytes_acked > sent.page.paths[0].bytes_acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedged_switchover_does_not_wait_for_a_silently_dead_network() {
    const BEFORE: u64 = 8 * MIB;
    const TOTAL: u64 = 9 * MIB;
    let (src, dst) = pair(NetworkConfig::loopback()).await;
    let links = proxies(&dst).await;
    let targets: Vec<_> = links.iter().map(|l| l.local_addr()).collect();
    let mut rx = dst.accept_byte_stream(4, 1).unwrap();
    let mut tx = src.open_byte_stream(2, &targets, 4).await.unwrap();
    wait_until(LONG, "both paths up", || {
        tx.stats().page.paths.iter().all(|p| p.alive)
    })
    .await;
    let reader = tokio::spawn(async move {
        let n = consume(&mut rx, 9).await;
        (n, rx.finished().await)
    });
    let mut p = Pattern::new(9);
    tx.write(&p.next(BEFORE as usize)).await.unwrap();
    tx.flush().await.unwrap();
    wait_until(LONG, "network 1's link carried pages", || {
        links[0].stats().forwarded_bytes > MIB
    })
    .await;
    // The switchover: network 1 has just died, silently; the engine, holding only
    // a canceller (a pump owns the sender), turns hedging on for the last state.
    links[0].cut();
    let cut_at = Instant::now();
    tx.canceller().hedge(true);
    tx.write(&p.next((TOTAL - BEFORE) as usize)).await.unwrap();
    let sent = tx.finish().await.unwrap();
    let switchover = cut_at.elapsed();
    let (read, done) = reader.await.unwrap();
    assert_eq!(read.unwrap(), TOTAL);
    assert_eq!(done.unwrap().bytes_delivered, TOTAL);
    assert_eq!(sent.bytes, TOTAL);
    let dead_after = src.config().page_stream.path_dead_after;
    println!(
        "hedged switchover with network 1 silently dead: finished {switchover:?} after the \
         cut (dead-path deadline {dead_after:?}); paths (sent, hedged, resent): {:?}",
        sent.page
            .paths
            .iter()
            .map(|p| (p.chunks_sent, p.chunks_hedged, p.chunks_resent))
            .collect::<Vec<_>>()
    );
    assert!(
        sent.page.paths[1].chunks_hedged > 0,
        "{:?}",
        sent.page.paths
    );
    assert!(switchover < dead_after, "{switchover:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_networks_cut_fail_clearly_on_both_sides() {
    let (src, dst) = pair(NetworkConfig::loopback()).await;
    let links = proxies(&dst).await;
    let targets: Vec<_> = links.iter().map(|l| l.local_addr()).collect();
    let mut rx = dst.accept_byte_stream(3, 1).unwrap();
    let mut tx = src.open_byte_stream(2, &targets, 3).await.unwrap();
    let mut p = Pattern::new(3);
    tx.write(&p.next(3 * MIB as usize)).await.unwrap();
    tx.flush().await.unwrap();
    let mut check = Pattern::new(3);
    let mut buf = vec![0u8; 1 << 16];
    while check.at < 3 * MIB {
        let n = rx.read(&mut buf).await.unwrap();
        check.check(&buf[..n]);
    }

    for l in &links {
        l.cut();
    }
    let cut_at = Instant::now();
    let cfg = src.config().page_stream.clone();
    let bound = cfg.path_dead_after + cfg.fail_after + Duration::from_secs(2);
    // The reader waits for bytes that will not come: it must fail, not hang.
    let reader = tokio::spawn(async move {
        let r = rx.read(&mut buf).await;
        (r, cut_at.elapsed())
    });
    // The writer keeps writing: it must fail once its budget is full, not hang.
    let w = tokio::time::timeout(bound + Duration::from_secs(10), async {
        loop {
            if let Err(e) = tx.write(&p.next(1 << 20)).await {
                break e;
            }
        }
    })
    .await
    .expect("writer hung with both networks cut");
    let wrote_for = cut_at.elapsed();
    let (r, read_for) = tokio::time::timeout(bound + Duration::from_secs(10), reader)
        .await
        .expect("reader hung with both networks cut")
        .unwrap();
    println!("both cut: writer failed after {wrote_for:?}: {w}; reader after {read_for:?}: {r:?}");
    assert!(
        matches!(
            w,
            ByteStreamError::Stream(PageStreamError::AllPathsDead { peer: 2, .. })
        ),
        "{w:?}"
    );
    assert!(
        matches!(
            r,
            Err(ByteStreamError::Stream(
                PageStreamError::AllPathsDead { .. }
            ))
        ),
        "{r:?}"
    );
    assert!(
        wrote_for < bound && read_for < bound,
        "{wrote_for:?} {read_for:?} > {bound:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_keeps_the_targets_buffer_within_the_senders_budget() {
    const TOTAL: u64 = 24 * MIB;
    let mut cfg = NetworkConfig::loopback();
    cfg.page_stream.byte_stream_budget_bytes = 2 << 20;
    cfg.page_stream.path_window_bytes = 1 << 20;
    let budget = cfg.page_stream.byte_stream_budget_bytes as u64;
    let chunk = u64::from(cfg.page_stream.chunk_pages) * 4096;
    let (src, dst) = pair(cfg).await;
    let mut rx = dst.accept_byte_stream(4, 1).unwrap();
    let mut tx = src
        .open_byte_stream(2, &dst.local_addrs(), 4)
        .await
        .unwrap();
    let writer = tokio::spawn(async move {
        let mut p = Pattern::new(4);
        while p.at < TOTAL {
            tx.write(&p.next(1 << 20)).await.unwrap();
        }
        tx.finish().await.unwrap()
    });
    // Reads 16 KiB, then waits a millisecond: ~16 MiB/s, far below what the
    // networks carry, so everything the sender may send piles up at the target
    // unless the target holds its acknowledgements.
    let mut check = Pattern::new(4);
    let mut buf = vec![0u8; 16 << 10];
    let mut peak = 0;
    loop {
        let n = rx.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        check.check(&buf[..n]);
        peak = peak.max(rx.stats().buffered_bytes);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let sent = writer.await.unwrap();
    let got = rx.finished().await.unwrap();
    assert_eq!(check.at, TOTAL);
    println!(
        "slow consumer: peak buffered {} KiB (sampled {} KiB), budget {} KiB",
        got.peak_buffered_bytes >> 10,
        peak >> 10,
        budget >> 10
    );
    assert_eq!(sent.bytes, TOTAL);
    assert!(
        got.peak_buffered_bytes <= budget + chunk,
        "target buffered {} bytes, more than the sender's budget {budget} + a chunk",
        got.peak_buffered_bytes
    );
    // The bound was reached, not just never tested: the consumer was the bottleneck.
    assert!(
        got.peak_buffered_bytes >= budget / 2,
        "{}",
        got.peak_buffered_bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_refusals_are_clear_on_both_sides() {
    let (src, dst) = pair(NetworkConfig::loopback()).await;
    let targets = dst.local_addrs();

    // Nobody expects stream 99.
    let r = src.open_byte_stream(2, &targets, 99).await;
    assert!(
        matches!(
            r,
            Err(ByteStreamError::Stream(PageStreamError::Connect(
                RpcError::Refused(_)
            )))
        ),
        "{:?}",
        r.err()
    );

    // The source cancels: the target's reader learns why, after the bytes before.
    let mut rx = dst.accept_byte_stream(5, 1).unwrap();
    let mut tx = src.open_byte_stream(2, &targets, 5).await.unwrap();
    tx.write(&Pattern::new(9).next(100_000)).await.unwrap();
    tx.flush().await.unwrap();
    let mut check = Pattern::new(9);
    let mut buf = vec![0u8; 1 << 16];
    while check.at < 100_000 {
        let n = rx.read(&mut buf).await.unwrap();
        check.check(&buf[..n]);
    }
    tx.cancel("operator aborted the migration");
    let r = tokio::time::timeout(LONG, rx.read(&mut buf)).await.unwrap();
    assert!(
        matches!(&r, Err(ByteStreamError::Stream(PageStreamError::PeerCancelled(m))) if m.contains("operator aborted")),
        "{r:?}"
    );
    tx.write(b"more").await.unwrap(); // queued: less than a chunk
    let r = tx.flush().await;
    assert!(
        matches!(
            r,
            Err(ByteStreamError::Stream(PageStreamError::Cancelled(_)))
        ),
        "{r:?}"
    );

    // A writer blocked on a full budget (nobody reads) is cancelled from elsewhere.
    let rx = dst.accept_byte_stream(6, 1).unwrap();
    let mut tx = src.open_byte_stream(2, &targets, 6).await.unwrap();
    let canceller = tx.canceller();
    let writer = tokio::spawn(async move {
        let mut p = Pattern::new(6);
        loop {
            if let Err(e) = tx.write(&p.next(1 << 20)).await {
                return (e, p.at);
            }
        }
    });
    let budget = src.config().page_stream.byte_stream_budget_bytes as u64;
    // Nobody reads, so no acknowledgement comes back: each path's window stays at
    // its floor and the writer stops once the budget is queued.
    wait_until(LONG, "pages waiting at the target", || {
        rx.stats().buffered_bytes >= 512 << 10
    })
    .await;
    canceller.cancel("source VM stopped");
    let (e, written) = tokio::time::timeout(LONG, writer).await.unwrap().unwrap();
    assert!(
        matches!(e, ByteStreamError::Stream(PageStreamError::Cancelled(_))),
        "{e:?}"
    );
    assert!(
        written <= budget + 2 * MIB,
        "the writer was held back by the budget: {written}"
    );
    let r = tokio::time::timeout(LONG, rx.finished()).await.unwrap();
    assert!(
        matches!(&r, Err(ByteStreamError::Stream(PageStreamError::PeerCancelled(m))) if m.contains("source VM stopped")),
        "{r:?}"
    );

    // The target cancels: the source learns why.
    let rx = dst.accept_byte_stream(7, 1).unwrap();
    let mut tx = src.open_byte_stream(2, &targets, 7).await.unwrap();
    rx.cancel("target QEMU exited");
    let e = tokio::time::timeout(LONG, async {
        loop {
            if let Err(e) = tx.write(&[0u8; 1 << 16]).await {
                return e;
            }
        }
    })
    .await
    .unwrap();
    assert!(
        matches!(&e, ByteStreamError::Stream(PageStreamError::PeerCancelled(m)) if m.contains("QEMU exited")),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pumps_deliver_a_paused_burst_and_report_a_dead_output() {
    let (src, dst) = pair(NetworkConfig::loopback()).await;
    let targets = dst.local_addrs();

    // The source writes a burst that fills no chunk and then waits, without closing,
    // until the target has it all (as QEMU waits at pre-switchover): the pump must
    // send a part-filled chunk when its input goes quiet.
    const BURST: u64 = 10_000;
    let rx = dst.accept_byte_stream(8, 1).unwrap();
    let tx = src.open_byte_stream(2, &targets, 8).await.unwrap();
    let (mut qemu_out, mut src_sock) = tokio::net::UnixStream::pair().unwrap();
    let (mut dst_sock, mut qemu_in) = tokio::net::UnixStream::pair().unwrap();
    let source = tokio::spawn(async move { tx.pump_from(&mut src_sock).await });
    let target = tokio::spawn(async move { rx.pump_into(&mut dst_sock).await });
    qemu_out
        .write_all(&Pattern::new(11).next(BURST as usize))
        .await
        .unwrap();
    let mut check = Pattern::new(11);
    let mut buf = vec![0u8; 1 << 16];
    tokio::time::timeout(LONG, async {
        while check.at < BURST {
            let n = qemu_in.read(&mut buf).await.unwrap();
            check.check(&buf[..n]);
        }
    })
    .await
    .expect("the burst stayed in the source's pump");
    // Then the rest, and the end.
    qemu_out
        .write_all(&Pattern::new(12).next(100_000))
        .await
        .unwrap();
    drop(qemu_out);
    let mut rest = Pattern::new(12);
    loop {
        let n = qemu_in.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        rest.check(&buf[..n]);
    }
    assert_eq!(rest.at, 100_000);
    let sent = source.await.unwrap().unwrap();
    let got = target.await.unwrap().unwrap();
    assert_eq!(sent.bytes, BURST + 100_000);
    assert_eq!(got.bytes_delivered, BURST + 100_000);

    // The target's output dies (its QEMU exited): both pumps fail, the source
    // with the target's reason.
    let rx = dst.accept_byte_stream(9, 1).unwrap();
    let tx = src.open_byte_stream(2, &targets, 9).await.unwrap();
    let (mut qemu_out, mut src_sock) = tokio::net::UnixStream::pair().unwrap();
    let (mut dst_sock, qemu_in) = tokio::net::UnixStream::pair().unwrap();
    drop(qemu_in);
    let source = tokio::spawn(async move { tx.pump_from(&mut src_sock).await });
    let target = tokio::spawn(async move { rx.pump_into(&mut dst_sock).await });
    let producer = tokio::spawn(async move {
        let mut p = Pattern::new(13);
        // Fails once the source's pump is gone; until then, keeps it busy.
        while qemu_out.write_all(&p.next(1 << 16)).await.is_ok() {}
    });
    let t = tokio::time::timeout(LONG, target).await.unwrap().unwrap();
    assert!(matches!(t, Err(ByteStreamError::Output(_))), "{t:?}");
    let s = tokio::time::timeout(LONG, source).await.unwrap().unwrap();
    assert!(
        matches!(&s, Err(ByteStreamError::Stream(PageStreamError::PeerCancelled(m))) if m.contains("output failed")),
        "{s:?}"
    );
    tokio::time::timeout(LONG, producer).await.unwrap().unwrap();
}
