//! A UDP link proxy a test puts between two endpoints, so it can break the link the
//! way real networks break: cut it (blackhole) and restore it, delay it, drop a share
//! of its datagrams, or limit its rate.
//!
//! The proxy listens on one address and forwards every datagram to one target address;
//! answers travel back the same way. Each client address the proxy hears from gets its
//! own upstream socket, so the target sees one peer per client. Faults apply to both
//! directions (except a one-way cut, which drops only what the clients send) and can be
//! changed at any time through [`LinkProxy`]'s methods; loss is
//! drawn from a seeded generator, so a run replays with its seed.
//!
//! Bounded: at most [`MAX_CLIENTS`] clients, at most `queue_bytes` waiting per
//! direction (tail drop beyond, as in a router queue). Every task stops when the
//! [`LinkProxy`] is dropped.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// Most distinct client addresses one proxy serves.
pub const MAX_CLIENTS: usize = 64;
const MAX_DATAGRAM: usize = 65_536;
/// Credit a rate-limited link keeps when its sender wakes up late (tokio's timer has
/// millisecond granularity and a loaded machine oversleeps), so the effective rate
/// stays at the configured one; like the burst of a token-bucket filter.
const RATE_BURST: Duration = Duration::from_millis(10);

/// The faults currently applied to a link (both directions).
#[derive(Clone, Debug, PartialEq)]
pub struct Faults {
    /// Drop everything, including datagrams already queued.
    pub cut: bool,
    /// Drop only what the clients send, as a failed transmit side does: the target's
    /// datagrams (its keep-alives, say) still reach them.
    pub cut_to_target: bool,
    /// Added one-way latency.
    pub delay: Duration,
    /// Share of datagrams dropped, 0.0 ..= 1.0.
    pub loss: f64,
    /// Bytes per second per direction; `None` = unlimited.
    pub rate_bytes_per_sec: Option<u64>,
    /// Bytes that may wait per direction (delay and rate limit) before tail drop.
    pub queue_bytes: usize,
}

impl Faults {
    /// Whether a cut swallows a datagram going this way.
    fn cuts(&self, toward_target: bool) -> bool {
        self.cut || (toward_target && self.cut_to_target)
    }
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            cut: false,
            cut_to_target: false,
            delay: Duration::ZERO,
            loss: 0.0,
            rate_bytes_per_sec: None,
            queue_bytes: 4 << 20,
        }
    }
}

/// What the proxy did so far (both directions together).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    pub dropped_cut: u64,
    pub dropped_loss: u64,
    pub dropped_queue: u64,
    pub clients: usize,
}

#[derive(Default)]
struct Counters {
    forwarded_packets: AtomicU64,
    forwarded_bytes: AtomicU64,
    dropped_cut: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_queue: AtomicU64,
}

struct Shared {
    faults: Mutex<Faults>,
    counters: Counters,
    seed: u64,
    tasks: Mutex<Vec<AbortHandle>>,
    clients: Mutex<HashMap<SocketAddr, Arc<Link>>>,
    /// Where datagrams toward the target go; [`LinkProxy::retarget`] moves it.
    forward: Mutex<SocketAddr>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn faults(&self) -> Faults {
        lock(&self.faults).clone()
    }

    fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(&self, f: F) {
        let handle = tokio::spawn(f).abort_handle();
        lock(&self.tasks).push(handle);
    }
}

/// One direction of one client's link: the shaping queue and its sender.
struct Direction {
    toward_target: bool,
    queue: mpsc::UnboundedSender<(Instant, Vec<u8>)>,
    queued_bytes: Arc<AtomicUsize>,
    rng: Mutex<StdRng>,
}

struct Link {
    upstream: Arc<UdpSocket>,
    to_target: Direction,
    to_client: Direction,
}

/// A running proxy. Dropping it stops it.
pub struct LinkProxy {
    shared: Arc<Shared>,
    local: SocketAddr,
}

