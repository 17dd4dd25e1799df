//! The scheduler's rules, each on plain data: no sockets, no clocks but
//! instants the tests make.
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

/// Two paths, hedging on: three chunks striped 0, 1, 0, then path 1 (idle)
/// copies what path 0 holds.
fn hedged_pair(t: Instant) -> Scheduler {
    let mut s = Scheduler::new(2, 100 * COST, usize::MAX);
    s.path_up(0, t);
    s.path_up(1, t);
    for i in 0..3 {
        s.push(chunk(0, i));
    }
    let sent: Vec<u64> = [0, 1, 0]
        .iter()
        .map(|p| s.next_for(*p).unwrap().0)
        .collect();
    assert_eq!(sent, vec![1, 2, 3]);
    assert!(s.next_for(1).is_none(), "hedging off: nothing to copy");
    s.set_hedging(true);
    s
}

#[test]
fn a_silent_paths_chunks_are_delivered_by_the_hedge_copies_without_path_down() {
    let t = Instant::now();
    let mut s = hedged_pair(t);
    let copies: Vec<u64> = std::iter::from_fn(|| s.next_for(1).map(|x| x.0)).collect();
    assert_eq!(
        copies,
        vec![1, 3],
        "path 0's chunks, lowest first, once each"
    );
    assert!(
        s.next_for(0).is_some_and(|x| x.0 == 2),
        "and path 0 copies 2"
    );
    assert!(s.next_for(0).is_none());
    // Path 0 falls silent; path 1 delivers everything. Nobody calls path_down.
    for seq in 1..=3 {
        assert!(s.on_ack_on(seq, 1, t));
    }
    assert!(!s.unacked_through(0), "the round's barrier completes");
    assert!(s.is_drained());
    let (p0, p1) = (s.path(0).unwrap(), s.path(1).unwrap());
    assert_eq!((p0.inflight_bytes, p1.inflight_bytes), (0, 0));
    assert_eq!(
        (p0.acked_chunks, p1.acked_chunks),
        (0, 3),
        "credited where acked"
    );
    assert_eq!((p0.hedged_chunks, p1.hedged_chunks), (1, 2));
    assert_eq!((p0.resent_chunks, p1.resent_chunks), (0, 0));
    assert_eq!(p1.sent_chunks, 3);
    // The dead path is declared dead later: nothing is left to requeue.
    assert_eq!(s.path_down(0), 0);
}

#[test]
fn an_ack_releases_every_copy_and_its_duplicates_are_ignored() {
    let t = Instant::now();
    let mut s = hedged_pair(t);
    while s.next_for(1).is_some() {}
    assert_eq!(s.path(0).unwrap().inflight_bytes, 2 * COST);
    assert_eq!(s.path(1).unwrap().inflight_bytes, 3 * COST);
    assert_eq!(
        s.unacked_bytes(),
        3 * COST,
        "a copy costs the budget nothing"
    );
    assert!(s.on_ack(1, t));
    assert!(!s.on_ack_on(1, 1, t), "the second copy's ack");
    assert_eq!(s.path(0).unwrap().inflight_bytes, COST);
    assert_eq!(s.path(1).unwrap().inflight_bytes, 2 * COST);
    // Without the ack's path, the path that carried it last gets the credit.
    assert_eq!(s.path(1).unwrap().acked_chunks, 1);
    assert_eq!(s.unacked_bytes(), 2 * COST);
}

