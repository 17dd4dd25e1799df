//! Page-stream throughput on loopback, against raw TCP measured in the same run.
//!
//! `cargo run --release -p ferry-transport --example stream_bench`
//!
//! 1. raw TCP over loopback (one connection, no encryption): the ceiling;
//! 2. the page stream (QUIC, TLS 1.3) on one path and on two paths, at the default
//!    MTU and at the jumbo MTU;
//! 3. each path through a chaos link proxy limited to the same rate: two paths must
//!    deliver at least 1.8x one path;
//! 4. the byte stream (a QEMU migration stream's carrier) on two paths at the jumbo
//!    MTU, Unix socket in, Unix socket out, as QEMU uses it.
//!
//! The last line sums everything up as `key=value` pairs. `--quick`: a quarter of the
//! bytes; `--byte-budget-mib N`: the byte stream's in-flight budget.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use ferry_chaos::proxy::LinkProxy;
use ferry_transport::{
    ClusterCa, NetworkConfig, PageSink, RpcNode, DEFAULT_MTU, JUMBO_MTU, PAGE_SIZE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: f64 = (1 << 20) as f64;
const BATCH_PAGES: usize = 1024;

/// Writes every page into a 64 MiB "guest memory" window, as a target VM would.
struct MemorySink {
    memory: std::sync::Mutex<Vec<u8>>,
    bytes: AtomicU64,
}

impl PageSink for MemorySink {
    fn apply(&self, first: u64, count: u32, data: Option<&[u8]>) -> Result<(), String> {
        let mut mem = self.memory.lock().unwrap();
        let slots = (mem.len() / PAGE_SIZE) as u64;
        for i in 0..u64::from(count) {
            let at = (((first + i) % slots) as usize) * PAGE_SIZE;
            match data {
                Some(d) => mem[at..at + PAGE_SIZE]
                    .copy_from_slice(&d[i as usize * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE]),
                None => mem[at..at + PAGE_SIZE].fill(0),
            }
        }
        self.bytes
            .fetch_add(u64::from(count) * PAGE_SIZE as u64, Ordering::Relaxed);
        Ok(())
    }
}

fn payload() -> Bytes {
    let mut v = vec![0u8; BATCH_PAGES * PAGE_SIZE];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for w in v.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    Bytes::from(v)
}

async fn tcp_loopback(bytes: u64) -> f64 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut memory = vec![0u8; 64 << 20];
        let mut got = 0u64;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                return got;
            }
            // Same final copy into "guest memory" as the page sink does.
            let at = (got as usize) % (memory.len() - buf.len());
            memory[at..at + n].copy_from_slice(&buf[..n]);
            got += n as u64;
        }
    });
    let data = payload();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        s.write_all(&data).await.unwrap();
        sent += data.len() as u64;
    }
    s.shutdown().await.unwrap();
    let got = reader.await.unwrap();
    assert_eq!(got, sent);
    got as f64 / MIB / start.elapsed().as_secs_f64()
}

struct Pair {
    src: Arc<RpcNode>,
    dst: Arc<RpcNode>,
    next_stream: u64,
}

/// Two nodes whose datagrams start at `mtu` bytes and grow by discovery up to
/// `ceiling` (`None`: the default ceiling).
async fn pair(ca: &ClusterCa, mtu: u16, ceiling: Option<u16>, tag: u8) -> Pair {
    let defaults = NetworkConfig::default();
    let mut cfg = NetworkConfig {
        mtu,
        mtu_ceiling: ceiling.unwrap_or(defaults.mtu_ceiling),
        ..defaults
    };
    // `--byte-budget-mib N`: the byte stream's in-flight budget, to tune it.
    let args: Vec<String> = std::env::args().collect();
    if let Some(mib) = args
        .windows(2)
        .find(|w| w[0] == "--byte-budget-mib")
        .and_then(|w| w[1].parse::<usize>().ok())
    {
        cfg.page_stream.byte_stream_budget_bytes = mib << 20;
    }
    let at = |net: u8, node: u8| SocketAddr::from(([127, net, tag, node], 0));
    let src = RpcNode::start(ca.issue(1).unwrap(), vec![at(1, 1), at(2, 1)], cfg.clone())
        .await
        .unwrap();
    let dst = RpcNode::start(ca.issue(2).unwrap(), vec![at(1, 2), at(2, 2)], cfg)
        .await
        .unwrap();
    Pair {
        src,
        dst,
        next_stream: 1,
    }
}