impl LinkProxy {
    /// Listens on `listen` (port 0 picks one; see [`local_addr`](Self::local_addr)) and
    /// forwards to `forward`. `seed` drives the loss generator.
    pub async fn start(
        listen: SocketAddr,
        forward: SocketAddr,
        seed: u64,
    ) -> io::Result<LinkProxy> {
        let socket = Arc::new(UdpSocket::bind(listen).await?);
        let local = socket.local_addr()?;
        let shared = Arc::new(Shared {
            faults: Mutex::new(Faults::default()),
            counters: Counters::default(),
            seed,
            tasks: Mutex::new(Vec::new()),
            clients: Mutex::new(HashMap::new()),
            forward: Mutex::new(forward),
        });
        shared.spawn(client_side(shared.clone(), socket));
        Ok(LinkProxy { shared, local })
    }

    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Forwards to `forward` from now on, on existing links too: the target came
    /// back on another port (a restarted node whose old one was still taken), and
    /// its clients, who know only this proxy, need not learn of it.
    pub fn retarget(&self, forward: SocketAddr) {
        *lock(&self.shared.forward) = forward;
    }

    /// Blackholes the link in both directions until [`restore`](Self::restore).
    pub fn cut(&self) {
        lock(&self.shared.faults).cut = true;
    }

    /// Blackholes only the direction toward the target until [`restore`](Self::restore).
    pub fn cut_to_target(&self) {
        lock(&self.shared.faults).cut_to_target = true;
    }

    /// Lifts both kinds of cut.
    pub fn restore(&self) {
        let mut f = lock(&self.shared.faults);
        f.cut = false;
        f.cut_to_target = false;
    }

    pub fn is_cut(&self) -> bool {
        lock(&self.shared.faults).cut
    }

    pub fn set_delay(&self, delay: Duration) {
        lock(&self.shared.faults).delay = delay;
    }

    /// Drops `percent` % of datagrams (0–100), chosen by the seeded generator.
    pub fn set_loss_percent(&self, percent: f64) {
        lock(&self.shared.faults).loss = (percent / 100.0).clamp(0.0, 1.0);
    }

    /// Limits each direction to `bytes_per_sec` (`None` lifts the limit).
    pub fn set_rate_limit(&self, bytes_per_sec: Option<u64>) {
        lock(&self.shared.faults).rate_bytes_per_sec = bytes_per_sec.filter(|r| *r > 0);
    }

    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.shared.faults) = faults;
    }

    pub fn faults(&self) -> Faults {
        self.shared.faults()
    }

    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        ProxyStats {
            forwarded_packets: c.forwarded_packets.load(Ordering::Relaxed),
            forwarded_bytes: c.forwarded_bytes.load(Ordering::Relaxed),
            dropped_cut: c.dropped_cut.load(Ordering::Relaxed),
            dropped_loss: c.dropped_loss.load(Ordering::Relaxed),
            dropped_queue: c.dropped_queue.load(Ordering::Relaxed),
            clients: lock(&self.shared.clients).len(),
        }
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        for t in lock(&self.shared.tasks).drain(..) {
            t.abort();
        }
        lock(&self.shared.clients).clear();
    }
}

fn direction(
    shared: &Arc<Shared>,
    out: Arc<UdpSocket>,
    dest: SocketAddr,
    stream: u64,
    toward_target: bool,
) -> Direction {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    shared.spawn(shaper(
        shared.clone(),
        rx,
        queued.clone(),
        out,
        dest,
        toward_target,
    ));
    Direction {
        toward_target,
        queue: tx,
        queued_bytes: queued,
        rng: Mutex::new(StdRng::seed_from_u64(
            shared.seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        )),
    }
}