#[test]
fn a_chunk_another_live_path_holds_is_not_requeued_when_one_holder_dies() {
    let t = Instant::now();
    let mut s = hedged_pair(t);
    assert_eq!(s.next_for(1).map(|x| x.0), Some(1));
    // Chunk 1 on both paths, 3 on path 0 only.
    assert_eq!(s.path_down(0), 1, "only chunk 3 goes back");
    assert_eq!(s.path(0).unwrap().inflight_bytes, 0);
    let next: Vec<u64> = std::iter::from_fn(|| s.next_for(1).map(|x| x.0)).collect();
    assert_eq!(next, vec![3], "1 and 2 are already on path 1");
    assert_eq!(s.path(1).unwrap().resent_chunks, 1);
    // Path 1 dies too: now its chunks have no holder left.
    assert_eq!(s.path_down(1), 3);
    s.path_up(0, t);
    let next: Vec<u64> = std::iter::from_fn(|| s.next_for(0).map(|x| x.0)).collect();
    assert_eq!(next, vec![1, 2, 3]);
    for seq in 1..=3 {
        assert!(s.on_ack_on(seq, 0, t));
    }
    assert!(s.is_drained());
    assert_eq!(s.path(0).unwrap().inflight_bytes, 0);
}

#[test]
fn a_path_that_comes_back_copies_again_what_it_lost() {
    let t = Instant::now();
    let mut s = hedged_pair(t);
    let copies: Vec<u64> = std::iter::from_fn(|| s.next_for(1).map(|x| x.0)).collect();
    assert_eq!(copies, vec![1, 3]);
    assert_eq!(s.path_down(1), 1, "chunk 2 was on path 1 only");
    s.path_up(1, t);
    assert_eq!(s.next_for(1).map(|x| x.0), Some(2), "the resend first");
    let copies: Vec<u64> = std::iter::from_fn(|| s.next_for(1).map(|x| x.0)).collect();
    assert_eq!(copies, vec![1, 3], "its copies went with it");
}

#[test]
fn hedged_copies_pass_a_full_window_within_the_budget_and_queued_chunks_go_first() {
    let t = Instant::now();
    // Windows of two chunks, a budget of five.
    let mut s = Scheduler::new(2, 5 * COST, 2 * COST);
    s.path_up(0, t);
    s.path_up(1, t);
    s.set_hedging(true);
    for i in 0..4 {
        s.push(chunk(0, i));
    }
    let sent: Vec<u64> = [0, 0, 1]
        .iter()
        .map(|p| s.next_for(*p).unwrap().0)
        .collect();
    assert_eq!(sent, vec![1, 2, 3]);
    // Path 0's window is full and chunk 4 waits in the queue: path 1 takes it
    // before copying anything.
    assert_eq!(s.next_for(1).map(|x| x.0), Some(4));
    // Both windows are full; the copies go anyway, each path ending with one
    // copy of every unacknowledged chunk.
    let on_0: Vec<u64> = std::iter::from_fn(|| s.next_for(0).map(|x| x.0)).collect();
    let on_1: Vec<u64> = std::iter::from_fn(|| s.next_for(1).map(|x| x.0)).collect();
    assert_eq!((on_0, on_1), (vec![3, 4], vec![1, 2]));
    for p in 0..2 {
        assert_eq!(s.path(p).unwrap().inflight_bytes, 4 * COST);
        assert!(s.path(p).unwrap().inflight_bytes <= 5 * COST);
    }
    // A new chunk is the queue's again, held to the window: it waits for acks.
    s.push(chunk(0, 4));
    assert!(s.next_for(0).is_none() && s.next_for(1).is_none());
    s.on_ack_on(1, 0, t);
    s.on_ack_on(2, 0, t);
    s.on_ack_on(3, 0, t);
    assert_eq!(s.next_for(0).map(|x| x.0), Some(5), "path 0 has room again");
    assert_eq!(s.next_for(1).map(|x| x.0), Some(5), "and path 1 copies it");
    // Off again: no new copies; those in flight stay until acknowledged.
    s.set_hedging(false);
    s.on_ack_on(4, 1, t);
    s.push(chunk(0, 5));
    assert_eq!(s.next_for(0).map(|x| x.0), Some(6));
    assert!(s.next_for(1).is_none());
    assert_eq!(s.path(1).unwrap().hedged_chunks, 3);
}

