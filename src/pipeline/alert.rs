//! The fleet health signal's arithmetic, as plain data: the twin of `lua/fallback_rate.lua`,
//! used by `MemoryStore`.
//!
//! Per feature, over a sliding window of `buckets` buckets of `bucket_ms` each, the fleet's
//! guarded calls that got an answer and those among them not answered by the chain's primary
//! target (a fallback model, the cache or the canned text). When the fallbacks pass
//! `threshold` of the calls with at least `min_calls` calls in the window, an alert fires,
//! **once per episode**: the window remembers that it is alerting, and the one update that
//! tips it is the only one told so; the episode ends when the rate is back at or below the
//! threshold (or the calls below `min_calls`), and the next crossing fires again.

use std::time::Duration;

/// Buckets per window.
pub const BUCKETS: u32 = 10;
/// Calls counted per bucket at most.
pub const MAX_CALLS: u64 = 1_000_000_000;

/// A feature's alert settings, in the units the store works in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlertParams {
    /// One bucket (ms, at least 1).
    pub bucket_ms: u64,
    /// Buckets in the window.
    pub buckets: u32,
    /// The threshold in millionths of the calls.
    pub threshold_ppm: u64,
    /// Calls the window needs before it can alert.
    pub min_calls: u64,
}

impl AlertParams {
    /// `threshold` (a fraction) over `window` with at least `min_calls` calls.
    pub fn new(threshold: f64, window: Duration, min_calls: u64) -> Self {
        let window_ms = (window.as_millis() as u64).max(u64::from(BUCKETS));
        AlertParams {
            bucket_ms: window_ms / u64::from(BUCKETS),
            buckets: BUCKETS,
            threshold_ppm: (threshold.clamp(0.0, 1.0) * 1e6).round() as u64,
            min_calls,
        }
    }
}

/// What an update found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateReading {
    /// This update started an episode: fire the alert.
    pub fired: bool,
    /// This update ended an episode.
    pub recovered: bool,
    /// Calls in the window.
    pub calls: u64,
    /// Fallbacks in the window.
    pub fallbacks: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    epoch: u64,
    calls: u64,
    fallbacks: u64,
}

/// One feature's window.
#[derive(Debug, Clone, Default)]
pub struct RateWindow {
    buckets: Vec<Bucket>,
    alerting: bool,
}

impl RateWindow {
    /// Counts `calls` calls of which `fallbacks` fell back, now; says whether an episode
    /// starts or ends.
    pub fn add(&mut self, p: &AlertParams, now_ms: u64, calls: u64, fallbacks: u64) -> RateReading {
        let n = p.buckets.clamp(1, 1024) as usize;
        if self.buckets.len() != n {
            self.buckets = vec![Bucket::default(); n];
        }
        let epoch = now_ms / p.bucket_ms.max(1);
        let b = &mut self.buckets[(epoch % n as u64) as usize];
        if b.epoch != epoch {
            *b = Bucket {
                epoch,
                calls: 0,
                fallbacks: 0,
            };
        }
        b.calls = b.calls.saturating_add(calls).min(MAX_CALLS);
        b.fallbacks = b.fallbacks.saturating_add(fallbacks).min(b.calls);
        let (mut total, mut fell) = (0u64, 0u64);
        for b in &self.buckets {
            if b.epoch <= epoch && b.epoch + n as u64 > epoch {
                total += b.calls;
                fell += b.fallbacks;
            }
        }
        let over = total >= p.min_calls.max(1)
            && u128::from(fell) * 1_000_000 > u128::from(p.threshold_ppm) * u128::from(total);
        let fired = over && !self.alerting;
        let recovered = !over && self.alerting;
        self.alerting = over;
        RateReading {
            fired,
            recovered,
            calls: total,
            fallbacks: fell,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    #[test]
    fn fires_once_per_episode_and_again_after_recovery() {
        let p = AlertParams::new(0.05, Duration::from_secs(10), 100);
        let mut w = RateWindow::default();
        let r = w.add(&p, T0, 99, 99);
        assert!(!r.fired, "below min_calls");
        let r = w.add(&p, T0, 1, 0);
        assert!(r.fired, "100 calls, 99% fell back");
        assert!(!w.add(&p, T0, 10, 10).fired, "the same episode");
        // Recovered: 3000 primary answers bring the rate under 5% (109 / 3110).
        let r = w.add(&p, T0, 3000, 0);
        assert!(r.recovered && !r.fired);
        assert!(!w.add(&p, T0, 1, 0).recovered);
        // A new episode.
        assert!(w.add(&p, T0, 1000, 1000).fired);
        // Exactly at the threshold is not over it.
        let mut w = RateWindow::default();
        assert!(!w.add(&p, T0, 100, 5).fired);
        assert!(w.add(&p, T0, 0, 1).fired);
    }

    #[test]
    fn calls_leave_the_window() {
        let p = AlertParams::new(0.05, Duration::from_secs(10), 10);
        let mut w = RateWindow::default();
        assert!(w.add(&p, T0, 10, 10).fired);
        let r = w.add(&p, T0 + 10_000, 0, 0);
        assert_eq!((r.calls, r.fallbacks, r.recovered), (0, 0, true));
    }
}
