//! The sender's bookkeeping, without I/O or clocks (the way `quinn-proto` keeps QUIC
//! apart from sockets): which chunk goes on which path, what is in flight where, what
//! to send again when a path dies, when a round is fully acknowledged, and how much
//! the caller may still queue.
//!
//! Striping is pull-based: a live path takes the lowest-numbered waiting chunk whenever
//! its unacknowledged bytes are below its window. A path therefore takes new chunks
//! exactly as fast as it gets old ones acknowledged, so each path carries a share
//! proportional to what it delivers, and a slow or stalled path stops taking work once
//! its window is full. Each path's window follows its measured delivery rate (what it
//! delivers in `window_time`, plus a floor), capped by an equal share of the stream's
//! budget: a slow path holds little, so the end of a round does not wait long for it,
//! and a dying path takes little with it. Chunks of a dead path go back to the queue
//! and, being the lowest-numbered, are the next ones the surviving paths take. Time
//! enters only as `Instant`s passed in by the caller.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use std::sync::Arc;

use bytes::Bytes;

use crate::protocol::{chunk_prefix_len, PAGE_SIZE};

/// Index of a path (a network) in the stream's path list.
pub type PathId = usize;

/// Pages read in one round, as queued by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub round: u32,
    pub first: u64,
    pub count: u32,
    /// `None`: the run of `count` pages from `first`. `Some`: the `count` pages
    /// `first + offset`, offsets strictly increasing from 0 (scattered dirty pages).
    pub offsets: Option<Arc<[u32]>>,
    /// `count * 4096` bytes, or `None` for pages that are all zeros.
    pub data: Option<Bytes>,
}

impl Chunk {
    /// Bytes this chunk occupies on the wire and in the budget.
    pub fn cost(&self) -> usize {
        chunk_prefix_len(self.count, self.offsets.is_some())
            + self
                .data
                .as_ref()
                .map_or(0, |_| self.count as usize * PAGE_SIZE)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Where {
    Queued,
    InFlight(PathId),
}

#[derive(Debug)]
struct Entry {
    chunk: Chunk,
    at: Where,
    /// Path that last carried it: acknowledged bytes are credited to it.
    last_path: Option<PathId>,
}

/// Per-path counters and liveness.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PathCounters {
    pub up: bool,
    pub inflight_bytes: usize,
    pub sent_bytes: u64,
    pub acked_bytes: u64,
    pub sent_chunks: u64,
    pub acked_chunks: u64,
    /// Chunks sent on this path that had already been sent on another.
    pub resent_chunks: u64,
    pub times_up: u64,
    pub times_down: u64,
    /// Estimated delivery rate (acknowledged bytes per second); 0 until measured.
    pub rate_bytes_per_sec: f64,
    last_heard: Option<Instant>,
    sample_start: Option<Instant>,
    sample_bytes: u64,
}

/// Shortest interval a rate sample covers: shorter ones are dominated by ack batching.
const RATE_SAMPLE: Duration = Duration::from_millis(20);

/// See the module docs.
#[derive(Debug)]
pub struct Scheduler {
    budget: usize,
    path_window: usize,
    min_window: usize,
    window_time: Option<Duration>,
    next_seq: u64,
    entries: BTreeMap<u64, Entry>,
    queue: BTreeSet<u64>,
    unacked_bytes: usize,
    unacked_by_round: BTreeMap<u32, usize>,
    paths: Vec<PathCounters>,
    pushed_bytes: u64,
    acked_bytes: u64,
}

impl Scheduler {
    /// `budget`: bytes queued or in flight before [`has_room`](Self::has_room) says no.
    /// `path_window`: cap on one path's unacknowledged bytes.
    pub fn new(paths: usize, budget: usize, path_window: usize) -> Scheduler {
        Scheduler {
            budget,
            path_window,
            min_window: path_window,
            window_time: None,
            next_seq: 1,
            entries: BTreeMap::new(),
            queue: BTreeSet::new(),
            unacked_bytes: 0,
            unacked_by_round: BTreeMap::new(),
            paths: vec![PathCounters::default(); paths],
            pushed_bytes: 0,
            acked_bytes: 0,
        }
    }

