//! Held acknowledgements: a receiver whose sink only buffers pages for a consumer
//! (the byte stream) acknowledges a chunk once the consumer has taken its pages, not
//! once the sink holds them. The sender's in-flight budget counts unacknowledged
//! bytes, so it then bounds what the sink buffers: a slow consumer slows the sender
//! instead of growing a buffer.
//!
//! The consumer publishes how far it has read as a page number on a `watch` channel
//! ("every page below this one is taken"). Each path of the receiver keeps the
//! acknowledgements of the chunks it applied in a [`HeldAcks`] (plain data, tested
//! here) and sends them as that number passes their last page. A path that dies
//! takes its held acknowledgements with it; the sender resends those chunks on
//! another path and the copies, already applied, are acknowledged there.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use tokio::sync::{mpsc, watch};

/// Most acknowledgements one path may hold. An honest sender never gets near it
/// (its budget of unacknowledged bytes, in chunks of at least one page); a sender
/// that keeps sending unacknowledged chunks past it fails the stream.
pub(crate) const MAX_HELD: usize = 1 << 20;

/// Acknowledgements waiting for the consumer: `(end page, sequence number)`, the
/// chunk being acknowledged once every page below `end` is taken.
#[derive(Default)]
pub(crate) struct HeldAcks {
    waiting: BinaryHeap<Reverse<(u64, u64)>>,
}

impl HeldAcks {
    /// Offers the acknowledgement of chunk `seq`, whose pages end below `end`, when
    /// the consumer has taken the pages below `taken`: returns it when it may go now,
    /// else keeps it. `Err` when more than [`MAX_HELD`] are held.
    pub(crate) fn offer(&mut self, end: u64, seq: u64, taken: u64) -> Result<Option<u64>, String> {
        if end <= taken {
            return Ok(Some(seq));
        }
        if self.waiting.len() >= MAX_HELD {
            return Err(format!(
                "the sender left more than {MAX_HELD} chunks unacknowledged"
            ));
        }
        self.waiting.push(Reverse((end, seq)));
        Ok(None)
    }

    /// The acknowledgements that may go now that the pages below `taken` are taken.
    pub(crate) fn release(&mut self, taken: u64) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(Reverse((end, seq))) = self.waiting.peek().copied() {
            if end > taken {
                break;
            }
            self.waiting.pop();
            out.push(seq);
        }
        out
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.waiting.len()
    }
}

/// One path's releaser: takes `(end, seq)` of applied chunks from the chunk reader,
/// and hands each sequence number to `ack` once the consumer's position passes
/// `end`. Returns when the reader, the consumer or the path's outbox is gone, or
/// (with the reason) when the sender holds too many chunks unacknowledged.
pub(crate) async fn release_acks<F, Fut>(
    mut applied: mpsc::Receiver<(u64, u64)>,
    mut taken: watch::Receiver<u64>,
    mut ack: F,
) -> Result<(), String>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut held = HeldAcks::default();
    loop {
        let ready = tokio::select! {
            next = applied.recv() => match next {
                Some((end, seq)) => held.offer(end, seq, *taken.borrow())?.into_iter().collect(),
                None => return Ok(()),
            },
            changed = taken.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let at = *taken.borrow_and_update();
                held.release(at)
            }
        };
        for seq in ready {
            if !ack(seq).await {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_wait_for_the_consumer_and_leave_in_page_order() {
        let mut h = HeldAcks::default();
        assert_eq!(h.offer(64, 1, 0), Ok(None));
        assert_eq!(h.offer(192, 3, 0), Ok(None));
        assert_eq!(h.offer(128, 2, 0), Ok(None));
        // A copy of pages already taken (a resend) is acknowledged at once.
        assert_eq!(h.offer(64, 9, 64), Ok(Some(9)));
        assert_eq!(h.release(63), Vec::<u64>::new());
        assert_eq!(h.release(130), vec![1, 2]);
        assert_eq!(h.len(), 1);
        assert_eq!(h.release(u64::MAX), vec![3]);
        assert_eq!(h.len(), 0);
    }

    #[test]
    fn a_sender_ignoring_its_budget_is_refused() {
        let mut h = HeldAcks::default();
        for seq in 0..MAX_HELD as u64 {
            assert_eq!(h.offer(1 << 40, seq + 1, 0), Ok(None));
        }
        assert!(h.offer(1 << 40, 1 << 30, 0).is_err());
        // Still fine for what the consumer has taken.
        assert_eq!(h.offer(1, 7, 1), Ok(Some(7)));
    }
}
