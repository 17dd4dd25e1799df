//! The bandwidth cap of one page stream: a token bucket over all its paths together,
//! counted in bytes on the wire (a zero chunk costs its header, not its pages).
//! Without clocks: the caller passes `Instant`s in and sleeps until the one it gets.
//!
//! The bucket keeps [`BURST`] of credit, so a sender that wakes late (tokio's timer
//! has millisecond granularity and a loaded machine oversleeps) catches up and the
//! average stays at the cap, while an idle stream cannot save up a burst that would
//! flood the network when it resumes.

use std::time::{Duration, Instant};

/// Credit the bucket keeps for a sender that woke late.
pub const BURST: Duration = Duration::from_millis(10);

/// See the module docs.
#[derive(Debug, Default)]
pub struct Pacer {
    /// Bytes per second; `None` sends as fast as the paths take it.
    rate: Option<u64>,
    /// When the bytes admitted so far have all gone at the cap.
    next_free: Option<Instant>,
}

impl Pacer {
    /// A cap of `0` is no cap, as `None` is (the store refuses a zero cap anyway).
    pub fn set_rate(&mut self, bytes_per_sec: Option<u64>) {
        self.rate = bytes_per_sec.filter(|r| *r > 0);
    }

    pub fn rate(&self) -> Option<u64> {
        self.rate
    }

    /// Charges `bytes` to the bucket and says when they may go: `now` when the
    /// stream is unpaced or has credit, later when it is ahead of its cap.
    pub fn admit(&mut self, now: Instant, bytes: usize) -> Instant {
        let Some(rate) = self.rate else {
            self.next_free = None;
            return now;
        };
        let earliest = now.checked_sub(BURST).unwrap_or(now);
        let start = self.next_free.map_or(now, |t| t.max(earliest));
        self.next_free = Some(start + Duration::from_secs_f64(bytes as f64 / rate as f64));
        start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn unpaced_sends_at_once() {
        let mut p = Pacer::default();
        let t = Instant::now();
        for _ in 0..100 {
            assert_eq!(p.admit(t, MIB), t);
        }
        p.set_rate(Some(0));
        assert_eq!(p.rate(), None, "a zero cap is no cap");
    }

    #[test]
    fn a_sender_that_sleeps_as_told_runs_at_the_cap() {
        let mut p = Pacer::default();
        p.set_rate(Some(100 * MIB as u64));
        let start = Instant::now();
        let mut now = start;
        // 200 chunks of 256 KiB = 50 MiB: half a second at 100 MiB/s.
        for _ in 0..200 {
            now = now.max(p.admit(now, 256 << 10));
        }
        let elapsed = now - start;
        // The last chunk starts one chunk short of the whole: 0.5 s - 2.5 ms.
        let expected = Duration::from_secs_f64(0.5 - 0.0025);
        let off = elapsed.abs_diff(expected);
        assert!(off < Duration::from_micros(10), "{elapsed:?}");
    }

    #[test]
    fn a_late_sender_catches_up_by_at_most_the_burst() {
        let mut p = Pacer::default();
        p.set_rate(Some(100 * MIB as u64));
        let t0 = Instant::now();
        // 1 MiB admitted: the bucket is busy until 10 ms.
        assert_eq!(p.admit(t0, MIB), t0);
        // The sender wakes 50 ms late: it may send at once, and the bucket is charged
        // from 10 ms before its wake-up (the burst), not from the 10 ms mark.
        let late = t0 + Duration::from_millis(60);
        assert_eq!(p.admit(late, MIB), late - BURST);
        // Its next MiB waits for what remains of that charge: 10 ms after late - BURST.
        assert_eq!(p.admit(late, MIB), late);
        assert_eq!(p.admit(late, MIB), late + Duration::from_millis(10));
    }

    #[test]
    fn an_idle_stream_does_not_save_up_a_flood() {
        let mut p = Pacer::default();
        p.set_rate(Some(MIB as u64));
        let t0 = Instant::now();
        p.admit(t0, 1);
        let later = t0 + Duration::from_secs(60);
        // After a minute idle, at most BURST of credit: 10 ms of 1 MiB/s is ~10 KiB.
        let mut sent = 0usize;
        while p.admit(later, 1024) <= later {
            sent += 1024;
        }
        assert!(sent <= 12 * 1024, "{sent} bytes at once after idling");
    }
}
