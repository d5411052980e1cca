//! `[features.<name>]`: a call site's bulkhead, rate limit and store-down policy.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::cache::{CacheConfig, CacheOverrides};
use crate::Error;

use super::validate::{check_count, check_range, DAY, MS};

/// Longest time a full rate-limit burst may take to refill (`burst` x `per` / `requests`).
pub(crate) const MAX_BURST_REFILL: Duration = Duration::from_secs(365 * 24 * 3600);

/// What a feature does when the shared store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StorePolicy {
    /// Keep admitting on this replica's local state (bulkhead limit divided by
    /// `redis.replicas`). Default.
    #[default]
    FailOpen,
    /// Refuse calls with [`crate::Rejection::StoreUnavailable`].
    FailClosed,
}

/// Rate limit: `requests` per `per`, with bursts of up to `burst` at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    /// Requests per interval. At least 1.
    pub requests: u32,
    /// The interval. 1 ms to 24 h, and at least 1 µs per request.
    #[serde(with = "humantime_serde")]
    pub per: Duration,
    /// Requests allowed at once from rest. At least 1. Default: `requests`.
    #[serde(default)]
    pub burst: Option<u32>,
}

/// One feature's limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeatureConfig {
    /// Most calls in flight at once across the fleet; omit or `false` for no bulkhead.
    /// 1 to 1,000,000. Default: `false`.
    #[serde(with = "super::switch::count_or_off")]
    pub max_concurrent: Option<u32>,
    /// Lease of a bulkhead permit: a holder that crashes frees it after this long; long
    /// calls extend it with a heartbeat. 100 ms to 24 h. Default: `30s`.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How long admission may wait for a bulkhead permit or a rate-limit slot before
    /// refusing. 0 (refuse at once) to 10 min. Default: `0s`.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Rate limit; omit or `false` for none. Default: `false`.
    #[serde(with = "super::switch::rate_or_off")]
    pub rate: Option<RateConfig>,
    /// Behaviour when the shared store is unreachable. Default: `fail_open`.
    pub on_store_unavailable: StorePolicy,
    /// The targets a chained call tries, in order (`chain = ["sonnet", "haiku"]`). Default:
    /// none (the feature is used with [`crate::Coordinator::admit`] / `call` only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<String>,
    /// A target of `chain` that a chained call does not fall to: the call ends with "retry
    /// later" (or the canned answer) instead of a weaker model's answer. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_before: Option<String>,
    /// A chained call's overall deadline, all attempts and waits included. 1 ms to 1 h.
    /// Default: `60s`.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Duration>,
    /// The last resort of a chained call (`[features."x".canned]`). Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canned: Option<super::chain::CannedConfig>,
    /// Degraded-response cache fields that differ from `[cache]`
    /// (`[features."<name>".cache]`). Default: none (all inherited).
    pub cache: CacheOverrides,
    /// Retry settings that differ from `[retry]` (`[features."<name>".retry]`), field by
    /// field. Default: none (all inherited).
    pub retry: super::RetryOverrides,
}

impl Default for FeatureConfig {
    fn default() -> Self {
        FeatureConfig {
            max_concurrent: None,
            lease: Duration::from_secs(30),
            max_wait: Duration::ZERO,
            rate: None,
            on_store_unavailable: StorePolicy::FailOpen,
            chain: Vec::new(),
            stop_before: None,
            deadline: None,
            canned: None,
            cache: CacheOverrides::default(),
            retry: super::RetryOverrides::default(),
        }
    }
}

impl FeatureConfig {
    /// This feature's cache settings: `[cache]` with this feature's fields over it.
    pub fn cache(&self, base: &CacheConfig) -> CacheConfig {
        self.cache.apply(base)
    }

    pub(crate) fn validate(&self, at: &str) -> Result<(), Error> {
        if let Some(n) = self.max_concurrent {
            check_count(&format!("{at}.max_concurrent"), n.into(), 1, 1_000_000)?;
        }
        check_range(&format!("{at}.lease"), self.lease, 100 * MS, DAY)?;
        check_range(
            &format!("{at}.max_wait"),
            self.max_wait,
            Duration::ZERO,
            Duration::from_secs(600),
        )?;
        if let Some(r) = &self.rate {
            check_count(
                &format!("{at}.rate.requests"),
                r.requests.into(),
                1,
                1_000_000_000,
            )?;
            check_range(&format!("{at}.rate.per"), r.per, MS, DAY)?;
            if r.per.as_micros() < u128::from(r.requests) {
                return Err(Error::config(
                    format!("{at}.rate"),
                    "more than one request per microsecond",
                ));
            }
            if let Some(b) = r.burst {
                check_count(&format!("{at}.rate.burst"), b.into(), 1, 1_000_000_000)?;
            }
            // The limiter stores its "theoretical arrival time" in µs; Lua reads numbers as
            // doubles, exact to 2^53 µs (about 285 years since 1970). Bounding the time a full
            // burst takes to refill keeps every stored value far below that, so Redis and the
            // in-memory store (i128) agree (issue 5 §2.9).
            let emission_us = (r.per.as_micros() / u128::from(r.requests.max(1))).max(1);
            let refill_us = emission_us * u128::from(r.burst.unwrap_or(r.requests));
            if refill_us > MAX_BURST_REFILL.as_micros() {
                return Err(Error::config(
                    format!("{at}.rate.burst"),
                    format!(
                        "a full burst of {} would take {} days to refill (burst x per / \
                         requests); at most {} days: lower burst or raise the rate",
                        r.burst.unwrap_or(r.requests),
                        refill_us / 86_400_000_000,
                        MAX_BURST_REFILL.as_secs() / 86_400,
                    ),
                ));
            }
        }
        Ok(())
    }
}
