//! A breaker around the store itself: after `failure_threshold` consecutive unavailability
//! failures the coordinator stops asking Redis and runs on local state; every
//! `retry_interval` one call probes Redis, and a success brings the replica back.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

// Tokio's clock: real time, or paused time in tests (`tokio::time::pause`).
use tokio::time::Instant;

/// Where one operation should go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// The shared store (healthy, or this call is the recovery probe).
    Remote,
    /// Local state (the store is marked down and it is not time to probe).
    Local,
}

#[derive(Debug)]
pub(crate) struct Health {
    threshold: u32,
    retry_interval_us: u64,
    epoch: Instant,
    failures: AtomicU32,
    degraded: AtomicBool,
    /// While degraded: the next instant (µs since `epoch`) at which one call may probe.
    next_probe_us: AtomicU64,
    /// How many times the store was marked down: a success proves recovery only for an
    /// operation that started after the latest of them ([`Health::token`]).
    downs: AtomicU64,
}

/// What a report changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    None,
    Degraded,
    Recovered,
}

impl Health {
    pub(crate) fn new(threshold: u32, retry_interval: Duration) -> Self {
        Health {
            threshold: threshold.max(1),
            retry_interval_us: retry_interval.as_micros() as u64,
            epoch: Instant::now(),
            failures: AtomicU32::new(0),
            degraded: AtomicBool::new(false),
            next_probe_us: AtomicU64::new(0),
            downs: AtomicU64::new(0),
        }
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    pub(crate) fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// Healthy: remote. Degraded: remote for exactly one caller per retry interval (it wins
    /// the compare-exchange that pushes the next probe time forward), local for the rest.
    pub(crate) fn route(&self) -> Route {
        if !self.is_degraded() {
            return Route::Remote;
        }
        let now = self.now_us();
        let next = self.next_probe_us.load(Ordering::Acquire);
        if now >= next
            && self
                .next_probe_us
                .compare_exchange(
                    next,
                    now + self.retry_interval_us,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            Route::Remote
        } else {
            Route::Local
        }
    }

    /// Taken when an operation starts, for [`Self::success_since`].
    pub(crate) fn token(&self) -> u64 {
        self.downs.load(Ordering::Acquire)
    }

    /// A success of an operation that started at `token` (`None`: unknown). While degraded,
    /// only an operation that started after the store was marked down proves it is back:
    /// an answer to a request sent before the outage began says nothing about now.
    pub(crate) fn success_since(&self, token: Option<u64>) -> Change {
        if self.is_degraded() && token != Some(self.token()) {
            return Change::None;
        }
        self.success()
    }

    pub(crate) fn success(&self) -> Change {
        self.failures.store(0, Ordering::Release);
        if self.degraded.swap(false, Ordering::AcqRel) {
            Change::Recovered
        } else {
            Change::None
        }
    }

    /// Marks the store down whatever the threshold (it did not answer at start).
    pub(crate) fn down(&self) -> Change {
        self.failures.store(self.threshold, Ordering::Release);
        self.next_probe_us
            .store(self.now_us() + self.retry_interval_us, Ordering::Release);
        if !self.degraded.swap(true, Ordering::AcqRel) {
            self.downs.fetch_add(1, Ordering::AcqRel);
            Change::Degraded
        } else {
            Change::None
        }
    }

    pub(crate) fn failure(&self) -> Change {
        let n = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if n >= self.threshold {
            self.next_probe_us
                .store(self.now_us() + self.retry_interval_us, Ordering::Release);
            if !self.degraded.swap(true, Ordering::AcqRel) {
                self.downs.fetch_add(1, Ordering::AcqRel);
                return Change::Degraded;
            }
        }
        Change::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trips_after_threshold_and_recovers_on_success() {
        let h = Health::new(2, Duration::from_secs(3600));
        assert_eq!(h.route(), Route::Remote);
        assert_eq!(h.failure(), Change::None);
        assert_eq!(h.failure(), Change::Degraded);
        assert!(h.is_degraded());
        assert_eq!(h.route(), Route::Local, "no probe before the interval");
        assert_eq!(h.failure(), Change::None, "degraded is reported once");
        assert_eq!(h.success(), Change::Recovered);
        assert_eq!(h.route(), Route::Remote);
    }

    #[test]
    fn a_late_answer_to_a_request_sent_before_the_outage_does_not_recover() {
        let h = Health::new(1, Duration::from_secs(3600));
        let before = h.token();
        assert_eq!(h.failure(), Change::Degraded);
        assert_eq!(
            h.success_since(Some(before)),
            Change::None,
            "sent before the outage"
        );
        assert_eq!(h.success_since(None), Change::None, "unknown start");
        assert!(h.is_degraded());
        let after = h.token();
        assert_eq!(h.success_since(Some(after)), Change::Recovered);
        assert_eq!(
            h.success_since(None),
            Change::None,
            "healthy: nothing to change"
        );
    }

    #[test]
    fn one_probe_per_interval() {
        let h = Health::new(1, Duration::from_millis(0));
        h.failure();
        // interval 0: due at once, but the first winner pushes `next` to now + 0 each time;
        // with a long interval only one caller may pass.
        let h2 = Health::new(1, Duration::from_secs(3600));
        h2.failure();
        h2.next_probe_us.store(0, Ordering::Release);
        let routes: Vec<_> = (0..100).map(|_| h2.route()).collect();
        assert_eq!(routes.iter().filter(|r| **r == Route::Remote).count(), 1);
        assert_eq!(h.route(), Route::Remote);
    }
}
