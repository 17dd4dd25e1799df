//! Helpers shared by the transport integration tests: nodes on loopback networks, a
//! page pattern that identifies (page, round) inside the page itself, and a sink that
//! checks every page it is given.
#![allow(clippy::unwrap_used, dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_transport::{ClusterCa, NetworkConfig, NodeId, PageSink, RpcNode, PAGE_SIZE};

/// Node `node` on network `net`: 127.net.0.node, any port.
pub fn addr(net: u8, node: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, net, 0, node)), 0)
}

pub async fn start_node(
    ca: &ClusterCa,
    id: NodeId,
    nets: &[u8],
    cfg: NetworkConfig,
) -> Arc<RpcNode> {
    let listen = nets.iter().map(|n| addr(*n, id as u8)).collect();
    RpcNode::start(ca.issue(id).unwrap(), listen, cfg)
        .await
        .unwrap()
}

/// Polls `cond` every 5 ms until it holds; panics with `what` after `timeout`.
pub async fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Fills `out` (a multiple of 4096 bytes) with the content of pages `first..` as read
/// in `round`: the first 16 bytes say (page, round), the rest is derived from them.
pub fn fill_pages(first: u64, round: u32, out: &mut [u8]) {
    for (i, page) in out.chunks_exact_mut(PAGE_SIZE).enumerate() {
        let p = first + i as u64;
        let seed = p.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (u64::from(round) << 48 | 0x5555);
        for (w, word) in page.chunks_exact_mut(8).enumerate() {
            let v = match w {
                0 => p,
                1 => u64::from(round),
                _ => seed.wrapping_add((w as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)),
            };
            word.copy_from_slice(&v.to_le_bytes());
        }
    }
}

pub fn pages(first: u64, count: usize, round: u32) -> Vec<u8> {
    let mut v = vec![0u8; count * PAGE_SIZE];
    fill_pages(first, round, &mut v);
    v
}

/// What a page holds in a [`CheckingSink`].
pub const EMPTY: u32 = 0;
pub const ZERO: u32 = u32::MAX;

/// Checks every page it receives against the pattern and records, per page, the round
/// it holds (`round + 1`, [`EMPTY`] or [`ZERO`]). Records any copy older than what the
/// page held (there must be none) and any corrupted page.
pub struct CheckingSink {
    pub held: Vec<AtomicU32>,
    pub stale_overwrites: AtomicU64,
    pub corrupt: Mutex<Vec<String>>,
    pub pages_applied: AtomicU64,
    pub bytes_applied: AtomicU64,
    pub fail_at_page: Option<u64>,
}

impl CheckingSink {
    pub fn new(pages: u64) -> Arc<CheckingSink> {
        Arc::new(Self::build(pages, None))
    }

    pub fn failing_at(pages: u64, page: u64) -> Arc<CheckingSink> {
        Arc::new(Self::build(pages, Some(page)))
    }

    fn build(pages: u64, fail_at_page: Option<u64>) -> CheckingSink {
        CheckingSink {
            held: (0..pages).map(|_| AtomicU32::new(EMPTY)).collect(),
            stale_overwrites: AtomicU64::new(0),
            corrupt: Mutex::new(Vec::new()),
            pages_applied: AtomicU64::new(0),
            bytes_applied: AtomicU64::new(0),
            fail_at_page,
        }
    }

    pub fn round_of(&self, page: u64) -> u32 {
        self.held[page as usize].load(Ordering::Relaxed)
    }

    /// Panics unless every page in `range` holds round `round`'s copy.
    pub fn assert_all(&self, range: std::ops::Range<u64>, round: u32) {
        let mut wrong = Vec::new();
        for p in range {
            let held = self.round_of(p);
            if held != round + 1 && wrong.len() < 10 {
                wrong.push((p, held));
            }
        }
        assert!(
            wrong.is_empty(),
            "pages not holding round {round} (page, round+1): {wrong:?}"
        );
        self.assert_clean();
    }

    pub fn assert_clean(&self) {
        assert_eq!(
            self.stale_overwrites.load(Ordering::Relaxed),
            0,
            "stale overwrites"
        );
        let corrupt = self.corrupt.lock().unwrap();
        assert!(
            corrupt.is_empty(),
            "corrupt pages: {:?}",
            &corrupt[..corrupt.len().min(5)]
        );
    }
}

impl PageSink for CheckingSink {
    fn apply(&self, first: u64, count: u32, data: Option<&[u8]>) -> Result<(), String> {
        if first + u64::from(count) > self.held.len() as u64 {
            return Err(format!(
                "pages {first}+{count} beyond the guest's {} pages",
                self.held.len()
            ));
        }
        if let Some(f) = self.fail_at_page {
            if (first..first + u64::from(count)).contains(&f) {
                return Err(format!("injected failure at page {f}"));
            }
        }
        for i in 0..u64::from(count) {
            let p = first + i;
            let new = match data {
                None => ZERO,
                Some(d) => {
                    let page = &d[i as usize * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE];
                    let round = u32::from_le_bytes(page[8..12].try_into().unwrap());
                    let mut expect = [0u8; PAGE_SIZE];
                    fill_pages(p, round, &mut expect);
                    if page != expect {
                        self.corrupt.lock().unwrap().push(format!("page {p}"));
                    }
                    round + 1
                }
            };
            let old = self.held[p as usize].swap(new, Ordering::Relaxed);
            if old != EMPTY && old != ZERO && new != ZERO && new < old {
                self.stale_overwrites.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.pages_applied
            .fetch_add(u64::from(count), Ordering::Relaxed);
        self.bytes_applied
            .fetch_add(data.map_or(0, |d| d.len() as u64), Ordering::Relaxed);
        Ok(())
    }
}

/// Sends a dirty round of scattered pages as the migration source does: the
/// pages in `dirty` with round `round`'s contents and those in `zeroed` as zero
/// pages, in batches of 256 listed pages.
pub async fn send_scattered(
    tx: &ferry_transport::PageStreamSender,
    round: u32,
    dirty: &[u64],
    zeroed: &[u64],
) {
    for batch in dirty.chunks(256) {
        let mut data = Vec::with_capacity(batch.len() * PAGE_SIZE);
        for p in batch {
            data.extend_from_slice(&pages(*p, 1, round));
        }
        tx.send_listed(round, batch, Some(bytes::Bytes::from(data)))
            .await
            .unwrap();
    }
    for batch in zeroed.chunks(256) {
        tx.send_listed(round, batch, None).await.unwrap();
    }
}