    /// Makes each path's window follow its delivery rate: what it delivered in
    /// `window_time`, plus `min_window`, capped as before. Without this, every path's
    /// window is its share of the budget.
    pub fn with_adaptive_windows(mut self, min_window: usize, window_time: Duration) -> Self {
        self.min_window = min_window.max(1);
        self.window_time = Some(window_time);
        self
    }

    /// Whether a chunk of `cost` bytes fits the budget now. An empty stream always
    /// takes one chunk, so a chunk larger than the budget cannot wedge the sender.
    pub fn has_room(&self, cost: usize) -> bool {
        self.unacked_bytes == 0 || self.unacked_bytes + cost <= self.budget
    }

    /// Queues a chunk and returns its sequence number (from 1, increasing).
    pub fn push(&mut self, chunk: Chunk) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let cost = chunk.cost();
        self.unacked_bytes += cost;
        self.pushed_bytes += cost as u64;
        *self.unacked_by_round.entry(chunk.round).or_default() += 1;
        self.entries.insert(
            seq,
            Entry {
                chunk,
                at: Where::Queued,
                last_path: None,
            },
        );
        self.queue.insert(seq);
        seq
    }

    /// Most unacknowledged bytes `path` may hold now.
    pub fn window(&self, path: PathId) -> usize {
        let up = self.paths.iter().filter(|p| p.up).count().max(1);
        let cap = (self.budget / up).min(self.path_window).max(1);
        match (self.window_time, self.paths.get(path)) {
            (Some(t), Some(p)) => {
                let by_rate = (p.rate_bytes_per_sec * t.as_secs_f64()) as usize;
                by_rate.saturating_add(self.min_window).min(cap)
            }
            _ => cap,
        }
    }

    /// The next chunk `path` should send, if it is up and has room in its window
    /// — or, window or not, a chunk a dead path lost.
    ///
    /// Resends go ahead of the window: the budget already counts them, so the
    /// receiver never holds more than it allows; and a receiver that acknowledges
    /// only what its reader has taken (a byte stream, which delivers in order)
    /// leaves the surviving path's window full of chunks waiting for exactly the
    /// ones the dead path lost. Held to the window, they would never go.
    pub fn next_for(&mut self, path: PathId) -> Option<(u64, Chunk)> {
        let window = self.window(path);
        let p = self.paths.get(path)?;
        if !p.up {
            return None;
        }
        let seq = *self.queue.first()?;
        let resend = self.entries.get(&seq)?.last_path.is_some();
        if !resend && p.inflight_bytes > 0 && p.inflight_bytes >= window {
            return None;
        }
        self.queue.pop_first();
        let e = self.entries.get_mut(&seq)?;
        let cost = e.chunk.cost();
        let resent = e.last_path.is_some();
        e.at = Where::InFlight(path);
        e.last_path = Some(path);
        let p = &mut self.paths[path];
        p.inflight_bytes += cost;
        p.sent_bytes += cost as u64;
        p.sent_chunks += 1;
        if resent {
            p.resent_chunks += 1;
        }
        Some((seq, e.chunk.clone()))
    }

