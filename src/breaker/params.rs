//! Breaker parameters in the units the state machine (and the Lua scripts) use.

use crate::config::BreakerConfig;

/// A validated [`BreakerConfig`] in milliseconds and plain numbers. `0` switches a rule off.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerParams {
    /// Trip after this many consecutive failures (0: rule off).
    pub consecutive_failures: u32,
    /// Trip when failures * 100 >= this * calls over the window (0: rule off).
    pub failure_rate_pct: f64,
    /// Rates are only judged over at least this many calls in the window.
    pub minimum_calls: u32,
    /// Width of one window bucket, in ms.
    pub bucket_ms: u64,
    /// Number of buckets in the sliding window.
    pub buckets: u32,
    /// A call at least this slow counts as slow (0: slow calls not tracked).
    pub slow_call_ms: u64,
    /// Trip when slow * 100 >= this * calls over the window (0: rule off).
    pub slow_call_rate_pct: f64,
    /// First open duration, in ms.
    pub open_ms: u64,
    /// Each further consecutive open multiplies the duration by this (>= 1).
    pub open_multiplier: f64,
    /// Cap on the open duration, in ms.
    pub max_open_ms: u64,
    /// Probes admitted at once fleet-wide while half-open.
    pub half_open_probes: u32,
    /// Successful probes needed to close.
    pub half_open_successes: u32,
    /// A probe that has not reported after this long frees its slot, in ms.
    pub probe_timeout_ms: u64,
    /// Time-to-live of an idle breaker key, in ms.
    pub idle_ttl_ms: u64,
}

impl BreakerParams {
    /// Converts a config already checked by [`crate::Config::validate`].
    pub fn from_config(c: &BreakerConfig, idle_ttl_ms: u64) -> Self {
        let window_ms = c.window.as_millis() as u64;
        let buckets = c.window_buckets.max(1);
        BreakerParams {
            consecutive_failures: c.consecutive_failures.unwrap_or(0),
            failure_rate_pct: c.failure_rate.unwrap_or(0.0),
            minimum_calls: c.minimum_calls,
            bucket_ms: (window_ms / u64::from(buckets)).max(1),
            buckets,
            slow_call_ms: c.slow_call_duration.map_or(0, |d| d.as_millis() as u64),
            slow_call_rate_pct: if c.slow_call_duration.is_some() {
                c.slow_call_rate
            } else {
                0.0
            },
            open_ms: c.open_duration.as_millis() as u64,
            open_multiplier: c.open_duration_multiplier,
            max_open_ms: c.max_open_duration.as_millis() as u64,
            half_open_probes: c.half_open_probes,
            half_open_successes: c.half_open_successes,
            probe_timeout_ms: c.probe_timeout.as_millis() as u64,
            idle_ttl_ms,
        }
    }

    /// Open duration for the `opens`-th consecutive open (1-based): `open_ms` multiplied by
    /// the multiplier once per re-open without rounding, then rounded up once and capped, so
    /// that Rust and Lua (both IEEE doubles, same operations) agree to the millisecond and a
    /// short duration with a small multiplier still grows (10 ms x 1.05 = 10.5 -> 11 ms). The
    /// loop ends at the cap: with a multiplier of at least 1.01 (validated) that is at most
    /// about 1,900 steps.
    pub fn open_duration_ms(&self, opens: u32) -> u64 {
        let cap = self.max_open_ms.max(self.open_ms) as f64;
        let mut d = self.open_ms as f64;
        let mut i = 1;
        while i < opens && d < cap && self.open_multiplier > 1.0 {
            d *= self.open_multiplier;
            i += 1;
        }
        d.ceil().min(cap) as u64
    }
}