#[test]
fn paths_beyond_the_bound_never_come_up() {
    let t = Instant::now();
    let mut s = Scheduler::new(MAX_PATHS + 2, 100 * COST, usize::MAX);
    s.path_up(MAX_PATHS, t);
    s.path_up(MAX_PATHS - 1, t);
    s.set_hedging(true);
    s.push(chunk(0, 0));
    assert!(!s.is_up(MAX_PATHS));
    assert!(s.next_for(MAX_PATHS).is_none());
    assert_eq!(s.next_for(MAX_PATHS - 1).map(|x| x.0), Some(1));
    assert_eq!(s.path_down(MAX_PATHS), 0);
    assert!(s.on_ack_on(1, MAX_PATHS + 1, t));
    assert_eq!(s.path(MAX_PATHS - 1).unwrap().acked_chunks, 1);
}

/// What the scheduler's bookkeeping must agree with, recomputed from its entries.
fn check_books(s: &Scheduler) {
    for (p, counters) in s.paths.iter().enumerate() {
        let held: usize = s
            .entries
            .values()
            .filter(|e| matches!(e.at, Where::InFlight(h) if h.has(p)))
            .map(|e| e.chunk.cost())
            .sum();
        assert_eq!(counters.inflight_bytes, held, "path {p}");
        assert!(counters.up || held == 0, "a dead path holds nothing");
    }
    for (seq, e) in &s.entries {
        match e.at {
            Where::Queued => assert!(s.queue.contains(seq) && !s.inflight.contains(seq)),
            Where::InFlight(h) => {
                assert!(!h.is_empty() && s.inflight.contains(seq) && !s.queue.contains(seq))
            }
        }
    }
    assert_eq!(s.queue.len() + s.inflight.len(), s.entries.len());
    let unacked: usize = s.entries.values().map(|e| e.chunk.cost()).sum();
    assert_eq!(s.unacked_bytes(), unacked);
}

#[test]
fn random_operations_keep_the_books_and_follow_the_rule() {
    let t = Instant::now();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut s = Scheduler::new(3, 12 * COST, 3 * COST);
    for p in 0..3 {
        s.path_up(p, t);
    }
    let mut pushed = 0;
    for _ in 0..20_000 {
        match next(10) {
            0..=2 if s.has_room(COST) => {
                s.push(chunk(0, pushed));
                pushed += 1;
            }
            3..=5 => {
                let p = next(3) as usize;
                // The rule, recomputed from the entries: the queue's head if
                // the path may take it, else (hedging) a copy of the lowest
                // chunk in flight elsewhere only, within the budget.
                let held = s.paths[p].inflight_bytes;
                let may_take = |seq: &u64| {
                    s.entries[seq].last_path.is_some() || held == 0 || held < s.window(p)
                };
                let copy = s.entries.iter().find_map(|(seq, e)| match e.at {
                    Where::InFlight(h) if !h.has(p) => Some(*seq),
                    _ => None,
                });
                let want = if !s.is_up(p) {
                    None
                } else if let Some(seq) = s.queue.first().filter(|q| may_take(q)) {
                    Some(*seq)
                } else if s.hedging() && (held == 0 || held + COST <= s.budget) {
                    copy
                } else {
                    None
                };
                assert_eq!(s.next_for(p).map(|x| x.0), want, "path {p}");
            }
            6 | 7 => {
                if let Some(&seq) = s.inflight.iter().nth(next(4) as usize) {
                    assert!(s.on_ack_on(seq, next(3) as usize, t));
                }
            }
            8 => {
                let p = next(3) as usize;
                if s.is_up(p) && s.paths_up() > 1 {
                    s.path_down(p);
                } else {
                    s.path_up(p, t);
                }
            }
            _ => s.set_hedging(next(3) != 0),
        }
        check_books(&s);
    }
    assert!(s
        .paths
        .iter()
        .all(|p| p.hedged_chunks > 0 && p.resent_chunks > 0));
}
