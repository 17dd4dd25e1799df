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
//!
//! Hedging ([`set_hedging`](Scheduler::set_hedging), for a migration's blackout): a
//! live path with nothing it may take from the queue takes a copy of the lowest
//! unacknowledged chunk in flight on other paths but not on it, so every unacknowledged
//! chunk ends up on every live path and a path that died silently costs nothing: its
//! chunks are already on the survivors before anyone declares it dead. A chunk then
//! sits on several paths at once ([`PathSet`]); it goes back to the queue only when the
//! last path holding it dies, and its acknowledgement releases every copy.

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

/// Most paths one scheduler drives: a chunk's holders are a bitmask ([`PathSet`]).
/// Paths numbered from here on never come up (`path_up` ignores them); the sender
/// refuses a stream with more (networks times connections per network: a handful).
pub const MAX_PATHS: usize = 64;

/// The paths holding a copy of a chunk in flight, one bit per [`PathId`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct PathSet(u64);

impl PathSet {
    fn one(path: PathId) -> PathSet {
        PathSet(1 << path)
    }

    fn has(self, path: PathId) -> bool {
        path < MAX_PATHS && self.0 & (1 << path) != 0
    }

    fn with(self, path: PathId) -> PathSet {
        PathSet(self.0 | 1 << path)
    }

    fn without(self, path: PathId) -> PathSet {
        PathSet(self.0 & !(1 << path))
    }

    fn is_empty(self) -> bool {
        self.0 == 0
    }

