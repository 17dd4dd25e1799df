//! The simulated vCPUs' workload: which pages they write, how fast, and the
//! per-vCPU state that must move with the guest to continue exactly.

use serde::{Deserialize, Serialize};

/// Which pages a vCPU writes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Pattern {
    /// Every workload page equally likely.
    Uniform,
    /// `write_percent`% of writes go to the first `page_percent`% of pages.
    HotSet { write_percent: u8, page_percent: u8 },
    /// Pages in order, wrapping around.
    Sequential,
}

/// What the vCPUs of a simulated guest do.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// Page writes per second over all vCPUs; `None` writes as fast as it can.
    /// 0 leaves memory untouched (an idle guest).
    pub dirty_pages_per_sec: Option<u64>,
    pub pattern: Pattern,
    /// Seed of the vCPUs' random choices: the same seed writes the same pages.
    pub seed: u64,
}

impl Workload {
    pub fn idle() -> Self {
        Workload {
            dirty_pages_per_sec: Some(0),
            pattern: Pattern::Uniform,
            seed: 0,
        }
    }

    pub fn uniform(pages_per_sec: u64, seed: u64) -> Self {
        Workload {
            dirty_pages_per_sec: Some(pages_per_sec),
            pattern: Pattern::Uniform,
            seed,
        }
    }
}

/// A vCPU's registers, as far as the simulation has any: the generator state,
/// the sweep cursor and a write counter. Saved in the device state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuContext {
    pub rng: u64,
    pub cursor: u64,
    pub writes: u64,
}

impl VcpuContext {
    pub fn new(seed: u64, index: u32) -> Self {
        let mut ctx = VcpuContext {
            rng: seed ^ (u64::from(index) << 32 | 0x5eed),
            cursor: 0,
            writes: 0,
        };
        ctx.next_u64();
        ctx
    }

    /// SplitMix64. Written here rather than taken from a crate because its
    /// state is part of the saved vCPU registers and must mean the same thing
    /// on every node, whatever crate versions they were built with.
    pub fn next_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// The next page to write, among `pages` workload pages.
    pub fn next_page(&mut self, pattern: Pattern, pages: u64) -> u64 {
        if pages == 0 {
            return 0;
        }
        match pattern {
            Pattern::Uniform => self.next_u64() % pages,
            Pattern::Sequential => {
                let page = self.cursor % pages;
                self.cursor = self.cursor.wrapping_add(1);
                page
            }
            Pattern::HotSet {
                write_percent,
                page_percent,
            } => {
                let hot = (pages * u64::from(page_percent.min(100)) / 100).max(1);
                if self.next_u64() % 100 < u64::from(write_percent) {
                    self.next_u64() % hot
                } else {
                    self.next_u64() % pages
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_pages() {
        let mut a = VcpuContext::new(42, 0);
        let mut b = VcpuContext::new(42, 0);
        let pa: Vec<_> = (0..100)
            .map(|_| a.next_page(Pattern::Uniform, 1000))
            .collect();
        let pb: Vec<_> = (0..100)
            .map(|_| b.next_page(Pattern::Uniform, 1000))
            .collect();
        assert_eq!(pa, pb);
        let mut c = VcpuContext::new(42, 1);
        let pc: Vec<_> = (0..100)
            .map(|_| c.next_page(Pattern::Uniform, 1000))
            .collect();
        assert_ne!(pa, pc);
    }

    #[test]
    fn hot_set_concentrates_writes() {
        let mut ctx = VcpuContext::new(7, 0);
        let pattern = Pattern::HotSet {
            write_percent: 90,
            page_percent: 10,
        };
        let hot = (0..10_000)
            .filter(|_| ctx.next_page(pattern, 1000) < 100)
            .count();
        assert!(hot > 8_500, "{hot} of 10000 writes hit the hot 10%");
    }

    #[test]
    fn sequential_sweeps() {
        let mut ctx = VcpuContext::new(1, 0);
        let pages: Vec<_> = (0..5)
            .map(|_| ctx.next_page(Pattern::Sequential, 3))
            .collect();
        assert_eq!(pages, vec![0, 1, 2, 0, 1]);
    }
}
