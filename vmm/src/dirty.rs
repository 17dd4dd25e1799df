//! Dirty bitmaps: the caller-owned [`DirtyBitmap`] a round works from, and the
//! lock-free [`DirtyLog`] that vCPUs mark as they write.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per page. Owned by the migration engine and reused every round, so
/// fetching the dirty log allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyBitmap {
    /// A bitmap of `pages` clear bits.
    pub fn new(pages: u64) -> Self {
        DirtyBitmap {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// Number of pages covered.
    pub fn len(&self) -> u64 {
        self.pages
    }

    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Raw words, for backends that fill the bitmap in place (KVM's dirty log
    /// has the same layout: bit `p % 64` of word `p / 64`).
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    pub fn set(&mut self, page: u64) {
        self.words[(page / 64) as usize] |= 1 << (page % 64);
    }

    pub fn get(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    pub fn set_all(&mut self) {
        self.words.fill(u64::MAX);
        self.trim();
    }

    /// ORs `other` into `self` (both must cover the same pages).
    pub fn union_with(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Set pages in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &word)| {
            let mut w = word;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros();
                w &= w - 1;
                Some(i as u64 * 64 + u64::from(bit))
            })
        })
    }

    /// Set pages grouped into runs `(first, count)` of at most `max_run` pages.
    pub fn runs(&self, max_run: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut pages = self.iter().peekable();
        std::iter::from_fn(move || {
            let first = pages.next()?;
            let mut count = 1;
            while count < max_run && pages.peek() == Some(&(first + count)) {
                pages.next();
                count += 1;
            }
            Some((first, count))
        })
    }

    /// Clears bits past the last page, which `set_all` or a backend may set.
    pub fn trim(&mut self) {
        let rem = self.pages % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }
}

/// The dirty log vCPUs write into: one atomic bit per page.
///
/// Ordering: a writer stores into the page first and marks it after
/// (`Release`); the reader swaps words out (`Acquire`). A page that a round
/// reads while a write is in flight is therefore marked after the round's
/// fetch, and the next round sends it again.
pub struct DirtyLog {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl DirtyLog {
    pub fn new(pages: u64) -> Self {
        DirtyLog {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Marks a page; call after the write to it has landed.
    #[inline]
    pub fn mark(&self, page: u64) {
        let word = &self.words[(page / 64) as usize];
        let bit = 1u64 << (page % 64);
        // Skip the read-modify-write when the bit is already set: hot pages are
        // written far more often than the log is fetched.
        if word.load(Ordering::Relaxed) & bit == 0 {
            word.fetch_or(bit, Ordering::Release);
        } else {
            // Still publish the write to the fetching thread.
            std::sync::atomic::fence(Ordering::Release);
        }
    }

    /// Marks `count` pages from `first`.
    pub fn mark_range(&self, first: u64, count: u64) {
        for page in first..first + count {
            self.mark(page);
        }
    }

    /// Moves the log into `out` and clears it. `out` must cover the same pages.
    pub fn fetch_and_clear(&self, out: &mut DirtyBitmap) {
        for (dst, src) in out.words.iter_mut().zip(&self.words) {
            *dst = if src.load(Ordering::Relaxed) == 0 {
                0
            } else {
                src.swap(0, Ordering::Acquire)
            };
        }
    }

    /// Copies the log into `out` without clearing it.
    pub fn snapshot(&self, out: &mut DirtyBitmap) {
        for (dst, src) in out.words.iter_mut().zip(&self.words) {
            *dst = src.load(Ordering::Acquire);
        }
    }

    pub fn clear(&self) {
        for w in &self.words {
            w.store(0, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_group_adjacent_pages() {
        let mut b = DirtyBitmap::new(200);
        for p in [0, 1, 2, 5, 63, 64, 65, 199] {
            b.set(p);
        }
        let runs: Vec<_> = b.runs(2).collect();
        assert_eq!(
            runs,
            vec![(0, 2), (2, 1), (5, 1), (63, 2), (65, 1), (199, 1)]
        );
        assert_eq!(b.count(), 8);
    }

    #[test]
    fn set_all_stays_inside_the_bitmap() {
        let mut b = DirtyBitmap::new(70);
        b.set_all();
        assert_eq!(b.count(), 70);
        assert_eq!(b.iter().last(), Some(69));
    }

    #[test]
    fn fetch_and_clear_moves_marks() {
        let log = DirtyLog::new(130);
        log.mark(3);
        log.mark(129);
        let mut b = DirtyBitmap::new(130);
        log.fetch_and_clear(&mut b);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![3, 129]);
        log.fetch_and_clear(&mut b);
        assert_eq!(b.count(), 0);
    }
}