    fn iter(self) -> impl Iterator<Item = PathId> {
        (0..MAX_PATHS).filter(move |p| self.has(*p))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Where {
    Queued,
    /// On the wire on every path of the set (never empty: the last holder's death
    /// requeues the chunk). Several paths only while hedging.
    InFlight(PathSet),
}

#[derive(Debug)]
struct Entry {
    chunk: Chunk,
    at: Where,
    /// Path that last carried it: acknowledged bytes are credited to it when the
    /// acknowledgement's path is not known.
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
    /// Chunks sent on this path that had already been sent on another (whose path
    /// died: a resend from the queue).
    pub resent_chunks: u64,
    /// Copies sent on this path of chunks still in flight on another (hedging).
    /// Counted in `sent_chunks` too.
    pub hedged_chunks: u64,
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
    /// Chunks in flight (the entries not queued): where hedged copies come from.
    inflight: BTreeSet<u64>,
    /// Per path: every chunk in flight below this is on that path already.
    hedge_from: Vec<u64>,
    unacked_bytes: usize,
    unacked_by_round: BTreeMap<u32, usize>,
    paths: Vec<PathCounters>,
    pushed_bytes: u64,
    acked_bytes: u64,
    hedging: bool,
}

impl Scheduler {
    /// `budget`: bytes queued or in flight before [`has_room`](Self::has_room) says no.
    /// `path_window`: cap on one path's unacknowledged bytes. Paths from
    /// [`MAX_PATHS`] on are ignored (they never come up).
    pub fn new(paths: usize, budget: usize, path_window: usize) -> Scheduler {
        Scheduler {
            budget,
            path_window,
            min_window: path_window,
            window_time: None,
            next_seq: 1,
            entries: BTreeMap::new(),
            queue: BTreeSet::new(),
            inflight: BTreeSet::new(),
            hedge_from: vec![0; paths.min(MAX_PATHS)],
            unacked_bytes: 0,
            unacked_by_round: BTreeMap::new(),
            paths: vec![PathCounters::default(); paths.min(MAX_PATHS)],
            pushed_bytes: 0,
            acked_bytes: 0,
            hedging: false,
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

    /// Turns hedging on or off (see the module docs). Off, nothing new is copied;
    /// copies already in flight stay until acknowledged or their path dies.
    pub fn set_hedging(&mut self, on: bool) {
        self.hedging = on;
    }

    pub fn hedging(&self) -> bool {
        self.hedging
    }

    /// The next chunk `path` should send, if it is up and has room in its window
    /// — or, window or not, a chunk a dead path lost — or, while hedging and with
    /// nothing it may take from the queue, a copy of the lowest chunk in flight on
    /// other paths only.
    ///
    /// Resends go ahead of the window: the budget already counts them, so the
    /// receiver never holds more than it allows; and a receiver that acknowledges
    /// only what its reader has taken (a byte stream, which delivers in order)
    /// leaves the surviving path's window full of chunks waiting for exactly the
    /// ones the dead path lost. Held to the window, they would never go. Hedged
    /// copies go ahead of the window for the same reason (they may be the copies the
    /// reader waits for); they are bounded by the budget instead: a path holds at
    /// most one copy of each unacknowledged chunk, and those together are within it.
    pub fn next_for(&mut self, path: PathId) -> Option<(u64, Chunk)> {
        let window = self.window(path);
        let p = self.paths.get(path)?;
        if !p.up {
            return None;
        }
        if let Some(&seq) = self.queue.first() {
            let resend = self.entries.get(&seq)?.last_path.is_some();
            if resend || p.inflight_bytes == 0 || p.inflight_bytes < window {
                self.queue.pop_first();
                return self.send_on(seq, path);
            }
        }
        if !self.hedging {
            return None;
        }
        let held = p.inflight_bytes;
        let seq = self.hedge_candidate(path)?;
        let cost = self.entries.get(&seq)?.chunk.cost();
        if held > 0 && held + cost > self.budget {
            return None;
        }
        self.hedge_from[path] = seq + 1;
        self.send_on(seq, path)
    }

    /// The lowest chunk in flight on other paths but not on `path`. Starts from
    /// `hedge_from[path]`, below which every chunk in flight is on `path` already,
    /// and moves it past what it skips: a path that holds everything costs nothing
    /// to ask again, however many small chunks are in flight.
    fn hedge_candidate(&mut self, path: PathId) -> Option<u64> {
        let mut next_from = self.hedge_from[path];
        let mut found = None;
        for &seq in self.inflight.range(self.hedge_from[path]..) {
            match self.entries.get(&seq).map(|e| e.at) {
                Some(Where::InFlight(holders)) if !holders.has(path) => {
                    found = Some(seq);
                    break;
                }
                _ => next_from = seq + 1,
            }
        }
        self.hedge_from[path] = next_from;
        found
    }

    /// Puts `seq` (just taken off the queue, or in flight elsewhere: a hedged copy)
    /// on `path`.
    fn send_on(&mut self, seq: u64, path: PathId) -> Option<(u64, Chunk)> {
        let e = self.entries.get_mut(&seq)?;
        let cost = e.chunk.cost();
        let (holders, hedged) = match e.at {
            Where::Queued => (PathSet::one(path), false),
            Where::InFlight(h) => (h.with(path), true),
        };
        let resent = !hedged && e.last_path.is_some();
        if !hedged {
            self.inflight.insert(seq);
            // A chunk newly in flight is a candidate for every other path's copy.
            // (Taking the queue first, a path never scans past a queued chunk, so
            // this only guards that order.)
            for (other, from) in self.hedge_from.iter_mut().enumerate() {
                if other != path {
                    *from = (*from).min(seq);
                }
            }
        }
        e.at = Where::InFlight(holders);
        e.last_path = Some(path);
        let p = &mut self.paths[path];
        p.inflight_bytes += cost;
        p.sent_bytes += cost as u64;
        p.sent_chunks += 1;
        if resent {
            p.resent_chunks += 1;
        }
        if hedged {
            p.hedged_chunks += 1;
        }
        Some((seq, e.chunk.clone()))
    }

    /// Records that the receiver applied chunk `seq`, crediting the path that
    /// carried it last. Returns false for unknown or already acknowledged chunks
    /// (duplicates after a resend or a hedge).
    pub fn on_ack(&mut self, seq: u64, now: Instant) -> bool {
        self.ack(seq, None, now)
    }

    /// [`on_ack`](Self::on_ack) for an acknowledgement that came on `path`: the
    /// receiver acknowledges a copy on the path it came on, so that path delivered it
    /// (with hedged copies, not necessarily the one that carried it last).
    pub fn on_ack_on(&mut self, seq: u64, path: PathId, now: Instant) -> bool {
        self.ack(seq, Some(path), now)
    }

    fn ack(&mut self, seq: u64, on: Option<PathId>, now: Instant) -> bool {
        let Some(e) = self.entries.remove(&seq) else {
            return false;
        };
        let cost = e.chunk.cost();
        match e.at {
            Where::Queued => {
                self.queue.remove(&seq);
            }
            Where::InFlight(holders) => {
                self.inflight.remove(&seq);
                for p in holders.iter() {
                    self.paths[p].inflight_bytes -= cost;
                }
            }
        }
        let credit = on.filter(|p| *p < self.paths.len()).or(e.last_path);
        if let Some(p) = credit {
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

    /// `path` completed its hello and may carry chunks. Ignored for paths from
    /// [`MAX_PATHS`] on.
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

    /// `path` is dead: its copies are gone, and every chunk no other path holds goes
    /// back to the queue. Returns the number of chunks requeued.
    pub fn path_down(&mut self, path: PathId) -> usize {
        let Some(p) = self.paths.get_mut(path) else {
            return 0;
        };
        if p.up {
            p.up = false;
            p.times_down += 1;
        }
        p.inflight_bytes = 0;
        // Its copies are gone: every chunk in flight is a candidate again.
        self.hedge_from[path] = 0;
        let mut requeued = 0;
        for (seq, e) in self.entries.iter_mut() {
            if let Where::InFlight(holders) = e.at {
                if !holders.has(path) {
                    continue;
                }
                let rest = holders.without(path);
                if rest.is_empty() {
                    e.at = Where::Queued;
                    self.inflight.remove(seq);
                    self.queue.insert(*seq);
                    requeued += 1;
                } else {
                    e.at = Where::InFlight(rest);
                }
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
mod tests;