/// Streams `bytes` of pages over `targets` and returns MiB/s (first send to last ack).
async fn stream(p: &mut Pair, targets: &[SocketAddr], bytes: u64) -> f64 {
    let sink = Arc::new(MemorySink {
        memory: std::sync::Mutex::new(vec![0u8; 64 << 20]),
        bytes: AtomicU64::new(0),
    });
    let id = p.next_stream;
    p.next_stream += 1;
    let rx = p.dst.accept_page_stream(id, 1, sink.clone()).unwrap();
    let tx = p.src.open_page_stream(2, targets, id).await.unwrap();
    let data = payload();
    let pages = bytes / PAGE_SIZE as u64;
    let start = Instant::now();
    let mut first = 0;
    while first < pages {
        tx.send_bytes(0, first, data.clone()).await.unwrap();
        first += BATCH_PAGES as u64;
    }
    let stats = tx.finish().await.unwrap();
    let took = start.elapsed();
    rx.wait().await.unwrap();
    assert_eq!(sink.bytes.load(Ordering::Relaxed), first * PAGE_SIZE as u64);
    let shares: Vec<String> = stats
        .paths
        .iter()
        .map(|p| format!("{:.0}", p.bytes_acked as f64 / MIB))
        .collect();
    let rate = (first * PAGE_SIZE as u64) as f64 / MIB / took.as_secs_f64();
    println!(
        "    {:>4} MiB over {} path(s) in {:>6.2?}: {rate:>7.1} MiB/s (MiB per path: {})",
        (first * PAGE_SIZE as u64) >> 20,
        targets.len(),
        took,
        shares.join(" / ")
    );
    rate
}

