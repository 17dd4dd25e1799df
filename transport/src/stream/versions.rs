//! Which copy of a page wins on the receiver. Striping and retransmission deliver
//! chunks in any order and sometimes twice; a page must end up holding the newest copy
//! the sender sent, never an older one that happened to arrive later.
//!
//! Every chunk carries the round its pages were read in and a sequence number the
//! sender assigns in send order. A page's version is `(round, seq)` compared
//! lexicographically: a later round always wins, and within a round the later send
//! wins. The receiver stores the version of the copy each page holds and applies an
//! incoming copy only to the pages where it is strictly newer. No I/O, no clocks.

use std::collections::HashMap;

use crate::protocol::{MAX_ROUND, MAX_SEQ};

/// `(round, seq)` packed so that integer order is version order. 0 = never written.
pub type Version = u64;

/// Packs a version. `round <= MAX_ROUND`, `1 <= seq <= MAX_SEQ` (checked when the chunk
/// is decoded or created).
pub fn version(round: u32, seq: u64) -> Version {
    debug_assert!(round <= MAX_ROUND && seq <= MAX_SEQ);
    (u64::from(round) << 40) | (seq & MAX_SEQ)
}

/// The round a version was read in.
pub fn round_of(v: Version) -> u32 {
    (v >> 40) as u32
}

/// Pages per lazily allocated segment (16 MiB of guest memory, 32 KiB of versions).
const SEGMENT_PAGES: u64 = 4096;

/// Versions of the pages a receiver holds. Memory grows only with pages actually
/// applied (8 bytes per page, ~0.2% of guest memory).
#[derive(Default)]
pub struct PageVersions {
    segments: HashMap<u64, Box<[Version]>>,
}

/// What admitting one chunk did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Admitted {
    /// Pages written because this copy was newer.
    pub applied: u32,
    /// Pages skipped because the page already held this copy or a newer one.
    pub stale: u32,
}

impl PageVersions {
    pub fn new() -> Self {
        Self::default()
    }

    /// The version page `page` holds (0 if never written).
    pub fn get(&self, page: u64) -> Version {
        self.segments
            .get(&(page / SEGMENT_PAGES))
            .map_or(0, |s| s[(page % SEGMENT_PAGES) as usize])
    }

    fn set_run(&mut self, start: u64, len: u32, v: Version) {
        let mut page = start;
        let end = start + u64::from(len);
        while page < end {
            let seg = page / SEGMENT_PAGES;
            let off = (page % SEGMENT_PAGES) as usize;
            let n = ((SEGMENT_PAGES - off as u64).min(end - page)) as usize;
            let s = self
                .segments
                .entry(seg)
                .or_insert_with(|| vec![0; SEGMENT_PAGES as usize].into_boxed_slice());
            s[off..off + n].fill(v);
            page += n as u64;
        }
    }

    /// Offers the copy of pages `[first, first + count)` with version `v`. For each
    /// maximal run of pages where it is newer, calls `apply(run_start, run_len)` and,
    /// once that succeeds, records `v` for the run. An error from `apply` stops
    /// at that run and leaves its pages' versions untouched.
    pub fn admit<E>(
        &mut self,
        first: u64,
        count: u32,
        v: Version,
        mut apply: impl FnMut(u64, u32) -> Result<(), E>,
    ) -> Result<Admitted, E> {
        let mut out = Admitted::default();
        let mut run: Option<(u64, u32)> = None;
        for page in first..first + u64::from(count) {
            if self.get(page) < v {
                run = match run {
                    Some((s, n)) => Some((s, n + 1)),
                    None => Some((page, 1)),
                };
            } else {
                out.stale += 1;
                if let Some((s, n)) = run.take() {
                    apply(s, n)?;
                    self.set_run(s, n, v);
                    out.applied += n;
                }
            }
        }
        if let Some((s, n)) = run {
            apply(s, n)?;
            self.set_run(s, n, v);
            out.applied += n;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_order_is_round_then_seq() {
        assert!(version(1, 1) > version(0, MAX_SEQ));
        assert!(version(2, 5) > version(2, 4));
        assert_eq!(round_of(version(7, 99)), 7);
    }

    #[test]
    fn older_copy_never_overwrites_and_runs_split_around_newer_pages() {
        let mut pv = PageVersions::new();
        let mut calls = Vec::new();
        let mut rec = |s, n| {
            calls.push((s, n));
            Ok::<(), ()>(())
        };
        // Round 1 copy of page 5 arrives before the round 0 copy of pages 0..10.
        assert_eq!(pv.admit(5, 1, version(1, 9), &mut rec).unwrap().applied, 1);
        let a = pv.admit(0, 10, version(0, 1), &mut rec).unwrap();
        assert_eq!(
            a,
            Admitted {
                applied: 9,
                stale: 1
            }
        );
        assert_eq!(calls, vec![(5, 1), (0, 5), (6, 4)]);
        assert_eq!(pv.get(5), version(1, 9));
        assert_eq!(pv.get(4), version(0, 1));
        // A duplicate is skipped entirely.
        let a = pv
            .admit(0, 10, version(0, 1), |_, _| Err::<(), ()>(()))
            .unwrap();
        assert_eq!(a.applied, 0);
    }

    #[test]
    fn failed_apply_leaves_versions_alone_and_segments_are_sparse() {
        let mut pv = PageVersions::new();
        let far = 1u64 << 40;
        assert!(pv.admit(far, 3, version(0, 1), |_, _| Err("no")).is_err());
        assert_eq!(pv.get(far), 0);
        assert!(pv.segments.is_empty());
        pv.admit(SEGMENT_PAGES - 1, 2, version(0, 2), |_, _| Ok::<(), ()>(()))
            .unwrap();
        assert_eq!(pv.segments.len(), 2);
        assert_eq!(pv.get(SEGMENT_PAGES), version(0, 2));
    }
}
