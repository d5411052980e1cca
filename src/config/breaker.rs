//! `[breaker]`: breaker settings, the defaults for every target.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Error;

use super::validate::{check_count, check_pct, check_range, shown, DAY, HOUR, MS};

/// Breaker settings for one target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Open after this many consecutive failures; `false` switches the rule off. At least 1.
    /// Default: `5`.
    #[serde(with = "super::switch::count_or_off")]
    pub consecutive_failures: Option<u32>,
    /// Open when failures are at least this percentage of the calls in the window (with at
    /// least `minimum_calls`); `false` switches the rule off. Over 0, at most 100.
    /// Default: `50.0`.
    #[serde(with = "super::switch::percent_or_off")]
    pub failure_rate: Option<f64>,
    /// Calls needed in the window before rates are judged. At least 1. Default: `20`.
    /// Rates are judged when a call that counts against the target is recorded (a failure,
    /// or a slow call under the slow-call rule): a success that is not slow never opens the
    /// breaker, even the one that brings the window to `minimum_calls`.
    pub minimum_calls: u32,
    /// Length of the sliding window. 1 s to 1 h. Default: `60s`.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Buckets the window is kept in (its resolution). 1 to 60, and the window must be at
    /// least 1 ms per bucket. Default: `10`.
    pub window_buckets: u32,
    /// A call taking at least this long counts as slow; `false` does not track slow calls.
    /// 1 ms to 1 h. Default: `false`.
    #[serde(with = "super::switch::duration_or_off")]
    pub slow_call_duration: Option<Duration>,
    /// Open when slow calls are at least this percentage of the window's calls (with
    /// `slow_call_duration` set). Over 0, at most 100. Default: `100.0`.
    pub slow_call_rate: f64,
    /// How long the breaker stays open before probing. 1 ms to 24 h. Default: `60s`.
    #[serde(with = "humantime_serde")]
    pub open_duration: Duration,
    /// Each consecutive re-open (a failed probe) multiplies the open duration by this.
    /// 1.0 (no growth), or 1.01 to 100. Default: `1.0`.
    pub open_duration_multiplier: f64,
    /// Cap on the grown open duration; at least `open_duration`, at most 24 h.
    /// Default: `300s`.
    #[serde(with = "humantime_serde")]
    pub max_open_duration: Duration,
    /// Probe calls admitted at once, fleet-wide, while half-open. 1 to 1000. Default: `1`.
    pub half_open_probes: u32,
    /// Successful probes that close the breaker. 1 to 1000. Default: `1`.
    pub half_open_successes: u32,
    /// A probe that has not reported back after this long frees its slot for another.
    /// 1 ms to 1 h. Default: `30s`.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: Some(5),
            failure_rate: Some(50.0),
            minimum_calls: 20,
            window: Duration::from_secs(60),
            window_buckets: 10,
            slow_call_duration: None,
            slow_call_rate: 100.0,
            open_duration: Duration::from_secs(60),
            open_duration_multiplier: 1.0,
            max_open_duration: Duration::from_secs(300),
            half_open_probes: 1,
            half_open_successes: 1,
            probe_timeout: Duration::from_secs(30),
        }
    }
}

impl BreakerConfig {
    pub(crate) fn validate(&self, at: &str) -> Result<(), Error> {
        if let Some(n) = self.consecutive_failures {
            check_count(
                &format!("{at}.consecutive_failures"),
                n.into(),
                1,
                1_000_000,
            )?;
        }
        if let Some(r) = self.failure_rate {
            check_pct(&format!("{at}.failure_rate"), r)?;
        }
        check_count(
            &format!("{at}.minimum_calls"),
            self.minimum_calls.into(),
            1,
            1_000_000,
        )?;
        check_range(
            &format!("{at}.window"),
            self.window,
            Duration::from_secs(1),
            HOUR,
        )?;
        check_count(
            &format!("{at}.window_buckets"),
            self.window_buckets.into(),
            1,
            60,
        )?;
        if let Some(d) = self.slow_call_duration {
            check_range(&format!("{at}.slow_call_duration"), d, MS, HOUR)?;
            check_pct(&format!("{at}.slow_call_rate"), self.slow_call_rate)?;
        }
        check_range(&format!("{at}.open_duration"), self.open_duration, MS, DAY)?;
        let m = self.open_duration_multiplier;
        // 1.0 (no growth), or at least 1.01 so that the grown duration reaches its cap in a
        // bounded number of steps (the store computes it step by step, inside Redis too).
        if !(m == 1.0 || (1.01..=100.0).contains(&m)) {
            return Err(Error::config(
                format!("{at}.open_duration_multiplier"),
                format!("{m} is out of range (1.0, or 1.01 to 100)"),
            ));
        }
        if self.max_open_duration < self.open_duration {
            // Named both ways: a long `open_duration` alone meets the default cap (5 m), and
            // the field to change is then one the user never wrote.
            return Err(Error::config(
                format!("{at}.max_open_duration"),
                format!(
                    "{} is shorter than open_duration ({}): the cap on the grown open \
                     duration must be at least open_duration (default 5m); raise \
                     max_open_duration too",
                    shown(self.max_open_duration),
                    shown(self.open_duration)
                ),
            ));
        }
        check_range(
            &format!("{at}.max_open_duration"),
            self.max_open_duration,
            self.open_duration,
            DAY,
        )?;
        check_count(
            &format!("{at}.half_open_probes"),
            self.half_open_probes.into(),
            1,
            1000,
        )?;
        check_count(
            &format!("{at}.half_open_successes"),
            self.half_open_successes.into(),
            1,
            1000,
        )?;
        check_range(&format!("{at}.probe_timeout"), self.probe_timeout, MS, HOUR)?;
        if self.consecutive_failures.is_none()
            && self.failure_rate.is_none()
            && self.slow_call_duration.is_none()
        {
            return Err(Error::config(
                at,
                "no rule can open this breaker: set consecutive_failures, failure_rate or \
                 slow_call_duration (or disable it at run time)",
            ));
        }
        Ok(())
    }
}