/// Pumps `bytes` from a Unix socket through a byte stream over `targets` into another
/// Unix socket, as a QEMU migration goes; returns MiB/s (first byte to confirmed end).
async fn byte_stream(p: &mut Pair, targets: &[SocketAddr], bytes: u64) -> f64 {
    let id = p.next_stream;
    p.next_stream += 1;
    let rx = p.dst.accept_byte_stream(id, 1).unwrap();
    let tx = p.src.open_byte_stream(2, targets, id).await.unwrap();
    let (mut qemu_out, mut src_sock) = tokio::net::UnixStream::pair().unwrap();
    let (mut dst_sock, mut qemu_in) = tokio::net::UnixStream::pair().unwrap();
    let data = payload();
    let start = Instant::now();
    let producer = tokio::spawn(async move {
        let mut sent = 0u64;
        while sent < bytes {
            qemu_out.write_all(&data).await.unwrap();
            sent += data.len() as u64;
        }
        qemu_out.shutdown().await.unwrap();
        sent
    });
    let consumer = tokio::spawn(async move {
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            let n = qemu_in.read(&mut buf).await.unwrap();
            if n == 0 {
                return got;
            }
            got += n as u64;
        }
    });
    let target = tokio::spawn(async move { rx.pump_into(&mut dst_sock).await });
    let stats = tx.pump_from(&mut src_sock).await.unwrap();
    let took = start.elapsed();
    target.await.unwrap().unwrap();
    let sent = producer.await.unwrap();
    assert_eq!(consumer.await.unwrap(), sent);
    let rate = sent as f64 / MIB / took.as_secs_f64();
    println!(
        "    {:>4} MiB over {} path(s) in {:>6.2?}: {rate:>7.1} MiB/s (MiB per path: {})",
        sent >> 20,
        targets.len(),
        took,
        stats
            .page
            .paths
            .iter()
            .map(|p| format!("{:.0}", p.bytes_acked as f64 / MIB))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    rate
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let direct_bytes: u64 = if quick { 256 << 20 } else { 1 << 30 };
    let ca = ClusterCa::generate("bench").unwrap();

    let limited_only = std::env::args().any(|a| a == "--limited-only");
    println!("raw TCP loopback (one connection, plaintext):");
    let tcp = tcp_loopback(2 * direct_bytes).await;
    println!("    {tcp:.1} MiB/s");

    let mut results = Vec::new();
    let mut bytes_two_jumbo = 0.0;
    // Each MTU fixed (the ceiling at the MTU), then the default settings: the
    // default MTU, discovery up to the default ceiling (on loopback it finds
    // the ceiling).
    let defaults = NetworkConfig::default();
    let mtus: &[(u8, u16, Option<u16>)] = if limited_only {
        &[]
    } else {
        &[
            (1, DEFAULT_MTU, Some(DEFAULT_MTU)),
            (2, JUMBO_MTU, Some(JUMBO_MTU)),
            (4, defaults.mtu, None),
        ]
    };
    for &(tag, mtu, ceiling) in mtus {
        let mut p = pair(&ca, mtu, ceiling, tag).await;
        let targets = p.dst.local_addrs();
        match ceiling {
            Some(_) => println!("page stream, MTU {mtu}:"),
            None => println!(
                "page stream, default settings (MTU {mtu}, discovery up to {}):",
                defaults.mtu_ceiling
            ),
        }
        let one = stream(&mut p, &targets[..1], direct_bytes).await;
        let two = stream(&mut p, &targets, direct_bytes).await;
        results.push((mtu, one, two));
        if mtu == JUMBO_MTU && ceiling.is_some() {
            println!("byte stream (Unix socket to Unix socket), MTU {mtu}:");
            bytes_two_jumbo = byte_stream(&mut p, &targets, direct_bytes).await;
        }
        p.src.shutdown().await;
        p.dst.shutdown().await;
    }
    // `--mtu-sweep`: one path at several MTUs, to choose the defaults.
    if std::env::args().any(|a| a == "--mtu-sweep") {
        for (i, mtu) in [1452u16, 4000, 6000, 7000, 8952].into_iter().enumerate() {
            let mut p = pair(&ca, mtu, Some(mtu), 10 + i as u8).await;
            let targets = p.dst.local_addrs();
            println!("MTU {mtu}:");
            stream(&mut p, &targets[..1], direct_bytes).await;
            p.src.shutdown().await;
            p.dst.shutdown().await;
        }
    }

    let (_, one_default, two_default) = results.first().copied().unwrap_or_default();
    let (_, one_jumbo, two_jumbo) = results.get(1).copied().unwrap_or_default();
    let (_, one_settings, two_settings) = results.get(2).copied().unwrap_or_default();

    // Rate-limited links: one proxy per network, each limited to `rate`.
    let rate_mib = 40u64;
    let limited_bytes: u64 = if quick { 48 << 20 } else { 160 << 20 };
    let mut p = pair(&ca, JUMBO_MTU, Some(JUMBO_MTU), 3).await;
    let mut links = Vec::new();
    for (i, a) in p.dst.local_addrs().into_iter().enumerate() {
        let l = LinkProxy::start(
            SocketAddr::from(([127, i as u8 + 1, 3, 100], 0)),
            a,
            i as u64,
        )
        .await
        .unwrap();
        l.set_rate_limit(Some(rate_mib << 20));
        links.push(l);
    }
    let targets: Vec<SocketAddr> = links.iter().map(|l| l.local_addr()).collect();
    println!("page stream through proxies limited to {rate_mib} MiB/s per link:");
    let one_limited = stream(&mut p, &targets[..1], limited_bytes / 2).await;
    let two_limited = stream(&mut p, &targets, limited_bytes).await;
    let limited_ratio = two_limited / one_limited;
    for l in &links {
        println!("    proxy {}: {:?}", l.local_addr(), l.stats());
    }
    drop(links);

    println!();
    println!(
        "one path / TCP: {:.2} (jumbo MTU {JUMBO_MTU}), {:.2} (MTU {DEFAULT_MTU})",
        one_jumbo / tcp,
        one_default / tcp
    );
    println!(
        "two paths / TCP: {:.2} (jumbo), {:.2} (default MTU)",
        two_jumbo / tcp,
        two_default / tcp
    );
    println!(
        "default settings (MTU {DEFAULT_MTU} discovering up to {}) / TCP: {:.2} one path, {:.2} two paths",
        defaults.mtu_ceiling,
        one_settings / tcp,
        two_settings / tcp
    );
    println!(
        "byte stream, two paths / TCP: {:.2} (jumbo)",
        bytes_two_jumbo / tcp
    );
    println!(
        "rate-limited: two paths / one path = {limited_ratio:.2} (required >= 1.8) {}",
        if limited_ratio >= 1.8 {
            "OK"
        } else {
            "BELOW TARGET"
        }
    );
    println!(
        "tcp_mibps={tcp:.0} one_path_mibps={one_jumbo:.0} two_paths_mibps={two_jumbo:.0} \
         one_path_default_mtu_mibps={one_default:.0} two_paths_default_mtu_mibps={two_default:.0} \
         one_path_default_settings_mibps={one_settings:.0} default_settings_vs_tcp={:.2} \
         one_path_vs_tcp={:.2} two_paths_vs_tcp={:.2} limited_link_mibps={rate_mib} \
         limited_one_path_mibps={one_limited:.1} limited_two_paths_mibps={two_limited:.1} \
         limited_two_vs_one={limited_ratio:.2} byte_stream_two_paths_mibps={bytes_two_jumbo:.0} \
         byte_stream_vs_tcp={:.2}",
        one_settings / tcp,
        one_jumbo / tcp,
        two_jumbo / tcp,
        bytes_two_jumbo / tcp
    );
}
