//! The pace of progress events within a round, and what a round has done so
//! far: pages left, bytes sent, the rate, the time left.
//!
//! Round 0 copies all of a guest's memory and is most of a move; an event
//! only at each round's end would leave a progress bar still for seconds.
//! [`RoundMeter`] is plain data: the send loop tells it what went out and
//! asks it, with the current instant, whether an event is due. No clock is
//! read here, so the tests drive it with made-up instants.

use std::time::{Duration, Instant};

/// Most time between two progress events of a round. Below the 250 ms the
/// displays promise, so a late timer or a slow send of one run of pages
/// still keeps them within it.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// One round's progress so far, as the events show it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundSample {
    /// Pages of the round not yet read and sent.
    pub remaining_pages: u64,
    /// Bytes of page data queued on the stream in the round.
    pub bytes_sent: u64,
    /// Bytes per second over the round so far (0 before any time passed).
    pub rate: f64,
    /// Time until the round's last page is sent at its pace so far; `None`
    /// until a page has gone out.
    pub eta: Option<Duration>,
}

/// Decides when a round emits a progress event and measures the round.
#[derive(Debug, Clone)]
pub struct RoundMeter {
    every: Duration,
    started: Instant,
    last_event: Instant,
    pages: u64,
    pages_done: u64,
    bytes: u64,
}

impl RoundMeter {
    /// A round of `pages` pages that began at `started`. Its first event is
    /// due one interval after the start (the round's opening is announced by
    /// the event that ended the round before).
    pub fn new(started: Instant, pages: u64, every: Duration) -> RoundMeter {
        RoundMeter {
            every,
            started,
            last_event: started,
            pages,
            pages_done: 0,
            bytes: 0,
        }
    }

    /// Records `pages` pages handled (sent, or skipped as zero) carrying
    /// `bytes` bytes of data.
    pub fn advance(&mut self, pages: u64, bytes: u64) {
        self.pages_done = (self.pages_done + pages).min(self.pages);
        self.bytes += bytes;
    }

    /// When the next event is due.
    pub fn next_due(&self) -> Instant {
        self.last_event + self.every
    }

    /// Whether an event is due at `now`; if so, counts it as emitted.
    pub fn due(&mut self, now: Instant) -> bool {
        if now < self.next_due() {
            return false;
        }
        self.last_event = now;
        true
    }

    /// The round so far, as of `now`.
    pub fn sample(&self, now: Instant) -> RoundSample {
        let elapsed = now.saturating_duration_since(self.started);
        let secs = elapsed.as_secs_f64();
        let remaining_pages = self.pages - self.pages_done;
        let eta = (self.pages_done > 0).then(|| {
            // Pages, not bytes: zero pages cost a read but no data, and the
            // round's mix of them so far is the best guess for the rest.
            elapsed.mul_f64(remaining_pages as f64 / self.pages_done as f64)
        });
        RoundSample {
            remaining_pages,
            bytes_sent: self.bytes,
            rate: if secs > 0.0 {
                self.bytes as f64 / secs
            } else {
                0.0
            },
            eta,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn an_event_is_due_once_per_interval_however_often_asked() {
        let t0 = Instant::now();
        let mut meter = RoundMeter::new(t0, 1000, PROGRESS_EVERY);
        // Asked every 10 ms for 2 s: one event per 200 ms, never two at once.
        let emitted: Vec<Duration> = (1..=200)
            .map(|i| t0 + 10 * i * MS)
            .filter(|&now| meter.due(now))
            .map(|now| now - t0)
            .collect();
        assert_eq!(emitted.len(), 10, "{emitted:?}");
        assert_eq!(emitted[0], 200 * MS);
        assert!(emitted.windows(2).all(|w| w[1] - w[0] == 200 * MS));
    }

    #[test]
    fn a_late_check_emits_once_and_the_next_interval_counts_from_it() {
        let t0 = Instant::now();
        let mut meter = RoundMeter::new(t0, 1000, PROGRESS_EVERY);
        assert!(!meter.due(t0 + 199 * MS));
        // A send that blocked for 700 ms: one event, not a burst of three.
        assert!(meter.due(t0 + 700 * MS));
        assert!(!meter.due(t0 + 701 * MS));
        assert!(!meter.due(t0 + 899 * MS));
        assert!(meter.due(t0 + 900 * MS));
        assert_eq!(meter.next_due(), t0 + 1100 * MS);
    }

    #[test]
    fn the_sample_measures_rate_remaining_and_eta_over_the_round() {
        let t0 = Instant::now();
        let mut meter = RoundMeter::new(t0, 1000, PROGRESS_EVERY);
        let before = meter.sample(t0);
        assert_eq!(before.remaining_pages, 1000);
        assert_eq!(before.rate, 0.0);
        assert_eq!(before.eta, None, "no pace before a page went out");

        meter.advance(200, 200 * 4096);
        meter.advance(50, 0); // zero pages: handled, no data
        let s = meter.sample(t0 + 500 * MS);
        assert_eq!(s.remaining_pages, 750);
        assert_eq!(s.bytes_sent, 200 * 4096);
        assert!((s.rate - 200.0 * 4096.0 / 0.5).abs() < 1e-6, "{}", s.rate);
        // 250 pages took 500 ms: 750 more take 1.5 s.
        assert_eq!(s.eta, Some(1500 * MS));
    }

    #[test]
    fn a_finished_round_has_nothing_left_and_no_time_to_go() {
        let t0 = Instant::now();
        let mut meter = RoundMeter::new(t0, 10, PROGRESS_EVERY);
        meter.advance(8, 8 * 4096);
        meter.advance(8, 8 * 4096); // more than the round holds is capped
        let s = meter.sample(t0 + 100 * MS);
        assert_eq!(s.remaining_pages, 0);
        assert_eq!(s.eta, Some(Duration::ZERO));
    }
}