/// Decides a datagram's fate on arrival: dropped (cut, loss, full queue) or queued for
/// the shaper with its delivery time.
fn admit(shared: &Shared, dir: &Direction, data: Vec<u8>) {
    let f = shared.faults();
    let c = &shared.counters;
    if f.cuts(dir.toward_target) {
        c.dropped_cut.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if f.loss > 0.0 && lock(&dir.rng).random::<f64>() < f.loss {
        c.dropped_loss.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let len = data.len();
    if dir.queued_bytes.load(Ordering::Relaxed) + len > f.queue_bytes.max(MAX_DATAGRAM) {
        c.dropped_queue.fetch_add(1, Ordering::Relaxed);
        return;
    }
    dir.queued_bytes.fetch_add(len, Ordering::Relaxed);
    if dir.queue.send((Instant::now() + f.delay, data)).is_err() {
        dir.queued_bytes.fetch_sub(len, Ordering::Relaxed);
    }
}

/// Releases queued datagrams at their delivery time and no faster than the rate.
async fn shaper(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<(Instant, Vec<u8>)>,
    queued: Arc<AtomicUsize>,
    out: Arc<UdpSocket>,
    dest: SocketAddr,
    toward_target: bool,
) {
    let mut next_free = Instant::now();
    while let Some((at, data)) = rx.recv().await {
        if at > Instant::now() {
            tokio::time::sleep_until(at).await;
        }
        let faults = shared.faults();
        if let Some(rate) = faults.rate_bytes_per_sec {
            let now = Instant::now();
            next_free = next_free.max(now.checked_sub(RATE_BURST).unwrap_or(now));
            if next_free > now {
                tokio::time::sleep_until(next_free).await;
            }
            next_free += Duration::from_secs_f64(data.len() as f64 / rate as f64);
        }
        queued.fetch_sub(data.len(), Ordering::Relaxed);
        // A cut also swallows what was already on the wire (including while this
        // datagram waited for its slot).
        let cut = |f: &Faults| f.cuts(toward_target);
        if cut(&faults) || (faults.rate_bytes_per_sec.is_some() && cut(&shared.faults())) {
            shared.counters.dropped_cut.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let dest = if toward_target {
            *lock(&shared.forward)
        } else {
            dest
        };
        if out.send_to(&data, dest).await.is_ok() {
            let c = &shared.counters;
            c.forwarded_packets.fetch_add(1, Ordering::Relaxed);
            c.forwarded_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
    }
}

/// Receives from clients on the listening socket and feeds each client's link.
async fn client_side(shared: Arc<Shared>, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            // ICMP errors surface here on some platforms; the link itself goes on,
            // without spinning if the error repeats.
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        let existing = lock(&shared.clients).get(&from).cloned();
        let link = match existing {
            Some(l) => l,
            None => match new_link(&shared, &socket, from).await {
                Some(l) => l,
                None => continue,
            },
        };
        admit(&shared, &link.to_target, buf[..n].to_vec());
    }
}

async fn new_link(
    shared: &Arc<Shared>,
    listen: &Arc<UdpSocket>,
    client: SocketAddr,
) -> Option<Arc<Link>> {
    if lock(&shared.clients).len() >= MAX_CLIENTS {
        tracing::warn!(%client, "link proxy full, datagram dropped");
        return None;
    }
    let bind: SocketAddr = SocketAddr::new(listen.local_addr().ok()?.ip(), 0);
    let upstream = Arc::new(UdpSocket::bind(bind).await.ok()?);
    let n = lock(&shared.clients).len() as u64;
    // Only a placeholder: the shaper toward the target reads `Shared::forward`
    // per datagram, so a retarget reaches existing links.
    let forward = *lock(&shared.forward);
    let link = Arc::new(Link {
        to_target: direction(shared, upstream.clone(), forward, 2 * n, true),
        to_client: direction(shared, listen.clone(), client, 2 * n + 1, false),
        upstream: upstream.clone(),
    });
    lock(&shared.clients).insert(client, link.clone());
    shared.spawn(target_side(shared.clone(), link.clone()));
    Some(link)
}

/// Receives the target's answers for one client and feeds them back.
async fn target_side(shared: Arc<Shared>, link: Arc<Link>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, _)) = link.upstream.recv_from(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        admit(&shared, &link.to_client, buf[..n].to_vec());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    async fn echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        let h = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        (addr, h)
    }

    async fn roundtrip(
        client: &UdpSocket,
        proxy: SocketAddr,
        msg: &[u8],
        wait: Duration,
    ) -> Option<Vec<u8>> {
        client.send_to(msg, proxy).await.unwrap();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        match tokio::time::timeout(wait, client.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_retargeted_proxy_forwards_an_existing_clients_datagrams_to_the_new_target() {
        let old = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (echo, _h) = echo_server().await;
        let proxy = LinkProxy::start("127.0.0.1:0".parse().unwrap(), old.local_addr().unwrap(), 1)
            .await
            .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let p = proxy.local_addr();
        // The old target hears the first datagram and never answers.
        assert_eq!(
            roundtrip(&client, p, b"a", Duration::from_millis(100)).await,
            None
        );
        let mut buf = [0u8; 16];
        let (n, _) = old.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"a");
        proxy.retarget(echo);
        let long = Duration::from_secs(5);
        assert_eq!(roundtrip(&client, p, b"b", long).await.unwrap(), b"b");
    }

    #[tokio::test]
    async fn forwards_cuts_restores_and_delays() {
        let (echo, _h) = echo_server().await;
        let proxy = LinkProxy::start("127.0.0.1:0".parse().unwrap(), echo, 1)
            .await
            .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let p = proxy.local_addr();
        let long = Duration::from_secs(5);
        assert_eq!(roundtrip(&client, p, b"a", long).await.unwrap(), b"a");

        proxy.cut();
        assert_eq!(
            roundtrip(&client, p, b"b", Duration::from_millis(100)).await,
            None
        );
        assert!(proxy.stats().dropped_cut >= 1);
        proxy.restore();
        assert_eq!(roundtrip(&client, p, b"c", long).await.unwrap(), b"c");

        proxy.set_delay(Duration::from_millis(40));
        let t = std::time::Instant::now();
        assert_eq!(roundtrip(&client, p, b"d", long).await.unwrap(), b"d");
        assert!(
            t.elapsed() >= Duration::from_millis(80),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(proxy.stats().clients, 1);
    }

    #[tokio::test]
    async fn a_one_way_cut_drops_only_what_the_client_sends() {
        // The target counts what it hears, echoes it, and says whom it heard from,
        // so it can also send on its own later, as a keep-alive.
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = s.local_addr().unwrap();
        let heard = Arc::new(AtomicU64::new(0));
        let counter = heard.clone();
        let (to_client, mut keepalive) = mpsc::unbounded_channel::<SocketAddr>();
        let s = Arc::new(s);
        let s2 = s.clone();
        let _h = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = s.send_to(&buf[..n], from).await;
                let _ = to_client.send(from);
            }
        });
        let proxy = LinkProxy::start("127.0.0.1:0".parse().unwrap(), target, 3)
            .await
            .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let p = proxy.local_addr();
        let long = Duration::from_secs(5);
        assert_eq!(roundtrip(&client, p, b"a", long).await.unwrap(), b"a");
        let upstream = keepalive.recv().await.unwrap();

        proxy.cut_to_target();
        let before = heard.load(Ordering::SeqCst);
        let answered = roundtrip(&client, p, b"b", Duration::from_millis(100)).await;
        assert_eq!(answered, None, "the request must not reach the target");
        assert_eq!(heard.load(Ordering::SeqCst), before);
        // The other way still works.
        s2.send_to(b"alive", upstream).await.unwrap();
        let mut buf = [0u8; 16];
        let (n, _) = tokio::time::timeout(long, client.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"alive");

        proxy.restore();
        assert_eq!(roundtrip(&client, p, b"c", long).await.unwrap(), b"c");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loss_is_seeded_and_rate_is_limited() {
        const WINDOW: usize = 5;
        let (echo, _h) = echo_server().await;
        let proxy = LinkProxy::start("127.0.0.1:0".parse().unwrap(), echo, 7)
            .await
            .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let p = proxy.local_addr();
        proxy.set_loss_percent(50.0);
        for i in 0..400u32 {
            client.send_to(&i.to_le_bytes(), p).await.unwrap();
            if i % 20 == 0 {
                // Paced so the kernel's socket buffers never drop anything themselves.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let mut buf = [0u8; 64];
        while tokio::time::timeout(Duration::from_millis(200), client.recv_from(&mut buf))
            .await
            .is_ok()
        {}
        let s = proxy.stats();
        // Each direction drops half: about 3/4 of round trips are lost.
        assert!((200..400).contains(&s.dropped_loss), "{s:?}");

        proxy.set_loss_percent(0.0);
        proxy.set_rate_limit(Some(1_000_000));
        let before = proxy.stats().forwarded_bytes;
        let t = std::time::Instant::now();
        let payload = vec![0u8; 10_000];
        let mut buf = vec![0u8; MAX_DATAGRAM];
        // A few datagrams in flight at a time: what waits for the client then always
        // fits its socket buffer, however late a loaded machine schedules it, so only
        // the proxy's rate decides how long this takes.
        for _ in 0..50 / WINDOW {
            for _ in 0..WINDOW {
                client.send_to(&payload, p).await.unwrap();
            }
            for _ in 0..WINDOW {
                tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
                    .await
                    .expect("a rate-limited datagram is delayed, never lost")
                    .unwrap();
            }
        }
        // 500 kB each way through a 1 MB/s link takes about half a second.
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(400), "{took:?}");
        assert_eq!(proxy.stats().forwarded_bytes - before, 2 * 500_000);
    }
}
