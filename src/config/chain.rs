//! The fallback chain's settings: per feature, `chain = ["sonnet", "haiku"]` (the targets to
//! try, in order), `stop_before`, `deadline` and a `[features."x".canned]` last resort; per
//! target, `model`, `max_tokens`, `timeout` (per attempt) and `context_window` in
//! `[targets."x"]`. Checked here, with the field named.

use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::feature::FeatureConfig;
use super::target::TargetConfig;
use super::validate::{check_count, check_name, check_range, DAY, HOUR, MS};
use crate::Error;

/// A target's attempt timeout when `[targets."x"] timeout` is not set.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);
/// A chained call's overall deadline when `[features."x"] deadline` is not set.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);
/// Longest canned text, in bytes.
pub(super) const MAX_CANNED_BYTES: usize = 64 * 1024;

/// The fleet health signal (`[fallback_alert]`): an [`crate::Event::FallbackAlert`] fires
/// once per episode when, fleet-wide, more than `threshold` of a feature's answered guarded
/// calls over `window` were not answered by its primary target, with at least `min_calls`
/// calls in the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FallbackAlertConfig {
    /// The fallback rate to pass (a fraction, 0 to 1). Default: `0.05`.
    pub threshold: f64,
    /// The sliding window (10 buckets). 1 s to 1 day. Default: `1h`.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Calls the window needs before it can alert. 1 to 10^9. Default: `100`.
    pub min_calls: u64,
}

impl Default for FallbackAlertConfig {
    fn default() -> Self {
        FallbackAlertConfig {
            threshold: 0.05,
            window: HOUR,
            min_calls: 100,
        }
    }
}

impl FallbackAlertConfig {
    pub(super) fn validate(&self, field: &str) -> Result<(), Error> {
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(Error::config(
                format!("{field}.threshold"),
                "must be a fraction from 0 to 1",
            ));
        }
        check_range(
            &format!("{field}.window"),
            self.window,
            Duration::from_secs(1),
            DAY,
        )?;
        check_count(
            &format!("{field}.min_calls"),
            self.min_calls,
            1,
            1_000_000_000,
        )
    }
}

/// The last resort of a feature: what the caller gets when no target (and no cached answer)
/// could answer, with the retry guidance to show. With one configured, a chained call never
/// ends in a bare failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CannedConfig {
    /// The answer's text. 1 byte to 64 KiB.
    pub text: String,
    /// "Try again after": used when the chain learned no better hint (an open breaker's or an
    /// upstream's `retry-after`). Up to 24 h. Default: none.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry_after: Option<Duration>,
}

pub(super) fn validate_feature(at: &str, f: &FeatureConfig) -> Result<(), Error> {
    let mut seen = HashSet::new();
    for (i, t) in f.chain.iter().enumerate() {
        let field = format!("{at}.chain[{i}]");
        check_name(&field, t)?;
        if !seen.insert(t.as_str()) {
            return Err(Error::config(field, format!("{t:?} is listed twice")));
        }
    }
    if let Some(s) = &f.stop_before {
        let field = format!("{at}.stop_before");
        match f.chain.iter().position(|t| t == s) {
            None => return Err(Error::config(field, format!("{s:?} is not in {at}.chain"))),
            Some(0) => {
                return Err(Error::config(
                    field,
                    format!("{s:?} is the first target of the chain: nothing would be tried"),
                ))
            }
            Some(_) => {}
        }
    }
    if let Some(d) = f.deadline {
        check_range(&format!("{at}.deadline"), d, MS, HOUR)?;
    }
    if let Some(c) = &f.canned {
        if c.text.is_empty() || c.text.len() > MAX_CANNED_BYTES {
            return Err(Error::config(
                format!("{at}.canned.text"),
                format!("must be 1 to {MAX_CANNED_BYTES} bytes"),
            ));
        }
        if let Some(d) = c.retry_after {
            check_range(&format!("{at}.canned.retry_after"), d, Duration::ZERO, DAY)?;
        }
    }
    Ok(())
}

pub(super) fn validate_target(at: &str, t: &TargetConfig) -> Result<(), Error> {
    if let Some(m) = &t.model {
        if m.is_empty() || m.len() > 200 {
            return Err(Error::config(
                format!("{at}.model"),
                "must be 1 to 200 characters",
            ));
        }
    }
    if let Some(n) = t.max_tokens {
        check_count(&format!("{at}.max_tokens"), n.into(), 1, 10_000_000)?;
    }
    if let Some(n) = t.context_window {
        check_count(&format!("{at}.context_window"), n.into(), 1, 100_000_000)?;
    }
    if let Some(d) = t.timeout {
        check_range(&format!("{at}.timeout"), d, MS, HOUR)?;
    }
    Ok(())
}
