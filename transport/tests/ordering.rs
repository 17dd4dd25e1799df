//! Property: whatever order chunks arrive in — striped over paths, duplicated,
//! delivered late from a path already declared dead, resent after a path death — a
//! page never goes back to an older copy, and once everything is acknowledged every
//! page holds the newest copy the sender sent.
//!
//! Runs the real scheduler (sender) and page-version table (receiver) against a
//! simulated network driven by proptest's choices; no sockets, no clocks.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use ferry_transport::stream::scheduler::{Chunk, Scheduler};
use ferry_transport::stream::versions::{version, PageVersions, Version};
use proptest::prelude::*;

const PAGES: u64 = 48;

#[derive(Clone, Debug)]
struct Send {
    round: u32,
    first: u64,
    count: u32,
}

fn sends() -> impl Strategy<Value = Vec<Send>> {
    prop::collection::vec((0u32..4, 0..PAGES, 1u32..12), 1..40).prop_map(|v| {
        v.into_iter()
            .map(|(round, first, count)| Send {
                round,
                first,
                count: count.min((PAGES - first) as u32),
            })
            .collect()
    })
}

struct InNetwork {
    seq: u64,
    chunk: Chunk,
    path: usize,
}

struct Sim {
    sched: Scheduler,
    wire: Vec<InNetwork>,
    acks: Vec<u64>,
    receiver: PageVersions,
    /// What each page holds: the version of the copy last applied.
    memory: Vec<Version>,
    /// Newest version sent for each page.
    newest: Vec<Version>,
    to_send: std::vec::IntoIter<Send>,
    now: Instant,
}

impl Sim {
    fn deliver(&mut self, i: usize, duplicate: bool) {
        let (seq, chunk) = if duplicate {
            (self.wire[i].seq, self.wire[i].chunk.clone())
        } else {
            let m = self.wire.swap_remove(i);
            (m.seq, m.chunk)
        };
        let v = version(chunk.round, seq);
        let memory = &mut self.memory;
        self.receiver
            .admit(chunk.first, chunk.count, v, |start, n| {
                for p in start..start + u64::from(n) {
                    // The invariant, checked at every write.
                    assert!(
                        v > memory[p as usize],
                        "page {p}: copy {v:#x} replaces newer {:#x}",
                        memory[p as usize]
                    );
                    memory[p as usize] = v;
                }
                Ok::<(), ()>(())
            })
            .unwrap();
        self.acks.push(seq);
    }

    fn push_next(&mut self) -> bool {
        let Some(s) = self.to_send.next() else {
            return false;
        };
        let chunk = Chunk {
            round: s.round,
            first: s.first,
            count: s.count,
            offsets: None,
            data: None,
        };
        let seq = self.sched.push(chunk);
        for p in s.first..s.first + u64::from(s.count) {
            let v = version(s.round, seq);
            self.newest[p as usize] = self.newest[p as usize].max(v);
        }
        true
    }

    fn step(&mut self, op: u8, pick: usize) {
        let paths = 3;
        match op % 8 {
            0 | 1 => {
                self.push_next();
            }
            2 => {
                let p = pick % paths;
                if let Some((seq, chunk)) = self.sched.next_for(p) {
                    self.wire.push(InNetwork {
                        seq,
                        chunk,
                        path: p,
                    });
                }
            }
            3 if !self.wire.is_empty() => {
                let i = pick % self.wire.len();
                self.deliver(i, false);
            }
            4 if !self.wire.is_empty() => {
                let i = pick % self.wire.len();
                self.deliver(i, true);
            }
            5 if !self.acks.is_empty() => {
                let i = pick % self.acks.len();
                let seq = self.acks.swap_remove(i);
                self.sched.on_ack(seq, self.now);
            }
            6 => {
                // A path dies: some of what it carried is lost, the rest may still
                // arrive late; unacknowledged chunks are requeued.
                let p = pick % paths;
                self.sched.path_down(p);
                let mut k = pick;
                self.wire.retain(|m| {
                    k = k.wrapping_mul(31).wrapping_add(7);
                    m.path != p || k % 2 == 0
                });
            }
            7 => {
                let p = pick % paths;
                self.sched.path_up(p, self.now);
            }
            _ => {}
        }
    }

    /// Ends the run the way a healthy network would: path 0 up, everything pushed,
    /// delivered and acknowledged.
    fn drain(&mut self) {
        while self.push_next() {}
        self.sched.path_up(0, self.now);
        for _ in 0..100_000 {
            while let Some((seq, chunk)) = self.sched.next_for(0) {
                self.wire.push(InNetwork {
                    seq,
                    chunk,
                    path: 0,
                });
            }
            while !self.wire.is_empty() {
                self.deliver(self.wire.len() - 1, false);
            }
            for seq in std::mem::take(&mut self.acks) {
                self.sched.on_ack(seq, self.now);
            }
            if self.sched.is_drained() {
                return;
            }
        }
        panic!("scheduler never drained");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn no_page_ends_older_than_the_newest_copy_sent(
        sends in sends(),
        ops in prop::collection::vec((any::<u8>(), any::<usize>()), 0..400),
        budget_chunks in 1usize..8,
    ) {
        let now = Instant::now();
        let mut sim = Sim {
            // Zero chunks cost their header: a budget of a few chunks.
            sched: Scheduler::new(3, budget_chunks * 25, 2 * 25),
            wire: Vec::new(),
            acks: Vec::new(),
            receiver: PageVersions::new(),
            memory: vec![0; PAGES as usize],
            newest: vec![0; PAGES as usize],
            to_send: sends.into_iter(),
            now,
        };
        sim.sched.path_up(0, now);
        sim.sched.path_up(1, now);
        for (op, pick) in ops {
            // The caller only queues while the budget allows (back-pressure).
            if op % 8 < 2 && !sim.sched.has_room(25) {
                continue;
            }
            sim.step(op, pick);
        }
        sim.drain();
        prop_assert_eq!(&sim.memory, &sim.newest);
        for p in 0..PAGES {
            prop_assert_eq!(sim.receiver.get(p), sim.newest[p as usize]);
        }
    }
}
