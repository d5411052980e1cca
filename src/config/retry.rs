//! `[retry]`: backoff between attempts at one target and the fleet-wide retry budget per
//! target; `[features."<name>".retry]` changes single fields for one feature, inheriting the
//! rest from `[retry]` (as `[targets."<name>".breaker]` does from `[breaker]`).
//!
//! ```toml
//! [retry]
//! base = "500ms"
//! cap = "8s"
//! max_attempts = 3
//! jitter = "full"            # "full", "proportional" (±25%), "decorrelated" or "none"
//! retry_after_cap = "60s"
//! budget = { ratio = 0.2, window = "10s", min_per_second = 3 }   # or false
//!
//! [features.chat.retry]
//! max_attempts = 2
//! budget = false             # this feature's retries do not draw on the budget
//! ```
//!
//! The budget is per target and shared by every feature that calls it, so its settings are
//! `[retry]`'s only: a feature can opt out of it (`budget = false`) but not resize it.

use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::switch;
use super::validate::{check_count, check_range, MS};
use super::Config;
use crate::retry::budget::BudgetParams;
use crate::retry::{BackoffParams, Jitter};
use crate::Error;

/// Backoff and retry budget settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// First backoff step: the delay before retry `n` is jittered from `min(cap, base × 2^n)`.
    /// 1 ms to 1 min. Default: `500ms`.
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    /// Largest computed delay. `base` to 10 min. Default: `8s`.
    #[serde(with = "humantime_serde")]
    pub cap: Duration,
    /// Attempts per target, the first one included (1: no retry). 1 to 10. Default: `3`.
    pub max_attempts: u32,
    /// How delays are randomised: `full` (`rand(0, step)`), `proportional` (`step ×
    /// [0.75, 1.25)`), `decorrelated` (`min(cap, rand(base, previous × 3))`) or `none`.
    /// Default: `full`.
    pub jitter: Jitter,
    /// Longest upstream `retry-after` honoured: a shorter one is waited for in full (it is a
    /// floor under the jittered delay); a longer one ends the retries on that target at once
    /// (the call falls through to its next tier). 0 to 1 h. Default: `60s`.
    #[serde(with = "humantime_serde")]
    pub retry_after_cap: Duration,
    /// The fleet-wide retry budget per target; `false` switches it off. Default: see
    /// [`BudgetConfig`].
    #[serde(with = "budget_or_off")]
    pub budget: Option<BudgetConfig>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        let b = BackoffParams::default();
        RetryConfig {
            base: b.base,
            cap: b.cap,
            max_attempts: b.max_attempts,
            jitter: b.jitter,
            retry_after_cap: b.retry_after_cap,
            budget: Some(BudgetConfig::default()),
        }
    }
}

/// The retry budget (Finagle `RetryBudget`): over any `window`, the fleet retries a target at
/// most `ratio × requests + min_per_second × window` times.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetConfig {
    /// Retries allowed per request (0.2: one retry per five requests). 0 to 10. Default:
    /// `0.2`.
    pub ratio: f64,
    /// The sliding window requests and retries are counted over (in 10 buckets). 100 ms to
    /// 1 h. Default: `10s`.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Retries per second always allowed, fleet-wide, however few the requests (so a quiet
    /// target can still retry). 0 to 100,000. Default: `3`.
    pub min_per_second: f64,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            ratio: 0.2,
            window: Duration::from_secs(10),
            min_per_second: 3.0,
        }
    }
}

impl BudgetConfig {
    /// The store's units.
    pub fn params(&self) -> BudgetParams {
        BudgetParams::new(self.ratio, self.window, self.min_per_second)
    }

    fn validate(&self, at: &str) -> Result<(), Error> {
        if !(self.ratio.is_finite() && (0.0..=10.0).contains(&self.ratio)) {
            return Err(Error::config(
                format!("{at}.ratio"),
                format!("{} is out of range (0 to 10)", self.ratio),
            ));
        }
        check_range(
            &format!("{at}.window"),
            self.window,
            100 * MS,
            Duration::from_secs(3600),
        )?;
        if !(self.min_per_second.is_finite() && (0.0..=100_000.0).contains(&self.min_per_second)) {
            return Err(Error::config(
                format!("{at}.min_per_second"),
                format!("{} is out of range (0 to 100000)", self.min_per_second),
            ));
        }
        if self.ratio == 0.0 && self.min_per_second == 0.0 {
            return Err(Error::config(
                at,
                "ratio and min_per_second are both 0, so no retry could ever be sent: \
                 set max_attempts = 1 instead, or raise one of them",
            ));
        }
        Ok(())
    }
}

impl RetryConfig {
    /// The backoff settings.
    pub fn backoff(&self) -> BackoffParams {
        BackoffParams {
            base: self.base,
            cap: self.cap,
            max_attempts: self.max_attempts,
            jitter: self.jitter,
            retry_after_cap: self.retry_after_cap,
        }
    }

    pub(crate) fn validate(&self, at: &str) -> Result<(), Error> {
        check_range(
            &format!("{at}.base"),
            self.base,
            MS,
            Duration::from_secs(60),
        )?;
        check_range(
            &format!("{at}.cap"),
            self.cap,
            self.base,
            Duration::from_secs(600),
        )?;
        check_count(
            &format!("{at}.max_attempts"),
            self.max_attempts.into(),
            1,
            10,
        )?;
        check_range(
            &format!("{at}.retry_after_cap"),
            self.retry_after_cap,
            Duration::ZERO,
            Duration::from_secs(3600),
        )?;
        if let Some(b) = &self.budget {
            b.validate(&format!("{at}.budget"))?;
        }
        Ok(())
    }
}