    /// Records that the receiver applied chunk `seq`. Returns false for unknown or
    /// already acknowledged chunks (duplicates after a resend).
    pub fn on_ack(&mut self, seq: u64, now: Instant) -> bool {
        let Some(e) = self.entries.remove(&seq) else {
            return false;
        };
        let cost = e.chunk.cost();
        match e.at {
            Where::Queued => {
                self.queue.remove(&seq);
            }
            Where::InFlight(p) => self.paths[p].inflight_bytes -= cost,
        }
        if let Some(p) = e.last_path {
            let p = &mut self.paths[p];
            p.acked_bytes += cost as u64;
            p.acked_chunks += 1;
            p.sample_bytes += cost as u64;
            let start = *p.sample_start.get_or_insert(now);
            let elapsed = now.saturating_duration_since(start);
            if elapsed >= RATE_SAMPLE {
                let rate = p.sample_bytes as f64 / elapsed.as_secs_f64();
                p.rate_bytes_per_sec = if p.rate_bytes_per_sec == 0.0 {
                    rate
                } else {
                    0.75 * p.rate_bytes_per_sec + 0.25 * rate
                };
                p.sample_start = Some(now);
                p.sample_bytes = 0;
            }
        }
        self.unacked_bytes -= cost;
        self.acked_bytes += cost as u64;
        if let Some(n) = self.unacked_by_round.get_mut(&e.chunk.round) {
            *n -= 1;
            if *n == 0 {
                self.unacked_by_round.remove(&e.chunk.round);
            }
        }
        true
    }

    /// `path` completed its hello and may carry chunks.
    pub fn path_up(&mut self, path: PathId, now: Instant) {
        if let Some(p) = self.paths.get_mut(path) {
            if !p.up {
                p.up = true;
                p.times_up += 1;
                // A path that comes back starts from the floor and earns its window.
                p.rate_bytes_per_sec = 0.0;
                p.sample_start = None;
                p.sample_bytes = 0;
            }
            p.last_heard = Some(now);
        }
    }

    /// `path` is dead: everything in flight on it goes back to the queue. Returns the
    /// number of chunks requeued.
    pub fn path_down(&mut self, path: PathId) -> usize {
        let Some(p) = self.paths.get_mut(path) else {
            return 0;
        };
        if p.up {
            p.up = false;
            p.times_down += 1;
        }
        p.inflight_bytes = 0;
        let mut requeued = 0;
        for (seq, e) in self.entries.iter_mut() {
            if e.at == Where::InFlight(path) {
                e.at = Where::Queued;
                self.queue.insert(*seq);
                requeued += 1;
            }
        }
        requeued
    }

    /// The receiver said something on `path`.
    pub fn heard(&mut self, path: PathId, now: Instant) {
        if let Some(p) = self.paths.get_mut(path) {
            p.last_heard = Some(now);
        }
    }

