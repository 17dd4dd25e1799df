//! Exactly-once execution of requests that arrive more than once.
//!
//! A caller sends a request again on another network when its first path dies or
//! answers too slowly, so the same request can reach a node twice, even at the same
//! time. Each copy carries the caller's request id; the first copy runs the handler,
//! every later copy gets that run's answer (waiting for it if it is still running).
//! Answers are kept for [`KEEP`] or until the cache's bounds push them out, which is
//! far longer than any caller keeps retrying one request.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::protocol::ResponseBody;
use crate::NodeId;

/// How long an answer is kept for a late duplicate.
pub const KEEP: Duration = Duration::from_secs(60);
/// Most answers kept.
pub const MAX_ENTRIES: usize = 16_384;
/// Most answer bytes kept.
pub const MAX_BYTES: usize = 64 << 20;

/// Who asked: the caller's node and its request id (random per logical call, the same
/// for every copy of it).
pub type RequestKey = (NodeId, u64);

/// What a request's arrival means for its handler.
pub enum Arrival {
    /// First copy: run the handler, then [`ReplyCache::finish`]; the answer also
    /// arrives here.
    Run(watch::Receiver<Option<ResponseBody>>),
    /// The handler ran (or runs) for an earlier copy: wait for its answer here.
    Duplicate(watch::Receiver<Option<ResponseBody>>),
}

struct Entry {
    answer: watch::Sender<Option<ResponseBody>>,
    bytes: usize,
}

/// See the module docs. Plain data: the caller holds it behind a lock.
#[derive(Default)]
pub struct ReplyCache {
    entries: HashMap<RequestKey, Entry>,
    /// Insertion order, for expiry and the bounds.
    order: VecDeque<(Instant, RequestKey)>,
    bytes: usize,
    duplicates: u64,
}

impl ReplyCache {
    /// Registers the arrival of `key` at `now`.
    pub fn arrive(&mut self, key: RequestKey, now: Instant) -> Arrival {
        self.expire(now);
        if let Some(e) = self.entries.get(&key) {
            self.duplicates += 1;
            return Arrival::Duplicate(e.answer.subscribe());
        }
        let (answer, rx) = watch::channel(None);
        self.entries.insert(key, Entry { answer, bytes: 0 });
        self.order.push_back((now, key));
        while self.entries.len() > MAX_ENTRIES {
            self.evict_oldest();
        }
        Arrival::Run(rx)
    }

    /// Records the answer of `key`'s handler and hands it to waiting duplicates.
    pub fn finish(&mut self, key: RequestKey, answer: &ResponseBody) {
        let Some(e) = self.entries.get_mut(&key) else {
            return;
        };
        let bytes = match answer {
            ResponseBody::Ok(b) => b.len(),
            ResponseBody::HandlerError(s) | ResponseBody::UnknownService(s) => s.len(),
        };
        e.bytes = bytes;
        e.answer.send_replace(Some(answer.clone()));
        self.bytes += bytes;
        while self.bytes > MAX_BYTES && self.order.len() > 1 {
            self.evict_oldest();
        }
    }

    /// Copies that found an earlier one in the cache, since the start.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn expire(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > KEEP)
        {
            self.evict_oldest();
        }
    }

    fn evict_oldest(&mut self) {
        if let Some((_, key)) = self.order.pop_front() {
            if let Some(e) = self.entries.remove(&key) {
                self.bytes -= e.bytes;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(b: &[u8]) -> ResponseBody {
        ResponseBody::Ok(b.to_vec())
    }

    #[test]
    fn first_copy_runs_and_later_copies_get_its_answer() {
        let mut c = ReplyCache::default();
        let t = Instant::now();
        assert!(matches!(c.arrive((1, 7), t), Arrival::Run(_)));
        let Arrival::Duplicate(mut early) = c.arrive((1, 7), t) else {
            panic!("a second copy must not run the handler");
        };
        assert!(early.borrow_and_update().is_none(), "still running");
        c.finish((1, 7), &ok(b"done"));
        assert_eq!(*early.borrow(), Some(ok(b"done")));
        let Arrival::Duplicate(late) = c.arrive((1, 7), t) else {
            panic!("a late copy must not run the handler");
        };
        assert_eq!(*late.borrow(), Some(ok(b"done")));
        assert_eq!(c.duplicates(), 2);
    }

    #[test]
    fn ids_are_per_caller() {
        let mut c = ReplyCache::default();
        let t = Instant::now();
        assert!(matches!(c.arrive((1, 7), t), Arrival::Run(_)));
        assert!(matches!(c.arrive((2, 7), t), Arrival::Run(_)));
    }

    #[test]
    fn answers_expire_after_keep() {
        let mut c = ReplyCache::default();
        let t = Instant::now();
        assert!(matches!(c.arrive((1, 1), t), Arrival::Run(_)));
        c.finish((1, 1), &ok(b"x"));
        assert!(matches!(
            c.arrive((1, 2), t + KEEP + Duration::from_secs(1)),
            Arrival::Run(_)
        ));
        assert_eq!(c.len(), 1, "the expired answer is gone");
    }

    #[test]
    fn bounded_in_entries_and_bytes() {
        let mut c = ReplyCache::default();
        let t = Instant::now();
        for id in 0..(MAX_ENTRIES as u64 + 10) {
            assert!(matches!(c.arrive((1, id), t), Arrival::Run(_)));
        }
        assert_eq!(c.len(), MAX_ENTRIES);
        let big = vec![0u8; MAX_BYTES / 2 + 1];
        c.finish((1, 100), &ResponseBody::Ok(big.clone()));
        c.finish((1, 200), &ResponseBody::Ok(big));
        assert!(c.bytes <= MAX_BYTES);
        assert!(
            !c.entries.contains_key(&(1, 100)),
            "the oldest big answer went first"
        );
    }
}