/// Retry fields a feature sets; `None` inherits `[retry]`'s. See [`RetryConfig`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RetryOverrides {
    #[serde(
        with = "switch::inherit_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub base: Option<Duration>,
    #[serde(
        with = "switch::inherit_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub cap: Option<Duration>,
    #[serde(
        deserialize_with = "switch::inherit_count::deserialize",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jitter: Option<Jitter>,
    #[serde(
        with = "switch::inherit_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry_after_cap: Option<Duration>,
    /// `false`: this feature's retries do not draw on the budget (nor are they limited by
    /// it). `true` (or left out): `[retry]`'s budget, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<bool>,
}

impl RetryOverrides {
    /// `base` with the fields set here over it.
    pub fn apply(&self, base: &RetryConfig) -> RetryConfig {
        RetryConfig {
            base: self.base.unwrap_or(base.base),
            cap: self.cap.unwrap_or(base.cap),
            max_attempts: self.max_attempts.unwrap_or(base.max_attempts),
            jitter: self.jitter.unwrap_or(base.jitter),
            retry_after_cap: self.retry_after_cap.unwrap_or(base.retry_after_cap),
            budget: match self.budget {
                Some(false) => None,
                _ => base.budget.clone(),
            },
        }
    }
}

impl Config {
    /// The retry settings `feature` runs with: its own fields over `[retry]` (`[retry]`
    /// itself for a feature that is not configured).
    pub fn retry_for(&self, feature: &str) -> RetryConfig {
        match self.features.get(feature) {
            Some(f) => f.retry.apply(&self.retry),
            None => self.retry.clone(),
        }
    }
}

/// Checks `[retry]` and every feature's resolved retry settings.
pub(crate) fn validate(config: &Config) -> Result<(), Error> {
    config.retry.validate("retry")?;
    for name in config.features.keys() {
        config
            .retry_for(name)
            .validate(&format!("features.{name}.retry"))?;
    }
    Ok(())
}

/// `budget`: a table, or `false` / `"off"`.
mod budget_or_off {
    use super::*;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<BudgetConfig>, D::Error> {
        let v = toml::Value::deserialize(d)?;
        match &v {
            toml::Value::Boolean(false) => Ok(None),
            toml::Value::String(s) if s == "off" => Ok(None),
            toml::Value::Table(_) => BudgetConfig::deserialize(v)
                .map(Some)
                .map_err(|e| D::Error::custom(e.message())),
            _ => Err(D::Error::custom(
                "expected a table such as { ratio = 0.2, window = \"10s\", min_per_second = 3 }, \
                 or false to switch the budget off",
            )),
        }
    }

    pub(crate) fn serialize<S: Serializer>(
        v: &Option<BudgetConfig>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_bool(false),
            Some(b) => b.serialize(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(text: &str) -> String {
        match Config::from_toml(text) {
            Err(Error::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn features_inherit_retry_fields_one_by_one() {
        let c = Config::from_toml(
            r#"
            [retry]
            base = "100ms"
            max_attempts = 4
            jitter = "decorrelated"
            budget = { ratio = 0.1 }

            [features.chat.retry]
            max_attempts = 2
            [features.batch.retry]
            budget = false
            [features.plain]
            "#,
        )
        .expect("valid");
        let chat = c.retry_for("chat");
        assert_eq!(chat.max_attempts, 2);
        assert_eq!(chat.base, Duration::from_millis(100), "inherited");
        assert_eq!(chat.jitter, Jitter::Decorrelated, "inherited");
        let b = chat.budget.expect("inherited budget");
        assert_eq!(b.ratio, 0.1);
        assert_eq!(
            b.window,
            Duration::from_secs(10),
            "default within the table"
        );
        assert_eq!(c.retry_for("batch").budget, None);
        assert_eq!(c.retry_for("batch").max_attempts, 4);
        assert_eq!(c.retry_for("plain"), c.retry);
        let off = Config::from_toml("[retry]\nbudget = false").expect("valid");
        assert_eq!(off.retry.budget, None);
        assert_eq!(Config::default().retry, RetryConfig::default());
    }

    #[test]
    fn bad_retry_settings_name_the_field() {
        assert_eq!(field_of("[retry]\nmax_attempts = 0"), "retry.max_attempts");
        assert_eq!(field_of("[retry]\nbase = \"0s\""), "retry.base");
        assert_eq!(
            field_of("[retry]\nbase = \"2s\"\ncap = \"1s\""),
            "retry.cap"
        );
        assert_eq!(field_of("[retry]\njitter = \"wild\""), "retry.jitter");
        assert_eq!(
            field_of("[retry.budget]\nratio = -1.0"),
            "retry.budget.ratio"
        );
        assert_eq!(
            field_of("[retry.budget]\nwindow = \"1ms\""),
            "retry.budget.window"
        );
        assert_eq!(
            field_of("[retry.budget]\nratio = 0\nmin_per_second = 0"),
            "retry.budget"
        );
        assert_eq!(field_of("[retry]\nbudget = 3"), "retry.budget");
        assert_eq!(
            field_of("[features.chat.retry]\nmax_attempts = 11"),
            "features.chat.retry.max_attempts"
        );
        assert_eq!(
            field_of("[features.chat.retry]\ncap = \"1ms\""),
            "features.chat.retry.cap"
        );
        assert_eq!(
            field_of("[features.chat.retry]\nbogus = 1"),
            "features.chat.retry.bogus"
        );
    }

    #[test]
    fn a_written_retry_config_reads_back_the_same() {
        let c = Config::from_toml(
            "[retry]\nbudget = false\n[features.chat.retry]\nmax_attempts = 2\nbudget = false",
        )
        .expect("valid");
        let text = toml::to_string(&c).expect("serializes");
        assert_eq!(Config::from_toml(&text).expect("reads back"), c);
    }
}