    /// Live paths that have been silent for longer than `dead_after`.
    pub fn silent_paths(&self, now: Instant, dead_after: Duration) -> Vec<PathId> {
        self.paths
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                p.up && p
                    .last_heard
                    .is_some_and(|t| now.saturating_duration_since(t) > dead_after)
            })
            .map(|(i, _)| i)
            .collect()
    }

    pub fn is_up(&self, path: PathId) -> bool {
        self.paths.get(path).is_some_and(|p| p.up)
    }

    pub fn paths_up(&self) -> usize {
        self.paths.iter().filter(|p| p.up).count()
    }

    /// True while some chunk of round `round` or earlier is not acknowledged.
    pub fn unacked_through(&self, round: u32) -> bool {
        self.unacked_by_round.range(..=round).next().is_some()
    }

    /// Nothing queued or in flight.
    pub fn is_drained(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn path(&self, path: PathId) -> Option<&PathCounters> {
        self.paths.get(path)
    }

    pub fn unacked_bytes(&self) -> usize {
        self.unacked_bytes
    }

    pub fn pushed_bytes(&self) -> u64 {
        self.pushed_bytes
    }

    pub fn acked_bytes(&self) -> u64 {
        self.acked_bytes
    }

    pub fn chunks_pushed(&self) -> u64 {
        self.next_seq - 1
    }

    /// Lowest sequence number not yet acknowledged.
    pub fn lowest_unacked(&self) -> Option<u64> {
        self.entries.keys().next().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(round: u32, first: u64) -> Chunk {
        Chunk {
            round,
            first,
            count: 1,
            offsets: None,
            data: Some(Bytes::from(vec![0u8; PAGE_SIZE])),
        }
    }

    const COST: usize = PAGE_SIZE + crate::protocol::CHUNK_HEADER_LEN;

    #[test]
    fn budget_bounds_what_is_queued() {
        let mut s = Scheduler::new(1, 3 * COST, usize::MAX);
        for i in 0..3 {
            assert!(s.has_room(COST));
            s.push(chunk(0, i));
        }
        assert!(!s.has_room(COST));
        s.on_ack(1, Instant::now());
        assert!(s.has_room(COST));
        // A chunk larger than the whole budget still goes when the stream is empty.
        let s = Scheduler::new(1, 10, usize::MAX);
        assert!(s.has_room(COST));
    }

    #[test]
    fn a_dead_paths_chunks_go_first_on_the_survivor() {
        let t = Instant::now();
        let mut s = Scheduler::new(2, 100 * COST, usize::MAX);
        s.path_up(0, t);
        s.path_up(1, t);
        for i in 0..6 {
            s.push(chunk(0, i));
        }
        let a = s.next_for(0).unwrap().0;
        let b = s.next_for(1).unwrap().0;
        let c = s.next_for(0).unwrap().0;
        assert_eq!((a, b, c), (1, 2, 3));
        assert_eq!(s.path_down(0), 2);
        assert!(s.next_for(0).is_none());
        // Requeued 1 and 3 come before the never-sent 4.
        let order: Vec<u64> = std::iter::from_fn(|| s.next_for(1).map(|x| x.0)).collect();
        assert_eq!(order, vec![1, 3, 4, 5, 6]);
        assert_eq!(s.path(1).unwrap().resent_chunks, 2);
        for seq in 1..=6 {
            assert!(s.on_ack(seq, t));
        }
        assert!(!s.on_ack(3, t), "duplicate ack");
        assert!(s.is_drained());
        assert_eq!(s.path(1).unwrap().inflight_bytes, 0);
    }

    #[test]
    fn a_dead_paths_chunks_go_past_a_full_window_on_the_survivor() {
        let t = Instant::now();
        // Windows of two chunks: the survivor's is full of chunks its receiver
        // holds (a byte stream waiting for the dead path's chunks, in order).
        let mut s = Scheduler::new(2, 100 * COST, 2 * COST);
        s.path_up(0, t);
        s.path_up(1, t);
        for i in 0..6 {
            s.push(chunk(0, i));
        }
        let sent: Vec<u64> = [0, 1, 0, 1]
            .iter()
            .map(|p| s.next_for(*p).unwrap().0)
            .collect();
        assert_eq!(sent, vec![1, 2, 3, 4]);
        assert!(s.next_for(1).is_none(), "the survivor's window is full");
        assert_eq!(s.path_down(0), 2);
        let resent: Vec<u64> = std::iter::from_fn(|| s.next_for(1).map(|x| x.0)).collect();
        assert_eq!(resent, vec![1, 3], "resends go, fresh chunk 5 still waits");
        assert!(s.next_for(1).is_none());
        s.on_ack(2, t);
        s.on_ack(4, t);
        s.on_ack(1, t);
        s.on_ack(3, t);
        assert_eq!(s.next_for(1).map(|x| x.0), Some(5));
    }

    #[test]
    fn late_ack_for_a_requeued_chunk_removes_it_from_the_queue() {
        let t = Instant::now();
        let mut s = Scheduler::new(2, 100 * COST, usize::MAX);
        s.path_up(0, t);
        s.push(chunk(0, 0));
        s.next_for(0).unwrap();
        s.path_down(0);
        assert!(s.on_ack(1, t));
        s.path_up(1, t);
        assert!(s.next_for(1).is_none());
        assert_eq!(s.path(0).unwrap().acked_chunks, 1);
    }

    #[test]
    fn barrier_tracks_rounds() {
        let t = Instant::now();
        let mut s = Scheduler::new(1, 100 * COST, usize::MAX);
        s.path_up(0, t);
        s.push(chunk(0, 0));
        s.push(chunk(1, 0));
        assert!(s.unacked_through(0));
        s.on_ack(1, t);
        assert!(!s.unacked_through(0));
        assert!(s.unacked_through(1));
        s.on_ack(2, t);
        assert!(!s.unacked_through(u32::MAX));
    }

    #[test]
    fn shares_follow_delivery_rate() {
        // Path 0 gets one ack per tick, path 1 gets one ack every fourth tick. With
        // equal windows, path 0 should carry about four times as much.
        let t = Instant::now();
        let mut s = Scheduler::new(2, 8 * COST, usize::MAX);
        s.path_up(0, t);
        s.path_up(1, t);
        let mut inflight: [std::collections::VecDeque<u64>; 2] = Default::default();
        let mut pushed = 0u64;
        for tick in 0..4000u64 {
            while pushed < 10_000 && s.has_room(COST) {
                s.push(chunk(0, pushed));
                pushed += 1;
            }
            for (p, queue) in inflight.iter_mut().enumerate() {
                while let Some((seq, _)) = s.next_for(p) {
                    queue.push_back(seq);
                }
            }
            if let Some(seq) = inflight[0].pop_front() {
                s.on_ack(seq, t);
            }
            if tick % 4 == 0 {
                if let Some(seq) = inflight[1].pop_front() {
                    s.on_ack(seq, t);
                }
            }
        }
        let a = s.path(0).unwrap().acked_chunks as f64;
        let b = s.path(1).unwrap().acked_chunks as f64;
        assert!((a / b - 4.0).abs() < 0.2, "ratio {}", a / b);
    }

    #[test]
    fn adaptive_windows_follow_each_paths_delivery_rate() {
        // 1 MiB chunks; path 0 delivers 100 MiB/s, path 1 10 MiB/s (one ack per 10 ms
        // and per 100 ms). Windows: 100 ms of delivery plus a 2 MiB floor.
        let mib = 1 << 20;
        let big = |first| Chunk {
            round: 0,
            first,
            count: 256,
            offsets: None,
            data: Some(Bytes::from(vec![0u8; mib])),
        };
        let t0 = Instant::now();
        let mut s = Scheduler::new(2, 64 * mib, 32 * mib)
            .with_adaptive_windows(2 * mib, Duration::from_millis(100));
        s.path_up(0, t0);
        s.path_up(1, t0);
        let mut inflight: [std::collections::VecDeque<u64>; 2] = Default::default();
        for ms in 0..3000u64 {
            let now = t0 + Duration::from_millis(ms);
            while s.has_room(mib) {
                s.push(big(ms));
            }
            for (p, queue) in inflight.iter_mut().enumerate() {
                while let Some((seq, _)) = s.next_for(p) {
                    queue.push_back(seq);
                }
            }
            if ms % 10 == 0 {
                if let Some(seq) = inflight[0].pop_front() {
                    s.on_ack(seq, now);
                }
            }
            if ms % 100 == 0 {
                if let Some(seq) = inflight[1].pop_front() {
                    s.on_ack(seq, now);
                }
            }
        }
        let w0 = s.window(0) as f64 / mib as f64;
        let w1 = s.window(1) as f64 / mib as f64;
        assert!((10.0..=13.5).contains(&w0), "fast path window {w0} MiB");
        assert!((2.5..=3.5).contains(&w1), "slow path window {w1} MiB");
        let r0 = s.path(0).unwrap().rate_bytes_per_sec / mib as f64;
        assert!((90.0..=110.0).contains(&r0), "rate {r0}");
    }

    #[test]
    fn silence_is_detected_from_passed_in_time() {
        let t = Instant::now();
        let mut s = Scheduler::new(2, COST, usize::MAX);
        s.path_up(0, t);
        s.path_up(1, t);
        s.heard(1, t + Duration::from_millis(250));
        let now = t + Duration::from_millis(400);
        assert_eq!(s.silent_paths(now, Duration::from_millis(300)), vec![0]);
    }
}
