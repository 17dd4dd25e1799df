//! An in-process pre-copy between two guests, driven only through the
//! [`Guest`] trait.
//!
//! This is the migration loop without a network: it proves that a backend can
//! be copied live (round 0, dirty rounds, pause, last pages, device state,
//! verify, resume) and it is what backend tests use. The cluster's engine in
//! `ferry-actors` runs the same steps over the page stream with the real
//! convergence policy; the stop rule here is deliberately simple.

use crate::dirty::DirtyBitmap;
use crate::guest::{is_zero, Guest, GuestError, GuestResult, MemoryDigest, PAGE_SIZE};
use std::time::{Duration, Instant};

/// When to stop iterating.
#[derive(Debug, Clone)]
pub struct LocalCopyConfig {
    /// Stop and copy once a round leaves at most this many dirty pages.
    pub stop_pages: u64,
    /// Stop and copy after this many dirty rounds regardless.
    pub max_rounds: u32,
    /// Raise the source's throttle by this share each round the remainder
    /// does not shrink (auto-converge); 0 disables.
    pub throttle_step: f64,
    /// Compare memory and device-state digests of source and target during
    /// the blackout (costs a full memory hash on each side).
    pub verify: bool,
    /// Pages per read/write call.
    pub run_pages: u64,
}

impl Default for LocalCopyConfig {
    fn default() -> Self {
        LocalCopyConfig {
            stop_pages: 256,
            max_rounds: 30,
            throttle_step: 0.2,
            verify: true,
            run_pages: 64,
        }
    }
}

/// One pre-copy round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundReport {
    pub round: u32,
    /// Pages whose contents were copied.
    pub pages_sent: u64,
    /// Pages found zero (round 0 skips them; later rounds zero them on the target).
    pub zero_pages: u64,
    pub elapsed: Duration,
    /// Source throttle while the round ran.
    pub throttle: f64,
}

/// What a local copy did and measured.
#[derive(Debug, Clone)]
pub struct LocalReport {
    pub rounds: Vec<RoundReport>,
    /// Pages copied while paused.
    pub final_pages: u64,
    /// From the source's pause to the target's resume.
    pub blackout: Duration,
    pub total: Duration,
    /// Source and target digests taken in the blackout, if verified.
    pub digests: Option<(MemoryDigest, MemoryDigest)>,
    /// Part of the blackout spent hashing both guests to verify them.
    pub verify_time: Duration,
}

impl LocalReport {
    pub fn bytes_copied(&self) -> u64 {
        (self.rounds.iter().map(|r| r.pages_sent).sum::<u64>() + self.final_pages)
            * PAGE_SIZE as u64
    }
}

/// Copies pages marked in `pages` from `src` to `dst`. With `skip_zero`, pages
/// found zero are left alone (a fresh target is already zero); otherwise they
/// are zeroed on the target, since they may have held data before.
fn copy_pages(
    src: &dyn Guest,
    dst: &dyn Guest,
    pages: &DirtyBitmap,
    run_pages: u64,
    skip_zero: bool,
    buf: &mut [u8],
) -> GuestResult<(u64, u64)> {
    let (mut sent, mut zero) = (0, 0);
    for (first, count) in pages.runs(run_pages) {
        let bytes = &mut buf[..count as usize * PAGE_SIZE];
        src.read_pages(first, bytes)?;
        for (i, page) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
            let at = first + i as u64;
            if is_zero(page) {
                zero += 1;
                if !skip_zero {
                    dst.zero_pages(at, 1)?;
                }
            } else {
                sent += 1;
                dst.write_pages(at, page)?;
            }
        }
    }
    Ok((sent, zero))
}

/// Live-copies a running `src` into a paused `dst` of the same size, then
/// resumes `dst`. `src` is left paused: the caller destroys it. On error `dst`
/// is left paused and `src` is resumed if it had been paused here.
pub fn live_copy(
    src: &dyn Guest,
    dst: &dyn Guest,
    config: &LocalCopyConfig,
) -> GuestResult<LocalReport> {
    if src.page_count() != dst.page_count() {
        return Err(GuestError::StateMismatch(format!(
            "source has {} pages, target {}",
            src.page_count(),
            dst.page_count()
        )));
    }
    let started = Instant::now();
    let run_pages = config.run_pages.max(1);
    let mut buf = vec![0u8; run_pages as usize * PAGE_SIZE];
    let mut pages = DirtyBitmap::new(src.page_count());
    let mut rounds = Vec::new();
    let mut throttle = 0.0;

    // Round 0: everything that may be non-zero. Logging starts first, so a
    // write racing the copy is caught by round 1.
    src.start_dirty_log()?;
    src.nonzero_candidates(&mut pages)?;
    let t = Instant::now();
    let (sent, zero) = copy_pages(src, dst, &pages, run_pages, true, &mut buf)?;
    rounds.push(RoundReport {
        round: 0,
        pages_sent: sent,
        zero_pages: zero,
        elapsed: t.elapsed(),
        throttle,
    });

    let mut previous = u64::MAX;
    loop {
        src.fetch_and_clear_dirty(&mut pages)?;
        let dirty = pages.count();
        let round = rounds.len() as u32;
        if dirty <= config.stop_pages || round > config.max_rounds {
            break;
        }
        if dirty >= previous && config.throttle_step > 0.0 {
            throttle = (throttle + config.throttle_step).min(0.99);
            src.set_throttle(throttle)?;
        }
        previous = dirty;
        let t = Instant::now();
        let (sent, zero) = copy_pages(src, dst, &pages, run_pages, false, &mut buf)?;
        rounds.push(RoundReport {
            round,
            pages_sent: sent,
            zero_pages: zero,
            elapsed: t.elapsed(),
            throttle,
        });
    }

    // Blackout. `pages` holds the remainder fetched above; writes after that
    // fetch and before the pause are picked up by one more fetch while paused.
    let blackout = Instant::now();
    src.pause()?;
    let mut verify_time = Duration::ZERO;
    let mut finish = || -> GuestResult<(u64, Option<(MemoryDigest, MemoryDigest)>)> {
        let mut last = DirtyBitmap::new(src.page_count());
        src.fetch_and_clear_dirty(&mut last)?;
        pages.union_with(&last);
        let (sent, _) = copy_pages(src, dst, &pages, run_pages, false, &mut buf)?;
        let state = src.save_state()?;
        dst.restore_state(&state)?;
        let digests = if config.verify {
            let hashing = Instant::now();
            let (a, b) = (src.digest()?, dst.digest()?);
            verify_time = hashing.elapsed();
            if a != b {
                return Err(GuestError::StateMismatch(format!(
                    "digests differ: source {a}, target {b}"
                )));
            }
            Some((a, b))
        } else {
            None
        };
        Ok((sent, digests))
    };
    let (final_pages, digests) = match finish() {
        Ok(done) => done,
        Err(e) => {
            // Nothing changed hands: the source runs on.
            src.set_throttle(0.0)?;
            src.resume()?;
            return Err(e);
        }
    };
    src.set_throttle(0.0)?;
    dst.resume()?;
    let blackout = blackout.elapsed();
    Ok(LocalReport {
        rounds,
        final_pages,
        blackout,
        total: started.elapsed(),
        digests,
        verify_time,
    })
}
